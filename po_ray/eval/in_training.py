"""Generation eval inside the training loop: one call, every ``eval.every_steps`` and at the end."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from po_ray.config import Config
from po_ray.engine import build_engine
from po_ray.eval.generation import generation_eval, held_out_prompts, sample_records, samples_table
from po_ray.eval.judges import build_judge
from po_ray.model import build_deepspeed_config
from po_ray.reference import free, reference_model_config

SAMPLES_TABLE = "gen_samples.json"  # one MLflow table, a row per sample, a `step` column across evals


def is_due(cfg: Config, step: int) -> bool:
    """Whether step ``step`` (1-based, after its update) runs the generation eval."""
    every, last = cfg.eval.every_steps, step == cfg.train.max_steps
    return cfg.eval.enabled and (last or bool(every) and step % every == 0)


def evaluate_generation(engine, reference, *, cfg: Config, tokenizer, eval_pairs, engine_args: dict, rank: int,
                        world: int, device, run_dir: Path, tracker, step: int) -> dict[str, float]:
    """``gen/…`` metrics of the policy ``engine`` at ``step`` (collective; the same dict on every rank).

    The reference is the sharded reference's engine; with a precomputed or no reference, one is built
    for this eval and freed after, so training keeps the memory it saved. Rank 0 writes the samples to
    ``run_dir/gen_samples/step_<step>.jsonl`` and logs them to the tracker as a table.
    """
    ref_engine, temporary = getattr(reference, "engine", None), False
    if ref_engine is None:
        ds = build_deepspeed_config(cfg, world_size=world, use_gpu=cfg.scaling.use_gpu, for_reference=True)
        with _keep_hf_zero3_config():
            _, ref_engine = build_engine(reference_model_config(cfg), ds_config=ds, train=False, **engine_args)
        temporary = True
    was_training = getattr(engine, "module", engine).training
    engine.eval()
    try:
        metrics, samples = generation_eval(
            engine, ref_engine, held_out_prompts(eval_pairs, cfg.eval.num_prompts), tokenizer, cfg.eval,
            judge=build_judge(cfg.eval, device), rank=rank, world=world, device=device,
        )
    finally:
        engine.train(was_training)
        if temporary:
            free(ref_engine)
    if rank == 0:
        path = run_dir / "gen_samples" / f"step_{step:06d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in sample_records(samples, tokenizer)))
        if tracker:
            tracker.log_table(samples_table(samples, tokenizer, step), SAMPLES_TABLE)
    return metrics


@contextmanager
def _keep_hf_zero3_config():
    """Leave transformers' global "ZeRO-3 is on" reference pointing at the policy's config.

    Building a model under ZeRO-3 points it at the new model's config, which dies with the freed
    temporary reference; transformers would then treat the policy as a plain model.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved

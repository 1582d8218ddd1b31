"""`po-ray eval`: an exported model against the config's reference, on Ray workers under ZeRO-3."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import deepspeed
import ray.train
import torch
from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from po_ray.config import Config, ConfigError, from_dict, to_dict
from po_ray.data import load_pairs, load_tokenizer
from po_ray.engine import build_engine
from po_ray.eval.generation import generation_eval, held_out_prompts, sample_records
from po_ray.eval.judges import build_judge
from po_ray.launch import check_storage, ensure_ray, run_dir_for
from po_ray.model import build_deepspeed_config, check_model_sources, resolve_dtype
from po_ray.reference import reference_model_config


def eval_loop_per_worker(loop_config: dict) -> None:
    """Build the policy (from the exported folder) and the reference as inference engines, evaluate,
    and let rank 0 write ``eval.json`` and ``samples.jsonl`` into the output folder."""
    cfg: Config = from_dict(Config, loop_config["config"], "<eval config>")
    out_dir, model_path = Path(loop_config["out_dir"]), loop_config["model_path"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = cfg.scaling.use_gpu
    if use_gpu:
        torch.cuda.set_device(ctx.get_local_rank())
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    torch.manual_seed(cfg.train.seed)  # the tiny reference is built from this seed, as in training
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    say = partial(print, flush=True, file=sys.__stdout__) if rank == 0 else (lambda *a, **k: None)

    tokenizer = load_tokenizer(cfg.model)
    _, eval_pairs, _ = load_pairs(cfg.data, tokenizer, seed=cfg.train.seed)
    prompts = held_out_prompts(eval_pairs, cfg.eval.num_prompts)
    ds_config = build_deepspeed_config(cfg, world_size=world, use_gpu=use_gpu, for_reference=True)
    engine_args = dict(tokenizer=tokenizer, dtype=resolve_dtype(cfg.model, use_gpu), seed=cfg.train.seed,
                       chunk_size=cfg.model.logprob_chunk_size, topk=cfg.metrics.topk)
    _, policy = build_engine(replace(cfg.model, name_or_path=model_path), ds_config=ds_config, train=False, **engine_args)
    _, reference = build_engine(reference_model_config(cfg), ds_config=ds_config, train=False, **engine_args)
    say(f"[po-ray] eval: {len(prompts)} prompts x {cfg.eval.samples_per_prompt} samples on {world} workers")
    metrics, samples = generation_eval(policy, reference, prompts, tokenizer, cfg.eval,
                                       judge=build_judge(cfg.eval, device), rank=rank, world=world, device=device)
    if rank == 0:
        samples_path = out_dir / "samples.jsonl"
        samples_path.write_text("".join(json.dumps(r) + "\n" for r in sample_records(samples, tokenizer)))
        reference_name = cfg.reference.name_or_path or cfg.model.name_or_path
        result = {"metrics": metrics, "model": model_path, "reference": reference_name,
                  "samples_path": str(samples_path), "num_samples": len(samples)}
        (out_dir / "eval.json").write_text(json.dumps(result, indent=1))


def evaluate_model(cfg: Config, model_path: str, out_dir: str | None = None) -> dict:
    """Evaluate the Hugging Face model folder ``model_path``; returns what ``eval.json`` holds.

    Output goes to ``out_dir`` (default ``<storage_path>/<run.name>/eval``).
    """
    model = Path(model_path).expanduser().resolve()
    if not (model / "config.json").is_file():
        raise ConfigError(f"--model: {model} is not a Hugging Face model folder (no config.json); "
                          "give the run's exported model/ folder")
    build_judge(cfg.eval)  # an unknown judge name fails here, before any worker starts
    check_model_sources(cfg)  # the reference and tokenizer too
    out = Path(out_dir).expanduser().resolve() if out_dir else run_dir_for(cfg) / "eval"
    check_storage(out)
    ensure_ray(cfg)
    resources = {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker}
    trainer = TorchTrainer(
        eval_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "out_dir": str(out), "model_path": str(model)},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name="ray", storage_path=str(out), failure_config=FailureConfig(max_failures=0),
                             logging_config=LoggingConfig(log_level="WARNING")),
    )
    trainer.fit()
    return json.loads((out / "eval.json").read_text())

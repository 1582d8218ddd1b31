"""`po-ray eval`: an exported model against the config's reference, on Ray workers under ZeRO-3.

Rank 0 writes ``eval.json`` and ``samples.jsonl`` to the output folder and, with tracking enabled,
logs an MLflow run ``<run name>-eval`` (the training run's MLflow name plus ``-eval``, in the same
experiment and store as training by default): the config as params, the ``gen/…`` metrics at step
0, the samples as the ``gen_samples.json`` table and ``eval.json`` as an artifact.
"""

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
from po_ray.eval.generation import generation_eval, held_out_prompts, sample_records, samples_are_exact, samples_table
from po_ray.eval.in_training import SAMPLES_TABLE
from po_ray.eval.judges import build_judge
from po_ray.launch import check_storage, ensure_ray, run_dir_for
from po_ray.model import build_deepspeed_config, check_model_sources, resolve_dtype
from po_ray.reference import reference_model_config
from po_ray.tracking import redact_text, resolve_tracking_uri


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
                  "samples_path": str(samples_path), "num_samples": len(samples),
                  "temperature": cfg.eval.temperature, "top_p": cfg.eval.top_p,
                  "kl_from_separate_draws": not samples_are_exact(cfg.eval)}
        eval_json = out_dir / "eval.json"
        eval_json.write_text(json.dumps(result, indent=1))
        if loop_config.get("tracking_uri"):
            run_id = log_eval_run(cfg, loop_config["tracking_uri"], result, samples_table(samples, tokenizer, step=0),
                                  eval_json)
            # The file is shared, secrets are not (as the training run's summary.json).
            result |= {"tracking_uri": redact_text(loop_config["tracking_uri"]), "mlflow_run_id": run_id}
            eval_json.write_text(json.dumps(result, indent=1))


def eval_run_name(cfg: Config) -> str:
    """The MLflow run of `po-ray eval`: the training run's MLflow name with ``-eval``."""
    return f"{cfg.tracking.run_name or cfg.run.name}-eval"


def log_eval_run(cfg: Config, tracking_uri: str, result: dict, table: dict, eval_json: Path) -> str | None:
    """One MLflow run for this eval: params, metrics (step 0), the samples table, eval.json. Returns its
    id (None while the store is unreachable; the records then wait in the output folder's fallback file)."""
    from po_ray.tracking import Tracker

    tracker = Tracker(tracking_uri, cfg.tracking.experiment_name, eval_run_name(cfg), fallback_dir=eval_json.parent,
                      tags={"po_ray.kind": "eval", "model": result["model"], "reference": result["reference"]})
    run_id = tracker.start()
    tracker.log_params(to_dict(cfg))
    tracker.log_metrics(result["metrics"], step=0)
    tracker.log_table(table, SAMPLES_TABLE)
    tracker.log_artifact(eval_json)
    tracker.end()
    return run_id or tracker.run_id


def evaluate_model(cfg: Config, model_path: str, out_dir: str | None = None) -> dict:
    """Evaluate the Hugging Face model folder ``model_path``; returns what ``eval.json`` holds.

    Output goes to ``out_dir`` (default ``<storage_path>/<run.name>/eval``); with tracking enabled
    the results are also an MLflow run (see the module docstring) in tracking.tracking_uri, else the
    training run's default store ``<storage_path>/<run.name>/mlflow.db``.
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
        train_loop_config={"config": to_dict(cfg), "out_dir": str(out), "model_path": str(model),
                           # Resolved here (workers run in another cwd); the training run's store by default.
                           "tracking_uri": resolve_tracking_uri(cfg.tracking, run_dir_for(cfg)) if cfg.tracking.enabled
                           else None},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name="ray", storage_path=str(out), failure_config=FailureConfig(max_failures=0),
                             logging_config=LoggingConfig(log_level="WARNING")),
    )
    trainer.fit()
    return json.loads((out / "eval.json").read_text())

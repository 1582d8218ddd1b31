"""Checkpoints: DeepSpeed shards + trainer state + RNG, written per rank and merged by Ray Train.

Each rank writes its own ZeRO shard files into a local folder and reports it; Ray Train merges
the ranks' folders into one checkpoint in storage and registers it only once every rank has
reported, so an interrupted write never becomes "the latest checkpoint". On load we still check a
per-rank completeness marker, so a folder copied by hand (or half-uploaded) is refused clearly.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

DEEPSPEED_TAG = "deepspeed"
STATE_FILE = "trainer_state.json"


def _marker(rank: int) -> str:
    return f"COMPLETE.rank{rank}"


def save_checkpoint(engine, folder: Path, *, step: int, rank: int, world_size: int, state: dict) -> None:
    """Write this rank's part of the checkpoint for ``step`` into ``folder`` (collective call)."""
    folder.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG)
    rng = {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate())}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, folder / f"rng_rank{rank}.pt")
    if rank == 0:
        (folder / STATE_FILE).write_text(json.dumps({"step": step, "world_size": world_size, **state}, indent=1))
    # Written last: its presence says this rank's files are all there.
    (folder / _marker(rank)).write_text(str(step))


def read_state(folder: Path) -> dict:
    path = Path(folder) / STATE_FILE
    if not path.exists():
        raise RuntimeError(f"checkpoint {folder} has no {STATE_FILE}: it is incomplete or not a po_ray checkpoint")
    return json.loads(path.read_text())


def load_checkpoint(engine, folder: Path, *, rank: int, world_size: int) -> dict:
    """Restore engine (weights, optimiser, scheduler) and RNG; returns the trainer state saved with it."""
    folder = Path(folder)
    state = read_state(folder)
    if state["world_size"] != world_size:
        raise RuntimeError(
            f"checkpoint {folder} was written by {state['world_size']} workers but this run has {world_size}: "
            "ZeRO-3 shards are per rank, so resume with scaling.num_workers="
            f"{state['world_size']} (or start a new run name)"
        )
    missing = [r for r in range(world_size) if not (folder / _marker(r)).exists()]
    if missing:
        raise RuntimeError(f"checkpoint {folder} is incomplete: ranks {missing} never finished writing it")
    load_path, _ = engine.load_checkpoint(
        str(folder), tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint under {folder}/{DEEPSPEED_TAG}")
    rng = torch.load(folder / f"rng_rank{rank}.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(_as_tuple(json.loads(rng["python"])))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list) else x


def export_hf_model(engine, hf_model, tokenizer, out_dir: Path, *, rank: int) -> None:
    """Write a consolidated Hugging Face model (safetensors + tokenizer); collective under ZeRO-3."""
    if engine.zero_optimization_partition_weights():
        # Gathers one layer at a time onto rank 0's CPU, so no rank holds two full copies.
        full = engine._zero3_consolidated_16bit_state_dict()
    else:
        full = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return
    prefix = "model."  # engine.module is LogpModel wrapping the HF model as .model
    state_dict = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)

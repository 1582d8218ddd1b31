"""Checkpoints: DeepSpeed shards + trainer state + RNG, written per rank and merged by Ray Train.

Each rank writes its own ZeRO shard files into a local folder and reports it; Ray Train merges
the ranks' folders into one checkpoint in storage and registers it only once every rank has
reported, so an interrupted write never becomes "the latest checkpoint". Each rank still ends its
write with a completeness marker and, last, a manifest of every file it wrote with its size; on load
every rank's manifest is checked (`check_complete`), so a folder copied by hand, half-uploaded or
truncated is refused naming the file, and the loop falls back to the previous registered checkpoint.

DeepSpeed's own loader unpickles its files with ``weights_only=False``; ours swaps in a
``weights_only=True`` load that allows the few DeepSpeed classes its checkpoints hold, so a
checkpoint folder cannot run code when a run resumes from it.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

DEEPSPEED_TAG = "deepspeed"
STATE_FILE = "trainer_state.json"
# Ray Train 2.60 (V2) keeps its registry of reported checkpoints in this file of the run folder
# (ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME); it restores from it.
CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"


class IncompleteCheckpoint(RuntimeError):
    """A checkpoint folder lacks a rank's manifest, or a file is missing or has the wrong size."""


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint file holds an object that a weights-only load does not allow."""


def _marker(rank: int) -> str:
    return f"COMPLETE.rank{rank}"


def _manifest(rank: int) -> str:
    return f"MANIFEST.rank{rank}.json"


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
    (folder / _marker(rank)).write_text(str(step))
    # Last: what this rank wrote and how big. The folder is this rank's own (Ray Train merges the
    # ranks' folders on upload), so everything in it is this rank's. Renamed into place, so a
    # manifest is never half-written.
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    tmp = folder / (_manifest(rank) + ".tmp")
    tmp.write_text(json.dumps({"rank": rank, "world_size": world_size, "step": step, "files": files}, indent=1))
    os.replace(tmp, folder / _manifest(rank))


def check_complete(folder: Path) -> dict:
    """Raise IncompleteCheckpoint unless every rank's manifest is there and every file it lists has its
    size; returns rank 0's manifest (``world_size``, ``step``, ``files``)."""
    folder = Path(folder)
    found = sorted(folder.glob("MANIFEST.rank*.json"))
    if not found:
        raise IncompleteCheckpoint(f"checkpoint {folder} is incomplete: no rank finished writing it (no "
                                   f"{_manifest(0)}, the file each rank writes last)")
    world_size = json.loads(found[0].read_text())["world_size"]
    missing = [r for r in range(world_size) if not (folder / _manifest(r)).exists()]
    if missing:
        raise IncompleteCheckpoint(f"checkpoint {folder} is incomplete: ranks {missing} never finished writing it "
                                   f"(no {', '.join(_manifest(r) for r in missing)})")
    manifests = [json.loads((folder / _manifest(r)).read_text()) for r in range(world_size)]
    for r, manifest in enumerate(manifests):
        for name, size in manifest["files"].items():
            path = folder / name
            if not path.is_file():
                raise IncompleteCheckpoint(f"checkpoint {folder} is incomplete: {name} is missing "
                                           f"(rank {r} wrote it, {size} bytes)")
            if path.stat().st_size != size:
                raise IncompleteCheckpoint(f"checkpoint {folder} is damaged: {name} has {path.stat().st_size} bytes, "
                                           f"rank {r} wrote {size} (truncated or overwritten)")
    return manifests[0]


def _snapshot(run_dir: Path) -> dict:
    path = Path(run_dir) / CHECKPOINT_SNAPSHOT
    return json.loads(path.read_text()) if path.is_file() else {}


def registered_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints that Ray Train registered (every rank reported them), newest first."""
    snapshot = _snapshot(run_dir)
    order = sorted(zip(snapshot.get("checkpoint_report_indices", []), snapshot.get("checkpoint_results", [])),
                   key=lambda pair: pair[0], reverse=True)
    return [Path(run_dir) / result["checkpoint_dir_name"] for _, result in order]


def has_checkpoint(run_dir: Path) -> bool:
    """Whether Ray Train will hand the run a checkpoint to resume from (its registry names a latest one)."""
    return _snapshot(run_dir).get("latest_checkpoint_result") is not None


def pick_complete(candidates: list[Path], warn: Callable[[str], None]) -> Path:
    """The first complete checkpoint of ``candidates`` (newest first), warning about each one passed over."""
    problems = []
    for folder in dict.fromkeys(Path(c).resolve() for c in candidates):  # the latest may be listed twice
        try:
            check_complete(folder)
            return folder
        except IncompleteCheckpoint as e:
            problems.append(str(e))
            warn(f"[po-ray] WARNING: {e}; trying the previous checkpoint")
    raise IncompleteCheckpoint("no complete checkpoint to resume from: " + "; ".join(problems)
                               + "; start a new run (another run.name) or restore the folder")


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
    check_complete(folder)
    with _weights_only_loads(engine):
        load_path, _ = engine.load_checkpoint(
            str(folder), tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint under {folder}/{DEEPSPEED_TAG}")
    rng = load_weights_only(folder / f"rng_rank{rank}.pt")
    torch.set_rng_state(rng["torch"])
    random.setstate(_as_tuple(json.loads(rng["python"])))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state


def deepspeed_safe_globals() -> list:
    """The classes DeepSpeed pickles into its checkpoints besides tensors and plain containers (found
    with torch.serialization.get_unsafe_globals_in_checkpoint on CPU ZeRO-0 and ZeRO-3 checkpoints):
    the ZeRO-3 optimiser state's loss scaler (LossScaler; DynamicLossScaler where fp16 scales the
    loss) and its ZeRO stage enum."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [LossScaler, DynamicLossScaler, ZeroStageEnum]


def load_weights_only(path, map_location=None):
    """torch.load(path) that unpickles only tensors, plain containers and `deepspeed_safe_globals`."""
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch names what it refused as "GLOBAL module.name" inside a long text.
        found = re.search(r"GLOBAL ([\w.]*\w)", str(e))
        what = found.group(1) if found else "an object"
        raise UnsafeCheckpoint(
            f"{path}: refused to load: it holds {what}, which a weights-only load does not allow (loading it "
            "could run code). If you trust this checkpoint and the class is plain data, allow it with "
            f"torch.serialization.add_safe_globals([{what if found else 'TheClass'}]) in a loss plugin module "
            "(loss.plugins), which every worker imports before it loads a checkpoint"
        ) from None


@contextmanager
def _weights_only_loads(engine):
    """DeepSpeed reads its files through engine.checkpoint_engine.load, a torch.load with weights_only=False."""
    checkpoint_engine = engine.checkpoint_engine
    checkpoint_engine.load = load_weights_only  # an instance attribute over the class's method
    try:
        yield
    finally:
        del checkpoint_engine.load


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

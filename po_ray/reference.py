"""Reference strategies: where ref_chosen / ref_rejected log-probs come from.

- ``sharded``: a second ZeRO-3 engine, inference only, run on every batch.
- ``precomputed``: one pass over all pairs before training, cached on storage under a key of
  (reference identity, tokenised pairs, tokenisation settings); any later run or trial with the same
  key reuses it, and the reference model is freed before training starts.
- ``none``: reference-free losses (simpo, orpo) never load a reference.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from po_ray.config import ConfigError, Config, to_dict
from po_ray.losses import loss_needs_reference


def resolve_strategy(cfg: Config) -> str:
    """The strategy this run uses; an explicit reference for a reference-free loss is a config error."""
    needs = loss_needs_reference(cfg.loss)
    strategy = cfg.reference.strategy
    if strategy == "auto":
        return "sharded" if needs else "none"
    if needs and strategy == "none":
        raise ConfigError(
            f"reference.strategy: loss {cfg.loss.name!r} needs a reference model; use sharded or precomputed (or auto)"
        )
    if not needs and strategy != "none":
        raise ConfigError(
            f"reference.strategy: loss {cfg.loss.name!r} is reference-free, so a {strategy} reference would be loaded "
            "for nothing; set reference.strategy=auto or none"
        )
    return strategy


def reference_model_config(cfg: Config):
    """The policy's model config pointed at the reference weights."""
    from dataclasses import replace

    return replace(cfg.model, name_or_path=cfg.reference.name_or_path) if cfg.reference.name_or_path else cfg.model


def reference_identity(cfg: Config) -> dict:
    """What a precomputed table depends on besides the pairs themselves: the reference model, the
    data settings and the seed (which draws the held-out split). Runs equal here share a table."""
    model = to_dict(reference_model_config(cfg))
    for k in ("gradient_checkpointing", "logprob_chunk_size", "attn_implementation"):
        model.pop(k, None)  # do not change the numbers
    return {"model": model, "seed": cfg.train.seed, "data": to_dict(cfg.data)}


def cache_key(cfg: Config, train_pairs, eval_pairs) -> str:
    """Key of a precomputed table: reference identity + the exact tokenised pairs + what shaped them."""
    h = hashlib.sha256()
    h.update(json.dumps(reference_identity(cfg), sort_keys=True, default=str).encode())
    for split in (train_pairs, eval_pairs):
        for p in split:
            h.update(json.dumps([p.pair_id, p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
        h.update(b"|")
    return h.hexdigest()[:24]


class ShardedReference:
    def __init__(self, engine):
        self.engine = engine

    @torch.no_grad()
    def logps(self, batch: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        from po_ray.engine import run, split_pairs

        return split_pairs(run(self.engine, batch).logps.detach())


class PrecomputedReference:
    def __init__(self, tables: dict[str, dict[int, tuple[float, float]]]):
        self.tables = tables

    def logps(self, batch: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        table = self.tables[split]
        ids = batch["pair_ids"].tolist()
        try:
            rows = [table[i] for i in ids]
        except KeyError as e:
            raise RuntimeError(f"precomputed reference has no {split} pair {e.args[0]}: the cache is stale") from None
        values = torch.tensor(rows, dtype=torch.float32)
        return values[:, 0], values[:, 1]


def cache_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    return cache_dir / key / "logps.safetensors", cache_dir / key / "meta.json"


def load_cache(cache_dir: Path, key: str) -> dict | None:
    table_path, meta_path = cache_paths(cache_dir, key)
    if not (table_path.exists() and meta_path.exists()):
        return None
    t = load_file(str(table_path))
    return {
        split: {int(i): (float(c), float(r)) for i, c, r in zip(t[f"{split}_ids"], t[f"{split}_chosen"], t[f"{split}_rejected"])}
        for split in ("train", "eval")
    }


def precompute(engine, splits: dict[str, list], *, collate_fn, micro_batch_size: int, rank: int, world_size: int,
               cache_dir: Path, key: str, progress) -> None:
    """Reference log-probs for every pair of every split, written once by rank 0 (atomically)."""
    from po_ray.sampler import shard_evenly

    tensors: dict[str, torch.Tensor] = {}
    for split, pairs in splits.items():
        mine = shard_evenly(pairs, world_size, rank)
        # Ranks must run the same number of (collective) forwards under ZeRO-3: pad with repeats.
        n_batches = -(-len(pairs) // (world_size * micro_batch_size)) if pairs else 0
        rows: list[tuple[int, float, float]] = []
        with torch.no_grad():
            for b in range(n_batches):
                chunk = mine[b * micro_batch_size : (b + 1) * micro_batch_size]
                real = len(chunk)
                if real == 0:
                    chunk = pairs[:1]
                batch = collate_fn(chunk)
                ref = ShardedReference(engine).logps(batch, split)
                for i in range(real):
                    rows.append((int(batch["pair_ids"][i]), float(ref[0][i]), float(ref[1][i])))
                if rank == 0 and (b + 1) % 20 == 0:
                    progress(f"reference pass ({split}): {b + 1}/{n_batches} batches")
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, rows)
        merged = sorted({r[0]: r for part in gathered for r in part}.values())
        if len(merged) != len(pairs):
            raise RuntimeError(f"reference pass covered {len(merged)} of {len(pairs)} {split} pairs")
        tensors[f"{split}_ids"] = torch.tensor([r[0] for r in merged], dtype=torch.int64)
        tensors[f"{split}_chosen"] = torch.tensor([r[1] for r in merged], dtype=torch.float64)
        tensors[f"{split}_rejected"] = torch.tensor([r[2] for r in merged], dtype=torch.float64)
    if rank == 0:
        table_path, meta_path = cache_paths(cache_dir, key)
        table_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = table_path.with_suffix(f".tmp{os.getpid()}")
        save_file(tensors, str(tmp))
        os.replace(tmp, table_path)  # atomic: a reader sees the whole table or none
        meta_path.write_text(json.dumps({"key": key, **{s: len(p) for s, p in splits.items()}}))
    dist.barrier()


def free(engine) -> None:
    """Drop a reference engine so its memory is back before training starts."""
    engine.destroy() if hasattr(engine, "destroy") else None
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

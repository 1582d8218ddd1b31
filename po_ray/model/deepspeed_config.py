"""The DeepSpeed config dict, built from the run config (no DeepSpeed import needed).

Order of precedence, lowest first: the keys built here from ``deepspeed``, ``train`` and
``optimizer``; then ``deepspeed.config_file`` (a raw DeepSpeed JSON); then ``deepspeed.overrides``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from po_ray.config import Config, ConfigError
from po_ray.model.build import resolve_dtype

# Batch keys follow from train.* and the worker count; the data loader reads train.*, so a raw
# DeepSpeed value that disagrees would make DeepSpeed count accumulation steps wrongly.
_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def build_deepspeed_config(cfg: Config, *, world_size: int, use_gpu: bool, for_reference: bool = False) -> dict:
    """DeepSpeed config for the policy engine, or (``for_reference``) an inference-only ZeRO-3 engine."""
    built = _reference(cfg, world_size, use_gpu) if for_reference else _training(cfg, world_size, use_gpu)
    merged = deep_merge(deep_merge(built, read_config_file(cfg.deepspeed.config_file)), cfg.deepspeed.overrides)
    for key in _BATCH_KEYS:
        if merged[key] != built[key]:
            raise ConfigError(
                f"deepspeed.config_file/overrides: {key}={merged[key]!r} disagrees with the {built[key]!r} that "
                "train.micro_batch_size, train.gradient_accumulation_steps and the worker count give; "
                "set train.* instead"
            )
    if for_reference:
        # Whatever the raw keys say, the reference never trains and is always sharded.
        merged.pop("optimizer", None)
        merged.pop("scheduler", None)
        zero = merged["zero_optimization"]
        zero.pop("offload_optimizer", None)
        zero["stage"] = 3
        zero.pop("offload_param", None)
        if cfg.reference.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    return merged


def _common(cfg: Config, world_size: int, use_gpu: bool) -> dict:
    """Batch geometry and precision, the same for the policy and the reference engine."""
    micro, accumulation = cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps
    dtype = resolve_dtype(cfg.model, use_gpu)
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        # DeepSpeed checks train = micro × accumulation × data-parallel ranks, even for an engine
        # that never steps.
        "train_batch_size": micro * accumulation * world_size,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 10**9,  # po_ray reports its own progress
        "wall_clock_breakdown": False,
    }


def _zero(cfg: Config, stage: int) -> dict:
    ds = cfg.deepspeed
    zero = {
        "stage": stage,
        "overlap_comm": ds.overlap_comm,
        "reduce_bucket_size": ds.reduce_bucket_size,
    }
    if stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
            # Lets the engine write a whole 16-bit model (the exported HF folder) from the shards.
            stage3_gather_16bit_weights_on_model_save=True,
        )
    return zero


def _training(cfg: Config, world_size: int, use_gpu: bool) -> dict:
    ds, opt = cfg.deepspeed, cfg.optimizer
    zero = _zero(cfg, ds.stage)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.offload_params and ds.stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    adamw = {"lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps, "weight_decay": opt.weight_decay}
    if not use_gpu and not ds.offload_optimizer:
        # DeepSpeed's default AdamW is a fused CUDA op; torch's runs anywhere. (With optimizer
        # offload DeepSpeed uses its CPU Adam, which it builds itself.)
        adamw["torch_adam"] = True
    config = {
        **_common(cfg, world_size, use_gpu),
        "gradient_clipping": opt.max_grad_norm,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": adamw},
    }
    scheduler = lr_scheduler(cfg)
    if scheduler:
        config["scheduler"] = scheduler
    return config


def _reference(cfg: Config, world_size: int, use_gpu: bool) -> dict:
    return {**_common(cfg, world_size, use_gpu), "zero_optimization": _zero(cfg, 3)}


def lr_scheduler(cfg: Config) -> dict | None:
    """DeepSpeed ``scheduler`` block for optimizer.scheduler and warmup_steps over train.max_steps.

    The target is the usual schedule at optimiser step s (0-based), warm-up w, T = max_steps:
    lr·s/w during warm-up, then constant, lr·(T−s)/(T−w) (linear) or lr·(1+cos(π(s−w)/(T−w)))/2
    (cosine). DeepSpeed's WarmupLR/WarmupDecayLR/WarmupCosineLR apply their first value one step
    late (two steps at 0 before warm-up moves) and warm up over at least 2 steps, so linear uses
    DeepSpeed schedulers that hit the target exactly: OneCycle (one rising and one falling half,
    no momentum cycling) and, without warm-up, LRRangeTest run downhill. Constant and cosine have
    no exact equivalent: their warm-up runs one step late, and cosine's first step is at lr 0.
    """
    opt, total, warmup = cfg.optimizer, cfg.train.max_steps, cfg.optimizer.warmup_steps
    if opt.scheduler == "linear" and warmup == 0:
        # lr · (1 + step_rate · s / step_size) = lr · (1 − s/T)
        params = {"lr_range_test_min_lr": opt.lr, "lr_range_test_step_size": total, "lr_range_test_step_rate": -1.0}
        return {"type": "LRRangeTest", "params": params}
    if opt.scheduler == "linear":
        params = {
            "cycle_min_lr": 0.0,
            "cycle_max_lr": opt.lr,
            "cycle_first_step_size": warmup,
            "cycle_second_step_size": max(total - warmup, 0),
            "decay_lr_rate": 0.0,  # after the cycle: stay at cycle_min_lr (0)
            "cycle_momentum": False,  # OneCycle would otherwise rewrite Adam's beta1 every step
        }
        return {"type": "OneCycle", "params": params}
    if opt.scheduler == "cosine":
        params = {
            "total_num_steps": total,
            "warmup_num_steps": max(warmup, 1),
            "warmup_min_ratio": 0.0 if warmup else 1.0,  # no warm-up: its (forced) steps stay at the peak
            "cos_min_ratio": 0.0,
            "warmup_type": "linear",
        }
        return {"type": "WarmupCosineLR", "params": params}
    if warmup == 0:
        return None  # constant: the optimiser's own lr
    params = {"warmup_min_lr": 0.0, "warmup_max_lr": opt.lr, "warmup_num_steps": warmup, "warmup_type": "linear"}
    return {"type": "WarmupLR", "params": params}


def read_config_file(path: str) -> dict:
    """The raw DeepSpeed JSON of deepspeed.config_file ({} when unset)."""
    if not path:
        return {}
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"deepspeed.config_file: cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config_file: {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"deepspeed.config_file: {path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def deep_merge(base: dict, override: dict) -> dict:
    """A new dict: ``override`` laid over ``base``, nested dicts merged key by key.

    A value ``"auto"`` (Hugging Face's placeholder in shared DeepSpeed JSONs) is skipped: the built
    value stays, or DeepSpeed's default where nothing was built.
    """
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, str) and value == "auto":
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged

"""A loss plugin for the fault tests, loaded by Ray workers through ``loss.plugins``.

``dpo_faulty`` is DPO except on chosen training calls (counted per worker process; evaluation runs
under no_grad and is not counted): call ``nan_loss_call`` returns a NaN loss, and call
``nan_grad_call`` a finite loss whose gradient is NaN (the derivative of sqrt at 0).
"""

from dataclasses import replace

import torch

from po_ray.losses import register_loss
from po_ray.losses.pairwise import dpo

_training_calls = 0


@register_loss("dpo_faulty")
def dpo_faulty(logps, *, beta: float, nan_loss_call: int = 0, nan_grad_call: int = 0):
    global _training_calls
    out = dpo(logps, beta=beta)
    if not torch.is_grad_enabled():
        return out
    _training_calls += 1
    if _training_calls == nan_loss_call:
        out = replace(out, losses=out.losses * float("nan"))
    elif _training_calls == nan_grad_call:
        zero = logps.chosen - logps.chosen.detach()  # value 0, gradient that of the log-probs
        out = replace(out, losses=out.losses + torch.sqrt(zero * zero))  # adds 0; d sqrt(u)/du at 0 is inf: NaN
    return out


# ---- a checkpoint write that never finishes ------------------------------------------------------
# With loss.options.block_checkpoint_step=N and block_flag=PATH, rank 1 writes its DeepSpeed shards of
# step N's checkpoint, records the folder in PATH and hangs there (before its completeness marker and
# the report), so a test can kill it mid-write. Only once: PATH existing disarms it.
import os  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import po_ray.loop  # noqa: E402
from po_ray.checkpoint import DEEPSPEED_TAG  # noqa: E402

_block: dict = {}
_real_save = po_ray.loop.save_checkpoint


def _save_or_hang(engine, folder, *, step, rank, world_size, state):
    if step == _block.get("step") and rank == 1 and not os.path.exists(_block["flag"]):
        engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG)
        Path(_block["flag"]).write_text(str(folder))
        time.sleep(3600)
    return _real_save(engine, folder, step=step, rank=rank, world_size=world_size, state=state)


po_ray.loop.save_checkpoint = _save_or_hang


@register_loss("dpo_slow_checkpoint")
def dpo_slow_checkpoint(logps, *, beta: float, block_checkpoint_step: int = 0, block_flag: str = ""):
    _block.update(step=block_checkpoint_step, flag=block_flag)
    return dpo(logps, beta=beta)

"""What the code itself promises about loading untrusted files: read from the source, so a new
loader that forgets the promise fails here."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

from po_ray.config import Config

PACKAGE = Path(__file__).resolve().parent.parent / "po_ray"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def calls(attr: str):
    """(file, line, call) for every call of ``<something>.<attr>(...)`` in the package."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr:
                yield path.relative_to(PACKAGE.parent), node.lineno, node


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_remote_code_is_off_by_default():
    assert Config().model.trust_remote_code is False


def test_torch_load_only_with_weights_only():
    found = list(calls("load"))
    torch_loads = [(f, n, c) for f, n, c in found if isinstance(c.func.value, ast.Name) and c.func.value.id == "torch"]
    assert torch_loads, "expected the checkpoint's RNG load"
    for path, line, call in torch_loads:
        value = keyword(call, "weights_only")
        assert isinstance(value, ast.Constant) and value.value is True, f"{path}:{line}: torch.load without weights_only=True"


@pytest.mark.parametrize("attr", ["from_pretrained"])
def test_hub_loads_never_hard_code_remote_code_and_weights_are_safetensors(attr):
    for path, line, call in calls(attr):
        remote = keyword(call, "trust_remote_code")
        # Either not passed (False) or passed through from the config, never a literal True.
        assert not (isinstance(remote, ast.Constant) and remote.value is True), f"{path}:{line}: trust_remote_code=True"
        loader = call.func.value.id if isinstance(call.func.value, ast.Name) else ""
        if loader.startswith("AutoModel"):
            safetensors = keyword(call, "use_safetensors")
            assert isinstance(safetensors, ast.Constant) and safetensors.value is True, (
                f"{path}:{line}: model weights must load with use_safetensors=True (no pickle)")


# ---- DeepSpeed's checkpoint files, read weights-only on resume --------------------------------------


class Payload:
    """A class nobody allowed: unpickling it could as well run code."""

    def __init__(self):
        self.x = 1


def test_a_checkpoint_file_holding_a_disallowed_object_is_refused(tmp_path):
    from test_checkpoint import StandInEngine, TorchFileEngine, shard_name, write_checkpoint

    from po_ray.checkpoint import UnsafeCheckpoint, load_checkpoint

    folder = write_checkpoint(tmp_path, "checkpoint_a", step=3, payloads={0: {"w": torch.ones(2), "hook": Payload()}})
    engine = StandInEngine(rank=0)
    with pytest.raises(UnsafeCheckpoint) as e:
        load_checkpoint(engine, folder, rank=0, world_size=2)
    assert str(e.value) == (
        f"{folder / shard_name(0)}: refused to load: it holds test_security.Payload, which a weights-only load does "
        "not allow (loading it could run code). If you trust this checkpoint and the class is plain data, allow it "
        "with torch.serialization.add_safe_globals([test_security.Payload]) in a loss plugin module (loss.plugins), "
        "which every worker imports before it loads a checkpoint")
    # The engine's own (weights_only=False) loader is back once po_ray's load is over.
    assert engine.checkpoint_engine.load.__func__ is TorchFileEngine.load

    # A function reference (a classic pickle exploit) is refused the same way; what the message allows
    # stays the user's decision.
    folder = write_checkpoint(tmp_path, "checkpoint_b", step=3, payloads={1: {"hook": os.system}})
    with pytest.raises(UnsafeCheckpoint, match=r"rank_1_mp_rank_00_optim_states.pt: refused to load: it holds posix.system"):
        load_checkpoint(StandInEngine(rank=1), folder, rank=1, world_size=2)

    # Allowed by the user (as a loss plugin would), it loads.
    folder = write_checkpoint(tmp_path, "checkpoint_c", step=3, payloads={0: {"hook": Payload()}})
    engine = StandInEngine(rank=0)
    with torch.serialization.safe_globals([Payload]):
        load_checkpoint(engine, folder, rank=0, world_size=2)
    assert engine.loaded["hook"].x == 1


def test_the_classes_deepspeed_pickles_are_allowed(tmp_path):
    """What a CPU ZeRO-3 optimiser-state file holds besides tensors (torch.serialization.
    get_unsafe_globals_in_checkpoint on one): the loss scaler and the ZeRO stage enum."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from po_ray.checkpoint import load_weights_only

    dynamic = DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=2,
                                consecutive_hysteresis=False)
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"loss_scaler": LossScaler(1.0), "dynamic": dynamic, "zero_stage": ZeroStageEnum.weights,
                "fp32_flat_groups": [torch.ones(3)]}, path)
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) == {
        "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum"}
    with pytest.raises(Exception):  # torch's default allow-list alone refuses them
        torch.load(path, weights_only=True)
    state = load_weights_only(path)
    assert state["loss_scaler"].cur_scale == 1.0 and state["dynamic"].cur_scale == 2.0**16
    assert state["zero_stage"] is ZeroStageEnum.weights and torch.equal(state["fp32_flat_groups"][0], torch.ones(3))

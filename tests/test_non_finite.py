"""NaN/inf gradients where DeepSpeed does not look: ZeRO stage 0 in fp32 steps the plain torch
optimiser, which applies a NaN gradient; po_ray checks the gradients itself, skips the update and
counts it like a NaN loss."""

from __future__ import annotations

import dataclasses
import socket

import pytest
import torch

from po_ray.loop import has_non_finite_grad, non_finite_message


def linear_with_grads(*grads):
    layers = [torch.nn.Linear(2, 1) for _ in grads]
    for layer, grad in zip(layers, grads):
        if grad is not None:
            layer.weight.grad = torch.tensor([[0.5, grad]])
    return [p for layer in layers for p in layer.parameters()]


def test_any_nan_or_inf_gradient_is_found():
    assert not has_non_finite_grad(linear_with_grads(1.0, -2.0))
    assert has_non_finite_grad(linear_with_grads(1.0, float("nan")))
    assert has_non_finite_grad(linear_with_grads(float("-inf"), 1.0))
    assert not has_non_finite_grad(linear_with_grads(None, 3.0))  # no gradient yet: nothing to check
    assert not has_non_finite_grad(linear_with_grads(None))


def test_the_message_names_the_step_and_its_pairs():
    assert non_finite_message(4, [9, 2], [2, 9, 5, 1]) == "non-finite loss at step 4 (pairs [2, 9])"
    assert non_finite_message(7, [], [8, 3, 5]) == "non-finite gradient at step 7 (the step's pairs [3, 5, 8])"


# ---- a real DeepSpeed engine, ZeRO stage 0, fp32, one process -------------------------------------


@pytest.fixture
def stage0_engine(monkeypatch):
    import deepspeed
    import torch.distributed as dist

    from po_ray.config import Config, DeepSpeedConfig, OptimizerConfig, TrainConfig
    from po_ray.model import build_deepspeed_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0",
                           WORLD_SIZE="1", LOCAL_WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo", rank=0, world_size=1)
    cfg = dataclasses.replace(Config(), train=TrainConfig(micro_batch_size=1, max_steps=10),
                              optimizer=OptimizerConfig(lr=0.1, scheduler="linear"),
                              deepspeed=DeepSpeedConfig(stage=0))
    ds = build_deepspeed_config(cfg, world_size=1, use_gpu=False)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
    yield engine
    deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached world group (see tests/test_model.py)


def nan_gradient_loss(engine, x):
    """A finite loss whose gradient is NaN: + sqrt(u²) at u = 0 adds 0, and its derivative there is inf·0."""
    w = engine.module.weight
    zero = w - w.detach()
    return engine(x).sum() + torch.sqrt(zero * zero).sum()


def weights(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.module.parameters()]


@pytest.mark.integration
def test_stage0_fp32_nan_gradients_are_skipped_and_counted(stage0_engine):
    from po_ray.loop import _check_skipped, _step

    engine = stage0_engine
    x = torch.ones(1, 3)
    assert not hasattr(engine.optimizer, "overflow"), "stage 0 fp32 should step the plain torch optimiser"
    engine.backward(engine(x).sum())
    _step(engine, torch.device("cpu"))  # one healthy step, so Adam has moments to keep
    before, lr, adam = weights(engine), engine.get_lr()[0], {k: v["step"].clone() for k, v in engine.optimizer.state.items()}

    loss = nan_gradient_loss(engine, x)
    assert torch.isfinite(loss)
    engine.backward(loss)
    _step(engine, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(weights(engine), before)), "the NaN gradient reached the weights"
    assert engine.skipped_steps == 1 and engine.get_lr()[0] == lr  # counted; the schedule did not move
    assert {k: v["step"] for k, v in engine.optimizer.state.items()} == adam  # Adam did not step
    assert all(p.grad is None or not p.grad.abs().sum() for p in engine.module.parameters())  # gradients dropped
    assert not hasattr(engine.optimizer, "overflow")  # the next step is an ordinary one again
    # Counted like a NaN loss: within the limit it goes on, past it the run stops naming the step's pairs.
    assert _check_skipped(engine, 0, [], [4, 1], step=2, limit=1) == (
        1, "non-finite gradient at step 2 (the step's pairs [1, 4])")
    with pytest.raises(FloatingPointError) as e:
        _check_skipped(engine, 0, [], [4, 1], step=2, limit=0)
    assert str(e.value) == ("non-finite gradient at step 2 (the step's pairs [1, 4]): 1 steps skipped, more than "
                            "train.max_skipped_steps=0; no update was applied. Lower optimizer.lr, raise loss.beta, "
                            "or check those pairs.")

    engine.backward(engine(x).sum())
    _step(engine, torch.device("cpu"))
    assert not any(torch.equal(a, b) for a, b in zip(weights(engine), before))  # healthy steps update again
    assert all(bool(p.isfinite().all()) for p in engine.module.parameters())

    # Without the check, DeepSpeed applies the NaN gradient: why po_ray checks.
    engine.backward(nan_gradient_loss(engine, x))
    engine.step()
    assert engine.skipped_steps == 1 and not bool(engine.module.weight.isfinite().all())

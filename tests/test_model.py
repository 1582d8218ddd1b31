"""Model building, the DeepSpeed config, and one real ZeRO-3 train step on CPU."""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import socket
import time

import pytest
import torch

from po_ray.config import (
    Config,
    ConfigError,
    DeepSpeedConfig,
    ModelConfig,
    OptimizerConfig,
    ReferenceConfig,
    TrainConfig,
)
from po_ray.model import build_deepspeed_config, build_model, policy_forward, resolve_dtype

VOCAB = 48
TOKENS = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _build(model_cfg: ModelConfig = ModelConfig(), *, seed: int = 0, dtype=torch.float32, ds_config=None):
    return build_model(model_cfg, **TOKENS, dtype=dtype, seed=seed, ds_config=ds_config)


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- build_model ----------------------------------------------------------------------------------


def test_tiny_llama_shape_and_seeded_init():
    model = _build()
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (64, 2, 4, 2)
    assert (c.intermediate_size, c.max_position_embeddings, c.vocab_size) == (128, 512, VOCAB)
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (0, 1, 2)
    assert model.get_input_embeddings().weight.shape == (VOCAB, 64)
    assert _same_weights(model, _build())
    assert not _same_weights(model, _build(seed=1))


def test_build_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _build(seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_overrides_dtype_and_checkpointing():
    model = _build(
        ModelConfig(config_overrides={"num_hidden_layers": 1, "hidden_size": 32}, gradient_checkpointing=True),
        dtype=torch.bfloat16,
    )
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1
    assert model.get_input_embeddings().weight.shape == (VOCAB, 32)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.is_activation_checkpointing
    assert not _build().is_activation_checkpointing


def test_unknown_override_names_the_key():
    with pytest.raises(ConfigError, match="model.config_overrides.hiden_size"):
        _build(ModelConfig(config_overrides={"hiden_size": 32}))


def test_loads_a_saved_model_folder(tmp_path):
    model = _build(seed=3)
    model.save_pretrained(tmp_path / "m")
    loaded = _build(ModelConfig(name_or_path=str(tmp_path / "m")))
    assert _same_weights(model, loaded)
    # A tokenizer with more tokens than the model embeds would index past the embedding table.
    with pytest.raises(ConfigError, match="tokenizer has 49 tokens"):
        build_model(
            ModelConfig(name_or_path=str(tmp_path / "m")), **{**TOKENS, "vocab_size": VOCAB + 1},
            dtype=torch.float32, seed=0,
        )


@pytest.mark.parametrize("path", ["./no/such/model", "/no/such/model", "not a name"])
def test_missing_local_path_is_a_clear_error(path):
    with pytest.raises(ConfigError, match="model.name_or_path"):
        _build(ModelConfig(name_or_path=path))


def test_resolve_dtype():
    assert resolve_dtype(ModelConfig(), use_gpu=True) == torch.bfloat16
    assert resolve_dtype(ModelConfig(), use_gpu=False) == torch.float32
    assert resolve_dtype(ModelConfig(dtype="fp16"), use_gpu=False) == torch.float16
    assert resolve_dtype(ModelConfig(dtype="fp32"), use_gpu=True) == torch.float32


# ---- build_deepspeed_config -----------------------------------------------------------------------


def _cfg(**sections) -> Config:
    return dataclasses.replace(Config(), **sections)


def test_training_config_keys():
    cfg = _cfg(
        train=TrainConfig(micro_batch_size=3, gradient_accumulation_steps=2),
        optimizer=OptimizerConfig(lr=2e-5, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.01, max_grad_norm=0.5),
        deepspeed=DeepSpeedConfig(
            reduce_bucket_size=7, stage3_prefetch_bucket_size=8, stage3_param_persistence_threshold=9
        ),
    )
    ds = build_deepspeed_config(cfg, world_size=4, use_gpu=False)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 3 * 2 * 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}
    assert ds["zero_optimization"] == {
        "stage": 3,
        "overlap_comm": True,
        "reduce_bucket_size": 7,
        "stage3_prefetch_bucket_size": 8,
        "stage3_param_persistence_threshold": 9,
        "stage3_gather_16bit_weights_on_model_save": True,
    }
    assert ds["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 2e-5, "betas": [0.8, 0.9], "eps": 1e-6, "weight_decay": 0.01, "torch_adam": True},
    }
    json.dumps(ds)  # plain data: it can be written to a file or logged


def test_gpu_precision_offload_and_fused_adam():
    cfg = _cfg(deepspeed=DeepSpeedConfig(offload_optimizer=True, offload_params=True))
    ds = build_deepspeed_config(cfg, world_size=1, use_gpu=True)
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert "torch_adam" not in ds["optimizer"]["params"]
    fp16 = build_deepspeed_config(_cfg(model=ModelConfig(dtype="fp16")), world_size=1, use_gpu=True)
    assert fp16["fp16"] == {"enabled": True} and fp16["bf16"] == {"enabled": False}
    stage2_cfg = _cfg(deepspeed=DeepSpeedConfig(stage=2, offload_params=True))
    stage2 = build_deepspeed_config(stage2_cfg, world_size=1, use_gpu=True)
    assert stage2["zero_optimization"]["stage"] == 2
    assert not any(k.startswith("stage3") or k == "offload_param" for k in stage2["zero_optimization"])


def test_config_file_then_overrides_are_merged_deeply(tmp_path):
    raw = {
        "zero_optimization": {
            "reduce_bucket_size": 111,
            "stage3_max_live_parameters": 5,
            "overlap_comm": "auto",
            "sub_group_size": "auto",
        },
        "optimizer": {"params": {"lr": 0.5}},
        "communication_data_type": "fp32",
        "gradient_clipping": "auto",
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(raw))
    cfg = _cfg(
        optimizer=OptimizerConfig(max_grad_norm=0.7),
        deepspeed=DeepSpeedConfig(
            config_file=str(path),
            overrides={"zero_optimization": {"reduce_bucket_size": 222}, "optimizer": {"params": {"eps": 1e-3}}},
        ),
    )
    ds = build_deepspeed_config(cfg, world_size=1, use_gpu=False)
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == 222  # overrides beat the file
    assert zero["stage3_max_live_parameters"] == 5  # the file adds keys
    assert zero["overlap_comm"] is True and ds["gradient_clipping"] == 0.7  # "auto" keeps the built value
    assert "sub_group_size" not in zero  # … or DeepSpeed's default
    assert zero["stage"] == 3  # built keys the file does not mention survive
    assert ds["optimizer"]["params"]["lr"] == 0.5 and ds["optimizer"]["params"]["eps"] == 1e-3
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.999]
    assert ds["communication_data_type"] == "fp32"


def test_batch_keys_that_disagree_with_train_are_errors():
    cfg = _cfg(deepspeed=DeepSpeedConfig(overrides={"gradient_accumulation_steps": 8}))
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=8"):
        build_deepspeed_config(cfg, world_size=1, use_gpu=False)


@pytest.mark.parametrize("problem, content", [("not valid JSON", "{"), ("JSON object", "[1]")])
def test_bad_config_file(tmp_path, problem, content):
    path = tmp_path / "ds.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=problem):
        build_deepspeed_config(_cfg(deepspeed=DeepSpeedConfig(config_file=str(path))), world_size=1, use_gpu=False)
    with pytest.raises(ConfigError, match="cannot read"):
        build_deepspeed_config(
            _cfg(deepspeed=DeepSpeedConfig(config_file=str(tmp_path / "missing.json"))), world_size=1, use_gpu=False
        )


def test_reference_config_is_inference_only_zero3():
    cfg = _cfg(
        deepspeed=DeepSpeedConfig(stage=2, offload_optimizer=True, overrides={"optimizer": {"type": "Lamb"}}),
        reference=ReferenceConfig(offload_params=True),
        train=TrainConfig(micro_batch_size=2, gradient_accumulation_steps=3),
    )
    ds = build_deepspeed_config(cfg, world_size=2, use_gpu=False, for_reference=True)
    assert "optimizer" not in ds and "scheduler" not in ds
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert "offload_optimizer" not in ds["zero_optimization"]
    assert ds["train_batch_size"] == 2 * 3 * 2
    no_offload = build_deepspeed_config(Config(), world_size=1, use_gpu=False, for_reference=True)
    assert "offload_param" not in no_offload["zero_optimization"]


def _lr_sequence(ds: dict, steps: int, lr: float) -> list[float]:
    """Learning rate of each optimiser step, as DeepSpeed's engine applies the configured scheduler."""
    from deepspeed.runtime import lr_schedules

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = getattr(lr_schedules, ds["scheduler"]["type"])(opt, **ds["scheduler"]["params"])
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()  # the engine steps the scheduler after each optimiser step
    return out


def _schedule_cfg(scheduler: str, warmup: int) -> Config:
    return _cfg(
        optimizer=OptimizerConfig(lr=1.0, scheduler=scheduler, warmup_steps=warmup), train=TrainConfig(max_steps=10)
    )


def test_constant_without_warmup_has_no_scheduler():
    assert "scheduler" not in build_deepspeed_config(_schedule_cfg("constant", 0), world_size=1, use_gpu=False)


def _target(scheduler: str, warmup: int, step: int, total: int = 10) -> float:
    """optimizer.scheduler's schedule at optimiser step ``step`` (0-based), as a multiple of the peak lr."""
    if step < warmup:
        return step / warmup
    if scheduler == "constant":
        return 1.0
    progress = (step - warmup) / (total - warmup)
    return 1 - progress if scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("warmup", [0, 3])
def test_linear_schedule_is_exact(warmup):
    ds = build_deepspeed_config(_schedule_cfg("linear", warmup), world_size=1, use_gpu=False)
    assert _lr_sequence(ds, 10, lr=1.0) == pytest.approx([_target("linear", warmup, s) for s in range(10)])


def test_constant_and_cosine_warm_up_one_step_late():
    # DeepSpeed's WarmupLR / WarmupCosineLR have no exact form: their warm-up starts one step late.
    def lrs(scheduler, warmup):
        ds = build_deepspeed_config(_schedule_cfg(scheduler, warmup), world_size=1, use_gpu=False)
        return _lr_sequence(ds, 10, lr=1.0)

    assert lrs("constant", 3) == pytest.approx([0.0] + [_target("constant", 3, s - 1) for s in range(1, 10)])
    late = [0.0] + [_target("cosine", 3, s - 1 if s <= 3 else s) for s in range(1, 10)]
    assert lrs("cosine", 3) == pytest.approx(late)
    no_warmup = lrs("cosine", 0)
    assert no_warmup[0] == 0.0 and no_warmup[1] == pytest.approx(1.0)
    assert no_warmup[1:] == sorted(no_warmup[1:], reverse=True) and no_warmup[-1] < 0.05


# ---- ZeRO-3 on CPU: one process, then two ranks ----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    return dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))


def _zero3_cfg() -> Config:
    return _cfg(
        train=TrainConfig(micro_batch_size=2, max_steps=5),
        optimizer=OptimizerConfig(lr=1e-2, scheduler="linear"),
        # Threshold 0: every parameter, the tiny ones too, is really partitioned and gathered.
        deepspeed=DeepSpeedConfig(stage=3, stage3_param_persistence_threshold=0),
    )


def _batch(seed: int, completion_start: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (4, 12), generator=g)
    completion_mask = torch.zeros_like(input_ids)
    completion_mask[:, completion_start:] = 1
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "completion_mask": completion_mask}


class _Scorer(torch.nn.Module):
    """The HF model under one root module whose forward scores completions (as the engine wrapper does)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, completion_mask):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
        return policy_forward(self.model, batch, chunk_size=3, topk=4).logps


def _nll(logps: torch.Tensor, batch: dict) -> torch.Tensor:
    """NLL per completion token, averaged over rows: a loss the tiny model can learn quickly."""
    return -(logps / batch["completion_mask"][:, 1:].sum(-1)).mean()


def _naive_logps(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    picked = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (picked * batch["completion_mask"][:, 1:]).sum(-1)


def _partitioned(model) -> bool:
    # ZeRO-3 leaves each parameter an empty placeholder; the rank's shard lives in ds_tensor.
    return all(hasattr(p, "ds_id") and p.numel() == 0 and p.ds_tensor.numel() > 0 for p in model.parameters())


@pytest.mark.integration
def test_zero3_train_step_on_cpu(tmp_path, monkeypatch):
    import deepspeed
    import torch.distributed as dist

    for key, value in _distributed_env(0, 1, _free_port()).items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo", rank=0, world_size=1)
    engine = ref_engine = model = ref_model = None
    try:
        cfg = _zero3_cfg()
        ds = build_deepspeed_config(cfg, world_size=1, use_gpu=False)
        batch = _batch(seed=0, completion_start=5)

        model = _build(ds_config=ds)
        assert _partitioned(model)  # created sharded, never whole on a rank
        engine, *_ = deepspeed.initialize(model=_Scorer(model), model_parameters=list(model.parameters()), config=ds)

        # Chunked scoring through ZeRO-3's hooks (and its recompute in backward) equals the plain
        # full-logits computation on the gathered weights.
        with torch.no_grad(), deepspeed.zero.GatheredParameters(list(model.parameters())):
            # Copy first: the forward's ZeRO-3 hooks release the gathered weights again.
            initial = {name: p.detach().clone() for name, p in model.named_parameters()}
            before = _naive_logps(model, batch)
        losses = []
        for _ in range(3):
            logps = engine(**batch)
            if not losses:
                torch.testing.assert_close(logps.detach(), before, atol=1e-5, rtol=0)
            loss = _nll(logps, batch)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        assert all(map(math.isfinite, losses))
        assert losses[-1] < losses[0] - 0.05, losses
        assert engine.get_lr()[0] == pytest.approx(1e-2 * (1 - 3 / 5))  # the configured linear decay ran

        # The reference built from the same seed starts where the policy started (DPO's margin 0 at step 0).
        ref_ds = build_deepspeed_config(cfg, world_size=1, use_gpu=False, for_reference=True)
        twin = _build(ds_config=ref_ds)
        with deepspeed.zero.GatheredParameters(list(twin.parameters())):
            assert [name for name, p in twin.named_parameters() if not torch.equal(p, initial[name])] == []
        twin = None

        # A saved model loads straight into shards, in an engine without optimiser.
        _build(seed=5).save_pretrained(tmp_path / "ref")
        ref_model = _build(ModelConfig(name_or_path=str(tmp_path / "ref")), ds_config=ref_ds)
        assert _partitioned(ref_model)
        ref_model.requires_grad_(False)
        ref_engine, *_ = deepspeed.initialize(model=_Scorer(ref_model), config=ref_ds)
        ref_engine.eval()
        with torch.no_grad():
            ref_logps = ref_engine(**batch)
        # While the ZeRO-3 models live, a build without ds_config is still whole, not partitioned.
        expected = _naive_logps(_build(seed=5), batch)
        torch.testing.assert_close(ref_logps, expected, atol=1e-5, rtol=0)
    finally:
        # The HfDeepSpeedConfig lives on the models; drop them so later builds in this process are not ZeRO-3.
        engine = ref_engine = model = ref_model = None
        gc.collect()
        # DeepSpeed's own teardown also drops its cached world group; a later test's new group needs that.
        deepspeed.comm.destroy_process_group()


# Rank 0 scores 10 completion tokens per row, rank 1 only 2: 14 chunks of 3 against 3.
_COMPLETION_START = {0: 2, 1: 10}


def _two_rank_worker(rank: int, port: int) -> None:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    os.environ.update(_distributed_env(rank, 2, port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        ds = build_deepspeed_config(_zero3_cfg(), world_size=2, use_gpu=False)
        # Layer checkpointing too: its recompute re-gathers every layer's shards in backward.
        model = _build(ModelConfig(gradient_checkpointing=True), ds_config=ds)
        engine, *_ = deepspeed.initialize(model=_Scorer(model), model_parameters=list(model.parameters()), config=ds)
        engine.train()  # transformers checkpoints layers only in training mode
        batches = [_batch(seed=r, completion_start=_COMPLETION_START[r]) for r in range(2)]
        engine.backward(_nll(engine(**batches[rank]), batches[rank]))
        grads = {name: safe_get_full_grad(p) for name, p in model.named_parameters()}
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            weights = {name: p.detach().clone() for name, p in model.named_parameters()}

        # The same step on one whole model: DeepSpeed averages the two ranks' gradients.
        plain = _build()
        with torch.no_grad():
            for name, p in plain.named_parameters():
                p.copy_(weights[name])
        loss = sum(_nll(_naive_logps(plain, b), b) for b in batches) / 2
        loss.backward()
        for name, p in plain.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)
        engine.step()
    finally:
        # DeepSpeed's own teardown also drops its cached world group; a later test's new group needs that.
        deepspeed.comm.destroy_process_group()


@pytest.mark.integration
def test_zero3_two_ranks_with_unequal_chunk_counts():
    """Ranks project different numbers of chunks; ZeRO-3's gathers must still pair up (no hang, right grads)."""
    import torch.multiprocessing as mp

    context = mp.spawn(_two_rank_worker, args=(_free_port(),), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):  # raises with the worker's traceback if one failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("two ZeRO-3 ranks did not finish in 300 s: a collective mismatch (hang)?")

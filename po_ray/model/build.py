"""Build the Hugging Face causal LM: the tiny test Llama or a pretrained model, ZeRO-3 aware."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedModel

from po_ray.config import TINY_MODEL, ConfigError, ModelConfig
from po_ray.model.sources import HUB_NAME

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# The tiny Llama of the tests and the demo: small enough to train on CPU in seconds.
TINY_LLAMA = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=512,
)

def resolve_dtype(model_cfg: ModelConfig, use_gpu: bool) -> torch.dtype:
    """model.dtype -> torch dtype; ``auto`` is bf16 on GPU and fp32 on CPU."""
    if model_cfg.dtype == "auto":
        return torch.bfloat16 if use_gpu else torch.float32
    return _DTYPES[model_cfg.dtype]


def build_model(
    model_cfg: ModelConfig,
    *,
    vocab_size: int,
    pad_token_id: int,
    bos_token_id: int | None,
    eos_token_id: int | None,
    dtype: torch.dtype,
    seed: int,
    ds_config: dict | None = None,
) -> PreTrainedModel:
    """The policy or reference model, partitioned at creation when ``ds_config`` is ZeRO stage 3.

    ``tiny-llama`` is a random-init 2-layer Llama (same weights for the same ``seed``) sized to
    ``vocab_size`` with the given special-token ids; anything else is loaded with
    ``from_pretrained`` (the token ids are then the checkpoint's own).
    """
    zero3 = is_zero3(ds_config)
    if zero3:
        # transformers partitions every parameter while it is created (deepspeed.zero.Init with this
        # config, then ZeRO-3-aware weight init or sharded checkpoint loading) as long as an
        # HfDeepSpeedConfig is alive. It stays alive on the model: generate() also reads it to keep
        # ranks in step.
        from transformers.integrations import HfDeepSpeedConfig

        _share_process_group_with_deepspeed()
        hf_ds_config = HfDeepSpeedConfig(ds_config)
    with nullcontext() if zero3 else zero3_off():
        if model_cfg.name_or_path == TINY_MODEL:
            model = _tiny_llama(model_cfg, vocab_size, pad_token_id, bos_token_id, eos_token_id, dtype, seed)
        else:
            model = _pretrained(model_cfg, vocab_size, dtype)
    if zero3:
        model._po_ray_hf_ds_config = hf_ds_config
    model.config.use_cache = False  # training and teacher-forced scoring never reuse a KV cache
    if model_cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works with inputs that do not require grad and with ZeRO-3.
        # (transformers 5 renamed gradient_checkpointing_enable to this.)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def is_zero3(ds_config: dict | None) -> bool:
    """Whether a DeepSpeed config partitions parameters (ZeRO stage 3)."""
    return bool(ds_config) and ds_config.get("zero_optimization", {}).get("stage", 0) == 3


def _tiny_llama(model_cfg, vocab_size, pad_token_id, bos_token_id, eos_token_id, dtype, seed) -> PreTrainedModel:
    config = LlamaConfig(
        **TINY_LLAMA,
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    apply_config_overrides(config, model_cfg.config_overrides)
    # A private RNG stream: the weights depend on the seed alone, and the caller's RNG is untouched.
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=model_cfg.attn_implementation
        )


def _pretrained(model_cfg: ModelConfig, vocab_size: int, dtype: torch.dtype) -> PreTrainedModel:
    path = model_cfg.name_or_path
    if not Path(path).expanduser().exists() and not HUB_NAME.match(path):
        raise ConfigError(
            f"model.name_or_path: {path!r} is not an existing folder and not a hub name like 'org/model'; "
            "check the path (relative paths are from the working directory)"
        )
    config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    apply_config_overrides(config, model_cfg.config_overrides)
    model_vocab = config.get_text_config().vocab_size
    if vocab_size > model_vocab:
        raise ConfigError(
            f"model.name_or_path: the tokenizer has {vocab_size} tokens but {path} embeds only {model_vocab}; "
            "use the model's own tokenizer (model.tokenizer empty) or one without added tokens"
        )
    return AutoModelForCausalLM.from_pretrained(
        path,
        config=config,
        dtype=dtype,
        trust_remote_code=model_cfg.trust_remote_code,
        attn_implementation=model_cfg.attn_implementation,
        use_safetensors=True,
    )


def apply_config_overrides(config: PretrainedConfig, overrides: dict) -> None:
    """Set model.config_overrides on a model config; a key the config does not have is an error."""
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ConfigError(
                f"model.config_overrides.{key}: {type(config).__name__} has no such field; "
                f"check the spelling against the model's config.json"
            )
        setattr(config, key, value)


def _share_process_group_with_deepspeed() -> None:
    """Make deepspeed.comm wrap an existing torch.distributed group (Ray Train creates one).

    zero.Init sizes partitions and checks train_batch_size by deepspeed.comm's world size, which
    reads 1 until DeepSpeed has wrapped the group; deepspeed.initialize would do it, but too late.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())


@contextmanager
def zero3_off():
    """Build without ZeRO-3 even while another model's HfDeepSpeedConfig is alive in this process.

    transformers keeps one global (weak) reference to the live HfDeepSpeedConfig and would
    otherwise partition every model built while it exists.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved

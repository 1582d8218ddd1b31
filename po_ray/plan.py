"""Memory planner: will this run fit on N nodes × G GPUs under ZeRO-3, and what is the smallest cluster?

Everything is per GPU, in bytes, from the model's ``config.json`` (bundled for the shipped 35B-class
models, so this works offline) and the run config. The line items:

- **parameters / gradients / optimiser state** — mixed precision with Adam keeps, per parameter,
  a bf16 weight (2 B), a bf16 gradient (2 B) and an fp32 master weight, momentum and variance
  (12 B): 16 B (Rajbhandari et al. 2020, "ZeRO", §3). Stage 3 partitions all three over every GPU
  (stage 2: gradients and optimiser state; stage 1: optimiser state). DeepSpeed pads each tensor to a
  multiple of the world size, so a GPU holds ``Σ ceil(numel / world)`` elements of each. Offloading
  moves optimiser state and gradients (``offload_optimizer``) or the weights (``offload_params``)
  to CPU memory. In fp32 training the weight and gradient are 4 B each and Adam adds 8 B.
- **ZeRO-3 buffers** — the largest module gathered whole for its forward/backward, as bf16 weight +
  gradient (4 B/param: the same term DeepSpeed's estimator uses; for Command R that is the 2.1 B
  parameter embedding, 8 GiB), the prefetch and reduce buckets (2 B/element each), and the whole
  copies of parameters at or under ``stage3_param_persistence_threshold`` (which are never released).
- **reference model** — ``sharded``: a second, inference-only ZeRO-3 engine holding bf16 weights
  (2 B/param / world, or none on the GPU with ``reference.offload_params``); ``precomputed`` and
  ``none``: nothing (the cached log-probs are a few bytes per pair).
- **activations** — chosen and rejected run in one forward: ``2 × micro_batch_size`` sequences of
  ``data.max_length`` tokens. One decoder layer saves, per token, about ``4h + 3q + 3kv + 4i``
  elements for backward (layer input and normed input before attention and MLP: 4h; q, rotated q and
  the attention output: 3q; k, rotated k and v: 3kv; gate, up, act(gate) and act(gate)·up: 4i, for
  hidden h, query width q, key/value width kv and MLP width i). SDPA and flash attention keep no
  seq×seq matrix; eager attention adds scores and probabilities, ``2 × heads × seq`` per token.
  With activation checkpointing only each layer's input survives the forward (``layers × h``
  per token), and backward recomputes one layer at a time: that layer's saved tensors plus the
  gradients flowing through them (counted as twice the saved tensors). Without checkpointing every
  layer keeps its saved tensors, plus one layer's worth of gradients in flight.
- **log-prob chunk** — ``logprob_chunk_size × vocab`` logits: one fp32 buffer, plus the 16-bit
  matmul output it is converted from (forward) or the 16-bit copy of the gradient it is turned
  into (backward), plus with a softcap (Gemma) the fp32 ``tanh`` kept for its derivative
  (po_ray.model.logprobs keeps nothing of this size between forward and backward).
- **headroom** — 2 GiB for the CUDA context and NCCL communicators and workspace, plus 10 % of the
  GPU for allocator fragmentation and short-lived copies (such as the fp32 gradient of one optimiser
  sub-group that ZeRO-3 makes at the step, after activations are freed).

Each GPU is one Ray Train worker with ``train.micro_batch_size`` pairs per micro-step, so a plan
for N × G GPUs is a plan for ``scaling.num_workers = N × G``; when the config says otherwise the plan
notes the worker count to run with and the global batch that gives.

The model-state figure (parameters + gradients + optimiser state + gathered largest layer) is
cross-checked against DeepSpeed's ``estimate_zero3_model_states_mem_needs``. Without offload
DeepSpeed budgets 18 B/param where we itemise 16 (2 + 2 + 12 above); the 2 B it adds are not broken
down, and the one transient we know of at that scale, the fp32 gradient ZeRO-3 makes per optimiser
sub-group at the step (after activations are freed), we leave to the headroom. With optimiser
offload the two agree up to padding. The plan shows both, and DeepSpeed's total as well.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path

from po_ray.config import BUNDLED_DIR, TINY_MODEL, Config, ModelConfig

BUNDLED_MODEL_CONFIGS = BUNDLED_DIR / "model_configs"

HALF_PARAM_BYTES = 2  # bf16 / fp16 weight or gradient
MASTER_AND_ADAM_BYTES = 12  # fp32 master weight + Adam m + v (mixed precision)
FP32_ADAM_BYTES = 8  # Adam m + v when the weights themselves are fp32
GATHERED_LAYER_BYTES_PER_PARAM = 4  # bf16 weight + bf16 gradient of the gathered module (DeepSpeed's term)
DEEPSPEED_BYTES_PER_PARAM = 18  # what DeepSpeed's ZeRO-3 estimator budgets without offload
HEADROOM_FIXED_BYTES = 2 * 2**30
HEADROOM_PERCENT = 10

# Families whose parameter layout `module_sizes` knows: Llama-style decoders.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "cohere")

_UNITS = {
    "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_BYTES_FORMS = (
    "a positive number of bytes with an optional unit, e.g. 80GB, 80GiB, 81920MiB, 1.5TB or 85899345920; "
    "units: B, KB, MB, GB, TB (powers of 1000) and KiB, MiB, GiB, TiB (powers of 1024)"
)


def parse_bytes(text: str) -> int:
    """'80GB' -> 80_000_000_000; '80GiB' -> 85_899_345_920; a bare number is bytes.

    GB means 10⁹ bytes. Cards sold as "80GB" hold 80 GiB, so passing 80GB under-states them by 7 %,
    which the planner takes as extra safety.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(text))
    unit = match and (match.group(2).upper() or "B")
    if not match or unit not in _UNITS:
        raise ValueError(f"size {text!r}: expected {_BYTES_FORMS}")
    value = int(Decimal(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"size {text!r}: must be more than 0 bytes; expected {_BYTES_FORMS}")
    return value


# ---------------------------------------------------------------------------------------------
# The model


def model_architecture(model_cfg: ModelConfig) -> dict:
    """The model's config.json as a dict, with ``model.config_overrides`` applied.

    Looked up, without network, as: ``tiny-llama``'s built-in defaults; a local folder holding
    config.json; a copy bundled with po_ray for known hub names
    (``assets/model_configs/<org>__<name>/config.json``); or the local Hugging Face cache.
    """
    name = model_cfg.name_or_path
    if name == TINY_MODEL:
        arch = _tiny_llama_architecture(model_cfg)
    else:
        path = _find_config_json(name)
        if path is None:
            bundled = sorted(p.parent.name.replace("__", "/") for p in BUNDLED_MODEL_CONFIGS.glob("*/config.json"))
            raise ValueError(
                f"model.name_or_path {name!r}: no config.json found offline. It is not {TINY_MODEL!r}, "
                f"not a folder with config.json, not bundled (bundled: {', '.join(bundled)}) and not in the "
                "Hugging Face cache. Download its config.json into a folder and plan with "
                "model.name_or_path=<that folder>."
            )
        arch = json.loads(path.read_text(encoding="utf-8"))
    return {**arch, **model_cfg.config_overrides}


def _find_config_json(name: str) -> Path | None:
    local = Path(name).expanduser() / "config.json"
    if local.is_file():
        return local
    bundled = BUNDLED_MODEL_CONFIGS / name.replace("/", "__") / "config.json"
    if "/" in name and bundled.is_file():
        return bundled
    if name.count("/") == 1:
        from huggingface_hub import try_to_load_from_cache  # looks in the local cache only

        cached = try_to_load_from_cache(name, "config.json")
        if isinstance(cached, str):
            return Path(cached)
    return None


def _tiny_llama_architecture(model_cfg: ModelConfig) -> dict:
    # As po_ray.model.build makes it: TINY_LLAMA on LlamaConfig's defaults, sized to the tokenizer.
    from transformers import LlamaConfig

    from po_ray.data.tokenizer import load_tokenizer
    from po_ray.model.build import TINY_LLAMA

    return LlamaConfig(**TINY_LLAMA, vocab_size=len(load_tokenizer(model_cfg))).to_dict()


def module_sizes(arch: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(Hugging Face module name, numel of each of its own parameters), in model order.

    Counts embeddings, attention with grouped-query heads (q: heads × head_dim, k/v: kv_heads ×
    head_dim, with the family's biases and q/k norms), the gated MLP, norms, and an lm_head when
    ``tie_word_embeddings`` is false (a tied head shares the embedding and adds nothing).
    """
    kind = arch.get("model_type", "")
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {kind!r}: the planner counts parameters of {', '.join(SUPPORTED_MODEL_TYPES)} "
            "models; for another family, plan with the closest of these via model.config_overrides"
        )
    h, layers, vocab, inter = (arch[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"))
    heads = arch["num_attention_heads"]
    kv_heads = arch.get("num_key_value_heads") or heads
    head_dim = arch.get("head_dim") or h // heads
    q_width, kv_width = heads * head_dim, kv_heads * head_dim

    qkv_bias = kind == "qwen2" or arch.get("attention_bias", False)
    o_bias = kind != "qwen2" and arch.get("attention_bias", False)
    mlp_bias = arch.get("mlp_bias", False)

    def linear(n_in: int, n_out: int, bias: bool) -> tuple[int, ...]:
        return (n_in * n_out, n_out) if bias else (n_in * n_out,)

    layer: list[tuple[str, tuple[int, ...]]] = [("input_layernorm", (h,))]
    layer += [
        ("self_attn.q_proj", linear(h, q_width, qkv_bias)),
        ("self_attn.k_proj", linear(h, kv_width, qkv_bias)),
        ("self_attn.v_proj", linear(h, kv_width, qkv_bias)),
        ("self_attn.o_proj", linear(q_width, h, o_bias)),
    ]
    if kind == "qwen3":
        layer += [("self_attn.q_norm", (head_dim,)), ("self_attn.k_norm", (head_dim,))]
    if kind == "cohere" and arch.get("use_qk_norm", False):
        layer += [("self_attn.q_norm", (q_width,)), ("self_attn.k_norm", (kv_width,))]
    if kind != "cohere":  # Cohere runs attention and MLP in parallel off one norm
        layer.append(("post_attention_layernorm", (h,)))
    layer += [
        ("mlp.gate_proj", linear(h, inter, mlp_bias)),
        ("mlp.up_proj", linear(h, inter, mlp_bias)),
        ("mlp.down_proj", linear(inter, h, mlp_bias)),
    ]

    modules = [("model.embed_tokens", (vocab * h,))]
    modules += [(f"model.layers.{i}.{name}", sizes) for i in range(layers) for name, sizes in layer]
    modules.append(("model.norm", (h,)))
    if not arch.get("tie_word_embeddings", kind == "cohere"):  # the family's own default when unset
        modules.append(("lm_head", (h * vocab,)))
    return modules


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU memory of one run on one cluster shape; every ``*_bytes`` line is per GPU."""

    model: str
    n_params: int
    """Parameters of the policy (shared tensors once)."""
    largest_layer_params: int
    """Parameters of the largest module, which ZeRO-3 gathers whole."""
    nodes: int
    gpus_per_node: int
    gpu_memory_bytes: int
    zero_stage: int
    precision: str
    reference_strategy: str
    gradient_checkpointing: bool
    params_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    zero_buffers_bytes: int
    reference_bytes: int
    activations_bytes: int
    logprob_chunk_bytes: int
    headroom_bytes: int
    deepspeed_model_states_bytes: int | None
    """DeepSpeed's own ZeRO-3 estimate of the same model states (None when not ZeRO-3 mixed precision)."""
    notes: tuple[str, ...] = ()

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def gathered_layer_bytes(self) -> int:
        """The part of the ZeRO buffers that is the largest module gathered whole (ZeRO-3 only)."""
        return GATHERED_LAYER_BYTES_PER_PARAM * self.largest_layer_params if self.zero_stage == 3 else 0

    @property
    def model_states_bytes(self) -> int:
        """Parameters + gradients + optimiser state + the gathered largest layer: what DeepSpeed estimates."""
        return self.params_bytes + self.gradients_bytes + self.optimizer_bytes + self.gathered_layer_bytes

    @property
    def total_bytes(self) -> int:
        return (
            self.params_bytes + self.gradients_bytes + self.optimizer_bytes + self.zero_buffers_bytes
            + self.reference_bytes + self.activations_bytes + self.logprob_chunk_bytes + self.headroom_bytes
        )

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.gpu_memory_bytes


def plan_memory(cfg: Config, *, nodes: int, gpus_per_node: int, gpu_memory_bytes: int) -> MemoryPlan:
    """Per-GPU memory of ``cfg`` on ``nodes × gpus_per_node`` GPUs of ``gpu_memory_bytes`` each."""
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"cluster {nodes} nodes × {gpus_per_node} GPUs: both must be at least 1")
    arch = model_architecture(cfg.model)
    modules = module_sizes(arch)
    world = nodes * gpus_per_node
    ds = cfg.deepspeed
    stage = ds.stage

    tensors = [n for _, sizes in modules for n in sizes]
    n_params = sum(tensors)
    largest = max(sum(sizes) for _, sizes in modules)
    per_gpu = sum(math.ceil(n / world) for n in tensors)  # DeepSpeed pads each tensor to the world size
    persistent = sum(n for n in tensors if n <= ds.stage3_param_persistence_threshold) if stage == 3 else 0

    precision = _precision(cfg)
    half = precision != "fp32"
    weight_b = HALF_PARAM_BYTES if half else 4
    optim_b = MASTER_AND_ADAM_BYTES if half else FP32_ADAM_BYTES
    offload_optimizer = stage >= 1 and ds.offload_optimizer
    offload_params = stage == 3 and ds.offload_params

    params_bytes = 0 if offload_params else weight_b * (per_gpu if stage == 3 else n_params)
    gradients_bytes = 0 if offload_optimizer else weight_b * (per_gpu if stage >= 2 else n_params)
    optimizer_bytes = 0 if offload_optimizer else optim_b * (per_gpu if stage >= 1 else n_params)

    zero_buffers = weight_b * ds.reduce_bucket_size if stage >= 1 else 0
    if stage == 3:
        zero_buffers += GATHERED_LAYER_BYTES_PER_PARAM * largest
        zero_buffers += weight_b * (ds.stage3_prefetch_bucket_size + persistent)

    strategy = _reference_strategy(cfg)
    reference_bytes = 0
    if strategy == "sharded":
        if stage == 3:
            on_gpu = 0 if cfg.reference.offload_params else per_gpu
            reference_bytes = weight_b * (on_gpu + persistent)
        else:
            reference_bytes = weight_b * n_params

    activations_bytes = _activation_bytes(cfg, arch, weight_b)
    chunk_bytes_per_logit = 4 + (weight_b if weight_b < 4 else 0) + (4 if arch.get("final_logit_softcapping") else 0)
    logprob_chunk_bytes = cfg.model.logprob_chunk_size * arch["vocab_size"] * chunk_bytes_per_logit
    headroom_bytes = HEADROOM_FIXED_BYTES + gpu_memory_bytes * HEADROOM_PERCENT // 100

    plan = MemoryPlan(
        model=cfg.model.name_or_path,
        n_params=n_params,
        largest_layer_params=largest,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        gpu_memory_bytes=gpu_memory_bytes,
        zero_stage=stage,
        precision=precision,
        reference_strategy=strategy,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        params_bytes=params_bytes,
        gradients_bytes=gradients_bytes,
        optimizer_bytes=optimizer_bytes,
        zero_buffers_bytes=zero_buffers,
        reference_bytes=reference_bytes,
        activations_bytes=activations_bytes,
        logprob_chunk_bytes=logprob_chunk_bytes,
        headroom_bytes=headroom_bytes,
        deepspeed_model_states_bytes=None,
        notes=tuple(filter(None, [worker_count_note(cfg, world)])),
    )
    if stage != 3 or not half:
        return plan
    ds_bytes = _deepspeed_estimate(plan, offload_optimizer=offload_optimizer, offload_params=offload_params)
    return _with_crosscheck(plan, ds_bytes, offload_optimizer=offload_optimizer)


def worker_count_note(cfg: Config, world: int) -> str | None:
    """What running ``cfg`` on ``world`` GPUs changes when scaling.num_workers differs (None when it does not)."""
    workers, micro, accumulation = cfg.scaling.num_workers, cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps
    if workers == world:
        return None
    wanted = workers * micro * accumulation
    note = (
        f"scaling.num_workers is {workers}, but {world} GPUs are {world} workers: run with "
        f"scaling.num_workers={world}. The global batch is then {world} workers × {micro} pairs × "
        f"{accumulation} accumulation steps = {world * micro * accumulation} pairs per step, not {wanted}"
    )
    if (workers * accumulation) % world == 0:
        note += f"; train.gradient_accumulation_steps={workers * accumulation // world} keeps {wanted}"
    return note + "."


def _precision(cfg: Config) -> str:
    dtype = cfg.model.dtype
    if dtype == "auto":  # as the trainer resolves it
        return "bf16" if cfg.scaling.use_gpu else "fp32"
    return dtype


def _reference_strategy(cfg: Config) -> str:
    from po_ray.reference import resolve_strategy  # the trainer's own rule (auto → sharded or none)

    return resolve_strategy(cfg)


def _activation_bytes(cfg: Config, arch: dict, act_b: int) -> int:
    h, layers, inter = arch["hidden_size"], arch["num_hidden_layers"], arch["intermediate_size"]
    heads = arch["num_attention_heads"]
    head_dim = arch.get("head_dim") or h // heads
    q_width = heads * head_dim
    kv_width = (arch.get("num_key_value_heads") or heads) * head_dim
    seq = cfg.data.max_length
    tokens = 2 * cfg.train.micro_batch_size * seq  # chosen and rejected in one forward

    saved_per_token = 4 * h + 3 * q_width + 3 * kv_width + 4 * inter  # one layer, elements
    if cfg.model.attn_implementation == "eager":
        saved_per_token += 2 * heads * seq  # attention scores and probabilities
    if cfg.model.gradient_checkpointing:
        per_token = layers * h + 2 * saved_per_token
    else:
        per_token = (layers + 1) * saved_per_token
    return tokens * act_b * per_token


def _deepspeed_estimate(plan: MemoryPlan, *, offload_optimizer: bool, offload_params: bool) -> int:
    # Imported here: importing deepspeed costs seconds and probes for accelerators.
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _cpu, gpu_bytes, _largest = estimate_zero3_model_states_mem_needs(
        total_params=plan.n_params,
        largest_layer_params=plan.largest_layer_params,
        num_gpus_per_node=plan.gpus_per_node,
        num_nodes=plan.nodes,
        cpu_offload=offload_optimizer,
        cpu_offload_params=offload_params,
        zero_init=True,
    )
    return gpu_bytes


def _with_crosscheck(plan: MemoryPlan, ds_bytes: int, *, offload_optimizer: bool) -> MemoryPlan:
    ours = plan.model_states_bytes
    diff = ds_bytes - ours
    why = []
    if not offload_optimizer:
        why.append(
            f"DeepSpeed budgets {DEEPSPEED_BYTES_PER_PARAM} B/param where we itemise 16 (bf16 weight and "
            "gradient, fp32 master and Adam m, v; the fp32 gradient of one optimiser sub-group at the step "
            "is left to the headroom)"
        )
    why.append("and we pad each tensor to the world size as its partitioner does")
    total_ds = plan.total_bytes + diff
    verdict = "fits" if total_ds <= plan.gpu_memory_bytes else "does NOT fit"
    note = (
        f"cross-check: DeepSpeed's estimate_zero3_model_states_mem_needs gives {_gib(ds_bytes)} GiB of model "
        f"states per GPU where we count {_gib(ours)} GiB (parameters, gradients, optimiser state and the "
        "gathered largest layer): " + ", ".join(why)
        + f". With DeepSpeed's figure the total is {_gib(total_ds)} GiB ({verdict})."
    )
    return replace(plan, deepspeed_model_states_bytes=ds_bytes, notes=(*plan.notes, note))


def smallest_cluster(cfg: Config, *, gpus_per_node: int, gpu_memory_bytes: int, max_nodes: int = 64) -> MemoryPlan | None:
    """The plan on the fewest nodes (1…max_nodes) on which ``cfg`` fits, or None if none does.

    Every line item shrinks or stays as GPUs are added, so the first node count that fits is the answer.
    """
    for nodes in range(1, max_nodes + 1):
        plan = plan_memory(cfg, nodes=nodes, gpus_per_node=gpus_per_node, gpu_memory_bytes=gpu_memory_bytes)
        if plan.fits:
            return plan
    return None


# ---------------------------------------------------------------------------------------------
# Printing


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a table of GiB per GPU, with the verdict and the DeepSpeed cross-check."""
    w = plan.world_size
    part = f"1/{w} each" if plan.zero_stage == 3 else "whole"
    offloaded = " (offloaded)"
    ckpt = "checkpointed" if plan.gradient_checkpointing else "no checkpointing"
    rows = [
        (f"parameters ({plan.precision}, {part})", plan.params_bytes),
        ("gradients" + (offloaded if not plan.gradients_bytes else ""), plan.gradients_bytes),
        ("optimiser state (Adam" + (", fp32 master" if plan.precision != "fp32" else "") + ")"
         + (offloaded if not plan.optimizer_bytes else ""), plan.optimizer_bytes),
        *([("ZeRO-3 gathered largest layer (bf16 weight + gradient)", plan.gathered_layer_bytes)]
          if plan.zero_stage == 3 else []),
        (f"ZeRO-{plan.zero_stage} buckets" + (" and persistent parameters" if plan.zero_stage == 3 else ""),
         plan.zero_buffers_bytes - plan.gathered_layer_bytes),
        (f"reference model ({plan.reference_strategy})", plan.reference_bytes),
        (f"activations ({ckpt})", plan.activations_bytes),
        ("log-prob chunk", plan.logprob_chunk_bytes),
        ("headroom (CUDA context, NCCL, fragmentation)", plan.headroom_bytes),
    ]
    label_w = max(len(r[0]) for r in rows) + 2
    lines = [
        f"{plan.model}: {_count(plan.n_params)} parameters (largest layer {_count(plan.largest_layer_params)})",
        f"cluster: {plan.nodes} node(s) × {plan.gpus_per_node} GPU(s) = {w} GPUs of {_gib(plan.gpu_memory_bytes)} GiB",
        f"{'per GPU':<{label_w}}{'GiB':>9}",
    ]
    lines += [f"  {label:<{label_w - 2}}{_gib(n):>9}" for label, n in rows]
    lines.append(f"  {'total':<{label_w - 2}}{_gib(plan.total_bytes):>9}")
    spare = plan.gpu_memory_bytes - plan.total_bytes
    verdict = f"fits ({_gib(spare)} GiB to spare)" if plan.fits else f"does NOT fit ({_gib(-spare)} GiB over)"
    lines.append(f"verdict: {verdict}")
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


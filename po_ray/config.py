"""Run configuration: frozen dataclasses loaded from YAML and overridden by dotted ``key=value``.

Every field has a default and a one-line doc (the string literal under it). ``load_config`` is the
only way in: it reads the YAML, applies overrides, checks every key, type and range, and raises
``ConfigError`` naming the key (and the file) on the first problem.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

BUNDLED_DIR = Path(__file__).resolve().parent / "assets"
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"
DEMO_DATA = "demo"  # special value of data.path: the bundled, generated demo pairs
TINY_MODEL = "tiny-llama"  # special value of model.name_or_path: a 2-layer Llama built from config


class ConfigError(ValueError):
    """A configuration problem; the message names the key, the file and what to do."""


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = TINY_MODEL
    """Hugging Face hub name, local folder, or `tiny-llama` (random-init 2-layer Llama for tests/demo)."""
    tokenizer: str = ""
    """Tokenizer name or folder; empty means the model's own (the bundled one for tiny-llama)."""
    config_overrides: dict = field(default_factory=dict)
    """Keys set on the model's config before it is built, e.g. {hidden_size: 64, num_hidden_layers: 2}."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Training precision: auto is bf16 on GPU and fp32 on CPU."""
    trust_remote_code: bool = False
    """Allow a model repository to run its own Python code (off unless you trust the source)."""
    attn_implementation: str = "sdpa"
    """transformers attention backend: sdpa, eager or flash_attention_2."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (activation checkpointing) to save memory."""
    logprob_chunk_size: int = 1024
    """Completion tokens per chunk when taking log-probs, so (tokens, vocab) fp32 never exists at once."""


@dataclass(frozen=True)
class DataConfig:
    path: str = DEMO_DATA
    """Training pairs: .jsonl/.json/.parquet file, a save_to_disk folder, a hub dataset name, or `demo`."""
    split: str = "train"
    """Split to read for hub datasets and save_to_disk DatasetDicts."""
    eval_path: str = ""
    """Held-out pairs (same formats); empty holds out `eval_fraction` of the training pairs."""
    eval_split: str = "test"
    """Split of eval_path (hub / DatasetDict)."""
    eval_fraction: float = 0.05
    """Share of training pairs held out for evaluation when eval_path is empty."""
    prompt_field: str = "prompt"
    """Column holding the prompt (string, or message list for conversational data)."""
    chosen_field: str = "chosen"
    """Column holding the preferred completion."""
    rejected_field: str = "rejected"
    """Column holding the dispreferred completion."""
    max_prompt_length: int = 512
    """Prompt tokens kept (the prompt keeps its end)."""
    max_completion_length: int = 512
    """Completion tokens kept (the completion keeps its start)."""
    max_length: int = 1024
    """Prompt + completion tokens at most; the prompt is cut further to fit."""
    add_eos: bool = True
    """Append the tokenizer's EOS to every completion that does not end with it."""
    poet: bool = False
    """POET: cut both completions of a pair to the shorter one's length (after tokenisation)."""
    on_bad_row: Literal["error", "skip"] = "error"
    """A malformed row stops with an error naming file, row and field, or is counted and skipped."""


@dataclass(frozen=True)
class LossConfig:
    name: str = "dpo"
    """Registered loss; `a+b` sums several (weighted by `weights`)."""
    beta: float = 0.1
    """β: inverse temperature of the implicit reward (τ for ipo, λ for orpo)."""
    averaged: bool = False
    """Use per-token averaged log-ratios ĥ instead of sums h (Grinsztajn et al.); ln_dpo = dpo averaged."""
    nll_alpha: float = 0.0
    """α of the additive NLL term on the chosen completion (RPO); 0 turns it off."""
    weights: tuple = ()
    """Weights of the losses named in `name`, in order; empty means all 1."""
    options: dict = field(default_factory=dict)
    """The loss's own knobs (label_smoothing, gamma, alpha, …), checked against what it declares."""
    plugins: tuple = ()
    """Python modules imported on every worker before the loss is built, so their @register_loss run."""


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 1e-6
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    scheduler: Literal["constant", "linear", "cosine"] = "linear"
    """Learning-rate decay after warm-up, to 0 at max_steps (constant keeps it)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 turns clipping off."""


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 100
    """Optimiser steps to run (each consumes micro_batch_size × grad accumulation × workers pairs)."""
    micro_batch_size: int = 4
    """Pairs per worker per forward/backward."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated per optimiser step."""
    seed: int = 0
    """Seed for model init, data order and dropout."""
    log_every: int = 10
    """Print a progress line every N steps."""
    report_every: int = 10
    """Hand metrics to Ray Train/Tune every N steps (each report is a barrier; MLflow still gets every step)."""
    eval_every: int = 50
    """Evaluate on held-out pairs every N steps (0: only at the end)."""
    eval_batches: int = 0
    """Micro-batches per worker per evaluation; 0 means the whole held-out split."""
    max_skipped_steps: int = 5
    """Steps skipped (no update) for a NaN/inf loss or gradient before the run stops with an error naming the step and pairs; 0 stops at the first."""


@dataclass(frozen=True)
class DeepSpeedConfig:
    stage: Literal[0, 1, 2, 3] = 3
    """ZeRO stage; 3 partitions parameters, gradients and optimiser state across ranks."""
    offload_optimizer: bool = False
    """Keep optimiser state (and its step) in CPU memory."""
    offload_params: bool = False
    """Keep partitioned parameters in CPU memory (ZeRO-3)."""
    overlap_comm: bool = True
    """Overlap gradient reduction with backward."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient reduce bucket."""
    stage3_prefetch_bucket_size: int = 50_000_000
    """Elements of parameters prefetched ahead of use (ZeRO-3)."""
    stage3_param_persistence_threshold: int = 100_000
    """Parameters smaller than this stay whole on every rank (ZeRO-3)."""
    config_file: str = ""
    """A raw DeepSpeed JSON whose keys override the config built from these fields."""
    overrides: dict = field(default_factory=dict)
    """Raw DeepSpeed keys (nested dict) applied last."""


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 2
    """Ray Train workers (one per GPU on a GPU cluster)."""
    use_gpu: bool = False
    """Give each worker a GPU (backend nccl); otherwise CPU with gloo."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    resources_per_worker: dict = field(default_factory=dict)
    """Extra Ray resources per worker, e.g. {accelerator_type:H100: 0.001}."""


@dataclass(frozen=True)
class ReferenceConfig:
    strategy: Literal["auto", "sharded", "precomputed", "none"] = "auto"
    """auto: none for reference-free losses, else sharded; precomputed caches log-probs once per data."""
    name_or_path: str = ""
    """Reference model; empty means the policy's starting weights."""
    offload_params: bool = False
    """Keep the sharded reference's parameters in CPU memory."""
    cache_dir: str = ""
    """Where precomputed reference log-probs live; empty means <storage_path>/reference_cache."""


@dataclass(frozen=True)
class MetricsConfig:
    topk: int = 10
    """k of top-k entropy and top-k mass."""


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 50
    """Save a checkpoint every N steps (and always at the end); 0 only at the end."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted."""
    export_model: bool = True
    """At the end, write a consolidated Hugging Face model (safetensors + tokenizer)."""


@dataclass(frozen=True)
class RunConfig:
    name: str = "po-ray"
    """Run name: the folder under storage_path; the same name resumes."""
    storage_path: str = "po_ray_runs"
    """Output root (local folder, or s3:// gs:// URI / NFS path on clusters); relative is under the cwd."""
    max_failures: int = 2
    """Times Ray Train restarts the worker group from the last checkpoint after a failure."""
    node_wait_s: float = 600.0
    """Seconds a run waits for the resources its workers need (at start, or after a node is lost) before failing."""


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    """Log to MLflow."""
    tracking_uri: str = ""
    """MLflow tracking URI; empty is a SQLite store in the run folder (made absolute)."""
    experiment_name: str = "po_ray"
    """MLflow experiment."""
    run_name: str = ""
    """MLflow run name; empty uses run.name."""


@dataclass(frozen=True)
class EarlyStoppingConfig:
    signal: Literal["topk_entropy", "topk_mass", "both"] = "topk_entropy"
    """Which collapse signal stops a trial (both: either one)."""
    source: Literal["train", "generation"] = "train"
    """Where the signal is measured: train (teacher-forced, every step) or generation (gen/topk_*, sampled responses at each eval.every_steps; needs eval.enabled)."""
    ema: float = 0.5
    """EMA smoothing weight of the previous value (0 is no smoothing)."""
    drop_fraction: float = 0.2
    """Stop when the smoothed signal is this fraction below its running peak…"""
    patience: int = 3
    """…for this many consecutive reports…"""
    min_steps: int = 10
    """…after this many steps."""
    divergence_factor: float = 10.0
    """Also stop when the loss exceeds this multiple of its first value."""


@dataclass(frozen=True)
class GenerationEvalConfig:
    enabled: bool = False
    """Sample responses to held-out prompts during training and score them (length, KL, entropy, judge)."""
    every_steps: int = 0
    """Generation eval every N training steps (0: only at the end); always at the end when enabled."""
    num_prompts: int = 16
    """Held-out prompts used: the first distinct prompts of the eval split."""
    samples_per_prompt: int = 1
    """Responses sampled per prompt (by the policy, and by the reference for the win rate)."""
    batch_size: int = 8
    """Prompts per generate call per worker (also the judge's batch)."""
    max_new_tokens: int = 64
    """Generated tokens at most per response (EOS included); one that reaches it without an EOS is cut off (gen/length_hit_limit)."""
    temperature: float = 1.0
    """Sampling temperature; 0 is greedy. The Monte-Carlo KL needs samples of the policy itself, so at any other value than 1 (or top_p < 1) it uses a second set drawn at temperature 1, top_p 1."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest token set with this much probability (1: off); below 1 the KL uses separate temperature-1, top_p-1 draws."""
    seed: int = 0
    """Sampling seed; each response's stream comes from it, its prompt and sample index (the same at every eval, for policy and reference, whatever the workers or batch size)."""
    judge: str = ""
    """Registered judge scoring each response: empty (none), reward_model, or a name from `plugins`."""
    judge_model: str = ""
    """Folder (or hub name) of the Hugging Face sequence-classification reward model for judge=reward_model; conversational prompts are rendered with its chat template."""
    judge_trust_remote_code: bool = False
    """Allow the reward model's repository to run its own Python code."""
    distinct_n: int = 2
    """Largest n of the distinct-n metrics (distinct_1 … distinct_n, over responses without their EOS); repetition rate uses this n."""
    plugins: tuple = ()
    """Python modules imported on every worker before the judge is built, so their @register_judge run."""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    eval: GenerationEvalConfig = field(default_factory=GenerationEvalConfig)


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """YAML file (optional) + dotted ``key=value`` overrides -> validated ``Config``.

    A file may start from another with a top-level ``extends: FILE`` (relative to it, or the name
    of a shipped config such as ``demo``); its own sections are merged over the base, key by key.
    """
    source = str(path) if path else "<defaults>"
    raw = _read_yaml(Path(path), seen=()) if path else {}
    raw = apply_overrides(raw, overrides)
    cfg = from_dict(Config, raw, source)
    validate(cfg, source)
    return cfg


def _read_yaml(path: Path, seen: tuple) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    base_name = raw.pop("extends", None)
    if base_name is None:
        return raw
    base = find_config(str(base_name), relative_to=path.parent)
    if base.resolve() in seen:
        raise ConfigError(f"{path}: extends: {base_name} makes a cycle")
    return _merge(_read_yaml(base, seen + (path.resolve(),)), raw)


def find_config(name: str, relative_to: Path = Path(".")) -> Path:
    """A config file path, or the name of a shipped config (`demo`, `command-r-35b-dpo`, …)."""
    for candidate in (relative_to / name, Path(name), SHIPPED_CONFIGS / f"{name.removesuffix('.yaml')}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml")))
    raise ConfigError(f"config {name!r}: no such file, and no shipped config of that name (shipped: {shipped})")


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(raw: dict, overrides: typing.Sequence[str]) -> dict:
    """Return a copy of ``raw`` with each ``a.b.c=value`` set (value parsed as YAML)."""
    raw = _deep_copy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. loss.beta=0.05")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
    return raw


def _deep_copy(raw: Any) -> Any:
    return {k: _deep_copy(v) for k, v in raw.items()} if isinstance(raw, dict) else raw


def from_dict(cls: type, raw: dict, source: str, prefix: str = ""):
    """Build dataclass ``cls`` from a plain dict, checking keys and types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {prefix}{unknown[0]!s}; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in raw.items():
        key = prefix + name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value or {}, source, key + ".")
        else:
            kwargs[name] = _coerce(value, hint, key, source)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{source}: {key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(value, option, key, source)
            except ConfigError:
                continue
        raise ConfigError(f"{source}: {key}: {value!r} has the wrong type ({hint})")
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
        tuple: isinstance(value, (list, tuple)),
    }.get(hint)
    if ok is None:  # pragma: no cover - a field with a type this loader does not know
        raise TypeError(f"config field {key} has unsupported type {hint}")
    if not ok:
        # YAML reads 1e-6 without a dot as a string; accept numeric strings for floats.
        if hint is float and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        want = {tuple: "list"}.get(hint, hint.__name__)
        raise ConfigError(f"{source}: {key}: expected {want}, got {type(value).__name__} {value!r}")
    if hint is float:
        return float(value)
    if hint is tuple:
        return tuple(value)
    return value


def validate(cfg: Config, source: str = "<config>") -> None:
    """Range and consistency checks that types alone cannot express."""

    def check(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: {key}: {why}")

    check(cfg.loss.beta > 0, "loss.beta", f"must be > 0, got {cfg.loss.beta}")
    check(cfg.loss.nll_alpha >= 0, "loss.nll_alpha", f"must be >= 0, got {cfg.loss.nll_alpha}")
    names = [n for n in cfg.loss.name.split("+")]
    check(all(names), "loss.name", f"empty loss name in {cfg.loss.name!r}")
    check(
        not cfg.loss.weights or len(cfg.loss.weights) == len(names),
        "loss.weights",
        f"{len(cfg.loss.weights)} weights for {len(names)} losses in {cfg.loss.name!r}",
    )
    for k in ("max_prompt_length", "max_completion_length", "max_length"):
        check(getattr(cfg.data, k) > 0, f"data.{k}", "must be > 0")
    check(
        cfg.data.max_length > 1 and cfg.data.max_length >= min(cfg.data.max_completion_length, cfg.data.max_length),
        "data.max_length",
        "must leave room for at least one completion token",
    )
    check(0 <= cfg.data.eval_fraction < 1, "data.eval_fraction", f"must be in [0, 1), got {cfg.data.eval_fraction}")
    check(cfg.optimizer.lr > 0, "optimizer.lr", f"must be > 0, got {cfg.optimizer.lr}")
    check(cfg.optimizer.max_grad_norm >= 0, "optimizer.max_grad_norm", "must be >= 0")
    check(len(cfg.optimizer.betas) == 2, "optimizer.betas", "needs two numbers, e.g. [0.9, 0.999]")
    for k in ("max_steps", "micro_batch_size", "gradient_accumulation_steps", "log_every", "report_every"):
        check(getattr(cfg.train, k) > 0, f"train.{k}", f"must be > 0, got {getattr(cfg.train, k)}")
    for k in ("eval_every", "eval_batches", "max_skipped_steps"):
        check(getattr(cfg.train, k) >= 0, f"train.{k}", "must be >= 0")
    check(cfg.scaling.num_workers >= 1, "scaling.num_workers", "must be >= 1")
    check(cfg.scaling.cpus_per_worker > 0, "scaling.cpus_per_worker", "must be > 0")
    check(cfg.model.logprob_chunk_size > 0, "model.logprob_chunk_size", "must be > 0")
    check(cfg.metrics.topk >= 1, "metrics.topk", "must be >= 1")
    check(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
    check(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    check(cfg.run.max_failures >= -1, "run.max_failures", "must be >= 0 (or -1 for unlimited)")
    check(cfg.run.node_wait_s > 0, "run.node_wait_s", f"must be > 0 seconds, got {cfg.run.node_wait_s}")
    check(bool(cfg.run.name) and "/" not in cfg.run.name, "run.name", "must be a non-empty name without '/'")
    ev = cfg.eval
    for k in ("num_prompts", "samples_per_prompt", "batch_size", "max_new_tokens", "distinct_n"):
        check(getattr(ev, k) >= 1, f"eval.{k}", f"must be >= 1, got {getattr(ev, k)}")
    check(ev.every_steps >= 0, "eval.every_steps", "must be >= 0")
    check(ev.temperature >= 0, "eval.temperature", f"must be >= 0 (0 is greedy), got {ev.temperature}")
    check(0 < ev.top_p <= 1, "eval.top_p", f"must be in (0, 1], got {ev.top_p}")
    check(ev.judge != "reward_model" or bool(ev.judge_model), "eval.judge_model",
          "judge=reward_model needs the reward model's folder in eval.judge_model")
    check(not ev.enabled or bool(cfg.data.eval_path) or cfg.data.eval_fraction > 0, "eval.enabled",
          "generation eval samples held-out prompts, but there are none: set data.eval_path or data.eval_fraction > 0")
    es = cfg.early_stopping
    check(0 <= es.ema < 1, "early_stopping.ema", f"must be in [0, 1), got {es.ema}")
    check(0 < es.drop_fraction < 1, "early_stopping.drop_fraction", f"must be in (0, 1), got {es.drop_fraction}")
    check(es.patience >= 1, "early_stopping.patience", "must be >= 1")
    check(es.min_steps >= 0, "early_stopping.min_steps", "must be >= 0")
    check(es.source == "train" or cfg.eval.enabled, "early_stopping.source",
          "generation needs eval.enabled=true (and eval.every_steps for signals before the end)")
    check(es.divergence_factor > 1, "early_stopping.divergence_factor", "must be > 1")


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (for YAML dumps, MLflow params and Ray's pickling)."""
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def field_docs(cls: type = Config) -> dict[str, str]:
    """Dotted key -> the one-line doc under the field (for `--help` and docs/config.md)."""
    import ast
    import inspect

    docs: dict[str, str] = {}

    def walk(c: type, prefix: str) -> None:
        tree = ast.parse(inspect.getsource(c))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                name = node.target.id
                hint = typing.get_type_hints(c)[name]
                if dataclasses.is_dataclass(hint):
                    walk(hint, f"{prefix}{name}.")
                elif isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                    docs[prefix + name] = str(nxt.value.value)

    walk(cls, "")
    return docs

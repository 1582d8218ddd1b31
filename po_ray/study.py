"""Robustness studies: which methods, over which grids, with which seeds, scored how.

A study file names a base run config, the methods to compare (each a ``tune_spaces/<method>.yaml``
holding its fixed overrides and its search space), seeds, the score and the early-stopping rule.
Ahrabian et al. (arXiv 2407.15229) judge a method by the distribution of scores over its whole grid,
not by its best cell; this module turns the files into plain objects and dotted overrides, and
leaves running them to ``sweep.py``. The file format is documented in ``tune_spaces/README.md``.

Nothing here imports Ray at module level; ``to_tune_space`` imports ``ray.tune`` when called.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from po_ray.config import Config, ConfigError, EarlyStoppingConfig, apply_overrides, flatten, load_config

SPACES_DIR = Path(__file__).resolve().parent.parent / "tune_spaces"
"""The shipped method spaces and studies (a source checkout's tune_spaces/)."""

SPACE_KINDS = ("grid", "choice", "uniform", "loguniform")
SEED_KEY = "train.seed"
STOPPING_EXTRA_KEYS = ("asha",)  # stopping keys that are not EarlyStoppingConfig fields

_METHOD_KEYS = ("method", "description", "fixed", "space", "num_samples")
_STUDY_KEYS = (
    "name",
    "description",
    "base_config",
    "base_overrides",
    "methods",
    "seeds",
    "score",
    "max_concurrent_trials",
    "trial_resources",
    "stopping",
    "storage_path",
)
_CONFIG_SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


class StudyError(ConfigError):
    """A problem in a study or method-space file; the message names the file and the key."""


@dataclass(frozen=True)
class Dimension:
    kind: str
    """grid, choice (Tune samples uniformly from the list), uniform or loguniform."""
    values: tuple
    """The listed values (grid, choice) or (low, high) (uniform, loguniform)."""


@dataclass(frozen=True)
class MethodSpace:
    name: str
    """Method name; every trial's Tune config (params.json) carries it as `method`."""
    path: Path | None
    """The YAML it came from (None when built in code)."""
    fixed: dict = field(default_factory=dict)
    """Dotted config key -> value applied to every trial of this method."""
    space: dict = field(default_factory=dict)
    """Dotted config key -> Dimension, in file order."""
    num_samples: int = 1
    """Tune's num_samples: draws of the random dimensions (the grid is repeated for each)."""
    description: str = ""
    """One line on what the method is."""

    @property
    def is_grid(self) -> bool:
        """True when every dimension is a grid, so the trials can be listed in advance."""
        return all(d.kind == "grid" for d in self.space.values())


@dataclass(frozen=True)
class ScoreSpec:
    metric: str
    """Reported metric that scores a trial (its last reported value)."""
    mode: typing.Literal["max", "min"] = "max"
    """Whether larger or smaller scores are better."""
    epsilon: float = 0.05
    """A trial is "good" when its score is within epsilon (absolute) of the best over all methods."""


@dataclass(frozen=True)
class StudySpec:
    name: str
    """Study name; the study folder is storage_path/name."""
    path: Path
    """The study file."""
    base_config: Path
    """The run config every trial starts from (absolute)."""
    base_overrides: tuple[str, ...]
    """Dotted key=value applied to the base config for every trial (stopping settings first)."""
    config: Config
    """The base config with base_overrides applied (what a trial is before its method and cell)."""
    methods: tuple[MethodSpace, ...]
    """The methods compared, in file order."""
    seeds: tuple[int, ...] = (0,)
    """Each cell runs once per seed (train.seed)."""
    score: ScoreSpec = ScoreSpec("eval/rewards/accuracies")
    """How trials are scored and compared."""
    max_concurrent_trials: int = 1
    """Trials Tune runs at once."""
    trial_resources: dict = field(default_factory=lambda: {"CPU": 1})
    """Resources of each trial's driver (its Ray Train workers reserve their own)."""
    stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    """Collapse / NaN / divergence early stopping of trials (the base config's, after overrides)."""
    asha: bool = False
    """Also stop unpromising trials early by score with ASHA (Tune's AsyncHyperBandScheduler)."""
    storage_path: str = "po_ray_runs"
    """Output root (local folder or URI); relative is under the cwd."""
    description: str = ""
    """One line on what the study asks."""

    @property
    def study_dir(self) -> str:
        """storage_path/name: where Tune's trial folders, stops.json and report/ live."""
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    def method(self, name: str) -> MethodSpace:
        """The method called ``name``."""
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(f"study {self.name} has no method {name!r}; it has {', '.join(m.name for m in self.methods)}")


# ---------------------------------------------------------------------------------------------
# Loading


def load_study(path: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> StudySpec:
    """Read a study YAML, its method spaces and its base config; check everything; return a StudySpec.

    ``overrides`` are dotted ``key=value``: keys under a study key (``seeds=[0,1]``,
    ``score.epsilon=0.1``, ``stopping.patience=5``, ``base_overrides.train.max_steps=10``) change
    the study; keys under a config section (``train.max_steps=10``) are appended to base_overrides.
    """
    path = Path(path)
    raw = _read_yaml(path)
    src = str(path)
    raw, config_overrides = _apply_study_overrides(raw, overrides, src)
    _check_keys(raw, _STUDY_KEYS, src, "")
    for key in ("name", "base_config", "methods"):
        if key not in raw:
            raise StudyError(f"{src}: missing key {key}")

    name = raw["name"]
    if not isinstance(name, str) or not name or "/" in name:
        raise StudyError(f"{src}: name: must be a non-empty name without '/', got {name!r}")

    base_config = raw["base_config"]
    if not isinstance(base_config, str) or not base_config:
        raise StudyError(f"{src}: base_config: expected a path to a run config YAML, got {base_config!r}")
    base_path = Path(base_config) if Path(base_config).is_absolute() else (path.parent / base_config)
    base_path = base_path.resolve()
    if not base_path.is_file():
        raise StudyError(f"{src}: base_config: {base_path} does not exist (paths are relative to the study file)")

    stopping_raw = raw.get("stopping") or {}
    if not isinstance(stopping_raw, dict):
        raise StudyError(f"{src}: stopping: expected a mapping, got {stopping_raw!r}")
    es_fields = tuple(f.name for f in dataclasses.fields(EarlyStoppingConfig))
    _check_keys(stopping_raw, es_fields + STOPPING_EXTRA_KEYS, src, "stopping.")
    asha = stopping_raw.get("asha", False)
    if not isinstance(asha, bool):
        raise StudyError(f"{src}: stopping.asha: expected true or false, got {asha!r}")
    stopping_overrides = [
        _override(f"early_stopping.{k}", v) for k, v in stopping_raw.items() if k not in STOPPING_EXTRA_KEYS
    ]
    base_overrides = (
        *stopping_overrides,
        *_overrides_from_mapping(raw.get("base_overrides") or {}, src, "base_overrides"),
        *config_overrides,
    )
    try:
        config = load_config(base_path, base_overrides)
    except ConfigError as e:
        raise StudyError(
            f"{src}: base config with stopping and base_overrides applied "
            f"(stopping.X is early_stopping.X of the run config): {e}"
        ) from None

    methods = _load_methods(raw["methods"], path, base_path, base_overrides)

    seeds = raw.get("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise StudyError(f"{src}: seeds: expected a non-empty list of distinct integers, got {seeds!r}")

    score = _parse_score(raw.get("score"), src)

    max_concurrent = raw.get("max_concurrent_trials", 1)
    if not isinstance(max_concurrent, int) or isinstance(max_concurrent, bool) or max_concurrent < 1:
        raise StudyError(f"{src}: max_concurrent_trials: expected an integer >= 1, got {max_concurrent!r}")

    resources = raw.get("trial_resources", {"CPU": 1})
    if not isinstance(resources, dict) or not all(
        isinstance(k, str) and _is_number(v) and v >= 0 for k, v in resources.items()
    ):
        raise StudyError(
            f"{src}: trial_resources: expected a mapping like {{CPU: 1}} with amounts >= 0, got {resources!r}"
        )

    storage_path = raw.get("storage_path", "po_ray_runs")
    if not isinstance(storage_path, str) or not storage_path:
        raise StudyError(f"{src}: storage_path: expected a folder or URI, got {storage_path!r}")

    description = raw.get("description", "")
    if not isinstance(description, str):
        raise StudyError(f"{src}: description: expected text, got {description!r}")

    return StudySpec(
        name=name,
        path=path,
        base_config=base_path,
        base_overrides=tuple(base_overrides),
        config=config,
        methods=methods,
        seeds=tuple(seeds),
        score=score,
        max_concurrent_trials=max_concurrent,
        trial_resources=dict(resources),
        stopping=config.early_stopping,
        asha=asha,
        storage_path=storage_path,
        description=description,
    )


def load_method(
    name_or_path: str | os.PathLike,
    *,
    search_dir: str | os.PathLike | None = None,
    base_config: str | os.PathLike | None = None,
    base_overrides: typing.Sequence[str] = (),
) -> MethodSpace:
    """Read one method-space YAML and check every fixed value and space value against the run config.

    ``name_or_path``: a path to a YAML, or a bare name looked up as ``<search_dir>/<name>.yaml`` and
    then ``SPACES_DIR/<name>.yaml``. Each value is checked by loading ``base_config`` (defaults
    when None) with ``base_overrides`` + the method's fixed overrides + that one value.
    """
    path = _resolve_method(name_or_path, search_dir)
    src = str(path)
    raw = _read_yaml(path)
    _check_keys(raw, _METHOD_KEYS, src, "")
    name = raw.get("method")
    if not isinstance(name, str) or not name:
        raise StudyError(f"{src}: method: expected the method's name, got {name!r}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise StudyError(f"{src}: description: expected text, got {description!r}")
    num_samples = raw.get("num_samples", 1)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise StudyError(f"{src}: num_samples: expected an integer >= 1, got {num_samples!r}")

    fixed = _flat_mapping(raw.get("fixed") or {}, src, "fixed")
    if SEED_KEY in fixed or SEED_KEY in (raw.get("space") or {}):
        raise StudyError(f"{src}: {SEED_KEY}: seeds belong to the study (its `seeds` list), not to a method")
    fixed_overrides = [_override(k, v) for k, v in fixed.items()]
    _check_config(base_config, [*base_overrides, *fixed_overrides], f"{src}: fixed")

    space_raw = raw.get("space") or {}
    if not isinstance(space_raw, dict):
        raise StudyError(f"{src}: space: expected a mapping of dotted config keys to specs, got {space_raw!r}")
    space = {}
    for key, spec in space_raw.items():
        if key in fixed:
            raise StudyError(f"{src}: space.{key}: also set in fixed; a key is either fixed or searched")
        space[key] = _parse_dimension(spec, f"{src}: space.{key}")
        _check_dimension(key, space[key], base_config, [*base_overrides, *fixed_overrides], f"{src}: space.{key}")
    return MethodSpace(
        name=name, path=path, fixed=fixed, space=space, num_samples=num_samples, description=description
    )


# ---------------------------------------------------------------------------------------------
# Trials


def expand_grid(method: MethodSpace) -> list[dict]:
    """Every cell of a pure-grid space: the cartesian product in file order, last key fastest.

    An empty space has one cell, ``{}``. Raises StudyError when a dimension is not a grid.
    """
    if not method.is_grid:
        random_keys = [k for k, d in method.space.items() if d.kind != "grid"]
        raise StudyError(
            f"method {method.name}: {', '.join(random_keys)} {'is' if len(random_keys) == 1 else 'are'} sampled, "
            "not a grid; only a pure-grid space can be listed in advance"
        )
    keys = list(method.space)
    return [dict(zip(keys, values)) for values in itertools.product(*(method.space[k].values for k in keys))]


def count_trials(study: StudySpec) -> int:
    """Trials the study runs: per method, grid cells × num_samples × seeds, summed."""
    total = 0
    for method in study.methods:
        cells = math.prod(len(d.values) for d in method.space.values() if d.kind == "grid")
        total += cells * method.num_samples * len(study.seeds)
    return total


def trial_overrides(study: StudySpec, method: MethodSpace, params: dict) -> list[str]:
    """Dotted key=value list that turns the base config into this trial's config (for load_config).

    Order: the study's base overrides, the method's fixed overrides, then ``params`` — one point of
    the method's space as Tune hands it to the trainable (flat dotted keys, or nested dicts), with
    ``train.seed`` when the space came from ``to_tune_space(method, seeds=...)``. Every space key
    must be present and no other key is allowed, so a sweep that drops or invents a dimension fails
    here with the key named.
    """
    point = flatten(params)
    missing = [k for k in method.space if k not in point]
    unknown = [k for k in point if k not in method.space and k != SEED_KEY]
    if missing:
        raise StudyError(f"method {method.name}: trial params lack {', '.join(missing)} (got {sorted(point)})")
    if unknown:
        raise StudyError(
            f"method {method.name}: trial params have {', '.join(unknown)}, which is not in the method's space "
            f"({', '.join(method.space) or 'empty'}) nor {SEED_KEY}"
        )
    return [
        *study.base_overrides,
        *(_override(k, v) for k, v in method.fixed.items()),
        *(_override(k, v) for k, v in point.items()),
    ]


def to_tune_space(method: MethodSpace, seeds: typing.Sequence[int] = ()) -> dict:
    """The method's space as a Ray Tune param_space: flat dotted keys -> Tune domains.

    grid -> tune.grid_search, choice -> tune.choice, uniform -> tune.uniform,
    loguniform -> tune.loguniform. With ``seeds``, ``train.seed`` becomes one more grid dimension.
    """
    from ray import tune

    make = {
        "grid": lambda v: tune.grid_search(list(v)),
        "choice": lambda v: tune.choice(list(v)),
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
    }
    space = {key: make[d.kind](d.values) for key, d in method.space.items()}
    if seeds:
        space[SEED_KEY] = tune.grid_search(list(seeds))
    return space


# ---------------------------------------------------------------------------------------------
# Helpers


def format_value(value: Any) -> str:
    """A value as YAML text that ``apply_overrides`` reads back as the same value (3e-07 -> 3.0e-07)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        pass
    elif isinstance(value, numbers.Integral):
        value = int(value)
    elif isinstance(value, numbers.Real):
        value = float(value)  # numpy floats from Tune's samplers
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _load_methods(
    methods_raw: Any, path: Path, base_path: Path, base_overrides: typing.Sequence[str]
) -> tuple[MethodSpace, ...]:
    """The study's `methods` list: names, paths, or {method, space} entries that narrow a space."""
    if not isinstance(methods_raw, list) or not methods_raw:
        raise StudyError(f"{path}: methods: expected a non-empty list of method names or paths")
    methods = []
    for i, item in enumerate(methods_raw):
        where = f"{path}: methods[{i}]"
        space_overrides: dict = {}
        if isinstance(item, dict):
            _check_keys(item, ("method", "space"), str(path), f"methods[{i}].")
            if "method" not in item:
                raise StudyError(f"{where}: a mapping entry needs `method: <name or path>`")
            space_overrides = item.get("space") or {}
            item = item["method"]
        if not isinstance(item, str) or not item:
            raise StudyError(f"{where}: expected a method name, a path, or {{method: ..., space: ...}}; got {item!r}")
        try:
            method = load_method(item, search_dir=path.parent, base_config=base_path, base_overrides=base_overrides)
        except StudyError as e:
            raise StudyError(f"{where}: {e}") from None
        if space_overrides:
            method = _override_space(method, space_overrides, f"{where}.space", base_path, base_overrides)
        methods.append(method)
    names = [m.name for m in methods]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise StudyError(f"{path}: methods: {duplicates[0]} appears more than once")
    return tuple(methods)


def _override(key: str, value: Any) -> str:
    return f"{key}={format_value(value)}"


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise StudyError(f"{path}: cannot read: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise StudyError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    return raw


def _check_keys(raw: dict, allowed: typing.Sequence[str], src: str, prefix: str) -> None:
    unknown = [k for k in raw if k not in allowed]
    if unknown:
        raise StudyError(f"{src}: unknown key {prefix}{unknown[0]}; valid keys here: {', '.join(sorted(allowed))}")


def _apply_study_overrides(raw: dict, overrides: typing.Sequence[str], src: str) -> tuple[dict, list[str]]:
    """Split overrides into study edits and run-config overrides (see load_study)."""
    config_overrides: list[str] = []
    study_overrides: list[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        head, _, rest = key.strip().partition(".")
        if not sep or not head:
            raise StudyError(f"override {item!r}: expected key=value, e.g. train.max_steps=10 or score.epsilon=0.1")
        if head == "base_overrides" and rest:
            config_overrides.append(f"{rest}={value}")
        elif head in _CONFIG_SECTIONS:
            config_overrides.append(item)
        elif head in _STUDY_KEYS:
            study_overrides.append(item)
        else:
            raise StudyError(
                f"override {item!r}: {head} is neither a study key ({', '.join(_STUDY_KEYS)}) "
                f"nor a run-config section ({', '.join(_CONFIG_SECTIONS)})"
            )
    try:
        raw = apply_overrides(raw, study_overrides)
    except ConfigError as e:
        raise StudyError(f"{src}: {e}") from None
    return raw, config_overrides


def _parse_score(raw: Any, src: str) -> ScoreSpec:
    if not isinstance(raw, dict) or "metric" not in raw:
        raise StudyError(
            f"{src}: score: expected {{metric: <reported metric>, mode: max|min, epsilon: <number>}}, got {raw!r}"
        )
    _check_keys(raw, ("metric", "mode", "epsilon"), src, "score.")
    metric, mode, epsilon = raw["metric"], raw.get("mode", "max"), raw.get("epsilon", 0.05)
    if not isinstance(metric, str) or not metric:
        raise StudyError(f"{src}: score.metric: expected a metric name, got {metric!r}")
    if mode not in ("max", "min"):
        raise StudyError(f"{src}: score.mode: expected max or min, got {mode!r}")
    if not _is_number(epsilon) or epsilon < 0:
        raise StudyError(f"{src}: score.epsilon: expected a number >= 0, got {epsilon!r}")
    return ScoreSpec(metric, mode, float(epsilon))


def _flat_mapping(raw: Any, src: str, key: str) -> dict:
    """A mapping of dotted keys (nested mappings are flattened, so {loss: {beta: 1}} is loss.beta)."""
    if not isinstance(raw, dict):
        raise StudyError(f"{src}: {key}: expected a mapping of dotted config keys to values, got {raw!r}")
    return {k: _number(v) for k, v in flatten(raw).items()}


_EXPONENT_ONLY = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _number(value: Any) -> Any:
    """YAML 1.1 reads 3e-7 (no dot) as text; a grid of learning rates means the number."""
    return float(value) if isinstance(value, str) and _EXPONENT_ONLY.match(value) else value


def _overrides_from_mapping(raw: Any, src: str, key: str) -> list[str]:
    return [_override(k, v) for k, v in _flat_mapping(raw, src, key).items()]


def _check_config(base_config: str | os.PathLike | None, overrides: typing.Sequence[str], where: str) -> None:
    try:
        load_config(base_config, overrides)
    except ConfigError as e:
        raise StudyError(f"{where}: {e}") from None


def _parse_dimension(spec: Any, where: str) -> Dimension:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise StudyError(
            f"{where}: expected one of {{grid: [...]}}, {{choice: [...]}}, {{uniform: [lo, hi]}}, "
            f"{{loguniform: [lo, hi]}}; got {spec!r}"
        )
    (kind, values), = spec.items()
    if kind not in SPACE_KINDS:
        raise StudyError(f"{where}: unknown kind {kind!r}; use one of {', '.join(SPACE_KINDS)}")
    if not isinstance(values, list) or not values:
        raise StudyError(f"{where}: {kind} needs a non-empty list, got {values!r}")
    if kind in ("grid", "choice"):
        values = [_number(v) for v in values]
        if any(values.count(v) > 1 for v in values):
            raise StudyError(f"{where}: {kind} lists a value twice: {values!r}")
        return Dimension(kind, tuple(values))
    values = [_number(v) for v in values]
    if len(values) != 2 or not all(_is_number(v) for v in values) or not values[0] < values[1]:
        raise StudyError(f"{where}: {kind} needs [low, high] numbers with low < high, got {values!r}")
    if kind == "loguniform" and values[0] <= 0:
        raise StudyError(f"{where}: loguniform needs low > 0, got {values!r}")
    return Dimension(kind, (float(values[0]), float(values[1])))


def _check_dimension(key: str, dim: Dimension, base_config, overrides: typing.Sequence[str], where: str) -> None:
    """Every listed value (or both ends of a range) must make a valid run config."""
    for value in dim.values:
        try:
            load_config(base_config, [*overrides, _override(key, value)])
        except ConfigError as e:
            raise StudyError(f"{where}: value {value!r}: {e}") from None


def _override_space(
    method: MethodSpace, raw: Any, where: str, base_config: Path, base_overrides: typing.Sequence[str]
) -> MethodSpace:
    """A study narrows a method's space: listed keys replace the method's, `null` removes one."""
    if not isinstance(raw, dict):
        raise StudyError(f"{where}: expected a mapping of dotted config keys to specs, got {raw!r}")
    space = dict(method.space)
    fixed_overrides = [_override(k, v) for k, v in method.fixed.items()]
    for key, spec in raw.items():
        if key == SEED_KEY:
            raise StudyError(f"{where}.{key}: seeds are set by the study's `seeds` list")
        if key in method.fixed:
            raise StudyError(f"{where}.{key}: fixed by method {method.name} ({method.path}); it cannot be searched")
        if spec is None:
            if key not in space:
                raise StudyError(
                    f"{where}.{key}: null removes a key from the space, but {method.name} does not search it"
                )
            del space[key]
            continue
        space[key] = _parse_dimension(spec, f"{where}.{key}")
        _check_dimension(key, space[key], base_config, [*base_overrides, *fixed_overrides], f"{where}.{key}")
    return MethodSpace(
        name=method.name,
        path=method.path,
        fixed=method.fixed,
        space=space,
        num_samples=method.num_samples,
        description=method.description,
    )


def _resolve_method(name_or_path: str | os.PathLike, search_dir: str | os.PathLike | None) -> Path:
    text = str(name_or_path)
    looks_like_path = text.endswith((".yaml", ".yml")) or "/" in text or os.sep in text
    if looks_like_path:
        path = Path(text)
        candidates = [path] if path.is_absolute() or search_dir is None else [Path(search_dir) / path, path]
    else:
        candidates = [Path(search_dir) / f"{text}.yaml"] if search_dir is not None else []
        candidates.append(SPACES_DIR / f"{text}.yaml")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    shipped = sorted(p.stem for p in SPACES_DIR.glob("*.yaml") if not p.stem.startswith("robustness"))
    raise StudyError(
        f"unknown method {text!r}: no file at {', '.join(str(c) for c in candidates)}; "
        f"shipped methods: {', '.join(shipped)}"
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

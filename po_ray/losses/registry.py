"""The loss registry: a name -> a loss function, whether it needs a reference model, and its knobs.

A loss is ``fn(logps: PairLogps, *, beta: float, knob=default, ...) -> LossOutput``. Its knobs are
the keyword-only parameters with defaults other than ``beta``, read from the signature; the
config's ``loss.options`` may set exactly those. Adding a loss is one decorated function::

    @register_loss("my_loss", needs_reference=False, ranges={"margin": (0.0, math.inf)})
    def my_loss(logps, *, beta, margin=1.0): ...

The module defining it must be imported (on every worker) before the loss is looked up.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from po_ray.losses.core import LossOutput, length_averaged

LossFn = Callable[..., LossOutput]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss."""

    name: str
    """The registry name (what `loss.name` selects)."""
    fn: LossFn
    """``fn(logps, *, beta, **knobs) -> LossOutput``; already length-averaged when ``averaged``."""
    needs_reference: bool
    """Whether ``fn`` reads reference log-probs; if no sub-loss does, the trainer loads no reference."""
    knobs: dict[str, Any] = field(default_factory=dict)
    """Knob name -> default, from the keyword-only parameters of ``fn`` (beta excluded)."""
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Knob name -> (lo, hi): valid values are lo <= value < hi (lo inclusive, hi exclusive)."""
    averaged: bool = False
    """``fn`` applies the length-averaging operator itself (ln_dpo, ipo), so `loss.averaged` adds nothing."""


_REGISTRY: dict[str, LossSpec] = {}


def register_loss(
    name: str,
    *,
    needs_reference: bool = True,
    ranges: dict[str, tuple[float, float]] | None = None,
    averaged: bool = False,
) -> Callable[[LossFn], LossFn]:
    """Decorator registering ``fn`` under ``name``; returns ``fn`` unchanged.

    ``ranges`` maps a knob to ``(lo, hi)`` with lo inclusive and hi exclusive (``math.inf`` for no
    bound); ``build_loss`` rejects option values outside it. ``averaged=True`` registers the loss in
    its length-averaged form (``ln_dpo`` is ``dpo`` registered this way).
    """

    def decorator(fn: LossFn) -> LossFn:
        spec = LossSpec(
            name=name,
            fn=length_averaged(fn) if averaged else fn,
            needs_reference=needs_reference,
            knobs=_knobs_of(name, fn),
            ranges=dict(ranges or {}),
            averaged=averaged,
        )
        _check_ranges(spec)
        existing = _REGISTRY.get(name)
        # Re-importing the defining module (a notebook reload, a worker re-import) re-registers the
        # same function; a different function under a taken name is a mistake.
        if existing is not None and _origin(existing.fn) != _origin(fn):
            raise ValueError(
                f"register_loss: {name!r} is already registered by {'.'.join(_origin(existing.fn))}; pick another name"
            )
        _REGISTRY[name] = spec
        return fn

    return decorator


def get_loss(name: str) -> LossSpec:
    """The registered loss called ``name``; ValueError naming `loss.name` if there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"loss.name: unknown loss {name!r}; registered: {', '.join(available_losses())} "
            "(a loss from your own module is registered when that module is imported)"
        ) from None


def available_losses() -> list[str]:
    """Names of all registered losses, sorted."""
    return sorted(_REGISTRY)


def check_option(spec: LossSpec, key: str, value: Any) -> Any:
    """``value`` for knob ``key`` of ``spec``, type- and range-checked (ints become floats for float knobs)."""
    default = spec.knobs[key]
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"loss.options.{key}: must be true or false, got {value!r}")
        return value
    if isinstance(default, numbers.Real):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"loss.options.{key}: must be a finite number, got {value!r}")
        if isinstance(default, float):
            value = float(value)
    if key in spec.ranges:
        lo, hi = spec.ranges[key]
        if not lo <= value < hi:
            raise ValueError(f"loss.options.{key}: {_describe_range(lo, hi)}, got {value!r}")
    return value


def _describe_range(lo: float, hi: float) -> str:
    if hi == math.inf:
        return f"must be >= {lo:g}"
    if lo == -math.inf:
        return f"must be < {hi:g}"
    return f"must be in [{lo:g}, {hi:g})"


def _knobs_of(name: str, fn: LossFn) -> dict[str, Any]:
    """Knob name -> default from ``fn``'s signature, which must be ``fn(logps, *, beta, knob=default, ...)``."""
    params = list(inspect.signature(fn).parameters.values())

    def bad(why: str) -> TypeError:
        return TypeError(
            f"register_loss({name!r}): {fn.__qualname__} must look like fn(logps, *, beta, knob=default, ...): {why}"
        )

    if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        raise bad("the first parameter must be the positional PairLogps")
    knobs = {}
    for p in params[1:]:
        if p.kind is not p.KEYWORD_ONLY:
            raise bad(f"parameter {p.name!r} must be keyword-only (after '*')")
        if p.name == "beta":
            continue
        if p.default is p.empty:
            raise bad(f"knob {p.name!r} needs a default")
        knobs[p.name] = p.default
    if "beta" not in {p.name for p in params}:
        raise bad("it takes no keyword-only 'beta'")
    return knobs


def _check_ranges(spec: LossSpec) -> None:
    for key, bounds in spec.ranges.items():
        if key not in spec.knobs:
            knobs = ", ".join(spec.knobs) or "none"
            raise ValueError(f"register_loss({spec.name!r}): ranges names {key!r}, which is not a knob; knobs: {knobs}")
        lo, hi = bounds
        if not lo <= spec.knobs[key] < hi:
            raise ValueError(
                f"register_loss({spec.name!r}): the default {key}={spec.knobs[key]!r} "
                f"is outside its range [{lo:g}, {hi:g})"
            )


def _origin(fn: LossFn) -> tuple[str, str]:
    fn = inspect.unwrap(fn)
    return fn.__module__, fn.__qualname__


def import_loss_plugins(cfg) -> None:
    """Import the modules named in ``cfg.loss.plugins`` so their ``@register_loss`` calls run."""
    import importlib

    for module in cfg.loss.plugins:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"loss.plugins: cannot import {module!r}: {e}; is it installed on every node?") from None

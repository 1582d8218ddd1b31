"""From the `loss` config to one callable: sub-losses, weights, knobs, length averaging, NLL term."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from po_ray.losses.core import LossOutput, PairLogps, average_per_token, chosen_nll
from po_ray.losses.registry import LossSpec, check_option, get_loss


@dataclass(frozen=True)
class LossPart:
    """One registered loss inside a (weighted) sum, with its β and knob values bound."""

    spec: LossSpec
    weight: float
    kwargs: dict[str, Any]
    """beta and the knobs this loss declares."""
    averaged: bool
    """Apply the length-averaging operator first (`loss.averaged` on a loss not averaged already)."""

    def __call__(self, logps: PairLogps) -> LossOutput:
        return self.spec.fn(average_per_token(logps) if self.averaged else logps, **self.kwargs)


@dataclass(frozen=True)
class BuiltLoss:
    """The run's loss: Σ_i weight_i · loss_i + nll_alpha · NLL(y_w), per pair."""

    name: str
    parts: tuple[LossPart, ...]
    nll_alpha: float = 0.0

    @property
    def needs_reference(self) -> bool:
        return any(part.spec.needs_reference for part in self.parts)

    def __call__(self, logps: PairLogps) -> LossOutput:
        """``PairLogps`` of ``(batch,)`` tensors -> per-pair ``LossOutput`` (losses ``(batch,)``).

        Rewards are the first sub-loss's. With several sub-losses, ``terms`` holds each one's
        detached per-pair loss as ``loss_<name>`` next to their own terms.
        """
        if self.needs_reference and not logps.has_reference:
            raise ValueError(
                f"loss {self.name!r} needs reference log-probs but PairLogps.ref_chosen/ref_rejected are None; "
                "use reference.strategy sharded or precomputed"
            )
        outputs = [part(logps) for part in self.parts]
        losses: Tensor = sum((part.weight * out.losses for part, out in zip(self.parts, outputs)), start=0.0)
        terms: dict[str, Tensor] = {}
        if len(self.parts) > 1:
            terms.update({f"loss_{part.spec.name}": out.losses.detach() for part, out in zip(self.parts, outputs)})
        for out in outputs:
            terms.update(out.terms)
        if self.nll_alpha > 0:
            # RPO (Pang et al. 2024, arXiv 2404.19733): α·NLL of the chosen completion keeps its
            # likelihood from falling; Shi et al. 2024 (arXiv 2410.11677) use it against over-optimisation.
            nll = chosen_nll(logps)
            losses = losses + self.nll_alpha * nll
            terms["nll"] = nll.detach()
        return LossOutput(losses, outputs[0].chosen_rewards, outputs[0].rejected_rewards, terms)


def build_loss(loss_cfg: Any) -> BuiltLoss:
    """The loss a `loss` config (``po_ray.config.LossConfig`` or anything with its fields) describes.

    ``name`` may be ``"a+b+c"``: a sum weighted by ``weights`` (all 1 when empty). ``options`` are
    shared: each sub-loss takes the knobs it declares, and an option no sub-loss declares is an
    error. ``averaged`` length-averages the reference-based sub-losses not averaged already.
    Raises ValueError naming the offending key.
    """
    specs = _specs(loss_cfg.name)
    weights = _weights(loss_cfg.name, loss_cfg.weights, len(specs))
    knobs = _knob_values(specs, dict(loss_cfg.options))
    averaged = _averaged_flags(loss_cfg.name, specs) if loss_cfg.averaged else [False] * len(specs)
    parts = tuple(
        LossPart(spec, weight, {"beta": float(loss_cfg.beta), **knobs[spec.name]}, avg)
        for spec, weight, avg in zip(specs, weights, averaged)
    )
    return BuiltLoss(loss_cfg.name, parts, float(loss_cfg.nll_alpha))


def loss_needs_reference(loss_cfg: Any) -> bool:
    """True if any loss named in ``loss_cfg.name`` reads reference log-probs."""
    return any(spec.needs_reference for spec in _specs(loss_cfg.name))


def _specs(name: str) -> list[LossSpec]:
    names = name.split("+")
    if not all(names):
        raise ValueError(f"loss.name: empty loss name in {name!r}; write e.g. dpo or dpo+sft")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"loss.name: {repeated[0]!r} appears twice in {name!r}; give it one weight in loss.weights")
    return [get_loss(n) for n in names]


def _weights(name: str, weights: tuple, count: int) -> list[float]:
    if not weights:
        return [1.0] * count
    if len(weights) != count:
        raise ValueError(
            f"loss.weights: {len(weights)} weights for {count} losses in {name!r}; give one per loss, in order"
        )
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"loss.weights: every weight must be a finite number, got {w!r}")
    return [float(w) for w in weights]


def _knob_values(specs: list[LossSpec], options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Loss name -> {knob: checked value} for the options each loss declares."""
    values: dict[str, dict[str, Any]] = {spec.name: {} for spec in specs}
    for key, value in options.items():
        takers = [spec for spec in specs if key in spec.knobs]
        if not takers:
            names = "+".join(s.name for s in specs)
            raise ValueError(f"loss.options.{key}: not a knob of {names}; {_knob_list(specs)}")
        for spec in takers:
            values[spec.name][key] = check_option(spec, key, value)
    return values


def _knob_list(specs: list[LossSpec]) -> str:
    if len(specs) == 1:
        return f"its knobs: {', '.join(specs[0].knobs) or 'none'}"
    return "knobs: " + "; ".join(f"{s.name}: {', '.join(s.knobs) or 'none'}" for s in specs)


def _averaged_flags(name: str, specs: list[LossSpec]) -> list[bool]:
    """Which sub-losses `loss.averaged` length-averages: reference-based ones not averaged already."""
    flags = [spec.needs_reference and not spec.averaged for spec in specs]
    if not any(flags):
        why = "; ".join(f"{s.name} is {'averaged already' if s.averaged else 'reference-free'}" for s in specs)
        raise ValueError(
            f"loss.averaged: no loss in {name!r} has an averaged form to switch to ({why}); set loss.averaged=false"
        )
    return flags

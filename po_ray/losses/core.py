"""What every loss takes and returns, and the operators losses are built from (torch only).

Notation (docs/ALGORITHMS): ρ(y) = logp_θ(y) − logp_ref(y); margin h = ρ(y_w) − ρ(y_l); the averaged
margin ĥ uses ρ(y)/|y| instead. y_w is the chosen completion, y_l the rejected one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch.nn.functional as F
from torch import Tensor

_PER_PAIR_FIELDS = ("rejected", "ref_chosen", "ref_rejected", "chosen_tokens", "rejected_tokens")


@dataclass(frozen=True)
class PairLogps:
    """Log-probs of a batch of preference pairs, one value per pair: every field is ``(batch,)``.

    ``chosen``/``rejected`` are the policy's log-probs summed over completion tokens (prompt masked),
    ``ref_chosen``/``ref_rejected`` the reference model's (None when no reference was loaded), and
    ``chosen_tokens``/``rejected_tokens`` the completion lengths |y| in tokens.
    """

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor | None
    ref_rejected: Tensor | None
    chosen_tokens: Tensor
    rejected_tokens: Tensor

    def __post_init__(self) -> None:
        if self.chosen.dim() != 1:
            raise ValueError(f"PairLogps.chosen: expected shape (batch,), got {tuple(self.chosen.shape)}")
        for name in _PER_PAIR_FIELDS:
            value = getattr(self, name)
            if value is not None and value.shape != self.chosen.shape:
                raise ValueError(
                    f"PairLogps.{name}: shape {tuple(value.shape)} differs from chosen {tuple(self.chosen.shape)}; "
                    "every field holds one value per pair"
                )
        if (self.ref_chosen is None) != (self.ref_rejected is None):
            raise ValueError("PairLogps: give both ref_chosen and ref_rejected, or neither")

    @property
    def has_reference(self) -> bool:
        return self.ref_chosen is not None


@dataclass(frozen=True)
class LossOutput:
    """Per-pair result of a loss: every tensor is ``(batch,)``; only ``losses`` carries gradient."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    """Extra detached per-pair quantities for metrics, e.g. {"nll": ..., "log_odds_ratio": ...}."""


def per_token(logps: Tensor, tokens: Tensor) -> Tensor:
    """Mean log-prob per completion token: ``(batch,), (batch,) -> (batch,)``.

    An empty completion counts as one token (as TRL does) so the division never yields inf/NaN.
    """
    return logps / tokens.clamp(min=1).to(logps.dtype)


def average_per_token(logps: PairLogps) -> PairLogps:
    """The length-averaging operator: every log-prob divided by its completion length, so h becomes ĥ.

    Grinsztajn et al. 2024 (arXiv 2406.19188): sequence log-likelihoods are not length-invariant and
    averaging them per token inside the loss fixes that. Token counts are kept, because
    length-regularised losses (rdpo) still need the lengths themselves.
    """
    ref_chosen = ref_rejected = None
    if logps.has_reference:
        ref_chosen = per_token(logps.ref_chosen, logps.chosen_tokens)
        ref_rejected = per_token(logps.ref_rejected, logps.rejected_tokens)
    return replace(
        logps,
        chosen=per_token(logps.chosen, logps.chosen_tokens),
        rejected=per_token(logps.rejected, logps.rejected_tokens),
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
    )


def length_averaged(fn: Callable[..., LossOutput]) -> Callable[..., LossOutput]:
    """``fn`` applied to ``average_per_token(logps)``; same signature (so the same knobs)."""

    @functools.wraps(fn)
    def averaged(logps: PairLogps, **kwargs) -> LossOutput:
        return fn(average_per_token(logps), **kwargs)

    return averaged


def log_ratios(logps: PairLogps) -> tuple[Tensor, Tensor]:
    """ρ(y_w), ρ(y_l): policy minus reference log-probs, ``PairLogps -> ((batch,), (batch,))``."""
    if not logps.has_reference:
        raise ValueError(
            "this loss needs reference log-probs but PairLogps.ref_chosen/ref_rejected are None; "
            "use reference.strategy sharded or precomputed"
        )
    return logps.chosen - logps.ref_chosen, logps.rejected - logps.ref_rejected


def chosen_nll(logps: PairLogps) -> Tensor:
    """NLL of the chosen completion, mean over its tokens: ``PairLogps -> (batch,)``."""
    return -per_token(logps.chosen, logps.chosen_tokens)


def smoothed_logistic(z: Tensor, label_smoothing: float) -> Tensor:
    """−(1−ε) log σ(z) − ε log σ(−z), ``(batch,) -> (batch,)``: logistic loss, labels flipped w.p. ε.

    logsigmoid (not log(sigmoid)) keeps it exact and finite for any finite z, e.g. |z| = 1e4.
    """
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def reference_output(
    losses: Tensor, beta: float, chosen_ratio: Tensor, rejected_ratio: Tensor, **terms: Tensor
) -> LossOutput:
    """Output of a reference-based loss: rewards are the implicit rewards β·ρ (detached)."""
    return LossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_ratio).detach(),
        rejected_rewards=(beta * rejected_ratio).detach(),
        terms={k: v.detach() for k, v in terms.items()},
    )


def reference_free_output(losses: Tensor, beta: float, logps: PairLogps, **terms: Tensor) -> LossOutput:
    """Output of a reference-free loss: rewards are β·(mean log-prob per token), as SimPO and ORPO report."""
    return LossOutput(
        losses=losses,
        chosen_rewards=(beta * per_token(logps.chosen, logps.chosen_tokens)).detach(),
        rejected_rewards=(beta * per_token(logps.rejected, logps.rejected_tokens)).detach(),
        terms={k: v.detach() for k, v in terms.items()},
    )

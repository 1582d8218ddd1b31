"""Step metrics as (sum, count) pairs that reduce exactly across micro-batches and ranks (torch only).

Each metric is kept as its sum and the count it is a mean over: pairs for per-pair quantities,
completion tokens for per-token ones. Summing both over ranks and dividing once gives the true
pair- or token-weighted mean; a mean of per-rank means would weight a rank holding 10 tokens as
much as one holding 1000.

Usage: ``names, packed = pack(step_metrics(...))``; all-reduce ``packed`` (one tensor) with SUM;
``finalize(names, packed)``.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

TOTALS = frozenset({"tokens"})
"""Metrics reported as their sum over everything reduced, not as a mean."""

_SIGNALS = (("entropy", "entropy_sum"), ("topk_entropy", "topk_entropy_sum"), ("topk_mass", "topk_mass_sum"))


class CompletionStats(Protocol):
    """One side (chosen or rejected) of ``po_ray.model.LogpOutput``: every field ``(B,)``."""

    logps: Tensor
    tokens: Tensor
    entropy_sum: Tensor
    topk_entropy_sum: Tensor
    topk_mass_sum: Tensor


def step_metrics(
    *,
    loss_out,
    chosen: CompletionStats,
    rejected: CompletionStats,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Metrics of one micro-batch of B pairs: name -> (sum, count), both 0-d fp64 tensors.

    ``loss_out`` is a ``po_ray.losses.LossOutput`` (``losses``, ``chosen_rewards``,
    ``rejected_rewards`` of shape (B,), and ``terms``: name -> (B,) tensor, or a 0-d mean over the
    pairs). ``ref_*_logps`` are (B,) or None for reference-free runs.
    """
    n_pairs = chosen.logps.shape[0]
    device = chosen.logps.device
    pairs = torch.tensor(float(n_pairs), dtype=torch.float64, device=device)

    def pair_mean(values: Tensor) -> tuple[Tensor, Tensor]:
        return _total(values), pairs

    chosen_rewards, rejected_rewards = loss_out.chosen_rewards.detach(), loss_out.rejected_rewards.detach()
    metrics = {
        "loss": pair_mean(loss_out.losses),
        "rewards/chosen": pair_mean(chosen_rewards),
        "rewards/rejected": pair_mean(rejected_rewards),
        "rewards/margins": pair_mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": pair_mean((chosen_rewards > rejected_rewards).float()),
        "logps/chosen": pair_mean(chosen.logps),
        "logps/rejected": pair_mean(rejected.logps),
        "lengths/chosen": pair_mean(chosen.tokens),
        "lengths/rejected": pair_mean(rejected.tokens),
    }

    tokens = {"chosen": _total(chosen.tokens), "rejected": _total(rejected.tokens)}
    tokens["all"] = tokens["chosen"] + tokens["rejected"]
    metrics["tokens"] = (tokens["all"], pairs)

    def token_mean(name: str, chosen_sum: Tensor, rejected_sum: Tensor) -> None:
        metrics[name] = (chosen_sum + rejected_sum, tokens["all"])
        metrics[f"{name}/chosen"] = (chosen_sum, tokens["chosen"])
        metrics[f"{name}/rejected"] = (rejected_sum, tokens["rejected"])

    for name, field in _SIGNALS:
        token_mean(name, _total(getattr(chosen, field)), _total(getattr(rejected, field)))
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("step_metrics: give both ref_chosen_logps and ref_rejected_logps, or neither")
    if ref_chosen_logps is not None:
        # Policy − reference log-ratio per completion token: a teacher-forced view of the drift from
        # the reference (the KL to it, estimated on the preference data rather than on samples).
        token_mean(
            "logratio_per_token",
            _total(chosen.logps - ref_chosen_logps),
            _total(rejected.logps - ref_rejected_logps),
        )

    for term, values in loss_out.terms.items():
        values = values.detach()
        if values.dim() == 0:  # already a mean over the pairs
            values = values.expand(n_pairs)
        if values.shape != (n_pairs,):
            raise ValueError(
                f"step_metrics: loss term {term!r} has shape {tuple(values.shape)}; expected ({n_pairs},) per pair"
            )
        metrics[f"loss/{term}"] = pair_mean(values)
    return metrics


def _total(values: Tensor) -> Tensor:
    """Detached fp64 sum: counts of millions of tokens stay exact, unlike in fp32."""
    return values.detach().to(torch.float64).sum()


def pack(metrics: dict[str, tuple[Tensor, Tensor]]) -> tuple[list[str], Tensor]:
    """name -> (sum, count) to sorted names and one ``(2, M)`` fp64 tensor (row 0 sums, row 1 counts).

    One tensor means one all-reduce per step; sorting makes the column order the same on every rank.
    """
    names = sorted(metrics)
    if not names:
        raise ValueError("pack: no metrics to pack")
    device = torch.as_tensor(metrics[names[0]][0]).device
    columns = [
        torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in metrics[name]])
        for name in names
    ]
    return names, torch.stack(columns, dim=1)


def finalize(names: list[str], packed: Tensor) -> dict[str, float]:
    """``(2, M)`` reduced sums and counts -> name: mean (sum for ``TOTALS``); NaN where the count is 0."""
    if packed.shape != (2, len(names)):
        raise ValueError(f"finalize: packed has shape {tuple(packed.shape)}, expected (2, {len(names)})")
    sums, counts = packed.detach().to("cpu", torch.float64).tolist()
    return {
        name: s if name in TOTALS else (s / c if c else float("nan"))
        for name, s, c in zip(names, sums, counts)
    }

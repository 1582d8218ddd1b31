"""Reference-based losses that score each response's implicit reward r = β·ρ(y) on its own.

Unlike the margin losses they pin absolute likelihood levels (e.g. keep r(y_w) > 0), not only
the gap. Each is ``(PairLogps, β) -> LossOutput`` with per-pair losses ``(batch,)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from po_ray.losses.core import LossOutput, PairLogps, log_ratios, reference_output
from po_ray.losses.registry import register_loss


def rewards(logps: PairLogps, beta: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """β·ρ(y_w), β·ρ(y_l), ρ(y_w), ρ(y_l): ``PairLogps -> 4 × (batch,)``."""
    chosen_ratio, rejected_ratio = log_ratios(logps)
    return beta * chosen_ratio, beta * rejected_ratio, chosen_ratio, rejected_ratio


@register_loss("nca_pair")
def nca_pair(logps: PairLogps, *, beta: float) -> LossOutput:
    """NCA (pairwise): −log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l)."""
    # Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards"
    # (arXiv 2402.05369), NCA for K = 2 responses: raises r_w absolutely, which stops the chosen
    # likelihood from falling as it can under DPO.
    r_w, r_l, chosen_ratio, rejected_ratio = rewards(logps, beta)
    losses = -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
    return reference_output(losses, beta, chosen_ratio, rejected_ratio)


@register_loss("bco_pair")
def bco_pair(logps: PairLogps, *, beta: float) -> LossOutput:
    """BCO (pairwise): −log σ(r_w) − log σ(−r_l)."""
    # Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment"
    # (arXiv 2404.04656): chosen and rejected classified separately by the implicit reward. As in
    # TRL's bco_pair, without the paper's running reward shift δ.
    r_w, r_l, chosen_ratio, rejected_ratio = rewards(logps, beta)
    losses = -F.logsigmoid(r_w) - F.logsigmoid(-r_l)
    return reference_output(losses, beta, chosen_ratio, rejected_ratio)


@register_loss("sppo_hard")
def sppo_hard(logps: PairLogps, *, beta: float) -> LossOutput:
    """SPPO (hard labels): (ρ_w − 1/(2β))² + (ρ_l + 1/(2β))²."""
    # Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment"
    # (arXiv 2405.00675), Eq. 4.7 of Algorithm 1 with η = 1/β and the win probabilities set to
    # 1 for y_w and 0 for y_l (the soft version needs a preference model outside the loss).
    _, _, chosen_ratio, rejected_ratio = rewards(logps, beta)
    losses = (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
    return reference_output(losses, beta, chosen_ratio, rejected_ratio)


@register_loss("apo_zero")
def apo_zero(logps: PairLogps, *, beta: float) -> LossOutput:
    """APO-zero: (1 − σ(r_w)) + σ(r_l)."""
    # D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions"
    # (arXiv 2408.06266), Eq. 7: for chosen answers better than the model's own, raise r_w and
    # lower r_l. 1 − σ(x) is written σ(−x), exact for large x.
    r_w, r_l, chosen_ratio, rejected_ratio = rewards(logps, beta)
    losses = torch.sigmoid(-r_w) + torch.sigmoid(r_l)
    return reference_output(losses, beta, chosen_ratio, rejected_ratio)


@register_loss("apo_down")
def apo_down(logps: PairLogps, *, beta: float) -> LossOutput:
    """APO-down: σ(r_w) + (1 − σ(r_w − r_l))."""
    # D'Oosterlinck et al. 2024 (arXiv 2408.06266), Eq. 8: for chosen answers worse than the
    # model's own, lower r_w and lower r_l further.
    r_w, r_l, chosen_ratio, rejected_ratio = rewards(logps, beta)
    losses = torch.sigmoid(r_w) + torch.sigmoid(-(r_w - r_l))
    return reference_output(losses, beta, chosen_ratio, rejected_ratio)

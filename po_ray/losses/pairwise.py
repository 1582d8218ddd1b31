"""Reference-based losses of the pair margin h = ρ(y_w) − ρ(y_l) (DPO and its relatives).

Each is ``(PairLogps, β, knobs) -> LossOutput`` with per-pair losses ``(batch,)`` and rewards β·ρ.
Losses are written with logsigmoid/softplus-style identities so |β·h| = 1e4 stays finite.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from po_ray.losses.core import LossOutput, PairLogps, log_ratios, reference_output, smoothed_logistic
from po_ray.losses.registry import register_loss

# Label-flip probability ε: at 0.5 the labels carry no information (and robust divides by 1 − 2ε).
_FLIP_PROBABILITY = (0.0, 0.5)


def scaled_margins(logps: PairLogps, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """β·h, ρ(y_w), ρ(y_l): ``PairLogps -> 3 × (batch,)``."""
    chosen_ratio, rejected_ratio = log_ratios(logps)
    return beta * (chosen_ratio - rejected_ratio), chosen_ratio, rejected_ratio


@register_loss("dpo")
def dpo(logps: PairLogps, *, beta: float) -> LossOutput:
    """DPO (sigmoid): −log σ(β h)."""
    # Rafailov et al. 2023, "Direct Preference Optimization" (arXiv 2305.18290), Eq. 7.
    z, chosen_ratio, rejected_ratio = scaled_margins(logps, beta)
    return reference_output(-F.logsigmoid(z), beta, chosen_ratio, rejected_ratio)


# LN-DPO = DPO on per-token averaged log-ratios, −log σ(β ĥ) (Ahrabian et al. 2024, arXiv 2407.15229;
# Grinsztajn et al. 2024, arXiv 2406.19188); TRL calls it sigmoid_norm. β is then a per-token scale (≈ 1–10).
register_loss("ln_dpo", averaged=True)(dpo)


@register_loss("ipo", averaged=True)
def ipo(logps: PairLogps, *, beta: float) -> LossOutput:
    """IPO: (ĥ − 1/(2τ))², τ = beta; registered averaged."""
    # Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    # Preferences" (arXiv 2310.12036), Eq. 17, with β playing τ. Registered in averaged form (h -> ĥ):
    # TRL confirmed with the IPO authors that the paper's results use per-token log-ratios, which
    # keeps the squared target comparable across completion lengths.
    chosen_ratio, rejected_ratio = log_ratios(logps)
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    return reference_output(losses, beta, chosen_ratio, rejected_ratio)


@register_loss("hinge")
def hinge(logps: PairLogps, *, beta: float) -> LossOutput:
    """Hinge: max(0, 1 − β h)."""
    # The SLiC calibration loss (Zhao et al. 2023, "SLiC-HF", arXiv 2305.10425, Eq. 1 with margin δ = 1/β)
    # on DPO's implicit reward, as the DPO paper and TRL state it.
    z, chosen_ratio, rejected_ratio = scaled_margins(logps, beta)
    return reference_output(torch.relu(1 - z), beta, chosen_ratio, rejected_ratio)


@register_loss("robust", ranges={"label_smoothing": _FLIP_PROBABILITY})
def robust(logps: PairLogps, *, beta: float, label_smoothing: float = 0.1) -> LossOutput:
    """Robust DPO: (−(1−ε) log σ(βh) + ε log σ(−βh)) / (1−2ε), ε = label_smoothing."""
    # Chowdhury et al. 2024, "Provably Robust DPO" (arXiv 2403.00409): with labels flipped at rate ε,
    # this de-biased loss has the clean DPO loss as its expectation. ε = 0.1 is the paper's typical value.
    z, chosen_ratio, rejected_ratio = scaled_margins(logps, beta)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return reference_output(losses, beta, chosen_ratio, rejected_ratio)


@register_loss("cdpo", ranges={"label_smoothing": _FLIP_PROBABILITY})
def cdpo(logps: PairLogps, *, beta: float, label_smoothing: float = 0.1) -> LossOutput:
    """Conservative DPO: −(1−ε) log σ(βh) − ε log σ(−βh), ε = label_smoothing."""
    # Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO" (cDPO): the DPO
    # loss against soft labels 1 − ε; unlike DPO it has a finite optimum, h* = log((1−ε)/ε)/β.
    z, chosen_ratio, rejected_ratio = scaled_margins(logps, beta)
    return reference_output(smoothed_logistic(z, label_smoothing), beta, chosen_ratio, rejected_ratio)


@register_loss("rdpo", ranges={"alpha": (0.0, math.inf)})
def rdpo(logps: PairLogps, *, beta: float, alpha: float = 0.05) -> LossOutput:
    """Length-regularised DPO: −log σ(β h + α(|y_w| − |y_l|))."""
    # Park et al. 2024, "Disentangling Length from Quality in Direct Preference Optimization"
    # (arXiv 2403.19159): a length penalty α|y| in the RLHF objective puts α(|y_w| − |y_l|) inside
    # the sigmoid, so a pair won by the longer answer pushes the policy less towards length.
    z, chosen_ratio, rejected_ratio = scaled_margins(logps, beta)
    length_gap = (logps.chosen_tokens - logps.rejected_tokens).to(z.dtype)
    return reference_output(-F.logsigmoid(z + alpha * length_gap), beta, chosen_ratio, rejected_ratio)


@register_loss("exo_pair", ranges={"label_smoothing": (1e-6, 0.5)})
def exo_pair(logps: PairLogps, *, beta: float, label_smoothing: float = 1e-3) -> LossOutput:
    """EXO (pairwise): KL([σ(βh), σ(−βh)] ‖ [1−ε, ε]), ε = label_smoothing > 0."""
    # Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment"
    # (arXiv 2402.00856), Eq. 16 with K = 2. ε must be > 0 (log ε); the paper recommends 1e-3.
    # σ·logσ terms: at |z| = 1e4 the vanishing weight multiplies a finite log, so no 0·inf.
    z, chosen_ratio, rejected_ratio = scaled_margins(logps, beta)
    eps = label_smoothing
    losses = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )
    return reference_output(losses, beta, chosen_ratio, rejected_ratio)


@register_loss("discopop", ranges={"tau": (1e-6, 1.0)})
def discopop(logps: PairLogps, *, beta: float, tau: float = 0.05) -> LossOutput:
    """DiscoPOP (log-ratio modulated): (1 − m)(−log σ(βh)) + m·exp(−βh), m = σ(βh/τ)."""
    # Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large Language
    # Models" (arXiv 2406.08414), Eq. 5; τ = 0.05 is the paper's. Written as σ(−z/τ)·softplus(−z) +
    # exp(log σ(z/τ) − z): the naive m·exp(−z) is 0·inf = NaN at z = −1e4. τ < 1 keeps the second
    # term bounded as z -> −∞ (it decays like exp(z(1/τ − 1))).
    z, chosen_ratio, rejected_ratio = scaled_margins(logps, beta)
    losses = torch.sigmoid(-z / tau) * F.softplus(-z) + torch.exp(F.logsigmoid(z / tau) - z)
    return reference_output(losses, beta, chosen_ratio, rejected_ratio)


@register_loss("aot", ranges={"label_smoothing": _FLIP_PROBABILITY})
def aot(logps: PairLogps, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """AOT (paired): cDPO loss on sorted policy margins minus sorted reference margins."""
    # Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport"
    # (arXiv 2406.05882): first-order stochastic dominance of the policy's margin distribution over the
    # reference's, matched by sorting within the batch (the 1-D optimal transport plan). losses[i]
    # belongs to the i-th quantile, not to pair i; only their mean is meaningful, and the sort sees
    # the local micro-batch only.
    chosen_ratio, rejected_ratio = log_ratios(logps)
    policy_margins, _ = torch.sort(logps.chosen - logps.rejected)
    reference_margins, _ = torch.sort(logps.ref_chosen - logps.ref_rejected)
    losses = smoothed_logistic(beta * (policy_margins - reference_margins), label_smoothing)
    return reference_output(losses, beta, chosen_ratio, rejected_ratio)


@register_loss("aot_unpaired", ranges={"label_smoothing": _FLIP_PROBABILITY})
def aot_unpaired(logps: PairLogps, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """AOT (unpaired): cDPO loss on sorted ρ(y_w) minus sorted ρ(y_l)."""
    # Melnyk et al. 2024 (arXiv 2406.05882), the unpaired variant: chosen and rejected log-ratio
    # distributions are compared quantile by quantile (losses[i] is the i-th quantile, see aot).
    chosen_ratio, rejected_ratio = log_ratios(logps)
    chosen_sorted, _ = torch.sort(chosen_ratio)
    rejected_sorted, _ = torch.sort(rejected_ratio)
    losses = smoothed_logistic(beta * (chosen_sorted - rejected_sorted), label_smoothing)
    return reference_output(losses, beta, chosen_ratio, rejected_ratio)

"""Reference-free losses: they read only the policy's log-probs, so no reference model is loaded.

Each reports rewards β·(mean log-prob per token), as SimPO and ORPO do.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from po_ray.losses.core import LossOutput, PairLogps, chosen_nll, per_token, reference_free_output, smoothed_logistic
from po_ray.losses.registry import register_loss


@register_loss(
    "simpo",
    needs_reference=False,
    ranges={"gamma": (0.0, math.inf), "label_smoothing": (0.0, 0.5)},
)
def simpo(logps: PairLogps, *, beta: float, gamma: float = 0.5, label_smoothing: float = 0.0) -> LossOutput:
    """SimPO: −log σ(β(logp(y_w)/|y_w| − logp(y_l)/|y_l|) − γ), γ absolute (not γ/β)."""
    # Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"
    # (arXiv 2405.14734), Eq. 6: the average log-prob is the reward, γ a target margin. γ is the
    # absolute margin as TRL's simpo_gamma (default 0.5); the paper tunes γ/β ∈ [0.1, 0.8] with
    # β = 2–10. label_smoothing > 0 gives TRL's conservative variant (0 is the paper's loss).
    chosen_avg = per_token(logps.chosen, logps.chosen_tokens)
    rejected_avg = per_token(logps.rejected, logps.rejected_tokens)
    losses = smoothed_logistic(beta * (chosen_avg - rejected_avg) - gamma, label_smoothing)
    return reference_free_output(losses, beta, logps)


def log_odds(avg_logps: Tensor) -> Tensor:
    """log(P / (1 − P)) with P = exp(avg_logps): ``(batch,) -> (batch,)``.

    log(1 − P) is log(−expm1(x)) near 0 and log1p(−exp(x)) below −ln 2 (no cancellation in either).
    P rounds to 1 when a model is very sure; clamping x below −eps keeps the odds finite there.
    """
    x = avg_logps.clamp(max=-torch.finfo(avg_logps.dtype).eps)
    log1m_p = torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return x - log1m_p


@register_loss("orpo", needs_reference=False)
def orpo(logps: PairLogps, *, beta: float) -> LossOutput:
    """ORPO: NLL(y_w) − λ log σ(log odds(y_w) − log odds(y_l)), odds from P = exp(logp/|y|), λ = beta."""
    # Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"
    # (arXiv 2403.07691), Eqs. 4, 6 and 7: SFT on the chosen completion plus an odds-ratio penalty. The
    # NLL is the per-pair token mean; TRL takes the token mean over the whole batch (equal when
    # completions are equally long).
    chosen_avg = per_token(logps.chosen, logps.chosen_tokens)
    rejected_avg = per_token(logps.rejected, logps.rejected_tokens)
    log_odds_chosen = log_odds(chosen_avg) - log_odds(rejected_avg)
    log_odds_ratio = F.logsigmoid(log_odds_chosen)
    nll = chosen_nll(logps)
    return reference_free_output(
        nll - beta * log_odds_ratio,
        beta,
        logps,
        nll=nll,
        log_odds_ratio=log_odds_ratio,
        log_odds_chosen=log_odds_chosen,
    )


@register_loss("sft", needs_reference=False)
def sft(logps: PairLogps, *, beta: float) -> LossOutput:
    """SFT: NLL(y_w), mean over the chosen completion's tokens (beta unused)."""
    # The likelihood term of RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization",
    # arXiv 2404.19733) as a loss of its own, for weighted sums such as dpo+sft; TRL's "sft". The
    # loss.nll_alpha setting adds the same term to any loss.
    nll = chosen_nll(logps)
    return reference_free_output(nll, beta, logps, nll=nll)

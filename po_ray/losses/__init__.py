"""Preference-optimisation losses as registered strategies (torch only).

Every loss maps one ``PairLogps`` (per-pair log-probs, ``(batch,)``) to a ``LossOutput`` (per-pair
losses and rewards). ``build_loss(cfg.loss)`` turns the `loss` config into the callable the
training loop uses; ``register_loss`` adds your own. Built-ins live in ``pairwise`` (margin
losses: dpo, ln_dpo, ipo, hinge, robust, cdpo, rdpo, exo_pair, discopop, aot, aot_unpaired),
``per_response`` (nca_pair, bco_pair, sppo_hard, apo_zero, apo_down) and ``reference_free``
(simpo, orpo, sft).
"""

from po_ray.losses import pairwise, per_response, reference_free  # noqa: F401  (register the built-ins)
from po_ray.losses.build import BuiltLoss, build_loss, loss_needs_reference
from po_ray.losses.core import (
    LossOutput,
    PairLogps,
    average_per_token,
    chosen_nll,
    length_averaged,
    log_ratios,
    per_token,
    reference_free_output,
    reference_output,
    smoothed_logistic,
)
from po_ray.losses.registry import LossSpec, available_losses, get_loss, register_loss

__all__ = [
    "BuiltLoss",
    "LossOutput",
    "LossSpec",
    "PairLogps",
    "available_losses",
    "average_per_token",
    "build_loss",
    "chosen_nll",
    "get_loss",
    "length_averaged",
    "log_ratios",
    "loss_needs_reference",
    "per_token",
    "reference_free_output",
    "reference_output",
    "register_loss",
    "smoothed_logistic",
]

"""Our losses against TRL's own implementations on the same log-probs (fp64, 1e-6).

TRL 1.16 computes DPO-family losses inside ``DPOTrainer._compute_loss``, which runs the model. We
call that method on a bare trainer (``object.__new__``, only the attributes it reads) with a
stand-in model whose per-token log-probs sum to the chosen/rejected log-probs we want, and
precomputed reference log-probs. SimPO and ORPO come from ``CPOTrainer.cpo_loss`` and
``ORPOTrainer.odds_ratio_loss``, which take log-probs directly.
"""

from __future__ import annotations

import collections
import types

import pytest
import torch

from po_ray.config import LossConfig
from po_ray.losses import PairLogps, build_loss, per_token

dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")


def random_pairs(n: int, seed: int = 0) -> PairLogps:
    """Moderate random log-probs (|β h| of a few units at β = 0.1) and lengths 1..12."""
    g = torch.Generator().manual_seed(seed)
    lp = lambda: -(torch.rand(n, generator=g, dtype=torch.float64) * 35 + 1)  # noqa: E731
    tokens = lambda: torch.randint(1, 13, (n,), generator=g)  # noqa: E731
    return PairLogps(lp(), lp(), lp(), lp(), tokens(), tokens())


def select(logps: PairLogps, i: int) -> PairLogps:
    return PairLogps(*(getattr(logps, f)[i : i + 1] for f in PairLogps.__dataclass_fields__))


class StandInModel:
    """What ``_compute_loss`` reads from a model: ``training``, and ``log_probs`` etc. from a call."""

    training = True
    is_gradient_checkpointing = False

    def __init__(self, per_token_logps: torch.Tensor):
        self.per_token_logps = per_token_logps

    def __call__(self, **_):
        zeros = torch.zeros_like(self.per_token_logps)
        return types.SimpleNamespace(
            log_probs=self.per_token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )


def trl_dpo_loss(logps: PairLogps, loss_types, *, beta, weights=None, label_smoothing=0.0, discopop_tau=0.05):
    """TRL's batch loss Σ_k w_k·mean(loss_k) and its logged metrics, for these per-pair log-probs."""
    batch = logps.chosen.shape[0]
    tokens = torch.cat([logps.chosen_tokens, logps.rejected_tokens])
    seq_len = int(tokens.max()) + 2  # one prompt token, the completion, one pad
    positions = torch.arange(seq_len)
    # Rows are [chosen..., rejected...] as TRL concatenates them; completion tokens sit at 1..|y|.
    completion_mask = ((positions >= 1) & (positions <= tokens[:, None])).long()
    # log-prob of token t+1 sits at shifted position t: spread each sum evenly over its tokens.
    totals = torch.cat([logps.chosen, logps.rejected])
    per_token_logps = completion_mask[:, 1:] * (totals / tokens)[:, None]
    model = StandInModel(per_token_logps)

    trainer = object.__new__(dpo_trainer.DPOTrainer)
    trainer.__dict__.update(
        model=model,
        ref_model=None,
        accelerator=types.SimpleNamespace(
            device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x
        ),
        beta=beta,
        loss_types=list(loss_types),
        loss_weights=list(weights or [1.0] * len(loss_types)),
        label_smoothing=label_smoothing,
        args=types.SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        use_weighting=False,
        precompute_ref_logps=True,
        aux_loss_enabled=False,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * batch, seq_len, dtype=torch.long),
        "attention_mask": torch.ones(2 * batch, seq_len, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": logps.ref_chosen,
        "ref_rejected_logps": logps.ref_rejected,
    }
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


# (our loss config, TRL loss types, TRL kwargs); these agree per pair and on a batch.
CASES = [
    (dict(name="dpo"), ["sigmoid"], {}),
    (dict(name="ln_dpo", beta=2.0), ["sigmoid_norm"], {"beta": 2.0}),
    (dict(name="dpo", beta=2.0, averaged=True), ["sigmoid_norm"], {"beta": 2.0}),
    (dict(name="ipo", beta=0.3), ["ipo"], {"beta": 0.3}),
    (dict(name="hinge"), ["hinge"], {}),
    (dict(name="robust", options={"label_smoothing": 0.2}), ["robust"], {"label_smoothing": 0.2}),
    (dict(name="exo_pair"), ["exo_pair"], {"label_smoothing": 1e-3}),
    (dict(name="exo_pair", options={"label_smoothing": 0.2}), ["exo_pair"], {"label_smoothing": 0.2}),
    (dict(name="nca_pair"), ["nca_pair"], {}),
    (dict(name="bco_pair"), ["bco_pair"], {}),
    (dict(name="sppo_hard"), ["sppo_hard"], {}),
    (dict(name="apo_zero"), ["apo_zero"], {}),
    (dict(name="apo_down"), ["apo_down"], {}),
    (dict(name="discopop"), ["discopop"], {"discopop_tau": 0.05}),
    (dict(name="discopop", options={"tau": 0.3}), ["discopop"], {"discopop_tau": 0.3}),
    (dict(name="dpo+hinge", weights=(0.7, 0.3)), ["sigmoid", "hinge"], {"weights": [0.7, 0.3]}),
]
# These agree per pair only.
PER_PAIR_ONLY_CASES = [
    # TRL's sft is the token mean over the whole batch, ours the mean of per-pair token means
    # (they differ on a batch of unequal lengths).
    (dict(name="sft"), ["sft"], {}),
    # TRL 1.16 has no separate cDPO; on a single pair its aot_unpaired sorts nothing and is cDPO.
    (dict(name="cdpo", options={"label_smoothing": 0.2}), ["aot_unpaired"], {"label_smoothing": 0.2}),
    # MPO-style weighted sum, and RPO as dpo + α·sft.
    (
        dict(name="dpo+bco_pair+sft", weights=(0.8, 0.2, 1.0)),
        ["sigmoid", "bco_pair", "sft"],
        {"weights": [0.8, 0.2, 1.0]},
    ),
    (dict(name="dpo", nll_alpha=0.5), ["sigmoid", "sft"], {"weights": [1.0, 0.5]}),
]


def case_id(case):
    cfg, types_, kwargs = case
    return f"{'+'.join(types_)}-{cfg.get('options') or kwargs or ''}"


def trl_kwargs(cfg: dict, kwargs: dict) -> dict:
    return {"beta": cfg.get("beta", 0.1), **kwargs}


@pytest.mark.parametrize("case", CASES + PER_PAIR_ONLY_CASES, ids=case_id)
def test_per_pair_losses_match_trl(case):
    cfg, loss_types, kwargs = case
    logps = random_pairs(6)
    ours = build_loss(LossConfig(**cfg))(logps).losses
    theirs = torch.stack([trl_dpo_loss(select(logps, i), loss_types, **trl_kwargs(cfg, kwargs))[0] for i in range(6)])
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


BATCH_CASES = CASES + [
    (dict(name="aot"), ["aot"], {}),
    (dict(name="aot", options={"label_smoothing": 0.1}), ["aot"], {"label_smoothing": 0.1}),
    (dict(name="aot_unpaired"), ["aot_unpaired"], {}),
    (dict(name="aot_unpaired", options={"label_smoothing": 0.1}), ["aot_unpaired"], {"label_smoothing": 0.1}),
]


@pytest.mark.parametrize("case", BATCH_CASES, ids=case_id)
def test_batch_mean_and_rewards_match_trl(case):
    # The batch-level view; aot/aot_unpaired sort across the batch, so only this one applies to them.
    cfg, loss_types, kwargs = case
    logps = random_pairs(8, seed=1)
    out = build_loss(LossConfig(**cfg))(logps)
    loss, metrics = trl_dpo_loss(logps, loss_types, **trl_kwargs(cfg, kwargs))
    torch.testing.assert_close(out.losses.mean(), loss, rtol=1e-6, atol=1e-6)
    if not cfg.get("averaged") and cfg["name"] not in ("ln_dpo", "ipo"):
        # TRL logs β·ρ on sums; ours for averaged losses is β·ρ̂ (the reward the loss optimises).
        assert out.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][0], abs=1e-9)
        assert out.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"][0], abs=1e-9)


@pytest.mark.parametrize("gamma, label_smoothing", [(0.5, 0.0), (1.2, 0.0), (0.8, 0.1)])
def test_simpo_matches_trl_cpo_trainer(gamma, label_smoothing):
    cpo_trainer = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    logps, beta = random_pairs(8, seed=2), 2.5
    trainer = object.__new__(cpo_trainer.CPOTrainer)
    trainer.__dict__.update(
        alpha=0.0,
        beta=beta,
        loss_type="simpo",
        simpo_gamma=gamma,
        label_smoothing=label_smoothing,
        accelerator=types.SimpleNamespace(device=torch.device("cpu")),
    )
    # CPOTrainer feeds SimPO per-token averaged log-probs.
    theirs, chosen_rewards, rejected_rewards = trainer.cpo_loss(
        per_token(logps.chosen, logps.chosen_tokens), per_token(logps.rejected, logps.rejected_tokens)
    )
    cfg = LossConfig(name="simpo", beta=beta, options={"gamma": gamma, "label_smoothing": label_smoothing})
    out = build_loss(cfg)(logps)
    torch.testing.assert_close(out.losses, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.chosen_rewards, chosen_rewards)
    torch.testing.assert_close(out.rejected_rewards, rejected_rewards)


def test_orpo_matches_trl_orpo_trainer():
    orpo_trainer = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    logps, beta = random_pairs(8, seed=3), 0.25
    trainer = object.__new__(orpo_trainer.ORPOTrainer)
    trainer.__dict__.update(beta=beta, accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    # odds_ratio_loss returns +λ·log σ(log-odds ratio) per pair; ORPO's loss is NLL minus its mean.
    ratio_terms, chosen_rewards, _, mean_ratio, mean_log_odds = trainer.odds_ratio_loss(
        per_token(logps.chosen, logps.chosen_tokens), per_token(logps.rejected, logps.rejected_tokens)
    )
    out = build_loss(LossConfig(name="orpo", beta=beta))(logps)
    torch.testing.assert_close(out.losses - out.terms["nll"], -ratio_terms.double(), rtol=1e-6, atol=1e-6)
    assert out.terms["log_odds_ratio"].mean().item() == pytest.approx(mean_ratio.item(), abs=1e-6)
    assert out.terms["log_odds_chosen"].mean().item() == pytest.approx(mean_log_odds.item(), abs=1e-6)
    torch.testing.assert_close(out.chosen_rewards, chosen_rewards.double(), rtol=1e-6, atol=1e-6)

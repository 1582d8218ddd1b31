"""Losses against their published formulas (written out here in plain `math`), invariants, and the registry.

TRL cross-checks live in test_losses_trl.py.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest
import torch

from po_ray.config import LossConfig
from po_ray.losses import (
    PairLogps,
    average_per_token,
    available_losses,
    build_loss,
    get_loss,
    loss_needs_reference,
    register_loss,
    registry,
)

# (chosen, rejected, ref_chosen, ref_rejected, |y_w|, |y_l|); margins h = 4, 2, −2.5.
ROWS = [
    (-10.0, -20.0, -12.0, -18.0, 5, 4),
    (-3.0, -5.0, -4.0, -4.0, 3, 6),
    (-7.5, -6.0, -7.0, -8.0, 10, 2),
]


def make_pairs(rows, dtype=torch.float64, requires_grad=False) -> PairLogps:
    cols = list(zip(*rows))
    policy = [torch.tensor(c, dtype=dtype, requires_grad=requires_grad) for c in cols[:2]]
    ref = [torch.tensor(c, dtype=dtype) for c in cols[2:4]]
    tokens = [torch.tensor(c) for c in cols[4:]]
    return PairLogps(*policy, *ref, *tokens)


def f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def run(name: str, logps: PairLogps, **cfg):
    return build_loss(LossConfig(name=name, **cfg))(logps)


# --- the formulas as the papers write them, on plain floats ----------------------------------------


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def log_sig(x: float) -> float:
    return math.log(sig(x))


def ratios(row):
    chosen, rejected, ref_chosen, ref_rejected, _, _ = row
    return chosen - ref_chosen, rejected - ref_rejected


def margin(row):
    rho_w, rho_l = ratios(row)
    return rho_w - rho_l


def avg_margin(row):
    rho_w, rho_l = ratios(row)
    return rho_w / row[4] - rho_l / row[5]


def averages(row):
    return row[0] / row[4], row[1] / row[5]


def log_odds(avg):
    p = math.exp(avg)
    return math.log(p / (1 - p))


# name -> (beta, options, per-pair formula(row, beta, options))
FORMULAS = {
    "dpo": (0.5, {}, lambda r, b, o: -log_sig(b * margin(r))),
    "ln_dpo": (2.0, {}, lambda r, b, o: -log_sig(b * avg_margin(r))),
    "ipo": (0.5, {}, lambda r, b, o: (avg_margin(r) - 1 / (2 * b)) ** 2),
    "hinge": (0.5, {}, lambda r, b, o: max(0.0, 1 - b * margin(r))),
    "robust": (
        0.5,
        {"label_smoothing": 0.2},
        lambda r, b, o: (
            -(1 - o["label_smoothing"]) * log_sig(b * margin(r)) + o["label_smoothing"] * log_sig(-b * margin(r))
        )
        / (1 - 2 * o["label_smoothing"]),
    ),
    "cdpo": (
        0.5,
        {"label_smoothing": 0.2},
        lambda r, b, o: -(1 - o["label_smoothing"]) * log_sig(b * margin(r))
        - o["label_smoothing"] * log_sig(-b * margin(r)),
    ),
    "rdpo": (0.5, {"alpha": 0.1}, lambda r, b, o: -log_sig(b * margin(r) + o["alpha"] * (r[4] - r[5]))),
    # EXO as the KL it is: Σ_k q_k log(q_k / p_k), q = (σ(βh), σ(−βh)), p = (1 − ε, ε).
    "exo_pair": (
        0.5,
        {"label_smoothing": 0.01},
        lambda r, b, o: sig(b * margin(r)) * math.log(sig(b * margin(r)) / (1 - o["label_smoothing"]))
        + sig(-b * margin(r)) * math.log(sig(-b * margin(r)) / o["label_smoothing"]),
    ),
    "discopop": (
        0.5,
        {"tau": 0.3},
        lambda r, b, o: (1 - sig(b * margin(r) / o["tau"])) * -log_sig(b * margin(r))
        + sig(b * margin(r) / o["tau"]) * math.exp(-b * margin(r)),
    ),
    "nca_pair": (
        0.5,
        {},
        lambda r, b, o: -log_sig(b * ratios(r)[0])
        - 0.5 * log_sig(-b * ratios(r)[0])
        - 0.5 * log_sig(-b * ratios(r)[1]),
    ),
    "bco_pair": (0.5, {}, lambda r, b, o: -log_sig(b * ratios(r)[0]) - log_sig(-b * ratios(r)[1])),
    "sppo_hard": (0.5, {}, lambda r, b, o: (ratios(r)[0] - 1 / (2 * b)) ** 2 + (ratios(r)[1] + 1 / (2 * b)) ** 2),
    "apo_zero": (0.5, {}, lambda r, b, o: (1 - sig(b * ratios(r)[0])) + sig(b * ratios(r)[1])),
    "apo_down": (0.5, {}, lambda r, b, o: sig(b * ratios(r)[0]) + (1 - sig(b * margin(r)))),
    "simpo": (
        2.0,
        {"gamma": 0.3},
        lambda r, b, o: -log_sig(b * (averages(r)[0] - averages(r)[1]) - o["gamma"]),
    ),
    "orpo": (
        0.5,
        {},
        lambda r, b, o: -averages(r)[0] - b * log_sig(log_odds(averages(r)[0]) - log_odds(averages(r)[1])),
    ),
    "sft": (0.5, {}, lambda r, b, o: -r[0] / r[4]),
}


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_loss_matches_its_published_formula(name):
    beta, options, formula = FORMULAS[name]
    out = run(name, make_pairs(ROWS), beta=beta, options=options)
    expected = f64([formula(r, beta, options) for r in ROWS])
    torch.testing.assert_close(out.losses, expected, rtol=1e-12, atol=1e-12)


def test_every_per_pair_loss_has_a_formula_test():
    # aot and aot_unpaired are batch-level (sorted) and have their own test below.
    assert set(available_losses()) - set(FORMULAS) == {"aot", "aot_unpaired"}


@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
def test_aot_compares_sorted_quantiles(name):
    eps, beta = 0.1, 0.5
    if name == "aot":  # policy margins vs reference margins, each sorted
        left = sorted(r[0] - r[1] for r in ROWS)
        right = sorted(r[2] - r[3] for r in ROWS)
    else:  # chosen log-ratios vs rejected log-ratios, each sorted
        left = sorted(ratios(r)[0] for r in ROWS)
        right = sorted(ratios(r)[1] for r in ROWS)
    expected = [-(1 - eps) * log_sig(beta * (a - b)) - eps * log_sig(-beta * (a - b)) for a, b in zip(left, right)]
    out = run(name, make_pairs(ROWS), beta=beta, options={"label_smoothing": eps})
    torch.testing.assert_close(out.losses, f64(expected), rtol=1e-12, atol=1e-12)


def test_dpo_pinned_number():
    # h = (−10 − −12) − (−20 − −18) = 4; β h = 0.4; −log σ(0.4) = log(1 + e^−0.4) = 0.51301525239995…
    out = run("dpo", make_pairs(ROWS[:1]), beta=0.1)
    assert out.losses.item() == pytest.approx(0.5130152523999526, abs=1e-15)


# --- invariants ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dpo", "ln_dpo", "cdpo", "robust", "aot", "aot_unpaired"])
def test_policy_equal_to_reference_gives_ln2_and_zero_margin(name):
    torch.manual_seed(0)
    logps = -torch.rand(6, dtype=torch.float64) * 50
    tokens = torch.randint(1, 20, (6,))
    same = PairLogps(logps[:3], logps[3:], logps[:3].clone(), logps[3:].clone(), tokens[:3], tokens[3:])
    out = run(name, same, beta=0.7)
    torch.testing.assert_close(out.losses, torch.full((3,), math.log(2), dtype=torch.float64))
    assert torch.all(out.chosen_rewards == 0) and torch.all(out.rejected_rewards == 0)
    assert torch.all(out.chosen_rewards - out.rejected_rewards == 0)


def test_simpo_with_zero_gamma_and_equal_averages_is_ln2():
    # Different lengths and sums, the same −2 nats per token.
    pairs = make_pairs([(-6.0, -10.0, 0.0, 0.0, 3, 5), (-40.0, -2.0, 0.0, 0.0, 20, 1)])
    out = run("simpo", pairs, beta=2.5, options={"gamma": 0.0})
    torch.testing.assert_close(out.losses, torch.full((2,), math.log(2), dtype=torch.float64))


def test_robust_is_unbiased_under_label_flips():
    # Chowdhury et al.: if each label is flipped with probability ε, E[robust] is the clean DPO loss:
    # (1 − ε)·robust(h) + ε·robust(−h) = −log σ(βh).
    eps, beta = 0.3, 0.5
    pairs = make_pairs(ROWS)
    flipped = make_pairs([(r[1], r[0], r[3], r[2], r[5], r[4]) for r in ROWS])
    opts = {"label_smoothing": eps}
    expected = (1 - eps) * run("robust", pairs, beta=beta, options=opts).losses + eps * run(
        "robust", flipped, beta=beta, options=opts
    ).losses
    torch.testing.assert_close(expected, run("dpo", pairs, beta=beta).losses)


def test_cdpo_is_minimised_at_its_finite_optimum():
    # d/dz [−(1−ε) log σ(z) − ε log σ(−z)] = σ(z) − (1 − ε) = 0 at z* = log((1 − ε)/ε).
    eps, beta = 0.2, 0.5
    h = math.log((1 - eps) / eps) / beta
    pairs = make_pairs([(-10.0 + h, -10.0, -10.0, -10.0, 4, 4)], requires_grad=True)
    run("cdpo", pairs, beta=beta, options={"label_smoothing": eps}).losses.sum().backward()
    assert abs(pairs.chosen.grad.item()) < 1e-12


@pytest.mark.parametrize(
    "name, row",
    [
        # ipo: zero at ĥ = 1/(2τ) = 1 with τ = 0.5 (ρ_w/|y_w| = 2/4, ρ_l/|y_l| = −1/2).
        ("ipo", (-8.0, -11.0, -10.0, -10.0, 4, 2)),
        # sppo_hard: zero at ρ_w = 1/(2β) = 1, ρ_l = −1.
        ("sppo_hard", (-9.0, -11.0, -10.0, -10.0, 4, 2)),
    ],
)
def test_squared_losses_vanish_at_their_target(name, row):
    assert run(name, make_pairs([row]), beta=0.5).losses.item() == pytest.approx(0.0, abs=1e-15)


def test_dpo_gradient_is_the_analytic_one():
    # ∂/∂logp(y_w) −log σ(βh) = −β σ(−βh); the rejected gradient is its negative.
    beta = 0.5
    pairs = make_pairs(ROWS, requires_grad=True)
    run("dpo", pairs, beta=beta).losses.sum().backward()
    expected = f64([-beta * sig(-beta * margin(r)) for r in ROWS])
    torch.testing.assert_close(pairs.chosen.grad, expected)
    torch.testing.assert_close(pairs.rejected.grad, -expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", available_losses())
def test_extreme_margins_give_finite_losses_and_gradients(name, dtype):
    # |β h| = 1e4 (β = 1) in both directions; for reference-free losses the per-token gap is 1e4.
    rows = [(-1.0, -1.0 - 1e4, -5.0, -5.0, 1, 1), (-1.0 - 1e4, -1.0, -5.0, -5.0, 1, 1)]
    pairs = make_pairs(rows, dtype=dtype, requires_grad=True)
    out = run(name, pairs, beta=1.0)
    assert torch.isfinite(out.losses).all(), out.losses
    out.losses.sum().backward()
    assert torch.isfinite(pairs.chosen.grad).all()
    assert pairs.rejected.grad is None or torch.isfinite(pairs.rejected.grad).all()  # sft ignores y_l


def test_orpo_is_finite_when_a_probability_rounds_to_one():
    pairs = make_pairs([(0.0, -3.0, 0.0, 0.0, 4, 4)], dtype=torch.float32, requires_grad=True)
    out = run("orpo", pairs, beta=0.1)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(pairs.chosen.grad).all()


# --- rewards, averaging, sums and the NLL term -------------------------------------------------------


def test_rewards_are_beta_log_ratios_or_beta_average_logps():
    beta = 0.5
    pairs = make_pairs(ROWS, requires_grad=True)
    dpo = run("dpo", pairs, beta=beta)
    simpo = run("simpo", pairs, beta=beta)
    ln_dpo = run("ln_dpo", pairs, beta=beta)
    torch.testing.assert_close(dpo.chosen_rewards, f64([beta * ratios(r)[0] for r in ROWS]))
    torch.testing.assert_close(dpo.rejected_rewards, f64([beta * ratios(r)[1] for r in ROWS]))
    torch.testing.assert_close(simpo.chosen_rewards, f64([beta * averages(r)[0] for r in ROWS]))
    torch.testing.assert_close(ln_dpo.chosen_rewards, f64([beta * ratios(r)[0] / r[4] for r in ROWS]))
    for out in (dpo, simpo, ln_dpo):
        assert out.losses.requires_grad
        assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_averaged_is_the_loss_on_per_token_log_probs():
    pairs = make_pairs(ROWS)
    for name in ("dpo", "hinge", "rdpo", "bco_pair"):
        averaged = run(name, pairs, beta=2.0, averaged=True).losses
        torch.testing.assert_close(averaged, get_loss(name).fn(average_per_token(pairs), beta=2.0).losses)
    torch.testing.assert_close(run("dpo", pairs, beta=2.0, averaged=True).losses, run("ln_dpo", pairs, beta=2.0).losses)


def test_averaged_leaves_averaged_and_reference_free_parts_alone():
    pairs = make_pairs(ROWS)
    combined = run("ipo+simpo+dpo", pairs, beta=0.5, averaged=True)
    torch.testing.assert_close(combined.terms["loss_ipo"], run("ipo", pairs, beta=0.5).losses)
    torch.testing.assert_close(combined.terms["loss_simpo"], run("simpo", pairs, beta=0.5).losses)
    torch.testing.assert_close(combined.terms["loss_dpo"], run("ln_dpo", pairs, beta=0.5).losses)


def test_weighted_sum_with_shared_options():
    pairs = make_pairs(ROWS)
    out = run("cdpo+rdpo", pairs, beta=0.5, weights=(0.3, 2.0), options={"label_smoothing": 0.2, "alpha": 0.1})
    cdpo = run("cdpo", pairs, beta=0.5, options={"label_smoothing": 0.2}).losses
    rdpo = run("rdpo", pairs, beta=0.5, options={"alpha": 0.1}).losses
    torch.testing.assert_close(out.losses, 0.3 * cdpo + 2.0 * rdpo)
    torch.testing.assert_close(out.terms["loss_cdpo"], cdpo)
    torch.testing.assert_close(out.chosen_rewards, run("cdpo", pairs, beta=0.5).chosen_rewards)


def test_an_option_goes_to_every_loss_declaring_it():
    pairs = make_pairs(ROWS)
    out = run("simpo+cdpo", pairs, beta=0.5, options={"label_smoothing": 0.25})
    for name in ("simpo", "cdpo"):
        alone = run(name, pairs, beta=0.5, options={"label_smoothing": 0.25}).losses
        torch.testing.assert_close(out.terms[f"loss_{name}"], alone)


def test_nll_term_adds_alpha_times_chosen_token_mean_nll():
    pairs = make_pairs(ROWS)
    out = run("dpo", pairs, beta=0.5, nll_alpha=0.4)
    nll = f64([-r[0] / r[4] for r in ROWS])
    torch.testing.assert_close(out.losses, run("dpo", pairs, beta=0.5).losses + 0.4 * nll)
    torch.testing.assert_close(out.terms["nll"], nll)
    assert "nll" not in run("dpo", pairs, beta=0.5).terms


def test_orpo_reports_its_terms():
    out = run("orpo", make_pairs(ROWS), beta=0.5)
    expected_odds = [log_odds(averages(r)[0]) - log_odds(averages(r)[1]) for r in ROWS]
    torch.testing.assert_close(out.terms["log_odds_chosen"], f64(expected_odds))
    torch.testing.assert_close(out.terms["log_odds_ratio"], f64([log_sig(x) for x in expected_odds]))
    torch.testing.assert_close(out.terms["nll"], f64([-r[0] / r[4] for r in ROWS]))


# --- registry and validation ------------------------------------------------------------------------


def test_needs_reference():
    expected_free = {"simpo", "orpo", "sft"}
    assert {n for n in available_losses() if not get_loss(n).needs_reference} == expected_free
    assert not loss_needs_reference(LossConfig(name="simpo"))
    assert loss_needs_reference(LossConfig(name="simpo+dpo"))
    assert build_loss(LossConfig(name="orpo")).needs_reference is False


def test_reference_free_loss_runs_without_reference():
    pairs = make_pairs(ROWS)
    no_ref = PairLogps(pairs.chosen, pairs.rejected, None, None, pairs.chosen_tokens, pairs.rejected_tokens)
    torch.testing.assert_close(run("simpo", no_ref, beta=2.0).losses, run("simpo", pairs, beta=2.0).losses)
    with pytest.raises(ValueError, match="loss 'simpo\\+dpo' needs reference log-probs"):
        run("simpo+dpo", no_ref, beta=2.0)


@pytest.mark.parametrize(
    "cfg, message",
    [
        (dict(name="nope"), "loss.name: unknown loss 'nope'; registered: aot, "),
        (dict(name="dpo+"), "loss.name: empty loss name"),
        (dict(name="dpo+dpo"), "loss.name: 'dpo' appears twice"),
        (dict(name="cdpo", options={"foo": 1}), "loss.options.foo: not a knob of cdpo; its knobs: label_smoothing"),
        (dict(name="dpo", options={"gamma": 1}), "loss.options.gamma: not a knob of dpo; its knobs: none"),
        (
            dict(name="cdpo", options={"label_smoothing": 0.7}),
            "loss.options.label_smoothing: must be in [0, 0.5), got 0.7",
        ),
        (dict(name="simpo", options={"gamma": -1}), "loss.options.gamma: must be >= 0, got -1.0"),
        (dict(name="simpo", options={"gamma": "big"}), "loss.options.gamma: must be a finite number, got 'big'"),
        (dict(name="simpo", options={"gamma": True}), "loss.options.gamma: must be a finite number"),
        (dict(name="dpo+sft", weights=(1.0,)), "loss.weights: 1 weights for 2 losses in 'dpo+sft'"),
        (dict(name="simpo", averaged=True), "loss.averaged: .*simpo is reference-free.*set loss.averaged=false"),
        (dict(name="ipo", averaged=True), "loss.averaged: .*ipo is averaged already"),
    ],
)
def test_config_errors_name_the_key(cfg, message):
    with pytest.raises(ValueError, match=message if ".*" in message else None) as err:
        build_loss(LossConfig(**cfg))
    if ".*" not in message:
        assert str(err.value).startswith(message), str(err.value)


def test_pair_logps_checks_shapes():
    a = torch.zeros(3)
    with pytest.raises(ValueError, match="PairLogps.rejected: shape \\(2,\\) differs from chosen \\(3,\\)"):
        PairLogps(a, torch.zeros(2), None, None, a, a)
    with pytest.raises(ValueError, match="both ref_chosen and ref_rejected"):
        PairLogps(a, a, a, None, a, a)
    with pytest.raises(ValueError, match="expected shape \\(batch,\\)"):
        PairLogps(torch.zeros(2, 3), torch.zeros(2, 3), None, None, torch.zeros(2, 3), torch.zeros(2, 3))


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations in a test go to a copy of the registry."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_a_user_loss_registers_with_its_knobs(scratch_registry):
    @register_loss("shifted_dpo", ranges={"shift": (0.0, 10.0)})
    def shifted_dpo(logps, *, beta, shift=1.0):
        out = get_loss("dpo").fn(logps, beta=beta)
        return dataclasses.replace(out, losses=out.losses + shift)

    spec = get_loss("shifted_dpo")
    assert (spec.needs_reference, spec.knobs, spec.ranges) == (True, {"shift": 1.0}, {"shift": (0.0, 10.0)})
    assert "shifted_dpo" in available_losses()
    pairs = make_pairs(ROWS)
    out = run("shifted_dpo", pairs, beta=0.5, options={"shift": 2})
    torch.testing.assert_close(out.losses, run("dpo", pairs, beta=0.5).losses + 2.0)
    with pytest.raises(ValueError, match=r"loss.options.shift: must be in \[0, 10\), got 10"):
        build_loss(LossConfig(name="shifted_dpo", options={"shift": 10}))
    register_loss("shifted_dpo", ranges={"shift": (0.0, 10.0)})(shifted_dpo)  # re-import: same function, fine


def _no_default(logps, *, beta, k): ...
def _positional_knob(logps, k=1.0, *, beta): ...
def _no_beta(logps, *, k=1.0): ...
def _ok(logps, *, beta, k=1.0): ...


@pytest.mark.parametrize(
    "fn, kwargs, error, message",
    [
        (_no_default, {}, TypeError, "knob 'k' needs a default"),
        (_positional_knob, {}, TypeError, "parameter 'k' must be keyword-only"),
        (_no_beta, {}, TypeError, "takes no keyword-only 'beta'"),
        (_ok, {"ranges": {"k": (2.0, 3.0)}}, ValueError, "the default k=1.0 is outside its range"),
        (_ok, {"ranges": {"j": (0.0, 1.0)}}, ValueError, "ranges names 'j', which is not a knob"),
    ],
)
def test_bad_registrations_are_refused(scratch_registry, fn, kwargs, error, message):
    with pytest.raises(error, match=message):
        register_loss("bad", **kwargs)(fn)
    assert "bad" not in available_losses()


def test_a_taken_name_is_refused(scratch_registry):
    with pytest.raises(ValueError, match="'dpo' is already registered by po_ray.losses.pairwise.dpo"):
        register_loss("dpo")(_ok)


def test_importing_losses_pulls_in_torch_only():
    code = (
        "import sys, po_ray.losses\n"
        "bad = [m for m in ('transformers', 'ray', 'deepspeed', 'mlflow', 'trl') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

"""CollapseDetector on synthetic curves whose stop step is worked out by hand, and the Tune adapter."""

import json
import math
import random

import pytest

from po_ray.config import EarlyStoppingConfig
from po_ray.stoppers import CollapseDetector, CollapseStopper, StopDecision


def settings(**kw) -> EarlyStoppingConfig:
    base = dict(signal="topk_entropy", ema=0.5, drop_fraction=0.2, patience=3, min_steps=5, divergence_factor=10.0)
    return EarlyStoppingConfig(**{**base, **kw})


def run(detector: CollapseDetector, entropies, losses=None, masses=None):
    """Feed steps 1, 2, … ; return (step, decision) of the first stop, or None."""
    n = len(entropies)
    losses = losses or [0.7] * n
    masses = masses or [0.9] * n
    for step, (h, loss, m) in enumerate(zip(entropies, losses, masses), start=1):
        decision = detector.update(step, loss=loss, topk_entropy=h, topk_mass=m)
        if decision is not None:
            return step, decision
    return None


def test_step_drop_stops_after_patience_reports():
    # Entropy 2.0 for 6 steps, then 1.0. EMA(0.5): s7 = 1.5, s8 = 1.25, s9 = 1.125; the line is
    # (1 - 0.2) * 2.0 = 1.6, so steps 7, 8, 9 are below and patience 3 stops at step 9.
    step, decision = run(CollapseDetector(settings()), [2.0] * 6 + [1.0] * 10)
    assert step == 9
    assert decision.reason == "topk_entropy_collapse" and decision.step == 9
    assert "1.125" in decision.detail and "2" in decision.detail


def test_reports_before_min_steps_do_not_count():
    # The drop happens at step 3 (s3 = 1.5 < 1.6) but only steps >= 10 count: 10, 11, 12 -> stop at 12.
    step, decision = run(CollapseDetector(settings(min_steps=10)), [2.0, 2.0] + [1.0] * 20)
    assert (step, decision.step) == (12, 12)


def test_recovery_resets_patience():
    # s7 = 1.5 (below 1.6), s8 = 1.25 (below), step 9 value 3.0: s9 = 0.625 + 1.5 = 2.125 is a new
    # peak, so the count resets; new line 0.8 * 2.125 = 1.7. s10 = 1.5625, s11 = 1.28125,
    # s12 = 1.140625: three below -> stop at 12 (without the reset it would be 10).
    curve = [2.0] * 6 + [1.0, 1.0, 3.0] + [1.0] * 10
    step, decision = run(CollapseDetector(settings()), curve)
    assert step == 12
    assert "2.125" in decision.detail


def test_flat_noisy_curve_never_stops():
    # Values in [1.8, 2.2]: any EMA of them stays >= 1.8, the peak stays <= 2.2, so the smoothed
    # value never falls to 0.8 * 2.2 = 1.76.
    rng = random.Random(0)
    curve = [2.0 + rng.uniform(-0.2, 0.2) for _ in range(300)]
    assert run(CollapseDetector(settings(signal="both")), curve, masses=curve) is None


def test_rising_curve_never_stops():
    assert run(CollapseDetector(settings(ema=0.0, patience=1, min_steps=0)), [0.1 * i for i in range(1, 100)]) is None


def test_no_smoothing_uses_raw_values():
    # ema 0: the raw value is the signal. Line 0.8 * 1.0; 0.81 is above, 0.79 is below; patience 1.
    det = CollapseDetector(settings(ema=0.0, patience=1, min_steps=0))
    assert det.update(1, 0.7, topk_entropy=1.0) is None
    assert det.update(2, 0.7, topk_entropy=0.81) is None
    assert det.update(3, 0.7, topk_entropy=0.79).reason == "topk_entropy_collapse"


def test_missing_signal_neither_counts_nor_resets():
    # As the first test, but step 9 carries no entropy (an eval-only report): the count stays at 2
    # and step 10 (s10 = 0.5 * 1.25 + 0.5 * 1.0 = 1.125) makes 3.
    det = CollapseDetector(settings())
    for step in range(1, 9):
        assert det.update(step, 0.7, topk_entropy=2.0 if step <= 6 else 1.0) is None
    assert det.update(9, None, topk_entropy=None) is None
    decision = det.update(10, 0.7, topk_entropy=1.0)
    assert decision.step == 10 and "1.125" in decision.detail


def test_mass_signal_ignores_entropy_and_both_watches_both():
    entropy_collapse = [2.0] * 6 + [1.0] * 10
    flat = [0.9] * 16
    assert run(CollapseDetector(settings(signal="topk_mass")), entropy_collapse, masses=flat) is None
    step, decision = run(CollapseDetector(settings(signal="both")), flat, masses=[0.9] * 6 + [0.45] * 10)
    # mass: s7 = 0.675 (line 0.72), s8 = 0.5625, s9 = 0.50625 -> step 9
    assert (step, decision.reason) == (9, "topk_mass_collapse")
    step, decision = run(CollapseDetector(settings(signal="both")), entropy_collapse, masses=flat)
    assert (step, decision.reason) == (9, "topk_entropy_collapse")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_stops_at_once(bad):
    det = CollapseDetector(settings(min_steps=100))
    assert det.update(1, 0.7, topk_entropy=2.0) is None
    decision = det.update(2, bad, topk_entropy=2.0)
    assert decision == StopDecision("nan_loss", 2, decision.detail)


def test_a_skipped_step_stops_at_once_although_it_reports_no_loss():
    # What the loop reports for a step it skipped for a NaN/inf loss or gradient: no loss, no
    # signals, only the step, its bookkeeping and the running count of skipped steps.
    stopper = CollapseStopper(settings(min_steps=100))
    for step in (1, 2):
        assert stopper("t", {"step": step, "loss": 0.7, "topk_entropy": 2.0, "skipped_steps": 0}) is False
    assert stopper("t", {"step": 3, "lr": 1e-3, "epoch": 0.1, "skipped_steps": 1}) is True
    decision = stopper.decisions["t"]
    assert (decision.reason, decision.step) == ("nan_loss", 3)
    assert "1 step(s) skipped" in decision.detail


def test_a_step_skipped_between_reports_stops_at_the_next_report():
    # train.report_every 5: the step skipped at 7 shows in the count reported at step 10.
    det = CollapseDetector(settings(min_steps=100))
    assert det.update(5, 0.7, topk_entropy=2.0, skipped_steps=0) is None
    decision = det.update(10, 0.69, topk_entropy=2.0, skipped_steps=1)
    assert (decision.reason, decision.step) == ("nan_loss", 10)


def test_divergence_against_first_finite_loss():
    det = CollapseDetector(settings(min_steps=100))
    assert det.update(1, 0.5) is None  # first loss: the limit is 10 * 0.5 = 5
    assert det.update(2, 4.9) is None
    decision = det.update(3, 5.1)
    assert (decision.reason, decision.step) == ("divergence", 3)
    # the decision is sticky
    assert det.update(4, 0.1) is decision


def test_no_divergence_rule_for_non_positive_first_loss():
    det = CollapseDetector(settings())
    assert det.update(1, -0.2) is None
    assert det.update(2, 50.0) is None


def test_stopper_keeps_one_detector_per_trial_and_saves_decisions(tmp_path):
    from ray import tune

    stopper = CollapseStopper(settings())
    assert isinstance(stopper, tune.Stopper)
    collapsing = [2.0] * 6 + [1.0] * 10
    stopped_at = None
    for step, h in enumerate(collapsing, start=1):
        # trial "a" reports `step`; trial "b" only Tune's training_iteration
        if stopper("a", {"step": step, "loss": 0.7, "topk_entropy": h, "topk_mass": 0.9}) and stopped_at is None:
            stopped_at = step
        assert stopper("b", {"training_iteration": step, "loss": 0.7, "topk_entropy": 2.0}) is False
    assert stopped_at == 9
    assert stopper("b", {"training_iteration": 17, "loss": float("nan")}) is True
    assert stopper.stop_all() is False
    assert {k: (d.reason, d.step) for k, d in stopper.decisions.items()} == {
        "a": ("topk_entropy_collapse", 9),
        "b": ("nan_loss", 17),
    }

    path = stopper.save(tmp_path / "study" / "stops.json")
    raw = json.loads(path.read_text())
    assert raw["a"]["reason"] == "topk_entropy_collapse" and raw["b"]["step"] == 17
    assert CollapseStopper.load(path) == stopper.decisions


def test_generation_source_watches_the_sampled_responses_signals():
    stopper = CollapseStopper(settings(source="generation"))
    # The training-batch signal collapses but is not watched; generation evals come every 2 steps
    # (reports in between carry no gen/ values and leave the state alone).
    stopped_at = None
    for step in range(1, 21):
        result = {"step": step, "loss": 0.7, "topk_entropy": 2.0 if step < 4 else 0.5}
        if step % 2 == 0:
            result["gen/topk_entropy"] = 2.0 if step <= 6 else 1.0
        if stopper("t", result) and stopped_at is None:
            stopped_at = step
    # gen reports at 8, 10, 12: s = 1.5, 1.25, 1.125; line 1.6 -> three below-reports end at step 12.
    assert stopped_at == 12 and stopper.decisions["t"].reason == "topk_entropy_collapse"


def test_generation_source_needs_generation_eval():
    from po_ray.cli import resolve_config_path
    from po_ray.config import ConfigError, load_config

    demo = resolve_config_path("demo")
    with pytest.raises(ConfigError, match="early_stopping.source: generation needs eval.enabled=true"):
        load_config(demo, ["early_stopping.source=generation"])
    assert load_config(demo, ["early_stopping.source=generation", "eval.enabled=true"]).early_stopping.source == "generation"


def test_saved_decisions_are_what_the_report_reads(tmp_path):
    from po_ray.report import load_trials

    stopper = CollapseStopper(settings())
    stopper("t1", {"step": 3, "loss": float("inf")})
    stopper.save(tmp_path / "stops.json")
    trial = tmp_path / "exp" / "t1"
    trial.mkdir(parents=True)
    (trial / "params.json").write_text(json.dumps({"method": "dpo"}))
    (trial / "result.json").write_text(json.dumps({"trial_id": "t1", "step": 3, "loss": 1.0, "config": {"method": "dpo"}}) + "\n")
    row = load_trials(tmp_path).iloc[0]
    assert (bool(row["stopped"]), row["stop_reason"], row["stop_step"]) == (True, "nan_loss", 3)

"""The robustness report on a synthetic Tune-like study folder; every number recomputed here."""

import json
import math
import statistics

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from po_ray.report import ReportError, load_curves, load_trials, summarize, write_report

SCORE = "eval/rewards/accuracies"
MAX_STEPS = 20
EPS = 0.05

# method -> list of (params, final score, stop) ; stop = (reason, step) or None.
# The score is reported at steps 5, 10, 15, 20 (eval_every 5), rising by 0.1 per eval to the final
# value at the trial's last eval, so "last reported value" differs from the best and the first.
TRIALS = {
    "dpo": [
        ({"loss.beta": 0.1, "optimizer.lr": 1e-4}, 0.80, None),
        ({"loss.beta": 0.1, "optimizer.lr": 1e-3}, 0.62, None),
        ({"loss.beta": 0.5, "optimizer.lr": 1e-4}, 0.70, None),
        ({"loss.beta": 0.5, "optimizer.lr": 1e-3}, 0.55, ("divergence", 16)),
    ],
    "ln_dpo": [
        ({"loss.beta": 1.0, "optimizer.lr": 1e-4}, 0.74, None),
        ({"loss.beta": 5.0, "optimizer.lr": 1e-4}, 0.79, ("topk_entropy_collapse", 12)),
    ],
    "simpo": [
        ({"loss.beta": 2.0, "optimizer.lr": 1e-4, "loss.options.gamma": 1.0}, 0.78, None),
        ({"loss.beta": 2.0, "optimizer.lr": 1e-3, "loss.options.gamma": 1.0}, 0.76, None),
        ({"loss.beta": 10.0, "optimizer.lr": 1e-4, "loss.options.gamma": 1.0}, 0.50, None),
        ({"loss.beta": 10.0, "optimizer.lr": 1e-3, "loss.options.gamma": 1.0}, None, ("nan_loss", 3)),
    ],
}
# Written by hand from TRIALS: finite final scores per method.
SCORES = {"dpo": [0.80, 0.62, 0.70, 0.55], "ln_dpo": [0.74, 0.79], "simpo": [0.78, 0.76, 0.50]}


def tune_result(step, trial_id, params, extra):
    """One line of Tune's result.json as Ray Tune 2.60 writes it for a sweep trial: the fields the
    trial reported, then the ones Tune adds (its config is the trial's params, `method` included)."""
    return {
        "step": step,
        **extra,
        "skipped_steps": 0,
        "timestamp": 1700000000 + step,
        "checkpoint_dir_name": None,
        "done": False,
        "training_iteration": step,
        "trial_id": trial_id,
        "date": "2025-01-01_00-00-00",
        "time_this_iter_s": 0.5,
        "time_total_s": 0.5 * step,
        "pid": 1234,
        "hostname": "node",
        "node_ip": "10.0.0.1",
        "config": params,
        "time_since_restore": 0.5 * step,
        "iterations_since_restore": step,
    }


def signal(step, stop):
    """Top-k entropy: flat at 2.0, falling after step 8 for the collapsing trial."""
    if stop and stop[0] == "topk_entropy_collapse" and step > 8:
        return 2.0 - 0.25 * (step - 8)
    return 2.0


@pytest.fixture
def study(tmp_path):
    """A study folder laid out as a sweep leaves it: one Tune experiment per method,
    <study>/<method>/<method>_<trial id>/{params,result}.json."""
    root = tmp_path / "robustness-test"
    stops = {}
    n = 0
    for method, trials in TRIALS.items():
        for params, final, stop in trials:
            trial_id = f"abc12_{n:05d}"
            folder = root / method / f"{method}_{trial_id}"
            folder.mkdir(parents=True)
            params = {"method": method, **params, "train.seed": 0}
            (folder / "params.json").write_text(json.dumps(params, indent=2))
            last_step = stop[1] if stop else MAX_STEPS
            evals = [s for s in (5, 10, 15, 20) if s <= last_step]
            lines = []
            for step in range(1, last_step + 1):
                loss = math.nan if stop and stop[0] == "nan_loss" and step == last_step else 0.7 - 0.01 * step
                extra = {"loss": loss, "topk_entropy": signal(step, stop), "topk_mass": 0.9}
                if step in evals and final is not None:
                    extra[SCORE] = round(final - 0.1 * (len(evals) - 1 - evals.index(step)), 6)
                    extra["eval/loss"] = 0.6
                lines.append(json.dumps(tune_result(step, trial_id, params, extra)))
            (folder / "result.json").write_text("\n".join(lines) + "\n")
            if stop:
                stops[trial_id] = {"reason": stop[0], "step": stop[1], "detail": "synthetic"}
            n += 1
    (root / "stops.json").write_text(json.dumps(stops))
    # A folder with a result.json whose params name no `method` (e.g. a Ray Train run's) is not a trial.
    nested = root / "trials" / "TorchTrainer_x"
    nested.mkdir(parents=True)
    (nested / "params.json").write_text("{}")
    (nested / "result.json").write_text(json.dumps({"loss": 1.0, "training_iteration": 1}) + "\n")
    return root


def test_load_trials(study):
    trials = load_trials(study)
    assert len(trials) == 10
    assert list(trials["method"]) == ["dpo"] * 4 + ["ln_dpo"] * 2 + ["simpo"] * 4
    first = trials.iloc[0]
    assert (first["trial_id"], first["trial_name"]) == ("abc12_00000", "dpo_abc12_00000")  # the folder's name
    assert (first["config/loss.beta"], first["config/optimizer.lr"]) == (0.1, 1e-4)
    assert first[SCORE] == pytest.approx(0.80)  # the last reported value, not the first (0.50)
    assert first["steps"] == MAX_STEPS and not first["stopped"]
    collapsed = trials[trials["stop_reason"] == "topk_entropy_collapse"].iloc[0]
    assert (collapsed["method"], collapsed["steps"], collapsed["stop_step"]) == ("ln_dpo", 12, 12)
    assert collapsed[SCORE] == pytest.approx(0.79)  # its last eval, at step 10
    nan_trial = trials[trials["stop_reason"] == "nan_loss"].iloc[0]
    assert math.isnan(nan_trial[SCORE]) and math.isnan(nan_trial["loss"]) and nan_trial["steps"] == 3
    # Tune's bookkeeping fields are not metrics
    assert not {"timestamp", "pid", "time_total_s", "training_iteration", "config"} & set(trials.columns)
    assert "config/loss.options.gamma" in trials.columns


def test_load_curves(study):
    curves = load_curves(study)
    assert len(curves) == 20 * 7 + 16 + 12 + 3  # rows = steps reported by every trial
    one = curves[curves["trial_id"] == "abc12_00005"].sort_values("step")
    assert one["step"].tolist() == list(range(1, 13))
    assert one["topk_entropy"].tolist() == [signal(s, ("topk_entropy_collapse", 12)) for s in range(1, 13)]


def expected_summary(mode="max", eps=EPS, scores=SCORES):
    """The summary written out from the hand lists with the statistics module."""
    pool = [s for v in scores.values() for s in v]
    best_all = max(pool) if mode == "max" else min(pool)
    n_trials = {m: len(TRIALS[m]) for m in TRIALS}
    out = {}
    for m, xs in scores.items():
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
        good = [x for x in xs if (best_all - x if mode == "max" else x - best_all) <= eps + 1e-12]
        out[m] = {
            "trials": n_trials[m],
            "scored": len(xs),
            "best": max(xs) if mode == "max" else min(xs),
            "median": statistics.median(xs),
            "worst": min(xs) if mode == "max" else max(xs),
            "iqr": q3 - q1,
            "within_epsilon": len(good),
            "share_within_epsilon": len(good) / n_trials[m],
        }
    return out


def test_summary_numbers(study):
    summary = summarize(load_trials(study), SCORE, "max", EPS, max_steps=MAX_STEPS).set_index("method")
    expected = expected_summary()
    for method, row in expected.items():
        for key, value in row.items():
            assert summary.loc[method, key] == pytest.approx(value), (method, key)
    # best over all methods is dpo's 0.80: within 0.05 are dpo 0.80, ln_dpo 0.79, simpo 0.78 and 0.76
    assert summary["share_within_epsilon"].to_dict() == {"dpo": 0.25, "ln_dpo": 0.5, "simpo": 0.5}
    # stops: dpo diverged at 16 (saves 4), ln_dpo collapsed at 12 (saves 8), simpo NaN at 3 (saves 17)
    assert summary["stopped"].to_dict() == {"dpo": 1, "ln_dpo": 1, "simpo": 1}
    assert summary["stopped_collapse"].to_dict() == {"dpo": 0, "ln_dpo": 1, "simpo": 0}
    assert summary["steps_saved"].to_dict() == {"dpo": 4.0, "ln_dpo": 8.0, "simpo": 17.0}


def test_summary_min_mode_and_unknown_budget(study):
    # Score by the last training loss (smaller is better): 0.7 − 0.01 × steps run, NaN for the NaN trial.
    trials = load_trials(study)
    losses = {
        m: [0.7 - 0.01 * (stop[1] if stop else MAX_STEPS) for _, _, stop in t if not (stop and stop[0] == "nan_loss")]
        for m, t in TRIALS.items()
    }
    summary = summarize(trials, "loss", "min", 0.01).set_index("method")
    for method, row in expected_summary("min", 0.01, losses).items():
        for key, value in row.items():
            assert summary.loc[method, key] == pytest.approx(value), (method, key)
    assert summary.loc["dpo", "best"] == pytest.approx(0.5)
    assert summary["steps_saved"].isna().all()  # no max_steps given and none in the trial params
    with pytest.raises(ReportError, match="score metric 'eval/reward' was never reported"):
        summarize(trials, "eval/reward", "max", 0.1)


def assert_png(path):
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert float(np.std(pixels[..., :3])) > 0.01  # something was drawn


def test_write_report(study):
    paths = write_report(study, score_metric=SCORE, mode="max", epsilon=EPS, max_steps=MAX_STEPS)
    assert set(paths) == {
        "report", "summary", "trials", "score_distribution", "signals", "params_dpo", "params_ln_dpo", "params_simpo",
    }  # fmt: skip
    assert all(p.parent == study / "report" for p in paths.values())
    for name, path in paths.items():
        if path.suffix == ".png":
            assert_png(path)
    summary = pd.read_csv(paths["summary"])
    assert summary["share_within_epsilon"].tolist() == [0.25, 0.5, 0.5]
    assert len(pd.read_csv(paths["trials"])) == 10
    text = paths["report"].read_text()
    assert "**dpo**: 25% (1 of 4 trials)" in text and "**simpo**: 50% (2 of 4 trials)" in text
    assert "3 of 10 trials stopped early (1 for top-k collapse), saving 29 steps of the 200 budgeted" in text
    assert "![signals](signals.png)" in text
    # the report folder is not mistaken for trials on a second run
    assert len(load_trials(study)) == 10


def test_params_plot_only_for_searched_params(study):
    # simpo's gamma is the same in every trial: its plot has beta and lr panels only. A method with
    # nothing searched gets no plot.
    trials = load_trials(study)
    trials.loc[trials["method"] == "ln_dpo", "config/loss.beta"] = 1.0
    paths = write_report(study, trials, score_metric=SCORE, mode="max", epsilon=EPS, max_steps=MAX_STEPS)
    assert "params_ln_dpo" not in paths and "params_simpo" in paths
    wide, narrow = imread(paths["params_dpo"]), imread(paths["params_simpo"])
    assert wide.shape == narrow.shape  # both have two panels (beta, lr)


def test_errors(tmp_path):
    with pytest.raises(ReportError, match="no such study folder"):
        load_trials(tmp_path / "nope")
    folder = tmp_path / "s" / "t"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"loss": 1.0, "config": {}}) + "\n")
    with pytest.raises(ReportError, match="no `method` in their params: .*t"):
        load_trials(tmp_path / "s")
    # without params.json, the config Tune copies into every result names the method
    line = '{"step": %d, "loss": 0.5, "config": {"method": "dpo"}}'
    (folder / "result.json").write_text(f'{line % 1}\n{{"broken"\n{line % 2}\n')
    with pytest.raises(ReportError, match=r"result.json:2: not a JSON object"):
        load_trials(tmp_path / "s")
    # a torn last line (a killed trial) is dropped
    (folder / "result.json").write_text(f'{line % 1}\n{{"step": 2, "conf')
    assert load_trials(tmp_path / "s")["steps"].tolist() == [1]

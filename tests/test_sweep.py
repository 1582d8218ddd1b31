"""Sweeps: trial configs checked up front, one reference pass per (reference, data, seed), stop
records, progress, the study folder's guards; then two real studies on 2 CPU workers: a sane cell
next to an over-optimising one the stopper must stop, and a study whose driver is killed and resumed.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from po_ray.report import ReportError, load_trials
from po_ray.stoppers import CollapseStopper, StopDecision
from po_ray.study import SPACES_DIR, StudyError, load_study
from po_ray.sweep import (
    REFERENCE_CACHE_DIR,
    STUDY_FILE,
    TRIALS_DIR,
    StopLog,
    StudyProgress,
    StudyStopper,
    driver_resources,
    non_finite_step,
    plan_study,
    probe_points,
    report_study,
    run_study,
    study_folder,
    study_tracking_uri,
    trial_config,
    trial_name,
)

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "po_ray" / "configs" / "demo.yaml"


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def make_study(tmp: Path, methods, **changes) -> Path:
    raw = {
        "name": "s",
        "base_config": str(DEMO_CONFIG),
        "base_overrides": {"train.max_steps": 20},
        "methods": methods,
        "seeds": [0],
        "score": {"metric": "eval/rewards/accuracies", "mode": "max", "epsilon": 0.05},
        "trial_resources": {"CPU": 0},
        "storage_path": str(tmp / "runs"),
        **changes,
    }
    return write(tmp / "study.yaml", raw)


def planned(path: Path):
    study = load_study(path)
    study_dir = study_folder(study)
    return study, study_dir, plan_study(study, study_dir, study_tracking_uri(study.config, study_dir))


# ---------------------------------------------------------------------------------------------
# Every trial's config, checked before anything runs


def test_a_knob_the_loss_does_not_take_fails_naming_method_and_point(tmp_path):
    # load_study checks config keys; only the loss registry knows that dpo has no `gamma`.
    write(tmp_path / "bad_dpo.yaml", {"method": "bad_dpo", "fixed": {"loss.name": "dpo"},
                                      "space": {"loss.beta": {"grid": [0.1, 0.2]}, "loss.options.gamma": {"grid": [1.0]}}})
    path = make_study(tmp_path, ["simpo", "bad_dpo"])
    study = load_study(path)
    with pytest.raises(StudyError, match=r"method bad_dpo at loss\.beta=0\.1, loss\.options\.gamma=1\.0, train\.seed=0: .*gamma"):
        plan_study(study, study_folder(study), "sqlite:///x.db")
    assert not (tmp_path / "runs").exists(), "nothing may be written before every trial config is known good"


def test_a_reference_for_a_reference_free_loss_fails_before_anything_runs(tmp_path):
    write(tmp_path / "bad_simpo.yaml", {"method": "bad_simpo", "fixed": {"loss.name": "simpo", "reference.strategy": "sharded"},
                                        "space": {"loss.beta": {"grid": [2.0]}}})
    study = load_study(make_study(tmp_path, ["bad_simpo"]))
    with pytest.raises(StudyError, match="method bad_simpo .*reference-free"):
        plan_study(study, study_folder(study), "sqlite:///x.db")


def test_method_named_like_a_study_subfolder_is_refused(tmp_path):
    write(tmp_path / "trials.yaml", {"method": "trials", "fixed": {"loss.name": "dpo"}, "space": {"loss.beta": {"grid": [0.1]}}})
    study = load_study(make_study(tmp_path, ["trials"]))
    with pytest.raises(StudyError, match="taken by the study folder"):
        plan_study(study, study_folder(study), "sqlite:///x.db")


@pytest.mark.parametrize("score, overrides, fixed, error", [
    ("eval/rewards/accuracies", {"train.eval_every": 10, "train.report_every": 4}, {},
     r"score.metric eval/rewards/accuracies is measured every train.eval_every=10 steps, but trials report to Tune "
     r"every train.report_every=4 steps"),
    ("eval/rewards/accuracies", {"train.eval_every": 10}, {"train.report_every": 3}, r"method m at .*report_every=3"),
    ("gen/win_rate", {"eval.enabled": True, "eval.every_steps": 5, "train.report_every": 2, "eval.judge": "reward_model",
                      "eval.judge_model": "rm"}, {}, r"eval.every_steps=5"),
    ("rewards/accuracies", {"eval.enabled": True, "eval.every_steps": 5, "train.report_every": 2,
                            "early_stopping.source": "generation"}, {}, r"stopping.source generation .*every_steps=5"),
    ("eval/rewards/accuracies", {"train.eval_every": 10, "train.report_every": 5}, {}, None),
    ("eval/rewards/accuracies", {"train.eval_every": 0, "train.report_every": 7}, {}, None),  # only at the end
    ("rewards/accuracies", {"train.eval_every": 10, "train.report_every": 4}, {}, None),  # not scored on eval/
    # a gen/ score must be one the trials' generation eval reports at all
    ("gen/win_rate", {"eval.every_steps": 5, "train.report_every": 5}, {},
     r"score.metric gen/win_rate comes from the generation eval, but eval.enabled is false"),
    ("gen/win_rate", {"eval.enabled": True, "eval.every_steps": 5, "train.report_every": 5}, {},
     r"score.metric gen/win_rate: not a metric of this generation eval; it needs a judge: set eval.judge"),
    ("gen/win_rat", {"eval.enabled": True, "eval.judge": "reward_model", "eval.judge_model": "rm"}, {},
     r"gen/win_rat: not a metric of this generation eval; it reports .*gen/win_rate"),
    ("gen/distinct_3", {"eval.enabled": True}, {}, r"it reports .*gen/distinct_2"),  # eval.distinct_n is 2
    ("gen/win_rate", {"eval.enabled": True, "eval.judge": "reward_model", "eval.judge_model": "rm",
                      "eval.every_steps": 5, "train.report_every": 5, "early_stopping.source": "generation"}, {}, None),
    ("gen/kl_per_token", {"eval.enabled": True}, {}, None),  # needs no judge; only at the end
])  # fmt: skip
def test_a_score_or_signal_the_trials_do_not_report_is_refused(tmp_path, score, overrides, fixed, error):
    write(tmp_path / "m.yaml", {"method": "m", "fixed": {"loss.name": "dpo", **fixed}})
    path = make_study(tmp_path, ["m"], base_overrides={"train.max_steps": 20, **overrides},
                      score={"metric": score, "mode": "max", "epsilon": 0.05})
    study = load_study(path)
    if error is None:
        plan_study(study, study_folder(study), "sqlite:///x.db")
        return
    with pytest.raises(StudyError, match=error) as caught:
        plan_study(study, study_folder(study), "sqlite:///x.db")
    assert str(caught.value).startswith(f"{path}: method m at ")


def test_gen_metric_names_are_what_summarize_reports():
    from po_ray.config import GenerationEvalConfig
    from po_ray.eval.generation import Sample, summarize
    from po_ray.eval.metrics import gen_metric_names

    sample = Sample(0, 0, (1,), (4, 2), (4, 2), -1.0, -1.0, 2.0, 1.0, 1.0, 1.0, False, -1.0, -1.0, 2.0)
    for judge, reward in (("", None), ("reward_model", 0.5)):
        settings = GenerationEvalConfig(distinct_n=3, judge=judge, judge_model="rm")
        got = summarize([replace(sample, reward=reward, ref_reward=reward)], settings)
        assert set(got) == gen_metric_names(settings)


def test_a_study_scored_on_win_rate_and_stopped_on_generation_signals(tmp_path):
    """The unit path of such a study: ASHA rungs at the generation evals, the stopper watching
    gen/topk_entropy (not the training batch's), and the score read from sparse gen/win_rate reports."""
    from po_ray.sweep import _asha, tally

    write(tmp_path / "m.yaml", {"method": "m", "fixed": {"loss.name": "dpo"}})
    path = make_study(tmp_path, ["m"], base_overrides={
        "train.max_steps": 20, "train.report_every": 2, "eval.enabled": True, "eval.every_steps": 4,
        "eval.judge": "reward_model", "eval.judge_model": "rm"},
        score={"metric": "gen/win_rate", "mode": "max", "epsilon": 0.05},
        stopping={"source": "generation", "signal": "topk_entropy", "patience": 2, "min_steps": 0, "asha": True})
    study = load_study(path)
    plan_study(study, study_folder(study), "sqlite:///x.db")
    assert min(t for t, _ in _asha(study, StopLog(tmp_path))._brackets[0]._rungs) == 4
    stopper = StudyStopper(study.stopping, StopLog(tmp_path), max_steps=20)
    stopped = None
    for step in range(2, 21, 2):
        result = {"step": step, "loss": 0.69, "topk_entropy": 2.0}  # the training batch's signal stays put
        if step % 4 == 0:
            result |= {"gen/topk_entropy": 2.0 if step <= 8 else 0.2, "gen/win_rate": 0.5}
        if stopper("t", result):
            stopped = step
            break
    assert stopped is not None and stopper.decisions["t"].reason == "topk_entropy_collapse"
    assert stopped % 4 == 0  # decided on a generation eval's report
    frame = pd.DataFrame({"step": [2, 4, 6, 8], "gen/win_rate": [math.nan, 0.55, math.nan, 0.625]})
    finished = SimpleNamespace(path="/s/m/m_a", config={"method": "m"}, error=None, metrics_dataframe=frame)
    assert tally([finished], {}, "gen/win_rate", "max").best == (0.625, "m_a")


def test_probe_points_cover_grids_choices_range_ends_and_seeds(tmp_path):
    write(tmp_path / "mixed.yaml", {"method": "mixed", "fixed": {"loss.name": "dpo"},
                                    "space": {"loss.beta": {"grid": [0.1, 0.2]}, "optimizer.lr": {"loguniform": [1.0e-5, 1.0e-3]},
                                              "loss.nll_alpha": {"choice": [0.0, 0.5, 1.0]}}})
    study = load_study(make_study(tmp_path, ["mixed"], seeds=[0, 7]))
    points = probe_points(study.methods[0], study.seeds)
    assert len(points) == 2 * 2 * 3 * 2
    assert {p["optimizer.lr"] for p in points} == {1.0e-5, 1.0e-3}
    assert {p["train.seed"] for p in points} == {0, 7}
    assert len({tuple(sorted(p.items())) for p in points}) == len(points)


# ---------------------------------------------------------------------------------------------
# A trial's config: the study's shared places


def test_trial_config_points_at_the_study_cache_store_and_trials_folder(tmp_path):
    study, study_dir, _ = planned(make_study(tmp_path, ["dpo", "simpo"]))
    uri = study_tracking_uri(study.config, study_dir)
    assert uri == f"sqlite:///{study_dir}/mlflow.db"
    dpo = trial_config(study, study.method("dpo"), {"method": "dpo", "loss.beta": 0.3, "optimizer.lr": 1.0e-6, "train.seed": 4},
                       study_dir=study_dir, run_name="dpo_t1", tracking_uri=uri)
    assert (dpo.loss.beta, dpo.optimizer.lr, dpo.train.seed, dpo.train.max_steps) == (0.3, 1.0e-6, 4, 20)
    assert dpo.reference.strategy == "precomputed"
    assert dpo.reference.cache_dir == str(study_dir / REFERENCE_CACHE_DIR)
    assert (dpo.run.name, dpo.run.storage_path) == ("dpo_t1", str(study_dir / TRIALS_DIR))
    assert dpo.tracking.tracking_uri == uri
    simpo = trial_config(study, study.method("simpo"),
                         {"loss.beta": 2.0, "optimizer.lr": 3.0e-7, "loss.options.gamma": 0.5, "train.seed": 0},
                         study_dir=study_dir, run_name="simpo_t2", tracking_uri=uri)
    assert simpo.reference.strategy == "none"


def test_trials_report_as_their_run_config_says(tmp_path):
    # The config's own train.report_every applies: its default (the demo config sets none), the
    # study's base_overrides, then the method's fixed value.
    from po_ray.config import TrainConfig

    point = {"loss.beta": 0.1, "optimizer.lr": 1.0e-6, "train.seed": 0}
    write(tmp_path / "m3.yaml", {"method": "m3", "fixed": {"loss.name": "dpo", "train.report_every": 3}})
    for overrides, method, want in (({}, "dpo", TrainConfig.report_every), ({"train.report_every": 5}, "dpo", 5),
                                    ({"train.report_every": 5}, "m3", 3)):
        study = load_study(make_study(tmp_path, [method], base_overrides={"train.max_steps": 20, **overrides}))
        study_dir = study_folder(study)
        cfg = trial_config(study, study.methods[0], point if method == "dpo" else {"train.seed": 0},
                           study_dir=study_dir, run_name="t", tracking_uri=study_tracking_uri(study.config, study_dir))
        assert cfg.train.report_every == want
    assert TrainConfig.report_every != 1  # else the first case could not tell a forced 1 from the default


def test_an_explicit_sharded_reference_and_tracking_store_are_kept(tmp_path):
    path = make_study(tmp_path, ["dpo"], base_overrides={"reference.strategy": "sharded",
                                                          "tracking.tracking_uri": "http://127.0.0.1:5999"})
    study, study_dir, passes = planned(path)
    cfg = trial_config(study, study.methods[0], {"loss.beta": 0.1, "optimizer.lr": 1.0e-6, "train.seed": 0},
                       study_dir=study_dir, run_name="t", tracking_uri=study_tracking_uri(study.config, study_dir))
    assert cfg.reference.strategy == "sharded" and passes == []
    assert cfg.tracking.tracking_uri == "http://127.0.0.1:5999"


def test_a_driver_that_asks_for_nothing_gets_a_token_cpu(tmp_path):
    assert driver_resources(load_study(make_study(tmp_path, ["dpo"]))) == {"CPU": 0.01}
    assert driver_resources(load_study(make_study(tmp_path, ["dpo"], trial_resources={"CPU": 1, "GPU": 0}))) == {"CPU": 1}


def test_remote_storage_path_is_refused(tmp_path):
    study = load_study(make_study(tmp_path, ["dpo"], storage_path="s3://bucket/studies"))
    with pytest.raises(StudyError, match="mount"):
        study_folder(study)


# ---------------------------------------------------------------------------------------------
# One reference pass per (reference model, data, seed)


def test_methods_that_share_model_data_and_seed_share_one_pass(tmp_path):
    # dpo and ln_dpo differ only in the loss: one table; simpo needs none.
    study, study_dir, passes = planned(make_study(tmp_path, ["dpo", "ln_dpo", "simpo"]))
    assert len(passes) == 1
    (p,) = passes
    assert p.methods == ("dpo", "ln_dpo")
    assert p.config.reference.strategy == "precomputed"
    assert p.config.reference.cache_dir == str(study_dir / REFERENCE_CACHE_DIR)
    assert Path(p.config.run.storage_path).parent == study_dir and p.config.run.name.startswith("reference-")


def test_each_seed_and_each_tokenisation_gets_its_own_pass(tmp_path):
    # The seed draws the held-out split; POET changes the tokenised pairs: both change the table.
    study, _, passes = planned(make_study(tmp_path, ["dpo", "dpo_poet", "simpo", "orpo"], seeds=[0, 1]))
    got = sorted((p.config.train.seed, p.config.data.poet, p.methods) for p in passes)
    assert got == [(0, False, ("dpo",)), (0, True, ("dpo_poet",)), (1, False, ("dpo",)), (1, True, ("dpo_poet",))]
    assert len({p.config.run.name for p in passes}) == 4


def test_a_drawn_data_setting_leaves_the_tables_to_the_trials(tmp_path):
    write(tmp_path / "drawn.yaml", {"method": "drawn", "fixed": {"loss.name": "dpo"},
                                    "space": {"data.eval_fraction": {"uniform": [0.05, 0.2]}}})
    _, _, passes = planned(make_study(tmp_path, ["drawn"]))
    assert passes == []


def test_the_shipped_demo_study_plans_one_pass(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # its storage_path is relative to the cwd
    study, study_dir, passes = planned(SPACES_DIR / "robustness-demo.yaml")
    assert study_dir == tmp_path / "po_ray_runs" / "robustness-demo"
    assert [p.methods for p in passes] == [("dpo", "ln_dpo")]
    assert not study_dir.exists()


# ---------------------------------------------------------------------------------------------
# Why trials stopped


@pytest.mark.parametrize("metric, overrides, error", [
    ("eval/rewards/accuracies", {"train.eval_every": 0}, "train.eval_every is 0"),
    ("gen/win_rate", {"eval.enabled": True, "eval.every_steps": 0}, "eval.every_steps is 0"),
    ("gen/win_rate", {"eval.enabled": True, "eval.every_steps": 5}, None),
    ("rewards/accuracies", {"train.eval_every": 0}, None),
])
def test_asha_needs_the_score_during_training(tmp_path, metric, overrides, error):
    from po_ray.sweep import _asha

    write(tmp_path / "m.yaml", {"method": "m", "fixed": {"loss.name": "dpo"}})
    path = make_study(tmp_path, ["m"], base_overrides={"train.max_steps": 20, **overrides},
                      score={"metric": metric, "mode": "max", "epsilon": 0.05}, stopping={"asha": True})
    study = load_study(path)
    if error:
        with pytest.raises(StudyError, match=error):
            _asha(study, StopLog(tmp_path))
    else:
        first_rung = min(t for t, _ in _asha(study, StopLog(tmp_path))._brackets[0]._rungs)
        assert first_rung == overrides.get("eval.every_steps", 1)  # no cut before the first score exists


def test_stop_log_merges_and_never_overwrites_a_stop(tmp_path):
    log = StopLog(tmp_path)
    assert log.read() == {}
    log.record("a", StopDecision("topk_entropy_collapse", 12, "entropy fell"))
    StopLog(tmp_path).record("b", StopDecision("asha", 10, "cut"))  # e.g. a resumed session
    log.record("a", StopDecision("divergence", 30, "later"))
    stops = CollapseStopper.load(tmp_path / "stops.json")
    assert stops == {"a": StopDecision("topk_entropy_collapse", 12, "entropy fell"), "b": StopDecision("asha", 10, "cut")}


def test_study_stopper_writes_the_decision_when_it_stops(tmp_path):
    study = load_study(make_study(tmp_path, ["dpo"], stopping={"divergence_factor": 3.0, "min_steps": 100}))
    stopper = StudyStopper(study.stopping, StopLog(tmp_path))
    assert [stopper("t1", {"step": s, "loss": 0.7, "topk_entropy": 2.0}) for s in (1, 2)] == [False, False]
    assert stopper("t2", {"step": 1, "loss": 0.7}) is False
    assert stopper("t2", {"step": 2, "loss": 2.2}) is True  # > 3 × 0.7
    assert not (tmp_path / "stops.json").read_text().count("t1")
    stops = CollapseStopper.load(tmp_path / "stops.json")
    assert list(stops) == ["t2"] and (stops["t2"].reason, stops["t2"].step) == ("divergence", 2)


def test_a_collapse_seen_on_the_last_step_is_not_an_early_stop(tmp_path):
    study = load_study(make_study(tmp_path, ["dpo"], stopping={"divergence_factor": 3.0}))
    stopper = StudyStopper(study.stopping, StopLog(tmp_path), max_steps=20)
    assert stopper("t", {"step": 10, "loss": 0.7}) is False
    assert stopper("t", {"step": 20, "loss": 9.0}) is False  # finished, whatever the loss did
    assert stopper("u", {"step": 10, "loss": 0.7}) is False
    assert stopper("u", {"step": 19, "loss": 9.0}) is True
    assert list(CollapseStopper.load(tmp_path / "stops.json")) == ["u"]


def test_non_finite_step_is_found_anywhere_in_the_chain():
    try:
        try:
            raise FloatingPointError("non-finite loss at step 7 (pairs on this rank: [3]); no update was applied.")
        except FloatingPointError as inner:
            raise RuntimeError("Training failed: worker group error") from inner
    except RuntimeError as e:
        assert non_finite_step(e) == 7
    assert non_finite_step(RuntimeError("CUDA out of memory at step 7")) is None


def test_a_stop_is_recorded_in_the_trial_folder_and_its_mlflow_run_at_once(tmp_path):
    from mlflow.tracking import MlflowClient

    from po_ray.tracking import Tracker, default_tracking_uri

    uri = default_tracking_uri(tmp_path / "store")
    runs = {}
    for name in ("dpo_t1", "dpo_t2"):
        child = Tracker(uri, "po_ray", name)
        runs[name] = child.start()
        (tmp_path / TRIALS_DIR / name).mkdir(parents=True)
        (tmp_path / TRIALS_DIR / name / "mlflow_run_id").write_text(runs[name])
    study = load_study(make_study(tmp_path, ["dpo"], stopping={"divergence_factor": 3.0}))
    log = StopLog(tmp_path, (uri, "po_ray"))
    stopper = StudyStopper(study.stopping, log, max_steps=20)
    config = {"method": "dpo", "train.seed": 0}  # Tune puts the trial's config into every result
    assert stopper("t1", {"step": 1, "loss": 0.7, "config": config}) is False
    assert stopper("t1", {"step": 4, "loss": 2.5, "config": config}) is True
    log.record_failure("dpo_t2", "RuntimeError: boom")

    assert json.loads((tmp_path / TRIALS_DIR / "dpo_t1" / "stop.json").read_text()) == {
        "reason": "divergence", "step": 4, "detail": CollapseStopper.load(tmp_path / "stops.json")["t1"].detail}
    client = MlflowClient(tracking_uri=uri)
    stopped, failed = client.get_run(runs["dpo_t1"]), client.get_run(runs["dpo_t2"])
    assert (stopped.data.tags["stop_reason"], stopped.data.tags["stop_step"], stopped.info.status) == (
        "divergence", "4", "KILLED")
    assert "3 × the first loss" in stopped.data.tags["stop_detail"]
    assert (failed.data.tags["error"], failed.info.status) == ("RuntimeError: boom", "FAILED")
    assert not (tmp_path / TRIALS_DIR / "dpo_t2" / "stop.json").exists()


class FakeTrainer:
    """Stands in for a TorchTrainer: each fit() raises the next scripted error (None: returns)."""

    def __init__(self, script, built):
        self.script, self.built = script, built

    def __call__(self, cfg, **kwargs):
        self.built.append(cfg)
        return self

    def fit(self):
        error = self.script.pop(0)
        if error is not None:
            raise error


@pytest.mark.parametrize("script, max_failures, fits, reported, raises", [
    # The loop's non-finite stop: no second fit, a NaN loss at its step for the stopper.
    ([RuntimeError("worker group error: non-finite gradient at step 7")], 2, 1, [{"step": 7, "loss": math.nan}], False),
    # Other errors: re-fit (from the run's last checkpoint) up to run.max_failures times.
    ([RuntimeError("node lost"), None], 2, 2, [], False),
    ([RuntimeError("node lost"), RuntimeError("node lost"), RuntimeError("node lost")], 2, 3, [], True),
    ([RuntimeError("node lost")], 0, 1, [], True),
    ([RuntimeError("node lost"), RuntimeError("non-finite loss at step 3 (pairs [1])")], 1, 2,
     [{"step": 3, "loss": math.nan}], False),
])  # fmt: skip
def test_run_trial_retries_failures_but_never_a_nan(tmp_path, monkeypatch, script, max_failures, fits, reported, raises):
    import po_ray.sweep as sweep

    study = load_study(make_study(tmp_path, ["dpo"], base_overrides={"train.max_steps": 20,
                                                                       "run.max_failures": max_failures}))
    built, reports = [], []
    monkeypatch.setattr(sweep, "build_trainer", FakeTrainer(list(script), built))
    monkeypatch.setattr(sweep, "TuneReportCallback", lambda: None)
    context = SimpleNamespace(get_trial_name=lambda: "dpo_t1", get_trial_id=lambda: "t1")
    monkeypatch.setattr(sweep.tune, "get_context", lambda: context)
    monkeypatch.setattr(sweep.tune, "report", reports.append)
    setup = sweep.TrialSetup(study, str(study_folder(study)), "sqlite:///x.db", None)
    params = {"method": "dpo", "loss.beta": 0.1, "optimizer.lr": 1.0e-6, "train.seed": 0}
    if raises:
        with pytest.raises(RuntimeError, match="node lost"):
            sweep.run_trial(params, setup)
    else:
        sweep.run_trial(params, setup)
    assert len(built) == fits
    assert all(cfg.run.max_failures == 0 for cfg in built)  # Ray Train itself retries nothing
    assert len(reports) == len(reported)
    for got, want in zip(reports, reported):
        assert got["step"] == want["step"] and math.isnan(got["loss"])


# ---------------------------------------------------------------------------------------------
# Progress


class FakeTrial(SimpleNamespace):
    """What StudyProgress reads of a Tune Trial (whose str() is its name)."""

    def __str__(self):
        return trial_name(self)


def fake_trial(trial_id, status, method="dpo"):
    return FakeTrial(trial_id=trial_id, status=status, config={"method": method}, local_path=f"/x/{trial_id}",
                     get_error=lambda: "Traceback (most recent call last):\nRuntimeError: boom\n")


def test_progress_counts_running_done_stopped_and_tracks_the_best(tmp_path, capsys):
    log = StopLog(tmp_path)
    log.record("t2", StopDecision("topk_mass_collapse", 9, "mass fell"))
    progress = StudyProgress("dpo", 5, "eval/rewards/accuracies", "max", log)
    trials = [fake_trial("t1", "TERMINATED"), fake_trial("t2", "TERMINATED"), fake_trial("t3", "RUNNING")]
    progress.on_trial_result(0, trials, trials[2], {"step": 10, "eval/rewards/accuracies": 0.5})
    progress.on_trial_result(0, trials, trials[0], {"step": 10, "eval/rewards/accuracies": 0.75})
    progress.on_trial_result(0, trials, trials[2], {"step": 11, "loss": 0.3})  # no score: no line
    progress.on_trial_complete(0, trials, trials[1])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 6
    assert out[3].endswith("1 running, 1 done, 1 stopped early, 0 failed, 2 waiting | best eval/rewards/accuracies 0.75 (dpo_t1)")
    assert "dpo_t2 stopped early at step 9 (topk_mass_collapse: mass fell)" in out[4]


def test_progress_counts_the_trial_an_event_is_about_in_its_new_state(tmp_path, capsys):
    # Tune calls back before it updates the trial's status.
    progress = StudyProgress("dpo", 2, "eval/rewards/accuracies", "max", StopLog(tmp_path))
    trials = [fake_trial("t1", "PENDING"), fake_trial("t2", "PENDING")]
    progress.on_trial_start(0, trials, trials[0])
    trials[0].status = "RUNNING"
    progress.on_trial_complete(0, trials, trials[0])
    trials[0].status = "TERMINATED"
    progress.on_trial_error(0, trials, trials[1])
    out = capsys.readouterr().out.splitlines()
    assert out[1].endswith("1 running, 0 done, 0 stopped early, 0 failed, 1 waiting")
    assert out[2].endswith("dpo_t1 finished") and out[3].endswith("0 running, 1 done, 0 stopped early, 0 failed, 1 waiting")
    assert "/x/t2/error.txt" in out[4] and out[5].endswith("0 running, 1 done, 0 stopped early, 1 failed, 0 waiting")


def test_progress_also_counts_the_whole_study(tmp_path, capsys):
    # Two earlier methods: 3 done, 1 stopped, 1 failed, best 0.9; a later one still has 4 waiting.
    from po_ray.sweep import Tally

    others = Tally(done=3, stopped=1, failed=1, waiting=4, best=(0.9, "simpo_s1"))
    progress = StudyProgress("dpo", 2, "eval/rewards/accuracies", "max", StopLog(tmp_path), others)
    trials = [fake_trial("t1", "RUNNING"), fake_trial("t2", "PENDING")]
    progress.on_trial_result(0, trials, trials[0], {"step": 10, "eval/rewards/accuracies": 0.6})
    progress.on_trial_result(0, trials, trials[0], {"step": 20, "eval/rewards/accuracies": 0.95})
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "[po-ray] dpo: 1 running, 0 done, 0 stopped early, 0 failed, 1 waiting | best eval/rewards/accuracies 0.6 (dpo_t1)"
    assert out[2] == "[po-ray] study: 1 running, 3 done, 1 stopped early, 1 failed, 5 waiting | best eval/rewards/accuracies 0.9 (simpo_s1)"
    assert out[5] == "[po-ray] study: 1 running, 3 done, 1 stopped early, 1 failed, 5 waiting | best eval/rewards/accuracies 0.95 (dpo_t1)"


def test_tally_of_finished_results():
    from po_ray.sweep import tally

    def result(name, scores, error=None):
        frame = pd.DataFrame({"step": range(1, len(scores) + 1), "eval/rewards/accuracies": scores})
        return SimpleNamespace(path=f"/s/dpo/{name}", config={"method": "dpo"}, error=error, metrics_dataframe=frame)

    results = [result("dpo_a", [0.5, math.nan, 0.7]), result("dpo_b", [0.9, 0.6]),  # last value, not the best
               result("dpo_c", [0.8], error=RuntimeError("x")), result("dpo_d", [math.nan])]
    stops = {"b": StopDecision("topk_mass_collapse", 2, "")}
    got = tally(results, stops, "eval/rewards/accuracies", "max", waiting=6)
    assert (got.done, got.stopped, got.failed, got.waiting) == (2, 1, 1, 6)
    assert got.best == (0.8, "dpo_c")
    assert tally(results, stops, "eval/rewards/accuracies", "min").best == (0.6, "dpo_b")
    assert tally([], {}, "eval/rewards/accuracies", "max").best is None


# ---------------------------------------------------------------------------------------------
# The study folder: claimed once, resumed on purpose


def test_resume_needs_a_study_and_a_new_run_needs_a_fresh_folder(tmp_path):
    path = make_study(tmp_path, ["dpo"])
    with pytest.raises(StudyError, match="--resume: no study 's'"):
        run_study(path, resume=True)
    study_dir = tmp_path / "runs" / "s"
    study_dir.mkdir(parents=True)
    (study_dir / STUDY_FILE).write_text(json.dumps({"overrides": ["train.max_steps=5"]}))
    with pytest.raises(StudyError, match="already ran in .*--resume"):
        run_study(path)
    with pytest.raises(StudyError, match=r"started with overrides \['train.max_steps=5'\]"):
        run_study(path, overrides=["train.max_steps=6"], resume=True)


def test_report_of_a_folder_that_is_not_a_study(tmp_path):
    with pytest.raises(ReportError, match="not a study folder"):
        report_study(tmp_path)


def test_report_study_rewrites_the_report_from_the_folder(tmp_path):
    study_dir = tmp_path / "s"
    for i, (method, acc, steps) in enumerate([("dpo", 0.8, 20), ("dpo", 0.5, 9), ("simpo", 0.7, 20)]):
        trial = study_dir / method / f"{method}_t{i}"
        trial.mkdir(parents=True)
        params = {"method": method, "loss.beta": 0.1 * (i + 1), "train.seed": 0}
        (trial / "params.json").write_text(json.dumps(params))
        rows = [{"step": s, "loss": 0.6, "trial_id": f"t{i}", "config": params} for s in range(1, steps)]
        rows.append({"step": steps, "loss": 0.5, "eval/rewards/accuracies": acc, "trial_id": f"t{i}", "config": params})
        (trial / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    StopLog(study_dir).record("t1", StopDecision("divergence", 9, "loss rose"))
    (study_dir / STUDY_FILE).write_text(json.dumps({
        "score": {"metric": "eval/rewards/accuracies", "mode": "max", "epsilon": 0.15}, "max_steps": 20,
        "parent_run_id": None, "tracking_uri": None, "experiment_name": "po_ray"}))
    paths = report_study(study_dir)
    assert {"report", "summary", "trials", "score_distribution", "signals"} <= set(paths)
    summary = {r["method"]: r for r in pd.read_csv(paths["summary"]).to_dict("records")}
    assert summary["dpo"]["best"] == 0.8 and summary["dpo"]["stopped"] == 1 and summary["dpo"]["steps_saved"] == 11
    assert summary["simpo"]["within_epsilon"] == 1 and summary["dpo"]["within_epsilon"] == 1


def test_report_study_leaves_the_parent_runs_status_as_it_is(tmp_path):
    from mlflow.tracking import MlflowClient

    from po_ray.tracking import Tracker, default_tracking_uri

    uri = default_tracking_uri(tmp_path / "store")
    study_dir = tmp_path / "s"
    trial = study_dir / "dpo" / "dpo_t0"
    trial.mkdir(parents=True)
    (trial / "params.json").write_text(json.dumps({"method": "dpo", "train.seed": 0}))
    (trial / "result.json").write_text(json.dumps({"step": 1, "loss": 0.6, "eval/rewards/accuracies": 0.5,
                                                   "trial_id": "t0", "config": {"method": "dpo", "train.seed": 0}}) + "\n")
    for status in ("KILLED", "RUNNING"):  # an interrupted study; one still running elsewhere
        parent = Tracker(uri, "po_ray", "s")
        run_id = parent.start()
        if status != "RUNNING":
            parent.end(status)
        (study_dir / STUDY_FILE).write_text(json.dumps({
            "score": {"metric": "eval/rewards/accuracies", "mode": "max", "epsilon": 0.1}, "max_steps": 1,
            "parent_run_id": run_id, "tracking_uri": uri, "experiment_name": "po_ray"}))
        report_study(study_dir)
        client = MlflowClient(tracking_uri=uri)
        assert client.get_run(run_id).info.status == status
        assert "report/report.md" in {a.path for a in client.list_artifacts(run_id, "report")}


# ---------------------------------------------------------------------------------------------
# The real thing, small


SANE_LR, SANE_BETAS = 1.0e-3, (0.1, 0.2)
OVER = {"optimizer.lr": 0.08, "loss.beta": 0.01}  # large learning rate, small β
MAX_STEPS = 24
SCORE, EPSILON = "eval/rewards/accuracies", 0.05


@pytest.fixture
def ray_shutdown():
    import ray

    yield
    ray.shutdown()


def read_tune_trials(study_dir: Path) -> dict[str, tuple[dict, list[dict]]]:
    """Trial name -> (params.json, result.json rows), read straight from the Tune folders."""
    trials = {}
    for params in study_dir.glob("*/*/params.json"):
        rows = [json.loads(line) for line in (params.parent / "result.json").read_text().splitlines() if line]
        trials[params.parent.name] = (json.loads(params.read_text()), rows)
    return trials


def last_score(rows: list[dict]) -> float:
    values = [r[SCORE] for r in rows if isinstance(r.get(SCORE), float) and math.isfinite(r[SCORE])]
    return values[-1] if values else math.nan


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_sweep_stops_the_over_optimising_cell_and_tracks_and_reports_the_study(tmp_path, ray_shutdown, monkeypatch,
                                                                                capsys):
    import dataclasses
    import statistics

    from mlflow.tracking import MlflowClient

    from po_ray.stoppers import COLLAPSE_REASONS

    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # An over-optimising cell (its own method) and two sane ones (a grid over β), all DPO on the
    # same data and seed: one reference table serves all three. The stopped one runs first, so
    # the sane ones can only start if the stopped trial's workers were freed. run.max_failures
    # keeps its default (2): a trial that went non-finite must still not be re-run.
    write(tmp_path / "over.yaml", {"method": "over", "fixed": {"loss.name": "dpo", **OVER}})
    write(tmp_path / "sane.yaml", {"method": "sane", "fixed": {"loss.name": "dpo", "optimizer.lr": SANE_LR},
                                   "space": {"loss.beta": {"grid": list(SANE_BETAS)}}})
    path = make_study(
        tmp_path,
        ["over", "sane"],
        name="tiny",
        base_overrides={
            "train.max_steps": MAX_STEPS, "train.eval_every": 4, "train.eval_batches": 2, "train.log_every": 8,
            "train.report_every": 1, "optimizer.scheduler": "constant", "optimizer.warmup_steps": 0,
            "checkpoint.export_model": False, "checkpoint.every_steps": 0,
        },
        score={"metric": SCORE, "mode": "max", "epsilon": EPSILON},
        stopping={"signal": "both", "ema": 0.3, "drop_fraction": 0.25, "patience": 2, "min_steps": 3,
                  "divergence_factor": 4.0},
    )  # fmt: skip
    out = run_study(path)
    study_dir = Path(out["study_dir"])
    assert out["interrupted"] is False

    # ---- the trials, read from their Tune folders (not through po_ray.report) -----------------
    tune_trials = read_tune_trials(study_dir)
    by_method: dict[str, list[str]] = {}
    for name, (params, _) in sorted(tune_trials.items()):
        by_method.setdefault(params["method"], []).append(name)
    assert {m: len(names) for m, names in by_method.items()} == {"over": 1, "sane": 2}
    (over,) = by_method["over"]
    over_rows = tune_trials[over][1]
    stops = CollapseStopper.load(study_dir / "stops.json")
    assert set(stops) == {over_rows[0]["trial_id"]}
    stop = stops[over_rows[0]["trial_id"]]
    # Stopped for top-k collapse (not NaN, not divergence), before the end; every step reported
    # once up to the stop: Ray Train did not re-run it, and nothing after the stop reached Tune.
    assert stop.reason in COLLAPSE_REASONS, stop
    assert [r["step"] for r in over_rows] == list(range(1, stop.step + 1)) and stop.step < MAX_STEPS
    assert all(r.get("skipped_steps") == 0 for r in over_rows)
    assert json.loads((study_dir / TRIALS_DIR / over / "stop.json").read_text()) == dataclasses.asdict(stop)
    for name in by_method["sane"]:
        params, rows = tune_trials[name]
        assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
        assert math.isfinite(last_score(rows)) and not (study_dir / TRIALS_DIR / name / "stop.json").exists()
    assert sorted(tune_trials[n][0]["loss.beta"] for n in by_method["sane"]) == list(SANE_BETAS)

    # One reference pass for the study: one table, written before any trial began (a trial that
    # recomputed it would have replaced the file after its own start), and read by every trial
    # (none computed a live reference instead).
    tables = list((study_dir / REFERENCE_CACHE_DIR).glob("*/logps.safetensors"))
    assert len(tables) == 1
    first_trial_start = min((study_dir / p["method"] / n / "params.json").stat().st_mtime
                            for n, (p, _) in tune_trials.items())
    assert tables[0].stat().st_mtime < first_trial_start
    for name in by_method["sane"]:  # the stopped trial's workers were killed before their summary
        assert json.loads((study_dir / TRIALS_DIR / name / "summary.json").read_text())["reference_strategy"] == "precomputed"

    # ---- MLflow: the parent run, one nested child per trial with its step metrics and stop tags
    manifest = json.loads((study_dir / STUDY_FILE).read_text())
    client = MlflowClient(tracking_uri=manifest["tracking_uri"])
    parent = client.get_run(manifest["parent_run_id"])
    assert parent.data.params["study.methods"] == "over,sane" and parent.info.status == "FINISHED"
    assert "report/report.md" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {c.info.run_name: c for c in children}
    assert set(by_name) == set(tune_trials)
    for name, method in [(over, "over")] + [(n, "sane") for n in by_method["sane"]]:
        run = by_name[name]
        assert run.data.tags["method"] == method
        assert run.data.params["reference.strategy"] == "precomputed"
        assert float(run.data.params["loss.beta"]) == tune_trials[name][0].get("loss.beta", OVER["loss.beta"])
    over_run = by_name[over]
    assert float(over_run.data.params["optimizer.lr"]) == OVER["optimizer.lr"]
    assert client.get_metric_history(over_run.info.run_id, "topk_entropy")
    assert over_run.data.tags["stop_reason"] == stop.reason and over_run.data.tags["stop_step"] == str(stop.step)
    assert over_run.info.status == "KILLED"
    for name in by_method["sane"]:
        run = by_name[name]
        assert "stop_reason" not in run.data.tags and run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, MAX_STEPS + 1))
    assert parent.data.metrics["over/stopped"] == 1 and parent.data.metrics["sane/stopped"] == 0

    # ---- the report's numbers, recomputed here from the trials' result.json files --------------
    scores = {m: [last_score(tune_trials[n][1]) for n in names] for m, names in by_method.items()}
    best_all = max(x for xs in scores.values() for x in xs if math.isfinite(x))
    summary = pd.read_csv(study_dir / "report" / "summary.csv").set_index("method")
    for method, xs in scores.items():
        finite = sorted(x for x in xs if math.isfinite(x))
        row = summary.loc[method]
        assert (row["trials"], row["scored"]) == (len(xs), len(finite))
        if finite:
            q1, _, q3 = statistics.quantiles(finite, n=4, method="inclusive") if len(finite) > 1 else [finite[0]] * 3
            assert row["best"] == pytest.approx(max(finite)) and row["worst"] == pytest.approx(min(finite))
            assert row["median"] == pytest.approx(statistics.median(finite))
            assert row["iqr"] == pytest.approx(q3 - q1)
        good = sum(best_all - x <= EPSILON + 1e-12 for x in finite)
        assert row["within_epsilon"] == good and row["share_within_epsilon"] == pytest.approx(good / len(xs))
    assert summary.loc["over", "stopped"] == 1 and summary.loc["over", "stopped_collapse"] == 1
    assert summary.loc["over", "steps_saved"] == MAX_STEPS - over_rows[-1]["step"]
    assert (summary.loc["sane", "stopped"], summary.loc["sane", "steps_saved"]) == (0, 0)
    report = study_dir / "report"
    assert over in (report / "report.md").read_text()
    trials_csv = pd.read_csv(report / "trials.csv").set_index("trial_name")
    assert (trials_csv.loc[over, "stop_reason"], trials_csv.loc[over, "stop_step"]) == (stop.reason, stop.step)
    assert all((report / f).is_file() for f in ("score_distribution.png", "signals.png", "params_sane.png"))

    # ---- progress: study-wide counts and best on the driver's output ---------------------------
    printed = capsys.readouterr().out
    assert f"[po-ray] study: 0 running, 2 done, 1 stopped early, 0 failed, 0 waiting | best {SCORE}" in printed

    # Resuming a finished study re-runs nothing: the trials' results stay as they are.
    before = {n: (study_dir / p["method"] / n / "result.json").read_text() for n, (p, _) in tune_trials.items()}
    again = run_study(path, resume=True)
    assert again["parent_run_id"] == manifest["parent_run_id"]
    assert {n: (study_dir / p["method"] / n / "result.json").read_text() for n, (p, _) in tune_trials.items()} == before


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_a_killed_study_driver_resumes_without_rerunning_finished_trials(tmp_path, ray_shutdown):
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    for name, lr in (("first", 1.0e-3), ("second", 2.0e-3)):
        write(tmp_path / f"{name}.yaml", {"method": name, "fixed": {"loss.name": "dpo", "optimizer.lr": lr}})
    path = make_study(
        tmp_path, ["first", "second"], name="killed",
        base_overrides={"train.max_steps": MAX_STEPS, "train.eval_every": 0, "train.eval_batches": 2,
                        "optimizer.scheduler": "constant", "optimizer.warmup_steps": 0,
                        "checkpoint.export_model": False, "checkpoint.every_steps": 8},
        stopping={"signal": "topk_entropy", "drop_fraction": 0.9, "patience": 50, "min_steps": 50},
    )  # fmt: skip
    study_dir = tmp_path / "runs" / "killed"
    driver = subprocess.Popen([sys.executable, "-m", "po_ray.cli", "sweep", "--study", str(path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    tree: set = set()
    try:
        # Kill the driver (and the local Ray cluster it started) once the first method is done and the
        # second trial is past its first checkpoint.
        deadline = time.time() + 600
        while time.time() < deadline and driver.poll() is None:
            tree |= {p.pid for p in psutil.Process(driver.pid).children(recursive=True)}
            ledgers = list((study_dir / "trials").glob("second_*/ledger/rank0.jsonl"))
            if ledgers and len(ledgers[0].read_text().splitlines()) >= 10:
                break
            time.sleep(0.5)
        assert driver.poll() is None, "the study ended before it could be killed"
        assert ledgers, "the second trial never got past step 10"
    finally:
        for pid in [driver.pid, *tree]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        driver.wait()
    first_dir = next((study_dir / "first").glob("first_*"))
    first_results = (first_dir / "result.json").read_text()

    out = run_study(path, resume=True)
    assert out["interrupted"] is False
    trials = load_trials(study_dir).set_index("method")
    assert list(trials["steps"]) == [MAX_STEPS, MAX_STEPS]
    assert (first_dir / "result.json").read_text() == first_results, "the finished trial ran again"
    # The interrupted trial continued from its checkpoint: every step once, no pair twice.
    rows = [json.loads(line) for line in ledgers[0].read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
    pairs = [i for r in rows for i in r["pair_ids"]]
    assert len(pairs) == len(set(pairs))
    assert (study_dir / "report" / "summary.csv").is_file()


def test_the_closing_line_prints_no_secret(tmp_path, monkeypatch):
    from po_ray.sweep import _format_summary

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cr3t-mlflow-pw")
    manifest = {"parent_run_id": "p123", "tracking_uri": "https://ci:s3cr3t-mlflow-pw@mlflow.internal/"}
    text = _format_summary(SimpleNamespace(name="robust"), tmp_path, [], [], {}, manifest)
    assert text == "\n".join([
        "",
        "=== po-ray: study robust finished ===",
        "0 trials: 0 stopped early, 0 failed",
        "study folder".ljust(32) + f" {tmp_path}",
        "MLflow parent run".ljust(32) + " p123 in https://ci:***@mlflow.internal/",
    ])
    assert "s3cr3t" not in text

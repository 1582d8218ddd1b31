"""Robustness sweeps: a Ray Tune study of whole hyperparameter grids, one Ray Train run per trial.

    po-ray sweep --study tune_spaces/robustness-demo.yaml [key=value …] [--resume]

The recipe, top to bottom (``run_study``):
  1. load the study and build every trial's run config up front (each cell of each method's grid,
     both ends of each sampled range, each seed), so a typo fails before anything runs;
  2. start (or, with --resume, continue) one MLflow parent run for the study;
  3. compute the reference log-probs once per (reference model, data, seed) — the ``precomputed``
     reference strategy's cache — so a study of T reference-based trials does one pass, not T;
     reference-free methods need none;
  4. per method, one Tune ``Tuner`` (its own experiment folder and, with ``stopping.asha``, its own
     ASHA brackets, so methods are never cut against each other's scores) whose trainable is a
     driver function: it builds the trial's ``TorchTrainer`` (ZeRO-3 workers) and forwards every
     Train report to Tune, where ``CollapseStopper`` watches top-k entropy / mass, NaN and divergence
     and records each stop as it decides it (``StopLog``: stops.json, the trial's stop.json, its
     MLflow child run);
  5. write the report (Markdown, CSV, plots) and log it to the parent run.

The study folder (``<storage_path>/<name>``) holds everything: ``study.json`` (what ran, for
--resume and ``po-ray report``), one Tune experiment per method (``<method>/<trial>/result.json``),
the trials' Train runs (``trials/<trial>/``: checkpoints, ledger, summary, stop.json), the reference cache
and its runs, the MLflow store (unless a server is given), ``stops.json`` and ``report/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import typing
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from po_ray.config import Config, load_config
from po_ray.eval.metrics import gen_metric_names
from po_ray.launch import build_trainer, check_storage, ensure_ray
from po_ray.losses import build_loss, loss_needs_reference
from po_ray.losses.registry import import_loss_plugins
from po_ray.reference import reference_identity, resolve_strategy
from po_ray.report import REPORT_DIR, STOP_FILE, STOPS_FILE, ReportError, write_report
from po_ray.stoppers import CollapseStopper, StopDecision
from po_ray.study import SEED_KEY, MethodSpace, StudyError, StudySpec, count_trials, load_study, to_tune_space, trial_overrides
from po_ray.tracking import redact_text

STUDY_FILE = "study.json"
TRIALS_DIR = "trials"
REFERENCE_CACHE_DIR = "reference_cache"
REFERENCE_RUNS_DIR = "reference_runs"
RESERVED_NAMES = (TRIALS_DIR, REFERENCE_CACHE_DIR, REFERENCE_RUNS_DIR, REPORT_DIR)

# Ray Train hands worker reports to its controller (and so to Tune) once per health check, 2 s by
# default: a tiny model's steps would reach the stopper in bunches, or not at all before the end.
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_S = "0.2"
# A key under these sections changes what the reference pass computes (see reference_identity).
_REFERENCE_SECTIONS = ("model.", "data.", "reference.")
_NON_FINITE = re.compile(r"non-finite (?:loss|gradient) at step (\d+)")


# ---------------------------------------------------------------------------------------------
# Trial configs and the reference passes (pure: no Ray started)


@dataclass(frozen=True)
class ReferencePass:
    config: Config
    """Run config of the pass: a reference-based trial's, under reference_runs/."""
    methods: tuple[str, ...]
    """Methods whose trials read this pass's table."""


def study_folder(study: StudySpec) -> Path:
    """<storage_path>/<name>, absolute (relative storage paths are under the cwd)."""
    if "://" in study.storage_path:
        raise StudyError(
            f"{study.path}: storage_path: {study.storage_path!r}: the study writes its reference cache, stops and "
            "report with plain file I/O; mount the bucket or share on every node and give the mount's path"
        )
    return Path(study.storage_path).expanduser().resolve() / study.name


def study_tracking_uri(cfg: Config, study_dir: Path) -> str:
    """The MLflow store of the whole study: the configured one, else a SQLite file in the study folder."""
    if cfg.tracking.tracking_uri:
        from po_ray.tracking import resolve_tracking_uri

        return resolve_tracking_uri(cfg.tracking, study_dir)
    return "sqlite:///" + (study_dir / "mlflow.db").as_posix()


def for_study(cfg: Config, study_dir: Path, run_name: str, tracking_uri: str) -> Config:
    """A trial's config with the study's shared places: its Train run at study_dir/trials/run_name,
    the study's reference cache and MLflow store (unless the config names its own), and the
    precomputed reference wherever the loss needs one and the config did not ask for `sharded`."""
    reference = cfg.reference
    if loss_needs_reference(cfg.loss) and reference.strategy in ("auto", "precomputed"):
        reference = replace(reference, strategy="precomputed")
    if not reference.cache_dir:
        reference = replace(reference, cache_dir=str(study_dir / REFERENCE_CACHE_DIR))
    tracking = cfg.tracking if cfg.tracking.tracking_uri else replace(cfg.tracking, tracking_uri=tracking_uri)
    run = replace(cfg.run, name=run_name, storage_path=str(study_dir / TRIALS_DIR))
    return replace(cfg, run=run, reference=reference, tracking=tracking)


def trial_config(study: StudySpec, method: MethodSpace, params: dict, *, study_dir: Path, run_name: str,
                 tracking_uri: str) -> Config:
    """The run config of one trial: base config, the method's fixed values, the point ``params``
    (Tune's config, with or without its ``method`` field), then the study's shared places.
    train.report_every is the config's own: each report is a barrier over all workers, and the
    stopper counts reports, so ``patience`` reports span patience × report_every steps."""
    point = {k: v for k, v in params.items() if k != "method"}
    cfg = load_config(study.base_config, trial_overrides(study, method, point))
    return for_study(cfg, study_dir, run_name, tracking_uri)


def probe_points(method: MethodSpace, seeds: typing.Sequence[int]) -> list[dict]:
    """Every grid cell × every listed choice × both ends of every sampled range × every seed:
    the points whose configs are checked before a study starts."""
    keys = list(method.space)
    values = itertools.product(*(method.space[k].values for k in keys))
    return [{**dict(zip(keys, v)), SEED_KEY: seed} for v in values for seed in seeds]


def plan_study(study: StudySpec, study_dir: Path, tracking_uri: str) -> list[ReferencePass]:
    """Check every trial's config (config keys, loss and its knobs, reference strategy) and group
    the reference-based ones by what their reference table depends on; returns one pass per group.

    Raises StudyError naming the study file, the method and the point on the first bad config.
    """
    groups: dict[str, tuple[Config, list[str]]] = {}
    for method in study.methods:
        if method.name in RESERVED_NAMES:
            raise StudyError(f"{study.path}: method {method.name!r}: the name is taken by the study folder's "
                             f"{method.name}/; rename the method")
        # A range drawn per trial over a data/model key gives every trial its own table; the
        # trials then compute it themselves (strategy precomputed still saves the live reference).
        drawn = [k for k, d in method.space.items() if d.kind in ("uniform", "loguniform") and k.startswith(_REFERENCE_SECTIONS)]
        for point in probe_points(method, study.seeds):
            try:
                cfg = trial_config(study, method, point, study_dir=study_dir, run_name="check", tracking_uri=tracking_uri)
                import_loss_plugins(cfg)
                build_loss(cfg.loss)
                resolve_strategy(cfg)
                check_gen_score(study, cfg)
                check_reports(study, cfg)
            except ValueError as e:  # ConfigError, StudyError and the loss registry's errors
                where = ", ".join(f"{k}={v}" for k, v in point.items())
                raise StudyError(f"{study.path}: method {method.name} at {where}: {e}") from None
            if cfg.reference.strategy != "precomputed" or drawn:
                continue
            key = json.dumps([reference_identity(cfg), cfg.reference.cache_dir], sort_keys=True, default=str)
            groups.setdefault(key, (cfg, []))[1].append(method.name)
    passes = []
    for key, (cfg, methods) in groups.items():
        name = "reference-" + hashlib.sha256(key.encode()).hexdigest()[:10]
        run = replace(cfg.run, name=name, storage_path=str(study_dir / REFERENCE_RUNS_DIR))
        passes.append(ReferencePass(replace(cfg, run=run), tuple(dict.fromkeys(methods))))
    return passes


def check_gen_score(study: StudySpec, cfg: Config) -> None:
    """Raise StudyError when a ``gen/`` score is one this trial's generation eval never reports:
    eval disabled, a judge metric (win rate, rewards) without eval.judge, or a name it has no such
    metric under. Every trial would otherwise end without a score."""
    metric = study.score.metric
    if not metric.startswith("gen/"):
        return
    if not cfg.eval.enabled:
        raise StudyError(f"score.metric {metric} comes from the generation eval, but eval.enabled is false; "
                         "set eval.enabled=true (and eval.every_steps) in base_overrides")
    names = gen_metric_names(cfg.eval)
    if metric not in names:
        judged = gen_metric_names(replace(cfg.eval, judge="any"))
        why = ("it needs a judge: set eval.judge (and eval.judge_model for reward_model)" if metric in judged else
               f"it reports {', '.join(sorted(names))}")
        raise StudyError(f"score.metric {metric}: not a metric of this generation eval; {why}")


def check_reports(study: StudySpec, cfg: Config) -> None:
    """Raise StudyError when a value the study needs from Tune is computed between reports.

    A trial hands its metrics to Tune only every train.report_every steps (and at checkpoints and
    its last step), so an eval/ score from train.eval_every, or a gen/ score or stopping signal from
    eval.every_steps, computed on other steps would never reach the score, ASHA or the stopper.
    """
    needs = []
    if study.score.metric.startswith("eval/"):
        needs.append(("train.eval_every", cfg.train.eval_every, f"score.metric {study.score.metric}"))
    if study.score.metric.startswith("gen/"):
        needs.append(("eval.every_steps", cfg.eval.every_steps, f"score.metric {study.score.metric}"))
    elif cfg.early_stopping.source == "generation":
        needs.append(("eval.every_steps", cfg.eval.every_steps, "stopping.source generation"))
    every = cfg.train.report_every
    for key, value, what in needs:
        if value and value % every:
            raise StudyError(
                f"{what} is measured every {key}={value} steps, but trials report to Tune every "
                f"train.report_every={every} steps, so most of those values never reach Tune; make {key} a "
                f"multiple of train.report_every (in base_overrides, or the method's fixed)"
            )


# ---------------------------------------------------------------------------------------------
# Why trials stopped


class StopLog:
    """Where a study records each trial it stops, the moment it decides: ``stops.json`` of the
    study, ``{trial_id: {reason, step, detail}}`` (as ``CollapseStopper.save`` writes and
    ``po_ray.report`` reads), ``trials/<trial>/stop.json`` in the trial's own run folder, and with
    ``tracking`` = (tracking URI, experiment) the trial's MLflow child run: tagged stop_reason,
    stop_step, stop_detail and ended KILLED (its workers are killed mid-run, so nobody else ends it).
    Failed trials' child runs are tagged with the error and ended FAILED the same way.

    Every record re-reads and rewrites stops.json, so stops of an earlier session of a resumed
    study are kept, and a stop is on disk even if the study is interrupted right after."""

    def __init__(self, study_dir: str | os.PathLike, tracking: tuple[str, str] | None = None):
        self.study_dir, self.tracking = Path(study_dir), tracking
        self.path = self.study_dir / STOPS_FILE

    def read(self) -> dict[str, StopDecision]:
        return CollapseStopper.load(self.path) if self.path.is_file() else {}

    def record(self, trial_id: str, decision: StopDecision, trial: str | None = None) -> None:
        """``trial``: the trial's name (its run folder under trials/), when known."""
        stops = self.read()
        if trial_id in stops:
            return
        stops[trial_id] = decision
        _write_json(self.path, {k: dataclasses.asdict(v) for k, v in sorted(stops.items())})
        if trial:
            _write_json(self.study_dir / TRIALS_DIR / trial / STOP_FILE, dataclasses.asdict(decision))
            self._end_child(trial, {"stop_reason": decision.reason, "stop_step": decision.step,
                                    "stop_detail": decision.detail}, "KILLED")

    def record_failure(self, trial: str, error: str) -> None:
        self._end_child(trial, {"error": error}, "FAILED")

    def _end_child(self, trial: str, tags: dict, status: str) -> None:
        run_dir = self.study_dir / TRIALS_DIR / trial
        id_file = run_dir / "mlflow_run_id"
        if self.tracking is None or not id_file.is_file():
            return
        from po_ray.tracking import Tracker

        # No start(): that would mark the run RUNNING first. The first record resumes it.
        child = Tracker(*self.tracking, trial, run_id=id_file.read_text().strip(), fallback_dir=run_dir)
        child.set_tags(tags)
        child.end(status)


class StudyStopper(CollapseStopper):
    """CollapseStopper that writes each decision to the study's StopLog as it is made. A decision
    on a trial's last step (``max_steps``, when the study has one budget) stops nothing: that
    trial has finished, and is not counted as stopped early."""

    def __init__(self, settings, log: StopLog, max_steps: int | None = None):
        super().__init__(settings)
        self.log, self.max_steps = log, max_steps

    def __call__(self, trial_id: str, result: dict) -> bool:
        stop = super().__call__(trial_id, result)
        if stop and self.max_steps is not None and int(result.get("step", 0)) >= self.max_steps:
            self.decisions.pop(trial_id)
            return False
        if stop:
            method = (result.get("config") or {}).get("method")
            self.log.record(trial_id, self.decisions[trial_id], _trial_name(method, trial_id) if method else None)
        return stop


class RecordingASHA(AsyncHyperBandScheduler):
    """ASHA (Li et al. 2018, arXiv 1810.05934) on the score; each trial it cuts is logged as `asha`."""

    def __init__(self, log: StopLog, **kwargs):
        # Never "stop" a trial for reaching max_t: that is finishing, not an early stop.
        super().__init__(stop_last_trials=False, **kwargs)
        self.log = log

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP:
            step = int(result.get("step", result.get("training_iteration", 0)))
            detail = f"{self._metric} {result[self._metric]:.4g} at step {step} is below ASHA's cut-off at this rung"
            self.log.record(trial.trial_id, StopDecision("asha", step, detail), trial_name(trial))
        return action


def _asha(study: StudySpec, log: StopLog) -> RecordingASHA:
    train, metric = study.config.train, study.score.metric
    # Scores that exist only at evaluations: held-out pairs (train.eval_every), generations (eval.every_steps).
    every, key = ((train.eval_every, "train.eval_every") if metric.startswith("eval/") else
                  (study.config.eval.every_steps, "eval.every_steps") if metric.startswith("gen/") else (1, ""))
    if not every:
        raise StudyError(f"{study.path}: stopping.asha needs scores during training, but {key} is 0 "
                         f"(only a final {metric}); set base_overrides {key}")
    grace = min(every, train.max_steps)
    return RecordingASHA(log, time_attr="step", metric=study.score.metric, mode=study.score.mode,
                         max_t=train.max_steps, grace_period=grace, reduction_factor=3)


# ---------------------------------------------------------------------------------------------
# Progress


@dataclass(frozen=True)
class Tally:
    """Trials of the study's other methods: those already run, and those still to run (waiting)."""

    done: int = 0
    stopped: int = 0
    failed: int = 0
    waiting: int = 0
    best: tuple[float, str] | None = None
    """(score, trial name) of the best trial of the methods already run."""


class StudyProgress(tune.Callback):
    """Lines whenever a trial starts, ends or the best score changes: what happened, the counts of
    this method's trials, and (with ``others``, the tally of the study's other methods) of the
    whole study, each with its best score so far::

        [po-ray] dpo: dpo_t3 started
        [po-ray] dpo: 1 running, 1 done, 1 stopped early, 0 failed, 1 waiting | best <score> 0.81 (dpo_t1)
        [po-ray] study: 1 running, 5 done, 2 stopped early, 0 failed, 8 waiting | best <score> 0.84 (simpo_t2)
    """

    def __init__(self, method: str, total: int, metric: str, mode: str, log: StopLog, others: Tally | None = None):
        self.method, self.total, self.metric, self.mode, self.log = method, total, metric, mode, log
        self.others = others
        self.latest: dict[str, tuple[float, str]] = {}  # trial_id -> (its last score, its name)
        self.best: tuple[float, str] | None = None

    def on_trial_start(self, iteration, trials, trial, **info):
        self._say(trials, f"{trial} started", {trial.trial_id: "RUNNING"})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        self.latest[trial.trial_id] = (float(value), str(trial))
        best = self._pick(self.latest.values())
        if best != self.best:
            self.best = best
            self._say(trials, f"{trial} step {result.get('step')}: {self.metric} {value:.4g}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        stop = self.log.read().get(trial.trial_id)
        what = f"stopped early at step {stop.step} ({stop.reason}: {stop.detail})" if stop else "finished"
        self._say(trials, f"{trial} {what}", {trial.trial_id: "TERMINATED"})

    def on_trial_error(self, iteration, trials, trial, **info):
        error = (trial.get_error() or "unknown error").strip().splitlines()
        self.log.record_failure(str(trial), error[-1][:500] if error else "unknown error")
        self._say(trials, f"{trial} failed; its error is in {trial.local_path}/error.txt", {trial.trial_id: "ERROR"})

    def _pick(self, scored) -> tuple[float, str] | None:
        scored = list(scored)
        return (max if self.mode == "max" else min)(scored, key=lambda v: v[0]) if scored else None

    def _say(self, trials, event: str, now: dict[str, str] | None = None) -> None:
        """``now``: statuses Tune sets only after calling back (the trial the event is about)."""
        stops = self.log.read()
        status = {t.trial_id: t.status for t in trials} | (now or {})
        ended = [i for i, s in status.items() if s == "TERMINATED"]
        stopped = sum(i in stops for i in ended)
        status = list(status.values())
        counts = {"running": status.count("RUNNING"), "done": len(ended) - stopped, "stopped early": stopped,
                  "failed": status.count("ERROR")}
        counts["waiting"] = max(self.total - sum(counts.values()), 0)
        lines = [f"{self.method}: {event}", f"{self.method}: {self._counts(counts, self.best)}"]
        if self.others is not None:
            o = self.others
            study = {"running": counts["running"], "done": counts["done"] + o.done,
                     "stopped early": counts["stopped early"] + o.stopped, "failed": counts["failed"] + o.failed,
                     "waiting": counts["waiting"] + o.waiting}
            best = self._pick(b for b in (self.best, o.best) if b is not None)
            lines.append(f"study: {self._counts(study, best)}")
        print("\n".join(f"[po-ray] {line}" for line in lines), flush=True)

    def _counts(self, counts: dict, best: tuple[float, str] | None) -> str:
        text = ", ".join(f"{n} {k}" for k, n in counts.items())
        return text + (f" | best {self.metric} {best[0]:.4g} ({best[1]})" if best else "")


def tally(results, stops: dict[str, StopDecision], metric: str, mode: str, waiting: int = 0) -> Tally:
    """The Tally of finished Tune results (their ResultGrids' Result objects); a trial's score is
    its last finite reported value of ``metric``."""
    counts = {"done": 0, "stopped": 0, "failed": 0}
    scored = []
    for result in results:
        name = Path(result.path).name
        if result.error is not None:
            counts["failed"] += 1
        elif name.removeprefix(f"{result.config['method']}_") in stops:
            counts["stopped"] += 1
        else:
            counts["done"] += 1
        frame = result.metrics_dataframe
        values = frame[metric].dropna() if frame is not None and metric in frame else ()
        values = [float(v) for v in values if math.isfinite(float(v))]
        if values:
            scored.append((values[-1], name))
    pick = max if mode == "max" else min
    return Tally(**counts, waiting=waiting, best=pick(scored, key=lambda v: v[0]) if scored else None)


def trial_name(trial) -> str:
    """Tune trial (and folder) name: ``<method>_<trial id>``; also the trial's Train run name."""
    return _trial_name(trial.config["method"], trial.trial_id)


def _trial_name(method: str, trial_id: str) -> str:
    return f"{method}_{trial_id}"


# ---------------------------------------------------------------------------------------------
# The driver trainable: one Tune trial = one Ray Train run


@dataclass(frozen=True)
class TrialSetup:
    study: StudySpec
    study_dir: str
    tracking_uri: str
    parent_run_id: str | None


def run_trial(params: dict, setup: TrialSetup) -> None:
    """Tune trainable: build this trial's TorchTrainer (its own ZeRO-3 worker group, reserving
    its own resources) and fit it; TuneReportCallback passes each Train report on to Tune.

    A run that ends on a non-finite loss or gradient (the loop stops before the NaN reaches the
    weights) is reported to Tune as a NaN loss at that step, so the stopper records it as
    ``nan_loss`` at once instead of the trial failing. Ray Train would restart the workers on any
    error, that one too (from the last checkpoint, into the same NaN), so Train itself retries
    nothing here: this function re-fits after other errors, up to run.max_failures times, and the
    new fit continues from the run's last checkpoint.

    When Tune stops the trial, the Train controller goes with it (it runs in the trial's
    placement group) and Ray Train's placement-group cleaner frees the workers; that cleaner
    needs the State API, hence the dashboard `launch.ensure_ray` keeps.
    """
    context = tune.get_context()
    name, study = context.get_trial_name(), setup.study
    method = study.method(params["method"])
    cfg = trial_config(study, method, params, study_dir=Path(setup.study_dir), run_name=name,
                       tracking_uri=setup.tracking_uri)
    loop_extra = {
        "trial_name": name,
        "parent_run_id": setup.parent_run_id,
        "tags": {"method": method.name, "po_ray.study": study.name, "po_ray.trial_id": context.get_trial_id()},
    }
    once = replace(cfg, run=replace(cfg.run, max_failures=0))
    for failures in itertools.count(1):
        trainer = build_trainer(once, loop_extra=loop_extra, callbacks=[TuneReportCallback()])
        try:
            trainer.fit()
            return
        except Exception as e:  # noqa: BLE001 - re-raised once run.max_failures is spent
            step = non_finite_step(e)
            if step is not None:
                tune.report({"step": step, "loss": math.nan})
                return
            limit = cfg.run.max_failures
            if limit != -1 and failures > limit:
                raise
            last = str(e).strip().splitlines()[-1:] or [type(e).__name__]
            print(f"[po-ray] {name}: its Ray Train run failed ({redact_text(last[0][:300])}); restart {failures} of "
                  f"{'unlimited' if limit == -1 else limit} (run.max_failures), from its last checkpoint", flush=True)


def non_finite_step(error: BaseException) -> int | None:
    """The step of the loop's "non-finite loss at step N" anywhere in an exception chain, else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        match = _NON_FINITE.search(str(error))
        if match:
            return int(match.group(1))
        error = error.__cause__ or error.__context__
    return None


# ---------------------------------------------------------------------------------------------
# The study


def run_study(study_path: str | os.PathLike, overrides: typing.Sequence[str] = (), resume: bool = False) -> dict:
    """Run (or with ``resume`` continue) the study in ``study_path``; returns where things are:
    study_dir, report (name -> path), tracking_uri, parent_run_id, interrupted."""
    # ---- the study, every trial's config checked, the folder claimed ---------------------------
    study = load_study(study_path, overrides)
    study_dir = study_folder(study)
    manifest_path = study_dir / STUDY_FILE
    manifest = _read_json(manifest_path)
    if resume:
        if manifest is None:
            raise StudyError(f"--resume: no study {study.name!r} in {study_dir} (no {STUDY_FILE}); "
                             "run without --resume to start it")
        if not overrides and manifest["overrides"]:
            overrides = manifest["overrides"]
            study = load_study(study_path, overrides)
        elif list(overrides) != manifest["overrides"]:
            raise StudyError(f"--resume: the study was started with overrides {manifest['overrides']}, not "
                             f"{list(overrides)}; resume with the same ones (or none, to reuse them)")
    elif manifest is not None:
        raise StudyError(f"study {study.name!r} already ran in {study_dir}; add --resume to continue it (finished "
                         "trials are kept), or pick another name (name=...)")
    tracking_uri = study_tracking_uri(study.config, study_dir)
    passes = plan_study(study, study_dir, tracking_uri)
    check_storage(study_dir)
    print(f"[po-ray] study {study.name}: {count_trials(study)} trials of {', '.join(m.name for m in study.methods)} "
          f"in {study_dir}", flush=True)

    # ---- Ray, the MLflow parent run, the manifest ----------------------------------------------
    os.environ.setdefault(HEALTH_CHECK_ENV, HEALTH_CHECK_S)  # before Ray starts: forwarded to every actor
    if study.asha:
        # ASHA's metric is a held-out score, present only in eval steps' reports.
        os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    ensure_ray(study.config, dashboard=True)
    parent = _parent_run(study, study_dir, tracking_uri, (manifest or {}).get("parent_run_id"))
    manifest = {
        "study_file": str(Path(study_path).resolve()),
        "overrides": list(overrides),
        "score": dataclasses.asdict(study.score),
        "max_steps": _max_steps(study),
        "methods": [m.name for m in study.methods],
        "tracking_uri": tracking_uri if parent else None,
        "experiment_name": study.config.tracking.experiment_name,
        "parent_run_id": parent.run_id if parent else None,
    }
    _write_json(manifest_path, manifest)

    # ---- reference log-probs, once per (reference, data, seed) ---------------------------------
    for p in passes:
        print(f"[po-ray] reference log-probs for {', '.join(p.methods)} (seed {p.config.train.seed}): one pass, "
              f"shared by their trials ({p.config.reference.cache_dir})", flush=True)
        build_trainer(p.config, loop_extra={"precompute_only": True}).fit()

    # ---- one Tuner per method -----------------------------------------------------------------
    log = StopLog(study_dir, (tracking_uri, study.config.tracking.experiment_name) if parent else None)
    setup = TrialSetup(study, str(study_dir), tracking_uri, manifest["parent_run_id"])
    results = []
    for i, method in enumerate(study.methods):
        later = count_trials(replace(study, methods=study.methods[i + 1:]))
        others = tally(results, log.read(), study.score.metric, study.score.mode, later)
        grid = _tuner(study, method, study_dir, setup, log, others if len(study.methods) > 1 else None).fit()
        results += list(grid)
        if _unfinished(study_dir / method.name):
            print(f"[po-ray] study interrupted; continue it with: po-ray sweep --study {study_path} --resume",
                  flush=True)
            if parent:
                parent.end("KILLED")
            return {"study_dir": str(study_dir), "report": {}, "tracking_uri": manifest["tracking_uri"],
                    "parent_run_id": manifest["parent_run_id"], "interrupted": True}

    # ---- the report, into the parent run --------------------------------------------------------
    try:
        paths = _report(study_dir, manifest, parent)
    except ReportError as e:  # e.g. every trial stopped before its first score
        print(f"[po-ray] no report: {e}", flush=True)
        paths = {}
    if parent:
        parent.end()
    print(_format_summary(study, study_dir, results, log.read(), paths, manifest), flush=True)
    return {"study_dir": str(study_dir), "report": {k: str(v) for k, v in paths.items()},
            "tracking_uri": manifest["tracking_uri"], "parent_run_id": manifest["parent_run_id"], "interrupted": False}


def report_study(study_dir: str | os.PathLike) -> dict[str, str]:
    """(Re)write the report of a study folder and log it to the study's MLflow parent run (if any),
    leaving that run's status as it is (RUNNING while the study runs, KILLED if it was interrupted);
    returns {name: path} of the files written."""
    study_dir = Path(study_dir).expanduser().resolve()
    manifest = _read_json(study_dir / STUDY_FILE)
    if manifest is None:
        raise ReportError(f"{study_dir}: no {STUDY_FILE}, so not a study folder written by `po-ray sweep`")
    parent = None
    if manifest.get("parent_run_id"):
        from po_ray.tracking import Tracker

        # No start() or end(): those would set the run's status. The first record resumes the run.
        parent = Tracker(manifest["tracking_uri"], manifest["experiment_name"], study_dir.name,
                         run_id=manifest["parent_run_id"], fallback_dir=study_dir)
    return {k: str(v) for k, v in _report(study_dir, manifest, parent).items()}


def _tuner(study: StudySpec, method: MethodSpace, study_dir: Path, setup: TrialSetup, log: StopLog,
           others: Tally | None) -> tune.Tuner:
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), driver_resources(study))
    path = study_dir / method.name
    if tune.Tuner.can_restore(str(path)):
        print(f"[po-ray] {method.name}: continuing its trials from {path} (finished ones are kept)", flush=True)
        return tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    total = count_trials(replace(study, methods=(method,)))
    return tune.Tuner(
        trainable,
        param_space={"method": method.name, **to_tune_space(method, study.seeds)},
        tune_config=tune.TuneConfig(
            num_samples=method.num_samples,
            max_concurrent_trials=study.max_concurrent_trials,
            scheduler=_asha(study, log) if study.asha else None,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            name=method.name,
            storage_path=str(study_dir),
            stop=StudyStopper(study.stopping, log, _max_steps(study)),
            callbacks=[StudyProgress(method.name, total, study.score.metric, study.score.mode, log, others)],
            verbose=0,  # StudyProgress says what matters; Tune's tables would repeat it
        ),
    )


def driver_resources(study: StudySpec) -> dict:
    """The trial driver's resources. Tune cannot place a trial that asks for nothing at all, so
    `{CPU: 0}` (the driver only waits on its Train workers) becomes a token 0.01 CPU."""
    wanted = {k: v for k, v in study.trial_resources.items() if v}
    return wanted or {"CPU": 0.01}


def _unfinished(experiment_dir: Path) -> int:
    """Trials of an experiment still running or waiting (after Ctrl-C). Read from the state Tune
    saved: at the end of an interrupted fit it marks them terminated in memory, not on disk."""
    return sum(t.status not in ("TERMINATED", "ERROR") for t in tune.ExperimentAnalysis(str(experiment_dir)).trials)


def _max_steps(study: StudySpec) -> int | None:
    """The study-wide step budget, or None when a method fixes or searches train.max_steps."""
    if any("train.max_steps" in m.fixed or "train.max_steps" in m.space for m in study.methods):
        return None
    return study.config.train.max_steps


# ---------------------------------------------------------------------------------------------
# MLflow and the report


def _parent_run(study: StudySpec, study_dir: Path, tracking_uri: str, run_id: str | None):
    if not study.config.tracking.enabled:
        return None
    from po_ray.config import to_dict
    from po_ray.tracking import Tracker

    parent = Tracker(tracking_uri, study.config.tracking.experiment_name, study.name, run_id=run_id,
                     tags={"po_ray.study": study.name, "po_ray.kind": "study"}, fallback_dir=study_dir)
    parent.start()
    if run_id is None:
        parent.log_params({
            "study": {
                "file": str(study.path), "methods": ",".join(m.name for m in study.methods),
                "seeds": ",".join(map(str, study.seeds)), "trials": count_trials(study),
                "score": dataclasses.asdict(study.score), "asha": study.asha,
                "max_concurrent_trials": study.max_concurrent_trials,
            },
            "base": to_dict(study.config),
        })  # fmt: skip
        parent.log_artifact(study.path, "study")
        parent.log_dict({m.name: {"fixed": m.fixed, "space": {k: dataclasses.asdict(d) for k, d in m.space.items()},
                                  "num_samples": m.num_samples} for m in study.methods}, "study/methods.json")
    return parent


def _report(study_dir: Path, manifest: dict, parent) -> dict[str, Path]:
    score = manifest["score"]
    paths = write_report(study_dir, score_metric=score["metric"], mode=score["mode"], epsilon=score["epsilon"],
                         max_steps=manifest["max_steps"])
    if parent:
        parent.log_artifacts(study_dir / REPORT_DIR, "report")
        summary = pd.read_csv(paths["summary"])
        for row in summary.to_dict("records"):
            parent.log_metrics({f"{row['method']}/{k}": v for k, v in row.items() if k != "method"}, step=0)
    return paths


def _format_summary(study, study_dir, results, stops, paths, manifest) -> str:
    failed = sum(r.error is not None for r in results)
    lines = ["", f"=== po-ray: study {study.name} finished ===",
             f"{len(results)} trials: {len(stops)} stopped early, {failed} failed"]
    if paths:
        lines += [pd.read_csv(paths["summary"]).to_string(index=False),
                  f"{'report (Markdown, CSV, plots)':32s} {paths['report']}"]
    lines.append(f"{'study folder':32s} {study_dir}")
    if manifest["parent_run_id"]:
        lines.append(f"{'MLflow parent run':32s} {manifest['parent_run_id']} in {redact_text(manifest['tracking_uri'])}")
    return "\n".join(lines)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)

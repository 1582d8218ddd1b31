"""Robustness report of a finished study: per-method score distributions, tables and plots.

Ahrabian et al. (arXiv 2407.15229) compare *PO methods by how their scores spread over the whole
hyperparameter grid, not by the best cell: the headline is the share of a method's trials that land
within ε of the best score any method reached — the chance that an untuned run is good.

Reads what Ray Tune leaves in the study folder, with no Ray import:
  <study_dir>/**/<trial folder>/params.json   the trial's point of the param_space, with its ``method``
  <study_dir>/**/<trial folder>/result.json   one JSON object per report: the reported metrics plus
                                              Tune's fields (trial_id, training_iteration, config, …)
  <study_dir>/stops.json                      {trial_id: {reason, step, detail}} from CollapseStopper
A trial folder is one whose params (or the ``config`` of its results) name the trial's ``method``;
the folder's name is the trial's name.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

STOPS_FILE = "stops.json"
STOP_FILE = "stop.json"  # trials/<trial>/stop.json: the one trial's {reason, step, detail}
REPORT_DIR = "report"
CONFIG_PREFIX = "config/"  # trial params become config/<dotted key> columns, as in Tune's dataframes
SEED_KEY = "train.seed"
# = stoppers.COLLAPSE_REASONS, repeated because that module imports Ray
COLLAPSE_REASONS = ("topk_entropy_collapse", "topk_mass_collapse")
SIGNALS = ("topk_entropy", "topk_mass")

# Fields Tune adds to every result; bookkeeping, not metrics.
TUNE_FIELDS = frozenset(
    {
        "training_iteration", "time_total_s", "time_this_iter_s", "time_since_restore", "timestamp", "date",
        "timesteps_total", "timesteps_since_restore", "iterations_since_restore", "episodes_total",
        "node_ip", "hostname", "pid", "done", "should_checkpoint", "checkpoint_dir_name", "experiment_id",
        "experiment_tag", "trainable_name", "trial_id", "config", "step",
    }
)  # fmt: skip
_TRIAL_COLUMNS = ("trial_id", "trial_name", "method", "trial_dir", "steps", "stopped", "stop_reason", "stop_step")


class ReportError(ValueError):
    """The study folder cannot be reported on; the message says what is missing where."""


# ---------------------------------------------------------------------------------------------
# Reading


def load_trials(study_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per trial: trial_id, trial_name, method, trial_dir, steps (last step reported),
    stopped / stop_reason / stop_step (from stops.json), ``config/<key>`` per trial param, and the
    last reported value of every numeric metric (a trial's score is its last reported value).
    Sorted by method, then trial_name.
    """
    return _read_study(Path(study_dir))[0]


def load_curves(study_dir: str | os.PathLike) -> pd.DataFrame:
    """Every reported result, long format: trial_id, method, step, then the numeric metrics."""
    return _read_study(Path(study_dir))[1]


def _read_study(study_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, curves) of every trial folder under study_dir."""
    if not study_dir.is_dir():
        raise ReportError(f"{study_dir}: no such study folder")
    stops = _read_stops(study_dir / STOPS_FILE)
    trials, skipped = [], []
    for result_file in sorted(study_dir.rglob("result.json")):
        if REPORT_DIR in result_file.relative_to(study_dir).parts[:1]:
            continue
        trial = _read_trial(result_file.parent, stops)
        if trial is None:
            skipped.append(str(result_file.parent))
        else:
            trials.append(trial)
    if not trials:
        why = f"; folders with result.json but no `method` in their params: {', '.join(skipped)}" if skipped else ""
        raise ReportError(f"{study_dir}: no trial folders (result.json next to params.json naming the method){why}")
    df = pd.DataFrame([row for row, _ in trials])
    front = list(_TRIAL_COLUMNS)
    config_cols = sorted(c for c in df.columns if c.startswith(CONFIG_PREFIX))
    metric_cols = sorted(c for c in df.columns if c not in front and c not in config_cols)
    df = df[front + config_cols + metric_cols].sort_values(["method", "trial_name"], kind="stable")
    curves = pd.concat([curve for _, curve in trials], ignore_index=True)
    return df.reset_index(drop=True), curves


def _read_trial(trial_dir: Path, stops: dict[str, dict]) -> tuple[dict, pd.DataFrame] | None:
    results = _read_results(trial_dir / "result.json")
    params_file = trial_dir / "params.json"
    if params_file.is_file():
        params = json.loads(params_file.read_text(encoding="utf-8"))
    else:  # Tune also copies the config into every result
        params = next((r["config"] for r in reversed(results) if isinstance(r.get("config"), dict)), {})
    params = _flatten(params, ".")
    method = params.pop("method", None)  # the sweep puts the method into every trial's config
    if not isinstance(method, str):
        return None
    trial_id = next((str(r["trial_id"]) for r in results if r.get("trial_id") is not None), trial_dir.name)
    trial_name = trial_dir.name

    steps, metrics = [], []
    for i, r in enumerate(results):
        step = r.get("step", r.get("training_iteration"))
        steps.append(int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else i + 1)
        flat = _flatten({k: v for k, v in r.items() if k not in TUNE_FIELDS}, "/")
        metrics.append({k: v for k, v in flat.items() if _is_number_or_null(v)})
    curve = pd.DataFrame(metrics, dtype=float) if metrics else pd.DataFrame()
    curve.insert(0, "step", steps)
    curve.insert(0, "method", method)
    curve.insert(0, "trial_id", trial_id)

    last = {}
    for m in metrics:
        last.update({k: v for k, v in m.items() if v is not None})
    stop = stops.get(trial_id)
    trial = {
        "trial_id": trial_id,
        "trial_name": trial_name,
        "method": method,
        "trial_dir": str(trial_dir),
        "steps": max(steps) if steps else 0,
        "stopped": stop is not None,
        "stop_reason": stop["reason"] if stop else None,
        "stop_step": stop["step"] if stop else None,
        **{CONFIG_PREFIX + k: v for k, v in params.items()},
        **{k: float(v) for k, v in last.items()},
    }
    return trial, curve


def _read_results(path: Path) -> list[dict]:
    """Tune's result.json: one JSON object per line. A torn last line (a killed trial) is dropped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    results = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            results.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):
                break
            raise ReportError(f"{path}:{number}: not a JSON object: {e}") from None
    return results


def _read_stops(path: Path) -> dict[str, dict]:
    """stops.json as written by CollapseStopper.save; missing means no trial was stopped."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON: {e}") from None


def _flatten(d: dict, sep: str, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, sep, f"{prefix}{k}{sep}"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _is_number_or_null(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


# ---------------------------------------------------------------------------------------------
# Summary


def summarize(
    trials: pd.DataFrame, score_metric: str, mode: str, epsilon: float, max_steps: int | None = None
) -> pd.DataFrame:
    """Per method: trials, scored (trials with a finite score), best, median, worst, iqr of the
    score, within_epsilon / share_within_epsilon (trials within ε of the best score over ALL
    methods, inclusive, over all the method's trials), stopped (any reason), stopped_collapse, and
    steps_saved = Σ (max_steps − steps) over stopped trials (max_steps: the argument, else each
    trial's config/train.max_steps; NaN when neither is known).
    """
    if score_metric not in trials.columns:
        metrics = [c for c in trials.columns if c not in _TRIAL_COLUMNS and not c.startswith(CONFIG_PREFIX)]
        raise ReportError(f"score metric {score_metric!r} was never reported; reported metrics: {', '.join(metrics)}")
    if mode not in ("max", "min"):
        raise ReportError(f"mode must be max or min, got {mode!r}")
    scores = trials[score_metric].astype(float)
    finite = np.isfinite(scores)
    pick_best, pick_worst = ("max", "min") if mode == "max" else ("min", "max")
    best_all = getattr(scores[finite], pick_best)() if finite.any() else math.nan
    gap = (best_all - scores) if mode == "max" else (scores - best_all)
    within = finite & (gap <= epsilon + 1e-12)  # inclusive; the slack absorbs float rounding

    if max_steps is not None:
        budget = pd.Series(float(max_steps), index=trials.index)
    elif CONFIG_PREFIX + "train.max_steps" in trials.columns:
        budget = trials[CONFIG_PREFIX + "train.max_steps"].astype(float)
    else:
        budget = pd.Series(math.nan, index=trials.index)
    stopped = trials["stopped"].astype(bool)
    saved = (budget - trials["steps"]).clip(lower=0)

    rows = []
    for method in sorted(trials["method"].unique()):
        mine = trials["method"] == method
        x = scores[mine & finite]
        rows.append(
            {
                "method": method,
                "trials": int(mine.sum()),
                "scored": len(x),
                "best": getattr(x, pick_best)() if len(x) else math.nan,
                "median": x.median() if len(x) else math.nan,
                "worst": getattr(x, pick_worst)() if len(x) else math.nan,
                "iqr": x.quantile(0.75) - x.quantile(0.25) if len(x) else math.nan,
                "within_epsilon": int(within[mine].sum()),
                "share_within_epsilon": float(within[mine].sum() / mine.sum()),
                "stopped": int(stopped[mine].sum()),
                "stopped_collapse": int(trials.loc[mine & stopped, "stop_reason"].isin(COLLAPSE_REASONS).sum()),
                # sum(skipna=False): one stopped trial with an unknown budget makes the total unknown
                "steps_saved": float(saved[mine & stopped].sum(skipna=False)),
            }
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Report


def write_report(
    study_dir: str | os.PathLike,
    trials: pd.DataFrame | None = None,
    *,
    score_metric: str,
    mode: str,
    epsilon: float,
    max_steps: int | None,
) -> dict[str, Path]:
    """Write study_dir/report/: report.md, summary.csv, trials.csv, score_distribution.png,
    signals.png and params_<method>.png (score against each searched hyperparameter).
    Returns {name: path} for each file: report, summary, trials, score_distribution, signals,
    params_<method>.
    """
    study_dir = Path(study_dir)
    loaded, curves = _read_study(study_dir)
    trials = loaded if trials is None else trials
    summary = summarize(trials, score_metric, mode, epsilon, max_steps)
    out = study_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)

    paths = {"summary": out / "summary.csv", "trials": out / "trials.csv"}
    summary.to_csv(paths["summary"], index=False)
    trials.to_csv(paths["trials"], index=False)

    best = summary["best"].max() if mode == "max" else summary["best"].min()
    paths["score_distribution"] = _plot_distribution(trials, score_metric, mode, epsilon, best, out)
    paths["signals"] = _plot_signals(trials, curves, out)
    for method in summary["method"]:
        plot = _plot_params(trials[trials["method"] == method], method, score_metric, out)
        if plot is not None:
            paths[f"params_{method}"] = plot

    paths["report"] = out / "report.md"
    paths["report"].write_text(
        _markdown(study_dir, trials, summary, score_metric, mode, epsilon, best, max_steps, paths), encoding="utf-8"
    )
    return paths


def searched_params(trials: pd.DataFrame) -> list[str]:
    """config/<key> columns that take more than one value in these trials (the seed excluded)."""
    params = [c for c in trials.columns if c.startswith(CONFIG_PREFIX) and c != CONFIG_PREFIX + SEED_KEY]
    return [c for c in params if trials[c].dropna().astype(str).nunique() > 1]


def _markdown(study_dir, trials, summary, score_metric, mode, epsilon, best, max_steps, paths) -> str:
    if np.isfinite(best):
        top = trials.loc[_best_index(trials[score_metric].astype(float), mode)]
        best_text = f": {best:.4g} ({top['method']}, {top['trial_name']})."
    else:
        best_text = ", but no trial has a finite score."
    lines = [
        f"# Robustness study: {study_dir.name}",
        "",
        f"Score: `{score_metric}` ({mode}imised; a trial's last reported value). A trial is *good* when its score "
        f"is within ε = {epsilon:g} of the best score over all methods{best_text}",
        "",
        "## Chance that an untuned run is good",
        "",
        *(
            f"- **{r.method}**: {r.share_within_epsilon:.0%} ({r.within_epsilon} of {r.trials} trials)"
            for r in summary.itertuples()
        ),
        "",
        "## Per method",
        "",
        _table(summary),
        "",
        "## Early stopping",
        "",
    ]
    stopped = trials[trials["stopped"]]
    budget = f" of the {len(trials) * max_steps} budgeted ({max_steps} per trial)" if max_steps is not None else ""
    lines.append(
        f"{len(stopped)} of {len(trials)} trials stopped early "
        f"({int(stopped['stop_reason'].isin(COLLAPSE_REASONS).sum())} for top-k collapse), "
        f"saving {summary['steps_saved'].sum(skipna=False):g} steps{budget}."
    )
    if len(stopped):
        lines += ["", _table(stopped[["method", "trial_name", "stop_reason", "stop_step", "steps"]])]
    lines += ["", "## Plots", ""]
    for name, path in paths.items():
        if path.suffix == ".png":
            lines += [f"![{name}]({path.name})", ""]
    return "\n".join(lines)


def _best_index(scores: pd.Series, mode: str):
    return scores.idxmax() if mode == "max" else scores.idxmin()


def _table(df: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.4g}"
        return "" if v is None else str(v)

    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body])


# ---------------------------------------------------------------------------------------------
# Plots (object-oriented matplotlib on the Agg canvas: no pyplot state, no display needed)


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path


def _method_colors(methods) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(sorted(methods))}


def _plot_distribution(trials, score_metric, mode, epsilon, best, out: Path) -> Path:
    methods = sorted(trials["method"].unique())
    colors = _method_colors(methods)
    fig = _figure(1.6 + 1.4 * len(methods), 4)
    ax = fig.add_subplot()
    data = [trials.loc[trials["method"] == m, score_metric].astype(float) for m in methods]
    data = [d[np.isfinite(d)] for d in data]
    counts = [(trials["method"] == m).sum() for m in methods]
    labels = [f"{m}\n{len(d)} of {n} scored" if len(d) < n else m for m, d, n in zip(methods, data, counts)]
    ax.boxplot([d.to_numpy() for d in data], tick_labels=labels, showfliers=False)
    rng = np.random.default_rng(0)  # fixed jitter: the same study gives the same picture
    for i, (m, d) in enumerate(zip(methods, data), start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(d)), d, color=colors[m], alpha=0.8, zorder=3)
    if np.isfinite(best):
        line = best - epsilon if mode == "max" else best + epsilon
        ax.axhline(line, color="grey", linestyle="--", linewidth=1, label=f"best {'−' if mode == 'max' else '+'} ε")
        ax.legend(loc="best")
    ax.set_ylabel(score_metric)
    ax.set_title("Score over each method's trials")
    return _save(fig, out / "score_distribution.png")


def _plot_signals(trials, curves, out: Path) -> Path:
    colors = _method_colors(trials["method"].unique())
    fig = _figure(11, 4)
    axes = fig.subplots(1, len(SIGNALS))
    stops = trials.set_index("trial_id")
    for ax, signal in zip(axes, SIGNALS):
        ax.set_title(signal)
        ax.set_xlabel("step")
        if signal not in curves.columns or curves[signal].notna().sum() == 0:
            ax.text(0.5, 0.5, "not reported", ha="center", va="center", transform=ax.transAxes)
            continue
        for trial_id, curve in curves.groupby("trial_id", sort=True):
            curve = curve[curve[signal].notna()]
            if curve.empty or trial_id not in stops.index:
                continue
            method = stops.at[trial_id, "method"]
            ax.plot(curve["step"], curve[signal], color=colors[method], alpha=0.7, linewidth=1)
            if stops.at[trial_id, "stopped"]:
                at = curve[curve["step"] <= stops.at[trial_id, "stop_step"]].tail(1)
                at = at if len(at) else curve.tail(1)
                ax.scatter(at["step"], at[signal], marker="x", s=60, color="black", zorder=3)
    handles = [axes[0].plot([], [], color=c, label=m)[0] for m, c in colors.items()]
    handles.append(axes[0].scatter([], [], marker="x", color="black", label="stopped"))
    fig.legend(handles=handles, loc="outside right upper")
    return _save(fig, out / "signals.png")


def _plot_params(trials, method, score_metric, out: Path) -> Path | None:
    params = searched_params(trials)
    if not params:
        return None
    fig = _figure(1 + 3.6 * len(params), 3.6)
    axes = np.atleast_1d(fig.subplots(1, len(params)))
    scores = trials[score_metric].astype(float)
    for ax, param in zip(axes, params):
        x = trials[param]
        numeric = pd.api.types.is_numeric_dtype(x) and not pd.api.types.is_bool_dtype(x)
        if not numeric:  # categories at 0, 1, 2, … in order of appearance
            labels = list(dict.fromkeys(x.astype(str)))
            x = x.astype(str).map({v: i for i, v in enumerate(labels)})
            ax.set_xticks(range(len(labels)), labels)
        ax.scatter(x, scores, alpha=0.8)
        medians = scores.groupby(x).median().sort_index()
        ax.plot(medians.index, medians.to_numpy(), color="black", linewidth=1, label="median")
        if numeric and (x > 0).all() and x.max() / x.min() >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(param.removeprefix(CONFIG_PREFIX))
        ax.set_ylabel(score_metric)
    axes[0].legend(loc="best")
    fig.suptitle(f"{method}: score against each searched hyperparameter")
    return _save(fig, out / f"params_{_safe_name(method)}.png")


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)

"""Early stopping of sweep trials when likelihood over-optimisation sets in.

Shi et al. (arXiv 2410.11677) find that falling entropy over the top-k next tokens, and shrinking
top-k probability mass, mark the point where raising the chosen likelihood starts to hurt. Neither
they nor anyone else fixes a threshold, so every knob is a setting (``EarlyStoppingConfig``).

``CollapseDetector`` is the pure state machine (one per trial, fed one report at a time);
``CollapseStopper`` is the thin Ray Tune adapter that keeps one detector per trial and remembers
why each trial was stopped, so the report can say so (``stops.json`` in the study folder).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ray.tune import Stopper

from po_ray.config import EarlyStoppingConfig

COLLAPSE_REASONS = ("topk_entropy_collapse", "topk_mass_collapse")
STOP_REASONS = (*COLLAPSE_REASONS, "nan_loss", "divergence")


@dataclass(frozen=True)
class StopDecision:
    reason: str
    """One of STOP_REASONS."""
    step: int
    """The step of the report that triggered the stop."""
    detail: str
    """One sentence for people: the values that crossed the line."""


@dataclass
class _SignalState:
    """EMA, running peak of the EMA, and how many reports in a row it has sat below the line."""

    smoothed: float | None = None
    peak: float | None = None
    peak_step: int = 0
    below: int = 0
    below_since: int = 0


class CollapseDetector:
    """Decide, one report at a time, whether a trial has collapsed, diverged or produced NaN.

    Rules, in the order they are checked on each report:
      1. loss is NaN or ±inf, or ``skipped_steps`` (the loop's count of steps it skipped for a
         NaN/inf loss or gradient, which report no loss) has risen -> ``nan_loss`` at once;
      2. loss > ``divergence_factor`` × the first finite loss -> ``divergence`` at once
         (only when that first loss is > 0: a ratio to a non-positive loss means nothing);
      3. each watched signal (``signal``: topk_entropy, topk_mass or both) is smoothed by an EMA,
         ``s_t = ema·s_{t-1} + (1 − ema)·x_t`` with ``s`` starting at the first value, and its
         running peak is kept; a report counts as "below" when ``step >= min_steps`` and
         ``s_t <= (1 − drop_fraction)·peak`` (peak > 0). ``patience`` below-reports in a row stop
         the trial; one report back above the line resets the count.
    A missing (None) or non-finite signal value leaves that signal's state untouched. Once a
    decision is made it is returned for every later report too.
    """

    def __init__(self, settings: EarlyStoppingConfig = EarlyStoppingConfig()):
        self.settings = settings
        watched = ("topk_entropy", "topk_mass") if settings.signal == "both" else (settings.signal,)
        self._signals = {name: _SignalState() for name in watched}
        self._first_loss: float | None = None
        self._skipped = 0
        self.decision: StopDecision | None = None

    def update(
        self,
        step: int,
        loss: float | None = None,
        topk_entropy: float | None = None,
        topk_mass: float | None = None,
        skipped_steps: int | None = None,
    ) -> StopDecision | None:
        """Feed one report; return the StopDecision that stops the trial, or None to go on."""
        if self.decision is not None:
            return self.decision
        self.decision = self._check_skipped(step, skipped_steps) or self._check_loss(step, loss) or self._check_signals(
            step, {"topk_entropy": topk_entropy, "topk_mass": topk_mass}
        )
        return self.decision

    def _check_skipped(self, step: int, skipped_steps: int | None) -> StopDecision | None:
        if skipped_steps is None or int(skipped_steps) <= self._skipped:
            return None
        new, self._skipped = int(skipped_steps) - self._skipped, int(skipped_steps)
        # A count, not a flag: with train.report_every > 1 the skipped step may lie between reports.
        return StopDecision("nan_loss", step, f"{new} step(s) skipped for a non-finite loss or gradient by step {step} "
                                               f"({self._skipped} in all)")

    def _check_loss(self, step: int, loss: float | None) -> StopDecision | None:
        if loss is None:
            return None
        loss = float(loss)
        if not math.isfinite(loss):
            return StopDecision("nan_loss", step, f"loss is {loss} at step {step}")
        if self._first_loss is None:
            self._first_loss = loss
            return None
        limit = self.settings.divergence_factor * self._first_loss
        if self._first_loss > 0 and loss > limit:
            return StopDecision(
                "divergence",
                step,
                f"loss {loss:.4g} at step {step} exceeds {self.settings.divergence_factor:g} × the first loss "
                f"{self._first_loss:.4g}",
            )
        return None

    def _check_signals(self, step: int, values: dict[str, float | None]) -> StopDecision | None:
        es = self.settings
        for name, state in self._signals.items():
            value = values[name]
            if value is None or not math.isfinite(float(value)):
                continue
            value = float(value)
            state.smoothed = value if state.smoothed is None else es.ema * state.smoothed + (1 - es.ema) * value
            if state.peak is None or state.smoothed > state.peak:
                state.peak, state.peak_step = state.smoothed, step
            line = (1 - es.drop_fraction) * state.peak
            if step >= es.min_steps and state.peak > 0 and state.smoothed <= line:
                if state.below == 0:
                    state.below_since = step
                state.below += 1
            else:
                state.below = 0
        # Check after updating every signal so that "both" keeps both states current.
        for name, state in self._signals.items():
            if state.below >= es.patience:
                drop = 1 - state.smoothed / state.peak
                return StopDecision(
                    f"{name}_collapse",
                    step,
                    f"smoothed {name} {state.smoothed:.4g} is {drop:.0%} below its peak {state.peak:.4g} "
                    f"(step {state.peak_step}) for {state.below} reports since step {state.below_since}",
                )
        return None


class CollapseStopper(Stopper):
    """Ray Tune stopper: one CollapseDetector per trial, fed each reported result.

    Reads ``result["step"]`` (else ``result["training_iteration"]``), ``loss``, ``skipped_steps``,
    ``topk_entropy`` and ``topk_mass`` (``gen/topk_*`` with ``source: generation``); any but the
    step may be absent from a report. Never stops the whole
    experiment. ``decisions`` maps trial_id -> StopDecision for every trial it stopped.
    """

    def __init__(self, settings: EarlyStoppingConfig = EarlyStoppingConfig()):
        self.settings = settings
        self._detectors: dict[str, CollapseDetector] = {}
        self.decisions: dict[str, StopDecision] = {}

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        detector = self._detectors.setdefault(trial_id, CollapseDetector(self.settings))
        step = result.get("step", result.get("training_iteration"))
        prefix = "gen/" if self.settings.source == "generation" else ""
        decision = detector.update(
            int(step) if step is not None else 0,
            loss=result.get("loss"),
            topk_entropy=result.get(prefix + "topk_entropy"),
            topk_mass=result.get(prefix + "topk_mass"),
            skipped_steps=result.get("skipped_steps"),
        )
        if decision is None:
            return False
        self.decisions[trial_id] = decision
        return True

    def stop_all(self) -> bool:
        return False

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``{trial_id: {reason, step, detail}}`` as JSON (atomically: temp file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({k: asdict(v) for k, v in self.decisions.items()}, indent=2, sort_keys=True))
        os.replace(tmp, path)
        return path

    @staticmethod
    def load(path: str | os.PathLike) -> dict[str, StopDecision]:
        """Read decisions written by ``save``."""
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        return {trial_id: StopDecision(**d) for trial_id, d in raw.items()}

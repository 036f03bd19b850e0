"""The early-warning state of the forgetting engine: measured points and the latched warning.

The rule is :func:`~fisher_callbacks.functional.forgetting.early_warning` (the band over the last
three measured drifts, projected ahead) and the latch
:func:`~fisher_callbacks.functional.forgetting.warning_active`; this keeps, per task, the points
they read and the state they latch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..functional.forgetting import WarningDecision, early_warning, warning_active

Point = tuple[int, float]


class WarningState:
    """Measured ``(step, drift)`` points (the anchor first) and the latched warning per task.

    Attributes:
        points: ``{task: [(step, drift), ...]}``: the anchor ``(step, 0.0)``, then every early
            probe and boundary (nats).
        active: ``{task: bool}``: a warning is active for the task.
        changed: a warning state changed since the flag was last cleared (the per-step row of
            that step is written at once).
    """

    def __init__(self) -> None:
        self.points: dict[str, list[Point]] = {}
        self.active: dict[str, bool] = {}
        self.changed = False

    def start(self, task: str, step: int) -> None:
        """A newly anchored task: one point (``step``, 0), no warning."""
        self.points[task] = [(step, 0.0)]
        self.active[task] = False

    def add(self, task: str, step: int, drift: float) -> None:
        """A drift measured between boundaries (early probe)."""
        self.points[task].append((step, drift))

    def measure(self, task: str, step: int, drift: float, anchor_step: int) -> None:
        """A drift measured at a boundary: it replaces an early probe's point at the same step."""
        points = self.points.setdefault(task, [(anchor_step, 0.0)])
        if points[-1][0] == step:
            points[-1] = (step, drift)
        elif points[-1][0] < step:
            points.append((step, drift))

    def last_drift(self, task: str) -> float:
        """The drift at the last measurement (the forecast's base)."""
        return self.points[task][-1][1]

    def decide(
        self,
        task: str,
        now: Point | None,
        threshold: float,
        horizon: float,
        relative: bool,
        baseline: float,
    ) -> WarningDecision:
        """The band rule on the measured points of ``task``, at the last one or at ``now`` =
        (step, forecast) past it."""
        steps, drifts = zip(*self.points[task])
        return early_warning(
            steps,
            drifts,
            threshold,
            horizon_steps=horizon,
            now=now,
            relative=relative,
            baseline=baseline,
        )

    def latch(self, task: str, decision: WarningDecision) -> bool:
        """Latch ``decision`` into the state of ``task``; True on a new warning."""
        was = self.active.get(task, False)
        active = self.active[task] = warning_active(was, decision)
        if active != was:
            self.changed = True
        return active and not was

    def state_dict(self) -> dict[str, Any]:
        return {"points": self.points, "active": self.active}

    def load_state_dict(
        self, state: Mapping[str, Any], history: Mapping[str, Any], anchor_step: int | None
    ) -> None:
        """Restore from the checkpoint's ``forecast`` entry; a checkpoint without points gives
        the anchor and the boundaries of ``history``."""
        start = anchor_step or 0
        saved = state.get("points", {})
        self.points = {
            t: [tuple(p) for p in saved[t]]
            if t in saved
            else [(start, 0.0), *zip(h.get("step", []), h.get("measured", []))]
            for t, h in history.items()
        }
        self.active = {t: bool(state.get("active", {}).get(t, False)) for t in history}

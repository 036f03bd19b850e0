"""Reporting of the forgetting engine: readings to metric rows, figures, alerts and tables.

Nothing here computes forgetting; it formats what :mod:`~fisher_callbacks.engine.forgetting`
measured and sends it to ``host.sinks`` (rank zero).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..functional.forgetting import WarningDecision
from ..plots import NOT_MONITORED_LABEL, plot_forgetting_timeline, plot_layer_head_heatmaps
from ..sinks import AlertSender, send_custom_scalars, send_figure, send_table
from .forgetting_tracker import ForgettingReading
from .host import Host

log = logging.getLogger("fisher_callbacks")

BAND_KEYS = ("band_step", "band_low", "band_high")
ALERT_COLUMNS = ["step", "source", "measured", "risk", "reason"]


def new_history() -> dict[str, list]:
    """``history[task]``: boundaries (``step``, ``measured``, ``predicted``, ``warning``: the
    latched state there, 0/1), the per-step forecast (``forecast_step``, ``forecast``; every
    optimizer step, nats) and the band of every decision (``band_step``, ``band_low``,
    ``band_high``, nats)."""
    keys = ("step", "measured", "predicted", "warning", "forecast_step", "forecast", *BAND_KEYS)
    return {k: [] for k in keys}


def forgetting_dashboard_layout(tasks: Sequence[str]) -> dict[str, dict[str, list[Any]]]:
    """TensorBoard custom-scalars layout: one forgetting chart per reference task.

    Chart ``"{task}: drift vs threshold (nats)"`` overlays ``forgetting/{task}/measured``,
    ``/predicted``, ``/forecast`` (when logged) and ``/threshold``; chart ``"{task}: risk and
    warning"`` overlays ``/risk`` and ``/warning``. Tags are anchored regular expressions (a task
    name is escaped), the form ``SummaryWriter.add_custom_scalars`` takes.

    Args:
        tasks: reference task names.

    Returns:
        ``{"forgetting": {chart title: ["Multiline", [tag regex, ...]]}}``.
    """

    def tags(task: str, names: Sequence[str]) -> list[str]:
        return [f"^{re.escape(f'forgetting/{task}/{n}')}$" for n in names]

    charts: dict[str, list[Any]] = {}
    for task in tasks:
        drift = ("measured", "predicted", "forecast", "threshold")
        charts[f"{task}: drift vs threshold (nats)"] = ["Multiline", tags(task, drift)]
        charts[f"{task}: risk and warning"] = ["Multiline", tags(task, ("risk", "warning"))]
    return {"forgetting": charts}


def verdict_row(
    task: str, decision: WarningDecision, active: bool, unit: float, value: float
) -> dict[str, float]:
    """``risk``, ``warning`` (the latched state), the band (nats, when finite) and ``nonfinite``
    (when the drift judged is not finite) of one decision."""
    prefix = f"forgetting/{task}"
    row = {f"{prefix}/risk": decision.risk, f"{prefix}/warning": float(active)}
    if math.isfinite(decision.low) and math.isfinite(decision.high):
        row[f"{prefix}/band_low"] = decision.low * unit
        row[f"{prefix}/band_high"] = decision.high * unit
    if not math.isfinite(value):
        row[f"{prefix}/nonfinite"] = 1.0
    return row


def boundary_values(reading: ForgettingReading, threshold: float) -> dict[str, float]:
    """The boundary scalars of one reading (``threshold`` in nats)."""
    prefix = f"forgetting/{reading.task}"
    return {
        f"{prefix}/measured": reading.measured,
        f"{prefix}/predicted": reading.predicted,
        f"{prefix}/ewc_quadratic": reading.ewc,
        f"{prefix}/threshold": threshold,
    }


def timeline_figure(
    task: str,
    hist: Mapping[str, list],
    *,
    warning_steps: Sequence[int],
    stop_step: int | None,
    threshold: float,
    relative: bool,
    stop_threshold: float | None,
    horizon: float,
    step: int | None = None,
):
    """The forgetting timeline of ``task`` from its history (see :func:`plot_forgetting_timeline`).

    Series: ``measured`` and ``predicted`` drift, plus every other per-boundary numeric series of
    ``hist`` as its own line, the per-step ``forecast``; ``ewc_quadratic`` in a panel of its own
    (it is orders of magnitude smaller); the band of every decision.
    """
    steps = hist["step"]
    labels = {"measured": "measured", "predicted": "predicted (first order)"}
    series = {labels.get(k, k): (steps, v) for k, v in hist.items() if k in labels}
    skip = ("step", "ewc_quadratic", "forecast_step", "forecast", "warning", *BAND_KEYS)
    for name, values in hist.items():  # further per-boundary series
        numeric = all(v is None or isinstance(v, (int, float)) for v in values)
        if name not in labels and name not in skip and numeric and len(values) == len(steps):
            series[name] = (steps, values)
    if hist.get("forecast"):  # per step, re-anchored at each measurement
        series["forecast (per step)"] = (hist["forecast_step"], hist["forecast"])
    ewc = hist.get("ewc_quadratic", [])
    secondary = {"EWC quadratic": (steps, ewc)} if len(ewc) == len(steps) and steps else None
    return plot_forgetting_timeline(
        series,
        title=f"Forgetting of {task!r}" + (f", step {step}" if step is not None else ""),
        value_label="probe loss − loss at fit start (nats)",
        threshold=threshold,
        threshold_label=f"warn threshold{' (relative)' if relative else ''}",
        stop_threshold=stop_threshold,
        warning_steps=list(warning_steps),
        stop_step=stop_step,
        secondary=secondary,
        secondary_label="EWC (nats)",
        band=(hist["band_step"], hist["band_low"], hist["band_high"]) if hist.get("band_step") else None,
        band_label=f"band: drift projected {horizon:g} steps ahead",
    )


class ForgettingReport:
    """Sends the forgetting engine's figures, alerts and tables to ``host.sinks``.

    Args:
        alert_wait_seconds: minimum time between two pushed alerts (``wandb.alert``) of one task.
    """

    def __init__(self, alert_wait_seconds: float) -> None:
        self.alert_sender = AlertSender(alert_wait_seconds)

    def dashboard(self, host: Host, tasks: Sequence[str]) -> None:
        """The TensorBoard custom-scalars layout of ``tasks`` (once per fit, rank zero)."""
        if host.is_global_zero:
            send_custom_scalars(host.sinks, forgetting_dashboard_layout(tasks))

    def alert(self, host: Host, alert: Mapping[str, Any], alerts: Sequence[Mapping[str, Any]]) -> None:
        """A new warning (rank zero): one log line, a rate-limited pushed alert and the table of
        ``alerts`` (those of the same task so far)."""
        if not host.is_global_zero:
            return
        task, step = alert["task"], alert["step"]
        text = f"step {step}: forgetting of {task!r} ({alert['source']}): {alert['reason']}"
        log.warning("fisher_callbacks: %s", text)
        self.alert_sender(host.sinks, f"Forgetting risk: {task}", text)
        rows = [[a[c] for c in ALERT_COLUMNS] for a in alerts]
        send_table(host.sinks, f"forgetting/{task}/alerts", ALERT_COLUMNS, rows, step)

    def attribution(self, host: Host, reading: ForgettingReading, where: str, partial: bool) -> None:
        """The figure ``forgetting/{task}/attribution``: the first-order prediction by
        layer/head/block (``where``: the parameters the prediction covers; ``partial``: the layout
        leaves blocks unmonitored, drawn as NaN cells)."""
        per_block_head, predicted = reading.attribution, reading.predicted
        cells = float(sum(float(v.double().nansum()) for v in per_block_head.values()))
        share = f" ({cells / predicted:.0%})" if abs(predicted) > 1e-12 else ""
        fig = plot_layer_head_heatmaps(
            per_block_head,
            title=f"Predicted forgetting of {reading.task!r} by layer/head/block, step {reading.step}",
            value_label="first-order share (nats)",
            diverging=True,
            notes=[
                f"attention weights (the cells): {cells:+.3g} of {predicted:+.3g} nats predicted "
                f"over {where}{share}"
            ],
            **({"nan_label": NOT_MONITORED_LABEL} if partial else {}),
        )
        send_figure(host.sinks, f"forgetting/{reading.task}/attribution", fig, reading.step)
        fig.clf()

    def timeline(self, host: Host, task: str, fig, step: int) -> None:
        """The figure ``forgetting/{task}/timeline`` at ``step``."""
        send_figure(host.sinks, f"forgetting/{task}/timeline", fig, step)
        fig.clf()

    def stopping(self, host: Host, step: int, what: str) -> None:
        """The one log line of an agreed stop (rank zero)."""
        if host.is_global_zero:
            log.warning(
                "fisher_callbacks: stopping at step %d (%s forgetting >= stop_threshold, or not finite)",
                step,
                what,
            )

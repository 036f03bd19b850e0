"""ForgettingRiskMonitor: measured and predicted forgetting of reference tasks, early warning, stop.

All math lives in :mod:`fisher_callbacks.functional.forgetting`; this callback keeps the anchor,
the history and the accumulators, and talks to the loggers.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from ..functional.forgetting import (
    FirstOrderForgettingAccumulator,
    early_warning,
    ewc_penalty,
    fisher_damage_asymmetry,
)
from ..loggers import (
    AlertSender,
    forgetting_dashboard_layout,
    log_custom_scalars,
    log_figure,
    log_metrics,
    log_table,
)
from ..plots import plot_forgetting_timeline, plot_layer_head_heatmaps
from .fisher_monitor import FisherMonitor, find_fisher_monitor

log = logging.getLogger("fisher_callbacks")


class ForgettingRiskMonitor(Callback):
    """Watch the loss of reference tasks while training on another, and warn before it is lost.

    The anchor theta_0 is taken at fit start (or restored from a checkpoint, so a resumed run
    measures against the ORIGINAL anchor). At each validation boundary (never in the sanity check),
    for each reference task A (a probe set of ``fisher_monitor.reference_tasks``) it logs:

    - ``forgetting/{A}/measured``: ``L_A(theta_t) - L_A(theta_0)`` on the probe set (nats);
    - ``forgetting/{A}/predicted``: first-order ``sum_s g_A(theta_s) . (theta_{s+1} - theta_s)``
      over the validation boundaries, trapezoid rule with the gradients at both ends, over every
      trainable parameter; its split over attention layers/heads/blocks is logged as the figure
      ``forgetting/{A}/attribution``;
    - ``forgetting/{A}/ewc_quadratic``: ``0.5 sum F_A(theta_0) (theta - theta_0)^2`` on the
      monitored weights, with task A's contribution Fisher at the anchor. It underestimates real
      forgetting by orders of magnitude on fine-tuning paths (see
      :func:`~fisher_callbacks.functional.forgetting.ewc_penalty`) and never drives the warning;
    - ``forgetting/{A}/damage_from_{train}`` and ``/damage_log_ratio`` (Fisher-weighted damage of
      one unit step on the training task, and its asymmetry) when the training task has samples;
    - ``forgetting/{A}/risk`` in [0, 1] and ``forgetting/{A}/warning`` (0/1) from
      :func:`~fisher_callbacks.functional.forgetting.early_warning`: the measured drift crossed
      ``warn_threshold`` or its significant rising trend reaches it within ``horizon_steps``;
    - ``forgetting/{A}/threshold``: ``warn_threshold`` in nats (times ``|L_A(theta_0)|`` when
      ``relative``), the reference line of the drift charts;
    - figures ``forgetting/{A}/timeline`` (measured and predicted drift against the threshold,
      warnings and the stop marked, EWC in a panel of its own) and ``forgetting/{A}/attribution``.

    Every value, figure and table carries ``trainer.global_step`` at the boundary (see
    :mod:`fisher_callbacks.loggers`). At fit start a TensorBoard logger gets a custom-scalars
    layout (:func:`~fisher_callbacks.loggers.forgetting_dashboard_layout`): one chart per task
    with drift, forecast and threshold.

    On a warning: one log line, an entry in ``alerts`` (``step``, ``task``, ``measured``,
    ``predicted``, ``risk``, ``reason``), the alerts so far as the table ``forgetting/{A}/alerts``
    (W&B table, TensorBoard text, CSV file: unlike the 0/1 ``warning`` chart, no dashboard
    smoothing blurs it), a rate-limited ``wandb.alert`` when a W&B logger is attached. When the
    measured drift reaches ``stop_threshold`` the run stops (decision reduced across ranks like
    EarlyStopping).

    Args:
        fisher_monitor: the :class:`FisherMonitor` (default: the one in ``trainer.callbacks``, so a
            LightningCLI YAML can list the callbacks independently) with the reference probe sets.
        reference_tasks: tasks to watch (must be probe sets of the monitor).
        warn_threshold: drift (nats, or a fraction of the baseline loss if ``relative``).
        relative: compare ``drift / L_A(theta_0)``.
        horizon_steps: warn when the trend reaches the threshold within this many steps (default:
            before the next validation).
        stop_threshold: stop training when the measured drift reaches it (same units).
        alert_wait_seconds: minimum time between two W&B alerts of the same task.
        trend_window: validations the trend is fitted on (>= 3).
        noise_sigmas: a trend counts only when its slope exceeds this many standard errors
            (lower warns earlier on short, accelerating series; higher resists noise).
        predict_on: parameters of the first-order prediction: ``"all"`` trainable ones (keeps a
            copy of them and their probe gradient) or ``"monitored"`` Q/K/V/O weights only (far
            less memory on large models; misses the MLP/embedding share of forgetting).
    """

    def __init__(
        self,
        fisher_monitor: FisherMonitor | None = None,
        reference_tasks: Sequence[str] = ("general",),
        warn_threshold: float = 0.1,
        relative: bool = False,
        horizon_steps: float | None = None,
        stop_threshold: float | None = None,
        alert_wait_seconds: float = 600.0,
        trend_window: int = 3,
        noise_sigmas: float = 3.0,
        predict_on: str = "all",
    ) -> None:
        if warn_threshold <= 0:
            raise ValueError(f"warn_threshold must be > 0, got {warn_threshold}")
        if stop_threshold is not None and stop_threshold <= 0:
            raise ValueError(f"stop_threshold must be > 0, got {stop_threshold}")
        self.fisher_monitor = fisher_monitor
        self.reference_tasks = list(reference_tasks)
        self.warn_threshold = warn_threshold
        self.relative = relative
        self.horizon_steps = horizon_steps
        self.stop_threshold = stop_threshold
        self.trend_window = trend_window
        if predict_on not in ("all", "monitored"):
            raise ValueError(f"predict_on must be 'all' or 'monitored', got {predict_on!r}")
        self.predict_on = predict_on
        self.noise_sigmas = noise_sigmas
        self.alerts: list[dict[str, Any]] = []
        self.history: dict[str, dict[str, list[float]]] = {}
        self._alert = AlertSender(alert_wait_seconds)
        self._anchor: dict[str, torch.Tensor] | None = None  # monitored weights at theta_0
        self._prev: dict[str, torch.Tensor] | None = None  # trainable params at the last boundary
        self._prev_grad: dict[str, dict[str, torch.Tensor]] = {}
        self._baseline: dict[str, float] = {}
        self._anchor_fisher: dict[str, dict[str, torch.Tensor]] = {}  # F_A at theta_0 (EWC)
        self._acc: dict[str, FirstOrderForgettingAccumulator] = {}
        self._acc_state: dict[str, Any] = {}
        self.stopped_at: int | None = None
        self._warned_nonfinite: set[str] = set()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.fisher_monitor = find_fisher_monitor(trainer, self.fisher_monitor, type(self).__name__)
        if self.predict_on == "monitored" and self.fisher_monitor.layout is not None:
            self.fisher_monitor.probe_grad_names = set(self.fisher_monitor.layout.monitored_parameters())

    @property
    def state_key(self) -> str:
        return self._generate_state_key(reference_tasks=self.reference_tasks)

    # ------------------------------------------------------------------ anchor
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        missing = [t for t in self.reference_tasks if t not in self.fisher_monitor.reference_tasks]
        if missing:
            raise ValueError(
                f"ForgettingRiskMonitor watches {missing}, which are not probe sets of the "
                f"FisherMonitor (reference_tasks={list(self.fisher_monitor.reference_tasks)})"
            )
        if trainer.is_global_zero:
            log_custom_scalars(trainer.loggers, forgetting_dashboard_layout(self.reference_tasks))
        layout = self.fisher_monitor.layout
        for task in self.reference_tasks:
            self._acc.setdefault(task, FirstOrderForgettingAccumulator(layout))
            if task in self._acc_state:
                self._acc[task].load_state_dict(self._acc_state.pop(task))
        if self._anchor is not None:  # restored from a checkpoint: keep the original anchor
            # checkpoints load on the CPU: bring the restored state to the module's device
            device = pl_module.device
            self._anchor = _to(self._anchor, device)
            self._prev = _to(self._prev, device)
            self._prev_grad = {t: _to(g, device) for t, g in self._prev_grad.items()}
            self._anchor_fisher = {t: _to(f, device) for t, f in self._anchor_fisher.items()}
            return
        params = dict(pl_module.named_parameters())
        self._anchor = {n: params[n].detach().clone() for n in layout.monitored_parameters()}
        self._prev = self._snapshot(pl_module)
        for task in self.reference_tasks:
            try:
                probe = self.fisher_monitor.run_probe(
                    pl_module, task, self.fisher_monitor.reference_tasks[task], trainer.global_step
                )
            except Exception as err:
                rank_zero_warn(f"ForgettingRiskMonitor: no anchor for {task!r} ({err!r}); not watched")
                continue
            self._baseline[task] = probe["loss"]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fisher0 = self.fisher_monitor.collector.fisher(task)
            self._anchor_fisher[task] = {n: f.clone() for n, f in fisher0.items()}
            self._prev_grad[task] = probe["grad"]
            self.history[task] = {"step": [], "measured": [], "predicted": []}

    # ------------------------------------------------------------------ boundary
    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or self._anchor is None:
            return
        self.fisher_monitor.refresh(trainer, pl_module)
        step = trainer.global_step
        now = self._snapshot(pl_module)
        delta = {n: now[n] - self._prev[n] for n in now if n in self._prev}
        stop = False
        for task in self.reference_tasks:
            probe = self.fisher_monitor.probe.get(task)
            if probe is None or probe["step"] != step:
                continue
            try:
                stop |= self._evaluate(trainer, pl_module, task, probe, delta, step)
            except Exception as err:
                rank_zero_warn(f"ForgettingRiskMonitor: {task} failed at step {step}: {err!r}")
        self._prev = now
        if self.stop_threshold is not None:
            should_stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
            if should_stop and not trainer.should_stop:
                trainer.should_stop = True
                self.stopped_at = step
                log.warning("fisher_callbacks: stopping at step %d (forgetting >= stop_threshold)", step)
        if trainer.is_global_zero:
            self._log_timelines(trainer, step)

    def _snapshot(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        names = self.fisher_monitor.probe_grad_names if self.predict_on == "monitored" else None
        return {
            n: p.detach().clone()
            for n, p in pl_module.named_parameters()
            if p.requires_grad and (names is None or n in names)
        }

    def _evaluate(self, trainer, pl_module, task: str, probe: dict, delta: dict, step: int) -> bool:
        hist = self.history.setdefault(task, {"step": [], "measured": [], "predicted": []})
        if task not in self._baseline or (hist["step"] and step <= hist["step"][-1]):
            return False  # no anchor, or this step was evaluated already (two boundaries, one step)
        grad_now = probe["grad"]
        acc = self._acc[task]
        prev = self._prev_grad.get(task, grad_now)
        names = [n for n in delta if n in prev and n in grad_now]
        acc.update(
            {n: prev[n] for n in names},
            {n: delta[n] for n in names},
            grad_a_end={n: grad_now[n] for n in names},
        )
        self._prev_grad[task] = grad_now
        measured = probe["loss"] - self._baseline[task]
        predicted = acc.total
        collector = self.fisher_monitor.collector
        params = dict(pl_module.named_parameters())
        current = {n: params[n].detach() for n in self._anchor}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fisher_a = collector.fisher(task)
        fisher0 = self._anchor_fisher.get(task) or fisher_a
        ewc = ewc_penalty(fisher0, current, self._anchor) if fisher0 else 0.0
        decision = early_warning(
            [*hist["step"], step],
            [*hist["measured"], measured],
            self.warn_threshold,
            relative=self.relative,
            baseline=self._baseline[task],
            horizon_steps=self.horizon_steps,
            window=self.trend_window,
            noise_sigmas=self.noise_sigmas,
        )
        hist["step"].append(step)
        hist["measured"].append(measured)
        hist["predicted"].append(predicted)
        hist.setdefault("ewc_quadratic", []).append(ewc)
        prefix = f"forgetting/{task}"
        values = {
            f"{prefix}/measured": measured,
            f"{prefix}/predicted": predicted,
            f"{prefix}/ewc_quadratic": ewc,
            f"{prefix}/risk": decision.risk,
            f"{prefix}/warning": float(decision.warn),
            f"{prefix}/threshold": self._in_nats(task, self.warn_threshold),
        }
        values.update(self._damage(task, fisher_a, grad_now, prefix))
        finite = {}
        for name, value in values.items():
            if math.isfinite(float(value)):
                finite[name] = float(value)
            elif name not in self._warned_nonfinite:
                self._warned_nonfinite.add(name)
                rank_zero_warn(f"ForgettingRiskMonitor: {name} is {value} at step {step}; not logged")
        log_metrics(trainer, pl_module, finite, sync_dist=trainer.world_size > 1)
        if decision.warn:
            self._warn(trainer, task, step, measured, predicted, decision)
        if trainer.is_global_zero:
            self._log_figures(trainer, task, step, acc.per_block_head(), predicted)
        scaled = measured / abs(self._baseline[task]) if self.relative else measured
        return self.stop_threshold is not None and scaled >= self.stop_threshold

    def _in_nats(self, task: str, threshold: float) -> float:
        """A threshold in nats: scaled by ``|L_A(theta_0)|`` when ``relative``."""
        return threshold * abs(self._baseline[task]) if self.relative else threshold

    def timeline_figure(self, task: str, step: int | None = None):
        """The forgetting timeline of ``task`` so far (see :func:`plot_forgetting_timeline`).

        Series: ``measured`` and ``predicted`` drift, plus every other per-step series of
        ``history[task]`` (e.g. a ``forecast``) as its own line; ``ewc_quadratic`` in a panel of
        its own (it is orders of magnitude smaller). Warning steps come from ``alerts``.
        """
        hist = self.history[task]
        steps = hist["step"]
        labels = {"measured": "measured", "predicted": "predicted (first order)"}
        series = {labels.get(k, k): (steps, v) for k, v in hist.items() if k in labels}
        for name, values in hist.items():  # further per-step series (e.g. "forecast")
            numeric = all(v is None or isinstance(v, (int, float)) for v in values)
            if (
                name not in labels
                and name not in ("step", "ewc_quadratic")
                and numeric
                and len(values) == len(steps)
            ):
                series[name] = (steps, values)
        ewc = hist.get("ewc_quadratic", [])
        secondary = {"EWC quadratic": (steps, ewc)} if len(ewc) == len(steps) and steps else None
        stop = self.stopped_at
        return plot_forgetting_timeline(
            series,
            title=f"Forgetting of {task!r}" + (f", step {step}" if step is not None else ""),
            value_label="probe loss − loss at fit start (nats)",
            threshold=self._in_nats(task, self.warn_threshold),
            threshold_label=f"warn threshold{' (relative)' if self.relative else ''}",
            stop_threshold=None if self.stop_threshold is None else self._in_nats(task, self.stop_threshold),
            warning_steps=[a["step"] for a in self.alerts if a["task"] == task],
            stop_step=stop,
            secondary=secondary,
            secondary_label="EWC (nats)",
        )

    def _log_figures(self, trainer, task: str, step: int, per_block_head: dict, predicted: float) -> None:
        prefix = f"forgetting/{task}"
        cells = float(sum(float(v.double().sum()) for v in per_block_head.values()))
        share = f" ({cells / predicted:.0%})" if abs(predicted) > 1e-12 else ""
        where = "all trainable weights" if self.predict_on == "all" else "the Q/K/V/O weights"
        fig = plot_layer_head_heatmaps(
            per_block_head,
            title=f"Predicted forgetting of {task!r} by layer/head/block, step {step}",
            value_label="first-order share (nats)",
            diverging=True,
            notes=[
                f"attention weights (the cells): {cells:+.3g} of {predicted:+.3g} nats predicted "
                f"over {where}{share}"
            ],
        )
        log_figure(trainer.loggers, f"{prefix}/attribution", fig, step)
        fig.clf()

    def _log_timelines(self, trainer, step: int) -> None:
        """``forgetting/{task}/timeline`` of every task evaluated at ``step`` (after the stop
        decision, so the step where the run stops is marked)."""
        for task, hist in self.history.items():
            if hist["step"] and hist["step"][-1] == step:
                try:
                    fig = self.timeline_figure(task, step)
                except Exception as err:
                    rank_zero_warn(f"ForgettingRiskMonitor: no timeline of {task} at step {step}: {err!r}")
                    continue
                log_figure(trainer.loggers, f"forgetting/{task}/timeline", fig, step)
                fig.clf()

    def _damage(self, task: str, fisher_a: dict, grad_a: dict, prefix: str) -> dict[str, float]:
        collector = self.fisher_monitor.collector
        train = self.fisher_monitor.train_task
        if not collector.store.entrywise:  # sketches: no per-entry task-B mean gradient
            return {}
        _, rows = collector.stored_gradients(train)
        if not rows or not fisher_a:
            return {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fisher_b = collector.fisher(train)
        grad_b = {n: r.float().mean(0) for n, r in rows.items()}
        grad_a = {n: grad_a[n] for n in grad_b if n in grad_a}
        if len(grad_a) != len(grad_b):
            return {}
        res = fisher_damage_asymmetry(fisher_a, grad_a, fisher_b, grad_b)
        return {
            f"{prefix}/damage_from_{train}": res["a_from_b"],
            f"{prefix}/damage_log_ratio": res["log_ratio"],
        }

    def _warn(self, trainer, task: str, step: int, measured: float, predicted: float, decision) -> None:
        alert = {
            "step": step,
            "task": task,
            "measured": measured,
            "predicted": predicted,
            "risk": decision.risk,
            "reason": decision.reason,
        }
        self.alerts.append(alert)
        if trainer.is_global_zero:
            text = (
                f"step {step}: forgetting of {task!r} at {measured:+.4f} nats (predicted "
                f"{predicted:+.4f}); {decision.reason}"
            )
            log.warning("fisher_callbacks: %s", text)
            self._alert(trainer.loggers, f"Forgetting risk: {task}", text)
            columns = ["step", "measured", "predicted", "risk", "reason"]
            rows = [[a[c] for c in columns] for a in self.alerts if a["task"] == task]
            log_table(trainer.loggers, f"forgetting/{task}/alerts", columns, rows, step)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "anchor": self._anchor,
            "prev": self._prev,
            "prev_grad": self._prev_grad,
            "baseline": self._baseline,
            "anchor_fisher": self._anchor_fisher,
            "history": self.history,
            "alerts": self.alerts,
            "accumulators": {t: a.state_dict() for t, a in self._acc.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._anchor = state_dict.get("anchor")
        self._prev = state_dict.get("prev")
        self._prev_grad = state_dict.get("prev_grad", {})
        self._baseline = dict(state_dict.get("baseline", {}))
        self._anchor_fisher = dict(state_dict.get("anchor_fisher", {}))
        self.history = state_dict.get("history", {})
        self.alerts = list(state_dict.get("alerts", []))
        self._acc_state = dict(state_dict.get("accumulators", {}))
        for task, acc in list(self._acc.items()):
            if task in self._acc_state:
                acc.load_state_dict(self._acc_state.pop(task))


def _to(tensors: dict[str, torch.Tensor] | None, device: torch.device) -> dict[str, torch.Tensor] | None:
    return None if tensors is None else {n: t.to(device) for n, t in tensors.items()}

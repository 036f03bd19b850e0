"""ForgettingRiskMonitor: measured and predicted forgetting of reference tasks, early warning, stop.

All math lives in :mod:`fisher_callbacks.functional.forgetting`; this callback keeps the anchor,
the history and the accumulators, and talks to the loggers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from .._validate import check_choice, check_number
from ..engine.ranks import WarningRelay, log_agreed
from ..functional.forgetting import (
    FirstOrderForgettingAccumulator,
    WarningDecision,
    early_warning,
    ewc_penalty,
    fisher_damage_asymmetry,
    warning_active,
)
from ..loggers import (
    AlertSender,
    forgetting_dashboard_layout,
    log_custom_scalars,
    log_figure,
    log_table,
)
from ..plots import NOT_MONITORED_LABEL, plot_forgetting_timeline, plot_layer_head_heatmaps
from ._boundary import BoundaryCallback, validation_due
from ._host import LightningHost
from .fisher_monitor import FisherMonitor, find_fisher_monitor

log = logging.getLogger("fisher_callbacks")


class ForgettingRiskMonitor(BoundaryCallback):
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
    - ``forgetting/{A}/risk`` in [0, 1], ``forgetting/{A}/warning`` (0/1) and the band
      ``forgetting/{A}/band_low`` / ``band_high`` (see "The early warning" below);
    - ``forgetting/{A}/threshold``: ``warn_threshold`` in nats (times ``|L_A(theta_0)|`` when
      ``relative``), the reference line of the drift charts;
    - figures ``forgetting/{A}/timeline`` (measured, predicted and forecast drift, the band, the
      threshold, warnings and the stop; EWC in a panel of its own) and ``forgetting/{A}/attribution``.

    Between boundaries, after every optimizer step (``forecast=True``), the per-step forecast
    ``forecast_t = measured_b + g_A(theta_b) . (theta_t - theta_b)`` extends the drift measured at
    the last measurement ``b`` by the first-order change since (one dot product per task and
    step over the predicted parameters, no forward pass), logged as ``forgetting/{A}/forecast``.
    Early probes (``early_probe_step``, default steps 1, 2, 4, ... of the first interval) measure
    the drift before the first boundary.

    The early warning (:func:`~fisher_callbacks.functional.forgetting.early_warning`): the last
    three measured drifts (early probes, boundaries) give two exponents of a power of the steps
    since the anchor, whose spread is a band; nothing is projected until those measurements turn
    upward (above the anchor and rising, over at least three optimizer steps); the drift now
    (measured, or the per-step forecast between measurements) is projected ``horizon_steps``
    ahead (never further than the steps since the anchor), and the warning fires when the conservative
    side of the band (the lower exponent) reaches ``warn_threshold``, or the measured drift does,
    or a drift is not finite. ``risk`` is that conservative projection over the threshold,
    clipped to [0, 1]. ``warning`` is a latched state (a warning is active for the task): on from
    the first warning until a measurement finds the drift below the threshold and falling at its
    last two measurements
    (:func:`~fisher_callbacks.functional.forgetting.warning_active`). Every row (forecast, early
    probe, boundary) carries ``trainer.global_step``; at a step where a validation follows, the
    boundary's row carries the verdict.

    On a new warning: one log line, an entry in ``alerts`` (``step``, ``task``, ``measured``,
    ``predicted``, ``forecast``, ``risk``, ``reason``, ``source``: ``"boundary"``,
    ``"forecast"`` or ``"early probe"``), the alerts table ``forgetting/{A}/alerts`` (W&B table,
    TensorBoard text, CSV file) and a rate-limited ``wandb.alert`` when a W&B logger is attached.
    When the measured drift or the forecast reaches ``stop_threshold`` (or is not finite) the run
    stops (decision reduced across ranks like EarlyStopping); a non-finite drift also logs
    ``forgetting/{A}/nonfinite = 1`` and ``risk = 1``.

    Args:
        fisher_monitor: the :class:`FisherMonitor` (default: the one in ``trainer.callbacks``, so a
            LightningCLI YAML can list the callbacks independently) with the reference probe sets.
        reference_tasks: tasks to watch (must be probe sets of the monitor).
        warn_threshold: drift (nats, or a fraction of the baseline loss if ``relative``).
        relative: compare ``drift / L_A(theta_0)``.
        horizon_steps: optimizer steps the band projects ahead (default: two validation
            intervals, so a steady rise is announced one interval or more before it crosses).
        stop_threshold: stop training when the measured drift or the forecast reaches it (same
            units).
        alert_wait_seconds: minimum time between two W&B alerts of the same task.
        predict_on: parameters of the first-order prediction: ``"all"`` trainable ones (keeps a
            copy of them and their probe gradient) or ``"monitored"`` Q/K/V/O weights only (far
            less memory on large models; misses the MLP/embedding share of forgetting).
        checkpoint_params: keep in checkpoints the copy of the predicted-on parameters at the last
            boundary and each task's probe gradient there (``(1 + R) * P_pred`` numbers, see the
            checkpoint-overhead formula in ``docs/costs.md``). ``False`` leaves them out: a resumed run
            restarts the first-order prediction from the resumed weights (one probe pass at fit
            start), so ``predicted`` misses the steps between the last boundary before the
            checkpoint and the checkpoint; the anchor, measured forgetting, EWC and the history
            are unaffected.
        forecast: keep the per-step forecast (one dot product per task and optimizer step); off,
            the band is judged at measurements only.
        early_probe_step: optimizer step(s) (counted from fit start) of extra probe passes before
            the first boundary, which measure the drift there: ``"auto"``: steps 1, 2, 4, ...
            below the first validation interval; an int: that step only; ``None``: off. Each costs
            one forward and backward over the probe set, ``log2`` of the interval of them per fit.

    Under DDP the probe results are those of every rank's probe samples (see FisherMonitor), the
    logged keys are agreed across ranks (a key missing on a rank is logged by none) and the
    warnings of every rank reach the user once, from rank zero; one "stopping at step" line per run.
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
        predict_on: str = "all",
        checkpoint_params: bool = True,
        forecast: bool = True,
        early_probe_step: int | str | None = "auto",
    ) -> None:
        self._keep_arguments(ForgettingRiskMonitor, locals())
        check_number("warn_threshold", warn_threshold, low=0.0, low_open=True)
        check_number("stop_threshold", stop_threshold, low=0.0, low_open=True, optional=True)
        check_number("horizon_steps", horizon_steps, low=0.0, optional=True)
        check_number("alert_wait_seconds", alert_wait_seconds, low=0.0)
        check_choice("predict_on", predict_on, ("all", "monitored"))
        if isinstance(reference_tasks, str):
            raise TypeError(f"reference_tasks must be a list of task names, got {reference_tasks!r}")
        if not (early_probe_step is None or early_probe_step == "auto" or _positive_int(early_probe_step)):
            raise ValueError(
                f"early_probe_step must be 'auto', None or an int >= 1, got {early_probe_step!r}"
            )
        self.fisher_monitor = fisher_monitor
        self.reference_tasks = list(reference_tasks)
        self.warn_threshold = warn_threshold
        self.relative = relative
        self.horizon_steps = horizon_steps
        self.stop_threshold = stop_threshold
        self.predict_on = predict_on
        self.checkpoint_params = checkpoint_params
        self.forecast = forecast
        self.early_probe_step = early_probe_step
        self._relay = WarningRelay("ForgettingRiskMonitor")
        self._to_log: dict[str, float] = {}
        self.alerts: list[dict[str, Any]] = []
        self.history: dict[str, dict[str, list[float]]] = {}
        self._alert = AlertSender(alert_wait_seconds)
        self._anchor: dict[str, torch.Tensor] | None = None  # monitored weights at theta_0
        self._prev: dict[str, torch.Tensor] | None = None  # theta_b: views into _fc_base
        self._prev_grad: dict[str, dict[str, torch.Tensor]] = {}  # g_A(theta_b): views into _fc_grads
        self._baseline: dict[str, float] = {}
        self._anchor_fisher: dict[str, dict[str, torch.Tensor]] = {}  # F_A at theta_0 (EWC)
        self._acc: dict[str, FirstOrderForgettingAccumulator] = {}
        self._acc_state: dict[str, Any] = {}
        self.stopped_at: int | None = None
        self._points: dict[str, list[tuple[int, float]]] = {}  # measured (step, drift), anchor first
        self._active: dict[str, bool] = {}  # the latched warning state per task
        self._changed = False  # a warning state changed at this step: its row is logged at once
        # per-step forecast: flat fp32 theta_b [N] and g_A(theta_b) [n_tasks, N], the live
        # parameters with their columns of the rows, rows . theta_b (the drift measured at b is
        # the last of ``_points``)
        self._fc_base: torch.Tensor | None = None
        self._fc_grads: torch.Tensor | None = None
        self._fc_slices: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._fc_at_base: torch.Tensor | None = None  # [n_params, n_tasks] fp64 (host)
        self._fc_dots: torch.Tensor | None = None  # [n_params, n_tasks] fp32 scratch
        self._fc_tasks: list[str] = []
        self._fc_step: int | None = None  # optimizer step of the last forecast
        self._fc_failed = False
        self._early_done = False  # no early probe is due any more (a boundary came, or the one asked)
        self._anchor_step: int | None = None  # optimizer step of theta_0
        self._interval: float | None = None  # validation interval, optimizer steps
        self._last_eval_step: int | None = None  # fit start or the last boundary

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._begin_fit(stage)
        self.fisher_monitor = find_fisher_monitor(trainer, self.fisher_monitor, type(self).__name__)
        self._relay = self.fisher_monitor.relay.view("ForgettingRiskMonitor")  # one record for the suite
        self._restrict_probe_grads()

    def _restrict_probe_grads(self) -> None:
        if self.predict_on == "monitored" and self.fisher_monitor.layout is not None:
            self.fisher_monitor.restrict_probe_gradients(
                set(self.fisher_monitor.layout.monitored_parameters())
            )

    @property
    def state_key(self) -> str:
        # Not keyed by reference_tasks: adding or removing a task on resume keeps the others'
        # anchors and history (state is per task inside).
        return self._generate_state_key()

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        legacy = f"{type(self).__qualname__}{{'reference_tasks'"  # the key before issue 27
        _adopt_legacy_state(checkpoint, self.state_key, legacy)

    # ------------------------------------------------------------------ anchor
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.fisher_monitor.active:  # stayed out of this fit (see FisherMonitor.required)
            return
        self.fisher_monitor.resolve(pl_module)  # names may have changed (compiled in setup)
        self._restrict_probe_grads()
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
            if self._prev is None:  # saved with checkpoint_params=False: restart the prediction here
                self._prev = self._snapshot(pl_module)
                for task in self.reference_tasks:
                    try:
                        probe = self.fisher_monitor.run_probe(LightningHost(trainer, pl_module), task)
                    except Exception as err:
                        self._relay.warn(f"no probe gradient for {task!r} at resume ({err!r})")
                        continue
                    self._prev_grad[task] = probe.grad
            added = [t for t in self.reference_tasks if t not in self._baseline]
            if added:  # watched since this resume: the others keep their anchors and history
                self._relay.warn(f"{added} added at the resume: anchored there, not at the original anchor")
                self._anchor_tasks(LightningHost(trainer, pl_module), added)
            self._build_forecast(pl_module)
            self._relay.flush()
            return
        params = dict(pl_module.named_parameters())
        self._anchor = {n: params[n].detach().clone() for n in layout.monitored_parameters()}
        self._prev = self._snapshot(pl_module)
        self._anchor_tasks(LightningHost(trainer, pl_module), self.reference_tasks)
        self._relay.flush()
        self._last_eval_step = self._anchor_step = trainer.global_step
        self._build_forecast(pl_module)

    def _anchor_tasks(self, host: LightningHost, tasks: Sequence[str]) -> None:
        """Baseline loss, anchor Fisher, probe gradient and a new history of each of ``tasks``."""
        for task in tasks:
            try:
                probe = self.fisher_monitor.run_probe(host, task)
            except Exception as err:
                self._relay.warn(f"no anchor for {task!r} ({err!r}); not watched")
                continue
            self._baseline[task] = probe.loss
            with self._relay.catch(f"{task}: "):
                fisher0 = self.fisher_monitor.collector.fisher(task)
            self._anchor_fisher[task] = {n: f.clone() for n, f in fisher0.items()}
            self._prev_grad[task] = probe.grad
            self.history[task] = _new_history()
            self._points[task] = [(host.step, 0.0)]
            self._active[task] = False

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        vcb = trainer.val_check_batch
        if self._interval is None and vcb is not None and math.isfinite(vcb) and vcb > 0:
            self._interval = max(float(vcb) / trainer.accumulate_grad_batches, 1.0)
        super().on_train_start(trainer, pl_module)  # may evaluate a boundary pending at resume

    # ------------------------------------------------------------------ per-step forecast
    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self._fc_base is None or self._fc_failed or step == self._fc_step:
            return  # no anchor yet, the forecast failed, or no optimizer step since the last one
        self._fc_step = step
        rows: dict[str, float] = {}
        stop = False
        try:
            probe_now = self._early_probe_due(step)
            if self.forecast:  # the verdict goes with a measurement when one comes at this step
                decide = not (probe_now or validation_due(trainer))
                for task, value in zip(self._fc_tasks, self._forecast_values()):
                    stop |= self._forecast_task(trainer, task, step, value, rows, decide=decide)
            if probe_now:
                stop |= self._early_probe(trainer, pl_module, step, rows)
                self._changed = True  # a measurement: its row is always written
        except Exception as err:
            self._fc_failed = True
            self._relay.warn(f"per-step forecast disabled at step {step}: {err!r}")
            return
        if rows and trainer.is_global_zero and (self._changed or _log_this_step(trainer)):
            _log_now(trainer, rows, step)
        self._changed = False
        if self.stop_threshold is not None:
            self._maybe_stop(trainer, stop, step, "forecast")

    def _early_probe_due(self, step: int) -> bool:
        if self._early_done or self._anchor_step is None or self.early_probe_step is None:
            return False
        since = step - self._anchor_step
        if self.early_probe_step != "auto":
            return since == self.early_probe_step
        if self._interval is None or not 1 <= since < self._interval:
            return False
        return since & (since - 1) == 0  # steps 1, 2, 4, ... of the first interval

    def _early_probe(self, trainer, pl_module, step: int, rows: dict[str, float]) -> bool:
        """Measure the drift at ``step`` before the first boundary (one probe-gradient pass per
        task): a measured point for the band, a point of the first-order trapezoid, and the
        forecast's new base. Returns whether the measured drift asks for a stop."""
        self._early_done = self.early_probe_step != "auto"  # "auto" ends at the first boundary
        try:
            host = LightningHost(trainer, pl_module)
            probes = {t: self.fisher_monitor.probe_gradient(host, t) for t in self._fc_tasks}
        except Exception as err:
            self._relay.warn(
                f"no early probe at step {step} ({err!r}); the band waits for the first boundary"
            )
            return False
        now = self._snapshot(pl_module)
        delta = {n: now[n] - self._prev[n] for n in now if n in self._prev}
        stop = False
        for task, probe in probes.items():
            prev, grad = self._prev_grad[task], probe.grad
            names = [n for n in delta if n in prev and n in grad]
            self._acc[task].update(
                {n: prev[n] for n in names},
                {n: delta[n] for n in names},
                grad_a_end={n: grad[n] for n in names},
            )
            self._prev_grad[task] = grad
            measured = probe.loss - self._baseline[task]
            stop |= self._forecast_task(trainer, task, step, measured, rows, measured=True)
        self._move_base(pl_module, now)
        return stop

    def _forecast_values(self) -> list[float]:
        """The per-step forecast of every forecast task: ``measured_b + g_A(theta_b) . (theta_t -
        theta_b)`` (no forward pass).

        ``g_A . (theta_t - theta_b)`` is ``rows . theta_t - rows . theta_b`` per parameter (strided
        column blocks of the rows into one scratch, no copy of theta_t), ``rows . theta_b`` taken
        once when the base moved; the difference and the sum in fp64 on the host."""
        dots = self._fc_dots
        for i, (param, rows) in enumerate(self._fc_slices):
            torch.mv(rows, param.detach().reshape(-1).float(), out=dots[i])
        first = (dots.cpu().double() - self._fc_at_base).sum(0).tolist()
        return [self._points[task][-1][1] + f for task, f in zip(self._fc_tasks, first)]

    def _forecast_task(
        self,
        trainer,
        task: str,
        step: int,
        value: float,
        rows: dict[str, float],
        *,
        measured=False,
        decide=True,
    ) -> bool:
        """Record one forecast (or an early probe's measured drift, ``measured=True``), decide the
        warning state from it and put this step's row into ``rows``. Returns whether it asks for a
        stop. ``decide=False``: a boundary follows at this step and carries the verdict."""
        hist = self.history[task]
        prefix = f"forgetting/{task}"
        if measured:
            self._points[task].append((step, value))
            rows[f"{prefix}/measured"] = value
        else:
            hist["forecast_step"].append(step)
            hist["forecast"].append(value)
        if math.isfinite(value):
            rows[f"{prefix}/forecast"] = value
        if decide:
            decision = self._decide(task, None if measured else (step, value))
            self._apply(trainer, task, step, decision, "early probe" if measured else "forecast", value, rows)
        return self._beyond_stop(task, value)

    def _decide(self, task: str, now: tuple[int, float] | None) -> WarningDecision:
        """The band rule (:func:`early_warning`) on the measured points of ``task``, at the last
        one or at ``now`` = (step, forecast) past it."""
        steps, drifts = zip(*self._points[task])
        return early_warning(
            steps,
            drifts,
            self.warn_threshold,
            horizon_steps=self._horizon(),
            now=now,
            relative=self.relative,
            baseline=self._baseline[task],
        )

    def _apply(self, trainer, task, step: int, decision: WarningDecision, source: str, value, rows) -> None:
        """Latch the warning state (:func:`warning_active`), record the band, alert on a new
        warning, and put ``risk``, ``warning`` and the band into ``rows``."""
        was = self._active.get(task, False)
        active = self._active[task] = warning_active(was, decision)
        hist = self.history[task]
        unit = abs(self._baseline[task]) if self.relative else 1.0
        for key, v in (
            ("band_step", step),
            ("band_low", decision.low * unit),
            ("band_high", decision.high * unit),
        ):
            hist.setdefault(key, []).append(v)
        prefix = f"forgetting/{task}"
        rows[f"{prefix}/risk"] = decision.risk
        rows[f"{prefix}/warning"] = float(active)
        if math.isfinite(decision.low) and math.isfinite(decision.high):
            rows[f"{prefix}/band_low"] = decision.low * unit
            rows[f"{prefix}/band_high"] = decision.high * unit
        if not math.isfinite(value):
            rows[f"{prefix}/nonfinite"] = 1.0
        if active != was:
            self._changed = True
        if active and not was:
            self._warn(trainer, task, step, decision, source, value)

    def _beyond_stop(self, task: str, value: float) -> bool:
        if self.stop_threshold is None:
            return False
        scaled = value / abs(self._baseline[task]) if self.relative else value
        return not math.isfinite(scaled) or scaled >= self.stop_threshold

    def _horizon(self) -> float:
        """Steps the band projects ahead: ``horizon_steps``, by default two validation intervals."""
        if self.horizon_steps is not None:
            return float(self.horizon_steps)
        return 2.0 * self._interval if self._interval is not None else 2.0

    def _move_base(self, pl_module, now: dict[str, torch.Tensor]) -> None:
        """theta_b becomes ``now``: the forecast restarts from the drift measured there."""
        self._prev = now
        self._build_forecast(pl_module)

    def _build_forecast(self, pl_module: pl.LightningModule) -> None:
        """One flat fp32 copy of theta_b ``[N]`` and the matrix ``[n_tasks, N]`` of each task's
        g_A(theta_b); ``_prev`` and ``_prev_grad`` become views into them (no second copy)."""
        self._fc_base = self._fc_grads = None
        if self._prev is None:
            return
        tasks = [t for t in self.reference_tasks if t in self._prev_grad and t in self._baseline]
        params = dict(pl_module.named_parameters())
        names = [n for n in self._prev if n in params and all(n in self._prev_grad[t] for t in tasks)]
        try:
            base, self._prev = _flat_views({n: self._prev[n] for n in names})
            matrix = base.new_empty(len(tasks), base.numel())
            for row, task in zip(matrix, tasks):
                self._prev_grad[task] = _flat_views({n: self._prev_grad[task][n] for n in names}, row)[1]
        except Exception as err:  # e.g. parameters on several devices: boundaries still work
            self._relay.warn(f"no per-step forecast ({err!r})")
            return
        self._fc_slices, offset = [], 0
        self._fc_dots = matrix.new_empty(len(names), len(tasks))
        for i, n in enumerate(names):
            k = params[n].numel()
            rows = matrix[:, offset : offset + k]
            self._fc_slices.append((params[n], rows))
            torch.mv(rows, base[offset : offset + k], out=self._fc_dots[i])
            offset += k
        self._fc_at_base = self._fc_dots.cpu().double()
        self._fc_tasks = tasks
        self._fc_base = base
        self._fc_grads = matrix

    # ------------------------------------------------------------------ boundary
    def _boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._anchor is None:
            return
        self.fisher_monitor.refresh(LightningHost(trainer, pl_module))
        step = trainer.global_step
        now = self._snapshot(pl_module)
        delta = {n: now[n] - self._prev[n] for n in now if n in self._prev}
        stop = False
        self._to_log = {}
        for task in self.reference_tasks:
            probe = self.fisher_monitor.probe.get(task)
            if probe is None or probe.step != step:
                continue
            try:
                stop |= self._evaluate(trainer, pl_module, task, probe, delta, step)
            except Exception as err:
                self._relay.warn(f"{task} failed at step {step}: {err!r}")
        # the same keys on every rank, or sync_dist would run a collective on some ranks only
        host = LightningHost(trainer, pl_module)
        log_agreed(host, self._to_log, self._relay, sync_dist=trainer.world_size > 1)
        self._to_log = {}
        if self._last_eval_step is not None and step > self._last_eval_step:
            self._interval = float(step - self._last_eval_step)
        self._last_eval_step = step
        self._early_done = True
        self._move_base(pl_module, now)  # copies the probe gradients into the forecast's rows
        for task in self._fc_tasks:  # ... which the FisherMonitor keeps instead of its own
            self.fisher_monitor.share_probe_gradient(task, self._prev_grad[task])
        if self.stop_threshold is not None:
            self._maybe_stop(trainer, stop, step, "measured")
        if trainer.is_global_zero:
            self._log_timelines(trainer, step)

    def _maybe_stop(self, trainer: pl.Trainer, stop: bool, step: int, what: str) -> None:
        should_stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if should_stop and not trainer.should_stop:
            trainer.should_stop = True
            self.stopped_at = step
            if trainer.is_global_zero:  # the decision is agreed: one line per run, not per rank
                log.warning(
                    "fisher_callbacks: stopping at step %d (%s forgetting >= stop_threshold, or not finite)",
                    step,
                    what,
                )

    def _snapshot(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        names = self.fisher_monitor.probe_grad_names if self.predict_on == "monitored" else None
        return {
            n: p.detach().clone()
            for n, p in pl_module.named_parameters()
            if p.requires_grad and (names is None or n in names)
        }

    def _evaluate(self, trainer, pl_module, task: str, probe: dict, delta: dict, step: int) -> bool:
        hist = self.history.setdefault(task, _new_history())
        if task not in self._baseline or (hist["step"] and step <= hist["step"][-1]):
            return False  # no anchor, or this step was evaluated already (two boundaries, one step)
        grad_now = probe.grad
        acc = self._acc[task]
        prev = self._prev_grad.get(task, grad_now)
        names = [n for n in delta if n in prev and n in grad_now]
        acc.update(
            {n: prev[n] for n in names},
            {n: delta[n] for n in names},
            grad_a_end={n: grad_now[n] for n in names},
        )
        self._prev_grad[task] = grad_now
        measured = probe.loss - self._baseline[task]
        predicted = acc.total
        collector = self.fisher_monitor.collector
        params = dict(pl_module.named_parameters())
        current = {n: params[n].detach() for n in self._anchor}
        with self._relay.catch(f"{task}: "):
            fisher_a = collector.fisher(task)
        fisher0 = self._anchor_fisher.get(task) or fisher_a
        ewc = ewc_penalty(fisher0, current, self._anchor) if fisher0 else 0.0
        hist["step"].append(step)
        hist["measured"].append(measured)
        hist["predicted"].append(predicted)
        hist.setdefault("ewc_quadratic", []).append(ewc)
        points = self._points.setdefault(task, [(self._anchor_step or 0, 0.0)])
        if points[-1][0] == step:  # an early probe measured this very step
            points[-1] = (step, measured)
        elif points[-1][0] < step:
            points.append((step, measured))
        prefix = f"forgetting/{task}"
        values = {
            f"{prefix}/measured": measured,
            f"{prefix}/predicted": predicted,
            f"{prefix}/ewc_quadratic": ewc,
            f"{prefix}/threshold": self._in_nats(task, self.warn_threshold),
        }
        self._apply(trainer, task, step, self._decide(task, None), "boundary", measured, values)
        hist.setdefault("warning", []).append(float(self._active[task]))  # the state at each boundary
        values.update(self._damage(task, fisher_a, grad_now, prefix))
        self._to_log.update(values)  # logged once every rank has its values (log_agreed)
        if trainer.is_global_zero:
            self._log_figures(trainer, task, step, acc.per_block_head(), predicted)
        return self._beyond_stop(task, measured)

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
                and name not in ("step", "ewc_quadratic", "forecast_step", "forecast", "warning", *_BAND_KEYS)
                and numeric
                and len(values) == len(steps)
            ):
                series[name] = (steps, values)
        if hist.get("forecast"):  # per step, re-anchored at each boundary
            series["forecast (per step)"] = (hist["forecast_step"], hist["forecast"])
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
            band=(hist["band_step"], hist["band_low"], hist["band_high"]) if hist.get("band_step") else None,
            band_label=f"band: drift projected {self._horizon():g} steps ahead",
        )

    def _log_figures(self, trainer, task: str, step: int, per_block_head: dict, predicted: float) -> None:
        prefix = f"forgetting/{task}"
        # NaN cells: blocks the layout does not monitor (no adapter / frozen)
        cells = float(sum(float(v.double().nansum()) for v in per_block_head.values()))
        share = f" ({cells / predicted:.0%})" if abs(predicted) > 1e-12 else ""
        where = "all trainable weights" if self.predict_on == "all" else "the Q/K/V/O weights"
        layout = self.fisher_monitor.layout
        fig = plot_layer_head_heatmaps(
            per_block_head,
            title=f"Predicted forgetting of {task!r} by layer/head/block, step {step}",
            value_label="first-order share (nats)",
            diverging=True,
            notes=[
                f"attention weights (the cells): {cells:+.3g} of {predicted:+.3g} nats predicted "
                f"over {where}{share}"
            ],
            **({"nan_label": NOT_MONITORED_LABEL} if layout and layout.partial else {}),
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
                    self._relay.warn(f"no timeline of {task} at step {step}: {err!r}")
                    continue
                log_figure(trainer.loggers, f"forgetting/{task}/timeline", fig, step)
                fig.clf()

    def _damage(self, task: str, fisher_a: dict, grad_a: dict, prefix: str) -> dict[str, float]:
        collector = self.fisher_monitor.collector
        train = self.fisher_monitor.train_task
        if not collector.store.entrywise:  # sketches: no per-entry task-B mean gradient
            return {}
        key = self.fisher_monitor.train_key(train)  # the training side, never the probe set
        _, rows = collector.stored_gradients(key)
        if not rows or not fisher_a:
            return {}
        with self._relay.catch(f"{train}: "):
            fisher_b = collector.fisher(key)
        grad_b = {n: r.float().mean(0) for n, r in rows.items()}
        grad_a = {n: grad_a[n] for n in grad_b if n in grad_a}
        if len(grad_a) != len(grad_b):
            return {}
        res = fisher_damage_asymmetry(fisher_a, grad_a, fisher_b, grad_b)
        return {
            f"{prefix}/damage_from_{train}": res["a_from_b"],
            f"{prefix}/damage_log_ratio": res["log_ratio"],
        }

    def _warn(
        self, trainer, task: str, step: int, decision: WarningDecision, source: str, value: float
    ) -> None:
        """A new warning of ``task`` at ``step``: an entry in ``alerts``, one log line, a W&B alert
        and the alerts table (rank zero)."""
        hist = self.history[task]
        measured = hist["measured"][-1] if hist["measured"] else self._points[task][-1][1]
        predicted = hist["predicted"][-1] if hist["predicted"] else 0.0
        reason = decision.reason
        alert = {
            "step": step,
            "task": task,
            "measured": measured,
            "predicted": predicted,
            "forecast": value if source == "forecast" else None,
            "risk": decision.risk,
            "reason": reason,
            "source": source,
        }
        self.alerts.append(alert)
        if trainer.is_global_zero:
            text = f"step {step}: forgetting of {task!r} ({source}): {reason}"
            log.warning("fisher_callbacks: %s", text)
            self._alert(trainer.loggers, f"Forgetting risk: {task}", text)
            columns = ["step", "source", "measured", "risk", "reason"]
            rows = [[a[c] for c in columns] for a in self.alerts if a["task"] == task]
            log_table(trainer.loggers, f"forgetting/{task}/alerts", columns, rows, step)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "anchor": self._anchor,
            "prev": self._prev if self.checkpoint_params else None,
            "prev_grad": self._prev_grad if self.checkpoint_params else {},
            "baseline": self._baseline,
            "anchor_fisher": self._anchor_fisher,
            "history": self.history,
            "alerts": self.alerts,
            "accumulators": {t: a.state_dict() for t, a in self._acc.items()},
            "forecast": {
                "points": self._points,
                "active": self._active,
                "step": self._fc_step,
                "interval": self._interval,
                "last_eval_step": self._last_eval_step,
                "early_done": self._early_done,
                "anchor_step": self._anchor_step,
            },
            "stopped_at": self.stopped_at,
            **self._boundary_state(),
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
        fc = state_dict.get("forecast", {})
        self._fc_step = fc.get("step")
        self._interval = fc.get("interval")
        self._last_eval_step = fc.get("last_eval_step")
        self._early_done = fc.get("early_done", True)  # an older checkpoint: no early probe
        self._anchor_step = fc.get("anchor_step")
        # an older checkpoint has no measured points: the anchor and its boundaries
        start = self._anchor_step or 0
        self._points = {
            t: [tuple(p) for p in fc["points"][t]]
            if t in fc.get("points", {})
            else [(start, 0.0), *zip(h.get("step", []), h.get("measured", []))]
            for t, h in self.history.items()
        }
        self._active = {t: bool(fc.get("active", {}).get(t, False)) for t in self.history}
        self.stopped_at = state_dict.get("stopped_at")
        self._load_boundary_state(state_dict)
        for task, acc in list(self._acc.items()):
            if task in self._acc_state:
                acc.load_state_dict(self._acc_state.pop(task))


def _adopt_legacy_state(checkpoint: dict, key: str, legacy_prefix: str) -> None:
    """File the state saved under an older ``state_key`` (one that started with ``legacy_prefix``)
    under ``key``, so that Lightning, which matches states by key, loads it."""
    states = checkpoint.get("callbacks") or {}
    legacy = [k for k in states if isinstance(k, str) and k.startswith(legacy_prefix)]
    if key not in states and len(legacy) == 1:
        states[key] = states[legacy[0]]


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


_BAND_KEYS = ("band_step", "band_low", "band_high")


def _new_history() -> dict[str, list]:
    """``history[task]``: boundaries (``step``, ``measured``, ``predicted``, ``warning``: the
    latched state there, 0/1), the per-step forecast (``forecast_step``, ``forecast``; every
    optimizer step, nats) and the band of every decision (``band_step``, ``band_low``,
    ``band_high``, nats)."""
    keys = ("step", "measured", "predicted", "warning", "forecast_step", "forecast", *_BAND_KEYS)
    return {k: [] for k in keys}


def _flat_views(
    tensors: dict[str, torch.Tensor], out: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One flat fp32 copy of ``tensors`` (``[N]``, N = total entries; written into ``out`` when
    given) and views of it per name. All on one device, else ``ValueError``."""
    if not tensors:
        raise ValueError("no predicted parameter has a probe gradient")
    first = next(iter(tensors.values()))
    if any(t.device != first.device for t in tensors.values()):
        raise ValueError("the predicted parameters are on several devices")
    total = sum(t.numel() for t in tensors.values())
    flat = torch.empty(total, dtype=torch.float32, device=first.device) if out is None else out
    views, offset = {}, 0
    for name, t in tensors.items():
        views[name] = flat[offset : offset + t.numel()].view(t.shape)
        views[name].copy_(t.detach())
        offset += t.numel()
    return flat, views


def _log_now(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """Write ``metrics`` to every logger at once, at ``step`` (``trainer.global_step``, like the
    boundary rows; a change of the warning state must not wait for ``log_every_n_steps``). Rank
    zero only."""
    metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
    for logger in trainer.loggers:
        try:
            logger.log_metrics(metrics, step=step)
        except Exception as err:
            rank_zero_warn(f"ForgettingRiskMonitor: {type(logger).__name__} could not log {err!r}")


def _log_this_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes this training batch's on-step metrics (``log_every_n_steps``)."""
    every = trainer.log_every_n_steps
    if not every:
        return False
    stepped = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
    return (stepped + 1) % every == 0


def _to(tensors: dict[str, torch.Tensor] | None, device: torch.device) -> dict[str, torch.Tensor] | None:
    return None if tensors is None else {n: t.to(device) for n, t in tensors.items()}

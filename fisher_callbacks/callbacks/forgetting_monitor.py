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
from ..functional.forgetting import (
    FirstOrderForgettingAccumulator,
    ProjectionCalibration,
    WarningDecision,
    early_warning,
    ewc_penalty,
    first_order_forgetting,
    fisher_damage_asymmetry,
    forecast_drift,
    margin_drift,
    margin_rate,
    power_law_drift,
    secant_curvature,
)
from ..loggers import (
    AlertSender,
    forgetting_dashboard_layout,
    log_custom_scalars,
    log_figure,
    log_table,
)
from ..plots import NOT_MONITORED_LABEL, plot_forgetting_timeline, plot_layer_head_heatmaps
from ._boundary import BoundaryCallback
from ._ranks import WarningRelay, log_agreed
from .fisher_monitor import FisherMonitor, find_fisher_monitor

log = logging.getLogger("fisher_callbacks")

# the forecast's projections are scaled by the median of how the last few came out (see
# ProjectionCalibration); a promised rise below 1% of the threshold says nothing of a ratio
_CALIBRATION_WINDOW = 4
_CALIBRATION_MIN_RISE = 0.01
# A projection reaches at most this many times the steps its model was fitted on (anchor to
# theta_b) ahead: three doublings of the fit's age. From the early probe at step 1 of a 500-step
# interval a model is not run out to two intervals (1000 steps); from a boundary it never binds
# with the default horizon (two intervals, at least one interval fitted).
_MAX_REACH = 8.0


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

    Between boundaries, after every optimizer step (``forecast=True``), the per-step forecast
    ``forecast_t = measured_b + g_A(theta_b) . (theta_t - theta_b)`` extends the drift measured at
    the last boundary ``b`` with the first-order change since then (the sum over the steps of
    ``g_A . delta theta``, which telescopes to one dot product over the predicted parameters per
    task and step: no forward pass). Each boundary re-anchors it on the measured drift, so the
    offset between the first order and the truth never accumulates. Logged as
    ``forgetting/{A}/forecast`` (at the trainer's ``log_every_n_steps``) and kept in
    ``history[A]["forecast_step"]`` / ``history[A]["forecast"]`` (every step; the value at a
    boundary step is the one before re-anchoring). The same
    :func:`~fisher_callbacks.functional.forgetting.early_warning` rule runs on the last
    ``forecast_window`` forecasts: the forecast reaching ``warn_threshold``, or its significant
    rising trend or its projection reaching it within ``forecast_horizon_steps`` (default: two
    validation intervals ahead), fires the warning at that step, at most once per interval and task.
    The projection is the quadratic of
    :func:`~fisher_callbacks.functional.forgetting.forecast_drift` (curvature from the secant of
    the last two probe gradients). In the first interval nothing is known of the curvature yet, so
    early probes (``early_probe_step``, default steps 1, 2, 4, ... of the first interval) measure
    the drift and the probe gradient there, and the forecast re-anchors on each. From the first of
    them on, the projection is the largest of three models: that quadratic; the power law of
    :func:`~fisher_callbacks.functional.forgetting.power_law_drift` (the drift grown from 0 at the
    anchor like a power of the steps, the power its logarithmic derivative at the last probe:
    fine-tuning away from a pretrained minimum accelerates past the quadratic); and, for a
    cross-entropy probe loss, the margin of
    :func:`~fisher_callbacks.functional.forgetting.margin_drift` (the loss read as the log-loss
    of a margin that falls at its current rate, quickening as it did between the last two early
    probes: a confident reference task's drift grows several-fold a step at first, which only
    this model foresees from step 1; in the first interval only: past it the models fitted on
    measured boundaries take over). No projection reaches further than ``8x`` the steps its model
    was fitted on. Before it is compared with the threshold, the rise of a projection (the
    model's or the trend's, the larger) is damped by how the earlier ones came out: the median
    ratio of the rise that came to the rise promised, over the last four matured projections,
    clipped to ``[0.25, 1]`` (:class:`~fisher_callbacks.functional.forgetting.ProjectionCalibration`;
    kept in checkpoints), so a drift that slows down near the threshold is not announced from
    projections that have been overshooting.

    On a warning: one log line, an entry in ``alerts`` (``step``, ``task``, ``measured``,
    ``predicted``, ``forecast``, ``risk``, ``reason``, ``source``: ``"boundary"`` or
    ``"forecast"``), the alerts so far as the table ``forgetting/{A}/alerts`` (W&B table,
    TensorBoard text, CSV file), a rate-limited ``wandb.alert`` when a W&B logger is attached; a
    forecast warning also writes ``forgetting/{A}/warning = 1`` (and ``/risk``, ``/forecast``)
    straight to the loggers at its step. When the measured drift, or the forecast, reaches
    ``stop_threshold`` the run stops (decision reduced across ranks like EarlyStopping).

    A probe loss that is not finite (a diverged model) is never "no risk": a non-finite measured
    drift or forecast gives ``risk = 1``, a warning that says the probe loss is not finite,
    ``forgetting/{A}/nonfinite = 1``, and a stop when ``stop_threshold`` is set.

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
        checkpoint_params: keep in checkpoints the copy of the predicted-on parameters at the last
            boundary and each task's probe gradient there (``(1 + R) * P_pred`` numbers, see the
            README's checkpoint-overhead formula). ``False`` leaves them out: a resumed run
            restarts the first-order prediction from the resumed weights (one probe pass at fit
            start), so ``predicted`` misses the steps between the last boundary before the
            checkpoint and the checkpoint; the anchor, measured forgetting, EWC and the history
            are unaffected.
        forecast: keep the per-step forecast (costs one copy-free dot product per task and
            optimizer step, plus one flat fp32 buffer of the predicted parameters).
        forecast_horizon_steps: steps ahead the forecast's trend may reach the threshold to warn
            (default: two validation intervals, in optimizer steps).
        forecast_window: recent steps the forecast's trend is fitted on (>= 3).
        early_probe_step: optimizer step(s) (counted from fit start) of extra probe-gradient
            passes before the first boundary, which give the forecast the measured drift there
            and its rate along the first steps: without them nothing is known of either until the
            first boundary, and a crossing early in the second interval is caught late.
            ``"auto"``: steps 1, 2, 4, ... below the first validation interval (the early drift
            of a confident task changes fastest on a log scale of the steps; none when the
            interval is one step); an int: that step only; ``None``: off. Each costs one forward
            and backward over the probe set, ``log2`` of the interval of them per fit (no
            per-sample capture; the collector is untouched).

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
        trend_window: int = 3,
        noise_sigmas: float = 3.0,
        predict_on: str = "all",
        checkpoint_params: bool = True,
        forecast: bool = True,
        forecast_horizon_steps: float | None = None,
        forecast_window: int = 8,
        early_probe_step: int | str | None = "auto",
    ) -> None:
        self._keep_arguments(ForgettingRiskMonitor, locals())
        check_number("warn_threshold", warn_threshold, low=0.0, low_open=True)
        check_number("stop_threshold", stop_threshold, low=0.0, low_open=True, optional=True)
        check_number("alert_wait_seconds", alert_wait_seconds, low=0.0)
        check_choice("predict_on", predict_on, ("all", "monitored"))
        if isinstance(reference_tasks, str):
            raise TypeError(f"reference_tasks must be a list of task names, got {reference_tasks!r}")
        self.fisher_monitor = fisher_monitor
        self.reference_tasks = list(reference_tasks)
        self.warn_threshold = warn_threshold
        self.relative = relative
        self.horizon_steps = horizon_steps
        self.stop_threshold = stop_threshold
        self.trend_window = trend_window
        self.predict_on = predict_on
        self.noise_sigmas = noise_sigmas
        self.checkpoint_params = checkpoint_params
        self._relay = WarningRelay("ForgettingRiskMonitor")
        self._to_log: dict[str, float] = {}
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
        if forecast_window < 3:
            raise ValueError(f"forecast_window must be >= 3, got {forecast_window}")
        if forecast_horizon_steps is not None and not forecast_horizon_steps >= 0:
            raise ValueError(f"forecast_horizon_steps must be >= 0, got {forecast_horizon_steps}")
        if not (early_probe_step is None or early_probe_step == "auto" or _positive_int(early_probe_step)):
            raise ValueError(
                f"early_probe_step must be 'auto', None or an int >= 1, got {early_probe_step!r}"
            )
        self.early_probe_step = early_probe_step
        self.forecast = forecast
        self.forecast_horizon_steps = forecast_horizon_steps
        self.forecast_window = forecast_window
        # per-step forecast: flat fp32 theta_b [N] and g_A(theta_b) [n_tasks, N] (``_prev`` and
        # ``_prev_grad`` are views into them), the live parameters, the drift at b per task
        self._fc_base: torch.Tensor | None = None
        self._fc_grads: torch.Tensor | None = None
        self._fc_slices: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, its columns of the rows)
        self._fc_at_base: torch.Tensor | None = None  # [n_params, n_tasks + 1] rows . theta_b, fp64 (host)
        self._fc_dots: torch.Tensor | None = None  # [n_params, n_tasks + 1] fp32 scratch
        self._fc_tasks: list[str] = []
        self._fc_anchor: dict[str, float] = {}  # measured drift at the last boundary
        self._fc_curv: dict[str, float] = {}  # kappa along the last interval's displacement
        self._fc_along: dict[str, float] = {}  # g_A(theta_b) . that displacement
        self._fc_rates: dict[str, list[tuple[int, float]]] = {}  # last two early probes' margin rates
        self._fc_delta: dict[str, torch.Tensor] | None = None  # that displacement (views)
        self._fc_series: dict[str, list[tuple[int, float]]] = {}  # recent (step, forecast)
        self._fc_fired: dict[str, bool] = {}  # forecast warning fired in this interval
        self._fc_calib: dict[str, ProjectionCalibration] = {}  # how the projections came out
        self._fc_step: int | None = None  # optimizer step of the last forecast
        self._fc_failed = False
        self._fc_log: dict[str, float] = {}  # this step's forecasts, for the loggers
        self._fc_delta_sq = 0.0
        self._fc_from: int | None = None  # step of theta_b: fit start, the early probe or a boundary
        self._fc_span: float | None = None  # optimizer steps Delta covers
        self._early_done = False  # no early probe is due any more (a boundary came, or the one asked)
        self._anchor_step: int | None = None  # optimizer step of theta_0
        self._interval: float | None = None  # validation interval, optimizer steps
        self._last_eval_step: int | None = None  # fit start or the last boundary

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._begin_fit(stage)
        self.fisher_monitor = find_fisher_monitor(trainer, self.fisher_monitor, type(self).__name__)
        self._relay = self.fisher_monitor._relay.view("ForgettingRiskMonitor")  # one record for the suite
        self._restrict_probe_grads()

    def _restrict_probe_grads(self) -> None:
        if self.predict_on == "monitored" and self.fisher_monitor.layout is not None:
            self.fisher_monitor.probe_grad_names = set(self.fisher_monitor.layout.monitored_parameters())

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
                        probe = self.fisher_monitor.run_probe(pl_module, task, None, trainer.global_step)
                    except Exception as err:
                        self._relay.warn(f"no probe gradient for {task!r} at resume ({err!r})")
                        continue
                    self._prev_grad[task] = probe["grad"]
            added = [t for t in self.reference_tasks if t not in self._baseline]
            if added:  # watched since this resume: the others keep their anchors and history
                self._relay.warn(f"{added} added at the resume: anchored there, not at the original anchor")
                self._anchor_tasks(pl_module, added, trainer.global_step)
            self._fc_delta = _to(self._fc_delta, device)
            self._build_forecast(pl_module)
            self._relay.flush()
            return
        params = dict(pl_module.named_parameters())
        self._anchor = {n: params[n].detach().clone() for n in layout.monitored_parameters()}
        self._prev = self._snapshot(pl_module)
        self._anchor_tasks(pl_module, self.reference_tasks, trainer.global_step)
        self._relay.flush()
        self._last_eval_step = self._fc_from = self._anchor_step = trainer.global_step
        self._build_forecast(pl_module)

    def _anchor_tasks(self, pl_module: pl.LightningModule, tasks: Sequence[str], step: int) -> None:
        """Baseline loss, anchor Fisher, probe gradient and a new history of each of ``tasks``."""
        for task in tasks:
            try:
                probe = self.fisher_monitor.run_probe(pl_module, task, None, step)
            except Exception as err:
                self._relay.warn(f"no anchor for {task!r} ({err!r}); not watched")
                continue
            self._baseline[task] = probe["loss"]
            with self._relay.catch(f"{task}: "):
                fisher0 = self.fisher_monitor.collector.fisher(task)
            self._anchor_fisher[task] = {n: f.clone() for n, f in fisher0.items()}
            self._prev_grad[task] = probe["grad"]
            self.history[task] = _new_history()
            self._fc_anchor[task] = 0.0
            self._fc_rates.pop(task, None)
            self._fc_calib.pop(task, None)

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
        if not self.forecast or self._fc_base is None or self._fc_failed or step == self._fc_step:
            return  # off, no anchor yet, or no optimizer step since the last forecast
        self._fc_step = step
        self._fc_log = {}
        try:
            values = self._forecast_values()
            stop = False
            for task, (value, projected) in zip(self._fc_tasks, values):
                stop |= self._forecast_task(trainer, pl_module, task, value, projected, step)
            if self._early_probe_due(step):
                stop |= self._early_probe(trainer, pl_module, step)
        except Exception as err:
            self._fc_failed = True
            self._relay.warn(f"per-step forecast disabled at step {step}: {err!r}")
            return
        if self._fc_log and trainer.is_global_zero and _log_this_step(trainer):
            _log_now(trainer, self._fc_log)  # straight to the loggers: self.log costs ~8 ms a call
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
        return since & (since - 1) == 0  # steps 1, 2, 4, ... of the first interval: the drift
        # of a confident task grows several-fold a step at first, on a log scale of the steps

    def _early_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> bool:
        """Probe gradients at ``step`` before the first boundary: re-anchor the forecast on the
        drift measured there, with the curvature along the steps since the last probe (the secant
        of the two probe gradients), and add the point to the first-order prediction's trapezoid.
        Returns whether the re-anchored forecast asks for a stop."""
        self._early_done = self.early_probe_step != "auto"  # "auto" ends at the first boundary
        try:
            probes = {t: self.fisher_monitor.probe_gradient(pl_module, t, step) for t in self._fc_tasks}
        except Exception as err:
            self._relay.warn(
                f"no early probe at step {step} ({err!r}); the forecast waits for the first boundary"
            )
            return False
        fired = dict(self._fc_fired)  # still the first interval: at most one forecast warning
        now = self._snapshot(pl_module)
        delta = {n: now[n] - self._prev[n] for n in now if n in self._prev}
        for task, probe in probes.items():
            prev, grad = self._prev_grad[task], probe["grad"]
            names = [n for n in delta if n in prev and n in grad]
            prev_n, delta_n, grad_n = ({n: d[n] for n in names} for d in (prev, delta, grad))
            self._acc[task].update(prev_n, delta_n, grad_a_end=grad_n)
            self._prev_grad[task] = grad
            self._reanchor(
                task, step, probe["loss"] - self._baseline[task], secant_curvature(prev_n, grad_n, delta_n)
            )
            along = self._fc_along[task] = float(first_order_forgetting(grad_n, delta_n))
            # the margin's fall per step, here and at the early probe before (its acceleration)
            rate = margin_rate(probe["loss"], along) / max(step - (self._fc_from or 0), 1)
            self._fc_rates[task] = [*self._fc_rates.get(task, [])[-1:], (step, rate)]
        self._fc_fired.update(fired)
        self._move_base(pl_module, now, delta, step)
        return self._check_reanchored(trainer, pl_module, step)

    def _move_base(
        self, pl_module, now: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], step: int
    ) -> None:
        """theta_b becomes ``now`` (at ``step``), ``Delta`` the ``delta`` that led there."""
        if self._fc_from is not None and step > self._fc_from:
            self._fc_span = float(step - self._fc_from)
        self._fc_from = step
        self._prev = now
        self._fc_delta = delta
        self._build_forecast(pl_module)

    def _check_reanchored(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> bool:
        """Project from the re-anchored forecast at once (the earliest step a warning can come);
        returns whether it asks for a stop."""
        if not self.forecast or self._fc_base is None or self._fc_failed:
            return False
        stop = False
        try:
            for task, (value, projected) in zip(self._fc_tasks, self._forecast_values()):
                stop |= self._forecast_task(trainer, pl_module, task, value, projected, step, record=False)
        except Exception as err:
            self._fc_failed = True
            self._relay.warn(f"per-step forecast disabled at step {step}: {err!r}")
        return stop

    def _forecast_values(self) -> list[tuple[float, float]]:
        """``(forecast now, projected forecast_horizon_steps ahead)`` per forecast task
        (:func:`forecast_drift`; no projection before the early probe or the first boundary)."""
        # [n_tasks + 1]: g_A . d per task and Delta . d, d = theta_t - theta_b, as rows . theta_t -
        # rows . theta_b per parameter (strided column blocks of the rows, into one scratch; no
        # copy of theta_t or of d: the pass is memory-bound, and reads theta_b not at all). Both
        # terms are fp32 products of one kernel (frozen weights: the same product twice, 0 to within
        # its rounding), their difference and sum fp64 on the host (tiny; MPS has no fp64).
        dots = self._fc_dots
        for i, (param, rows) in enumerate(self._fc_slices):
            torch.mv(rows, param.detach().reshape(-1).float(), out=dots[i])
        dots = (dots.cpu().double() - self._fc_at_base).sum(0).tolist()
        progress = dots[-1] / self._fc_delta_sq if self._fc_delta_sq > 0 else 0.0
        span = self._fc_span or self._interval
        ahead = self._reach() / span if self._fc_delta_sq > 0 and span else 0.0
        # theta_b lies `lengths` Deltas from the anchor (1 in the first interval): the drift grew
        # from 0 there like a power of the steps, whose exponent is its log-derivative at b
        lengths = 0.0
        if span and self._fc_from is not None and self._anchor_step is not None:
            lengths = (self._fc_from - self._anchor_step) / span
        # the margin model is the prior of a confident task's first steps; once boundaries have
        # measured the drift, the models fitted on it take over (past the first interval it ran
        # ahead of a MiniLM drift that slowed: warned at 28 from 0.518, the drift peaked at 0.45)
        first_interval = self._last_eval_step == self._anchor_step
        out = []
        for task, first in zip(self._fc_tasks, dots[:-1]):
            args = (self._fc_anchor[task], first, self._fc_curv.get(task, 0.0), progress)
            along = self._fc_along.get(task, 0.0)
            projected = forecast_drift(*args, along=along, ahead=ahead)
            if lengths >= 1.0 and ahead > 0:
                power = power_law_drift(args[0], along * lengths, progress / lengths, ahead=ahead / lengths)
                projected = max(projected, power)
            if first_interval and self.fisher_monitor.log_loss and ahead > 0:  # a cross-entropy
                base, bend = self._baseline[task], self._bend(task)
                margin = margin_drift(base + args[0], base, along, progress, ahead=ahead, bend=bend)
                projected = max(projected, margin)
            out.append((forecast_drift(*args), projected))
        return out

    def _forecast_task(
        self, trainer, pl_module, task: str, value: float, projected: float, step: int, record: bool = True
    ) -> bool:
        """Record and log one forecast, warn (once per interval) when it or its projection reaches
        the threshold; returns whether it asks for a stop. ``record=False``: the check right after
        a boundary, on the re-anchored series (nothing new recorded or logged)."""
        hist = self.history[task]
        series = self._fc_series.setdefault(task, [])
        prefix = f"forgetting/{task}"
        finite = math.isfinite(value)
        if record:
            hist["forecast_step"].append(step)
            hist["forecast"].append(value)
            series.append((step, value))
            del series[: -2 * self.forecast_window]  # the fit's window plus as much for its noise
            if finite:
                self._fc_log[f"{prefix}/forecast"] = value
        decision = early_warning(
            [s for s, _ in series],
            [v for _, v in series],
            self.warn_threshold,
            relative=self.relative,
            baseline=self._baseline[task],
            horizon_steps=self._reach(),
            window=self.forecast_window,
            noise_sigmas=self.noise_sigmas,
        )
        scale = 1.0 / abs(self._baseline[task]) if self.relative else 1.0
        warn, reason = self._judge_projection(task, step, value * scale, projected * scale, decision, record)
        if warn and not self._fc_fired.get(task, False):
            self._fc_fired[task] = True
            reason = reason if finite else f"forecast {value}: the probe loss is not finite"
            measured = hist["measured"][-1] if hist["measured"] else 0.0
            predicted = hist["predicted"][-1] if hist["predicted"] else 0.0
            self._warn(trainer, task, step, measured, predicted, decision, reason, "forecast", value)
            if trainer.is_global_zero:
                metrics = {f"{prefix}/warning": 1.0, f"{prefix}/risk": 1.0}
                metrics[f"{prefix}/forecast" if finite else f"{prefix}/nonfinite"] = value if finite else 1.0
                _log_now(trainer, metrics)
        return self.stop_threshold is not None and (not finite or value * scale >= self.stop_threshold)

    def _judge_projection(
        self, task: str, step: int, value: float, projected: float, decision: WarningDecision, record: bool
    ) -> tuple[bool, str]:
        """Whether the forecast warns now, and why (``value``, ``projected``: in the threshold's
        units, scaled when ``relative``): it reached the threshold (or is not finite),
        or its projection ``forecast_horizon_steps`` ahead (:meth:`_reach`) does, the larger of
        the model's (``projected``) and the forecast's significant trend, its rise scaled by how
        the rises of the earlier projections came out (:class:`ProjectionCalibration`)."""
        horizon = self._reach()
        now, ahead, how = value, projected, "projected"
        if decision.steps_to_threshold and now + decision.slope * horizon > ahead:  # a rising trend
            ahead, how = now + decision.slope * horizon, f"rising {decision.slope:.3g}/step, projected"
        calib = self._calibration(task)
        if record:
            calib.observe(step, now)
        calibrated = calib.apply(now, ahead)
        calib.issue(step + horizon, now, ahead)  # after a boundary: the re-anchored one replaces it
        if decision.warn and decision.steps_to_threshold == 0.0:
            return True, decision.reason  # reached, or not finite
        thr = self.warn_threshold
        if not calibrated >= thr:
            return False, decision.reason
        c = calib.factor
        note = "" if c == 1.0 else f", rise scaled x{c:.2g} by how the last projections came out"
        return True, (
            f"forecast {now:.4g} {how} to {calibrated:.4g} within {horizon:g} steps{note} "
            f"(threshold {thr:.4g})"
        )

    def _calibration(self, task: str) -> ProjectionCalibration:
        if task not in self._fc_calib:
            self._fc_calib[task] = ProjectionCalibration(
                window=_CALIBRATION_WINDOW, min_rise=_CALIBRATION_MIN_RISE * self.warn_threshold
            )
        return self._fc_calib[task]

    def _forecast_horizon(self) -> float:
        if self.forecast_horizon_steps is not None:
            return float(self.forecast_horizon_steps)
        return 2.0 * self._interval if self._interval is not None else 1.0

    def _bend(self, task: str) -> float:
        """The margin's acceleration at theta_b per ``Delta`` unit squared (``bend`` of
        :func:`margin_drift`): the secant of the margin rates at the last two early probes, the
        later at theta_b (0 before two of them)."""
        rates = self._fc_rates.get(task, [])
        if len(rates) < 2 or rates[-1][0] != self._fc_from or not self._fc_span:
            return 0.0
        (s0, r0), (s1, r1) = rates
        return (r1 - r0) / (s1 - s0) * self._fc_span**2

    def _reach(self) -> float:
        """Steps ahead the projections reach: ``forecast_horizon_steps``, at most ``_MAX_REACH``
        times the steps from the anchor to theta_b (0 before the first probe)."""
        horizon = self._forecast_horizon()
        if self._fc_from is None or self._anchor_step is None:
            return horizon
        return min(horizon, _MAX_REACH * max(self._fc_from - self._anchor_step, 0))

    def _build_forecast(self, pl_module: pl.LightningModule) -> None:
        """One flat fp32 copy of theta_b ``[N]`` and the matrix ``[n_tasks + 1, N]`` of each task's
        g_A(theta_b) and the last interval's displacement Delta; ``_prev``, ``_prev_grad`` and
        ``_fc_delta`` become views into them (no second copy)."""
        self._fc_base = self._fc_grads = None
        if self._prev is None:
            return
        tasks = [t for t in self.reference_tasks if t in self._prev_grad and t in self._baseline]
        params = dict(pl_module.named_parameters())
        names = [n for n in self._prev if n in params and all(n in self._prev_grad[t] for t in tasks)]
        delta = self._fc_delta if self._fc_delta is not None else {}
        try:
            base, self._prev = _flat_views({n: self._prev[n] for n in names})
            matrix = base.new_empty(len(tasks) + 1, base.numel())
            for row, task in zip(matrix, tasks):
                self._prev_grad[task] = _flat_views({n: self._prev_grad[task][n] for n in names}, row)[1]
            moved = {n: delta[n] if n in delta else torch.zeros_like(self._prev[n]) for n in names}
            self._fc_delta = _flat_views(moved, matrix[-1])[1]
        except Exception as err:  # e.g. parameters on several devices: boundaries still work
            self._relay.warn(f"no per-step forecast ({err!r})")
            return
        self._fc_slices, offset = [], 0
        self._fc_dots = matrix.new_empty(len(names), matrix.shape[0])
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
        self._fc_delta_sq = float(matrix[-1].square().sum())

    # ------------------------------------------------------------------ boundary
    def _boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._anchor is None:
            return
        self.fisher_monitor.refresh(trainer, pl_module)
        step = trainer.global_step
        now = self._snapshot(pl_module)
        delta = {n: now[n] - self._prev[n] for n in now if n in self._prev}
        stop = False
        self._to_log = {}
        for task in self.reference_tasks:
            probe = self.fisher_monitor.probe.get(task)
            if probe is None or probe["step"] != step:
                continue
            try:
                stop |= self._evaluate(trainer, pl_module, task, probe, delta, step)
            except Exception as err:
                self._relay.warn(f"{task} failed at step {step}: {err!r}")
        # the same keys on every rank, or sync_dist would run a collective on some ranks only
        log_agreed(trainer, pl_module, self._to_log, self._relay, sync_dist=trainer.world_size > 1)
        self._to_log = {}
        if self._last_eval_step is not None and step > self._last_eval_step:
            self._interval = float(step - self._last_eval_step)
        self._last_eval_step = step
        self._early_done = True
        self._move_base(pl_module, now, delta, step)
        self._check_reanchored(trainer, pl_module, step)
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
        grad_now = probe["grad"]
        acc = self._acc[task]
        prev = self._prev_grad.get(task, grad_now)
        names = [n for n in delta if n in prev and n in grad_now]
        prev_names = {n: prev[n] for n in names}
        delta_names = {n: delta[n] for n in names}
        grad_names = {n: grad_now[n] for n in names}
        acc.update(prev_names, delta_names, grad_a_end=grad_names)
        self._prev_grad[task] = grad_now
        measured = probe["loss"] - self._baseline[task]
        predicted = acc.total
        collector = self.fisher_monitor.collector
        params = dict(pl_module.named_parameters())
        current = {n: params[n].detach() for n in self._anchor}
        with self._relay.catch(f"{task}: "):
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
        curvature = secant_curvature(prev_names, grad_names, delta_names)
        self._reanchor(task, step, measured, curvature)
        self._fc_along[task] = float(first_order_forgetting(grad_names, delta_names))
        prefix = f"forgetting/{task}"
        values = {
            f"{prefix}/measured": measured,
            f"{prefix}/predicted": predicted,
            f"{prefix}/ewc_quadratic": ewc,
            f"{prefix}/risk": decision.risk,
            f"{prefix}/warning": float(decision.warn),
            f"{prefix}/threshold": self._in_nats(task, self.warn_threshold),
        }
        finite = math.isfinite(measured)
        if not finite:
            values[f"{prefix}/nonfinite"] = 1.0
        values.update(self._damage(task, fisher_a, grad_now, prefix))
        self._to_log.update(values)  # logged once every rank has its values (log_agreed)
        if decision.warn:
            self._fc_fired[task] = True  # the forecast does not repeat it within this interval
            reason = decision.reason if finite else f"drift {measured}: the probe loss is not finite"
            self._warn(trainer, task, step, measured, predicted, decision, reason, "boundary")
        if trainer.is_global_zero:
            self._log_figures(trainer, task, step, acc.per_block_head(), predicted)
        scaled = measured / abs(self._baseline[task]) if self.relative else measured
        return self.stop_threshold is not None and (not finite or scaled >= self.stop_threshold)

    def _reanchor(self, task: str, step: int, measured: float, curvature: float) -> None:
        """Re-anchor the per-step forecast of ``task`` on the drift measured at boundary ``step``.

        The forecasts of the interval just ended are shifted by the offset found at its end,
        growing linearly from 0 at its start, so the trend fit sees no jump at the boundary and the
        first order's bias does not carry into the next interval.
        """
        self._fc_anchor[task] = measured
        self._fc_curv[task] = curvature if math.isfinite(curvature) else 0.0
        self._fc_fired[task] = False
        series = self._fc_series.setdefault(task, [])
        start = self._fc_from
        if series and series[-1][0] == step and start is not None and step > start:
            offset = measured - series[-1][1]
            if math.isfinite(offset):
                series[:] = [
                    (s, v + offset * (s - start) / (step - start)) if s > start else (s, v) for s, v in series
                ]
        if series and series[-1][0] == step:
            series[-1] = (step, measured)
        else:
            series.append((step, measured))

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
                and name not in ("step", "ewc_quadratic", "forecast_step", "forecast")
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
        self,
        trainer,
        task: str,
        step: int,
        measured: float,
        predicted: float,
        decision,
        reason: str,
        source: str,
        forecast: float | None = None,
    ) -> None:
        alert = {
            "step": step,
            "task": task,
            "measured": measured,
            "predicted": predicted,
            "forecast": forecast,
            "risk": decision.risk,
            "reason": reason,
            "source": source,
        }
        self.alerts.append(alert)
        if trainer.is_global_zero:
            ahead = "" if forecast is None else f", forecast {forecast:+.4f} from the last boundary"
            text = (
                f"step {step}: forgetting of {task!r} at {measured:+.4f} nats at the last boundary "
                f"(predicted {predicted:+.4f}{ahead}); {reason}"
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
            "prev": self._prev if self.checkpoint_params else None,
            "prev_grad": self._prev_grad if self.checkpoint_params else {},
            "baseline": self._baseline,
            "anchor_fisher": self._anchor_fisher,
            "history": self.history,
            "alerts": self.alerts,
            "accumulators": {t: a.state_dict() for t, a in self._acc.items()},
            "forecast": {
                "anchor": self._fc_anchor,
                "curvature": self._fc_curv,
                "along": self._fc_along,
                "rates": self._fc_rates,
                "delta": self._fc_delta if self.checkpoint_params else None,  # P_pred numbers
                "series": self._fc_series,
                "fired": self._fc_fired,
                "calibration": {t: c.state_dict() for t, c in self._fc_calib.items()},
                "step": self._fc_step,
                "interval": self._interval,
                "last_eval_step": self._last_eval_step,
                "from": self._fc_from,
                "span": self._fc_span,
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
        self._fc_anchor = dict(fc.get("anchor", {}))
        self._fc_curv = dict(fc.get("curvature", {}))
        self._fc_along = dict(fc.get("along", {}))
        self._fc_rates = {t: [tuple(r) for r in v] for t, v in fc.get("rates", {}).items()}
        self._fc_delta = fc.get("delta")
        self._fc_series = {t: list(v) for t, v in fc.get("series", {}).items()}
        self._fc_fired = dict(fc.get("fired", {}))
        self._fc_calib = {}
        for task, state in fc.get("calibration", {}).items():
            self._calibration(task).load_state_dict(state)
        self._fc_step = fc.get("step")
        self._interval = fc.get("interval")
        self._last_eval_step = fc.get("last_eval_step")
        self._fc_from = fc.get("from", self._last_eval_step)
        self._fc_span = fc.get("span", self._interval)
        self._early_done = fc.get("early_done", True)  # an older checkpoint: no early probe
        self._anchor_step = fc.get("anchor_step")
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


def _new_history() -> dict[str, list]:
    """``history[task]``: boundaries (``step``, ``measured``, ``predicted``) and the per-step
    forecast (``forecast_step``, ``forecast``; every optimizer step, nats)."""
    return {"step": [], "measured": [], "predicted": [], "forecast_step": [], "forecast": []}


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


def _log_now(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Write ``metrics`` to every logger at once, at the step Lightning logs this batch under (a
    forecast warning must not wait for ``log_every_n_steps``). Rank zero only."""
    step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
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

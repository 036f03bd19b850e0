"""ForgettingRiskMonitor: the Lightning adapter of the forgetting engine
(:class:`~fisher_callbacks.engine.forgetting.ForgettingEngine`).

Each hook builds a :class:`~fisher_callbacks.callbacks._host.LightningHost` and calls the engine;
:class:`~fisher_callbacks.callbacks._boundary.BoundaryCallback` decides when a boundary runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from ..engine.forgetting import ForgettingEngine
from ._boundary import BoundaryCallback
from ._host import LightningHost
from .fisher_monitor import FisherMonitor, find_fisher_monitor


class ForgettingRiskMonitor(ForgettingEngine, BoundaryCallback):
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
    since the anchor, whose spread is a band (after a dip below the anchor: two rates of a line);
    nothing is projected until those measurements turn upward (rising, over at least three
    optimizer steps, the last above the anchor); the drift now (measured, or the per-step
    forecast between measurements) is projected ``horizon_steps`` ahead (never further ahead
    than those three measurements reach back), and the warning fires
    when the conservative side of the band reaches ``warn_threshold``, or the measured drift
    does, or a drift is not finite. The conservative side uses the lower exponent, lowered further
    when the points show a slowdown: a falling exponent (a decelerating drift, as on a plateau)
    is continued along its trend, and between measurements the forecast's own exponent since
    the last measurement counts when it is lower (floored at 0). ``risk`` is that conservative
    projection over the threshold, clipped to [0, 1]. ``warning`` is a latched state (a warning
    is active for the task): on from the first warning until a measurement finds the drift below
    the threshold and falling at its last two measurements
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
        horizon_steps: optimizer steps the band projects ahead at most (default: two validation
            intervals, so a steady rise is announced one interval or more before it crosses;
            never further ahead than the three measurements of the band reach back).
        stop_threshold: stop training when the measured drift or the forecast reaches it (same
            units).
        alert_wait_seconds: minimum time between two W&B alerts of the same task.
        predict_on: parameters of the first-order prediction: ``"all"`` trainable ones (keeps a
            copy of them and their probe gradient) or ``"monitored"`` Q/K/V/O weights only (far
            less memory on large models; misses the MLP/embedding share of forgetting).
        checkpoint_params: keep in checkpoints the copy of the predicted-on parameters at the last
            boundary and each task's probe gradient there (``P_pred`` fp32 numbers and
            ``R * P_pred`` in ``gradient_dtype``, see the checkpoint-overhead formula in
            ``docs/costs.md``). ``False`` leaves them out: a resumed run
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
        gradient_dtype: dtype of the kept probe gradients ``g_A(theta_b)`` (the forecast's rows,
            the trapezoid's left end, shared with the FisherMonitor): ``torch.bfloat16`` (default)
            halves the largest state of the suite (one weight-sized row per reference task) at a
            relative error of ~1e-3 of the prediction and the forecast
            (``tests/test_forecast.py``), and widens them per step: the per-step forecast of a
            148M-parameter model on 2 CPU threads takes 62 ms against 44 ms in fp32 (a 135M step
            is ~1.3 s); ``torch.float32`` keeps them exact.

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
        gradient_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        self._keep_arguments(ForgettingRiskMonitor, locals())
        ForgettingEngine.__init__(
            self,
            fisher_monitor,
            reference_tasks,
            warn_threshold=warn_threshold,
            relative=relative,
            horizon_steps=horizon_steps,
            stop_threshold=stop_threshold,
            alert_wait_seconds=alert_wait_seconds,
            predict_on=predict_on,
            checkpoint_params=checkpoint_params,
            forecast=forecast,
            early_probe_step=early_probe_step,
            gradient_dtype=gradient_dtype,
        )

    @property
    def fisher_monitor(self) -> FisherMonitor | None:
        """The FisherMonitor read (the constructor's, or the one found in ``trainer.callbacks``)."""
        return self.fisher

    @property
    def _anchor(self) -> dict | None:
        """:attr:`anchor` under its former name (tests/test_checkpoint_fixture.py reads it)."""
        return self.anchor

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._begin_fit(stage)
        self.bind(find_fisher_monitor(trainer, self.fisher, type(self).__name__))
        self.prepare(LightningHost(trainer, pl_module))

    @property
    def state_key(self) -> str:
        # Not keyed by reference_tasks: adding or removing a task on resume keeps the others'
        # anchors and history (state is per task inside).
        return self._generate_state_key()

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # older checkpoints keyed this state by the reference tasks too
        legacy = f"{type(self).__qualname__}{{'reference_tasks'"
        _adopt_legacy_state(checkpoint, self.state_key, legacy)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with self._relay.contain("the anchor at fit start"):
            self.fit_begin(LightningHost(trainer, pl_module))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_begin(LightningHost(trainer, pl_module))
        super().on_train_start(trainer, pl_module)  # may evaluate a boundary pending at resume

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_end(LightningHost(trainer, pl_module))

    def _boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.boundary(LightningHost(trainer, pl_module))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**ForgettingEngine.state_dict(self), **self._boundary_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ForgettingEngine.load_state_dict(self, state_dict)
        self._load_boundary_state(state_dict)


def _adopt_legacy_state(checkpoint: dict, key: str, legacy_prefix: str) -> None:
    """File the state saved under an older ``state_key`` (one that started with ``legacy_prefix``)
    under ``key``, so that Lightning, which matches states by key, loads it."""
    states = checkpoint.get("callbacks") or {}
    legacy = [k for k in states if isinstance(k, str) and k.startswith(legacy_prefix)]
    if key not in states and len(legacy) == 1:
        states[key] = states[legacy[0]]

"""ForgettingEngine: measured and predicted forgetting of reference tasks, early warning, stop.

Trainer-neutral: every call takes a :class:`~fisher_callbacks.engine.host.Host`. The parts:
:class:`~fisher_callbacks.engine.forgetting_tracker.ForgettingTracker` (anchor, first-order
prediction, EWC, damage), :class:`~fisher_callbacks.engine.forecast.Forecaster` (the per-step
forecast), :class:`~fisher_callbacks.engine.forgetting_warning.WarningState` (measured points,
latched warning) and :class:`~fisher_callbacks.engine.forgetting_report.ForgettingReport`
(figures, alerts, tables). What the engine measures and logs is described on
:class:`~fisher_callbacks.callbacks.ForgettingRiskMonitor`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .._validate import SetupError, check_choice, check_number
from ..functional.forgetting import WarningDecision
from ..memory import attribute_ledger, available_memory
from .forecast import Forecaster
from .forgetting_report import ForgettingReport, boundary_values, new_history, timeline_figure, verdict_row
from .forgetting_tracker import ForgettingReading, ForgettingTracker
from .forgetting_warning import WarningState
from .host import Host
from .ranks import WarningRelay, log_agreed
from .readings import ProbeReading
from .sharding import Shards, map_parameter_state, parameters

if TYPE_CHECKING:
    from .fisher import FisherEngine

PER_PARAMETER = ("anchor", "anchor_fisher", "prev", "prev_grad")  # this rank's blocks under FSDP2
NAME = "ForgettingRiskMonitor"  # the prefix of its warnings and the owner in the memory ledger


class ForgettingEngine:
    """The forgetting monitor without a trainer (arguments: see ``ForgettingRiskMonitor``;
    ``fisher`` is its ``fisher_monitor``).

    Lifecycle: :meth:`bind` to the Fisher engine, :meth:`prepare` at setup, :meth:`fit_begin`
    (anchor), :meth:`train_begin`, :meth:`step_end` after every optimizer step, :meth:`boundary`
    at every validation boundary.
    """

    def __init__(
        self,
        fisher: FisherEngine | None = None,
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
        check_choice("gradient_dtype", gradient_dtype, (torch.bfloat16, torch.float16, torch.float32))
        _check_arguments(
            reference_tasks,
            warn_threshold,
            stop_threshold,
            horizon_steps,
            alert_wait_seconds,
            predict_on,
            early_probe_step,
        )
        self.fisher = fisher
        self.reference_tasks = list(reference_tasks)
        self.warn_threshold = warn_threshold
        self.relative = relative
        self.horizon_steps = horizon_steps
        self.stop_threshold = stop_threshold
        self.predict_on = predict_on
        self.checkpoint_params = checkpoint_params
        self.forecast = forecast
        self.early_probe_step = early_probe_step
        self.gradient_dtype = gradient_dtype
        self._relay = WarningRelay(NAME)
        self.history: dict[str, dict[str, list[float]]] = {}
        self.alerts: list[dict[str, Any]] = []
        self.stopped_at: int | None = None
        self.tracker = ForgettingTracker()
        self.forecaster = Forecaster(gradient_dtype)
        self.warnings = WarningState()
        self.report = ForgettingReport(alert_wait_seconds)
        self.anchor_step: int | None = None  # optimizer step of theta_0
        self.interval: float | None = None  # optimizer steps between two boundaries
        self.last_eval_step: int | None = None  # fit start or the last boundary
        self.early_done = False  # no early probe is due any more (a boundary came, or the one asked)

    @property
    def anchor(self) -> dict[str, torch.Tensor] | None:
        """The monitored weights at theta_0 (None before the anchor)."""
        return self.tracker.anchor

    # ------------------------------------------------------------------ set-up
    @property
    def relay(self) -> WarningRelay:
        """This monitor's warnings (a view of the FisherMonitor's record once bound)."""
        return self._relay

    def bind(self, fisher: FisherEngine) -> None:
        """Read probes, Fishers and the layout from ``fisher``; warnings share its record."""
        self.fisher = fisher
        self._relay = fisher.relay.view(NAME)

    def prepare(self, host: Host) -> None:
        """At setup: the probe gradients are summed in ``gradient_dtype``; with
        ``predict_on="monitored"`` they cover the Q/K/V/O weights only."""
        names = None
        if self.predict_on == "monitored" and self.fisher.layout is not None:
            names = set(self.fisher.layout.monitored_parameters())
        # summed in the rows' dtype: no fp32 weight-sized sum is held for them at a probe pass
        self.fisher.restrict_probe_gradients(names, self.gradient_dtype)

    def fit_begin(self, host: Host) -> None:
        """The anchor theta_0 at fit start, or the one a checkpoint restored (a resumed run
        measures against the ORIGINAL anchor)."""
        if not self.fisher.active:  # stayed out of this fit (see FisherMonitor.required)
            return
        self.fisher.resolve(host.module)  # names may have changed (compiled in setup)
        # FSDP2: the per-parameter state is this rank's shards, its sums reduced over the ranks
        self.tracker.shards = self.forecaster.shards = Shards.of(host.module)
        self._to_blocks()  # a checkpoint loaded before (whole tensors)
        if self.tracker.anchor is None:
            self._fit_memory(host)
        self.prepare(host)
        missing = [t for t in self.reference_tasks if t not in self.fisher.reference_tasks]
        if missing:
            raise SetupError(
                f"ForgettingRiskMonitor watches {missing}, which are not probe sets of the "
                f"FisherMonitor (reference_tasks={list(self.fisher.reference_tasks)})"
            )
        try:  # rank zero alone: no collective left waiting
            self.report.dashboard(host, self.reference_tasks)
        except Exception as err:
            self._relay.warn(f"no TensorBoard layout for the forgetting charts: {err!r}")
        self.tracker.ensure_accumulators(self.reference_tasks, self.fisher.layout)
        if self.tracker.anchor is not None:  # restored from a checkpoint: keep the original anchor
            self._resume(host)
            self._move_base(host)
            self._relay.flush()
            return
        params = parameters(host.module)
        self.tracker.take_anchor(params, self.fisher.layout.monitored_parameters())
        self.forecaster.base = self._snapshot(host)
        self._anchor_tasks(host, self.reference_tasks)
        self._relay.flush()
        self.last_eval_step = self.anchor_step = host.step
        self._move_base(host)

    def _fit_memory(self, host: Host) -> None:
        """``predict_on="all"`` keeps theta_b (fp32) and one probe-gradient row per task
        (``gradient_dtype``) over every trainable parameter. When those would take more than half
        of the memory the device has free, the prediction and the forecast fall back to the
        Q/K/V/O weights (``predict_on="monitored"``), with one warning, instead of taking the run
        down."""
        if self.predict_on != "all":
            return
        local = self.tracker.shards.local  # this rank's blocks under FSDP2
        trainable = sum(local(n, p).numel() for n, p in parameters(host.module).items() if p.requires_grad)
        row = torch.finfo(self.gradient_dtype).bits // 8
        need = trainable * (4 + len(self.reference_tasks) * row)
        free = available_memory(host.device)
        if free is None or need <= 0.5 * free:
            return
        self.predict_on = "monitored"
        self._relay.warn(
            f"predict_on='all' would keep {need / 2**20:.0f} MiB (theta_b and "
            f"{len(self.reference_tasks)} probe-gradient row(s) over every trainable parameter) "
            f"with {free / 2**20:.0f} MiB free on {host.device}: the prediction and the forecast "
            "use the Q/K/V/O weights only (predict_on='monitored') in this fit"
        )

    def _resume(self, host: Host) -> None:
        """A restored anchor: state to the module's device; restart the prediction here when the
        checkpoint has no theta_b; anchor the tasks added since."""
        self.tracker.to(host.device)
        self.forecaster.to(host.device)
        if self.forecaster.base is None:  # saved with checkpoint_params=False
            self.forecaster.base = self._snapshot(host)
            for task in self.reference_tasks:
                try:
                    self.forecaster.grads[task] = self._local(self.fisher.run_probe(host, task).grad)
                except Exception as err:
                    self._relay.warn(f"no probe gradient for {task!r} at resume ({err!r})")
        added = [t for t in self.reference_tasks if t not in self.tracker.baseline]
        if added:  # watched since this resume: the others keep their anchors and history
            self._relay.warn(f"{added} added at the resume: anchored there, not at the original anchor")
            self._anchor_tasks(host, added)

    def _anchor_tasks(self, host: Host, tasks: Sequence[str]) -> None:
        """Baseline loss, anchor Fisher, probe gradient and a new history of each of ``tasks``."""
        for task in tasks:
            try:
                probe = self.fisher.run_probe(host, task)
                with self._relay.catch(f"{task}: "):
                    fisher0 = self.fisher.collector.fisher(task)
            except Exception as err:
                self._relay.warn(f"no anchor for {task!r} ({err!r}); not watched")
                continue
            self.tracker.anchor_task(task, probe.loss, fisher0)
            self.forecaster.grads[task] = self._local(probe.grad)
            self.history[task] = new_history()
            self.warnings.start(task, host.step)

    def train_begin(self, host: Host) -> None:
        """The validation interval, when the trainer says (the default horizon is two of them)."""
        if self.interval is None:
            self.interval = host.validation_interval

    # ------------------------------------------------------------------ per step
    def step_end(self, host: Host) -> None:
        """After each optimizer step: the per-step forecast and the early probes; their row goes
        to the sinks at ``log_every_n_steps``, or at once when a warning state changed or a
        probe measured; a stop when the forecast reaches ``stop_threshold``."""
        step, fc = host.step, self.forecaster
        if fc.flat_base is None or fc.failed or step == fc.last_step:
            return  # no anchor yet, the forecast failed, or no optimizer step since the last one
        fc.last_step = step
        rows: dict[str, float] = {}
        stop = False
        try:
            boundary = host.boundary_follows()
            # a boundary at this step measures anyway: no second probe pass, no second row
            probe_now = self._early_probe_due(step) and not boundary
            if self.forecast:  # the verdict goes with a measurement when one comes at this step
                decide = not (probe_now or boundary)
                drifts = {t: self.warnings.last_drift(t) for t in fc.tasks}
                for task, value in fc.step(drifts).items():
                    stop |= self._forecast_task(host, task, step, value, rows, decide=decide)
            if probe_now:
                stop |= self._early_probe(host, step, rows)
                self.warnings.changed = True  # a measurement: its row is always written
        except Exception as err:
            fc.failed = True
            self._relay.warn(f"per-step forecast disabled at step {step}: {err!r}")
            return
        every = host.log_every_n_steps
        if rows and (self.warnings.changed or (every > 0 and step % every == 0)):
            host.log_now({k: v for k, v in rows.items() if math.isfinite(v)})
        self.warnings.changed = False
        if self.stop_threshold is not None:
            self._maybe_stop(host, stop, step, "forecast")

    def _early_probe_due(self, step: int) -> bool:
        if self.early_done or self.anchor_step is None or self.early_probe_step is None:
            return False
        since = step - self.anchor_step
        if self.early_probe_step != "auto":
            return since == self.early_probe_step
        if self.interval is None or not 1 <= since < self.interval:
            return False
        return since & (since - 1) == 0  # steps 1, 2, 4, ... of the first interval

    def _early_probe(self, host: Host, step: int, rows: dict[str, float]) -> bool:
        """Measure the drift at ``step`` before the first boundary (one probe-gradient pass per
        task): a measured point for the band, a point of the first-order trapezoid, and the
        forecast's new base. Returns whether the measured drift asks for a stop."""
        self.early_done = self.early_probe_step != "auto"  # "auto" ends at the first boundary
        try:
            probes = {t: self.fisher.probe_gradient(host, t) for t in self.forecaster.tasks}
        except Exception as err:
            self._relay.warn(
                f"no early probe at step {step} ({err!r}); the band waits for the first boundary"
            )
            return False
        delta = self._delta(host)
        stop = False
        for task, probe in probes.items():
            grad = self._local(probe.grad)
            self.tracker.advance(task, self.forecaster.grads[task], delta, grad)
            self.forecaster.grads[task] = grad
            measured = probe.loss - self.tracker.baseline[task]
            stop |= self._forecast_task(host, task, step, measured, rows, measured=True)
        self._move_base(host, rebase=True)
        return stop

    def _forecast_task(self, host, task, step, value, rows, *, measured=False, decide=True) -> bool:
        """Record one forecast (or an early probe's measured drift, ``measured=True``), decide the
        warning state from it and put this step's row into ``rows``. Returns whether it asks for a
        stop. ``decide=False``: a boundary follows at this step and carries the verdict."""
        prefix = f"forgetting/{task}"
        if measured:
            self.warnings.add(task, step, value)
            rows[f"{prefix}/measured"] = value
        else:
            self.history[task]["forecast_step"].append(step)
            self.history[task]["forecast"].append(value)
        if math.isfinite(value):
            rows[f"{prefix}/forecast"] = value
        if decide:
            decision = self._decide(task, None if measured else (step, value))
            self._verdict(host, task, step, decision, "early probe" if measured else "forecast", value, rows)
        return self._beyond_stop(task, value)

    # ------------------------------------------------------------------ boundary
    def boundary(self, host: Host) -> None:
        """A validation boundary: refresh the FisherMonitor, then the steps of
        :class:`BoundaryPass` in order."""
        if self.tracker.anchor is None:
            return
        self.fisher.refresh(host)
        BoundaryPass(self, host).run()

    # ------------------------------------------------------------------ warning and stop
    def _decide(self, task: str, now: tuple[int, float] | None) -> WarningDecision:
        baseline = self.tracker.baseline[task]
        return self.warnings.decide(task, now, self.warn_threshold, self.horizon, self.relative, baseline)

    def _verdict(self, host, task, step: int, decision: WarningDecision, source: str, value, rows) -> None:
        """Latch the warning state, record the band, alert on a new warning, and put ``risk``,
        ``warning`` and the band into ``rows``."""
        new = self.warnings.latch(task, decision)
        hist = self.history[task]
        unit = abs(self.tracker.baseline[task]) if self.relative else 1.0
        for key, v in (
            ("band_step", step),
            ("band_low", decision.low * unit),
            ("band_high", decision.high * unit),
        ):
            hist.setdefault(key, []).append(v)
        rows.update(verdict_row(task, decision, self.warnings.active[task], unit, value))
        if new:
            self._warn(host, task, step, decision, source, value)

    def _warn(
        self, host: Host, task: str, step: int, decision: WarningDecision, source: str, value: float
    ) -> None:
        """A new warning of ``task`` at ``step``: an entry in ``alerts``, then the report."""
        hist = self.history[task]
        alert = {
            "step": step,
            "task": task,
            "measured": hist["measured"][-1] if hist["measured"] else self.warnings.last_drift(task),
            "predicted": hist["predicted"][-1] if hist["predicted"] else 0.0,
            "forecast": value if source == "forecast" else None,
            "risk": decision.risk,
            "reason": decision.reason,
            "source": source,
        }
        self.alerts.append(alert)
        self.report.alert(host, alert, [a for a in self.alerts if a["task"] == task])

    def _beyond_stop(self, task: str, value: float) -> bool:
        if self.stop_threshold is None:
            return False
        scaled = value / abs(self.tracker.baseline[task]) if self.relative else value
        return not math.isfinite(scaled) or scaled >= self.stop_threshold

    def _maybe_stop(self, host: Host, stop: bool, step: int, what: str) -> None:
        """Stop when any rank asks (a collective under DDP); one log line per run."""
        if host.any_rank(stop) and not host.stopping:
            host.request_stop()
            self.stopped_at = step
            self.report.stopping(host, step, what)

    @property
    def horizon(self) -> float:
        """Steps the band projects ahead: ``horizon_steps``, by default two validation intervals."""
        if self.horizon_steps is not None:
            return float(self.horizon_steps)
        return 2.0 * self.interval if self.interval is not None else 2.0

    def _in_nats(self, task: str, threshold: float) -> float:
        """A threshold in nats: scaled by ``|L_A(theta_0)|`` when ``relative``."""
        return threshold * abs(self.tracker.baseline[task]) if self.relative else threshold

    # ------------------------------------------------------------------ parameters
    def _snapshot(self, host: Host) -> dict[str, torch.Tensor]:
        """A copy of the predicted-on parameters (those that train; Q/K/V/O only when "monitored")."""
        names = self.fisher.probe_grad_names if self.predict_on == "monitored" else None
        local = self.tracker.shards.local  # this rank's blocks under FSDP2
        return {
            n: local(n, p).detach().clone()
            for n, p in parameters(host.module).items()
            if p.requires_grad and (names is None or n in names)
        }

    def _local(self, grad: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A probe gradient as the per-parameter state keeps it (this rank's blocks under FSDP2)."""
        return {n: self.tracker.shards.local(n, g) for n, g in grad.items()}

    def _delta(self, host: Host) -> Mapping[str, torch.Tensor]:
        """theta_t - theta_b per predicted-on parameter, made when read (one parameter's
        difference at a time, never a weight-sized copy; this rank's blocks under FSDP2)."""
        local = self.tracker.shards.local
        params = {n: local(n, p) for n, p in parameters(host.module).items()}
        return _Delta(params, self.forecaster.base or {})

    def _move_base(self, host: Host, rebase: bool = False) -> None:
        """theta_b becomes the parameters' current values (``rebase``, written over the old
        theta_b in place when it has the same parameters), and the forecast restarts from the
        drift measured there with the probe gradients now in :attr:`Forecaster.grads`."""
        tasks = [t for t in self.reference_tasks if t in self.forecaster.grads and t in self.tracker.baseline]
        params = parameters(host.module)
        try:
            if rebase and not self.forecaster.rebase(params):
                self.forecaster.base = self._snapshot(host)
            self.forecaster.move(params, tasks)
        except Exception as err:  # e.g. parameters on several devices: boundaries still work
            self._relay.warn(f"no per-step forecast ({err!r})")

    # ------------------------------------------------------------------ readers
    def timeline_figure(self, task: str, step: int | None = None):
        """The forgetting timeline of ``task`` so far (see :func:`plot_forgetting_timeline`).

        Series: ``measured`` and ``predicted`` drift, plus every other per-step series of
        ``history[task]`` (e.g. a ``forecast``) as its own line; ``ewc_quadratic`` in a panel of
        its own (it is orders of magnitude smaller). Warning steps come from ``alerts``.
        """
        return timeline_figure(
            task,
            self.history[task],
            warning_steps=[a["step"] for a in self.alerts if a["task"] == task],
            stop_step=self.stopped_at,
            threshold=self._in_nats(task, self.warn_threshold),
            relative=self.relative,
            stop_threshold=None if self.stop_threshold is None else self._in_nats(task, self.stop_threshold),
            horizon=self.horizon,
            step=step,
        )

    def memory_ledger(self, seen: set | None = None) -> dict[str, int]:
        """``{group: bytes}`` of the tensors held: the tracker's (``anchor``, ``anchor_fisher``,
        ``accumulators``), then the forecaster's (``base``: theta_b, ``grads``: the probe
        gradients there, one flat copy each); tensors in ``seen`` are left out."""
        seen = set() if seen is None else seen
        out: dict[str, int] = {}
        for part in (self.tracker, self.forecaster, self.warnings):
            for group, n in attribute_ledger(part, seen).items():
                out[group] = out.get(group, 0) + n
        for group, n in attribute_ledger(self, seen, skip=_NOT_STATE).items():
            out[group] = out.get(group, 0) + n
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint entry (the format of the checkpoints of earlier versions). Under FSDP2
        a collective: the per-parameter state (anchor, anchor Fishers, theta_b, probe gradients)
        is this rank's blocks, gathered whole (:meth:`Shards.whole`, on the CPU), so the entry is
        the one a DDP run saves and resumes on any number of ranks."""
        state = {
            **self.tracker.state_dict(),  # anchor, baseline, anchor_fisher, accumulators
            **self.forecaster.state_dict(self.checkpoint_params),  # prev, prev_grad
            "history": self.history,
            "alerts": self.alerts,
            "forecast": {
                **self.warnings.state_dict(),  # points, active
                "step": self.forecaster.last_step,
                "interval": self.interval,
                "last_eval_step": self.last_eval_step,
                "early_done": self.early_done,
                "anchor_step": self.anchor_step,
            },
            "stopped_at": self.stopped_at,
        }
        shards = self.tracker.shards
        if shards.sharded:  # FSDP2: the whole tensors, in the entry rank 0 saves
            state = map_parameter_state(state, PER_PARAMETER, lambda n, t: shards.whole(n, t).cpu())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ranks" in state:
            raise ValueError(
                "this forgetting state was saved under FSDP2 by an earlier version, as every "
                "rank's shards; checkpoints now keep whole tensors: start the monitors afresh"
            )
        fc = state.get("forecast", {})
        self.tracker.load_state_dict(state)
        self.forecaster.load_state_dict(state)
        self.forecaster.last_step = fc.get("step")
        self.history = state.get("history", {})
        self.alerts = list(state.get("alerts", []))
        self.interval = fc.get("interval")
        self.last_eval_step = fc.get("last_eval_step")
        self.early_done = fc.get("early_done", True)  # an older checkpoint: no early probe
        self.anchor_step = fc.get("anchor_step")
        self.warnings.load_state_dict(fc, self.history, self.anchor_step)
        self.stopped_at = state.get("stopped_at")
        self._to_blocks()  # under FSDP2 (a strategy that restores after fit start): this rank's

    def _to_blocks(self) -> None:
        """The per-parameter state as this rank's blocks (:meth:`Shards.block`: a checkpoint's
        whole tensors cut to this rank's rows; blocks and unsharded runs kept as they are)."""
        shards = self.tracker.shards
        if not shards.sharded:
            return
        state = map_parameter_state(
            {
                "anchor": self.tracker.anchor,
                "anchor_fisher": self.tracker.anchor_fisher,
                "prev": self.forecaster.base,
                "prev_grad": self.forecaster.grads,
            },
            PER_PARAMETER,
            shards.block,
            collective=False,
        )
        self.tracker.anchor, self.tracker.anchor_fisher = state["anchor"], state["anchor_fisher"]
        self.forecaster.base, self.forecaster.grads = state["prev"], state["prev_grad"]


class BoundaryPass:
    """One validation boundary of a :class:`ForgettingEngine`: the named steps of :attr:`STEPS`
    run in order on the engine's state.

    ``measure``: every task's reading, history, warning decision, scalars and attribution figure;
    ``log``: the scalars every rank has (:func:`log_agreed`, a collective); ``schedule``: the
    validation interval and the end of the early probes; ``move_base``: theta_b and the probe
    gradients become those of this boundary (the FisherMonitor keeps the forecast's rows as its
    probe gradients); ``stop``: the agreed stop; ``timelines``: the timeline figures (after the
    stop decision, so the step where the run stops is marked).
    """

    STEPS = ("measure", "log", "schedule", "move_base", "stop", "timelines")

    def __init__(self, engine: ForgettingEngine, host: Host) -> None:
        self.engine = engine
        self.host = host
        self.step = host.step
        self.delta = engine._delta(host)  # theta_t - theta_b, one parameter at a time
        self.wants_stop = False
        self.values: dict[str, float] = {}  # the scalars of every task, logged together

    def run(self) -> None:
        for name in self.STEPS:
            getattr(self, name)()

    def measure(self) -> None:
        e = self.engine
        for task in e.reference_tasks:
            probe = e.fisher.probe.get(task)
            if probe is None or probe.step != self.step:
                continue
            try:
                self.wants_stop |= self._task(task, probe)
            except Exception as err:
                e._relay.warn(f"{task} failed at step {self.step}: {err!r}")

    def _task(self, task: str, probe: ProbeReading) -> bool:
        """One task: the reading, its history, the warning decision, the damage, its scalars and
        its attribution figure. Returns whether it asks for a stop."""
        e, step, host = self.engine, self.step, self.host
        hist = e.history.setdefault(task, new_history())
        if task not in e.tracker.baseline or (hist["step"] and step <= hist["step"][-1]):
            return False  # no anchor, or this step was evaluated already (two boundaries, one step)
        grad_now = e._local(probe.grad)
        e.tracker.advance(task, e.forecaster.grads.get(task, grad_now), self.delta, grad_now)
        e.forecaster.grads[task] = grad_now
        with e._relay.catch(f"{task}: "):
            fisher_a = e.fisher.collector.fisher(task)
        reading = e.tracker.evaluate(task, step, probe.loss, parameters(host.module), fisher_a)
        hist["step"].append(step)
        hist["measured"].append(reading.measured)
        hist["predicted"].append(reading.predicted)
        hist.setdefault("ewc_quadratic", []).append(reading.ewc)
        e.warnings.measure(task, step, reading.measured, e.anchor_step or 0)
        values = boundary_values(reading, e._in_nats(task, e.warn_threshold))
        e._verdict(host, task, step, e._decide(task, None), "boundary", reading.measured, values)
        hist.setdefault("warning", []).append(float(e.warnings.active[task]))  # the state at each boundary
        reading.damage = _damage(e.fisher, e.tracker, e._relay, fisher_a, grad_now)
        values.update({f"forgetting/{task}/{k}": v for k, v in reading.damage.items()})
        self.values.update(values)
        if host.is_global_zero:
            layout = e.fisher.layout
            where = "all trainable weights" if e.predict_on == "all" else "the Q/K/V/O weights"
            e.report.attribution(host, reading, where, bool(layout and layout.partial))
        return e._beyond_stop(task, reading.measured)

    def log(self) -> None:
        # the same keys on every rank, or sync_dist would run a collective on some ranks only
        log_agreed(self.host, self.values, self.engine._relay, sync_dist=self.host.world_size > 1)

    def schedule(self) -> None:
        e = self.engine
        if e.last_eval_step is not None and self.step > e.last_eval_step:
            e.interval = float(self.step - e.last_eval_step)
        e.last_eval_step = self.step
        e.early_done = True

    def move_base(self) -> None:
        e = self.engine
        e._move_base(self.host, rebase=True)  # copies the probe gradients into the forecast's rows
        for task in e.forecaster.tasks:  # ... which the FisherMonitor keeps instead of its own
            e.fisher.share_probe_gradient(task, e.forecaster.grads[task])

    def stop(self) -> None:
        if self.engine.stop_threshold is not None:
            self.engine._maybe_stop(self.host, self.wants_stop, self.step, "measured")

    def timelines(self) -> None:
        e = self.engine
        if not self.host.is_global_zero:
            return
        for task, hist in e.history.items():
            if hist["step"] and hist["step"][-1] == self.step:
                try:
                    e.report.timeline(self.host, task, e.timeline_figure(task, self.step), self.step)
                except Exception as err:
                    e._relay.warn(f"no timeline of {task} at step {self.step}: {err!r}")


_NOT_STATE = ("fisher", "tracker", "forecaster", "warnings", "report", "_arguments")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


__all__ = ["ForgettingEngine", "ForgettingReading"]


class _Delta(Mapping):
    """``{name: params[name] - base[name]}`` over the names of ``base``, each made when read."""

    def __init__(self, params: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> None:
        self.params, self.base = params, base

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.base or name not in self.params:
            raise KeyError(name)
        return self.params[name].detach() - self.base[name]

    def __iter__(self):
        return (n for n in self.base if n in self.params)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _check_arguments(
    reference_tasks,
    warn_threshold,
    stop_threshold,
    horizon_steps,
    alert_wait_seconds,
    predict_on,
    early_probe_step,
) -> None:
    check_number("warn_threshold", warn_threshold, low=0.0, low_open=True)
    check_number("stop_threshold", stop_threshold, low=0.0, low_open=True, optional=True)
    check_number("horizon_steps", horizon_steps, low=0.0, optional=True)
    check_number("alert_wait_seconds", alert_wait_seconds, low=0.0)
    check_choice("predict_on", predict_on, ("all", "monitored"))
    if isinstance(reference_tasks, str):
        raise TypeError(f"reference_tasks must be a list of task names, got {reference_tasks!r}")
    if not (early_probe_step is None or early_probe_step == "auto" or _positive_int(early_probe_step)):
        raise ValueError(f"early_probe_step must be 'auto', None or an int >= 1, got {early_probe_step!r}")


def _damage(fisher: FisherEngine, tracker: ForgettingTracker, relay: WarningRelay, fisher_a, grad_a) -> dict:
    """The training side's Fisher and mean stored gradient for :meth:`ForgettingTracker.damage`
    (none with sketched stores, which keep no per-entry gradient)."""
    collector, train = fisher.collector, fisher.train_task
    if not collector.store.entrywise:
        return {}
    key = fisher.train_key(train)  # the training side, never the probe set
    _, rows = collector.stored_gradients(key)
    if not rows or not fisher_a:
        return {}
    with relay.catch(f"{train}: "):
        fisher_b = collector.fisher(key)
    grad_b = {n: r.float().mean(0) for n, r in rows.items()}
    return tracker.damage(train, fisher_a, grad_a, fisher_b, grad_b)

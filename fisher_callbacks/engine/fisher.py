"""The Fisher engine: per-sample capture on flagged training steps, the EMA Fisher on the others, the
probe sets at boundaries, for any trainer that drives it through a :class:`~.host.Host`.

The capture is :class:`~fisher_callbacks.capture.PerSampleGradientCapture`, the storage and Fisher
math :class:`~fisher_callbacks.fisher.FisherCollector`, the rescaling
:func:`~fisher_callbacks.losses.reduction_scale`, the probe passes :class:`~.probe.ProbeRunner`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from .._validate import check_choice, check_number
from ..capture import PerSampleGradientCapture
from ..fisher import FisherCollector
from ..layouts import AttentionLayout, canonical_name
from ..layouts.base import frozen_message
from ..losses import LOSS_TYPES, REDUCTIONS, LossType, infer_loss_type
from ..memory import attribute_ledger, format_ledger, suite_ledger, total_mb, trainable_bytes
from ..store import DEFAULT_SKETCH_DIM, STORE_KINDS
from .host import Host
from .probe import ProbeRunner
from .ranks import WarningRelay, log_agreed
from .readings import ProbeReading
from .sharding import Shards, check_supported, parameters
from .steps import StepCapture

log = logging.getLogger("fisher_callbacks")


class FisherEngine:
    """Collect per-sample gradients and Fisher information of the Q/K/V/O weights while training.

    Trainer-neutral: a trainer adapter (:class:`~fisher_callbacks.callbacks.FisherMonitor` for
    Lightning, :mod:`fisher_callbacks.hf`) calls :meth:`prepare` once per fit, :meth:`resolve`
    at fit start, :meth:`batch_start` / :meth:`after_backward` / :meth:`batch_end` around each
    training micro-batch, :meth:`boundary` at each evaluation boundary, :meth:`finish` at the
    end of training and :meth:`release` when the fit ends or fails. What it captures, when, and
    how it files samples is described on :class:`~fisher_callbacks.callbacks.FisherMonitor`.

    Constructor arguments: see :class:`~fisher_callbacks.callbacks.FisherMonitor` (the same
    names, defaults and checks). ``reference_tasks`` given as task names get their loaders from
    :meth:`Host.probe_loader` at :meth:`prepare`; ``probe_gradients=None`` keeps probe gradients
    when :meth:`prepare` is told a reader is attached.
    """

    def __init__(
        self,
        train_task: str = "train",
        reference_tasks: Mapping[str, DataLoader] | Sequence[str] | None = None,
        capture_every_n_steps: int = 50,
        ema_decay: float = 0.99,
        storage_dtype: torch.dtype = torch.float32,
        gradient_memory_mb: float = 512,
        max_samples_per_task: int = 64,
        fisher_type: str = "empirical",
        task_key: str = "task",
        sample_id_key: str = "sample_id",
        loss_reduction: str = "token_mean",
        ema_samples_per_step: int = 4,
        ema_every_n_steps: int = 4,
        probe_max_samples: int | None = None,
        loss_type: LossType | None = None,
        seed: int = 0,
        checkpoint_store: bool = True,
        include_bias: bool | None = None,
        store: str = "auto",
        sketch_dim: int = DEFAULT_SKETCH_DIM,
        min_samples_for_fisher: int = 10,
        capture_chunk: int | None = None,
        required: bool = True,
        check_loss: bool = True,
        ema_entries: bool = False,
        probe_gradients: bool | None = None,
    ) -> None:
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        _check_arguments(arguments)
        self._init_arguments = arguments  # what restart() starts again from
        refs = reference_tasks
        self.reference_tasks: dict[str, DataLoader | None] = (
            dict(refs) if isinstance(refs, Mapping) else dict.fromkeys(refs or ())
        )
        self.train_task, self.task_key, self.sample_id_key = train_task, task_key, sample_id_key
        self.capture_every_n_steps, self.capture_chunk = capture_every_n_steps, capture_chunk
        self.ema_decay, self.ema_entries = ema_decay, ema_entries
        self.ema_samples_per_step, self.ema_every_n_steps = ema_samples_per_step, ema_every_n_steps
        self.storage_dtype, self.gradient_memory_mb, self.store = storage_dtype, gradient_memory_mb, store
        self.max_samples_per_task, self.sketch_dim = max_samples_per_task, sketch_dim
        self.min_samples_for_fisher, self.checkpoint_store = min_samples_for_fisher, checkpoint_store
        self.fisher_type, self.loss_type, self.loss_reduction = fisher_type, loss_type, loss_reduction
        self.probe_max_samples, self.probe_gradients = probe_max_samples, probe_gradients
        self.seed, self.include_bias = seed, include_bias
        self.required, self.check_loss = required, check_loss
        self._keep_probe_grads = probe_gradients is not False  # resolved at prepare
        self.layout: AttentionLayout | None = None
        self.collector: FisherCollector | None = None
        self.capture: PerSampleGradientCapture | None = None
        self.probe: dict[str, ProbeReading] = {}  # the latest pass of each reference task
        self.probe_grad_names: set[str] | None = None  # None: every trainable parameter
        self.probe_grad_dtype: torch.dtype | None = None  # None: fp32
        self._steps = StepCapture(self)
        self._probes = ProbeRunner(self)
        self._probe_step: int | None = None
        self._pending_state: dict[str, Any] | None = None
        self._relay = WarningRelay("FisherMonitor")
        self._warned_frozen: tuple[str, ...] = ()
        self._frozen: tuple[str, ...] = ()  # attention tensors the layout left out as frozen

    # ------------------------------------------------------------------ tasks
    def train_key(self, task: str) -> str:
        """Collector key of training samples of ``task``: ``task``, or ``f"{task}@train"`` when a
        probe set has that name (the probe set keeps the plain name)."""
        return f"{task}@train" if task in self.reference_tasks else task

    def known_tasks(self) -> set[str]:
        """Collector keys this rank knows: probe sets, the training task and every task tag seen
        in a training batch, and the collector's tasks."""
        known = {*self.reference_tasks, self.train_key(self.train_task), *self._steps.seen_tasks}
        if self.collector is not None:
            known.update(self.collector.tasks)
        return known

    @property
    def relay(self) -> WarningRelay:
        """The suite's warning record: the other monitors take a :meth:`WarningRelay.view` of it,
        so every warning of the suite reaches the user once, from rank zero."""
        return self._relay

    @property
    def active(self) -> bool:
        """Whether the engine is set up on a model (False before :meth:`prepare` and when an
        engine with ``required=False`` stayed out of the fit)."""
        return self.collector is not None

    @property
    def log_loss(self) -> bool:
        """Whether the last probe pass's losses were cross-entropies (False: a regression MSE)."""
        return self._probes.log_loss

    def restrict_probe_gradients(self, names: set[str] | None, dtype: torch.dtype | None = None) -> None:
        """Probe gradients over ``names`` only (``None``: every trainable parameter), summed in
        ``dtype`` (``None``: fp32): a reader that keeps them in a lower precision has them made
        so, and no fp32 copy of the weights' size is held for it."""
        self.probe_grad_names = None if names is None else set(names)
        self.probe_grad_dtype = dtype

    # ------------------------------------------------------------------ lifecycle
    def prepare(self, host: Host, *, probe_gradients_wanted: bool) -> None:
        """Bind to ``host.module`` (once per fit): layout, collector, capture hooks, probe loaders,
        and the state a checkpoint loaded before. ``probe_gradients_wanted``: a reader of the
        probe gradients is attached (decides ``probe_gradients=None``)."""
        if self.collector is not None and self.collector.model is not host.module:
            self.restart()  # set up for another model before (validate(a), then fit(b)): afresh
        if self.probe_gradients is None:
            self._keep_probe_grads = probe_gradients_wanted
        if self.collector is not None:
            self.capture.attach()
            return
        try:
            for task, loader in self.reference_tasks.items():
                if loader is None:
                    self.reference_tasks[task] = host.probe_loader(task)
            check_supported(host.module)  # DeepSpeed ZeRO-3, FSDP1: a clear error
            self.loss_type = self.loss_type or infer_loss_type(host.module)
            self._build(host.module, self._resolve_layout(host.module))
        except Exception as err:
            if self.required:
                raise
            self.layout = self.collector = self.capture = None
            self._relay.warn(f"the suite stays out of this fit: {err}")
            return
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None

    def restart(self) -> None:
        """Back to the state right after construction (a reused engine's next fit): hooks
        removed from the previous model; the warning relay kept (readers hold views of it)."""
        self.release()
        relay = self._relay
        FisherEngine.__init__(self, **self._init_arguments)
        relay.reset()
        self._relay = relay

    def release(self) -> None:
        """Remove every hook from the model (end of fit, or a failed one)."""
        self._steps.remove_loss_check()
        if self.capture is not None:
            self.capture.remove()

    def finish(self) -> None:
        """End of training: the warnings of the last steps (every rank calls it: a collective);
        under FSDP2 the last steps' sums are synced and the whole Fisher gathered, so that
        :meth:`FisherCollector.fisher` after the fit is no collective."""
        if self.collector is not None and self.collector.shards.sharded:
            with self._relay.catch():
                self.collector.sync()
        self._relay.flush()

    def _resolve_layout(self, module: torch.nn.Module) -> AttentionLayout:
        """The layout of what trains now; warns once (per set of names) about frozen weights."""
        layout = AttentionLayout.from_model(module, include_bias=self.include_bias)
        layout, frozen = layout.trainable_only(module)
        self._frozen = tuple(frozen)  # left out: resolve() says so if they are unfrozen later
        key = tuple(canonical_name(n) for n in frozen)
        if frozen and key != self._warned_frozen:
            self._warned_frozen = key
            self._relay.warn(frozen_message(frozen))
        return layout

    def _build(self, module: torch.nn.Module, layout: AttentionLayout) -> None:
        self.layout = layout
        self.collector = FisherCollector(
            module,
            self.layout,
            ema_decay=self.ema_decay,
            storage_dtype=self.storage_dtype,
            gradient_memory_mb=self.gradient_memory_mb,
            fisher_type=self.fisher_type,
            max_samples_per_task=self.max_samples_per_task,
            loss_type=self.loss_type,
            seed=self.seed,
            store=self.store,
            sketch_dim=self.sketch_dim,
            min_samples_for_fisher=self.min_samples_for_fisher,
            expected_tasks=1 + len(self.reference_tasks),
            ema_entries=self.ema_entries,
        )
        self.capture = PerSampleGradientCapture(module, self.layout).attach()

    def resolve(self, module: torch.nn.Module) -> None:
        """Re-map the layout if the module changed since :meth:`prepare` (compiled, LoRA-wrapped
        or frozen after it). Idempotent and cheap when nothing changed; called at fit start (the
        other monitors call it too, whatever the callback order). Stored state keeps its
        samples: names are matched through :func:`~fisher_callbacks.layouts.canonical_name`."""
        if self.collector is None:
            return
        if not self.collector.shards.sharded:  # FSDP2 shards the model after prepare (Lightning)
            self.collector.set_shards(Shards.of(module))
        params = dict(module.named_parameters())
        names = self.layout.monitored_parameters()
        unfrozen = [n for n in self._frozen if n in params and params[n].requires_grad]
        if unfrozen:  # BaseFinetuning, progressive unfreezing: they stay unmonitored
            self._frozen = tuple(n for n in self._frozen if n not in unfrozen)
            self._relay.warn(
                f"{len(unfrozen)} attention tensor(s) were unfrozen during the fit and are not "
                f"monitored ({', '.join(unfrozen[:4])}{', ...' if len(unfrozen) > 4 else ''}): the "
                "monitors watch the weights that trained at fit start; unfreeze before the fit to "
                "watch them"
            )
        if all(n in params and params[n].requires_grad for n in names):
            return
        check_supported(module)  # wrapped since prepare (e.g. FSDP1 by the strategy)
        layout = self._resolve_layout(module)
        if layout.monitored_parameters() == names:
            return
        state = self.collector.state_dict()
        self.capture.remove()
        self._build(module, layout)
        self.collector.load_state_dict(_renamed_state(state, layout.monitored_parameters()))

    def log_memory(self, host: Host, owners: Iterable[Any]) -> dict[str, int]:
        """Log the suite's memory ledger (every owner's ``memory_ledger``, a tensor counted
        once): a table on the ``fisher_callbacks`` logger (INFO) and ``fisher/memory_mb`` to the
        sinks (:meth:`Host.log_now`), at ``host.step``. Called once per fit, at train start
        (after every monitor's fit start: the anchors and first probe results exist).

        Returns:
            the ledger ``{f"{Owner}/{group}": bytes}``.
        """
        try:
            ledger = suite_ledger(owners, host.module)
        except Exception as err:  # monitoring never takes the run down
            self._relay.warn(f"no memory ledger ({err!r})")
            return {}
        if host.is_global_zero:
            table = format_ledger(ledger, trainable_bytes(host.module))
            log.info("fisher_callbacks memory ledger at step %d:\n%s", host.step, table)
            host.log_now({"fisher/memory_mb": total_mb(ledger)})
        return ledger

    # ------------------------------------------------------------------ training steps
    def is_flagged(self, step: int) -> bool:
        """Whether optimizer step ``step`` captures every sample."""
        return self.capture_every_n_steps > 0 and step % self.capture_every_n_steps == 0

    def batch_start(self, host: Host, batch: Any, scale: torch.Tensor | None = None) -> None:
        """Before a training micro-batch's forward: arm the capture when the step is flagged
        (every sample) or an EMA step (``ema_samples_per_step`` random samples).

        ``scale``: ``[B]`` the per-sample factor of this micro-batch's backward (what
        :func:`~fisher_callbacks.losses.reduction_scale` gives, accumulation and the AMP loss
        scale included); ``None``: computed from ``loss_reduction``, ``host.accumulate`` and
        ``host.loss_scale()``. The measured ``loss_factor`` divides it in both cases.
        """
        self._steps.start(host, batch, scale)

    def after_backward(self, host: Host) -> None:
        """After the micro-batch's backward: file what the hooks captured (or count a
        non-finite step as skipped) and, once per fit, check ``.grad`` against it."""
        self._steps.after_backward(host)

    def batch_end(self) -> None:
        """After the micro-batch: a step that never reached backward leaves no hook armed."""
        self._steps.end()

    def chunk_size(self, captured: int) -> int:
        """Samples per chunk in the hooks: ``capture_chunk``, or as many as fit in 2 MB on CPU
        (a chunk read while it is in cache: one sample of a 135M model's projection; measured
        1.15x a plain step against 1.17x for 4 samples) and 64 MB on an accelerator (fewer,
        larger kernels)."""
        if self.capture_chunk is not None:
            return self.capture_chunk
        largest = max(math.prod(s) for s in self.collector.param_shapes.values()) * 4
        budget = (2 if self.collector.device.type == "cpu" else 64) * 2**20
        return max(1, min(captured, budget // max(largest, 1)))

    @property
    def skipped_steps(self) -> int:
        """Captured steps dropped because their gradients were not finite (AMP overflow)."""
        return self._steps.skipped_steps

    @property
    def captured_steps(self) -> int:
        """Flagged optimizer steps captured (each once, whatever the accumulation)."""
        return self._steps.captured_steps

    @property
    def ema_updates(self) -> int:
        """EMA Fisher updates (flagged steps included)."""
        return self._steps.ema_updates

    @property
    def loss_factor(self) -> float:
        """Training loss / the per-sample loss ``loss_reduction`` assumes (see ``check_loss``)."""
        return self._steps.loss_factor

    @property
    def capture_failed(self) -> bool:
        """Whether per-sample capture stopped for this fit after an error (one warning said why)."""
        return self._steps.failed

    # ------------------------------------------------------------------ boundary
    def boundary(self, host: Host) -> None:
        """One evaluation boundary at ``host.step``: :meth:`refresh`, then the scalars of
        :func:`fisher_scalars` and ``fisher/skipped_steps`` (the same keys on every rank), then
        the warnings gathered since the last boundary."""
        self.refresh(host)
        if self.collector is not None:
            values: dict[str, float] = {}
            try:  # local: every rank then logs the keys all of them have (log_agreed)
                with self._relay.catch():
                    values = fisher_scalars(self.collector)
            except Exception as err:
                self._relay.warn(f"no Fisher scalars at step {host.step}: {err!r}")
            values["fisher/skipped_steps"] = float(self.skipped_steps)
            log_agreed(host, values, self._relay)
        self._relay.flush()

    def refresh(self, host: Host) -> None:
        """Run the probe passes and sync the Fisher across ranks, once per global step.

        Idempotent within a step, so the other monitors call it whatever the callback order.
        Every rank takes the same path (the probe results are reduced), so under DDP the probe
        sets succeed or fail together.
        """
        if self.collector is None or self._probe_step == host.step:
            return
        self.resolve(host.module)
        self._probe_step = host.step
        self.collector.sync([t for t in self.collector.tasks if t not in self.reference_tasks])
        self.collector.freeze_whitening()  # sketch store: the probe sets use this boundary's Fisher
        for task in self.reference_tasks:
            try:
                self.probe[task] = self.run_probe(host, task)
            except Exception as err:
                self._relay.warn(f"probe pass on {task!r} failed: {err!r}; training continues")

    # ------------------------------------------------------------------ probes
    def share_probe_gradient(self, task: str, grad: dict[str, torch.Tensor]) -> None:
        """Keep ``grad``, an equal copy held by a reader (e.g. the forgetting monitor's flat
        buffer), as ``probe[task].grad`` instead of this pass's own tensors, so that one copy
        of the weight-sized gradient stays until the next boundary, not two."""
        if task in self.probe and self.probe[task].grad:
            self.probe[task].grad = grad

    def probe_batches(self, task: str) -> list[dict[str, Any]]:
        """The fixed probe batches of ``task``: drawn from its loader once, then reused.

        The loader is iterated once, batches are cut to ``probe_max_samples`` samples in all and
        kept on the CPU (the probe pass moves them to the module's device). Checkpointed, so a
        resumed run probes the same samples in the same order: every boundary sees the same
        samples, so a shuffled probe loader cannot make frozen weights look like drift.

        Returns:
            A list of batch dicts (``input_ids`` ``[b, T]``, ``labels`` ``[b, T]``, ...).
        """
        return self._probes.batches(task)

    def run_probe(
        self,
        host: Host,
        task: str,
        loader: DataLoader | Sequence[Mapping[str, Any]] | None = None,
        sum_params: Mapping[str, torch.Tensor] | None = None,
    ) -> ProbeReading:
        """Per-sample probe pass over ``loader``: refreshes ``task`` in the collector.

        ``loader=None`` probes the task's fixed probe batches (:meth:`probe_batches`), what the
        monitors do at every boundary.

        Under DDP a collective (every rank must call it for the same tasks in the same order):
        each rank probes its loader, then the losses, gradient sums, counts and the probe Fisher
        are reduced, so the result is that of all ranks' probe samples and the same on every
        rank. A rank whose pass raises contributes nothing (a warning names the error); with one
        process the error propagates. A probe loader that gives every rank the whole set (a plain
        DataLoader) counts each sample once per rank: ``n`` and the probe Fisher's count are
        ``world_size`` times the set, every mean (loss, gradient, Fisher) is that of the set.

        Returns:
            a :class:`~fisher_callbacks.engine.readings.ProbeReading` over all ranks, its
            ``grad`` over all trainable parameters, or over ``probe_grad_names`` when a monitor
            restricted it (``{}`` when no monitor reads it, see ``probe_gradients``).

        Raises:
            ValueError: no probe sample on any rank.
        """
        params = self._probe_params(host.module) if self._keep_probe_grads else {}
        if sum_params is not None:
            params = dict(sum_params)
        return self._probes.run(host, task, params, loader)

    def probe_gradient(self, host: Host, task: str) -> ProbeReading:
        """Mean probe loss and gradient of ``task`` on its fixed probe batches, with one plain
        batched backward per batch: no per-sample capture, the collector is left as it is.

        What the forgetting forecast needs between two boundaries (its early curvature probe),
        at the cost of one training step on the probe set. Under DDP a collective like
        :meth:`run_probe` (losses gathered, gradient sums all-reduced). The parameters are those
        of :meth:`run_probe` (``probe_grad_names`` when a monitor restricted them).

        Returns:
            a :class:`~fisher_callbacks.engine.readings.ProbeReading` over all ranks.

        Raises:
            ValueError: no probe sample with a target on any rank.
        """
        self.resolve(host.module)
        return self._probes.gradient(host, task, self._probe_params(host.module))

    def _probe_params(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The trainable parameters probe gradients cover (``probe_grad_names`` when set)."""
        names = self.probe_grad_names
        return {
            n: p for n, p in parameters(module).items() if p.requires_grad and (names is None or n in names)
        }

    # ------------------------------------------------------------------ memory and state
    def memory_ledger(self, seen: set | None = None) -> dict[str, int]:
        """``{group: bytes}``: the collector's groups (``collector.fisher_sum[task]``, ``.ema``,
        ``.store.*``), the probe results (``probe``: per reference task its mean gradient over
        the probed parameters and its losses) and the fixed probe batches (``probe_batches``)."""
        seen = set() if seen is None else seen
        out: dict[str, int] = {}
        if self.collector is not None:
            out.update({f"collector.{k}": v for k, v in self.collector.memory_ledger(seen).items()})
        out.update(attribute_ledger(self, seen, skip=("collector", "_steps", "_probes")))
        out.update(self._steps.memory_ledger(seen))
        out.update(self._probes.memory_ledger(seen))
        return out

    def state_dict(self) -> dict[str, Any]:
        collector = self.collector
        return {
            "collector": None if collector is None else collector.state_dict(self.checkpoint_store),
            "skipped_steps": self.skipped_steps,
            "captured_steps": self.captured_steps,
            "ema_updates": self.ema_updates,
            "loss_factor": self.loss_factor,
            "generator": self._steps.rng.get_state(),
            "probe_batches": self._probes.fixed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load now, or at :meth:`prepare` when the engine is not bound to a model yet."""
        if self.collector is None:
            self._pending_state = state_dict
        else:
            self._apply_state(state_dict)

    def _apply_state(self, state: dict[str, Any]) -> None:
        if state.get("collector") is not None:
            names = self.collector.param_names
            self.collector.load_state_dict(_renamed_state(state["collector"], names))
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
                # Every rank loads rank 0's checkpoint: keep the synced totals, but only rank 0
                # keeps the samples added since the last sync, or the next sync counts them twice.
                self.collector.drop_unsynced()
        steps = self._steps
        steps.skipped_steps = state.get("skipped_steps", 0)
        steps.captured_steps = state.get("captured_steps", 0)
        steps.ema_updates = state.get("ema_updates", 0)
        steps.loss_factor = float(state.get("loss_factor", 1.0))
        if "generator" in state:
            steps.rng.set_state(state["generator"])
        self._probes.fixed = dict(state.get("probe_batches", {}))


# ---------------------------------------------------------------------- helpers
def fisher_scalars(collector: FisherCollector) -> dict[str, float]:
    """``fisher/{task}/trace``, ``/ema_trace`` (tasks with EMA steps only: a reference task's
    probe set has none, and a constant 0 chart says nothing), ``/num_samples`` and
    ``/num_stored`` of every collector task (identical on every rank after the sync, except
    ``num_stored``, the rank's own)."""
    values: dict[str, float] = {}
    for task in collector.tasks:
        fisher = collector.fisher(task)
        values[f"fisher/{task}/trace"] = sum(float(f.sum()) for f in fisher.values())
        if collector.ema_steps(task) > 0:
            values[f"fisher/{task}/ema_trace"] = collector.fisher_ema_trace(task)
        values[f"fisher/{task}/num_samples"] = float(collector.num_samples(task))
        values[f"fisher/{task}/num_stored"] = float(collector.num_stored(task))
    return values


def _check_arguments(args: Mapping[str, Any]) -> None:
    """The constructor's checks: every error names the argument (NaN, ranges, options, typos)."""
    for name in ("train_task", "task_key", "sample_id_key"):
        if not isinstance(args[name], str) or not args[name]:
            raise ValueError(f"{name} must be a non-empty string, got {args[name]!r}")
    refs = args["reference_tasks"]
    if isinstance(refs, str):
        raise TypeError(f"reference_tasks must be a list of task names or a dict, got the string {refs!r}")
    for name in ("capture_every_n_steps", "ema_samples_per_step"):
        check_number(name, args[name], low=0, integer=True)
    for name in ("ema_every_n_steps", "sketch_dim", "min_samples_for_fisher"):
        check_number(name, args[name], low=1, integer=True)
    check_number("max_samples_per_task", args["max_samples_per_task"], low=0, integer=True)
    for name in ("probe_max_samples", "capture_chunk"):
        check_number(name, args[name], low=1, integer=True, optional=True)
    check_number("seed", args["seed"], integer=True)
    check_number("ema_decay", args["ema_decay"], low=0.0, high=1.0, high_open=True)
    check_number("gradient_memory_mb", args["gradient_memory_mb"], low=0.0, high=math.inf, high_open=True)
    check_choice("fisher_type", args["fisher_type"], ("empirical", "true"))
    check_choice("loss_reduction", args["loss_reduction"], REDUCTIONS)
    check_choice("store", args["store"], STORE_KINDS)
    if args["loss_type"] is not None:
        check_choice("loss_type", args["loss_type"], LOSS_TYPES)
    check_choice("storage_dtype", args["storage_dtype"], (torch.float32, torch.bfloat16, torch.float16))
    for name in ("required", "check_loss", "checkpoint_store"):
        if not isinstance(args[name], bool):
            raise TypeError(f"{name} must be True or False, got {args[name]!r}")
    if args["include_bias"] is not None and not isinstance(args["include_bias"], bool):
        raise TypeError(f"include_bias must be True, False or None, got {args['include_bias']!r}")


def _renamed_state(state: Any, names: Sequence[str]) -> Any:
    """``state`` with every dict key that names a parameter mapped onto ``names`` through
    :func:`canonical_name` (a checkpoint of a compiled run loads into an uncompiled one and back)."""
    by_canon = {canonical_name(n): n for n in names}
    if isinstance(state, dict):
        return {
            (by_canon.get(canonical_name(k), k) if isinstance(k, str) else k): _renamed_state(v, names)
            for k, v in state.items()
        }
    return state

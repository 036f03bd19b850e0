"""The Fisher engine: per-sample capture on flagged training steps, the EMA Fisher on the others, the
probe sets at boundaries, for any trainer that drives it through a :class:`~.host.Host`.

The capture is :class:`~fisher_callbacks.capture.PerSampleGradientCapture`, the storage and Fisher
math :class:`~fisher_callbacks.fisher.FisherCollector`, the rescaling
:func:`~fisher_callbacks.losses.reduction_scale`, the probe passes :class:`~.probe.ProbeRunner`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from .._rng import SeededGenerator
from .._validate import check_choice, check_number
from ..capture import PerSampleGradientCapture
from ..fisher import FisherCollector
from ..layouts import AttentionLayout, canonical_name
from ..layouts.base import frozen_message
from ..loss_check import FACTOR_TOL, RESIDUAL_TOL, CapturedSum, LossCheck
from ..losses import LOSS_TYPES, REDUCTIONS, LossType, infer_loss_type, reduction_scale
from ..memory import attribute_ledger, format_ledger, suite_ledger, total_mb, trainable_bytes
from ..store import DEFAULT_SKETCH_DIM, STORE_KINDS
from .host import Host
from .probe import ProbeRunner, _as_list
from .ranks import WarningRelay, distributed, log_agreed
from .readings import ProbeReading

log = logging.getLogger("fisher_callbacks")


class FisherEngine:
    """Collect per-sample gradients and Fisher information of the Q/K/V/O weights while training.

    Trainer-neutral: a trainer adapter (:class:`~fisher_callbacks.callbacks.FisherMonitor` for
    Lightning, :mod:`fisher_callbacks.hf`) calls :meth:`prepare` once per fit, :meth:`resolve`
    at fit start, :meth:`batch_start` / :meth:`after_backward` / :meth:`batch_end` around each
    training micro-batch, :meth:`boundary` at each evaluation boundary, :meth:`finish` at the
    end of training and :meth:`release` when the fit ends or fails. What it captures, when, and
    how it files samples is described on :class:`~fisher_callbacks.callbacks.FisherMonitor`.

    Args:
        train_task: task name of training samples without a ``task_key`` entry.
        reference_tasks: ``{task: DataLoader}`` probe sets, or task names whose loaders come from
            :meth:`Host.probe_loader` at :meth:`prepare` (under Lightning ``probe_dataloader(task)``
            of the datamodule or the LightningModule: the form a LightningCLI YAML can give).
        capture_every_n_steps: flag every n-th optimizer step (step 0 included); 0 disables.
        ema_decay, storage_dtype, gradient_memory_mb, fisher_type: see
            :class:`~fisher_callbacks.fisher.FisherCollector`.
        max_samples_per_task: stored samples per task (reservoir size cap).
        task_key, sample_id_key: batch keys of the task tags and true sample ids.
        loss_reduction: how the training loss reduces per-sample losses (``"token_mean"``, the
            Hugging Face default, ``"sample_mean"``, ``"sum"`` or ``"token_sum"``).
        ema_samples_per_step: samples captured for the EMA on non-flagged steps (0: no EMA).
        ema_every_n_steps: EMA update period in optimizer steps (default 4; 1: every step).
        probe_max_samples: cap on samples per probe set and boundary.
        loss_type: per-sample loss (inferred from the model head when ``None``).
        seed: seeds subsampling, reservoirs, true-Fisher labels and sketch projections.
        store: ``"auto"`` (default: ``"sketch"`` when the exact store cannot keep
            ``min_samples_for_fisher`` samples per task, for the training task plus the reference
            tasks, within ``gradient_memory_mb``), ``"exact"`` or ``"sketch"``; see
            :class:`~fisher_callbacks.store.SketchStore`. With sketches, the whitening Fisher is
            frozen from the first captured step (all-reduced over DDP ranks) and refreshed at
            every validation boundary after the Fisher sync, before the probe passes.
        sketch_dim: numbers per (layer, block, head) slice of a sketched sample.
        min_samples_for_fisher: the collector's threshold (also the ``"auto"`` rule's).
        checkpoint_store: keep the stored per-sample gradients (rows and ids) in checkpoints.
            ``False`` saves ``n_stored * P * itemsize`` bytes per task (see the checkpoint-overhead
            formula in ``docs/costs.md``); a resumed run keeps every Fisher sum, count and EMA but
            starts with an empty store, which refills from the next flagged step (heatmaps and
            top conflicts then see only samples captured after the resume).
        include_bias: monitor the Q/K/V biases too (``None``: what the layout's builder chose,
            no biases for the built-in layouts).
        capture_chunk: samples whose per-sample gradients the hooks make at a time, per
            projection: the transient memory of a captured step is one projection x
            ``capture_chunk`` samples (fp32), never ``[B, all monitored weights]``; the squares
            go to the exact Fisher sums and the rows that the store keeps are sketched (or
            copied) on the spot. ``None``: as many samples as fit, for the largest
            monitored weight (2 MB on CPU, 64 MB on an accelerator).
        required: ``False`` (what the ``FISHER_CALLBACKS=1`` entry point uses): a model whose
            attention cannot be mapped, or a probe set without a loader, is one warning at
            setup and the suite stays out of the fit (no hooks, no key logged) instead of an
            error.
        check_loss: on flagged steps, check at the logits that the training loss is the
            per-sample loss ``loss_reduction`` assumes (:mod:`fisher_callbacks.loss_check`): a
            constant weight (``return 0.5 * loss``) is measured and divided out of every captured
            gradient from that step on (``loss_factor``, one warning); any other difference (an
            auxiliary term) is one warning. Costs one cross-entropy backward over the logits
            per flagged step. On the first flagged step of a fit the monitored weights'
            ``.grad`` is also compared with the sum of the captured per-sample gradients: a
            penalty on the weights themselves is one warning.
        ema_entries: keep the EMA Fisher per weight entry (``collector.fisher_ema(task)``: an
            fp32 copy of the monitored weights per training task). Default ``False``: only its
            trace is kept (``collector.fisher_ema_trace``, the logged ``ema_trace``, the same
            value), since no monitor of the suite reads the entries.
        probe_gradients: keep each probe pass's mean gradient (``probe[task].grad``, over
            every trainable parameter or ``probe_grad_names``: the forgetting prediction's
            input). ``None`` (default): only when :meth:`prepare` is told a reader is attached
            (a ForgettingRiskMonitor, the one reader in the suite); without one a probe pass
            computes and keeps no weight-sized gradient (0.54 GB per probe set for a 135M
            model, all parameters probed).
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
        self.train_task = train_task
        self.capture_every_n_steps = capture_every_n_steps
        self.ema_decay = ema_decay
        self.storage_dtype = storage_dtype
        self.gradient_memory_mb = gradient_memory_mb
        self.max_samples_per_task = max_samples_per_task
        self.fisher_type = fisher_type
        self.task_key = task_key
        self.sample_id_key = sample_id_key
        self.loss_reduction = loss_reduction
        self.ema_samples_per_step = ema_samples_per_step
        self.ema_every_n_steps = ema_every_n_steps
        self.probe_max_samples = probe_max_samples
        self.loss_type = loss_type
        self.seed = seed
        self.checkpoint_store = checkpoint_store
        self.include_bias = include_bias
        self.store = store
        self.sketch_dim = sketch_dim
        self.min_samples_for_fisher = min_samples_for_fisher
        self.capture_chunk = capture_chunk
        self.required = required
        self.check_loss = check_loss
        self.ema_entries = ema_entries
        self.probe_gradients = probe_gradients
        self.loss_factor = 1.0  # training loss / assumed loss, measured on flagged steps
        self._loss_check: LossCheck | None = None
        self._captured: CapturedSum | None = None  # this step's captured sums, for the .grad check
        self._grad_checked = False  # the .grad check runs once per fit
        self._keep_probe_grads = probe_gradients is not False  # resolved at prepare
        self.layout: AttentionLayout | None = None
        self.collector: FisherCollector | None = None
        self.capture: PerSampleGradientCapture | None = None
        self.skipped_steps = 0
        self.captured_steps = 0
        self.ema_updates = 0
        self.probe: dict[str, ProbeReading] = {}  # the latest pass of each reference task
        self._probes = ProbeRunner(self)
        self._probe_step: int | None = None
        self._pending: dict[str, Any] | None = None
        self._pending_state: dict[str, Any] | None = None
        self._rng = SeededGenerator(seed)  # picklable (ddp_spawn); the torch.Generator is lazy
        self._failed = False
        self.probe_grad_names: set[str] | None = None  # None: every trainable parameter
        self._ema_step: int | None = None  # optimizer step of the last EMA update
        self._relay = WarningRelay("FisherMonitor")
        self._seen_tasks: set[str] = set()  # collector keys of the training tags seen
        self._warned_frozen: tuple[str, ...] = ()

    # ------------------------------------------------------------------ tasks
    def train_key(self, task: str) -> str:
        """Collector key of training samples of ``task``: ``task``, or ``f"{task}@train"`` when a
        probe set has that name (the probe set keeps the plain name)."""
        return f"{task}@train" if task in self.reference_tasks else task

    def known_tasks(self) -> set[str]:
        """Collector keys this rank knows: probe sets, the training task and every task tag seen
        in a training batch, and the collector's tasks."""
        known = {*self.reference_tasks, self.train_key(self.train_task), *self._seen_tasks}
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

    def restrict_probe_gradients(self, names: set[str] | None) -> None:
        """Probe gradients over ``names`` only (``None``: every trainable parameter)."""
        self.probe_grad_names = None if names is None else set(names)

    # ------------------------------------------------------------------ lifecycle
    def prepare(self, host: Host, *, probe_gradients_wanted: bool) -> None:
        """Bind to ``host.module`` (once per fit): layout, collector, capture hooks, probe loaders,
        and the state a checkpoint loaded before. ``probe_gradients_wanted``: a reader of the
        probe gradients is attached (decides ``probe_gradients=None``)."""
        if self.probe_gradients is None:
            self._keep_probe_grads = probe_gradients_wanted
        if self.collector is not None:
            self.capture.attach()
            return
        try:
            for task, loader in self.reference_tasks.items():
                if loader is None:
                    self.reference_tasks[task] = host.probe_loader(task)
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
        self._remove_loss_check()
        if self.capture is not None:
            self.capture.remove()

    def finish(self) -> None:
        """End of training: the warnings of the last steps (every rank calls it: a collective)."""
        self._relay.flush()

    def _resolve_layout(self, module: torch.nn.Module) -> AttentionLayout:
        """The layout of what trains now; warns once (per set of names) about frozen weights."""
        layout = AttentionLayout.from_model(module, include_bias=self.include_bias)
        layout, frozen = layout.trainable_only(module)
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
        params = dict(module.named_parameters())
        names = self.layout.monitored_parameters()
        if all(n in params and params[n].requires_grad for n in names):
            return
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
        ledger = suite_ledger(owners, host.module)
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
        self._pending = None
        if self._failed or self.capture is None:
            return
        if not isinstance(batch, Mapping) or "labels" not in batch:
            self._fail_once("training batches must be dicts with 'labels' for per-sample capture")
            return
        step, size = host.step, batch["labels"].shape[0]
        tags = batch.get(self.task_key)
        if tags is not None:
            with contextlib.suppress(TypeError, ValueError):  # reported when the samples are filed
                names = _task_names(tags, size, self.train_task, self.task_key)
                self._seen_tasks.update(self.train_key(t) for t in names)
        if self.is_flagged(step):
            samples = None
        elif self.ema_samples_per_step and step % self.ema_every_n_steps == 0 and step != self._ema_step:
            # one EMA update per optimizer step, not per micro-batch
            k = min(self.ema_samples_per_step, size)
            samples = torch.randperm(size, generator=self._rng.generator)[:k].sort().values
        else:
            return
        if scale is None:
            labels = batch["labels"]
            scale = reduction_scale(
                labels, self.loss_type, self.loss_reduction, host.accumulate, host.loss_scale()
            )
        elif tuple(scale.shape) != (size,):
            raise ValueError(f"scale must have shape [{size}] (one factor per sample), got {tuple(scale.shape)}")
        self._arm(host, batch, samples, scale.float() / self.loss_factor)

    def _arm(self, host: Host, batch: Mapping[str, Any], samples: torch.Tensor | None, scale: torch.Tensor) -> None:
        """Open this micro-batch's ingest and arm the hooks (and the loss check) on ``samples``
        (``None``: every sample, a flagged step)."""
        step, size = host.step, batch["labels"].shape[0]
        rows = torch.arange(size) if samples is None else samples
        flagged = samples is None
        ema = step != self._ema_step  # first micro-batch of this optimizer step
        if not flagged and not ema:
            return
        try:
            all_tasks = _task_names(batch.get(self.task_key), size, self.train_task, self.task_key)
            valid = (scale > 0).tolist()
            tasks = [self.train_key(all_tasks[r]) if valid[r] else None for r in rows.tolist()]
            ids = None
            if flagged and batch.get(self.sample_id_key) is not None:
                all_ids = _as_list(batch[self.sample_id_key], size, None, self.sample_id_key)
                ids = [all_ids[r] for r in rows.tolist()]
            ingest = self.collector.ingest(tasks, ids, fisher=flagged, ema=ema, store=flagged)
        except Exception as err:
            self._fail_once(f"per-sample capture failed at step {step}: {err!r}")
            return
        self._pending = {"flagged": flagged, "ema": ema, "ingest": ingest, "step": step}
        sink, self._captured = ingest, None
        # .grad holds this backward alone: first micro-batch, automatic optimization, one process
        # (DDP averages .grad during the backward)
        alone = ema and host.automatic_optimization and not distributed()
        if flagged and alone and self.check_loss and not self._grad_checked:
            weight = torch.where(scale > 0, 1.0 / scale.clamp_min(1e-30), torch.zeros_like(scale))
            sink = self._captured = CapturedSum(ingest, weight)
        self.capture.arm(samples, scale=scale[rows], sink=sink, chunk=self.chunk_size(rows.numel()))
        if flagged and self.check_loss:
            self._arm_loss_check(host.module, batch["labels"], scale)

    def _arm_loss_check(self, module: torch.nn.Module, labels: torch.Tensor, scale: torch.Tensor) -> None:
        """Hook the logits of this flagged step's forward (see :mod:`fisher_callbacks.loss_check`);
        not under ``torch.compile`` (a hook added per step would recompile the model)."""
        self._remove_loss_check()
        if any("_orig_mod" in n for n, _ in module.named_modules()):
            return
        # the Hugging Face model inside (what every training step calls), else the module itself
        hf = [m for m in module.modules() if getattr(getattr(m, "config", None), "model_type", None)]
        self._loss_check = LossCheck(hf[0] if hf else module, labels, self.loss_type, scale, self._loss_checked)

    def _remove_loss_check(self) -> None:
        if self._loss_check is not None:
            self._loss_check.remove()
            self._loss_check = None

    def _loss_checked(self, factor: float, residual: float) -> None:
        """Inside the backward, before the monitored projections: rescale or warn."""
        if not math.isfinite(factor) or self.capture is None:
            return
        if residual > RESIDUAL_TOL:
            self._relay.warn(
                f"the training loss is not the per-sample loss that loss_reduction="
                f"{self.loss_reduction!r} assumes: {residual:.0%} of its gradient at the logits is "
                "explained by no per-sample loss (an auxiliary term? label smoothing?); the "
                "captured per-sample gradients include that part"
            )
        elif abs(factor - 1.0) > FACTOR_TOL:
            self.capture.rescale(1.0 / factor)
            self.loss_factor *= factor
            if self._captured is not None:
                self._captured.weight *= factor  # 1 / s_i follows the rescaled s_i
            self._relay.warn(
                f"the training loss is {self.loss_factor:.4g} x the per-sample loss that "
                f"loss_reduction={self.loss_reduction!r} assumes (a weighted loss?): captured "
                f"gradients are divided by {self.loss_factor:.4g} from this step on"
            )

    def chunk_size(self, captured: int) -> int:
        """Samples per chunk in the hooks: ``capture_chunk``, or as many as fit in 2 MB on CPU
        (a chunk read while it is in cache: one sample of a 135M model's projection; measured
        1.15x a plain step against 1.17x for 4 samples) and 64 MB on an accelerator (fewer,
        larger kernels)."""
        if self.capture_chunk is not None:
            return self.capture_chunk
        largest = max(math.prod(s) for s in self.collector.param_shapes.values()) * 4
        budget = (2 if self.collector._device.type == "cpu" else 64) * 2**20
        return max(1, min(captured, budget // max(largest, 1)))

    def after_backward(self, host: Host) -> None:
        """After the micro-batch's backward: file what the hooks captured (or count a
        non-finite step as skipped) and, once per fit, check ``.grad`` against it."""
        pending, self._pending = self._pending, None
        self._remove_loss_check()
        if pending is None or self.capture is None or not self.capture.armed:
            return
        try:
            self._ingest(pending)
            self._check_grad(host.module)
        except Exception as err:
            self._fail_once(f"per-sample capture failed at step {pending['step']}: {err!r}")
        finally:
            self.capture.disarm()
            self._captured = None

    def _check_grad(self, module: torch.nn.Module) -> None:
        """Once per fit: the monitored weights' ``.grad`` against the sum of the captured
        per-sample gradients (one dot product per projection): a loss term that bypasses the
        projections' outputs (a penalty on the weights themselves) is one warning."""
        captured, self._captured = self._captured, None
        if captured is None or not captured.sums:
            return
        params = dict(module.named_parameters())
        _, residual = captured.residual({n: params[n].grad for n in captured.sums if n in params})
        if not math.isfinite(residual):
            return  # a non-finite step: try the next flagged one
        self._grad_checked = True
        if residual > RESIDUAL_TOL:
            self._relay.warn(
                f"{residual:.0%} of the monitored weights' .grad does not come through their "
                "outputs (a loss term on the weights themselves: an L2 or EWC penalty?); the "
                "captured per-sample gradients leave it out"
            )

    def _ingest(self, pending: dict[str, Any]) -> None:
        """File what the hooks handed to the step's ingest (or drop it: non-finite step)."""
        ingest = pending["ingest"]
        nonfinite = self.capture.nonfinite  # checked in the hooks on the small factors
        self.capture.disarm()
        # AMP overflow: the whole step is skipped. A batch without any target token (all labels
        # -100) has no sample to add but is still a captured step (its loss may be NaN, 0 / 0).
        skip = nonfinite and ingest.count > 0
        sums = {} if skip else ingest.commit()
        if pending["flagged"] and self.collector.needs_whitening:
            # Every rank reaches this at the same (first flagged) step: a collective. That step's
            # samples fill the Fisher sums and set the whitening; they are not sketched.
            self.collector.initial_whitening(sums or None, ingest.count if sums else 0)
        if skip:
            self.skipped_steps += 1
            log.debug("fisher_callbacks: step %d skipped (non-finite gradients)", pending["step"])
            return
        if not ingest.received:
            return
        if pending["ema"]:  # first micro-batch of the optimizer step: count the step once
            self.captured_steps += int(pending["flagged"])
            self.ema_updates += 1
            self._ema_step = pending["step"]

    def batch_end(self) -> None:
        """After the micro-batch: a step that never reached backward leaves no hook armed."""
        if self.capture is not None and self.capture.armed:
            self.capture.disarm()
        self._remove_loss_check()
        self._captured = None
        self._pending = None

    # ------------------------------------------------------------------ boundary
    def boundary(self, host: Host) -> None:
        """One evaluation boundary: :meth:`refresh`, the ``fisher/*`` scalars, the warnings."""
        self.refresh(host)
        self._log_scalars(host)
        self._relay.flush()

    def _log_scalars(self, host: Host) -> None:
        """``fisher/{task}/trace``, ``/ema_trace`` (tasks with EMA steps only: a reference task's
        probe set has none, and a constant 0 chart says nothing), ``/num_samples``,
        ``/num_stored`` and ``fisher/skipped_steps`` (the same keys on every rank, identical
        values after the sync except ``num_stored``, the rank's own), at ``host.step``."""
        if self.collector is None:
            return
        values: dict[str, float] = {}
        with self._relay.catch():
            for task in self.collector.tasks:
                fisher = self.collector.fisher(task)
                values[f"fisher/{task}/trace"] = sum(float(f.sum()) for f in fisher.values())
                if self.collector.ema_steps(task) > 0:
                    values[f"fisher/{task}/ema_trace"] = self.collector.fisher_ema_trace(task)
                values[f"fisher/{task}/num_samples"] = float(self.collector.num_samples(task))
                values[f"fisher/{task}/num_stored"] = float(self.collector.num_stored(task))
        values["fisher/skipped_steps"] = float(self.skipped_steps)
        log_agreed(host, values, self._relay)

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
                self._fail_once(f"probe pass on {task!r} failed: {err!r}", keep_capturing=True)

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
            n: p for n, p in module.named_parameters() if p.requires_grad and (names is None or n in names)
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
        out.update(attribute_ledger(self, seen, skip=("collector", "_probes")))
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
            "generator": self._rng.get_state(),
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
        self.skipped_steps = state.get("skipped_steps", 0)
        self.captured_steps = state.get("captured_steps", 0)
        self.ema_updates = state.get("ema_updates", 0)
        self.loss_factor = float(state.get("loss_factor", 1.0))
        if "generator" in state:
            self._rng.set_state(state["generator"])
        self._probes.fixed = dict(state.get("probe_batches", {}))

    def _fail_once(self, message: str, keep_capturing: bool = False) -> None:
        if not keep_capturing:
            self._failed = True
        self._relay.warn(f"{message}; training continues")


# ---------------------------------------------------------------------- helpers
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


def _task_names(value: Any, n: int, default: str, key: str = "task") -> list[str]:
    """Task tag of each of ``n`` samples: strings as given, integer tags (ints, integer tensors) as
    their decimal string (tag ``3`` is task ``"3"``); anything else is a clear error."""
    names = _as_list(value, n, default, key)
    for k, name in enumerate(names):
        if isinstance(name, bool) or not isinstance(name, (str, int)):
            raise TypeError(
                f"task tags must be strings or integers, got {type(name).__name__} {name!r} "
                f"(sample {k} of the batch)"
            )
    return [name if isinstance(name, str) else str(name) for name in names]

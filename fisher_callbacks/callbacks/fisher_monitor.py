"""FisherMonitor: per-sample capture on flagged training steps, EMA Fisher on the others, probe sets.

Thin: the capture is :class:`~fisher_callbacks.capture.PerSampleGradientCapture`, the storage and
Fisher math :class:`~fisher_callbacks.fisher.FisherCollector`, the rescaling
:func:`~fisher_callbacks.losses.reduction_scale`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from typing_extensions import override

from .._rng import SeededGenerator, isolated_rng
from .._validate import check_choice, check_number
from ..capture import PerSampleGradientCapture, ProbeResult, probe_pass
from ..engine.host import Host
from ..engine.ranks import WarningRelay, distributed, log_agreed
from ..engine.readings import ProbeReading
from ..fisher import FisherCollector, _collective_device
from ..layouts import AttentionLayout, canonical_name
from ..layouts.base import frozen_message
from ..loss_check import FACTOR_TOL, RESIDUAL_TOL, CapturedSum, LossCheck
from ..losses import (
    LOSS_TYPES,
    REDUCTIONS,
    LossType,
    forward_logits,
    infer_loss_type,
    is_squared_error,
    per_sample_loss,
    reduction_scale,
    target_token_counts,
)
from ..memory import attribute_ledger, format_ledger, suite_ledger, total_mb, trainable_bytes
from ..store import DEFAULT_SKETCH_DIM, STORE_KINDS
from ._boundary import BoundaryCallback
from ._host import LightningHost

log = logging.getLogger("fisher_callbacks")


class FisherMonitor(BoundaryCallback):
    """Collect per-sample gradients and Fisher information of the Q/K/V/O weights while training.

    On a flagged step (every ``capture_every_n_steps`` optimizer steps) the per-sample gradients
    come from the TRAINING backward itself (hooks; no second forward), rescaled from the training
    loss (``loss_reduction``, ``accumulate_grad_batches``, the AMP loss scale) to each sample's
    own mean-loss gradient, tagged with each sample's task (``batch[task_key]`` or ``train_task``)
    and true id (``batch[sample_id_key]``), and stored (reservoir within ``gradient_memory_mb``).
    On every ``ema_every_n_steps``-th of the other steps only ``ema_samples_per_step`` random
    samples of the batch are captured to update the EMA Fisher (an unbiased estimate of the batch
    mean of ``g_i**2`` at a fraction of the cost; flagged steps update it from the whole batch).
    The EMA takes one step per update (from the first micro-batch under gradient accumulation), so
    ``ema_decay`` means the same whatever ``accumulate_grad_batches``: with the defaults (0.99,
    every 4 steps) it remembers ~100 updates, ~400 optimizer steps. The default cadence keeps the
    steps in between within 5% of a plain step (``benchmarks/bench_forecast.py``: an update costs
    ~6% of its step on the tiny benchmark models, mostly fixed per-hook work, so 4 samples every 4
    steps cost a quarter of 4 samples every step, and less than 1 sample every step).
    Steps whose captured gradients are not finite (AMP overflow) are skipped and counted in
    ``skipped_steps``. A flagged step whose batch has no target token (every label ``-100``)
    adds no sample but counts in ``captured_steps`` (and ``ema_updates``), never in
    ``skipped_steps``. Sample ids may be a list, a ``[B]`` or a ``[B, 1]`` tensor; task tags
    strings or integers (integer tag ``3`` is filed as task ``"3"``).

    ``reference_tasks={"general": dataloader}`` are probe sets: at each validation boundary (never
    during the sanity check) every probe sample's gradient and loss are computed with
    ``torch.autograd.grad`` on the LightningModule itself (never ``.grad``, never the DDP
    wrapper), in eval mode, restoring the mode after. The probe batches are drawn from each loader
    ONCE (within ``probe_max_samples``, at the first probe pass) and kept, also in the checkpoint:
    every boundary sees the same samples in the same order, so a shuffled probe loader cannot make
    frozen weights look like drift (:meth:`probe_batches`). The reference Fisher is refreshed at each
    boundary (the Fisher at the current weights). Batches must be dicts with ``input_ids``,
    ``labels`` (and optionally ``attention_mask``, ``task``, ``sample_id``) that the wrapped Hugging
    Face model accepts. Boundaries also come at the end of a fit without validation and at the
    resume of a checkpoint written just before a validation (see
    :class:`~fisher_callbacks.callbacks._boundary.BoundaryCallback`).

    With ``fisher_type="true"`` probe passes sample labels from the model; the training-step
    capture always sees the training labels (empirical Fisher).

    Collector keys: a probe set is filed under its own name (``"general"``), refreshed at every
    boundary; training samples under their task name, except that training samples whose task
    names a probe set (rehearsal: replayed ``general`` samples while ``general`` is also a probe
    set) are filed under :meth:`train_key` ``"general@train"``, so the probe refresh never wipes
    them. QK-OV pairs and the forgetting monitor read collector keys: ``"general"`` is the probe
    set (the Fisher at the current weights), ``"general@train"`` the replayed training samples.

    Under DDP each rank captures its own samples (hooks are local, so exact); at validation
    boundaries the Fisher sums are all-reduced (``FisherCollector.sync``), so every rank holds the
    Fisher of all samples. Probe passes are reduced too: each rank probes what its loader gives
    (the same set, or its shard of it, possibly none), and the probe loss, gradient and Fisher are
    those of the union, identical on every rank (a rank whose probe fails contributes nothing and
    says so). Logged keys are agreed across ranks; warnings of every rank reach the user once,
    from rank zero.

    Under ``strategy="ddp_spawn"`` the monitor is pickled to the spawned processes (its RNG is a
    seed and a state tensor, see :class:`~fisher_callbacks._rng.SeededGenerator`) and the
    collector lives there. Lightning sends back to the parent only the weights, the trainer state,
    ``trainer.callback_metrics`` and the best checkpoint path, never callback state: after a
    spawned fit the parent's monitor is as it was before ``fit`` (no collector, no probe results).
    Read the logged metrics, or save a checkpoint (the monitor's state is in it) and load it, or
    use ``strategy="ddp"``. FSDP works the same way for the hooks (they see the local shard of the
    batch and the full, unsharded activations of each projection) but is not tested here.

    Args:
        train_task: task name of training samples without a ``task_key`` entry.
        reference_tasks: ``{task: DataLoader}`` probe sets, or task names whose loaders come from
            ``probe_dataloader(task)`` of the datamodule (or the LightningModule) at setup (the
            form a LightningCLI YAML can give).
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
        ema_entries: keep the EMA Fisher per weight entry (``collector.fisher_ema(task)``: an
            fp32 copy of the monitored weights per training task). Default ``False``: only its
            trace is kept (``collector.fisher_ema_trace``, the logged ``ema_trace``, the same
            value), since no monitor of the suite reads the entries.
        probe_gradients: keep each probe pass's mean gradient (``probe[task].grad``, over
            every trainable parameter or ``probe_grad_names``: the forgetting prediction's
            input). ``None`` (default): only when a ForgettingRiskMonitor is attached, the one
            reader in the suite; without one a probe pass computes and keeps no weight-sized
            gradient (0.54 GB per probe set for a 135M model, all parameters probed).
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

    Lifecycle: a monitor reused for another ``fit`` re-binds to that fit's model and restarts
    (hooks moved, collector, probe sets and counters new; see
    :class:`~fisher_callbacks.callbacks._boundary.BoundaryCallback`); to continue a run, resume
    it from its checkpoint.

    What is monitored: the Q/K/V/O weights that train. On a ``peft`` LoRA model those are the
    adapters (``lora_B`` rows of Q/K/V and ``lora_A`` columns of O per head, the other factor
    shared by the heads of its projection: in the Fisher sums and the forgetting prediction, not
    in the per-head maps); frozen weights (a projection without adapter, a frozen layer) are left
    out with one warning and show as not monitored in the heatmaps; only when nothing monitored
    trains is it an error. The layout is resolved again at fit start, so a model compiled
    (``torch.compile``, names under ``_orig_mod.``), wrapped or frozen in the LightningModule's
    ``setup()``/``configure_model()`` is monitored as it trains.
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
        _check_arguments(locals())
        self._keep_arguments(FisherMonitor, locals())
        self.train_task = train_task
        if isinstance(reference_tasks, Mapping):
            self.reference_tasks: dict[str, DataLoader | None] = dict(reference_tasks)
        else:
            self.reference_tasks = dict.fromkeys(reference_tasks or ())
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
        self.loss_factor = 1.0  # training loss / assumed loss, measured on flagged steps
        self._loss_check: LossCheck | None = None
        self._captured: CapturedSum | None = None  # this step's captured sums, for the .grad check
        self._grad_checked = False  # the .grad check runs once per fit
        self.ema_entries = ema_entries
        self.probe_gradients = probe_gradients
        self._keep_probe_grads = probe_gradients is not False  # resolved at setup

        self.log_loss = True  # the probe losses are cross-entropies (False: a regression head's MSE)
        self.layout: AttentionLayout | None = None
        self.collector: FisherCollector | None = None
        self.capture: PerSampleGradientCapture | None = None
        self.skipped_steps = 0
        self.captured_steps = 0
        self.ema_updates = 0
        self.probe: dict[str, ProbeReading] = {}  # the latest pass of each reference task
        self._probe_step: int | None = None
        self._pending: dict[str, Any] | None = None
        self._pending_state: dict[str, Any] | None = None
        self._rng = SeededGenerator(seed)  # picklable (ddp_spawn); the torch.Generator is lazy
        self._failed = False
        self.probe_grad_names: set[str] | None = None  # None: every trainable parameter
        self._probe_batches: dict[str, list[dict[str, Any]]] = {}  # fixed probe samples (CPU)
        self._ema_step: int | None = None  # optimizer step of the last EMA update
        self._relay = WarningRelay("FisherMonitor")
        self._seen_tasks: set[str] = set()  # collector keys of the training tags seen
        self._warned_frozen: tuple[str, ...] = ()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(train_task=self.train_task)

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

    # ------------------------------------------------------------------ setup / teardown
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._begin_fit(stage)
        if self.probe_gradients is None:
            from .forgetting_monitor import ForgettingRiskMonitor  # it imports this module

            self._keep_probe_grads = any(isinstance(cb, ForgettingRiskMonitor) for cb in trainer.callbacks)
        if self.collector is not None:
            self.capture.attach()
            return
        try:
            for task, loader in self.reference_tasks.items():
                if loader is None:
                    self.reference_tasks[task] = _probe_loader(trainer, pl_module, task)
            self.loss_type = self.loss_type or infer_loss_type(pl_module)
            self._build(pl_module, self._resolve_layout(pl_module))
        except Exception as err:
            if self.required:
                raise
            self.layout = self.collector = self.capture = None
            self._relay.warn(f"the suite stays out of this fit: {err}")
            return
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None

    @property
    def relay(self) -> WarningRelay:
        """The suite's warning record: the other monitors take a :meth:`WarningRelay.view` of it,
        so every warning of the suite reaches the user once, from rank zero."""
        return self._relay

    def restrict_probe_gradients(self, names: set[str] | None) -> None:
        """Probe gradients over ``names`` only (``None``: every trainable parameter)."""
        self.probe_grad_names = None if names is None else set(names)

    @property
    def active(self) -> bool:
        """Whether the monitor is set up on a model (False before ``setup`` and when a monitor
        with ``required=False`` stayed out of the fit)."""
        return self.collector is not None

    def _restart(self) -> None:
        if self.capture is not None:
            self.capture.remove()  # never leave hooks on the previous fit's model
        relay = self._relay  # the other monitors hold views of it
        super()._restart()
        relay.reset()
        self._relay = relay

    def _resolve_layout(self, pl_module: pl.LightningModule) -> AttentionLayout:
        """The layout of what trains now; warns once (per set of names) about frozen weights."""
        layout = AttentionLayout.from_model(pl_module, include_bias=self.include_bias)
        layout, frozen = layout.trainable_only(pl_module)
        key = tuple(canonical_name(n) for n in frozen)
        if frozen and key != self._warned_frozen:
            self._warned_frozen = key
            self._relay.warn(frozen_message(frozen))
        return layout

    def _build(self, pl_module: pl.LightningModule, layout: AttentionLayout) -> None:
        self.layout = layout
        self.collector = FisherCollector(
            pl_module,
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
        self.capture = PerSampleGradientCapture(pl_module, self.layout).attach()

    def resolve(self, pl_module: pl.LightningModule) -> None:
        """Re-map the layout if the module changed since ``setup`` (compiled, LoRA-wrapped or
        frozen in the LightningModule's ``setup``/``configure_model``). Idempotent and cheap when
        nothing changed; called at fit start (the other monitors call it too, whatever the
        callback order). Stored state keeps its samples: names are matched through
        :func:`~fisher_callbacks.layouts.canonical_name`."""
        if self.collector is None:
            return
        params = dict(pl_module.named_parameters())
        names = self.layout.monitored_parameters()
        if all(n in params and params[n].requires_grad for n in names):
            return
        layout = self._resolve_layout(pl_module)
        if layout.monitored_parameters() == names:
            return
        state = self.collector.state_dict()
        self.capture.remove()
        self._build(pl_module, layout)
        self.collector.load_state_dict(_renamed_state(state, layout.monitored_parameters()))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.resolve(pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.log_memory(trainer, pl_module)

    def log_memory(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int]:
        """Log the suite's memory ledger (every attached monitor, a tensor counted once): a
        table on the ``fisher_callbacks`` logger (INFO) and ``fisher/memory_mb`` to every
        attached logger, at ``trainer.global_step``. Called once per fit, at train start (after
        every monitor's ``on_fit_start``: the anchors and first probe results exist).

        Returns:
            the ledger ``{f"{Monitor}/{group}": bytes}``.
        """
        owners = [cb for cb in trainer.callbacks if isinstance(cb, BoundaryCallback)]
        ledger = suite_ledger(owners, pl_module)
        if trainer.is_global_zero:
            log.info(
                "fisher_callbacks memory ledger at step %d:\n%s",
                trainer.global_step,
                format_ledger(ledger, trainable_bytes(pl_module)),
            )
            value = {"fisher/memory_mb": total_mb(ledger)}
            for logger in trainer.loggers:
                try:
                    logger.log_metrics(value, step=trainer.global_step)
                except Exception as err:
                    self._relay.warn(f"logging fisher/memory_mb to {type(logger).__name__} failed: {err!r}")
        return ledger

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.capture is not None:
            self.capture.remove()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Lightning skips teardown when fit raises: never leave hooks on the user's model.
        if self.capture is not None:
            self.capture.remove()

    # ------------------------------------------------------------------ training steps
    def is_flagged(self, step: int) -> bool:
        """Whether optimizer step ``step`` captures every sample."""
        return self.capture_every_n_steps > 0 and step % self.capture_every_n_steps == 0

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._pending = None
        if self._failed or self.capture is None:
            return
        if not isinstance(batch, Mapping) or "labels" not in batch:
            self._fail_once("training batches must be dicts with 'labels' for per-sample capture")
            return
        step = trainer.global_step
        size = batch["labels"].shape[0]
        tags = batch.get(self.task_key)
        if tags is not None:
            with contextlib.suppress(TypeError, ValueError):  # reported when the samples are filed
                names = _task_names(tags, size, self.train_task, self.task_key)
                self._seen_tasks.update(self.train_key(t) for t in names)
        if self.is_flagged(step):
            samples = None
        elif (
            self.ema_samples_per_step
            and step % self.ema_every_n_steps == 0
            and step != self._ema_step  # one EMA update per optimizer step, not per micro-batch
        ):
            k = min(self.ema_samples_per_step, size)
            samples = torch.randperm(size, generator=self._rng.generator)[:k].sort().values
        else:
            return
        scale = (
            reduction_scale(
                batch["labels"],
                self.loss_type,
                self.loss_reduction,
                accumulate_grad_batches=trainer.accumulate_grad_batches,
                loss_scale=_loss_scale(trainer),  # the scale this step's backward will use
            )
            / self.loss_factor
        )
        rows = torch.arange(size) if samples is None else samples
        flagged = samples is None
        ema = step != self._ema_step  # first micro-batch of this optimizer step
        if not flagged and not ema:
            return
        try:
            all_tasks = _task_names(tags, size, self.train_task, self.task_key)
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
        alone = ema and pl_module.automatic_optimization and not distributed()
        if flagged and alone and self.check_loss and not self._grad_checked:
            weight = torch.where(scale > 0, 1.0 / scale.clamp_min(1e-30), torch.zeros_like(scale))
            sink = self._captured = CapturedSum(ingest, weight)
        self.capture.arm(samples, scale=scale[rows], sink=sink, chunk=self._chunk(rows.numel()))
        if flagged and self.check_loss:
            self._arm_loss_check(pl_module, batch["labels"], scale)

    def _arm_loss_check(
        self, pl_module: pl.LightningModule, labels: torch.Tensor, scale: torch.Tensor
    ) -> None:
        """Hook the logits of this flagged step's forward (see :mod:`fisher_callbacks.loss_check`);
        not under ``torch.compile`` (a hook added per step would recompile the model)."""
        self._remove_loss_check()
        names = [n for n, _ in pl_module.named_modules()]
        if any("_orig_mod" in n for n in names):
            return
        # the Hugging Face model inside (what every training_step calls), else the module itself
        hf = [m for m in pl_module.modules() if getattr(getattr(m, "config", None), "model_type", None)]
        module = hf[0] if hf else pl_module
        self._loss_check = LossCheck(module, labels, self.loss_type, scale, self._loss_checked)

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

    def _chunk(self, captured: int) -> int:
        """Samples per chunk in the hooks: ``capture_chunk``, or as many as fit in 2 MB on CPU
        (a chunk read while it is in cache: one sample of a 135M model's projection; measured
        1.15x a plain step against 1.17x for 4 samples) and 64 MB on an accelerator (fewer,
        larger kernels)."""
        if self.capture_chunk is not None:
            return self.capture_chunk
        largest = max(math.prod(s) for s in self.collector.param_shapes.values()) * 4
        budget = (2 if self.collector._device.type == "cpu" else 64) * 2**20
        return max(1, min(captured, budget // max(largest, 1)))

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pending, self._pending = self._pending, None
        self._remove_loss_check()
        if pending is None or self.capture is None or not self.capture.armed:
            return
        try:
            self._ingest(trainer, pending)
            self._check_grad(pl_module)
        except Exception as err:
            self._fail_once(f"per-sample capture failed at step {pending['step']}: {err!r}")
        finally:
            self.capture.disarm()
            self._captured = None

    def _check_grad(self, pl_module: pl.LightningModule) -> None:
        """Once per fit: the monitored weights' ``.grad`` against the sum of the captured
        per-sample gradients (one dot product per projection): a loss term that bypasses the
        projections' outputs (a penalty on the weights themselves) is one warning."""
        captured, self._captured = self._captured, None
        if captured is None or not captured.sums:
            return
        params = dict(pl_module.named_parameters())
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

    def _ingest(self, trainer: pl.Trainer, pending: dict[str, Any]) -> None:
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

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # A step that never reached backward (skipped by the module) must not leave hooks armed.
        if self.capture is not None and self.capture.armed:
            self.capture.disarm()
        self._remove_loss_check()
        self._captured = None
        self._pending = None

    # ------------------------------------------------------------------ validation boundary
    def _boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.refresh(LightningHost(trainer, pl_module))
        self._log_scalars(trainer, pl_module)
        self._relay.flush()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._relay.flush()  # failures of the last steps (every rank calls it: a collective)

    def _log_scalars(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``fisher/{task}/trace``, ``/ema_trace`` (tasks with EMA steps only: a reference task's
        probe set has none, and a constant 0 chart says nothing), ``/num_samples``,
        ``/num_stored`` and ``fisher/skipped_steps`` (the same keys on every rank, identical
        values after the sync except ``num_stored``, the rank's own), at ``trainer.global_step``."""
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
        log_agreed(LightningHost(trainer, pl_module), values, self._relay)

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
        resumed run probes the same samples in the same order.

        Returns:
            A list of batch dicts (``input_ids`` ``[b, T]``, ``labels`` ``[b, T]``, ...).
        """
        if task not in self._probe_batches:
            batches, n = [], 0
            for batch in self.reference_tasks[task]:
                if self.probe_max_samples is not None and n >= self.probe_max_samples:
                    break
                batch = _to_device(batch, torch.device("cpu"))
                if self.probe_max_samples is not None:  # tensors and per-sample lists (ids) alike
                    batch = _head(batch, batch["labels"].shape[0], self.probe_max_samples - n)
                batches.append(batch)
                n += int(batch["labels"].shape[0]) if "labels" in batch else 0
            self._probe_batches[task] = batches
        return self._probe_batches[task]

    @isolated_rng()  # iterating a probe loader draws from the global RNG: not the run's
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
        pl_module, step = host.module, host.step
        self.collector.reset(task)
        params = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        if self.probe_grad_names is not None:
            params = {n: p for n, p in params.items() if n in self.probe_grad_names}
        if not self._keep_probe_grads:
            params = {}  # no reader: no weight-sized gradient (see ``probe_gradients``)
        if sum_params is not None:
            params = dict(sum_params)
        losses: list[torch.Tensor] = []
        total: dict[str, torch.Tensor] = {}
        try:
            # The fixed batches are drawn inside the try: a rank whose loader fails still joins
            # the reduction below (a collective), contributing nothing.
            source = self.probe_batches(task) if loader is None else loader
            self._probe_local(host, task, source, params, losses, total)
        except Exception as err:
            if not distributed():
                raise
            self._relay.warn(f"probe pass on {task!r} failed on this rank, which adds no sample: {err!r}")
            self.collector.reset(task)
            losses.clear()
            total.clear()
        local = torch.cat(losses) if losses else torch.zeros(0)
        local_losses, grad_sum, n = _reduce_probe(local, total, params)
        self.collector.sync([task])  # the probe Fisher of every rank's samples (no-op in one process)
        if n == 0:
            where = " on every rank" if distributed() else ""
            raise ValueError(f"probe set {task!r} is empty{where}")
        return ProbeReading(
            step=step,
            loss=float(local_losses.mean()),
            losses=local_losses,
            grad={name: g.detach().div_(n) for name, g in grad_sum.items()},  # in place: no copy
            n=n,
        )

    @isolated_rng()  # iterating a probe loader draws from the global RNG: not the run's
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
        pl_module, step = host.module, host.step
        self.resolve(pl_module)
        params = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        if self.probe_grad_names is not None:
            params = {n: p for n, p in params.items() if n in self.probe_grad_names}
        losses: list[torch.Tensor] = []
        total: dict[str, torch.Tensor] = {}
        forward = host.forward_module
        loss_type = self.loss_type or infer_loss_type(forward)
        try:
            with _probe_mode(pl_module):
                for batch in self.probe_batches(task):
                    batch = _to_device(batch, pl_module.device)
                    logits = forward_logits(forward, batch)
                    per_sample, counts = per_sample_loss(logits, batch["labels"], loss_type)
                    self.log_loss = not is_squared_error(logits, batch["labels"], loss_type)
                    per_sample = per_sample[counts > 0]  # a sample without targets has no loss
                    if per_sample.numel() == 0:
                        continue
                    grads = torch.autograd.grad(per_sample.sum(), list(params.values()), allow_unused=True)
                    for (name, p), g in zip(params.items(), grads):
                        g = torch.zeros_like(p) if g is None else g.detach()
                        if name in total:
                            total[name].add_(g)  # in place: one summed copy, never two
                        else:
                            total[name] = _owned(g)
                    losses.append(per_sample.detach().float().cpu())
        except Exception as err:
            if not distributed():
                raise
            self._relay.warn(f"probe gradient of {task!r} failed on this rank, which adds no sample: {err!r}")
            losses.clear()
            total.clear()
        local = torch.cat(losses) if losses else torch.zeros(0)
        all_losses, grad_sum, n = _reduce_probe(local, total, params)
        if n == 0:
            raise ValueError(f"probe set {task!r} has no sample with a target")
        return ProbeReading(
            step=step,
            loss=float(all_losses.mean()),
            losses=all_losses,
            grad={name: g.div_(n) for name, g in grad_sum.items()},  # in place: no copy
            n=n,
        )

    def _probe_local(
        self,
        host: Host,
        task: str,
        loader: DataLoader,
        params: Mapping[str, torch.Tensor],
        losses: list[torch.Tensor],
        total: dict[str, torch.Tensor],
    ) -> None:
        """This rank's probe pass: per-sample gradients into the collector under ``task``,
        per-sample losses appended to ``losses`` and the summed gradients into ``total``."""
        n, pl_module = 0, host.module
        with _probe_mode(pl_module):
            for batch in loader:
                if self.probe_max_samples is not None and n >= self.probe_max_samples:
                    break
                batch = _to_device(batch, pl_module.device)
                if self.probe_max_samples is not None:
                    batch = _head(batch, batch["labels"].shape[0], self.probe_max_samples - n)
                ids = batch.get(self.sample_id_key)
                size = batch["labels"].shape[0]
                ids = None if ids is None else _as_list(ids, size, None, self.sample_id_key)
                # Streamed into the collector inside the hooks (chunked), unless a sketch
                # store has no whitening yet (no captured step before this boundary).
                ingest = None
                if not self.collector.needs_whitening:
                    has_target = (target_token_counts(batch["labels"], self.loss_type) > 0).tolist()
                    ingest = self.collector.ingest([task if ok else None for ok in has_target], ids)
                res: ProbeResult = probe_pass(
                    pl_module,
                    batch,
                    self.layout,
                    loss_type=self.loss_type,
                    fisher_type=self.fisher_type,
                    generator=self.collector._generator,
                    sum_params=params,
                    forward_model=host.forward_module,
                    capture=self.capture if self.capture.attached else None,
                    sink=ingest,
                    chunk=None if ingest is None else self._chunk(size),
                )
                self.log_loss = res.log_loss
                has_target = res.counts > 0  # a sample without targets has no gradient
                if not bool(has_target.all()):
                    rows = torch.nonzero(has_target).flatten()
                    res.grads = {k: g.index_select(0, rows.to(g.device)) for k, g in res.grads.items()}
                    res.losses = res.losses[has_target]
                    if ids is not None:
                        ids = [ids[r] for r in rows.tolist()]
                if res.losses.numel() == 0:
                    continue
                if ingest is not None:
                    ingest.commit()
                else:
                    self.collector.add_gradients(res.grads, task, ids)
                losses.append(res.losses.float().cpu())
                for name, g in res.summed.items():
                    if name in total:
                        total[name].add_(g)  # in place: one summed copy, never two
                    else:
                        total[name] = _owned(g)
                n += res.losses.shape[0]

    # ------------------------------------------------------------------ memory
    @override
    def memory_ledger(self, seen: set | None = None) -> dict[str, int]:
        """``{group: bytes}``: the collector's groups (``collector.fisher_sum[task]``, ``.ema``,
        ``.store.*``), the probe results (``probe``: per reference task its mean gradient over
        the probed parameters and its losses) and the fixed probe batches (``probe_batches``)."""
        seen = set() if seen is None else seen
        out: dict[str, int] = {}
        if self.collector is not None:
            out.update({f"collector.{k}": v for k, v in self.collector.memory_ledger(seen).items()})
        out.update(attribute_ledger(self, seen, skip=("collector",)))
        return out

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        collector = self.collector
        return {
            "collector": None if collector is None else collector.state_dict(self.checkpoint_store),
            "skipped_steps": self.skipped_steps,
            "captured_steps": self.captured_steps,
            "ema_updates": self.ema_updates,
            "loss_factor": self.loss_factor,
            "generator": self._rng.get_state(),
            "probe_batches": self._probe_batches,
            **self._boundary_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
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
        self._probe_batches = dict(state.get("probe_batches", {}))
        self._load_boundary_state(state)

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


def _reduce_probe(
    losses: torch.Tensor, total: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Per-sample losses ``[n]`` (all ranks, rank order), summed gradients and the sample count
    over every rank; a rank without samples gives zeros (``total`` may lack names). Local in one
    process, else one ``all_gather_object`` and one ``all_reduce`` of a flat buffer."""
    if not distributed():
        return losses, dict(total), int(losses.numel())
    dist = torch.distributed
    gathered: list[list[float] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, losses.tolist())
    all_losses = torch.tensor([v for rank in gathered for v in (rank or [])], dtype=torch.float32)
    if not params:
        return all_losses, {}, int(all_losses.numel())
    device = _collective_device()
    flat = torch.cat(
        [
            (total[name] if name in total else torch.zeros_like(p)).detach().float().reshape(-1).to(device)
            for name, p in params.items()
        ]
    )  # [sum of numel], in the (rank-independent) parameter order
    dist.all_reduce(flat)
    out, offset = {}, 0
    for name, p in params.items():
        out[name] = flat[offset : offset + p.numel()].view(p.shape).to(p.device)
        offset += p.numel()
    return all_losses, out, int(all_losses.numel())


def _owned(g: torch.Tensor) -> torch.Tensor:
    """``g`` itself when it is a fresh, dense tensor (what autograd returns for a weight), so a
    sum can grow in place without a copy; a copy when it is a view (e.g. an expanded gradient)."""
    return g if g._base is None and g.is_contiguous() else g.clone()


def _loss_scale(trainer: pl.Trainer) -> float:
    """The AMP GradScaler's current scale (1.0 without one): the backward just run used it."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())


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


def _as_list(value: Any, n: int, default: Any, key: str = "entry") -> list:
    """Per-sample values of a batch entry: ``n`` copies of a scalar (or ``default`` for ``None``);
    a tensor is flattened first, so ``[B]`` and ``[B, 1]`` id tensors give the same ``B`` ids.
    Any other length than ``n`` is a ``ValueError`` naming ``key`` and the batch size (one tag
    too many would otherwise file every sample under its neighbour's task)."""
    if value is None:
        return [default] * n
    if torch.is_tensor(value):
        value = value.flatten().tolist() if value.dim() else value.item()
    if isinstance(value, (str, int)):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(
            f"batch[{key!r}] has {len(values)} entries for a batch of {n} samples (the batch size "
            "of 'labels'): one per sample, in batch order"
        )
    return values


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


def _head(batch: Mapping[str, Any], n: int, room: int) -> dict[str, Any]:
    """The first ``room`` samples of a batch of ``n``: tensors and per-sample lists (ids, tags)
    are cut together; other entries are kept as they are."""
    return {
        k: v[:room] if torch.is_tensor(v) or (isinstance(v, (list, tuple)) and len(v) == n) else v
        for k, v in batch.items()
    }


@contextlib.contextmanager
def _probe_mode(pl_module: pl.LightningModule) -> Iterator[None]:
    """Eval mode with autograd on (also inside Lightning's validation inference mode); the train
    flag is restored on the way out, also when the block raises."""
    was_training = pl_module.training
    pl_module.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        pl_module.train(was_training)


def find_fisher_monitor(trainer: pl.Trainer, given: FisherMonitor | None, who: str) -> FisherMonitor:
    """``given``, or the FisherMonitor attached to ``trainer`` (a clear error when there is none)."""
    if given is not None:
        return given
    found = [cb for cb in trainer.callbacks if isinstance(cb, FisherMonitor)]
    if len(found) != 1:
        raise ValueError(
            f"{who} needs a FisherMonitor: pass fisher_monitor=... or attach exactly one "
            f"FisherMonitor to the Trainer (found {len(found)})"
        )
    return found[0]


def _probe_loader(trainer: pl.Trainer, pl_module: pl.LightningModule, task: str) -> DataLoader:
    for owner in (getattr(trainer, "datamodule", None), pl_module):
        fn = getattr(owner, "probe_dataloader", None)
        if callable(fn):
            return fn(task)
    raise ValueError(
        f"FisherMonitor: no DataLoader for reference task {task!r}; pass "
        "reference_tasks={task: DataLoader} or define probe_dataloader(task) on the datamodule "
        "or the LightningModule"
    )


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Mapping):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    raise TypeError(f"probe batches must be dicts, got {type(batch).__name__}")

"""FisherMonitor: the Lightning adapter of :class:`~fisher_callbacks.engine.fisher.FisherEngine`.

Per-sample capture on flagged training steps, EMA Fisher on the others, probe sets at validation
boundaries; the hooks build a :class:`~fisher_callbacks.callbacks._host.LightningHost` and call the
engine.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from ..engine.fisher import FisherEngine
from ._boundary import BoundaryCallback
from ._host import LightningHost


class FisherMonitor(FisherEngine, BoundaryCallback):
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
    use ``strategy="ddp"``. Under FSDP2 (``ModelParallelStrategy``, or ``fully_shard`` by hand)
    the hooks see the local batch and each projection's whole activations as under DDP, and the
    Fisher sums, per-entry EMA and a sketch store's whitening are kept as this rank's rows of the
    weights (``docs/distributed.md``; tested equal to DDP on 2 CPU processes).

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

    The work is :class:`~fisher_callbacks.engine.fisher.FisherEngine`'s (trainer-neutral, the
    same arguments); this class is its Lightning adapter.

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

    @property
    def state_key(self) -> str:
        return self._generate_state_key(train_task=self.train_task)

    @property
    def _arguments(self) -> tuple[type, dict[str, Any]]:
        """What :class:`BoundaryCallback` restarts a reused monitor from (see :meth:`_restart`)."""
        return (FisherEngine, self._init_arguments)

    def _restart(self) -> None:
        self.restart()  # hooks off the previous fit's model, the relay kept for its readers

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._begin_fit(stage)
        from .forgetting_monitor import ForgettingRiskMonitor  # it imports this module

        wanted = any(isinstance(cb, ForgettingRiskMonitor) for cb in trainer.callbacks)
        self.prepare(LightningHost(trainer, pl_module), probe_gradients_wanted=wanted)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.resolve(pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        owners = [cb for cb in trainer.callbacks if isinstance(cb, BoundaryCallback)]
        self.log_memory(LightningHost(trainer, pl_module), owners)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.batch_start(LightningHost(trainer, pl_module), batch)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.after_backward(LightningHost(trainer, pl_module))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.batch_end()

    def _boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.boundary(LightningHost(trainer, pl_module))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self.finish()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.release()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.release()  # Lightning skips teardown when fit raises: never leave hooks on the model

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**FisherEngine.state_dict(self), **self._boundary_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        FisherEngine.load_state_dict(self, state_dict)
        self._load_boundary_state(state_dict)


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

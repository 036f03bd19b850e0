"""FisherMonitor: per-sample capture on flagged training steps, EMA Fisher on the others, probe sets.

Thin: the capture is :class:`~fisher_callbacks.capture.PerSampleGradientCapture`, the storage and
Fisher math :class:`~fisher_callbacks.fisher.FisherCollector`, the rescaling
:func:`~fisher_callbacks.losses.reduction_scale`.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from typing_extensions import override

from ..capture import PerSampleGradientCapture, ProbeResult, probe_pass
from ..fisher import FisherCollector
from ..layouts import AttentionLayout
from ..loggers import log_metrics
from ..losses import LossType, infer_loss_type, reduction_scale
from ..store import DEFAULT_SKETCH_DIM

log = logging.getLogger("fisher_callbacks")


class FisherMonitor(Callback):
    """Collect per-sample gradients and Fisher information of the Q/K/V/O weights while training.

    On a flagged step (every ``capture_every_n_steps`` optimizer steps) the per-sample gradients
    come from the TRAINING backward itself (hooks; no second forward), rescaled from the training
    loss (``loss_reduction``, ``accumulate_grad_batches``, the AMP loss scale) to each sample's
    own mean-loss gradient, tagged with each sample's task (``batch[task_key]`` or ``train_task``)
    and true id (``batch[sample_id_key]``), and stored (reservoir within ``gradient_memory_mb``).
    On the other steps only ``ema_samples_per_step`` random samples of the batch are captured to
    update the EMA Fisher (an unbiased estimate of the batch mean of ``g_i**2`` at a fraction of
    the cost). The EMA takes one step per optimizer step (from the first micro-batch under
    gradient accumulation), so ``ema_decay`` means the same whatever ``accumulate_grad_batches``.
    Steps whose captured gradients are not finite (AMP overflow) are skipped and counted in
    ``skipped_steps``.

    ``reference_tasks={"general": dataloader}`` are probe sets: at each validation boundary (never
    during the sanity check) every probe sample's gradient and loss are computed with
    ``torch.autograd.grad`` on the LightningModule itself (never ``.grad``, never the DDP
    wrapper), in eval mode, restoring the mode after. The reference Fisher is refreshed at each
    boundary (the Fisher at the current weights). Batches must be dicts with ``input_ids``,
    ``labels`` (and optionally ``attention_mask``, ``task``, ``sample_id``) that the wrapped Hugging
    Face model accepts.

    With ``fisher_type="true"`` probe passes sample labels from the model; the training-step
    capture always sees the training labels (empirical Fisher).

    Under DDP each rank captures its own samples (hooks are local, so exact); at validation
    boundaries the Fisher sums are all-reduced (``FisherCollector.sync``), so every rank holds the
    Fisher of all samples. FSDP works the same way for the hooks (they see the local shard of the
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
        ema_every_n_steps: EMA update period on non-flagged steps.
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
        ema_every_n_steps: int = 1,
        probe_max_samples: int | None = None,
        loss_type: LossType | None = None,
        seed: int = 0,
        store: str = "auto",
        sketch_dim: int = DEFAULT_SKETCH_DIM,
        min_samples_for_fisher: int = 10,
    ) -> None:
        if capture_every_n_steps < 0 or ema_samples_per_step < 0 or ema_every_n_steps < 1:
            raise ValueError(
                "capture_every_n_steps and ema_samples_per_step must be >= 0, ema_every_n_steps >= 1"
            )
        if fisher_type not in ("empirical", "true"):
            raise ValueError(f"fisher_type must be 'empirical' or 'true', got {fisher_type!r}")
        reduction_scale(torch.ones(1, 2, dtype=torch.long), "causal_lm", loss_reduction)  # validates
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
        self.store = store
        self.sketch_dim = sketch_dim
        self.min_samples_for_fisher = min_samples_for_fisher

        self.layout: AttentionLayout | None = None
        self.collector: FisherCollector | None = None
        self.capture: PerSampleGradientCapture | None = None
        self.skipped_steps = 0
        self.captured_steps = 0
        self.ema_updates = 0
        self.probe: dict[str, dict[str, Any]] = {}  # task -> {"step", "loss", "grad", ...}
        self._probe_step: int | None = None
        self._pending: dict[str, Any] | None = None
        self._pending_state: dict[str, Any] | None = None
        self._generator = torch.Generator().manual_seed(seed)
        self._failed = False
        self.probe_grad_names: set[str] | None = None  # None: every trainable parameter
        self._ema_step: int | None = None  # optimizer step of the last EMA update

    @property
    def state_key(self) -> str:
        return self._generate_state_key(train_task=self.train_task)

    # ------------------------------------------------------------------ setup / teardown
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for task, loader in self.reference_tasks.items():
            if loader is None:
                self.reference_tasks[task] = _probe_loader(trainer, pl_module, task)
        if self.collector is not None:
            self.capture.attach()
            return
        self.layout = AttentionLayout.from_model(pl_module)
        self.loss_type = self.loss_type or infer_loss_type(pl_module)
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
        )
        self.capture = PerSampleGradientCapture(pl_module, self.layout).attach()
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None

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
        if self.is_flagged(step):
            samples = None
        elif (
            self.ema_samples_per_step
            and step % self.ema_every_n_steps == 0
            and step != self._ema_step  # one EMA update per optimizer step, not per micro-batch
        ):
            k = min(self.ema_samples_per_step, size)
            samples = torch.randperm(size, generator=self._generator)[:k].sort().values
        else:
            return
        scale = reduction_scale(
            batch["labels"],
            self.loss_type,
            self.loss_reduction,
            accumulate_grad_batches=trainer.accumulate_grad_batches,
            loss_scale=_loss_scale(trainer),  # the scale this step's backward will use
        )
        rows = torch.arange(size) if samples is None else samples
        self._pending = {
            "flagged": samples is None,
            "rows": rows,
            "valid": scale > 0,
            "batch": batch,
            "step": step,
        }
        self.capture.arm(samples, scale=scale[rows])

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pending, self._pending = self._pending, None
        if pending is None or self.capture is None or not self.capture.armed:
            return
        try:
            self._ingest(trainer, pending)
        except Exception as err:
            self.capture.disarm()
            self._fail_once(f"per-sample capture failed at step {pending['step']}: {err!r}")

    def _ingest(self, trainer: pl.Trainer, pending: dict[str, Any]) -> None:
        batch, rows, valid = pending["batch"], pending["rows"], pending["valid"]
        labels = batch["labels"]
        nonfinite = self.capture.nonfinite  # checked in the hooks on the small factors
        grads = self.capture.pop()  # already rescaled inside the hooks
        if pending["flagged"] and self.collector.needs_whitening:
            # Every rank reaches this at the same (first flagged) step: a collective.
            usable = bool(grads) and not nonfinite
            self.collector.initial_whitening(grads if usable else None, valid[rows] if usable else None)
        if not grads:
            return
        # AMP overflow: the whole step is skipped.
        if nonfinite:
            self.skipped_steps += 1
            log.debug("fisher_callbacks: step %d skipped (non-finite gradients)", pending["step"])
            return
        size = labels.shape[0]
        all_tasks = _as_list(batch.get(self.task_key), size, self.train_task)
        tasks = [all_tasks[r] for r in rows.tolist()]
        ids = batch.get(self.sample_id_key)
        if ids is not None:
            all_ids = _as_list(ids, size, None)
            ids = [all_ids[r] for r in rows.tolist()]
        keep = valid[rows].tolist()
        ema = pending["step"] != self._ema_step  # first micro-batch of this optimizer step
        for task in dict.fromkeys(tasks):
            sel = [k for k, (t, ok) in enumerate(zip(tasks, keep)) if t == task and ok]
            if not sel:
                continue
            if len(sel) == len(tasks):  # one task, every sample valid: no copy
                sub, sub_ids = grads, ids
            else:
                index = torch.tensor(sel, device=next(iter(grads.values())).device)
                sub = {n: g.index_select(0, index) for n, g in grads.items()}
                sub_ids = None if ids is None else [ids[k] for k in sel]
            if pending["flagged"]:
                self.collector.add_gradients(sub, task, sub_ids, update_ema=ema, check_finite=False)
            elif ema:
                self.collector.update_ema_from_gradients(sub, task, check_finite=False)
        if ema:  # first micro-batch of the optimizer step: count the step once
            self.captured_steps += int(pending["flagged"])
            self.ema_updates += 1
            self._ema_step = pending["step"]

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # A step that never reached backward (skipped by the module) must not leave hooks armed.
        if self.capture is not None and self.capture.armed:
            self.capture.disarm()
        self._pending = None

    # ------------------------------------------------------------------ validation boundary
    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.refresh(trainer, pl_module)
        self._log_scalars(trainer, pl_module)

    def _log_scalars(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``fisher/{task}/trace``, ``/ema_trace`` (tasks with EMA steps only: a reference task's
        probe set has none, and a constant 0 chart says nothing), ``/num_samples``,
        ``/num_stored`` and ``fisher/skipped_steps`` (identical on every rank after the sync), at
        ``trainer.global_step``."""
        if self.collector is None:
            return
        values: dict[str, float] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for task in self.collector.tasks:
                fisher = self.collector.fisher(task)
                values[f"fisher/{task}/trace"] = sum(float(f.sum()) for f in fisher.values())
                if self.collector.ema_steps(task) > 0:
                    ema = self.collector.fisher_ema(task)
                    values[f"fisher/{task}/ema_trace"] = sum(float(f.sum()) for f in ema.values())
                values[f"fisher/{task}/num_samples"] = float(self.collector.num_samples(task))
                values[f"fisher/{task}/num_stored"] = float(self.collector.num_stored(task))
        values["fisher/skipped_steps"] = float(self.skipped_steps)
        log_metrics(trainer, pl_module, {k: v for k, v in values.items() if math.isfinite(v)})

    def refresh(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run the probe passes and sync the Fisher across ranks, once per global step.

        Idempotent within a step, so the other monitors call it whatever the callback order.
        """
        if self.collector is None or self._probe_step == trainer.global_step:
            return
        self._probe_step = trainer.global_step
        self.collector.sync([t for t in self.collector.tasks if t not in self.reference_tasks])
        self.collector.freeze_whitening()  # sketch store: the probe sets use this boundary's Fisher
        for task, loader in self.reference_tasks.items():
            try:
                self.probe[task] = self.run_probe(pl_module, task, loader, trainer.global_step)
            except Exception as err:
                self._fail_once(f"probe pass on {task!r} failed: {err!r}", keep_capturing=True)

    def run_probe(
        self,
        pl_module: pl.LightningModule,
        task: str,
        loader: DataLoader,
        step: int,
        sum_params: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """Per-sample probe pass over ``loader``: refreshes ``task`` in the collector.

        Returns:
            ``{"step", "loss" (mean of per-sample losses), "losses" [n], "grad"
            (``{name: mean gradient}`` over all trainable parameters, or over
            ``probe_grad_names`` when a monitor restricted it), "n"}``.
        """
        self.collector.reset(task)
        params = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        if self.probe_grad_names is not None:
            params = {n: p for n, p in params.items() if n in self.probe_grad_names}
        if sum_params is not None:
            params = dict(sum_params)
        was_training = pl_module.training
        losses, total, n = [], {}, 0
        pl_module.eval()
        try:
            with torch.inference_mode(False), torch.enable_grad():
                for batch in loader:
                    if self.probe_max_samples is not None and n >= self.probe_max_samples:
                        break
                    batch = _to_device(batch, pl_module.device)
                    if self.probe_max_samples is not None:
                        room = self.probe_max_samples - n
                        batch = {k: v[:room] if torch.is_tensor(v) else v for k, v in batch.items()}
                    res: ProbeResult = probe_pass(
                        pl_module,
                        batch,
                        self.layout,
                        loss_type=self.loss_type,
                        fisher_type=self.fisher_type,
                        generator=self.collector._generator,
                        sum_params=params,
                        forward_model=_forward_module(pl_module),
                    )
                    ids = batch.get(self.sample_id_key)
                    has_target = res.counts > 0  # a sample without targets has no gradient
                    if not bool(has_target.all()):
                        rows = torch.nonzero(has_target).flatten()
                        res.grads = {k: g.index_select(0, rows.to(g.device)) for k, g in res.grads.items()}
                        res.losses = res.losses[has_target]
                        if ids is not None:
                            all_ids = _as_list(ids, len(has_target), None)
                            ids = [all_ids[r] for r in rows.tolist()]
                    if res.losses.numel() == 0:
                        continue
                    self.collector.add_gradients(res.grads, task, ids)
                    losses.append(res.losses.float().cpu())
                    for name, g in res.summed.items():
                        total[name] = total[name] + g if name in total else g.clone()
                    n += res.losses.shape[0]
        finally:
            pl_module.train(was_training)
        if n == 0:
            raise ValueError(f"probe set {task!r} is empty")
        return {
            "step": step,
            "losses": torch.cat(losses),
            "loss": float(torch.cat(losses).mean()),
            "grad": {name: g.detach() / n for name, g in total.items()},
            "n": n,
        }

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "collector": None if self.collector is None else self.collector.state_dict(),
            "skipped_steps": self.skipped_steps,
            "captured_steps": self.captured_steps,
            "ema_updates": self.ema_updates,
            "generator": self._generator.get_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.collector is None:
            self._pending_state = state_dict
        else:
            self._apply_state(state_dict)

    def _apply_state(self, state: dict[str, Any]) -> None:
        if state.get("collector") is not None:
            self.collector.load_state_dict(state["collector"])
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
                # Every rank loads rank 0's checkpoint: keep the synced totals, but only rank 0
                # keeps the samples added since the last sync, or the next sync counts them twice.
                self.collector.drop_unsynced()
        self.skipped_steps = state.get("skipped_steps", 0)
        self.captured_steps = state.get("captured_steps", 0)
        self.ema_updates = state.get("ema_updates", 0)
        if "generator" in state:
            self._generator.set_state(state["generator"])

    def _fail_once(self, message: str, keep_capturing: bool = False) -> None:
        if not keep_capturing:
            self._failed = True
        rank_zero_warn(f"FisherMonitor: {message}; training continues")


# ---------------------------------------------------------------------- helpers
def _loss_scale(trainer: pl.Trainer) -> float:
    """The AMP GradScaler's current scale (1.0 without one): the backward just run used it."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())


def _as_list(value: Any, n: int, default: Any) -> list:
    if value is None:
        return [default] * n
    if torch.is_tensor(value):
        value = value.tolist()
    if isinstance(value, (str, int)):
        return [value] * n
    return list(value)


def _forward_module(pl_module: pl.LightningModule) -> torch.nn.Module:
    """``pl_module`` if it defines ``forward``, else the Hugging Face model inside it."""
    if type(pl_module).forward is not pl.LightningModule.forward:
        return pl_module
    for module in pl_module.modules():
        if module is not pl_module and getattr(getattr(module, "config", None), "model_type", None):
            return module
    raise TypeError(
        f"{type(pl_module).__name__} defines no forward and wraps no Hugging Face model: probe "
        "passes need one of them to compute logits"
    )


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

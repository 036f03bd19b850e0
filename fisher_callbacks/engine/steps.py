"""The per-sample capture of training micro-batches: which steps and samples are captured (flagged
steps, the EMA cadence), their per-sample factors, filing into the collector, the loss check at the
logits and the once-per-fit ``.grad`` check."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .._rng import SeededGenerator
from ..loss_check import FACTOR_TOL, RESIDUAL_TOL, CapturedSum, LossCheck
from ..losses import reduction_scale
from ..memory import attribute_ledger
from .host import Host
from .probe import _as_list
from .ranks import distributed

if TYPE_CHECKING:
    from .fisher import FisherEngine

log = logging.getLogger("fisher_callbacks")


class StepCapture:
    """The training-step side of one :class:`~fisher_callbacks.engine.fisher.FisherEngine`.

    Reads the engine's collector, capture hooks and settings at each call; keeps the step
    counters (``skipped_steps``, ``captured_steps``, ``ema_updates``), the measured
    ``loss_factor``, the subsampling RNG, the task keys seen in training batches, and whether
    capture stopped after an error (``failed``).
    """

    def __init__(self, engine: FisherEngine) -> None:
        self.engine = engine
        self.rng = SeededGenerator(engine.seed)  # picklable (ddp_spawn); the torch.Generator is lazy
        self.loss_factor = 1.0  # training loss / assumed loss, measured on flagged steps
        self.skipped_steps = 0
        self.captured_steps = 0
        self.ema_updates = 0
        self.failed = False
        self.seen_tasks: set[str] = set()  # collector keys of the training tags seen
        self._pending: dict[str, Any] | None = None
        self._loss_check: LossCheck | None = None
        self._captured: CapturedSum | None = None  # this step's captured sums, for the .grad check
        self._grad_checked = False  # the .grad check runs once per fit
        self._ema_step: int | None = None  # optimizer step of the last EMA update
        self._step: int | None = None  # optimizer step of the last micro-batch (sharded fold)
        self._fold_due = False  # the last step added whole sums a sharded collector folds

    def start(self, host: Host, batch: Any, scale: torch.Tensor | None = None) -> None:
        """Before a training micro-batch's forward: arm the capture when the step is flagged
        (every sample) or an EMA step (``ema_samples_per_step`` random samples).

        ``scale``: ``[B]`` the per-sample factor of this micro-batch's backward (what
        :func:`~fisher_callbacks.losses.reduction_scale` gives, accumulation and the AMP loss
        scale included); ``None``: computed from ``loss_reduction``, ``host.accumulate`` and
        ``host.loss_scale()``. The measured ``loss_factor`` divides it in both cases.
        """
        self._pending = None
        engine = self.engine
        if engine.collector is not None and engine.collector.shards.sharded and host.step != self._step:
            self._fold(host.step)
        if self.failed or engine.capture is None:
            return
        if not isinstance(batch, Mapping) or "labels" not in batch:
            self._fail("training batches must be dicts with 'labels' for per-sample capture")
            return
        step, size = host.step, batch["labels"].shape[0]
        tags = batch.get(engine.task_key)
        if tags is not None:
            with contextlib.suppress(TypeError, ValueError):  # reported when the samples are filed
                names = _task_names(tags, size, engine.train_task, engine.task_key)
                self.seen_tasks.update(engine.train_key(t) for t in names)
        if engine.is_flagged(step):
            samples = None
        elif engine.ema_samples_per_step and step % engine.ema_every_n_steps == 0 and step != self._ema_step:
            # one EMA update per optimizer step, not per micro-batch
            k = min(engine.ema_samples_per_step, size)
            samples = torch.randperm(size, generator=self.rng.generator)[:k].sort().values
        else:
            return
        if scale is None:
            labels, loss_scale = batch["labels"], host.loss_scale()  # the scale this backward uses
            scale = reduction_scale(
                labels, engine.loss_type, engine.loss_reduction, host.accumulate, loss_scale
            )
        elif tuple(scale.shape) != (size,):
            raise ValueError(
                f"scale must have shape [{size}] (one factor per sample), got {tuple(scale.shape)}"
            )
        self._arm(host, batch, samples, scale.float() / self.loss_factor)

    def _fold(self, step: int) -> None:
        """First micro-batch of optimizer step ``step`` under FSDP2: the whole sums (and
        per-entry EMA steps) the last step added are synced into this rank's blocks, the whole
        Fisher of the last boundary is freed and a sketch store's whitening kept as this rank's
        rows, gathered whole again when ``step`` is captured. Decided by the step numbers alone,
        so every rank joins the collectives, whatever its capture did."""
        engine, collector = self.engine, self.engine.collector
        if self._fold_due:
            collector.sync(materialise=False)
        collector.release_whole()
        flagged = engine.is_flagged(step)
        ema = engine.ema_samples_per_step and step % engine.ema_every_n_steps == 0
        self._fold_due = flagged or bool(ema and collector.ema_entries)
        if flagged:  # a sketch store's whitening, whole while this step sketches
            collector.gather_whitening()
        self._step = step

    def _arm(
        self, host: Host, batch: Mapping[str, Any], samples: torch.Tensor | None, scale: torch.Tensor
    ) -> None:
        """Open this micro-batch's ingest and arm the hooks (and the loss check) on ``samples``
        (``None``: every sample, a flagged step)."""
        engine, step, size = self.engine, host.step, batch["labels"].shape[0]
        rows = torch.arange(size) if samples is None else samples
        flagged = samples is None
        ema = step != self._ema_step  # first micro-batch of this optimizer step
        if not flagged and not ema:
            return
        try:
            key = engine.sample_id_key
            all_tasks = _task_names(batch.get(engine.task_key), size, engine.train_task, engine.task_key)
            valid = (scale > 0).tolist()
            tasks = [engine.train_key(all_tasks[r]) if valid[r] else None for r in rows.tolist()]
            ids = None
            if flagged and batch.get(key) is not None:
                all_ids = _as_list(batch[key], size, None, key)
                ids = [all_ids[r] for r in rows.tolist()]
            ingest = engine.collector.ingest(tasks, ids, fisher=flagged, ema=ema, store=flagged)
        except Exception as err:
            self._fail(f"per-sample capture failed at step {step}: {err!r}")
            return
        self._pending = {"flagged": flagged, "ema": ema, "ingest": ingest, "step": step}
        sink, self._captured = ingest, None
        # .grad holds this backward alone: first micro-batch, automatic optimization, one process
        # (DDP averages .grad during the backward)
        alone = ema and host.automatic_optimization and not distributed()
        if flagged and alone and engine.check_loss and not self._grad_checked:
            weight = torch.where(scale > 0, 1.0 / scale.clamp_min(1e-30), torch.zeros_like(scale))
            sink = self._captured = CapturedSum(ingest, weight)
        engine.capture.arm(samples, scale=scale[rows], sink=sink, chunk=engine.chunk_size(rows.numel()))
        if flagged and engine.check_loss:
            self._arm_loss_check(host.module, batch["labels"], scale)

    def _arm_loss_check(self, module: torch.nn.Module, labels: torch.Tensor, scale: torch.Tensor) -> None:
        """Hook the logits of this flagged step's forward (see :mod:`fisher_callbacks.loss_check`);
        not under ``torch.compile`` (a hook added per step would recompile the model)."""
        self.remove_loss_check()
        if any("_orig_mod" in n for n, _ in module.named_modules()):
            return
        # the Hugging Face model inside (what every training step calls), else the module itself
        hf = [m for m in module.modules() if getattr(getattr(m, "config", None), "model_type", None)]
        self._loss_check = LossCheck(
            hf[0] if hf else module, labels, self.engine.loss_type, scale, self._loss_checked
        )

    def remove_loss_check(self) -> None:
        """Remove the logits hook of a flagged step, if one is on the model."""
        if self._loss_check is not None:
            self._loss_check.remove()
            self._loss_check = None

    def _loss_checked(self, factor: float, residual: float) -> None:
        """Inside the backward, before the monitored projections: rescale or warn."""
        engine = self.engine
        if not math.isfinite(factor) or engine.capture is None:
            return
        if residual > RESIDUAL_TOL:
            engine.relay.warn(
                f"the training loss is not the per-sample loss that loss_reduction="
                f"{engine.loss_reduction!r} assumes: {residual:.0%} of its gradient at the logits is "
                "explained by no per-sample loss (an auxiliary term? label smoothing?); the "
                "captured per-sample gradients include that part"
            )
        elif abs(factor - 1.0) > FACTOR_TOL:
            engine.capture.rescale(1.0 / factor)
            self.loss_factor *= factor
            if self._captured is not None:
                self._captured.weight *= factor  # 1 / s_i follows the rescaled s_i
            engine.relay.warn(
                f"the training loss is {self.loss_factor:.4g} x the per-sample loss that "
                f"loss_reduction={engine.loss_reduction!r} assumes (a weighted loss?): captured "
                f"gradients are divided by {self.loss_factor:.4g} from this step on"
            )

    def after_backward(self, host: Host) -> None:
        """After the micro-batch's backward: file what the hooks captured (or count a
        non-finite step as skipped) and, once per fit, check ``.grad`` against it."""
        pending, self._pending = self._pending, None
        self.remove_loss_check()
        capture = self.engine.capture
        if pending is not None and capture is not None and capture.error is not None:
            error, capture.error = capture.error, None  # a hook failed (gradients left as they were)
            capture.disarm()
            self._captured = None
            collector = self.engine.collector
            if pending["flagged"] and collector.needs_whitening:
                # the first flagged step's whitening is a collective: this rank joins it with no
                # sample (as a skipped step does), so the others are not left waiting
                collector.initial_whitening(None, 0)
            self._fail(f"per-sample capture failed at step {pending['step']}: {error!r}")
            return
        if pending is None or capture is None or not capture.armed:
            return
        try:
            self._ingest(pending)
            self._check_grad(host.module)
        except Exception as err:
            self._fail(f"per-sample capture failed at step {pending['step']}: {err!r}")
        finally:
            capture.disarm()
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
            self.engine.relay.warn(
                f"{residual:.0%} of the monitored weights' .grad does not come through their "
                "outputs (a loss term on the weights themselves: an L2 or EWC penalty?); the "
                "captured per-sample gradients leave it out"
            )

    def _ingest(self, pending: dict[str, Any]) -> None:
        """File what the hooks handed to the step's ingest (or drop it: non-finite step)."""
        ingest, capture, collector = pending["ingest"], self.engine.capture, self.engine.collector
        nonfinite = capture.nonfinite  # checked in the hooks on the small factors
        capture.disarm()
        # AMP overflow: the whole step is skipped. A batch without any target token (all labels
        # -100) has no sample to add but is still a captured step (its loss may be NaN, 0 / 0).
        skip = nonfinite and ingest.count > 0
        sums = {} if skip else ingest.commit()
        if pending["flagged"] and collector.needs_whitening:
            # Every rank reaches this at the same (first flagged) step: a collective. That step's
            # samples fill the Fisher sums and set the whitening; they are not sketched.
            collector.initial_whitening(sums or None, ingest.count if sums else 0)
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

    def end(self) -> None:
        """After the micro-batch: a step that never reached backward leaves no hook armed."""
        capture = self.engine.capture
        if capture is not None and capture.armed:
            capture.disarm()
        self.remove_loss_check()
        self._captured = None
        self._pending = None

    def _fail(self, message: str) -> None:
        """Capture stops for this fit (one warning); training goes on."""
        self.failed = True
        self.engine.relay.warn(f"{message}; training continues")

    def memory_ledger(self, seen: set | None = None) -> dict[str, int]:
        """``{attribute: bytes}`` of the tensors held between hooks (the armed step's sums)."""
        return attribute_ledger(self, set() if seen is None else seen, skip=("engine",))


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

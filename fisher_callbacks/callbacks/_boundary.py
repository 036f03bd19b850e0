"""When the monitors evaluate: validation boundaries, the end of a fit without validation, and the
boundary a checkpoint was written just before.

The three callbacks of the suite do their heavy work (probe passes, QK-OV heatmaps, forgetting) at
validation boundaries. :class:`BoundaryCallback` holds the one rule for when a boundary happens, so
each monitor only implements ``_boundary(trainer, pl_module)``:

- at ``on_validation_epoch_end`` of a fit (never in the sanity check);
- at the end of a fit in which no validation will run (no ``validation_step``, no val loader,
  ``limit_val_batches=0``, or the first validation past ``max_steps``/``max_epochs``): a warning
  at train start says so, once per fit, and the boundary runs at the last ``on_train_epoch_end``;
- at train start of a resumed fit when the checkpoint was written between a training step and
  the validation that followed it (``ModelCheckpoint(every_n_train_steps=...)`` saves there):
  Lightning resumes past that validation, so the checkpoint records the pending boundary and the
  resumed run evaluates it before its first step (same weights, same state as the uninterrupted
  run at that boundary). Scalars logged then land at the end of the resumed epoch (Lightning
  allows only epoch-level logging in ``on_train_start``); histories and alerts are exact.
"""

from __future__ import annotations

import math
import weakref
from abc import ABC, abstractmethod
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from .._rng import isolated_rng
from ..engine.ranks import WarningRelay
from ..memory import attribute_ledger

_WARNED: weakref.WeakSet[pl.Trainer] = weakref.WeakSet()  # trainers told "no validation" this fit


def no_validation_reason(trainer: pl.Trainer) -> str | None:
    """Why no validation boundary will come in this fit, or None when one will.

    Valid from train start on (the loaders and ``val_check_batch`` are known by then): no
    ``validation_step``, no val loader, ``limit_val_batches=0``, or the first validation
    (``val_check_interval`` batches into epoch ``check_val_every_n_epoch``) past ``max_steps`` or
    ``max_epochs``. A time-based interval always counts as validating.
    """
    if not trainer.enable_validation:
        if not is_overridden("validation_step", trainer.lightning_module):
            return "the LightningModule has no validation_step"
        if trainer.limit_val_batches == 0:
            return "limit_val_batches=0"
        return "no val dataloader"
    if getattr(trainer, "_val_check_time_interval", None) is not None:
        return None
    every = trainer.check_val_every_n_epoch
    max_epochs = trainer.max_epochs
    if every is not None and max_epochs is not None and 0 < max_epochs < every:
        return f"check_val_every_n_epoch={every} > max_epochs={max_epochs}"
    vcb = trainer.val_check_batch
    if trainer.max_steps is None or trainer.max_steps < 0 or vcb is None or not math.isfinite(vcb):
        return None
    per_epoch = trainer.num_training_batches
    first = vcb if every is None else (every - 1) * per_epoch + vcb  # batches to the first one
    if not math.isfinite(first):
        return None
    done = trainer.fit_loop.epoch_loop.total_batch_idx + 1  # batches already run (resumed fits)
    if first <= done:  # a resumed fit: the next validation is every val_check_batch batches
        first = done + (vcb - done % vcb if every is None else vcb)
    budget = trainer.max_steps * trainer.accumulate_grad_batches
    if first > budget:
        return (
            f"the first validation would come after batch {first:g}, past max_steps="
            f"{trainer.max_steps} (val_check_interval={trainer.val_check_interval})"
        )
    return None


def validation_due(trainer: pl.Trainer) -> bool:
    """Whether the training loop validates right after the current training batch.

    True between a batch's ``on_train_batch_end`` (where ``ModelCheckpoint(every_n_train_steps)``
    saves) and the validation that follows it. Asks the loop's own rule (private Lightning API;
    False when it is unavailable, so a checkpoint then simply records no pending boundary).
    """
    if not trainer.training or trainer.sanity_checking:
        return False
    try:
        loop = trainer.fit_loop.epoch_loop
        return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
    except Exception:
        return False


class BoundaryCallback(Callback, ABC):
    """Base of the suite's monitors: calls ``_boundary`` whenever a boundary happens (see above).

    Subclasses implement ``_boundary(trainer, pl_module)``, put ``self._boundary_state()`` into
    their ``state_dict`` and call ``self._load_boundary_state(state)`` when loading it.

    Lifecycle: one fit is one run. Subclasses call ``self._keep_arguments(Cls, locals())`` first in
    ``__init__`` and ``self._begin_fit(stage)`` first in ``setup``: a callback object reused for
    another ``fit`` (a new model, a new Trainer) restarts from its constructor arguments, so its
    hooks, anchors, histories, step counters and stored samples are those of the new fit. A
    resumed fit (``ckpt_path``) then loads its state from the checkpoint, as a new object would.
    """

    _boundary_step: int | None = None  # global step of the last boundary evaluated
    _pending_boundary: int | None = None  # restored: a boundary the checkpoint was written before
    _validates: bool = True
    _arguments: tuple[type, dict[str, Any]] | None = None  # (class, its __init__'s arguments)
    _fitted: bool = False  # a fit has been set up with this object
    _relay: WarningRelay  # the monitor's (its engine's) warnings

    def _keep_arguments(self, owner: type, args: dict[str, Any]) -> None:
        """Record ``owner.__init__``'s arguments (``locals()`` at its top) for :meth:`_restart`."""
        self._arguments = (owner, {k: v for k, v in args.items() if k not in ("self", "__class__")})

    def _begin_fit(self, stage: str) -> None:
        """At ``setup``: a second fit with this object restarts it (see the class docstring)."""
        if stage != "fit":
            return
        if self._fitted and self._arguments is not None:
            self._restart()
        self._fitted = True

    def _restart(self) -> None:
        """Back to the state right after construction (subclasses release hooks first)."""
        owner, arguments = self._arguments
        owner.__init__(self, **arguments)

    @abstractmethod
    def _boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate one boundary (probe passes, maps, forgetting) at ``trainer.global_step``."""

    def _run_boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._boundary_step = step = trainer.global_step
        # the training run's random streams are not the monitors'; a failure is one warning
        with isolated_rng(), self._relay.contain(f"the boundary at step {step}"):
            self._boundary(trainer, pl_module)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._run_boundary(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reason = no_validation_reason(trainer)
        self._validates = reason is None
        if reason is not None and trainer not in _WARNED:
            _WARNED.add(trainer)
            rank_zero_warn(
                f"fisher_callbacks: no validation will run ({reason}). The QK-OV and forgetting "
                "monitors evaluate at validation boundaries, so they evaluate once at the end of "
                "fit instead; set val_check_interval to watch the run while it trains."
            )
        pending, self._pending_boundary = self._pending_boundary, None
        if pending is not None and pending == trainer.global_step and self._boundary_step != pending:
            self._run_boundary(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._validates and trainer.fit_loop.done and self._boundary_step != trainer.global_step:
            self._run_boundary(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _WARNED.discard(trainer)  # the next fit with this trainer warns again

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if isinstance(state, dict):
            due = validation_due(trainer) and self._boundary_step != trainer.global_step
            state["pending_boundary"] = trainer.global_step if due else None

    def memory_ledger(self, seen: set | None = None) -> dict[str, int]:
        """``{group: bytes}`` of the tensors this monitor holds, one group per attribute (generic:
        it walks the attributes, so it follows the monitor's state as that changes); tensors in
        ``seen`` (already counted elsewhere, e.g. the model's own parameters) are left out. See
        :mod:`fisher_callbacks.memory`."""
        return attribute_ledger(self, seen)

    def _boundary_state(self) -> dict[str, Any]:
        return {"boundary_step": self._boundary_step}

    def _load_boundary_state(self, state: dict[str, Any]) -> None:
        self._boundary_step = state.get("boundary_step")
        self._pending_boundary = state.get("pending_boundary")

"""What the engine needs from the trainer that drives it: the :class:`Host` interface.

The engine (capture, probe passes, Fisher sums, QK-OV maps, forgetting) never imports a trainer
library. A trainer adapter (the Lightning callbacks, :mod:`fisher_callbacks.hf`) hands each
engine call a :class:`Host`: the model, the optimizer-step counter, the rank, where the scalars
and figures go, and how to stop the run. One small object per hook call; nothing in it is
kept across calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from ..sinks import Sink


class Host(ABC):
    """The trainer as the engine sees it, at one hook call.

    Attributes every adapter sets:
        module: the trained model whose ``named_parameters`` the monitors watch and probe (the
            LightningModule, or the Hugging Face model inside ``transformers.Trainer``).
        step: optimizer steps done (Lightning's ``trainer.global_step``, HF's
            ``state.global_step``): the step every row, figure and alert carries.
        is_global_zero: this process writes to the sinks and the log.
        world_size: data-parallel processes.
        accumulate: micro-batches per optimizer step.
        automatic_optimization: ``.grad`` of the first micro-batch holds that backward alone.
        sinks: where scalars, figures, tables and alerts go (rank zero's are used).
        log_every_n_steps: the trainer's logging cadence (per-step rows between boundaries
            follow it, unless something changed at that step; 0: only those rows).
    """

    module: torch.nn.Module
    step: int
    is_global_zero: bool = True
    world_size: int = 1
    accumulate: int = 1
    automatic_optimization: bool = True
    sinks: Sequence[Sink] = ()
    log_every_n_steps: int = 1

    @property
    def device(self) -> torch.device:
        """The device of the module's first parameter (CPU for a module without parameters)."""
        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def forward_module(self) -> torch.nn.Module:
        """The module probe passes call for logits (default: :attr:`module`)."""
        return self.module

    def loss_scale(self) -> float:
        """The AMP loss scale the backward just run used (1.0 without a scaler)."""
        return 1.0

    @abstractmethod
    def log_scalars(
        self, values: Mapping[str, float], *, sync_dist: bool = False, rank_zero_only: bool = False
    ) -> None:
        """Log finite scalars at :attr:`step` to every sink (rank zero) and to whatever the
        trainer reads back (Lightning's ``callback_metrics``, HF's ``log_history``).
        ``sync_dist``: the trainer-side copy is the mean over ranks; ``rank_zero_only``: the
        values differ per rank and rank zero's count."""

    def log_now(self, values: Mapping[str, float]) -> None:
        """Rows between boundaries (per-step forecast, early probes) at :attr:`step`, from rank
        zero only (the values are the same on every rank): default, to every sink."""
        if self.is_global_zero:
            from ..sinks import send_scalars

            send_scalars(self.sinks, values, self.step)

    def any_rank(self, flag: bool) -> bool:
        """``flag`` or-reduced over ranks (a collective under DDP)."""
        return bool(flag)

    @abstractmethod
    def request_stop(self) -> None:
        """Ask the trainer to stop after this step (every rank calls it with the same decision)."""

    @property
    def stopping(self) -> bool:
        """Whether a stop was already asked for in this fit."""
        return False

    @property
    def validation_interval(self) -> float | None:
        """Optimizer steps between two boundaries, when the trainer says (None: unknown)."""
        return None

    def boundary_follows(self) -> bool:
        """Whether a boundary (validation, evaluation) runs right after the current step."""
        return False

    def probe_loader(self, task: str) -> DataLoader:
        """The probe DataLoader of ``task`` when the user named the task without giving one."""
        raise ValueError(
            f"no DataLoader for reference task {task!r}: pass reference_tasks={{task: DataLoader}}"
        )

"""The Lightning Trainer as the engine's :class:`~fisher_callbacks.engine.host.Host`."""

from __future__ import annotations

import math
from collections.abc import Mapping

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from ..engine.host import Host
from ..loggers import log_metrics, send_to_loggers, sinks_of
from ._boundary import validation_due


class LightningHost(Host):
    """One hook call of a Lightning ``Trainer`` on ``pl_module``."""

    def __init__(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.trainer = trainer
        self.module = pl_module
        self.step = trainer.global_step
        self.is_global_zero = trainer.is_global_zero
        self.world_size = trainer.world_size
        self.accumulate = trainer.accumulate_grad_batches
        self.automatic_optimization = pl_module.automatic_optimization
        self.log_every_n_steps = max(int(trainer.log_every_n_steps or 0), 0)  # 0: no cadence

    @property
    def sinks(self) -> list:
        return sinks_of(self.trainer.loggers)

    @property
    def device(self):
        return self.module.device

    @property
    def forward_module(self):
        """``pl_module`` if it defines ``forward``, else the Hugging Face model inside it."""
        pl_module = self.module
        if type(pl_module).forward is not pl.LightningModule.forward:
            return pl_module
        for module in pl_module.modules():
            if module is not pl_module and getattr(getattr(module, "config", None), "model_type", None):
                return module
        raise TypeError(
            f"{type(pl_module).__name__} defines no forward and wraps no Hugging Face model: probe "
            "passes need one of them to compute logits"
        )

    def loss_scale(self) -> float:
        """The AMP GradScaler's current scale (1.0 without one): the backward just run used it."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return 1.0
        return float(scaler.get_scale())

    def log_scalars(
        self, values: Mapping[str, float], *, sync_dist: bool = False, rank_zero_only: bool = False
    ) -> None:
        log_metrics(self.trainer, self.module, values, sync_dist=sync_dist, rank_zero_only=rank_zero_only)

    def log_now(self, values: Mapping[str, float]) -> None:
        """Rows between boundaries (per-step forecast, early probes): straight to the loggers at
        ``global_step`` (rank zero), not through ``pl_module.log``, which Lightning refuses or
        defers outside a logging hook."""
        send_to_loggers(self.trainer, values)

    def any_rank(self, flag: bool) -> bool:
        return bool(self.trainer.strategy.reduce_boolean_decision(flag, all=False))

    def request_stop(self) -> None:
        self.trainer.should_stop = True

    @property
    def stopping(self) -> bool:
        return bool(self.trainer.should_stop)

    @property
    def validation_interval(self) -> float | None:
        trainer = self.trainer
        vcb = trainer.val_check_batch
        if vcb is None or not math.isfinite(vcb) or vcb <= 0:
            return None
        every = trainer.check_val_every_n_epoch
        batches = trainer.num_training_batches
        if every and every > 1 and math.isfinite(batches) and vcb >= batches:  # once every n epochs
            vcb = vcb * every
        return max(float(vcb) / trainer.accumulate_grad_batches, 1.0)

    def boundary_follows(self) -> bool:
        return validation_due(self.trainer)

    def probe_loader(self, task: str) -> DataLoader:
        for owner in (getattr(self.trainer, "datamodule", None), self.module):
            fn = getattr(owner, "probe_dataloader", None)
            if callable(fn):
                return fn(task)
        raise ValueError(
            f"FisherMonitor: no DataLoader for reference task {task!r}; pass "
            "reference_tasks={task: DataLoader} or define probe_dataloader(task) on the datamodule "
            "or the LightningModule"
        )

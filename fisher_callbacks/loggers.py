"""Lightning's loggers as sinks, and the monitors' scalars at ``trainer.global_step``.

Each Lightning logger maps to a :class:`~fisher_callbacks.sinks.Sink` (:func:`sink_of`): W&B to
a :class:`~fisher_callbacks.sinks.WandbSink` on its run, TensorBoard to a
:class:`~fisher_callbacks.sinks.TensorBoardSink` on its writer, CSV to a
:class:`~fisher_callbacks.sinks.FolderSink` beside ``metrics.csv`` (PNG, CSV and NPZ files). A
logger that fails gets ONE warning per kind of call and the training goes on: monitoring never
stops a run. Call these on global rank zero only (:func:`log_metrics` takes care of that itself).

**One step convention.** Everything the monitors log carries ``trainer.global_step`` at the
validation boundary (optimizer steps done): scalars, figures, tables, alerts, log lines. Lightning
itself logs ``pl_module.log`` values from ``on_validation_epoch_end`` at its internal
``_batches_that_stepped`` counter, which inside a mid-training validation is one less than
``global_step`` (it is incremented after the validation), so :func:`log_metrics` sends the
monitors' scalars to the loggers itself, at ``global_step``, and hands them to ``pl_module.log``
only for ``callback_metrics`` (EarlyStopping, ModelCheckpoint).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from matplotlib.figure import Figure

from .engine.forgetting_report import forgetting_dashboard_layout
from .sinks import (
    AlertSender,
    FolderSink,
    Sink,
    TensorBoardSink,
    WandbSink,
    send_arrays,
    send_custom_scalars,
    send_figure,
    send_table,
    warn_once,
)

__all__ = [
    "AlertSender",
    "forgetting_dashboard_layout",
    "log_custom_scalars",
    "log_figure",
    "log_metrics",
    "log_table",
    "save_arrays",
    "send_to_loggers",
    "sink_of",
    "sinks_of",
]


def sink_of(logger: Logger) -> Sink | None:
    """The sink of one Lightning logger (None for a kind the monitors do not write to beyond
    its ``log_metrics``). Its scalars keep going through the logger itself (:func:`log_metrics`),
    so the sink writes figures, tables, arrays and alerts only."""
    sink: Sink
    if isinstance(logger, WandbLogger):
        sink = WandbSink(lambda: logger.experiment, "trainer/global_step", log_scalars=False)
    elif isinstance(logger, TensorBoardLogger):
        sink = TensorBoardSink(lambda: logger.experiment, log_scalars=False)
    elif isinstance(logger, CSVLogger):
        sink = FolderSink(lambda: logger.log_dir)
    else:
        return None
    sink.name = type(logger).__name__
    return sink


def sinks_of(loggers: Sequence[Logger]) -> list[Sink]:
    """The sinks of ``trainer.loggers``."""
    return [s for s in map(sink_of, loggers) if s is not None]


def log_metrics(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    values: Mapping[str, float],
    *,
    sync_dist: bool = False,
    rank_zero_only: bool = False,
) -> None:
    """Log scalars at ``trainer.global_step``, the step of the figures and tables.

    Each value goes to ``pl_module.log(name, value, logger=False, ...)`` (so it is in
    ``trainer.callback_metrics`` for EarlyStopping, ModelCheckpoint and the progress bar) and,
    on global rank zero, to every attached logger's ``log_metrics(values, step=global_step)``.
    Under DDP the loggers get rank zero's values (the monitors log values that are identical on
    every rank, or rank zero's own, as their figures); ``callback_metrics`` gets the
    ``sync_dist`` reduction when asked.

    Args:
        trainer: the Trainer (its ``global_step`` and ``loggers``).
        pl_module: the LightningModule whose ``log`` feeds ``callback_metrics``.
        values: ``{name: value}``, finite floats (the caller drops non-finite values with a
            warning).
        sync_dist: reduce the ``callback_metrics`` value across ranks (mean).
        rank_zero_only: ``callback_metrics`` from rank zero only (values that differ per rank).
    """
    if not values:
        return
    values = {name: float(value) for name, value in values.items()}
    for name, value in values.items():
        pl_module.log(
            name, value, logger=False, sync_dist=sync_dist, rank_zero_only=rank_zero_only, batch_size=1
        )
    send_to_loggers(trainer, values)


def send_to_loggers(trainer: pl.Trainer, values: Mapping[str, float]) -> None:
    """``values`` to every attached logger at ``trainer.global_step``, from global rank zero
    (no ``pl_module.log``: rows between boundaries, which Lightning refuses or defers outside a
    logging hook)."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        try:
            logger.log_metrics(dict(values), step=trainer.global_step)
        except Exception as err:
            warn_once(logger, "log scalars", err)


def log_custom_scalars(loggers: Sequence[Logger], layout: Mapping[str, Mapping[str, list[Any]]]) -> None:
    """``add_custom_scalars(layout)`` on every TensorBoard logger (other loggers have no layouts).

    TensorBoard keeps one layout per run (the last written), so call it once, at fit start.
    """
    send_custom_scalars(sinks_of(loggers), layout)


def log_figure(loggers: Sequence[Logger], key: str, fig: Figure, step: int) -> list[Path]:
    """Log ``fig`` under ``key`` to every logger; returns the PNG paths written (CSV loggers)."""
    return send_figure(sinks_of(loggers), key, fig, step)


def log_table(
    loggers: Sequence[Logger], key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int
) -> None:
    """A table (top conflicts, alerts): ``wandb.Table`` on W&B, a CSV file beside ``metrics.csv``,
    text on TensorBoard."""
    send_table(sinks_of(loggers), key, columns, rows, step)


def save_arrays(loggers: Sequence[Logger], key: str, arrays: Mapping[str, Any], step: int) -> list[Path]:
    """Raw arrays as ``.npz`` beside ``metrics.csv`` (CSV loggers) for offline analysis."""
    return send_arrays(sinks_of(loggers), key, arrays, step)

"""Send scalars, figures, tables, arrays and alerts to every logger attached to a Trainer.

One adapter per logger family: W&B (``wandb.Image``, ``wandb.Table``, ``wandb.alert``),
TensorBoard (``add_figure``, ``add_custom_scalars``), CSV (PNG, CSV and NPZ files beside
``metrics.csv``). A logger that fails (offline store gone, disk full, an API change) gets ONE
warning per kind of call and the training goes on: monitoring never stops a run. Call these on
global rank zero only (:func:`log_metrics` takes care of that itself).

**One step convention.** Everything the monitors log carries ``trainer.global_step`` at the
validation boundary (optimizer steps done): scalars, figures, tables, alerts, log lines. Lightning
itself logs ``pl_module.log`` values from ``on_validation_epoch_end`` at its internal
``_batches_that_stepped`` counter, which inside a mid-training validation is one less than
``global_step`` (it is incremented after the validation), so :func:`log_metrics` sends the
monitors' scalars to the loggers itself, at ``global_step``, and hands them to ``pl_module.log``
only for ``callback_metrics`` (EarlyStopping, ModelCheckpoint).
"""

from __future__ import annotations

import csv
import logging
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from matplotlib.figure import Figure

from .plots import save_figure

log = logging.getLogger("fisher_callbacks")
_warned: set[tuple[str, str]] = set()


def _warn_once(logger: Logger, what: str, err: BaseException) -> None:
    key = (type(logger).__name__, what)
    if key in _warned:
        return
    _warned.add(key)
    log.warning(
        "fisher_callbacks: %s could not %s (%s: %s); training continues, later failures of this "
        "kind are not reported",
        type(logger).__name__,
        what,
        type(err).__name__,
        err,
    )


def _file_stem(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_")


def _csv_dir(logger: CSVLogger, sub: str) -> Path:
    path = Path(logger.log_dir) / sub
    path.mkdir(parents=True, exist_ok=True)
    return path


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
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        try:
            logger.log_metrics(values, step=trainer.global_step)
        except Exception as err:
            _warn_once(logger, "log scalars", err)


def forgetting_dashboard_layout(tasks: Sequence[str]) -> dict[str, dict[str, list[Any]]]:
    """TensorBoard custom-scalars layout: one forgetting chart per reference task.

    Chart ``"{task}: drift vs threshold (nats)"`` overlays ``forgetting/{task}/measured``,
    ``/predicted``, ``/forecast`` (when logged) and ``/threshold``; chart ``"{task}: risk and
    warning"`` overlays ``/risk`` and ``/warning``. Tags are anchored regular expressions (a task
    name is escaped), the form ``SummaryWriter.add_custom_scalars`` takes.

    Args:
        tasks: reference task names.

    Returns:
        ``{"forgetting": {chart title: ["Multiline", [tag regex, ...]]}}``.
    """

    def tags(task: str, names: Sequence[str]) -> list[str]:
        return [f"^{re.escape(f'forgetting/{task}/{n}')}$" for n in names]

    charts: dict[str, list[Any]] = {}
    for task in tasks:
        drift = ("measured", "predicted", "forecast", "threshold")
        charts[f"{task}: drift vs threshold (nats)"] = ["Multiline", tags(task, drift)]
        charts[f"{task}: risk and warning"] = ["Multiline", tags(task, ("risk", "warning"))]
    return {"forgetting": charts}


def log_custom_scalars(loggers: Sequence[Logger], layout: Mapping[str, Mapping[str, list[Any]]]) -> None:
    """``add_custom_scalars(layout)`` on every TensorBoard logger (other loggers have no layouts).

    TensorBoard keeps one layout per run (the last written), so call it once, at fit start.
    """
    for logger in loggers:
        if not isinstance(logger, TensorBoardLogger):
            continue
        try:
            logger.experiment.add_custom_scalars({k: dict(v) for k, v in layout.items()})
        except Exception as err:
            _warn_once(logger, "write a custom-scalars layout", err)


def log_figure(loggers: Sequence[Logger], key: str, fig: Figure, step: int) -> list[Path]:
    """Log ``fig`` under ``key`` to every logger; returns the PNG paths written (CSV loggers)."""
    written: list[Path] = []
    for logger in loggers:
        try:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log({key: wandb.Image(fig), "trainer/global_step": step})
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(key, fig, global_step=step, close=False)
            elif isinstance(logger, CSVLogger):
                path = _csv_dir(logger, "figures") / f"{_file_stem(key)}_step{step:07d}.png"
                written.append(save_figure(fig, path))
        except Exception as err:
            _warn_once(logger, "log a figure", err)
    return written


def log_table(
    loggers: Sequence[Logger], key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int
) -> None:
    """A table (top conflicts, alerts): ``wandb.Table`` on W&B, a CSV file beside ``metrics.csv``."""
    for logger in loggers:
        try:
            if isinstance(logger, WandbLogger):
                import wandb

                table = wandb.Table(columns=list(columns), data=[list(r) for r in rows])
                logger.experiment.log({key: table, "trainer/global_step": step})
            elif isinstance(logger, CSVLogger):
                path = _csv_dir(logger, "tables") / f"{_file_stem(key)}_step{step:07d}.csv"
                with path.open("w", newline="") as fh:
                    writer = csv.writer(fh)
                    writer.writerow(columns)
                    writer.writerows(rows)
            elif isinstance(logger, TensorBoardLogger):
                lines = [" | ".join(map(str, columns))] + [" | ".join(map(str, r)) for r in rows]
                logger.experiment.add_text(key, "\n\n".join(lines), global_step=step)
        except Exception as err:
            _warn_once(logger, "log a table", err)


def save_arrays(loggers: Sequence[Logger], key: str, arrays: Mapping[str, Any], step: int) -> list[Path]:
    """Raw arrays as ``.npz`` beside ``metrics.csv`` (CSV loggers) for offline analysis."""
    written = []
    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        try:
            path = _csv_dir(logger, "arrays") / f"{_file_stem(key)}_step{step:07d}.npz"
            np.savez_compressed(path, **{k: np.asarray(v) for k, v in arrays.items()})
            written.append(path)
        except Exception as err:
            _warn_once(logger, "save arrays", err)
    return written


class AlertSender:
    """``wandb.alert`` through every attached W&B logger, at most once per ``wait_seconds`` per title."""

    def __init__(self, wait_seconds: float = 600.0) -> None:
        self.wait_seconds = float(wait_seconds)
        self._last: dict[str, float] = {}

    def __call__(self, loggers: Sequence[Logger], title: str, text: str, level: str = "WARN") -> bool:
        now = time.monotonic()
        if title in self._last and now - self._last[title] < self.wait_seconds:
            return False
        sent = False
        for logger in loggers:
            if not isinstance(logger, WandbLogger):
                continue
            try:
                import wandb

                logger.experiment.alert(title=title, text=text, level=getattr(wandb.AlertLevel, level, level))
                sent = True
            except Exception as err:
                _warn_once(logger, "send an alert", err)
        if sent:
            self._last[title] = now
        return sent

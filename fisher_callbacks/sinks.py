"""Where the monitors' scalars, figures, tables, arrays and alerts go: one :class:`Sink` per backend.

A sink wraps what a trainer already writes to: a W&B run (``wandb.Image``, ``wandb.Table``,
``wandb.alert``), a TensorBoard ``SummaryWriter`` (``add_figure``, ``add_custom_scalars``), a
folder beside a CSV log (PNG, CSV and NPZ files) or a list of rows (the Hugging Face Trainer's
``state.log_history``). The Lightning adapter maps ``trainer.loggers`` to sinks
(:func:`fisher_callbacks.loggers.sinks_of`), the Hugging Face adapter maps ``report_to``
(:mod:`fisher_callbacks.hf`). No trainer library is imported here.

A sink that fails (offline store gone, disk full, an API change) gets ONE warning per kind of call
and the training goes on: monitoring never stops a run. Call these on global rank zero only.
Everything carries the optimizer step of the row (``step``), the same for scalars and figures.
"""

from __future__ import annotations

import csv
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .plots import save_figure

log = logging.getLogger("fisher_callbacks")
_warned: set[tuple[str, str]] = set()


def warn_once(owner: object, what: str, err: BaseException) -> None:
    """One warning per (kind of owner, kind of call): the first failure, never the next ones."""
    name = getattr(owner, "name", None) or type(owner).__name__
    key = (name, what)
    if key in _warned:
        return
    _warned.add(key)
    log.warning(
        "fisher_callbacks: %s could not %s (%s: %s); training continues, later failures of this "
        "kind are not reported",
        name,
        what,
        type(err).__name__,
        err,
    )


def file_stem(key: str) -> str:
    """``key`` as a file name (``forgetting/general/timeline`` -> ``forgetting_general_timeline``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_")


class Sink:
    """A backend the monitors write to. Every method is optional: the base does nothing."""

    name = "sink"

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Scalars at ``step``."""

    def figure(self, key: str, fig: Figure, step: int) -> Path | None:
        """A figure; returns the file written, if any."""
        return None

    def table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        """A table (top conflicts, alerts)."""

    def arrays(self, key: str, arrays: Mapping[str, Any], step: int) -> Path | None:
        """Raw arrays for offline analysis; returns the file written, if any."""
        return None

    def alert(self, title: str, text: str, level: str) -> bool:
        """A push alert; returns whether one was sent."""
        return False

    def custom_scalars(self, layout: Mapping[str, Mapping[str, list[Any]]]) -> None:
        """A dashboard layout of charts (TensorBoard's custom scalars)."""


class WandbSink(Sink):
    """A W&B run (``wandb.run``, or ``WandbLogger.experiment``). ``step_key`` is the run's step
    metric the row carries (Lightning: ``trainer/global_step``, HF: ``train/global_step``);
    ``log_scalars=False`` when the trainer already sends the scalars to this run."""

    name = "WandbSink"

    def __init__(self, run: Any | Callable[[], Any], step_key: str = "trainer/global_step", log_scalars=True):
        self._run = run
        self.step_key = step_key
        self.log_scalars = log_scalars

    @property
    def run(self) -> Any:
        return self._run() if callable(self._run) else self._run

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.log_scalars:
            self.run.log({**values, self.step_key: step})

    def figure(self, key: str, fig: Figure, step: int) -> None:
        import wandb

        self.run.log({key: wandb.Image(fig), self.step_key: step})

    def table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        import wandb

        self.run.log(
            {key: wandb.Table(columns=list(columns), data=[list(r) for r in rows]), self.step_key: step}
        )

    def alert(self, title: str, text: str, level: str) -> bool:
        import wandb

        self.run.alert(title=title, text=text, level=getattr(wandb.AlertLevel, level, level))
        return True


class TensorBoardSink(Sink):
    """A TensorBoard ``SummaryWriter`` (or a callable returning it, created on first use)."""

    name = "TensorBoardSink"

    def __init__(self, writer: Any | Callable[[], Any], log_scalars: bool = True) -> None:
        self._writer = writer
        self.log_scalars = log_scalars

    @property
    def writer(self) -> Any:
        if callable(self._writer) and not hasattr(self._writer, "add_scalar"):
            self._writer = self._writer()
        return self._writer

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.log_scalars:
            for key, value in values.items():
                self.writer.add_scalar(key, value, global_step=step)
            self.writer.flush()

    def figure(self, key: str, fig: Figure, step: int) -> None:
        self.writer.add_figure(key, fig, global_step=step, close=False)

    def table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        lines = [" | ".join(map(str, columns))] + [" | ".join(map(str, r)) for r in rows]
        self.writer.add_text(key, "\n\n".join(lines), global_step=step)

    def custom_scalars(self, layout: Mapping[str, Mapping[str, list[Any]]]) -> None:
        self.writer.add_custom_scalars({k: dict(v) for k, v in layout.items()})


class FolderSink(Sink):
    """Files under a folder (a CSV log's): ``figures/*.png``, ``tables/*.csv``, ``arrays/*.npz``.
    ``folder`` may be a callable (a logger's ``log_dir`` that exists only once it is used)."""

    name = "FolderSink"

    def __init__(self, folder: str | Path | Callable[[], str | Path]) -> None:
        self._folder = folder

    def _dir(self, sub: str) -> Path:
        root = self._folder() if callable(self._folder) else self._folder
        path = Path(root) / sub
        path.mkdir(parents=True, exist_ok=True)
        return path

    def figure(self, key: str, fig: Figure, step: int) -> Path:
        return save_figure(fig, self._dir("figures") / f"{file_stem(key)}_step{step:07d}.png")

    def table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        path = self._dir("tables") / f"{file_stem(key)}_step{step:07d}.csv"
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns)
            writer.writerows(rows)

    def arrays(self, key: str, arrays: Mapping[str, Any], step: int) -> Path:
        path = self._dir("arrays") / f"{file_stem(key)}_step{step:07d}.npz"
        np.savez_compressed(path, **{k: np.asarray(v) for k, v in arrays.items()})
        return path


class HistorySink(Sink):
    """Rows appended to a list of dicts (the Hugging Face Trainer's ``state.log_history``):
    ``{**values, "step": step}``."""

    name = "HistorySink"

    def __init__(self, history: list[dict[str, Any]]) -> None:
        self.history = history

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.history.append({**values, "step": step})


# ---------------------------------------------------------------------- fan-out over sinks
def as_sinks(targets: Sequence[Any]) -> list[Sink]:
    """``targets`` as sinks: a :class:`Sink` as it is, a Lightning logger through
    :func:`fisher_callbacks.loggers.sink_of` (imported only when one is given)."""
    out: list[Sink] = []
    for target in targets:
        if isinstance(target, Sink):
            out.append(target)
            continue
        from .loggers import sink_of

        sink = sink_of(target)
        if sink is not None:
            out.append(sink)
    return out


def send_scalars(sinks: Sequence[Sink], values: Mapping[str, float], step: int) -> None:
    """Scalars at ``step`` to every sink."""
    if not values:
        return
    for sink in as_sinks(sinks):
        try:
            sink.scalars(values, step)
        except Exception as err:
            warn_once(sink, "log scalars", err)


def send_figure(sinks: Sequence[Sink], key: str, fig: Figure, step: int) -> list[Path]:
    """``fig`` under ``key`` to every sink; returns the PNG paths written."""
    written = []
    for sink in as_sinks(sinks):
        try:
            path = sink.figure(key, fig, step)
        except Exception as err:
            warn_once(sink, "log a figure", err)
            continue
        if path is not None:
            written.append(path)
    return written


def send_table(
    sinks: Sequence[Sink], key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int
) -> None:
    """A table to every sink (W&B table, TensorBoard text, CSV file)."""
    for sink in as_sinks(sinks):
        try:
            sink.table(key, columns, rows, step)
        except Exception as err:
            warn_once(sink, "log a table", err)


def send_arrays(sinks: Sequence[Sink], key: str, arrays: Mapping[str, Any], step: int) -> list[Path]:
    """Raw arrays (``.npz`` beside a CSV log); returns the files written."""
    written = []
    for sink in as_sinks(sinks):
        try:
            path = sink.arrays(key, arrays, step)
        except Exception as err:
            warn_once(sink, "save arrays", err)
            continue
        if path is not None:
            written.append(path)
    return written


def send_custom_scalars(sinks: Sequence[Sink], layout: Mapping[str, Mapping[str, list[Any]]]) -> None:
    """A dashboard layout to every sink that has one (TensorBoard keeps the last written: call
    it once, at fit start)."""
    for sink in as_sinks(sinks):
        try:
            sink.custom_scalars(layout)
        except Exception as err:
            warn_once(sink, "write a custom-scalars layout", err)


class AlertSender:
    """Push alerts (``wandb.alert``) through every sink, at most once per ``wait_seconds`` per title."""

    def __init__(self, wait_seconds: float = 600.0) -> None:
        self.wait_seconds = float(wait_seconds)
        self._last: dict[str, float] = {}

    def __call__(self, sinks: Sequence[Any], title: str, text: str, level: str = "WARN") -> bool:
        now = time.monotonic()
        if title in self._last and now - self._last[title] < self.wait_seconds:
            return False
        sent = False
        for sink in as_sinks(sinks):
            try:
                sent |= bool(sink.alert(title, text, level))
            except Exception as err:
                warn_once(sink, "send an alert", err)
        if sent:
            self._last[title] = now
        return sent

"""Logger adapters against real loggers: W&B offline (images, tables, alerts), TensorBoard, CSV."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from fisher_callbacks.loggers import AlertSender, log_figure, log_table, save_arrays
from fisher_callbacks.plots import plot_layer_head_heatmaps


def _fig():
    return plot_layer_head_heatmaps({"Q": np.eye(3)}, title="t", value_label="v")


def test_figures_tables_arrays_to_every_logger(tmp_path):
    wb = WandbLogger(save_dir=str(tmp_path), project="fc-loggers", offline=True)
    loggers = [CSVLogger(tmp_path / "csv"), TensorBoardLogger(tmp_path / "tb"), wb]
    paths = log_figure(loggers, "qkov/a_vs_b/heatmap/x", _fig(), step=3)
    assert len(paths) == 1 and paths[0].stat().st_size > 0
    log_table(loggers, "qkov/a_vs_b/top_conflicts", ["block", "score"], [["Q", 0.5]], step=3)
    assert save_arrays(loggers, "qkov/a_vs_b", {"Q": np.ones((2, 2))}, step=3)
    wb.experiment.finish()
    run = next(Path(tmp_path / "wandb").glob("offline-run-*"))
    assert list(run.glob("files/media/images/qkov/**/*.png"))
    assert list(run.glob("files/media/table/qkov/**/*.table.json"))
    assert list(Path(loggers[0].log_dir, "tables").glob("*.csv"))


def test_alerts_are_rate_limited_and_never_raise(tmp_path, caplog):
    wb = WandbLogger(save_dir=str(tmp_path), project="fc-alerts", offline=True)
    send = AlertSender(wait_seconds=3600)
    with caplog.at_level(logging.WARNING, logger="fisher_callbacks"):
        first = send([wb], "Forgetting risk: general", "drift 0.2")
        second = send([wb], "Forgetting risk: general", "drift 0.3")
    assert second is False
    # offline W&B either accepts the alert or fails once with a warning; training goes on
    assert first or any("send an alert" in r.message for r in caplog.records)
    assert send([CSVLogger(tmp_path)], "x", "y") is False  # no W&B logger: nothing to send
    wb.experiment.finish()

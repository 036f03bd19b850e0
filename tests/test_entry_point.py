"""The Lightning callbacks_factory entry point is opt-in: nothing is attached unless asked."""

from __future__ import annotations

import lightning.pytorch as pl

from fisher_callbacks import FisherMonitor, ForgettingRiskMonitor, QKOVInterferenceMonitor
from fisher_callbacks.entry_point import callbacks_factory


def test_installing_attaches_nothing(monkeypatch):
    monkeypatch.delenv("FISHER_CALLBACKS", raising=False)
    assert callbacks_factory() == []
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu")
    assert not any(isinstance(cb, FisherMonitor) for cb in trainer.callbacks)


def test_environment_variable_enables_the_suite(monkeypatch):
    monkeypatch.setenv("FISHER_CALLBACKS", "1")
    monkeypatch.setenv("FISHER_CALLBACKS_REFERENCE", "general")
    monkeypatch.setenv("FISHER_CALLBACKS_TRAIN_TASK", "math")
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu")
    kinds = {type(cb) for cb in trainer.callbacks}
    assert {FisherMonitor, QKOVInterferenceMonitor, ForgettingRiskMonitor} <= kinds
    monitor = next(cb for cb in trainer.callbacks if isinstance(cb, FisherMonitor))
    assert monitor.train_task == "math"
    assert list(monitor.reference_tasks) == ["general"]

"""End-to-end: a real Trainer.fit with the three callbacks and CSV, TensorBoard and W&B (offline)
loggers; measured forgetting against an independent recomputation; warning, stop and resume."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from fisher_callbacks.callbacks import FisherMonitor, ForgettingRiskMonitor, QKOVInterferenceMonitor
from fisher_callbacks.losses import per_sample_losses
from lightning_examples.synthetic import SyntheticTasks, TinyGPT, collate

SMALL = dict(n_layer=2, n_head=4, n_embd=32, pretrain_steps=40, pretrain_lr=1e-2)


def _suite(warn=0.3, stop=None, every=4, ema_every=None, **risk_kwargs):
    fm = FisherMonitor(
        train_task="math",
        reference_tasks=["general"],
        capture_every_n_steps=every,
        max_samples_per_task=16,
        probe_max_samples=16,
        **({} if ema_every is None else {"ema_every_n_steps": ema_every}),
    )
    qm = QKOVInterferenceMonitor(fm, pairs=[("general", "math")], n_permutations=20, top_k=5)
    rm = ForgettingRiskMonitor(
        fm, reference_tasks=["general"], warn_threshold=warn, stop_threshold=stop, **risk_kwargs
    )
    return fm, qm, rm


def _fit(tmp_path, lr, callbacks, loggers=False, max_steps=12, ckpt_path=None, extra=()):
    dm = SyntheticTasks(n_train=128, n_val=16, n_probe=16, batch_size=8)
    model = TinyGPT(lr=lr, **SMALL)
    trainer = pl.Trainer(
        max_steps=max_steps,
        val_check_interval=4,
        limit_val_batches=1,
        callbacks=[*callbacks, *extra],
        logger=loggers,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
        log_every_n_steps=2,
        num_sanity_val_steps=1,
        enable_checkpointing=bool(extra),
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, model, dm


def _probe_loss(model, dm):
    batch = collate([dm.probe_dataloader("general").dataset[i] for i in range(16)])
    model.eval()
    with torch.no_grad():
        return per_sample_losses(model, batch).mean().item()


def test_fit_logs_everywhere_and_measures_forgetting(tmp_path):
    fm, qm, rm = _suite()
    loggers = [
        CSVLogger(tmp_path / "csv"),
        TensorBoardLogger(tmp_path / "tb"),
        WandbLogger(save_dir=str(tmp_path), project="fc-test", offline=True),
    ]
    trainer, model, dm = _fit(tmp_path, 3e-3, [fm, qm, rm], loggers=loggers)
    # capture happened on flagged steps, EMA on the others, nothing left armed or hooked
    assert fm.captured_steps == 3 and fm.collector.num_samples("math") == 24
    assert fm.collector.ema_steps("math") == 3  # EMA every 4 steps (0, 4, 8: the flagged ones)
    assert all(not m._forward_hooks for m in model.modules())
    # measured forgetting == independent recomputation (fresh identical pretrain = theta_0)
    reference = TinyGPT(lr=0.0, **SMALL)
    reference.pretrain_general()
    expected = _probe_loss(model, dm) - _probe_loss(reference, dm)
    assert rm.history["general"]["step"] == [4, 8, 12]
    assert rm.history["general"]["measured"][-1] == pytest.approx(expected, abs=1e-5)
    # metrics.csv has the scalars
    with open(Path(loggers[0].log_dir) / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    cols = set(rows[0])
    for name in (
        "forgetting/general/measured",
        "forgetting/general/predicted",
        "forgetting/general/ewc_quadratic",
        "forgetting/general/risk",
        "forgetting/general/warning",
        "qkov/general_vs_math/Q/fisher_overlap",
        "qkov/general_vs_math/n_significant",
    ):
        assert name in cols, name
    figs = list((Path(loggers[0].log_dir) / "figures").glob("qkov_*.png"))
    assert len(figs) == 9
    assert list((Path(loggers[0].log_dir) / "arrays").glob("qkov_*.npz"))
    # W&B offline run: heatmap PNGs in the media folder
    media = list(Path(tmp_path / "wandb").glob("offline-run-*/files/media/images/qkov/**/*.png"))
    assert media, list(Path(tmp_path / "wandb").rglob("*.png"))[:5]
    # TensorBoard: images under qkov tags
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(loggers[1].log_dir))
    events.Reload()
    assert any("qkov" in tag for tag in events.Tags()["images"])
    assert any("forgetting" in tag for tag in events.Tags()["images"])


def test_lr_zero_never_warns_high_lr_warns_by_the_crossing(tmp_path):
    fm, qm, rm = _suite(warn=0.3)
    _fit(tmp_path / "zero", 0.0, [fm, rm])
    assert rm.history["general"]["measured"] == [0.0, 0.0, 0.0]
    assert rm.alerts == []
    fm, qm, rm = _suite(warn=0.3)
    _fit(tmp_path / "high", 1e-2, [fm, rm])
    hist = rm.history["general"]
    crossing = next(s for s, d in zip(hist["step"], hist["measured"]) if d >= 0.3)
    assert rm.alerts, hist
    assert rm.alerts[0]["step"] <= crossing
    assert {"step", "task", "measured", "predicted"} <= set(rm.alerts[0])


def test_stop_threshold_stops_the_run(tmp_path):
    fm, qm, rm = _suite(warn=0.2, stop=0.3)
    trainer, _, _ = _fit(tmp_path, 1e-2, [fm, rm], max_steps=40)
    assert rm.stopped_at is not None
    assert trainer.global_step < 40


def test_resume_continues_ema_store_and_original_anchor(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=8, save_top_k=-1)
    fm, qm, rm = _suite()
    _fit(tmp_path, 3e-3, [fm, rm], max_steps=8, extra=[ckpt])
    anchor = {n: t.clone() for n, t in rm.anchor.items()}
    ema_steps = fm.collector.ema_steps("math")
    ids = fm.collector.sample_ids("math")
    path = next((tmp_path / "ckpt").glob("*.ckpt"))
    fm2, qm2, rm2 = _suite()
    _fit(tmp_path, 3e-3, [fm2, rm2], max_steps=12, ckpt_path=str(path))
    assert all(torch.equal(anchor[n], rm2.anchor[n]) for n in anchor)
    assert fm2.collector.ema_steps("math") == ema_steps + 1  # step 8 (EMA every 4 steps)
    assert len(ids) == 16  # the stored reservoir came back and kept filling within its cap
    assert fm2.collector.num_stored("math") == 16
    assert fm2.collector.num_samples("math") == fm.collector.num_samples("math") + 8
    # the step-8 checkpoint is written before that step's validation: the resumed run evaluates
    # that boundary before its first step (tests/test_forecast.py compares whole histories)
    assert rm2.history["general"]["step"] == [4, 8, 12]


class _BrokenCSV(CSVLogger):
    """A logger whose figure folder cannot be created (a file sits where it should be)."""

    @property
    def log_dir(self) -> str:
        d = Path(super().log_dir)
        d.mkdir(parents=True, exist_ok=True)
        for sub in ("figures", "arrays", "tables"):
            (d / sub).touch()
        return str(d)


def test_failing_logger_and_bad_batches_do_not_stop_training(tmp_path, caplog):
    fm, qm, rm = _suite()
    with caplog.at_level(logging.WARNING, logger="fisher_callbacks"):
        trainer, _, _ = _fit(tmp_path, 3e-3, [fm, qm, rm], loggers=[_BrokenCSV(tmp_path)])
    assert trainer.global_step == 12
    assert sum("could not log a figure" in r.message for r in caplog.records) == 1


def test_reference_task_without_loader_is_a_clear_error(tmp_path):
    fm = FisherMonitor(reference_tasks=["nowhere"])
    model = TinyGPT(**{**SMALL, "pretrain_steps": 0})
    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
        callbacks=[fm],
        enable_checkpointing=False,
    )

    class NoProbe(pl.LightningDataModule):
        def train_dataloader(self):
            return SyntheticTasks(n_train=8, batch_size=4).train_dataloader()

    with pytest.raises(ValueError, match="probe_dataloader"):
        trainer.fit(model, datamodule=NoProbe())


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    class Overflow(TinyGPT):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if self.global_step == 0 else loss

        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            optimizer_closure()  # forward + backward, like GradScaler: skip a non-finite step
            if all(torch.isfinite(p.grad).all() for p in self.parameters() if p.grad is not None):
                optimizer.step()

    fm = FisherMonitor(train_task="math", capture_every_n_steps=1, max_samples_per_task=16)
    model = Overflow(**{**SMALL, "pretrain_steps": 0, "lr": 0.0})
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        callbacks=[fm],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=SyntheticTasks(n_train=32, batch_size=8))
    assert fm.skipped_steps == 1
    assert fm.captured_steps == 1
    assert fm.collector.num_samples("math") == 8
    assert all(torch.isfinite(f).all() for f in fm.collector.fisher("math").values())


def test_two_boundaries_at_one_step_and_accumulation(tmp_path):
    """With accumulate_grad_batches=2 and validation every batch, global_step repeats: the
    forgetting monitor evaluates each step once and keeps working."""
    fm, qm, rm = _suite(ema_every=1)
    dm = SyntheticTasks(n_train=64, n_val=8, n_probe=8, batch_size=8)
    trainer = pl.Trainer(
        max_steps=3,
        accumulate_grad_batches=2,
        val_check_interval=1,
        limit_val_batches=1,
        callbacks=[fm, rm],
        logger=False,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(TinyGPT(lr=3e-3, **SMALL), datamodule=dm)
    steps = rm.history["general"]["step"]
    assert steps == sorted(set(steps)) and steps[-1] == 3
    assert fm.captured_steps == 1  # step 0 only (capture every 4), counted once for 2 micro-batches
    assert fm.collector.num_samples("math") == 16  # both micro-batches of step 0 stored
    assert fm.collector.ema_steps("math") == 3  # one EMA step per optimizer step


def test_failed_fit_removes_hooks_and_empty_probe_does_not_stop_training(tmp_path):
    class Boom(TinyGPT):
        def training_step(self, batch, batch_idx):
            if self.global_step == 1:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    fm, qm, rm = _suite()
    model = Boom(**SMALL)
    trainer = pl.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        callbacks=[fm, rm],
        default_root_dir=tmp_path,
        limit_val_batches=0,
    )
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model, datamodule=SyntheticTasks(n_train=32, n_probe=8, batch_size=8))
    assert all(not m._forward_hooks for m in model.modules())
    assert not fm.capture.armed
    fm, qm, rm = _suite()
    dm = SyntheticTasks(n_train=32, n_val=8, n_probe=0, batch_size=8)
    trainer = pl.Trainer(
        max_steps=4,
        val_check_interval=4,
        limit_val_batches=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        callbacks=[fm, qm, rm],
        default_root_dir=tmp_path,
    )
    with pytest.warns(UserWarning, match="not watched"):
        trainer.fit(TinyGPT(**SMALL), datamodule=dm)
    assert trainer.global_step == 4


def test_predict_on_monitored_weights_only(tmp_path):
    fm, qm, rm = _suite(predict_on="monitored")
    _fit(tmp_path, 3e-3, [fm, rm], max_steps=8)
    names = set(fm.layout.monitored_parameters())
    assert set(rm.forecaster.base) == names
    assert set(fm.probe["general"].grad) == names
    hist = rm.history["general"]
    assert len(hist["predicted"]) == 2 and all(math.isfinite(p) for p in hist["predicted"])

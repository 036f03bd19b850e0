"""A checkpoint written by an earlier version loads and resumes to the uninterrupted history.

``fixtures/suite_step8.ckpt`` and ``fixtures/suite_history.json`` were written once by
``fixtures/make_suite_checkpoint.py`` at commit 33c633f (the three monitors as Lightning
callbacks holding their own state). The resumed run continues from step 8 with the current code
and must give the 12-step history that version gave without interruption.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from fisher_callbacks.callbacks import FisherMonitor, ForgettingRiskMonitor, QKOVInterferenceMonitor
from lightning_examples.synthetic import SyntheticTasks, TinyGPT, collate

FIXTURES = Path(__file__).resolve().parent / "fixtures"


SMALL = dict(n_layer=2, n_head=4, n_embd=32, pretrain_steps=40, pretrain_lr=1e-2)


class _OneBatch(SyntheticTasks):
    """One fixed batch per epoch, unshuffled: a resumed run sees the same data as an unbroken one."""

    def train_dataloader(self):
        return DataLoader(self.train_set, self.hparams.batch_size, collate_fn=collate)


def fit(root, max_steps, ckpt_path=None, save=None):
    """The fixture's run: tiny GPT-2, the three monitors, validation every 4 steps."""
    fm = FisherMonitor(
        train_task="math",
        reference_tasks=["general"],
        capture_every_n_steps=4,
        max_samples_per_task=16,
        probe_max_samples=16,
    )
    qm = QKOVInterferenceMonitor(fm, pairs=[("general", "math")], n_permutations=20, top_k=5)
    rm = ForgettingRiskMonitor(fm, reference_tasks=["general"], warn_threshold=0.3)
    extra = [ModelCheckpoint(dirpath=save, every_n_train_steps=8, save_top_k=-1)] if save else []
    trainer = pl.Trainer(
        max_steps=max_steps,
        val_check_interval=4,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        callbacks=[fm, qm, rm, *extra],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=root,
        num_sanity_val_steps=0,
        enable_checkpointing=bool(save),
    )
    dm = _OneBatch(n_train=8, n_val=8, n_probe=16, batch_size=8)
    trainer.fit(TinyGPT(lr=3e-3, **SMALL), datamodule=dm, ckpt_path=ckpt_path)
    return trainer, fm, qm, rm


def _close(a, b, rel=1e-4, abs_=1e-6):
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, rel, abs_) for x, y in zip(a, b))
    if isinstance(a, float) and not math.isfinite(a):
        return not math.isfinite(b)
    return a == pytest.approx(b, rel=rel, abs=abs_)


def test_old_checkpoint_resumes_to_the_uninterrupted_history(tmp_path):
    expected = json.loads((FIXTURES / "suite_history.json").read_text())
    trainer, fm, qm, rm = fit(tmp_path, 12, ckpt_path=str(FIXTURES / "suite_step8.ckpt"))
    assert trainer.global_step == 12
    hist = rm.history["general"]
    assert hist["step"] == [4, 8, 12]
    for key, values in expected["forgetting_history"].items():
        assert key in hist, key
        assert _close(hist[key], values), (key, hist[key], values)
    for task, trace in expected["fisher_trace"].items():
        got = sum(float(f.sum()) for f in fm.collector.fisher(task).values())
        assert got == pytest.approx(trace, rel=1e-4), task
        assert fm.collector.num_samples(task) == expected["num_samples"][task]
    assert sorted(map(list, qm.latest)) == expected["qkov_latest_keys"]
    for key, value in expected["qkov"].items():
        got = float(trainer.callback_metrics[key])
        assert got == pytest.approx(value, rel=1e-3, abs=1e-5), key
    assert all(torch.isfinite(t).all() for t in rm._anchor.values())

"""The per-sample gradients the FisherMonitor takes from the training backward match the
micro-batch reference under gradient accumulation (fp32: 1e-5) and bf16-mixed (bf16: 3e-2)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from reference import microbatch_gradients

from fisher_callbacks.callbacks import FisherMonitor
from lightning_examples.synthetic import SyntheticTasks, TinyGPT, collate


@pytest.mark.parametrize(("precision", "tol"), [("32-true", 1e-5), ("bf16-mixed", 3e-2)])
def test_training_capture_with_accumulation_matches_microbatch(tmp_path, precision, tol):
    model = TinyGPT(n_layer=2, n_head=4, n_embd=32, pretrain_steps=0, lr=0.0)
    dm = SyntheticTasks(n_train=16, batch_size=4)
    fm = FisherMonitor(
        train_task="math", capture_every_n_steps=1, max_samples_per_task=64, ema_samples_per_step=0
    )
    trainer = pl.Trainer(
        max_steps=1,
        accumulate_grad_batches=4,
        precision=precision,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[fm],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    ids, stored = fm.collector.stored_gradients("math")
    assert len(ids) == 16  # 4 micro-batches of 4, one optimizer step
    batch = collate([dm.train_set[i] for i in ids])
    model.float()
    ref = microbatch_gradients(model, batch, list(stored))
    for name, rows in stored.items():
        err = ((rows.float() - ref[name]).norm() / ref[name].norm()).item()
        assert err <= tol, (name, err)

"""Run by tests/test_distributed.py: 2-process CPU DDP (gloo) with the callbacks attached.

Writes, from rank 0, the synced Fisher of the training task, the sample ids every rank captured
and the figure files the loggers got, to the path given as argv[1].
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import CSVLogger

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fisher_callbacks.callbacks import FisherMonitor, QKOVInterferenceMonitor
from fisher_callbacks.callbacks._host import LightningHost
from lightning_examples.synthetic import SyntheticTasks, TinyGPT


class Dump(pl.Callback):
    def __init__(self, fm: FisherMonitor, out: str) -> None:
        self.fm, self.out = fm, out

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        self.fm.refresh(LightningHost(trainer, pl_module))
        ids = self.fm.collector.sample_ids("math")
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, ids)
        if trainer.is_global_zero:
            torch.save(
                {
                    "fisher": self.fm.collector.fisher("math"),
                    "count": self.fm.collector.num_samples("math"),
                    "ids": gathered,
                    "world": dist.get_world_size(),
                    "ema_steps": self.fm.collector.ema_steps("math"),
                },
                self.out,
            )


def main(out: str, log_dir: str) -> None:
    model = TinyGPT(n_layer=2, n_head=4, n_embd=32, pretrain_steps=0, lr=0.0)
    dm = SyntheticTasks(n_train=32, n_val=8, n_probe=8, batch_size=4)
    fm = FisherMonitor(
        train_task="math",
        reference_tasks=["general"],
        capture_every_n_steps=1,
        max_samples_per_task=64,
        ema_samples_per_step=0,
    )
    qm = QKOVInterferenceMonitor(fm, pairs=[("general", "math")], n_permutations=10)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=3,
        val_check_interval=3,
        limit_val_batches=1,
        logger=CSVLogger(log_dir),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[fm, qm, Dump(fm, out)],
    )
    trainer.fit(model, datamodule=dm)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""Run by tests/test_sketch.py: 2-process CPU DDP (gloo) with a sketched FisherMonitor.

Writes, from rank 0, the whitening frozen at the first step with the first step's sample ids of
every rank, and every rank's stored "math" sketches (ids and rows), to the path given as argv[1].
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fisher_callbacks.callbacks import FisherMonitor
from fisher_callbacks.callbacks._host import LightningHost
from lightning_examples.synthetic import SyntheticTasks, TinyGPT, sharded_fit_trainer


class Dump(pl.Callback):
    def __init__(self, fm: FisherMonitor, out: str) -> None:
        self.fm, self.out, self.first = fm, out, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            ids = [None] * dist.get_world_size()
            dist.all_gather_object(ids, batch["sample_id"].tolist())
            store = self.fm.collector.store
            self.first = {"ids": ids, "whitening": {n: w.clone() for n, w in store.whitening.items()}}

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        self.fm.refresh(LightningHost(trainer, pl_module))
        store = self.fm.collector.store
        state = store.state_dict()["tasks"]["math"]
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(
            gathered, {"ids": state["ids"], "rows": state["rows"], "versions": state["versions"]}
        )
        if trainer.is_global_zero:
            torch.save({"first": self.first, "ranks": gathered, "world": dist.get_world_size()}, self.out)


def main(out: str) -> None:
    model = TinyGPT(n_layer=2, n_head=4, n_embd=32, pretrain_steps=0, lr=0.0)
    dm = SyntheticTasks(n_train=32, n_val=8, n_probe=8, batch_size=4)
    fm = FisherMonitor(
        train_task="math",
        reference_tasks=["general"],
        capture_every_n_steps=1,
        max_samples_per_task=64,
        ema_samples_per_step=0,
        store="sketch",
        sketch_dim=64,
    )
    trainer = sharded_fit_trainer("ddp", 2, [fm, Dump(fm, out)], max_steps=3, val_check_interval=3)
    trainer.fit(model, datamodule=dm)


if __name__ == "__main__":
    main(sys.argv[1])

"""Run by tests/test_distributed_reliability.py: 2-process CPU runs (gloo) of the monitors.

``ddp OUT``: strategy="ddp" with probe sets split unevenly: "general" has 8 samples on rank 0 and
none on rank 1, "shaky" has 8 samples on rank 0 and a loader that raises on rank 1; a tiny
stop_threshold stops the run (per-step forecast or first boundary). Each rank writes ``OUT/rank{r}.pt``.

``ddp_spawn OUT``: strategy="ddp_spawn" (the callbacks are pickled to the children); every child
writes ``OUT/rank{r}.pt`` at train end and the parent writes ``OUT/parent.pt`` after ``fit``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fisher_callbacks.callbacks import FisherMonitor, ForgettingRiskMonitor
from lightning_examples.synthetic import SyntheticTask, SyntheticTasks, TinyGPT, collate


def _broken(items):
    raise RuntimeError("broken probe batch on this rank")


class UnevenProbes(SyntheticTasks):
    def probe_dataloader(self, task: str) -> DataLoader:
        rank = self.trainer.global_rank
        data = SyntheticTask("general", 8, seed=7)
        if rank == 0:
            return DataLoader(data, batch_size=4, collate_fn=collate)
        if task == "general":
            return DataLoader([], batch_size=4, collate_fn=collate)  # empty on rank 1
        return DataLoader(data, batch_size=4, collate_fn=_broken)  # fails on rank 1


class Dump(pl.Callback):
    def __init__(self, fm: FisherMonitor, out: str) -> None:
        self.fm, self.out = fm, out

    def on_train_end(self, trainer, pl_module):
        c = self.fm.collector
        torch.save(
            {
                "keys": sorted(trainer.callback_metrics),
                "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
                "probe_n": {t: p.n for t, p in self.fm.probe.items()},
                "num_samples": {t: c.num_samples(t) for t in c.tasks},
                "global_step": trainer.global_step,
            },
            Path(self.out) / f"rank{trainer.global_rank}.pt",
        )


def main(mode: str, out: str) -> None:
    common = dict(
        accelerator="cpu",
        devices=2,
        strategy=mode,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    if mode == "ddp":
        fm = FisherMonitor(train_task="math", reference_tasks=["general", "shaky"], capture_every_n_steps=1)
        rm = ForgettingRiskMonitor(fm, reference_tasks=["general", "shaky"], stop_threshold=1e-6)
        model = TinyGPT(n_layer=2, n_head=2, n_embd=16, pretrain_steps=30, pretrain_lr=1e-2, lr=5e-2)
        dm = UnevenProbes(n_train=64, n_val=8, batch_size=4)
        trainer = pl.Trainer(max_steps=8, val_check_interval=2, callbacks=[fm, rm, Dump(fm, out)], **common)
    else:
        fm = FisherMonitor(
            train_task="math", reference_tasks=["general"], capture_every_n_steps=1, ema_samples_per_step=0
        )
        model = TinyGPT(n_layer=2, n_head=2, n_embd=16, pretrain_steps=0, lr=0.0)
        dm = SyntheticTasks(n_train=32, n_val=8, n_probe=8, batch_size=4)
        trainer = pl.Trainer(max_steps=3, val_check_interval=3, callbacks=[fm, Dump(fm, out)], **common)
    trainer.fit(model, datamodule=dm)
    if mode == "ddp_spawn":  # the parent: what Lightning sent back
        torch.save(
            {
                "collector_is_none": fm.collector is None,
                "probe": dict(fm.probe),
                "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            },
            Path(out) / "parent.pt",
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

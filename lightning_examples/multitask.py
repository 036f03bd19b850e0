"""Multi-task fine-tuning where every batch mixes tasks: ``batch["task"]`` tags each sample.

The FisherMonitor files each captured sample under its own task (and true ``sample_id``), so one
training run yields a Fisher and a per-sample store per task, and the QK-OV monitor compares them
pairwise while the run is live. Run: ``python lightning_examples/multitask.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
from torch.utils.data import ConcatDataset, DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fisher_callbacks import FisherMonitor, QKOVInterferenceMonitor
from lightning_examples.synthetic import SyntheticTask, TinyGPT, collate


class OffsetIds(SyntheticTask):
    """Give the second task distinct dataset ids so ids stay unique across the mixture."""

    def __init__(self, task: str, n: int, offset: int, seed: int = 0) -> None:
        super().__init__(task, n, seed=seed)
        self.offset = offset

    def __getitem__(self, i):
        item = super().__getitem__(i)
        item["sample_id"] = i + self.offset
        return item


def main(max_steps: int = 20, root: str = "runs/multitask") -> FisherMonitor:
    mixture = ConcatDataset([OffsetIds("general", 128, 0), OffsetIds("math", 128, 10_000)])
    train = DataLoader(mixture, batch_size=16, shuffle=True, collate_fn=collate)
    val = DataLoader(SyntheticTask("math", 16, seed=1), batch_size=8, collate_fn=collate)
    monitor = FisherMonitor(capture_every_n_steps=2, max_samples_per_task=32)  # tasks from batch
    trainer = pl.Trainer(
        max_steps=max_steps,
        val_check_interval=10,
        check_val_every_n_epoch=None,
        accelerator="cpu",
        default_root_dir=root,
        enable_progress_bar=False,
        callbacks=[monitor, QKOVInterferenceMonitor(monitor, pairs=[("general", "math")], n_permutations=50)],
    )
    trainer.fit(TinyGPT(pretrain_steps=0, lr=1e-3), train, val)
    for task in monitor.collector.tasks:
        print(
            f"{task}: {monitor.collector.num_samples(task)} samples in the Fisher, "
            f"stored ids {monitor.collector.sample_ids(task)[:5]}..."
        )
    return monitor


if __name__ == "__main__":
    main()

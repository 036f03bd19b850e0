"""Attach the suite to a LightningModule you already have, in a handful of added lines.

The module below is an ordinary Hugging Face fine-tuning module; the lines marked ``# + fc`` are
all that fisher_callbacks needs (7 lines). Run: ``python lightning_examples/attach_to_existing.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fisher_callbacks as fc  # + fc
from lightning_examples.synthetic import SyntheticTask, collate


class ExistingFineTuner(pl.LightningModule):
    """What you already have: a wrapped Hugging Face model, HF's own loss, AdamW."""

    def __init__(self, lr: float = 3e-4) -> None:
        super().__init__()
        config = AutoConfig.for_model(
            "gpt2",
            n_layer=2,
            n_head=4,
            n_embd=64,
            vocab_size=32,
            n_positions=32,
            bos_token_id=2,
            eos_token_id=2,
        )
        self.net = AutoModelForCausalLM.from_config(config)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        return self.net(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss

    def validation_step(self, batch, batch_idx):
        loss = self.net(**{k: batch[k] for k in ("input_ids", "labels")}).loss
        self.log("val_loss", loss, batch_size=batch["input_ids"].shape[0])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main(max_steps: int = 20, root: str = "runs/attach_to_existing") -> pl.Trainer:
    train = DataLoader(SyntheticTask("math", 128), batch_size=8, shuffle=True, collate_fn=collate)
    val = DataLoader(SyntheticTask("math", 16, seed=1), batch_size=8, collate_fn=collate)
    probe = DataLoader(SyntheticTask("general", 16, seed=2), batch_size=8, collate_fn=collate)  # + fc
    monitor = fc.FisherMonitor("math", {"general": probe}, capture_every_n_steps=5)  # + fc
    qkov = fc.QKOVInterferenceMonitor(monitor, pairs=[("general", "math")], n_permutations=50)  # + fc
    risk = fc.ForgettingRiskMonitor(monitor, reference_tasks=["general"], warn_threshold=0.5)  # + fc
    callbacks = [monitor, qkov, risk]  # + fc
    trainer = pl.Trainer(
        max_steps=max_steps,
        val_check_interval=5,
        check_val_every_n_epoch=None,
        accelerator="cpu",
        default_root_dir=root,
        callbacks=callbacks,  # + fc
        enable_progress_bar=False,
    )
    trainer.fit(ExistingFineTuner(), train, val)
    return trainer


if __name__ == "__main__":
    main()

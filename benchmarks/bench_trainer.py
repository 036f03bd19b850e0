"""Overhead of the callback suite inside a real Trainer, against the same Trainer without it.

Short fits with and without the callbacks alternate in one process (so machine noise hits both);
a timing callback measures each training step from batch start to batch end (forward, backward,
hooks, optimizer). Prints, for tiny GPT-2 and Llama-GQA (4 layers, hidden 256, B=16, T=64):
- flagged step (per-sample capture of all Q/K/V/O) / plain step     budget <= 1.15x
- non-flagged step (EMA from a 4-sample subset) / plain step         budget <= 1.05x (median)
- validation-boundary work of the monitors, reported separately (seconds per boundary)
Usage: python benchmarks/bench_trainer.py [--rounds 4 --steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from bench_scale import build
from common import bench_model, lm_data, verdict

import fisher_callbacks as fc


class LM(pl.LightningModule):
    """``kind``: ``"gpt2"`` or ``"llama"`` (4 layers, hidden 256), or ``"135m"`` (the SmolLM-135M
    shape of ``bench_scale.py``)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net = build(kind) if kind == "135m" else bench_model(kind)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.net(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch, batch_idx):
        return self(**batch).loss

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class StepTimer(pl.Callback):
    """Wall time of each training step, from before the first callback's ``on_train_batch_start``
    to after the last one's ``on_train_batch_end`` (use :meth:`around`); flags which steps the
    FisherMonitor captured fully and which made an EMA update."""

    def __init__(self, monitor: fc.FisherMonitor | None = None) -> None:
        self.monitor = monitor
        self.flagged: list[float] = []
        self.plain: list[float] = []
        self.steps: list[tuple[int, bool, float]] = []  # (step, EMA update, seconds), non-flagged
        self.probed: set[int] = set()  # steps a benchmark times apart (early probes)

    def around(self, callbacks: list[pl.Callback]) -> list[pl.Callback]:
        """``callbacks`` between this timer's start (first) and its end (last)."""
        return [_StepStart(self), *callbacks, self]

    def start(self, trainer) -> None:
        self._flag = self.monitor is not None and self.monitor.is_flagged(trainer.global_step)
        self._ema = self.monitor.ema_updates if self.monitor is not None else 0
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        dt = time.perf_counter() - self._t0
        if trainer.global_step > 2:  # skip warm-up steps
            (self.flagged if self._flag else self.plain).append(dt)
            if not self._flag:
                ema = self.monitor is not None and self.monitor.ema_updates > self._ema
                self.steps.append((trainer.global_step, ema, dt))


class _StepStart(pl.Callback):
    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.timer.start(trainer)


class BoundaryTimer(pl.Callback):
    """Time of the monitors' validation-boundary work (this callback wraps them)."""

    def __init__(self, inner: list[pl.Callback]) -> None:
        self.inner = inner
        self.seconds: list[float] = []

    def on_validation_epoch_end(self, trainer, pl_module):
        t0 = time.perf_counter()
        for cb in self.inner:
            cb.on_validation_epoch_end(trainer, pl_module)
        self.seconds.append(time.perf_counter() - t0)


def _loader(n_batches: int, batch: int, seq: int) -> DataLoader:
    items = []
    for i in range(n_batches):
        d = lm_data(batch, seq, seed=i)
        items.extend({k: v[j] for k, v in d.items()} for j in range(batch))
    return DataLoader(items, batch_size=batch)


def run(kind: str, rounds: int, steps: int, every: int, batch: int, seq: int) -> None:
    warnings.filterwarnings("ignore")
    base_times, flagged, non_flagged, boundary = [], [], [], []
    for r in range(rounds):
        for monitored in (False, True):
            torch.manual_seed(r)
            model = LM(kind)
            timer_cbs: list[pl.Callback] = []
            if monitored:
                probe = _loader(1, batch, seq)
                fm = fc.FisherMonitor(
                    reference_tasks={"ref": probe},
                    capture_every_n_steps=every,
                    max_samples_per_task=32,
                    gradient_memory_mb=256,
                )
                qm = fc.QKOVInterferenceMonitor(
                    fm, pairs=[("ref", "train")], n_permutations=50, log_figures=False
                )
                timer = StepTimer(fm)
                bt = BoundaryTimer([qm])
                timer_cbs = timer.around([fm, bt])
            else:
                timer = StepTimer()
                timer_cbs = timer.around([])
            trainer = pl.Trainer(
                max_steps=steps,
                accelerator="cpu",
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=timer_cbs,
                val_check_interval=steps,
                check_val_every_n_epoch=None,
                limit_val_batches=1,
                num_sanity_val_steps=0,
            )
            trainer.fit(model, _loader(steps, batch, seq), _loader(1, batch, seq))
            if monitored:
                flagged += timer.flagged
                non_flagged += timer.plain
                boundary += bt.seconds
            else:
                base_times += timer.plain
    base = statistics.median(base_times)
    r_flag = statistics.median(flagged) / base
    r_plain = statistics.median(non_flagged) / base if non_flagged else float("nan")
    print(
        f"\n{kind}: B={batch}, T={seq}, {rounds} rounds x {steps} steps, capture every {every}; "
        f"plain step {base * 1e3:.1f} ms (median of {len(base_times)})"
    )
    print(
        f"  flagged step / plain step        {r_flag:5.2f}x  budget <= 1.15x  {verdict(r_flag, 1.15)}"
        f"  (n={len(flagged)})"
    )
    if non_flagged:
        print(
            f"  non-flagged step / plain step    {r_plain:5.2f}x  budget <= 1.05x  {verdict(r_plain, 1.05)}"
            f"  (n={len(non_flagged)})"
        )
    else:
        print("  non-flagged step: none (every step captured)")
    print(
        f"  validation boundary (probe pass + QK-OV heatmap, 50 permutations): "
        f"{statistics.median(boundary):.2f} s = {statistics.median(boundary) / base:.0f} plain steps"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--kinds", default="gpt2,llama")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (ratios vs a plain step)")
    for kind in args.kinds.split(","):
        run(kind, args.rounds, args.steps, args.every, args.batch, args.seq)


if __name__ == "__main__":
    main()

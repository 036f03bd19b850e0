"""Cost of the per-step forgetting forecast inside a real Trainer.

Three configurations alternate in one process, round after round (machine noise hits all alike):
a plain Trainer, the suite (FisherMonitor + ForgettingRiskMonitor) with ``forecast=False``, and
the suite with the forecast on. A timing callback (last in the list, so it includes the
forecast's ``on_train_batch_end``) measures every non-flagged training step. Prints, for tiny
GPT-2 and Llama-GQA (4 layers, hidden 256, B=16, T=64):

- non-flagged step with the forecast / plain step              budget <= 1.05x (median)
- non-flagged step with the forecast / the same without it      (the forecast's own share)
- the forecast alone (per predicted parameter a subtraction and one
  ``[n_tasks + 1, n_p] @ [n_p]`` product), timed directly, as a fraction of a plain step
- the forecast's memory: flat fp32 theta_b and ``[n_tasks + 1, N]`` rows, vs the model

Usage: python benchmarks/bench_forecast.py [--rounds 4 --steps 30]
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

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from bench_trainer import LM, StepTimer, _loader
from common import verdict

import fisher_callbacks as fc


def _fit(kind: str, seed: int, steps: int, every: int, batch: int, seq: int, forecast: bool | None):
    torch.manual_seed(seed)
    model = LM(kind)
    cbs: list[pl.Callback] = []
    fm = rm = None
    if forecast is not None:
        fm = fc.FisherMonitor(
            reference_tasks={"ref": _loader(1, batch, seq)},
            capture_every_n_steps=every,
            max_samples_per_task=32,
            gradient_memory_mb=256,
        )
        rm = fc.ForgettingRiskMonitor(fm, reference_tasks=["ref"], forecast=forecast)
        cbs = [fm, rm]
    timer = StepTimer(fm)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*cbs, timer],
        val_check_interval=steps,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, _loader(steps, batch, seq), _loader(1, batch, seq))
    return timer.plain, rm, model


def run(kind: str, rounds: int, steps: int, every: int, batch: int, seq: int) -> None:
    warnings.filterwarnings("ignore")
    times: dict[str, list[float]] = {"plain": [], "no_forecast": [], "forecast": []}
    direct: list[float] = []
    rm = model = None
    for r in range(rounds):
        for name, forecast in (("plain", None), ("no_forecast", False), ("forecast", True)):
            plain, mon, net = _fit(kind, r, steps, every, batch, seq, forecast)
            times[name] += plain
            if forecast:
                rm, model = mon, net
    for _ in range(50):  # the forecast alone, on the last fitted monitor
        t0 = time.perf_counter()
        rm._forecast_values()
        direct.append(time.perf_counter() - t0)
    base = statistics.median(times["plain"])
    with_fc = statistics.median(times["forecast"]) / base
    without = statistics.median(times["no_forecast"]) / base
    alone = statistics.median(direct) / base
    n = rm._fc_base.numel()
    fc_mb = (rm._fc_base.numel() + rm._fc_grads.numel()) * 4 / 2**20
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(
        f"\n{kind}: B={batch}, T={seq}, {rounds} rounds x {steps} steps, capture every {every}; "
        f"plain step {base * 1e3:.1f} ms (median of {len(times['plain'])})"
    )
    print(
        f"  non-flagged step, forecast on / plain step     {with_fc:5.3f}x  budget <= 1.05x  "
        f"{verdict(with_fc, 1.05)}"
    )
    print(f"  non-flagged step, forecast off / plain step    {without:5.3f}x")
    print(f"  forecast on / forecast off                     {with_fc / without:5.3f}x")
    print(
        f"  forecast alone (timed directly) / plain step   {alone:5.3f}x  "
        f"({statistics.median(direct) * 1e3:.2f} ms)"
    )
    print(
        f"  forecast memory: {fc_mb:.1f} MB (theta_b + g_A + Delta over {n} weights); model {model_mb:.1f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--kinds", default="gpt2,llama")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (ratios vs a plain step)")
    for kind in args.kinds.split(","):
        run(kind, args.rounds, args.steps, args.every, args.batch, args.seq)


if __name__ == "__main__":
    main()

"""Cost of the per-step forgetting forecast and of the EMA capture inside a real Trainer.

Three configurations alternate in one process, round after round (machine noise hits all alike):
a plain Trainer, the suite (FisherMonitor + ForgettingRiskMonitor) with ``forecast=False``, and
the suite with the forecast on. A timing callback around the others (it starts before the first
``on_train_batch_start`` and stops after the last ``on_train_batch_end``) measures every
non-flagged training step. A fourth fit per round makes an EMA update every other step only, so
each EMA step is compared with its two neighbours in the same fit, where slow machine drift
cancels. Prints, for tiny GPT-2 and Llama-GQA (4 layers, hidden 256, B=16, T=64):

- non-flagged step with the forecast / plain step              budget <= 1.05x (median, and the
  mean: what a run pays, with the EMA update every ``ema_every_n_steps``)
- non-flagged step with the forecast / the same without it      (the forecast's own share)
- EMA step / neighbouring steps without one (paired)           (the EMA capture's own share)
- an early-probe step (one forward and backward over the probe set; steps 1, 2, 4, ... of the
  first interval, once per fit) / plain step: not in the non-flagged steps above
- the forecast alone (per predicted parameter one ``[n_tasks + 1, n_p] @ [n_p]`` product of the
  live weights, less the same product of theta_b), timed directly, as a fraction of a plain step
- the forecast's memory: flat fp32 theta_b and ``[n_tasks + 1, N]`` rows, vs the model

Usage: python benchmarks/bench_forecast.py [--rounds 6 --steps 30]
"""

from __future__ import annotations

import argparse
import gc
import inspect
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


def _fit(
    kind: str,
    seed: int,
    steps: int,
    every: int,
    batch: int,
    seq: int,
    forecast: bool | None,
    ema_every: int | None = None,
) -> tuple[StepTimer, fc.ForgettingRiskMonitor | None, pl.LightningModule]:
    gc.collect()  # the previous fit's callbacks and optimizer state form cycles: free them first
    torch.manual_seed(seed)
    model = LM(kind)
    cbs: list[pl.Callback] = []
    fm = rm = None
    if forecast is not None:
        fm = fc.FisherMonitor(
            reference_tasks={"ref": _loader(1, batch, seq)},
            capture_every_n_steps=every,
            **({} if ema_every is None else {"ema_every_n_steps": ema_every}),
            max_samples_per_task=32,
            gradient_memory_mb=256,
        )
        rm = fc.ForgettingRiskMonitor(fm, reference_tasks=["ref"], forecast=forecast)
        cbs = [fm, rm]
    timer = StepTimer(fm)
    if fm is not None:  # the early probes' steps (1, 2, 4, ... of the first interval): timed apart
        probe_gradient = fm.probe_gradient

        def probed(host, task):
            timer.probed.add(host.step)
            return probe_gradient(host, task)

        fm.probe_gradient = probed
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=timer.around(cbs),
        val_check_interval=steps,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, _loader(steps, batch, seq), _loader(1, batch, seq))
    timer.monitor = None  # the timings only: nothing of this fit needs to outlive it
    return timer, rm, model


def _trimmed_mean(values: list[float], drop: float = 0.05) -> float:
    kept = sorted(values)[: max(1, round(len(values) * (1.0 - drop)))]
    return statistics.fmean(kept)


def _ema_every() -> int:
    return inspect.signature(fc.FisherMonitor).parameters["ema_every_n_steps"].default


def _paired(timer: StepTimer) -> list[float]:
    """Each EMA step over the mean of its two neighbours (steps without an EMA update, same fit;
    early-probe steps left out)."""
    by_step = {step: (ema, dt) for step, ema, dt in timer.steps if step not in timer.probed}
    out = []
    for step, (ema, dt) in by_step.items():
        before, after = by_step.get(step - 1), by_step.get(step + 1)
        if ema and before and after and not before[0] and not after[0]:
            out.append(dt / (0.5 * (before[1] + after[1])))
    return out


def run(kind: str, rounds: int, steps: int, every: int, batch: int, seq: int) -> None:
    warnings.filterwarnings("ignore")
    configs = {"plain": None, "no_forecast": False, "forecast": True}
    times: dict[str, list[float]] = {name: [] for name in configs}
    paired: list[float] = []
    direct: list[float] = []
    # One fit alive at a time (a 135M fit holds GBs); the forecast is then timed alone on a fresh
    # fit's monitor.
    probes: list[float] = []  # early-probe steps of the suite with the forecast
    for r in range(rounds):
        for name, forecast in configs.items():
            timer = _fit(kind, r, steps, every, batch, seq, forecast)[0]
            times[name] += [dt for step, _, dt in timer.steps if step not in timer.probed]
            probes += [dt for step, _, dt in timer.steps if step in timer.probed]
        # the suite with the forecast, an EMA update every other step and no flagged step: each EMA
        # step against its neighbours in the same fit (the drift of the machine cancels)
        paired += _paired(_fit(kind, r, steps, 0, batch, seq, True, ema_every=2)[0])
    _, rm, model = _fit(kind, 0, 4, every, batch, seq, True)
    for _ in range(50):  # the forecast alone, on the last fitted monitor
        t0 = time.perf_counter()
        rm.forecaster.step({t: rm.warnings.last_drift(t) for t in rm.forecaster.tasks})
        direct.append(time.perf_counter() - t0)
    base = statistics.median(times["plain"])
    with_fc = statistics.median(times["forecast"]) / base
    without = statistics.median(times["no_forecast"]) / base
    # the mean is what a run pays (the EMA updates every ema_every_n_steps); the slowest 5% of
    # each configuration's steps are dropped (collector pauses, a neighbour's burst)
    mean_base = _trimmed_mean(times["plain"])
    mean_fc = _trimmed_mean(times["forecast"]) / mean_base
    mean_without = _trimmed_mean(times["no_forecast"]) / mean_base
    alone = statistics.median(direct) / base
    ema = statistics.median(paired)
    q1, _, q3 = statistics.quantiles(paired, n=4)
    n = rm.forecaster.flat_base.numel()
    fc_mb = (n + rm.forecaster.flat_grads.numel()) * 4 / 2**20
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(
        f"\n{kind}: B={batch}, T={seq}, {rounds} rounds x {steps} steps, capture every {every}; "
        f"plain step {base * 1e3:.1f} ms (median of {len(times['plain'])})"
    )
    print(
        f"  non-flagged step, forecast on / plain step     {with_fc:5.3f}x  budget <= 1.05x  "
        f"{verdict(with_fc, 1.05)}  (median, n={len(times['forecast'])})"
    )
    print(
        f"                                    the mean     {mean_fc:5.3f}x  budget <= 1.05x  "
        f"{verdict(mean_fc, 1.05)}  (EMA every {_ema_every()} steps)"
    )
    print(f"  non-flagged step, forecast off / plain step    {without:5.3f}x  (mean {mean_without:5.3f}x)")
    print(f"  forecast on / forecast off                     {with_fc / without:5.3f}x")
    print(
        f"  EMA step / its neighbours without EMA (paired) {ema:5.3f}x  (quartiles {q1:.3f}-{q3:.3f}, "
        f"n={len(paired)})"
    )
    print(
        f"  forecast alone (timed directly) / plain step   {alone:5.3f}x  "
        f"({statistics.median(direct) * 1e3:.2f} ms)"
    )
    if probes:
        print(
            f"  early-probe step / plain step                  {statistics.median(probes) / base:5.3f}x  "
            f"(steps 1, 2, 4, ... of the first interval; n={len(probes)}, the timed ones)"
        )
    print(
        f"  forecast memory: {fc_mb:.1f} MB (theta_b + g_A + Delta over {n} weights); model {model_mb:.1f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=6)
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

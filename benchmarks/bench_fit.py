"""What the suite costs a whole Lightning fit: time and peak memory, plain against monitored.

The same fit (model, data, seed, optimizer) runs without and with the three monitors at their
defaults (one reference task of 8 probe texts, one training task), each in its own process,
alternating plain / monitored, ``--repeats`` times. Models are built from configs (random init,
no downloads): ``gpt2`` and ``llama`` (the tiny benchmark models of ``common.py``) and ``135m``
(the SmolLM-135M Llama-GQA shape of ``bench_scale.py``). AdamW, B=4, T=64, a CSVLogger (figures
are written as PNG files). Cadences:

- ``realistic``: validation and capture every 50 steps (``--steps``, default 100: two boundaries);
- ``demo``: the demo's (``configs/forgetting_demo.yaml``): validation and capture every 5 steps,
  heatmaps every 3rd validation (``--demo-steps``, default 20).

Printed per model and cadence: wall time of ``trainer.fit`` (medians), the ratio (budget <= 1.10x
at the realistic cadence on 135m), peak RSS of each process and its difference (budget <= 1x the
trainable weights' bytes; ``torch.cuda.max_memory_allocated`` too with ``--device cuda``), the
suite's memory ledger, and where the extra time goes (exclusive seconds per fit, medians):

- steps: flagged steps, EMA steps and the other steps, each against the plain run's median step;
- forecast (the forgetting monitor's per-step work) and its early probes;
- per boundary: probe pass, Fisher sync (and the sketch whitening), heatmaps, permutation tests,
  figures, logging, and the rest of each monitor's boundary; one boundary is compared to the time
  of 10 plain steps (budget).

Run: ``python benchmarks/bench_fit.py [--models gpt2,llama,135m] [--cadences realistic,demo]
[--repeats 3] [--device cpu|cuda] [--dtype float32|bfloat16]``. Each row prints ``uptime``'s load
first: on a shared machine compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

CADENCES = {
    # name: (validation / capture every n steps, heatmaps every n validations)
    "realistic": (50, 1),
    "demo": (5, 3),
}
BATCH, SEQ, N_PROBE = 4, 64, 8


# ---------------------------------------------------------------------- timing of named work
class Ledger:
    """Exclusive wall time per label: a wrapped call's time minus that of wrapped calls inside it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[float] = []  # time spent in wrapped children, per open call
        self.in_step = 0.0  # wrapped time inside the current training step

    def wrap(self, owner: object, attr: str, label: str) -> None:
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self._stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                children = self._stack.pop()
                self.seconds[label] = self.seconds.get(label, 0.0) + dt - children
                self.calls[label] = self.calls.get(label, 0) + 1
                if self._stack:
                    self._stack[-1] += dt
                else:
                    self.in_step += dt

        setattr(owner, attr, timed)


def instrument(ledger: Ledger) -> None:
    """Wrap the suite's named pieces of work (in the namespaces the callbacks call them from)."""
    from fisher_callbacks import interference
    from fisher_callbacks.callbacks import fisher_monitor, forgetting_monitor, qkov_monitor
    from fisher_callbacks.engine import fisher as fisher_engine
    from fisher_callbacks.engine import forgetting, forgetting_report, qkov
    from fisher_callbacks.fisher import FisherCollector

    fm, qm = fisher_monitor.FisherMonitor, qkov_monitor.QKOVInterferenceMonitor
    rm = forgetting_monitor.ForgettingRiskMonitor
    for owner, attr, label in [
        (fm, "run_probe", "boundary: probe pass"),
        (FisherCollector, "sync", "boundary: Fisher sync"),
        (FisherCollector, "freeze_whitening", "boundary: Fisher sync"),
        (fm, "_boundary", "boundary: FisherMonitor rest"),
        (qm, "_boundary", "boundary: QK-OV rest"),
        (interference.QKOVInterferenceMetric, "compute_heatmap", "boundary: heatmaps"),
        (interference.QKOVInterferenceMetric, "_significance", "boundary: permutation tests"),
        (interference, "gram_conflict_test", "boundary: permutation tests"),
        (qm, "_log_figures", "boundary: figures"),
        (forgetting_report.ForgettingReport, "attribution", "boundary: figures"),
        (forgetting_report.ForgettingReport, "timeline", "boundary: figures"),
        (rm, "_boundary", "boundary: forgetting monitor"),
        (rm, "on_train_batch_end", "forecast"),
        (rm, "_early_probe", "early probes"),
        (rm, "on_fit_start", "fit start: forgetting anchor"),
        (fm, "log_memory", "fit start: memory ledger"),
    ]:
        if hasattr(owner, attr):
            ledger.wrap(owner, attr, label)
    figures = ("log_figure", "save_arrays", "send_figure", "send_arrays")
    logging_ = ("log_metrics", "log_agreed", "log_table", "send_table")
    for module in (fisher_monitor, fisher_engine, qkov_monitor, qkov, forgetting, forgetting_report):
        for attr in figures + logging_:
            if hasattr(module, attr):
                label = "boundary: figures" if attr in figures else "boundary: logging"
                ledger.wrap(module, attr, label)


# ---------------------------------------------------------------------- one fit (child process)
def child(args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore")
    import logging

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    import fisher_callbacks as fc
    from fisher_callbacks.memory import suite_ledger, trainable_bytes

    every, heat_every = CADENCES[args.cadence]
    every = args.every or every
    steps = args.steps if args.cadence == "realistic" else args.demo_steps
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            from bench_scale import build
            from common import bench_model

            self.net = build("135m") if args.model == "135m" else bench_model(args.model)
            self.net.to(dtype)

        def forward(self, input_ids, attention_mask=None, labels=None):
            return self.net(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

        def training_step(self, batch, batch_idx):
            batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
            return self(**batch).loss

        def validation_step(self, batch, batch_idx):
            batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
            self.log("val_loss", self(**batch).loss)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    torch.manual_seed(0)
    model = LM()
    vocab = model.net.config.vocab_size

    def loader(n: int, seed: int) -> DataLoader:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (n, SEQ), generator=g)
        items = [
            {
                "input_ids": ids[i],
                "attention_mask": torch.ones(SEQ, dtype=torch.long),
                "labels": ids[i],
                "sample_id": i,
            }
            for i in range(n)
        ]
        return DataLoader(items, batch_size=BATCH)

    callbacks: list[pl.Callback] = []
    start_cb, end_cb = _hooks()
    ledger = Ledger()
    timer = _StepTimer(ledger)
    fm = None
    if args.monitored:
        instrument(ledger)
        fm = fc.FisherMonitor(
            train_task="train", reference_tasks={"general": loader(N_PROBE, 1)}, capture_every_n_steps=every
        )
        qm = fc.QKOVInterferenceMonitor(fm, pairs=[("general", "train")], every_n_validations=heat_every)
        rm = fc.ForgettingRiskMonitor(fm, reference_tasks=["general"])
        callbacks = {"all": [fm, qm, rm], "fisher+qkov": [fm, qm], "fisher": [fm]}[args.suite]
        timer.monitor = fm
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            max_steps=steps,
            accelerator=args.device,
            devices=1,
            precision="bf16-true" if args.dtype == "bfloat16" else "32-true",
            logger=CSVLogger(tmp),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[start_cb(timer), *callbacks, end_cb(timer)],
            val_check_interval=every,
            check_val_every_n_epoch=None,
            limit_val_batches=1,
            num_sanity_val_steps=0,
            log_every_n_steps=every,
        )
        train = loader(steps * BATCH, 0)
        val = loader(BATCH, 2)
        rss0 = _rss_mb()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        trainer.fit(model, train, val)
        wall = time.perf_counter() - t0
        cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
        mem = suite_ledger(callbacks, model) if fm is not None else {}
    out = {
        "wall": wall,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_before_fit_mb": rss0,
        "cuda_peak_mb": cuda_peak,
        "trainable_mb": trainable_bytes(model) / 2**20,
        "steps": timer.by_kind(),
        "validation": timer.validation,
        "boundaries": len(timer.validation),
        "work": ledger.seconds,
        "calls": ledger.calls,
        "ledger": mem,
    }
    print("RESULT " + json.dumps(out))


class _StepTimer:
    """Per step: wall time from the first callback's batch start to the last one's batch end,
    less the named work inside it (forecast, early probes), with its kind (flagged, EMA, other)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.monitor = None
        self.rows: list[tuple[str, float]] = []
        self.validation: list[float] = []

    def start(self, trainer) -> None:
        m = self.monitor
        self._flag = m is not None and m.is_flagged(trainer.global_step)
        self._ema = m.ema_updates if m is not None else 0
        self.ledger.in_step = 0.0
        self._t0 = time.perf_counter()

    def end(self, trainer) -> None:
        dt = time.perf_counter() - self._t0 - self.ledger.in_step
        m = self.monitor
        kind = (
            "flagged" if self._flag else ("ema" if m is not None and m.ema_updates > self._ema else "other")
        )
        self.rows.append((kind, dt))

    def by_kind(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for kind, dt in self.rows[1:]:  # the first step warms up
            out.setdefault(kind, []).append(dt)
        return out


def _hooks():
    import lightning.pytorch as pl

    class Start(pl.Callback):
        def __init__(self, timer: _StepTimer) -> None:
            self.timer = timer

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.timer.start(trainer)

        def on_validation_epoch_start(self, trainer, pl_module):
            self.timer._v0 = time.perf_counter()

    class End(pl.Callback):
        def __init__(self, timer: _StepTimer) -> None:
            self.timer = timer

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.timer.end(trainer)

        def on_validation_epoch_end(self, trainer, pl_module):
            self.timer.validation.append(time.perf_counter() - self.timer._v0)

    return Start, End


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


# ---------------------------------------------------------------------- parent: alternate, report
def run_one(args: argparse.Namespace, model: str, cadence: str, monitored: bool) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--model",
        model,
        "--cadence",
        cadence,
        "--steps",
        str(args.steps),
        "--demo-steps",
        str(args.demo_steps),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
        "--suite",
        args.suite,
        "--every",
        str(args.every),
    ]
    if monitored:
        cmd.append("--monitored")
    env = dict(os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"fit failed ({model}, {cadence}, monitored={monitored}):\n{proc.stderr[-3000:]}")


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def report(model: str, cadence: str, plain: list[dict], mon: list[dict]) -> None:
    from fisher_callbacks.memory import format_ledger

    every, _ = CADENCES[cadence]
    w_plain, w_mon = _med([r["wall"] for r in plain]), _med([r["wall"] for r in mon])
    ratio = _med([m["wall"] / p["wall"] for p, m in zip(plain, mon)])
    step = _med([dt for r in plain for rows in r["steps"].values() for dt in rows])
    n_bound = mon[0]["boundaries"]
    trainable = mon[0]["trainable_mb"]
    rss_p, rss_m = _med([r["peak_rss_mb"] for r in plain]), _med([r["peak_rss_mb"] for r in mon])
    budget = " budget <= 1.10x" if cadence == "realistic" else ""
    print(f"\n== {model}, {cadence} cadence (validation + capture every {every} steps), load {_load()}")
    pairs = ", ".join(f"{m['wall'] / p['wall']:.2f}" for p, m in zip(plain, mon))
    print(
        f"  fit wall: plain {w_plain:.1f} s, monitored {w_mon:.1f} s, ratio {ratio:.2f}x (median of "
        f"{len(plain)} pairs: {pairs}){budget}"
    )
    extra = rss_m - rss_p
    print(
        f"  peak RSS: plain {rss_p:.0f} MiB, monitored {rss_m:.0f} MiB, +{extra:.0f} MiB = "
        f"{extra / trainable:.2f}x the trainable weights ({trainable:.0f} MiB); budget <= 1x"
    )
    if mon[0].get("cuda_peak_mb") is not None:
        cp, cm = _med([r["cuda_peak_mb"] for r in plain]), _med([r["cuda_peak_mb"] for r in mon])
        print(
            f"  cuda max allocated: plain {cp:.0f} MiB, monitored {cm:.0f} MiB, +{(cm - cp) / trainable:.2f}x"
        )
    print(f"  plain step {step * 1e3:.0f} ms (median); where the extra time goes (s per fit, median):")
    rows: dict[str, list[float]] = {}
    for r in mon:
        for kind in ("flagged", "ema", "other"):
            ts = r["steps"].get(kind, [])
            rows.setdefault(f"steps: {kind} ({len(ts)})", []).append(sum(ts) - len(ts) * step)
        for label, s in r["work"].items():
            rows.setdefault(label, []).append(s)
        val_p = _med([sum(p["validation"]) for p in plain])
        work_in_val = sum(s for k, s in r["work"].items() if k.startswith("boundary"))
        rows.setdefault("boundary: validation loop (vs plain)", []).append(
            sum(r["validation"]) - work_in_val - val_p
        )
    total_extra = w_mon - w_plain
    for label in sorted(rows, key=lambda k: -_med(rows[k])):
        s = _med(rows[label])
        print(f"    {label:<40s} {s:8.2f} s  {100 * s / max(total_extra, 1e-9):5.1f}% of the extra")
    per_boundary = _med(
        [
            sum(s for k, s in r["work"].items() if k.startswith("boundary")) / max(r["boundaries"], 1)
            for r in mon
        ]
    )
    verdict = "OK" if per_boundary <= 10 * step else "MISS"
    print(
        f"  one boundary {per_boundary:.2f} s = {per_boundary / step:.1f} plain steps "
        f"(budget <= 10) {verdict}; {n_bound} boundaries"
    )
    print("  memory ledger (end of fit):")
    print("    " + format_ledger(mon[0]["ledger"], int(trainable * 2**20)).replace("\n", "\n    "))


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="gpt2,llama,135m")
    parser.add_argument("--cadences", default="realistic,demo")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--demo-steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--suite",
        default="all",
        choices=["all", "fisher+qkov", "fisher"],
        help="monitors attached (each monitor's share of the peak)",
    )
    parser.add_argument("--every", type=int, default=0, help="override the cadence's interval")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--monitored", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--cadence", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    print(f"bench_fit: B={BATCH}, T={SEQ}, {N_PROBE} probe texts, AdamW, {args.device} {args.dtype}")
    for model in args.models.split(","):
        for cadence in args.cadences.split(","):
            plain, mon = [], []
            for _ in range(args.repeats):
                plain.append(run_one(args, model, cadence, False))
                mon.append(run_one(args, model, cadence, True))
            report(model, cadence, plain, mon)
            sys.stdout.flush()


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()

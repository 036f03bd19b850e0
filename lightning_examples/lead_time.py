"""Lead time of the forgetting early warning: when it fires against when forgetting really crosses.

For each learning rate, a model pretrained on "general" is fine-tuned on "math" with the suite's
``FisherMonitor`` + ``ForgettingRiskMonitor`` validating every ``val_every`` steps (what a user
runs). A recorder callback measures the TRUE drift of the same probe samples after every optimizer
step (forward passes only, the same per-sample losses as the monitor), so the true crossing of
``warn_threshold`` is known to the step. Two controls must never warn: ``lr = 0`` and a run that
fine-tunes on "general" itself (it converges, nothing is forgotten).

    python lightning_examples/lead_time.py                      # tiny GPT-2, several lrs
    python lightning_examples/lead_time.py --model minilm        # the real MiniLM (optional)

Prints one row per run: the first warning (step, and whether the per-step forecast or the
boundary rule fired it), the true crossing, the lead in steps and in validation intervals, and the
number of false alarms (warnings on runs that never cross).
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fisher_callbacks.callbacks import FisherMonitor, ForgettingRiskMonitor
from fisher_callbacks.losses import per_sample_losses
from lightning_examples.synthetic import SyntheticTasks, TinyGPT


class TrueDrift(pl.Callback):
    """Probe loss drift after every optimizer step, on the monitor's own fixed probe batches."""

    def __init__(self, fisher_monitor: FisherMonitor, task: str) -> None:
        self.fm, self.task = fisher_monitor, task
        self.steps: list[int] = []
        self.drifts: list[float] = []
        self._base: float | None = None

    def _loss(self, pl_module: pl.LightningModule) -> float:
        was = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            losses = [
                per_sample_losses(
                    pl_module, {k: v.to(pl_module.device) if torch.is_tensor(v) else v for k, v in b.items()}
                )
                for b in self.fm.probe_batches(self.task)
            ]
        pl_module.train(was)
        return float(torch.cat(losses).mean())

    def on_train_start(self, trainer, pl_module):
        self._base = self._loss(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.steps and self.steps[-1] == trainer.global_step:
            return
        self.steps.append(trainer.global_step)
        self.drifts.append(self._loss(pl_module) - self._base)

    def crossing(self, threshold: float) -> int | None:
        return next((s for s, d in zip(self.steps, self.drifts) if d >= threshold), None)


@dataclass
class LeadTime:
    """One run of :func:`run_lead_time`."""

    label: str
    lr: float
    val_every: int
    warn_step: int | None  # first warning of any kind
    warn_source: str | None  # "forecast" or "boundary"
    boundary_warn_step: int | None  # first warning of the boundary rule alone
    crossing_step: int | None  # true crossing (drift measured after every step)
    final_drift: float
    max_drift: float

    @property
    def lead_steps(self) -> int | None:
        if self.warn_step is None or self.crossing_step is None:
            return None
        return self.crossing_step - self.warn_step

    @property
    def false_alarm(self) -> bool:
        return self.warn_step is not None and self.crossing_step is None

    @property
    def goal_met(self) -> bool:
        """Warned >= 1 interval ahead of a crossing later than the first interval; no false alarm;
        a crossing within the first interval needs only a warning by the crossing."""
        if self.crossing_step is None:
            return self.warn_step is None
        if self.warn_step is None:
            return False
        if self.crossing_step <= self.val_every:
            return self.warn_step <= self.crossing_step
        return self.lead_steps >= self.val_every


def run_lead_time(
    lr: float,
    *,
    train_task: str = "math",
    label: str | None = None,
    warn_threshold: float = 0.5,
    val_every: int = 4,
    max_steps: int = 40,
    model_kwargs: dict | None = None,
    data_kwargs: dict | None = None,
    monitor_kwargs: dict | None = None,
    seed: int = 0,
) -> LeadTime:
    """Fine-tune a freshly pretrained tiny model at ``lr`` and time the warning (see module doc)."""
    pl.seed_everything(seed, verbose=False)
    kwargs = dict(n_layer=2, n_head=4, n_embd=32, pretrain_steps=60, pretrain_lr=1e-2)
    model = TinyGPT(lr=lr, seed=seed, **{**kwargs, **(model_kwargs or {})})
    dm = SyntheticTasks(
        train_task=train_task, **{"n_train": 512, "n_probe": 32, "batch_size": 16, **(data_kwargs or {})}
    )
    fm = FisherMonitor(
        train_task=train_task, reference_tasks=["general"], capture_every_n_steps=0, probe_max_samples=32
    )
    rm = ForgettingRiskMonitor(
        fm, reference_tasks=["general"], warn_threshold=warn_threshold, **(monitor_kwargs or {})
    )
    truth = TrueDrift(fm, "general")
    trainer = pl.Trainer(
        max_steps=max_steps,
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[fm, rm, truth],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm)
    alerts = [a for a in rm.alerts if a["task"] == "general"]
    boundary = [a for a in alerts if a["source"] == "boundary"]
    return LeadTime(
        label=label or f"{train_task} lr={lr:g}",
        lr=lr,
        val_every=val_every,
        warn_step=alerts[0]["step"] if alerts else None,
        warn_source=alerts[0]["source"] if alerts else None,
        boundary_warn_step=boundary[0]["step"] if boundary else None,
        crossing_step=truth.crossing(warn_threshold),
        final_drift=truth.drifts[-1],
        max_drift=max(truth.drifts),
    )


def table(rows: list[LeadTime]) -> str:
    """Markdown table of the runs."""
    lines = [
        "| run | true crossing | warning (source) | boundary rule alone | lead (steps) | "
        "lead (intervals) | max drift | goal |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        fmt = lambda v: "-" if v is None else str(v)  # noqa: E731
        lead = r.lead_steps
        intervals = "-" if lead is None else f"{lead / r.val_every:.2f}"
        warn = "-" if r.warn_step is None else f"{r.warn_step} ({r.warn_source})"
        verdict = "ok" if r.goal_met else ("FALSE ALARM" if r.false_alarm else "late")
        lines.append(
            f"| {r.label} | {fmt(r.crossing_step)} | {warn} | {fmt(r.boundary_warn_step)} | "
            f"{fmt(lead)} | {intervals} | {r.max_drift:+.3f} | {verdict} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3,1e-2")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--val-every", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [
        run_lead_time(
            0.0,
            label="control: lr=0",
            warn_threshold=args.threshold,
            val_every=args.val_every,
            max_steps=args.max_steps,
        ),
        run_lead_time(
            1e-3,
            train_task="general",
            label="control: converge on general, lr=1e-3",
            warn_threshold=args.threshold,
            val_every=args.val_every,
            max_steps=args.max_steps,
        ),
    ]
    for lr in (float(x) for x in args.lrs.split(",")):
        rows.append(
            run_lead_time(
                lr, warn_threshold=args.threshold, val_every=args.val_every, max_steps=args.max_steps
            )
        )
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(
        f"\nthreshold {args.threshold} nats, validation every {args.val_every} steps, "
        f"{args.max_steps} steps\n"
    )
    print(table(rows))
    if any(math.isnan(r.final_drift) for r in rows):
        print("(a run diverged)")


if __name__ == "__main__":
    main()

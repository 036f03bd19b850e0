"""Demo: see catastrophic forgetting coming, live, on a tiny GPT-2 (no downloads).

A GPT-2 built from a config is pretrained on a synthetic "general" task (counting), then
fine-tuned on a synthetic "math" task (a + b mod K) with the three fisher_callbacks attached.
Everything is configured through LightningCLI:

    python lightning_examples/forgetting_demo.py fit --config configs/forgetting_demo.yaml

TensorBoard and CSV logging always; W&B too when WANDB_MODE or WANDB_API_KEY is set (``make demo``
sets WANDB_MODE=offline). At the end it writes ``summary.md`` and the heatmap PNGs into the run
folder and prints where they are.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, WandbLogger

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fisher_callbacks.callbacks import (
    FisherMonitor,
    ForgettingRiskMonitor,
    QKOVInterferenceMonitor,
)
from lightning_examples.synthetic import SyntheticTasks, TinyGPT


class DemoCLI(LightningCLI):
    """LightningCLI that adds W&B when asked and writes a readable summary after fit."""

    def before_fit(self) -> None:
        if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
            run_dir = Path(self.trainer.default_root_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            wandb_logger = WandbLogger(project="fisher_callbacks_demo", save_dir=str(run_dir))
            self.trainer.loggers = [*self.trainer.loggers, wandb_logger]

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            print(write_summary(self.trainer))


def _find(trainer, cls):
    return next((cb for cb in trainer.callbacks if isinstance(cb, cls)), None)


def write_summary(trainer) -> str:
    """``summary.md`` + the last heatmaps in the run folder; returns the text printed."""
    run_dir = Path(trainer.default_root_dir)
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    fm, qm, rm = (
        _find(trainer, FisherMonitor),
        _find(trainer, QKOVInterferenceMonitor),
        _find(trainer, ForgettingRiskMonitor),
    )
    lines = ["# fisher_callbacks demo: fine-tuning on 'math' while watching 'general'", ""]
    if rm is not None:
        for task, hist in rm.history.items():
            lines.append(f"## Forgetting of '{task}' (probe loss change from the fit start, nats)")
            lines.append("")
            lines.append("| step | measured | predicted (first order) |")
            lines.append("|---:|---:|---:|")
            for s, m, p in zip(hist["step"], hist["measured"], hist["predicted"]):
                lines.append(f"| {s} | {m:+.4f} | {p:+.4f} |")
            lines.append("")
            warned = [a for a in rm.alerts if a["task"] == task]
            if warned:
                first = warned[0]
                lines.append(f"**Early warning fired at step {first['step']}**: {first['reason']}.")
            else:
                lines.append(f"No forgetting warning (threshold {rm.warn_threshold} nats).")
            lines.append("")
    if qm is not None:
        for (a, b), heatmap in qm.latest.items():
            lines.append(f"## Most conflicting heads, {a} vs {b} (lowest conflict cosine)")
            lines.append("")
            lines.append("| block | layer | head | cos_F | Fisher overlap |")
            lines.append("|---|---:|---:|---:|---:|")
            cells = []
            for block, res in heatmap.items():
                cos, ov = res["conflict_cosine"], res["fisher_overlap"]
                for li in range(cos.shape[0]):
                    for hi in range(cos.shape[1]):
                        cells.append(
                            (
                                float(cos[li, hi]),
                                block,
                                int(res["layers"][li]),
                                int(res["heads"][hi]),
                                float(ov[li, hi]),
                            )
                        )
            for c, block, layer, head, ov in sorted(cells)[:5]:
                lines.append(f"| {block} | {layer} | {head} | {c:+.3f} | {ov:.3f} |")
            lines.append("")
    if fm is not None:
        lines.append(
            f"Collector: {fm.collector}; flagged steps captured: {fm.captured_steps}, "
            f"EMA updates: {fm.ema_updates}, skipped non-finite steps: {fm.skipped_steps}."
        )
    copied = []
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            latest: dict[str, Path] = {}  # figure key -> its PNG of the latest step
            for p in sorted(Path(logger.log_dir, "figures").glob("*.png")):
                latest[p.stem.rsplit("_step", 1)[0]] = p
            for p in latest.values():
                copied.append(shutil.copy(p, fig_dir / p.name))
            lines.append(f"\nMetrics: {Path(logger.log_dir) / 'metrics.csv'}")
    text = "\n".join(lines) + "\n"
    (run_dir / "summary.md").write_text(text)
    tail = [
        f"Summary: {run_dir / 'summary.md'}",
        f"Heatmaps: {fig_dir} ({len(copied)} PNGs)",
        f"TensorBoard: tensorboard --logdir {run_dir}",
    ]
    return text + "\n" + "\n".join(tail)


def main() -> None:
    DemoCLI(TinyGPT, SyntheticTasks, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()

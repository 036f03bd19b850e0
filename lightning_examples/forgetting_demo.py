"""Demo: see catastrophic forgetting coming, live, on a tiny GPT-2 (no downloads).

A GPT-2 built from a config is pretrained on a synthetic "general" task (counting), then
fine-tuned on a synthetic "math" task (a + b mod K) with the three fisher_callbacks attached.
Everything is configured through LightningCLI:

    python lightning_examples/forgetting_demo.py fit --config configs/forgetting_demo.yaml

TensorBoard and CSV logging always; W&B too when WANDB_MODE or WANDB_API_KEY is set (``make demo``
sets WANDB_MODE=offline). At the end it writes ``summary.md`` and this run's latest figures
(``figures/``, emptied first) at fixed paths in the run folder, names this run's CSV, TensorBoard
and W&B folders (each run adds a version beside the earlier ones), and prints where they are.

The console is kept to what matters: the demo's own modules log with explicit batch sizes, and
three known, harmless third-party messages are filtered here only (never in the library): the
Lightning "litlogger" tip, a deprecation warning from Lightning's ``_pytree`` under torch 2.13, and
W&B's notice about the ``anonymous`` argument Lightning always passes.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fisher_callbacks.callbacks import (
    FisherMonitor,
    ForgettingRiskMonitor,
    QKOVInterferenceMonitor,
)
from lightning_examples.synthetic import SyntheticTasks, TinyGPT


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_known_noise() -> None:
    """Filter the known, harmless third-party console messages of this demo (see the module doc)."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropMessages("💡 Tip"))
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


class DemoCLI(LightningCLI):
    """LightningCLI that adds W&B when asked and writes a readable summary after fit."""

    def before_fit(self) -> None:
        if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
            run_dir = Path(self.trainer.default_root_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            wandb_logger = WandbLogger(project="fisher_callbacks_demo", save_dir=str(run_dir))
            # Lightning passes anonymous=None, which W&B >= 0.2x answers with a warning on every
            # run ("The anonymous setting has no effect"); not passing it changes nothing else.
            getattr(wandb_logger, "_wandb_init", {}).pop("anonymous", None)
            self.trainer.loggers = [*self.trainer.loggers, wandb_logger]

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            print(write_summary(self.trainer))


def _find(trainer, cls):
    return next((cb for cb in trainer.callbacks if isinstance(cb, cls)), None)


def write_summary(trainer) -> str:
    """``summary.md`` + this run's latest figures at fixed paths in the run folder.

    Returns:
        The text printed: the summary, then where this run's files are.
    """
    run_dir = Path(trainer.default_root_dir)
    fig_dir = run_dir / "figures"
    shutil.rmtree(fig_dir, ignore_errors=True)  # only this run's figures, never a mix of runs
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
            lines.append("| step | measured | predicted (first order) | warning active |")
            lines.append("|---:|---:|---:|:---:|")
            warned = [a for a in rm.alerts if a["task"] == task]
            active = hist.get("warning", [0.0] * len(hist["step"]))
            for s, m, p, on in zip(hist["step"], hist["measured"], hist["predicted"], active):
                lines.append(f"| {s} | {m:+.4f} | {p:+.4f} | {'yes' if on else ''} |")
            lines.append("")
            if warned:
                first = warned[0]
                lines.append(f"**Early warning fired at step {first['step']}**: {first['reason']}.")
            else:
                lines.append(f"No forgetting warning (threshold {rm.warn_threshold} nats).")
            if rm.stopped_at is not None:
                lines.append(f"The run stopped at step {rm.stopped_at} (stop threshold {rm.stop_threshold}).")
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
    lines.append("")
    lines.append(
        "Steps are `trainer.global_step` at the validation boundary, in every table, figure and log."
    )
    copied = []
    lines.append("")
    lines.append("## This run's files")
    lines.append("")
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            latest: dict[str, Path] = {}  # figure key -> its PNG of the latest step
            for p in sorted(Path(logger.log_dir, "figures").glob("*.png")):
                latest[p.stem.rsplit("_step", 1)[0]] = p
            for p in latest.values():
                copied.append(Path(shutil.copy(p, fig_dir / p.name)))
            lines.append(f"- metrics, every figure and table: `{logger.log_dir}`")
        elif isinstance(logger, TensorBoardLogger):
            lines.append(f"- TensorBoard: `{logger.log_dir}` (`tensorboard --logdir {logger.log_dir}`)")
        elif isinstance(logger, WandbLogger):
            lines.append(f"- W&B: `{Path(logger.experiment.dir).parent}`")
    for p in sorted(copied):
        lines.append(f"- latest figure: `{p}`")
    text = "\n".join(lines) + "\n"
    (run_dir / "summary.md").write_text(text)
    tail = [
        f"Summary: {run_dir / 'summary.md'}",
        f"Latest figures of this run: {fig_dir} ({len(copied)} PNGs)",
        f"TensorBoard: tensorboard --logdir {run_dir}",
    ]
    return text + "\n" + "\n".join(tail)


def main() -> None:
    quiet_known_noise()
    DemoCLI(TinyGPT, SyntheticTasks, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()

"""What a person sees on the dashboards, from one real Trainer.fit with CSV, TensorBoard and
offline W&B: one step convention everywhere, the forgetting timeline, the TensorBoard
custom-scalars layout, the alerts table, no constant series."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from wandb_records import history_rows

from fisher_callbacks.callbacks import FisherMonitor, ForgettingRiskMonitor, QKOVInterferenceMonitor
from fisher_callbacks.loggers import forgetting_dashboard_layout
from lightning_examples.synthetic import SyntheticTasks, TinyGPT

SMALL = dict(n_layer=2, n_head=4, n_embd=32, pretrain_steps=40, pretrain_lr=1e-2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """12 steps at a high learning rate (the warning fires), boundaries every 4 steps."""
    root = tmp_path_factory.mktemp("dashboards")
    fm = FisherMonitor(
        train_task="math",
        reference_tasks=["general"],
        capture_every_n_steps=4,
        max_samples_per_task=16,
        probe_max_samples=16,
    )
    qm = QKOVInterferenceMonitor(fm, pairs=[("general", "math")], n_permutations=20, top_k=5)
    rm = ForgettingRiskMonitor(fm, reference_tasks=["general"], warn_threshold=0.3)
    loggers = [
        CSVLogger(root / "csv"),
        TensorBoardLogger(root / "tb"),
        WandbLogger(save_dir=str(root), project="fc-dashboards", offline=True),
    ]
    trainer = pl.Trainer(
        max_steps=12,
        val_check_interval=4,
        limit_val_batches=1,
        callbacks=[fm, qm, rm],
        logger=loggers,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=root,
        log_every_n_steps=2,
        num_sanity_val_steps=1,
        enable_checkpointing=False,
    )
    trainer.fit(
        TinyGPT(lr=1e-2, **SMALL), datamodule=SyntheticTasks(n_train=128, n_val=16, n_probe=16, batch_size=8)
    )
    loggers[2].experiment.finish()
    events = EventAccumulator(str(loggers[1].log_dir), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    with open(Path(loggers[0].log_dir) / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    wandb_rows = history_rows(next(Path(root, "wandb").glob("offline-run-*/run-*.wandb")))
    return {"rm": rm, "csv": rows, "csv_dir": Path(loggers[0].log_dir), "tb": events, "wandb": wandb_rows}


def _csv_steps(rows, name):
    return [int(r["step"]) for r in rows if r.get(name, "") != ""]


def _wandb_steps(rows, key):
    return [
        int(r["trainer/global_step"]) for r in rows if any(k == key or k.startswith(key + "/") for k in r)
    ]


def test_one_step_convention_in_csv_tensorboard_wandb_and_history(run):
    steps = run["rm"].history["general"]["step"]
    assert steps == [4, 8, 12]  # trainer.global_step at each boundary
    rows, events, wb = run["csv"], run["tb"], run["wandb"]
    for name in (
        "forgetting/general/measured",
        "forgetting/general/warning",
        "forgetting/general/threshold",
        "fisher/math/trace",
        "qkov/general_vs_math/Q/fisher_overlap",
    ):
        expected = steps
        if name == "forgetting/general/measured":  # the early probes' measurements too
            expected = [s for s, _ in run["rm"].warnings.points["general"][1:]]
        if name == "forgetting/general/warning":
            # the per-step rows carry the flag too, at trainer.global_step (every logged step and
            # every change of the warning state), with the boundaries' among them
            expected = _csv_steps(rows, name)
            assert set(steps) <= set(expected) and expected == sorted(expected)
            assert {a["step"] for a in run["rm"].alerts} <= set(expected)
        assert _csv_steps(rows, name) == expected, name
        assert [e.step for e in events.Scalars(name)] == expected, name
        assert _wandb_steps(wb, name) == expected, name
    for key in (
        "forgetting/general/timeline",
        "forgetting/general/attribution",
        "qkov/general_vs_math/heatmap/conflict_cosine",
    ):
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)
        files = sorted(run["csv_dir"].glob(f"figures/{stem}_step*.png"))
        assert [int(p.stem.rsplit("_step", 1)[1]) for p in files] == steps, key
        assert [e.step for e in events.Images(key)] == steps, key
        assert _wandb_steps(wb, key) == steps, key
    # an alert's step is the step of the row where the flag turns on, in every logger
    alerts = run["rm"].alerts
    assert alerts and {a["step"] for a in alerts if a["source"] == "boundary"} <= set(steps)
    for alert in alerts:
        on = [r for r in rows if r.get("forgetting/general/warning") == "1.0"]
        assert int(on[0]["step"]) == alerts[0]["step"], alert


def test_custom_scalars_layout_is_in_the_event_file(run):
    events = run["tb"]
    assert "custom_scalars__config__" in events.Tags()["tensors"]
    (event,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    (category,) = layout.category
    assert category.title == "forgetting"
    charts = {c.title: list(c.multiline.tag) for c in category.chart}
    drift = charts["general: drift vs threshold (nats)"]
    for series in ("measured", "predicted", "forecast", "threshold"):
        assert any(re.fullmatch(tag, f"forgetting/general/{series}") for tag in drift), series
    assert not any(re.fullmatch(tag, "forgetting/general/risk") for tag in drift)
    # every drift tag that was logged is matched, so the chart opens with its lines
    logged = [t for t in events.Tags()["scalars"] if t.startswith("forgetting/general/")]
    assert {"forgetting/general/measured", "forgetting/general/threshold"} <= {
        t for t in logged if any(re.fullmatch(tag, t) for tag in drift)
    }


def test_dashboard_layout_escapes_task_names():
    layout = forgetting_dashboard_layout(["a.b (x)"])
    (drift, _), (risk, _) = layout["forgetting"].items()
    tags = layout["forgetting"][drift][1]
    assert re.fullmatch(tags[0], "forgetting/a.b (x)/measured")
    assert not re.fullmatch(tags[0], "forgetting/aXb (x)/measured")
    assert layout["forgetting"][risk][0] == "Multiline"


def test_no_constant_ema_series_for_reference_tasks_and_alerts_as_text(run):
    columns = set(run["csv"][0])
    assert "fisher/math/ema_trace" in columns
    assert "fisher/general/ema_trace" not in columns  # a probe set has no EMA: no 0 chart
    assert "forgetting/general/alerts/text_summary" in run["tb"].Tags()["tensors"]  # TensorBoard text
    tables = sorted(run["csv_dir"].glob("tables/forgetting_general_alerts_step*.csv"))
    assert tables
    with open(tables[-1]) as fh:
        alerts = list(csv.DictReader(fh))
    assert [int(a["step"]) for a in alerts] == [a["step"] for a in run["rm"].alerts]
    assert any(k.startswith("forgetting/general/alerts") for r in run["wandb"] for k in r)


def test_timeline_figure_marks_threshold_and_first_warning(run):
    rm = run["rm"]
    fig = rm.timeline_figure("general")
    ax = fig.get_axes()[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    first = rm.alerts[0]["step"]
    assert labels[:2] == ["measured", "predicted (first order)"]
    assert "warn threshold (0.3)" in labels
    assert f"first warning (step {first})" in labels
    measured = ax.get_lines()[0]
    assert list(measured.get_xdata()) == rm.history["general"]["step"]
    # EWC has its own panel (it is orders of magnitude smaller than the drift)
    assert len(fig.get_axes()) == 2
    assert [t.get_text() for t in fig.get_axes()[1].get_legend().get_texts()] == ["EWC quadratic"]

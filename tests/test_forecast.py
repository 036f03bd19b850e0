"""The per-step forgetting forecast, its lead time, non-finite drift, fixed probe samples, fits
without validation and resume at a checkpoint boundary: real Trainer.fit on tiny GPT-2s."""

from __future__ import annotations

import csv
import math
import warnings
from dataclasses import replace
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from fisher_callbacks.callbacks import FisherMonitor, ForgettingRiskMonitor, QKOVInterferenceMonitor
from fisher_callbacks.functional.forgetting import early_warning
from fisher_callbacks.losses import per_sample_losses
from lightning_examples.lead_time import LeadTime, replay_warning, run_lead_time
from lightning_examples.synthetic import PhasedTasks, SyntheticTask, SyntheticTasks, TinyGPT, collate

SMALL = dict(n_layer=2, n_head=4, n_embd=32, pretrain_steps=40, pretrain_lr=1e-2)


def _monitors(warn=0.3, stop=None, probe=None, qkov=False, **kwargs):
    fm = FisherMonitor(
        train_task="math",
        reference_tasks=probe or ["general"],
        capture_every_n_steps=4,
        max_samples_per_task=16,
        probe_max_samples=16,
    )
    rm = ForgettingRiskMonitor(
        fm, reference_tasks=["general"], warn_threshold=warn, stop_threshold=stop, **kwargs
    )
    cbs = [fm, rm]
    if qkov:
        cbs.insert(1, QKOVInterferenceMonitor(fm, pairs=[("general", "math")], n_permutations=10, top_k=3))
    return cbs


def _trainer(tmp_path, callbacks, max_steps=8, val_every=4, **kwargs):
    options = dict(
        max_steps=max_steps,
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    return pl.Trainer(**{**options, **kwargs})


def _data(**kwargs):
    return SyntheticTasks(**{"n_train": 128, "n_val": 8, "n_probe": 16, "batch_size": 8, **kwargs})


class _Recorder(pl.Callback):
    """Independent reference: the probe gradient at fit start, at each boundary and at
    ``extra_steps``, and the weights after every optimizer step (float64)."""

    def __init__(self, fm: FisherMonitor, extra_steps: tuple[int, ...] = ()) -> None:
        self.fm = fm
        self.extra_steps = extra_steps  # optimizer steps probed besides fit start and boundaries
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.losses: dict[int, float] = {}
        self.params: dict[int, dict[str, torch.Tensor]] = {}

    def _probe(self, trainer, pl_module) -> None:
        params = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        pl_module.eval()
        with torch.enable_grad():
            losses = torch.cat([per_sample_losses(pl_module, b) for b in self.fm.probe_batches("general")])
            grads = torch.autograd.grad(losses.mean(), list(params.values()), allow_unused=True)
        pl_module.train()
        step = trainer.global_step
        self.losses[step] = float(losses.mean())
        self.grads[step] = {
            n: (g if g is not None else torch.zeros_like(p)).double()
            for (n, p), g in zip(params.items(), grads)
        }
        self.params[step] = {n: p.detach().double().clone() for n, p in params.items()}

    def on_train_start(self, trainer, pl_module):
        self._probe(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.params[trainer.global_step] = {
            n: p.detach().double().clone() for n, p in pl_module.named_parameters() if p.requires_grad
        }
        if trainer.global_step in self.extra_steps:
            self._probe(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module):
        self._probe(trainer, pl_module)


def _dot(a: dict, b: dict) -> float:
    return float(sum((a[n] * b[n]).sum() for n in a))


def test_forecast_follows_its_formula_and_restarts_from_each_measurement(tmp_path):
    cbs = _monitors(early_probe_step=2)  # one early probe ("auto" probes steps 1 and 2)
    fm, rm = cbs
    rec = _Recorder(fm, extra_steps=(2,))
    logger = CSVLogger(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [*cbs, rec], max_steps=8, logger=logger, log_every_n_steps=1).fit(
            TinyGPT(lr=3e-3, **SMALL), datamodule=_data()
        )
    assert not [w for w in caught if "no validation will run" in str(w.message)]
    hist = rm.history["general"]
    assert hist["forecast_step"] == list(range(1, 9))
    assert hist["step"] == [4, 8]
    theta, grads = rec.params, rec.grads
    drift = {k: rec.losses[k] - rec.losses[0] for k in (0, 2, 4, 8)}
    assert hist["measured"] == pytest.approx([drift[4], drift[8]], rel=1e-4, abs=1e-6)
    assert [s for s, _ in rm.warnings.points["general"]] == [0, 2, 4, 8]  # anchor, early probe, boundaries

    def move(a, b):
        return {n: theta[b][n] - theta[a][n] for n in theta[0]}

    # forecast_k = drift_b + g_A(theta_b) . (theta_k - theta_b) from the last measurement b
    # before step k's own (the step-2 and step-4 forecasts come before their measurements)
    for k, value in zip(hist["forecast_step"], hist["forecast"]):
        b = 0 if k <= 2 else (2 if k <= 4 else 4)
        expected = drift[b] + _dot(grads[b], move(b, k))
        scale = max(abs(expected), max(abs(v) for v in hist["forecast"]))
        assert value == pytest.approx(expected, abs=2e-4 * scale), k
    # the first-order prediction's trapezoid has the early probe as a point: 0 -> 2 -> 4
    trapezoid = sum(
        0.5 * _dot({n: grads[a][n] + grads[b][n] for n in theta[0]}, move(a, b)) for a, b in ((0, 2), (2, 4))
    )
    assert hist["predicted"][0] == pytest.approx(trapezoid, rel=1e-3, abs=1e-6)
    # one truth on the dashboard: every row at trainer.global_step, in order, one warning state
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        rows = [
            r
            for r in csv.DictReader(fh)
            if any(k.startswith("forgetting/general/") and v for k, v in r.items())
        ]
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(steps)
    assert sorted({s for s, r in zip(steps, rows) if r.get("forgetting/general/forecast")}) == list(
        range(1, 9)
    )
    measured_at = [s for s, r in zip(steps, rows) if r.get("forgetting/general/measured")]
    assert measured_at == [2, 4, 8]
    flags = [float(r["forgetting/general/warning"]) for r in rows if r.get("forgetting/general/warning")]
    assert flags == sorted(flags)  # latched: a rising drift never switches it off
    first = rm.alerts[0]
    on = next(s for s, r in zip(steps, rows) if r.get("forgetting/general/warning") == "1.0")
    assert on == first["step"]  # the step of the log line is the step of the row


def _drift_series(rm) -> list[float]:
    return [d for _, d in rm.warnings.points["general"]]


@pytest.mark.parametrize(
    ("label", "task", "lr", "model", "phases"),
    [
        ("lr 0", "math", 0.0, {}, None),
        ("the reference task, from scratch", "general", 1e-3, {"pretrain_steps": 5}, None),
        ("a rise that recovers", "math", 3e-3, {}, [("math", 2), ("general", 40)]),
        ("a quarter of the new task: rises, plateaus", "math", 1e-3, {}, [("mixed", 40)]),
    ],
)
def test_benign_runs_never_warn(tmp_path, label, task, lr, model, phases):
    """The controls of the validation grid (benchmarks/warning_validation.py): a falling, a
    recovering and a plateauing drift, and no move at all, never warn."""
    fm, rm = _monitors(warn=0.5)
    data = dict(n_train=256, n_probe=16, batch_size=16, seed=2)
    dm = PhasedTasks(phases, **data) if phases else SyntheticTasks(train_task=task, **data)
    _trainer(tmp_path, [fm, rm], max_steps=24).fit(
        TinyGPT(lr=lr, seed=2, **{**SMALL, **model}), datamodule=dm
    )
    assert not rm.alerts, (label, rm.alerts[0]["reason"], _drift_series(rm))
    assert max(_drift_series(rm)) < 0.5


def test_a_forgetting_run_is_warned_before_its_crossing(tmp_path):
    recorded: dict = {}
    row = run_lead_time(3e-4, max_steps=48, seed=2, record=recorded)
    assert row.crossing_step is not None and row.crossing_step > 2 * row.val_every
    assert row.goal_met and row.lead_steps >= row.val_every, row
    # the replay of the recorded run decides as the engine did (what makes tuning on recorded
    # runs, benchmarks/warning_validation.py --replay, mean anything)
    assert [s for s, _ in recorded["points"]] == [0, 1, 2, *range(4, 49, 4)]
    assert replay_warning(row, recorded, 0.5) == row
    never = lambda *a, **k: replace(early_warning(*a, **k), warn=False)  # noqa: E731
    quiet = replay_warning(row, recorded, 0.5, rule=never)
    assert quiet.warn_step is None and quiet.warn_source is None


@pytest.mark.parametrize(("setting", "probed"), [("auto", [1, 2, 4]), (3, [3]), (None, [])])
def test_early_probes_come_at_steps_1_2_4_of_the_first_interval(tmp_path, setting, probed):
    fm, rm = _monitors(early_probe_step=setting)
    steps = []
    real = fm.probe_gradient

    def spy(host, task):
        steps.append(host.step)
        return real(host, task)

    fm.probe_gradient = spy
    trainer = _trainer(tmp_path, [fm, rm], max_steps=12, val_every=8)
    trainer.fit(TinyGPT(lr=1e-3, **SMALL), datamodule=_data())
    assert steps == probed  # none after the first boundary (8)
    assert rm.history["general"]["step"] == [8]
    assert [s for s, _ in rm.warnings.points["general"]] == [0, *probed, 8] and rm.early_done


def test_lead_time_verdicts_judge_a_warning_on_its_horizon():
    """The table's verdicts: a warning counts up to ``max_steps``, the true drift a horizon
    further, so a warning near the end is judged on the crossing it announced."""
    row = dict(label="r", lr=1e-3, val_every=4, warn_source="forecast", boundary_warn_step=None)
    row.update(final_drift=0.6, max_drift=0.6, max_steps=40)
    assert LeadTime(**row, warn_step=39, crossing_step=44).goal_met  # crossed inside the horizon
    assert LeadTime(**row, warn_step=39, crossing_step=None).false_alarm  # never crossed
    assert not LeadTime(**row, warn_step=39, crossing_step=41).goal_met  # 2 steps: late
    assert LeadTime(**row, warn_step=None, crossing_step=46).goal_met  # its warning was due at 42
    assert not LeadTime(**row, warn_step=None, crossing_step=43).goal_met  # due at 39: missed
    assert LeadTime(**row, warn_step=3, crossing_step=3).goal_met  # inside the first interval


class _Diverge(pl.Callback):
    """Turns one weight into NaN after optimizer step ``at`` (a diverged run)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))


def test_non_finite_drift_and_forecast_are_risk_one_warnings_and_stop(tmp_path):
    cbs = _monitors(warn=5.0)
    logger = CSVLogger(tmp_path)
    _trainer(tmp_path, [_Diverge(5), *cbs], max_steps=8, logger=logger, log_every_n_steps=1).fit(
        TinyGPT(lr=1e-4, **SMALL), datamodule=_data()
    )
    rm = cbs[1]
    # one alert: the non-finite forecast at step 5 turns the warning on; it stays on (latched)
    assert [(a["step"], a["source"]) for a in rm.alerts] == [(5, "forecast")]
    assert "probe loss is not finite" in rm.alerts[0]["reason"] and rm.warnings.active["general"]
    assert math.isnan(rm.history["general"]["measured"][-1])
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    risk = [float(r["forgetting/general/risk"]) for r in rows if r.get("forgetting/general/risk")]
    flags = [float(r["forgetting/general/nonfinite"]) for r in rows if r.get("forgetting/general/nonfinite")]
    assert risk[-1] == 1.0 and flags and all(f == 1.0 for f in flags)
    warning = [float(r["forgetting/general/warning"]) for r in rows if r.get("forgetting/general/warning")]
    assert warning[-1] == 1.0 and warning == sorted(warning)
    ours = [float(v) for r in rows for k, v in r.items() if k.startswith("forgetting/") and v]
    assert ours and all(math.isfinite(v) for v in ours)  # never a silent NaN in a logged value
    # with a stop threshold the run stops at the first non-finite forecast
    cbs = _monitors(warn=5.0, stop=10.0)
    trainer = _trainer(tmp_path, [_Diverge(5), *cbs], max_steps=8)
    trainer.fit(TinyGPT(lr=1e-4, **SMALL), datamodule=_data())
    assert cbs[1].stopped_at == 5 and trainer.global_step == 5


def test_shuffled_probe_loader_gives_no_drift_with_frozen_weights(tmp_path):
    probe = DataLoader(
        SyntheticTask("general", 32, seed=7),
        batch_size=4,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),
    )
    cbs = _monitors(probe={"general": probe})
    _trainer(tmp_path, cbs, max_steps=8).fit(TinyGPT(lr=0.0, **SMALL), datamodule=_data())
    hist = cbs[1].history["general"]
    assert hist["measured"] == [0.0, 0.0]
    # rows . theta_t - rows . theta_b with theta_t == theta_b: the same fp32 product twice
    assert len(hist["forecast"]) == 8 and all(abs(v) <= 1e-6 for v in hist["forecast"]), hist["forecast"]
    assert sum(b["labels"].shape[0] for b in cbs[0].probe_batches("general")) == 16


@pytest.mark.parametrize("setting", ["limit_val_batches", "interval_past_max_steps"])
def test_no_validation_warns_once_and_evaluates_at_the_end(tmp_path, setting):
    cbs = _monitors(qkov=True)
    extra = {"limit_val_batches": 0} if setting == "limit_val_batches" else {"val_check_interval": 10}
    trainer = _trainer(tmp_path, cbs, max_steps=4, **extra)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyGPT(lr=3e-3, **SMALL), datamodule=_data())
    told = [w for w in caught if "no validation will run" in str(w.message)]
    assert len(told) == 1, [str(w.message) for w in caught]
    assert "QK-OV and forgetting monitors" in str(told[0].message)
    fm, qm, rm = cbs
    assert rm.history["general"]["step"] == [4]
    assert qm.latest and qm._validations == 1


class _OneBatch(SyntheticTasks):
    """One fixed batch per epoch, unshuffled: a resumed run sees the same data as an unbroken one."""

    def train_dataloader(self):
        return DataLoader(self.train_set, self.hparams.batch_size, collate_fn=collate)


def test_resume_from_a_checkpoint_before_its_validation_gives_the_uninterrupted_history(tmp_path):
    def fit(max_steps, ckpt_path=None, save=None):
        cbs = _monitors(warn=0.05, qkov=True)
        extra = [ModelCheckpoint(dirpath=save, every_n_train_steps=8, save_top_k=-1)] if save else []
        trainer = _trainer(tmp_path, [*cbs, *extra], max_steps=max_steps, enable_checkpointing=bool(save))
        trainer.fit(
            TinyGPT(lr=3e-3, **SMALL), datamodule=_OneBatch(n_train=8, batch_size=8), ckpt_path=ckpt_path
        )
        return cbs

    whole = fit(12)
    fit(8, save=tmp_path / "ckpt")  # the step-8 checkpoint is written before step 8's validation
    resumed = fit(12, ckpt_path=str(next((tmp_path / "ckpt").glob("*.ckpt"))))
    a, b = whole[2].history["general"], resumed[2].history["general"]
    assert b["step"] == a["step"] == [4, 8, 12]
    assert b["forecast_step"] == a["forecast_step"] == list(range(1, 13))
    for key in ("measured", "predicted", "forecast"):
        scale = max(abs(v) for v in a[key])
        assert b[key] == pytest.approx(a[key], abs=1e-5 * scale), key
    assert [(x["step"], x["source"]) for x in resumed[2].alerts] == [
        (x["step"], x["source"]) for x in whole[2].alerts
    ]
    assert resumed[1]._validations == whole[1]._validations == 3
    # the measured points, the warning state and the band carry over too
    points = [[p[0] for p in run[2].warnings.points["general"]] for run in (resumed, whole)]
    assert points[0] == points[1]
    assert resumed[2].warnings.active == whole[2].warnings.active
    assert b["band_step"] == a["band_step"]
    assert b["band_low"] == pytest.approx(a["band_low"], rel=1e-3, abs=1e-6)


def test_bf16_probe_gradients_match_fp32_within_their_precision(tmp_path):
    """The default bf16 rows of g_A(theta_b) against fp32 ones on the same seeded fit: the same
    measured drifts, the prediction and the per-step forecast within ~1e-3 of their scale, half
    the bytes."""
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        cbs = _monitors(warn=5.0, gradient_dtype=dtype)
        _trainer(tmp_path / str(dtype), cbs, max_steps=12).fit(
            TinyGPT(lr=3e-3, **SMALL), datamodule=_OneBatch(n_train=8, batch_size=8)
        )
        runs[dtype] = cbs[-1]
    exact, half = runs[torch.float32], runs[torch.bfloat16]
    a, b = exact.history["general"], half.history["general"]
    assert b["measured"] == a["measured"]
    for key in ("predicted", "forecast"):
        scale = max(abs(v) for v in a[key])
        assert b[key] == pytest.approx(a[key], abs=3e-3 * scale), key
        assert b[key] != a[key]  # the rows really were rounded
    assert half.forecaster.flat_grads.dtype == torch.bfloat16
    assert half.forecaster.flat_grads.element_size() * 2 == exact.forecaster.flat_grads.element_size()


def test_a_prediction_that_cannot_fit_falls_back_to_the_attention_weights(tmp_path, monkeypatch):
    """predict_on='all' whose theta_b and probe rows would take more than half the free memory:
    one warning, the Q/K/V/O weights only, and the run and its measurements go on."""
    from fisher_callbacks.engine import forgetting

    monkeypatch.setattr(forgetting, "available_memory", lambda device: 1024)  # 1 KiB free
    cbs = _monitors(warn=5.0)
    fm, rm = cbs
    with pytest.warns(UserWarning, match="predict_on='monitored'") as caught:
        trainer = _trainer(tmp_path, cbs, max_steps=8)
        trainer.fit(TinyGPT(lr=3e-3, **SMALL), datamodule=_OneBatch(n_train=8, batch_size=8))
    assert sum("predict_on='monitored'" in str(w.message) for w in caught) == 1
    assert trainer.global_step == 8 and rm.predict_on == "monitored"
    monitored = set(fm.layout.monitored_parameters())
    assert set(rm.forecaster.base) <= monitored
    assert set(fm.probe["general"].grad) <= monitored
    hist = rm.history["general"]
    assert hist["step"] == [4, 8] and all(map(math.isfinite, hist["predicted"]))

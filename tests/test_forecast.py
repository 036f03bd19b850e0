"""The per-step forgetting forecast, its lead time, non-finite drift, fixed probe samples, fits
without validation and resume at a checkpoint boundary: real Trainer.fit on tiny GPT-2s."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from fisher_callbacks.callbacks import FisherMonitor, ForgettingRiskMonitor, QKOVInterferenceMonitor
from fisher_callbacks.losses import per_sample_losses
from lightning_examples.lead_time import run_lead_time
from lightning_examples.synthetic import SyntheticTask, SyntheticTasks, TinyGPT, collate

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
    """Independent reference: the probe gradient at fit start and at each boundary, and the
    weights after every optimizer step (float64)."""

    def __init__(self, fm: FisherMonitor) -> None:
        self.fm = fm
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

    def on_validation_epoch_end(self, trainer, pl_module):
        self._probe(trainer, pl_module)


def _dot(a: dict, b: dict) -> float:
    return float(sum((a[n] * b[n]).sum() for n in a))


def test_forecast_follows_its_formula_and_reanchors_on_the_measured_drift(tmp_path):
    cbs = _monitors()
    fm, rm = cbs
    rec = _Recorder(fm)
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
    theta = rec.params
    drift4 = rec.losses[4] - rec.losses[0]
    assert hist["measured"][0] == pytest.approx(drift4, rel=1e-4, abs=1e-6)
    delta = {n: theta[4][n] - theta[0][n] for n in theta[0]}
    kappa = _dot({n: rec.grads[4][n] - rec.grads[0][n] for n in delta}, delta)
    for k, value in zip(hist["forecast_step"], hist["forecast"]):
        if k <= 4:  # first interval: first order from the anchor (no earlier displacement)
            d = {n: theta[k][n] - theta[0][n] for n in delta}
            expected = _dot(rec.grads[0], d)
        else:  # re-anchored on the drift measured at step 4, curvature along the step 0-4 move
            d = {n: theta[k][n] - theta[4][n] for n in delta}
            alpha = _dot(d, delta) / _dot(delta, delta)
            expected = drift4 + _dot(rec.grads[4], d) + 0.5 * kappa * alpha**2
        scale = max(abs(expected), max(abs(v) for v in hist["forecast"]))
        assert value == pytest.approx(expected, abs=2e-4 * scale), k
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        logged = [
            float(r["forgetting/general/forecast"])
            for r in csv.DictReader(fh)
            if r.get("forgetting/general/forecast")
        ]
    assert len(logged) == 8


def test_forecast_warns_an_interval_before_the_crossing_and_never_on_controls():
    # tiny GPT-2 pretrained on counting, fine-tuned on a+b: drift 0.004, 0.023, 0.12 at steps 4, 8,
    # 12, crossing 0.5 at step 16 (lightning_examples/lead_time.py has the whole table)
    fast = run_lead_time(1e-3, max_steps=17)
    assert fast.crossing_step is not None and fast.crossing_step > fast.val_every
    assert fast.warn_source == "forecast"
    assert fast.lead_steps >= fast.val_every, fast
    assert fast.boundary_warn_step is None or fast.boundary_warn_step >= fast.crossing_step
    for control in (
        run_lead_time(0.0, max_steps=8),
        run_lead_time(1e-3, train_task="general", max_steps=8),
    ):
        assert control.crossing_step is None and control.warn_step is None, control


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
    by_source = {a["source"]: a for a in rm.alerts}
    assert (
        by_source["forecast"]["step"] == 5 and "probe loss is not finite" in by_source["forecast"]["reason"]
    )
    assert (
        by_source["boundary"]["step"] == 8 and "probe loss is not finite" in by_source["boundary"]["reason"]
    )
    assert math.isnan(rm.history["general"]["measured"][-1])
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    risk = [float(r["forgetting/general/risk"]) for r in rows if r.get("forgetting/general/risk")]
    flags = [float(r["forgetting/general/nonfinite"]) for r in rows if r.get("forgetting/general/nonfinite")]
    assert risk[-1] == 1.0 and flags and all(f == 1.0 for f in flags)
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
    assert hist["forecast"] == [0.0] * 8
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

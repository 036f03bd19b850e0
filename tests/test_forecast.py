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
from fisher_callbacks.functional import early_warning
from fisher_callbacks.losses import per_sample_losses
from lightning_examples.lead_time import LeadTime, run_lead_time
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


def test_forecast_follows_its_formula_and_reanchors_on_the_measured_drift(tmp_path):
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
    drift = {k: rec.losses[k] - rec.losses[0] for k in (2, 4)}
    assert hist["measured"][0] == pytest.approx(drift[4], rel=1e-4, abs=1e-6)

    def move(a, b):
        return {n: theta[b][n] - theta[a][n] for n in theta[0]}

    def kappa(a, b):  # secant curvature along a -> b
        return _dot({n: grads[b][n] - grads[a][n] for n in theta[0]}, move(a, b))

    for k, value in zip(hist["forecast_step"], hist["forecast"]):
        if k <= 2:  # before the early probe: first order from the anchor (no curvature known)
            expected = _dot(grads[0], move(0, k))
        else:  # re-anchored on the drift measured at b, curvature along the move before b
            a, b = (0, 2) if k <= 4 else (2, 4)
            d, delta = move(b, k), move(a, b)
            alpha = _dot(d, delta) / _dot(delta, delta)
            expected = drift[b] + _dot(grads[b], d) + 0.5 * kappa(a, b) * alpha**2
        scale = max(abs(expected), max(abs(v) for v in hist["forecast"]))
        assert value == pytest.approx(expected, abs=2e-4 * scale), k
    # the first-order prediction's trapezoid has the early probe as a point: 0 -> 2 -> 4
    trapezoid = sum(
        0.5 * _dot({n: grads[a][n] + grads[b][n] for n in theta[0]}, move(a, b)) for a, b in ((0, 2), (2, 4))
    )
    assert hist["predicted"][0] == pytest.approx(trapezoid, rel=1e-3, abs=1e-6)

    def margin(b, along, tau):  # the log-loss of a margin moving tau * along / (1 - e^-L) ahead
        z = math.log(math.expm1(rec.losses[b])) + tau * along / (1 - math.exp(-rec.losses[b]))
        return math.log1p(math.exp(z)) - rec.losses[0]

    # right after the early probe the forecast is projected 8 steps ahead (two intervals), four
    # times the 2-step move from the anchor: the quadratic drift_2 + 4 g_2 . Delta + 0.5 kappa 4^2,
    # the power law drift_2 (1 + 4)^p with p = g_2 . Delta / drift_2, or the margin's, the largest
    first = rm.alerts[0]
    assert (first["step"], first["source"]) == (2, "forecast")
    along = _dot(grads[2], move(0, 2))
    quadratic = drift[2] + 4 * along + 0.5 * kappa(0, 2) * 16
    power = drift[2] * 5 ** min(along / drift[2], 4.0)
    projected = max(quadratic, power, margin(2, along, 4))
    said = float(first["reason"].split("projected to ")[1].split()[0])
    assert said == pytest.approx(projected, rel=2e-3)
    # past the first interval the power law still counts from the anchor, in steps: from b = 8,
    # two Deltas (4 steps each) away, d(t) = drift_8 (t / 8)^p with p = 2 g_8 . Delta / drift_8,
    # projected 8 steps ahead (the weights are still theta_8 after the fit: no move since b)
    drift[8] = rec.losses[8] - rec.losses[0]
    along = _dot(grads[8], move(4, 8))
    quadratic = drift[8] + 2 * along + 0.5 * kappa(4, 8) * 4
    power = drift[8] * 2 ** min(2 * along / drift[8], 4.0) if drift[8] > 0 and along > 0 else -math.inf
    ((now, ahead),) = rm._forecast_values()
    assert now == pytest.approx(drift[8], rel=1e-4, abs=1e-6)
    assert ahead == pytest.approx(max(quadratic, power, margin(8, along, 2)), rel=2e-3), (quadratic, power)
    rm._fc_curv["general"] = 0.0  # no curvature: the quadratic is linear, the power law wins
    fm.log_loss = False  # as for a regression head's squared error: no margin
    ((_, ahead),) = rm._forecast_values()
    assert power > drift[8] + 2 * along and ahead == pytest.approx(power, rel=2e-3), (power, drift[8], along)
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("forgetting/general/forecast")]
    per_step = [r for r in rows if not r.get("forgetting/general/warning")]
    assert len(per_step) == 8  # every step at log_every_n_steps=1
    # the warning at step 2 writes its own row at once: the re-anchored forecast, risk, flag
    (warned,) = [r for r in rows if r.get("forgetting/general/warning")]
    assert float(warned["forgetting/general/forecast"]) == pytest.approx(drift[2], rel=1e-4, abs=1e-6)


def test_forecast_warns_an_interval_before_the_crossing_and_never_on_controls():
    # tiny GPT-2 pretrained on counting, fine-tuned on a+b: drift 0.004, 0.023, 0.12 at steps 4, 8,
    # 12, crossing 0.5 at step 16 (lightning_examples/lead_time.py has the whole table)
    fast = run_lead_time(1e-3, max_steps=17)
    assert fast.crossing_step is not None and fast.crossing_step > fast.val_every
    assert fast.warn_source == "forecast"
    assert fast.lead_steps >= fast.val_every, fast
    assert fast.boundary_warn_step is None or fast.boundary_warn_step >= fast.crossing_step
    # crossing 2 steps after the first boundary: only the early probe (step 2) leads by an interval
    faster = run_lead_time(3e-3, max_steps=7)
    assert faster.crossing_step is not None and faster.crossing_step > faster.val_every
    assert (faster.warn_step, faster.warn_source) == (2, "forecast") and faster.goal_met, faster
    # crossing 1 step after the first boundary: the probe at step 1 leads by an interval (its
    # margin projection: the drift grows 5x a step from 0.003 there)
    fastest = run_lead_time(3e-3, max_steps=6, seed=1)
    assert fastest.crossing_step == fastest.val_every + 1
    assert (fastest.warn_step, fastest.warn_source) == (1, "forecast") and fastest.goal_met, fastest
    late = run_lead_time(3e-3, max_steps=7, monitor_kwargs={"early_probe_step": None})
    assert late.warn_step > 2 and not late.goal_met, late  # without it: half an interval of lead
    for control in (
        run_lead_time(0.0, max_steps=8),
        run_lead_time(1e-3, train_task="general", max_steps=8),
    ):
        assert control.crossing_step is None and control.warn_step is None, control


class _Reach(pl.Callback):
    """How far ahead the forecast projects after each optimizer step (placed after the monitor)."""

    def __init__(self, rm: ForgettingRiskMonitor) -> None:
        self.rm, self.reach = rm, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.reach.append(self.rm._reach())


@pytest.mark.parametrize(
    ("setting", "probed", "reach"),
    [
        ("auto", [1, 2, 4], [8] + [16] * 11),
        (3, [3], [0, 0] + [16] * 10),
        (None, [], [0] * 8 + [16] * 4),  # step 8's batch ends before its validation
    ],
)
def test_early_probes_come_at_steps_1_2_4_of_the_first_interval(tmp_path, setting, probed, reach):
    """The probes of ``early_probe_step``, and the reach of the projections: the horizon (two
    intervals, 16 steps) but at most 8x the steps the model was fitted on (1 step at step 1)."""
    fm, rm = _monitors(early_probe_step=setting)
    steps = []
    real = fm.probe_gradient

    def spy(pl_module, task, step):
        steps.append(step)
        return real(pl_module, task, step)

    fm.probe_gradient = spy
    rec = _Reach(rm)
    trainer = _trainer(tmp_path, [fm, rm, rec], max_steps=12, val_every=8)
    trainer.fit(TinyGPT(lr=1e-3, **SMALL), datamodule=_data())
    assert steps == probed  # none after the first boundary (8)
    assert rm.history["general"]["step"] == [8]
    assert rm._fc_from == 8 and rm._early_done
    assert rec.reach == reach


@pytest.mark.parametrize(("promised", "first_warning"), [(2.0, 18), (0.5, 22)])
def test_the_forecast_damps_projections_that_have_been_overshooting(promised, first_warning):
    """A forecast rising 0.02 a step (threshold 0.51: crossed at step 26) whose projections
    promise ``promised`` times the rise that comes, 8 steps ahead. Overshooting twice: from the
    first matured projection (step 9) the rise is halved, so the warning comes when the truth is
    8 steps away (0.02 s + 0.16 >= 0.51 at s = 18), not 8 steps earlier. Undershooting: never
    boosted (0.02 s + 0.08 >= 0.51 at s = 22, as undamped)."""
    fm = FisherMonitor(train_task="math", reference_tasks=["general"])
    rm = ForgettingRiskMonitor(fm, reference_tasks=["general"], warn_threshold=0.51, forecast_horizon_steps=8)
    warned = []
    for step in range(1, 27):
        value = 0.02 * step
        decision = early_warning([step], [value], 0.51)  # one point: no trend
        warn, reason = rm._judge_projection("general", step, value, value + promised * 0.16, decision, True)
        if warn:
            warned.append((step, reason))
    assert warned[0][0] == first_warning, warned
    factor = rm._fc_calib["general"].factor
    if promised > 1:
        assert factor == pytest.approx(0.5) and "rise scaled x0.5" in warned[0][1], warned[0]
    else:
        assert factor == 1.0 and "scaled" not in warned[0][1], warned[0]


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
    # how the forecast's projections came out (it scales the next ones) carries over too
    calib_a, calib_b = whole[2]._fc_calib["general"], resumed[2]._fc_calib["general"]
    assert calib_a.ratios and len(calib_b.ratios) == len(calib_a.ratios)
    assert calib_b.ratios == pytest.approx(calib_a.ratios, rel=1e-3, abs=1e-6)
    assert [p[0] for p in calib_b.pending] == [p[0] for p in calib_a.pending]

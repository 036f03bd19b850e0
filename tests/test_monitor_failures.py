"""A monitor's own failure never fails the fit it watches: one warning, a defined result (no key,
no figure, capture off for the fit), training as it would have been. A mistake in the settings
that only the fit can check (``SetupError``) still stops it.

Each case makes one part of the suite raise (``monkeypatch``) or meets a real trigger (a second
forward on another batch inside one training step) and runs a real ``Trainer.fit`` (the Hugging
Face Trainer's case is in ``tests/test_hf.py``). In one process only: under DDP a rank that
skipped a collective would leave the others waiting, so there the outermost guard lets the error
through (``WarningRelay.contain``)."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from test_reliability_issue27 import DROPOUT, TINY, _loader, _trainer

import fisher_callbacks.capture as capture_module
from fisher_callbacks import FisherCollector, SetupError
from fisher_callbacks.callbacks import FisherMonitor, ForgettingRiskMonitor, QKOVInterferenceMonitor
from fisher_callbacks.capture import per_sample_gradients
from fisher_callbacks.engine import fisher as fisher_engine
from fisher_callbacks.engine import qkov_report
from fisher_callbacks.engine.forgetting_report import ForgettingReport
from fisher_callbacks.engine.forgetting_tracker import ForgettingTracker
from lightning_examples.synthetic import SyntheticTask, TinyGPT, collate


def _suite() -> list[pl.Callback]:
    fm = FisherMonitor(
        train_task="math",
        reference_tasks={"general": _loader("general", 8, 2)},
        capture_every_n_steps=2,
        store="sketch",
        sketch_dim=16,
    )
    return [
        fm,
        QKOVInterferenceMonitor(fm, pairs=[("general", "math")], n_permutations=5, variant="signed"),
        ForgettingRiskMonitor(fm, reference_tasks=["general"]),
    ]


def _fit(tmp_path, model: pl.LightningModule, callbacks, max_steps: int = 8) -> tuple[pl.Trainer, list[str]]:
    trainer = _trainer(tmp_path, callbacks, max_steps=max_steps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, _loader("math", 64, 0, shuffle=True), _loader("math", 8, 1))
    return trainer, [str(w.message) for w in caught]


class _ReplayGPT(TinyGPT):
    """A training step that adds the loss of a small replay batch (4 samples, the main batch has
    8): a second forward through the monitored projections on another batch."""

    def __init__(self) -> None:
        super().__init__(model_type="gpt2", hf_config=DROPOUT, pretrain_steps=0)
        self.replay = collate([SyntheticTask("general", 4, seed=5)[i] for i in range(4)])

    def training_step(self, batch, batch_idx):
        loss = self(batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
        r = self.replay
        return loss + 0.5 * self(r["input_ids"], r["attention_mask"], r["labels"]).loss


def test_a_second_forward_on_another_batch_stops_capture_and_leaves_training_as_it_was(tmp_path):
    """Before: the capture hook raised inside Lightning's backward (a [4] output gradient scaled
    by the 8 armed factors) and the fit died at step 0."""
    pl.seed_everything(0)
    plain = _ReplayGPT()
    _fit(tmp_path / "plain", plain, [])
    pl.seed_everything(0)
    watched = _ReplayGPT()
    suite = _suite()
    trainer, messages = _fit(tmp_path / "watched", watched, suite)
    assert trainer.global_step == 8
    failed = [m for m in messages if "per-sample capture failed at step 0" in m]
    assert len(failed) == 1 and "a second forward on another batch" in failed[0], messages
    assert suite[0].capture_failed
    for (name, a), b in zip(plain.named_parameters(), watched.parameters(), strict=True):
        assert torch.equal(a, b), name  # the failing hook left every gradient as it was


def test_a_hook_failing_inside_a_probe_pass_is_the_caller_s_error(monkeypatch):
    """Outside a training step (a probe pass, ``per_sample_gradients``) the hook's error reaches
    the caller when the pass ends, and no hook stays on the model."""
    model = TinyGPT(**TINY).model
    batch = collate([SyntheticTask("general", 4, seed=0)[i] for i in range(4)])

    def boom(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(capture_module, "_weight_grads", boom)
    with pytest.raises(RuntimeError, match="injected"):
        per_sample_gradients(model, batch)
    assert not any(m._forward_hooks for m in model.modules())


def _raise(*args, **kwargs):
    raise RuntimeError("injected failure")


@pytest.mark.parametrize(
    ("owner", "name", "message"),
    [
        (qkov_report, "pair_figures", "general vs math: nothing logged at step 4"),
        (fisher_engine, "fisher_scalars", "no Fisher scalars at step 4"),
        (ForgettingReport, "timeline", "no timeline of general at step 4"),
        (ForgettingTracker, "take_anchor", "the anchor at fit start failed"),
        (FisherCollector, "sync", "the boundary at step 4 failed"),
    ],
)
def test_a_monitor_failing_is_one_warning_and_the_fit_goes_on(tmp_path, monkeypatch, owner, name, message):
    """Before: each of these killed the fit, at step 4 (reporting, the Fisher sync) or at fit
    start (the forgetting anchor)."""
    monkeypatch.setattr(owner, name, _raise)
    trainer, messages = _fit(tmp_path, TinyGPT(**TINY), _suite())
    assert trainer.global_step == 8
    said = [m for m in messages if message in m]
    assert said and "injected failure" in said[0], messages


def test_a_setting_only_the_fit_can_check_still_stops_it(tmp_path):
    fm = FisherMonitor(train_task="math", reference_tasks={"general": _loader("general", 8, 2)})
    qm = QKOVInterferenceMonitor(fm, pairs=[("general", "maths")], n_permutations=5)
    with pytest.raises(SetupError, match=r"pairs name unknown task\(s\) \['maths'\]"):
        _fit(tmp_path, TinyGPT(**TINY), [fm, qm])

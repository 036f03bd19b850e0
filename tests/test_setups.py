"""Lightning set-ups a user meets beside the plain fit: a validation of another model on the same
Trainer first, attention frozen in the middle of the fit, validation every n epochs."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
from test_monitor_failures import _fit, _suite
from test_reliability_issue27 import DROPOUT, TINY, _loader, _trainer

from lightning_examples.synthetic import TinyGPT


def test_a_validation_of_another_model_first_leaves_the_fit_watched(tmp_path):
    """``trainer.validate(model_a)`` then ``trainer.fit(model_b)``. Before: the monitors stayed
    bound to ``model_a`` (no sample captured, no QK-OV map, hooks on the wrong model)."""
    suite = _suite()
    fm, qm = suite[0], suite[1]
    trainer = _trainer(tmp_path, suite)
    validated, fitted = TinyGPT(**TINY), TinyGPT(**TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.validate(validated, _loader("math", 8, 1), verbose=False)
        trainer.fit(fitted, _loader("math", 64, 0, shuffle=True), _loader("math", 8, 1))
    assert fm.collector.model is fitted
    assert fm.collector.num_stored("math") > 0 and ("general", "math") in qm.latest
    assert not any(m._forward_hooks for m in validated.modules())


class _SetAttention(pl.Callback):
    """At the start of the second epoch (step 8), sets ``requires_grad`` of ``layer``'s attention."""

    def __init__(self, layer: int, trainable: bool) -> None:
        self.layer, self.trainable = layer, trainable

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            for p in pl_module.model.transformer.h[self.layer].attn.parameters():
                p.requires_grad_(self.trainable)


def test_attention_frozen_mid_fit_leaves_the_forgetting_prediction_on_the_rest(tmp_path):
    """Before: from the first boundary after the freeze every forgetting reading was lost (a
    KeyMismatchError: the frozen weights had no probe gradient), so no warning could fire."""
    pl.seed_everything(0)
    model = TinyGPT(model_type="gpt2", hf_config=DROPOUT, pretrain_steps=0)
    suite = _suite()
    trainer, messages = _fit(tmp_path, model, [_SetAttention(1, trainable=False), *suite], max_steps=16)
    assert trainer.global_step == 16
    assert not [m for m in messages if "failed" in m], messages
    hist = suite[2].history["general"]
    assert hist["step"] == [4, 8, 12, 16]
    for measured, predicted in zip(hist["measured"], hist["predicted"], strict=True):
        assert abs(predicted - measured) <= 0.1 * abs(measured)  # the trapezoid still tracks it


def test_validation_every_other_epoch_is_the_validation_interval(tmp_path):
    """8 batches an epoch, ``check_val_every_n_epoch=2``: boundaries every 16 steps. Before: the
    interval read 8 until the first boundary (early probes stopped at step 4, horizon 16)."""
    suite = _suite()
    trainer = _trainer(tmp_path, suite, max_steps=-1, val_every=None, max_epochs=4, check_val_every_n_epoch=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(TinyGPT(**TINY), _loader("math", 64, 0, shuffle=True), _loader("math", 8, 1))
    rm = suite[2]
    assert rm.history["general"]["step"] == [16, 32]
    assert [s for s, _ in rm.warnings.points["general"]][1:5] == [1, 2, 4, 8]  # the early probes


def test_sketches_of_a_partly_frozen_model_map_the_layers_that_train(tmp_path):
    """Layer 1's attention frozen before the fit, sketch store. Before: the SketchStore asked the
    layout for the frozen blocks and the fit died at setup (LayoutError); the same after a freeze
    in the middle of the fit, at the next boundary."""
    model = TinyGPT(**TINY)
    for p in model.model.transformer.h[1].attn.parameters():
        p.requires_grad_(False)
    suite = _suite()
    trainer, messages = _fit(tmp_path, model, suite)
    assert trainer.global_step == 8 and not [m for m in messages if "failed" in m], messages
    heatmap = suite[1].latest[("general", "math")]
    for block, res in heatmap.items():
        overlap = res["fisher_overlap"]  # [L, H]
        assert overlap[0].isfinite().all() and overlap[1].isnan().all(), block


def test_attention_unfrozen_mid_fit_is_said_once_and_the_rest_stays_watched(tmp_path):
    """Progressive unfreezing (as Lightning's ``BackboneFinetuning`` does). Before: nothing said
    that the unfrozen weights go unmonitored, and the only message claimed they were frozen."""
    model = TinyGPT(**TINY)
    for p in model.model.transformer.h[0].attn.parameters():
        p.requires_grad_(False)
    suite = _suite()
    trainer, messages = _fit(tmp_path, model, [_SetAttention(0, trainable=True), *suite], max_steps=16)
    assert trainer.global_step == 16 and not [m for m in messages if "failed" in m], messages
    said = [m for m in messages if "unfrozen during the fit and are not monitored" in m]
    assert len(said) == 1 and "h.0.attn.c_attn.weight" in said[0]
    assert all(".h.1." in n for n in suite[0].layout.monitored_parameters())
    assert suite[2].history["general"]["step"] == [4, 8, 12, 16]

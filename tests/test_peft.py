"""LoRA/PEFT adapters, partly frozen attention, biases from the callbacks (issue 11).

Adapters are monitored on what trains: per-sample gradients of ``lora_A``/``lora_B`` against the
micro-batch-1 loop, head attribution against the base weight's head map, and a real ``Trainer.fit``.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from reference import max_rel_error, microbatch_gradients
from tiny_models import lm_batch, tiny_causal_lm

from fisher_callbacks import AttentionLayout, per_sample_gradients
from fisher_callbacks.callbacks import FisherMonitor, ForgettingRiskMonitor, QKOVInterferenceMonitor
from fisher_callbacks.layouts import LayoutError
from lightning_examples.synthetic import SyntheticTasks, TinyGPT

peft = pytest.importorskip("peft")

CASES = {
    "llama_qv": ("llama", dict(target_modules=["q_proj", "v_proj"])),
    "llama_o_rslora": ("llama", dict(target_modules=["o_proj"], use_rslora=True)),
    "gpt2_c_attn": ("gpt2", dict(target_modules=["c_attn"], fan_in_fan_out=True)),
    "llama_dora": ("llama", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_dora=True)),
}
MONITORED = {  # blocks with an adapter
    "llama_qv": {"Q", "V"},
    "llama_o_rslora": {"O"},
    "gpt2_c_attn": {"Q", "K", "V"},
    "llama_dora": {"Q", "K", "V", "O"},
}


def _lora(case: str):
    family, cfg = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_causal_lm(family)
        # init_lora_weights=False: lora_B is random too, so every factor has a nonzero gradient
        config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, **cfg)
        return peft.get_peft_model(model, config)


def _rel_close(actual, expected, rtol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=0, atol=rtol * float(expected.detach().abs().max()))


@pytest.mark.parametrize("case", list(CASES))
def test_lora_adapters_captured_exactly_in_one_backward(case):
    model = _lora(case)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layout = AttentionLayout.from_model(model, trainable_only=True)
    # every adapted projection's base weight is frozen and left out, with one warning
    assert sum("frozen" in str(w.message) for w in caught) == (MONITORED[case] != set("QKVO"))
    names = layout.monitored_parameters()
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)  # never the base weight
    assert {b for b in "QKVO" if layout.is_monitored(0, b)} == MONITORED[case]
    assert layout.partial == (MONITORED[case] != set("QKVO"))
    batch = lm_batch(batch=4, seq=10)
    grads = per_sample_gradients(model, batch, layout)
    ref = microbatch_gradients(model, batch, names)
    for n in names:
        _rel_close(grads[n], ref[n])
    assert max_rel_error(grads, ref) < 1e-5
    assert all(p.grad is None for p in model.parameters())


def test_lora_head_attribution_matches_the_base_weight_heads():
    """Head h's slice of the adapter update B @ A (in the base weight's orientation, sliced with the
    plain model's layout) is made of head h's slice of B (Q/K/V) or of A (O) and the shared factor."""
    for case in ("llama_qv", "gpt2_c_attn", "llama_dora", "llama_o_rslora"):
        model = _lora(case)
        family = CASES[case][0]
        base_layout = AttentionLayout.from_model(tiny_causal_lm(family))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layout = AttentionLayout.from_model(model, trainable_only=True)
        params = dict(model.named_parameters())
        conv1d = family == "gpt2"
        for layer in range(layout.num_layers):
            for block in "QKVO":
                if not layout.is_monitored(layer, block):
                    continue
                spec = layout.spec(layer, block)
                (shared,) = spec.shared
                if block == "O":
                    a, b = params[spec.param], params[shared]
                else:
                    b, a = params[spec.param], params[shared]
                delta = b @ a  # [out, in] like nn.Linear
                delta = delta.T if conv1d else delta  # Conv1D weights are [in, out]
                for head in range(layout.num_heads):
                    part = layout.head_slice(params[spec.param], layer, head, block)
                    # O: [out, d], the head's input columns; Q/K/V: [d, in], its output rows
                    expected = b @ part if block == "O" else part @ a
                    got = base_layout.head_slice(delta, layer, head, block)
                    _rel_close(got, expected.T if conv1d else expected)


def test_merge_and_unload_is_a_plain_model_and_merged_adapters_are_refused():
    model = _lora("llama_qv")
    model.merge_adapter()
    with pytest.raises(LayoutError, match="merged"):
        AttentionLayout.from_model(model)
    model.unmerge_adapter()
    plain = model.merge_and_unload()
    layout = AttentionLayout.from_model(plain)
    assert not layout.partial and all(".lora_" not in n for n in layout.monitored_parameters())
    with pytest.raises(LayoutError, match="nothing to monitor"):  # peft froze the base weights
        layout.trainable_only(plain)
    for p in plain.parameters():
        p.requires_grad_(True)
    batch = lm_batch(batch=3, seq=8)
    names = layout.monitored_parameters()
    assert max_rel_error(per_sample_gradients(plain, batch), microbatch_gradients(plain, batch, names)) < 1e-5


def test_partly_frozen_attention_is_left_out_with_one_warning():
    model = tiny_causal_lm("llama")
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    model.model.layers[1].self_attn.o_proj.weight.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"2 monitored attention tensor\(s\) are frozen") as rec:
        layout = AttentionLayout.from_model(model, trainable_only=True)
    assert len([w for w in rec if "frozen" in str(w.message)]) == 1
    assert not layout.is_monitored(0, "Q") and not layout.is_monitored(1, "O")
    assert layout.is_monitored(0, "K") and layout.is_monitored(1, "Q")
    assert torch.equal(layout.monitored_mask("Q")[:, 0], torch.tensor([False, True]))
    with pytest.raises(LayoutError, match="not monitored"):
        layout.spec(0, "Q")
    batch = lm_batch(batch=3, seq=8)
    names = layout.monitored_parameters()
    assert len(names) == 6
    assert (
        max_rel_error(per_sample_gradients(model, batch, layout), microbatch_gradients(model, batch, names))
        < 1e-5
    )
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(LayoutError, match="nothing to monitor"):
        AttentionLayout.from_model(model, trainable_only=True)


# ---------------------------------------------------------------------- Trainer
class LoraGPT(TinyGPT):
    """TinyGPT whose model gets a LoRA adapter in ``configure_model`` (after the callbacks' setup)."""

    def __init__(self, target_modules=("c_attn",), **kwargs):
        super().__init__(**kwargs)
        self.target_modules = list(target_modules)

    def configure_model(self):
        if not isinstance(self.model, peft.PeftModel):
            config = peft.LoraConfig(
                r=4, lora_alpha=8, lora_dropout=0.0, target_modules=self.target_modules, fan_in_fan_out=True
            )
            self.model = peft.get_peft_model(self.model, config)


def _fit_lora(tmp_path, model, include_bias=None, loggers=False):
    dm = SyntheticTasks(n_train=64, n_val=8, n_probe=8, batch_size=8)
    fm = FisherMonitor(
        train_task="math",
        reference_tasks=["general"],
        capture_every_n_steps=2,
        max_samples_per_task=16,
        probe_max_samples=8,
        include_bias=include_bias,
    )
    qm = QKOVInterferenceMonitor(fm, pairs=[("general", "math")], n_permutations=10, top_k=3)
    rm = ForgettingRiskMonitor(fm, reference_tasks=["general"], warn_threshold=5.0)
    trainer = pl.Trainer(
        max_steps=4,
        val_check_interval=2,
        limit_val_batches=1,
        callbacks=[fm, qm, rm],
        logger=loggers,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm)
    return fm, qm, rm, caught


def test_lora_model_fit_monitors_adapters_and_maps_missing_blocks_as_not_monitored(tmp_path):
    model = LoraGPT(target_modules=["c_proj"], n_layer=2, n_head=4, n_embd=32, pretrain_steps=5)
    fm, qm, rm, caught = _fit_lora(tmp_path, model, loggers=CSVLogger(tmp_path / "csv"))
    layout = fm.layout
    # attn.c_proj (O) and mlp.c_proj both get adapters; only the attention one is monitored
    assert all(".attn.c_proj.lora_" in n for n in layout.monitored_parameters())
    assert [b for b in "QKVO" if layout.is_monitored(0, b)] == ["O"]
    assert fm.captured_steps == 2 and fm.collector.num_samples("math") == 16
    assert sum("frozen" in str(w.message) for w in caught) == 1  # warned once
    heat = qm.latest[("general", "math")]
    assert torch.isnan(heat["Q"]["fisher_overlap"]).all() and torch.isnan(heat["K"]["layer_head_avg"]).all()
    assert (
        torch.isfinite(heat["O"]["fisher_overlap"]).all()
        and torch.isfinite(heat["O"]["layer_head_avg"]).all()
    )
    assert not heat["Q"]["significant"].any() and not heat["Q"]["top_conflicts"]
    # the forgetting prediction runs over every trainable parameter (MLP adapters too)
    assert math.isfinite(rm.history["general"]["predicted"][-1])
    assert rm.history["general"]["predicted"][-1] != 0.0
    attribution = rm.tracker.accumulators["general"].per_block_head()
    assert torch.isnan(attribution["V"]).all() and torch.isfinite(attribution["O"]).all()
    figs = sorted(Path(tmp_path / "csv").rglob("figures/qkov_*fisher_overlap*.png"))
    assert figs


def test_include_bias_kept_through_the_callback_layout(tmp_path):
    model = TinyGPT(n_layer=2, n_head=4, n_embd=32, pretrain_steps=2)
    fm, qm, rm, _ = _fit_lora(tmp_path, model, include_bias=True)
    biases = [n for n in fm.layout.monitored_parameters() if n.endswith("bias")]
    assert fm.layout.include_bias and biases == [
        "model.transformer.h.0.attn.c_attn.bias",
        "model.transformer.h.1.attn.c_attn.bias",
    ]
    assert set(biases) <= set(fm.collector.param_names)
    assert fm.collector.fisher("math")[biases[0]].shape == (96,)

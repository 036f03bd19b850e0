"""Unit tests of fisher_callbacks.functional: forgetting quantities, early warning, dict helpers.

Each quantity is checked against its direct formula written as a slow float64 loop.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, GPT2LMHeadModel, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from fisher_callbacks.functional import (
    DAMAGE_LOG_FLOOR,
    FirstOrderForgettingAccumulator,
    KeyMismatchError,
    as_tensor_dict,
    check_keys,
    cosine_fp32,
    early_warning,
    ewc_penalty,
    first_order_forgetting,
    fisher_damage_asymmetry,
    fisher_overlap_tensor,
    fisher_weighted_damage,
    flatten_fp32,
    measured_forgetting,
    parameter_delta,
    probe_loss,
    unflatten_like,
    warning_active,
)
from fisher_callbacks.layouts import AttentionLayout

SHAPES = {"w1": (3, 4), "w2": (5,), "w3": (2, 2, 3)}


def rand_dict(seed: int, dtype: torch.dtype = torch.float32, positive: bool = False) -> dict:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in SHAPES.items():
        t = torch.randn(shape, generator=gen)
        out[name] = (t.abs() if positive else t).to(dtype)
    return out


def naive_sum(fn, *dicts) -> float:
    """``sum_k fn(a_k, b_k, ...)`` over every entry, one Python float64 at a time."""
    total = 0.0
    for name in dicts[0]:
        flats = [d[name].double().reshape(-1).tolist() for d in dicts]
        for values in zip(*flats):
            total += fn(*values)
    return total


# ------------------------------------------------------------------------------- dict helpers
def test_check_keys_names_missing_and_extra() -> None:
    with pytest.raises(KeyMismatchError) as info:
        check_keys({"a": 1, "b": 2}, {"b": 2, "c": 3}, names=("fisher", "grads"))
    msg = str(info.value)
    assert "missing from grads: ['a']" in msg
    assert "in grads but not in fisher: ['c']" in msg
    assert isinstance(info.value, ValueError)
    check_keys({"a": 1}, {"a": 1, "c": 3}, allow_extra=True)  # extra allowed: no error


def test_flatten_unflatten_roundtrip_and_empty() -> None:
    d = rand_dict(0, torch.bfloat16)
    flat = flatten_fp32(d)
    assert flat.dtype == torch.float32
    assert flat.numel() == sum(t.numel() for t in d.values())
    back = unflatten_like(flat, d)
    for k in d:
        assert torch.equal(back[k], d[k].float())
    assert flatten_fp32({}).numel() == 0
    with pytest.raises(ValueError, match="entries"):
        unflatten_like(torch.zeros(3), d)


def test_cosine_fp32_formula_and_zero() -> None:
    a, b = torch.randn(10), torch.randn(10)
    ref = float((a.double() @ b.double()) / (a.double().norm() * b.double().norm()))
    assert float(cosine_fp32(a, b)) == pytest.approx(ref, rel=1e-5)
    assert float(cosine_fp32(torch.zeros(4), torch.ones(4))) == 0.0
    assert float(cosine_fp32(torch.zeros(0), torch.zeros(0))) == 0.0


def test_as_tensor_dict_module_and_errors() -> None:
    module = torch.nn.Linear(2, 3)
    d = as_tensor_dict(module)
    assert set(d) == {"weight", "bias"}
    assert not d["weight"].requires_grad
    with pytest.raises(TypeError):
        as_tensor_dict([1, 2])
    with pytest.raises(TypeError, match="not a Tensor"):
        as_tensor_dict({"a": 1.0})


# ---------------------------------------------------------------------------- Fisher overlap
def naive_overlap(fa: list[float], fb: list[float]) -> float:
    ta, tb = sum(fa), sum(fb)
    if ta == 0 or tb == 0:
        return 0.0
    return sum(math.sqrt((x / ta) * (y / tb)) for x, y in zip(fa, fb))


def test_fisher_overlap_tensor_matches_formula_per_row() -> None:
    gen = torch.Generator().manual_seed(0)
    fa = torch.rand(3, 4, 7, generator=gen)
    fb = torch.rand(3, 4, 7, generator=gen)
    fb[1, 2] = 0.0  # a zero-trace head
    out = fisher_overlap_tensor(fa, fb, dim=-1)
    assert out.shape == (3, 4)
    assert out.dtype == torch.float32
    for i in range(3):
        for j in range(4):
            ref = naive_overlap(fa[i, j].tolist(), fb[i, j].tolist())
            assert float(out[i, j]) == pytest.approx(ref, rel=1e-5, abs=1e-7)
    assert float(out[1, 2]) == 0.0
    # another dim
    out0 = fisher_overlap_tensor(fa, fb, dim=0)
    ref = naive_overlap(fa[:, 1, 3].tolist(), fb[:, 1, 3].tolist())
    assert float(out0[1, 3]) == pytest.approx(ref, rel=1e-5)


def test_fisher_overlap_tensor_edge_cases() -> None:
    f = torch.rand(6) + 0.1
    assert float(fisher_overlap_tensor(f, f)) == pytest.approx(1.0, abs=1e-6)
    assert float(fisher_overlap_tensor(f, 7.0 * f)) == pytest.approx(1.0, abs=1e-6)
    disjoint = fisher_overlap_tensor(torch.tensor([1.0, 0, 0]), torch.tensor([0, 2.0, 3.0]))
    assert float(disjoint) == 0.0
    assert float(fisher_overlap_tensor(torch.zeros(5), torch.zeros(5))) == 0.0
    empty = fisher_overlap_tensor(torch.zeros(2, 0), torch.zeros(2, 0))
    assert empty.shape == (2,)
    assert not torch.isnan(empty).any()
    assert torch.equal(empty, torch.zeros(2))
    half = fisher_overlap_tensor(f.to(torch.bfloat16), f.to(torch.bfloat16))
    assert half.dtype == torch.float32


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0, 1e3, allow_subnormal=False), min_size=1, max_size=12),
    st.integers(0, 2**31 - 1),
)
def test_fisher_overlap_tensor_properties(values: list[float], seed: int) -> None:
    fa = torch.tensor(values)
    fb = fa[torch.randperm(len(values), generator=torch.Generator().manual_seed(seed))]
    ab = float(fisher_overlap_tensor(fa, fb))
    assert 0.0 <= ab <= 1.0
    assert ab == pytest.approx(float(fisher_overlap_tensor(fb, fa)), abs=1e-6)  # symmetric
    assert ab == pytest.approx(naive_overlap(values, fb.tolist()), abs=1e-5)


# ------------------------------------------------------------------------- measured forgetting
def test_probe_loss_is_mean_of_sample_means() -> None:
    losses = torch.tensor([0.5, 1.0, 3.0], dtype=torch.bfloat16)
    out = probe_loss(losses)
    assert out.dtype == torch.float32
    assert float(out) == pytest.approx(1.5)
    assert float(probe_loss(torch.zeros(0))) == 0.0


def test_measured_forgetting() -> None:
    now = torch.tensor([1.0, 2.0, 4.0])
    anchor = torch.tensor([1.0, 1.0, 1.0])
    assert measured_forgetting(now, anchor) == pytest.approx(4.0 / 3.0)
    assert measured_forgetting(2.5, 2.0) == pytest.approx(0.5)
    assert measured_forgetting(now, 1.0) == pytest.approx(4.0 / 3.0)
    assert measured_forgetting(torch.zeros(0), torch.zeros(0)) == 0.0
    with pytest.raises(ValueError, match="same probe set"):
        measured_forgetting(now, torch.ones(4))


# -------------------------------------------------------------------------- first order
def test_parameter_delta_casts_before_subtracting() -> None:
    after = {"w": torch.tensor([1.0078125, 256.0], dtype=torch.bfloat16)}
    before = {"w": torch.tensor([1.0, 1.0078125], dtype=torch.bfloat16)}
    delta = parameter_delta(after, before)
    assert delta["w"].dtype == torch.float32
    assert delta["w"].tolist() == [0.0078125, 254.9921875]  # exact in fp32
    assert (after["w"] - before["w"])[1].item() == 255.0  # bf16 arithmetic would round
    with pytest.raises(KeyMismatchError, match="before"):
        parameter_delta(after, {"v": before["w"]})


def test_first_order_forgetting_matches_formula() -> None:
    g, d, g_end = rand_dict(1), rand_dict(2), rand_dict(3)
    left = float(first_order_forgetting(g, d))
    assert left == pytest.approx(naive_sum(lambda a, b: a * b, g, d), rel=1e-5)
    trap = float(first_order_forgetting(g, d, g_end))
    ref = naive_sum(lambda a, b, c: 0.5 * (a + c) * b, g, d, g_end)
    assert trap == pytest.approx(ref, rel=1e-5)


def test_first_order_forgetting_keys_empty_and_half() -> None:
    g, d = rand_dict(1), rand_dict(2)
    with pytest.raises(KeyMismatchError, match="w2"):
        first_order_forgetting(g, {k: v for k, v in d.items() if k != "w2"})
    with pytest.raises(KeyMismatchError, match="grad_a_end"):
        first_order_forgetting(g, d, {"w1": g["w1"]})
    with pytest.raises(ValueError, match="shape mismatch"):
        first_order_forgetting(g, {**d, "w2": torch.zeros(6)})
    zero = first_order_forgetting({}, {})
    assert zero.dtype == torch.float32
    assert float(zero) == 0.0
    # fp16 products of 1e-4 * 1e-4 underflow in fp16; fp32 accumulation keeps them
    tiny = {"w": torch.full((1000,), 1e-4, dtype=torch.float16)}
    out = float(first_order_forgetting(tiny, tiny))
    ref = 1000 * float(torch.tensor(1e-4, dtype=torch.float16)) ** 2
    assert out == pytest.approx(ref, rel=1e-4)
    assert float((tiny["w"] * tiny["w"]).sum()) == 0.0  # what fp16 arithmetic would give


def test_accumulator_total_per_parameter_reset() -> None:
    acc = FirstOrderForgettingAccumulator()
    assert acc.total == 0.0
    assert acc.per_block_head() == {}
    steps = [(rand_dict(10 + s), rand_dict(20 + s)) for s in range(4)]
    for g, d in steps:
        out = acc.update(g, d)
        assert float(out) == pytest.approx(naive_sum(lambda a, b: a * b, g, d), rel=1e-5)
    ref = sum(naive_sum(lambda a, b: a * b, g, d) for g, d in steps)
    assert acc.total == pytest.approx(ref, rel=1e-5)
    per_param = acc.per_parameter()
    assert sum(per_param.values()) == pytest.approx(ref, rel=1e-5)
    for name in SHAPES:
        sub = [({name: g[name]}, {name: d[name]}) for g, d in steps]
        assert per_param[name] == pytest.approx(
            sum(naive_sum(lambda a, b: a * b, g, d) for g, d in sub), rel=1e-5
        )
    assert acc.num_updates == 4
    acc.reset()
    assert acc.total == 0.0
    assert acc.per_parameter() == {}
    assert acc.num_updates == 0


def test_accumulator_state_dict_roundtrip() -> None:
    steps = [(rand_dict(30 + s), rand_dict(40 + s)) for s in range(4)]
    full = FirstOrderForgettingAccumulator()
    for g, d in steps:
        full.update(g, d)
    first = FirstOrderForgettingAccumulator()
    for g, d in steps[:2]:
        first.update(g, d)
    resumed = FirstOrderForgettingAccumulator()
    resumed.load_state_dict(first.state_dict())
    for g, d in steps[2:]:
        resumed.update(g, d)
    assert resumed.total == full.total
    assert resumed.per_parameter() == full.per_parameter()
    assert resumed.num_updates == 4


def _quiet_model(factory, **config):
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        torch.manual_seed(0)
        return factory(AutoConfig.for_model(**config))
    finally:
        hf_logging.set_verbosity(verbosity)


@pytest.fixture(scope="module")
def gpt2() -> GPT2LMHeadModel:
    return _quiet_model(
        GPT2LMHeadModel, model_type="gpt2", n_layer=2, n_head=4, n_embd=32, vocab_size=31,
        n_positions=16,
    )  # fmt: skip


@pytest.fixture(scope="module")
def llama_gqa() -> LlamaForCausalLM:
    return _quiet_model(
        LlamaForCausalLM, model_type="llama", num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, hidden_size=32, intermediate_size=64, vocab_size=31,
        max_position_embeddings=16,
    )  # fmt: skip


def _model_dicts(model: torch.nn.Module, seed: int) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    grads = {k: torch.randn(p.shape, generator=gen) for k, p in params.items()}
    delta = {k: torch.randn(p.shape, generator=gen) for k, p in params.items()}
    return grads, delta


def test_accumulator_gpt2_heads_match_manual_slices(gpt2: GPT2LMHeadModel) -> None:
    """Per-head split vs GPT-2's known layout, written out by hand (Conv1D ``[in, out]``)."""
    layout = AttentionLayout.from_model(gpt2)
    acc = FirstOrderForgettingAccumulator(layout)
    assert {b: t.shape for b, t in acc.per_block_head().items()} == {b: (2, 4) for b in ("Q", "K", "V", "O")}
    steps = [_model_dicts(gpt2, s) for s in range(2)]
    for g, d in steps:
        acc.update(g, d)
    heads = acc.per_block_head()
    hidden, d_head = 32, 8
    for layer in range(2):
        qkv = f"transformer.h.{layer}.attn.c_attn.weight"  # [32, 96]
        out = f"transformer.h.{layer}.attn.c_proj.weight"  # [32, 32], rows = head inputs
        for h in range(4):
            cols = slice(h * d_head, (h + 1) * d_head)
            for block, offset in (("Q", 0), ("K", hidden), ("V", 2 * hidden)):
                ref = sum(
                    float((g[qkv][:, offset:][:, cols] * d[qkv][:, offset:][:, cols]).sum()) for g, d in steps
                )
                assert float(heads[block][layer, h]) == pytest.approx(ref, rel=1e-4, abs=1e-5)
            ref = sum(float((g[out][cols] * d[out][cols]).sum()) for g, d in steps)
            assert float(heads["O"][layer, h]) == pytest.approx(ref, rel=1e-4, abs=1e-5)
    # head additivity: all heads == the monitored weights' per-parameter totals
    per_param = acc.per_parameter()
    monitored = sum(per_param[k] for k in layout.monitored_parameters())
    assert float(sum(t.sum() for t in heads.values())) == pytest.approx(monitored, rel=1e-4)
    assert acc.total == pytest.approx(sum(per_param.values()), rel=1e-5)


def test_accumulator_gqa_heads_and_checks(llama_gqa: LlamaForCausalLM) -> None:
    layout = AttentionLayout.from_model(llama_gqa)
    acc = FirstOrderForgettingAccumulator(layout)
    g, d = _model_dicts(llama_gqa, 0)
    acc.update(g, d)
    heads = acc.per_block_head()
    assert heads["Q"].shape == (2, 4)
    assert heads["O"].shape == (2, 4)
    assert heads["K"].shape == (2, 2)  # num_kv_heads columns
    assert heads["V"].shape == (2, 2)
    products = {k: g[k] * d[k] for k in g}
    for layer in range(2):
        names = layout.param_names(layer)
        for block in ("Q", "K", "V", "O"):
            for h in range(layout.heads_in_block(block)):
                query_head = h * layout.kv_group_size if block in ("K", "V") else h
                ref = layout.head_slice(products[names[block]], layer, query_head, block).sum()
                assert float(heads[block][layer, h]) == pytest.approx(float(ref), rel=1e-4)
    # a monitored weight missing from the step is a clear error
    first = layout.monitored_parameters()[0]
    with pytest.raises(KeyMismatchError, match="monitored"):
        acc.update({k: v for k, v in g.items() if k != first}, {k: v for k, v in d.items() if k != first})
    # state of another layout does not load
    other = FirstOrderForgettingAccumulator(layout)
    state = acc.state_dict()
    state["per_block_head"]["K"] = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="does not fit"):
        other.load_state_dict(state)
    other.load_state_dict(acc.state_dict())
    assert torch.equal(other.per_block_head()["K"], heads["K"])


# --------------------------------------------------------------------------- EWC and damage
def test_ewc_penalty_matches_formula() -> None:
    fisher, params, anchor = rand_dict(1, positive=True), rand_dict(2), rand_dict(3)
    ref = 0.5 * naive_sum(lambda f, p, a: f * (p - a) ** 2, fisher, params, anchor)
    assert ewc_penalty(fisher, params, anchor) == pytest.approx(ref, rel=1e-5)
    assert ewc_penalty(fisher, anchor, anchor) == 0.0


def test_ewc_penalty_keys_shapes_empty_half() -> None:
    fisher, params, anchor = rand_dict(1, positive=True), rand_dict(2), rand_dict(3)
    # extra parameters without Fisher carry no penalty
    extra = {**params, "embed": torch.randn(7)}
    assert ewc_penalty(fisher, extra, {**anchor, "embed": torch.zeros(7)}) == pytest.approx(
        ewc_penalty(fisher, params, anchor)
    )
    with pytest.raises(KeyMismatchError, match="missing from anchor"):
        ewc_penalty(fisher, params, {k: v for k, v in anchor.items() if k != "w3"})
    with pytest.raises(ValueError, match="shape mismatch"):
        ewc_penalty(fisher, {**params, "w2": torch.zeros(4)}, anchor)
    assert ewc_penalty({}, params, anchor) == 0.0
    # fp16: F (theta - theta0)^2 = 1e-4 * 1e-6 = 1e-10 underflows in fp16
    f16 = {"w": torch.full((100,), 1e-4, dtype=torch.float16)}
    p16 = {"w": torch.full((100,), 1.0, dtype=torch.float16)}
    a16 = {"w": torch.full((100,), 1.0 + 2**-10, dtype=torch.float16)}
    ref = 0.5 * naive_sum(lambda f, p, a: f * (p - a) ** 2, f16, p16, a16)
    assert ref > 0
    assert ewc_penalty(f16, p16, a16) == pytest.approx(ref, rel=1e-4)


def test_fisher_weighted_damage_matches_formula() -> None:
    fisher, grad = rand_dict(4, positive=True), rand_dict(5)
    ref = 0.5 * naive_sum(lambda f, g: f * g * g, fisher, grad)
    assert fisher_weighted_damage(fisher, grad) == pytest.approx(ref, rel=1e-5)
    assert fisher_weighted_damage({}, {}) == 0.0
    with pytest.raises(KeyMismatchError, match="grad_b"):
        fisher_weighted_damage(fisher, {"w1": grad["w1"]})
    bf = {k: v.to(torch.bfloat16) for k, v in fisher.items()}
    gb = {k: v.to(torch.bfloat16) for k, v in grad.items()}
    ref_bf = 0.5 * naive_sum(lambda f, g: f * g * g, bf, gb)
    assert fisher_weighted_damage(bf, gb) == pytest.approx(ref_bf, rel=1e-5)


def test_fisher_damage_asymmetry() -> None:
    fa, ga = rand_dict(6, positive=True), rand_dict(7)
    fb, gb = rand_dict(8, positive=True), {k: 3.0 * v for k, v in rand_dict(9).items()}
    out = fisher_damage_asymmetry(fa, ga, fb, gb)
    assert set(out) == {"a_from_b", "b_from_a", "log_ratio"}
    a_from_b = 0.5 * naive_sum(lambda f, g: f * g * g, fa, gb)
    b_from_a = 0.5 * naive_sum(lambda f, g: f * g * g, fb, ga)
    assert out["a_from_b"] == pytest.approx(a_from_b, rel=1e-5)
    assert out["b_from_a"] == pytest.approx(b_from_a, rel=1e-5)
    assert out["log_ratio"] == pytest.approx(math.log(a_from_b / b_from_a), rel=1e-5)
    swapped = fisher_damage_asymmetry(fb, gb, fa, ga)
    assert swapped["log_ratio"] == pytest.approx(-out["log_ratio"], rel=1e-6)


def test_fisher_damage_asymmetry_zero_damage_is_finite() -> None:
    fa, ga = rand_dict(6, positive=True), rand_dict(7)
    zeros = {k: torch.zeros_like(v) for k, v in fa.items()}
    both = fisher_damage_asymmetry(zeros, ga, zeros, ga)
    assert both == {"a_from_b": 0.0, "b_from_a": 0.0, "log_ratio": 0.0}
    one = fisher_damage_asymmetry(zeros, ga, fa, ga)  # A undamaged, B damaged
    expected = math.log(DAMAGE_LOG_FLOOR) - math.log(one["b_from_a"])
    assert one["log_ratio"] == pytest.approx(expected)
    assert math.isfinite(one["log_ratio"])
    empty = fisher_damage_asymmetry({}, {}, {}, {})
    assert empty == {"a_from_b": 0.0, "b_from_a": 0.0, "log_ratio": 0.0}
    with pytest.raises(ValueError, match="floor"):
        fisher_damage_asymmetry(fa, ga, fa, ga, floor=0.0)


# ----------------------------------------------------------------------------- early warning
# The rule of functional.early_warning, branch by branch, on plain lists (no Trainer).
T = 0.5


def _power_law(c: float, p: float, steps) -> list[float]:
    return [c * s**p for s in steps]


def test_a_measured_drift_at_the_threshold_warns_at_once() -> None:
    d = early_warning([0, 4, 8], [0.0, 0.1, 0.5], T, horizon_steps=8)
    assert d.warn and d.risk == 1.0 and d.steps_to_threshold == 0.0
    assert "reached the threshold" in d.reason
    assert early_warning([0, 4], [0.0, math.inf], T, horizon_steps=8).warn


@pytest.mark.parametrize("bad", [math.nan, -math.inf])
def test_a_non_finite_drift_is_a_risk_one_warning(bad) -> None:
    d = early_warning([0, 4, 8], [0.0, 0.1, bad], T, horizon_steps=8)
    assert d.warn and d.risk == 1.0 and "not finite" in d.reason
    d = early_warning([0, 4, 8], [0.0, 0.1, 0.2], T, horizon_steps=8, now=(9, bad))  # the forecast
    assert d.warn and d.risk == 1.0 and "not finite" in d.reason


def test_a_falling_or_negative_drift_never_warns_whatever_the_forecast() -> None:
    """The benign runs of issue 25: a probe loss that only fell (a pretrained LM fine-tuned on
    other English; a tiny model trained from scratch on the reference task). Nothing is
    projected, whatever a forecast between measurements says."""
    for drifts in ([0.0, -0.30, -0.50, -0.04], [0.0, -1.1, -1.7, -2.2, -2.6]):
        steps = list(range(0, 4 * len(drifts), 4))
        for n in range(1, len(drifts) + 1):
            for now in (None, (steps[n - 1] + 1, 0.45), (steps[n - 1] + 1, 34.9)):
                if now is not None and now[1] >= T:
                    continue  # a forecast at the threshold is the level rule's, tested apart
                d = early_warning(steps[:n], drifts[:n], T, horizon_steps=8, now=now)
                assert not d.warn and not d.rising, (n, now, d.reason)
                assert d.risk <= max(drifts[n - 1], now[1] if now else 0) / T + 1e-12


def test_the_first_steps_alone_are_never_extrapolated() -> None:
    """Drift 0.03 at step 1 and 0.28 at step 2 grows 9x a step; two steps say too little."""
    d = early_warning([0, 1, 2], [0.0, 0.03, 0.28], T, horizon_steps=8)
    assert not d.warn and "nothing is projected" in d.reason  # the anchor is no point of the band
    d = early_warning([0, 1, 2, 3], [0.0, 0.03, 0.1, 0.28], T, horizon_steps=8)
    assert not d.warn and "span 2 steps" in d.reason and d.risk == pytest.approx(0.28 / T)
    d = early_warning([0, 1, 2, 4], [0.0, 0.03, 0.1, 0.28], T, horizon_steps=8)
    assert d.warn and d.rising  # three measurements over three steps: a band


def test_a_drift_that_stopped_rising_is_not_projected() -> None:
    d = early_warning([0, 4, 8, 12], [0.0, 0.2, 0.4, 0.39], T, horizon_steps=8)
    assert not d.warn and not d.rising and "not rising" in d.reason
    assert d.risk == pytest.approx(0.39 / T)


@pytest.mark.parametrize(("c", "p"), [(0.002, 2.0), (5e-5, 3.5), (0.05, 0.5)])
def test_a_power_law_drift_is_projected_exactly(c, p) -> None:
    """d = c s^p measured at 4, 8, 12: both exponents are p, the band is the one curve
    c (12 + h)^p, and the warning comes exactly when that reaches the threshold."""
    steps = [0, 4, 8, 12]
    drifts = [0.0, *_power_law(c, p, steps[1:])]
    d = early_warning(steps, drifts, T, horizon_steps=8)
    expected = c * 20**p
    assert d.low == pytest.approx(expected, rel=1e-9) and d.high == pytest.approx(expected, rel=1e-9)
    assert d.warn == (expected >= T) and d.rising
    assert d.risk == pytest.approx(min(expected / T, 1.0), rel=1e-9) or (d.warn and d.risk == 1.0)
    crossing = (T / c) ** (1 / p)
    assert d.steps_to_threshold == pytest.approx(max(crossing - 12, 0.0), rel=1e-6)


def test_the_band_comes_from_the_spread_of_the_measured_exponents() -> None:
    """Exponents 1 (4 -> 8) then 2 (8 -> 12), an accelerating drift: the slow side projects
    with 1, the fast with 2 (the acceleration is never extrapolated on the slow side)."""
    steps, drifts = [0, 4, 8, 12], [0.0, 0.02, 0.04, 0.09]
    d = early_warning(steps, drifts, T, horizon_steps=8)
    p1 = math.log(2) / math.log(2)
    p2 = math.log(0.09 / 0.04) / math.log(1.5)
    assert d.low == pytest.approx(0.09 * (20 / 12) ** p1)
    assert d.high == pytest.approx(0.09 * (20 / 12) ** p2)
    assert not d.warn and d.risk == pytest.approx(d.low / T) and d.rising
    assert early_warning(steps, drifts, 0.15, horizon_steps=8).warn  # low = 0.15 reaches 0.15


def test_a_decelerating_drift_is_projected_with_the_trend_of_its_exponent() -> None:
    """Exponents 3 (4 -> 8) then 2 (8 -> 12): the slow side continues the fall, 2 * 2 - 3 = 1;
    a fall below 0 (3 then 1) is floored at 0: a rising drift is projected to stay, not fall."""
    steps = [0, 4, 8, 12]
    drifts = [0.0, 0.001 * 4**3, 0.001 * 8**3, 0.001 * 8**3 * 1.5**2]
    d = early_warning(steps, drifts, 5.0, horizon_steps=8)
    assert d.low == pytest.approx(drifts[-1] * (20 / 12) ** 1.0)
    assert d.high == pytest.approx(drifts[-1] * (20 / 12) ** 3.0)
    assert "decelerating" in d.reason and d.rising and not d.warn
    assert d.steps_to_threshold == pytest.approx(12 * (5.0 / drifts[-1] - 1.0))
    drifts[-1] = 0.001 * 8**3 * 1.5  # exponent 1: the trend gives -1
    flat = early_warning(steps, drifts, 5.0, horizon_steps=8)
    assert flat.low == pytest.approx(drifts[-1]) and flat.steps_to_threshold is None
    assert flat.risk == pytest.approx(drifts[-1] / 5.0)


def test_between_measurements_the_forecast_is_the_level_now() -> None:
    """d = 0.004 s^2 measured at 4, 8, 12; the forecast at step 14 is the level, projected
    with the measured exponent 2 while the forecast rises at least as fast since step 12."""
    steps, drifts = [0, 4, 8, 12], [0.0, 0.004 * 16, 0.004 * 64, 0.004 * 144]
    d = early_warning(steps, drifts, 5.0, horizon_steps=8, now=(14, 0.9))
    assert d.level == 0.9
    assert d.low == pytest.approx(0.9 * (22 / 14) ** 2.0)
    low = early_warning(steps, drifts, 5.0, horizon_steps=8, now=(14, -0.1))  # it fell since
    assert not low.warn and low.low < 0 and low.steps_to_threshold is None
    zero = early_warning(steps, drifts, 5.0, horizon_steps=8, now=(14, 0.0))
    assert not zero.warn and zero.low == 0.0 and zero.steps_to_threshold is None
    at = early_warning(steps, drifts, 5.0, horizon_steps=8, now=(14, 5.5))  # the forecast itself
    assert at.warn and at.risk == 1.0 and at.steps_to_threshold == 0.0
    same = early_warning(steps, drifts, 5.0, horizon_steps=8, now=(12, 0.5))  # no step since
    assert same.low == pytest.approx(0.5 * (20 / 12) ** 2.0)
    with pytest.raises(ValueError, match="before the last measurement"):
        early_warning(steps, drifts, 5.0, horizon_steps=8, now=(11, 0.7))


def test_a_forecast_that_slowed_since_the_last_measurement_lowers_the_slow_side() -> None:
    """The measured exponent is 2; a forecast 0.6 at step 14 (from 0.576 at 12) grows with an
    exponent log(0.6 / 0.576) / log(14 / 12), far below 2: the slow side uses it. A forecast
    that fell below the last measurement is projected flat (exponent 0)."""
    steps, drifts = [0, 4, 8, 12], [0.0, 0.004 * 16, 0.004 * 64, 0.004 * 144]
    d = early_warning(steps, drifts, 1.0, horizon_steps=8, now=(14, 0.6))
    p_now = math.log(0.6 / 0.576) / math.log(14 / 12)
    assert d.low == pytest.approx(0.6 * (22 / 14) ** p_now) and "forecast since step 12" in d.reason
    assert d.high == pytest.approx(0.6 * (22 / 14) ** 2.0)
    assert not d.warn  # with the measured exponent alone: 0.6 * (22 / 14)^2 = 1.48 would warn
    fell = early_warning(steps, drifts, 1.0, horizon_steps=8, now=(14, 0.5))
    assert fell.low == pytest.approx(0.5) and not fell.warn and fell.steps_to_threshold is None


def test_between_measurements_an_accelerating_drift_reads_its_two_latest_exponents() -> None:
    """Exponents 1 (4 -> 8) then 2 (8 -> 12): at the measurement the slow side projects with 1.
    Between measurements the two latest readings are the last measured exponent, 2, and the
    forecast's since step 12: the older 1 gives way. A forecast rising like steps^3 since step
    12 gives the slow side 2 (the lower of 2 and 3), one like steps^1.5 gives 1.5."""
    steps, drifts = [0, 4, 8, 12], [0.0, 0.02, 0.04, 0.09]
    p_2 = math.log(0.09 / 0.04) / math.log(1.5)
    fast = 0.09 * (14 / 12) ** 3.0
    d = early_warning(steps, drifts, 1.0, horizon_steps=8, now=(14, fast))
    assert d.low == pytest.approx(fast * (22 / 14) ** p_2) and d.high == pytest.approx(
        fast * (22 / 14) ** p_2
    )
    assert d.low > fast * (22 / 14) ** 1.0  # what the older exponent alone would have given
    assert "last measured exponent" in d.reason
    mid = 0.09 * (14 / 12) ** 1.5
    d = early_warning(steps, drifts, 1.0, horizon_steps=8, now=(14, mid))
    assert d.low == pytest.approx(mid * (22 / 14) ** 1.5) and "forecast since step 12" in d.reason
    # a decelerating drift keeps the trend of its exponent (3 then 2: slow side 1) between
    # measurements too, while the forecast rises faster than that
    dec = [0.0, 0.001 * 4**3, 0.001 * 8**3, 0.001 * 8**3 * 1.5**2]
    d = early_warning(steps, dec, 5.0, horizon_steps=8, now=(14, dec[-1] * (14 / 12) ** 2.5))
    assert (
        d.low == pytest.approx(dec[-1] * (14 / 12) ** 2.5 * (22 / 14) ** 1.0) and "decelerating" in d.reason
    )


def test_exponents_too_large_or_too_small_for_a_float_give_inf_not_an_overflow() -> None:
    """A forecast that barely moved since the last measurement reads an exponent near 0, and the
    steps to the threshold overflow a float: inf, not an OverflowError (which disabled the
    engine's per-step forecast for the rest of a fit: tiny plateau control seed 12, interval 12,
    step 26 of the validation grid). A measured exponent in the thousands (a drift rising from a
    denormal) puts the fast side at inf the same way."""
    steps, drifts = [0, 1, 2, 4, 8, 12, 24], [0.0, 4.5e-4, 1.19e-3, 3.97e-3, 0.0208, 0.0605, 0.229013]
    d = early_warning(steps, drifts, 0.5, horizon_steps=24, now=(26, 0.229023))
    assert not d.warn and d.rising and d.steps_to_threshold == math.inf
    assert d.level <= d.low < 0.5 and "forecast since step 24" in d.reason
    d = early_warning([0, 1, 2, 100], [0.0, 5e-324, 0.3, 0.4], 0.5, horizon_steps=200)
    assert d.high == math.inf and d.low == pytest.approx(0.4) and not d.warn


def test_the_rule_never_raises_on_valid_series_of_any_magnitude() -> None:
    """3000 random series (drifts from denormals to 1e300, either sign, flat stretches, forecasts
    between measurements or not): a decision with a risk in [0, 1] and finite or infinite sides,
    never an exception (one OverflowError disabled a fit's forecast before)."""
    rng = random.Random(0)
    for _ in range(3000):
        n = rng.randint(1, 7)
        steps = sorted(rng.sample(range(0, 60), n))
        drifts = [0.0] + [
            rng.choice([1.0, -1.0, 1.0]) * 10.0 ** rng.uniform(-323, 300)
            if rng.random() < 0.3
            else rng.uniform(-0.1, 0.6)
            for _ in range(n - 1)
        ]
        if rng.random() < 0.3 and n > 1:  # a flat stretch
            drifts[-1] = drifts[-2] * (1.0 + 1e-9)
        now = None
        if rng.random() < 0.5:
            last = drifts[-1] if n > 1 else 0.0
            now = (steps[-1] + rng.randint(0, 12), last * (1.0 + rng.choice([1e-12, 1e-4, 0.3, -0.5])))
        d = early_warning(
            steps, drifts, rng.choice([0.1, 0.5, 2.0]), horizon_steps=rng.choice([0, 4, 24, 200]), now=now
        )
        assert 0.0 <= d.risk <= 1.0 and not math.isnan(d.low) and not math.isnan(d.high)


# Gemma-3 270M, the narrow task at lr 2e-5 (validation grid, tuning part of round 3): the probe
# loss fell over the first steps, then rose past its start; it crossed 0.5 nats at step 13.
_DIP = ([0, 1, 2, 3, 6, 9], [0.0, -0.0164, -0.0246, -0.0231, 0.0902, 0.2934])


def test_a_drift_that_dipped_below_the_anchor_is_projected_along_a_line() -> None:
    """Measured -0.023, 0.090, 0.293 at steps 3, 6, 9: rising, the last above the anchor, but no
    power of the steps since the anchor fits a drift that was negative. The slow side rises at
    the lower of the two measured rates, the fast side at the higher, over the window's 6
    steps: 0.293 + 6 * 0.0378 = 0.52, a warning four steps before the crossing."""
    steps, drifts = _DIP
    r_1, r_2 = (0.0902 + 0.0231) / 3, (0.2934 - 0.0902) / 3
    d = early_warning(steps, drifts, T, horizon_steps=6)
    assert d.low == pytest.approx(0.2934 + 6 * r_1) and d.high == pytest.approx(0.2934 + 6 * r_2)
    assert d.warn and d.rising and d.risk == 1.0 and "after a dip below the anchor" in d.reason
    assert d.steps_to_threshold == pytest.approx((T - 0.2934) / r_1)
    quiet = early_warning(steps, drifts, 0.6, horizon_steps=6)  # 0.52 < 0.6
    assert not quiet.warn and quiet.risk == pytest.approx(quiet.low / 0.6)
    short = early_warning(steps, drifts, T, horizon_steps=3)  # the horizon, when shorter
    assert short.low == pytest.approx(0.2934 + 3 * r_1) and not short.warn
    # between measurements the two latest rates are the last measured one and the forecast's
    # since step 9: a forecast rising faster than r_2 gives r_2, the older r_1 gives way
    quick = early_warning(steps, drifts, T, horizon_steps=6, now=(10, 0.2934 + 0.1))
    assert quick.low == pytest.approx(0.3934 + 6 * r_2) and quick.warn
    # a forecast that slowed lowers the slow side to its own rate since step 9; one that fell is
    # projected flat
    slowed = early_warning(steps, drifts, T, horizon_steps=6, now=(10, 0.30))
    r_now = (0.30 - 0.2934) / 1
    assert slowed.low == pytest.approx(0.30 + 6 * r_now) and "forecast since step 9" in slowed.reason
    assert not slowed.warn
    fell = early_warning(steps, drifts, T, horizon_steps=6, now=(10, 0.25))
    assert fell.low == pytest.approx(0.25) and not fell.warn and fell.steps_to_threshold is None


def test_a_rise_back_towards_the_anchor_is_not_projected() -> None:
    """A probe loss that fell and recovers part of the way (the benign run of issue 25: -0.5,
    -0.3, -0.04) rises, but stays below its start: nothing is projected, whatever the forecast."""
    steps, drifts = [0, 4, 8, 12], [0.0, -0.5, -0.3, -0.04]
    for now in (None, (13, 0.2), (14, 0.45)):
        d = early_warning(steps, drifts, T, horizon_steps=8, now=now)
        assert not d.warn and not d.rising and "not above the anchor" in d.reason


def test_a_projection_never_reaches_further_ahead_than_its_window_reaches_back() -> None:
    """Measurements at 1, 2, 4 (d = 0.001 s^2): the window reaches back 3 steps from step 4, so
    the projection goes 3 steps ahead whatever the horizon; from the forecast at step 6, 5."""
    steps, drifts = [0, 1, 2, 4], [0.0, 0.001, 0.004, 0.016]
    d = early_warning(steps, drifts, T, horizon_steps=1000)
    assert d.low == pytest.approx(0.016 * (7 / 4) ** 2)
    d = early_warning(steps, drifts, T, horizon_steps=1000, now=(6, 0.036))
    assert d.low == pytest.approx(0.036 * (11 / 6) ** 2)
    d = early_warning(steps, drifts, T, horizon_steps=2)
    assert d.low == pytest.approx(0.016 * (6 / 4) ** 2)


# The two runs of the validation grid (tiny GPT-2 seed 5, validation every 12 steps) that the
# rule of round 1 could not tell apart at step 12: measured drift, then the per-step forecasts
# of steps 13-23 (benchmarks/warning_validation.py, tuning part of round 2).
_PLATEAU = (
    [(0, 0.0), (1, 0.0006), (2, 0.0015), (4, 0.0046), (8, 0.0271), (12, 0.1104), (24, 0.2115)],
    [0.1329, 0.1488, 0.1507, 0.1472, 0.1371, 0.1237, 0.1075, 0.0888, 0.0695, 0.0504, 0.0329],
)
_FORGETTING = (
    [(0, 0.0), (1, 0.0004), (2, 0.0012), (4, 0.0044), (8, 0.0368), (12, 0.2532), (24, 2.4291)],
    [0.3545, 0.4482, 0.5356, 0.6139, 0.6851, 0.7505, 0.8089, 0.8614, 0.9068, 0.9465, 0.98],
)


def _decisions(measured, forecasts, every=12):
    """The rule at every step as the engine calls it: at a measurement, or from the forecast."""
    out = []
    for n in range(2, len(measured) + 1):
        steps, drifts = zip(*measured[:n])
        out.append((steps[-1], early_warning(steps, drifts, T, horizon_steps=2 * every)))
        if steps[-1] == 12:
            for k, f in enumerate(forecasts):
                out.append((13 + k, early_warning(steps, drifts, T, horizon_steps=24, now=(13 + k, f))))
    return out


def test_a_rise_that_plateaus_is_not_warned_where_a_forgetting_run_is() -> None:
    """The plateau control rises like steps^2.6-3.5 up to step 12; the window (4..12) projects
    only 8 steps ahead (0.41), the forecasts since step 12 slow down (the slow side follows
    them), and at step 24 the exponent fell from 3.5 to 0.6: never a warning. The forgetting
    run is warned at step 12, before its crossing at step 14."""
    assert not any(d.warn for _, d in _decisions(*_PLATEAU))
    first = next(s for s, d in _decisions(*_FORGETTING) if d.warn)
    assert first == 12


def test_relative_mode_equals_scaled_absolute() -> None:
    steps, drifts = [0, 4, 8, 12], [0.0, 0.02, 0.08, 0.18]
    rel = early_warning(steps, drifts, 0.1, horizon_steps=8, relative=True, baseline=-2.0)
    ab = early_warning(steps, [x / 2 for x in drifts], 0.1, horizon_steps=8)
    assert (rel.warn, rel.risk) == (ab.warn, pytest.approx(ab.risk)) and rel.low == pytest.approx(ab.low)
    with pytest.raises(ValueError, match="finite baseline"):
        early_warning(steps, drifts, 0.1, horizon_steps=8, relative=True)


def test_invalid_arguments_are_errors() -> None:
    for kwargs in ({"warn_threshold": 0.0}, {"warn_threshold": math.nan}, {"horizon_steps": -1.0}):
        args = {"warn_threshold": T, "horizon_steps": 8.0, **kwargs}
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            early_warning([0, 1], [0.0, 0.1], args.pop("warn_threshold"), **args)
    with pytest.raises(ValueError, match="strictly increasing"):
        early_warning([0, 0], [0.0, 0.1], T, horizon_steps=8)
    with pytest.raises(ValueError, match="differ in length"):
        early_warning([0, 1], [0.0], T, horizon_steps=8)
    assert not early_warning([], [], T, horizon_steps=8).warn


def test_the_warning_state_latches_until_the_drift_falls_below_the_threshold() -> None:
    steps = [0, 4, 8, 12, 16, 20, 24]
    drifts = [0.0, 0.05, 0.2, 0.45, 0.44, 0.3, 0.1]
    active, states = False, []
    for n in range(1, len(steps) + 1):
        active = warning_active(active, early_warning(steps[:n], drifts[:n], T, horizon_steps=8))
        states.append(active)
    # on at 12 (0.45 rising fast); stays on at 16 (stopped rising: no warning, not falling
    # twice); off at 20 (fell at the last two measurements, below the threshold)
    assert states == [False, False, False, True, True, False, False]
    crossed = early_warning([0, 4, 8], [0.0, 0.7, 0.6], T, horizon_steps=8)
    assert warning_active(True, crossed)  # still above the threshold: on


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-0.5, 0.49, allow_nan=False), min_size=1, max_size=12),
    st.floats(-3.0, 0.49, allow_nan=False),
)
def test_a_series_that_never_rises_never_warns(drifts: list[float], forecast: float) -> None:
    falling = sorted(drifts, reverse=True)
    steps = list(range(1, len(falling) + 1))
    d = early_warning([0, *steps], [0.0, *falling], T, horizon_steps=50, now=(len(falling) + 1, forecast))
    assert not d.warn and 0.0 <= d.risk < 1.0

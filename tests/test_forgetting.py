"""Unit tests of fisher_callbacks.functional: forgetting quantities, early warning, dict helpers.

Each quantity is checked against its direct formula written as a slow float64 loop.
"""

from __future__ import annotations

import dataclasses
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
    EarlyWarningConfig,
    FirstOrderForgettingAccumulator,
    KeyMismatchError,
    ProjectionCalibration,
    WarningDecision,
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
    forecast_drift,
    margin_drift,
    margin_rate,
    measured_forgetting,
    parameter_delta,
    power_law_drift,
    probe_loss,
    secant_curvature,
    unflatten_like,
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
def test_secant_curvature_and_forecast_are_exact_on_a_quadratic() -> None:
    """L(theta) = 0.5 theta^T A theta + b . theta in float64: the secant curvature along a move is
    Delta^T A Delta, and the forecast (now and projected ahead) equals L's true change."""
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a, b = m @ m.T, torch.randn(6, generator=g, dtype=torch.float64)
    loss = lambda t: float(0.5 * t @ a @ t + b @ t)  # noqa: E731
    grad = lambda t: {"w": a @ t + b}  # noqa: E731
    theta0 = torch.randn(6, generator=g, dtype=torch.float64)
    delta = torch.randn(6, generator=g, dtype=torch.float64)
    theta_b = theta0 + delta
    kappa = secant_curvature(grad(theta0), grad(theta_b), {"w": delta})
    assert kappa == pytest.approx(float(delta @ a @ delta), rel=1e-6)  # fp32 dot products
    measured = loss(theta_b) - loss(theta0)
    along = float(first_order_forgetting(grad(theta_b), {"w": delta}))
    for alpha, ahead in ((0.0, 0.0), (0.4, 0.0), (0.4, 2.0), (1.0, 1.0)):
        d = alpha * delta
        first = float(first_order_forgetting(grad(theta_b), {"w": d}))
        got = forecast_drift(measured, first, kappa, alpha, along=along, ahead=ahead)
        truth = loss(theta_b + (alpha + ahead) * delta) - loss(theta0)
        assert got == pytest.approx(truth, rel=1e-6)  # the dot products run in fp32
    assert forecast_drift(0.1, 0.2) == pytest.approx(0.3)  # pure first order
    assert math.isnan(forecast_drift(math.nan, 0.0))


@pytest.mark.parametrize("power", [1.5, 2.0, 3.0])
def test_power_law_projection_is_exact_on_a_power_of_the_move(power) -> None:
    """L(theta_0 + tau Delta) - L(theta_0) = c tau^p along a line: the logarithmic derivative at
    tau = 1 gives p back, and the projection equals the true drift anywhere ahead; for p = 2 (a
    bowl entered at its minimum) it agrees with the quadratic forecast."""
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(5, generator=g, dtype=torch.float64)
    c = 0.03
    drift = lambda tau: c * tau**power  # noqa: E731
    # dL/dtau at tau = 1 is g_A(theta_b) . Delta: a gradient along Delta with that projection
    grad_b = delta * (c * power / float(delta @ delta))
    along = float(first_order_forgetting({"w": grad_b}, {"w": delta}))
    for progress, ahead in ((0.0, 0.0), (0.0, 4.0), (0.5, 2.0)):
        got = power_law_drift(drift(1.0), along, progress, ahead=ahead)
        assert got == pytest.approx(drift(1.0 + progress + ahead), rel=1e-6)
    if power == 2.0:  # the same bowl through the quadratic model (g_A(theta_0) = 0)
        kappa = 2 * c
        assert forecast_drift(drift(1.0), 0.0, kappa, 0.0, along=along, ahead=4.0) == pytest.approx(
            drift(5.0)
        )
    # the power is capped, and a drift that does not grow has no power law
    assert power_law_drift(1e-6, 1.0, ahead=1.0, max_power=4.0) == pytest.approx(1e-6 * 2**4)
    for measured, slope in ((0.0, 1.0), (-0.1, 0.2), (0.1, -0.2), (math.nan, 1.0), (0.1, math.inf)):
        assert power_law_drift(measured, slope, ahead=1.0) == -math.inf


@pytest.mark.parametrize("m0", [6.0, 1.0, -2.0])
def test_margin_projection_is_exact_for_a_logistic_loss_whose_margin_moves_linearly(m0) -> None:
    """A logistic loss ``log(1 + e^-y w.x)`` of a linear model moved along ``Delta``: its margin
    moves linearly, and the projection from ``b`` (autograd gradient there) equals the true loss
    anywhere ahead, confident (exponential growth), near 0 and wrong (linear growth) alike."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, generator=g, dtype=torch.float64)
    delta = -x * (1.5 / float(x @ x))  # each Delta lowers the margin by 1.5
    w0 = x * (m0 / float(x @ x))  # margin m0 at the anchor

    def loss(w: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(-(w @ x))

    w_b = (w0 + 2 * delta).requires_grad_()  # b: two Deltas from the anchor
    (grad_b,) = torch.autograd.grad(loss(w_b), w_b)
    along = float(first_order_forgetting({"w": grad_b}, {"w": delta}))
    base, at_b = float(loss(w0)), float(loss(w_b.detach()))
    for progress, ahead in ((0.0, 0.0), (0.0, 4.0), (0.5, 2.0), (1.0, 8.0)):
        truth = float(loss(w_b.detach() + (progress + ahead) * delta)) - base
        got = margin_drift(at_b, base, along, progress, ahead=ahead)
        assert got == pytest.approx(truth, rel=1e-6)  # the dot product runs in fp32
    # confident: it grows several-fold a step where the power law from the anchor cannot
    if m0 == 6.0:
        assert margin_drift(at_b, base, along, ahead=2.0) > power_law_drift(at_b - base, 2 * along, ahead=1.0)
    bad = ((0.0, 1.0), (-0.1, 0.2), (0.1, -0.2), (0.1, 0.0), (math.nan, 1.0), (0.1, math.inf))
    for bad_loss, slope in bad:
        assert margin_drift(bad_loss, 0.0, slope, ahead=1.0) == -math.inf
    assert margin_drift(40.0, 0.0, 2.0, ahead=3.0) == pytest.approx(46.0)  # large loss: linear
    assert margin_rate(at_b, along) == pytest.approx(1.5, rel=1e-6)  # the margin's fall per Delta
    assert math.isnan(margin_rate(0.0, 1.0)) and math.isnan(margin_rate(-0.1, 1.0))  # no log-loss


@pytest.mark.parametrize("m0", [6.0, 1.0])
def test_margin_projection_with_bend_is_exact_for_a_margin_that_falls_quadratically(m0) -> None:
    """The weights move on ``w_b + tau d1 + tau^2 d2 / 2``, so the margin falls by
    ``1.5 tau + 0.4 tau^2 / 2``: with ``along`` the gradient along the tangent ``d1`` and
    ``bend = 0.4`` the projection is the true loss; a slowing margin (``bend < 0``) is not
    extrapolated (the steady-rate projection)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, generator=g, dtype=torch.float64)
    unit = x / float(x @ x)
    w_b = (m0 * unit).requires_grad_()
    d1, d2 = -1.5 * unit, -0.4 * unit

    def loss(w: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(-(w @ x))

    (grad_b,) = torch.autograd.grad(loss(w_b), w_b)
    along = float(grad_b @ d1)
    at_b = float(loss(w_b.detach()))
    for tau in (1.0, 3.0, 8.0):
        truth = float(loss(w_b.detach() + tau * d1 + 0.5 * tau * tau * d2))
        assert margin_drift(at_b, 0.0, along, ahead=tau, bend=0.4) == pytest.approx(truth, rel=1e-9)
        steady = margin_drift(at_b, 0.0, along, ahead=tau)
        assert margin_drift(at_b, 0.0, along, ahead=tau, bend=-0.4) == steady < truth


@pytest.mark.parametrize("came", [0.5, 2.0, 10.0])
def test_projection_calibration_scales_a_projection_by_how_the_earlier_ones_came_out(came) -> None:
    """A projection that promises the rise ``r`` over ``h`` steps of a series that rises
    ``came * r``: once the first has matured, the calibrated projection is the truth (``came``
    within the clip)."""
    h, slope = 4, 0.01
    truth = lambda t: came * slope * t  # noqa: E731
    calib = ProjectionCalibration(window=3, max_factor=4.0, min_rise=1e-3)
    damp_only = ProjectionCalibration(window=3, min_rise=1e-3)  # the default: c <= 1
    for t in range(12):
        value = truth(t)
        calib.observe(t, value)
        damp_only.observe(t, value)
        projected = value + slope * h  # the model's projection: a rise of slope * h
        if t < h:
            assert calib.factor == 1.0 and calib.apply(value, projected) == projected  # none matured
        else:
            assert calib.factor == pytest.approx(min(came, 4.0))
            expected = truth(t + h) if came <= 4.0 else value + 4.0 * slope * h
            assert calib.apply(value, projected) == pytest.approx(expected)
            assert damp_only.factor == pytest.approx(min(came, 1.0))
        calib.issue(t + h, value, projected)
        damp_only.issue(t + h, value, projected)
    assert len(calib.ratios) == 3 and len(calib.pending) == h
    again = ProjectionCalibration(window=3, max_factor=4.0, min_rise=1e-3)
    again.load_state_dict(calib.state_dict())
    assert again.pending == calib.pending and again.ratios == calib.ratios


def test_projection_calibration_ignores_what_says_nothing() -> None:
    calib = ProjectionCalibration(window=4, min_rise=0.01)
    calib.issue(2, 0.1, 0.105)  # a promised rise below min_rise: no ratio
    calib.issue(3, 0.1, 0.3)
    calib.issue(3, 0.1, 0.2)  # the same due step: replaces the one before
    calib.observe(2, 0.5)
    assert calib.ratios == [] and calib.factor == 1.0
    calib.observe(3, math.nan)  # a non-finite value matures nothing (the projection is dropped)
    assert calib.ratios == [] and calib.pending == []
    calib.issue(4, 0.1, 0.2)
    calib.observe(5, 0.0)  # it fell: the ratio is negative, the factor clipped to 1 / max_factor
    assert calib.ratios == [pytest.approx(-1.0)] and calib.factor == 0.25
    assert calib.apply(0.3, 0.1) == 0.1  # a projection that does not rise is left as it is
    assert calib.apply(0.3, 0.7) == pytest.approx(0.4)
    for bad in ({"max_factor": 0.5}, {"min_factor": 0.0}, {"min_factor": 2.0}):
        with pytest.raises(ValueError, match="min_factor"):
            ProjectionCalibration(**bad)


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
def test_flat_zero_never_warns() -> None:
    steps = list(range(0, 300, 10))
    for n in range(1, len(steps) + 1):
        decision = early_warning(steps[:n], [0.0] * n)
        assert not decision.warn
        assert decision.risk == 0.0
        assert decision.slope == 0.0
        assert decision.steps_to_threshold is None


def test_flat_noise_never_warns() -> None:
    """Noise at a tenth of the threshold, 200 series x 30 validations: not a single warning."""
    steps = list(range(0, 300, 10))
    for seed in range(200):
        rng = random.Random(seed)
        offset = rng.uniform(-0.02, 0.04)
        drifts = [offset + rng.gauss(0.0, 0.01) for _ in steps]
        for n in range(1, len(steps) + 1):
            decision = early_warning(steps[:n], drifts[:n], 0.1)
            assert not decision.warn, (seed, n, decision.reason)
            assert decision.risk < 1.0


@pytest.mark.parametrize("spacing", [1, 10, 25])
def test_linear_ramp_warns_before_crossing(spacing: int) -> None:
    """d = 0.01 per validation, T = 0.1: crossing at validation 10, warning at validation 9."""
    steps = [spacing * i for i in range(1, 16)]
    drifts = [0.01 * i for i in range(1, 16)]
    decisions = [early_warning(steps[:n], drifts[:n], 0.1) for n in range(1, 16)]
    warns = [d.warn for d in decisions]
    crossing = next(i for i, d in enumerate(drifts) if d >= 0.1 - 1e-12)
    first = warns.index(True)
    assert first == crossing - 1  # strictly before: the trend reaches T within one spacing
    assert all(warns[first:])
    assert decisions[first].steps_to_threshold == pytest.approx(spacing)
    assert decisions[first].slope == pytest.approx(0.01 / spacing)
    assert decisions[first - 1].steps_to_threshold == pytest.approx(2 * spacing)
    assert "reaches the threshold" in decisions[first].reason


def test_ramp_with_long_horizon_warns_earlier_and_short_at_crossing() -> None:
    steps = list(range(1, 16))
    drifts = [0.01 * i for i in steps]
    long = [early_warning(steps[:n], drifts[:n], 0.1, horizon_steps=5).warn for n in steps]
    assert long.index(True) == 4  # validation 5 (d = 0.05) projects d = 0.10 at step 10
    short = [early_warning(steps[:n], drifts[:n], 0.1, horizon_steps=0).warn for n in steps]
    assert short.index(True) == 9  # only the level rule: at the crossing


def test_aligned_points_inside_noise_do_not_warn() -> None:
    """Three points on a line project a crossing, but after a noisy history they are noise."""
    triple = [0.01, 0.04, 0.07]  # slope 0.03 per validation: reaches 0.1 at the next one
    quiet = [0.0] * 12 + triple
    noisy = [0.015 * (-1) ** i for i in range(12)] + triple  # noise of +-0.015
    steps = list(range(15))
    assert early_warning(steps, quiet, 0.1).warn
    decision = early_warning(steps, noisy, 0.1)
    assert not decision.warn
    assert "within noise" in decision.reason
    # the same with random noise: rare chance alignments only (measured: 1% of seeds)
    alarms = 0
    for seed in range(300):
        rng = random.Random(seed)
        series = [rng.gauss(0.0, 0.03) for _ in range(12)] + triple
        alarms += early_warning(steps, series, 0.1).warn
    assert alarms <= 9


def test_jump_warns_at_once_and_small_jump_does_not() -> None:
    steps = list(range(10))
    jump = [0.0] * 6 + [0.5] * 4
    warns = [early_warning(steps[:n], jump[:n], 0.1).warn for n in range(1, 11)]
    assert warns == [False] * 6 + [True] * 4
    small = [0.0] * 6 + [0.06] * 4  # a step change below the threshold, then flat
    assert not any(early_warning(steps[:n], small[:n], 0.1).warn for n in range(1, 11))


def test_falling_drift_and_short_series_do_not_warn() -> None:
    steps = [0, 1, 2, 3]
    assert not early_warning(steps, [0.09, 0.07, 0.05, 0.03], 0.1).warn
    # two points of a steep rise: the trend needs three, only the level rule applies
    decision = early_warning([0, 1], [0.0, 0.09], 0.1)
    assert not decision.warn
    assert decision.steps_to_threshold is None
    assert early_warning([0, 1, 2], [0.0, 0.045, 0.09], 0.1).warn


def test_relative_mode_equals_scaled_absolute() -> None:
    steps = list(range(8))
    drifts = [0.0, 0.02, 0.05, 0.09, 0.14, 0.2, 0.27, 0.35]
    for n in range(1, 9):
        rel = early_warning(steps[:n], drifts[:n], 0.1, relative=True, baseline=-2.0)
        ab = early_warning(steps[:n], [d / 2.0 for d in drifts[:n]], 0.1)
        assert rel.warn == ab.warn
        assert rel.risk == pytest.approx(ab.risk)
        assert rel.drift == pytest.approx(drifts[n - 1] / 2.0)
    with pytest.raises(ValueError, match="baseline"):
        early_warning(steps, drifts, 0.1, relative=True)
    # zero baseline: floored, any positive drift is an infinite relative rise, never NaN
    zero = early_warning([0, 1], [0.0, 1e-3], 0.1, relative=True, baseline=0.0)
    assert zero.warn
    assert zero.risk == 1.0


def test_non_finite_and_empty_series() -> None:
    empty = early_warning([], [])
    assert empty == WarningDecision(False, "no drift measured yet", None, 0.0, 0.0, 0.0, 0.1)
    # a diverged probe loss is never a silent "no risk"
    for bad in (math.nan, -math.inf):
        diverged = early_warning([0, 1], [0.0, bad])
        assert diverged.warn and diverged.risk == 1.0
        assert "not finite" in diverged.reason
    # NaN validations are skipped
    ignored = early_warning([0, 1, 2, 3], [0.0, math.nan, 0.0, 0.0])
    assert not ignored.warn
    assert ignored.slope == 0.0
    inf = early_warning([0, 1, 2], [0.0, 0.0, math.inf])
    assert inf.warn
    assert inf.risk == 1.0
    assert math.isfinite(inf.slope)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="length"):
        early_warning([0, 1], [0.0])
    with pytest.raises(ValueError, match="increasing"):
        early_warning([0, 0], [0.0, 0.0])
    with pytest.raises(ValueError, match="warn_threshold"):
        early_warning([0], [0.0], 0.0)
    with pytest.raises(ValueError, match="window"):
        EarlyWarningConfig(window=2)
    with pytest.raises(ValueError, match="horizon"):
        EarlyWarningConfig(horizon_steps=-1)


def test_config_is_frozen_and_evaluates_like_the_function() -> None:
    config = EarlyWarningConfig(warn_threshold=0.2, horizon_steps=3, window=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.warn_threshold = 1.0  # type: ignore[misc]
    steps, drifts = [0, 1, 2, 3, 4], [0.0, 0.03, 0.06, 0.09, 0.12]
    assert config.evaluate(steps, drifts) == early_warning(steps, drifts, 0.2, horizon_steps=3, window=4)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.integers(-1000, 1000).map(lambda i: i / 1000), min_size=1, max_size=12),
    st.floats(0.01, 10.0),
    st.sampled_from([0.5, 2.0, 1024.0]),
)
def test_early_warning_properties(drifts: list[float], threshold: float, scale: float) -> None:
    steps = [3 * i for i in range(len(drifts))]
    decision = early_warning(steps, drifts, threshold)
    assert 0.0 <= decision.risk <= 1.0
    assert (decision.risk == 1.0) == decision.warn
    if decision.warn:
        assert decision.steps_to_threshold is not None
    # units do not matter: scaling drifts and threshold together (by a power of two, exactly)
    scaled = early_warning(steps, [d * scale for d in drifts], threshold * scale)
    assert scaled.warn == decision.warn
    assert scaled.risk == pytest.approx(decision.risk, abs=1e-9)

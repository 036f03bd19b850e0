"""Tests of fisher_callbacks.toolkit: each function against its direct formula (slow loops)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, GPT2LMHeadModel

from fisher_callbacks import functional, toolkit
from fisher_callbacks.functional import KeyMismatchError
from fisher_callbacks.toolkit import (
    compare_task_fisher,
    fisher_importance,
    fisher_mask_overlap,
    fisher_overlap,
    fisher_pruning_masks,
    fisher_uncertainty,
    fisher_weighted_merge,
    scale_by_fisher,
    top_fisher_directions,
)

SHAPES = {"attn.q": (3, 4), "attn.o": (5,), "mlp": (2, 2, 3)}


def fisher_dict(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.rand(shape, generator=gen).to(dtype) for k, shape in SHAPES.items()}


def entries(d: dict[str, torch.Tensor]) -> list[tuple[str, int, float]]:
    """Every ``(name, flat index, value)`` in dict order, as float64 Python numbers."""
    return [(k, i, v) for k, t in d.items() for i, v in enumerate(t.double().reshape(-1).tolist())]


def naive_overlap(fa: list[float], fb: list[float]) -> float:
    ta, tb = sum(fa), sum(fb)
    if ta == 0 or tb == 0:
        return 0.0
    return sum(math.sqrt(x / ta * y / tb) for x, y in zip(fa, fb))


def naive_cosine(a: list[float], b: list[float]) -> float:
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return 0.0 if na == 0 or nb == 0 else sum(x * y for x, y in zip(a, b)) / (na * nb)


def values(d: dict[str, torch.Tensor]) -> list[float]:
    return [v for _, _, v in entries(d)]


# --------------------------------------------------------------------------------- re-exports
def test_forgetting_quantities_are_re_exported_not_copied() -> None:
    assert toolkit.ewc_penalty is functional.ewc_penalty
    assert toolkit.fisher_weighted_damage is functional.fisher_weighted_damage
    assert toolkit.fisher_damage_asymmetry is functional.fisher_damage_asymmetry
    for name in toolkit.__all__:
        assert getattr(toolkit, name).__doc__, name


# --------------------------------------------------------------------------------- importance
def test_fisher_importance_matches_formula() -> None:
    fisher = fisher_dict(0)
    total = sum(values(fisher))
    imp = fisher_importance(fisher)
    for name, i, v in entries(fisher):
        assert float(imp[name].reshape(-1)[i]) == pytest.approx(v / total, rel=1e-5)
    assert sum(float(t.sum()) for t in imp.values()) == pytest.approx(1.0, abs=1e-6)
    raw = fisher_importance(fisher, normalize=False)
    for name in fisher:
        assert torch.equal(raw[name], fisher[name])
        assert raw[name].data_ptr() != fisher[name].data_ptr()  # a copy, not an alias


def test_fisher_importance_zero_empty_half() -> None:
    zeros = {k: torch.zeros(s) for k, s in SHAPES.items()}
    imp = fisher_importance(zeros)
    assert all(torch.equal(v, torch.zeros_like(v)) for v in imp.values())
    assert fisher_importance({}) == {}
    # 1e5 bf16 ones: a bf16 running sum stalls at 256; fp32 accumulation does not
    big = {"w": torch.ones(100_000, dtype=torch.bfloat16)}
    imp = fisher_importance(big)
    assert imp["w"].dtype == torch.float32
    assert float(imp["w"][0]) == pytest.approx(1e-5, rel=1e-6)


# ------------------------------------------------------------------------------------ pruning
def test_pruning_masks_keep_exact_fraction_of_largest() -> None:
    fisher = fisher_dict(1)
    n = sum(t.numel() for t in fisher.values())  # 29
    for sparsity in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
        masks = fisher_pruning_masks(fisher, sparsity)
        assert {k: m.shape for k, m in masks.items()} == {k: t.shape for k, t in fisher.items()}
        assert all(m.dtype == torch.bool for m in masks.values())
        n_keep = round((1 - sparsity) * n)
        kept = [v for name, i, v in entries(fisher) if masks[name].reshape(-1)[i]]
        pruned = [v for name, i, v in entries(fisher) if not masks[name].reshape(-1)[i]]
        assert len(kept) == n_keep
        assert sorted(kept, reverse=True) == sorted(values(fisher), reverse=True)[:n_keep]
        if kept and pruned:
            assert min(kept) >= max(pruned)  # global: a parameter's size does not matter


def test_pruning_masks_ties_keep_earlier_entries_first() -> None:
    fisher = {"a": torch.tensor([1.0, 2.0, 2.0]), "b": torch.tensor([2.0, 0.5])}
    masks = fisher_pruning_masks(fisher, 0.6)  # keep round(0.4 * 5) = 2 of three tied 2.0s
    assert masks["a"].tolist() == [False, True, True]
    assert masks["b"].tolist() == [False, False]


def test_pruning_masks_errors_and_empty() -> None:
    with pytest.raises(ValueError, match="sparsity"):
        fisher_pruning_masks(fisher_dict(0), 1.5)
    with pytest.raises(ValueError, match="sparsity"):
        fisher_pruning_masks(fisher_dict(0), -0.1)
    assert fisher_pruning_masks({}, 0.5) == {}


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 5), min_size=1, max_size=30),
    st.floats(0.0, 1.0),
)
def test_pruning_masks_property(raw: list[int], sparsity: float) -> None:
    """Exactly round((1-s) N) kept, every kept value >= every pruned value (ties included)."""
    half = len(raw) // 2
    fisher = {
        "x": torch.tensor(raw[:half], dtype=torch.float32),
        "y": torch.tensor(raw[half:], dtype=torch.float32),
    }
    masks = fisher_pruning_masks(fisher, sparsity)
    keep = torch.cat([masks["x"], masks["y"]])
    vals = torch.tensor(raw, dtype=torch.float32)
    assert int(keep.sum()) == round((1 - sparsity) * len(raw))
    if keep.any() and (~keep).any():
        assert vals[keep].min() >= vals[~keep].max()


# ----------------------------------------------------------------------------- top directions
def test_top_fisher_directions_match_sorted_entries() -> None:
    fisher = fisher_dict(2)
    ref = sorted(entries(fisher), key=lambda e: -e[2])
    for k in (1, 5, 29, 100):
        top = top_fisher_directions(fisher, k)
        assert len(top) == min(k, 29)
        for (name, index, value), (rname, rindex, rvalue) in zip(top, ref):
            assert (name, index) == (rname, rindex)
            assert value == pytest.approx(rvalue, rel=1e-6)
            assert float(fisher[name].reshape(-1)[index]) == pytest.approx(value)
    assert top_fisher_directions(fisher, 0) == []
    assert top_fisher_directions({}, 3) == []


def test_top_fisher_directions_ties_in_dict_order() -> None:
    fisher = {"a": torch.tensor([[1.0, 3.0]]), "b": torch.tensor([3.0, 0.0])}
    assert top_fisher_directions(fisher, 3) == [("a", 1, 3.0), ("b", 0, 3.0), ("a", 0, 1.0)]


# ---------------------------------------------------------------------------------- overlap
def test_fisher_overlap_matches_formula_and_identities() -> None:
    fa, fb = fisher_dict(3), fisher_dict(4)
    assert fisher_overlap(fa, fb) == pytest.approx(naive_overlap(values(fa), values(fb)), rel=1e-5)
    assert fisher_overlap(fa, fa) == pytest.approx(1.0, abs=1e-6)
    assert fisher_overlap(fa, {k: 5.0 * v for k, v in fa.items()}) == pytest.approx(1.0, abs=1e-6)
    assert fisher_overlap(fa, fb) == pytest.approx(fisher_overlap(fb, fa), abs=1e-7)
    # one formula: the whole-model value is the kernel on the flattened Fisher
    flat_a = torch.cat([v.reshape(-1) for v in fa.values()])
    flat_b = torch.cat([v.reshape(-1) for v in fb.values()])
    assert fisher_overlap(fa, fb) == float(functional.fisher_overlap_tensor(flat_a, flat_b))


def test_fisher_overlap_disjoint_zero_empty_keys_half() -> None:
    a = {"w": torch.tensor([1.0, 0.0]), "v": torch.tensor([0.0])}
    b = {"w": torch.tensor([0.0, 2.0]), "v": torch.tensor([0.0])}
    assert fisher_overlap(a, b) == 0.0
    zero = {"w": torch.zeros(2), "v": torch.zeros(1)}
    assert fisher_overlap(a, zero) == 0.0
    assert fisher_overlap({}, {}) == 0.0
    with pytest.raises(KeyMismatchError, match=r"missing from fisher_b: \['v'\]"):
        fisher_overlap(a, {"w": b["w"]})
    fa16 = {k: v.to(torch.bfloat16) for k, v in fisher_dict(3).items()}
    fb16 = {k: v.to(torch.bfloat16) for k, v in fisher_dict(4).items()}
    ref = naive_overlap(values(fa16), values(fb16))
    assert fisher_overlap(fa16, fb16) == pytest.approx(ref, rel=1e-5)


def test_compare_task_fisher_matches_formulas() -> None:
    fa, fb = fisher_dict(5), fisher_dict(6)
    fb["attn.o"] = torch.zeros(5)  # a parameter task B does not use
    out = compare_task_fisher(fa, fb)
    assert out["overlap"] == pytest.approx(naive_overlap(values(fa), values(fb)), rel=1e-5)
    assert out["overlap"] == pytest.approx(fisher_overlap(fa, fb), abs=1e-7)
    assert out["cosine"] == pytest.approx(naive_cosine(values(fa), values(fb)), rel=1e-5)
    assert out["trace_a"] == pytest.approx(sum(values(fa)), rel=1e-6)
    assert out["trace_b"] == pytest.approx(sum(values(fb)), rel=1e-6)
    assert set(out["per_parameter"]) == set(SHAPES)
    for name in SHAPES:
        a = fa[name].double().reshape(-1).tolist()
        b = fb[name].double().reshape(-1).tolist()
        per = out["per_parameter"][name]
        assert per["overlap"] == pytest.approx(naive_overlap(a, b), rel=1e-5, abs=1e-7)
        assert per["cosine"] == pytest.approx(naive_cosine(a, b), rel=1e-5, abs=1e-7)
        assert per["trace_a"] == pytest.approx(sum(a), rel=1e-6)
        assert per["trace_b"] == pytest.approx(sum(b), rel=1e-6, abs=1e-9)
    assert out["per_parameter"]["attn.o"]["overlap"] == 0.0
    same = compare_task_fisher(fa, fa)
    assert same["overlap"] == pytest.approx(1.0, abs=1e-6)
    assert same["cosine"] == pytest.approx(1.0, abs=1e-6)


def test_compare_task_fisher_empty_and_keys() -> None:
    empty = compare_task_fisher({}, {})
    assert empty == {
        "overlap": 0.0,
        "cosine": 0.0,
        "trace_a": 0.0,
        "trace_b": 0.0,
        "per_parameter": {},
    }
    with pytest.raises(KeyMismatchError, match=r"in fisher_b but not in fisher_a: \[.b.\]"):
        compare_task_fisher({"a": torch.ones(2)}, {"a": torch.ones(2), "b": torch.ones(1)})


# ----------------------------------------------------------------------------- mask overlap
def test_fisher_mask_overlap_is_jaccard() -> None:
    gen = torch.Generator().manual_seed(7)
    ma = {k: torch.rand(s, generator=gen) > 0.5 for k, s in SHAPES.items()}
    mb = {k: torch.rand(s, generator=gen) > 0.3 for k, s in SHAPES.items()}
    set_a = {(k, i) for k, i, v in entries(ma) if v}
    set_b = {(k, i) for k, i, v in entries(mb) if v}
    ref = len(set_a & set_b) / len(set_a | set_b)
    assert fisher_mask_overlap(ma, mb) == pytest.approx(ref)
    assert fisher_mask_overlap(ma, ma) == 1.0
    assert fisher_mask_overlap(ma, {k: ~v for k, v in ma.items()}) == 0.0


def test_fisher_mask_overlap_empty_and_keys() -> None:
    assert fisher_mask_overlap({}, {}) == 0.0
    nothing = {"w": torch.zeros(3, dtype=torch.bool)}
    assert fisher_mask_overlap(nothing, nothing) == 0.0  # empty union: defined as 0
    with pytest.raises(KeyMismatchError):
        fisher_mask_overlap(nothing, {"v": nothing["w"]})
    # masks from the pruning helper of two tasks
    fa, fb = fisher_dict(8), fisher_dict(9)
    jac = fisher_mask_overlap(fisher_pruning_masks(fa, 0.5), fisher_pruning_masks(fb, 0.5))
    assert 0.0 <= jac <= 1.0


# ------------------------------------------------------------------------------------ merging
def naive_merge(states, fishers, floor):
    out = {}
    for name in states[0]:
        flat = [s[name].double().reshape(-1).tolist() for s in states]
        merged = []
        for i in range(len(flat[0])):
            if fishers is not None and name in fishers[0]:
                w = [max(float(f[name].reshape(-1)[i]), floor) for f in fishers]
                merged.append(sum(wm * t[i] for wm, t in zip(w, flat)) / sum(w))
            else:
                merged.append(sum(t[i] for t in flat) / len(flat))
        out[name] = torch.tensor(merged, dtype=torch.float64).reshape(states[0][name].shape)
    return out


def state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}


@pytest.mark.parametrize("floor", [1e-6, 0.3])
def test_merge_matches_formula_with_partial_fisher(floor: float) -> None:
    states = [state(10), state(11), state(12)]
    fishers = [
        {k: v for k, v in fisher_dict(s).items() if k != "mlp"}  # mlp: no Fisher
        for s in (13, 14, 15)
    ]
    fishers[1]["attn.o"][2] = 0.0  # a zero entry: floored
    merged = fisher_weighted_merge(states, fishers, fisher_floor=floor)
    ref = naive_merge(states, fishers, floor)
    for name in SHAPES:
        torch.testing.assert_close(merged[name].double(), ref[name], rtol=1e-5, atol=1e-6)


def test_merge_equal_and_zero_fisher_give_plain_average() -> None:
    states = [state(20), state(21)]
    plain = {k: (states[0][k] + states[1][k]) / 2 for k in SHAPES}
    equal = fisher_dict(22)
    zero = {k: torch.zeros(s) for k, s in SHAPES.items()}
    for fishers in ([equal, equal], [zero, zero], None):
        merged = fisher_weighted_merge(states, fishers)
        for k in SHAPES:
            torch.testing.assert_close(merged[k], plain[k], rtol=1e-6, atol=1e-6)
    # all the Fisher mass on model 0 -> model 0 where the Fisher is far above the floor
    big = {k: torch.full(s, 1e3) for k, s in SHAPES.items()}
    merged = fisher_weighted_merge(states, [big, zero])
    for k in SHAPES:
        torch.testing.assert_close(merged[k], states[0][k], rtol=1e-6, atol=1e-6)


def test_merge_modules_buffers_dtype() -> None:
    torch.manual_seed(0)
    a, b = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        a.weight.fill_(1.0)
        b.weight.fill_(3.0)
        a.running_mean.fill_(2.0)
    merged = fisher_weighted_merge([a, b], None)
    assert set(merged) == set(a.state_dict())
    assert torch.equal(merged["weight"], torch.full((3,), 2.0))
    assert torch.equal(merged["running_mean"], torch.full((3,), 1.0))
    assert merged["num_batches_tracked"].dtype == torch.long  # integer buffer copied
    b.num_batches_tracked += 1
    with pytest.raises(ValueError, match="num_batches_tracked"):
        fisher_weighted_merge([a, b], None)
    half = [{k: v.to(torch.bfloat16) for k, v in state(s).items()} for s in (1, 2)]
    out = fisher_weighted_merge(half, [fisher_dict(3), fisher_dict(4)])
    assert all(v.dtype == torch.bfloat16 for v in out.values())


def test_merge_keeps_tied_weights_consistent() -> None:
    config = AutoConfig.for_model("gpt2", n_layer=1, n_head=2, n_embd=8, vocab_size=11, n_positions=8)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(GPT2LMHeadModel(config))
    wte = "transformer.wte.weight"
    assert "lm_head.weight" in models[0].state_dict()  # tied: same storage, two keys
    fishers = [{wte: torch.rand(11, 8)}, {wte: torch.rand(11, 8)}]
    merged = fisher_weighted_merge(models, fishers)
    ref = naive_merge([{wte: m.state_dict()[wte]} for m in models], fishers, 1e-6)[wte]
    torch.testing.assert_close(merged[wte].double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(merged["lm_head.weight"], merged[wte])
    target = GPT2LMHeadModel(config)
    target.load_state_dict(merged)
    assert torch.equal(target.transformer.wte.weight, merged[wte])


def test_merge_errors_and_empty() -> None:
    states = [state(30), state(31)]
    assert fisher_weighted_merge([], None) == {}
    single = fisher_weighted_merge([states[0]], [fisher_dict(1)])
    for k in SHAPES:
        torch.testing.assert_close(single[k], states[0][k])
    with pytest.raises(ValueError, match="2 models but 1"):
        fisher_weighted_merge(states, [fisher_dict(1)])
    with pytest.raises(ValueError, match="fisher_floor"):
        fisher_weighted_merge(states, None, fisher_floor=0.0)
    with pytest.raises(KeyMismatchError, match="state dict 1"):
        fisher_weighted_merge([states[0], {"attn.q": states[1]["attn.q"]}], None)
    bad = fisher_dict(1)
    bad["unknown"] = torch.ones(2)
    with pytest.raises(KeyMismatchError, match="unknown"):
        fisher_weighted_merge(states, [bad, bad])
    with pytest.raises(KeyMismatchError, match="fisher 1"):
        fisher_weighted_merge(states, [fisher_dict(1), {"attn.q": torch.ones(3, 4)}])


# ------------------------------------------------------------------- scaling and uncertainty
def test_scale_by_fisher_matches_formula() -> None:
    grads = state(40)
    fisher = fisher_dict(41)
    fisher["attn.o"][0] = 0.0
    out = scale_by_fisher(grads, fisher, damping=1e-3)
    for name, i, g in entries(grads):
        f = float(fisher[name].reshape(-1)[i])
        assert float(out[name].reshape(-1)[i]) == pytest.approx(g / (f + 1e-3), rel=1e-5)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert scale_by_fisher({}, {}, 1e-3) == {}
    with pytest.raises(ValueError, match="damping"):
        scale_by_fisher(grads, fisher, 0.0)
    with pytest.raises(KeyMismatchError, match="grads"):
        scale_by_fisher({"attn.q": grads["attn.q"]}, fisher, 1e-3)
    half = scale_by_fisher(
        {k: v.half() for k, v in grads.items()}, {k: v.half() for k, v in fisher.items()}, 1e-3
    )
    assert all(v.dtype == torch.float32 for v in half.values())


def test_fisher_uncertainty_matches_formula() -> None:
    fisher = fisher_dict(50)
    out = fisher_uncertainty(fisher, n_samples=100, prior_precision=0.5)
    for name, i, f in entries(fisher):
        assert float(out[name].reshape(-1)[i]) == pytest.approx(1 / (100 * f + 0.5), rel=1e-5)
    prior = fisher_uncertainty(fisher, n_samples=0, prior_precision=4.0)
    assert all(torch.allclose(v, torch.full_like(v, 0.25)) for v in prior.values())
    assert fisher_uncertainty({}, 10) == {}
    with pytest.raises(ValueError, match="n_samples"):
        fisher_uncertainty(fisher, -1)
    with pytest.raises(ValueError, match="prior_precision"):
        fisher_uncertainty(fisher, 10, prior_precision=0.0)


# --------------------------------------------------------------------------------------- GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_toolkit_on_gpu_matches_cpu() -> None:
    fa, fb = fisher_dict(60), fisher_dict(61)
    grads, params, anchor = state(62), state(63), state(64)
    cuda = {
        name: {k: v.cuda().to(torch.bfloat16) for k, v in d.items()}
        for name, d in {"fa": fa, "fb": fb, "g": grads, "p": params, "a": anchor}.items()
    }
    cpu = {
        name: {k: v.to(torch.bfloat16) for k, v in d.items()}
        for name, d in {"fa": fa, "fb": fb, "g": grads, "p": params, "a": anchor}.items()
    }
    for ns in (cpu, cuda):
        ns["results"] = {
            "overlap": fisher_overlap(ns["fa"], ns["fb"]),
            "compare": compare_task_fisher(ns["fa"], ns["fb"])["cosine"],
            "ewc": toolkit.ewc_penalty(ns["fa"], ns["p"], ns["a"]),
            "damage": toolkit.fisher_weighted_damage(ns["fa"], ns["g"]),
            "asym": toolkit.fisher_damage_asymmetry(ns["fa"], ns["g"], ns["fb"], ns["g"])["log_ratio"],
            "mask": fisher_mask_overlap(
                fisher_pruning_masks(ns["fa"], 0.5), fisher_pruning_masks(ns["fb"], 0.5)
            ),
            "top": top_fisher_directions(ns["fa"], 3),
        }
    for key, value in cpu["results"].items():
        if key == "top":
            assert [e[:2] for e in cuda["results"][key]] == [e[:2] for e in value]
        else:
            assert cuda["results"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    on_gpu = [
        fisher_importance(cuda["fa"]),
        fisher_pruning_masks(cuda["fa"], 0.3),
        scale_by_fisher(cuda["g"], cuda["fa"], 1e-3),
        fisher_uncertainty(cuda["fa"], 10),
        fisher_weighted_merge([cuda["p"], cuda["a"]], [cuda["fa"], cuda["fb"]]),
    ]
    for out in on_gpu:
        assert all(v.is_cuda for v in out.values())
    for out in on_gpu[0], on_gpu[2], on_gpu[3]:
        assert all(v.dtype == torch.float32 for v in out.values())

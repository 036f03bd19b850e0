"""QK-OV interference: kernels, QKOVInterferenceMetric, head maps and their statistics.

Every quantity is checked against a slow float64 formula built from ``layout.head_slice`` (one
pair, layer, head and block at a time, as the seeds did), plus identities: head additivity, loss
scaling, symmetry, the averaging trap, and a planted model whose tasks use known heads.
"""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import assert_close_rel
from tiny_models import lm_batch, tiny_causal_lm
from torch import nn

from fisher_callbacks.fisher import FisherCollector
from fisher_callbacks.functional.interference import (
    VARIANTS,
    block_head_scores,
    conflict_cosine,
    directional_mean_over_a,
    inverse_fisher,
)
from fisher_callbacks.interference import QKOVInterferenceMetric
from fisher_callbacks.layouts import BLOCKS, AttentionLayout, register_layout
from fisher_callbacks.stats import fdr_correct, permutation_conflict_test

IDS_A = [7, 3, 42, 5, 19, 11, 0, 64, 23, 8]  # TRUE ids, deliberately not 0..n-1
IDS_B = [100, 2, 57, 31, 9, 77, 4, 16, 61, 13]
EPS, LAM = 1e-10, 1e-8


# ---------------------------------------------------------------------------- fixtures and refs
def _collector_from(layout, model, tasks, storage_dtype=torch.float32, **kw) -> FisherCollector:
    """A real FisherCollector fed with ``{task: (ids, grads)}`` through ``add_gradients``."""
    kw.setdefault("max_samples_per_task", 64)  # the collector preallocates its reservoir
    collector = FisherCollector(model, layout=layout, storage_dtype=storage_dtype, **kw)
    for task, (ids, grads) in tasks.items():
        collector.add_gradients(grads, task, sample_ids=ids)
    return collector


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request):
    """Tiny GPT-2 (fused Conv1D QKV) or Llama-GQA (4 query, 2 KV heads), two tasks of 10."""
    model = tiny_causal_lm(request.param)
    collector = FisherCollector(model, max_samples_per_task=16)
    collector.collect(lm_batch(10, 10, seed=1), "a", sample_ids=IDS_A)
    collector.collect(lm_batch(10, 10, seed=2), "b", sample_ids=torch.tensor(IDS_B))
    return SimpleNamespace(name=request.param, model=model, collector=collector)


@pytest.fixture(scope="module")
def gpt2():
    model = tiny_causal_lm("gpt2")
    collector = FisherCollector(model, max_samples_per_task=16)
    collector.collect(lm_batch(10, 10, seed=1), "a", sample_ids=IDS_A)
    collector.collect(lm_batch(10, 10, seed=2), "b", sample_ids=IDS_B)
    return SimpleNamespace(name="gpt2", model=model, collector=collector)


def ref_score(layout, g_i, g_j, fisher, layer, head, block, variant, eps=EPS, lam=LAM):
    """Direct float64 formula for one (pair, layer, query head, block) from ``head_slice``.

    Returns:
        ``(score, magnitude)``; ``magnitude = sum_k |term_k|`` bounds the fp32 rounding of the
        signed variant, whose terms cancel.
    """
    total, magnitude = 0.0, 0.0
    for name, bias in layout.block_entries(layer, block):
        a = layout.head_slice(g_i[name].double(), layer, head, block, bias=bias)
        b = layout.head_slice(g_j[name].double(), layer, head, block, bias=bias)
        f = layout.head_slice(fisher[name].double(), layer, head, block, bias=bias)
        d = 1.0 / (f.clamp_min(eps) + lam)
        if variant == "directional":
            terms = a**2 * d * b.abs()
        elif variant == "signed":
            terms = a * d * b
        else:
            terms = a.abs() * d * b.abs()
        total += float(terms.sum())
        magnitude += float(terms.abs().sum())
    return total, magnitude


def query_head_of(layout, block, block_head) -> int:
    """A query head served by ``block_head`` of ``block``."""
    return block_head * layout.kv_group_size if block in ("K", "V") else block_head


def slow_heatmap(layout, collector, task_a, task_b, fisher, variant, layers=None, max_n=None):
    """The seeds' per-pair loop: {block: ([n_i, n_j, L, H_block] scores, magnitudes)} float64."""
    layers = list(range(layout.num_layers)) if layers is None else layers
    ids_a = collector.sample_ids(task_a)[:max_n]
    ids_b = collector.sample_ids(task_b)[:max_n]
    out = {}
    for block in BLOCKS:
        n_h = layout.heads_in_block(block)
        s = torch.zeros(len(ids_a), len(ids_b), len(layers), n_h, dtype=torch.float64)
        mag = torch.zeros_like(s)
        for i, sid_i in enumerate(ids_a):
            g_i = collector.get_gradient(task_a, sid_i)
            for j, sid_j in enumerate(ids_b):
                g_j = collector.get_gradient(task_b, sid_j)
                for li, layer in enumerate(layers):
                    for h in range(n_h):
                        head = query_head_of(layout, block, h)
                        s[i, j, li, h], mag[i, j, li, h] = ref_score(
                            layout, g_i, g_j, fisher, layer, head, block, variant
                        )
        out[block] = (s, mag)
    return out


def assert_close64(actual, expected, rtol: float = 2e-5, magnitude=None) -> None:
    """fp32 result vs float64 reference; ``magnitude`` (sum of |terms|) scales the tolerance."""
    expected = expected.double()
    if magnitude is None:
        atol = 1e-6 * float(expected.abs().max()) if expected.numel() else 0.0
        torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol)
        return
    err = (actual.double() - expected).abs()
    bound = rtol * (magnitude.double() + expected.abs()) + 1e-30
    assert bool((err <= bound).all()), f"max excess {float((err / bound).max())}x"


def block_rows(layout, t, layer, block):
    """All heads of a block at once, without the head map (for additivity): flat float64."""
    spec = layout.spec(layer, block)
    return t.double().index_select(spec.axis, spec.index.reshape(-1)).reshape(-1)


def stored(collector, task):
    ids, grads = collector.stored_gradients(task)
    return ids, {k: v.clone() for k, v in grads.items()}


# ---------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("variant", VARIANTS)
def test_block_head_scores_kernel_matches_einsum_and_chunks(variant):
    g = torch.Generator().manual_seed(0)
    ga, gb = torch.randn(7, 3, 11, generator=g), torch.randn(5, 3, 11, generator=g)
    fisher = torch.rand(3, 11, generator=g)
    fisher[0, :3] = 0.0  # zero Fisher entries are floored, never inf/NaN
    inv = inverse_fisher(fisher, EPS, LAM)
    left = {"directional": ga**2, "signed": ga, "symmetric": ga.abs()}[variant]
    right = gb if variant == "signed" else gb.abs()
    expected = torch.einsum("ihk,hk,jhk->ijh", left.double(), inv.double(), right.double())
    full = block_head_scores(ga, gb, inv, variant)
    chunked = block_head_scores(ga, gb, inv, variant, max_chunk_elements=20)  # 1 sample a chunk
    assert full.shape == (7, 5, 3) and full.dtype == torch.float32
    assert torch.isfinite(full).all()
    assert_close64(full, expected)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=0)
    # fp16 storage: computed in fp32 from the rounded values, no overflow in C = g**2
    half = block_head_scores(ga.half(), gb.half(), inv, variant)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()


@settings(max_examples=25, deadline=None)
@given(
    n_i=st.integers(0, 6),
    n_j=st.integers(0, 6),
    heads=st.integers(1, 4),
    k=st.integers(1, 9),
    chunk=st.integers(1, 200),
    variant=st.sampled_from(VARIANTS),
    seed=st.integers(0, 2**16),
)
def test_block_head_scores_any_shape_and_chunk(n_i, n_j, heads, k, chunk, variant, seed):
    g = torch.Generator().manual_seed(seed)
    ga, gb = torch.randn(n_i, heads, k, generator=g), torch.randn(n_j, heads, k, generator=g)
    inv = inverse_fisher(torch.rand(heads, k, generator=g))
    out = block_head_scores(ga, gb, inv, variant, max_chunk_elements=chunk)
    assert out.shape == (n_i, n_j, heads)
    for i in range(n_i):  # the definition, one pair and head at a time
        for j in range(n_j):
            for h in range(heads):
                a, b, d = ga[i, h].double(), gb[j, h].double(), inv[h].double()
                want = {
                    "directional": (a**2 * d * b.abs()).sum(),
                    "signed": (a * d * b).sum(),
                    "symmetric": (a.abs() * d * b.abs()).sum(),
                }[variant]
                mag = (a.abs() * d * b.abs()).sum()
                assert abs(float(out[i, j, h]) - float(want)) <= 1e-5 * float(mag) + 1e-12


def test_kernels_reject_bad_shapes_and_variants():
    ga, gb, inv = torch.ones(2, 3, 4), torch.ones(2, 3, 5), torch.ones(3, 4)
    with pytest.raises(ValueError, match="disagree"):
        block_head_scores(ga, gb, inv)
    with pytest.raises(ValueError, match="variant"):
        block_head_scores(ga, ga, inv, "cosine")
    empty = block_head_scores(torch.ones(0, 3, 4), ga, inv)
    assert empty.shape == (0, 2, 3)


def test_conflict_cosine_kernel():
    g = torch.Generator().manual_seed(1)
    a, b, d = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g), torch.rand(4, 9) + 0.1
    a[2] = 0.0  # zero norm -> 0, not NaN
    cos = conflict_cosine(a, b, d)
    aw, bw = a * d.sqrt(), b * d.sqrt()
    expected = F.cosine_similarity(aw.double(), bw.double(), dim=-1)
    expected[2] = 0.0
    assert_close64(cos, expected)
    torch.testing.assert_close(conflict_cosine(a, -a, d)[[0, 1, 3]], -torch.ones(3))


# ---------------------------------------------------------------------------- one pair
@pytest.mark.parametrize("variant", VARIANTS)
def test_sample_pair_matches_direct_formula_with_true_ids(tiny, variant):
    collector, layout = tiny.collector, tiny.collector.layout
    metric = QKOVInterferenceMetric(layout, collector, variant=variant)
    fisher = collector.fisher("a")
    for sid_i, sid_j in [(42, 57), (3, 100), (8, 13)]:
        g_i, g_j = collector.get_gradient("a", sid_i), collector.get_gradient("b", sid_j)
        for layer in range(layout.num_layers):
            for head in range(layout.num_heads):
                got = metric.compute_sample_pair("a", sid_i, "b", sid_j, layer, head)
                assert set(got) == set(BLOCKS)
                for block in BLOCKS:
                    want, mag = ref_score(layout, g_i, g_j, fisher, layer, head, block, variant)
                    assert got[block] == pytest.approx(want, rel=2e-5, abs=2e-5 * float(mag))
    with pytest.raises(KeyError, match="1234"):
        metric.compute_sample_pair("a", 1234, "b", 57, 0, 0)  # a matrix index is not an id


def test_gqa_pair_uses_the_kv_head_serving_the_query_head():
    model = tiny_causal_lm("llama")
    params = dict(model.named_parameters())
    name = "model.layers.1.self_attn.k_proj.weight"
    d = params["model.layers.1.self_attn.q_proj.weight"].shape[0] // 4  # head_dim
    g = torch.Generator().manual_seed(3)
    grads = {n: torch.randn(2, *p.shape, generator=g) for n, p in params.items()}
    layout = AttentionLayout.from_model(model)
    grads = {n: grads[n] for n in layout.monitored_parameters()}
    collector = _collector_from(layout, model, {"a": ([5, 9], grads)}, min_samples_for_fisher=1)
    metric = QKOVInterferenceMetric(layout, collector, min_samples_for_fisher=1)
    fisher = collector.fisher("a")[name].double()
    for head in range(4):
        kv = head // 2  # 4 query heads, 2 KV heads
        rows = slice(kv * d, (kv + 1) * d)
        a, b = grads[name][0, rows].double(), grads[name][1, rows].double()
        want = float((a**2 / (fisher[rows].clamp_min(EPS) + LAM) * b.abs()).sum())
        got = metric.compute_sample_pair("a", 5, "a", 9, layer=1, head=head)["K"]
        assert got == pytest.approx(want, rel=2e-5)


def test_shape_mismatch_names_parameter_layer_head_block(gpt2):
    layout = gpt2.collector.layout
    metric = QKOVInterferenceMetric(layout, gpt2.collector)
    name = layout.param_names(1)["K"]
    g = gpt2.collector.get_gradient("a", 42)[name]
    reduced = torch.ones(16)  # the seeds' group-reduced EMA Fisher
    with pytest.raises(ValueError, match="shape mismatch") as err:
        metric.compute_block_head_score(g, g, reduced, layer=1, head=2, block="K")
    msg = str(err.value)
    assert name in msg and "layer 1" in msg and "head 2" in msg and "block K" in msg
    assert "(16,)" in msg
    with pytest.raises(ValueError, match="shape mismatch"):
        metric.compute_block_head_score(g, g.T, g, layer=1, head=2, block="K")


# ---------------------------------------------------------------------------- heatmap
@pytest.mark.parametrize("fisher", ["task_a", "pooled"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_heatmap_matches_slow_per_pair_loop(tiny, variant, fisher):
    collector, layout = tiny.collector, tiny.collector.layout
    metric = QKOVInterferenceMetric(layout, collector, variant=variant, fisher=fisher, run_stats=False)
    hm = metric.compute_heatmap("a", "b", max_samples=4)
    fa, fb = collector.fisher("a"), collector.fisher("b")
    f = fa if fisher == "task_a" else {k: (fa[k] + fb[k]) / 2 for k in fa}
    slow = slow_heatmap(layout, collector, "a", "b", f, variant, max_n=4)
    for block in BLOCKS:
        res = hm[block]
        n_h = layout.heads_in_block(block)
        assert res["scores"].shape == (4, 4, layout.num_layers, n_h)
        assert res["layer_head_avg"].shape == (layout.num_layers, n_h)
        assert res["sample_ids_a"] == IDS_A[:4] and res["sample_ids_b"] == IDS_B[:4]
        assert res["heads"] == list(range(n_h))
        want, mag = slow[block]
        assert_close64(res["scores"], want, magnitude=mag)
        assert_close64(res["layer_head_avg"], want.mean(dim=(0, 1)), magnitude=mag.mean((0, 1)))
    if tiny.name == "llama":
        assert hm["K"]["scores"].shape[-1] == hm["V"]["scores"].shape[-1] == 2  # KV heads
        assert hm["Q"]["scores"].shape[-1] == hm["O"]["scores"].shape[-1] == 4


def test_heatmap_subsets_chunking_and_storage_dtype(tiny):
    collector, layout = tiny.collector, tiny.collector.layout
    full = QKOVInterferenceMetric(layout, collector, n_permutations=49).compute_heatmap("a", "b")
    # one sample (and one head) per chunk: scores, means and tests gathered piecewise
    tiny_chunks = QKOVInterferenceMetric(
        layout, collector, n_permutations=49, max_chunk_elements=7
    ).compute_heatmap("a", "b")
    sub = QKOVInterferenceMetric(layout, collector, run_stats=False).compute_heatmap(
        "a", "b", layers=[1], heads=[2, 3]
    )
    for block in BLOCKS:
        assert_close_rel(tiny_chunks[block]["scores"], full[block]["scores"])
        for key in ("conflict_cosine", "fisher_overlap", "p_values", "effect_size", "q_values"):
            assert_close_rel(tiny_chunks[block][key], full[block][key])
        cols = sorted({layout.block_head(h, block) for h in (2, 3)})
        assert sub[block]["heads"] == cols and sub[block]["layers"] == [1]
        assert_close_rel(sub[block]["scores"], full[block]["scores"][:, :, [1]][..., cols])
    # bf16 storage: same math on the rounded gradients, in fp32
    tasks = {t: stored(collector, t) for t in ("a", "b")}
    low = _collector_from(layout, tiny.model, tasks, storage_dtype=torch.bfloat16)
    hm = QKOVInterferenceMetric(layout, low, run_stats=False).compute_heatmap("a", "b")
    rounded = {t: (ids, {k: v.bfloat16().float() for k, v in g.items()}) for t, (ids, g) in tasks.items()}
    ref = _collector_from(layout, tiny.model, rounded)
    want = QKOVInterferenceMetric(layout, ref, run_stats=False).compute_heatmap("a", "b")
    for block in BLOCKS:
        assert hm[block]["scores"].dtype == torch.float32
        torch.testing.assert_close(hm[block]["scores"], want[block]["scores"], rtol=1e-2, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_head_additivity(tiny, variant):
    """Sum over a block's heads of the per-head score = the score of the unsliced block."""
    collector, layout = tiny.collector, tiny.collector.layout
    hm = QKOVInterferenceMetric(layout, collector, variant=variant, run_stats=False)
    hm = hm.compute_heatmap("a", "b", max_samples=3)
    fisher = collector.fisher("a")
    for block in BLOCKS:
        for li in range(layout.num_layers):
            name = layout.param_names(li)[block]
            d = 1.0 / (block_rows(layout, fisher[name], li, block).clamp_min(EPS) + LAM)
            for i, sid_i in enumerate(IDS_A[:3]):
                a = block_rows(layout, collector.get_gradient("a", sid_i)[name], li, block)
                for j, sid_j in enumerate(IDS_B[:3]):
                    b = block_rows(layout, collector.get_gradient("b", sid_j)[name], li, block)
                    whole = {
                        "directional": (a**2 * d * b.abs()).sum(),
                        "signed": (a * d * b).sum(),
                        "symmetric": (a.abs() * d * b.abs()).sum(),
                    }[variant]
                    mag = (a.abs() * d * b.abs()).sum()  # bounds the signed cancellation
                    got = hm[block]["scores"][i, j, li].double().sum()
                    assert float(got) == pytest.approx(float(whole), rel=2e-5, abs=2e-5 * float(mag))


def test_bias_entries_are_included_when_the_layout_asks(gpt2):
    layout = AttentionLayout.from_model(gpt2.model, include_bias=True)
    collector = FisherCollector(gpt2.model, layout=layout, max_samples_per_task=4)
    collector.collect(lm_batch(3, 10, seed=1), "a", sample_ids=[4, 1, 9])
    collector.collect(lm_batch(3, 10, seed=2), "b", sample_ids=[6, 2, 8])
    metric = QKOVInterferenceMetric(layout, collector, run_stats=False, min_samples_for_fisher=1)
    hm = metric.compute_heatmap("a", "b")
    slow = slow_heatmap(layout, collector, "a", "b", collector.fisher("a"), "directional")
    without = QKOVInterferenceMetric(None, gpt2.collector, run_stats=False)
    for block in BLOCKS:
        assert_close64(hm[block]["scores"], slow[block][0])
    assert any(n.endswith("bias") for n, _ in layout.block_entries(0, "Q"))
    assert without.layout is gpt2.collector.layout


@pytest.mark.parametrize("c", [3.0, 0.25])
def test_scaling_the_loss_scales_directional_by_c_and_leaves_c_over_i(gpt2, c):
    """g -> c g (loss scaled by c): M -> c M; C/I, signed, symmetric and both head maps unchanged."""
    layout = gpt2.collector.layout
    tasks = {t: stored(gpt2.collector, t) for t in ("a", "b")}
    scaled = {t: (ids, {k: c * v for k, v in g.items()}) for t, (ids, g) in tasks.items()}
    base_c = _collector_from(layout, gpt2.model, tasks)
    scaled_c = _collector_from(layout, gpt2.model, scaled)
    kw = dict(epsilon=1e-30, ridge_lambda=0.0, run_stats=False)  # eps + lambda negligible vs I
    for variant, factor in [("directional", c), ("signed", 1.0), ("symmetric", 1.0)]:
        h0 = QKOVInterferenceMetric(layout, base_c, variant=variant, **kw).compute_heatmap("a", "b")
        h1 = QKOVInterferenceMetric(layout, scaled_c, variant=variant, **kw)
        h1 = h1.compute_heatmap("a", "b")
        for block in BLOCKS:
            assert_close64(h1[block]["scores"], factor * h0[block]["scores"].double(), rtol=1e-5)
            for key in ("conflict_cosine", "fisher_overlap"):
                assert_close_rel(h1[block][key], h0[block][key])
    fa0, fa1 = base_c.fisher("a"), scaled_c.fisher("a")
    for name in fa0:
        c0 = tasks["a"][1][name][0] ** 2 / fa0[name].clamp_min(1e-30)
        c1 = scaled["a"][1][name][0] ** 2 / fa1[name].clamp_min(1e-30)
        assert_close_rel(c1, c0)


def test_symmetric_and_signed_are_symmetric_in_i_j(tiny):
    collector, layout = tiny.collector, tiny.collector.layout
    for variant in ("symmetric", "signed"):
        # same Fisher on both orders: pooled Fisher, or task A against itself
        pooled = QKOVInterferenceMetric(layout, collector, variant=variant, fisher="pooled")
        pooled.run_stats = False
        ab, ba = pooled.compute_heatmap("a", "b"), pooled.compute_heatmap("b", "a")
        self_ = QKOVInterferenceMetric(layout, collector, variant=variant, run_stats=False)
        aa = self_.compute_heatmap("a", "a")
        for block in BLOCKS:
            assert_close_rel(ab[block]["scores"], ba[block]["scores"].transpose(0, 1))
            s = aa[block]["scores"]
            assert_close_rel(s, s.transpose(0, 1))
    directional = QKOVInterferenceMetric(layout, collector, run_stats=False)
    s = directional.compute_heatmap("a", "a")["Q"]["scores"]
    assert not torch.allclose(s, s.transpose(0, 1), rtol=1e-3)  # directional is directional


def test_pooled_fisher_differs_from_task_a_and_head_maps_do_not_depend_on_it(gpt2):
    layout = gpt2.collector.layout
    ha = QKOVInterferenceMetric(layout, gpt2.collector, run_stats=False).compute_heatmap("a", "b")
    hp = QKOVInterferenceMetric(layout, gpt2.collector, fisher="pooled", run_stats=False)
    hp = hp.compute_heatmap("a", "b")
    assert ha.fisher_source == "task_a" and hp.fisher_source == "pooled"
    for block in BLOCKS:
        assert not torch.allclose(ha[block]["scores"], hp[block]["scores"], rtol=1e-3)
        assert_close_rel(ha[block]["conflict_cosine"], hp[block]["conflict_cosine"])
        assert_close_rel(ha[block]["fisher_overlap"], hp[block]["fisher_overlap"])


def test_head_maps_match_direct_formulas(tiny):
    collector, layout = tiny.collector, tiny.collector.layout
    hm = QKOVInterferenceMetric(layout, collector, run_stats=False).compute_heatmap("a", "b")
    fa, fb = collector.fisher("a"), collector.fisher("b")
    _, ga = collector.stored_gradients("a")
    _, gb = collector.stored_gradients("b")
    for block in BLOCKS:
        for layer in range(layout.num_layers):
            name = layout.param_names(layer)[block]
            for h in range(layout.heads_in_block(block)):
                head = query_head_of(layout, block, h)

                def sl(t, layer=layer, head=head, block=block):
                    return layout.head_slice(t.double(), layer, head, block).reshape(
                        *t.shape[: t.dim() - 2], -1
                    )

                pa, pb = sl(fa[name]), sl(fb[name])
                overlap = torch.sqrt(pa / pa.sum() * pb / pb.sum()).sum()
                d = 1.0 / (((pa + pb) / 2).clamp_min(EPS) + LAM)
                ma, mb = sl(ga[name]).mean(0), sl(gb[name]).mean(0)
                cos = (ma * d * mb).sum() / torch.sqrt((ma**2 * d).sum() * (mb**2 * d).sum())
                assert float(hm[block]["fisher_overlap"][layer, h]) == pytest.approx(float(overlap), rel=1e-5)
                assert float(hm[block]["conflict_cosine"][layer, h]) == pytest.approx(
                    float(cos), rel=1e-4, abs=1e-6
                )


def test_averaging_identity_task_a_drops_out(gpt2):
    """mean_i M_ij = sum_k I_k / (max(I_k, eps) + lambda) |g_jk| when I = mean_i C_i."""
    collector, layout = gpt2.collector, gpt2.collector.layout
    assert collector.num_stored("a") == collector.num_samples("a")  # I is over the same samples
    metric = QKOVInterferenceMetric(layout, collector, run_stats=False)
    hm = metric.compute_heatmap("a", "b")
    fisher = collector.fisher("a")
    # A completely different task A' with the same Fisher: two samples +-sqrt(I).
    root = {k: v.sqrt() for k, v in fisher.items()}
    twin = {k: torch.stack([v, -v]) for k, v in root.items()}
    other = _collector_from(
        layout,
        gpt2.model,
        {"a2": ([0, 1], twin), "b": stored(collector, "b")},
        min_samples_for_fisher=1,
    )
    hm2 = QKOVInterferenceMetric(layout, other, run_stats=False, min_samples_for_fisher=1)
    hm2 = hm2.compute_heatmap("a2", "b")
    for block in BLOCKS:
        mean_i = hm[block]["scores"].double().mean(0)  # [n_j, L, H]
        for layer in range(layout.num_layers):
            name = layout.param_names(layer)[block]
            for h in range(layout.heads_in_block(block)):
                head = query_head_of(layout, block, h)
                f = layout.head_slice(fisher[name].double(), layer, head, block)
                for j, sid in enumerate(IDS_B):
                    g = layout.head_slice(collector.get_gradient("b", sid)[name].double(), layer, head, block)
                    want = (f / (f.clamp_min(EPS) + LAM) * g.abs()).sum()
                    assert float(mean_i[j, layer, h]) == pytest.approx(float(want), rel=1e-5)
            # the kernel form of the identity
            fv = layout.head_view(fisher[name], layer, block)
            gv = layout.head_view(collector.stored_gradients("b")[1][name], layer, block)
            kern = directional_mean_over_a(fv, gv, inverse_fisher(fv, EPS, LAM))
            assert_close64(mean_i[:, layer], kern)
        # task A' shares nothing with A but its Fisher, and gives the same average
        assert_close64(hm2[block]["scores"].mean(0), mean_i, rtol=1e-4)
        assert_close64(hm2[block]["layer_head_avg"], hm[block]["layer_head_avg"], rtol=1e-4)


def test_empty_task_gives_zeros_and_a_warning(gpt2):
    metric = QKOVInterferenceMetric(None, gpt2.collector)
    layout = gpt2.collector.layout
    with pytest.warns(UserWarning, match="no stored samples"):
        hm = metric.compute_heatmap("a", "nobody")
    for block in BLOCKS:
        res = hm[block]
        n_h = layout.heads_in_block(block)
        assert res["scores"].shape == (10, 0, layout.num_layers, n_h)
        for key in ("layer_head_avg", "fisher_overlap", "conflict_cosine", "effect_size"):
            assert res[key].shape == (layout.num_layers, n_h)
            assert torch.equal(res[key], torch.zeros_like(res[key]))
        for key in ("p_values", "q_values"):
            assert torch.equal(res[key], torch.ones_like(res[key]))
        assert not res["significant"].any() and res["top_conflicts"] == []
        assert res["sample_ids_a"] == IDS_A and res["sample_ids_b"] == []
    with pytest.warns(UserWarning, match="no stored samples"):
        both = metric.compute_heatmap("nobody", "nothing")
    assert both["V"]["scores"].shape == (0, 0, layout.num_layers, layout.num_kv_heads)
    # no stored gradients (zero budget) but a Fisher: the overlap is still defined
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lean = _collector_from(
            layout,
            gpt2.model,
            {t: stored(gpt2.collector, t) for t in "ab"},
            gradient_memory_mb=0,
        )
    with pytest.warns(UserWarning, match="no stored samples"):
        hm = QKOVInterferenceMetric(None, lean).compute_heatmap("a", "b")
    assert (hm["Q"]["fisher_overlap"] > 0).all() and hm["Q"]["scores"].shape[:2] == (0, 0)
    for res in hm.values():
        for v in res.values():
            if torch.is_tensor(v) and v.is_floating_point():
                assert not torch.isnan(v).any()


@pytest.mark.parametrize("variant", ["directional", "signed"])
def test_top_conflicts_order_and_true_ids(tiny, variant):
    collector, layout = tiny.collector, tiny.collector.layout
    metric = QKOVInterferenceMetric(layout, collector, variant=variant, top_k=7, run_stats=False)
    hm = metric.compute_heatmap("a", "b")
    for block in BLOCKS:
        res = hm[block]
        top = res["top_conflicts"]
        assert len(top) == 7
        strength = [(-t["score"] if variant == "signed" else t["score"]) for t in top]
        assert strength == sorted(strength, reverse=True) and strength[-1] > 0
        best = -res["scores"].min() if variant == "signed" else res["scores"].max()
        assert strength[0] == pytest.approx(float(best))
        for t in top:
            assert t["sample_i"] in IDS_A and t["sample_j"] in IDS_B  # true ids, not indices
            i, j = IDS_A.index(t["sample_i"]), IDS_B.index(t["sample_j"])
            assert t["score"] == float(res["scores"][i, j, t["layer"], t["head"]])
            assert layout.block_head(t["query_heads"][0], block) == t["head"]
            pair = metric.compute_sample_pair(
                "a", t["sample_i"], "b", t["sample_j"], t["layer"], t["query_heads"][-1]
            )
            assert pair[block] == pytest.approx(t["score"], rel=1e-5)


# ---------------------------------------------------------------------------- statistics wiring
def test_heatmap_statistics_are_the_stats_module_on_whitened_head_gradients(tiny):
    collector, layout = tiny.collector, tiny.collector.layout
    metric = QKOVInterferenceMetric(layout, collector, n_permutations=99, seed=5, fdr_method="bh")
    hm = metric.compute_heatmap("a", "b")
    fa, fb = collector.fisher("a"), collector.fisher("b")
    _, ga = collector.stored_gradients("a")
    _, gb = collector.stored_gradients("b")
    all_p = []
    for block in BLOCKS:
        res = hm[block]
        for layer in range(layout.num_layers):
            name = layout.param_names(layer)[block]
            view = lambda t, layer=layer, block=block: layout.head_view(t, layer, block)  # noqa: E731
            d = inverse_fisher((view(fa[name]) + view(fb[name])) / 2, EPS, LAM)
            xa, xb = view(ga[name]) * d.sqrt(), view(gb[name]) * d.sqrt()
            # the default test statistic is the Fisher inner product of the task means
            direct = permutation_conflict_test(xa, xb, n_permutations=99, seed=5, statistic="dot")
            torch.testing.assert_close(res["p_values"][layer], direct.p_values.float())
            assert_close_rel(res["effect_size"][layer], direct.effect_size.float())
            # ... whose normalised form is exactly the conflict_cosine head map
            cosine = permutation_conflict_test(xa, xb, n_permutations=99, seed=5)
            assert_close_rel(res["conflict_cosine"][layer], cosine.statistic.float(), rtol=1e-4)
        all_p.append(res["p_values"].reshape(-1))
    q = fdr_correct(torch.cat(all_p).double(), "bh")  # one correction over all blocks
    offset = 0
    for block in BLOCKS:
        res = hm[block]
        n = res["p_values"].numel()
        torch.testing.assert_close(res["q_values"].reshape(-1), q[offset : offset + n].float())
        want = (res["q_values"] <= 0.05) & (res["effect_size"] >= 0.2)
        assert torch.equal(res["significant"], want)
        offset += n
    assert (
        hm.stats["num_tests"]
        == offset
        == layout.num_layers * (2 * layout.num_heads + 2 * layout.num_kv_heads)
    )


def _null_parameters(layout, generator):
    """Per-entry (mean, scale) of random 'gradients' that both tasks share (no difference)."""
    out = {}
    for name in layout.monitored_parameters():
        shape = layout.param_shapes[name]
        mean = torch.randn(shape, generator=generator) * 0.3
        scale = torch.rand(shape, generator=generator) + 0.2
        out[name] = (mean, scale)
    return out


@pytest.mark.usefixtures("single_thread")
def test_fdr_stays_below_alpha_on_tasks_without_difference():
    """Both tasks drawn from one distribution: the rate of runs with any 'significant' cell.

    Under the complete null every discovery is false, so FDR = P(any discovery). With the
    adaptive p-values on 8 tests, uncorrected p <= alpha flags about a third of the runs; the heatmap's
    Benjamini-Yekutieli must stay <= alpha and Benjamini-Hochberg (on the same p-values) within
    binomial noise of alpha. The effect-size filter is off so only the p-values are tested.
    """
    model = tiny_causal_lm("gpt2")
    layout = AttentionLayout.from_model(model)
    n, runs, alpha = 10, 100, 0.05
    by = bh = raw = refined = 0
    for seed in range(runs):
        g = torch.Generator().manual_seed(1000 + seed)
        params = _null_parameters(layout, g)
        collector = FisherCollector(model, layout=layout, max_samples_per_task=n)
        for t in ("a", "b"):
            grads = {k: m + s * torch.randn(n, *m.shape, generator=g) for k, (m, s) in params.items()}
            collector.add_gradients(grads, t)
        metric = QKOVInterferenceMetric(
            layout,
            collector,
            n_permutations=50,  # the default p_value="adaptive" refines up to 869 for 8 tests
            fdr_alpha=alpha,
            min_conflict_effect_size=-math.inf,
            seed=seed,
        )
        hm = metric.compute_heatmap("a", "b", layers=[0], heads=[0, 1])
        refined += hm.stats["num_refined"]
        by += any(bool(r["significant"].any()) for r in hm.values())
        p = torch.cat([r["p_values"].reshape(-1) for r in hm.values()])
        bh += bool((fdr_correct(p, "bh") <= alpha).any())
        raw += bool((p <= alpha).any())
    assert hm.stats["num_tests"] == 8 and hm.stats["fdr_method"] == "by"
    assert hm.stats["p_value"] == "adaptive" and hm.stats["max_permutations"] == 869
    assert refined > 0.1 * 8 * runs  # tests near the floor 1/51 were refined
    assert by / runs <= alpha
    assert bh / runs <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / runs)
    assert raw / runs > 0.2  # uncorrected tests do reject: the correction is what holds


# ---------------------------------------------------------------------------- planted model
class _PlantedAttention(nn.Module):
    """nanoGPT-style attention (fused c_attn, c_proj) whose heads are gated per sample."""

    def __init__(self, dim: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(dim, 3 * dim, bias=False)
        self.c_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)  # [B, T, C] each
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, d]
        y = y * gate[:, :, None, None]  # a task only uses its own heads
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class _PlantedModel(nn.Module):
    model_type = "planted_nanogpt_qkov"

    def __init__(self, vocab=13, dim=16, n_head=4, n_layer=2, seq=6) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(seq, dim)
        self.h = nn.ModuleList(_PlantedAttention(dim, n_head) for _ in range(n_layer))
        self.readout = nn.Linear(dim, 1, bias=False)
        nn.init.normal_(self.readout.weight, std=0.05)

    def forward(self, idx: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))  # [B, T, C]
        for block in self.h:
            x = x + block(x, gate)
        return self.readout(x[:, -1]).squeeze(-1)  # [B]


def _planted_layout(model: _PlantedModel) -> AttentionLayout:
    names = [
        {"Q": f"h.{i}.c_attn", "K": f"h.{i}.c_attn", "V": f"h.{i}.c_attn", "O": f"h.{i}.c_proj"}
        for i in range(len(model.h))
    ]
    return AttentionLayout.from_projections(model, names, num_heads=4, fused="concat")


def _micro_batch_grads(model, layout, idx, gate, target):
    """Exact per-sample gradients by definition: one backward per sample."""
    params = dict(model.named_parameters())
    names = layout.monitored_parameters()
    rows = {n: [] for n in names}
    for b in range(idx.shape[0]):
        loss = 0.5 * (model(idx[b : b + 1], gate[b : b + 1]) - target) ** 2
        grads = torch.autograd.grad(loss.sum(), [params[n] for n in names])
        for n, g in zip(names, grads):
            rows[n].append(g)
    return {n: torch.stack(r) for n, r in rows.items()}


def test_planted_interference_through_known_heads():
    """Task A routes through heads {0, 1} (target +1), task B through {1, 2} (target -1)."""
    register_layout(_PlantedModel.model_type, _planted_layout, overwrite=True)
    torch.manual_seed(0)
    model = _PlantedModel()
    layout = AttentionLayout.from_model(model)
    assert layout.model_type == _PlantedModel.model_type and layout.num_layers == 2
    n = 16
    idx = torch.randint(0, 13, (n, 6), generator=torch.Generator().manual_seed(1))
    gates = {"a": torch.tensor([1.0, 1.0, 0.0, 0.0]), "b": torch.tensor([0.0, 1.0, 1.0, 0.0])}
    targets = {"a": 1.0, "b": -1.0}
    collector = FisherCollector(model, layout=layout, max_samples_per_task=n)
    for t, offset in (("a", 500), ("b", 900)):
        grads = _micro_batch_grads(model, layout, idx, gates[t].expand(n, 4), targets[t])
        collector.add_gradients(grads, t, sample_ids=[offset + 3 * k for k in range(n)])
    metric = QKOVInterferenceMetric(layout, collector, n_permutations=999, top_k=20)
    with pytest.warns(UserWarning, match="degenerate"):  # heads with no gradient in a task
        hm = metric.compute_heatmap("a", "b")
    others = [0, 2, 3]
    for block in BLOCKS:
        res = hm[block]
        scores = res["scores"]  # [n, n, L, 4]
        assert (scores[..., 1] > 0).all()
        assert torch.equal(scores[..., others], torch.zeros_like(scores[..., others]))
        assert {t["head"] for t in res["top_conflicts"]} == {1} and len(res["top_conflicts"]) == 20
        assert all(t["sample_i"] >= 500 and t["sample_j"] >= 900 for t in res["top_conflicts"])
        for key in ("fisher_overlap", "conflict_cosine", "effect_size"):
            assert torch.equal(res[key][:, others], torch.zeros(2, 3)), key
        assert (res["fisher_overlap"][:, 1] > 0.5).all()
        assert (res["conflict_cosine"][:, 1] < -0.5).all()
        assert (res["effect_size"][:, 1] >= 0.2).all()
        assert not res["significant"][:, others].any()
        assert torch.equal(res["p_values"][:, others], torch.ones(2, 3))
        if block != "O":
            # (the last layer's O gradient is rank one, r x y_i, with y_i much alike: the
            # cosine's permutation null is then bimodal and this cell is weaker; not asserted)
            assert res["significant"][:, 1].all()
    assert hm.stats["num_degenerate"] == 2 * 4 * 3
    # the signed variant sees the conflict as negative pair scores in the shared head only
    signed = QKOVInterferenceMetric(layout, collector, variant="signed", run_stats=False)
    hs = signed.compute_heatmap("a", "b")
    for block in BLOCKS:
        assert hs[block]["scores"][..., 1].mean() < 0
        assert torch.equal(hs[block]["scores"][..., others], torch.zeros(n, n, 2, 3))
        assert all(t["head"] == 1 and t["score"] < 0 for t in hs[block]["top_conflicts"])


# ---------------------------------------------------------------------------- options
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_computation_matches_cpu(tiny):
    kw = dict(n_permutations=99, seed=3)
    cpu = QKOVInterferenceMetric(None, tiny.collector, **kw).compute_heatmap("a", "b")
    gpu = QKOVInterferenceMetric(None, tiny.collector, computation_device="cuda", **kw)
    gpu = gpu.compute_heatmap("a", "b")
    for block in BLOCKS:
        for key in ("scores", "layer_head_avg", "fisher_overlap", "conflict_cosine", "effect_size"):
            assert gpu[block][key].device.type == "cpu"
            assert_close_rel(gpu[block][key], cpu[block][key], rtol=1e-4)
        # same permutations on every device; a p-value may move by a tie at most
        assert (gpu[block]["p_values"] - cpu[block]["p_values"]).abs().max() <= 2 / 100


def test_invalid_options_raise(gpt2):
    c = gpt2.collector
    with pytest.raises(ValueError, match="variant"):
        QKOVInterferenceMetric(None, c, variant="cosine")
    with pytest.raises(ValueError, match="fisher"):
        QKOVInterferenceMetric(None, c, fisher="task_b")
    with pytest.raises(ValueError, match="epsilon"):
        QKOVInterferenceMetric(None, c, epsilon=0.0, ridge_lambda=0.0)
    with pytest.raises(ValueError, match="fdr_method"):
        QKOVInterferenceMetric(None, c, fdr_method="holm")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            QKOVInterferenceMetric(None, c, computation_device="cuda")
    assert QKOVInterferenceMetric(None, c, computation_device="auto").device.type in ("cpu", "cuda")
    metric = QKOVInterferenceMetric(None, c, run_stats=False)
    with pytest.raises(IndexError):
        metric.compute_heatmap("a", "b", layers=[5])
    with pytest.raises(IndexError):
        metric.compute_sample_pair("a", 42, "b", 57, 0, 4)
    hm = metric.compute_heatmap("a", "b")
    assert "p_values" not in hm["Q"] and hm.stats is None
    assert list(hm) == list(BLOCKS) and hm.task_a == "a" and hm.variant == "directional"


def test_normal_tail_p_values_give_power_for_a_lone_conflict_and_stay_calibrated():
    """One conflicting head among 32 tests, 50 permutations: permutation p-values cannot pass BY
    (m ln m / 51 > alpha), the normal tail can; on null data it rarely discovers anything."""
    model = tiny_causal_lm("gpt2")
    layout = AttentionLayout.from_model(model)
    n, alpha = 12, 0.05

    def heatmap(seed, planted, p_value):
        g = torch.Generator().manual_seed(seed)
        params = _null_parameters(layout, g)
        collector = FisherCollector(model, layout=layout, max_samples_per_task=n)
        for t, sign in (("a", 1.0), ("b", -1.0)):
            grads = {k: m + s * torch.randn(n, *m.shape, generator=g) for k, (m, s) in params.items()}
            if planted:
                q = layout.param_names(0)["O"]
                layout.head_slice(grads[q], 0, 0, "O").add_(sign * 5.0)  # heads disagree hard
            collector.add_gradients(grads, t)
        metric = QKOVInterferenceMetric(
            layout, collector, n_permutations=50, fdr_alpha=alpha, seed=seed, p_value=p_value
        )
        return metric.compute_heatmap("a", "b")

    exact = heatmap(0, True, "permutation")
    normal = heatmap(0, True, "normal")
    assert exact.stats["num_tests"] == 32 and normal.stats["p_value"] == "normal"
    assert not any(bool(r["significant"].any()) for r in exact.values())
    assert bool(normal["O"]["significant"][0, 0])
    false_runs = sum(
        any(bool(r["significant"].any()) for r in heatmap(100 + s, False, "normal").values())
        for s in range(20)
    )
    assert false_runs <= 3  # alpha = 0.05 over 20 null runs, plus slack for the approximation


def _planted_collector(model, layout, seed, n, plant):
    """Shared-distribution 'gradients' for tasks a and b; ``plant`` opposes one O head."""
    g = torch.Generator().manual_seed(seed)
    params = _null_parameters(layout, g)
    collector = FisherCollector(model, layout=layout, max_samples_per_task=n)
    for t, sign in (("a", 1.0), ("b", -1.0)):
        grads = {k: m + s * torch.randn(n, *m.shape, generator=g) for k, (m, s) in params.items()}
        if plant:
            o = layout.param_names(plant[0])["O"]
            layout.head_slice(grads[o], plant[0], plant[1], "O").add_(sign * 5.0)
        collector.add_gradients(grads, t)
    return collector


@pytest.fixture
def single_thread():
    """Many small matmuls: one intra-op thread is much faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("single_thread")
def test_lone_conflict_is_significant_at_defaults_on_a_30_by_9_model():
    """A 30-layer Llama with 9 query heads and 3 KV heads: 720 tests. One planted conflicting head
    passes BY at the defaults (adaptive p-values); one fixed set of 200 permutations cannot
    (BY needs p <= 9.7e-6); on null data nothing is significant at the defaults."""
    model = tiny_causal_lm(
        "llama",
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        hidden_size=36,
        intermediate_size=8,
    )
    layout = AttentionLayout.from_model(model)
    assert (layout.num_layers, layout.num_heads, layout.num_kv_heads) == (30, 9, 3)
    n = 12
    planted = _planted_collector(model, layout, 0, n, plant=(17, 4))
    hm = QKOVInterferenceMetric(layout, planted).compute_heatmap("a", "b")
    assert hm.stats["num_tests"] == 720 and hm.stats["p_value"] == "adaptive"
    assert hm.stats["n_permutations"] == 200 and hm.stats["max_permutations"] == 206_126
    found = {(b, li, h) for b, r in hm.items() for li, h in r["significant"].nonzero().tolist()}
    assert found == {("O", 17, 4)}
    assert hm["O"]["p_values"][17, 4] <= 1.5 / 206_127 and hm["O"]["q_values"][17, 4] <= 0.05
    assert 1 <= hm.stats["num_refined"] <= 72  # the planted head and a few null tests near 1/201
    fixed = QKOVInterferenceMetric(layout, planted, p_value="permutation").compute_heatmap("a", "b")
    assert fixed["O"]["p_values"][17, 4] == pytest.approx(1 / 201)
    assert not any(bool(r["significant"].any()) for r in fixed.values())
    assert fixed.stats["num_refined"] == 0
    null = QKOVInterferenceMetric(layout, _planted_collector(model, layout, 1, n, None))
    assert not any(bool(r["significant"].any()) for r in null.compute_heatmap("a", "b").values())

"""FisherCollector: true ids, contribution Fisher and EMA against direct formulas, storage dtype,
memory cap with fair reservoirs, non-finite samples, and state round trips."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import lm_batch, tiny_causal_lm

import fisher_callbacks as fc


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm("gpt2")


def _fake_grads(collector, n, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(n, *shape, generator=g) * scale for name, shape in collector.param_shapes.items()
    }


def test_collect_stores_true_ids_and_contributions(model):
    collector = fc.FisherCollector(model)
    batch = lm_batch(batch=3)
    assert collector.collect(batch, "math", sample_ids=[7, 3, 42]) == 3
    grads = fc.per_sample_gradients(model, batch)
    cache = collector.contribution_cache
    assert set(cache) == {"math"}
    assert set(cache["math"]) == {"math_7", "math_3", "math_42"}
    for k, sid in enumerate([7, 3, 42]):
        for name, g in grads.items():
            assert torch.allclose(cache["math"][f"math_{sid}"][name], g[k] ** 2)
            assert torch.equal(collector.get_gradient("math", sid)[name], g[k])
    # without ids: a running counter
    collector.collect(batch, "general")
    collector.collect(batch, "general")
    assert collector.sample_ids("general") == [0, 1, 2, 3, 4, 5]
    with pytest.raises(KeyError, match="not stored"):
        collector.get_gradient("math", 0)
    with pytest.raises(ValueError, match="sample ids"):
        collector.collect(batch, "math", sample_ids=[1])


def test_fisher_is_fp32_mean_of_contributions_and_cached(model):
    collector = fc.FisherCollector(model, min_samples_for_fisher=4)
    b1, b2 = lm_batch(batch=3, seed=1), lm_batch(batch=2, seed=2)
    with pytest.warns(UserWarning, match="min_samples_for_fisher"):
        collector.collect(b1, "t")
        f1 = collector.fisher("t")
    g1 = fc.per_sample_gradients(model, b1)
    for name in g1:
        assert f1[name].dtype == torch.float32
        assert torch.allclose(f1[name], (g1[name] ** 2).mean(0), rtol=1e-6)
    assert collector.fisher("t") is f1  # cached
    collector.collect(b2, "t")
    f2 = collector.fisher("t")
    assert f2 is not f1
    g2 = fc.per_sample_gradients(model, b2)
    for name in g1:
        direct = torch.cat([g1[name], g2[name]]) ** 2
        assert torch.allclose(f2[name], direct.mean(0), rtol=1e-6)
    assert collector.num_samples("t") == 5
    with pytest.warns(UserWarning, match="no samples"):
        assert collector.fisher("unknown") == {}


def test_ema_bias_corrected_against_direct_formula(model):
    beta = 0.9
    collector = fc.FisherCollector(model, ema_decay=beta)
    assert collector.fisher_ema("t") == {}
    batches = [lm_batch(batch=3, seed=s) for s in range(3)]
    means = []
    for b in batches:
        collector.update_ema(b, "t")
        means.append({n: (g**2).mean(0) for n, g in fc.per_sample_gradients(model, b).items()})
    ema = collector.fisher_ema("t")
    for name in ema:
        f = torch.zeros_like(ema[name])
        for m in means:
            f = beta * f + (1 - beta) * m[name]
        assert torch.allclose(ema[name], f / (1 - beta**3), rtol=1e-5)
    # a single step is the batch mean itself
    one = fc.FisherCollector(model, ema_decay=beta)
    one.update_ema(batches[0], "t")
    for name, f in one.fisher_ema("t").items():
        assert torch.allclose(f, means[0][name], rtol=1e-5)


def test_ema_trace_only_matches_the_trace_of_the_entries(model):
    """``ema_entries=False`` keeps no weight-sized EMA, and its trace equals the trace of the
    per-entry fp32 EMA (bias-corrected), through a state_dict round trip too."""
    beta = 0.9
    full = fc.FisherCollector(model, ema_decay=beta)
    lean = fc.FisherCollector(model, ema_decay=beta, ema_entries=False)
    assert lean.fisher_ema_trace("t") == 0.0
    for s in range(3):
        b = lm_batch(batch=3, seed=s)
        full.update_ema(b, "t")
        lean.update_ema(b, "t")
    reference = sum(float(f.double().sum()) for f in full.fisher_ema("t").values())
    assert lean.fisher_ema("t") == {}
    assert "ema[t]" not in lean.memory_ledger() or lean.memory_ledger()["ema[t]"] < 64
    assert lean.fisher_ema_trace("t") == pytest.approx(reference, rel=1e-5)
    assert full.fisher_ema_trace("t") == pytest.approx(reference, rel=1e-5)
    restored = fc.FisherCollector(model, ema_decay=beta, ema_entries=False)
    old = full.state_dict()
    del old["tasks"]["t"]["ema_trace"]  # a checkpoint from before the trace: from its entries
    restored.load_state_dict(old)
    assert restored.fisher_ema_trace("t") == pytest.approx(reference, rel=1e-5)
    assert restored.fisher_ema("t") == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_storage_dtype(model, dtype):
    collector = fc.FisherCollector(model, storage_dtype=dtype)
    batch = lm_batch(batch=2)
    collector.collect(batch, "t", [0, 1])
    ids, rows = collector.stored_gradients("t")
    assert ids == [0, 1]
    assert all(r.dtype == dtype for r in rows.values())
    grads = fc.per_sample_gradients(model, batch)
    for name, g in grads.items():
        assert collector.fisher("t")[name].dtype == torch.float32
        # Fisher comes from the fp32 gradients, not the rounded stored ones.
        assert torch.allclose(collector.fisher("t")[name], (g**2).mean(0), rtol=1e-6)
        assert torch.allclose(rows[name].float(), g, rtol=1e-2, atol=1e-6)


def test_memory_cap_and_new_task_shrinks_reservoirs(model):
    probe = fc.FisherCollector(model)
    per = probe.bytes_per_sample
    cap_mb = 10.5 * per / 2**20  # room for 10 samples
    collector = fc.FisherCollector(model, gradient_memory_mb=cap_mb)
    collector.add_gradients(_fake_grads(collector, 25), "a", list(range(25)))
    assert collector.num_stored("a") == 10
    assert collector.num_samples("a") == 25
    assert collector.stored_bytes <= cap_mb * 2**20
    collector.add_gradients(_fake_grads(collector, 4, seed=1), "b", list(range(100, 104)))
    assert collector.num_stored("a") == 5 and collector.num_stored("b") == 4
    assert collector.stored_bytes <= cap_mb * 2**20
    assert set(collector.sample_ids("a")) <= set(range(25))
    limited = fc.FisherCollector(model, max_samples_per_task=3)
    limited.add_gradients(_fake_grads(limited, 8), "a")
    assert limited.num_stored("a") == 3


def test_zero_budget_warns_and_keeps_fisher(model):
    collector = fc.FisherCollector(model, gradient_memory_mb=0)
    with pytest.warns(UserWarning, match="holds no sample"):
        collector.add_gradients(_fake_grads(collector, 3), "a")
    assert collector.num_stored("a") == 0
    assert collector.num_samples("a") == 3
    assert collector.stored_gradients("a") == ([], {})


def test_reservoir_is_uniform_over_a_long_stream(model):
    """Inclusion frequency of each of 40 stream positions in a 5-slot reservoir ~ 5/40."""
    layout = fc.AttentionLayout.from_model(model)
    counts = torch.zeros(40)
    trials = 400
    for seed in range(trials):
        c = fc.FisherCollector(model, layout=layout, max_samples_per_task=5, seed=seed)
        grads = {n: torch.zeros(8, *s) for n, s in c.param_shapes.items()}
        for chunk in range(5):  # batches of 8
            c.add_gradients(grads, "t", list(range(chunk * 8, chunk * 8 + 8)))
        counts[c.sample_ids("t")] += 1
    freq = counts / trials
    # binomial sd at p=1/8, n=400 is 0.0165; 4 sd band
    assert (freq - 5 / 40).abs().max() < 0.07, freq


def test_nonfinite_samples_skipped_and_counted(model):
    collector = fc.FisherCollector(model)
    grads = _fake_grads(collector, 4)
    name = next(iter(grads))
    grads[name][1, 0, 0] = float("nan")
    grads[name][2, 0, 0] = float("inf")
    with pytest.warns(UserWarning, match="non-finite"):
        accepted = collector.add_gradients(grads, "t", [10, 11, 12, 13])
    assert accepted == 2
    assert collector.skipped_nonfinite == 2
    assert collector.sample_ids("t") == [10, 13]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fisher = collector.fisher("t")
    assert all(torch.isfinite(f).all() for f in fisher.values())
    assert collector.num_samples("t") == 2


def test_bad_gradients_rejected(model):
    collector = fc.FisherCollector(model)
    grads = _fake_grads(collector, 2)
    name = next(iter(grads))
    with pytest.raises(KeyError, match="missing"):
        collector.add_gradients({name: grads[name]}, "t")
    grads[name] = grads[name][:, :1]
    with pytest.raises(ValueError, match="expected"):
        collector.add_gradients(grads, "t")
    with pytest.raises(ValueError, match="ema_decay"):
        fc.FisherCollector(model, ema_decay=1.0)
    with pytest.raises(ValueError, match="storage_dtype"):
        fc.FisherCollector(model, storage_dtype=torch.int8)


def test_state_dict_round_trip_continues_identically(model):
    a = fc.FisherCollector(model, max_samples_per_task=4, seed=3)
    a.add_gradients(_fake_grads(a, 6), "x", list(range(6)))
    a.update_ema_from_gradients(_fake_grads(a, 3, seed=9), "x")
    b = fc.FisherCollector(model, max_samples_per_task=4, seed=99)
    b.load_state_dict(a.state_dict())
    assert b.sample_ids("x") == a.sample_ids("x")
    for name in a.param_names:
        assert torch.equal(a.fisher("x")[name], b.fisher("x")[name])
        assert torch.equal(a.fisher_ema("x")[name], b.fisher_ema("x")[name])
    more = _fake_grads(a, 6, seed=4)
    a.add_gradients(more, "x", list(range(6, 12)))
    b.add_gradients(more, "x", list(range(6, 12)))
    assert a.sample_ids("x") == b.sample_ids("x")
    assert a.ema_steps("x") == b.ema_steps("x") == 1
    _, rows_a = a.stored_gradients("x")
    _, rows_b = b.stored_gradients("x")
    assert all(torch.equal(rows_a[n], rows_b[n]) for n in rows_a)


def test_storage_grows_with_samples_not_with_the_budget(model):
    collector = fc.FisherCollector(model, gradient_memory_mb=512)
    collector.add_gradients(_fake_grads(collector, 1), "a")
    assert collector.stored_bytes <= 8 * collector.bytes_per_sample
    collector.add_gradients(_fake_grads(collector, 20, seed=2), "a")
    assert collector.num_stored("a") == 21
    assert collector.stored_bytes <= 2 * 21 * collector.bytes_per_sample

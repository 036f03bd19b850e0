"""The sketched store against the exact path: unbiased signed scores, error ~ 1/sqrt(sketch_dim),
the demo model's conflict-cosine map, the permutation test on sketches (null calibration, planted
head), state round trips, the store="auto" rule, duplicate ids, and a real Trainer run."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from ddp_run import run_ddp_script
from test_interference import _micro_batch_grads, _null_parameters, _planted_layout, _PlantedModel
from tiny_models import lm_batch, tiny_causal_lm
from transformers import AutoConfig, AutoModelForCausalLM

import fisher_callbacks as fc
from fisher_callbacks import FisherCollector, QKOVInterferenceMetric
from fisher_callbacks.callbacks import FisherMonitor, QKOVInterferenceMonitor
from fisher_callbacks.layouts import BLOCKS, AttentionLayout, register_layout
from fisher_callbacks.store import DEFAULT_SKETCH_DIM, SketchStore
from lightning_examples.synthetic import SyntheticTask, SyntheticTasks, TinyGPT, collate


def _llama(hidden=64, heads=4, kv=2, layers=1):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "llama",
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=2 * hidden,
        vocab_size=61,
        max_position_embeddings=32,
    )
    return AutoModelForCausalLM.from_config(cfg).float()


@pytest.fixture(scope="module")
def two_tasks():
    """Per-sample gradients of 4 + 4 samples of a 1-layer Llama-GQA (head slices 16 x 64)."""
    model = _llama()
    grads = {
        t: fc.per_sample_gradients(model, lm_batch(batch=4, seq=12, seed=s)) for t, s in (("a", 1), ("b", 2))
    }
    exact = FisherCollector(model, store="exact")
    for t, g in grads.items():
        exact.add_gradients(g, t)
    return model, grads, exact


def _sketched(model, grads, whitening, sketch_dim=DEFAULT_SKETCH_DIM, seed=0, **kw):
    collector = FisherCollector(model, store="sketch", sketch_dim=sketch_dim, seed=seed, **kw)
    collector.freeze_whitening(whitening)
    for t, g in grads.items():
        collector.add_gradients(g, t)
    return collector


def _signed_scores(collector, **kw):
    metric = QKOVInterferenceMetric(None, collector, variant="signed", fisher="pooled", run_stats=False, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hm = metric.compute_heatmap("a", "b")
    return hm, torch.cat([hm[b]["scores"].reshape(-1) for b in BLOCKS]).double()


def test_sketched_signed_scores_are_unbiased_over_50_seeds(two_tasks):
    """E <z_i, z_j> = sum_k g_ik D_k g_jk with D from the frozen whitening Fisher; here the
    whitening is the pooled Fisher (I_A + I_B) / 2, the exact metric's fisher='pooled'."""
    model, grads, exact = two_tasks
    hm_exact, want = _signed_scores(exact)
    assert hm_exact.store["kind"] == "exact"
    whitening = exact.whitening_fisher()
    runs = torch.stack([_signed_scores(_sketched(model, grads, whitening, seed=s))[1] for s in range(50)])
    mean, se = runs.mean(0), runs.std(0) / math.sqrt(runs.shape[0])
    z = (mean - want) / (se + 1e-9 * want.abs().max())
    assert (z.abs() <= 3).double().mean() >= 0.98  # ~0.3% expected outside 3 SE
    assert z.abs().max() < 4.5
    # and they are estimates, not copies: single runs differ from the exact value
    assert (runs[0] - want).abs().max() > 1e-3 * want.abs().max()


def test_sketch_error_falls_like_one_over_sqrt_sketch_dim(two_tasks):
    model, grads, exact = two_tasks
    _, want = _signed_scores(exact)
    whitening = exact.whitening_fisher()
    dims, errors = (16, 64, 256), []
    for k in dims:
        runs = torch.stack(
            [_signed_scores(_sketched(model, grads, whitening, k, seed=s))[1] for s in range(12)]
        )
        errors.append(float((runs - want).pow(2).mean().sqrt()))
    slope = (math.log(errors[-1]) - math.log(errors[0])) / (math.log(dims[-1]) - math.log(dims[0]))
    assert -0.65 <= slope <= -0.35, (errors, slope)


def test_bytes_per_sample():
    model = _llama()
    layout = AttentionLayout.from_model(model)
    sk = FisherCollector(model, store="sketch", sketch_dim=64)
    slices = layout.num_layers * (2 * layout.num_heads + 2 * layout.num_kv_heads)
    assert sk.bytes_per_sample == slices * 64 * 4
    # a slice never takes more numbers than it has entries (16 x 64 here)
    assert FisherCollector(model, store="sketch", sketch_dim=4096).bytes_per_sample == slices * 1024 * 4
    ex = FisherCollector(model, store="exact")
    assert ex.bytes_per_sample == sum(math.prod(s) for s in ex.param_shapes.values()) * 4


def test_auto_store_rule(two_tasks):
    model = two_tasks[0]
    exact_mb = FisherCollector(model, store="exact").bytes_per_sample / 2**20
    # room for 10 samples x 2 tasks: exact; for fewer: sketch
    assert FisherCollector(model, gradient_memory_mb=exact_mb * 20.5).store_kind == "exact"
    auto = FisherCollector(model, gradient_memory_mb=exact_mb * 19.5)
    assert auto.store_kind == "sketch" and isinstance(auto.store, SketchStore)
    assert FisherCollector(model, gradient_memory_mb=0).store_kind == "exact"  # nothing to gain
    with pytest.raises(ValueError, match="store must be"):
        FisherCollector(model, store="dense")


def test_demo_model_conflict_cosine_map_spearman(tmp_path):
    """At the default sketch_dim the demo model's conflict-cosine map (all layers, heads, blocks)
    ranks like the exact one."""
    model = TinyGPT(n_layer=4, n_head=4, n_embd=64, pretrain_steps=60)
    model.setup("fit")
    grads = {}
    for task in ("general", "math"):
        data = SyntheticTask(task, 24, seed=7)
        grads[task] = fc.per_sample_gradients(model, collate([data[i] for i in range(24)]))
    exact = FisherCollector(model, store="exact")
    for t, g in grads.items():
        exact.add_gradients(g, t)
    sketch = FisherCollector(model, store="sketch")
    sketch.freeze_whitening(exact.whitening_fisher())
    for t, g in grads.items():
        sketch.add_gradients(g, t)

    def cos_map(collector):
        m = QKOVInterferenceMetric(None, collector, variant="signed", run_stats=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hm = m.compute_heatmap("general", "math")
        return torch.cat([hm[b]["conflict_cosine"].reshape(-1) for b in BLOCKS])

    a, b = cos_map(exact), cos_map(sketch)
    assert a.numel() == 4 * 4 * 4
    assert _spearman(a, b) >= 0.9


def _spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx = x.double().argsort().argsort().double()
    ry = y.double().argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def test_directional_variant_is_refused_on_sketches(two_tasks):
    model, grads, exact = two_tasks
    sketch = _sketched(model, grads, exact.whitening_fisher())
    with pytest.raises(ValueError, match="per-entry gradients"):
        QKOVInterferenceMetric(None, sketch)  # default variant: directional
    with pytest.raises(RuntimeError, match="per-head sketches"):
        sketch.get_gradient("a", 0)
    with pytest.raises(RuntimeError, match="per-head sketches"):
        sketch.contribution_cache  # noqa: B018
    # the pair API answers from sketches, consistent with the heatmap
    metric = QKOVInterferenceMetric(None, sketch, variant="signed", run_stats=False)
    hm = metric.compute_heatmap("a", "b")
    pair = metric.compute_sample_pair("a", 2, "b", 1, layer=0, head=3)
    layout = sketch.layout
    for block in BLOCKS:
        h = hm[block]["heads"].index(layout.block_head(3, block))
        assert pair[block] == pytest.approx(float(hm[block]["scores"][2, 1, 0, h]), rel=1e-5, abs=1e-9)
    assert hm.store["kind"] == "sketch" and hm.store["whitening_versions"] == [1]


def test_permutation_test_on_sketches_is_calibrated_under_the_null():
    """Both tasks from one distribution (as the exact test in test_interference.py): BY over the
    heatmap's tests on sketches flags a run at most alpha of the time."""
    model = tiny_causal_lm("gpt2")
    layout = AttentionLayout.from_model(model)
    n, runs, alpha = 10, 60, 0.05
    by = raw = 0
    for seed in range(runs):
        g = torch.Generator().manual_seed(1000 + seed)
        params = _null_parameters(layout, g)
        collector = FisherCollector(model, layout=layout, max_samples_per_task=n, store="sketch", seed=seed)
        collector.freeze_whitening({k: m**2 + s**2 for k, (m, s) in params.items()})
        for t in ("a", "b"):
            grads = {k: m + s * torch.randn(n, *m.shape, generator=g) for k, (m, s) in params.items()}
            collector.add_gradients(grads, t)
        metric = QKOVInterferenceMetric(
            layout,
            collector,
            variant="signed",
            n_permutations=499,
            fdr_alpha=alpha,
            min_conflict_effect_size=-math.inf,
            seed=seed,
        )
        hm = metric.compute_heatmap("a", "b", layers=[0], heads=[0, 1])
        by += any(bool(r["significant"].any()) for r in hm.values())
        p = torch.cat([r["p_values"].reshape(-1) for r in hm.values()])
        raw += bool((p <= alpha).any())
    assert by / runs <= alpha
    assert raw / runs > 0.15  # the uncorrected tests do reject: the correction is what holds


def test_permutation_test_on_sketches_finds_the_planted_head():
    """Task A routes through heads {0, 1}, task B through {1, 2}: on sketches the shared head 1 is a
    significant conflict, the others never are (same options as the exact path)."""
    register_layout(_PlantedModel.model_type, _planted_layout, overwrite=True)
    torch.manual_seed(0)
    model = _PlantedModel()
    layout = AttentionLayout.from_model(model)
    n = 16
    idx = torch.randint(0, 13, (n, 6), generator=torch.Generator().manual_seed(1))
    gates = {"a": torch.tensor([1.0, 1.0, 0.0, 0.0]), "b": torch.tensor([0.0, 1.0, 1.0, 0.0])}
    grads = {
        t: _micro_batch_grads(model, layout, idx, gates[t].expand(n, 4), target)
        for t, target in (("a", 1.0), ("b", -1.0))
    }
    collector = FisherCollector(model, layout=layout, max_samples_per_task=n, store="sketch", sketch_dim=64)
    for t, offset in (("a", 500), ("b", 900)):
        collector.add_gradients(grads[t], t, sample_ids=[offset + 3 * k for k in range(n)])
    assert collector.store.whitening is not None  # frozen at the first batch
    collector.freeze_whitening()  # both tasks known now: the pooled Fisher
    collector.reset("a")
    collector.reset("b")
    for t, offset in (("a", 500), ("b", 900)):
        collector.add_gradients(grads[t], t, sample_ids=[offset + 3 * k for k in range(n)])
    for p_value, stat in (("permutation", "dot"), ("normal", "dot")):
        metric = QKOVInterferenceMetric(
            layout,
            collector,
            variant="signed",
            n_permutations=999,
            top_k=20,
            p_value=p_value,
            test_statistic=stat,
        )
        with pytest.warns(UserWarning, match="degenerate"):
            hm = metric.compute_heatmap("a", "b")
        others = [0, 2, 3]
        for block in ("Q", "K", "V"):
            res = hm[block]
            assert (res["conflict_cosine"][:, 1] < -0.5).all()
            assert res["significant"][:, 1].all(), (p_value, stat, block)
            assert not res["significant"][:, others].any()
            assert torch.equal(res["scores"][..., others], torch.zeros(n, n, 2, 3))
            assert all(
                t["head"] == 1 and t["sample_i"] >= 500 and t["sample_j"] >= 900 for t in res["top_conflicts"]
            )
        assert hm.stats["p_value"] == p_value and hm.stats["test_statistic"] == stat


def test_sketch_state_dict_round_trip_continues_identically(two_tasks):
    model, grads, exact = two_tasks
    a = _sketched(model, grads, exact.whitening_fisher(), max_samples_per_task=6, seed=3)
    state = a.state_dict()
    b = FisherCollector(model, store="sketch", max_samples_per_task=6, seed=3)
    b.load_state_dict(state)
    more = fc.per_sample_gradients(model, lm_batch(batch=4, seq=12, seed=9))
    for c in (a, b):
        c.add_gradients(more, "a", sample_ids=[10, 11, 12, 13])
    ha, hb = _signed_scores(a)[0], _signed_scores(b)[0]
    assert a.sample_ids("a") == b.sample_ids("a") and len(a.sample_ids("a")) == 6
    for block in BLOCKS:
        assert torch.equal(ha[block]["scores"], hb[block]["scores"])
    with pytest.raises(ValueError, match="sketch_dim"):
        FisherCollector(model, store="sketch", sketch_dim=32, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="resume with the same store"):
        FisherCollector(model, store="exact").load_state_dict(state)


@pytest.mark.parametrize("store", ["exact", "sketch"])
def test_duplicate_ids_replace_the_older_row_in_every_accessor(two_tasks, store):
    """A second epoch over the same ids: one row per id, holding the newer gradient (issue 12.2)."""
    model, grads, exact = two_tasks
    collector = FisherCollector(model, store=store)
    collector.freeze_whitening(exact.whitening_fisher())
    first, second = grads["a"], grads["b"]
    collector.add_gradients(first, "t", sample_ids=[0, 1, 2, 3])
    collector.add_gradients(second, "t", sample_ids=[2, 3, 4, 5])  # ids 2, 3 come back
    assert collector.sample_ids("t") == [0, 1, 2, 3, 4, 5]
    assert collector.num_stored("t") == 6
    assert collector.num_samples("t") == 8  # the Fisher counts every offer
    collector.add_gradients(grads["b"], "u", sample_ids=[7, 8, 9, 10])
    metric = QKOVInterferenceMetric(None, collector, variant="signed", fisher="pooled", run_stats=False)
    hm = metric.compute_heatmap("t", "u")
    assert hm["Q"]["sample_ids_a"] == [0, 1, 2, 3, 4, 5]
    # the rows of ids 2 and 3 hold the second batch's samples: as in a store that saw only it
    ref = FisherCollector(model, store=store)
    ref.freeze_whitening(exact.whitening_fisher())
    ref.add_gradients(second, "t", sample_ids=[2, 3, 4, 5])
    inv = torch.ones(4, 16 * 64)
    for block in ("Q", "O"):
        for sid in (2, 3):
            row, ref_row = collector.store.row_of("t", sid), ref.store.row_of("t", sid)
            got = collector.store.head_view("t", 0, block, torch.arange(4), inv, torch.tensor([row]))
            want = ref.store.head_view("t", 0, block, torch.arange(4), inv, torch.tensor([ref_row]))
            assert torch.equal(got, want)
    pair = metric.compute_sample_pair("t", 2, "u", 7, layer=0, head=0)
    for block in BLOCKS:
        h = hm[block]["heads"].index(collector.layout.block_head(0, block))
        assert pair[block] == pytest.approx(float(hm[block]["scores"][2, 0, 0, h]), rel=1e-5, abs=1e-12)
    if store == "exact":
        for name, g in second.items():
            assert torch.equal(collector.get_gradient("t", 2)[name], g[0])
            assert torch.equal(collector.get_gradient("t", 3)[name], g[1])
            assert torch.equal(collector.get_gradient("t", 0)[name], first[name][0])
        cache = collector.contribution_cache["t"]
        assert sorted(cache) == [f"t_{i}" for i in range(6)]
        for name, g in second.items():
            assert torch.equal(cache["t_2"][name], g[0].float() ** 2)
        _, rows = collector.stored_gradients("t")
        assert all(r.shape[0] == 6 for r in rows.values())


def test_duplicate_id_within_one_batch_keeps_the_later_sample(two_tasks):
    model, grads, _ = two_tasks
    collector = FisherCollector(model, store="exact")
    collector.add_gradients(grads["a"], "t", sample_ids=[5, 6, 5, 7])
    assert collector.sample_ids("t") == [5, 6, 7]
    for name, g in grads["a"].items():
        assert torch.equal(collector.get_gradient("t", 5)[name], g[2])
        assert torch.equal(collector.get_gradient("t", 7)[name], g[3])


def test_fisher_monitor_with_sketches_in_a_real_trainer(tmp_path):
    """store='sketch' end to end: capture on flagged steps, whitening frozen at the first step and
    refreshed at each boundary, QK-OV maps and tests from sketches, logged, state round trip."""
    model = TinyGPT(n_layer=2, n_head=4, n_embd=32, pretrain_steps=0)
    dm = SyntheticTasks(n_train=32, n_val=8, n_probe=8, batch_size=4)
    fm = FisherMonitor(
        train_task="math",
        reference_tasks=["general"],
        capture_every_n_steps=1,
        max_samples_per_task=16,
        ema_samples_per_step=0,
        store="sketch",
        sketch_dim=64,
    )
    qm = QKOVInterferenceMonitor(fm, pairs=[("general", "math")], n_permutations=20)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=6,
        val_check_interval=3,
        limit_val_batches=1,
        logger=pl.loggers.CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[fm, qm],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm)
    collector = fm.collector
    assert collector.store_kind == "sketch" and fm.captured_steps == 6
    assert collector.num_stored("math") == 16 and collector.num_stored("general") == 8
    # versions: 1 = first flagged step, then one per boundary (2 boundaries)
    assert collector.store.version == 3
    assert set(collector.store.versions("general")) == {3}
    hm = qm.latest[("general", "math")]
    assert hm.store["kind"] == "sketch" and hm.variant == "signed"
    for block in BLOCKS:
        assert torch.isfinite(hm[block]["conflict_cosine"]).all()
        assert hm[block]["p_values"].min() < 1
    state = fm.state_dict()
    fresh = FisherMonitor(train_task="math", reference_tasks=["general"], store="sketch", sketch_dim=64)
    fresh.load_state_dict(state)
    fresh.setup(trainer, model, "fit")
    assert fresh.collector.sample_ids("math") == collector.sample_ids("math")
    assert fresh.collector.store.version == 3


def test_ddp_two_ranks_give_the_sketches_of_one_process(tmp_path):
    """2 gloo ranks: the first whitening is the all-reduced Fisher of both ranks' first batch (whose
    samples are not sketched), and every stored sketch equals the one a single process makes of the
    same sample."""
    script = Path(__file__).with_name("ddp_sketch_script.py")
    out = tmp_path / "sketch.pt"
    run_ddp_script(script, out, cwd=tmp_path)
    res = torch.load(out, weights_only=False)
    assert res["world"] == 2
    model = TinyGPT(n_layer=2, n_head=4, n_embd=32, pretrain_steps=0, lr=0.0)
    data = SyntheticTasks(n_train=32, batch_size=4).train_set
    first = [i for ids in res["first"]["ids"] for i in ids]
    assert len(first) == 8
    g_first = fc.per_sample_gradients(model, collate([data[i] for i in first]))
    one = FisherCollector(model, store="sketch", sketch_dim=64, seed=0)
    one.freeze_whitening({n: (g**2).mean(0) for n, g in g_first.items()})
    for name, w in one.store.whitening.items():
        torch.testing.assert_close(res["first"]["whitening"][name], w, rtol=1e-4, atol=0)
    ids = [i for r in res["ranks"] for i in r["ids"]]
    # the first step's samples set the whitening (Fisher sums) and are not sketched
    assert len(ids) == 16 and len(set(ids)) == 16 and not set(ids) & set(first)
    assert all(set(r["versions"].tolist()) == {1} for r in res["ranks"])  # all made under version 1
    one.add_gradients(fc.per_sample_gradients(model, collate([data[i] for i in ids])), "math", ids)
    single = one.store.state_dict()["tasks"]["math"]["rows"]
    for rank in res["ranks"]:
        for k, sid in enumerate(rank["ids"]):
            row = one.store.row_of("math", sid)
            for key, rows in rank["rows"].items():
                want = single[key][row]
                torch.testing.assert_close(rows[k], want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))

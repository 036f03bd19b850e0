"""Streaming ingest (issue 9 item 2): per-sample gradients handed to the collector inside the hooks,
per projection and chunk of samples, file exactly what the whole-batch path files.

References: the buffered path (``per_sample_gradients`` then ``add_gradients``) and, for a model
that uses every projection twice per forward, the micro-batch-1 loop.
"""

from __future__ import annotations

import pytest
import torch
from reference import assert_close_rel, max_rel_error
from tiny_models import lm_batch, tiny_causal_lm

import fisher_callbacks as fc
from fisher_callbacks.fisher import FisherCollector
from fisher_callbacks.losses import per_sample_losses

TASKS = ["a", "b", "a", None, "b"]  # sample 3 is left out (as a sample without targets is)
IDS = [10, 11, 12, 13, 14]


def _pair(model, store: str):
    """Two collectors with the same whitening (sketch store) and seeds."""
    out = []
    ref = fc.per_sample_gradients(model, lm_batch(batch=6, seq=10, seed=7))
    for _ in range(2):
        c = FisherCollector(model, store=store, sketch_dim=48, seed=3, ema_decay=0.9)
        if store == "sketch":
            c.freeze_whitening({n: (g**2).mean(0) for n, g in ref.items()})
        out.append(c)
    return out


def _buffered(collector, grads):
    """The reference: whole-batch natural gradients filed task by task."""
    for task in ("a", "b"):
        rows = [i for i, t in enumerate(TASKS) if t == task]
        sub = {n: g[rows] for n, g in grads.items()}
        collector.add_gradients(sub, task, [IDS[i] for i in rows], update_ema=True)


@pytest.mark.parametrize("store", ["exact", "sketch"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])  # Conv1D fused QKV; Linear GQA with O on axis 1
@pytest.mark.parametrize("chunk", [1, 2, None])
def test_streamed_step_files_what_the_buffered_path_files(name, store, chunk):
    model = tiny_causal_lm(name)
    batch = lm_batch(batch=5, seq=10, seed=1)
    streamed, buffered = _pair(model, store)
    _buffered(buffered, fc.per_sample_gradients(model, batch))

    ingest = streamed.ingest(TASKS, IDS, fisher=True, ema=True, store=True)
    calls = []

    class Recorder:
        def head_major(self, n):
            return ingest.head_major(n)

        def __call__(self, n, g, start):
            calls.append(g.shape[0])
            ingest(n, g, start)

    fc.probe_pass(model, batch, sink=Recorder(), chunk=chunk)
    ingest.commit()
    assert max(calls) == (5 if chunk is None else chunk)  # the hooks never hand over more

    for task in ("a", "b"):
        assert streamed.num_samples(task) == buffered.num_samples(task) == 2
        assert streamed.ema_steps(task) == buffered.ema_steps(task) == 1
        assert streamed.sample_ids(task) == buffered.sample_ids(task)
        got, want = streamed.fisher(task), buffered.fisher(task)
        assert max_rel_error(got, want) <= 1e-5
        assert max_rel_error(streamed.fisher_ema(task), buffered.fisher_ema(task)) <= 1e-5
        s_rows = streamed.store.state_dict()["tasks"][task]["rows"]
        b_rows = buffered.store.state_dict()["tasks"][task]["rows"]
        assert s_rows.keys() == b_rows.keys()
        for key in b_rows:
            assert_close_rel(s_rows[key], b_rows[key], rtol=1e-5)


def test_head_major_layout_round_trips_and_matches_the_capture():
    """``HeadMajor.from_natural`` of the natural gradients is what the capture makes by gathering
    the factor (Linear out axis, Linear in axis for O), and ``to_natural`` inverts it."""
    model = tiny_causal_lm("llama")
    batch = lm_batch(batch=3, seq=8, seed=2)
    collector = FisherCollector(model, store="sketch", sketch_dim=32)
    natural = fc.per_sample_gradients(model, batch)
    got = {}

    class Keep:
        def head_major(self, n):
            return collector.store.head_major(n)

        def __call__(self, n, g, start):
            got[n] = g.clone()

    fc.probe_pass(model, batch, sink=Keep())
    axes = set()
    for n, g in natural.items():
        layout = collector.store.head_major(n)
        assert layout is not None
        axes.add(layout.axis)
        assert_close_rel(got[n], layout.from_natural(g), rtol=1e-5)
        assert torch.equal(layout.to_natural(layout.from_natural(g)[1]), g[1])
    assert axes == {0, 1}


class TwiceThrough(torch.nn.Module):
    """Runs the model twice per forward (as R-drop or consistency losses do): every projection is
    used twice, so a sample's gradient is the sum of both uses."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, **batch):
        a = self.model(**batch).logits
        b = self.model(**batch).logits
        return type("Out", (), {"logits": 0.5 * (a + b)})()


@pytest.mark.parametrize("store", ["exact", "sketch"])
def test_a_projection_used_twice_gets_the_sum_of_both_uses(store):
    inner = tiny_causal_lm("llama")
    model = TwiceThrough(inner)
    batch = lm_batch(batch=4, seq=8, seed=3)
    layout = fc.AttentionLayout.from_model(model)
    names = layout.monitored_parameters()
    params = dict(model.named_parameters())
    ref = {n: [] for n in names}
    for i in range(4):  # the micro-batch-1 loop
        one = {k: v[i : i + 1] for k, v in batch.items()}
        loss = per_sample_losses(model, one, "causal_lm").sum()
        for n, g in zip(names, torch.autograd.grad(loss, [params[n] for n in names])):
            ref[n].append(g)
    ref = {n: torch.stack(v) for n, v in ref.items()}

    collector = FisherCollector(model, layout, store=store, sketch_dim=32)
    collector.freeze_whitening({n: (g**2).mean(0) for n, g in ref.items()})
    ingest = collector.ingest(["t"] * 4, [0, 1, 2, 3])
    fc.probe_pass(model, batch, layout, loss_type="causal_lm", sink=ingest, chunk=1)
    ingest.commit()
    want = {n: (g**2).sum(0) / 4 for n, g in ref.items()}
    assert max_rel_error(collector.fisher("t"), want) <= 1e-5
    reference = FisherCollector(model, layout, store=store, sketch_dim=32)
    reference.freeze_whitening({n: (g**2).mean(0) for n, g in ref.items()})
    reference.add_gradients(ref, "t", [0, 1, 2, 3])
    got = collector.store.state_dict()["tasks"]["t"]["rows"]
    for key, rows in reference.store.state_dict()["tasks"]["t"]["rows"].items():
        assert_close_rel(got[key], rows, rtol=1e-5)


def test_an_uncommitted_ingest_changes_nothing():
    """What a step found non-finite after its backward leaves behind: nothing."""
    model = tiny_causal_lm("gpt2")
    collector = FisherCollector(model, store="exact")
    collector.add_gradients(fc.per_sample_gradients(model, lm_batch(batch=2, seed=5)), "a", [0, 1])
    before = {n: t.clone() for n, t in collector.fisher("a").items()}
    ingest = collector.ingest(["a"] * 4, [5, 6, 7, 8])
    fc.probe_pass(model, lm_batch(batch=4, seed=6), sink=ingest, chunk=2)
    assert ingest.received and ingest.count == 4
    del ingest  # dropped, never committed
    assert collector.sample_ids("a") == [0, 1] and collector.num_samples("a") == 2
    assert all(torch.equal(collector.fisher("a")[n], before[n]) for n in before)

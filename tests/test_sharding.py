"""Sharded training: FSDP2 (Lightning's ModelParallelStrategy, 2 CPU processes, gloo) gives every
Fisher, QK-OV and forgetting value of the same seeded DDP fit, its forgetting state held as shards;
DeepSpeed ZeRO-3 and FSDP1 are refused at set-up with what is supported (they cannot run on CPU:
their parameters are imitated)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ddp_run import run_ddp_script, run_torchrun
from reference import assert_close_rel
from tiny_models import tiny_causal_lm

from fisher_callbacks.callbacks import FisherMonitor
from fisher_callbacks.engine.sharding import Shards, check_supported, map_parameter_state, sharding_of

SCRIPT = Path(__file__).parent / "fsdp2_script.py"
FULLY_SHARD = Path(__file__).parent / "fully_shard_script.py"


def _close(a: float, b: float, rel: float = 1e-4, floor: float = 1e-7) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b)) + floor


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The seeded fit under DDP and under FSDP2 (which writes a checkpoint every 2 steps)."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    out = {"ckpt": tmp / "ckpt"}
    for kind in ("ddp", "fsdp2"):
        path = tmp / f"{kind}.pt"
        run_ddp_script(SCRIPT, kind, path, *([out["ckpt"]] if kind == "fsdp2" else []), cwd=tmp)
        out[kind] = torch.load(path, weights_only=False)
    return out


def _same_heatmaps(ddp: dict, fsdp: dict) -> None:
    """Every layer x head map of every block and pair (what the figures show) is the DDP run's."""
    assert ddp["heatmaps"] and set(fsdp["heatmaps"]) == set(ddp["heatmaps"])
    for pair, blocks in ddp["heatmaps"].items():
        assert set(blocks) == {"Q", "K", "V", "O"}, pair
        for block, maps in blocks.items():
            for name, want in maps.items():
                assert_close_rel(fsdp["heatmaps"][pair][block][name], want, rtol=1e-4)


def test_fsdp2_gives_the_fisher_qkov_and_forgetting_of_ddp(runs):
    ddp, fsdp = runs["ddp"], runs["fsdp2"]
    assert fsdp["traces"] == pytest.approx(ddp["traces"], rel=1e-5)
    _same_heatmaps(ddp, fsdp)
    keys = [k for k in ddp["metrics"] if k.startswith(("fisher/", "qkov/", "forgetting/"))]
    assert any(k.startswith("qkov/") for k in keys) and any(k.startswith("fisher/general") for k in keys)
    scalars = ("measured", "predicted", "ewc_quadratic", "damage_from_math", "damage_log_ratio")
    scalars += ("risk", "warning")  # the forecast (not a callback metric) is in the history below
    assert all(f"forgetting/general/{s}" in keys for s in scalars)
    assert sorted(k for k in fsdp["metrics"] if k.startswith("forgetting/")) == sorted(
        k for k in keys if k.startswith("forgetting/")
    )
    for key in keys:
        assert _close(fsdp["metrics"][key], ddp["metrics"][key]), key
    assert fsdp["metrics"]["train/loss"] == pytest.approx(ddp["metrics"]["train/loss"], rel=1e-5)
    # every boundary and every per-step forecast, not only the last logged values
    want, got = ddp["history"]["general"], fsdp["history"]["general"]
    assert want["forecast_step"] == got["forecast_step"] == [1, 2, 3, 4] and want["step"] == got["step"]
    for series in ("measured", "predicted", "forecast", "ewc_quadratic", "warning", "band_low", "band_high"):
        assert len(got[series]) == len(want[series]) > 0, series
        for a, b in zip(got[series], want[series]):
            assert _close(a, b, floor=1e-9 if series == "ewc_quadratic" else 1e-7), (series, a, b)
    # per-rank state: this rank's shards (half of the whole tensors on 2 ranks)
    for group in ("anchor", "anchor_fisher", "base", "grads"):
        assert fsdp["ledger"][group] * 2 == ddp["ledger"][group], group
    # and the FisherMonitor's Fisher sums of every task (its stored per-sample rows are per rank)
    sums = [g for g in ddp["fisher_ledger"] if g.startswith("collector.fisher_sum[")]
    assert len(sums) == 2, ddp["fisher_ledger"]
    for group in sums:
        assert fsdp["fisher_ledger"][group] * 2 == ddp["fisher_ledger"][group], group
    assert not any("FSDP2" in w or "failed" in w for w in fsdp["warnings"])
    assert not any("DTensor" in w or "sharding strategy" in w for w in fsdp["all_warnings"])
    assert fsdp["warnings"] == ddp["warnings"]  # the monitors warn of the same things


def test_fsdp2_with_the_sketch_store_gives_the_fisher_and_qkov_of_ddp(tmp_path):
    """The sketch store (what "auto" picks past the smallest models): its whitening is made
    from the Fisher that FSDP2 keeps as shards, gathered whole at each boundary; the rows it
    sketches and every Fisher and QK-OV value are those of DDP."""
    got = {}
    for kind in ("ddp-sketch", "fsdp2-sketch"):
        run_ddp_script(SCRIPT, kind, tmp_path / f"{kind}.pt", cwd=tmp_path)
        got[kind] = torch.load(tmp_path / f"{kind}.pt", weights_only=False)
    ddp, fsdp = got["ddp-sketch"], got["fsdp2-sketch"]
    keys = [k for k in ddp["metrics"] if k.startswith(("fisher/", "qkov/"))]
    assert any(k.startswith("qkov/general_vs_math/") for k in keys), keys
    assert sorted(k for k in fsdp["metrics"] if k.startswith(("fisher/", "qkov/"))) == sorted(keys)
    for key in keys:
        assert _close(fsdp["metrics"][key], ddp["metrics"][key]), key
    assert fsdp["traces"] == pytest.approx(ddp["traces"], rel=1e-5)
    _same_heatmaps(ddp, fsdp)
    assert not any("failed" in w or "no stored samples" in w for w in fsdp["warnings"])
    # between boundaries each rank keeps its rows of the whitening (gathered to sketch a step)
    group = "collector.store.whitening"
    assert fsdp["step_ledger"][group] * 2 == ddp["step_ledger"][group] > 0


def test_fsdp2_probe_batch_without_targets_on_one_rank_keeps_the_collectives_matched(tmp_path):
    """Rank 1's first probe batch has no target: under FSDP2 its probe backward (a collective,
    with an empty sum) still runs, so the fit neither hangs nor loses the forgetting metrics."""
    path = tmp_path / "empty.pt"
    run_ddp_script(SCRIPT, "fsdp2-empty", path, cwd=tmp_path, timeout=300)
    got = torch.load(path, weights_only=False)
    assert all(f"forgetting/general/{s}" in got["metrics"] for s in ("measured", "predicted", "risk"))
    assert got["history"]["general"]["forecast_step"] == [1, 2, 3, 4]
    assert not any("failed" in w for w in got["warnings"])


def test_fsdp2_resumed_from_a_distributed_checkpoint_gives_the_uninterrupted_forgetting(runs, tmp_path):
    # ModelParallelStrategy writes the callbacks' states with rank 0's metadata only: the anchor,
    # theta_b and the probe gradients are gathered whole into it, and each rank cuts its rows back
    # out at resume (rank 1 given rank 0's rows would predict another drift)
    ckpt = runs["ckpt"] / "epoch=1-step=2.ckpt"
    assert (ckpt / "meta.pt").is_file()
    meta = torch.load(ckpt / "meta.pt", weights_only=False)
    states = {k.split("{")[0]: v for k, v in meta["callbacks"].items()}
    state, fisher = states["ForgettingRiskMonitor"], states["FisherMonitor"]["collector"]["tasks"]
    assert "ranks" not in state
    weight = "model.transformer.h.0.attn.c_attn.weight"
    assert state["anchor"][weight].shape == state["prev"][weight].shape == (32, 96)
    assert fisher["math"]["synced_sum"][weight].shape == (32, 96)
    out = tmp_path / "resumed.pt"
    run_ddp_script(SCRIPT, "fsdp2", out, tmp_path / "unused", ckpt, cwd=tmp_path)
    resumed, whole = torch.load(out, weights_only=False), runs["fsdp2"]
    want, got = whole["history"]["general"], resumed["history"]["general"]
    assert got["step"] == want["step"] == [2, 4] and got["forecast_step"] == want["forecast_step"]
    for series in ("measured", "predicted", "forecast", "ewc_quadratic", "warning"):
        for a, b in zip(got[series], want[series], strict=True):
            assert _close(a, b, rel=1e-5, floor=1e-9), (series, a, b)
    # not the damage: it reads the FisherMonitor's stored per-sample gradients, which stay local
    # to each rank and, as under DDP, come back from rank 0's checkpoint entry on every rank
    for key, value in whole["metrics"].items():
        if key.startswith("forgetting/") and "/damage_" not in key:
            assert _close(resumed["metrics"][key], value, rel=1e-5), key


def test_a_plain_fully_shard_loop_keeps_the_fisher_as_shards_and_gives_the_whole_one(tmp_path):
    """torch's own fully_shard, a plain loop (no Lightning): the collector keeps this rank's half
    of the Fisher sums and EMA, and gives the Fisher, EMA and state of both ranks' samples,
    checked against one process that watches the two ranks' batches and takes the same steps."""
    from fully_shard_script import LR, batches
    from tiny_models import tiny_causal_lm

    from fisher_callbacks import FisherCollector

    out = tmp_path / "fully_shard.pt"
    run_torchrun(FULLY_SHARD, out, cwd=tmp_path, timeout=300)
    got = torch.load(out, weights_only=False)
    model = tiny_causal_lm("gpt2", seed=0)
    ranks = [FisherCollector(model, store="exact", ema_entries=True) for _ in range(2)]
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for step_batches in zip(batches(0), batches(1)):
        for collector, batch in zip(ranks, step_batches):
            collector.collect({k: v for k, v in batch.items() if k != "sample_id"}, "math")
            collector.update_ema({k: v for k, v in batch.items() if k != "sample_id"}, "math")
        loss = sum(model(**{k: v for k, v in b.items() if k != "sample_id"}).loss for b in step_batches) / 2
        loss.backward()  # FSDP2's gradient: the mean over the ranks of each rank's mean loss
        optimizer.step()
        optimizer.zero_grad()
    count = sum(c.num_samples("math") for c in ranks)
    assert got["num_samples"] == count == 24
    sums = {n: sum(c.fisher_state("math")[0][n] for c in ranks) for n in got["fisher"]}
    ema = {n: (ranks[0].fisher_ema("math")[n] + ranks[1].fisher_ema("math")[n]) / 2 for n in got["ema"]}
    assert sorted(got["fisher"]) == sorted(ranks[0].param_names) == sorted(got["ema"])
    for name in got["fisher"]:
        assert_close_rel(got["fisher"][name], sums[name] / count, rtol=1e-4)
        assert_close_rel(got["ema"][name], ema[name], rtol=1e-4)
        # the state holds whole tensors: it resumes on any number of ranks
        assert_close_rel(got["state"]["tasks"]["math"]["synced_sum"][name], sums[name], rtol=1e-4)
    trace = sum(c.fisher_ema_trace("math") for c in ranks) / 2
    assert got["ema_trace"] == pytest.approx(trace, rel=1e-4)
    # per rank: half of the whole Fisher sums and EMA; the gathered Fisher only until released
    whole = sum(t.numel() * 4 for t in got["fisher"].values())
    assert got["ledger"]["fisher_sum[math]"] * 2 == whole == got["ledger"]["ema[math]"] * 2
    assert got["ledger"]["fisher_cache"] == whole and "fisher_cache" not in got["ledger_released"]
    resumed = FisherCollector(tiny_causal_lm("gpt2", seed=0), store="exact", ema_entries=True)
    resumed.load_state_dict(got["state"])
    for name, f in resumed.fisher("math").items():
        assert_close_rel(f, got["fisher"][name], rtol=1e-6)


def _imitate(model, attribute: str, value) -> torch.nn.Module:
    for p in model.parameters():
        setattr(p, attribute, value)
    return model


@pytest.mark.parametrize(
    ("attribute", "value", "kind", "says"),
    [("ds_shape", (32, 32), "zero3", "ZeRO-3"), ("_is_flat_param", True, "fsdp1", "FSDP1")],
)
def test_zero3_and_fsdp1_are_refused_with_what_is_supported(attribute, value, kind, says):
    model = _imitate(tiny_causal_lm("gpt2"), attribute, value)
    assert sharding_of(model) == kind
    with pytest.raises(ValueError, match=says) as err:
        check_supported(model)
    assert "FSDP2" in str(err.value) and "DDP" in str(err.value)
    assert sharding_of(tiny_causal_lm("gpt2")) is None


def test_an_unsupported_sharding_keeps_the_suite_out_with_required_false():
    from fisher_callbacks.engine.host import Host

    class _Host(Host):
        def __init__(self, module):
            self.module, self.step = module, 0

        def log_scalars(self, values, *, sync_dist=False, rank_zero_only=False):
            pass

        def request_stop(self):
            pass

    model = _imitate(tiny_causal_lm("gpt2"), "ds_shape", (1,))
    strict = FisherMonitor("train", capture_every_n_steps=1)
    with pytest.raises(ValueError, match="ZeRO-3"):
        strict.prepare(_Host(model), probe_gradients_wanted=False)
    lenient = FisherMonitor("train", capture_every_n_steps=1, required=False)
    with pytest.warns(UserWarning, match="stays out of this fit.*ZeRO-3"):
        lenient.prepare(_Host(model), probe_gradients_wanted=False)
        lenient.relay.flush()
    assert not lenient.active


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox", "qwen2"])
def test_per_head_sums_of_row_blocks_add_up_to_the_whole(arch):
    """Attribution cells under FSDP2: each rank sums the heads over its dim-0 rows of a weight
    (heads along the rows, Q/K/V of a Linear, or along the columns, GPT-2's Conv1D, an O input
    axis); the ranks' cells add up to those of the whole weight, also for uneven blocks."""
    from fisher_callbacks.layouts import AttentionLayout

    model = tiny_causal_lm(arch)
    layout = AttentionLayout.from_model(model)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    for block in layout.blocks:
        for name, bias in layout.block_entries(0, block):
            whole = torch.randn(params[name].shape, generator=gen, dtype=torch.float64)
            cut = whole.shape[0] // 2 + 1  # uneven, as torch.chunk splits an odd dim 0
            parts = []
            for start, stop in ((0, cut), (cut, whole.shape[0])):
                shards = Shards()
                shards.group, shards._sharded = object(), {name}  # two imitated ranks' blocks
                shards._blocks = {name: ((start, *[0] * (whole.dim() - 1)), (stop - start, *whole.shape[1:]))}
                parts.append(shards.head_sums(layout, whole[start:stop], name, 0, block, bias))
            want = layout.head_view(whole, 0, block, bias=bias).sum(-1)
            torch.testing.assert_close(parts[0] + parts[1], want, msg=f"{arch} {block} {name}")
    assert Shards(model).local("x", params[name]) is params[name]  # whole tensors: untouched


def test_map_parameter_state_visits_every_tensor_in_one_order_and_keeps_the_rest():
    """The order a collective over the state's tensors takes must be the same on every rank:
    sorted, whatever order the ranks built their dicts in; entries left out and None pass."""
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    state = {
        "anchor": {"w2": a, "w1": b},
        "anchor_fisher": {"math": {"w2": a}, "general": {"w1": c}},
        "prev": None,
        "history": {"general": [1.0]},
    }
    seen = []
    keys = ("anchor", "anchor_fisher", "prev")
    out = map_parameter_state(state, keys, lambda n, t: seen.append(n) or t + 1)
    assert seen == ["w1", "w2", "w1", "w2"]  # anchor sorted, then the tasks sorted
    assert list(out["anchor"]) == ["w1", "w2"] and float(out["anchor_fisher"]["general"]["w1"]) == 3.0
    assert out["prev"] is None and out["history"] is state["history"]
    kept = map_parameter_state(state, ("anchor",), lambda n, t: t, collective=False)
    assert list(kept["anchor"]) == ["w2", "w1"]  # no collective: the entries' own order
    assert Shards().block("w", a) is a and Shards().whole("w", a) is a  # no sharding: as they are

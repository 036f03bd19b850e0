"""Issue 12 under real 2-process CPU DDP (gloo): uneven or failing probe sets on one rank, warnings
of rank 1, one stop line per run (strategy="ddp"), and a ddp_spawn fit (the monitors are
pickled to the children; what the parent gets back)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from ddp_run import run_ddp_script

SCRIPT = Path(__file__).with_name("ddp_reliability_script.py")


def _run(mode: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict[str, dict]]:
    out = tmp_path / "out"
    out.mkdir()
    proc = run_ddp_script(SCRIPT, mode, out, cwd=tmp_path, timeout=420)
    return proc, {p.stem: torch.load(p, weights_only=False) for p in out.glob("*.pt")}


def test_ddp_uneven_and_failing_probe_sets_on_one_rank(tmp_path):
    """Item 5 (and the stop line of item 8). Before: rank 1's empty probe set made rank 0 alone
    call the metric sync (sync_dist=True) and the run died or hung; rank 1's warnings were dropped
    and each rank printed its own "stopping at step" line."""
    proc, res = _run("ddp", tmp_path)
    r0, r1 = res["rank0"], res["rank1"]
    assert r0["keys"] == r1["keys"]  # the same logged keys on every rank
    for task in ("general", "shaky"):
        assert f"forgetting/{task}/measured" in r0["keys"]
        assert r0["probe_n"][task] == r1["probe_n"][task] == 8  # rank 0's 8 samples, on both ranks
        key = f"forgetting/{task}/measured"
        assert r0["metrics"][key] == pytest.approx(r1["metrics"][key], rel=1e-6, abs=1e-9)
    assert r0["num_samples"]["general"] == r1["num_samples"]["general"] == 8  # probe Fisher reduced
    # rank 1's failing probe reaches the user once, from rank zero, naming the rank
    note = "probe pass on 'shaky' failed on this rank"
    failed = [line for line in proc.stderr.splitlines() if note in line]
    assert len(failed) == 1 and "[rank 1]" in failed[0], proc.stderr[-3000:]
    # stopped together, by the per-step forecast (step 1) or at the first boundary (step 2)
    assert r0["global_step"] == r1["global_step"] and r0["global_step"] in (1, 2)
    assert proc.stderr.count("stopping at step") == 1, proc.stderr[-3000:]


def test_ddp_spawn_fit_and_what_the_parent_gets_back(tmp_path):
    """Item 6. Before: ddp_spawn failed at launch (a torch.Generator in FisherMonitor cannot be
    pickled). The children capture as under ddp; the parent gets the logged metrics back, never
    the callback state (Lightning's _MultiProcessingLauncher returns weights, trainer state,
    callback_metrics and the best checkpoint path)."""
    _, res = _run("ddp_spawn", tmp_path)
    for rank in ("rank0", "rank1"):
        assert res[rank]["num_samples"]["math"] == 24  # 3 flagged steps x 2 ranks x 4, synced
        assert res[rank]["probe_n"]["general"] == 16  # the whole probe set on each rank, counted per rank
    parent = res["parent"]
    assert parent["collector_is_none"] and parent["probe"] == {}
    assert parent["metrics"]["fisher/math/num_samples"] == 24.0

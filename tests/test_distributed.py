"""A real 2-process CPU DDP run (gloo) gives the same Fisher as one process over the same samples,
and logs figures once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import fisher_callbacks as fc
from lightning_examples.synthetic import SyntheticTasks, TinyGPT, collate

SCRIPT = Path(__file__).with_name("ddp_fisher_script.py")


def test_ddp_fisher_equals_single_process(tmp_path):
    out = tmp_path / "fisher.pt"
    env = {**os.environ, "PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(tmp_path / "logs")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = torch.load(out, weights_only=False)
    assert res["world"] == 2
    ids = [i for rank_ids in res["ids"] for i in rank_ids]
    assert len(ids) == 24 and len(set(ids)) == 24  # 3 steps x 2 ranks x 4 samples, disjoint
    assert res["count"] == 24
    # one process, same (unchanged: lr = 0) weights, same samples
    model = TinyGPT(n_layer=2, n_head=4, n_embd=32, pretrain_steps=0, lr=0.0)
    data = SyntheticTasks(n_train=32, batch_size=4).train_set
    batch = collate([data[i] for i in ids])
    grads = fc.per_sample_gradients(model, batch)
    for name, g in grads.items():
        expected = (g**2).mean(0)
        assert torch.allclose(res["fisher"][name], expected, rtol=1e-4, atol=1e-12), name
    figures = list(Path(tmp_path / "logs").rglob("figures/*.png"))
    assert len(figures) == 3  # three heatmaps of one validation, written once (rank zero)

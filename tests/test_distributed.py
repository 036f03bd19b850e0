"""A real 2-process CPU DDP run (gloo) gives the same Fisher as one process over the same samples,
and logs figures once."""

from __future__ import annotations

from pathlib import Path

import torch
from ddp_run import run_ddp_script

import fisher_callbacks as fc
from lightning_examples.synthetic import SyntheticTasks, TinyGPT, collate

SCRIPT = Path(__file__).with_name("ddp_fisher_script.py")


def test_ddp_fisher_equals_single_process(tmp_path):
    out = tmp_path / "fisher.pt"
    run_ddp_script(SCRIPT, out, tmp_path / "logs", cwd=tmp_path)
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


def _sync_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = TinyGPT(n_layer=1, n_head=2, n_embd=8, pretrain_steps=0)
    collector = fc.FisherCollector(model, max_samples_per_task=4)

    def add(task, value):
        grads = {n: torch.full((1, *s), float(value)) for n, s in collector.param_shapes.items()}
        collector.add_gradients(grads, task)

    # rank 0 meets a then b, rank 1 meets b then a, and only rank 1 has task c
    for task in ["a", "b"] if rank == 0 else ["b", "a", "c"]:
        add(task, {"a": 1.0, "b": 10.0, "c": 3.0}[task] * (rank + 1))
    collector.sync()
    collector.sync()  # idempotent: nothing is counted twice
    if rank == 0:
        name = collector.param_names[0]
        torch.save(
            {
                t: (float(collector.fisher(t)[name].flatten()[0]), collector.num_samples(t))
                for t in ("a", "b", "c")
            },
            out,
        )
    dist.destroy_process_group()


def test_sync_reduces_the_union_of_tasks_in_any_order(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "sync.pt"
    mp.spawn(_sync_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    res = torch.load(out)
    assert res["a"] == (2.5, 2)  # (1^2 + 2^2) / 2
    assert res["b"] == (250.0, 2)  # (10^2 + 20^2) / 2
    assert res["c"] == (36.0, 1)  # only rank 1: 6^2

"""Per-rank memory of the monitors under DDP and under FSDP2, the same seeded fit.

A TinyGPT (GPT-2 blocks, ``--n-layer``/``--n-embd``, random init) runs a short CPU fit on
``--world`` gloo processes with the three monitors at their defaults (``predict_on="all"``:
theta_b and the probe-gradient rows over every trainable parameter), once under Lightning's DDP
and once under ``ModelParallelStrategy`` with ``fully_shard`` on every block and the root. Each
rank's ledger (:func:`fisher_callbacks.memory.suite_ledger`, the model's own parameters and
gradients not counted) is printed per group, taken after the last training step (before its
boundary: what the monitors keep between boundaries). Under FSDP2 the forgetting monitor's
per-parameter state (anchor, anchor Fisher, theta_b, probe-gradient rows), the FisherMonitor's
probe gradients and its Fisher sums of the Q/K/V/O weights are this rank's shards, ``1/world`` of
DDP's. Not sharded: the stored per-sample rows (each rank's own samples; ``--store sketch`` keeps
them as per-head sketches, the store ``"auto"`` picks past the smallest models) and the sketch
store's frozen whitening.

Run: ``python benchmarks/bench_sharded_memory.py [--world 2] [--n-layer 4] [--n-embd 128]
[--store auto|exact|sketch]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


PER_PARAMETER = ("store.whitening", "/probe", "/anchor", "/anchor_fisher", "/base")


def child(kind: str, world: int, out: str, n_layer: int, n_embd: int, store: str) -> None:
    import torch

    from fisher_callbacks.callbacks import FisherMonitor, ForgettingRiskMonitor, QKOVInterferenceMonitor
    from fisher_callbacks.memory import suite_ledger
    from lightning_examples.synthetic import AtLastStep, ShardedGPT, SyntheticTasks, sharded_fit_trainer

    torch.manual_seed(0)
    model = ShardedGPT(n_layer=n_layer, n_head=4, n_embd=n_embd, pretrain_steps=0)
    dm = SyntheticTasks(n_train=16 * world, n_val=8, n_probe=8, batch_size=4)
    fm = FisherMonitor(train_task="math", reference_tasks=["general"], capture_every_n_steps=2, store=store)
    qm = QKOVInterferenceMonitor(fm, pairs=[("general", "math")], n_permutations=10)
    rm = ForgettingRiskMonitor(fm, reference_tasks=["general"])
    last = AtLastStep(lambda: suite_ledger([fm, qm, rm], model))
    trainer = sharded_fit_trainer(kind, world, [fm, qm, rm, last])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm)
    ledger = last.value
    trainable = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, {"ledger": ledger, "weights": trainable * 4})
    if trainer.is_global_zero:
        Path(out).write_text(json.dumps(gathered))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--store", default="auto", choices=("auto", "exact", "sketch"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.world, args.out, args.n_layer, args.n_embd, args.store)
        return
    env = {**os.environ, "PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1"}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("ddp", "fsdp2"):
            out = Path(tmp) / f"{kind}.json"
            cmd = [sys.executable, __file__, "--child", kind, "--out", str(out), "--world", str(args.world)]
            cmd += ["--n-layer", str(args.n_layer), "--n-embd", str(args.n_embd), "--store", args.store]
            proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            runs[kind] = json.loads(out.read_text())
    groups = sorted({g for run in runs.values() for rank in run for g in rank["ledger"]})
    print(
        f"world={args.world}, TinyGPT n_layer={args.n_layer} n_embd={args.n_embd}, store={args.store}; "
        "bytes held per rank after the last training step"
    )
    head = f"{'group':44s}" + "".join(f"{k} r{r:<10d}" for k in runs for r in range(args.world))
    print(head + "fsdp2/ddp (rank 0)")
    for g in groups:
        cells = [runs[k][r]["ledger"].get(g, 0) for k in runs for r in range(args.world)]
        ddp0, fsdp0 = runs["ddp"][0]["ledger"].get(g, 0), runs["fsdp2"][0]["ledger"].get(g, 0)
        ratio = f"{fsdp0 / ddp0:.2f}" if ddp0 else "-"
        print(f"{g:44s}" + "".join(f"{c:<15d}" for c in cells) + ratio)
    totals = [sum(runs[k][r]["ledger"].values()) for k in runs for r in range(args.world)]
    print(f"{'total':44s}" + "".join(f"{c:<15d}" for c in totals))
    weights = [runs[k][r]["weights"] for k in runs for r in range(args.world)]
    print(f"{'(model weights held, fp32)':44s}" + "".join(f"{c:<15d}" for c in weights))
    per_parameter = [g for g in groups if g.endswith(PER_PARAMETER) or ".fisher_sum[" in g]
    held = {k: sum(runs[k][0]["ledger"].get(g, 0) for g in per_parameter) for k in runs}
    print(
        f"\nper-parameter state ({len(per_parameter)} groups: Fisher sums, whitening, probe gradients, "
        f"anchor, anchor Fisher, theta_b), rank 0: DDP {held['ddp']:,} B, FSDP2 {held['fsdp2']:,} B "
        f"= {held['fsdp2'] / held['ddp']:.2f} of DDP (goal: 1/world = {1 / args.world:.2f}; DDP also "
        "holds the unsynced whole Fisher sum of the last captured step)"
    )


if __name__ == "__main__":
    main()

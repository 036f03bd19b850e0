"""Run by tests/test_sharding.py: the same seeded 2-process CPU fit (gloo) under DDP or FSDP2
(Lightning's ModelParallelStrategy, ``fully_shard`` per block and on the root), with the three
monitors. Rank 0 writes the logged scalars, the Fisher traces, the forgetting history and ledger
and the monitors' warnings to argv[2]. One training batch per rank and epoch, so a run resumed
from the step-2 checkpoint sees the batches of the uninterrupted one.

Run: ``python tests/fsdp2_script.py {ddp|fsdp2}[-empty|-sketch] OUT [CKPT_DIR [RESUME_FROM]]``
(``-empty``: rank 1's first probe batch has no targets; ``-sketch``: the sketch store): with ``CKPT_DIR`` a
checkpoint every 2 steps is written there (FSDP2: a distributed checkpoint directory); with
``RESUME_FROM`` the fit resumes from that checkpoint.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fisher_callbacks.callbacks import FisherMonitor, ForgettingRiskMonitor, QKOVInterferenceMonitor
from lightning_examples.synthetic import AtLastStep, ShardedGPT, SyntheticTasks, sharded_fit_trainer


class NoTargetsOnRankOne(SyntheticTasks):
    """Rank 1's first probe batch has no target token (every label ``-100``): its probe
    gradient adds nothing there, while the FSDP2 backward stays a collective of every rank."""

    def probe_dataloader(self, task: str):
        batches = list(super().probe_dataloader(task))
        if torch.distributed.get_rank() == 1:
            batches[0] = {**batches[0], "labels": torch.full_like(batches[0]["labels"], -100)}
        return batches


def main(kind: str, out: str, ckpt_dir: str | None = None, resume: str | None = None) -> None:
    torch.manual_seed(0)
    model = ShardedGPT(n_layer=2, n_head=4, n_embd=32, pretrain_steps=20, pretrain_lr=1e-2, lr=3e-3)
    model.pretrain_general()  # the same weights in every process before any sharding
    empty = kind.endswith("-empty")  # "fsdp2-empty": rank 1 probes a batch without targets
    sketch = kind.endswith("-sketch")  # "ddp-sketch": the sketch store (whitened per-head rows)
    kind = kind.removesuffix("-empty").removesuffix("-sketch")
    dm = (NoTargetsOnRankOne if empty else SyntheticTasks)(n_train=8, n_val=8, n_probe=8, batch_size=4)
    fm = FisherMonitor(
        train_task="math",
        reference_tasks=["general"],
        capture_every_n_steps=2,
        max_samples_per_task=32,
        store="sketch" if sketch else "auto",
    )
    qm = QKOVInterferenceMonitor(fm, pairs=[("general", "math")], n_permutations=10)
    # fp32 probe-gradient rows: bf16 rounding of nearly equal fp32 sums could differ by one ulp
    rm = ForgettingRiskMonitor(
        fm, reference_tasks=["general"], warn_threshold=0.5, gradient_dtype=torch.float32
    )
    saving = []
    if ckpt_dir is not None and resume is None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        saving = [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1)]
    last = AtLastStep(fm.memory_ledger)  # what the FisherMonitor keeps between boundaries
    trainer = sharded_fit_trainer(
        kind, 2, [fm, qm, rm, *saving, last], enable_checkpointing=ckpt_dir is not None and resume is None
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm, ckpt_path=resume)
    if trainer.is_global_zero:
        torch.save(
            {
                "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
                "traces": {
                    t: sum(float(f.sum()) for f in fm.collector.fisher(t).values())
                    for t in fm.collector.tasks
                },
                "history": rm.history,
                "ledger": rm.memory_ledger(),
                "fisher_ledger": fm.memory_ledger(),
                "step_ledger": last.value,
                "heatmaps": {  # the last boundary's maps the figures are drawn from
                    pair: {
                        block: {k: res[k] for k in ("layer_head_avg", "fisher_overlap", "conflict_cosine")}
                        for block, res in hm.items()
                    }
                    for pair, hm in qm.latest.items()
                },
                "warnings": [str(w.message) for w in caught if "Monitor" in str(w.message)],
                "all_warnings": [f"{w.filename}:{w.lineno}: {w.message}" for w in caught],
            },
            out,
        )


if __name__ == "__main__":
    main(*sys.argv[1:])

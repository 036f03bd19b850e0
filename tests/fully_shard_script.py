"""Run by tests/test_sharding.py under ``torch.distributed.run`` (2 CPU processes, gloo): a tiny
GPT-2 sharded with torch's own ``fully_shard`` (every block and the root; no Lightning, no
Trainer), trained in a plain loop while the lower-level API watches it: per-sample gradients into a
:class:`~fisher_callbacks.FisherCollector` and an EMA step on every rank's own batch, one
:meth:`~fisher_callbacks.FisherCollector.sync` per step. Rank 0 writes the gathered Fisher and EMA,
the collector's state (whole tensors), its ledger and the batches to argv[1].

Run: ``python -m torch.distributed.run --nproc_per_node 2 tests/fully_shard_script.py OUT``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ddp_run import leave_worker
from tiny_models import lm_batch, tiny_causal_lm

from fisher_callbacks import FisherCollector

STEPS, LR = 3, 0.5


def batches(rank: int) -> list[dict]:
    """Rank ``rank``'s batch of every step (the test rebuilds them for its reference)."""
    ids = torch.arange(4) + 4 * rank
    return [{**lm_batch(batch=4, seed=100 * step + rank), "sample_id": ids} for step in range(STEPS)]


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = tiny_causal_lm("gpt2", seed=0)  # the same weights on every rank (eval: no dropout)
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    collector = FisherCollector(model, store="exact", gradient_memory_mb=64, ema_entries=True, seed=0)
    assert collector.shards.sharded
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for batch in batches(rank):
        ids = batch.pop("sample_id")
        collector.collect(batch, "math", sample_ids=ids)
        collector.update_ema(batch, "math")
        collector.sync()  # every step: what it added is whole until then
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    fisher = collector.fisher("math")  # gathered by the last sync
    ema = collector.fisher_ema("math")  # a collective
    ledger = collector.memory_ledger()
    collector.release_whole()
    state = collector.state_dict(include_store=False)  # a collective: whole tensors
    if rank == 0:
        torch.save(
            {
                "fisher": fisher,
                "ema": ema,
                "ema_trace": collector.fisher_ema_trace("math"),
                "num_samples": collector.num_samples("math"),
                "state": state,
                "ledger": ledger,
                "ledger_released": collector.memory_ledger(),
            },
            out,
        )
    dist.barrier()  # no rank tears the group down while another still works in it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
    leave_worker()

"""Run by tests/test_hf.py under ``torch.distributed.run`` (2 CPU processes, gloo): the HF Trainer
with FisherTrainerCallback. Rank 0 writes the logged history, Fisher traces and warnings to argv[1]."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ddp_run import leave_worker
from test_hf import _args, _callback, _pretrained
from transformers import Trainer

from lightning_examples.synthetic import SyntheticTask, collate


def main(out: str) -> None:
    callback = _callback()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(
            model=_pretrained().model,
            args=_args(Path(out).parent, max_steps=8, per_device_train_batch_size=4),
            train_dataset=SyntheticTask("math", 64),
            eval_dataset=SyntheticTask("math", 8, seed=1),
            data_collator=collate,
            callbacks=[callback],
        )
        trainer.train()
    world = dist.get_world_size() if dist.is_initialized() else 1
    collector = callback.fisher.collector
    if trainer.state.is_world_process_zero:
        torch.save(
            {
                "world": world,
                "history": trainer.state.log_history,
                "forgetting": callback.forgetting.history["general"],
                "traces": {
                    t: sum(float(f.sum()) for f in callback.fisher.collector.fisher(t).values())
                    for t in callback.fisher.collector.tasks
                },
                "samples": {t: collector.num_samples(t) for t in collector.tasks},
                "warnings": [str(w.message) for w in caught if "Monitor" in str(w.message)],
            },
            out,
        )


if __name__ == "__main__":
    main(sys.argv[1])
    leave_worker()

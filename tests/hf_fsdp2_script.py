"""Run by tests/test_hf.py under ``torch.distributed.run`` (2 CPU processes, gloo): the HF Trainer
with FisherTrainerCallback under accelerate's FSDP2 (``fsdp_config={"fsdp_version": 2}``, each
``GPT2Block`` and the root ``fully_shard``-ed) or under DDP, the same seeded fit, with a checkpoint
at step 4. Rank 0 writes the logged history, Fisher traces, forgetting history, the monitors'
state saved with ``checkpoint-4`` and the warnings to OUT.

Run: ``python -m torch.distributed.run --nproc_per_node 2 tests/hf_fsdp2_script.py {ddp|fsdp2} OUT
[CHECKPOINT]``: with ``CHECKPOINT`` (a ``checkpoint-4`` folder of an earlier run of the same kind)
the fit resumes from it, in that run's ``output_dir``.

On CPU accelerate (1.16) never enters FSDP: ``AcceleratorState`` sets ``DistributedType.FSDP`` only
when the processes are on an accelerator (``MULTI_GPU``, ``MULTI_XPU``, ...); with gloo on CPU it
stays ``MULTI_CPU``, drops the Trainer's FSDP plugin and wraps the model in DDP, without a word.
:func:`_fsdp_on_cpu` promotes the state to FSDP after ``Accelerator.__init__``, so that the rest
(``prepare``: ``fully_shard`` per block and on the root, the Trainer's FSDP checkpointing) runs
accelerate's own FSDP2 code, as on GPUs.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ddp_run import leave_worker
from test_hf import _args, _callback, _pretrained
from transformers import Trainer

from fisher_callbacks.hf import STATE_FILE
from lightning_examples.synthetic import SyntheticTask, collate


def _fsdp_on_cpu() -> None:
    """Let accelerate's FSDP2 path run on CPU processes (gloo): see the module's docstring."""
    import accelerate
    from accelerate.utils import DistributedType

    init = accelerate.Accelerator.__init__

    def promoted(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.state.distributed_type == DistributedType.MULTI_CPU:
            self.state.distributed_type = DistributedType.FSDP
            self.state.fsdp_plugin = fsdp_plugin

    accelerate.Accelerator.__init__ = promoted


def main(kind: str, out: str, resume: str | None = None) -> None:
    # fp32 probe-gradient rows: bf16 rounding of nearly equal fp32 sums could differ by one ulp
    callback = _callback(forgetting_options={"gradient_dtype": torch.float32})
    sharding = {}
    if kind == "fsdp2":
        _fsdp_on_cpu()
        sharding = dict(
            fsdp=True,
            fsdp_config={
                "fsdp_version": 2,
                "transformer_layer_cls_to_wrap": ["GPT2Block"],
                # FULL_STATE_DICT: the Trainer's model save at checkpoint-4 aborts here on CPU
                # (gloo: "Received data size doesn't match expected size. Is there a distributed
                # collective mismatch", rank 0 in save_pretrained's tied-weight check on DTensors)
                "state_dict_type": "SHARDED_STATE_DICT",
            },
        )
    root = Path(resume).parent.parent if resume else Path(out).parent
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(
            model=_pretrained().model,
            args=_args(
                root,
                max_steps=8,
                per_device_train_batch_size=4,
                save_strategy="steps",
                save_steps=4,
                **sharding,
            ),
            train_dataset=SyntheticTask("math", 64),
            eval_dataset=SyntheticTask("math", 8, seed=1),
            data_collator=collate,
            callbacks=[callback],
        )
        trainer.train(resume_from_checkpoint=resume)
    world = dist.get_world_size() if dist.is_initialized() else 1
    collector = callback.fisher.collector
    if trainer.state.is_world_process_zero:
        torch.save(
            {
                "world": world,
                "fsdp": trainer.is_fsdp_enabled,
                # the engines watch the Trainer's sharded model: DTensor parameters under FSDP2
                "sharded": any(isinstance(p, DTensor) for p in collector.model.parameters()),
                "same_model": collector.model is trainer.model,
                "history": trainer.state.log_history,
                "forgetting": callback.forgetting.history["general"],
                "traces": {
                    t: sum(float(f.sum()) for f in collector.fisher(t).values()) for t in collector.tasks
                },
                "samples": {t: collector.num_samples(t) for t in collector.tasks},
                # the monitors' state saved with checkpoint-4 (FSDP2: every rank's shards)
                "saved": torch.load(root / "hf" / "checkpoint-4" / STATE_FILE, weights_only=False),
                "warnings": [str(w.message) for w in caught if "Monitor" in str(w.message)],
                "all_warnings": [f"{w.filename}:{w.lineno}: {w.message}" for w in caught],
            },
            out,
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
    leave_worker()

"""Synthetic tasks and a tiny GPT-2 LightningModule: everything the demos and tests need, no downloads.

- "general": counting sequences, ``x_{t+1} = x_t + 1`` over a token range (a skill to keep);
- "math": triples ``a b (a+b) mod K`` repeated (the new task that overwrites it).
Every sample carries its dataset index as ``sample_id`` and its ``task`` name.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import AutoConfig, AutoModelForCausalLM

OFFSET = 3  # tokens 0..2 are reserved (pad, sep, bos)


class SyntheticTask(Dataset):
    """``n`` sequences of one synthetic task, deterministic given ``seed``."""

    def __init__(self, task: str, n: int, seq_len: int = 24, modulus: int = 20, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        if task == "general":
            start = torch.randint(0, modulus, (n, 1), generator=g)
            seqs = (start + torch.arange(seq_len)) % modulus
        elif task == "math":
            n_trip = seq_len // 3
            a = torch.randint(0, modulus, (n, n_trip), generator=g)
            b = torch.randint(0, modulus, (n, n_trip), generator=g)
            seqs = torch.stack([a, b, (a + b) % modulus], dim=-1).reshape(n, -1)
            seqs = torch.nn.functional.pad(seqs, (0, seq_len - seqs.shape[1]), value=-OFFSET)
        else:
            raise ValueError(f"unknown synthetic task {task!r}: 'general' or 'math'")
        self.task = task
        self.input_ids = seqs + OFFSET  # padding (if any) becomes token 0
        self.labels = self.input_ids.masked_fill(self.input_ids == 0, -100)
        self.attention_mask = (self.input_ids != 0).long()

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": self.attention_mask[i],
            "labels": self.labels[i],
            "sample_id": i,
            "task": self.task,
        }


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = (
            torch.stack(values)
            if torch.is_tensor(values[0])
            else (torch.tensor(values) if isinstance(values[0], int) else values)
        )
    return out


class SyntheticTasks(pl.LightningDataModule):
    """Train on ``train_task``; validate on it; probe sets of every task via ``probe_dataloader``."""

    def __init__(
        self,
        train_task: str = "math",
        n_train: int = 512,
        n_val: int = 64,
        n_probe: int = 32,
        seq_len: int = 24,
        modulus: int = 20,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_set = SyntheticTask(train_task, n_train, seq_len, modulus, seed)
        self.val_set = SyntheticTask(train_task, n_val, seq_len, modulus, seed + 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            self.hparams.batch_size,
            shuffle=True,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(self.hparams.seed),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.hparams.batch_size, collate_fn=collate)

    def probe_dataloader(self, task: str) -> DataLoader:
        h = self.hparams
        data = SyntheticTask(task, h.n_probe, h.seq_len, h.modulus, h.seed + 7)
        return DataLoader(data, h.batch_size, collate_fn=collate)


class PhasedTasks(SyntheticTasks):
    """Train on a schedule of tasks, unshuffled batches in order: ``phases = [(task, batches),
    ...]`` (e.g. ``[("math", 6), ("general", 40)]``: forgetting that recovers), or a task
    ``"mixed"``: every batch three quarters "general", one quarter "math" (a task that partly
    shares the reference)."""

    def __init__(self, phases: list[tuple[str, int]], **kwargs: Any) -> None:
        super().__init__(train_task=phases[0][0] if phases[0][0] != "mixed" else "math", **kwargs)
        h = self.hparams
        parts = []
        for k, (task, batches) in enumerate(phases):
            n = batches * h.batch_size
            if task == "mixed":
                by_task = [
                    SyntheticTask(t, n, h.seq_len, h.modulus, h.seed + 10 * k + i)
                    for i, t in enumerate(("general", "math"))
                ]
                parts.append([by_task[1][j // 4] if j % 4 == 3 else by_task[0][j] for j in range(n)])
            else:
                data = SyntheticTask(task, n, h.seq_len, h.modulus, h.seed + 10 * k)
                parts.append([data[j] for j in range(n)])
        self.phased = [item for part in parts for item in part]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.phased, self.hparams.batch_size, shuffle=False, collate_fn=collate)


class TinyGPT(pl.LightningModule):
    """A small causal LM built from a config (GPT-2 by default), pretrained on "general" in ``setup``.

    ``optimizer``: ``"adamw"`` or ``"sgd"`` (momentum 0.9); ``lora_rank > 0`` fine-tunes LoRA
    adapters of that rank (peft) on the attention projections instead of every weight.

    ``model_type``/``hf_config`` build any Hugging Face causal LM instead, e.g. ``model_type="llama"``
    with ``hf_config={"num_hidden_layers": 4, "hidden_size": 128, "num_attention_heads": 8,
    "num_key_value_heads": 2, "intermediate_size": 256}`` (``vocab_size`` is filled in).
    """

    def __init__(
        self,
        n_layer: int = 2,
        n_head: int = 4,
        n_embd: int = 64,
        vocab_size: int = 32,
        n_positions: int = 32,
        lr: float = 3e-3,
        pretrain_steps: int = 150,
        pretrain_lr: float = 3e-3,
        seq_len: int = 24,
        modulus: int = 20,
        seed: int = 0,
        model_type: str = "gpt2",
        hf_config: dict | None = None,
        optimizer: str = "adamw",
        lora_rank: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        if model_type == "gpt2" and not hf_config:
            config = AutoConfig.for_model(
                "gpt2",
                n_layer=n_layer,
                n_head=n_head,
                n_embd=n_embd,
                vocab_size=vocab_size,
                n_positions=n_positions,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                bos_token_id=2,
                eos_token_id=2,
            )
        else:
            base = {"vocab_size": vocab_size, "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 0}
            config = AutoConfig.for_model(model_type, **{**base, **(hf_config or {})})
        self.model = AutoModelForCausalLM.from_config(config)
        if getattr(self.model, "loss_type", None) is None:
            # GPT2LMHeadModel's class name matches no loss family of transformers, which then
            # warns on every first forward; name the (default) causal-LM loss explicitly.
            self.model.loss_type = "ForCausalLM"
        self._pretrained = pretrain_steps == 0

    def pretrain_general(self) -> None:
        """A plain torch loop on the "general" task: the skill fine-tuning will erode."""
        h = self.hparams
        data = SyntheticTask("general", 256, h.seq_len, h.modulus, seed=h.seed + 100)
        opt = torch.optim.AdamW(self.model.parameters(), lr=h.pretrain_lr)
        g = torch.Generator().manual_seed(h.seed)
        self.model.train()
        for _ in range(h.pretrain_steps):
            idx = torch.randint(0, len(data), (32,), generator=g)
            batch = collate([data[i] for i in idx.tolist()])
            loss = self.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
            ).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        self._pretrained = True

    def setup(self, stage: str) -> None:
        if stage == "fit" and not self._pretrained:
            self.pretrain_general()
        if stage == "fit" and self.hparams.lora_rank and not hasattr(self.model, "peft_config"):
            import peft  # the optional extra

            target = ["c_attn"] if self.hparams.model_type == "gpt2" else ["q_proj", "v_proj"]
            config = peft.LoraConfig(
                r=self.hparams.lora_rank,
                lora_alpha=2 * self.hparams.lora_rank,
                lora_dropout=0.0,
                target_modules=target,
                fan_in_fan_out=self.hparams.model_type == "gpt2",
            )
            self.model = peft.get_peft_model(self.model, config)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch, batch_idx):
        loss = self(batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self(batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.hparams.lr, momentum=0.9)
        return torch.optim.AdamW(params, lr=self.hparams.lr)


class ShardedGPT(TinyGPT):
    """:class:`TinyGPT` whose GPT-2 blocks and root are wrapped by ``fully_shard`` (FSDP2) under
    Lightning's ``ModelParallelStrategy``; unsharded under any other strategy."""

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


def sharded_fit_trainer(kind: str, world: int, callbacks: list[pl.Callback], **overrides: Any) -> pl.Trainer:
    """A Trainer for a short CPU fit on ``world`` gloo processes, under DDP (``kind`` ``"ddp"``)
    or FSDP2 (``"fsdp2"``: ``ModelParallelStrategy``, for a module whose ``configure_model``
    shards it, such as :class:`ShardedGPT`): 4 steps, validation every 2 on one batch, no
    logger, progress bar, summary, sanity check or checkpoint unless ``overrides`` say
    otherwise."""
    if kind == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy: Any = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    elif kind == "ddp":
        strategy = "ddp"
    else:
        raise ValueError(f"kind must be 'ddp' or 'fsdp2', got {kind!r}")
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=world,
        strategy=strategy,
        max_steps=4,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    return pl.Trainer(**{**kwargs, **overrides})


class AtLastStep(pl.Callback):
    """``value = read()`` after the last training step, before its validation: what the monitors
    keep between boundaries (e.g. their memory ledger)."""

    def __init__(self, read: Any) -> None:
        self.read, self.value = read, None

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == trainer.max_steps:
            self.value = self.read()

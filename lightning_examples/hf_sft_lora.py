"""The suite on TRL's ``SFTTrainer`` with a LoRA adapter: a tiny Llama built from a config, no downloads.

A 2-layer Llama (grouped-query attention) is pretrained for a few seconds on counting text
("general"), then fine-tuned with ``trl.SFTTrainer`` and a peft LoRA adapter on modular-addition
text ("math"), with :class:`~fisher_callbacks.hf.FisherTrainerCallback` attached: Fisher capture
every 5 steps, the QK-OV map of "general" vs "math" and the forgetting of "general" at every
evaluation. The tokenizer is a word-level ``PreTrainedTokenizerFast`` built in code. About a minute
on 2 CPU cores.

Run: ``python lightning_examples/hf_sft_lora.py [--steps 30] [--out runs/hf_sft_lora]``
(``pip install 'fisher_callbacks[trl]'``). Figures land under ``{out}/fisher_callbacks/figures``;
``{out}/summary.json`` has the forgetting history.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fisher_callbacks.hf import FisherTrainerCallback
from lightning_examples.synthetic import OFFSET, SyntheticTask

MODULUS = 20


def tokenizer():
    """A word-level tokenizer over the synthetic tokens (``<pad>``, ``<eos>``, ``<bos>``, ``0`` ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{str(i): i + OFFSET for i in range(MODULUS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )


def texts(task: str, n: int, seed: int) -> list[str]:
    """``n`` samples of a synthetic task as text (``"3 4 7 10 11 1 ..."``)."""
    data = SyntheticTask(task, n, seq_len=24, modulus=MODULUS, seed=seed)
    return [" ".join(str(int(t) - OFFSET) for t in ids if t != 0) for ids in data.input_ids]


def tiny_llama(vocab_size: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def batches(tok, lines: list[str], batch_size: int = 8) -> DataLoader:
    """Probe batches ``{input_ids, attention_mask, labels}`` (padding left out of the loss)."""

    def collate(chunk: list[str]) -> dict[str, Any]:
        enc = tok(chunk, padding=True, return_tensors="pt")
        enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return dict(enc)

    return DataLoader(lines, batch_size=batch_size, collate_fn=collate)


def pretrain(model, tok, steps: int = 60) -> None:
    """A plain loop on "general": the skill the fine-tuning will erode."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = batches(tok, texts("general", 256, seed=100), batch_size=32)
    model.train()
    done = 0
    while done < steps:
        for batch in loader:
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                return


def main(
    steps: int = 30, out: str = "runs/hf_sft_lora", lr: float = 3e-3, report_to: list[str] | None = None
):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    tok = tokenizer()
    model = tiny_llama(len(tok))
    pretrain(model, tok)
    callback = FisherTrainerCallback(
        train_task="math",
        reference_tasks={"general": batches(tok, texts("general", 16, seed=7))},
        capture_every_n_steps=5,
        pairs=[("general", "math")],
        warn_threshold=0.5,
        max_samples_per_task=32,
        qkov_options={"n_permutations": 50},
    )
    args = SFTConfig(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=lr,
        lr_scheduler_type="constant",
        eval_strategy="steps",
        eval_steps=10,
        logging_steps=5,
        save_strategy="no",
        report_to=report_to or [],
        use_cpu=True,
        max_length=32,
        dataset_text_field="text",
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"text": texts("math", 128, seed=0)}),
        eval_dataset=Dataset.from_dict({"text": texts("math", 16, seed=1)}),
        processing_class=tok,
        peft_config=LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj"]
        ),
        callbacks=[callback],
    )
    trainer.train()
    history = callback.forgetting.history["general"]
    summary = {
        "steps": history["step"],
        "measured": history["measured"],
        "predicted": history["predicted"],
        "alerts": [{k: a[k] for k in ("step", "source")} for a in callback.forgetting.alerts],
        "figures": str(Path(out) / "fisher_callbacks" / "figures"),
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return trainer, callback


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="runs/hf_sft_lora")
    parser.add_argument("--lr", type=float, default=3e-3)
    ns = parser.parse_args()
    main(ns.steps, ns.out, ns.lr)

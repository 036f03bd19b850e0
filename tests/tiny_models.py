"""Tiny models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

VOCAB = 61

# model_type -> config overrides (2 layers, 4 query heads, head_dim 8 unless noted)
CAUSAL = {
    "gpt2": dict(n_layer=2, n_head=4, n_embd=32, n_positions=32),
    "gpt_neox": dict(
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=32,
        rotary_pct=0.5,
    ),
    "llama": dict(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=32,
    ),
    "llama_mqa": dict(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=32,
    ),
    "mistral": dict(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=32,
    ),
    "qwen2": dict(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=32,
    ),
    "gemma": dict(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        hidden_size=32,
        intermediate_size=64,
        head_dim=12,
        max_position_embeddings=32,
    ),
    "phi3": dict(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=32,
        pad_token_id=0,
    ),
    "falcon_mqa": dict(
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_size=32,
        multi_query=True,
        new_decoder_architecture=False,
        alibi=False,
        parallel_attn=True,
        bias=False,
    ),
    "falcon_new": dict(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        hidden_size=32,
        new_decoder_architecture=True,
        alibi=False,
        parallel_attn=True,
        bias=False,
    ),
    "falcon_mha": dict(
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_size=32,
        multi_query=False,
        new_decoder_architecture=False,
        alibi=False,
        parallel_attn=False,
        bias=True,
    ),
    "opt": dict(
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_size=32,
        ffn_dim=64,
        word_embed_proj_dim=32,
        max_position_embeddings=32,
        pad_token_id=1,
    ),
    "phi": dict(
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=32,
        partial_rotary_factor=0.5,
    ),
    "gpt_neo": dict(
        num_layers=2,
        attention_types=[[["global", "local"], 1]],
        num_heads=4,
        hidden_size=32,
        max_position_embeddings=32,
        window_size=8,
    ),
    "gptj": dict(n_layer=2, n_head=4, n_embd=32, n_positions=32, rotary_dim=4),
}
ENCODER = {
    "bert": dict(
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=32,
    ),
    "roberta": dict(
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=40,
        pad_token_id=1,
    ),
}
NO_DROPOUT = dict(
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    attention_dropout=0.0,
    hidden_dropout=0.0,
    dropout=0.0,
    attention_dropout_prob=0.0,
)


def _config(name: str, table: dict, **extra):
    model_type = name.split("_mqa")[0].split("_new")[0].split("_mha")[0]
    if name.startswith("falcon"):
        model_type = "falcon"
    kwargs = {**table[name], **NO_DROPOUT, **extra}
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **kwargs)
    config._attn_implementation = "eager"
    return config


def tiny_causal_lm(name: str, seed: int = 0, **extra) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(name, CAUSAL, **extra))
    return model.float().eval()


def tiny_masked_lm(name: str = "bert", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForMaskedLM.from_config(_config(name, ENCODER)).float().eval()


def tiny_classifier(name: str = "bert", num_labels: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = _config(name, ENCODER, num_labels=num_labels)
    return AutoModelForSequenceClassification.from_config(config).float().eval()


def lm_batch(batch: int = 4, seq: int = 10, seed: int = 0, pad_last: int = 3) -> dict:
    """Causal-LM batch with right padding on some rows and a few ``-100`` labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(batch):
        n_pad = (b * pad_last) % max(seq - 3, 1)
        if n_pad:
            mask[b, seq - n_pad :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}

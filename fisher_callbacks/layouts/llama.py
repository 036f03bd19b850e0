"""Llama-like decoders: separate ``q/k/v/o_proj`` Linears, grouped-query attention.

Covers Llama, Mistral, Mixtral, Qwen2/3, Gemma 1/2 (``head_dim`` may differ from
``hidden / heads``: it is read off the weights) and Phi-3 (fused ``qkv_proj`` ``[Q | K | V]``).
"""

from __future__ import annotations

from torch import nn

from ._hf import layout_from_attention_modules, num_heads_of
from .base import AttentionLayout, register_layout

LLAMA_LIKE = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2")


def llama_layout(model: nn.Module) -> AttentionLayout:
    heads, kv = num_heads_of(model.config)
    return layout_from_attention_modules(
        model,
        r"layers\.(\d+)\.self_attn",
        {"Q": "q_proj", "K": "k_proj", "V": "v_proj", "O": "o_proj"},
        num_heads=heads,
        num_kv_heads=kv,
    )


for _model_type in LLAMA_LIKE:
    register_layout(_model_type, llama_layout)


@register_layout("phi3")
def phi3_layout(model: nn.Module) -> AttentionLayout:
    heads, kv = num_heads_of(model.config)
    return layout_from_attention_modules(
        model,
        r"layers\.(\d+)\.self_attn",
        {"Q": "qkv_proj", "K": "qkv_proj", "V": "qkv_proj", "O": "o_proj"},
        num_heads=heads,
        num_kv_heads=kv,
        fused="concat",
    )

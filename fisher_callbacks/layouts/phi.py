"""Phi-1/1.5/2: ``self_attn.{q,k,v}_proj`` and ``self_attn.dense`` (GQA-capable)."""

from __future__ import annotations

from torch import nn

from ._hf import layout_from_attention_modules, num_heads_of
from .base import AttentionLayout, register_layout


@register_layout("phi")
def phi_layout(model: nn.Module) -> AttentionLayout:
    heads, kv = num_heads_of(model.config)
    return layout_from_attention_modules(
        model,
        r"layers\.(\d+)\.self_attn",
        {"Q": "q_proj", "K": "k_proj", "V": "v_proj", "O": "dense"},
        num_heads=heads,
        num_kv_heads=kv,
    )

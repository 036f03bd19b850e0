"""GPT-NeoX / Pythia: fused ``query_key_value`` Linear, Q/K/V interleaved per head ``[H, 3, d]``."""

from __future__ import annotations

from torch import nn

from ._hf import layout_from_attention_modules, num_heads_of
from .base import AttentionLayout, register_layout


@register_layout("gpt_neox")
def gpt_neox_layout(model: nn.Module) -> AttentionLayout:
    heads, _ = num_heads_of(model.config)
    qkv = "query_key_value"
    return layout_from_attention_modules(
        model,
        r"layers\.(\d+)\.attention",
        {"Q": qkv, "K": qkv, "V": qkv, "O": "dense"},
        num_heads=heads,
        fused="interleaved",
    )

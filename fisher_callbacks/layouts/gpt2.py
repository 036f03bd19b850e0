"""GPT-2: fused ``Conv1D`` ``c_attn`` (weight ``[in, 3*hidden]`` = ``[Q | K | V]`` columns)."""

from __future__ import annotations

from torch import nn

from ._hf import layout_from_attention_modules, num_heads_of
from .base import AttentionLayout, register_layout


@register_layout("gpt2")
def gpt2_layout(model: nn.Module) -> AttentionLayout:
    heads, _ = num_heads_of(model.config)
    return layout_from_attention_modules(
        model,
        r"h\.(\d+)\.attn",
        {"Q": "c_attn", "K": "c_attn", "V": "c_attn", "O": "c_proj"},
        num_heads=heads,
        fused="concat",
    )

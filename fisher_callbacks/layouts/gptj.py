"""GPT-J: ``attn.{q,k,v,out}_proj``."""

from __future__ import annotations

from torch import nn

from ._hf import layout_from_attention_modules, num_heads_of
from .base import AttentionLayout, register_layout


@register_layout("gptj")
def gptj_layout(model: nn.Module) -> AttentionLayout:
    heads, _ = num_heads_of(model.config)
    return layout_from_attention_modules(
        model,
        r"h\.(\d+)\.attn",
        {"Q": "q_proj", "K": "k_proj", "V": "v_proj", "O": "out_proj"},
        num_heads=heads,
    )

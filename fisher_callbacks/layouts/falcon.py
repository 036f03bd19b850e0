"""Falcon: fused ``query_key_value`` in three layouts.

- new decoder architecture (Falcon-40B/180B): per KV group ``[H/KV query heads, key, value]``;
- multi-query (Falcon-7B): ``[Q (H*d) | K (d) | V (d)]``, one KV head;
- neither: per head ``[q, k, v]`` like GPT-NeoX.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from ._hf import layout_from_attention_modules
from .base import AttentionLayout, grouped_qkv_heads, register_layout


@register_layout("falcon")
def falcon_layout(model: nn.Module) -> AttentionLayout:
    config = model.config
    heads = int(config.num_attention_heads)
    if config.new_decoder_architecture:
        kv, fused = int(config.num_kv_heads), None
    elif config.multi_query:
        kv, fused = 1, "concat"
    else:
        kv, fused = heads, "interleaved"
    qkv = "query_key_value"
    names = {"Q": qkv, "K": qkv, "V": qkv, "O": "dense"}
    if fused is not None:
        return layout_from_attention_modules(
            model, r"h\.(\d+)\.self_attention", names, num_heads=heads, num_kv_heads=kv, fused=fused
        )
    # Grouped: build with separate-projection defaults, then swap in the grouped index maps.
    layout = layout_from_attention_modules(
        model, r"h\.(\d+)\.self_attention", names, num_heads=heads, num_kv_heads=kv, fused="concat"
    )
    index = grouped_qkv_heads(heads, kv, layout.head_dim)
    layers = [
        {b: replace(s, index=index[b]) if b in index and s is not None else s for b, s in specs.items()}
        for specs in layout.layers
    ]
    return replace(layout, layers=layers)

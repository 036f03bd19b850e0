"""Shared helper for Hugging Face families: projections found by regex, head counts from config."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from .base import AttentionLayout, find_layer_modules


def num_heads_of(config) -> tuple[int, int]:
    """``(num_attention_heads, num_key_value_heads)`` of a Hugging Face config."""
    heads = int(config.num_attention_heads)
    kv = getattr(config, "num_key_value_heads", None) or heads
    return heads, int(kv)


def layout_from_attention_modules(
    model: nn.Module,
    attention: str,
    projections: Mapping[str, str],
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    fused: str | None = None,
) -> AttentionLayout:
    """Layout from the attention module regex and the Q/K/V/O projection names inside it.

    Args:
        model: the Hugging Face model (names are relative to it).
        attention: regex of an attention module's name; group 1 is the layer index
            (e.g. ``r"h\\.(\\d+)\\.attn"``).
        projections: ``{"Q": "q_proj", ...}``: submodule paths inside the attention module.
    """
    config = getattr(model, "config", None)
    n_layers = getattr(config, "num_hidden_layers", None)
    attn_names = find_layer_modules(model, attention, n_layers)
    layers = [{b: f"{a}.{projections[b]}" for b in ("Q", "K", "V", "O")} for a in attn_names]
    return AttentionLayout.from_projections(
        model, layers, num_heads=num_heads, num_kv_heads=num_kv_heads, fused=fused
    )

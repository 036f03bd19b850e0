"""Attention layouts: where each head lives in the Q/K/V/O weights, one module per family."""

from . import bert, falcon, gemma, gpt2, gpt_neo, gpt_neox, gptj, llama, opt, phi  # noqa: F401  (register)
from .base import (
    BLOCKS,
    AttentionLayout,
    BlockSpec,
    LayoutError,
    QKOVConfig,
    canonical_name,
    concat_qkv_heads,
    contiguous_heads,
    find_layer_modules,
    grouped_qkv_heads,
    interleaved_qkv_heads,
    register_layout,
    registered_layouts,
)

__all__ = [
    "BLOCKS",
    "AttentionLayout",
    "BlockSpec",
    "LayoutError",
    "QKOVConfig",
    "canonical_name",
    "concat_qkv_heads",
    "contiguous_heads",
    "find_layer_modules",
    "grouped_qkv_heads",
    "interleaved_qkv_heads",
    "register_layout",
    "registered_layouts",
]

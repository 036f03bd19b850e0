"""Gemma 3 text decoders (``gemma3_text``): Llama-like attention.

Separate ``q/k/v/o_proj`` Linears with grouped-query attention and ``head_dim`` independent of
``hidden / heads`` (Gemma 3 270M: 4 query heads, 1 KV head, head_dim 256, hidden 640). The extra
per-head ``q_norm``/``k_norm`` RMSNorms act after the projections and are not head-split weights.
The multimodal ``gemma3`` wrapper is found through its text tower, whose config is ``gemma3_text``.
"""

from __future__ import annotations

from .base import register_layout
from .llama import llama_layout

register_layout("gemma3_text", llama_layout)

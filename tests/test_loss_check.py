"""fisher_callbacks.loss_check: the factor and residual of a training loss against the assumed one."""

from __future__ import annotations

import math

import torch

from fisher_callbacks.loss_check import LossCheck, loss_factor
from fisher_callbacks.losses import reduction_scale
from tests.tiny_models import lm_batch, tiny_causal_lm


def test_loss_factor_of_a_multiple_and_of_an_added_term():
    a = torch.randn(4, 6, 10, dtype=torch.float64)
    c, r = loss_factor(0.25 * a, a)
    assert math.isclose(c, 0.25, rel_tol=1e-12) and r < 1e-12
    other = torch.randn_like(a)
    other -= (other * a).sum() / (a * a).sum() * a  # orthogonal to a
    c, r = loss_factor(a + other, a)
    expected = (other.norm() / (a + other).norm()).item()
    assert math.isclose(c, 1.0, rel_tol=1e-12) and math.isclose(r, expected, rel_tol=1e-9)
    assert all(math.isnan(v) for v in loss_factor(a, torch.zeros_like(a)))


def test_loss_check_measures_the_weight_of_a_hugging_face_loss_in_chunks():
    model = tiny_causal_lm("gpt2")
    batch = lm_batch()
    scale = reduction_scale(batch["labels"], "causal_lm", "token_mean")
    got = []
    check = LossCheck(
        model, batch["labels"], "causal_lm", scale, lambda c, r: got.append((c, r)), chunk_bytes=1
    )
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    (3.0 * out.loss).backward()
    check.remove()
    ((c, r),) = got
    assert math.isclose(c, 3.0, rel_tol=1e-5) and r < 1e-5

"""Slow, obviously-correct references: the micro-batch-1 loop."""

from __future__ import annotations

import torch

from fisher_callbacks.losses import infer_loss_type, per_sample_losses


def microbatch_gradients(model, batch, names, loss_type=None, trim=False):
    """``{name: [B, *shape]}``: each sample run alone, gradient of its own mean loss."""
    loss_type = loss_type or infer_loss_type(model)
    params = dict(model.named_parameters())
    out = {n: [] for n in names}
    for i in range(batch["labels"].shape[0]):
        one = {k: v[i : i + 1] for k, v in batch.items() if torch.is_tensor(v)}
        if trim and "attention_mask" in one:
            n_real = int(one["attention_mask"].sum())
            one = {k: v[:, :n_real] for k, v in one.items()}
        loss = per_sample_losses(model, one, loss_type).sum()
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        for n, g in zip(names, grads):
            out[n].append(g)
    return {n: torch.stack(v) for n, v in out.items()}


def max_rel_error(a: dict, b: dict) -> float:
    return max(((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-30)).item() for n in b)


def assert_close_rel(actual, expected, rtol: float = 1e-5, **kwargs) -> None:
    """Float comparison that holds across CPUs and BLAS builds.

    Two fp32 computations of the same quantity in different summation orders (another chunking,
    another kernel, another thread count) differ by about ``eps * sum_k |terms|``, which for a
    value near zero is large against the value itself: the absolute tolerance is therefore scaled
    by the magnitude of the compared tensor (``rtol * max |expected|``) instead of a fixed 1e-5.
    """
    expected = torch.as_tensor(expected)
    actual = torch.as_tensor(actual)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=rtol * scale, **kwargs)

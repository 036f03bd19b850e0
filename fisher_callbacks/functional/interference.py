"""QK-OV interference kernels: per-head scores of sample pairs and per-head task maps.

Pure tensor functions (no collector, no model, no state);
:class:`fisher_callbacks.interference.QKOVInterferenceMetric` feeds them head views ``[n, H, k]`` of
stored per-sample gradients, where ``H`` is the number of heads of a block (``num_kv_heads`` for K
and V) and ``k`` the number of weight entries of one head's slice (``AttentionLayout.head_view``).

Definitions (DESIGN section 2). ``g_i`` is sample i's gradient of its own mean loss (task A),
``g_j`` sample j's (task B), ``C_i = g_i ** 2``, ``I`` a contribution Fisher (task A's, or pooled
``(I_A + I_B) / 2``) and, for every entry k of a head's slice,

    ``D_k = 1 / (max(I_k, eps) + lambda)``   (:func:`inverse_fisher`; eps = 1e-10, lambda = 1e-8)

* directional (main): ``M_ij = sum_k C_ik D_k |g_jk|``  = ``(g_i**2 * D) @ |g_j|``
* signed:             ``S_ij = sum_k g_ik D_k g_jk``     = ``(g_i * D) @ g_j`` (negative = conflict)
* symmetric:          ``Y_ij = sum_k |g_ik| D_k |g_jk|`` = ``(|g_i| * D) @ |g_j|``

Each is one batched matmul over heads (``[H, n_i, k] @ [H, k, n_j]``), chunked over samples.

Scaling: with the loss multiplied by ``c`` (all g and I scale by ``c`` and ``c**2``) and
``eps + lambda`` negligible against I, ``C / I`` is unchanged, M scales by ``|c|`` and S, Y are
unchanged.

The averaging trap: when I is task A's Fisher over the same samples i (``I = mean_i C_i``),

    ``mean_i M_ij = sum_k I_k D_k |g_jk|``     (:func:`directional_mean_over_a`)

which no longer depends on task A beyond ``I_k D_k ~ 1`` on entries where ``I_k >> eps + lambda``
(0 where ``I_k = 0``): a mean of M over task-A samples is essentially the size of task B's gradient.
The head maps where both tasks count are :func:`conflict_cosine` (Fisher-metric cosine of the task
mean gradients) and the Fisher overlap
(:func:`fisher_callbacks.functional.fisher_ops.fisher_overlap_tensor`).

All computations are fp32 on the device of the inputs (bf16/fp16 inputs are cast first).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fisher_callbacks._validate import check_choice
from fisher_callbacks.functional.fisher_ops import ACCUM_DTYPE

__all__ = [
    "VARIANTS",
    "block_head_scores",
    "check_variant",
    "conflict_cosine",
    "directional_mean_over_a",
    "inverse_fisher",
    "pooled_fisher",
    "score_operands",
    "whiten",
]

VARIANTS: tuple[str, ...] = ("directional", "signed", "symmetric")
"""Interference variants accepted by :func:`block_head_scores`."""

DEFAULT_MAX_CHUNK_ELEMENTS = 2**24
"""Default bound on the elements of one chunk's operands (64 MiB in fp32)."""


def check_variant(variant: str) -> str:
    """Return ``variant`` if it is one of :data:`VARIANTS`, else raise ``ValueError``."""
    return check_choice("variant", variant, VARIANTS)


def inverse_fisher(fisher: Tensor, epsilon: float = 1e-10, ridge_lambda: float = 1e-8) -> Tensor:
    """Fisher metric weights ``D = 1 / (max(I, epsilon) + ridge_lambda)``, elementwise, fp32.

    Args:
        fisher: ``[...]`` diagonal Fisher ``I`` (any float dtype, entries >= 0).
        epsilon: floor of ``I`` (rescues zero entries).
        ridge_lambda: ridge added after the floor.

    Returns:
        ``[...]`` fp32 ``D`` (finite whenever ``epsilon + ridge_lambda > 0``).
    """
    return 1.0 / (fisher.detach().to(ACCUM_DTYPE).clamp_min(epsilon) + ridge_lambda)


def pooled_fisher(fisher_a: Tensor, fisher_b: Tensor) -> Tensor:
    """``(I_A + I_B) / 2`` in fp32 (shapes must agree)."""
    if fisher_a.shape != fisher_b.shape:
        raise ValueError(
            f"Fisher shapes differ: {tuple(fisher_a.shape)} (task A), {tuple(fisher_b.shape)} (B)"
        )
    return 0.5 * (fisher_a.detach().to(ACCUM_DTYPE) + fisher_b.detach().to(ACCUM_DTYPE))


def whiten(grads: Tensor, inv_fisher: Tensor) -> Tensor:
    """Fisher-whitened gradients ``g * sqrt(D)`` (so ``<whiten(g_i), whiten(g_j)> = g_i.D.g_j``).

    Args:
        grads: ``[..., H, k]`` gradients.
        inv_fisher: ``[H, k]`` (broadcastable) ``D`` from :func:`inverse_fisher`.

    Returns:
        ``[..., H, k]`` fp32.
    """
    return grads.detach().to(ACCUM_DTYPE) * inv_fisher.to(ACCUM_DTYPE).sqrt()


def score_operands(g_a: Tensor, g_b: Tensor, inv_fisher: Tensor, variant: str) -> tuple[Tensor, Tensor]:
    """Left and right operands of a variant: ``score[i, j, h] = sum_k left[i,h,k] * right[j,h,k]``.

    * directional: ``left = g_a**2 * D``, ``right = |g_b|``
    * signed:      ``left = g_a * D``,    ``right = g_b``
    * symmetric:   ``left = |g_a| * D``,  ``right = |g_b|``

    Args:
        g_a: ``[n_i, H, k]`` signed task-A gradients (any float dtype).
        g_b: ``[n_j, H, k]`` signed task-B gradients.
        inv_fisher: ``[H, k]`` ``D``.
        variant: one of :data:`VARIANTS`.

    Returns:
        ``(left [n_i, H, k], right [n_j, H, k])``, fp32.
    """
    check_variant(variant)
    a = g_a.detach().to(ACCUM_DTYPE)
    b = g_b.detach().to(ACCUM_DTYPE)
    d = inv_fisher.detach().to(ACCUM_DTYPE)
    if variant == "directional":
        return a.square().mul_(d), b.abs()  # square() is a fresh tensor: in-place is safe
    if variant == "signed":
        return a * d, b
    return a.abs().mul_(d), b.abs()


def _check_head_shapes(g_a: Tensor, g_b: Tensor, inv_fisher: Tensor) -> None:
    if g_a.dim() != 3 or g_b.dim() != 3 or inv_fisher.dim() != 2:
        raise ValueError(
            "expected g_a [n_i, H, k], g_b [n_j, H, k] and inv_fisher [H, k]; got "
            f"{tuple(g_a.shape)}, {tuple(g_b.shape)}, {tuple(inv_fisher.shape)}"
        )
    if not (g_a.shape[1:] == g_b.shape[1:] == inv_fisher.shape):
        raise ValueError(
            "head views disagree on [H, k]: "
            f"g_a {tuple(g_a.shape)}, g_b {tuple(g_b.shape)}, inv_fisher {tuple(inv_fisher.shape)}"
        )


def block_head_scores(
    g_a: Tensor,
    g_b: Tensor,
    inv_fisher: Tensor,
    variant: str = "directional",
    *,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> Tensor:
    """Interference scores of every (i, j) pair for every head of one block: ``[n_i, n_j, H]``.

    One batched matmul over heads per chunk: ``left[H, c_i, k] @ right[H, k, c_j]`` with the
    operands of :func:`score_operands`; samples are chunked so that no chunk operand or output
    holds more than ``max_chunk_elements`` elements (at least one sample per chunk).

    Args:
        g_a: ``[n_i, H, k]`` signed per-sample gradients of task A over each head's slice (C_i is
            derived as ``g_a ** 2``).
        g_b: ``[n_j, H, k]`` signed per-sample gradients of task B.
        inv_fisher: ``[H, k]`` ``D = 1 / (max(I, eps) + lambda)`` (:func:`inverse_fisher`).
        variant: ``"directional"`` (``sum_k C_ik D_k |g_jk|``), ``"signed"``
            (``sum_k g_ik D_k g_jk``) or ``"symmetric"`` (``sum_k |g_ik| D_k |g_jk|``).
        max_chunk_elements: memory bound per chunk (elements).

    Returns:
        ``[n_i, n_j, H]`` fp32 on the device of ``g_a`` (empty sides give an empty tensor).

    Raises:
        ValueError: shapes that disagree on ``[H, k]`` or an unknown variant.
    """
    check_variant(variant)
    _check_head_shapes(g_a, g_b, inv_fisher)
    n_i, heads, k = g_a.shape
    n_j = g_b.shape[0]
    out = torch.zeros(n_i, n_j, heads, dtype=ACCUM_DTYPE, device=g_a.device)
    if n_i == 0 or n_j == 0 or heads == 0:
        return out
    per_sample = max(heads * k, 1)
    c_j = max(1, min(n_j, max_chunk_elements // per_sample))
    c_i = max(1, min(n_i, max_chunk_elements // per_sample, max_chunk_elements // (c_j * heads)))
    d = inv_fisher.to(g_a.device)
    for j0 in range(0, n_j, c_j):
        j1 = min(j0 + c_j, n_j)
        for i0 in range(0, n_i, c_i):
            i1 = min(i0 + c_i, n_i)
            left, right = score_operands(g_a[i0:i1], g_b[j0:j1].to(g_a.device), d, variant)
            # [H, c_i, k] @ [H, k, c_j] -> [H, c_i, c_j] -> [c_i, c_j, H]
            prod = torch.bmm(left.transpose(0, 1), right.permute(1, 2, 0))
            out[i0:i1, j0:j1] = prod.permute(1, 2, 0)
    return out


def conflict_cosine(ga_mean: Tensor, gb_mean: Tensor, inv_fisher: Tensor) -> Tensor:
    """Fisher-metric cosine of the task mean gradients per head (negative = conflict).

    ``cos_F = gA.D.gB / (|gA|_D |gB|_D)`` with ``|g|_D = sqrt(g.D.g)``, summed over the last dim
    (a head's slice entries). A head where either mean gradient has zero D-norm gets 0 (no NaN).

    Args:
        ga_mean: ``[..., H, k]`` mean gradient of task A (fp32 recommended; cast anyway).
        gb_mean: ``[..., H, k]`` mean gradient of task B.
        inv_fisher: ``[..., H, k]`` (broadcastable) ``D``, normally from the pooled Fisher.

    Returns:
        ``[..., H]`` fp32 in ``[-1, 1]``.
    """
    a = ga_mean.detach().to(ACCUM_DTYPE)
    b = gb_mean.detach().to(ACCUM_DTYPE)
    d = inv_fisher.detach().to(ACCUM_DTYPE)
    dot = (a * d * b).sum(-1)
    norm = torch.sqrt((a.square() * d).sum(-1) * (b.square() * d).sum(-1))
    ok = norm > 0
    return torch.where(ok, dot / torch.where(ok, norm, torch.ones_like(norm)), 0.0).clamp(-1, 1)


def directional_mean_over_a(fisher_a: Tensor, g_b: Tensor, inv_fisher: Tensor) -> Tensor:
    """Closed form of ``mean_i M_ij`` when ``I = fisher_a = mean_i C_i`` (the averaging trap).

    ``mean_i sum_k C_ik D_k |g_jk| = sum_k I_k D_k |g_jk|``: only task B's gradient and the weights
    ``I_k D_k`` (about 1 where ``I_k >> eps + lambda``, 0 where ``I_k = 0``) remain.

    Args:
        fisher_a: ``[H, k]`` task A's contribution Fisher over the same samples i.
        g_b: ``[n_j, H, k]`` task-B gradients.
        inv_fisher: ``[H, k]`` ``D`` computed from ``fisher_a``.

    Returns:
        ``[n_j, H]`` fp32.
    """
    w = fisher_a.detach().to(ACCUM_DTYPE) * inv_fisher.detach().to(ACCUM_DTYPE)  # [H, k]
    return (g_b.detach().to(ACCUM_DTYPE).abs() * w).sum(-1)

"""Statistics for cross-task conflict: a permutation null, FDR control and an effect size.

The QK-OV monitor asks, for every (layer, head, block) cell, whether the gradients of task A and task
B point against each other more than chance allows. This module answers that question for many cells
at once and knows nothing about models:

* :func:`permutation_conflict_test` takes per-sample feature vectors of both tasks for ``T``
  independent tests (the caller flattens layer x head x block and whitens the slice gradients by
  ``sqrt(D)``), and returns a one-sided permutation p-value and an effect size per test;
* :func:`benjamini_yekutieli` / :func:`benjamini_hochberg` (via :func:`fdr_correct`) turn the
  p-values of all tests into q-values;
* :func:`conflict_significance` combines both: a conflict is reported only when its q-value is at
  most ``alpha`` *and* its effect size reaches ``min_effect_size``.

All functions are pure and vectorised; they run on the device of their inputs and compute in
float64.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "FDR_METHODS",
    "ConflictTestResult",
    "benjamini_hochberg",
    "benjamini_yekutieli",
    "conflict_significance",
    "fdr_correct",
    "permutation_conflict_test",
]

FDR_METHODS: tuple[str, ...] = ("by", "bh")
"""Names accepted by :func:`fdr_correct`: Benjamini-Yekutieli (default) and Benjamini-Hochberg."""

_STATISTICS: tuple[str, ...] = ("cosine", "dot")

# A task mean vector whose squared norm is at most this fraction of the mean squared norm of the
# pooled samples counts as zero (float64 round-off of the Gram quadratic forms is ~1e-16 of it).
_REL_ZERO = 1e-12
# Ties between a permuted and the observed statistic are counted up to this (relative) tolerance, so
# that a permutation reproducing the observed split always counts, whatever the BLAS blocking.
_TIE_RTOL = 1e-12
# |effect size| is capped here; it is only reached when all pair scores of a test are equal.
_MAX_EFFECT = 1e3


# --------------------------------------------------------------------------------------------------
# False discovery rate
# --------------------------------------------------------------------------------------------------


def _step_up(p: Tensor, dependence_factor: bool) -> Tensor:
    """Shared Benjamini-Hochberg / -Yekutieli step-up adjustment (see the public functions)."""
    p = torch.as_tensor(p)
    out_dtype = p.dtype if p.is_floating_point() else torch.get_default_dtype()
    flat = p.detach().reshape(-1).to(torch.float64)  # [N]
    tested = ~torch.isnan(flat)
    values = flat[tested]  # [m]
    if bool(((values < 0) | (values > 1)).any()):
        raise ValueError("p-values must lie in [0, 1] (NaN marks an untested hypothesis).")
    q = torch.full_like(flat, math.nan)
    m = values.numel()
    if m > 0:
        ranks = torch.arange(1, m + 1, dtype=torch.float64, device=flat.device)  # [m]
        c_m = ranks.reciprocal().sum() if dependence_factor else 1.0
        order = torch.argsort(values, stable=True)
        ordered = values[order]  # [m], p_(1) <= ... <= p_(m)
        raw = ordered * (m * c_m) / ranks  # [m], p_(i) m c(m) / i
        # Step-up: q_(i) = min_{k >= i} p_(k) m c(m) / k, then at most 1. The maximum with p_(i)
        # only undoes round-off (p m / m can round below p); exactly, q_(i) >= p_(i) already.
        adjusted = raw.flip(0).cummin(0).values.flip(0)
        adjusted = torch.maximum(adjusted, ordered).clamp(max=1.0)
        q_tested = torch.empty_like(values)
        q_tested[order] = adjusted
        q[tested] = q_tested
    return q.reshape(p.shape).to(out_dtype)


def benjamini_hochberg(p: Tensor) -> Tensor:
    """Benjamini-Hochberg adjusted p-values (q-values).

    Same values as ``statsmodels.stats.multitest.multipletests(p, method="fdr_bh")[1]``: with the
    ``m`` tested p-values sorted ascending, ``q_(i) = min(1, min_{k >= i} m p_(k) / k)``. Rejecting
    every hypothesis with ``q <= alpha`` controls the false discovery rate at ``alpha`` for
    independent or positively dependent (PRDS) tests.

    Args:
        p: p-values of any shape, each in ``[0, 1]``. NaN marks an untested hypothesis: it is left
            out of ``m`` and its q-value is NaN (so it is never significant).

    Returns:
        q-values, same shape as ``p``, in ``[0, 1]`` (NaN where ``p`` is NaN), ``q >= p``; dtype of
        ``p`` if floating, else the default dtype.

    Raises:
        ValueError: a non-NaN p-value outside ``[0, 1]``.
    """
    return _step_up(p, dependence_factor=False)


def benjamini_yekutieli(p: Tensor) -> Tensor:
    """Benjamini-Yekutieli adjusted p-values (q-values), valid under any dependence.

    Same values as ``multipletests(p, method="fdr_by")[1]``: the Benjamini-Hochberg step-up with
    every ``m / k`` multiplied by ``c(m) = sum_{i=1}^m 1/i``, i.e.
    ``q_(i) = min(1, min_{k >= i} m c(m) p_(k) / k)``. It controls the false discovery rate at
    ``alpha`` whatever the dependence between tests (cells of one layer share activations, so the
    QK-OV tests are not independent). Always ``>=`` the Benjamini-Hochberg q-values.

    Args:
        p: p-values of any shape, each in ``[0, 1]``; NaN = untested (left out of ``m``, q = NaN).

    Returns:
        q-values, same shape as ``p``, in ``[0, 1]`` (NaN where ``p`` is NaN).

    Raises:
        ValueError: a non-NaN p-value outside ``[0, 1]``.
    """
    return _step_up(p, dependence_factor=True)


def fdr_correct(p: Tensor, method: str = "by") -> Tensor:
    """q-values of ``p`` by ``method``: ``"by"`` (Benjamini-Yekutieli) or ``"bh"`` (-Hochberg).

    Args:
        p: p-values of any shape (see :func:`benjamini_yekutieli` for NaN handling).
        method: one of :data:`FDR_METHODS` (case-insensitive).

    Returns:
        q-values, same shape as ``p``.

    Raises:
        ValueError: unknown ``method``, or p-values outside ``[0, 1]``.
    """
    key = method.lower() if isinstance(method, str) else method
    if key == "by":
        return benjamini_yekutieli(p)
    if key == "bh":
        return benjamini_hochberg(p)
    raise ValueError(f"Unknown FDR method {method!r}; expected one of {FDR_METHODS}.")


# --------------------------------------------------------------------------------------------------
# Permutation test of cross-task conflict
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConflictTestResult:
    """Per-test output of :func:`permutation_conflict_test` (all tensors ``[T]``).

    Attributes:
        statistic: observed statistic, by default the cosine between the task mean vectors
            (negative = conflict); 0 for degenerate tests.
        p_values: one-sided permutation p-values for conflict,
            ``(1 + #{null <= observed}) / (1 + n_permutations)``, in ``[1 / (1 + P), 1]``;
            1 for degenerate tests.
        effect_size: standardised mean of the per-pair scores ``u_ij = <x_a[i], x_b[j]>``, negated:
            ``-mean_ij(u_ij) / std_ij(u_ij)`` (population std over all ``n_a * n_b`` pairs); larger
            = stronger conflict, 0 = none, negative = synergy; 0 for degenerate tests.
        null_mean: mean of the statistic over the permutations (0 for degenerate tests).
        null_std: standard deviation (``ddof = 0``) of the statistic over the permutations.
        degenerate: True where the test could not be run (a task without samples, a zero task mean
            vector or non-finite inputs).
        n_permutations: number of permutations ``P`` drawn.
    """

    statistic: Tensor
    p_values: Tensor
    effect_size: Tensor
    null_mean: Tensor
    null_std: Tensor
    degenerate: Tensor
    n_permutations: int


def _permutation_weights(n_a: int, n_b: int, n_permutations: int, seed: int) -> Tensor:
    """Group-A averaging weights of every permutation (scheme in :func:`permutation_conflict_test`).

    Returns:
        ``[P, n_a + n_b]`` float64 on the CPU: ``1 / n_a`` on the rows relabelled as task A, 0
        elsewhere, so ``w_a @ pooled`` is the relabelled group-A mean.
    """
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand((n_permutations, n_a + n_b), generator=generator, dtype=torch.float64)
    is_a = u.argsort(dim=1).argsort(dim=1) < n_a  # [P, n], exactly n_a True per row
    return is_a.to(torch.float64) / n_a


def _group_statistic(
    gram: Tensor, w_a: Tensor, n_a: int, n_b: int, zero_level: Tensor, statistic: str
) -> tuple[Tensor, Tensor]:
    """Statistic of the two group means for many labellings, from the per-test Gram matrices.

    With ``m_a = w_a^T X_t``, the complementary group mean is ``m_b = (s - n_a m_a) / n_b`` for the
    pooled sum ``s = 1^T X_t``, so every inner product is a quadratic form of ``G_t = X_t X_t^T``:
    ``||m_a||^2 = w_a^T G w_a``, ``<m_a, m_b> = (w_a^T G 1 - n_a ||m_a||^2) / n_b`` and
    ``||m_b||^2 = (1^T G 1 - 2 n_a w_a^T G 1 + n_a^2 ||m_a||^2) / n_b^2``. One batched matmul per
    chunk, and the cost does not depend on ``d``.

    Args:
        gram: ``[Tc, n, n]`` float64 Gram matrices of the pooled samples.
        w_a: ``[Pc, n]`` float64 group-A weights (``1 / n_a`` on the group's rows).
        n_a: group-A size; n_b: group-B size.
        zero_level: ``[Tc]``; a squared mean norm at or below it counts as a zero vector.
        statistic: ``"cosine"`` or ``"dot"``.

    Returns:
        ``(stat, valid)``, each ``[Tc, Pc]``: the statistic (0 where a mean vector is zero) and
        whether both mean vectors are non-zero.
    """
    row_sums = gram.sum(dim=2)  # [Tc, n], G 1
    total = row_sums.sum(dim=1, keepdim=True)  # [Tc, 1], 1^T G 1 = ||s||^2
    aa = ((gram @ w_a.T) * w_a.T).sum(dim=1)  # [Tc, Pc], ||m_a||^2
    a_s = row_sums @ w_a.T  # [Tc, Pc], <m_a, s>
    ab = (a_s - n_a * aa) / n_b  # [Tc, Pc], <m_a, m_b>
    bb = (total - 2 * n_a * a_s + n_a**2 * aa) / n_b**2  # [Tc, Pc], ||m_b||^2
    level = zero_level[:, None]
    valid = (aa > level) & (bb > level)
    if statistic == "cosine":
        denom = torch.sqrt(aa.clamp(min=0) * bb.clamp(min=0))
        stat = torch.where(valid, ab / torch.where(valid, denom, 1.0), 0.0).clamp(-1.0, 1.0)
    else:
        stat = torch.where(valid, ab, 0.0)
    return stat, valid


def permutation_conflict_test(
    x_a: Tensor,
    x_b: Tensor,
    n_permutations: int = 200,
    seed: int = 0,
    statistic: str = "cosine",
    *,
    max_chunk_elements: int = 2**24,
) -> ConflictTestResult:
    """Permutation test of cross-task conflict, for ``T`` tests at once.

    For every test ``t`` (a flattened (layer, head, block) cell) the observed statistic is the
    cosine between the task mean vectors ``m_a = mean_i x_a[i, t]`` and ``m_b = mean_j x_b[j, t]``
    (``statistic="dot"``: the plain inner product ``<m_a, m_b>``); negative = the tasks pull
    against each other. The null shuffles task labels over the pooled ``n_a + n_b`` samples
    (keeping the group sizes) and recomputes the statistic; the one-sided p-value for conflict is

        ``p = (1 + #{k : null_k <= observed}) / (1 + n_permutations)``,

    valid (``P(p <= u) <= u``) whenever the samples of both tasks are exchangeable. The same
    permutations serve all tests. Note what the null rejects: "the task means are less aligned than
    with random labels". Two *orthogonal* but different tasks can have a small p (random groups mix
    both and are positively aligned), which is why a conflict also needs the effect size:

        ``effect_size = -mean_ij(u_ij) / std_ij(u_ij)``,  ``u_ij = <x_a[i, t], x_b[j, t]>``,

    the negated standardised mean (Cohen's-d-like, population std) of the per-pair signed scores
    over all ``n_a * n_b`` pairs; with whitened inputs ``u_ij`` is the signed QK-OV score of the
    pair. ``mean_ij(u_ij) = <m_a, m_b>``, so its sign is that of the statistic; it is scale-free,
    larger = stronger conflict, and capped at ``+-1e3`` (reached only when all pair scores are
    equal). Everything is computed in closed form from the Gram matrices ``G_t = X_t X_t^T`` of
    the pooled samples (the pair scores are a block of ``G_t``, the statistic of a labelling a few
    quadratic forms of it), chunked over tests and permutations: no mean vector is formed, and
    after the Gram matrices the cost, ``O(T n^2 P)``, does not depend on ``d``.

    Degenerate tests (``n_a == 0`` or ``n_b == 0``, a zero task mean vector, any non-finite entry in
    the test's inputs) get ``statistic = 0``, ``p = 1``, ``effect_size = 0`` and a warning; the
    outputs never contain NaN.

    Args:
        x_a: ``[n_a, T, d]`` per-sample vectors of task A (already Fisher-whitened by the caller,
            e.g. ``g * sqrt(D)``).
        x_b: ``[n_b, T, d]`` per-sample vectors of task B.
        n_permutations: number of random relabellings ``P`` (>= 1); the smallest p-value is
            ``1 / (1 + P)``, so use ``P >= m c(m) / alpha`` for ``m`` tests to let
            Benjamini-Yekutieli reject anything.
        seed: seed of the permutations, reproducible and identical on every device: with
            ``U = torch.rand((P, n_a + n_b), generator=torch.Generator().manual_seed(seed),
            dtype=torch.float64)`` (drawn on the CPU), permutation ``k`` labels pooled sample ``i``
            (row ``i`` of ``cat([x_a, x_b])``) as task A iff the rank of ``U[k, i]`` in its row is
            below ``n_a``.
        statistic: ``"cosine"`` (default, scale-free) or ``"dot"``.
        max_chunk_elements: bound on the float64 elements of the intermediates of one chunk.

    Returns:
        :class:`ConflictTestResult` with ``[T]`` tensors in the promoted floating dtype of the inputs.

    Raises:
        ValueError: inputs not 3-D, mismatched ``T`` or ``d``, ``n_permutations < 1`` or an unknown
            ``statistic``.
    """
    if statistic not in _STATISTICS:
        raise ValueError(f"Unknown statistic {statistic!r}; expected one of {_STATISTICS}.")
    if int(n_permutations) < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}.")
    n_permutations = int(n_permutations)
    if x_a.dim() != 3 or x_b.dim() != 3:
        raise ValueError(
            f"x_a and x_b must be [n, T, d]; got shapes {tuple(x_a.shape)} and {tuple(x_b.shape)}."
        )
    if x_a.shape[1:] != x_b.shape[1:]:
        raise ValueError(
            f"x_a {tuple(x_a.shape)} and x_b {tuple(x_b.shape)} must agree on [T, d] (dims 1, 2)."
        )
    n_a, num_tests, dim = x_a.shape
    n_b = x_b.shape[0]
    n = n_a + n_b
    device = x_a.device
    out_dtype = torch.promote_types(x_a.dtype, x_b.dtype)
    if not out_dtype.is_floating_point:
        out_dtype = torch.get_default_dtype()

    def _result(
        stat: Tensor, p: Tensor, effect: Tensor, null_mean: Tensor, null_std: Tensor, degen: Tensor
    ) -> ConflictTestResult:
        return ConflictTestResult(
            statistic=stat.to(out_dtype),
            p_values=p.to(out_dtype),
            effect_size=effect.to(out_dtype),
            null_mean=null_mean.to(out_dtype),
            null_std=null_std.to(out_dtype),
            degenerate=degen,
            n_permutations=n_permutations,
        )

    zeros = torch.zeros(num_tests, dtype=torch.float64, device=device)
    if n_a == 0 or n_b == 0:
        if num_tests > 0:
            warnings.warn(
                f"Conflict test with n_a={n_a}, n_b={n_b} samples: a task has no samples; all "
                f"{num_tests} tests get p = 1, effect size 0, statistic 0.",
                stacklevel=2,
            )
        degenerate = torch.ones(num_tests, dtype=torch.bool, device=device)
        return _result(zeros, zeros + 1.0, zeros, zeros, zeros, degenerate)

    w_a = _permutation_weights(n_a, n_b, n_permutations, seed).to(device)  # [P, n]
    w_a_obs = torch.cat([torch.full((1, n_a), 1.0 / n_a), torch.zeros(1, n_b)], dim=1)
    w_a_obs = w_a_obs.to(device, torch.float64)  # [1, n], the observed split

    perm_chunk = max(1, min(n_permutations, 1024, max_chunk_elements // (4 * n)))
    per_test = n * dim + 2 * n * n + 3 * n * perm_chunk + 2 * n_permutations + n_a * n_b
    test_chunk = max(1, max_chunk_elements // per_test)

    stat_out = torch.zeros(num_tests, dtype=torch.float64, device=device)
    p_out = torch.ones_like(stat_out)
    effect_out = torch.zeros_like(stat_out)
    mean_out = torch.zeros_like(stat_out)
    std_out = torch.zeros_like(stat_out)
    degenerate = torch.zeros(num_tests, dtype=torch.bool, device=device)

    for t0 in range(0, num_tests, test_chunk):
        sl = slice(t0, min(t0 + test_chunk, num_tests))
        pooled = torch.cat([x_a[:, sl], x_b[:, sl]]).detach().to(torch.float64)  # [n, Tc, d]
        finite = torch.isfinite(pooled).all(dim=2).all(dim=0)  # [Tc]
        pooled = torch.where(torch.isfinite(pooled), pooled, 0.0)
        gram = torch.einsum("itd,jtd->tij", pooled, pooled)  # [Tc, n, n]
        zero_level = _REL_ZERO * torch.diagonal(gram, dim1=1, dim2=2).mean(dim=1)  # [Tc]

        observed, valid = _group_statistic(gram, w_a_obs, n_a, n_b, zero_level, statistic)
        observed, ok = observed[:, 0], valid[:, 0] & finite  # [Tc]
        tie_tol = _TIE_RTOL * (1.0 if statistic == "cosine" else 1.0 + zero_level / _REL_ZERO)

        null = torch.cat(
            [
                _group_statistic(gram, w_a[p0 : p0 + perm_chunk], n_a, n_b, zero_level, statistic)[0]
                for p0 in range(0, n_permutations, perm_chunk)
            ],
            dim=1,
        )  # [Tc, P]
        n_le = (null <= (observed + tie_tol)[:, None]).sum(dim=1)  # [Tc]
        p = (1.0 + n_le.to(torch.float64)) / (1.0 + n_permutations)

        cross = gram[:, :n_a, n_a:]  # [Tc, n_a, n_b], u_ij = <x_a[i], x_b[j]>
        pair_mean = cross.mean(dim=(1, 2))
        pair_std = cross.std(dim=(1, 2), correction=0)
        denom = torch.maximum(pair_std, pair_mean.abs() / _MAX_EFFECT)
        effect = torch.where(denom > 0, -pair_mean / torch.where(denom > 0, denom, 1.0), 0.0)

        stat_out[sl] = torch.where(ok, observed, 0.0)
        p_out[sl] = torch.where(ok, p, 1.0)
        effect_out[sl] = torch.where(ok, effect, 0.0)
        mean_out[sl] = torch.where(ok, null.mean(dim=1), 0.0)
        std_out[sl] = torch.where(ok, null.std(dim=1, correction=0), 0.0)
        degenerate[sl] = ~ok

    n_degenerate = int(degenerate.sum())
    if n_degenerate:
        warnings.warn(
            f"{n_degenerate} of {num_tests} conflict tests are degenerate (a zero task mean vector "
            "or non-finite inputs); they get p = 1, effect size 0, statistic 0.",
            stacklevel=2,
        )
    return _result(stat_out, p_out, effect_out, mean_out, std_out, degenerate)


def conflict_significance(
    p_values: Tensor,
    effect_size: Tensor,
    alpha: float = 0.05,
    min_effect_size: float = 0.2,
    method: str = "by",
) -> dict[str, Tensor]:
    """Which tests are significant conflicts: ``q <= alpha`` and ``effect_size >= min_effect_size``.

    The q-values correct over *all* entries of ``p_values`` jointly (pass every (layer, head, block)
    cell of a task pair in one tensor, e.g. ``ConflictTestResult.p_values``).

    Args:
        p_values: p-values, any shape; NaN = untested (q = NaN, never significant).
        effect_size: same shape; larger = stronger conflict (see :func:`permutation_conflict_test`).
        alpha: false discovery rate level in ``(0, 1]``.
        min_effect_size: smallest effect size reported as a conflict (default 0.2, a "small" d).
        method: ``"by"`` (Benjamini-Yekutieli, default) or ``"bh"``.

    Returns:
        ``{"q_values": Tensor, "significant": BoolTensor}``, both shaped like ``p_values``.

    Raises:
        ValueError: shapes differ, ``alpha`` outside ``(0, 1]`` or an unknown ``method``.
    """
    p_values = torch.as_tensor(p_values)
    effect_size = torch.as_tensor(effect_size, device=p_values.device)
    if p_values.shape != effect_size.shape:
        raise ValueError(
            f"p_values {tuple(p_values.shape)} and effect_size {tuple(effect_size.shape)} differ."
        )
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must lie in (0, 1], got {alpha}.")
    q = fdr_correct(p_values, method)
    significant = (q <= alpha) & (effect_size >= min_effect_size)  # NaN compares False
    return {"q_values": q, "significant": significant}

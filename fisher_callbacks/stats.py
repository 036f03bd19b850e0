"""Statistics for cross-task conflict: a permutation null, FDR control and an effect size.

The QK-OV monitor asks, for every (layer, head, block) cell, whether the gradients of task A and task
B point against each other more than chance allows. This module answers that question for many cells
at once and knows nothing about models:

* :func:`permutation_conflict_test` takes per-sample feature vectors of both tasks for ``T``
  independent tests (the caller flattens layer x head x block and whitens the slice gradients by
  ``sqrt(D)``), and returns a one-sided permutation p-value and an effect size per test;
  :func:`gram_conflict_test` is the same test from the per-test Gram matrices ``X X^T`` alone (the
  statistic of any labelling is a quadratic form of them), e.g. Gram matrices of sketches;
* :func:`refine_p_values` makes small p-values reachable for many tests: tests still at the
  permutation floor get fresh, ten times larger permutation sets until the FDR decision no longer
  depends on the floor, up to :func:`reachable_permutations` (the number that lets a lone conflict
  pass Benjamini-Yekutieli over all tests). The refined p-values are exact Monte Carlo
  permutation p-values (valid in finite samples), not a fitted tail;
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
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "FDR_METHODS",
    "ConflictTestResult",
    "RefinedPValues",
    "benjamini_hochberg",
    "benjamini_yekutieli",
    "conflict_significance",
    "fdr_correct",
    "gram_conflict_test",
    "permutation_conflict_test",
    "pooled_gram",
    "reachable_permutations",
    "refine_p_values",
    "refinement_candidates",
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
# refine_p_values: a test is refined while at most this many null statistics reached the observed
# one (its p-value is then known to ~1 / sqrt(11) = 30% or better when refinement stops) ...
REFINE_MAX_EXCEEDANCES = 10
# ... and every stage draws this many times more fresh permutations than the previous one.
REFINE_GROWTH = 10
# Headroom of reachable_permutations: the floor 1 / (P + 1) gives a lone test q <= alpha / 2.
_REACH_HEADROOM = 2.0
# Permutations drawn at once by the refinement stages (rows of U, see refine_p_values).
_REFINE_DRAW = 4096


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
        n_extreme: ``[T]`` int64, the number of permutations whose statistic is at most the
            observed one (``p = (1 + n_extreme) / (1 + P)``); 0 for degenerate tests.
    """

    statistic: Tensor
    p_values: Tensor
    effect_size: Tensor
    null_mean: Tensor
    null_std: Tensor
    degenerate: Tensor
    n_permutations: int
    n_extreme: Tensor | None = None


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


def pooled_gram(x_a: Tensor, x_b: Tensor) -> tuple[Tensor, Tensor]:
    """Per-test Gram matrices of the pooled samples, the only input the conflict test needs.

    Args:
        x_a: ``[n_a, T, d]`` per-sample vectors of task A; x_b: ``[n_b, T, d]`` of task B.

    Returns:
        ``(gram, finite)``: ``gram [T, n, n]`` float64, ``G_t = X_t X_t^T`` with
        ``X_t = cat([x_a[:, t], x_b[:, t]])`` (rows ``0 .. n_a - 1`` are task A) and non-finite
        entries replaced by 0; ``finite [T]`` bool, whether all inputs of the test were finite.
    """
    pooled = torch.cat([x_a, x_b]).detach().to(torch.float64)  # [n, T, d]
    finite = torch.isfinite(pooled).all(dim=2).all(dim=0)  # [T]
    pooled = torch.where(torch.isfinite(pooled), pooled, 0.0)
    return torch.einsum("itd,jtd->tij", pooled, pooled), finite  # [T, n, n]


def _observed_and_tolerance(gram: Tensor, n_a: int, statistic: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Observed statistic, its validity, the zero level and the tie tolerance of ``gram [Tc, n, n]``."""
    n = gram.shape[-1]
    n_b = n - n_a
    zero_level = _REL_ZERO * torch.diagonal(gram, dim1=1, dim2=2).mean(dim=1)  # [Tc]
    w_obs = torch.cat([torch.full((1, n_a), 1.0 / n_a), torch.zeros(1, n_b)], dim=1)
    w_obs = w_obs.to(gram.device, torch.float64)  # [1, n], the observed split
    observed, valid = _group_statistic(gram, w_obs, n_a, n_b, zero_level, statistic)
    tie_tol = _TIE_RTOL * (1.0 if statistic == "cosine" else 1.0 + zero_level / _REL_ZERO)
    return observed[:, 0], valid[:, 0], zero_level, tie_tol


def _check_options(statistic: str, n_permutations: int) -> int:
    if statistic not in _STATISTICS:
        raise ValueError(f"Unknown statistic {statistic!r}; expected one of {_STATISTICS}.")
    if int(n_permutations) < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}.")
    return int(n_permutations)


def _gram_chunk(
    gram: Tensor,
    finite: Tensor,
    n_a: int,
    w_a: Tensor,
    perm_chunk: int,
    statistic: str,
) -> tuple[Tensor, ...]:
    """The test on one chunk of Gram matrices ``[Tc, n, n]`` (float64) with weights ``w_a [P, n]``.

    Returns:
        ``(stat, p, effect, null_mean, null_std, degenerate, n_extreme)``, each ``[Tc]``.
    """
    n_b = gram.shape[-1] - n_a
    n_permutations = w_a.shape[0]
    observed, valid, zero_level, tie_tol = _observed_and_tolerance(gram, n_a, statistic)
    ok = valid & finite  # [Tc]
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
    return (
        torch.where(ok, observed, 0.0),
        torch.where(ok, p, 1.0),
        torch.where(ok, effect, 0.0),
        torch.where(ok, null.mean(dim=1), 0.0),
        torch.where(ok, null.std(dim=1, correction=0), 0.0),
        ~ok,
        torch.where(ok, n_le, 0),
    )


def _run_chunks(
    num_tests: int,
    n_a: int,
    n_b: int,
    n_permutations: int,
    seed: int,
    statistic: str,
    device: torch.device,
    out_dtype: torch.dtype,
    gram_of: Callable[[slice], tuple[Tensor, Tensor]],
    per_test_extra: int,
    max_chunk_elements: int,
) -> ConflictTestResult:
    """Shared driver of :func:`permutation_conflict_test` and :func:`gram_conflict_test`.

    ``gram_of(sl)`` returns ``(gram [Tc, n, n] float64, finite [Tc])`` of the tests in ``sl``;
    ``per_test_extra`` is the number of float64 elements it needs per test beyond the Gram.
    """
    n = n_a + n_b

    def _result(*fields: Tensor) -> ConflictTestResult:
        stat, p, effect, null_mean, null_std, degen, n_ext = fields
        return ConflictTestResult(
            statistic=stat.to(out_dtype),
            p_values=p.to(out_dtype),
            effect_size=effect.to(out_dtype),
            null_mean=null_mean.to(out_dtype),
            null_std=null_std.to(out_dtype),
            degenerate=degen,
            n_permutations=n_permutations,
            n_extreme=n_ext,
        )

    zeros = torch.zeros(num_tests, dtype=torch.float64, device=device)
    if n_a == 0 or n_b == 0:
        if num_tests > 0:
            warnings.warn(
                f"Conflict test with n_a={n_a}, n_b={n_b} samples: a task has no samples; all "
                f"{num_tests} tests get p = 1, effect size 0, statistic 0.",
                stacklevel=3,
            )
        degenerate = torch.ones(num_tests, dtype=torch.bool, device=device)
        n_ext = torch.zeros(num_tests, dtype=torch.long, device=device)
        return _result(zeros, zeros + 1.0, zeros, zeros, zeros, degenerate, n_ext)

    w_a = _permutation_weights(n_a, n_b, n_permutations, seed).to(device)  # [P, n]
    perm_chunk = max(1, min(n_permutations, 1024, max_chunk_elements // (4 * n)))
    per_test = per_test_extra + 2 * n * n + 3 * n * perm_chunk + 2 * n_permutations + n_a * n_b
    test_chunk = max(1, max_chunk_elements // per_test)
    parts = [
        _gram_chunk(*gram_of(slice(t0, min(t0 + test_chunk, num_tests))), n_a, w_a, perm_chunk, statistic)
        for t0 in range(0, num_tests, test_chunk)
    ]
    if not parts:
        n_ext = torch.zeros(0, dtype=torch.long, device=device)
        return _result(zeros, zeros, zeros, zeros, zeros, zeros.bool(), n_ext)
    result = _result(*(torch.cat(field) for field in zip(*parts)))
    n_degenerate = int(result.degenerate.sum())
    if n_degenerate:
        warnings.warn(
            f"{n_degenerate} of {num_tests} conflict tests are degenerate (a zero task mean vector "
            "or non-finite inputs); they get p = 1, effect size 0, statistic 0.",
            stacklevel=3,
        )
    return result


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
    quadratic forms of it; see :func:`gram_conflict_test`), chunked over tests and permutations: no
    mean vector is formed, and after the Gram matrices the cost, ``O(T n^2 P)``, does not depend on
    ``d``.

    Degenerate tests (``n_a == 0`` or ``n_b == 0``, a zero task mean vector, any non-finite entry in
    the test's inputs) get ``statistic = 0``, ``p = 1``, ``effect_size = 0`` and a warning; the
    outputs never contain NaN.

    Args:
        x_a: ``[n_a, T, d]`` per-sample vectors of task A (already Fisher-whitened by the caller,
            e.g. ``g * sqrt(D)``).
        x_b: ``[n_b, T, d]`` per-sample vectors of task B.
        n_permutations: number of random relabellings ``P`` (>= 1); the smallest p-value is
            ``1 / (1 + P)``, so Benjamini-Yekutieli over ``m`` tests can reject ``k`` of them only
            when ``m c(m) / (k (P + 1)) <= alpha``; :func:`refine_p_values` lifts that floor where
            it matters.
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
    n_permutations = _check_options(statistic, n_permutations)
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
    out_dtype = torch.promote_types(x_a.dtype, x_b.dtype)
    if not out_dtype.is_floating_point:
        out_dtype = torch.get_default_dtype()
    return _run_chunks(
        num_tests,
        n_a,
        n_b,
        n_permutations,
        seed,
        statistic,
        x_a.device,
        out_dtype,
        lambda sl: pooled_gram(x_a[:, sl], x_b[:, sl]),
        (n_a + n_b) * dim,
        max_chunk_elements,
    )


def gram_conflict_test(
    gram: Tensor,
    n_a: int,
    n_permutations: int = 200,
    seed: int = 0,
    statistic: str = "cosine",
    *,
    finite: Tensor | None = None,
    max_chunk_elements: int = 2**24,
) -> ConflictTestResult:
    """:func:`permutation_conflict_test` from the per-test Gram matrices of the pooled samples.

    With group-A weights ``w`` (``1 / n_a`` on the rows labelled A) every statistic is a few
    quadratic forms of ``G_t``: ``||m_a||^2 = w^T G w``, ``<m_a, m_b> = (w^T G 1 - n_a w^T G w) /
    n_b`` and ``||m_b||^2 = (1^T G 1 - 2 n_a w^T G 1 + n_a^2 w^T G w) / n_b^2``, and the pair scores
    are the ``[:n_a, n_a:]`` block. Any inner product with an unbiased Gram serves, e.g. the Gram
    of sketched vectors ``<S x_i, S x_j>``; given ``pooled_gram(x_a, x_b)`` the result equals
    ``permutation_conflict_test(x_a, x_b, ...)`` (same permutations, same fields).

    Args:
        gram: ``[T, n, n]`` symmetric Gram matrices; rows/columns ``0 .. n_a - 1`` are task A's
            samples, the rest task B's (converted to float64).
        n_a: number of task-A samples (``0 <= n_a <= n``).
        n_permutations, seed, statistic, max_chunk_elements: as in
            :func:`permutation_conflict_test`.
        finite: ``[T]`` bool, False marks a test with non-finite inputs (degenerate); default: a
            test is degenerate when its Gram matrix has a non-finite entry.

    Returns:
        :class:`ConflictTestResult`, ``[T]`` tensors in the Gram's floating dtype (float32 and
        float64 kept, otherwise the default dtype).

    Raises:
        ValueError: ``gram`` not ``[T, n, n]``, ``n_a`` outside ``[0, n]``, ``finite`` of the wrong
            shape, ``n_permutations < 1`` or an unknown ``statistic``.
    """
    n_permutations = _check_options(statistic, n_permutations)
    if gram.dim() != 3 or gram.shape[1] != gram.shape[2]:
        raise ValueError(f"gram must be [T, n, n], got shape {tuple(gram.shape)}.")
    num_tests, n = gram.shape[0], gram.shape[1]
    if not 0 <= int(n_a) <= n:
        raise ValueError(f"n_a must lie in [0, {n}], got {n_a}.")
    n_a = int(n_a)
    if finite is None:
        finite = torch.isfinite(gram).all(dim=2).all(dim=1)
    elif tuple(finite.shape) != (num_tests,):
        raise ValueError(f"finite must have shape ({num_tests},), got {tuple(finite.shape)}.")
    out_dtype = gram.dtype if gram.dtype in (torch.float32, torch.float64) else torch.get_default_dtype()
    finite = finite.to(gram.device, torch.bool)

    def gram_of(sl: slice) -> tuple[Tensor, Tensor]:
        g = gram[sl].detach().to(torch.float64)
        return torch.where(torch.isfinite(g), g, 0.0), finite[sl]

    return _run_chunks(
        num_tests,
        n_a,
        n - n_a,
        n_permutations,
        seed,
        statistic,
        gram.device,
        out_dtype,
        gram_of,
        0,
        max_chunk_elements,
    )


# --------------------------------------------------------------------------------------------------
# Reaching small p-values: sequential refinement of the permutation p-values
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefinedPValues:
    """Output of :func:`refine_p_values` (all tensors ``[m]``, over every test of the family).

    Attributes:
        p_values: the p-values after refinement, float64: ``(1 + n_extreme) / (1 + permutations)``
            for every test that was refined, the input p-value for the others.
        permutations: int64, permutations behind each p-value (``n_permutations`` or a stage size).
        n_extreme: int64, null statistics at or below the observed one in that last permutation set.
        stages: number of refinement stages run (0: nothing needed refining).
    """

    p_values: Tensor
    permutations: Tensor
    n_extreme: Tensor
    stages: int


def reachable_permutations(num_tests: int, alpha: float = 0.05, method: str = "by") -> int:
    """Permutations needed for a lone conflict among ``num_tests`` tests to pass the FDR step-up.

    A single test at the permutation floor ``1 / (P + 1)`` among ``m`` tests gets the q-value
    ``m c(m) / (P + 1)`` (Benjamini-Yekutieli, ``c(m) = sum_{i<=m} 1/i``; Hochberg: ``c = 1``), so it
    is reported at level ``alpha`` iff ``P + 1 >= m c(m) / alpha``. This returns the smallest ``P``
    with ``P + 1 >= 2 m c(m) / alpha`` (a factor 2 of headroom: the floor then gives
    ``q = alpha / 2``). E.g. 720 tests (30 layers x 9 query heads, 3 KV heads) at
    ``alpha = 0.05``: ``c(720) = 7.157``, ``P = 206,126``.

    Args:
        num_tests: number of tests ``m`` corrected together (>= 1).
        alpha: false discovery rate level in ``(0, 1]``.
        method: ``"by"`` or ``"bh"``.

    Returns:
        ``P`` as an int (at least 1).

    Raises:
        ValueError: ``num_tests < 1``, ``alpha`` outside ``(0, 1]`` or an unknown ``method``.
    """
    if int(num_tests) < 1:
        raise ValueError(f"num_tests must be >= 1, got {num_tests}.")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must lie in (0, 1], got {alpha}.")
    key = method.lower() if isinstance(method, str) else method
    if key not in FDR_METHODS:
        raise ValueError(f"Unknown FDR method {method!r}; expected one of {FDR_METHODS}.")
    m = int(num_tests)
    c_m = math.fsum(1.0 / i for i in range(1, m + 1)) if key == "by" else 1.0
    return max(1, math.ceil(_REACH_HEADROOM * m * c_m / alpha) - 1)


def refinement_candidates(result: ConflictTestResult, eligible: Tensor | None = None) -> Tensor:
    """Tests of a :func:`permutation_conflict_test` result that :func:`refine_p_values` may refine.

    A test is a candidate when it is not degenerate, at most :data:`REFINE_MAX_EXCEEDANCES` null
    statistics reached its observed one (``p <= 11 / (P + 1)``) and ``eligible`` (e.g. its effect
    size can make it a reported conflict) holds. Keeping only the candidates' Gram matrices bounds
    the memory of the refinement.

    Args:
        result: the first-stage result, with ``n_extreme``.
        eligible: optional ``[T]`` bool.

    Returns:
        ``[T]`` bool mask.

    Raises:
        ValueError: ``result`` has no ``n_extreme``.
    """
    if result.n_extreme is None:
        raise ValueError("result has no n_extreme; use permutation_conflict_test/gram_conflict_test.")
    mask = ~result.degenerate & (result.n_extreme <= REFINE_MAX_EXCEEDANCES)
    if eligible is not None:
        mask = mask & eligible.to(mask.device, torch.bool)
    return mask


def _stage_sizes(first: int, largest: int) -> list[int]:
    """Permutations of the refinement stages after a first stage of ``first``: ``largest``,
    ``largest / 10``, ... (rounded up), ascending, each at least twice ``first``."""
    sizes = []
    size = int(largest)
    while size >= 2 * first:
        sizes.append(size)
        size = math.ceil(size / REFINE_GROWTH)
    return sizes[::-1]


def _stage_seed(seed: int, stage: int) -> int:
    """Seed of refinement stage ``stage`` (>= 1): fresh permutations, reproducible."""
    return (int(seed) + 0x9E3779B97F4A7C15 * int(stage)) % (2**63 - 1)


def _count_extreme(
    gram: Tensor, n_a: int, n_permutations: int, seed: int, statistic: str, max_chunk_elements: int
) -> Tensor:
    """``#{k : null_k <= observed}`` of ``gram [c, n, n]`` (float64) over fresh permutations.

    The permutations are drawn :data:`_REFINE_DRAW` rows of ``U`` at a time from one generator
    seeded with ``seed`` (same labelling rule as :func:`permutation_conflict_test`); only counts
    are kept, so memory does not grow with ``n_permutations``.
    """
    n = gram.shape[-1]
    n_b = n - n_a
    observed, _, zero_level, tie_tol = _observed_and_tolerance(gram, n_a, statistic)
    threshold = (observed + tie_tol)[:, None]  # [c, 1]
    generator = torch.Generator().manual_seed(seed)
    perm_chunk = max(1, min(_REFINE_DRAW, max_chunk_elements // max(1, 4 * n * gram.shape[0])))
    counts = torch.zeros(gram.shape[0], dtype=torch.long, device=gram.device)
    for p0 in range(0, n_permutations, perm_chunk):
        rows = min(perm_chunk, n_permutations - p0)
        u = torch.rand((rows, n), generator=generator, dtype=torch.float64)
        w_a = ((u.argsort(dim=1).argsort(dim=1) < n_a).to(torch.float64) / n_a).to(gram.device)
        null, _ = _group_statistic(gram, w_a, n_a, n_b, zero_level, statistic)  # [c, rows]
        counts += (null <= threshold).sum(dim=1)
    return counts


def refine_p_values(
    p_values: Tensor,
    n_extreme: Tensor,
    n_permutations: int,
    gram: Tensor,
    candidates: Tensor,
    n_a: int,
    *,
    alpha: float = 0.05,
    method: str = "by",
    max_permutations: int | None = None,
    seed: int = 0,
    statistic: str = "dot",
    max_chunk_elements: int = 2**24,
) -> RefinedPValues:
    """Sequential Monte Carlo refinement of permutation p-values, driven by the FDR decision.

    With ``P`` permutations no p-value goes below ``1 / (P + 1)``, and the Benjamini-Yekutieli
    step-up over ``m`` tests needs ``p_(k) <= k alpha / (m c(m))``: for 720 tests and a lone
    conflict that is ``9.7e-6``, out of reach of any fixed ``P`` that is cheap for all tests. Only
    the tests near the floor need a finer p-value, so this runs stages ``s = 1, 2, ...``: every
    *active* test gets a fresh, independent set of ``P_s`` permutations (seed
    :func:`_stage_seed`; ``P_s = max_permutations / 10^(S - s)`` rounded up, for the ``S`` stages
    with ``P_s >= 2 P_0``), and its p-value is replaced by the new
    ``(1 + n_extreme) / (1 + P_s)``. A test is active at a stage when it is a candidate, at most
    :data:`REFINE_MAX_EXCEEDANCES` null statistics reached its observed one in its last set, and
    it is not yet rejected by the step-up over all ``m`` current p-values (a rejected test stays
    rejected when others' p-values shrink: step-up procedures are monotone). It stops when no
    test is active or after the stage with ``max_permutations``.

    Validity: a test continues only from the event ``{p_s <= 11 / (P_s + 1)}`` of its own
    p-value, and each stage's permutations are independent of everything before, so for every
    ``u``: ``P(final p <= u) <= P(p_s <= u)`` for the stage ``s`` whose floor just covers ``u``,
    which is ``<= u`` under exchangeability. The reported p-values are exact Monte Carlo
    permutation p-values (no fitted tail); the cost is ``O(c n^2 P)`` only for the ``c`` tests
    that need it (tested for calibration on null data, BH and BY, in ``tests/test_stats.py``).

    Args:
        p_values: ``[m]`` first-stage p-values of every test of the family (NaN = untested).
        n_extreme: ``[m]`` their exceedance counts (``ConflictTestResult.n_extreme``).
        n_permutations: permutations ``P_0`` behind ``p_values``.
        gram: ``[c, n, n]`` Gram matrices (:func:`pooled_gram`) of the candidate tests, same
            sample order and ``n_a`` for all.
        candidates: ``[c]`` int64 positions of those tests in ``p_values`` (e.g. from
            :func:`refinement_candidates`); the others are never refined.
        n_a: task-A samples (rows ``0 .. n_a - 1`` of every Gram).
        alpha, method: the FDR level and procedure whose decision drives the refinement.
        max_permutations: largest stage; default :func:`reachable_permutations` of ``m``.
        seed: base seed (the stages use :func:`_stage_seed`).
        statistic: ``"dot"`` (default) or ``"cosine"``; must be the first stage's.
        max_chunk_elements: bound on the float64 elements of one chunk.

    Returns:
        :class:`RefinedPValues`.

    Raises:
        ValueError: mismatched shapes, ``candidates`` out of range, or invalid options.
    """
    _check_options(statistic, n_permutations)
    p = torch.as_tensor(p_values).detach().reshape(-1).to(torch.float64).clone()
    m_all = p.numel()
    extreme = torch.as_tensor(n_extreme, device=p.device).reshape(-1).to(torch.long).clone()
    if extreme.numel() != m_all:
        raise ValueError(f"n_extreme has {extreme.numel()} entries, p_values {m_all}.")
    candidates = torch.as_tensor(candidates, dtype=torch.long).reshape(-1).to(p.device)
    if gram.dim() != 3 or gram.shape[0] != candidates.numel() or gram.shape[1] != gram.shape[2]:
        raise ValueError(
            f"gram must be [c, n, n] with c = {candidates.numel()} candidates, got {tuple(gram.shape)}."
        )
    if candidates.numel() and (int(candidates.min()) < 0 or int(candidates.max()) >= m_all):
        raise ValueError(f"candidates must index the {m_all} p-values.")
    n = gram.shape[1]
    if not 0 < int(n_a) < n and candidates.numel():
        raise ValueError(f"n_a must lie in (0, {n}), got {n_a}.")
    permutations = torch.full_like(extreme, int(n_permutations))
    num_tested = int((~torch.isnan(p)).sum())
    if max_permutations is None:
        max_permutations = reachable_permutations(max(num_tested, 1), alpha, method)
    max_permutations = int(max_permutations)
    gram = gram.detach().to(torch.float64)
    gram = torch.where(torch.isfinite(gram), gram, 0.0)
    stage = 0
    for size in _stage_sizes(int(n_permutations), max_permutations) if candidates.numel() else []:
        rejected = fdr_correct(p, method) <= alpha  # [m], NaN compares False
        active = (extreme[candidates] <= REFINE_MAX_EXCEEDANCES) & ~rejected[candidates]
        if not bool(active.any()):
            break
        stage += 1
        rows = active.nonzero().reshape(-1).to(gram.device)
        counts = _count_extreme(
            gram.index_select(0, rows),
            int(n_a),
            size,
            _stage_seed(seed, stage),
            statistic,
            max_chunk_elements,
        ).to(p.device)
        where = candidates[active]
        extreme[where] = counts
        permutations[where] = size
        p[where] = (1.0 + counts.to(torch.float64)) / (1.0 + size)
    return RefinedPValues(p_values=p, permutations=permutations, n_extreme=extreme, stages=stage)


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

"""Tests of fisher_callbacks.stats: FDR step-up adjustments and the permutation conflict test."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fisher_callbacks.stats import (
    REFINE_MAX_EXCEEDANCES,
    ConflictTestResult,
    benjamini_hochberg,
    benjamini_yekutieli,
    conflict_significance,
    fdr_correct,
    gram_conflict_test,
    permutation_conflict_test,
    pooled_gram,
    reachable_permutations,
    refine_p_values,
    refinement_candidates,
)

# --------------------------------------------------------------------------------------------------
# Slow references
# --------------------------------------------------------------------------------------------------


def slow_step_up(p: list[float], by: bool) -> list[float]:
    """Textbook step-up adjustment with Python loops; NaN entries are untested (q = NaN)."""
    tested = [i for i, v in enumerate(p) if not math.isnan(v)]
    m = len(tested)
    c_m = sum(1.0 / i for i in range(1, m + 1)) if by else 1.0
    order = sorted(tested, key=lambda i: p[i])
    q = [math.nan] * len(p)
    for rank, i in enumerate(order, start=1):
        best = 1.0
        for k in range(rank, m + 1):
            best = min(best, p[order[k - 1]] * m * c_m / k)
        q[i] = best
    return q


def reference_conflict_test(
    x_a: torch.Tensor, x_b: torch.Tensor, n_permutations: int, seed: int
) -> dict[str, torch.Tensor]:
    """Loop over tests and permutations, with the permutation scheme the docstring documents."""
    n_a, num_tests, _ = x_a.shape
    n_b = x_b.shape[0]
    u = torch.rand(
        (n_permutations, n_a + n_b),
        generator=torch.Generator().manual_seed(seed),
        dtype=torch.float64,
    )
    pooled = torch.cat([x_a, x_b]).double()
    out = {k: torch.zeros(num_tests, dtype=torch.float64) for k in ("stat", "p", "eff", "mu", "sd")}
    for t in range(num_tests):
        xs = pooled[:, t]  # [n, d]

        def cosine(idx_a: torch.Tensor, idx_b: torch.Tensor, xs: torch.Tensor = xs) -> float:
            m_a, m_b = xs[idx_a].mean(0), xs[idx_b].mean(0)
            return float(torch.dot(m_a, m_b) / (m_a.norm() * m_b.norm()))

        observed = cosine(torch.arange(n_a), torch.arange(n_a, n_a + n_b))
        null = []
        for k in range(n_permutations):
            perm = torch.argsort(u[k])  # samples ranked by U: the first n_a go to task A
            null.append(cosine(perm[:n_a], perm[n_a:]))
        null_t = torch.tensor(null, dtype=torch.float64)
        pairs = xs[:n_a] @ xs[n_a:].T  # [n_a, n_b]
        out["stat"][t] = observed
        out["p"][t] = (1 + sum(v <= observed + 1e-12 for v in null)) / (1 + n_permutations)
        out["eff"][t] = -pairs.mean() / pairs.std(correction=0)
        out["mu"][t] = null_t.mean()
        out["sd"][t] = null_t.std(correction=0)
    return out


def gaussian_tasks(
    generator: torch.Generator,
    n_a: int,
    n_b: int,
    num_tests: int,
    dim: int,
    conflict: torch.Tensor | None = None,
    strength: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both tasks ~ N(mu_t, I); where ``conflict`` is True task B has mean ``-strength * mu_t``."""
    mu = torch.randn(num_tests, dim, generator=generator)  # [T, d]
    mu_b = mu.clone()
    if conflict is not None:
        mu_b[conflict] = -strength * mu[conflict]
    x_a = mu + torch.randn(n_a, num_tests, dim, generator=generator)  # [n_a, T, d]
    x_b = mu_b + torch.randn(n_b, num_tests, dim, generator=generator)  # [n_b, T, d]
    return x_a, x_b


# --------------------------------------------------------------------------------------------------
# Benjamini-Hochberg / Benjamini-Yekutieli
# --------------------------------------------------------------------------------------------------


def test_bh_by_hand_computed() -> None:
    p = torch.tensor([0.01, 0.04, 0.03, 0.005], dtype=torch.float64)
    # sorted .005 .01 .03 .04 -> m p / k = .02 .02 .04 .04
    torch.testing.assert_close(benjamini_hochberg(p), torch.tensor([0.02, 0.04, 0.04, 0.02]).double())
    c4 = 1 + 1 / 2 + 1 / 3 + 1 / 4
    torch.testing.assert_close(benjamini_yekutieli(p), c4 * torch.tensor([0.02, 0.04, 0.04, 0.02]).double())
    # The step-up minimum: raw m p / k = .03 .03 .021 -> all .021.
    torch.testing.assert_close(benjamini_hochberg(torch.tensor([0.01, 0.02, 0.021])), torch.full((3,), 0.021))
    # R: p.adjust(c(.01, .02, .03, .04, .05), "BY") = 0.1141667 (all five).
    five = torch.tensor([0.01, 0.02, 0.03, 0.04, 0.05], dtype=torch.float64)
    torch.testing.assert_close(benjamini_hochberg(five), torch.full((5,), 0.05).double())
    torch.testing.assert_close(benjamini_yekutieli(five), torch.full((5,), 0.11416666666666667).double())
    # Clipped at 1.
    assert benjamini_yekutieli(torch.tensor([0.9, 0.95])).tolist() == [1.0, 1.0]


def test_fdr_shapes_nan_and_dtypes() -> None:
    p = torch.tensor([[0.01, math.nan], [0.04, 0.03]], dtype=torch.float32)
    q = benjamini_hochberg(p)
    assert q.shape == p.shape
    assert q.dtype == torch.float32
    assert math.isnan(q[0, 1])
    # NaN is left out of m: same as adjusting the three tested values alone.
    torch.testing.assert_close(q[~torch.isnan(q)], benjamini_hochberg(torch.tensor([0.01, 0.04, 0.03])))
    assert benjamini_yekutieli(torch.tensor([])).numel() == 0
    assert torch.isnan(benjamini_yekutieli(torch.full((3,), math.nan))).all()
    assert benjamini_hochberg(torch.tensor([0, 1])).dtype == torch.get_default_dtype()


def test_fdr_correct_dispatch_and_errors() -> None:
    p = torch.tensor([0.001, 0.02, 0.3])
    torch.testing.assert_close(fdr_correct(p), benjamini_yekutieli(p))
    torch.testing.assert_close(fdr_correct(p, "BH"), benjamini_hochberg(p))
    with pytest.raises(ValueError, match="Unknown FDR method"):
        fdr_correct(p, "bonferroni")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        benjamini_hochberg(torch.tensor([0.2, 1.5]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        benjamini_yekutieli(torch.tensor([-0.1]))


p_lists = st.lists(
    st.one_of(
        st.floats(min_value=0.0, max_value=1.0),
        st.sampled_from([0.0, 0.01, 0.05, 1.0]),  # ties
        st.just(math.nan),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(p_lists)
def test_fdr_matches_slow_reference(p: list[float]) -> None:
    t = torch.tensor(p, dtype=torch.float64)
    for by, fn in ((False, benjamini_hochberg), (True, benjamini_yekutieli)):
        expected = torch.tensor(slow_step_up(p, by), dtype=torch.float64)
        torch.testing.assert_close(fn(t), expected, equal_nan=True, rtol=1e-12, atol=1e-15)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=60))
def test_fdr_matches_scipy(p: list[float]) -> None:
    """SciPy's ``false_discovery_control`` (BH and BY) as the independent reference."""
    from scipy.stats import false_discovery_control

    t = torch.tensor(p, dtype=torch.float64)
    for method, fn in (("bh", benjamini_hochberg), ("by", benjamini_yekutieli)):
        expected = torch.from_numpy(false_discovery_control(p, method=method))
        torch.testing.assert_close(fn(t), expected, rtol=1e-12, atol=1e-15)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=60))
def test_fdr_properties(p: list[float]) -> None:
    t = torch.tensor(p, dtype=torch.float64)
    bh, by = benjamini_hochberg(t), benjamini_yekutieli(t)
    for q in (bh, by):
        assert (q >= t).all()
        assert (q <= 1).all()
        # Monotone: a smaller p never gets a larger q.
        order = torch.argsort(t)
        assert (q[order].diff() >= 0).all()
    assert (by >= bh).all()


# --------------------------------------------------------------------------------------------------
# Permutation conflict test
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_chunk_elements", [2**24, 60])
def test_permutation_test_matches_slow_reference(max_chunk_elements: int) -> None:
    g = torch.Generator().manual_seed(3)
    conflict = torch.tensor([True, False, False, True, False, False])
    x_a, x_b = gaussian_tasks(g, n_a=5, n_b=7, num_tests=6, dim=3, conflict=conflict)
    res = permutation_conflict_test(
        x_a, x_b, n_permutations=40, seed=11, max_chunk_elements=max_chunk_elements
    )
    ref = reference_conflict_test(x_a, x_b, n_permutations=40, seed=11)
    assert isinstance(res, ConflictTestResult)
    assert res.n_permutations == 40
    assert res.statistic.dtype == torch.float32
    torch.testing.assert_close(res.statistic.double(), ref["stat"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.p_values.double(), ref["p"], rtol=0, atol=1e-7)
    torch.testing.assert_close(res.effect_size.double(), ref["eff"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.null_mean.double(), ref["mu"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.null_std.double(), ref["sd"], rtol=1e-5, atol=1e-6)
    assert not res.degenerate.any()


def test_statistic_is_cosine_of_task_means_and_p_reproducible() -> None:
    g = torch.Generator().manual_seed(0)
    x_a, x_b = gaussian_tasks(g, n_a=9, n_b=6, num_tests=30, dim=5)
    x_a, x_b = x_a.double(), x_b.double()
    res = permutation_conflict_test(x_a, x_b, n_permutations=99, seed=5)
    expected = torch.nn.functional.cosine_similarity(x_a.mean(0), x_b.mean(0), dim=-1)
    torch.testing.assert_close(res.statistic, expected)
    assert res.p_values.dtype == torch.float64
    # p on the grid k / (P + 1), k = 1 .. P + 1.
    k = res.p_values * 100
    torch.testing.assert_close(k, k.round())
    assert (res.p_values >= 1 / 100).all()
    assert (res.p_values <= 1).all()
    again = permutation_conflict_test(x_a, x_b, n_permutations=99, seed=5)
    assert torch.equal(res.p_values, again.p_values)
    assert torch.equal(res.null_mean, again.null_mean)
    other = permutation_conflict_test(x_a, x_b, n_permutations=99, seed=6)
    assert not torch.equal(res.null_mean, other.null_mean)
    # Scale invariance of the cosine statistic and of the effect size (per test scaling).
    scale = torch.rand(1, 30, 1, generator=g, dtype=torch.float64) * 10 + 0.1
    scaled = permutation_conflict_test(x_a * scale, x_b * scale, n_permutations=99, seed=5)
    torch.testing.assert_close(scaled.p_values, res.p_values)
    torch.testing.assert_close(scaled.effect_size, res.effect_size)


def test_dot_statistic() -> None:
    g = torch.Generator().manual_seed(1)
    x_a, x_b = gaussian_tasks(g, n_a=8, n_b=8, num_tests=10, dim=4)
    res = permutation_conflict_test(x_a.double(), x_b.double(), n_permutations=50, statistic="dot")
    torch.testing.assert_close(res.statistic, (x_a.mean(0) * x_b.mean(0)).sum(-1).double())


def test_planted_conflict_is_found_only_where_planted() -> None:
    g = torch.Generator().manual_seed(7)
    num_tests = 40
    conflict = torch.zeros(num_tests, dtype=torch.bool)
    conflict[[2, 9, 17, 30, 31]] = True
    x_a, x_b = gaussian_tasks(g, 16, 16, num_tests, dim=32, conflict=conflict)
    res = permutation_conflict_test(x_a, x_b, n_permutations=999, seed=0)
    assert (res.statistic[conflict] < -0.8).all()
    assert (res.p_values[conflict] <= 2 / 1000).all()
    assert (res.effect_size[conflict] > 0.5).all()
    # Same distribution elsewhere: aligned means, negative effect (synergy), large p.
    assert (res.effect_size[~conflict] < 0).all()
    assert res.p_values[~conflict].median() > 0.2
    sig = conflict_significance(res.p_values, res.effect_size, alpha=0.05)
    assert torch.equal(sig["significant"], conflict)


def test_orthogonal_tasks_are_not_conflicts() -> None:
    """Different but orthogonal task means: the null is rejected, the effect size stays ~0."""
    g = torch.Generator().manual_seed(2)
    num_tests, dim = 20, 16
    mu = torch.zeros(num_tests, dim)
    nu = torch.zeros(num_tests, dim)
    mu[:, 0], nu[:, 1] = 1.5, 1.5
    x_a = mu + torch.randn(64, num_tests, dim, generator=g)
    x_b = nu + torch.randn(64, num_tests, dim, generator=g)
    res = permutation_conflict_test(x_a, x_b, n_permutations=499)
    assert (res.p_values <= 0.01).all()  # exchangeability is rejected ...
    # ... but the pairs do not conflict: the effect is noise around 0 (sd ~0.04 here).
    assert res.effect_size.mean().abs() < 0.05
    assert res.effect_size.abs().max() < 0.2
    assert not conflict_significance(res.p_values, res.effect_size)["significant"].any()


def test_degenerate_inputs_warn_and_give_defined_values() -> None:
    g = torch.Generator().manual_seed(4)
    x_a, x_b = gaussian_tasks(g, 6, 5, num_tests=8, dim=3)
    with pytest.warns(UserWarning, match="no samples"):
        res = permutation_conflict_test(x_a, x_b[:0], n_permutations=20)
    assert res.p_values.tolist() == [1.0] * 8
    assert res.statistic.abs().sum() == 0
    assert res.effect_size.abs().sum() == 0
    assert res.degenerate.all()

    x_a[:, 1] = 0.0  # task A all zero in test 1
    x_a[:3, 5], x_a[3:, 5] = 1.0, -1.0  # task A mean exactly zero in test 5
    x_b[2, 6, 0] = math.nan  # non-finite input in test 6
    x_b[0, 7, 1] = math.inf  # and in test 7
    with pytest.warns(UserWarning, match="4 of 8 conflict tests are degenerate"):
        res = permutation_conflict_test(x_a, x_b, n_permutations=20)
    expected_degenerate = torch.tensor([False, True, False, False, False, True, True, True])
    assert torch.equal(res.degenerate, expected_degenerate)
    for field in (res.statistic, res.p_values, res.effect_size, res.null_mean, res.null_std):
        assert torch.isfinite(field).all()
    assert (res.p_values[expected_degenerate] == 1).all()
    assert (res.effect_size[expected_degenerate] == 0).all()
    assert (res.statistic[expected_degenerate] == 0).all()
    assert (res.p_values[~expected_degenerate] < 1).any()

    # All-zero input: every test degenerate, no NaN.
    with pytest.warns(UserWarning, match="degenerate"):
        zero = permutation_conflict_test(torch.zeros(3, 4, 2), torch.zeros(3, 4, 2), 10)
    assert zero.p_values.tolist() == [1.0] * 4
    # No tests at all: empty outputs, no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        empty = permutation_conflict_test(torch.zeros(3, 0, 2), torch.zeros(2, 0, 2), 10)
    assert empty.p_values.shape == (0,)


def test_single_pair_effect_is_capped_not_infinite() -> None:
    x_a = torch.tensor([[[1.0, 0.0]]])  # [1, 1, 2]
    x_b = torch.tensor([[[-1.0, 0.1]]])
    res = permutation_conflict_test(x_a, x_b, n_permutations=10)
    assert res.effect_size.item() == pytest.approx(1e3)  # one pair: zero std, capped
    assert res.statistic.item() < -0.9


def test_input_validation() -> None:
    x = torch.randn(4, 3, 2)
    with pytest.raises(ValueError, match="statistic"):
        permutation_conflict_test(x, x, statistic="pearson")
    with pytest.raises(ValueError, match="n_permutations"):
        permutation_conflict_test(x, x, n_permutations=0)
    with pytest.raises(ValueError, match=r"\[n, T, d\]"):
        permutation_conflict_test(x[0], x)
    with pytest.raises(ValueError, match="must agree"):
        permutation_conflict_test(x, torch.randn(4, 3, 5))


def test_conflict_significance_rules() -> None:
    p = torch.tensor([0.0001, 0.0001, 0.0001, 0.5, math.nan])
    effect = torch.tensor([0.5, 0.1, -1.0, 2.0, 3.0])
    out = conflict_significance(p, effect, alpha=0.05, min_effect_size=0.2)
    assert out["significant"].tolist() == [True, False, False, False, False]
    torch.testing.assert_close(out["q_values"], benjamini_yekutieli(p), equal_nan=True)
    out_bh = conflict_significance(p, effect, method="bh")
    torch.testing.assert_close(out_bh["q_values"], benjamini_hochberg(p), equal_nan=True)
    with pytest.raises(ValueError, match="differ"):
        conflict_significance(p, effect[:2])
    with pytest.raises(ValueError, match="alpha"):
        conflict_significance(p, effect, alpha=0.0)


# --------------------------------------------------------------------------------------------------
# Calibration over many seeds
# --------------------------------------------------------------------------------------------------

N_RUNS = 200
ALPHA = 0.05
# Monte Carlo slack for a rate estimated from N_RUNS runs: 3 binomial standard deviations at ALPHA.
RUN_SLACK = 3 * math.sqrt(ALPHA * (1 - ALPHA) / N_RUNS)  # ~0.046


@pytest.fixture
def single_thread():
    """Many small calls: one intra-op thread is faster and robust to a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("single_thread")
def test_null_calibration_of_p_values_bh_and_by() -> None:
    """Both tasks from one distribution: p is uniform and neither FDR procedure over-rejects."""
    num_tests, n_perm = 40, 999
    any_bh, any_by, p_all = 0, 0, []
    for seed in range(N_RUNS):
        g = torch.Generator().manual_seed(10_000 + seed)
        x_a, x_b = gaussian_tasks(g, n_a=12, n_b=9, num_tests=num_tests, dim=4)
        res = permutation_conflict_test(x_a, x_b, n_permutations=n_perm, seed=seed)
        p_all.append(res.p_values)
        any_bh += bool((benjamini_hochberg(res.p_values) <= ALPHA).any())
        any_by += bool((benjamini_yekutieli(res.p_values) <= ALPHA).any())
    p = torch.cat(p_all)  # [N_RUNS * num_tests]
    # Under the complete null FDR = P(any discovery) <= alpha. BH with m = 40 rejects at
    # p = 1 / 1000 < alpha / m, so its rate is near alpha and the check has teeth.
    assert any_bh / N_RUNS <= ALPHA + RUN_SLACK
    # BY needs p <= alpha / (m c(m)) = 2.9e-4 < 1 / 1000 here, so it cannot reject; its FDR check
    # with discoveries is test_realised_fdr_with_planted_conflicts.
    assert any_by / N_RUNS <= ALPHA + RUN_SLACK
    # Pooled p-values (8,000, ~0.0025 binomial sd at 0.05; tests of one run share permutations,
    # so allow 0.012 + 0.02 u): valid and not needlessly conservative.
    for u in (0.01, 0.05, 0.2, 0.5):
        frac = (p <= u + 1e-9).float().mean().item()
        assert abs(frac - u) <= 0.012 + 0.02 * u, (u, frac)


@pytest.mark.usefixtures("single_thread")
def test_realised_fdr_with_planted_conflicts() -> None:
    """40 null tests + 10 planted conflicts: mean false discovery proportion <= alpha + slack.

    Discoveries here are ``q <= alpha`` alone: the effect-size filter would remove the null tests
    (same means, so negative effect sizes) and make the check vacuous.
    """
    num_tests, n_runs = 50, 100
    conflict = torch.zeros(num_tests, dtype=torch.bool)
    conflict[:10] = True
    fdp = {"bh": [], "by": []}
    power = {"bh": [], "by": []}
    for seed in range(n_runs):
        g = torch.Generator().manual_seed(20_000 + seed)
        x_a, x_b = gaussian_tasks(g, 12, 12, num_tests, dim=4, conflict=conflict)
        res = permutation_conflict_test(x_a, x_b, n_permutations=999, seed=seed)
        for method in ("bh", "by"):
            sig = fdr_correct(res.p_values, method) <= ALPHA
            fdp[method].append((sig & ~conflict).sum().item() / max(int(sig.sum()), 1))
            power[method].append((sig & conflict).sum().item() / 10)
    # BH's FDR here is <= alpha * 40 / 50 = 0.04 (0.038 measured over 600 runs); the mean FDP of 100
    # runs has sd ~0.01, so allow alpha + 0.02. BY is far below (0.006 over 600 runs).
    assert sum(fdp["bh"]) / n_runs <= ALPHA + 0.02
    assert sum(fdp["by"]) / n_runs <= ALPHA + 0.02
    # Both procedures make discoveries, so the FDR checks are not vacuous (BY is limited by the
    # p-value grid: it needs p <= 0.0022 at 10 discoveries, i.e. at most one null permutation below).
    assert sum(power["bh"]) / n_runs > 0.8
    assert sum(power["by"]) / n_runs > 0.3
    assert sum(fdp["bh"]) > 0  # false discoveries do occur: the bound is what limits them


# --------------------------------------------------------------------------------------------------
# The test from Gram matrices, and significance reachable for many tests
# --------------------------------------------------------------------------------------------------


def test_gram_conflict_test_is_the_permutation_test_from_gram_matrices() -> None:
    g = torch.Generator().manual_seed(8)
    conflict = torch.tensor([True, False, False, True, False])
    x_a, x_b = gaussian_tasks(g, n_a=7, n_b=5, num_tests=5, dim=6, conflict=conflict)
    x_a[0, 2, 1] = math.nan  # one test with a non-finite input
    for statistic in ("cosine", "dot"):
        with pytest.warns(UserWarning, match="degenerate"):
            direct = permutation_conflict_test(x_a, x_b, 60, seed=4, statistic=statistic)
        gram, finite = pooled_gram(x_a, x_b)
        assert gram.shape == (5, 12, 12) and gram.dtype == torch.float64
        assert finite.tolist() == [True, True, False, True, True]
        with pytest.warns(UserWarning, match="degenerate"):
            from_gram = gram_conflict_test(gram, 7, 60, seed=4, statistic=statistic, finite=finite)
        for field in ("statistic", "p_values", "effect_size", "null_mean", "null_std", "degenerate"):
            torch.testing.assert_close(
                getattr(from_gram, field).double(), getattr(direct, field).double(), rtol=1e-6, atol=1e-7
            )
        assert torch.equal(from_gram.n_extreme, direct.n_extreme)
        # p = (1 + n_extreme) / (1 + P) wherever the test ran
        ok = ~direct.degenerate
        torch.testing.assert_close(direct.p_values[ok].double(), (1 + direct.n_extreme[ok]).double() / 61)
    # Any Gram serves: rotating the samples (an orthogonal "sketch" of full rank) changes nothing.
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    xa, xb = x_a[:, [0, 1, 3]].double(), x_b[:, [0, 1, 3]].double()
    plain = gram_conflict_test(pooled_gram(xa, xb)[0], 7, 60, statistic="dot")
    rotated = gram_conflict_test(pooled_gram(xa @ q, xb @ q)[0], 7, 60, statistic="dot")
    torch.testing.assert_close(plain.p_values, rotated.p_values)
    with pytest.raises(ValueError, match=r"\[T, n, n\]"):
        gram_conflict_test(torch.zeros(3, 4, 5), 2)
    with pytest.raises(ValueError, match="n_a"):
        gram_conflict_test(torch.zeros(3, 4, 4), 5)
    with pytest.raises(ValueError, match="finite"):
        gram_conflict_test(torch.zeros(3, 4, 4), 2, finite=torch.ones(2, dtype=torch.bool))


def test_reachability_condition_for_a_30_by_9_model() -> None:
    """On paper: 30 layers x (9 Q + 9 O query heads + 3 K + 3 V KV heads) = 720 tests. A lone test
    at the permutation floor 1 / (P + 1) gets the BY q-value m c(m) / (P + 1), so it is reachable
    iff P + 1 >= m c(m) / alpha = 103,063 at alpha = 0.05; the default P = 200 is 500x short."""
    m, alpha = 30 * (9 + 9 + 3 + 3), 0.05
    c_m = sum(1.0 / i for i in range(1, m + 1))
    assert m == 720 and c_m == pytest.approx(7.1572, abs=1e-4)
    need = m * c_m / alpha
    assert need == pytest.approx(103_063, abs=1)
    lone = torch.ones(m, dtype=torch.float64)
    lone[0] = 1 / 201
    assert m * c_m / 201 > 500 * alpha  # fixed 200 permutations: q of the lone test ~ 25.6 ...
    assert benjamini_yekutieli(lone)[0] == 1.0  # ... capped at 1
    p_max = reachable_permutations(m, alpha)
    assert p_max == math.ceil(2 * need) - 1 == 206_126  # headroom 2: the floor gives q = alpha / 2
    lone[0] = 1 / (p_max + 1)
    assert benjamini_yekutieli(lone)[0] == pytest.approx(alpha / 2, rel=1e-4)
    lone[0] = 1 / (math.ceil(need) - 1)  # one permutation short of the condition
    assert benjamini_yekutieli(lone)[0] > alpha
    assert reachable_permutations(m, alpha, "bh") == math.ceil(2 * m / alpha) - 1
    assert reachable_permutations(1, 1.0) == 1
    for bad in ({"num_tests": 0}, {"num_tests": 5, "alpha": 0.0}, {"num_tests": 5, "method": "x"}):
        with pytest.raises(ValueError):
            reachable_permutations(**bad)


def _refined(x_a, x_b, n_permutations, seed, alpha=0.05, method="by", eligible=None, **kw):
    """First stage on all tests, then refine_p_values on the candidates (the metric's pipeline)."""
    gram, _ = pooled_gram(x_a, x_b)
    first = gram_conflict_test(gram, x_a.shape[0], n_permutations, seed=seed, statistic="dot")
    idx = refinement_candidates(first, eligible).nonzero().reshape(-1)
    out = refine_p_values(
        first.p_values,
        first.n_extreme,
        n_permutations,
        gram[idx],
        idx,
        x_a.shape[0],
        alpha=alpha,
        method=method,
        seed=seed,
        **kw,
    )
    return first, out


def test_refinement_finds_a_lone_planted_conflict_among_720_tests() -> None:
    g = torch.Generator().manual_seed(5)
    m = 720
    conflict = torch.zeros(m, dtype=torch.bool)
    conflict[123] = True
    x_a, x_b = gaussian_tasks(g, 16, 16, m, dim=4, conflict=conflict)
    gram, _ = pooled_gram(x_a, x_b)
    effect = gram_conflict_test(gram, 16, 200, seed=1, statistic="dot").effect_size
    # as the metric does: only tests whose effect size can make them a reported conflict
    first, out = _refined(x_a, x_b, 200, seed=1, eligible=effect >= 0.2)
    assert not (benjamini_yekutieli(first.p_values) <= 0.05).any()  # floor 1/201: unreachable
    q = benjamini_yekutieli(out.p_values)
    assert torch.equal(q <= 0.05, conflict)
    assert out.permutations[123] == reachable_permutations(m) and out.stages >= 1
    assert out.p_values[123] == 1 / (reachable_permutations(m) + 1)
    assert q[123] == pytest.approx(0.025, rel=1e-3)
    # without the effect filter every test near the floor is refined (null ones: ~11 / 201)
    _, unfiltered = _refined(x_a, x_b, 200, seed=1)
    refined = unfiltered.permutations > 200
    assert 5 <= refined.sum() <= 0.1 * m
    assert unfiltered.p_values[123] == out.p_values[123]
    out = unfiltered
    # refined p-values are (1 + n_extreme) / (1 + P) of their own last permutation set
    torch.testing.assert_close(
        out.p_values[refined],
        (1 + out.n_extreme[refined]).double() / (1 + out.permutations[refined]).double(),
    )
    assert torch.equal(out.p_values[~refined], first.p_values[~refined].double())
    assert (first.n_extreme[refined] <= REFINE_MAX_EXCEEDANCES).all()
    # eligible restricts the refinement (e.g. to tests whose effect size can be reported)
    _, none = _refined(x_a, x_b, 200, seed=1, eligible=torch.zeros(m, dtype=torch.bool))
    assert none.stages == 0 and torch.equal(none.p_values, first.p_values.double())


def test_refinement_stops_once_the_decision_is_made() -> None:
    """Sixty strong conflicts among 720: BY rejects them at an intermediate stage already."""
    g = torch.Generator().manual_seed(6)
    m = 720
    conflict = torch.zeros(m, dtype=torch.bool)
    conflict[:60] = True
    x_a, x_b = gaussian_tasks(g, 16, 16, m, dim=4, conflict=conflict, strength=2.0)
    _, out = _refined(x_a, x_b, 200, seed=2)
    found = benjamini_yekutieli(out.p_values) <= 0.05
    assert found[conflict].sum() >= 55  # (a planted mean of small norm is a weak conflict)
    assert (found & ~conflict).sum() <= 3  # BY allows false discoveries (FDR <= 0.05 * 660 / 720)
    # they are rejected at the 2,062-permutation stage (p = 4.8e-4 -> q <= 0.05), so none needs
    # the 206,126 of a lone conflict
    assert int(out.permutations[conflict & found].max()) == 2062


def test_refine_p_values_validation() -> None:
    p, ext = torch.full((4,), 0.5), torch.full((4,), 3)
    same = refine_p_values(p, ext, 20, torch.zeros(0, 6, 6), torch.zeros(0, dtype=torch.long), 3)
    assert same.stages == 0 and torch.equal(same.p_values, p.double())
    assert same.permutations.tolist() == [20] * 4
    with pytest.raises(ValueError, match="n_extreme"):
        refine_p_values(p, ext[:3], 20, torch.zeros(0, 6, 6), torch.zeros(0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="candidates"):
        refine_p_values(p, ext, 20, torch.zeros(1, 6, 6), torch.tensor([4]), 3)
    with pytest.raises(ValueError, match="gram"):
        refine_p_values(p, ext, 20, torch.zeros(2, 6, 6), torch.tensor([1]), 3)
    with pytest.raises(ValueError, match="n_extreme"):
        refinement_candidates(ConflictTestResult(p, p, p, p, p, p.bool(), 20))


@pytest.mark.usefixtures("single_thread")
def test_refined_p_values_keep_null_calibration_in_the_tail() -> None:
    """Null data, 100 tests per run, 50 first-stage permutations refined up to 4,000 (the BH
    reachability for 100 tests): every run's tests near the floor are refined, so the pooled tail
    P(p <= 1e-3) and BH's family-wise rate under the complete null (= its FDR) are tested where
    only the refinement can put p-values."""
    m, runs = 100, 200
    any_bh = any_by = refined = 0
    p_all = []
    for seed in range(runs):
        g = torch.Generator().manual_seed(30_000 + seed)
        x_a, x_b = gaussian_tasks(g, n_a=10, n_b=10, num_tests=m, dim=3)
        _, out = _refined(x_a, x_b, 50, seed=seed, method="bh")
        p_all.append(out.p_values)
        refined += int((out.permutations > 50).sum())
        any_bh += bool((benjamini_hochberg(out.p_values) <= ALPHA).any())
        any_by += bool((benjamini_yekutieli(out.p_values) <= ALPHA).any())
    assert refined > runs * m * 0.1  # ~11 / 51 of the tests get refined
    # Under the complete null BH's FDR is alpha (independent tests): it is met, within slack.
    assert any_bh / runs <= ALPHA + RUN_SLACK
    assert any_bh > 0  # and reached: the refinement gives BH its p <= alpha / m = 5e-4
    assert any_by / runs <= ALPHA + RUN_SLACK
    p = torch.cat(p_all)  # [20,000]
    # 20 expected at u = 1e-3 (binomial sd 4.5), 200 at 1e-2: valid in the tail, not conservative.
    for u, lo, hi in ((1e-3, 6, 34), (1e-2, 155, 245)):
        count = int((p <= u * (1 + 1e-9)).sum())
        assert lo <= count <= hi, (u, count)

"""QK-OV interference between two tasks, per layer, head and attention block (Q, K, V, O).

:class:`QKOVInterferenceMetric` reads the stored signed per-sample gradients and the contribution
Fisher of a :class:`~fisher_callbacks.fisher.FisherCollector` and calls the pure kernels of
:mod:`fisher_callbacks.functional.interference` and :mod:`fisher_callbacks.stats`.

What it reports for task A (samples i) against task B (samples j), per block and ``(layer, head)``
(K and V have ``num_kv_heads`` heads; asked for query head h they use the KV head serving h):

* ``scores[i, j, l, h]``: the per-pair interference of the chosen variant over the head's weight
  slice, with ``D = 1 / (max(I, eps) + lambda)`` and ``I`` task A's Fisher (``fisher="task_a"``) or
  ``(I_A + I_B) / 2`` (``fisher="pooled"``):

  - ``"directional"`` (main): ``M_ij = sum_k C_ik D_k |g_jk|``, how strongly sample i relies on
    the entries that sample j moves;
  - ``"signed"``: ``sum_k g_ik D_k g_jk`` (negative = conflict, positive = synergy);
  - ``"symmetric"``: ``sum_k |g_ik| D_k |g_jk|``.

  ``top_conflicts`` are the largest pair scores (for ``"signed"`` the most negative) with the TRUE
  sample ids.
* ``layer_head_avg``: ``mean_ij scores``. **The averaging trap**: with the default task-A Fisher
  computed from the same task-A samples i (every sample seen is stored, no ``max_samples``),
  ``mean_i M_ij = sum_k I_k D_k |g_jk|`` exactly, and ``I_k D_k ~ 1`` wherever
  ``I_k >> eps + lambda`` (0 where ``I_k = 0``): this map is then mostly the size of task B's
  gradient on task A's support and says little else about task A (tested in
  ``tests/test_interference.py``). Read it together with the two maps where both tasks count:
* ``fisher_overlap``: each task's Fisher slice normalised to unit trace, ``sum_k sqrt(fA_k fB_k)``
  in ``[0, 1]``: 1 = both tasks rely on the same entries in the same proportions, 0 = disjoint.
* ``conflict_cosine``: the task mean gradients compared in the pooled Fisher metric,
  ``gA.D.gB / (|gA|_D |gB|_D)`` with ``D`` from ``(I_A + I_B) / 2``; negative = a step that helps
  one task hurts the other (conflict), 0 = orthogonal or a task without gradient in that head.
* ``p_values``/``q_values``/``effect_size``/``significant``: a permutation test of that conflict
  (task labels shuffled over the pooled samples; the statistic is exactly ``conflict_cosine`` on
  the whitened gradients ``g * sqrt(D)``), Benjamini-Yekutieli (or -Hochberg) q-values over all
  (layer, head, block) tests of the call (p-values refined where needed, see ``p_value``), and
  the standardised mean ``-mean_ij(u_ij) /
  std_ij(u_ij)`` of the signed pair scores ``u_ij = g_i.D.g_j`` as effect size; a cell is a
  significant conflict when ``q <= fdr_alpha`` and ``effect_size >= min_conflict_effect_size``.
  The whitening ``D`` comes from ``(I_A + I_B) / 2``; with equal sample counts and every sample
  stored this is the mean of ``C`` over the pooled samples, invariant under relabelling, and the
  test is exact; otherwise ``D`` is a fixed metric estimated from more samples than are tested.

Store seam: the metric reads per-head views ``[n, H_block, k]`` from ``collector.store``
(:class:`~fisher_callbacks.store.GradientStore`) whose inner products are the signed scores:
the exact store's view is ``g * sqrt(D)`` (``D`` as asked), the sketch store's the per-head sketch
``z`` (whitened by its frozen whitening Fisher at capture time). Signed scores, the conflict
cosine (of the mean views), Gram matrices and the permutation test are inner products of views
in both cases. The directional and symmetric variants need per-entry values
(``store.entrywise``); with a sketch store they are refused with a clear error.

Mean gradients and tests use the stored samples; Fishers use every sample the collector has seen.
All math is fp32 on ``computation_device`` (statistics in float64), chunked over samples so that
one chunk operand holds at most ``max_chunk_elements`` elements.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._validate import check_choice, check_number
from .functional.fisher_ops import ACCUM_DTYPE, fisher_overlap_tensor
from .functional.interference import (
    DEFAULT_MAX_CHUNK_ELEMENTS,
    VARIANTS,
    block_head_scores,
    conflict_cosine,
    inverse_fisher,
    pooled_fisher,
)
from .layouts import BLOCKS, AttentionLayout
from .stats import (
    FDR_METHODS,
    conflict_significance,
    gram_conflict_test,
    pooled_gram,
    reachable_permutations,
    refine_p_values,
    refinement_candidates,
)
from .store import GradientStore, HeadIndex

if TYPE_CHECKING:
    from .fisher import FisherCollector

__all__ = [
    "FISHER_SOURCES",
    "HEAD_MAPS",
    "QKOVHeatmap",
    "QKOVInterferenceMetric",
    "check_metric_options",
]

FISHER_SOURCES: tuple[str, ...] = ("task_a", "pooled")
"""Fisher used for the per-pair scores: task A's, or ``(I_A + I_B) / 2``."""

P_VALUE_METHODS: tuple[str, ...] = ("adaptive", "permutation", "normal")
"""``"adaptive"`` (default): exact permutation p-values, refined with fresh, larger permutation sets
where the FDR decision needs it (:func:`~fisher_callbacks.stats.refine_p_values`), so a lone
conflict can pass BY over all tests; ``"permutation"``: one set of ``n_permutations``, floored at
``1 / (n_permutations + 1)``; ``"normal"``: lower tail of a normal fitted to the permutation null
(mean and std): approximate, and anti-conservative far in the tail, where the skewed null of the
inner product has more mass than the normal."""

HEAD_MAPS: tuple[str, ...] = (
    "layer_head_avg",
    "fisher_overlap",
    "conflict_cosine",
    "p_values",
    "q_values",
    "effect_size",
    "significant",
)
"""Per-block ``[L, H_block]`` maps of a heatmap (the last four only with ``run_stats``)."""


class QKOVHeatmap(dict):
    """Result of :meth:`QKOVInterferenceMetric.compute_heatmap`: ``{block: {...}}`` for Q, K, V, O.

    Keys are exactly the blocks, so ``for block, res in heatmap.items()`` visits the blocks. Each
    ``res`` holds (``n_i``/``n_j`` stored samples of task A/B used, ``L = len(layers)``,
    ``H_block`` = selected heads of the block, ``num_kv_heads``-based for K and V):

    * ``"scores"``: ``[n_i, n_j, L, H_block]`` fp32 per-pair scores;
    * ``"layer_head_avg"``: ``[L, H_block]`` mean over pairs (see the averaging trap);
    * ``"fisher_overlap"``, ``"conflict_cosine"``: ``[L, H_block]`` head maps;
    * ``"p_values"``, ``"q_values"``, ``"effect_size"`` ``[L, H_block]`` fp32 and ``"significant"``
      ``[L, H_block]`` bool (only when statistics ran);
    * ``"top_conflicts"``: list of ``{"sample_i", "sample_j", "layer", "head", "query_heads",
      "score"}``, strongest first, TRUE sample ids; ``head`` is the block's head index (the KV head
      for K/V) and ``query_heads`` the query heads it serves;
    * ``"sample_ids_a"``, ``"sample_ids_b"``: TRUE ids of the rows/columns of ``scores``;
    * ``"layers"``, ``"heads"``: layer and block-head indices of the map rows/columns.

    All tensors are on the CPU. The attributes record how the heatmap was computed.

    Attributes:
        task_a, task_b: the two tasks.
        variant: score variant; fisher_source: ``"task_a"`` or ``"pooled"``.
        num_fisher_samples: ``{task: samples in its Fisher}``.
        stats: ``None`` or ``{"n_permutations", "p_value", "max_permutations", "num_refined"
            (tests whose p-value comes from a refinement stage), "refinement_stages",
            "test_statistic", "fdr_method", "fdr_alpha", "min_conflict_effect_size", "seed",
            "num_tests", "num_degenerate"}``.
        store: what the views were (``GradientStore.describe``: ``{"kind": "exact" | "sketch",
            ...}``; for sketches the dim and whitening versions).
    """

    def __init__(
        self,
        blocks: Mapping[str, dict[str, Any]],
        *,
        task_a: str,
        task_b: str,
        variant: str,
        fisher_source: str,
        num_fisher_samples: dict[str, int],
        stats: dict[str, Any] | None,
        store: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(blocks)
        self.store = store or {"kind": "exact"}
        self.task_a = task_a
        self.task_b = task_b
        self.variant = variant
        self.fisher_source = fisher_source
        self.num_fisher_samples = num_fisher_samples
        self.stats = stats


def check_metric_options(
    *,
    epsilon: float = 1e-10,
    ridge_lambda: float = 1e-8,
    variant: str = "directional",
    fisher: str = "task_a",
    n_permutations: int = 200,
    fdr_alpha: float = 0.05,
    fdr_method: str = "by",
    min_conflict_effect_size: float = 0.2,
    top_k: int = 10,
    p_value: str = "adaptive",
    test_statistic: str = "dot",
    max_permutations: int | None = None,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> None:
    """Check the options of :class:`QKOVInterferenceMetric` (a ``ValueError``/``TypeError`` that
    names the argument, with a "did you mean" for a misspelt option); the monitor calls it in its
    constructor so that a bad setting fails at once, not at the first boundary."""
    check_number("epsilon", epsilon, low=0.0)
    check_number("ridge_lambda", ridge_lambda, low=0.0)
    if epsilon + ridge_lambda <= 0:
        raise ValueError(
            f"need epsilon + ridge_lambda > 0, got epsilon={epsilon}, ridge_lambda={ridge_lambda}"
        )
    check_choice("variant", variant, VARIANTS)
    check_choice("fisher", fisher, FISHER_SOURCES)
    check_choice("fdr_method", fdr_method, FDR_METHODS)
    check_choice("p_value", p_value, P_VALUE_METHODS)
    check_choice("test_statistic", test_statistic, ("dot", "cosine"))
    check_number("fdr_alpha", fdr_alpha, low=0.0, high=1.0, low_open=True)
    check_number("n_permutations", n_permutations, low=1, integer=True)
    check_number("max_permutations", max_permutations, low=1, integer=True, optional=True)
    check_number("min_conflict_effect_size", min_conflict_effect_size)  # -inf: the filter off
    check_number("top_k", top_k, low=0, integer=True)
    check_number("max_chunk_elements", max_chunk_elements, low=1, integer=True)


@dataclass
class _Pair:
    """The two tasks of one heatmap: TRUE ids of the stored rows used and their Fishers."""

    task_a: str
    task_b: str
    ids_a: list
    ids_b: list
    fisher_a: dict[str, Tensor]  # {} without samples
    fisher_b: dict[str, Tensor]

    @property
    def sides(self) -> tuple[tuple[str, int], tuple[str, int]]:
        """``((task_a, n_a), (task_b, n_b))``: the first ``n`` stored rows of each task are used."""
        return (self.task_a, len(self.ids_a)), (self.task_b, len(self.ids_b))

    @property
    def empty(self) -> bool:
        """A task has no stored sample: zero maps, no test."""
        return not self.ids_a or not self.ids_b


@dataclass
class _BlockMaps:
    """The maps of one block as :meth:`QKOVInterferenceMetric._fill_layer` fills them, one layer
    (row ``li``) at a time. ``p_values`` 1, ``effect`` 0, ``extreme`` 0 mean untested."""

    block: str
    hsel: Tensor  # [Hb] block heads
    scores: Tensor  # [n_a, n_b, L, Hb] fp32 on the computation device
    overlap: Tensor  # [L, Hb] fp32
    cosine: Tensor  # [L, Hb] fp32
    p_values: Tensor  # [L, Hb] float64
    effect: Tensor  # [L, Hb] float64
    extreme: Tensor  # [L, Hb] long: permutations at least as extreme

    @classmethod
    def zeros(
        cls, block: str, block_heads: list[int], pair: _Pair, n_layers: int, device: torch.device
    ) -> _BlockMaps:
        (_, n_a), (_, n_b) = pair.sides
        n_h = len(block_heads)
        return cls(
            block=block,
            hsel=torch.tensor(block_heads, dtype=torch.long),
            scores=torch.zeros(n_a, n_b, n_layers, n_h, dtype=ACCUM_DTYPE, device=device),
            overlap=torch.zeros(n_layers, n_h, dtype=ACCUM_DTYPE),
            cosine=torch.zeros(n_layers, n_h, dtype=ACCUM_DTYPE),
            p_values=torch.ones(n_layers, n_h, dtype=torch.float64),
            effect=torch.zeros(n_layers, n_h, dtype=torch.float64),
            extreme=torch.zeros(n_layers, n_h, dtype=torch.long),
        )

    def not_monitored(self, li: int) -> None:
        """Row ``li`` is a block without adapter or frozen: NaN everywhere, untested."""
        for t in (
            self.scores[:, :, li],
            self.overlap[li],
            self.cosine[li],
            self.p_values[li],
            self.effect[li],
        ):
            t.fill_(math.nan)


@dataclass
class _TestFamily:
    """Every (layer, head, block) conflict test of one heatmap, for one FDR over all of them."""

    # (block, p [L, Hb], effect [L, Hb], n_extreme [L, Hb]) per block
    parts: list[tuple[str, Tensor, Tensor, Tensor]] = field(default_factory=list)
    # refinement candidates (block, li, heads [c], Gram [c, n, n]) of p_value="adaptive"
    refine: list[tuple[str, int, Tensor, Tensor]] = field(default_factory=list)
    num_degenerate: int = 0


class QKOVInterferenceMetric:
    """Sample-pair and head-map QK-OV interference between tasks stored in a collector.

    Args:
        layout: the attention layout (``None``: ``collector.layout``).
        collector: a :class:`~fisher_callbacks.fisher.FisherCollector` (or an object with a
            ``store`` (:class:`~fisher_callbacks.store.GradientStore`), ``fisher`` and
            ``num_samples``).
        epsilon: floor of the Fisher in ``D = 1 / (max(I, epsilon) + ridge_lambda)``.
        ridge_lambda: ridge of ``D``; ``epsilon + ridge_lambda`` must be > 0.
        min_samples_for_fisher: warn when a task's Fisher has fewer samples.
        variant: ``"directional"`` (default), ``"signed"`` or ``"symmetric"`` (module docstring).
        fisher: Fisher of the per-pair scores: ``"task_a"`` (default) or ``"pooled"``. The head
            maps ``conflict_cosine`` and the tests always use the pooled Fisher.
        computation_device: ``"cpu"`` (default), ``"cuda"`` (``"cuda:1"``...) or ``"auto"``.
        n_permutations: permutations of the first stage of the conflict test, for every test (its
            smallest p-value is ``1 / (1 + n_permutations)``; ``p_value="adaptive"`` refines the
            tests near that floor).
        max_permutations: largest refinement stage of ``p_value="adaptive"``; default ``None``:
            :func:`~fisher_callbacks.stats.reachable_permutations` of the call's number of tests
            ``m``, ``ceil(2 m c(m) / fdr_alpha)`` with ``c(m) = sum_{i<=m} 1/i`` for BY (206,126
            for the 720 tests of a 30-layer model with 9 query and 3 KV heads), so that a lone
            conflict reaches ``q = fdr_alpha / 2``.
        fdr_alpha: false discovery rate of ``significant``.
        fdr_method: ``"by"`` (Benjamini-Yekutieli, default) or ``"bh"``.
        min_conflict_effect_size: smallest effect size reported as a significant conflict.
        top_k: entries of ``top_conflicts`` per block.
        seed: seed of the permutations (reproducible, same on every device).
        run_stats: run the permutation tests in :meth:`compute_heatmap`.
        p_value: ``"adaptive"`` (default: exact permutation p-values; the tests with at most 10
            null statistics at or below the observed one, an effect size of at least
            ``min_conflict_effect_size`` and not yet significant get fresh permutation sets of
            ``max_permutations / 10^j`` up to ``max_permutations``, until BY over all tests no
            longer depends on the floor; tested for calibration on null data), ``"permutation"``
            (one set; floored at ``1 / (n_permutations + 1)``, so BY over m tests can flag k
            conflicts only when ``m c(m) / (k (n_permutations + 1)) <= fdr_alpha``) or
            ``"normal"`` (lower tail of a normal fitted to the permutation null's mean and std:
            approximate, no floor, anti-conservative in the far tail).
        test_statistic: statistic of the permutation test: ``"dot"`` (default), the Fisher inner
            product ``gA^T D gB`` of the task mean gradients (the numerator of ``conflict_cosine``),
            or ``"cosine"`` itself. The cosine is scale-free, which costs it all power exactly for
            strong conflicts: when the two tasks' gradients are nearly opposite, every random
            relabelling also yields nearly opposite group means (cosine ~ -1), so the observed
            -1 is not extreme. The dot product shrinks under relabelling and keeps that power.
        max_chunk_elements: bound on the elements of one chunk operand (fp32 elements).

    Raises:
        ValueError: an invalid option, or a device that is not available.
    """

    def __init__(
        self,
        layout: AttentionLayout | None,
        collector: FisherCollector,
        epsilon: float = 1e-10,
        ridge_lambda: float = 1e-8,
        min_samples_for_fisher: int = 10,
        variant: str = "directional",
        fisher: str = "task_a",
        computation_device: str | torch.device = "cpu",
        *,
        n_permutations: int = 200,
        fdr_alpha: float = 0.05,
        fdr_method: str = "by",
        min_conflict_effect_size: float = 0.2,
        top_k: int = 10,
        seed: int = 0,
        run_stats: bool = True,
        p_value: str = "adaptive",
        test_statistic: str = "dot",
        max_permutations: int | None = None,
        max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
    ) -> None:
        check_metric_options(
            epsilon=epsilon,
            ridge_lambda=ridge_lambda,
            variant=variant,
            fisher=fisher,
            n_permutations=n_permutations,
            fdr_alpha=fdr_alpha,
            fdr_method=fdr_method,
            min_conflict_effect_size=min_conflict_effect_size,
            top_k=top_k,
            p_value=p_value,
            test_statistic=test_statistic,
            max_permutations=max_permutations,
            max_chunk_elements=max_chunk_elements,
        )
        self.layout = layout if layout is not None else collector.layout
        self.collector = collector
        self.epsilon = float(epsilon)
        self.ridge_lambda = float(ridge_lambda)
        self.min_samples_for_fisher = int(min_samples_for_fisher)
        self.variant = variant
        self.fisher_source = fisher
        self.device = _resolve_device(computation_device)
        self.n_permutations = int(n_permutations)
        self.max_permutations = None if max_permutations is None else int(max_permutations)
        self.fdr_alpha = float(fdr_alpha)
        self.fdr_method = fdr_method
        self.min_conflict_effect_size = float(min_conflict_effect_size)
        self.top_k = int(top_k)
        self.seed = int(seed)
        self.run_stats = bool(run_stats)
        self.p_value = p_value
        self.test_statistic = test_statistic
        self.max_chunk_elements = int(max_chunk_elements)

        self.index = HeadIndex(self.layout)
        store = self.store
        if store is not None and not store.entrywise and variant != "signed":
            raise ValueError(
                f"variant={variant!r} needs per-entry gradients (C_i = g_i**2 or |g|), which the "
                f"{store.kind!r} store does not keep (a linear sketch preserves inner products "
                "only): use variant='signed' (the head maps and tests are the same for every "
                "variant) or store='exact'"
            )

    @property
    def store(self) -> GradientStore | None:
        """The collector's gradient store (the one seam the metric reads samples through)."""
        return getattr(self.collector, "store", None)

    # ------------------------------------------------------------------ one slice
    def compute_block_head_score(
        self,
        grad_i: Tensor,
        grad_j: Tensor,
        fisher: Tensor,
        layer: int,
        head: int,
        block: str,
        param_name: str | None = None,
        bias: bool = False,
    ) -> float:
        """Score of one (sample i, sample j, layer, head, block) over one parameter's head slice.

        Args:
            grad_i: signed gradient ``g_i`` of the task-A sample (its contribution is
                ``C_i = g_i ** 2``), full parameter shape.
            grad_j: signed gradient ``g_j`` of the task-B sample, full parameter shape.
            fisher: the Fisher ``I`` of the metric (task A's or pooled), full parameter shape.
            layer: layer index.
            head: QUERY head index (for K/V the serving KV head is sliced).
            block: ``"Q"``, ``"K"``, ``"V"`` or ``"O"``.
            param_name: the parameter (default: the block's weight; its bias with ``bias``).
            bias: score the Q/K/V bias slice instead of the weight (``include_bias`` layouts).

        Returns:
            The variant's score as a Python float.

        Raises:
            ValueError: ``grad_i``, ``grad_j`` and ``fisher`` (or their head slices) do not have the
                parameter's shape; the message names parameter, layer, head and block.
        """
        spec = self.layout.spec(layer, block)
        default = spec.bias if bias else spec.param
        name = param_name or default
        if name != default:
            raise ValueError(
                f"parameter {name!r} is not the {'bias' if bias else 'weight'} of block {block} "
                f"of layer {layer} ({default!r})"
            )
        if default is None:
            raise ValueError(f"block {block} of layer {layer} has no per-head bias")
        expected = tuple(self.layout.param_shapes[name])
        shapes = (tuple(grad_i.shape), tuple(grad_j.shape), tuple(fisher.shape))
        if not shapes[0] == shapes[1] == shapes[2] == expected:
            raise ValueError(_mismatch(name, layer, head, block, shapes, f"parameter {expected}"))
        s_i = self.layout.head_slice(grad_i, layer, head, block, bias=bias)
        s_j = self.layout.head_slice(grad_j, layer, head, block, bias=bias)
        s_f = self.layout.head_slice(fisher, layer, head, block, bias=bias)
        sliced = (tuple(s_i.shape), tuple(s_j.shape), tuple(s_f.shape))
        if not sliced[0] == sliced[1] == sliced[2]:
            raise ValueError(_mismatch(name, layer, head, block, sliced, "equal head slices"))
        dev = self.device
        inv = inverse_fisher(s_f.to(dev), self.epsilon, self.ridge_lambda).reshape(1, -1)
        score = block_head_scores(
            s_i.to(dev).reshape(1, 1, -1), s_j.to(dev).reshape(1, 1, -1), inv, self.variant
        )
        return float(score[0, 0, 0])

    # ------------------------------------------------------------------ one pair
    def compute_sample_pair(
        self,
        task_a: str,
        sample_i: Any,
        task_b: str,
        sample_j: Any,
        layer: int,
        head: int,
    ) -> dict[str, float]:
        """Interference of one task-A sample with one task-B sample in one layer and query head.

        Args:
            task_a, task_b: task names in the collector.
            sample_i, sample_j: TRUE sample ids (as given to ``collect``/``add_gradients``).
            layer: layer index.
            head: query head index; K and V use the KV head serving it (GQA/MQA).

        Returns:
            ``{"Q": float, "K": float, "V": float, "O": float}`` (weight plus bias slices when the
            layout includes biases).

        Raises:
            KeyError: a sample id that is not stored (the message names task and id).
        """
        if not 0 <= head < self.layout.num_heads:
            raise IndexError(f"head {head} out of range [0, {self.layout.num_heads})")
        self._check_layers([layer])
        store = self._require_store()
        row_i = torch.tensor([store.row_of(task_a, sample_i)])
        row_j = torch.tensor([store.row_of(task_b, sample_j)])
        fisher_a = self._fisher(task_a)
        fisher_b = self._fisher(task_b) if self.fisher_source == "pooled" else {}
        out: dict[str, float] = {}
        for block in BLOCKS:
            if not self.layout.is_monitored(layer, block):  # no adapter / frozen
                out[block] = math.nan
                continue
            hsel = torch.tensor([self.layout.block_head(head, block)])
            fa = self.index.gather(fisher_a, layer, block, hsel, owner=f"task {task_a!r} (Fisher)")
            if self.fisher_source == "pooled":
                fb = self.index.gather(fisher_b, layer, block, hsel, owner=f"task {task_b!r} (Fisher)")
                fa = pooled_fisher(fa, fb)
            inv = inverse_fisher(fa, self.epsilon, self.ridge_lambda).to(self.device)  # [1, k]
            v_i = store.head_view(task_a, layer, block, hsel, inv, row_i, self.device)  # [1, 1, k]
            v_j = store.head_view(task_b, layer, block, hsel, inv, row_j, self.device)
            out[block] = float(self._scores(v_i, v_j, inv)[0, 0, 0])
        return out

    # ------------------------------------------------------------------ heatmap
    def compute_heatmap(
        self,
        task_a: str,
        task_b: str,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        max_samples: int | None = None,
    ) -> QKOVHeatmap:
        """All pairs, layers and heads of the four blocks, plus head maps and conflict tests.

        Per (layer, block) the stored gradients of both tasks are gathered per head
        (``[n, H_block, k]``, one ``index_select`` over positions from ``layout.head_view``) and
        scored with one batched matmul per sample chunk
        (:func:`~fisher_callbacks.functional.interference.block_head_scores`); nothing loops over
        pairs or heads in Python.

        Args:
            task_a: the task whose samples are ``i`` (and whose Fisher normalises by default).
            task_b: the task whose samples are ``j``.
            layers: layer indices (default all).
            heads: QUERY head indices (default all; sorted, duplicates dropped); K and V keep the
                KV heads serving them.
            max_samples: use at most this many stored samples per task (the first ones stored).

        Returns:
            :class:`QKOVHeatmap` (see there for the entries). A task without stored samples gives
            zero-sized ``scores``, zero maps (``p_values``/``q_values`` 1, nothing significant; the
            Fisher overlap is still computed when both Fishers exist) and a warning; never NaN.
        """
        layout = self.layout
        layers = self._check_layers(layers)
        heads = self._check_heads(heads)
        store = self._require_store()
        ids_a, ids_b = self._stored(task_a, max_samples), self._stored(task_b, max_samples)
        pair = _Pair(task_a, task_b, ids_a, ids_b, self._fisher(task_a), self._fisher(task_b))
        if pair.empty:
            warnings.warn(
                f"QK-OV heatmap {task_a!r} vs {task_b!r}: no stored samples for "
                f"{' and '.join(repr(t) for t, n in pair.sides if n == 0)}; returning zero maps",
                stacklevel=2,
            )
        tests = _TestFamily()
        blocks = {
            block: self._block_heatmap(
                store, pair, layers, block, sorted({layout.block_head(h, block) for h in heads}), tests
            )
            for block in BLOCKS
        }
        stats_info = self._significance(blocks, tests, pair.empty, len(ids_a)) if self.run_stats else None
        return QKOVHeatmap(
            blocks,
            task_a=task_a,
            task_b=task_b,
            variant=self.variant,
            fisher_source=self.fisher_source,
            num_fisher_samples={
                task_a: self.collector.num_samples(task_a),
                task_b: self.collector.num_samples(task_b),
            },
            stats=stats_info,
            store=store.describe(task_a, task_b),
        )

    def _block_heatmap(
        self,
        store: GradientStore,
        pair: _Pair,
        layers: list[int],
        block: str,
        block_heads: list[int],
        tests: _TestFamily,
    ) -> dict[str, Any]:
        """One block's entry of the heatmap (see :class:`QKOVHeatmap`), layer by layer; its
        tests join ``tests``."""
        maps = _BlockMaps.zeros(block, block_heads, pair, len(layers), self.device)
        for li, layer in enumerate(layers):
            if self.layout.is_monitored(layer, block):
                self._fill_layer(store, pair, maps, li, layer, tests)
            else:  # no adapter / frozen: NaN, untested
                maps.not_monitored(li)
        tests.parts.append((block, maps.p_values, maps.effect, maps.extreme))
        scores = maps.scores.cpu()
        if pair.empty:
            avg = torch.zeros(len(layers), len(block_heads))
            avg = avg.masked_fill(_unmonitored(self.layout, layers, block), math.nan)
        else:
            avg = scores.mean(dim=(0, 1))
        return {
            "scores": scores,
            "layer_head_avg": avg,
            "top_conflicts": self._top_conflicts(scores, pair.ids_a, pair.ids_b, layers, block, maps.hsel),
            "sample_ids_a": list(pair.ids_a),
            "sample_ids_b": list(pair.ids_b),
            "layers": list(layers),
            "heads": list(block_heads),
            "fisher_overlap": maps.overlap,
            "conflict_cosine": maps.cosine,
        }

    def _fill_layer(
        self,
        store: GradientStore,
        pair: _Pair,
        maps: _BlockMaps,
        li: int,
        layer: int,
        tests: _TestFamily,
    ) -> None:
        """Row ``li`` (``layer``) of ``maps``: scores, Fisher overlap, conflict cosine and tests of
        one monitored (layer, block); the tests join ``tests``."""
        block, hsel = maps.block, maps.hsel
        fa = fb = None  # [Hb, k] Fishers of the block heads
        if pair.fisher_a and pair.fisher_b:
            fa = self.index.gather(pair.fisher_a, layer, block, hsel, owner=f"task {pair.task_a!r}")
            fb = self.index.gather(pair.fisher_b, layer, block, hsel, owner=f"task {pair.task_b!r}")
            maps.overlap[li] = fisher_overlap_tensor(fa, fb, dim=-1).cpu()
        if pair.empty:
            return
        if fa is None or fb is None:
            raise RuntimeError(
                f"tasks {pair.task_a!r}/{pair.task_b!r} have stored samples but no Fisher "
                "(the collector's num_samples/fisher disagree with its store)"
            )
        inv_pooled = inverse_fisher(pooled_fisher(fa, fb), self.epsilon, self.ridge_lambda).to(self.device)
        inv_scores = (
            inverse_fisher(fa, self.epsilon, self.ridge_lambda).to(self.device)
            if self.fisher_source == "task_a"
            else inv_pooled
        )
        scores, views = self._pair_scores(store, pair.sides, layer, block, hsel, inv_scores)
        maps.scores[:, :, li] = scores  # [n_a, n_b, Hb]
        if inv_scores is not inv_pooled:
            views = None  # the maps and tests whiten with the pooled Fisher
        c, p, e, ext, n_deg, cand = self._maps_and_test(
            store, pair.sides, layer, block, hsel, inv_pooled, views
        )
        maps.cosine[li] = c
        if self.run_stats:
            maps.p_values[li], maps.effect[li], maps.extreme[li] = p, e, ext
            tests.num_degenerate += n_deg
            tests.refine.extend((block, li, heads_c, gram_c) for heads_c, gram_c in cand)

    # ------------------------------------------------------------------ pieces
    def _chunk_rows(self, per_row: int) -> int:
        return max(1, self.max_chunk_elements // max(per_row, 1))

    def _scores(self, va: Tensor, vb: Tensor, inv: Tensor) -> Tensor:
        """Pair scores ``[n_a, n_b, Hb]`` of whitened views ``x = g sqrt(D)`` (or sketches).

        signed ``<x_a, x_b>``; symmetric ``|x_a|.|x_b|``; directional
        ``sum_k x_a**2 |x_b| D**-1/2 = sum_k C_a D |g_b|`` (entrywise stores only).
        """
        if self.variant == "directional":
            weight = inv.rsqrt()
        else:
            weight = torch.ones(va.shape[1:], dtype=ACCUM_DTYPE, device=va.device)  # [Hb, k']
        return block_head_scores(va, vb, weight, self.variant, max_chunk_elements=self.max_chunk_elements)

    def _pair_scores(
        self,
        store: GradientStore,
        sides: tuple[tuple[str, int], tuple[str, int]],
        layer: int,
        block: str,
        hsel: Tensor,
        inv: Tensor,
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Scores of one (layer, block), chunked over the samples of both tasks.

        Args:
            store: the collector's store.
            sides: ``((task_a, n_a), (task_b, n_b))`` (the first ``n`` stored rows are used).
            hsel: ``[Hb]`` block heads.
            inv: ``[Hb, k]`` ``D`` of the scores.

        Returns:
            ``(scores [n_a, n_b, Hb], views)``: fp32 on the device; ``views`` are the whole
            ``[n, Hb, k]`` views of both tasks when each fitted in one chunk (reused by the maps
            and tests), else ``None``.
        """
        (task_a, n_a), (task_b, n_b) = sides
        n_h, k = inv.shape
        rows = self._chunk_rows(n_h * k)
        c_a, c_b = min(n_a, rows), min(n_b, rows)
        out = torch.empty(n_a, n_b, n_h, dtype=ACCUM_DTYPE, device=self.device)
        whole_a = None
        for j0 in range(0, n_b, c_b):
            rows_b = slice(j0, min(j0 + c_b, n_b))
            vb = store.head_view(task_b, layer, block, hsel, inv, rows_b, self.device)  # [c_b, Hb, k']
            for i0 in range(0, n_a, c_a):
                if whole_a is not None:
                    va = whole_a
                else:
                    rows_a = slice(i0, min(i0 + c_a, n_a))
                    va = store.head_view(
                        task_a, layer, block, hsel, inv, rows_a, self.device
                    )  # [c_a, Hb, k']
                    if c_a == n_a:
                        whole_a = va
                out[i0 : i0 + c_a, j0 : j0 + c_b] = self._scores(va, vb, inv)
        views = (whole_a, vb) if whole_a is not None and c_b == n_b else None
        return out, views

    def _maps_and_test(
        self,
        store: GradientStore,
        sides: tuple[tuple[str, int], tuple[str, int]],
        layer: int,
        block: str,
        hsel: Tensor,
        inv_pooled: Tensor,
        views: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, int, list[tuple[Tensor, Tensor]]]:
        """Conflict cosine and permutation test per head of one (layer, block), on views whitened
        by the pooled Fisher (the exact store's ``g sqrt(D)``; the sketch store's ``z``).

        The test runs on the per-head Gram matrices of the pooled views
        (:func:`~fisher_callbacks.stats.gram_conflict_test`). Heads are processed in chunks so
        that the views of one call hold at most ``max_chunk_elements`` elements (at least one head
        per call).

        Returns:
            ``(cosine [Hb], p [Hb], effect [Hb], n_extreme [Hb], number of degenerate tests,
            candidates)`` on the CPU (p, effect, n_extreme are 1, 0, 0 without ``run_stats``);
            ``candidates`` (``p_value="adaptive"`` only) are ``(heads [c], Gram [c, n, n])`` of
            the heads :meth:`_significance` may refine.
        """
        (task_a, n_a), (task_b, n_b) = sides
        n_h, k = inv_pooled.shape
        step = max(1, self.max_chunk_elements // max((n_a + n_b) * k, 1))
        c_parts, p_parts, e_parts, x_parts, n_deg, candidates = [], [], [], [], 0, []
        for h0 in range(0, n_h, step):
            hs = slice(h0, h0 + step)
            if views is not None:
                xa, xb = views[0][:, hs], views[1][:, hs]
            else:
                xa = store.head_view(
                    task_a, layer, block, hsel[hs], inv_pooled[hs], slice(0, n_a), self.device
                )
                xb = store.head_view(
                    task_b, layer, block, hsel[hs], inv_pooled[hs], slice(0, n_b), self.device
                )
            mean_a, mean_b = xa.mean(0), xb.mean(0)  # [Hc, k']
            c_parts.append(conflict_cosine(mean_a, mean_b, torch.ones_like(mean_a)).cpu())
            if not self.run_stats:
                continue
            gram, finite = pooled_gram(xa, xb)  # [Hc, n, n] float64, [Hc]
            with warnings.catch_warnings():
                # Degenerate cells (a head without gradient in one task) are counted and reported
                # once per heatmap instead of once per (layer, block).
                warnings.simplefilter("ignore")
                res = gram_conflict_test(
                    gram,
                    n_a,
                    statistic=self.test_statistic,
                    n_permutations=self.n_permutations,
                    seed=self.seed,
                    finite=finite,
                    max_chunk_elements=self.max_chunk_elements,
                )
            p = res.p_values.double().cpu()
            if self.p_value == "normal":
                # Lower tail of a normal fitted to the permutation null: not floored at
                # 1 / (n_permutations + 1), so a lone conflict can survive BY over many tests.
                std = res.null_std.double().cpu()
                z = (res.statistic.double().cpu() - res.null_mean.double().cpu()) / std.clamp_min(1e-300)
                p = torch.where((std > 0) & ~res.degenerate.cpu(), torch.special.ndtr(z), torch.ones_like(p))
            elif self.p_value == "adaptive":
                eligible = res.effect_size >= self.min_conflict_effect_size
                picked = refinement_candidates(res, eligible).nonzero().reshape(-1)  # [c]
                if picked.numel():
                    candidates.append((picked.cpu() + h0, gram.index_select(0, picked)))
            p_parts.append(p)
            e_parts.append(res.effect_size.double().cpu())
            x_parts.append(res.n_extreme.cpu())
            n_deg += int(res.degenerate.sum())
        cosine = torch.cat(c_parts)
        if not self.run_stats:
            ones = torch.ones(n_h, dtype=torch.float64)
            return cosine, ones, ones * 0, torch.zeros(n_h, dtype=torch.long), 0, []
        return cosine, torch.cat(p_parts), torch.cat(e_parts), torch.cat(x_parts), n_deg, candidates

    def _significance(
        self,
        blocks: dict[str, dict[str, Any]],
        tests: _TestFamily,
        empty: bool,
        n_a: int,
    ) -> dict[str, Any]:
        """FDR over all (layer, head, block) tests of the call; fills the per-block stats maps.

        With ``p_value="adaptive"`` the candidates' p-values are first refined by
        :func:`~fisher_callbacks.stats.refine_p_values` over the whole family of tests.
        """
        parts, refine, num_degenerate = tests.parts, tests.refine, tests.num_degenerate
        flat_p = torch.cat([p.reshape(-1) for _, p, _, _ in parts])
        flat_e = torch.cat([e.reshape(-1) for _, _, e, _ in parts])
        flat_x = torch.cat([x.reshape(-1) for _, _, _, x in parts])
        max_permutations = self.max_permutations or reachable_permutations(
            max(flat_p.numel(), 1), self.fdr_alpha, self.fdr_method
        )
        permutations = torch.full(flat_p.shape, self.n_permutations, dtype=torch.long)
        stages = 0
        if self.p_value == "adaptive" and refine and not empty:
            offsets, offset = {}, 0
            for block, p, _, _ in parts:
                offsets[block] = (offset, p.shape[1])
                offset += p.numel()
            positions = torch.cat(
                [offsets[b][0] + li * offsets[b][1] + heads for b, li, heads, _ in refine]
            )  # [c] flat test positions
            refined = refine_p_values(
                flat_p,
                flat_x,
                self.n_permutations,
                torch.cat([g for _, _, _, g in refine]),
                positions,
                n_a,
                alpha=self.fdr_alpha,
                method=self.fdr_method,
                max_permutations=max_permutations,
                seed=self.seed,
                statistic=self.test_statistic,
                max_chunk_elements=self.max_chunk_elements,
            )
            flat_p, permutations, stages = refined.p_values, refined.permutations, refined.stages
        sig = conflict_significance(
            flat_p,
            flat_e,
            alpha=self.fdr_alpha,
            min_effect_size=self.min_conflict_effect_size,
            method=self.fdr_method,
        )
        offset = 0
        for block, p, e, _ in parts:
            n = p.numel()
            res = blocks[block]
            res["p_values"] = flat_p[offset : offset + n].reshape(p.shape).to(ACCUM_DTYPE)
            res["q_values"] = sig["q_values"][offset : offset + n].reshape(p.shape).to(ACCUM_DTYPE)
            res["effect_size"] = e.to(ACCUM_DTYPE)
            res["significant"] = sig["significant"][offset : offset + n].reshape(p.shape)
            offset += n
        if num_degenerate and not empty:
            warnings.warn(
                f"{num_degenerate} of {flat_p.numel()} QK-OV conflict tests are degenerate (a task "
                "mean gradient is zero in that head): p = 1, effect size 0",
                stacklevel=3,
            )
        return {
            "n_permutations": self.n_permutations,
            "p_value": self.p_value,
            "max_permutations": max_permutations if self.p_value == "adaptive" else self.n_permutations,
            "num_refined": int((permutations > self.n_permutations).sum()),
            "refinement_stages": int(stages),
            "test_statistic": self.test_statistic,
            "fdr_method": self.fdr_method,
            "fdr_alpha": self.fdr_alpha,
            "min_conflict_effect_size": self.min_conflict_effect_size,
            "seed": self.seed,
            "num_tests": int(flat_p.numel()),
            "num_degenerate": int(num_degenerate) if not empty else int(flat_p.numel()),
        }

    def _top_conflicts(
        self,
        scores: Tensor,
        ids_a: list,
        ids_b: list,
        layers: list[int],
        block: str,
        hsel: Tensor,
    ) -> list[dict[str, Any]]:
        """Strongest pairs of one block (``scores`` ``[n_a, n_b, L, Hb]``), TRUE ids."""
        if scores.numel() == 0 or self.top_k == 0:
            return []
        strength = -scores if self.variant == "signed" else scores
        flat = strength.reshape(-1).nan_to_num(nan=-math.inf)  # not-monitored cells never rank
        values, index = torch.topk(flat, min(self.top_k, flat.numel()))
        keep = values > 0
        values, index = values[keep], index[keep]
        out = []
        for idx in index.tolist():
            i, j, li, hi = _unravel(idx, scores.shape)
            head = int(hsel[hi])
            if block in ("K", "V"):
                group = self.layout.kv_group_size
                query_heads = list(range(head * group, (head + 1) * group))
            else:
                query_heads = [head]
            out.append(
                {
                    "sample_i": ids_a[i],
                    "sample_j": ids_b[j],
                    "layer": layers[li],
                    "head": head,
                    "query_heads": query_heads,
                    "score": float(scores[i, j, li, hi]),
                }
            )
        return out

    # ------------------------------------------------------------------ collector access
    def _require_store(self) -> GradientStore:
        store = self.store
        if store is None:
            raise TypeError(
                f"{type(self.collector).__name__} has no gradient store (`.store`, a "
                "fisher_callbacks.store.GradientStore): pass a FisherCollector"
            )
        return store

    def _stored(self, task: str, max_samples: int | None) -> list:
        """TRUE ids of the stored rows used (the first ``max_samples``)."""
        ids = self._require_store().ids(task)
        if max_samples is not None:
            if max_samples < 0:
                raise ValueError(f"max_samples must be >= 0, got {max_samples}")
            ids = ids[:max_samples]
        return list(ids)

    def _fisher(self, task: str) -> dict[str, Tensor]:
        """The collector's contribution Fisher of ``task`` (``{}`` without samples)."""
        n = self.collector.num_samples(task)
        if n == 0:
            return {}
        if n < self.min_samples_for_fisher:
            warnings.warn(
                f"QK-OV: the Fisher of task {task!r} comes from {n} sample(s) "
                f"(< min_samples_for_fisher={self.min_samples_for_fisher}); scores are noisy",
                stacklevel=3,
            )
        with warnings.catch_warnings():
            # The collector warns with its own threshold; the warning above uses this metric's.
            warnings.simplefilter("ignore")
            return self.collector.fisher(task)

    def _check_layers(self, layers: Sequence[int] | None) -> list[int]:
        n = self.layout.num_layers
        if layers is None:
            return list(range(n))
        layers = [int(x) for x in layers]
        bad = [x for x in layers if not 0 <= x < n]
        if bad:
            raise IndexError(f"layers {bad} out of range [0, {n})")
        return layers

    def _check_heads(self, heads: Sequence[int] | None) -> list[int]:
        n = self.layout.num_heads
        if heads is None:
            return list(range(n))
        heads = sorted({int(h) for h in heads})
        bad = [h for h in heads if not 0 <= h < n]
        if bad:
            raise IndexError(f"heads {bad} out of range [0, {n})")
        return heads

    def __repr__(self) -> str:
        return (
            f"QKOVInterferenceMetric(variant={self.variant!r}, fisher={self.fisher_source!r}, "
            f"epsilon={self.epsilon}, ridge_lambda={self.ridge_lambda}, device={self.device}, "
            f"run_stats={self.run_stats})"
        )


# ---------------------------------------------------------------------- helpers
def _resolve_device(spec: str | torch.device) -> torch.device:
    if isinstance(spec, str) and spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"computation_device={spec!r} but CUDA is not available; use 'cpu' or 'auto'")
    return device


def _mismatch(name: str, layer: int, head: int, block: str, shapes: tuple[tuple, ...], want: str) -> str:
    return (
        f"QK-OV shape mismatch for parameter {name!r}, layer {layer}, head {head}, block {block}: "
        f"contribution/gradient g_i {shapes[0]}, gradient g_j {shapes[1]}, Fisher {shapes[2]}; "
        f"expected {want}"
    )


def _require(tensors: Mapping[str, Tensor], name: str, task: str) -> None:
    if name not in tensors:
        raise KeyError(
            f"no tensor for parameter {name!r} in task {task!r}: the collector does not monitor "
            "the parameters of this layout"
        )


def _unmonitored(layout: AttentionLayout, layers: Sequence[int], block: str) -> Tensor:
    """``[L, 1]`` bool: the layers whose ``block`` is not monitored (their map cells are NaN)."""
    return torch.tensor([not layout.is_monitored(layer, block) for layer in layers])[:, None]


def _unravel(index: int, shape: Sequence[int]) -> tuple[int, ...]:
    out = []
    for size in reversed(shape):
        out.append(index % size)
        index //= size
    return tuple(reversed(out))

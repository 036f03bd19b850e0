"""Forgetting of a reference task A while training on another task B: pure math.

Notation (DESIGN.md section 2): ``theta`` are the monitored weights, ``theta_0`` the anchor (fit
start or a chosen checkpoint), ``L_A`` task A's probe loss, ``g_A = grad L_A``, ``F_A`` task A's
diagonal Fisher. Every quantity here is one function (or one small accumulator class) that the
callbacks and :mod:`fisher_callbacks.toolkit` call; nothing is implemented twice.

* measured forgetting ``L_A(theta_t) - L_A(theta_0)`` (:func:`measured_forgetting`), where the probe
  loss is the mean over probe samples of each sample's own mean-token loss (:func:`probe_loss`);
* first-order prediction ``sum_s g_A(theta_s) . (theta_{s+1} - theta_s)``, or its trapezoid form
  with ``0.5 (g_A(theta_s) + g_A(theta_{s+1}))`` (:func:`first_order_forgetting`, accumulated with
  its per layer/head/block split by :class:`FirstOrderForgettingAccumulator`);
* EWC quadratic ``0.5 sum_k F_A,k (theta_k - theta_0,k)^2`` (:func:`ewc_penalty`);
* Fisher-weighted damage ``0.5 sum_k F_A,k g_B,k^2`` and its asymmetry
  (:func:`fisher_weighted_damage`, :func:`fisher_damage_asymmetry`);
* the early-warning rule, a projection with a band from the measured rates (:func:`early_warning`)
  and its latched state (:func:`warning_active`).

Losses are in nats (natural-log cross-entropy), so drifts and penalties are in nats too. All
reductions run in fp32 on the input device whatever the storage dtype (bf16/fp16 inputs are cast
first); scalars come back as Python floats, per-entry results as fp32 tensors.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fisher_callbacks.functional.fisher_ops import (
    ACCUM_DTYPE,
    KeyMismatchError,
    TensorDict,
    as_fp32,
    check_matching,
    sum_fp32,
)

if TYPE_CHECKING:
    from fisher_callbacks.layouts import AttentionLayout

__all__ = [
    "DAMAGE_LOG_FLOOR",
    "MIN_EVIDENCE_STEPS",
    "RATE_POINTS",
    "FirstOrderForgettingAccumulator",
    "WarningDecision",
    "damage_log_ratio",
    "early_warning",
    "ewc_penalty",
    "first_order_forgetting",
    "fisher_damage_asymmetry",
    "fisher_weighted_damage",
    "measured_forgetting",
    "parameter_delta",
    "probe_loss",
    "warning_active",
]

DAMAGE_LOG_FLOOR = 1e-30
"""Floor applied to each damage before the log in :func:`fisher_damage_asymmetry` (nats)."""

_RELATIVE_BASELINE_FLOOR = 1e-12
_HORIZON_RTOL = 1e-9  # a ramp that reaches the threshold exactly at the horizon warns despite rounding


# --------------------------------------------------------------------------------------------------
# Measured forgetting
# --------------------------------------------------------------------------------------------------


def probe_loss(per_sample_losses: Tensor) -> Tensor:
    """Probe loss of a task: ``L = (1/N) sum_i l_i``.

    Args:
        per_sample_losses: ``[N]`` per-sample losses ``l_i`` in nats, each already the mean over
            sample i's own target tokens (so long and short samples weigh the same).

    Returns:
        0-d fp32 tensor on the input device; 0 for an empty probe set.
    """
    losses = as_fp32(per_sample_losses).reshape(-1)
    if losses.numel() == 0:
        return torch.zeros((), dtype=ACCUM_DTYPE, device=losses.device)
    return losses.mean()


def measured_forgetting(current: Tensor | float, anchor: Tensor | float) -> float:
    """Measured forgetting (drift) ``L_A(theta_t) - L_A(theta_0)`` in nats.

    Args:
        current: Task A's probe loss at theta_t: either a float, or the ``[N]`` per-sample losses
            (reduced with :func:`probe_loss`).
        anchor: The same at the anchor theta_0 (same probe set).

    Returns:
        The drift as a Python float; positive means task A got worse.

    Raises:
        ValueError: If both are per-sample tensors of different lengths (not the same probe set).
    """
    if (
        isinstance(current, Tensor)
        and isinstance(anchor, Tensor)
        and current.ndim > 0
        and anchor.ndim > 0
        and current.numel() != anchor.numel()
    ):
        raise ValueError(
            f"current and anchor losses must come from the same probe set, got "
            f"{current.numel()} and {anchor.numel()} samples"
        )
    return _as_loss(current) - _as_loss(anchor)


def _as_loss(x: Tensor | float) -> float:
    if isinstance(x, Tensor):
        return float(probe_loss(x))
    return float(x)


# --------------------------------------------------------------------------------------------------
# First-order prediction
# --------------------------------------------------------------------------------------------------


def parameter_delta(after: TensorDict, before: TensorDict) -> dict[str, Tensor]:
    """Parameter change ``theta_after - theta_before`` per entry, in fp32.

    Both sides are cast to fp32 *before* subtracting (a bf16 difference of close weights is mostly
    rounding error).

    Args:
        after: ``{name: Tensor}`` at the later point.
        before: ``{name: Tensor}`` at the earlier point, same keys and shapes.

    Returns:
        ``{name: fp32 Tensor}`` on the devices of ``after``.

    Raises:
        KeyMismatchError: If the keys differ.
    """
    check_matching(after, before, names=("after", "before"))
    return {k: as_fp32(after[k]) - as_fp32(before[k]).to(after[k].device) for k in after}


def first_order_forgetting(
    grad_a: TensorDict, delta: TensorDict, grad_a_end: TensorDict | None = None
) -> Tensor:
    """One step of the first-order forgetting prediction: ``sum_k g_A,k delta_k``.

    ``g_A`` is the gradient of task A's probe loss at theta_s, ``delta = theta_{s+1} - theta_s``;
    the result is the linearised change of ``L_A`` over that step (nats). Summed over steps it
    predicts the measured forgetting (see :class:`FirstOrderForgettingAccumulator`).

    With ``grad_a_end`` (the gradient at theta_{s+1}) the trapezoid rule
    ``sum_k 0.5 (g_A,k(theta_s) + g_A,k(theta_{s+1})) delta_k`` is used instead: still linear in
    the gradients, but exact for a quadratic ``L_A``, so it keeps the curvature term
    ``0.5 delta^T H_A delta`` that the left-point rule drops on every step (see the accumulator).

    Args:
        grad_a: ``{name: Tensor}`` gradient of task A's probe loss at theta_s.
        delta: ``{name: Tensor}`` parameter change over the step, same keys and shapes.
        grad_a_end: Optional gradient at theta_{s+1}, same keys and shapes.

    Returns:
        0-d fp32 tensor on the input device (0 for empty dicts).

    Raises:
        KeyMismatchError: If the keys differ.
    """
    check_matching(grad_a, delta, names=("grad_a", "delta"))
    if grad_a_end is not None:
        check_matching(grad_a, grad_a_end, names=("grad_a", "grad_a_end"))
    end = grad_a_end or {}
    sums = (_step_product(g, delta[k], end.get(k)).sum() for k, g in grad_a.items())
    return sum_fp32(sums, grad_a)


def _step_product(grad: Tensor, delta: Tensor, grad_end: Tensor | None) -> Tensor:
    """``g * delta`` in fp32, ``g`` = ``grad`` or the trapezoid mean with ``grad_end``."""
    g = as_fp32(grad)
    if grad_end is not None:
        g = 0.5 * (g + as_fp32(grad_end).to(g.device))
    return g * as_fp32(delta).to(g.device)


def _running_dtype(device: torch.device) -> torch.dtype:
    # Running totals over many steps in fp64 where the device has it (MPS does not).
    return torch.float32 if device.type == "mps" else torch.float64


class FirstOrderForgettingAccumulator:
    """Running first-order forgetting prediction with its split per parameter, layer, block, head.

    Accumulates ``P = sum_s sum_k g_A,k(theta_s) delta_s,k`` with
    ``delta_s = theta_{s+1} - theta_s``. Each step's products ``g_A * delta`` are formed in fp32;
    running totals are kept in fp64 (fp32 on MPS). Given a layout, the products of every attention
    weight are also split per head: for layer ``l`` and block ``b`` in ``("Q", "K", "V", "O")``,
    ``layout.head_view(g_A * delta, l, b).sum(-1)`` (``[H_b]``, ``H_b`` = ``num_heads`` for Q/O
    and ``num_kv_heads`` for K/V; plus the same for the Q/K/V bias when the layout has
    ``include_bias``) is added to row ``l`` of ``per_block_head()[b]``. Head additivity:
    the sum of all per-head entries equals the sum of ``per_parameter()`` over the layout's
    monitored weights (a fused QKV weight's total is split over Q, K and V).

    Accuracy (measured in ``tests/test_forgetting_validation.py``): the left-point sum is first
    order per step, and along a whole run it drops every step's curvature term
    ``0.5 delta^T H_A delta``. On a noisy optimiser path those terms do not cancel (they are the Ito
    correction of a random walk), so the left-point sum stayed *below* the measured drift at every
    validation, at 64-92% of it at the end of Adam fine-tuning runs; with plain SGD it can even
    have the wrong sign.
    Passing ``grad_a_end`` (the gradient at theta_{s+1}, which a monitor has anyway as the next
    evaluation's ``g_A``) switches to the trapezoid rule, exact for a quadratic ``L_A``: it
    tracked the measured drift to within 2% on the same runs (13% on the first steps of the
    fastest run). Prefer it whenever consecutive gradients are at hand.

    Args:
        layout: Optional attention layout; without it only the total and per-parameter values
            are kept.
        shards: Optional :class:`~fisher_callbacks.engine.sharding.Shards` of sharded (FSDP2)
            parameters: the tensors handed to :meth:`update` are then this rank's blocks, and
            each step's per-parameter and per-head sums are summed over the ranks before they
            are accumulated (the same on every rank, as with whole tensors).
    """

    def __init__(self, layout: AttentionLayout | None = None, shards: Any = None) -> None:
        self.layout = layout
        self.shards = shards if shards is not None and shards.sharded else None
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated (e.g. when the anchor moves)."""
        self._total: Tensor | None = None
        self._per_parameter: dict[str, Tensor] = {}
        self._per_block_head: dict[str, Tensor] = {}
        self.num_updates = 0

    def update(
        self,
        grad_a: TensorDict,
        delta: TensorDict,
        grad_a_end: TensorDict | None = None,
        frozen: Collection[str] = (),
    ) -> Tensor:
        """Add one step ``sum_k g_A,k delta_k`` (trapezoid rule when ``grad_a_end`` is given).

        Args:
            grad_a: ``{name: Tensor}`` gradient of task A's probe loss at theta_s.
            delta: ``{name: Tensor}`` ``theta_{s+1} - theta_s``, same keys and shapes.
            grad_a_end: Optional gradient at theta_{s+1}; then ``0.5 (g(theta_s) +
                g(theta_{s+1}))`` replaces ``g(theta_s)`` (see :func:`first_order_forgetting`).
            frozen: Monitored weights of the layout that did not train in this step (frozen
                after the layout was taken): absent from the dicts, they add 0 to their heads.

        Returns:
            This step's contribution, a 0-d fp32 tensor (not synchronised to the host).

        Raises:
            KeyMismatchError: If the keys of the dicts differ, or (with a layout) a monitored
                weight of the layout is missing from them and not ``frozen``.
        """
        check_matching(grad_a, delta, names=("grad_a", "delta"))
        if grad_a_end is not None:
            check_matching(grad_a, grad_a_end, names=("grad_a", "grad_a_end"))
        # One parameter at a time: its product is summed and dropped, except those of the
        # attention weights the per-head split needs (``delta`` may be a lazy mapping).
        heads = set(self.layout.monitored_parameters()) if self.layout is not None else set()
        sums, products = {}, {}
        for k, g in grad_a.items():
            product = _step_product(g, delta[k], None if grad_a_end is None else grad_a_end[k])
            sums[k] = product.sum()  # 0-d fp32
            if k in heads:
                products[k] = product
        if self.shards is not None and sums:  # this rank's partial sums: over every rank
            sums = dict(zip(sums, self.shards.reduce(torch.stack(list(sums.values())))))
        step = sum_fp32(sums.values(), grad_a)
        acc_dtype = _running_dtype(step.device)
        if self._total is None:
            self._total = torch.zeros((), dtype=acc_dtype, device=step.device)
        self._total += step.to(acc_dtype)
        for name, s in sums.items():
            part = s.to(acc_dtype)
            if name in self._per_parameter:
                self._per_parameter[name] += part
            else:
                self._per_parameter[name] = part.clone()
        if self.layout is not None:
            self._update_heads(products, acc_dtype, set(frozen))
        self.num_updates += 1
        return step

    def _update_heads(self, products: dict[str, Tensor], acc_dtype: torch.dtype, frozen: set[str]) -> None:
        layout = self.layout
        assert layout is not None
        missing = [n for n in layout.monitored_parameters() if n not in products and n not in frozen]
        if missing:
            raise KeyMismatchError(
                f"grad_a/delta lack monitored attention weights of the layout: {missing[:8]}"
            )
        device = next(iter(products.values())).device if products else self._total.device
        for block in layout.blocks:
            rows = []
            for layer in range(layout.num_layers):
                if not layout.is_monitored(layer, block):  # no adapter / frozen: NaN, not 0
                    rows.append(torch.full((layout.heads_in_block(block),), math.nan, device=device))
                    continue
                row = sum(  # [H_b]; the weight, plus the Q/K/V bias when the layout includes it
                    (
                        self._head_sums(products[name], name, layer, block, is_bias)
                        for name, is_bias in layout.block_entries(layer, block)
                        if name not in frozen  # did not move: adds 0
                    ),
                    torch.zeros(layout.heads_in_block(block), device=device),
                )
                rows.append(row)
            per_head = torch.stack(rows)
            if self.shards is not None:  # this rank's rows of each weight: over every rank
                per_head = self.shards.reduce(per_head)
            per_head = per_head.to(acc_dtype)  # [L, H_b]
            if block in self._per_block_head:
                self._per_block_head[block] += per_head
            else:
                self._per_block_head[block] = per_head

    def _head_sums(self, product: Tensor, name: str, layer: int, block: str, bias: bool) -> Tensor:
        if self.shards is not None:
            return self.shards.head_sums(self.layout, product, name, layer, block, bias)
        return self.layout.head_view(product, layer, block, bias=bias).sum(-1)

    @property
    def total(self) -> float:
        """Accumulated prediction ``P`` in nats (0.0 before the first update)."""
        return 0.0 if self._total is None else float(self._total)

    def per_parameter(self) -> dict[str, float]:
        """``{name: sum_s sum_{k in name} g_A,k delta_s,k}`` in nats."""
        return {k: float(v) for k, v in self._per_parameter.items()}

    def per_block_head(self) -> dict[str, Tensor]:
        """``{block: [L, H_block] fp32}`` per-head split of the prediction (nats).

        Before the first update (with a layout) the maps are zeros; without a layout, ``{}``.
        """
        if self.layout is None:
            return {}
        if not self._per_block_head:
            return {
                b: torch.zeros(self.layout.num_layers, self.layout.heads_in_block(b)).masked_fill(
                    ~self.layout.monitored_mask(b), math.nan
                )
                for b in self.layout.blocks
            }
        return {b: v.to(ACCUM_DTYPE, copy=True) for b, v in self._per_block_head.items()}

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state (tensors are cloned, kept on their device)."""
        return {
            "total": None if self._total is None else self._total.detach().clone(),
            "per_parameter": {k: v.detach().clone() for k, v in self._per_parameter.items()},
            "per_block_head": {k: v.detach().clone() for k, v in self._per_block_head.items()},
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; per-head maps must fit this accumulator's layout."""
        per_block_head = {k: v.clone() for k, v in state["per_block_head"].items()}
        if per_block_head and self.layout is not None:
            for b in self.layout.blocks:
                expected = (self.layout.num_layers, self.layout.heads_in_block(b))
                if b not in per_block_head or tuple(per_block_head[b].shape) != expected:
                    raise ValueError(f"per-head state for block {b!r} does not fit the layout {expected}")
        total = state["total"]
        self._total = None if total is None else total.clone()
        self._per_parameter = {k: v.clone() for k, v in state["per_parameter"].items()}
        self._per_block_head = per_block_head if self.layout is not None else {}
        self.num_updates = int(state["num_updates"])


# --------------------------------------------------------------------------------------------------
# EWC quadratic and Fisher-weighted damage
# --------------------------------------------------------------------------------------------------


def ewc_penalty(fisher: TensorDict, params: TensorDict, anchor: TensorDict) -> float:
    """EWC quadratic ``0.5 sum_k F_k (theta_k - theta_0,k)^2`` (nats).

    The second-order Taylor term of ``L_A`` around theta_0 with the Hessian replaced by task A's
    diagonal Fisher. **Do not read it as a forecast of forgetting**: it drops the first-order term
    and all off-diagonal curvature, and on real fine-tuning paths the team measured it 100-700x
    smaller than the real change of the reference loss. In this package's validation
    (``tests/test_forgetting_validation.py``: tiny GPT-2 pretrained on a synthetic task, fine-tuned
    on another with Adam) it was 22x, 211x and 1130x smaller than the measured drift at the end of
    runs with lr = 3e-4, 1e-3 and 3e-3 (80-1300x whenever the drift was clearly positive). Use it
    to compare runs or parameters, not to size forgetting; the early warning never relies on it
    alone.

    Args:
        fisher: ``{name: F_A}`` diagonal Fisher of task A (any float dtype; fp32 accumulation).
        params: ``{name: theta}`` current weights. May hold more entries than ``fisher`` (for
            example all of ``named_parameters()``); entries without Fisher carry no penalty.
        anchor: ``{name: theta_0}`` anchor weights, same rule as ``params``.

    Returns:
        The penalty as a Python float; 0.0 for an empty Fisher.

    Raises:
        KeyMismatchError: If a Fisher key is missing from ``params`` or ``anchor``.
        ValueError: On a shape mismatch.
    """
    check_matching(fisher, params, names=("fisher", "params"), allow_extra=True)
    check_matching(fisher, anchor, names=("fisher", "anchor"), allow_extra=True)
    parts = []
    for k, f in fisher.items():
        diff = as_fp32(params[k]) - as_fp32(anchor[k]).to(params[k].device)
        parts.append((as_fp32(f).to(diff.device) * diff.square()).sum())
    return 0.5 * float(sum_fp32(parts, fisher))


def fisher_weighted_damage(fisher_a: TensorDict, grad_b: TensorDict) -> float:
    """Fisher-weighted damage to task A from task B: ``0.5 sum_k F_A,k g_B,k^2`` (nats).

    The EWC quadratic of one unit step along task B's gradient: what a step
    ``delta = -g_B`` would cost task A under A's diagonal Fisher (a step of size ``lr`` costs
    ``lr^2`` times this).

    Args:
        fisher_a: ``{name: F_A}`` diagonal Fisher of task A.
        grad_b: ``{name: g_B}`` task B's (mean) gradient, same keys and shapes.

    Returns:
        Python float >= 0; 0.0 for empty dicts.

    Raises:
        KeyMismatchError: If the keys differ.
    """
    check_matching(fisher_a, grad_b, names=("fisher_a", "grad_b"))
    parts = [(as_fp32(fisher_a[k]) * as_fp32(grad_b[k]).square()).sum() for k in fisher_a]
    return 0.5 * float(sum_fp32(parts, fisher_a))


def fisher_damage_asymmetry(
    fisher_a: TensorDict,
    grad_a: TensorDict,
    fisher_b: TensorDict,
    grad_b: TensorDict,
    *,
    floor: float = DAMAGE_LOG_FLOOR,
) -> dict[str, float]:
    """Damage in both directions and its log ratio.

    ``a_from_b = 0.5 sum F_A g_B^2`` (damage to A from a step on B),
    ``b_from_a = 0.5 sum F_B g_A^2`` (damage to B from a step on A) and
    ``log_ratio = log(max(a_from_b, floor) / max(b_from_a, floor))``: positive means training on B
    hurts A more than training on A hurts B. The floor (default ``1e-30`` nats) keeps the ratio
    finite when a damage is 0: both zero gives 0, one zero gives about ``+-69 + log(other)``.

    Args:
        fisher_a: Task A's diagonal Fisher.
        grad_a: Task A's gradient, same keys as ``fisher_b``.
        fisher_b: Task B's diagonal Fisher.
        grad_b: Task B's gradient, same keys as ``fisher_a``.
        floor: Positive floor on each damage before the log.

    Returns:
        ``{"a_from_b": float, "b_from_a": float, "log_ratio": float}``.
    """
    a_from_b = fisher_weighted_damage(fisher_a, grad_b)
    b_from_a = fisher_weighted_damage(fisher_b, grad_a)
    log_ratio = damage_log_ratio(a_from_b, b_from_a, floor=floor)
    return {"a_from_b": a_from_b, "b_from_a": b_from_a, "log_ratio": log_ratio}


def damage_log_ratio(a_from_b: float, b_from_a: float, *, floor: float = DAMAGE_LOG_FLOOR) -> float:
    """``log(max(a_from_b, floor) / max(b_from_a, floor))``, the asymmetry of
    :func:`fisher_damage_asymmetry` from its two damages."""
    if not floor > 0:
        raise ValueError(f"floor must be > 0, got {floor}")
    return math.log(max(a_from_b, floor)) - math.log(max(b_from_a, floor))


# --------------------------------------------------------------------------------------------------
# Early warning
# --------------------------------------------------------------------------------------------------

RATE_POINTS = 3
"""Measured points the band comes from (the last ``RATE_POINTS``: two exponents)."""

MIN_EVIDENCE_STEPS = 3
"""Optimizer steps those points must span before they are extrapolated: what the first one or two
steps show (an Adam step can overshoot along the probe gradient) is never projected alone."""


@dataclass(frozen=True)
class WarningDecision:
    """Outcome of :func:`early_warning` at one step (values in the threshold's units: nats, or a
    fraction of ``|baseline|`` when relative).

    Attributes:
        warn: The warning condition holds now (the conservative side of the band, or the measured
            drift itself, reaches the threshold, or a drift is not finite).
        reason: One human-readable line saying why (or why not).
        risk: ``clip(low / threshold, 0, 1)``: the conservative projection as a fraction of the
            threshold; 1.0 exactly when ``warn``.
        level: The drift now: the last measured one, or the per-step forecast between
            measurements.
        low: Conservative side of the band at the reach (``level`` when nothing is projected).
        high: Fast side of the band at the reach (``level`` when nothing is projected).
        threshold: The threshold, in the same units.
        rising: The measured points turned upward (the last three above the anchor and rising,
            over at least :data:`MIN_EVIDENCE_STEPS` steps): only then is anything projected.
        falling: The last two measured rates are < 0 (releases a latched warning below the
            threshold, see :func:`warning_active`).
        steps_to_threshold: Steps until ``level`` reaches the threshold on the slow side of the
            band; 0.0 when reached, None when nothing is projected or the level is <= 0, inf when
            the slow side rises too slowly for a float to hold the count.
    """

    warn: bool
    reason: str
    risk: float
    level: float
    low: float
    high: float
    threshold: float
    rising: bool = False
    falling: bool = False
    steps_to_threshold: float | None = None


def early_warning(
    steps: Sequence[float],
    drifts: Sequence[float],
    warn_threshold: float,
    *,
    horizon_steps: float,
    now: tuple[float, float] | None = None,
    relative: bool = False,
    baseline: float | None = None,
) -> WarningDecision:
    """Whether forgetting is about to cross ``warn_threshold``: a projection with a band.

    Let ``(s_i, d_i)`` be the measured drifts (probe loss minus the anchor's; the first point is
    the anchor ``(s_0, 0)``), divided by ``|baseline|`` when ``relative``; ``T =
    warn_threshold``, ``H = horizon_steps``.

    1. A drift that is not finite (NaN, -inf: the probe loss diverged), measured or forecast,
       warns with ``risk = 1``; so does a last measured drift ``>= T`` (``+inf`` included).
    2. Nothing is projected unless the measured points themselves turned upward: the last
       three measurements (the anchor is never one of them) rise at each step, span at least
       :data:`MIN_EVIDENCE_STEPS` optimizer steps, and the last lies above the anchor. A
       falling or negative measured drift never becomes a warning by extrapolation, whatever a
       forecast says, and neither do the first one or two optimizer steps alone.
    3. The band, when all three lie above the anchor: fine-tuning drift grows like a power of
       the steps since the anchor, ``d ~ (s - s_0)^p``. The last three measurements give two
       exponents ``p = log(d_i / d_{i-1}) / log((s_i - s_0) / (s_{i-1} - s_0))``, ``p_1`` then
       ``p_2``; the fast side uses ``max(p_1, p_2)``. The slow side uses the lower of the two
       latest exponents (at a measurement ``min(p_1, p_2)``; between measurements see below),
       lowered by what the points show of a slowdown:

       - a decelerating drift (``p_2 < p_1``: the drift still rises, ever more slowly, as on a
         plateau) is projected with the trend of its exponent, ``2 p_2 - p_1`` (the exponent
         falls once more by as much as it fell between the two measured intervals);
       - between measurements the two latest exponents are the last measured one, ``p_2``,
         and the forecast's own since the last measurement, ``p_now = log(f_t / d_last) /
         log((t - s_0) / (s_last - s_0))``: an accelerating drift (``p_2 >= p_1``) is
         projected with the lower of those two (the older ``p_1`` gives way to the newer
         reading), and ``p_now`` replaces any slow side it is below (the first-order change
         since the last measurement says the drift slowed, or fell);
       - never below 0: a rising measured drift is projected to stay, not to fall.

       A drift that dipped below the anchor first (the loss fell, then rose past its start:
       the first or the first two of the three at or below the anchor) has no power of the
       steps since the anchor; it is projected along a line: the slow side rises at the lower
       of the two latest rates (at a measurement the two measured ``(d_i - d_{i-1}) / (s_i -
       s_{i-1})``, between measurements the last measured one and the forecast's since; never
       below 0), the fast side at the higher measured one.
    4. The level now: the last measured drift, or between measurements the per-step forecast
       ``f_t`` (``now``). It is projected ``h = min(H, t - s_w)`` steps ahead, where ``s_w`` is
       the first of the three measurements: a power law read off a window of steps is never
       extrapolated further ahead than that window reaches back. ``low = level ((t + h - s_0) /
       (t - s_0))^p_low``, ``high`` with ``max(p_1, p_2)`` (after a dip: ``low = level + h
       r_low``, ``high = level + h r_high``). Warn when the conservative side ``low`` reaches
       ``T`` (or the forecast itself does).

    ``risk = clip(low / T, 0, 1)``: 1 exactly when it warns; ``level / T`` clipped when nothing is
    projected. On a drift that grows exactly like a power of the steps (measured every ``k``
    steps, ``H <= 2k``) the band is one curve and the rule warns exactly ``H`` steps before the
    crossing.

    Args:
        steps: Optimizer steps of the measurements, strictly increasing.
        drifts: Measured drift at each, nats.
        warn_threshold: ``T`` (> 0; nats, or a fraction of ``|baseline|`` when relative).
        horizon_steps: ``H`` in optimizer steps (>= 0).
        now: ``(t, f_t)``: the step and the per-step forecast there, past the last measurement
            (None: decide at the last measurement).
        relative: Compare ``drift / |baseline|``.
        baseline: ``L_A(theta_0)``; required when relative (floored at 1e-12).

    Returns:
        A :class:`WarningDecision`.

    Raises:
        ValueError: On mismatched lengths, non-increasing steps, a ``now`` before the last
            measurement, invalid settings, or relative mode without a finite baseline.
    """
    if not (math.isfinite(warn_threshold) and warn_threshold > 0):
        raise ValueError(f"warn_threshold must be finite and > 0, got {warn_threshold}")
    if not (math.isfinite(horizon_steps) and horizon_steps >= 0):
        raise ValueError(f"horizon_steps must be finite and >= 0, got {horizon_steps}")
    steps, drifts = [float(s) for s in steps], [float(d) for d in drifts]
    if len(steps) != len(drifts):
        raise ValueError(f"steps and drifts differ in length: {len(steps)} vs {len(drifts)}")
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise ValueError("steps must be strictly increasing")
    if now is not None and steps and now[0] < steps[-1]:
        raise ValueError(f"now={now[0]} comes before the last measurement at step {steps[-1]}")
    scale = _scale(relative, baseline)
    thr = float(warn_threshold)
    points = [(s, d * scale) for s, d in zip(steps, drifts) if not math.isnan(d)]
    latest = [(s, d * scale) for s, d in zip(steps[-1:], drifts[-1:])]
    if now is not None:
        latest.append((float(now[0]), float(now[1]) * scale))
    for s, d in latest:
        if math.isnan(d) or d == -math.inf:
            why = f"drift is {d} at step {s:g}: the probe loss is not finite"
            return WarningDecision(True, why, 1.0, d, d, d, thr, steps_to_threshold=0.0)
    if not points:
        return WarningDecision(False, "no drift measured yet", 0.0, 0.0, 0.0, 0.0, thr)
    s_last, d_last = points[-1]
    window = points[-RATE_POINTS:]
    rates = [(d1 - d0) / (s1 - s0) for (s0, d0), (s1, d1) in itertools.pairwise(window)]
    falling = len(rates) == RATE_POINTS - 1 and all(r < 0 for r in rates)
    if d_last >= thr:
        why = f"measured drift {d_last:.4g} reached the threshold {thr:.4g} at step {s_last:g}"
        return WarningDecision(True, why, 1.0, d_last, d_last, d_last, thr, False, falling, 0.0)
    origin = points[0][0]
    gate = _not_rising(window, origin)
    t = s_last if now is None else float(now[0])
    level = d_last if now is None else float(now[1]) * scale
    if gate:
        level = min(level, d_last)
        risk = min(max(level / thr, 0.0), 1.0 - 1e-12)
        return WarningDecision(
            False, f"drift {d_last:.4g}; {gate}", risk, level, level, level, thr, False, falling
        )
    reach = min(float(horizon_steps), t - window[0][0])
    if window[0][1] <= 0:  # it dipped below the anchor first (the points rise): a line
        r_lo, r_hi, slow = min(rates), max(rates), "after a dip below the anchor"
        if t > s_last:  # the two latest rates: the last measured one and the forecast's since
            r_now = (level - d_last) / (t - s_last)
            r_lo = min(rates[-1], r_now)
            if r_now < rates[-1]:
                slow = f"forecast since step {s_last:g}"
        r_lo = max(r_lo, 0.0)
        low, high = level + reach * r_lo, level + reach * r_hi
        to_go = 0.0 if level >= thr else ((thr - level) / r_lo if r_lo > 0 and level > 0 else None)
        band = f"band {low:.4g}..{high:.4g} within {reach:g} steps (drift rising {r_lo:.3g}..{r_hi:.3g}"
        band += f" a step; {slow})"
        return _banded(level, low, high, thr, to_go, band)
    # exponents of d ~ (s - origin)^p between the last three measurements
    p_1, p_2 = (
        math.log(d1 / d0) / math.log((s1 - origin) / (s0 - origin))
        for (s0, d0), (s1, d1) in itertools.pairwise(window)
    )
    p_lo, p_hi, slow = min(p_1, p_2), max(p_1, p_2), ""
    if p_2 < p_1:  # decelerating: the exponent's trend, one more fall like the last
        p_lo, slow = 2.0 * p_2 - p_1, f"decelerating, slow side ^{2.0 * p_2 - p_1:.2g}"
    if t > s_last:  # the two latest exponents: the last measured one and the forecast's since
        p_now = math.log(level / d_last) / math.log((t - origin) / (s_last - origin)) if level > 0 else 0.0
        if p_2 >= p_1:  # accelerating: the older measured exponent gives way to the newer reading
            p_lo, slow = p_2, f"last measured exponent; forecast since step {s_last:g} ^{p_now:.2g}"
        if p_now < p_lo:
            p_lo, slow = p_now, f"forecast since step {s_last:g} ^{p_now:.2g}"
    p_lo = max(p_lo, 0.0)
    grow = (t + reach - origin) / (t - origin)
    low, high = level * _power(grow, p_lo), level * _power(grow, p_hi)
    if level >= thr:
        to_go: float | None = 0.0
    elif level > 0 and p_lo > 0:  # a forecast at or below the anchor never reaches the threshold
        to_go = (t - origin) * (_power(thr / level, 1.0 / p_lo) - 1.0)  # inf: beyond any float
    else:
        to_go = None
    band = f"band {low:.4g}..{high:.4g} within {reach:g} steps (drift ~ steps^{p_lo:.2g}..{p_hi:.2g}"
    band += f"; {slow})" if slow else ")"
    return _banded(level, low, high, thr, to_go, band)


def _power(base: float, exponent: float) -> float:
    """``base ** exponent`` for ``base > 0``, ``inf`` where it overflows a float (an exponent read off
    an almost flat stretch, or off a denormal drift, can be thousands): never an OverflowError."""
    try:
        return base**exponent
    except OverflowError:
        return math.inf


def _banded(
    level: float, low: float, high: float, thr: float, to_go: float | None, band: str
) -> WarningDecision:
    """The verdict on a projected band: a warning when its slow side (or the level) reaches ``thr``."""
    if low >= thr * (1.0 - _HORIZON_RTOL) or level >= thr:
        why = f"drift {level:.4g} rising: {band} reaches the threshold {thr:.4g}"
        return WarningDecision(True, why, 1.0, level, low, high, thr, True, False, to_go)
    risk = min(max(low / thr, 0.0), 1.0 - 1e-12)
    why = f"drift {level:.4g} rising: {band} below the threshold {thr:.4g}"
    return WarningDecision(False, why, risk, level, low, high, thr, True, False, to_go)


def warning_active(active: bool, decision: WarningDecision) -> bool:
    """The latched warning state after ``decision``: a warning, once on, stays on until a
    measurement finds the drift below the threshold and falling at its last two measured rates
    (:attr:`WarningDecision.falling`); it is never switched off between measurements."""
    if decision.warn:
        return True
    return active and not (decision.falling and decision.level < decision.threshold)


def _scale(relative: bool, baseline: float | None) -> float:
    if not relative:
        return 1.0
    if baseline is None or not math.isfinite(float(baseline)):
        raise ValueError("a relative early warning needs a finite baseline loss")
    return 1.0 / max(abs(float(baseline)), _RELATIVE_BASELINE_FLOOR)


def _not_rising(window: list[tuple[float, float]], origin: float) -> str:
    """Why the last measured points do not count as turned upward ('' when they do)."""
    if len(window) < RATE_POINTS:
        return f"{len(window)} measured points, a band needs {RATE_POINTS}"
    if window[0][0] <= origin:
        return "fewer than three measurements since the anchor: nothing is projected"
    if window[-1][1] <= 0:
        return "not above the anchor at the last measurement: nothing is projected"
    if not all(d1 > d0 for (_, d0), (_, d1) in itertools.pairwise(window)):
        return "not rising at the last two measurements"
    if window[-1][0] - window[0][0] < MIN_EVIDENCE_STEPS:
        span = window[-1][0] - window[0][0]
        return f"the last {RATE_POINTS} measurements span {span:g} steps, fewer than {MIN_EVIDENCE_STEPS}"
    return ""

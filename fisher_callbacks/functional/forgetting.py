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
* the early-warning rule on the series of measured drifts (:func:`early_warning`).

Losses are in nats (natural-log cross-entropy), so drifts and penalties are in nats too. All
reductions run in fp32 on the input device whatever the storage dtype (bf16/fp16 inputs are cast
first); scalars come back as Python floats, per-entry results as fp32 tensors.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
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
    "EarlyWarningConfig",
    "FirstOrderForgettingAccumulator",
    "ProjectionCalibration",
    "WarningDecision",
    "early_warning",
    "ewc_penalty",
    "first_order_forgetting",
    "fisher_damage_asymmetry",
    "fisher_weighted_damage",
    "forecast_drift",
    "margin_drift",
    "margin_rate",
    "measured_forgetting",
    "parameter_delta",
    "power_law_drift",
    "probe_loss",
    "secant_curvature",
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
    products = _step_products(grad_a, delta, grad_a_end)
    return sum_fp32((p.sum() for p in products.values()), grad_a)


def _step_products(grad_a: TensorDict, delta: TensorDict, grad_a_end: TensorDict | None) -> dict[str, Tensor]:
    """``{name: g * delta}`` in fp32, ``g`` = ``grad_a`` or the trapezoid mean with ``grad_a_end``."""
    check_matching(grad_a, delta, names=("grad_a", "delta"))
    if grad_a_end is not None:
        check_matching(grad_a, grad_a_end, names=("grad_a", "grad_a_end"))
    products = {}
    for k, g in grad_a.items():
        g = as_fp32(g)
        if grad_a_end is not None:
            g = 0.5 * (g + as_fp32(grad_a_end[k]).to(g.device))
        products[k] = g * as_fp32(delta[k]).to(g.device)
    return products


def secant_curvature(grad_start: TensorDict, grad_end: TensorDict, delta: TensorDict) -> float:
    """Curvature of ``L_A`` along one displacement, from the gradients at both ends (nats).

    ``kappa = (g_A(theta_1) - g_A(theta_0)) . delta`` with ``delta = theta_1 - theta_0``: exactly
    ``delta^T H_A delta`` for a quadratic ``L_A`` (the secant of the directional derivative), so
    ``L_A(theta_0 + a delta) ~ L_A(theta_0) + a g_A(theta_0) . delta + 0.5 a^2 kappa``.

    Args:
        grad_start: ``{name: Tensor}`` gradient of task A's probe loss at theta_0.
        grad_end: The same at theta_1.
        delta: ``{name: Tensor}`` ``theta_1 - theta_0``, same keys and shapes.

    Returns:
        ``kappa`` as a Python float (negative where ``L_A`` is concave along ``delta``).
    """
    return float(first_order_forgetting(grad_end, delta)) - float(first_order_forgetting(grad_start, delta))


def forecast_drift(
    measured: float,
    first_order: float,
    curvature: float = 0.0,
    progress: float = 0.0,
    *,
    along: float = 0.0,
    ahead: float = 0.0,
) -> float:
    """Per-step forecast of the drift between two validation boundaries, now or ahead (nats).

    With ``d = theta_t - theta_b`` since the last boundary ``b`` and ``Delta`` the displacement of
    the interval before it::

        forecast = measured_b + g_A(theta_b) . d + ahead * g_A(theta_b) . Delta
                   + 0.5 kappa (alpha + ahead)^2

    ``measured_b`` is the drift measured at ``b`` (the first order's error never accumulates past a
    boundary), ``g_A(theta_b) . d`` the first-order change since ``b``, ``kappa`` the curvature
    along ``Delta`` (:func:`secant_curvature` over that interval) and ``alpha = d . Delta /
    |Delta|^2`` how far the current interval went along it. Near task A's minimum ``g_A`` is ~0
    and the drift is almost all curvature, which the first order alone misses. ``ahead > 0``
    projects the same model that many more intervals alike (``Delta`` per interval): the
    extrapolation the early warning uses. ``kappa = alpha = ahead = 0`` is the pure first order.

    Args:
        measured: Drift ``L_A(theta_b) - L_A(theta_0)`` at the last boundary.
        first_order: ``g_A(theta_b) . d``.
        curvature: ``kappa`` along the previous interval's displacement.
        progress: ``alpha``, the current displacement along it (1 = one interval alike).
        along: ``g_A(theta_b) . Delta``.
        ahead: Intervals to project ahead (0 = now).

    Returns:
        The forecast as a Python float (NaN/inf propagate: a diverged run is never "no risk").
    """
    reach = progress + ahead
    return measured + first_order + ahead * along + 0.5 * curvature * reach * reach


def power_law_drift(
    measured: float,
    along: float,
    progress: float = 0.0,
    *,
    ahead: float = 0.0,
    max_power: float = 4.0,
) -> float:
    """Projection of a drift that grew from zero at the anchor like a power of the displacement.

    For the move ``Delta`` from the anchor theta_0 (drift 0) to ``b`` (drift ``measured``), with
    ``tau`` the displacement from the anchor in units of ``Delta`` (``tau = 1`` at ``b``)::

        d(tau) = measured * tau ** p,   p = g_A(theta_b) . Delta / measured

    ``p`` is the logarithmic derivative of the drift at ``b``: 2 for a quadratic bowl entered at
    its minimum, more when the drift accelerates faster than its curvature says (fine-tuning
    away from a pretrained minimum, where :func:`forecast_drift`'s quadratic falls short).
    Projected to ``tau = 1 + progress + ahead``. When ``b`` lies ``r`` lengths of ``Delta`` from
    the anchor (``r`` = steps from the anchor to ``b`` over the steps ``Delta`` covers; 1 while
    ``Delta`` starts at the anchor), pass ``along * r``, ``progress / r`` and ``ahead / r``: the
    same power of the steps since the anchor, ``d(t) = measured (t / t_b) ** p``.

    Args:
        measured: Drift at ``b`` (nats).
        along: ``g_A(theta_b) . Delta``.
        progress: ``alpha`` of :func:`forecast_drift`, the move since ``b`` along ``Delta``.
        ahead: Further ``Delta`` units to project ahead.
        max_power: Cap on ``p`` (a tiny drift with a larger slope must not explode).

    Returns:
        The projected drift, or ``-inf`` (no projection) unless ``measured > 0`` and
        ``along > 0`` (a drift that does not grow says nothing of a power).
    """
    if not (measured > 0 and along > 0 and math.isfinite(measured) and math.isfinite(along)):
        return -math.inf
    power = min(along / measured, max_power)
    return measured * max(1.0 + progress + ahead, 0.0) ** power


def margin_rate(loss: float, along: float) -> float:
    """How fast the margin of :func:`margin_drift` falls: ``d z / d tau = along / (1 - e^-L)``
    per ``Delta`` (``along = g_A(theta_b) . Delta``; the chain rule through ``L = softplus(z)``).
    ``nan`` unless ``loss > 0``: no log-loss is 0 or below."""
    return along / -math.expm1(-loss) if loss > 0 else math.nan


def margin_drift(
    loss: float,
    baseline: float,
    along: float,
    progress: float = 0.0,
    *,
    ahead: float = 0.0,
    bend: float = 0.0,
) -> float:
    """Projection of a cross-entropy drift whose margin moves at a steady rate (or one that
    quickens steadily).

    A confident reference task forgets fastest at first: its per-sample loss is
    ``log(1 + e^-m)`` of a margin ``m`` that fine-tuning erodes step by step, and a steadily
    falling margin makes the loss grow exponentially while it is small and linearly once it is
    not. Neither the quadratic of :func:`forecast_drift` nor the power law of
    :func:`power_law_drift` grows like that (measured from step 1 of a pretrained MiniLM and a
    tiny GPT-2: the drift grew 5-8x a step). The probe loss at ``b`` is read as the log-loss of one
    margin, ``z = -m = log(e^L - 1)``, which moves by :func:`margin_rate` ``r`` per ``Delta``;
    projected ``tau = progress + ahead`` ``Delta`` units past ``b``::

        L(tau) = softplus(z + tau * r + 0.5 * bend * tau^2),   drift = L(tau) - baseline

    ``bend`` (the secant of the rates at the last two probes, per ``Delta`` unit) is the margin's
    acceleration: a mean of many margins eroding at different rates falls ever faster as the
    fastest come to dominate it (a tiny GPT-2 at lr 3e-4: the rate doubled from step 8 to 16).

    Args:
        loss: Probe loss ``L_A(theta_b)`` at ``b`` (nats, a log-loss: > 0).
        baseline: Probe loss at the anchor ``L_A(theta_0)``.
        along: ``g_A(theta_b) . Delta``.
        progress: ``alpha`` of :func:`forecast_drift`, the move since ``b`` along ``Delta``.
        ahead: Further ``Delta`` units to project ahead.
        bend: Change of the rate per ``Delta`` unit; only a quickening (``> 0``) counts.

    Returns:
        The projected drift (nats), or ``-inf`` (no projection) unless ``loss > 0`` and
        ``along > 0`` are finite: a loss that does not grow says nothing of its margin.
    """
    if not (loss > 0 and along > 0 and math.isfinite(loss) and math.isfinite(along)):
        return -math.inf
    tau = max(progress + ahead, 0.0)
    z = math.log(math.expm1(loss)) if loss < 30.0 else loss  # softplus^-1, exact to fp64 above 30
    z += tau * margin_rate(loss, along)
    if math.isfinite(bend) and bend > 0:
        z += 0.5 * bend * tau * tau
    softplus = max(z, 0.0) + math.log1p(math.exp(-abs(z)))
    return softplus - baseline


class ProjectionCalibration:
    """Scale of a projection's rise, learnt from how its own earlier projections came out.

    A projection issued at step ``s`` says the series will go from ``v_s`` to ``p_s`` by step
    ``s + h``. When the series reaches that step (value ``v``), the projection *matures* with the
    ratio ``r = (v - v_s) / (p_s - v_s)`` of the rise that came to the rise it promised: below 1
    for a drift that slows down (the projection overshoots), above 1 for one that accelerates.
    Rises promised below ``min_rise`` say nothing of a ratio and are dropped. The factor
    ``c`` is the median of the last ``window`` ratios, clipped to ``[min_factor, max_factor]``,
    and 1 until one has matured; :meth:`apply` scales a new projection's rise by it::

        calibrated = v + c (p - v)       (p <= v is left as it is: no rise to scale)

    By default ``c <= 1``: it only damps projections that have been overshooting. A drift that
    grows from zero accelerates first and slows down later, and the ratios lag by the horizon,
    so a boost learnt while it accelerated would still be applied when it slows (measured on
    the real MiniLM: with ``max_factor=4`` a run that peaks at 94% of the threshold was warned
    16 steps before its peak). Tracked per series, in the series' units; non-finite values
    never mature.

    Args:
        window: Ratios in the median.
        min_factor, max_factor: Bounds on ``c`` (``0 < min_factor <= 1 <= max_factor``).
        min_rise: Smallest promised rise that matures into a ratio.
    """

    def __init__(
        self, window: int = 4, min_factor: float = 0.25, max_factor: float = 1.0, min_rise: float = 0.0
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not 0.0 < min_factor <= 1.0 <= max_factor:
            raise ValueError(f"need 0 < min_factor <= 1 <= max_factor, got {min_factor}, {max_factor}")
        self.window, self.min_rise = int(window), float(min_rise)
        self.min_factor, self.max_factor = float(min_factor), float(max_factor)
        self.pending: list[tuple[float, float, float]] = []  # (due step, value, projected)
        self.ratios: list[float] = []

    def observe(self, step: float, value: float) -> None:
        """The series reached ``value`` at ``step``: every projection due by then matures."""
        due = [p for p in self.pending if p[0] <= step]
        self.pending = [p for p in self.pending if p[0] > step]
        if not math.isfinite(value):
            return
        for _, start, projected in due:
            promised = projected - start
            if math.isfinite(promised) and promised > self.min_rise:
                self.ratios.append((value - start) / promised)
        del self.ratios[: -self.window]

    def issue(self, due: float, value: float, projected: float) -> None:
        """A projection from ``value`` now to ``projected`` at step ``due``; one per due step
        (a later issue for the same step replaces the earlier one)."""
        self.pending = [p for p in self.pending if p[0] != due]
        if math.isfinite(value) and math.isfinite(projected):
            self.pending.append((float(due), float(value), float(projected)))

    @property
    def factor(self) -> float:
        """``c``: the median matured ratio, clipped; 1 before any has matured."""
        if not self.ratios:
            return 1.0
        return min(max(statistics.median(self.ratios), self.min_factor), self.max_factor)

    def apply(self, value: float, projected: float) -> float:
        """``value + factor * (projected - value)`` for a rising projection, else ``projected``."""
        if not (projected > value and math.isfinite(value)):
            return projected
        return value + self.factor * (projected - value)

    def state_dict(self) -> dict[str, list]:
        return {"pending": [list(p) for p in self.pending], "ratios": list(self.ratios)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pending = [tuple(float(x) for x in p) for p in state.get("pending", [])]
        self.ratios = [float(r) for r in state.get("ratios", [])][-self.window :]


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
    """

    def __init__(self, layout: AttentionLayout | None = None) -> None:
        self.layout = layout
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated (e.g. when the anchor moves)."""
        self._total: Tensor | None = None
        self._per_parameter: dict[str, Tensor] = {}
        self._per_block_head: dict[str, Tensor] = {}
        self.num_updates = 0

    def update(self, grad_a: TensorDict, delta: TensorDict, grad_a_end: TensorDict | None = None) -> Tensor:
        """Add one step ``sum_k g_A,k delta_k`` (trapezoid rule when ``grad_a_end`` is given).

        Args:
            grad_a: ``{name: Tensor}`` gradient of task A's probe loss at theta_s.
            delta: ``{name: Tensor}`` ``theta_{s+1} - theta_s``, same keys and shapes.
            grad_a_end: Optional gradient at theta_{s+1}; then ``0.5 (g(theta_s) +
                g(theta_{s+1}))`` replaces ``g(theta_s)`` (see :func:`first_order_forgetting`).

        Returns:
            This step's contribution, a 0-d fp32 tensor (not synchronised to the host).

        Raises:
            KeyMismatchError: If the keys of the dicts differ, or (with a layout) a monitored
                weight of the layout is missing from them.
        """
        products = _step_products(grad_a, delta, grad_a_end)
        sums = {k: p.sum() for k, p in products.items()}  # 0-d fp32 each
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
            self._update_heads(products, acc_dtype)
        self.num_updates += 1
        return step

    def _update_heads(self, products: dict[str, Tensor], acc_dtype: torch.dtype) -> None:
        layout = self.layout
        assert layout is not None
        missing = [n for n in layout.monitored_parameters() if n not in products]
        if missing:
            raise KeyMismatchError(
                f"grad_a/delta lack monitored attention weights of the layout: {missing[:8]}"
            )
        for block in layout.blocks:
            rows = []
            for layer in range(layout.num_layers):
                if not layout.is_monitored(layer, block):  # no adapter / frozen: NaN, not 0
                    device = next(iter(products.values())).device
                    rows.append(torch.full((layout.heads_in_block(block),), math.nan, device=device))
                    continue
                row = sum(  # [H_b]; the weight, plus the Q/K/V bias when the layout includes it
                    layout.head_view(products[name], layer, block, bias=is_bias).sum(-1)
                    for name, is_bias in layout.block_entries(layer, block)
                )
                rows.append(row)
            per_head = torch.stack(rows).to(acc_dtype)  # [L, H_b]
            if block in self._per_block_head:
                self._per_block_head[block] += per_head
            else:
                self._per_block_head[block] = per_head

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
    if not floor > 0:
        raise ValueError(f"floor must be > 0, got {floor}")
    a_from_b = fisher_weighted_damage(fisher_a, grad_b)
    b_from_a = fisher_weighted_damage(fisher_b, grad_a)
    log_ratio = math.log(max(a_from_b, floor)) - math.log(max(b_from_a, floor))
    return {"a_from_b": a_from_b, "b_from_a": b_from_a, "log_ratio": log_ratio}


# --------------------------------------------------------------------------------------------------
# Early warning
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WarningDecision:
    """Outcome of :func:`early_warning` at one validation boundary.

    Attributes:
        warn: Whether to warn now.
        reason: One human-readable line saying why (or why not).
        steps_to_threshold: Steps until the drift reaches the threshold at the current trend;
            0.0 when already crossed, None without a significant rising trend.
        slope: Least-squares slope of the (scaled) drift over the last ``window`` points, per
            step (0.0 with fewer than 3 points).
        risk: ``clip(max(d, d + slope_sig * horizon) / threshold, 0, 1)``, with ``d`` the
            current scaled drift and ``slope_sig`` the slope if significant, else 0.
            ``risk == 1.0`` exactly when ``warn``.
        drift: Current scaled drift ``d`` (nats, or a fraction of the baseline when relative).
        threshold: The threshold ``d`` was compared with, in the same units.
    """

    warn: bool
    reason: str
    steps_to_threshold: float | None
    slope: float
    risk: float
    drift: float
    threshold: float


@dataclass(frozen=True)
class EarlyWarningConfig:
    """Settings of the early-warning rule (see :func:`early_warning` for the rule itself).

    Attributes:
        warn_threshold: Drift at which to warn: nats by default, a fraction of ``|baseline|``
            when ``relative`` (0.1 = the reference loss rose by 10%).
        relative: Compare ``drift / |baseline|`` instead of the drift in nats.
        horizon_steps: Warn when the trend reaches the threshold within this many steps; None
            means the spacing of the last two validations ("before the next check").
        window: Number of most recent validations the trend is fitted on (>= 3).
        noise_sigmas: The trend counts only if its slope exceeds this many standard errors.
        min_rise_fraction: ... and if it rose at least this fraction of the threshold over the
            window.
    """

    warn_threshold: float = 0.1
    relative: bool = False
    horizon_steps: float | None = None
    window: int = 3
    noise_sigmas: float = 3.0
    min_rise_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not (self.warn_threshold > 0 and math.isfinite(self.warn_threshold)):
            raise ValueError(f"warn_threshold must be finite and > 0, got {self.warn_threshold}")
        if self.horizon_steps is not None and not self.horizon_steps >= 0:
            raise ValueError(f"horizon_steps must be >= 0 or None, got {self.horizon_steps}")
        if self.window < 3:
            raise ValueError(f"window must be >= 3 (a trend needs a residual), got {self.window}")
        if not self.noise_sigmas >= 0:
            raise ValueError(f"noise_sigmas must be >= 0, got {self.noise_sigmas}")
        if not self.min_rise_fraction >= 0:
            raise ValueError(f"min_rise_fraction must be >= 0, got {self.min_rise_fraction}")

    def evaluate(
        self,
        steps: Sequence[float],
        drifts: Sequence[float],
        baseline: float | None = None,
    ) -> WarningDecision:
        """Apply the rule to a drift series; see :func:`early_warning`."""
        return _decide(self, steps, drifts, baseline)


def early_warning(
    steps: Sequence[float],
    drifts: Sequence[float],
    warn_threshold: float = 0.1,
    *,
    relative: bool = False,
    baseline: float | None = None,
    horizon_steps: float | None = None,
    window: int = 3,
    noise_sigmas: float = 3.0,
    min_rise_fraction: float = 0.1,
) -> WarningDecision:
    """Decide whether forgetting is about to cross a threshold, from measured drifts.

    Let ``d_i`` be the drift at validation step ``s_i`` (divided by ``|baseline|`` when
    ``relative``), ``d`` the latest finite one and ``T = warn_threshold``.

    1. Level: warn if ``d >= T`` (``+inf`` counts as crossed).
    2. Trend: fit ``d_i ~ a + b s_i`` by least squares on the last ``window`` finite points (needs
       at least 3). The noise ``sigma`` is the largest of the fit's residual standard deviation
       and two robust estimates from the whole series' first and second differences
       (``1.4826 MAD(d_{i+1} - d_i) / sqrt(2)``, ``1.4826 median|d_{i+2} - 2 d_{i+1} + d_i| /
       sqrt(6)``, both blind to a linear trend), so a few noise points that happen to line up do
       not look like a trend. The trend is
       *significant* when ``b > 0``, ``b > noise_sigmas * sigma / sqrt(Sxx)`` (a one-sided
       t-like test) and ``b * (s_last - s_first) >= min_rise_fraction * T`` (it rose by a visible
       amount over the window).
    3. Warn if the trend is significant and reaches ``T`` within the horizon:
       ``(T - d) / b <= horizon`` (up to a relative 1e-9 for rounding) with
       ``horizon = horizon_steps`` or, by default, the spacing of the last two validations. On a
       steady ramp this fires at the last validation before the crossing, and the level rule
       fires at the crossing at the latest.

    An exactly flat series, and a flat series with noise well below ``T``, never warn: their
    slope is 0 or not significant. A latest drift that is not finite (NaN, -inf: the probe loss
    diverged) warns with ``risk = 1``; NaN drifts before the latest are left out of the fits.

    Args:
        steps: Global steps of the validations, strictly increasing.
        drifts: Measured drift ``L_A(theta_t) - L_A(theta_0)`` at each, nats.
        warn_threshold: Threshold ``T`` (nats, or a fraction of ``|baseline|`` when relative).
        relative: Compare ``drift / |baseline|``.
        baseline: Reference loss at the anchor ``L_A(theta_0)``; required when relative
            (``|baseline|`` is floored at 1e-12).
        horizon_steps: Look-ahead in steps; None = spacing of the last two validations.
        window: Points in the trend fit (>= 3).
        noise_sigmas: Significance of the slope, in standard errors.
        min_rise_fraction: Minimal rise over the window, as a fraction of ``T``.

    Returns:
        A :class:`WarningDecision`.

    Raises:
        ValueError: On mismatched lengths, non-increasing steps, invalid settings, or relative
            mode without a baseline.
    """
    config = EarlyWarningConfig(
        warn_threshold=warn_threshold,
        relative=relative,
        horizon_steps=horizon_steps,
        window=window,
        noise_sigmas=noise_sigmas,
        min_rise_fraction=min_rise_fraction,
    )
    return config.evaluate(steps, drifts, baseline)


def _decide(
    config: EarlyWarningConfig,
    steps: Sequence[float],
    drifts: Sequence[float],
    baseline: float | None,
) -> WarningDecision:
    steps = [float(s) for s in steps]
    drifts = [float(d) for d in drifts]
    if len(steps) != len(drifts):
        raise ValueError(f"steps and drifts differ in length: {len(steps)} vs {len(drifts)}")
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise ValueError("steps must be strictly increasing")
    scale = 1.0
    if config.relative:
        if baseline is None or not math.isfinite(float(baseline)):
            raise ValueError("relative early warning needs a finite baseline loss")
        scale = 1.0 / max(abs(float(baseline)), _RELATIVE_BASELINE_FLOOR)
    thr = config.warn_threshold

    if drifts and not math.isfinite(drifts[-1]) and drifts[-1] != math.inf:
        # NaN or -inf: the model (or its probe loss) diverged; never a silent "no risk"
        return WarningDecision(
            True,
            f"drift is {drifts[-1]} at step {steps[-1]:g}: the probe loss is not finite",
            0.0,
            0.0,
            1.0,
            drifts[-1],
            thr,
        )
    points = [(s, d * scale) for s, d in zip(steps, drifts) if not math.isnan(d)]
    if not points:
        return WarningDecision(False, "no drift measured yet", None, 0.0, 0.0, 0.0, thr)
    s_last, d_last = points[-1]
    if d_last >= thr:  # includes +inf
        return WarningDecision(
            True,
            f"drift {d_last:.4g} reached the threshold {thr:.4g} at step {s_last:g}",
            0.0,
            _slope_of(points, config.window),
            1.0,
            d_last,
            thr,
        )

    finite = [(s, d) for s, d in points if math.isfinite(d)]
    horizon = config.horizon_steps
    if horizon is None:
        horizon = finite[-1][0] - finite[-2][0] if len(finite) >= 2 else 0.0
    slope, significant, why = _trend(finite, config)
    if significant:
        steps_to = (thr - d_last) / slope
        projected = d_last + slope * horizon
    else:
        steps_to, projected = None, d_last
    risk = min(max(max(d_last, projected) / thr, 0.0), 1.0)
    if significant and steps_to <= horizon * (1.0 + _HORIZON_RTOL):
        reason = (
            f"drift {d_last:.4g} rising {slope:.3g}/step reaches the threshold {thr:.4g} in "
            f"{steps_to:.3g} steps (horizon {horizon:g})"
        )
        return WarningDecision(True, reason, steps_to, slope, 1.0, d_last, thr)
    if significant:
        why = f"trend reaches the threshold in {steps_to:.3g} steps, beyond the horizon {horizon:g}"
    reason = f"drift {d_last:.4g} below the threshold {thr:.4g}; {why}"
    return WarningDecision(False, reason, steps_to, slope, min(risk, 1.0 - 1e-12), d_last, thr)


def _slope_of(points: list[tuple[float, float]], window: int) -> float:
    finite = [(s, d) for s, d in points if math.isfinite(d)][-window:]
    if len(finite) < 3:
        return 0.0
    return _least_squares(finite)[0]


def _least_squares(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Slope, residual standard deviation and ``Sxx`` of a line fit (``len(points) >= 3``)."""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    xbar = sum(xs) / len(xs)
    ybar = sum(ys) / len(ys)
    sxx = sum((x - xbar) ** 2 for x in xs)
    slope = sum((x - xbar) * (y - ybar) for x, y in zip(xs, ys)) / sxx
    resid = [y - (ybar + slope * (x - xbar)) for x, y in zip(xs, ys)]
    sigma = math.sqrt(sum(r * r for r in resid) / (len(points) - 2))
    return slope, sigma, sxx


def _robust_noise(drifts: list[float]) -> float:
    """Noise level of a series from its differences, robust to a linear trend.

    ``max(1.4826 MAD(first differences) / sqrt(2), 1.4826 median|second differences| / sqrt(6))``:
    for white noise of standard deviation sigma both estimate sigma (a difference of two noise
    values has standard deviation ``sigma sqrt(2)``, a second difference ``sigma sqrt(6)``); a
    linear trend shifts the first differences (removed by centring on their median) and cancels in
    the second ones. Taking the larger of two noisy estimates makes a chance underestimate rarer.
    """
    first = [b - a for a, b in itertools.pairwise(drifts)]
    second = [b - a for a, b in itertools.pairwise(first)]
    sigma = 0.0
    if len(first) >= 2:
        med = statistics.median(first)
        sigma = 1.4826 * statistics.median(abs(x - med) for x in first) / math.sqrt(2.0)
    if second:
        sigma = max(sigma, 1.4826 * statistics.median(abs(x) for x in second) / math.sqrt(6.0))
    return sigma


def _trend(points: list[tuple[float, float]], config: EarlyWarningConfig) -> tuple[float, bool, str]:
    """``(slope, significant, explanation)`` of the trend over the last ``window`` points."""
    win = points[-config.window :]
    if len(win) < 3:
        return 0.0, False, f"trend needs 3 finite points, have {len(win)}"
    slope, sigma_fit, sxx = _least_squares(win)
    sigma = max(sigma_fit, _robust_noise([d for _, d in points]))
    stderr = sigma / math.sqrt(sxx)
    rise = slope * (win[-1][0] - win[0][0])
    min_rise = config.min_rise_fraction * config.warn_threshold
    if slope <= 0:
        return slope, False, f"no rising trend (slope {slope:.3g}/step)"
    if slope <= config.noise_sigmas * stderr:
        return slope, False, f"slope {slope:.3g}/step within noise (stderr {stderr:.3g})"
    if rise < min_rise:
        return slope, False, f"rise {rise:.3g} over the window below {min_rise:.3g}"
    return slope, True, "significant rising trend"

"""Fisher toolkit: importance, pruning, comparison, merging, preconditioning, uncertainty.

Every function takes diagonal Fisher estimates as ``{param name: Tensor}`` dicts (names from
``model.named_parameters()``, e.g. ``FisherCollector.fisher(task)``), works on CPU and GPU tensors
of any float dtype, reduces in fp32, and returns Python floats or fp32 tensors on the input device.
Dicts that must describe the same parameters raise :class:`KeyMismatchError` (a ``ValueError``)
naming the missing and extra keys; empty input returns the documented neutral value.

The forgetting quantities :func:`ewc_penalty`, :func:`fisher_weighted_damage` and
:func:`fisher_damage_asymmetry` live in :mod:`fisher_callbacks.functional.forgetting` and are
re-exported here unchanged; the overlap kernel is
:func:`fisher_callbacks.functional.fisher_ops.fisher_overlap_tensor`, shared with the per-head maps.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fisher_callbacks.functional.fisher_ops import (
    ACCUM_DTYPE,
    KeyMismatchError,
    TensorDict,
    as_fp32,
    as_tensor_dict,
    check_keys,
    check_matching,
    cosine_fp32,
    fisher_overlap_tensor,
    flatten_fp32,
    unflatten_like,
)
from fisher_callbacks.functional.forgetting import (
    ewc_penalty,
    fisher_damage_asymmetry,
    fisher_weighted_damage,
)

__all__ = [
    "KeyMismatchError",
    "compare_task_fisher",
    "ewc_penalty",
    "fisher_damage_asymmetry",
    "fisher_importance",
    "fisher_mask_overlap",
    "fisher_overlap",
    "fisher_pruning_masks",
    "fisher_uncertainty",
    "fisher_weighted_damage",
    "fisher_weighted_merge",
    "scale_by_fisher",
    "top_fisher_directions",
]


def _global_order(fisher: TensorDict) -> Tensor:
    """Flat indices of all Fisher entries, largest first; ties keep the flat (key, index) order."""
    flat = flatten_fp32(fisher)
    return torch.argsort(flat, descending=True, stable=True)


def fisher_importance(fisher: TensorDict, normalize: bool = True) -> dict[str, Tensor]:
    """Parameter importance from the Fisher diagonal.

    ``importance_k = F_k / sum_j F_j`` over *all* entries of *all* parameters (so the whole dict
    sums to 1), or ``F_k`` itself when ``normalize=False``. An all-zero Fisher gives all-zero
    importance (no NaN).

    Args:
        fisher: ``{name: F}`` diagonal Fisher.
        normalize: Divide by the global trace.

    Returns:
        ``{name: fp32 Tensor}`` shaped like ``fisher``; ``{}`` for an empty Fisher.
    """
    out = {k: as_fp32(v).clone() for k, v in fisher.items()}
    if not normalize or not out:
        return out
    trace = torch.stack([v.sum() for v in out.values()]).sum()
    safe = torch.where(trace > 0, trace, torch.ones_like(trace))
    return {k: v / safe for k, v in out.items()}


def fisher_pruning_masks(fisher: TensorDict, sparsity: float) -> dict[str, Tensor]:
    """Global Fisher pruning masks: keep the largest ``1 - sparsity`` fraction of all entries.

    With ``N`` entries in total, exactly ``n_keep = round((1 - sparsity) * N)`` (Python's ``round``,
    halves to even) entries are kept
    (``True``): those with the largest Fisher values across all parameters (one global ranking,
    not per parameter). Ties at the cut are broken by position: earlier parameters (dict order),
    then lower flat index, are kept first, so the count is always exact.

    Args:
        fisher: ``{name: F}`` diagonal Fisher.
        sparsity: Fraction of entries to prune, in ``[0, 1]``.

    Returns:
        ``{name: bool Tensor}`` shaped like ``fisher`` (True = keep); ``{}`` for an empty Fisher.

    Raises:
        ValueError: If ``sparsity`` is outside ``[0, 1]``.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if not fisher:
        return {}
    order = _global_order(fisher)
    n = order.numel()
    n_keep = round((1.0 - sparsity) * n)
    keep = torch.zeros(n, dtype=torch.bool, device=order.device)
    keep[order[:n_keep]] = True
    return {k: v.to(fisher[k].device) for k, v in unflatten_like(keep, fisher).items()}


def top_fisher_directions(fisher: TensorDict, k: int) -> list[tuple[str, int, float]]:
    """The ``k`` largest Fisher entries across all parameters.

    Args:
        fisher: ``{name: F}`` diagonal Fisher.
        k: How many entries; ``k <= 0`` gives ``[]``, ``k`` above the number of entries gives all.

    Returns:
        ``[(param name, flat index into F[name].reshape(-1), value), ...]`` sorted by value,
        largest first; ties keep (dict order, flat index) order.
    """
    if k <= 0 or not fisher:
        return []
    flat = flatten_fp32(fisher)
    order = _global_order(fisher)[:k]
    values = flat[order].tolist()
    names = list(fisher)
    ends = list(itertools.accumulate(fisher[n].numel() for n in names))  # exclusive end offsets
    out = []
    for pos, value in zip(order.tolist(), values):
        p = bisect.bisect_right(ends, pos)  # the parameter whose [start, end) holds pos
        start = ends[p - 1] if p else 0
        out.append((names[p], pos - start, value))
    return out


def fisher_overlap(fisher_a: TensorDict, fisher_b: TensorDict) -> float:
    """Unit-trace Fisher overlap of two tasks over all entries.

    ``overlap = sum_k sqrt(fa_k fb_k)`` with ``fa = F_A / tr(F_A)`` and ``fb = F_B / tr(F_B)``
    taken over every entry of every parameter: 1 for identical (or proportional) Fisher, 0 for
    disjoint supports, in ``[0, 1]``. A zero Fisher on either side (or empty dicts) gives 0.

    Args:
        fisher_a: Task A's diagonal Fisher.
        fisher_b: Task B's diagonal Fisher, same keys and shapes.

    Returns:
        Python float.

    Raises:
        KeyMismatchError: If the keys differ.
    """
    check_matching(fisher_a, fisher_b, names=("fisher_a", "fisher_b"))
    a = flatten_fp32(fisher_a)
    b = flatten_fp32(fisher_b, fisher_a).to(a.device)
    return float(fisher_overlap_tensor(a, b))


def compare_task_fisher(fisher_a: TensorDict, fisher_b: TensorDict) -> dict[str, object]:
    """Compare two tasks' Fisher globally and per parameter.

    With all entries flattened: ``overlap`` as in :func:`fisher_overlap`, ``cosine`` the cosine
    similarity ``<F_A, F_B> / (||F_A|| ||F_B||)`` (0 if either is zero), ``trace_a = sum F_A``,
    ``trace_b = sum F_B``. ``per_parameter[name]`` holds the same four numbers for one
    parameter (its overlap normalises that parameter's slice to unit trace).

    Args:
        fisher_a: Task A's diagonal Fisher.
        fisher_b: Task B's diagonal Fisher, same keys and shapes.

    Returns:
        ``{"overlap": float, "cosine": float, "trace_a": float, "trace_b": float,
        "per_parameter": {name: {"overlap", "cosine", "trace_a", "trace_b"}}}``; empty dicts give
        zeros and an empty ``per_parameter``.

    Raises:
        KeyMismatchError: If the keys differ.
    """
    check_matching(fisher_a, fisher_b, names=("fisher_a", "fisher_b"))
    a = flatten_fp32(fisher_a)
    b = flatten_fp32(fisher_b, fisher_a).to(a.device)
    per_parameter = {}
    for name in fisher_a:
        fa = as_fp32(fisher_a[name]).reshape(-1)
        fb = as_fp32(fisher_b[name]).reshape(-1).to(fa.device)
        per_parameter[name] = {
            "overlap": float(fisher_overlap_tensor(fa, fb)),
            "cosine": float(cosine_fp32(fa, fb)),
            "trace_a": float(fa.sum()),
            "trace_b": float(fb.sum()),
        }
    return {
        "overlap": float(fisher_overlap_tensor(a, b)),
        "cosine": float(cosine_fp32(a, b)),
        "trace_a": float(a.sum()),
        "trace_b": float(b.sum()),
        "per_parameter": per_parameter,
    }


def fisher_mask_overlap(mask_a: TensorDict, mask_b: TensorDict) -> float:
    """Jaccard overlap of two boolean masks over all entries: ``|A and B| / |A or B|``.

    Typically applied to :func:`fisher_pruning_masks` of two tasks (their shared important
    entries). Non-bool masks are read as ``!= 0``. When both masks are empty (no entry kept, or
    empty dicts) the union is empty and the overlap is defined as 0.0.

    Args:
        mask_a: ``{name: bool Tensor}``.
        mask_b: Same keys and shapes.

    Returns:
        Python float in ``[0, 1]``.

    Raises:
        KeyMismatchError: If the keys differ.
    """
    check_matching(mask_a, mask_b, names=("mask_a", "mask_b"))
    inter = 0
    union = 0
    for name in mask_a:
        ma = mask_a[name].detach() != 0
        mb = (mask_b[name].detach() != 0).to(ma.device)
        inter += int((ma & mb).sum())
        union += int((ma | mb).sum())
    return inter / union if union else 0.0


def fisher_weighted_merge(
    models_or_state_dicts: Sequence[nn.Module | TensorDict],
    fishers: Sequence[TensorDict] | None,
    fisher_floor: float = 1e-6,
) -> dict[str, Tensor]:
    """Fisher-weighted model merging (Matena & Raffel, 2022).

    For every entry ``k`` of a parameter that has a Fisher,
    ``theta_k = sum_m max(F_m,k, floor) theta_m,k / sum_m max(F_m,k, floor)``; the floor keeps the
    division defined and turns entries where no model has Fisher mass into the plain average. Every
    other floating-point entry (no Fisher given for it, or ``fishers=None``) is the plain average
    ``(1/M) sum_m theta_m,k``. Non-float entries (integer buffers) must be equal across models and
    are copied. Entries tied to a Fisher-weighted one (sharing its storage in the first model, like
    GPT-2's ``lm_head.weight`` and ``transformer.wte.weight`` in ``state_dict()``) get its merged
    value, so the result loads consistently. Computed in fp32 and cast back to the first model's
    dtype.

    Args:
        models_or_state_dicts: ``M >= 1`` models (their ``state_dict()`` is merged) or state dicts
            with the same keys and shapes.
        fishers: ``M`` Fisher dicts with the same keys, each a subset of the state-dict keys, or
            None for a plain average.
        fisher_floor: Floor ``> 0`` applied to every Fisher entry before weighting.

    Returns:
        Merged ``{name: Tensor}`` on the first model's devices; ``{}`` for an empty sequence.

    Raises:
        ValueError: On a count mismatch, a non-positive floor, shape mismatches or differing
            non-float entries.
        KeyMismatchError: If the state dicts or the Fisher dicts do not share their keys, or a
            Fisher names a parameter that is not in the state dicts.
    """
    if not fisher_floor > 0:
        raise ValueError(f"fisher_floor must be > 0, got {fisher_floor}")
    states = [as_tensor_dict(m, state_dict=True) for m in models_or_state_dicts]
    if not states:
        return {}
    if fishers is not None and len(fishers) != len(states):
        raise ValueError(f"got {len(states)} models but {len(fishers)} Fisher dicts")
    ref = states[0]
    for m, sd in enumerate(states[1:], start=1):
        check_matching(ref, sd, names=("state dict 0", f"state dict {m}"))
    weights: dict[str, list[Tensor]] = {}
    if fishers is not None:
        for m, f in enumerate(fishers):
            check_keys(fishers[0], f, names=("fisher 0", f"fisher {m}"))
            check_matching(f, ref, names=(f"fisher {m}", "state dicts"), allow_extra=True)
        for name in fishers[0]:
            dev = ref[name].device
            weights[name] = [as_fp32(f[name]).to(dev).clamp_min(fisher_floor) for f in fishers]

    merged: dict[str, Tensor] = {}
    tied_to: dict[tuple, str] = {}  # storage view of a Fisher-weighted entry -> its name
    for name in weights:
        t = ref[name]
        tied_to.setdefault((t.data_ptr(), tuple(t.shape), t.stride()), name)
    for name, first in ref.items():
        if not first.is_floating_point():
            if any(not torch.equal(first, sd[name].to(first.device)) for sd in states[1:]):
                raise ValueError(f"non-float entry {name!r} differs between models; cannot merge")
            merged[name] = first.clone()
            continue
        thetas = [as_fp32(sd[name]).to(first.device) for sd in states]
        if name in weights:
            num = torch.zeros_like(thetas[0], dtype=ACCUM_DTYPE)
            den = torch.zeros_like(thetas[0], dtype=ACCUM_DTYPE)
            for w, theta in zip(weights[name], thetas):
                num += w * theta
                den += w
            value = num / den
        else:
            value = torch.stack(thetas).mean(0)
        merged[name] = value.to(first.dtype)
    for name, first in ref.items():
        source = tied_to.get((first.data_ptr(), tuple(first.shape), first.stride()))
        if source is not None and name not in weights:
            merged[name] = merged[source]  # a tied copy (GPT-2's lm_head is wte): same value
    return merged


def scale_by_fisher(grads: TensorDict, fisher: TensorDict, damping: float) -> dict[str, Tensor]:
    """Diagonal natural-gradient preconditioning: ``g_k / (F_k + damping)``.

    Args:
        grads: ``{name: g}`` gradients.
        fisher: ``{name: F}`` diagonal Fisher, same keys and shapes.
        damping: ``> 0`` added to every Fisher entry (keeps zero-Fisher entries finite; units of F).

    Returns:
        ``{name: fp32 Tensor}`` on the gradients' devices; ``{}`` for empty dicts.

    Raises:
        KeyMismatchError: If the keys differ.
        ValueError: If ``damping <= 0``.
    """
    if not damping > 0:
        raise ValueError(f"damping must be > 0, got {damping}")
    check_matching(grads, fisher, names=("grads", "fisher"))
    return {k: as_fp32(g) / (as_fp32(fisher[k]).to(g.device) + damping) for k, g in grads.items()}


def fisher_uncertainty(fisher: TensorDict, n_samples: int, prior_precision: float = 1.0) -> dict[str, Tensor]:
    """Laplace posterior variance per entry: ``1 / (n_samples * F_k + prior_precision)``.

    The diagonal Laplace approximation of the posterior over weights after ``n_samples`` samples
    whose per-sample Fisher is ``F`` (Fisher of the mean loss) and a Gaussian prior of precision
    ``prior_precision``; its square root is the per-weight standard deviation. With zero Fisher it
    falls back to the prior variance ``1 / prior_precision``; negative entries (a noisy estimate)
    are clamped to 0.

    Args:
        fisher: ``{name: F}`` diagonal Fisher (per sample).
        n_samples: Number of samples ``n >= 0`` the posterior is conditioned on.
        prior_precision: ``> 0``.

    Returns:
        ``{name: fp32 Tensor}`` variances; ``{}`` for an empty Fisher.

    Raises:
        ValueError: If ``n_samples < 0`` or ``prior_precision <= 0``.
    """
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    if not prior_precision > 0:
        raise ValueError(f"prior_precision must be > 0, got {prior_precision}")
    return {
        k: 1.0 / (float(n_samples) * as_fp32(f).clamp_min(0.0) + prior_precision) for k, f in fisher.items()
    }

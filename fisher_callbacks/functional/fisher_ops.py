"""Generic helpers for dicts of tensors keyed by parameter name.

Every Fisher, gradient, parameter and mask in this package is a ``{param name: Tensor}`` dict whose
names come from ``model.named_parameters()``. These helpers are the one place that

* checks that two such dicts describe the same parameters (and raises :class:`KeyMismatchError`
  naming the missing and the extra keys when they do not),
* casts to fp32 before any arithmetic (fp16 flushes ``g**2`` below ~6e-8 to zero and bf16 rounding
  cancels small increments, so sums and means are never taken in the storage dtype),
* flattens a dict into one vector in a fixed, documented key order.

They hold no state and never modify their inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

TensorDict = Mapping[str, Tensor]

ACCUM_DTYPE = torch.float32
"""Dtype every reduction in this package accumulates in."""

_MAX_NAMES_IN_ERROR = 8


class KeyMismatchError(ValueError):
    """Two dicts of tensors that must describe the same parameters do not.

    A subclass of :class:`ValueError`, so ``except ValueError`` also catches it.
    """


def _format_names(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_NAMES_IN_ERROR])
    if len(names) > _MAX_NAMES_IN_ERROR:
        shown += f", ... ({len(names) - _MAX_NAMES_IN_ERROR} more)"
    return f"[{shown}]"


def check_keys(
    reference: Mapping[str, object],
    other: Mapping[str, object],
    *,
    names: tuple[str, str] = ("first", "second"),
    allow_extra: bool = False,
) -> None:
    """Raise if ``other`` does not hold exactly the keys of ``reference``.

    Args:
        reference: The dict whose keys define the expected parameter names.
        other: The dict to check against ``reference``.
        names: How the two dicts are called in the error message.
        allow_extra: If True, keys of ``other`` that are not in ``reference`` are allowed (only keys
            missing from ``other`` are an error).

    Raises:
        KeyMismatchError: Naming the keys missing from ``other`` and, unless ``allow_extra``, the
            keys only ``other`` has.
    """
    missing = [k for k in reference if k not in other]
    extra = [] if allow_extra else [k for k in other if k not in reference]
    if not missing and not extra:
        return
    parts = []
    if missing:
        parts.append(f"missing from {names[1]}: {_format_names(missing)}")
    if extra:
        parts.append(f"in {names[1]} but not in {names[0]}: {_format_names(extra)}")
    relation = "must contain every key of" if allow_extra else "must have the same keys as"
    raise KeyMismatchError(f"{names[1]} {relation} {names[0]}; " + "; ".join(parts))


def check_shapes(
    reference: TensorDict,
    other: TensorDict,
    *,
    names: tuple[str, str] = ("first", "second"),
) -> None:
    """Raise if a key shared by both dicts has tensors of different shapes.

    Args:
        reference: First dict of tensors.
        other: Second dict of tensors; only keys also in ``reference`` are compared.
        names: How the two dicts are called in the error message.

    Raises:
        ValueError: Naming the first key whose shapes differ and both shapes.
    """
    for key, t in reference.items():
        if key in other and tuple(t.shape) != tuple(other[key].shape):
            raise ValueError(
                f"shape mismatch for {key!r}: {names[0]} has {tuple(t.shape)}, "
                f"{names[1]} has {tuple(other[key].shape)}"
            )


def check_matching(
    reference: TensorDict,
    other: TensorDict,
    *,
    names: tuple[str, str] = ("first", "second"),
    allow_extra: bool = False,
) -> None:
    """:func:`check_keys` followed by :func:`check_shapes`."""
    check_keys(reference, other, names=names, allow_extra=allow_extra)
    check_shapes(reference, other, names=names)


def as_fp32(t: Tensor) -> Tensor:
    """Detached fp32 view/copy of ``t`` on its own device (no copy if already fp32)."""
    return t.detach().to(ACCUM_DTYPE)


def dict_device(*dicts: TensorDict) -> torch.device:
    """Device of the first tensor found in ``dicts``; CPU when all are empty."""
    for d in dicts:
        for t in d.values():
            return t.device
    return torch.device("cpu")


def scalar_zero(*dicts: TensorDict) -> Tensor:
    """A 0-d fp32 zero on the device of ``dicts`` (the defined value of an empty sum)."""
    return torch.zeros((), dtype=ACCUM_DTYPE, device=dict_device(*dicts))


def sum_fp32(parts: Iterable[Tensor], *dicts: TensorDict) -> Tensor:
    """Sum 0-d tensors in fp32; an empty iterable gives a 0-d fp32 zero on the dicts' device.

    Args:
        parts: 0-d tensors (any float dtype; each is cast to fp32 first).
        dicts: Only used to choose the device of the zero returned for empty ``parts``.

    Returns:
        0-d fp32 tensor.
    """
    parts = [as_fp32(p) for p in parts]
    if not parts:
        return scalar_zero(*dicts)
    return torch.stack(parts).sum()


def flatten_fp32(d: TensorDict, keys: Iterable[str] | None = None) -> Tensor:
    """Concatenate the flattened fp32 tensors of ``d`` into one vector.

    Args:
        d: ``{name: Tensor}``; all tensors on one device.
        keys: Key order; default the insertion order of ``d``.

    Returns:
        ``[sum_k numel(d[k])]`` fp32 vector; an empty dict gives an empty fp32 vector on CPU.
    """
    keys = list(d) if keys is None else list(keys)
    if not keys:
        return torch.zeros(0, dtype=ACCUM_DTYPE, device=dict_device(d))
    return torch.cat([as_fp32(d[k]).reshape(-1) for k in keys])


def unflatten_like(flat: Tensor, like: TensorDict) -> dict[str, Tensor]:
    """Inverse of :func:`flatten_fp32`: split ``flat`` into tensors shaped like ``like``.

    Args:
        flat: ``[sum_k numel(like[k])]`` vector.
        like: Dict giving the key order and the shapes.

    Returns:
        ``{name: flat[slice].reshape(like[name].shape)}`` (views into ``flat``).
    """
    total = sum(t.numel() for t in like.values())
    if flat.numel() != total:
        raise ValueError(f"flat vector has {flat.numel()} entries but the dict holds {total}")
    out: dict[str, Tensor] = {}
    offset = 0
    for key, t in like.items():
        n = t.numel()
        out[key] = flat[offset : offset + n].reshape(t.shape)
        offset += n
    return out


def as_tensor_dict(obj: TensorDict | nn.Module, *, state_dict: bool = False) -> dict[str, Tensor]:
    """Turn a module or a mapping into a plain ``{name: Tensor}`` dict of detached tensors.

    Args:
        obj: An ``nn.Module`` or a mapping of tensors.
        state_dict: For a module, use ``module.state_dict()`` (parameters and buffers) instead of
            ``named_parameters()``.

    Returns:
        A new dict; tensors are detached but not copied.
    """
    if isinstance(obj, nn.Module):
        items = obj.state_dict().items() if state_dict else obj.named_parameters()
        return {k: v.detach() for k, v in items}
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected an nn.Module or a mapping of tensors, got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"entry {k!r} is a {type(v).__name__}, not a Tensor")
        out[k] = v.detach()
    return out


def cosine_fp32(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of two tensors viewed as flat vectors, in fp32.

    ``cos = sum(a * b) / (||a|| ||b||)``; defined as 0 when either side has zero norm (or is empty),
    so the result is never NaN for finite inputs.

    Args:
        a: Any shape.
        b: Same number of entries as ``a``.

    Returns:
        0-d fp32 tensor in ``[-1, 1]`` on the device of ``a``.
    """
    a = as_fp32(a).reshape(-1)
    b = as_fp32(b).reshape(-1)
    denom = torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)
    dot = torch.dot(a, b)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, dot / safe, torch.zeros_like(dot)).clamp(-1.0, 1.0)


def fisher_overlap_tensor(fa: Tensor, fb: Tensor, dim: int | tuple[int, ...] = -1) -> Tensor:
    """Unit-trace Fisher overlap ``sum_k sqrt(fa_k fb_k)`` along ``dim``.

    Each side is normalised to unit trace along ``dim`` (``f / sum_dim f``), then
    ``overlap = sum_dim sqrt(fa_hat * fb_hat)``. This is the Bhattacharyya coefficient of the two
    normalised Fisher diagonals: 1 for proportional Fisher, 0 for disjoint supports, and in
    ``[0, 1]`` by Cauchy-Schwarz (the result is clamped to ``[0, 1]`` against rounding). A side
    whose trace is zero (all zeros, or an empty ``dim``) gives 0, never NaN. Negative entries
    (impossible for a Fisher, possible for a noisy estimate) are clamped to 0 first. Computed in
    fp32.

    Used for whole models (flattened), per parameter and per head (``dim=-1`` over a
    ``[..., H, per_head_numel]`` view).

    Args:
        fa: Fisher of task A, ``[..., K, ...]``.
        fb: Fisher of task B, broadcastable with ``fa``.
        dim: The dimension(s) holding the entries ``k`` to sum over.

    Returns:
        fp32 tensor of the broadcast shape with ``dim`` removed (0-d for 1-d inputs).
    """
    fa = as_fp32(fa).clamp_min(0.0)
    fb = as_fp32(fb).clamp_min(0.0)
    ta = fa.sum(dim=dim, keepdim=True)
    tb = fb.sum(dim=dim, keepdim=True)
    na = fa / torch.where(ta > 0, ta, torch.ones_like(ta))  # zero trace -> all-zero slice
    nb = fb / torch.where(tb > 0, tb, torch.ones_like(tb))
    return torch.sqrt(na * nb).sum(dim=dim).clamp(0.0, 1.0)

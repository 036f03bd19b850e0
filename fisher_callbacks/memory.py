"""Memory ledger: the bytes of every persistent tensor the monitors hold, by named group.

Each monitor (and the engine objects under it) answers ``memory_ledger(seen) -> {group: bytes}``;
:func:`suite_ledger` sums them over the attached monitors. A tensor is counted once, under the first
group that reaches its storage (``seen`` holds the storages already counted), so a gradient that
the FisherMonitor keeps and the forgetting monitor reads is not counted twice, and views into one
flat buffer count the buffer once. Bytes are those of the storage (``nbytes``), also for tensors on
the ``meta`` device, so a ledger of a model built on ``meta`` gives the sizes without allocating.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

Seen = set[Any]

_SKIP_TYPES: tuple[type, ...] = (nn.Module,)


def _storage_key(t: torch.Tensor) -> Any:
    try:
        ptr = t.untyped_storage().data_ptr()
    except RuntimeError:  # no plain storage (a DTensor, a freed FSDP2 unsharded parameter)
        ptr = 0
    if ptr == 0:  # meta (or empty) storage: no address, count each tensor object once
        return ("id", id(t))
    return (t.device.type, t.device.index, ptr)


def tensor_bytes(obj: Any, seen: Seen | None = None, _depth: int = 0) -> int:
    """Bytes of the tensors reachable from ``obj`` not yet in ``seen`` (which it updates).

    Walks dicts, lists, tuples, sets, dataclasses and the attributes of this package's plain
    objects (never an ``nn.Module``, a Lightning callback or a trainer: those are not monitor
    state). A view counts its whole storage once.
    """
    seen = set() if seen is None else seen
    if _depth > 8 or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
        return 0
    if torch.is_tensor(obj):
        key = _storage_key(obj)
        if key in seen:
            return 0
        seen.add(key)
        if key[0] == "id":
            return obj.numel() * obj.element_size()
        return int(obj.untyped_storage().nbytes())
    if isinstance(obj, _SKIP_TYPES) or _is_callback(obj):
        return 0
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v, seen, _depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(tensor_bytes(v, seen, _depth + 1) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(tensor_bytes(getattr(obj, f.name), seen, _depth + 1) for f in dataclasses.fields(obj))
    if type(obj).__module__.startswith("fisher_callbacks") and hasattr(obj, "__dict__"):
        return sum(tensor_bytes(v, seen, _depth + 1) for v in vars(obj).values())
    return 0


def _is_callback(obj: Any) -> bool:
    try:
        import lightning.pytorch as pl
    except ImportError:  # pragma: no cover - lightning is a dependency
        return False
    return isinstance(obj, (pl.Callback, pl.Trainer))


def attribute_ledger(obj: Any, seen: Seen | None = None, skip: Iterable[str] = ()) -> dict[str, int]:
    """``{attribute: bytes}`` of every tensor-holding attribute of ``obj`` (generic; see
    :func:`tensor_bytes`), leading underscores stripped from the names; empty groups left out."""
    seen = set() if seen is None else seen
    skip = set(skip)
    out: dict[str, int] = {}
    for name, value in vars(obj).items():
        if name in skip:
            continue
        n = tensor_bytes(value, seen)
        if n:
            out[name.lstrip("_")] = out.get(name.lstrip("_"), 0) + n
    return out


def suite_ledger(owners: Iterable[Any], model: nn.Module | None = None) -> dict[str, int]:
    """``{f"{Owner}/{group}": bytes}`` over ``owners`` (each with ``memory_ledger(seen)``), a
    tensor counted once over all of them; the parameters, gradients and buffers of ``model``
    are the model's, never counted (a monitor that keeps a view of a weight holds no copy)."""
    seen: Seen = set()
    if model is not None:
        for t in [*model.parameters(), *model.buffers()]:
            tensor_bytes(t, seen)
            if t.grad is not None:
                tensor_bytes(t.grad, seen)
    out: dict[str, int] = {}
    for owner in owners:
        ledger = getattr(owner, "memory_ledger", None)
        if ledger is None:
            continue
        for group, n in ledger(seen).items():
            key = f"{type(owner).__name__}/{group}"
            out[key] = out.get(key, 0) + int(n)
    return out


def total_mb(ledger: Mapping[str, int]) -> float:
    """The ledger's sum in MiB."""
    return sum(ledger.values()) / 2**20


def format_ledger(ledger: Mapping[str, int], reference_bytes: int | None = None) -> str:
    """A plain-text table: one row per group (MiB, largest first), the total, and the total as a
    multiple of ``reference_bytes`` (e.g. the trainable weights) when given."""
    rows = sorted(ledger.items(), key=lambda kv: -kv[1])
    width = max([len(k) for k in ledger] + [5])
    lines = [f"{'group':<{width}}  {'MiB':>10}"]
    lines += [f"{k:<{width}}  {v / 2**20:>10.2f}" for k, v in rows]
    total = sum(ledger.values())
    lines.append(f"{'total':<{width}}  {total / 2**20:>10.2f}")
    if reference_bytes:
        lines.append(f"{'x trainable weights':<{width}}  {total / reference_bytes:>10.2f}")
    return "\n".join(lines)


def trainable_bytes(module: nn.Module) -> int:
    """Bytes of the parameters that train (``requires_grad``), each storage once."""
    seen: Seen = set()
    return sum(tensor_bytes(p, seen) for p in module.parameters() if p.requires_grad)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``: ``torch.cuda.mem_get_info`` on a GPU,
    ``MemAvailable`` of ``/proc/meminfo`` on a Linux CPU; ``None`` where it cannot be known."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        return None
    return None

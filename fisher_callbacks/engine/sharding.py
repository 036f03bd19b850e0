"""Which kind of parameter sharding a model is under, and what the suite supports of it.

- one process, DDP: everything;
- FSDP2 (``torch.distributed.fsdp.fully_shard``, Lightning's ``ModelParallelStrategy``): the
  parameters are ``DTensor`` shards. Capture, Fisher sums and QK-OV maps read only the
  projections' activations and output gradients, which FSDP2 hands whole to each module's hooks,
  and work as under DDP; the forgetting monitor needs whole parameters and probe gradients and
  stays out of the fit with one warning;
- DeepSpeed ZeRO-3 (parameters of shape ``[0]`` with their real shape in ``ds_shape``) and FSDP1
  (``FullyShardedDataParallel``, flattened ``FlatParameter`` s): not supported, a clear error (a
  warning and the suite out of the fit with ``required=False``), never a silent wrong result.
"""

from __future__ import annotations

import torch

SUPPORTED = (
    "supported: one process, DDP, and FSDP2 (torch fully_shard, Lightning's ModelParallelStrategy) "
    "for capture, Fisher and QK-OV"
)


def sharding_of(module: torch.nn.Module) -> str | None:
    """``"zero3"``, ``"fsdp1"``, ``"fsdp2"`` or ``None`` (whole parameters on every rank)."""
    for m in module.modules():
        if type(m).__name__ == "FullyShardedDataParallel":
            return "fsdp1"
    for p in module.parameters():
        if hasattr(p, "ds_shape") or hasattr(p, "ds_id"):
            return "zero3"
        if type(p).__name__ == "FlatParameter" or getattr(p, "_is_flat_param", False):
            return "fsdp1"
        if is_dtensor(p):
            return "fsdp2"
    return None


def check_supported(module: torch.nn.Module) -> str | None:
    """The sharding of ``module`` (see :func:`sharding_of`); ``ValueError`` naming what is
    supported for DeepSpeed ZeRO-3 and FSDP1."""
    kind = sharding_of(module)
    if kind == "zero3":
        raise ValueError(
            "DeepSpeed ZeRO-3 partitions every parameter across ranks (each rank holds a [0]-shaped "
            f"placeholder): the per-head Fisher maps would be built from placeholders. {SUPPORTED}; "
            "ZeRO-1/2 keep whole parameters and work as DDP."
        )
    if kind == "fsdp1":
        raise ValueError(
            "FSDP1 (FullyShardedDataParallel) flattens the parameters into FlatParameters, so the "
            f"Q/K/V/O weights cannot be mapped to heads. {SUPPORTED}; use FSDP2 (fully_shard)."
        )
    return kind


def is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed
        return False
    return isinstance(t, DTensor)

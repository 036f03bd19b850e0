"""Which kind of parameter sharding a model is under, and what the suite supports of it.

- one process, DDP: everything;
- FSDP2 (``torch.distributed.fsdp.fully_shard``, Lightning's ``ModelParallelStrategy``): the
  parameters are ``DTensor`` shards. Capture reads only the projections' activations and output
  gradients, which FSDP2 hands whole to each module's hooks, as under DDP. Per-parameter state is
  kept as this rank's shards (:class:`Shards`): the forgetting monitor's anchor, theta_b and
  probe-gradient rows, whose dot products are summed over the shard group, and the Fisher sums,
  per-entry EMA and sketch whitening of the FisherCollector, gathered whole (:meth:`Shards.whole`)
  only while a boundary reads them or a captured step sketches;
- DeepSpeed ZeRO-3 (parameters of shape ``[0]`` with their real shape in ``ds_shape``) and FSDP1
  (``FullyShardedDataParallel``, flattened ``FlatParameter`` s): not supported, a clear error (a
  warning and the suite out of the fit with ``required=False``), never a silent wrong result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

SUPPORTED = (
    "supported: one process, DDP, and FSDP2 (torch fully_shard, Lightning's ModelParallelStrategy, "
    "accelerate's FSDP2) for capture, Fisher, QK-OV and forgetting"
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


class Shards:
    """How the parameters of a module are split over the ranks, for per-parameter state kept as
    this rank's shards (see :meth:`of`).

    Under FSDP2 a ``DTensor`` parameter's local block is ``p.to_local()``, at an offset into the
    whole tensor (``Shard(0)``: a range of dim-0 rows); a parameter left whole on every rank
    counts on the group's first rank only (an empty block elsewhere), so that every sum over the
    parameters is the sum of the ranks' partial sums, once. Without sharding (one process, DDP)
    every method returns its input: the numbers are those of the whole tensors, bit for bit.

    Attributes:
        group: the process group the shards are spread over (None: whole tensors).
    """

    def __init__(self, module: torch.nn.Module | None = None) -> None:
        self.group: Any = None
        self._first = True  # this rank is the group's first: it holds the whole tensors' terms
        self._blocks: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}  # name -> offset, shape
        self._shapes: dict[str, tuple[int, ...]] = {}  # name -> the whole parameter's shape
        self._sharded: set[str] = set()
        if module is None:
            return
        params = parameters(module)
        sharded = {n: p for n, p in params.items() if is_dtensor(p)}
        if not sharded:
            return
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        self._sharded = set(sharded)
        first = next(iter(sharded.values()))
        dims = [i for i, pl in enumerate(first.placements) if isinstance(pl, Shard)]
        if len(dims) != 1:
            raise ValueError(f"sharded parameters need one Shard placement, got {first.placements}")
        mesh = first.device_mesh
        self.group = mesh.get_group(dims[0])
        self._first = mesh.get_local_rank(dims[0]) == 0
        for name, p in params.items():
            if name in sharded:
                if p.device_mesh != mesh or p.placements != first.placements:
                    raise ValueError(f"{name}: another mesh or placement than the other parameters")
                shape, offset = compute_local_shape_and_global_offset(p.shape, mesh, p.placements)
            else:  # whole on every rank: its terms count on the first rank only
                shape = tuple(p.shape) if self._first else (0, *p.shape[1:])
                offset = (0,) * p.dim()
            self._blocks[name] = (tuple(offset), tuple(shape))
            self._shapes[name] = tuple(p.shape)

    @classmethod
    def of(cls, module: torch.nn.Module) -> Shards:
        """The shards of ``module``'s parameters (whole tensors unless FSDP2 sharded them)."""
        return cls(module)

    @property
    def sharded(self) -> bool:
        return self.group is not None

    def local(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """This rank's block of parameter ``name``: ``t`` is the parameter or a tensor of its
        shape (a DTensor, or a whole tensor of a parameter FSDP2 left whole), or already this
        block (then returned as it is)."""
        if self.group is None:
            return t
        if name in self._sharded:  # a tensor already local passes as it is
            return local_tensor(t)
        return t if self._first else t[:0]

    def rows(self, name: str, whole: torch.Tensor) -> torch.Tensor:
        """This rank's block of ``whole``, a tensor of parameter ``name``'s full shape (e.g. a
        Fisher the FisherMonitor keeps whole): a view, no copy."""
        if self.group is None or name not in self._blocks:
            return whole
        offset, shape = self._blocks[name]
        return whole[tuple(slice(o, o + n) for o, n in zip(offset, shape))]

    def whole(self, name: str, block: torch.Tensor) -> torch.Tensor:
        """The whole tensor of parameter ``name``'s shape from every rank's ``block`` (what
        :meth:`rows` took from it), on ``block``'s device: ``block`` itself without sharding. A
        collective over the shard group: every rank calls it, for the same names in the same
        order. Exact in any dtype (each entry is one rank's, the others add zeros)."""
        if self.group is None or name not in self._blocks:
            return block
        wire = torch.float32 if block.dtype in (torch.bfloat16, torch.float16) else block.dtype
        out = torch.zeros(self._shapes[name], dtype=wire, device=collective_device(self.group))
        self.rows(name, out).copy_(block)
        torch.distributed.all_reduce(out, group=self.group)
        return out.to(block.device, block.dtype)

    def block(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """This rank's block of ``t``: its rows (a copy) when ``t`` has parameter ``name``'s whole
        shape (a tensor of a checkpoint, which keeps whole tensors), else ``t`` itself (already
        this rank's block; whole tensors without sharding). No collective."""
        if self.group is None or tuple(t.shape) != self._shapes.get(name):
            return t
        return self.rows(name, t).clone()

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over the shard group (fp64 on the wire), in ``t``'s dtype; ``t``
        itself without sharding."""
        if self.group is None:
            return t
        total = t.detach().to(torch.float64, copy=True)
        torch.distributed.all_reduce(total, group=self.group)
        return total.to(t.dtype)

    def reduce_floats(self, values: Sequence[float]) -> list[float]:
        """Python floats summed over the shard group (themselves without sharding)."""
        if self.group is None:
            return list(values)
        device = collective_device(self.group)
        return self.reduce(torch.tensor(list(values), dtype=torch.float64, device=device)).tolist()

    def head_sums(
        self, layout: Any, t: torch.Tensor, name: str, layer: int, block: str, bias: bool
    ) -> torch.Tensor:
        """``[H_block]``: per-head sums of ``t``, this rank's block of ``name`` (the weight or the
        bias of ``block`` in ``layer``); those of every rank add up to
        ``layout.head_view(whole, ...).sum(-1)``."""
        if self.group is None or name not in self._blocks:
            return layout.head_view(t, layer, block, bias=bias).sum(-1)
        spec = layout.spec(layer, block)
        axis = 0 if bias else spec.axis
        offset, _ = self._blocks[name]
        along = t.sum([d for d in range(t.dim()) if d != axis]) if t.dim() > 1 else t  # [local n]
        idx = spec.index.to(t.device) - offset[axis]  # [H_block, head_dim] into the local range
        inside = (idx >= 0) & (idx < along.numel())
        if along.numel() == 0:
            return torch.zeros(idx.shape[0], dtype=t.dtype, device=t.device)
        picked = along[idx.clamp(0, along.numel() - 1)]
        return torch.where(inside, picked, torch.zeros((), dtype=t.dtype, device=t.device)).sum(-1)


def gradient_sums(
    module: torch.nn.Module, loss: torch.Tensor, params: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``grad loss`` of ``params`` under FSDP2: of a sharded parameter, this rank's block of the
    sum over the ranks' losses; of a parameter left whole, this rank's own gradient. One full
    backward (``autograd.grad`` cannot reach parameters FSDP2 gathered for the forward), whose
    ``.grad`` (FSDP2's mean over the group: times its size; a custom
    ``set_gradient_divide_factor`` is not undone) is read, then ``.grad`` is put back as it was
    on every parameter of ``module``. A collective: every rank calls it."""
    named = parameters(module)  # the sharded parameters, whose .grad the backward writes
    params = {n: named[n] for n in params}
    saved = [(p, p.grad) for p in named.values()]
    try:
        for p, _ in saved:
            p.grad = None
        loss.backward()
        out = {}
        for name, p in params.items():
            g = p.grad
            if g is None:  # not reached by the loss
                out[name] = torch.zeros_like(local_tensor(p.detach()))
            elif is_dtensor(g):  # reduce-scattered: the mean over the group
                out[name] = g.to_local().detach().mul(g.device_mesh.size())
            else:
                out[name] = g.detach()
        return out
    finally:
        for p, g in saved:
            p.grad = g


def parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``dict(module.named_parameters())`` with every FSDP2 module resharded first: after a
    forward FSDP2 may leave a module's parameters gathered (the root's, by default), registered as
    plain whole tensors whose storage it frees later; resharded, they are the ``DTensor`` s
    the optimizer updates. No collective (the next forward or backward gathers again)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed
        return dict(module.named_parameters())
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return dict(module.named_parameters())


def map_parameter_state(
    state: Mapping[str, Any],
    keys: Sequence[str],
    fn: Callable[[str, torch.Tensor], torch.Tensor],
    collective: bool = True,
) -> dict[str, Any]:
    """``state`` with ``fn(name, tensor)`` applied to every tensor of its entries ``keys``, each
    ``None``, ``{parameter: tensor}`` or ``{task: {parameter: tensor}}``. ``collective``: in
    sorted order, the same on every rank, for an ``fn`` such as :meth:`Shards.whole`; else in
    the entries' own order, which the result keeps."""

    def apply(entry: Any) -> Any:
        if not isinstance(entry, Mapping):
            return entry
        items = sorted(entry.items()) if collective else entry.items()
        return {k: fn(k, v) if torch.is_tensor(v) else apply(v) for k, v in items}

    return {**state, **{k: apply(state[k]) for k in keys if k in state}}


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t.to_local()`` of a DTensor, else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def collective_device(group: Any = None) -> torch.device:
    """Device for collectives over ``group`` (default: the world): CUDA for NCCL, CPU for gloo."""
    backend = torch.distributed.get_backend(group)
    if "nccl" in str(backend) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

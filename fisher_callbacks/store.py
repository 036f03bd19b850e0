"""Per-sample gradient stores behind one interface: exact rows or per-head sketches.

A :class:`GradientStore` keeps, per task, a reservoir of per-sample representations under the
samples' TRUE ids, within a byte budget, and answers one question for the QK-OV metric:

    ``head_view(task, layer, block, heads, inv_fisher, rows) -> [n, H_block, k]`` fp32

a matrix whose rows are comparable by inner products: ``<view_i, view_j>`` is (an unbiased
estimate of) the signed Fisher-metric score ``sum_k g_ik D_k g_jk`` of the head's slice. Every
map of :class:`~fisher_callbacks.interference.QKOVInterferenceMetric` (signed pair scores, the
conflict cosine of task means, Gram matrices and the permutation test) is built from these
views and is blind to which store produced them.

* :class:`ExactStore` keeps the signed gradients ``g_i`` of every monitored weight
  (``storage_dtype``). Its head view is the head's entries whitened by the ``D`` the caller asks
  for, ``g * sqrt(D)``: inner products are exact, and because the entries are kept, the
  non-linear variants (directional ``C_i D |g_j|``, symmetric) are available (``entrywise``).
* :class:`SketchStore` keeps, for every slice ``s = (layer, block, head)`` with per-sample
  gradient ``G`` of shape ``[r, c]`` (``r = head_dim`` along the head axis, ``c`` the other axis
  of the weight, ``N = r c`` entries), a sparse JL sketch (a CountSketch) of the whitened slice
  ``x = W * G``, ``W = D_w^{1/2}``: ``z_b = sum_{n : h(n) = b} s_n x_n`` for ``b < k``
  (``k = min(sketch_dim, N)``) with random signs ``s_n = +-1``. The hash folds the slice, its
  rows taken in a random order ``pi`` (per head), into ``k`` buckets: ``h(i, j) = (pi(i) c + j)
  mod k``, so ``z = (s * x[pi]).view(-1, k).sum(0)``; the row order is applied by the same gather
  that cuts the head out of the weight, so a sketch costs one multiply and one sum per entry (no
  ``[k, N]`` matrix, no random gather). Since ``E[s_n s_m] = [n = m]``, ``E <z_i, z_j> =
  <x_i, x_j> = sum_n g_in D_w,n g_jn`` for any hash: unbiased for the signed score in the metric
  ``D_w``, with variance ``~ (|x_i|^2 |x_j|^2 + <x_i, x_j>^2) / k``. A Kronecker projection
  ``P^T (W G) Q`` was measured first and rejected: per-sample gradients of a T-token sample have
  rank <= T, and for low-rank ``G`` the Kronecker estimate is close to a product of two
  independent JL estimates of dims ``k_r`` and ``k_c``, so its error fell like ``k**-0.34``
  instead of ``k**-0.5`` on a Llama-GQA slice; a fully random hash (a random gather of every
  entry) made the flagged step of the 135M model 1.50x instead of 1.12x. Signs and row orders are
  drawn per (layer, block) from a seed derived from the run seed and the (layer, block) index
  (regenerated, never saved; the seed is in ``state_dict``). Q/K/V biases (with
  ``include_bias``) are kept whitened and unprojected (``head_dim`` numbers per head) and appended
  to the sketch. Its head view ignores ``inv_fisher``: the whitening was fixed when the sample
  was sketched (see below), and the per-entry variants are not available.

**Which Fisher whitens the sketches.** ``D_w = 1 / (max(F_w, eps) + lambda)`` with ``F_w`` the
*whitening Fisher*: the mean over the known tasks of their contribution Fishers
(``mean_T I_T``; for two tasks exactly the pooled Fisher ``(I_A + I_B) / 2`` of the exact
conflict cosine and test), frozen by :meth:`SketchStore.set_whitening`. ``FisherMonitor``
freezes it at every validation boundary after the DDP sync (so probe sets are sketched under the
Fisher of that boundary) and, before the first boundary, from the Fisher of the first captured
step (all-reduced across ranks). Each row records the version of the whitening it was made
under (``versions``); two rows of the same version estimate the signed score in that metric,
rows of versions ``u`` and ``v`` the score in ``sqrt(D_u D_v)``.

**Duplicate ids.** A sample whose id is already stored for its task replaces that row in place
(the newer gradient wins; one row per id), so every accessor (``ids``, ``row_of``, views,
``stored``) agrees. Every offer still counts as seen by the reservoir.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._rng import SeededGenerator
from .functional.fisher_ops import ACCUM_DTYPE
from .layouts import BLOCKS, AttentionLayout
from .memory import attribute_ledger, tensor_bytes

__all__ = [
    "DEFAULT_SKETCH_DIM",
    "STORE_KINDS",
    "ExactStore",
    "GradientStore",
    "HeadIndex",
    "HeadMajor",
    "SketchStore",
    "StagedRows",
]

SampleId = int | str

STORE_KINDS: tuple[str, ...] = ("auto", "exact", "sketch")
"""Values of ``store=`` on FisherCollector / FisherMonitor."""

DEFAULT_SKETCH_DIM = 512
"""Numbers per (layer, block, head) slice of a sketched sample. Chosen from the measured agreement
with the exact path on the demo model (4 layers x 4 heads, slices of 1024 entries): Spearman of
the conflict-cosine map vs exact 0.95-0.96 at 512 (4 seeds), 0.92-0.95 at 384, 0.85-0.89 at 256."""

RowSelect = slice | Tensor | None


# ---------------------------------------------------------------------- head gathers
class HeadIndex:
    """Flat positions of the heads' entries of a parameter, cached per head pattern.

    The positions come from ``layout.head_view`` applied to an index map of the parameter, so
    the layout stays the one place that knows where heads live; a gather with them is one
    ``index_select`` per tensor, or a ``narrow`` when the positions are one contiguous range.
    """

    def __init__(self, layout: AttentionLayout) -> None:
        self.layout = layout
        self._cache: dict[tuple, tuple[Tensor, int | None]] = {}

    def entries(self, layer: int, block: str, hsel: Tensor) -> list[tuple[str, Tensor, int | None]]:
        """``[(name, index [Hb, k_e], start or None)]`` for the weight (and bias) of the block."""
        out = []
        for name, is_bias in self.layout.block_entries(layer, block):
            shape = tuple(self.layout.param_shapes[name])
            spec = self.layout.spec(layer, block)
            key = (shape, is_bias, spec.axis, spec.index.numpy().tobytes(), tuple(hsel.tolist()))
            if key not in self._cache:
                numel = math.prod(shape)
                dtype = torch.int32 if numel < 2**31 else torch.long
                positions = torch.arange(numel, dtype=dtype).view(shape)
                view = self.layout.head_view(positions, layer, block, bias=is_bias)  # [H, k_e]
                index = view.index_select(0, hsel).contiguous()  # [Hb, k_e]
                flat = index.reshape(-1)
                start = int(flat[0]) if flat.numel() else 0
                contiguous = torch.equal(flat, torch.arange(start, start + flat.numel(), dtype=dtype))
                self._cache[key] = (index, start if contiguous else None)
            out.append((name, *self._cache[key]))
        return out

    def gather(
        self,
        tensors: Mapping[str, Tensor],
        layer: int,
        block: str,
        hsel: Tensor,
        rows: RowSelect = None,
        device: torch.device | None = None,
        owner: str = "",
    ) -> Tensor:
        """Head entries of ``tensors`` (``{name: [..., *shape]}``): ``[..., Hb, k]`` fp32.

        ``rows`` selects along the leading (sample) dim first; weight and bias entries are
        concatenated along the last dim. The result may be a view (never modify it in place).
        """
        parts = []
        for name, index, start in self.entries(layer, block, hsel):
            if name not in tensors:
                raise KeyError(
                    f"no tensor for parameter {name!r} in {owner or 'the input'}: the collector does "
                    "not monitor the parameters of this layout"
                )
            x = tensors[name]
            shape = tuple(self.layout.param_shapes[name])
            if tuple(x.shape[x.dim() - len(shape) :]) != shape:
                raise ValueError(
                    f"{owner}: tensor of shape {tuple(x.shape)} for {name!r} does not end with the "
                    f"parameter shape {shape}"
                )
            if rows is not None:
                x = x[rows] if isinstance(rows, slice) else x.index_select(0, rows.to(x.device))
            lead = x.shape[: x.dim() - len(shape)]
            flat = x.reshape(*lead, -1)
            if start is not None:
                picked = flat.narrow(-1, start, index.numel())
            else:
                picked = flat.index_select(-1, index.reshape(-1).to(x.device))
            parts.append(picked.reshape(*lead, *index.shape))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return out.to(device or out.device, ACCUM_DTYPE)


# ---------------------------------------------------------------------- reservoir base
@dataclass
class _Reservoir:
    """Stored rows of one task: ``ids[k]`` owns row k of every tensor in ``rows``."""

    ids: list[SampleId] = field(default_factory=list)
    rows: dict[str, Tensor] = field(default_factory=dict)  # key -> [size, *row_shape]
    capacity: int = 0
    seen: int = 0  # reservoir candidates offered
    versions: Tensor | None = None  # [size] long, the store's version when each row was written


@dataclass
class StagedRows:
    """One batch of one task on its way into the store (:meth:`GradientStore.stage`).

    Attributes:
        task: the task.
        src: ``[n]`` long, batch rows that get a slot; ``dst``: ``[n]`` long, their slots.
        lookup: ``[B]`` long, the staged position of each batch row (``-1``: no slot).
        ids, seen: the reservoir's ids and offer count once the batch is committed.
        rows: ``{key: [n, *row_shape]}`` the staged rows (empty when no row gets a slot).
    """

    task: str
    src: Tensor
    dst: Tensor
    lookup: Tensor
    ids: list[SampleId]
    seen: int
    rows: dict[str, Tensor]
    written: set[str] = field(default_factory=set)  # keys :meth:`GradientStore.write` filled


@dataclass(frozen=True)
class HeadMajor:
    """A weight's per-sample gradients with its head axis first, in a chosen order: ``[m, A, C]``.

    Row ``a`` of a sample is the weight's ``index[a]``-th slice along ``axis`` (``C`` entries: a
    row of a Linear ``[out, in]`` weight for ``axis=0``, a column for ``axis=1``). ``index`` lists
    every position of the axis once (each block's heads in the order a store reads them, then the
    rest), so Fisher sums made in this layout map back with :meth:`to_natural`.
    """

    axis: int
    index: Tensor  # [A] long
    shape: tuple[int, int]

    def from_natural(self, g: Tensor) -> Tensor:
        """``[m, *shape]`` -> ``[m, A, C]`` (a gather)."""
        x = g.index_select(1 + self.axis, self.index.to(g.device))
        return x.movedim(1 + self.axis, 1).reshape(g.shape[0], self.index.numel(), -1)

    def to_natural(self, t: Tensor) -> Tensor:
        """``[A, C]`` (e.g. a sum over samples) -> ``[*shape]``."""
        out = torch.empty((self.shape[self.axis], t.shape[-1]), dtype=t.dtype, device=t.device)
        out.index_copy_(0, self.index.to(t.device), t)
        return out.movedim(0, self.axis).contiguous()


_LEDGER_NAMES = {
    "white_views": "whitening",
    "white_rows": "whitening",
    "white_plain": "whitening_uncovered",
    "proj": "projections",
}


class GradientStore(ABC):
    """Reservoir of per-sample representations per task within ``gradient_memory_mb``.

    Subclasses say what a row is (:meth:`row_shapes`), how a parameter's per-sample gradients
    become rows (:meth:`write`) and how rows become head views (:meth:`head_view`). The
    reservoir (Algorithm R per task, equal capacity per task, uniform shrinking when a task
    arrives, in-place replacement of a duplicate id) is shared.

    Args:
        layout: the attention layout.
        storage_dtype: dtype of the stored rows.
        gradient_memory_mb: cap on the stored rows of all tasks together.
        max_samples_per_task: optional cap per task.
        generator: the collector's :class:`~fisher_callbacks._rng.SeededGenerator` (reservoir
            draws; in its ``state_dict``), read lazily so the store pickles and follows a restored state.
    """

    kind: str = ""
    entrywise: bool = False
    """True when per-entry gradients are kept (the directional/symmetric variants need them)."""
    whitened: bool = False
    """True when rows are made under a frozen Fisher whitening (:meth:`set_whitening`), as
    sketches are; a store of raw gradients whitens at compute time instead."""

    @property
    def needs_whitening(self) -> bool:
        """True while a :attr:`whitened` store has no whitening yet (it cannot make a row)."""
        return False

    def set_whitening(self, fisher: Mapping[str, Tensor]) -> None:
        """Freeze the whitening of the next rows from ``{name: F_w}`` (:attr:`whitened` stores)."""
        raise TypeError(f"a {self.kind!r} store keeps raw gradients: it takes no whitening")

    def park_whitening(self, shards: Any) -> None:
        """Keep only ``shards``' rows of the whitening (FSDP2, between the steps that make rows);
        nothing for a store without one."""
        del shards  # a store of raw gradients keeps no whitening

    def unpark_whitening(self, shards: Any) -> None:
        """The whole whitening back from every rank's rows (a collective when it is parked)."""
        del shards  # nothing is ever parked in a store of raw gradients

    def __init__(
        self,
        layout: AttentionLayout,
        storage_dtype: torch.dtype,
        gradient_memory_mb: float,
        max_samples_per_task: int | None,
        generator: SeededGenerator,
    ) -> None:
        self.layout = layout
        self.param_names = layout.monitored_parameters()
        self.storage_dtype = storage_dtype
        self.gradient_memory_mb = float(gradient_memory_mb)
        self.max_samples_per_task = max_samples_per_task
        self._rng = generator
        self._tasks: dict[str, _Reservoir] = {}
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self.version = 0  # what rows are made under (SketchStore: the whitening); recorded per row

    @property
    def generator(self) -> torch.Generator:
        """The collector's ``torch.Generator`` (created lazily, see :class:`SeededGenerator`)."""
        return self._rng.generator

    # ------------------------------------------------------------------ budget
    @abstractmethod
    def row_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{key: shape}`` of one stored row (one sample)."""

    def _row_shapes(self) -> dict[str, tuple[int, ...]]:
        if self._shapes is None:
            self._shapes = self.row_shapes()
        return self._shapes

    @property
    def bytes_per_sample(self) -> int:
        """Bytes one stored sample takes (``storage_dtype``)."""
        itemsize = torch.empty((), dtype=self.storage_dtype).element_size()
        return sum(math.prod(s) for s in self._row_shapes().values()) * itemsize

    def capacity_per_task(self, n_tasks: int) -> int:
        """Samples per task the budget holds with ``n_tasks`` tasks (and ``max_samples_per_task``)."""
        total = int(self.gradient_memory_mb * 2**20) // max(self.bytes_per_sample, 1)
        cap = total // max(n_tasks, 1)
        if self.max_samples_per_task is not None:
            cap = min(cap, self.max_samples_per_task)
        return cap

    @property
    def stored_bytes(self) -> int:
        """Bytes allocated for stored rows (never above the budget)."""
        return sum(t.numel() * t.element_size() for s in self._tasks.values() for t in s.rows.values())

    # ------------------------------------------------------------------ tasks
    def ensure_task(self, task: str) -> bool:
        """Create ``task`` if new; returns True when it was created (the caller rebalances)."""
        if task in self._tasks:
            return False
        self._tasks[task] = _Reservoir()
        return True

    def reset(self, task: str | None = None) -> None:
        """Forget one task's rows (or all)."""
        if task is None:
            self._tasks.clear()
        else:
            self._tasks.pop(task, None)

    def rebalance(self, n_tasks: int) -> int:
        """Give every task the same capacity; shrink reservoirs by dropping random members.

        Returns:
            the per-task capacity.
        """
        cap = self.capacity_per_task(n_tasks)
        for state in self._tasks.values():
            if state.capacity == cap:
                continue
            n = len(state.ids)
            keep = torch.arange(n)
            if n > cap:
                keep = torch.randperm(n, generator=self.generator)[:cap].sort().values
            state.ids = [state.ids[i] for i in keep.tolist()]
            # Free the old rows before allocating the new ones so the cap holds.
            old, state.rows = state.rows, {}
            kept = {key: rows.index_select(0, keep.to(rows.device)) for key, rows in old.items()}
            del old
            state.capacity = cap
            if cap > 0 and kept and keep.numel():
                state.rows = kept  # grows on demand (see _ensure_rows)
            if state.versions is not None:
                state.versions = state.versions.index_select(0, keep) if state.rows else None
        return cap

    # ------------------------------------------------------------------ ingest
    def stage(self, task: str, ids: Sequence[SampleId], device: torch.device) -> StagedRows:
        """Reservoir decisions for a batch of ``task``, and room for the rows that get a slot.

        A sample whose id is already stored replaces that row; otherwise Algorithm R (fill, then
        offer n (1-based) replaces a uniform slot with probability ``capacity / n``). Slots
        taken twice in one batch keep the later sample. Nothing in the store changes until
        :meth:`commit` (a step found non-finite after its backward is dropped); in between the
        caller hands every parameter's per-sample gradients to :meth:`write`, in one piece or in
        chunks of samples, so only the rows that get a slot are ever made (a sketch store's rows
        are a few kB a sample, whatever the model).

        Returns:
            the staged batch: ``src`` (batch rows that get a slot), ``dst`` (their slots).
        """
        state = self._tasks[task]
        new_ids = list(state.ids)
        seen = state.seen
        src: list[int] = []
        dst: list[int] = []
        if state.capacity == 0:
            seen += len(ids)
        else:
            where = {sid: k for k, sid in enumerate(new_ids)}
            for row, sid in enumerate(ids):
                seen += 1
                if sid in where:
                    slot = where[sid]  # duplicate id: the newer gradient replaces the row
                elif len(new_ids) < state.capacity:
                    slot = len(new_ids)
                    new_ids.append(sid)
                    where[sid] = slot
                else:
                    j = int(torch.randint(seen, (1,), generator=self.generator))
                    if j >= state.capacity:
                        continue
                    slot = j
                    del where[new_ids[slot]]
                    new_ids[slot] = sid
                    where[sid] = slot
                if slot in dst:  # a later sample of this batch takes the same slot
                    src[dst.index(slot)] = row
                else:
                    src.append(row)
                    dst.append(slot)
        lookup = torch.full((len(ids),), -1, dtype=torch.long)
        lookup[torch.tensor(src, dtype=torch.long)] = torch.arange(len(src))
        rows = (
            {key: self._staging((len(src), *shape), device) for key, shape in self._row_shapes().items()}
            if src
            else {}
        )
        return StagedRows(
            task,
            torch.tensor(src, dtype=torch.long),
            torch.tensor(dst, dtype=torch.long),
            lookup,
            new_ids,
            seen,
            rows,
        )

    def _staging(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """Room for staged rows (zeros: a row that :meth:`write` fills in parts starts at 0)."""
        return torch.zeros(shape, dtype=self.storage_dtype, device=device)

    def write(self, staged: StagedRows, name: str, grad: Tensor, batch_rows: Tensor) -> None:
        """Stage the rows of one parameter's per-sample gradients that got a slot.

        Args:
            staged: from :meth:`stage`.
            name: a monitored parameter.
            grad: ``[m, ...]`` per-sample gradients of ``name`` for the batch rows ``batch_rows``
                (``[m]`` long, rows of the batch given to :meth:`stage`), laid out as
                :meth:`head_major` says (natural ``[m, *shape]`` when it gives ``None``).
        """
        if not staged.rows:
            return
        pos = staged.lookup[batch_rows.cpu()]
        take = torch.nonzero(pos >= 0).flatten()
        if take.numel() == 0:
            return
        if take.numel() < grad.shape[0]:
            grad = grad.index_select(0, take.to(grad.device))
        self._write(staged, name, grad, pos[take])
        staged.written.add(name)

    @abstractmethod
    def _write(self, staged: StagedRows, name: str, grad: Tensor, pos: Tensor) -> None:
        """Write ``grad`` (``[m, ...]``, see :meth:`write`) to the staged rows ``pos`` (``[m]``)."""

    staged_uninitialised = False  # staged rows start as zeros (see ExactStore)

    def head_major(self, name: str) -> HeadMajor | None:
        """The layout :meth:`write` wants ``name``'s gradients in (``None``: natural ``[m, *shape]``).

        The capture computes a weight's per-sample gradients straight in this layout (it gathers
        the small activations or output gradients, not the product), so a store that reads the
        weight by heads gets contiguous head slices at no extra cost."""
        return None

    def commit(self, staged: StagedRows) -> None:
        """Apply a staged batch: record its ids, write its rows to their slots."""
        state = self._tasks[staged.task]
        state.ids, state.seen = staged.ids, staged.seen
        if not staged.rows:
            return
        device = next(iter(staged.rows.values())).device
        self._ensure_rows(state, len(state.ids), device)
        for key, rows in staged.rows.items():
            if self.staged_uninitialised and key not in staged.written:
                rows.zero_()  # no gradient reached it this batch (FisherCollector warns): zeros
            target = state.rows[key]
            target.index_copy_(0, staged.dst.to(target.device), rows.to(target.device))
        state.versions[staged.dst] = self.version

    def _ensure_rows(self, state: _Reservoir, needed: int, device: torch.device) -> None:
        """Grow the task's row storage geometrically up to its capacity (never past the cap)."""
        have = next(iter(state.rows.values())).shape[0] if state.rows else 0
        if needed <= have:
            return
        size = min(state.capacity, max(needed, 2 * have, 8))
        for key, shape in self._row_shapes().items():
            old = state.rows.get(key)
            dev = old.device if old is not None else device
            new = torch.zeros((size, *shape), dtype=self.storage_dtype, device=dev)
            if old is not None:
                new[:have] = old
            state.rows[key] = new
        versions = torch.zeros(size, dtype=torch.long)
        if state.versions is not None:
            versions[:have] = state.versions[:have]
        state.versions = versions

    def add(
        self, task: str, grads: Mapping[str, Tensor], rows: Sequence[int], ids: Sequence[SampleId]
    ) -> None:
        """Offer batch rows ``rows`` of natural ``grads`` (``{name: [B, *shape]}``) under ``ids``."""
        if not rows:
            return
        device = next(iter(grads.values())).device
        staged = self.stage(task, ids, device)
        index = torch.tensor(list(rows), dtype=torch.long)
        local = torch.arange(len(rows))
        every = len(rows) == next(iter(grads.values())).shape[0] and bool((index == local).all())
        for name in self.param_names:
            g = grads[name] if every else grads[name].index_select(0, index.to(grads[name].device))
            hm = self.head_major(name)
            self.write(staged, name, g if hm is None else hm.from_natural(g), local)
        self.commit(staged)

    # ------------------------------------------------------------------ queries
    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def ids(self, task: str) -> list[SampleId]:
        """TRUE ids of the stored rows of ``task`` (row order)."""
        state = self._tasks.get(task)
        return [] if state is None else list(state.ids)

    def num_stored(self, task: str) -> int:
        state = self._tasks.get(task)
        return 0 if state is None else len(state.ids)

    def row_of(self, task: str, sample_id: SampleId) -> int:
        """Row of ``sample_id`` in ``task`` (KeyError naming task and id when not stored)."""
        state = self._tasks.get(task)
        if state is None:
            raise KeyError(f"no task {task!r}; tasks: {self.tasks}")
        try:
            return state.ids.index(sample_id)
        except ValueError:
            raise KeyError(
                f"sample {sample_id!r} of task {task!r} is not stored "
                f"({len(state.ids)} stored; the reservoir keeps a uniform subset)"
            ) from None

    def versions(self, task: str) -> list[int]:
        """The store's version when each stored row of ``task`` was written (row order)."""
        state = self._tasks.get(task)
        if state is None or not state.ids:
            return []
        return state.versions[: len(state.ids)].tolist()

    def _select(self, task: str, key: str, rows: RowSelect) -> Tensor:
        state = self._tasks[task]
        x = state.rows[key][: len(state.ids)]
        if rows is None:
            return x
        return x[rows] if isinstance(rows, slice) else x.index_select(0, rows.to(x.device))

    @abstractmethod
    def head_view(
        self,
        task: str,
        layer: int,
        block: str,
        hsel: Tensor,
        inv_fisher: Tensor,
        rows: RowSelect = None,
        device: torch.device | None = None,
    ) -> Tensor:
        """``[n, Hb, k]`` fp32 rows whose inner products are the signed scores of the head slices.

        Args:
            task: a stored task (with at least one row).
            layer, block: the slice group.
            hsel: ``[Hb]`` block-head indices.
            inv_fisher: ``[Hb, k_exact]`` the ``D`` the caller's metric asks for (the head
                entries of ``1 / (max(I, eps) + lambda)``); a store that whitened at capture
                time ignores it.
            rows: stored rows (slice or index tensor; default all).
            device: where the result goes.
        """

    def describe(self, task_a: str, task_b: str) -> dict[str, Any]:
        """What the views of two tasks mean (recorded on heatmaps)."""
        return {"kind": self.kind}

    # ------------------------------------------------------------------ state
    def memory_ledger(self, seen: set | None = None) -> dict[str, int]:
        """``{group: bytes}``: the stored rows of each task (``rows[task]``, with their version
        tags) and whatever else the store keeps (a sketch store: ``whitening``, its signed
        per-slice copy ``whitening_signed`` and the row orders ``projections``)."""
        seen = set() if seen is None else seen
        out = {f"rows[{task}]": tensor_bytes(state, seen) for task, state in self._tasks.items()}
        extra = attribute_ledger(self, seen, skip=("_tasks", "layout", "_rng"))
        for name, n in extra.items():
            out[_LEDGER_NAMES.get(name, name)] = n
        return {k: v for k, v in out.items() if v}

    def state_dict(self, include_rows: bool = True) -> dict[str, Any]:
        """Rows, ids, reservoir counters and row versions per task; ``include_rows=False`` keeps
        the tasks but no rows (the reservoirs restart empty, ``seen`` 0: see
        ``FisherMonitor(checkpoint_store=False)``)."""
        return {
            "kind": self.kind,
            "tasks": {
                name: {
                    "ids": list(s.ids) if include_rows else [],
                    "rows": {k: r[: len(s.ids)].clone() for k, r in s.rows.items()} if include_rows else {},
                    "seen": s.seen if include_rows else 0,
                    "versions": (
                        None if s.versions is None or not include_rows else s.versions[: len(s.ids)].clone()
                    ),
                }
                for name, s in self._tasks.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(
                f"checkpoint holds a {state['kind']!r} gradient store, this collector uses "
                f"store={self.kind!r}; resume with the same store"
            )
        self._tasks.clear()
        for name, s in state["tasks"].items():
            res = _Reservoir(ids=list(s["ids"]), seen=int(s["seen"]))
            res.rows = {k: r.to(device, self.storage_dtype) for k, r in s["rows"].items()}
            res.capacity = len(res.ids)
            v = s.get("versions")
            res.versions = torch.zeros(len(res.ids), dtype=torch.long) if v is None else v.long().cpu()
            self._tasks[name] = res


# ---------------------------------------------------------------------- exact
class ExactStore(GradientStore):
    """Signed per-sample gradients of every monitored weight (``storage_dtype``)."""

    kind = "exact"
    entrywise = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.index = HeadIndex(self.layout)

    def row_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(self.layout.param_shapes[n]) for n in self.param_names}

    staged_uninitialised = True  # every staged row of a written parameter is overwritten whole

    def _staging(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        # No zero fill: a captured step writes every staged row of every parameter (one
        # weight-sized pass per sample saved); a parameter no gradient reached is zeroed at commit.
        return torch.empty(shape, dtype=self.storage_dtype, device=device)

    def _write(self, staged: StagedRows, name: str, grad: Tensor, pos: Tensor) -> None:
        target = staged.rows[name]
        target.index_copy_(0, pos.to(target.device), grad.to(target.device, self.storage_dtype))

    def stored(self, task: str) -> tuple[list[SampleId], dict[str, Tensor]]:
        """``(ids, {name: [n, *shape]})`` views of the stored gradients (``([], {})`` if none)."""
        state = self._tasks.get(task)
        if state is None or not state.ids:
            return [], {}
        n = len(state.ids)
        return list(state.ids), {name: rows[:n] for name, rows in state.rows.items()}

    def get(self, task: str, sample_id: SampleId) -> dict[str, Tensor]:
        row = self.row_of(task, sample_id)
        return {name: rows[row] for name, rows in self._tasks[task].rows.items()}

    def head_view(self, task, layer, block, hsel, inv_fisher, rows=None, device=None) -> Tensor:
        _, grads = self.stored(task)
        g = self.index.gather(grads, layer, block, hsel, rows, device, owner=f"task {task!r}")
        return g * inv_fisher.to(g.device, ACCUM_DTYPE).sqrt()  # [n, Hb, k], g sqrt(D)

    def describe(self, task_a: str, task_b: str) -> dict[str, Any]:
        return {"kind": self.kind, "whitening": "the metric's D at compute time (exact)"}


# ---------------------------------------------------------------------- sketch
@dataclass(frozen=True)
class _SliceGroup:
    """One (layer, block): its weight (and bias) and the shape of its head slices."""

    layer: int
    block: str
    weight: str
    bias: str | None
    heads: int
    rows: int  # r = head_dim (along the head axis)
    cols: int  # c = the other axis of the weight
    k: int  # sketch numbers of the weight slice, min(sketch_dim, r * c)

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.block}"

    @property
    def dim(self) -> int:
        """Numbers per head: the weight sketch plus the (unprojected) bias entries."""
        return self.k + (self.rows if self.bias is not None else 0)

    @property
    def folds(self) -> int:
        """Entries per bucket: ``ceil(r c / k)`` (the last fold is zero-padded)."""
        return -(-self.rows * self.cols // self.k)


class SketchStore(GradientStore):
    """Sparse JL sketches of the whitened per-head gradient slices (module docstring).

    Args:
        sketch_dim: numbers per slice (at most the slice's entries).
        seed: run seed of the signs and hashes.
        epsilon, ridge_lambda: of the whitening ``D_w = 1 / (max(F_w, eps) + lambda)``.
    """

    kind = "sketch"
    entrywise = False
    whitened = True

    def __init__(
        self,
        *args: Any,
        sketch_dim: int = DEFAULT_SKETCH_DIM,
        seed: int = 0,
        epsilon: float = 1e-10,
        ridge_lambda: float = 1e-8,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if sketch_dim < 1:
            raise ValueError(f"sketch_dim must be >= 1, got {sketch_dim}")
        self.sketch_dim = int(sketch_dim)
        self.seed = int(seed)
        self.epsilon = float(epsilon)
        self.ridge_lambda = float(ridge_lambda)
        self.groups: list[_SliceGroup] = []
        self._by_param: dict[str, list[tuple[_SliceGroup, bool]]] = {}
        for layer in range(self.layout.num_layers):
            for block in BLOCKS:
                if not self.layout.is_monitored(layer, block):  # no adapter there, or frozen
                    continue
                spec = self.layout.spec(layer, block)
                shape = tuple(self.layout.param_shapes[spec.param])
                r = self.layout.head_dim
                c = math.prod(shape) // shape[spec.axis]
                bias = spec.bias if self.layout.include_bias else None
                group = _SliceGroup(
                    layer,
                    block,
                    spec.param,
                    bias,
                    spec.num_heads,
                    r,
                    c,
                    min(self.sketch_dim, r * c),
                )
                self.groups.append(group)
                self._by_param.setdefault(spec.param, []).append((group, False))
                if bias is not None:
                    self._by_param.setdefault(bias, []).append((group, True))
        self._group = {(g.layer, g.block): g for g in self.groups}
        self._proj: dict[str, Tensor] = {}  # (layer, block) key -> row orders [H, r]
        self._has_white = False
        self._white_views: dict[tuple[str, bool], Tensor] = {}  # the whitening (see ``whitening``)
        self._white_plain: dict[str, Tensor] = {}  # parameters the views do not cover
        self._white_rows: dict[str, Tensor] = {}  # parked (FSDP2): this rank's rows of sqrt(D_w)
        self._head_major: dict[str, HeadMajor | None] = {}
        self._segment: dict[str, int] = {}  # (layer, block) key -> its offset in head-major rows

    def row_shapes(self) -> dict[str, tuple[int, ...]]:
        return {g.key: (g.heads, g.dim) for g in self.groups}

    # ------------------------------------------------------------------ projections
    def projection(self, layer: int, block: str, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """``(order [H, r] long, sign [H, r * c])`` of a (layer, block), from the run seed.

        ``order[h]`` is head h's random row order (see ``AttentionLayout.head_view``), ``sign``
        the CountSketch signs of the row-ordered, flattened slice. Only the (small) orders are
        cached; the signs are regenerated (they are folded into the whitening views, which are
        rebuilt once per whitening version), so the store holds no sign tensor of weight size.
        """
        group = self._group[(layer, block)]
        seed = (self.seed * 1_000_003 + layer * len(BLOCKS) + BLOCKS.index(block)) % (2**63)
        gen = torch.Generator().manual_seed(seed)
        order = torch.rand(group.heads, group.rows, generator=gen).argsort(dim=1)  # [H, r] permutations
        self._proj.setdefault(group.key, order)
        n = group.rows * group.cols
        sign = torch.randint(0, 2, (group.heads, n), generator=gen).float().mul_(2).sub_(1)
        return order, sign.to(device) if device is not None else sign

    def _order(self, group: _SliceGroup) -> Tensor:
        """Cached row orders ``[H, r]`` of a (layer, block) (see :meth:`projection`)."""
        order = self._proj.get(group.key)
        return order if order is not None else self.projection(group.layer, group.block)[0]

    # ------------------------------------------------------------------ whitening
    @property
    def has_whitening(self) -> bool:
        """Whether a whitening is frozen (sketches can be made)."""
        return self._has_white

    @property
    def needs_whitening(self) -> bool:
        return not self._has_white

    @property
    def whitening(self) -> dict[str, Tensor] | None:
        """``{name: sqrt(D_w)}`` (``[*shape]`` fp32), or ``None`` before :meth:`set_whitening`.

        The store keeps one copy of the whitening: the signed, row-ordered per-slice views the
        sketches multiply by (``sign * sqrt(D_w)[pi]``, exact in fp32 since the signs are
        +-1); this mapping is rebuilt from them on each access (``|view|`` scattered back), so
        read it once (checkpoints, tests), not per step. Entries of a weight that no head
        covers (none in the built-in layouts) are kept as they were given.
        """
        if not self._has_white:
            return None
        return {n: self._natural_white(n) for n in self.param_names}

    def set_whitening(self, fisher: Mapping[str, Tensor]) -> None:
        """Freeze ``D_w = 1 / (max(F_w, eps) + lambda)`` from ``{name: F_w}`` for the next sketches."""
        missing = [n for n in self.param_names if n not in fisher]
        if missing:
            raise KeyError(f"whitening Fisher misses {len(missing)} monitored parameter(s): {missing[:3]}")
        self._set_white(fisher, from_fisher=True)
        self.version += 1

    def _set_white(self, white: Mapping[str, Tensor], from_fisher: bool = False) -> None:
        """Build every slice's view from ``{name: sqrt(D_w)}`` (or from ``{name: F_w}`` with
        ``from_fisher``), one parameter at a time, keeping a plain copy only of the parameters
        whose entries the views do not cover: at most one parameter's plain whitening is alive
        besides the views."""
        self._white_views.clear()
        self._white_plain, self._white_rows = {}, {}
        for name in self.param_names:
            t = white[name]
            if from_fisher:
                t = (t.detach().to(ACCUM_DTYPE).clamp_min(self.epsilon) + self.ridge_lambda).rsqrt()
            covered: Tensor | None = None  # [size of the head axis]: positions some view holds
            for group, is_bias in self._by_param.get(name, ()):
                self._white_views[(group.key, is_bias)] = self._make_view(group, is_bias, t)
                spec = self.layout.spec(group.layer, group.block)
                axis = 0 if is_bias else spec.axis
                if covered is None:
                    covered = torch.zeros(t.shape[axis], dtype=torch.bool)
                covered[spec.index.reshape(-1).cpu()] = True  # a view holds whole rows / columns
            if covered is None or not bool(covered.all()):
                self._white_plain[name] = t
        self._has_white = True

    def park_whitening(self, shards: Any) -> None:
        """Keep only this rank's rows (``shards.rows``, natural shape) of ``sqrt(D_w)`` and free
        the per-slice views (FSDP2, between the steps that sketch: the whitening is a tensor of
        the monitored weights' size). No-op without sharding, a whitening, or when parked."""
        if not (shards.sharded and self._has_white and self._white_views):
            return
        self._white_rows = {n: shards.rows(n, self._natural_white(n)).clone() for n in self.param_names}
        self._white_views.clear()
        self._white_plain = {}

    def unpark_whitening(self, shards: Any) -> None:
        """Rebuild the views from every rank's parked rows (``shards.whole``: a collective, every
        rank calls it; no-op, and no collective, when nothing is parked)."""
        if not self._white_rows:
            return
        rows, self._white_rows = self._white_rows, {}
        self._set_white({n: shards.whole(n, rows.pop(n)) for n in self.param_names})

    def _make_view(self, group: _SliceGroup, is_bias: bool, white: Tensor) -> Tensor:
        if is_bias:
            return self.layout.head_view(white, group.layer, group.block, bias=True)  # [H, r]
        order, sign = self.projection(group.layer, group.block, white.device)
        return self.layout.head_view(white, group.layer, group.block, order=order) * sign  # [H, r*c]

    def _natural_white(self, name: str) -> Tensor:
        """``sqrt(D_w)`` of ``name`` in its natural shape, from the views (see :attr:`whitening`)."""
        plain = self._white_plain.get(name)
        out = None if plain is None else plain.clone()
        for group, is_bias in self._by_param.get(name, ()):
            view = self._white_views[(group.key, is_bias)].abs()  # [H, per-head entries]
            spec = self.layout.spec(group.layer, group.block)
            axis = 0 if is_bias else spec.axis
            idx = spec.index if is_bias else spec.index.gather(1, self._order(group).to(spec.index.device))
            if out is None:
                out = torch.empty(self.layout.param_shapes[name], dtype=view.dtype, device=view.device)
            moved = out.movedim(axis, 0)  # a view: writes land in ``out``
            moved.index_copy_(0, idx.reshape(-1).to(out.device), view.reshape(-1, *moved.shape[1:]))
        return out

    def _white(self, group: _SliceGroup, is_bias: bool, device: torch.device) -> Tensor:
        """Head view of ``sqrt(D_w)``: ``[H, r]`` (bias) or, for the weight, in the sketch's row
        order and signed, ``[H, r * c]`` (``sign * sqrt(D_w)[pi]``)."""
        key = (group.key, is_bias)
        w = self._white_views[key]
        if w.device != device:
            w = self._white_views[key] = w.to(device)
        return w

    # ------------------------------------------------------------------ ingest
    def head_major(self, name: str) -> HeadMajor | None:
        """Weights with head slices: each block's heads in their sketch row order (one
        contiguous ``[H * r, c]`` segment per block), then the rest of the head axis."""
        if name in self._head_major:
            return self._head_major[name]
        groups = [g for g, is_bias in self._by_param.get(name, ()) if not is_bias]
        hm = None
        if groups:
            specs = [self.layout.spec(g.layer, g.block) for g in groups]
            axes = {s.axis for s in specs}
            if len(axes) != 1:
                raise ValueError(f"{name}: its blocks lay heads along different axes {sorted(axes)}")
            axis = axes.pop()
            shape = tuple(self.layout.param_shapes[name])
            parts, offset = [], 0
            for group, spec in zip(groups, specs):
                order = self._order(group)
                parts.append(spec.index.gather(1, order.to(spec.index.device)).reshape(-1).long())
                self._segment[group.key] = offset
                offset += parts[-1].numel()
            used = torch.zeros(shape[axis], dtype=torch.bool)
            used[torch.cat(parts)] = True
            parts.append(torch.nonzero(~used).flatten())
            hm = HeadMajor(axis, torch.cat(parts), shape)
        self._head_major[name] = hm
        return hm

    def _write(self, staged: StagedRows, name: str, grad: Tensor, pos: Tensor) -> None:
        if not self._has_white:
            raise RuntimeError("SketchStore.write before set_whitening: no whitening Fisher yet")
        if self._white_rows:
            raise RuntimeError(
                "SketchStore.write while the whitening is parked as this rank's rows (FSDP2): "
                "FisherCollector.gather_whitening() on every rank first"
            )
        m = grad.shape[0]
        for group, is_bias in self._by_param.get(name, ()):
            target = staged.rows[group.key]
            slots = pos.to(target.device)
            w = self._white(group, is_bias, grad.device)
            if is_bias:
                hv = self.layout.head_view(grad, group.layer, group.block, bias=True)  # [m, H, r]
                z = hv.float() * w  # whitened, unprojected
                target[slots, :, group.k :] = z.to(target.device, self.storage_dtype)
                continue
            self.head_major(name)  # sets the segment offsets
            start = self._segment[group.key]
            n = group.rows * group.cols
            x = grad.narrow(1, start, group.heads * group.rows)  # [m, H * r, c]: a view
            x = x.reshape(m, group.heads, n).float() * w  # s * W * G[pi], flattened
            pad = group.k * group.folds - n
            if pad:
                x = torch.nn.functional.pad(x, (0, pad))
            z = x.view(m, group.heads, group.folds, group.k).sum(2)  # [m, H, k]: fold into buckets
            target[slots, :, : group.k] = z.to(target.device, self.storage_dtype)

    # ------------------------------------------------------------------ queries
    def head_view(self, task, layer, block, hsel, inv_fisher, rows=None, device=None) -> Tensor:
        z = self._select(task, f"{layer}.{block}", rows)  # [n, H, k]
        z = z.index_select(1, hsel.to(z.device))
        return z.to(device or z.device, ACCUM_DTYPE)

    def describe(self, task_a: str, task_b: str) -> dict[str, Any]:
        versions = sorted(set(self.versions(task_a)) | set(self.versions(task_b)))
        return {
            "kind": self.kind,
            "sketch_dim": self.sketch_dim,
            "whitening": "frozen whitening Fisher (mean of the tasks' Fishers), per row version",
            "whitening_versions": versions,
            "current_version": self.version,
        }

    # ------------------------------------------------------------------ state
    def state_dict(self, include_rows: bool = True) -> dict[str, Any]:
        out = super().state_dict(include_rows)
        out.update(
            sketch_dim=self.sketch_dim,
            seed=self.seed,
            version=self.version,
            whitening=self.whitening,  # rebuilt from the views: a fresh copy
        )
        return out

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        if state.get("kind") == self.kind and (
            int(state["sketch_dim"]) != self.sketch_dim or int(state["seed"]) != self.seed
        ):
            raise ValueError(
                f"checkpoint sketches have sketch_dim={state['sketch_dim']}, seed={state['seed']}; "
                f"this store has sketch_dim={self.sketch_dim}, seed={self.seed}: resume with the same"
            )
        super().load_state_dict(state, device)
        self.version = int(state["version"])
        white = state.get("whitening")
        self._white_views.clear()
        self._white_plain = {}
        self._has_white = white is not None
        if white is not None:
            self._set_white({n: t.to(device, ACCUM_DTYPE) for n, t in white.items()})


def make_store(
    kind: str,
    layout: AttentionLayout,
    *,
    storage_dtype: torch.dtype,
    gradient_memory_mb: float,
    max_samples_per_task: int | None,
    generator: SeededGenerator,
    sketch_dim: int = DEFAULT_SKETCH_DIM,
    seed: int = 0,
    epsilon: float = 1e-10,
    ridge_lambda: float = 1e-8,
) -> GradientStore:
    """An :class:`ExactStore` or :class:`SketchStore` (``kind`` already resolved)."""
    common = dict(
        layout=layout,
        storage_dtype=storage_dtype,
        gradient_memory_mb=gradient_memory_mb,
        max_samples_per_task=max_samples_per_task,
        generator=generator,
    )
    if kind == "exact":
        return ExactStore(**common)
    if kind == "sketch":
        return SketchStore(
            **common, sketch_dim=sketch_dim, seed=seed, epsilon=epsilon, ridge_lambda=ridge_lambda
        )
    raise ValueError(f"store must be one of {STORE_KINDS}, got {kind!r}")


def exact_bytes_per_sample(layout: AttentionLayout, storage_dtype: torch.dtype) -> int:
    """Bytes one exact sample takes: all monitored parameters in ``storage_dtype``."""
    itemsize = torch.empty((), dtype=storage_dtype).element_size()
    return sum(math.prod(layout.param_shapes[n]) for n in layout.monitored_parameters()) * itemsize


def resolve_store_kind(
    store: str,
    layout: AttentionLayout,
    storage_dtype: torch.dtype,
    gradient_memory_mb: float,
    min_samples: int,
    n_tasks: int,
) -> str:
    """``"auto"`` -> ``"sketch"`` when the exact store cannot keep ``min_samples`` per task for
    ``n_tasks`` tasks within ``gradient_memory_mb``, else ``"exact"``; other values pass through."""
    if store not in STORE_KINDS:
        raise ValueError(f"store must be one of {STORE_KINDS}, got {store!r}")
    if store != "auto" or gradient_memory_mb <= 0:  # no budget: nothing to gain from sketches
        return "exact" if store == "auto" else store
    per_task = int(gradient_memory_mb * 2**20) // max(exact_bytes_per_sample(layout, storage_dtype), 1)
    return "exact" if per_task // max(n_tasks, 1) >= max(min_samples, 1) else "sketch"

"""FisherCollector: signed per-sample gradients within a memory budget, contribution and EMA Fisher.

Definitions (DESIGN section 2), for each monitored weight entry k:

- contribution of sample i: ``C_i = g_i ** 2``, with ``g_i`` the gradient of sample i's own mean loss;
- contribution Fisher of task T: ``I_T = mean_i C_i`` over every sample of T seen so far, kept as an
  fp32 sum and a count (so DDP ranks reduce it with a sum);
- EMA Fisher: ``F_t = beta F_{t-1} + (1 - beta) mean_batch C``, reported bias-corrected
  ``F_t / (1 - beta ** t)``.

What is stored per sample lives in a :class:`~fisher_callbacks.store.GradientStore` (``store=``):

- ``"exact"``: the signed ``g_i`` (C is derived; every interference variant needs the sign or
  ``|g|``) in ``storage_dtype`` under the key ``f"{task}_{id}"`` with the sample's TRUE id;
- ``"sketch"``: per (layer, block, head) slice a ``sketch_dim``-number CountSketch of the
  Fisher-whitened gradient (:class:`~fisher_callbacks.store.SketchStore`), so a 135M model keeps
  hundreds of samples per task where the exact store keeps 2;
- ``"auto"`` (default): ``"sketch"`` when the exact store cannot keep ``min_samples_for_fisher``
  samples per task (for ``expected_tasks`` tasks) within ``gradient_memory_mb``.

Storage never exceeds ``gradient_memory_mb``: each task keeps a reservoir sample (Algorithm R), so
after any number of samples the stored ones are a uniform random subset of those seen; when a new
task arrives the per-task capacity shrinks and the other reservoirs drop random members (still
uniform). A sample whose id is already stored replaces its row (one row per id, the newest).
The Fisher sums and the EMA are exact fp32 in both modes (never sketched).

Under FSDP2 (the monitored weights are ``DTensor`` shards) the synced Fisher sums and the per-entry
EMA are kept as this rank's blocks of the weights (:class:`~fisher_callbacks.engine.sharding.Shards`,
``Shard(0)`` rows): :meth:`FisherCollector.sync` reduces what arrived and keeps this rank's rows, and
the whole Fisher exists only while it is read (:meth:`FisherCollector.materialise` at a boundary,
released by :meth:`FisherCollector.release_whole`), as FSDP2 gathers whole weights only around a
module's forward and backward. What a step adds is whole until the next sync (each rank's samples
reach every entry), which the FisherEngine makes right after every captured step.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._rng import SeededGenerator
from .capture import per_sample_gradients
from .engine.sharding import Shards, collective_device
from .layouts import AttentionLayout
from .losses import LossType
from .memory import tensor_bytes
from .store import (
    DEFAULT_SKETCH_DIM,
    ExactStore,
    GradientStore,
    HeadMajor,
    StagedRows,
    make_store,
    resolve_store_kind,
)

SampleId = int | str


@dataclass
class _TaskState:
    """The Fisher state the collector keeps for one task (its stored rows live in the store)."""

    fisher_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # fp32 sum of C_i
    fisher_count: int = 0
    synced_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # global sum up to last sync
    synced_count: int = 0
    ema: dict[str, torch.Tensor] = field(default_factory=dict)  # fp32, not bias-corrected
    ema_trace: torch.Tensor | None = None  # 0-dim fp32: EMA of the trace (sum over entries)
    ema_steps: int = 0
    next_id: int = 0  # running counter for samples without ids
    # sharded (FSDP2) per-entry EMA: ``ema`` is this rank's block of the mean over the ranks; the
    # steps since the last sync are ``beta**ema_since * ema + ema_pending`` (whole, until the sync)
    ema_pending: dict[str, torch.Tensor] = field(default_factory=dict)
    ema_since: int = 0


class _FisherMeans(dict):
    """``{name: I_task}`` as :meth:`FisherCollector.fisher` returns it (a dict that can be weakly
    referenced, so the collector's cache never keeps it alive by itself)."""


class Ingest:
    """One batch's per-sample gradients on their way into a :class:`FisherCollector`.

    A :class:`~fisher_callbacks.capture.GradientSink`: the capture hands it each projection's
    per-sample gradients inside the backward hooks, one parameter (and chunk of samples) at a
    time, and it keeps only what a step needs: per task and parameter the fp32 sum of ``g_i**2``
    (one weight-sized tensor) and the rows the store will keep (:meth:`GradientStore.stage`;
    a sketch is a few kB a sample). Nothing reaches the collector before :meth:`commit`, so a
    step found non-finite after its backward is dropped whole. Made by
    :meth:`FisherCollector.ingest`.

    Args:
        collector: the collector.
        tasks: ``[n]`` the task of each captured sample; ``None`` leaves a sample out (no target).
        ids: ``[n]`` TRUE sample ids, or ``None`` for the collector's running counter.
        fisher: add the squares to the contribution Fisher (and count the samples).
        ema: make one EMA step per task from the squares.
        store: offer the samples to the store (needs a whitening for a sketch store).
    """

    def __init__(
        self,
        collector: FisherCollector,
        tasks: Sequence[str | None],
        ids: Sequence[SampleId] | None,
        *,
        fisher: bool = True,
        ema: bool = False,
        store: bool = True,
    ) -> None:
        self.collector = collector
        self.fisher, self.ema = fisher, ema
        n = len(tasks)
        rows: dict[str, list[int]] = {}
        for i, task in enumerate(tasks):
            if task is not None:
                rows.setdefault(task, []).append(i)
        self.rows = {t: torch.tensor(r, dtype=torch.long) for t, r in rows.items()}
        self.whole = {t: len(r) == n for t, r in rows.items()}  # the task has every sample
        self._pos: dict[str, torch.Tensor] = {}  # captured sample -> position in the task's rows
        for t, r in self.rows.items():
            pos = torch.full((n,), -1, dtype=torch.long)
            pos[r] = torch.arange(r.numel())
            self._pos[t] = pos
        for t in self.rows:
            collector.ensure_task(t)
        self.staged: dict[str, StagedRows] = {}
        if store and not collector.needs_whitening:
            device = collector.device
            for t, r in rows.items():
                task_ids = collector.resolve_ids(t, None if ids is None else [ids[i] for i in r], len(r))
                self.staged[t] = collector.store.stage(t, task_ids, device)
        self.sums: dict[str, dict[str, torch.Tensor]] = {t: {} for t in self.rows}
        self._layout: dict[str, HeadMajor | None] = {}
        self._received: set[str] = set()

    @property
    def received(self) -> bool:
        """Whether any gradient reached the ingest (a backward ran through the hooks)."""
        return bool(self._received)

    @property
    def count(self) -> int:
        """Samples this ingest files (all tasks)."""
        return sum(r.numel() for r in self.rows.values())

    def head_major(self, name: str) -> HeadMajor | None:
        if name not in self._layout:
            self._layout[name] = self.collector.store.head_major(name) if self.staged else None
        return self._layout[name]

    def __call__(self, name: str, grad: torch.Tensor, start: int) -> None:
        m = grad.shape[0]
        self._received.add(name)
        for task, rows in self.rows.items():
            if self.whole[task]:
                local = sel = None
            else:
                sel = rows[(rows >= start) & (rows < start + m)]
                if sel.numel() == 0:
                    continue
                local = sel - start
            if self.fisher or self.ema:
                sums = self.sums[task]
                sums[name] = _sum_of_squares(grad, local, out=sums.get(name))
            staged = self.staged.get(task)
            if staged is not None:
                g = grad if local is None else grad.index_select(0, local.to(grad.device))
                positions = torch.arange(start, start + m) if sel is None else self._pos[task][sel]
                self.collector.store.write(staged, name, g, positions)

    def feed(self, grads: Mapping[str, torch.Tensor]) -> Ingest:
        """Hand over natural whole-batch gradients ``{name: [n, *shape]}`` (no capture)."""
        for name in self.collector.param_names:
            layout = self.head_major(name)
            g = grads[name]
            self(name, g if layout is None else layout.from_natural(g), 0)
        return self

    def commit(self) -> dict[str, torch.Tensor]:
        """File the batch: Fisher sums and counts, EMA steps, stored rows.

        Returns:
            ``{name: sum of g**2}`` over every sample of the batch (natural shapes; ``{}`` when no
            gradient reached the ingest, which then files nothing).
        """
        collector = self.collector
        if not self._received:
            return {}
        missing = [n for n in collector.param_names if n not in self._received]
        if missing:
            warnings.warn(
                f"no gradient reached {len(missing)} monitored parameter(s) "
                f"(e.g. {missing[0]}); they are zero for this batch",
                stacklevel=2,
            )
        total: dict[str, torch.Tensor] = {}
        for task, rows in self.rows.items():
            if self.fisher or self.ema:
                squares = self._natural_sums(task, total)
                collector.add_squares(task, squares, rows.numel(), fisher=self.fisher, ema=self.ema)
            if task in self.staged:
                collector.store.commit(self.staged[task])
        return total

    def _natural_sums(self, task: str, total: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, sum of g**2 over the task's samples)`` per monitored parameter, natural shape
        (zeros where no gradient reached it), one at a time; each is also added into ``total``."""
        collector = self.collector
        for name in collector.param_names:
            c = self.sums[task].get(name)
            layout = self._layout.get(name)
            if c is None:
                c = torch.zeros(collector.param_shapes[name], device=collector.device)
            elif layout is not None:
                c = layout.to_natural(c)
            total[name] = total[name] + c if name in total else c
            yield name, c


class FisherCollector:
    """Per-sample gradients, contribution Fisher and EMA Fisher of the monitored Q/K/V/O weights.

    Args:
        model: a Hugging Face model or a module wrapping one.
        layout: attention layout (default ``AttentionLayout.from_model(model, trainable_only=True)``).
        ema_decay: ``beta`` of the EMA Fisher.
        storage_dtype: dtype of the stored signed gradients (fp32, bf16 or fp16); Fisher sums are
            always fp32.
        gradient_memory_mb: hard cap on the stored per-sample gradients, all tasks together.
        fisher_type: ``"empirical"`` (batch labels) or ``"true"`` (labels sampled from the model).
        max_samples_per_task: optional cap on stored samples per task (besides the memory cap).
        min_samples_for_fisher: :meth:`fisher` warns below this many samples.
        loss_type: per-sample loss (inferred from the model's head when ``None``).
        seed: seeds the reservoir, the true-Fisher label sampling and the sketch projections.
        store: ``"auto"`` (default), ``"exact"`` or ``"sketch"`` (module docstring).
        sketch_dim: numbers per (layer, block, head) slice of a sketched sample.
        expected_tasks: tasks the ``"auto"`` rule plans for (FisherMonitor passes its count).
        ema_entries: keep the EMA Fisher per weight entry (:meth:`fisher_ema`, one fp32 map of
            the monitored weights per task with EMA steps); ``False`` keeps only its trace
            (:meth:`fisher_ema_trace`, what the monitors log), exact in fp32 since the trace of
            an EMA is the EMA of the traces.
    """

    def __init__(
        self,
        model: nn.Module,
        layout: AttentionLayout | None = None,
        ema_decay: float = 0.99,
        storage_dtype: torch.dtype = torch.float32,
        gradient_memory_mb: float = 512,
        fisher_type: str = "empirical",
        max_samples_per_task: int | None = None,
        min_samples_for_fisher: int = 10,
        loss_type: LossType | None = None,
        seed: int = 0,
        store: str = "auto",
        sketch_dim: int = DEFAULT_SKETCH_DIM,
        expected_tasks: int = 2,
        ema_entries: bool = True,
    ) -> None:
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if storage_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"storage_dtype must be float32, bfloat16 or float16, got {storage_dtype}")
        if gradient_memory_mb < 0:
            raise ValueError("gradient_memory_mb must be >= 0")
        if fisher_type not in ("empirical", "true"):
            raise ValueError(f"fisher_type must be 'empirical' or 'true', got {fisher_type!r}")
        if max_samples_per_task is not None and max_samples_per_task < 0:
            raise ValueError("max_samples_per_task must be >= 0")
        self.model = model
        self.layout = layout or AttentionLayout.from_model(model, trainable_only=True)
        self.ema_decay = float(ema_decay)
        self.ema_entries = bool(ema_entries)
        self.storage_dtype = storage_dtype
        self.gradient_memory_mb = float(gradient_memory_mb)
        self.fisher_type = fisher_type
        self.max_samples_per_task = max_samples_per_task
        self.min_samples_for_fisher = int(min_samples_for_fisher)
        self.loss_type = loss_type
        self.param_names = self.layout.monitored_parameters()
        params = dict(model.named_parameters())
        self.param_shapes = {n: tuple(params[n].shape) for n in self.param_names}
        self.skipped_nonfinite = 0
        self._tasks: dict[str, _TaskState] = {}
        self._fisher_cache: weakref.WeakValueDictionary[str, _FisherMeans] = weakref.WeakValueDictionary()
        self.shards = Shards.of(model)  # FSDP2: synced sums and EMA as this rank's blocks
        self._whole: dict[str, _FisherMeans] = {}  # sharded: the whole Fisher while it is read
        self._fisher_warned: dict[str, int] = {}  # task -> sample count of its last "few samples" warning
        self._rng = SeededGenerator(seed)  # picklable (ddp_spawn); the torch.Generator is lazy
        self._warned_budget = False
        self.seed = int(seed)
        self.store_kind = resolve_store_kind(
            store, self.layout, storage_dtype, gradient_memory_mb, self.min_samples_for_fisher, expected_tasks
        )
        self.store: GradientStore = make_store(
            self.store_kind,
            self.layout,
            storage_dtype=storage_dtype,
            gradient_memory_mb=gradient_memory_mb,
            max_samples_per_task=max_samples_per_task,
            generator=self._rng,
            sketch_dim=sketch_dim,
            seed=seed,
        )

    @property
    def generator(self) -> torch.Generator:
        """The collector's ``torch.Generator`` (reservoir draws, true-Fisher labels), in its
        ``state_dict``."""
        return self._rng.generator

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_fisher_cache"]  # weak references do not pickle; the cache refills on demand
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fisher_cache = weakref.WeakValueDictionary()

    # ------------------------------------------------------------------ budget
    @property
    def bytes_per_sample(self) -> int:
        """Bytes one stored sample takes in the store (exact: all monitored weights)."""
        return self.store.bytes_per_sample

    @property
    def stored_bytes(self) -> int:
        """Bytes allocated for stored per-sample rows (never above the budget)."""
        return self.store.stored_bytes

    def ensure_task(self, task: str) -> None:
        """Register ``task`` (its Fisher state and a reservoir; every task's capacity shrinks to
        an equal share). No-op for a known task."""
        self._task(task)

    def _task(self, task: str) -> _TaskState:
        if not isinstance(task, str) or not task:
            raise ValueError(f"task must be a non-empty string, got {task!r}")
        state = self._tasks.get(task)
        if state is None:
            state = _TaskState()
            self._tasks[task] = state
            self.store.ensure_task(task)
            self._rebalance()
        return state

    def _rebalance(self) -> None:
        """Give every task the same capacity; shrink reservoirs by dropping random members."""
        cap = self.store.rebalance(len(self._tasks))
        if cap == 0 and not self._warned_budget:
            warnings.warn(
                f"gradient_memory_mb={self.gradient_memory_mb} holds no sample of "
                f"{self.bytes_per_sample / 2**20:.1f} MB for {len(self._tasks)} task(s): per-sample "
                "gradients are not stored (Fisher sums still are); raise the budget, lower "
                "storage_dtype or monitor fewer layers",
                stacklevel=3,
            )
            self._warned_budget = True

    # ------------------------------------------------------------------ ingest
    def collect(
        self, batch: dict, task: str, sample_ids: Sequence[SampleId] | torch.Tensor | None = None
    ) -> int:
        """Per-sample gradients of ``batch`` (one batched pass, ``.grad`` untouched), then store.

        Returns:
            the number of samples accepted (finite gradients).
        """
        return self.add_gradients(self._per_sample(batch), task, sample_ids)

    def add_gradients(
        self,
        grads: dict[str, torch.Tensor],
        task: str,
        sample_ids: Sequence[SampleId] | torch.Tensor | None = None,
        *,
        update_ema: bool = False,
        check_finite: bool = True,
    ) -> int:
        """Add already-captured per-sample gradients ``{name: [B, *shape]}`` of ``task``.

        Samples with a non-finite entry are skipped, counted in ``skipped_nonfinite`` and warned
        about. Each valid sample adds ``g_i**2`` to the task's fp32 Fisher sum and is offered to
        the task's reservoir under its true id (a running counter when ``sample_ids`` is None); an
        id already stored replaces its row.
        With ``update_ema`` the same squares also make one EMA step (as
        :meth:`update_ema_from_gradients`, without computing them twice). ``check_finite=False``
        is for callers that have checked already.

        Returns:
            the number of samples accepted.
        """
        self._check_grads(grads)
        n = next(iter(grads.values())).shape[0]
        ids = self.resolve_ids(task, sample_ids, n)
        self._task(task)
        keep = self._finite_rows(grads, n, task, ids) if check_finite else None
        if keep is not None and keep.numel() == 0:
            return 0
        kept = set(range(n)) if keep is None else set(keep.tolist())
        tasks = [task if i in kept else None for i in range(n)]
        if self.needs_whitening:
            # First samples of a sketch store: the Fisher so far (this batch included) whitens.
            self.ingest(tasks, ids, fisher=True, ema=update_ema, store=False).feed(grads).commit()
            self.freeze_whitening()
            self.ingest(tasks, ids, fisher=False, ema=False, store=True).feed(grads).commit()
        else:
            self.ingest(tasks, ids, fisher=True, ema=update_ema, store=True).feed(grads).commit()
        return len(kept)

    def ingest(
        self,
        tasks: Sequence[str | None],
        ids: Sequence[SampleId] | None = None,
        *,
        fisher: bool = True,
        ema: bool = False,
        store: bool = True,
    ) -> Ingest:
        """A sink for one batch's per-sample gradients (see :class:`Ingest`): give it to
        :meth:`PerSampleGradientCapture.arm` (``sink=``, with ``chunk=`` to bound memory), run
        the backward, then :meth:`Ingest.commit` it, or drop it when the step was not finite.

        Args:
            tasks: ``[n]`` task of each captured sample (``None``: leave the sample out).
            ids: ``[n]`` TRUE ids (``None``: a running counter per task).
            fisher, ema, store: what the batch feeds (contribution Fisher, one EMA step per task,
                the store). A sketch store without a whitening yet is not fed (see
                :meth:`initial_whitening`).
        """
        if ids is not None and len(ids) != len(tasks):
            raise ValueError(f"{len(ids)} sample ids for {len(tasks)} samples")
        return Ingest(self, tasks, ids, fisher=fisher, ema=ema, store=store)

    @property
    def device(self) -> torch.device:
        """The device of the monitored parameters (where Fisher sums and staged rows live)."""
        return self.model.get_parameter(self.param_names[0]).device

    def add_squares(
        self,
        task: str,
        squares: Iterable[tuple[str, torch.Tensor]],
        n: int,
        *,
        fisher: bool = True,
        ema: bool = False,
    ) -> None:
        """File one batch of ``task``: ``squares`` yields ``(name, sum of g**2)`` over its ``n``
        samples (natural shape, fp32) for every monitored parameter, consumed one at a time.

        ``fisher``: add them to the contribution Fisher sum and count the ``n`` samples; ``ema``:
        one EMA step of the task (per entry when ``ema_entries``, and of the trace).
        """
        state = self._tasks[task]
        trace = None
        for name, c in squares:
            if fisher:
                if name in state.fisher_sum:
                    state.fisher_sum[name] += c
                else:
                    state.fisher_sum[name] = c.clone()
            if ema:
                trace = c.sum() if trace is None else trace + c.sum()
                if self.ema_entries:
                    self._ema_step(state, name, c, n)
        if fisher:
            state.fisher_count += n
            self._fisher_cache.pop(task, None)
        if ema:
            self._ema_trace_step(state, trace, n)
            state.ema_steps += 1
            if self.ema_entries and self.shards.sharded:
                state.ema_since += 1

    # ------------------------------------------------------------------ whitening (sketch store)
    def whitening_fisher(self, tasks: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """``mean_T I_T`` over ``tasks`` (default all) with samples: the Fisher that whitens sketches.

        For two tasks this is the pooled Fisher ``(I_A + I_B) / 2`` of the conflict cosine.
        """
        names = [t for t in (tasks if tasks is not None else self.tasks) if self.num_samples(t) > 0]
        if self.shards.sharded:  # the same order on every rank (a task not materialised gathers)
            names = sorted(names)
        out: dict[str, torch.Tensor] = {}
        for t in names:
            if t in self._whole:
                sums, count = self._whole[t], 1
            else:
                sums, count = self.fisher_state(t)
            for n, s in sums.items():
                if n in out:
                    out[n].add_(s, alpha=1.0 / count)  # in place: one weight-sized result
                else:
                    out[n] = s / float(count)
        if len(names) > 1:
            for v in out.values():
                v.div_(len(names))
        return out

    @property
    def needs_whitening(self) -> bool:
        """True for a sketch store without a whitening Fisher yet."""
        return self.store.needs_whitening

    def initial_whitening(self, sums: Mapping[str, torch.Tensor] | None, count: int) -> None:
        """Freeze the first whitening, identical on every DDP rank (collective).

        ``F_w = sum g**2 / n`` from this rank's ``sums`` (``{name: sum of g**2}`` over ``count``
        samples, e.g. what :meth:`Ingest.commit` returns) and every other rank's, all-reduced;
        a rank without usable gradients passes ``None`` (and 0) and adds nothing. Only for a
        sketch store without whitening; no whitening is set when no rank has a sample.
        """
        if not self.needs_whitening:
            return
        device = self.device
        total = {}
        for name in self.param_names:
            if sums is None or count == 0 or name not in sums:
                total[name] = torch.zeros(self.param_shapes[name], device=device)
            else:
                total[name] = sums[name].float()
        count = int(count) if sums is not None else 0
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            cdev = collective_device()
            n = torch.tensor([float(count)], device=cdev)
            dist.all_reduce(n)
            count = int(n.item())
            for name in self.param_names:
                t = total[name].to(cdev)
                dist.all_reduce(t)
                total[name] = t.to(device)
        if count > 0:
            self.store.set_whitening({n: v / count for n, v in total.items()})

    def freeze_whitening(self, fisher: Mapping[str, torch.Tensor] | None = None) -> None:
        """Freeze the whitening of the next sketches: ``fisher`` (``{name: F_w}``) or
        :meth:`whitening_fisher`. No-op for the exact store (it whitens at compute time) and when
        no task has samples yet."""
        if not self.store.whitened:
            return
        fisher = dict(fisher) if fisher is not None else self.whitening_fisher()
        if fisher:
            self.store.set_whitening(fisher)

    def _finite_rows(
        self, grads: dict[str, torch.Tensor], n: int, task: str, ids: list[SampleId] | None
    ) -> torch.Tensor | None:
        """Indices of the finite samples, or None when all are finite (the common, copy-free case).

        One reduction per parameter: a sample's sum is finite iff all its entries are (an entry
        of ~1e38 whose sum overflows counts as non-finite too, which is what it is for fp16/bf16).
        """
        finite = torch.ones(n, dtype=torch.bool)
        for g in grads.values():
            finite &= torch.isfinite(g.reshape(n, -1).sum(1, dtype=torch.float32)).cpu()
        if bool(finite.all()):
            return None
        n_bad = int((~finite).sum())
        self.skipped_nonfinite += n_bad
        bad = torch.nonzero(~finite).flatten().tolist()
        bad_ids = [ids[i] for i in bad] if ids is not None else bad
        warnings.warn(
            f"task {task!r}: skipped {n_bad} sample(s) with non-finite gradients "
            f"(ids {bad_ids[:5]}{'...' if n_bad > 5 else ''}); {self.skipped_nonfinite} so far",
            stacklevel=3,
        )
        return torch.nonzero(finite).flatten()

    def _ema_step(self, state: _TaskState, name: str, sum_c: torch.Tensor, n: int) -> None:
        """``F <- beta F + (1 - beta) sum_c / n`` in place (sharded: into the whole pending part,
        folded into this rank's block at the next :meth:`sync`)."""
        beta = self.ema_decay
        if self.shards.sharded:
            pending = state.ema_pending.get(name)
            if pending is None:
                state.ema_pending[name] = sum_c * ((1.0 - beta) / n)
            else:
                pending.mul_(beta).add_(sum_c, alpha=(1.0 - beta) / n)
            return
        if name in state.ema:
            state.ema[name].mul_(beta).add_(sum_c, alpha=(1.0 - beta) / n)
        else:
            state.ema[name] = sum_c * ((1.0 - beta) / n)

    def _ema_trace_step(self, state: _TaskState, sum_c: torch.Tensor | None, n: int) -> None:
        """``F_tr <- beta F_tr + (1 - beta) sum_c / n`` with ``sum_c`` the batch's summed trace."""
        if sum_c is None:
            return
        step = sum_c.detach().float() * ((1.0 - self.ema_decay) / n)
        state.ema_trace = step if state.ema_trace is None else state.ema_trace * self.ema_decay + step

    def _check_grads(self, grads: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.param_names if n not in grads]
        if missing:
            raise KeyError(f"gradients missing for {len(missing)} monitored parameter(s): {missing[:3]}")
        sizes = {g.shape[0] for g in grads.values()}
        if len(sizes) != 1:
            raise ValueError(f"per-sample gradients disagree on the batch size: {sorted(sizes)}")
        for name in self.param_names:
            if tuple(grads[name].shape[1:]) != self.param_shapes[name]:
                raise ValueError(
                    f"{name}: per-sample gradient shape {tuple(grads[name].shape)}, expected "
                    f"[B, {', '.join(map(str, self.param_shapes[name]))}]"
                )

    def resolve_ids(
        self, task: str, sample_ids: Sequence[SampleId] | torch.Tensor | None, n: int
    ) -> list[SampleId]:
        """``n`` TRUE ids of ``task``'s samples: ``sample_ids`` as a list, or the next ``n`` of the
        task's running counter when it is None."""
        if sample_ids is None:
            state = self._task(task)
            ids = list(range(state.next_id, state.next_id + n))
            state.next_id += n
            return ids
        if torch.is_tensor(sample_ids):
            sample_ids = sample_ids.flatten().tolist()
        ids = list(sample_ids)
        if len(ids) != n:
            raise ValueError(f"{len(ids)} sample ids for {n} samples")
        return ids

    # ------------------------------------------------------------------ EMA
    def update_ema(self, batch: dict, task: str) -> None:
        """One EMA step from the per-sample gradients of ``batch`` (one batched pass)."""
        self.update_ema_from_gradients(self._per_sample(batch), task)

    def _per_sample(self, batch: dict) -> dict[str, torch.Tensor]:
        return per_sample_gradients(
            self.model,
            batch,
            self.layout,
            loss_type=self.loss_type,
            fisher_type=self.fisher_type,
            generator=self.generator,
        )

    def update_ema_from_gradients(
        self, grads: dict[str, torch.Tensor], task: str, *, check_finite: bool = True
    ) -> bool:
        """``F <- beta F + (1 - beta) mean_batch g**2`` over the finite samples of ``grads``.

        Returns:
            False (and no update) when no sample is finite.
        """
        self._check_grads(grads)
        n = next(iter(grads.values())).shape[0]
        keep = self._finite_rows(grads, n, task, None) if check_finite else None
        if keep is not None and keep.numel() == 0:
            return False
        kept = set(range(n)) if keep is None else set(keep.tolist())
        tasks = [task if i in kept else None for i in range(n)]
        self.ingest(tasks, fisher=False, ema=True, store=False).feed(grads).commit()
        return True

    def fisher_ema(self, task: str) -> dict[str, torch.Tensor]:
        """Bias-corrected EMA Fisher ``F_t / (1 - beta**t)``; ``{}`` before the first update and
        when the collector keeps the trace only (``ema_entries=False``). Sharded (FSDP2): the
        synced EMA, gathered whole (a collective: every rank calls it)."""
        state = self._tasks.get(task)
        if state is None or state.ema_steps == 0:
            return {}
        correction = 1.0 - self.ema_decay**state.ema_steps
        if self.shards.sharded:
            return {n: self.shards.whole(n, state.ema[n]).div_(correction) for n in sorted(state.ema)}
        return {name: f / correction for name, f in state.ema.items()}

    # ------------------------------------------------------------------ queries
    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def num_samples(self, task: str) -> int:
        """Samples in the task's contribution Fisher (all seen, not only the stored ones)."""
        state = self._tasks.get(task)
        return 0 if state is None else state.synced_count + state.fisher_count

    def num_stored(self, task: str) -> int:
        return self.store.num_stored(task)

    def fisher_ema_trace(self, task: str) -> float:
        """Bias-corrected trace of the EMA Fisher, ``sum_k F_t,k / (1 - beta**t)`` (0.0 before the
        first update), kept whatever ``ema_entries``."""
        state = self._tasks.get(task)
        if state is None or state.ema_steps == 0 or state.ema_trace is None:
            return 0.0
        return float(state.ema_trace) / (1.0 - self.ema_decay**state.ema_steps)

    def ema_steps(self, task: str) -> int:
        state = self._tasks.get(task)
        return 0 if state is None else state.ema_steps

    def sample_ids(self, task: str) -> list[SampleId]:
        """True ids of the stored samples of ``task`` (one per id, row order)."""
        return self.store.ids(task)

    def _exact_store(self, what: str) -> ExactStore:
        if not isinstance(self.store, ExactStore):
            raise RuntimeError(
                f"{what} needs per-entry gradients, but this collector keeps per-head sketches "
                f"(store={self.store_kind!r}, sketch_dim={getattr(self.store, 'sketch_dim', None)}); "
                "use the QK-OV metric (signed scores, head maps, tests) or store='exact'"
            )
        return self.store

    def stored_gradients(self, task: str) -> tuple[list[SampleId], dict[str, torch.Tensor]]:
        """``(ids, {name: [n, *shape]})``: the stored signed gradients (``storage_dtype``, views).

        Row k of every tensor belongs to ``ids[k]``. An unknown or empty task gives ``([], {})``.

        Raises:
            RuntimeError: the store keeps sketches (``store="sketch"``), not gradients.
        """
        return self._exact_store("stored_gradients").stored(task)

    def get_gradient(self, task: str, sample_id: SampleId) -> dict[str, torch.Tensor]:
        """Stored signed gradient of one sample, by TRUE id (the newest one for a repeated id).

        Raises:
            KeyError: the id is not stored; RuntimeError: a sketch store.
        """
        return self._exact_store("get_gradient").get(task, sample_id)

    def fisher(self, task: str) -> dict[str, torch.Tensor]:
        """Contribution Fisher ``I_task = mean_i g_i**2`` (fp32, ``{name: [*shape]}``).

        Cached weakly until new samples arrive: while a caller holds the result (a boundary's
        QK-OV maps, forgetting and trace logging), every call returns the same tensors; once
        none does, the memory is freed (no persistent weight-sized copy per task) and the next
        call divides the sums again. ``{}`` (and a warning) for a task without samples; a
        warning below ``min_samples_for_fisher`` samples (once per sample count).

        Sharded (FSDP2): whole; :meth:`materialise` made it at the boundary, else it is
        gathered now (see :meth:`fisher_state`: a collective once samples were synced, so every
        rank calls it then).
        """
        cached = self._whole.get(task) or self._fisher_cache.get(task)
        if cached is None:
            sums, count = self.fisher_state(task)
            if count == 0:
                warnings.warn(f"no samples for task {task!r}: its Fisher is empty", stacklevel=2)
                return {}
            cached = _FisherMeans((n, s / float(count)) for n, s in sums.items())
            self._fisher_cache[task] = cached
        count = self.num_samples(task)
        if count < self.min_samples_for_fisher and self._fisher_warned.get(task) != count:
            self._fisher_warned[task] = count
            warnings.warn(
                f"Fisher of task {task!r} from only {count} sample(s) "
                f"(< min_samples_for_fisher={self.min_samples_for_fisher}): noisy estimate",
                stacklevel=2,
            )
        return cached

    def fisher_state(self, task: str) -> tuple[dict[str, torch.Tensor], int]:
        """``(sum of C_i, count)`` behind :meth:`fisher` (synced total plus local since the sync).
        Sharded (FSDP2): the synced total is gathered whole, a collective once a sync has
        counted samples of the task (a count the same on every rank), none before."""
        state = self._tasks.get(task)
        if state is None:
            return {}, 0
        if self.shards.sharded:
            pending, count = state.fisher_sum, state.synced_count + state.fisher_count
            if state.synced_count == 0:
                return pending, count
            sums = {n: self.shards.whole(n, self._synced_block(state, n)) for n in self.param_names}
            for n, t in pending.items():
                sums[n] += t
            return sums, count
        if not state.synced_sum:
            return state.fisher_sum, state.fisher_count
        pending = state.fisher_sum
        sums = {n: s + pending[n] if n in pending else s for n, s in state.synced_sum.items()}
        return sums, state.synced_count + state.fisher_count

    def _synced_block(self, state: _TaskState, name: str) -> torch.Tensor:
        """This rank's block of the synced sum of ``name`` (zeros before any sync)."""
        block = state.synced_sum.get(name)
        if block is None:
            block = self.shards.rows(name, torch.zeros(self.param_shapes[name], device=self.device)).clone()
        return block

    @property
    def contribution_cache(self) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
        """``{task: {f"{task}_{id}": {name: C_i}}}`` (fp32, computed from the stored ``g_i``).

        Raises:
            RuntimeError: a sketch store (no per-entry gradients).
        """
        self._exact_store("contribution_cache")
        out: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        for task in self._tasks:
            ids, rows = self.stored_gradients(task)
            out[task] = {
                f"{task}_{sid}": {name: r[k].float() ** 2 for name, r in rows.items()}
                for k, sid in enumerate(ids)
            }
        return out

    # ------------------------------------------------------------------ memory
    def memory_ledger(self, seen: set | None = None) -> dict[str, int]:
        """``{group: bytes}`` of what the collector holds: per task the fp32 Fisher sums
        (``fisher_sum[task]``, the synced total included) and EMA (``ema[task]``), the cached
        means (``fisher_cache``) and the store's groups (``store.rows[task]``,
        ``store.whitening``, ...). Tensors in ``seen`` are not counted again (it is updated)."""
        seen = set() if seen is None else seen
        out: dict[str, int] = {}
        for task, state in self._tasks.items():
            out[f"fisher_sum[{task}]"] = tensor_bytes([state.fisher_sum, state.synced_sum], seen)
            out[f"ema[{task}]"] = tensor_bytes([state.ema, state.ema_pending], seen)
        out["fisher_cache"] = tensor_bytes([self._fisher_cache, self._whole], seen)
        for group, n in self.store.memory_ledger(seen).items():
            out[f"store.{group}"] = n
        return {k: v for k, v in out.items() if v}

    # ------------------------------------------------------------------ distributed
    def sync(self, tasks: Iterable[str] | None = None, *, materialise: bool = True) -> None:
        """Reduce the Fisher sums and counts across ``torch.distributed`` ranks (collective).

        Every rank must call it with the same tasks (in the same order). Like a torchmetrics
        state, the sums added since the last sync are all-reduced with ``sum`` and folded into a
        global total, so calling it again never counts a sample twice; afterwards every rank's
        :meth:`fisher` is the Fisher of the union of all ranks' samples. EMA states are averaged
        across ranks (each rank's EMA is over its local batches; with equal batch sizes the mean
        is the EMA of the global batch mean). Stored per-sample gradients stay local.
        No-op outside an initialised process group.

        Sharded (FSDP2): the reduced sums and EMA are folded into this rank's blocks and the
        whole ones of the steps since the last sync are freed; with ``materialise`` every task's
        whole Fisher is then gathered for the readers of a boundary (:meth:`materialise`).
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        device = collective_device()
        world = dist.get_world_size()
        sharded = self.shards.sharded
        # Ranks may have met tasks in different orders (or not at all): reduce the sorted union.
        gathered: list[list[str] | None] = [None] * world
        dist.all_gather_object(gathered, sorted(tasks if tasks is not None else self.tasks))
        for task in sorted({t for names in gathered for t in (names or [])}):
            state = self._task(task)
            has_ema = float(state.ema_steps > 0)
            trace = float(state.ema_trace) if state.ema_trace is not None else 0.0
            decay = has_ema * self.ema_decay**state.ema_since  # sharded: what is left of the synced EMA
            count = torch.tensor(
                [float(state.fisher_count), float(state.ema_steps), has_ema, trace, decay],
                dtype=torch.float64,
                device=device,
            )
            dist.all_reduce(count)
            if count[2] > 0:
                state.ema_trace = torch.tensor(float(count[3] / count[2]))
            for name in self.param_names:
                local = state.fisher_sum.get(name)
                t = (
                    local.to(device)
                    if local is not None
                    else torch.zeros(self.param_shapes[name], device=device)
                )
                dist.all_reduce(t)
                home = self._home_device(name, local, state.synced_sum.get(name))
                if sharded:
                    t = self.shards.rows(name, t).clone()  # this rank's block; the whole is freed
                state.synced_sum[name] = state.synced_sum.get(name, torch.zeros_like(t, device=home)) + t.to(
                    home
                )
                if not self.ema_entries:
                    continue
                ema = state.ema_pending.get(name) if sharded else state.ema.get(name)
                e = ema.to(device) if ema is not None else torch.zeros(self.param_shapes[name], device=device)
                dist.all_reduce(e)
                if count[2] <= 0:
                    continue
                if not sharded:  # mean over the ranks that have an EMA for this task
                    state.ema[name] = (e / count[2]).to(home)
                    continue
                # mean over those ranks of beta**k_r * (the synced EMA) + their pending steps
                block = self.shards.rows(name, e).clone().div_(count[2]).to(home)
                if name in state.ema:
                    block.add_(state.ema[name], alpha=float(count[4] / count[2]))
                state.ema[name] = block
            state.fisher_sum = {}  # what arrives next starts a new sum
            if sharded:
                state.ema_pending, state.ema_since = {}, 0
            state.synced_count += int(count[0].item())
            state.fisher_count = 0
            state.ema_steps = round(count[1].item() / max(count[2].item(), 1.0))
            self._fisher_cache.pop(task, None)
            self._whole.pop(task, None)
        if sharded and materialise:
            self.materialise()

    def materialise(self) -> None:
        """Sharded (FSDP2): gather the whole Fisher (of the synced samples) of every task that
        has none gathered, kept for :meth:`fisher` until :meth:`release_whole` (the readers of a
        boundary: QK-OV maps, the forgetting monitor, the whitening, trace logging). A
        collective over every rank's tasks (sorted); a no-op without sharding."""
        if not self.shards.sharded:
            return
        world = torch.distributed.get_world_size()
        gathered: list[dict[str, int] | None] = [None] * world
        torch.distributed.all_gather_object(gathered, {t: s.synced_count for t, s in self._tasks.items()})
        counts: dict[str, int] = {}
        for rank in gathered:
            for task, n in (rank or {}).items():
                counts[task] = max(counts.get(task, 0), n)
        for task in sorted(t for t, n in counts.items() if n > 0 and t not in self._whole):
            self._task(task).synced_count = counts[task]  # a rank that never met it gathers too
            sums, count = self.fisher_state(task)
            self._whole[task] = _FisherMeans((n, s.div_(count)) for n, s in sums.items())

    def release_whole(self) -> None:
        """Free the whole Fisher :meth:`materialise` gathered and keep only this rank's rows of
        a sketch store's whitening (sharded; nothing otherwise)."""
        self._whole.clear()
        self.store.park_whitening(self.shards)

    def gather_whitening(self) -> None:
        """Sharded (FSDP2) sketch store: the whole whitening back from every rank's rows, before
        samples are sketched (a collective while it is parked: every rank calls it; the
        FisherEngine does at each captured step and probe pass). Nothing otherwise."""
        self.store.unpark_whitening(self.shards)

    def set_shards(self, shards: Shards) -> None:
        """Keep the synced sums and EMA as ``shards``' blocks from now on (a model FSDP2 sharded
        after the collector was made, e.g. by Lightning's ``configure_model``, or a checkpoint
        of whole tensors loaded before): whole tensors kept so far are cut to this rank's rows."""
        if self.shards.sharded and not shards.sharded:
            raise ValueError("the collector's state is sharded: it cannot go back to whole tensors")
        self.shards = shards
        self._to_blocks()

    def _to_blocks(self) -> None:
        """The synced sums and EMA as this rank's blocks (:meth:`Shards.block`: whole tensors
        cut to this rank's rows, blocks and unsharded state kept as they are)."""
        if not self.shards.sharded:
            return
        block = self.shards.block
        for state in self._tasks.values():
            state.synced_sum = {n: block(n, t) for n, t in state.synced_sum.items()}
            state.ema = {n: block(n, t) for n, t in state.ema.items()}
        self._fisher_cache.clear()

    def drop_unsynced(self) -> None:
        """Forget the Fisher sums added since the last :meth:`sync` (see FisherMonitor resume)."""
        for state in self._tasks.values():
            state.fisher_sum = {}
            state.fisher_count = 0
            state.ema_pending, state.ema_since = {}, 0
        self._fisher_cache.clear()

    def _home_device(self, name: str, *candidates: torch.Tensor | None) -> torch.device:
        """Where the sums of ``name`` live: those kept so far, else the monitored weights'."""
        for t in candidates:
            if t is not None:
                return t.device
        return self.device

    # ------------------------------------------------------------------ state
    def reset(self, task: str | None = None) -> None:
        """Forget one task (or all)."""
        if task is None:
            self._tasks.clear()
            self._fisher_cache.clear()
            self._whole.clear()
        else:
            self._tasks.pop(task, None)
            self._fisher_cache.pop(task, None)
            self._whole.pop(task, None)
        self.store.reset(task)
        self._rebalance()

    def state_dict(self, include_store: bool = True) -> dict[str, Any]:
        """Everything needed to resume: stored gradients, Fisher sums, EMA, counters, RNG.

        Args:
            include_store: ``False`` leaves out the stored per-sample gradients and their ids
                (``n_stored * bytes_per_sample`` per task): the restored collector keeps every
                Fisher sum, count and EMA, and its reservoirs start empty (``seen`` 0, so they
                refill as uniform samples of what comes after the resume).

        Sharded (FSDP2): a collective. What the ranks added since the last sync is synced
        first, and the sums and EMA are gathered whole, so the state is the one a DDP run
        would save and resumes on any number of ranks.
        """
        whole = self.shards.whole
        if self.shards.sharded:
            self.sync(materialise=False)
            self.gather_whitening()
        tasks = {}
        for name in sorted(self._tasks) if self.shards.sharded else self._tasks:
            s = self._tasks[name]
            tasks[name] = {
                "fisher_sum": {p: t.clone() for p, t in s.fisher_sum.items()},
                "fisher_count": s.fisher_count,
                "synced_sum": {p: whole(p, t).clone() for p, t in sorted(s.synced_sum.items())},
                "synced_count": s.synced_count,
                "ema": {p: whole(p, t).clone() for p, t in sorted(s.ema.items())},
                "ema_trace": None if s.ema_trace is None else float(s.ema_trace),
                "ema_steps": s.ema_steps,
                "next_id": s.next_id,
            }
        return {
            "tasks": tasks,
            "store": self.store.state_dict(include_rows=include_store),
            "skipped_nonfinite": self.skipped_nonfinite,
            "generator": self.generator.get_state(),
            "ema_decay": self.ema_decay,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, on the device of the model's monitored weights (checkpoints
        are loaded on the CPU)."""
        params = dict(self.model.named_parameters())
        device = params[self.param_names[0]].device
        state = _tree_to(state, device)
        self._tasks.clear()
        self._fisher_cache.clear()
        for name, s in state["tasks"].items():
            t = _TaskState(
                fisher_sum={p: v.float() for p, v in s["fisher_sum"].items()},
                fisher_count=int(s["fisher_count"]),
                synced_sum={p: v.float() for p, v in s.get("synced_sum", {}).items()},
                synced_count=int(s.get("synced_count", 0)),
                ema={p: v.float() for p, v in s["ema"].items()} if self.ema_entries else {},
                ema_steps=int(s["ema_steps"]),
                next_id=int(s["next_id"]),
            )
            trace = s.get("ema_trace")
            if trace is None and s["ema"]:  # a checkpoint from before the trace was kept
                trace = sum(float(v.float().sum()) for v in s["ema"].values())
            t.ema_trace = None if trace is None else torch.tensor(float(trace))
            self._tasks[name] = t
        self._to_blocks()  # sharded: this rank's rows of the whole sums and EMA
        store = state.get("store")
        if store is None:  # checkpoints of the first version: exact rows inside each task
            store = {
                "kind": "exact",
                "tasks": {n: {k: s[k] for k in ("ids", "rows", "seen")} for n, s in state["tasks"].items()},
            }
        self.store.load_state_dict(store, device)
        for name in self.store.tasks:
            self._tasks.setdefault(name, _TaskState())
        self.skipped_nonfinite = int(state.get("skipped_nonfinite", 0))
        if "generator" in state:
            self._rng.set_state(state["generator"])
        # Re-establish the budget's per-task capacity (may shrink if the budget is smaller now).
        self._rebalance()

    def __repr__(self) -> str:
        tasks = ", ".join(f"{t}: {self.num_stored(t)}/{self.num_samples(t)}" for t in self._tasks)
        return (
            f"FisherCollector({self.layout.model_type}, {len(self.param_names)} params, "
            f"{self.store_kind} store, "
            f"stored/seen {{{tasks}}}, {self.stored_bytes / 2**20:.1f}/{self.gradient_memory_mb} MB)"
        )


def _sum_of_squares(
    g: torch.Tensor, keep: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``sum_i g_i**2`` over the kept rows, accumulated in fp32 (``[*shape]``), into ``out``
    when given.

    An in-place ``addcmul_`` per sample: no ``[n, *shape]`` temporary, and several times faster
    on CPU than ``einsum`` or ``square().sum(0)`` for the sizes seen here.
    """
    if keep is not None:
        g = g.index_select(0, keep.to(g.device))
    start = 0
    if out is None:
        out = torch.empty(g.shape[1:], dtype=torch.float32, device=g.device)
        if g.shape[0] == 0:
            return out.zero_()
        first = g[0].float()
        torch.mul(first, first, out=out)  # no zero fill
        start = 1
    for gi in g[start:]:
        gi = gi.float()
        out.addcmul_(gi, gi)
    return out


def _tree_to(obj: Any, device: torch.device) -> Any:
    if torch.is_tensor(obj):
        return obj.to(device) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _tree_to(v, device) for k, v in obj.items()}
    return obj

"""Probe passes of the Fisher engine: the fixed probe batches of each reference task, the per-sample
probe pass that refreshes the task in the collector, the plain probe gradient, and their reduction
over DDP ranks into a :class:`~fisher_callbacks.engine.readings.ProbeReading`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from .._rng import isolated_rng
from ..capture import ProbeResult, probe_pass, summed_backward
from ..losses import forward_logits, infer_loss_type, is_squared_error, per_sample_loss, target_token_counts
from ..memory import tensor_bytes
from .host import Host
from .ranks import distributed
from .readings import ProbeReading
from .sharding import collective_device, is_dtensor

if TYPE_CHECKING:
    from .fisher import FisherEngine

Batch = dict[str, Any]


class ProbeRunner:
    """The probe passes of one :class:`~fisher_callbacks.engine.fisher.FisherEngine`.

    Reads the engine's collector, layout, capture, loss and probe settings at each call (they
    change when the layout is resolved again); keeps the fixed probe batches (``fixed``, CPU,
    checkpointed by the engine) and whether the last pass's losses were cross-entropies.
    """

    def __init__(self, engine: FisherEngine) -> None:
        self.engine = engine
        self.fixed: dict[str, list[Batch]] = {}  # task -> the probe batches drawn once
        self.log_loss = True  # the probe losses are cross-entropies (False: a regression head's MSE)

    def batches(self, task: str) -> list[Batch]:
        """The fixed probe batches of ``task``: its loader iterated once, cut to
        ``probe_max_samples`` samples in all, kept on the CPU, then reused."""
        if task not in self.fixed:
            cap = self.engine.probe_max_samples
            batches, n = [], 0
            for batch in self.engine.reference_tasks[task]:
                if cap is not None and n >= cap:
                    break
                batch = _to_device(batch, torch.device("cpu"))
                if cap is not None:  # tensors and per-sample lists (ids) alike
                    batch = _head(batch, batch["labels"].shape[0], cap - n)
                batches.append(batch)
                n += int(batch["labels"].shape[0]) if "labels" in batch else 0
            self.fixed[task] = batches
        return self.fixed[task]

    @isolated_rng()  # iterating a probe loader draws from the global RNG: not the run's
    def run(
        self,
        host: Host,
        task: str,
        params: Mapping[str, torch.Tensor],
        loader: Iterable[Mapping[str, Any]] | None = None,
    ) -> ProbeReading:
        """Per-sample probe pass of ``task`` over ``loader`` (``None``: its fixed batches): the
        task is refreshed in the collector (reduced over ranks), ``params`` get the mean
        gradient. A collective under DDP; a rank whose pass raises adds no sample (a warning),
        with one process the error propagates.

        Raises:
            ValueError: no probe sample on any rank.
        """
        collector = self.engine.collector
        collector.reset(task)
        collector.gather_whitening()  # FSDP2: a sketch store's whitening, whole to sketch the probes
        losses: list[torch.Tensor] = []
        total: dict[str, torch.Tensor] = {}
        try:
            # The fixed batches are drawn inside the try: a rank whose loader fails still joins
            # the reduction below (a collective), contributing nothing.
            source = self.batches(task) if loader is None else loader
            self._local(host, task, source, params, losses, total)
        except Exception as err:
            if not distributed():
                raise
            self.engine.relay.warn(
                f"probe pass on {task!r} failed on this rank, which adds no sample: {err!r}"
            )
            collector.reset(task)
            losses.clear()
            total.clear()
        local = torch.cat(losses) if losses else torch.zeros(0)
        all_losses, grad_sum, n = _reduce_probe(local, total, params)
        collector.sync([task])  # the probe Fisher of every rank's samples (no-op in one process)
        if n == 0:
            where = " on every rank" if distributed() else ""
            raise ValueError(f"probe set {task!r} is empty{where}")
        return _reading(host.step, all_losses, grad_sum, n)

    def _local(
        self,
        host: Host,
        task: str,
        loader: Iterable[Mapping[str, Any]],
        params: Mapping[str, torch.Tensor],
        losses: list[torch.Tensor],
        total: dict[str, torch.Tensor],
    ) -> None:
        """This rank's probe pass: per-sample gradients into the collector under ``task``,
        per-sample losses appended to ``losses`` and the summed gradients into ``total``."""
        engine, n = self.engine, 0
        cap, key, collector = engine.probe_max_samples, engine.sample_id_key, engine.collector
        with _probe_mode(host.module):
            for batch in loader:
                if cap is not None and n >= cap:
                    break
                batch = _to_device(batch, host.device)
                if cap is not None:
                    batch = _head(batch, batch["labels"].shape[0], cap - n)
                size = batch["labels"].shape[0]
                ids = batch.get(key)
                ids = None if ids is None else _as_list(ids, size, None, key)
                # Streamed into the collector inside the hooks (chunked), unless a sketch
                # store has no whitening yet (no captured step before this boundary).
                ingest = None
                if not collector.needs_whitening:
                    has_target = (target_token_counts(batch["labels"], engine.loss_type) > 0).tolist()
                    ingest = collector.ingest([task if ok else None for ok in has_target], ids)
                res = self._pass(host, batch, params, ingest, size, total)
                has_target = res.counts > 0  # a sample without targets has no gradient
                if not bool(has_target.all()):
                    rows = torch.nonzero(has_target).flatten()
                    res.grads = {k: g.index_select(0, rows.to(g.device)) for k, g in res.grads.items()}
                    res.losses = res.losses[has_target]
                    if ids is not None:
                        ids = [ids[r] for r in rows.tolist()]
                if res.losses.numel() == 0:
                    continue
                if ingest is not None:
                    ingest.commit()
                else:
                    collector.add_gradients(res.grads, task, ids)
                losses.append(res.losses.float().cpu())
                n += res.losses.shape[0]

    def _pass(
        self,
        host: Host,
        batch: Batch,
        params: Mapping[str, torch.Tensor],
        ingest: Any,
        size: int,
        total: dict[str, torch.Tensor],
    ) -> ProbeResult:
        """One probe batch through :func:`~fisher_callbacks.capture.probe_pass` (the training
        capture's hooks reused when they are attached), its summed gradients added into
        ``total``."""
        engine = self.engine
        res = probe_pass(
            host.module,
            batch,
            engine.layout,
            loss_type=engine.loss_type,
            fisher_type=engine.fisher_type,
            generator=engine.collector.generator,
            sum_params=dict(params),
            forward_model=host.forward_module,
            capture=engine.capture if engine.capture.attached else None,
            sink=ingest,
            chunk=None if ingest is None else engine.chunk_size(size),
            sum_into=total,
            sum_dtype=engine.probe_grad_dtype,
        )
        self.log_loss = res.log_loss
        return res

    @isolated_rng()  # iterating a probe loader draws from the global RNG: not the run's
    def gradient(self, host: Host, task: str, params: Mapping[str, torch.Tensor]) -> ProbeReading:
        """Mean probe loss and gradient over ``params`` of ``task`` on its fixed batches, one
        plain batched backward per batch (no per-sample capture, the collector untouched). A
        collective under DDP like :meth:`run`.

        Raises:
            ValueError: no probe sample with a target on any rank.
        """
        losses: list[torch.Tensor] = []
        total: dict[str, torch.Tensor] = {}
        forward = host.forward_module
        loss_type = self.engine.loss_type or infer_loss_type(forward)
        dtype = self.engine.probe_grad_dtype
        # FSDP2: the backward is a collective every rank runs for every batch (an empty sum adds
        # zeros), else the ranks' collectives fall out of step
        sharded = any(is_dtensor(p) for p in params.values())
        try:
            with _probe_mode(host.module):
                for batch in self.batches(task):
                    batch = _to_device(batch, host.device)
                    logits = forward_logits(forward, batch)
                    per_sample, counts = per_sample_loss(logits, batch["labels"], loss_type)
                    self.log_loss = not is_squared_error(logits, batch["labels"], loss_type)
                    per_sample = per_sample[counts > 0]  # a sample without targets has no loss
                    if per_sample.numel() == 0 and not sharded:
                        continue
                    summed_backward(per_sample.sum(), host.module, params, total, dtype)
                    losses.append(per_sample.detach().float().cpu())
        except Exception as err:
            if not distributed():
                raise
            self.engine.relay.warn(
                f"probe gradient of {task!r} failed on this rank, which adds no sample: {err!r}"
            )
            losses.clear()
            total.clear()
        local = torch.cat(losses) if losses else torch.zeros(0)
        all_losses, grad_sum, n = _reduce_probe(local, total, params)
        if n == 0:
            raise ValueError(f"probe set {task!r} has no sample with a target")
        return _reading(host.step, all_losses, grad_sum, n)

    def memory_ledger(self, seen: set | None = None) -> dict[str, int]:
        """``{"probe_batches": bytes}`` of the fixed probe batches (empty when none is held)."""
        n = tensor_bytes(self.fixed, set() if seen is None else seen)
        return {"probe_batches": n} if n else {}


# ---------------------------------------------------------------------- helpers
def _reading(step: int, losses: torch.Tensor, grad_sum: Mapping[str, torch.Tensor], n: int) -> ProbeReading:
    return ProbeReading(
        step=step,
        loss=float(losses.mean()),
        losses=losses,
        grad={name: g.detach().div_(n) for name, g in grad_sum.items()},  # in place: no copy
        n=n,
    )


def _reduce_probe(
    losses: torch.Tensor, total: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Per-sample losses ``[n]`` (all ranks, rank order), summed gradients and the sample count
    over every rank; a rank without samples gives zeros (``total`` may lack names). Local in one
    process, else one ``all_gather_object`` and one ``all_reduce`` of a flat buffer."""
    if not distributed():
        return losses, dict(total), int(losses.numel())
    dist = torch.distributed
    gathered: list[list[float] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, losses.tolist())
    all_losses = torch.tensor([v for rank in gathered for v in (rank or [])], dtype=torch.float32)
    if not params:
        return all_losses, {}, int(all_losses.numel())
    device = collective_device()
    # FSDP2-sharded parameters: this rank's block, already summed over the ranks by the backward
    whole = {n: p for n, p in params.items() if not is_dtensor(p)}
    flat = torch.cat(
        [
            (total[name] if name in total else torch.zeros_like(p)).detach().float().reshape(-1).to(device)
            for name, p in whole.items()
        ]
        or [torch.zeros(0, device=device)]
    )  # [sum of numel], in the (rank-independent) parameter order
    dist.all_reduce(flat)
    out, offset = {}, 0
    for name, p in params.items():
        if name not in whole:
            out[name] = total[name] if name in total else torch.zeros_like(p.to_local())
            continue
        out[name] = flat[offset : offset + p.numel()].view(p.shape).to(p.device)
        offset += p.numel()
    return all_losses, out, int(all_losses.numel())


def _as_list(value: Any, n: int, default: Any, key: str = "entry") -> list:
    """Per-sample values of a batch entry: ``n`` copies of a scalar (or ``default`` for ``None``);
    a tensor is flattened first, so ``[B]`` and ``[B, 1]`` id tensors give the same ``B`` ids.
    Any other length than ``n`` is a ``ValueError`` naming ``key`` and the batch size (one tag
    too many would otherwise file every sample under its neighbour's task)."""
    if value is None:
        return [default] * n
    if torch.is_tensor(value):
        value = value.flatten().tolist() if value.dim() else value.item()
    if isinstance(value, (str, int)):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(
            f"batch[{key!r}] has {len(values)} entries for a batch of {n} samples (the batch size "
            "of 'labels'): one per sample, in batch order"
        )
    return values


def _head(batch: Mapping[str, Any], n: int, room: int) -> dict[str, Any]:
    """The first ``room`` samples of a batch of ``n``: tensors and per-sample lists (ids, tags)
    are cut together; other entries are kept as they are."""
    return {
        k: v[:room] if torch.is_tensor(v) or (isinstance(v, (list, tuple)) and len(v) == n) else v
        for k, v in batch.items()
    }


@contextlib.contextmanager
def _probe_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode with autograd on (also inside a trainer's validation inference mode); the train
    flag is restored on the way out, also when the block raises."""
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        module.train(was_training)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Mapping):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    raise TypeError(f"probe batches must be dicts, got {type(batch).__name__}")

"""Measured and predicted forgetting of the reference tasks against the anchor theta_0.

The math lives in :mod:`fisher_callbacks.functional.forgetting`; the tracker keeps what it needs
across boundaries (the anchor, each task's baseline loss and anchor Fisher, the first-order
accumulators) and returns one :class:`ForgettingReading` per task and boundary. It logs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..functional.forgetting import (
    FirstOrderForgettingAccumulator,
    damage_log_ratio,
    ewc_penalty,
    fisher_weighted_damage,
)
from .sharding import Shards

TensorDict = dict[str, torch.Tensor]


@dataclass
class ForgettingReading:
    """One reference task at one boundary.

    Attributes:
        task: the reference task A.
        step: optimizer step of the boundary.
        measured: ``L_A(theta_t) - L_A(theta_0)`` on the probe set (nats).
        predicted: the first-order prediction of that drift (trapezoid over the measurements).
        ewc: ``0.5 sum F_A(theta_0) (theta_t - theta_0)^2`` over the monitored weights.
        attribution: the prediction split over attention layers/heads/blocks
            (:meth:`FirstOrderForgettingAccumulator.per_block_head`).
        damage: ``{"damage_from_{train}": ..., "damage_log_ratio": ...}`` when the training task
            has stored gradients (see :meth:`ForgettingTracker.damage`), else empty.
    """

    task: str
    step: int
    measured: float
    predicted: float
    ewc: float
    attribution: dict[str, torch.Tensor] = field(default_factory=dict)
    damage: dict[str, float] = field(default_factory=dict)


class ForgettingTracker:
    """The anchor, the baselines, the anchor Fishers and the first-order accumulators.

    Attributes:
        anchor: the monitored weights at theta_0 (None before the anchor is taken).
        baseline: ``L_A(theta_0)`` per task (nats).
        anchor_fisher: ``F_A(theta_0)`` per task, over the monitored weights (EWC).
        accumulators: the first-order prediction per task.
        shards: how the parameters are split over the ranks (FSDP2): the anchor, the anchor
            Fishers and the gradients handed in are this rank's blocks, and every sum over the
            parameters is summed over the ranks (whole tensors otherwise).
    """

    def __init__(self) -> None:
        self.shards = Shards()
        self.anchor: TensorDict | None = None
        self.baseline: dict[str, float] = {}
        self.anchor_fisher: dict[str, TensorDict] = {}
        self.accumulators: dict[str, FirstOrderForgettingAccumulator] = {}
        self._restored: dict[str, Any] = {}  # accumulator states waiting for their layout

    def take_anchor(self, params: Mapping[str, torch.Tensor], names: Sequence[str]) -> None:
        """theta_0: a copy of the monitored weights ``names``."""
        self.anchor = {n: self.shards.local(n, params[n]).detach().clone() for n in names}

    def anchor_task(self, task: str, loss: float, fisher0: Mapping[str, torch.Tensor]) -> None:
        """Task ``task`` at theta_0: its probe loss and its Fisher (copied; this rank's rows of it
        under FSDP2)."""
        self.baseline[task] = loss
        self.anchor_fisher[task] = {n: self.shards.rows(n, f).clone() for n, f in fisher0.items()}

    def ensure_accumulators(self, tasks: Sequence[str], layout: Any) -> None:
        """An accumulator per task over ``layout`` (a restored one keeps its sums)."""
        for task in tasks:
            self.accumulators.setdefault(task, FirstOrderForgettingAccumulator(layout, self.shards))
            if task in self._restored:
                self.accumulators[task].load_state_dict(self._restored.pop(task))

    def to(self, device: torch.device) -> None:
        """Bring a restored (CPU) anchor and anchor Fishers to ``device``."""
        self.anchor = None if self.anchor is None else {n: t.to(device) for n, t in self.anchor.items()}
        self.anchor_fisher = {
            t: {n: f.to(device) for n, f in fs.items()} for t, fs in self.anchor_fisher.items()
        }

    def advance(self, task: str, grad_b: TensorDict, delta: TensorDict, grad_now: TensorDict) -> None:
        """One trapezoid step of the first-order prediction: ``g_A`` at both ends of the step
        ``delta`` = theta_now - theta_b, over the parameters of ``delta``.

        A weight frozen since fit start has no probe gradient at one end (frozen in this step:
        the other end's is used, a left- or right-point step) or at both (frozen before it: it did
        not move, its term is 0), so the prediction and its per-head split go on over the
        weights that still train."""
        accumulator = self.accumulators[task]
        names = [n for n in delta if n in grad_b or n in grad_now]
        layout = accumulator.layout
        frozen = [] if layout is None else [n for n in layout.monitored_parameters() if n not in names]
        accumulator.update(
            {n: grad_b.get(n, grad_now.get(n)) for n in names},
            _Subset(delta, names),  # delta may be made when read: never all of it at once
            grad_a_end={n: grad_now.get(n, grad_b.get(n)) for n in names},
            frozen=frozen,
        )

    def evaluate(
        self, task: str, step: int, loss: float, params: Mapping[str, torch.Tensor], fisher_a: TensorDict
    ) -> ForgettingReading:
        """The reading of ``task`` at ``step`` from its probe loss there, the module's parameters
        and its current Fisher ``fisher_a`` (EWC uses the anchor Fisher, ``fisher_a`` without
        one). Call :meth:`advance` first."""
        acc = self.accumulators[task]
        local = self.shards.local
        current = {n: local(n, params[n]).detach() for n in self.anchor}
        fisher0 = self.anchor_fisher.get(task) or {n: self.shards.rows(n, f) for n, f in fisher_a.items()}
        ewc = ewc_penalty(fisher0, current, self.anchor) if fisher0 else 0.0
        return ForgettingReading(
            task=task,
            step=step,
            measured=loss - self.baseline[task],
            predicted=acc.total,
            ewc=self.shards.reduce_floats([ewc])[0],  # this rank's rows: summed over the ranks
            attribution=acc.per_block_head(),
        )

    def damage(
        self, train: str, fisher_a: TensorDict, grad_a: TensorDict, fisher_b: TensorDict, grad_b: TensorDict
    ) -> dict[str, float]:
        """Fisher-weighted damage to task A of one unit step on the training task ``train`` and
        its asymmetry (as :func:`fisher_damage_asymmetry`); empty when the gradients do not cover
        the same parameters. Under FSDP2 ``grad_a`` is this rank's blocks: ``F_B g_A^2`` is
        summed over this rank's rows of the whole ``fisher_b``, then over the ranks; ``F_A g_B^2``
        (whole tensors, ``grad_b`` this rank's stored gradients) is this rank's, as under DDP."""
        grad_a = {n: grad_a[n] for n in grad_b if n in grad_a}
        if len(grad_a) != len(grad_b) or not fisher_a:
            return {}
        rows = self.shards.rows  # whole tensors, and the sum below itself, without sharding
        a_from_b = fisher_weighted_damage(fisher_a, grad_b)
        b_from_a = fisher_weighted_damage({n: rows(n, f) for n, f in fisher_b.items()}, grad_a)
        b_from_a = self.shards.reduce_floats([b_from_a])[0]
        return {f"damage_from_{train}": a_from_b, "damage_log_ratio": damage_log_ratio(a_from_b, b_from_a)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "anchor": self.anchor,
            "baseline": self.baseline,
            "anchor_fisher": self.anchor_fisher,
            "accumulators": {t: a.state_dict() for t, a in self.accumulators.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.anchor = state.get("anchor")
        self.baseline = dict(state.get("baseline", {}))
        self.anchor_fisher = dict(state.get("anchor_fisher", {}))
        self._restored = dict(state.get("accumulators", {}))
        for task, acc in list(self.accumulators.items()):
            if task in self._restored:
                acc.load_state_dict(self._restored.pop(task))


class _Subset(Mapping):
    """``mapping`` restricted to ``names``, read through (nothing is copied)."""

    def __init__(self, mapping: Mapping[str, torch.Tensor], names: list[str]) -> None:
        self.mapping, self.names, self._known = mapping, names, set(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._known:
            raise KeyError(name)
        return self.mapping[name]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

"""Typed results the engine hands between its parts and to its readers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ProbeReading:
    """One probe pass over a reference task's fixed probe batches, reduced over every rank.

    Attributes:
        step: optimizer step of the pass.
        loss: mean of the per-sample losses (nats, or the squared error of a regression head).
        losses: the per-sample losses ``[n]`` (all ranks, rank order).
        grad: ``{parameter name: mean gradient}`` over the probed parameters (empty when no
            monitor reads it, see ``FisherMonitor(probe_gradients=...)``).
        n: samples with a target.
    """

    step: int
    loss: float
    losses: torch.Tensor
    grad: dict[str, torch.Tensor] = field(default_factory=dict)
    n: int = 0

"""Is the training loss the per-sample mean loss that the capture assumes? Checked at the logits.

The capture turns each sample's share of the training gradient into the gradient of its own mean
loss with factors ``s_i`` from the labels and ``loss_reduction``
(:func:`~fisher_callbacks.losses.reduction_scale`). That holds only when the loss backpropagated
is ``L = sum_i l_i / s_i``. A ``training_step`` that returns ``0.5 * loss`` halves every captured
gradient (the Fisher 4x too small); an auxiliary term (a z-loss, label smoothing, a distillation
term) adds gradient that no per-sample loss explains.

On a flagged step :class:`LossCheck` compares, at the model's logits, the gradient ``G`` that
the training backward brings with the gradient ``A`` of the assumed loss (one cross-entropy
backward over the detached logits, a few samples at a time). The logits' gradient arrives
before the backward reaches any monitored projection, so a correction applies to the very
backward it was measured on. :func:`loss_factor` gives ``c = <G, A> / <A, A>`` and the residual
``r = ||G - c A|| / ||G||``: ``r`` small means the loss is ``c`` times the assumed one (a
constant weight, rescaled by the caller); otherwise a term is there that no per-sample loss
explains (the caller warns).

A term that bypasses the logits AND the projections' outputs (a penalty on the weights
themselves) is invisible there; :class:`CapturedSum` catches it: the captured per-sample
gradients, summed back with ``1 / s_i``, are the weights' ``.grad`` unless such a term exists.
(That comparison cannot see a constant weight: the hooks see the weighted backward too.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .losses import LossType, per_sample_loss

# ``r`` below this: the training loss is a constant multiple of the assumed one (fp32 exact runs
# give r ~ 1e-7; bf16 logits round their gradient by ~1e-2 of its size).
RESIDUAL_TOL = 0.05
# ``|c - 1|`` below this is not rescaled (a 1% weight changes the Fisher by 2%).
FACTOR_TOL = 1e-2


def loss_factor(grad: torch.Tensor, assumed: torch.Tensor) -> tuple[float, float]:
    """``(c, r)``: the least-squares factor ``c`` with ``grad ~ c * assumed`` and the relative
    residual ``||grad - c assumed|| / ||grad||``; ``(nan, nan)`` when either is zero or not
    finite (no target token, an AMP overflow)."""
    g, a = grad.detach().double(), assumed.detach().double().to(grad.device)
    return _factor(float((g * a).sum()), float((a * a).sum()), float((g * g).sum()))


def _factor(ga: float, aa: float, gg: float) -> tuple[float, float]:
    """:func:`loss_factor` from the three inner products ``<G, A>``, ``<A, A>``, ``<G, G>``."""
    if not (aa > 0 and gg > 0 and math.isfinite(aa) and math.isfinite(gg) and math.isfinite(ga)):
        return math.nan, math.nan
    c = ga / aa
    return c, math.sqrt(max(gg - c * c * aa, 0.0) / gg)


class LossCheck:
    """Measures :func:`loss_factor` of one training step at the logits of ``module``.

    Nothing is kept between the forward and the backward but a reference to the logits (no
    copy, dropped as soon as the backward has reached them); in the backward the assumed
    gradient is made a few samples at a time (``chunk_bytes`` of fp32 logits), so the check's
    memory is one chunk, not ``[B, T, V]``.

    Args:
        module: the module whose output holds the logits (a Hugging Face model: ``.logits``).
        labels: the batch's labels (``[B, T]`` or ``[B]``).
        loss_type: the per-sample loss.
        scale: ``[B]`` the capture's factors ``s_i`` (0: no target; left out).
        on_result: called with ``(c, r)`` during the backward, before any monitored projection's
            gradient; ``(nan, nan)`` when the step cannot be judged (the module ran twice with
            gradients).
        chunk_bytes: fp32 logits per chunk of the assumed gradient.
    """

    def __init__(
        self,
        module: nn.Module,
        labels: torch.Tensor,
        loss_type: LossType,
        scale: torch.Tensor,
        on_result: Callable[[float, float], None],
        chunk_bytes: int = 32 * 2**20,
    ) -> None:
        self.labels, self.loss_type, self.on_result = labels, loss_type, on_result
        self.scale, self.chunk_bytes = scale, chunk_bytes
        self.calls = 0
        self._logits: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._forward)

    def remove(self) -> None:
        self._handle.remove()

    def _forward(self, module: nn.Module, inputs, output) -> None:
        logits = getattr(output, "logits", output)
        if not torch.is_tensor(logits) or not logits.requires_grad:
            return  # e.g. a teacher forward under no_grad
        self.calls += 1
        if self.calls == 1 and logits.dim() >= 2 and logits.shape[0] == self.labels.shape[0]:
            self._logits = logits.detach()
            logits.register_hook(self._backward)

    def _backward(self, grad: torch.Tensor) -> None:
        logits, self._logits = self._logits, None
        if self.calls > 1 or logits is None:
            self.on_result(math.nan, math.nan)
            return
        s = self.scale.to(logits.device).double()
        weight = torch.where(s > 0, 1.0 / s.clamp_min(1e-30), torch.zeros_like(s)).float()  # [B]
        labels = self.labels.to(logits.device)
        step = max(1, self.chunk_bytes // max(logits[0].numel() * 4, 1))
        ga = aa = gg = 0.0
        with torch.enable_grad(), torch.autocast(device_type=logits.device.type, enabled=False):
            for start in range(0, logits.shape[0], step):
                end = min(start + step, logits.shape[0])
                z = logits[start:end].float().requires_grad_()  # [b, T, V] or [b, C]
                losses, _ = per_sample_loss(z, labels[start:end], self.loss_type)  # [b]
                (a,) = torch.autograd.grad((losses * weight[start:end]).sum(), z)
                g = grad[start:end].float()
                ga += float((g.double() * a.double()).sum())
                aa += float(a.double().square().sum())
                gg += float(g.double().square().sum())
        self.on_result(*_factor(ga, aa, gg))


class CapturedSum:
    """A :class:`~fisher_callbacks.capture.GradientSink` in front of another that also sums each
    parameter's captured per-sample gradients back into the batch gradient the hooks saw.

    ``weight`` ``[n]`` turns a captured gradient ``g_i`` back into sample ``i``'s share of the
    training gradient (``1 / s_i``; 0 for a sample without target). Without a loss term that
    bypasses the projections' outputs, ``sum_i weight_i g_i`` IS the weight's ``.grad`` from this
    backward; :meth:`residual` measures how far it is (one dot product per parameter).

    Args:
        sink: the sink the gradients go on to.
        weight: ``[n]`` per captured sample.
    """

    def __init__(self, sink, weight: torch.Tensor) -> None:
        self.sink, self.weight = sink, weight.float()
        self.sums: dict[str, torch.Tensor] = {}

    def head_major(self, name: str):
        return self.sink.head_major(name)

    def __call__(self, name: str, grad: torch.Tensor, start: int) -> None:
        m = grad.shape[0]
        w = self.weight[start : start + m].to(grad.device, grad.dtype).view(-1, *[1] * (grad.dim() - 1))
        part = (grad * w).sum(0)  # [*row shape]
        self.sums[name] = part if name not in self.sums else self.sums[name] + part
        self.sink(name, grad, start)

    def residual(self, grads: dict[str, torch.Tensor]) -> tuple[float, float]:
        """:func:`loss_factor` of ``grads`` (``{name: .grad}``) against the captured sums, over
        every parameter present in both: ``(~1, r)``, ``r`` the share of ``.grad`` that did not
        pass through the hooks."""
        ga = aa = gg = 0.0
        for name, s in self.sums.items():
            g = grads.get(name)
            if g is None:
                continue
            layout = self.head_major(name)
            s = (layout.to_natural(s) if layout is not None else s).double()  # [*param shape]
            g = g.detach().double()
            ga, aa, gg = ga + float((g * s).sum()), aa + float(s.square().sum()), gg + float(g.square().sum())
        return _factor(ga, aa, gg)

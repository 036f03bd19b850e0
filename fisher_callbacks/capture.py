"""Per-sample gradients of the Q/K/V/O projections from ONE batched forward/backward.

For a projection ``y = x W^T`` (``nn.Linear``, weight ``[out, in]``) or ``y = x W`` (transformers
``Conv1D``, weight ``[in, out]``) applied to ``x: [B, T, in]``, sample b's share of the weight
gradient is ``sum_t grad_y[b, t]^T x[b, t]``: one ``bmm`` over the batch from the activations the
forward hook saw and the output gradient a tensor hook sees. Its cost equals the weight-gradient
matmul autograd does anyway, so a flagged step costs about ``1 + (attention weight-grad FLOPs /
step FLOPs)`` (~1.1x), instead of the ~B forward/backward passes of a micro-batch-1 loop.

Scaling convention: what the hooks see is sample b's share of the gradient of whatever loss was
backpropagated. :func:`fisher_callbacks.losses.reduction_scale` gives the per-sample factors that
turn the share of a training loss (token mean, sample mean, sum; AMP loss scale; gradient
accumulation) into ``grad l_b``, the gradient of sample b's own mean loss; :meth:`arm` takes them.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch
from torch import nn

from .engine.sharding import gradient_sums, is_dtensor, parameters
from .layouts import AttentionLayout
from .losses import (
    LossType,
    forward_logits,
    infer_loss_type,
    is_squared_error,
    per_sample_loss,
    sample_true_labels,
)
from .store import HeadMajor


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


class GradientSink(Protocol):
    """Where the hooks hand each projection's per-sample gradients, as soon as they exist.

    ``sink(name, grad, start)`` gets ``grad``: ``[m, ...]`` fp32 of parameter ``name`` for the
    captured samples ``start .. start + m - 1`` (scaled as :meth:`PerSampleGradientCapture.arm`
    says), laid out as ``sink.head_major(name)`` asks: natural ``[m, *shape]`` for ``None``, else
    ``[m, A, C]`` (:class:`~fisher_callbacks.store.HeadMajor`). The tensor is not kept by the
    capture: a sink that needs it later must copy it.
    """

    def head_major(self, name: str) -> HeadMajor | None: ...

    def __call__(self, name: str, grad: torch.Tensor, start: int) -> None: ...


class _Buffer:
    """The default sink: whole-batch gradients kept for :meth:`PerSampleGradientCapture.pop`."""

    def __init__(self, buffers: dict[str, torch.Tensor]) -> None:
        self.buffers = buffers

    def head_major(self, name: str) -> None:
        return None

    def __call__(self, name: str, grad: torch.Tensor, start: int) -> None:
        # several backwards in one armed window add up, as ``.grad`` does
        self.buffers[name] = self.buffers[name] + grad if name in self.buffers else grad


def _weight_grads(
    module: nn.Module, x3: torch.Tensor, g3: torch.Tensor, layout: HeadMajor | None, start: int, end: int
) -> torch.Tensor:
    """Per-sample weight gradients of samples ``start:end`` from activations ``x3`` ``[B, T, in]``
    and output gradients ``g3`` ``[B, T, out]``: natural ``[m, *weight.shape]``, or ``[m, A, C]``
    in ``layout``, made by gathering the factor that carries the head axis (never the product)."""
    x, g = x3[start:end], g3[start:end]
    conv = _is_conv1d(module)
    if layout is None:
        return torch.bmm(x.transpose(1, 2), g) if conv else torch.bmm(g.transpose(1, 2), x)
    heads_on_out = (layout.axis == 1) if conv else (layout.axis == 0)
    index = layout.index.to(x.device)
    if heads_on_out:
        return torch.bmm(g.index_select(-1, index).transpose(1, 2), x)  # [m, A, in]
    return torch.bmm(x.index_select(-1, index).transpose(1, 2), g)  # [m, A, out]


# ---------------------------------------------------------------------- torch.compile path
# Under torch.compile, dynamo inlines module forward hooks, and a tensor hook registered inside the
# compiled region must be a pure function of tensors (it is traced into the graph): ours stores
# per-sample gradients on a Python object, which dynamo rejects with a graph break at every
# projection. While compiling, the forward hook therefore routes the projection output through
# two opaque custom ops instead: ``tap`` (identity in the forward, saves the activation) whose
# backward calls ``deliver`` (identity on the output gradient that hands it, with the
# activation, to the capture in eager Python at run time). The math is the same ``_grad_hook``.
_LIVE: weakref.WeakValueDictionary[int, PerSampleGradientCapture] = weakref.WeakValueDictionary()
_IDS = itertools.count()


@torch.library.custom_op("fisher_callbacks::tap", mutates_args=())
def _tap(output: torch.Tensor, x: torch.Tensor, capture_id: int, slot: int) -> torch.Tensor:
    """Identity on ``output`` (a copy: custom ops may not alias inputs); ``x`` is saved."""
    capture = _LIVE.get(capture_id)
    if capture is not None:
        capture._count_use(capture._slots[slot])
    return output.clone()


@_tap.register_fake
def _tap_fake(output: torch.Tensor, x: torch.Tensor, capture_id: int, slot: int) -> torch.Tensor:
    return torch.empty_like(output)


@torch.library.custom_op("fisher_callbacks::deliver", mutates_args=())
def _deliver(grad: torch.Tensor, x: torch.Tensor, capture_id: int, slot: int) -> torch.Tensor:
    """Hand ``(x, grad)`` of projection ``slot`` to capture ``capture_id``; identity on ``grad``."""
    capture = _LIVE.get(capture_id)
    if capture is not None:
        capture._deliver(slot, x, grad)
    return grad.clone()


@_deliver.register_fake
def _deliver_fake(grad: torch.Tensor, x: torch.Tensor, capture_id: int, slot: int) -> torch.Tensor:
    return torch.empty_like(grad)


def _tap_setup_context(ctx, inputs, output) -> None:
    _, x, capture_id, slot = inputs
    ctx.save_for_backward(x)
    ctx.capture_id, ctx.slot = capture_id, slot


def _tap_backward(ctx, grad: torch.Tensor):
    (x,) = ctx.saved_tensors
    return _deliver(grad, x, ctx.capture_id, ctx.slot), None, None, None


_tap.register_autograd(_tap_backward, setup_context=_tap_setup_context)


class PerSampleGradientCapture:
    """Forward/backward hooks on the monitored projection modules.

    Attach once (``attach``), then ``arm`` before a forward whose backward should be captured and
    ``pop`` after the backward. While disarmed the hooks return at once. Hooks only act on forwards
    that build a graph (``output.requires_grad``), so validation passes under ``no_grad`` are free.

    Args:
        model: the module whose parameters the layout names.
        layout: the attention layout; its ``monitored_parameters()`` are captured.

    Example:
        >>> capture = PerSampleGradientCapture(model, layout).attach()
        >>> capture.arm(scale=reduction_scale(batch["labels"], "causal_lm"))
        >>> loss = model(**batch).loss; loss.backward()
        >>> grads = capture.pop()   # {name: [B, *param.shape]} fp32, grad of each sample's loss
    """

    def __init__(self, model: nn.Module, layout: AttentionLayout) -> None:
        self.model = model
        self.layout = layout
        self.param_names = layout.monitored_parameters()
        modules = dict(model.named_modules())
        params = dict(model.named_parameters())
        # module name -> {"weight": param name or None, "bias": param name or None}
        self._targets: dict[str, dict[str, str | None]] = {}
        for name in self.param_names:
            mod_name, _, kind = name.rpartition(".")
            if mod_name not in modules or name not in params:
                raise ValueError(f"{name} is not a parameter of {type(model).__name__}")
            module = modules[mod_name]
            if not (isinstance(module, nn.Linear) or _is_conv1d(module)):
                raise TypeError(
                    f"per-sample capture supports nn.Linear and transformers Conv1D, "
                    f"not {type(module).__name__} ({mod_name})"
                )
            self._targets.setdefault(mod_name, {"weight": None, "bias": None})[kind] = name
        self._modules = {n: modules[n] for n in self._targets}
        self._slots = list(self._modules)  # slot k of the compile path -> module name
        self._id = next(_IDS)
        _LIVE[self._id] = self
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._armed = False
        self._samples: torch.Tensor | None = None
        self._scale: torch.Tensor | None = None
        self._buffers: dict[str, torch.Tensor] = {}
        self._sink: GradientSink = _Buffer(self._buffers)
        self.chunk: int | None = None
        self._uses: dict[str, int] = {}  # forward uses of each module in the armed forward
        self._flush_queued = False
        self._shared: dict[str, torch.Tensor] = {}  # modules used twice: summed before the sink
        self.batch_size: int | None = None
        # 0-d running sum of every captured factor (activation / output gradient): finite only if
        # they all are; read on the host once, by :attr:`nonfinite`, not in each hook (a host
        # sync per projection, and a graph break per projection under ``torch.compile``).
        self._finite: torch.Tensor | None = None
        # the last input a forward hook selected rows of (weakly: it never outlives the forward)
        self._last_src: weakref.ref[torch.Tensor] | None = None
        self._last_version = -1
        self._last_x: torch.Tensor | None = None
        # the first error a hook raised since :meth:`arm`: the hooks never raise into the model's
        # forward or backward (a failed capture must not fail the training step)
        self.error: Exception | None = None

    # ------------------------------------------------------------------ lifecycle
    def attach(self) -> PerSampleGradientCapture:
        """Register the forward hooks (idempotent)."""
        if not self._handles:
            for mod_name, module in self._modules.items():
                hook = partial(self._forward_hook, mod_name)
                self._handles.append(module.register_forward_hook(hook))
        return self

    def remove(self) -> None:
        """Remove every hook and drop buffers."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.disarm()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def armed(self) -> bool:
        return self._armed

    @property
    def nonfinite(self) -> bool:
        """Whether a captured factor (activation or output gradient) of the current capture was
        inf or NaN (AMP overflow). One host sync; False before any backward reached the hooks."""
        return self._finite is not None and not bool(torch.isfinite(self._finite))

    def arm(
        self,
        samples: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        sink: GradientSink | None = None,
        chunk: int | None = None,
    ) -> None:
        """Capture the next backward(s).

        Args:
            samples: batch indices to capture (``[k]`` long), e.g. a random subset for a cheap EMA
                update; ``None`` captures every sample.
            scale: ``[k]`` per-sample factors of the captured samples (see
                :func:`fisher_callbacks.losses.reduction_scale`: they turn a sample's share of the
                training loss's gradient into the gradient of its own loss), applied to the small
                output gradients inside the hooks rather than to the large results.
            sink: where each projection's per-sample gradients go, inside its hook (see
                :class:`GradientSink`); default: kept for :meth:`pop`.
            chunk: with a ``sink``, samples per call (``None``: all at once). The hooks then hold
                one projection x ``chunk`` samples at a time, never ``[B, all weights]``.
        """
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self._reset()
        self.error = None
        self._samples = None if samples is None else samples.long()
        self._scale = None if scale is None else scale.float()
        self._sink = sink if sink is not None else _Buffer(self._buffers)
        self.chunk = chunk if sink is not None else None
        self._armed = True

    def rescale(self, factor: float) -> None:
        """Multiply the armed per-sample factors by ``factor`` (from the next hook on: a caller
        that learns during the backward that the loss was weighted corrects it before the
        monitored projections' gradients arrive)."""
        if self._scale is not None:
            self._scale = self._scale * factor

    def disarm(self) -> None:
        self._armed = False
        self._samples = None
        self._scale = None
        self._reset()

    def _reset(self) -> None:
        self._buffers.clear()
        self._sink = _Buffer(self._buffers)
        self._uses.clear()
        self._flush_queued = False
        self._shared.clear()
        self.batch_size = None
        self._finite = None
        self._forget_input()

    def _forget_input(self) -> None:
        self._last_src = self._last_x = None
        self._last_version = -1

    @contextlib.contextmanager
    def capturing(
        self,
        samples: torch.Tensor | None = None,
        sink: GradientSink | None = None,
        chunk: int | None = None,
    ) -> Iterator[PerSampleGradientCapture]:
        """Attach (if needed) and arm (see :meth:`arm`) for the block; hooks attached here are
        removed on exit, also when the block raises."""
        was_attached = self.attached
        self.attach()
        self.arm(samples, sink=sink, chunk=chunk)
        try:
            yield self
        finally:
            error, self.error = self.error, None
            self._armed = False
            self._forget_input()
            if not was_attached:
                for handle in self._handles:
                    handle.remove()
                self._handles.clear()
        if error is not None:  # a hook failed inside the block: the caller's error
            raise error

    # ------------------------------------------------------------------ hooks
    def _contained(self, hook: Callable[..., None], *args: Any) -> None:
        """Run ``hook``; an error it raises is kept in :attr:`error` and disarms the capture
        instead of reaching the model's forward or backward (the gradients are left as they
        are). :meth:`capturing` raises it when its block ends; the Fisher engine's training
        step reads it after the backward (capture stops for the fit, one warning)."""
        if self.error is not None:
            return
        try:
            hook(*args)
        except Exception as err:
            self.error = err
            self._armed = False

    def _forward_hook(self, mod_name: str, module: nn.Module, inputs, output) -> torch.Tensor | None:
        if not self._armed or not torch.is_tensor(output) or not output.requires_grad:
            return
        src = inputs[0]
        if self.batch_size is None:
            self.batch_size = src.shape[0]
        if torch.compiler.is_compiling():  # see "torch.compile path" above (``_tap`` counts the use)
            return _tap(output, self._captured_rows(src), self._id, self._slots.index(mod_name))
        self._contained(self._eager_forward, mod_name, module, src, output)
        return None

    def _eager_forward(
        self, mod_name: str, module: nn.Module, src: torch.Tensor, output: torch.Tensor
    ) -> None:
        # Projections reading one input (Q, K and V of most models) share its selected rows and
        # its finiteness check: one gather and one sum per input, not per projection.
        last = self._last_src() if self._last_src is not None else None
        if last is src and src._version == self._last_version:
            x = self._last_x
        else:
            x = self._captured_rows(src)
            self._last_src, self._last_version, self._last_x = weakref.ref(src), src._version, x
            self._add_finite(x.sum(dtype=torch.float32))
        self._count_use(mod_name)
        output.register_hook(partial(self._contained, self._grad_hook, mod_name, module, x, False))

    def _captured_rows(self, src: torch.Tensor) -> torch.Tensor:
        """The captured samples' rows of a projection's input (detached)."""
        x = src.detach()
        return x if self._samples is None else x.index_select(0, self._samples.to(x.device))

    def _add_finite(self, total: torch.Tensor) -> None:
        """Fold a factor's fp32 sum into the step's check: a sum is finite only if every term is
        (an inf or a NaN anywhere makes it inf or NaN). Kept on the device (no sync here);
        :attr:`nonfinite` reads it once."""
        self._finite = total if self._finite is None else self._finite + total

    def _count_use(self, mod_name: str) -> None:
        if self._armed:
            self._uses[mod_name] = self._uses.get(mod_name, 0) + 1

    def _deliver(self, slot: int, x: torch.Tensor, grad: torch.Tensor) -> None:
        """Output gradient of projection ``slot`` from the compiled path (run time, eager)."""
        if self._armed:
            mod_name = self._slots[slot]
            self._contained(self._grad_hook, mod_name, self._modules[mod_name], x, True, grad)

    def _grad_hook(
        self, mod_name: str, module: nn.Module, x: torch.Tensor, check_x: bool, grad: torch.Tensor
    ) -> None:
        """Per-sample gradients of one projection from its activation ``x`` (the captured rows)
        and its output gradient; ``check_x``: ``x`` is not yet in the finiteness check."""
        go = grad.detach()
        if self._samples is not None:
            go = go.index_select(0, self._samples.to(go.device))
        b = x.shape[0]
        # A module used twice in one forward (weight sharing, R-drop) gets the sum of its uses:
        # its per-sample gradients are summed here and reach the sink when the backward ends (a
        # use whose output gets no gradient, e.g. DoRA's detached weight norm, never calls back).
        shared = self._uses.get(mod_name, 1) > 1
        if shared and not self._flush_queued:
            self._flush_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(
                partial(self._contained, self._flush_shared)
            )
        device = go.device.type
        # fp32 products even when the backward runs under autocast (no context otherwise: the
        # hook runs once per projection and step)
        plain = not torch.is_autocast_enabled(device)
        with contextlib.nullcontext() if plain else torch.autocast(device_type=device, enabled=False):
            x3 = x.reshape(b, -1, x.shape[-1]).float()  # [B, T, in]
            g3 = go.reshape(b, -1, go.shape[-1]).float()  # [B, T, out]
            # Cheap on the small factors: finite factors give finite per-sample gradients.
            self._add_finite(g3.sum() + x3.sum() if check_x else g3.sum())
            if self._scale is not None:
                if self._scale.numel() != b:
                    raise ValueError(
                        f"{mod_name} ran on {b} captured samples where {self._scale.numel()} were "
                        "armed: a second forward on another batch in one training step? Per-sample "
                        "capture needs one batch per forward and backward"
                    )
                g3 = g3 * self._scale.to(g3.device).view(-1, 1, 1)
            target = self._targets[mod_name]
            parts = []
            if target["weight"] is not None:
                name = target["weight"]
                layout = None if shared else self._sink.head_major(name)
                parts.append((name, partial(_weight_grads, module, x3, g3, layout)))
            if target["bias"] is not None:
                parts.append((target["bias"], lambda s, e: g3[s:e].sum(1)))  # [m, out]
            step = b if shared or self.chunk is None else self.chunk
            for name, grads_of in parts:
                if shared:
                    g = grads_of(0, b)
                    self._shared[name] = g if name not in self._shared else self._shared[name] + g
                    continue
                for start in range(0, b, step):
                    self._sink(name, grads_of(start, min(start + step, b)), start)

    def _flush_shared(self) -> None:
        """End of a backward: hand the summed gradients of shared modules to the sink."""
        self._flush_queued = False
        for name in list(self._shared):
            g = self._shared.pop(name)
            layout = self._sink.head_major(name)
            if layout is not None:
                g = layout.from_natural(g)
            step = g.shape[0] if self.chunk is None else self.chunk
            for start in range(0, g.shape[0], step):
                self._sink(name, g[start : start + step], start)

    # ------------------------------------------------------------------ results
    def pop(self) -> dict[str, torch.Tensor]:
        """Per-sample gradients of the captured backward(s), and disarm.

        They are scaled by the factors given to :meth:`arm` (applied inside the hooks).

        Returns:
            ``{param name: [B', *param.shape]}`` fp32, in the layout's parameter order; empty when
            no backward reached the hooks.
        """
        out: dict[str, torch.Tensor] = {}
        for name in self.param_names:
            if name not in self._buffers:
                continue
            out[name] = self._buffers[name]
        missing = [n for n in self.param_names if n not in self._buffers]
        if out and missing:
            warnings.warn(
                f"no gradient reached {len(missing)} monitored parameter(s) "
                f"(e.g. {missing[0]}); they are zero for this batch",
                stacklevel=2,
            )
            n = next(iter(out.values())).shape[0]
            params = dict(self.model.named_parameters())
            for name in missing:
                out[name] = torch.zeros(n, *params[name].shape, device=params[name].device)
            out = {n_: out[n_] for n_ in self.param_names}
        self.disarm()
        return out


def per_sample_gradients(
    model: nn.Module,
    batch: dict,
    layout: AttentionLayout | None = None,
    *,
    loss_type: LossType | None = None,
    fisher_type: str = "empirical",
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Exact per-sample gradients of every monitored Q/K/V/O weight, in one batched pass.

    ``g_i = grad l_i`` where ``l_i`` is sample i's own mean loss (see :mod:`fisher_callbacks.losses`):
    identical to running sample i alone (micro-batch 1) in the model's current mode. ``.grad`` is
    as before (set aside during the backward and put back), the train/eval mode is not changed,
    and the hooks are removed even if the forward raises.

    Args:
        model: a Hugging Face model or a module wrapping one.
        batch: ``input_ids`` (and ``attention_mask`` etc.) plus ``labels``.
        layout: defaults to ``AttentionLayout.from_model(model)``.
        loss_type: ``"causal_lm"``, ``"masked_lm"`` or ``"sequence_classification"`` (inferred).
        fisher_type: ``"empirical"`` (the batch labels) or ``"true"`` (labels sampled from the
            model's predictive distribution with ``generator``).

    Returns:
        ``{param name: [B, *param.shape]}`` fp32.
    """
    return probe_pass(
        model, batch, layout, loss_type=loss_type, fisher_type=fisher_type, generator=generator
    ).grads


@dataclass
class ProbeResult:
    """What one batched probe pass yields.

    Attributes:
        grads: ``{name: [B, *shape]}`` fp32 per-sample gradients of the monitored weights.
        losses: ``[B]`` each sample's own mean loss (detached, under the batch labels even for the
            true Fisher).
        counts: ``[B]`` target tokens per sample.
        summed: ``{name: grad of sum_i l_i}`` for the ``sum_params`` asked for (empty otherwise).
        log_loss: the losses are cross-entropies (``False``: squared errors of a regression head).
    """

    grads: dict[str, torch.Tensor]
    losses: torch.Tensor
    counts: torch.Tensor
    summed: dict[str, torch.Tensor] = field(default_factory=dict)
    log_loss: bool = True


def probe_pass(
    model: nn.Module,
    batch: dict,
    layout: AttentionLayout | None = None,
    *,
    loss_type: LossType | None = None,
    fisher_type: str = "empirical",
    generator: torch.Generator | None = None,
    sum_params: dict[str, torch.Tensor] | None = None,
    forward_model: nn.Module | None = None,
    capture: PerSampleGradientCapture | None = None,
    sink: GradientSink | None = None,
    chunk: int | None = None,
    sum_into: dict[str, torch.Tensor] | None = None,
    sum_dtype: torch.dtype | None = None,
) -> ProbeResult:
    """One forward and one backward: per-sample gradients of the monitored
    weights (hooks), per-sample losses, and optionally the summed gradient of other parameters.

    See :func:`per_sample_gradients` for the guarantees (``.grad`` and mode untouched, hooks
    removed on error). ``sum_params`` (``{name: parameter}``) get ``grad sum_i l_i`` in ``summed``,
    e.g. every trainable parameter for a first-order forgetting prediction, added into
    ``sum_into`` when given (a running sum over batches, grown in place one parameter at a time:
    :func:`summed_backward`; in ``sum_dtype`` when given). ``forward_model``
    (default ``model``) is the submodule to call, e.g. the Hugging Face model inside a
    LightningModule that defines no ``forward``; names stay relative to ``model``. ``capture``
    reuses an attached capture of ``model`` and ``layout`` (under ``torch.compile`` it must be the
    one whose hooks the compiled graph holds; a new one is attached and removed otherwise). Without
    a ``layout``, frozen attention weights (e.g. the base weights of a LoRA model) are left out with
    a warning. With a ``sink`` (and ``chunk``, see :meth:`PerSampleGradientCapture.arm`) the
    per-sample gradients go to the sink inside the hooks and ``grads`` is empty.
    """
    if fisher_type not in ("empirical", "true"):
        raise ValueError(f"fisher_type must be 'empirical' or 'true', got {fisher_type!r}")
    if "labels" not in batch:
        raise ValueError("the batch has no 'labels': per-sample gradients need targets")
    labels = batch["labels"]
    if labels.shape[0] == 0:
        raise ValueError("the batch is empty")
    if capture is not None:
        layout = capture.layout
    layout = layout or AttentionLayout.from_model(model, trainable_only=True)
    forward_model = forward_model if forward_model is not None else model
    loss_type = loss_type or infer_loss_type(forward_model)
    capture = capture or PerSampleGradientCapture(model, layout)
    params = parameters(model)  # FSDP2: the sharded parameters, also after a forward
    weights = [params[n] for n in capture.param_names]
    frozen = [n for n, w in zip(capture.param_names, weights) if not w.requires_grad]
    if frozen:
        raise ValueError(
            f"{len(frozen)} monitored attention weight(s) are frozen (requires_grad=False), e.g. "
            f"{frozen[0]!r}; unfreeze them, or leave them out with "
            "layout.trainable_only(model) / AttentionLayout.from_model(model, trainable_only=True)"
        )
    extra = {n: p for n, p in (sum_params or {}).items() if p.requires_grad}
    with capture.capturing(sink=sink, chunk=chunk), torch.enable_grad():
        logits = forward_logits(forward_model, batch)
        losses, counts = per_sample_loss(logits, labels, loss_type)
        if fisher_type == "true":
            sampled = sample_true_labels(logits, labels, loss_type, generator)
            objective, _ = per_sample_loss(logits, sampled, loss_type)
        else:
            objective = losses
        summed: dict[str, torch.Tensor] = {} if sum_into is None else sum_into
        summed_backward(objective.sum(), model, extra, summed, sum_dtype, reach=weights)
        log_loss = not is_squared_error(logits, labels, loss_type)
        return ProbeResult(capture.pop(), losses.detach(), counts, summed, log_loss)


def add_sums(
    total: dict[str, torch.Tensor],
    grads: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype | None = None,
) -> None:
    """Add ``(name, gradient)`` pairs into the running sums ``total`` in place: one sum per
    name, never two; the first gradient of a name is taken without a copy when it is a fresh
    dense tensor (what autograd leaves), converted to ``dtype`` when one is given."""
    for name, g in grads:
        if name in total:
            total[name].add_(g)
        elif dtype is not None and g.dtype != dtype:
            total[name] = g.to(dtype)
        else:
            total[name] = g if g._base is None and g.is_contiguous() else g.clone()


def summed_backward(
    loss: torch.Tensor,
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    total: dict[str, torch.Tensor],
    dtype: torch.dtype | None = None,
    reach: Sequence[torch.Tensor] = (),
) -> None:
    """``loss.backward()`` over ``reach`` and ``params`` only, adding the gradient of each of
    ``params`` into ``total[name]`` (in place; the first one taken without a copy; in ``dtype``
    when given, e.g. ``torch.bfloat16`` for a reader that keeps it so) the moment
    autograd accumulates it, and dropping it there: beyond ``total`` at most the gradients
    autograd has in flight are held, never a second copy of every parameter's (what
    ``torch.autograd.grad`` over all of them returns at once). ``reach`` (e.g. the monitored
    weights, whose backward hooks capture per-sample gradients) get no sum. A parameter the loss
    does not reach gets zeros. The ``.grad`` of every parameter is as before (the training's
    gradients are set aside and put back, the same tensors).

    Under FSDP2 (``model``'s parameters are ``DTensor`` s) a full backward of ``model`` runs
    instead, a collective every rank must run (also for an empty sum), and each sum is this rank's
    block of the sum over the ranks (:func:`~fisher_callbacks.engine.sharding.gradient_sums`).
    """
    if any(is_dtensor(p) for p in [*reach, *params.values()]):
        add_sums(total, gradient_sums(model, loss, params).items(), dtype)
        return
    wanted = {id(p): name for name, p in params.items() if p.requires_grad}
    inputs = list({id(p): p for p in [*reach, *params.values()] if p.requires_grad}.values())

    def fold(p: torch.Tensor) -> None:
        name = wanted.get(id(p))
        if name is not None:
            add_sums(total, [(name, p.grad)], dtype)
        p.grad = None

    saved = [(p, p.grad) for p in inputs]
    handles = []
    try:
        for p in inputs:
            p.grad = None
            handles.append(p.register_post_accumulate_grad_hook(fold))
        loss.backward(inputs=inputs)
    finally:
        for h in handles:
            h.remove()
        for p, g in saved:
            p.grad = g
    for name, p in params.items():
        if name not in total:
            total[name] = torch.zeros_like(p, dtype=dtype)

"""Where each attention head lives inside the Q/K/V/O projection weights.

An :class:`AttentionLayout` maps ``(layer, head, block)`` to the entries of a parameter tensor, for
every architecture family registered with :func:`register_layout`. The map is stored as an index
tensor per block (``[H_block, head_dim]`` positions along one axis of the weight), which covers
separate projections, fused QKV (GPT-2), per-head interleaved QKV (GPT-NeoX) and grouped layouts
(Falcon's new decoder architecture) with one code path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

BLOCKS: tuple[str, ...] = ("Q", "K", "V", "O")

LayoutBuilder = Callable[[nn.Module], "AttentionLayout"]
_REGISTRY: dict[str, LayoutBuilder] = {}


class LayoutError(ValueError):
    """The attention of a model cannot be mapped to Q/K/V/O heads."""


@dataclass(frozen=True, eq=False)
class BlockSpec:
    """Where the heads of one block (Q, K, V or O) of one layer live.

    Attributes:
        param: weight name, as in ``model.named_parameters()``.
        axis: axis of the weight along which heads are laid out (Linear ``[out, in]``: 0 for Q/K/V,
            1 for O; transformers ``Conv1D`` ``[in, out]``: 1 for Q/K/V, 0 for O).
        index: ``[H_block, head_dim]`` long tensor, positions of each head's rows/columns along ``axis``.
        bias: bias name of Q/K/V projections (``None`` for O, whose bias is not per head, or no bias).
    """

    param: str
    axis: int
    index: torch.Tensor
    bias: str | None = None

    @property
    def num_heads(self) -> int:
        return self.index.shape[0]

    @property
    def contiguous(self) -> bool:
        """True when head h occupies ``index[h, 0] : index[h, 0] + head_dim`` (a ``narrow`` suffices)."""
        d = self.index.shape[1]
        return bool((self.index - self.index[:, :1] == torch.arange(d)).all())


def _prefixed(spec: BlockSpec, prefix: str) -> BlockSpec:
    if not prefix:
        return spec
    return BlockSpec(
        param=f"{prefix}.{spec.param}",
        axis=spec.axis,
        index=spec.index,
        bias=f"{prefix}.{spec.bias}" if spec.bias else None,
    )


@dataclass(eq=False)
class AttentionLayout:
    """Q/K/V/O head map of a transformer.

    Build it with :meth:`from_model`; the seeds' name :data:`QKOVConfig` is an alias.

    Attributes:
        layers: per layer, ``{"Q": BlockSpec, "K": ..., "V": ..., "O": ...}``.
        num_heads: query heads per layer (Q and O blocks have this many heads).
        num_kv_heads: key/value heads per layer (K and V blocks; ``< num_heads`` under GQA/MQA).
        head_dim: entries per head along the head axis.
        param_shapes: shape of every weight (and bias) the layout names.
        model_type: the registered layout that built this map.
        include_bias: whether Q/K/V biases are monitored too.
    """

    layers: list[dict[str, BlockSpec]]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    param_shapes: dict[str, torch.Size]
    model_type: str = "custom"
    include_bias: bool = False
    blocks: tuple[str, ...] = field(default=BLOCKS, init=False)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise LayoutError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        for layer, specs in enumerate(self.layers):
            missing = set(BLOCKS) - set(specs)
            if missing:
                raise LayoutError(f"layer {layer} has no block(s) {sorted(missing)}")
            for block, spec in specs.items():
                want = self.heads_in_block(block)
                if spec.index.shape != (want, self.head_dim):
                    raise LayoutError(
                        f"layer {layer} block {block}: index shape {tuple(spec.index.shape)}, "
                        f"expected ({want}, {self.head_dim})"
                    )
                shape = self.param_shapes[spec.param]
                if int(spec.index.max()) >= shape[spec.axis]:
                    raise LayoutError(
                        f"layer {layer} block {block}: head index exceeds {spec.param} "
                        f"axis {spec.axis} of size {shape[spec.axis]}"
                    )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(
        cls, model: nn.Module, model_type: str | None = None, include_bias: bool = False
    ) -> AttentionLayout:
        """Map the attention of ``model`` (or of the first registered submodule inside it).

        ``model`` may be a Hugging Face model or anything that wraps one (a LightningModule): the
        first module, in ``named_modules()`` order, whose ``config.model_type`` (or ``model_type``
        attribute, or the explicit ``model_type`` argument for the root) has a registered layout is
        mapped, and the parameter names are given relative to ``model``.

        Raises:
            LayoutError: no module has a registered layout; the message names the model type(s)
                seen, the registered layouts and how to register one.
        """
        seen: list[str] = []
        for prefix, module in model.named_modules():
            mtype = model_type if (prefix == "" and model_type) else _model_type_of(module)
            if mtype is None:
                continue
            seen.append(mtype)
            builder = _REGISTRY.get(mtype)
            if builder is None:
                continue
            layout = builder(module)
            layout.model_type = mtype
            if prefix:
                layout = layout._with_prefix(prefix)
            if include_bias:
                layout = layout._with_bias()
            return layout
        kinds = ", ".join(sorted(set(seen))) or f"none (root class {type(model).__name__})"
        raise LayoutError(
            f"Cannot map the attention of {type(model).__name__}: model type(s) found: {kinds}. "
            f"Registered layouts: {', '.join(registered_layouts())}. To map a custom model, "
            "register a builder that returns an AttentionLayout, e.g. "
            "`fisher_callbacks.register_layout('my_model_type', build)` where build(model) uses "
            "`AttentionLayout.from_projections(...)`, then give the model a `model_type` attribute "
            "(or `config.model_type`) or pass `AttentionLayout.from_model(model, model_type=...)`."
        )

    @classmethod
    def from_projections(
        cls,
        model: nn.Module,
        layers: Sequence[Mapping[str, str]],
        num_heads: int,
        num_kv_heads: int | None = None,
        fused: str | None = None,
    ) -> AttentionLayout:
        """Build a layout from module names of the Q/K/V/O projections of each layer.

        Covers the common cases; use :class:`BlockSpec` directly for anything else.

        Args:
            model: the module the names are relative to.
            layers: per layer ``{"Q": module name, "K": ..., "V": ..., "O": ...}`` (``nn.Linear`` or
                transformers ``Conv1D``). With a fused QKV projection give its name for Q, K and V.
            num_heads: query heads.
            num_kv_heads: key/value heads (GQA/MQA); defaults to ``num_heads``.
            fused: layout of a fused QKV projection: ``"concat"`` (``[Q | K | V]``, GPT-2, Phi-3,
                Falcon multi-query) or ``"interleaved"`` (per head ``[q, k, v]``, GPT-NeoX);
                ``None`` for separate projections.
        """
        num_kv_heads = num_kv_heads or num_heads
        modules = dict(model.named_modules())
        specs: list[dict[str, BlockSpec]] = []
        head_dim = None
        for names in layers:
            q_mod = _get_module(modules, names["Q"])
            out_axis = _out_axis(q_mod)
            q_out = q_mod.weight.shape[out_axis]
            if fused is None:
                d = q_out // num_heads
            elif fused == "concat":
                d = q_out // (num_heads + 2 * num_kv_heads)
            elif fused == "interleaved":
                d = q_out // (3 * num_heads)
            else:
                raise LayoutError(f"unknown fused layout {fused!r}: 'concat', 'interleaved' or None")
            head_dim = head_dim or d
            if fused is None:
                idx = {
                    "Q": contiguous_heads(num_heads, d),
                    "K": contiguous_heads(num_kv_heads, d),
                    "V": contiguous_heads(num_kv_heads, d),
                }
            elif fused == "concat":
                idx = concat_qkv_heads(num_heads, num_kv_heads, d)
            else:
                idx = interleaved_qkv_heads(num_heads, d)
            layer_specs = {}
            for block in ("Q", "K", "V"):
                mod = _get_module(modules, names[block])
                layer_specs[block] = BlockSpec(
                    param=f"{names[block]}.weight",
                    axis=_out_axis(mod),
                    index=idx[block],
                    bias=f"{names[block]}.bias" if getattr(mod, "bias", None) is not None else None,
                )
            o_mod = _get_module(modules, names["O"])
            layer_specs["O"] = BlockSpec(
                param=f"{names['O']}.weight",
                axis=1 - _out_axis(o_mod),
                index=contiguous_heads(num_heads, d),
            )
            specs.append(layer_specs)
        params = dict(model.named_parameters())
        shapes = {}
        for layer_specs in specs:
            for spec in layer_specs.values():
                for name in (spec.param, spec.bias):
                    if name is not None:
                        shapes[name] = params[name].shape
        return cls(
            layers=specs,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim or 0,
            param_shapes=shapes,
        )

    def _with_prefix(self, prefix: str) -> AttentionLayout:
        shapes = {f"{prefix}.{k}": v for k, v in self.param_shapes.items()}
        layers = [{b: _prefixed(s, prefix) for b, s in specs.items()} for specs in self.layers]
        return AttentionLayout(
            layers, self.num_heads, self.num_kv_heads, self.head_dim, shapes, self.model_type
        )

    def _with_bias(self) -> AttentionLayout:
        layout = AttentionLayout(
            self.layers,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.param_shapes,
            self.model_type,
            include_bias=True,
        )
        return layout

    # ------------------------------------------------------------------ queries
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def kv_group_size(self) -> int:
        """Query heads served by one key/value head."""
        return self.num_heads // self.num_kv_heads

    def heads_in_block(self, block: str) -> int:
        """``num_heads`` for Q and O, ``num_kv_heads`` for K and V."""
        _check_block(block)
        return self.num_kv_heads if block in ("K", "V") else self.num_heads

    def kv_head(self, head: int) -> int:
        """The key/value head that serves query head ``head``."""
        if not 0 <= head < self.num_heads:
            raise IndexError(f"head {head} out of range [0, {self.num_heads})")
        return head // self.kv_group_size

    def block_head(self, head: int, block: str) -> int:
        """Head index within ``block`` for query head ``head`` (the serving KV head for K/V)."""
        return self.kv_head(head) if block in ("K", "V") else head

    def spec(self, layer: int, block: str) -> BlockSpec:
        _check_block(block)
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.num_layers})")
        return self.layers[layer][block]

    def param_names(self, layer: int) -> dict[str, str]:
        """``{"Q": name, "K": name, "V": name, "O": name}`` (a fused QKV gives one name thrice)."""
        return {block: self.spec(layer, block).param for block in BLOCKS}

    def monitored_parameters(self) -> list[str]:
        """Ordered unique names of every monitored weight (and Q/K/V bias if ``include_bias``)."""
        names: dict[str, None] = {}
        for layer in range(self.num_layers):
            for block in BLOCKS:
                spec = self.spec(layer, block)
                names[spec.param] = None
                if self.include_bias and spec.bias is not None:
                    names[spec.bias] = None
        return list(names)

    def block_entries(self, layer: int, block: str) -> Iterator[tuple[str, bool]]:
        """``(name, is_bias)`` of each tensor whose head slices make up ``block`` of ``layer``."""
        spec = self.spec(layer, block)
        yield spec.param, False
        if self.include_bias and spec.bias is not None:
            yield spec.bias, True

    # ------------------------------------------------------------------ slicing
    def _axis_in(self, t: torch.Tensor, spec: BlockSpec, bias: bool) -> tuple[int, str]:
        name = spec.bias if bias else spec.param
        if name is None:
            raise LayoutError(f"{spec.param} has no per-head bias")
        shape = self.param_shapes[name]
        if tuple(t.shape[t.dim() - len(shape) :]) != tuple(shape):
            raise ValueError(
                f"tensor of shape {tuple(t.shape)} does not end with the shape {tuple(shape)} of {name}"
            )
        axis = 0 if bias else spec.axis
        return t.dim() - len(shape) + axis, name

    def head_slice(
        self, t: torch.Tensor, layer: int, head: int, block: str, bias: bool = False
    ) -> torch.Tensor:
        """One head's slice of ``t``.

        Args:
            t: ``[..., *param.shape]``: a weight, gradient, per-sample gradients, contribution,
                Fisher or an index map of the block's parameter (of its bias if ``bias``).
            layer: layer index.
            head: QUERY head index; for K and V the KV head serving it is sliced.
            block: ``"Q"``, ``"K"``, ``"V"`` or ``"O"``.
            bias: slice the Q/K/V bias instead of the weight.

        Returns:
            ``[..., *slice]``: leading dims kept, the head axis cut to ``head_dim`` entries.
        """
        spec = self.spec(layer, block)
        axis, _ = self._axis_in(t, spec, bias)
        rows = spec.index[self.block_head(head, block)]
        if spec.contiguous:
            return t.narrow(axis, int(rows[0]), self.head_dim)
        return t.index_select(axis, rows.to(t.device))

    def head_view(
        self,
        t: torch.Tensor,
        layer: int,
        block: str,
        bias: bool = False,
        order: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """All heads of a block at once, flattened per head.

        Args:
            t: ``[..., *param.shape]`` (see :meth:`head_slice`).
            order: optional ``[H_block, head_dim]`` permutation of each head's rows/columns along
                the head axis (entry ``[h, i]`` picks the head's ``order[h, i]``-th one); the
                sketch store folds slices in a random row order at no extra cost.

        Returns:
            ``[..., H_block, per_head_numel]`` with ``H_block = heads_in_block(block)``; entry
            ``[..., h, :]`` holds exactly the elements of ``head_slice(t, layer, h', block)`` for
            the head(s) h' that map to block head h (same order as ``head_slice(...).flatten``
            over the trailing dims, with the head axis moved first).
        """
        spec = self.spec(layer, block)
        axis, name = self._axis_in(t, spec, bias)
        lead = t.dim() - len(self.param_shapes[name])
        idx = spec.index if order is None else spec.index.gather(1, order.to(spec.index.device))
        sel = t.index_select(axis, idx.reshape(-1).to(t.device))  # [..., *shape with H_block*d on axis]
        sel = sel.movedim(axis, lead)  # [..., H_block*d, *rest]
        h = spec.num_heads
        return sel.reshape(*t.shape[:lead], h, -1)  # [..., H_block, d * prod(rest)]

    def __repr__(self) -> str:
        return (
            f"AttentionLayout(model_type={self.model_type!r}, num_layers={self.num_layers}, "
            f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, include_bias={self.include_bias})"
        )


QKOVConfig = AttentionLayout


# ---------------------------------------------------------------------- index maps
def contiguous_heads(num_heads: int, head_dim: int, offset: int = 0) -> torch.Tensor:
    """``[H, d]``: head h at ``offset + h*d + (0..d-1)``."""
    return offset + torch.arange(num_heads * head_dim).view(num_heads, head_dim)


def concat_qkv_heads(num_heads: int, num_kv_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """Fused ``[Q (H*d) | K (KV*d) | V (KV*d)]`` along the output axis (GPT-2, Phi-3, Falcon MQA)."""
    q = num_heads * head_dim
    kv = num_kv_heads * head_dim
    return {
        "Q": contiguous_heads(num_heads, head_dim),
        "K": contiguous_heads(num_kv_heads, head_dim, q),
        "V": contiguous_heads(num_kv_heads, head_dim, q + kv),
    }


def interleaved_qkv_heads(num_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """Fused per-head ``[H, 3, d]`` along the output axis (GPT-NeoX, Falcon without MQA)."""
    base = (torch.arange(num_heads) * 3 * head_dim)[:, None] + torch.arange(head_dim)  # [H, d]
    return {"Q": base, "K": base + head_dim, "V": base + 2 * head_dim}


def grouped_qkv_heads(num_heads: int, num_kv_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """Fused per-KV-group ``[KV, H/KV + 2, d]`` (Falcon's new decoder architecture).

    Group g holds its ``H/KV`` query heads, then its key head, then its value head.
    """
    per = num_heads // num_kv_heads
    group = (torch.arange(num_kv_heads) * (per + 2) * head_dim)[:, None]  # [KV, 1]
    d = torch.arange(head_dim)
    q = group[:, None, :] + (torch.arange(per) * head_dim)[None, :, None] + d  # [KV, per, d]
    return {
        "Q": q.reshape(num_heads, head_dim),
        "K": group + per * head_dim + d,
        "V": group + (per + 1) * head_dim + d,
    }


# ---------------------------------------------------------------------- registry
def register_layout(
    model_type: str, builder: LayoutBuilder | None = None, *, overwrite: bool = False
) -> LayoutBuilder | Callable[[LayoutBuilder], LayoutBuilder]:
    """Register ``builder(model) -> AttentionLayout`` for ``model_type``.

    Use as a call, ``register_layout("my_gpt", build)``, or as a decorator,
    ``@register_layout("my_gpt")``. Names in the returned layout are relative to the module the
    builder receives; :meth:`AttentionLayout.from_model` prefixes them when that module is wrapped.
    """

    def _register(fn: LayoutBuilder) -> LayoutBuilder:
        if model_type in _REGISTRY and not overwrite and _REGISTRY[model_type] is not fn:
            raise ValueError(
                f"a layout for {model_type!r} is already registered; pass overwrite=True to replace it"
            )
        _REGISTRY[model_type] = fn
        return fn

    return _register if builder is None else _register(builder)


def registered_layouts() -> list[str]:
    """Sorted model types with a registered layout."""
    return sorted(_REGISTRY)


# ---------------------------------------------------------------------- helpers
def _check_block(block: str) -> None:
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")


def _model_type_of(module: nn.Module) -> str | None:
    config = getattr(module, "config", None)
    mtype = getattr(config, "model_type", None)
    if isinstance(mtype, str) and mtype:
        return mtype
    mtype = getattr(module, "model_type", None)
    return mtype if isinstance(mtype, str) and mtype else None


def _get_module(modules: Mapping[str, nn.Module], name: str) -> nn.Module:
    try:
        return modules[name]
    except KeyError:
        raise LayoutError(f"no module named {name!r}") from None


def _out_axis(module: nn.Module) -> int:
    """Axis of the output features in the module's weight: 0 for Linear, 1 for Conv1D."""
    if isinstance(module, nn.Linear):
        return 0
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D, weight [in, out]
        return 1
    raise LayoutError(f"unsupported projection module {type(module).__name__}: expected nn.Linear or Conv1D")


def find_layer_modules(model: nn.Module, pattern: str, num_layers: int | None = None) -> list[str]:
    """Names of modules matching ``pattern`` (a regex whose group 1 is the layer index), by layer.

    Raises:
        LayoutError: nothing matched, or the count disagrees with ``num_layers``.
    """
    import re

    rx = re.compile(pattern)
    found: dict[int, str] = {}
    for name, _ in model.named_modules():
        m = rx.search(name)
        if m and m.end() == len(name):
            found.setdefault(int(m.group(1)), name)
    if not found or sorted(found) != list(range(len(found))):
        raise LayoutError(f"no layers matching {pattern!r} in {type(model).__name__}")
    if num_layers is not None and len(found) != num_layers:
        raise LayoutError(f"found {len(found)} layers matching {pattern!r}, config says {num_layers}")
    return [found[i] for i in range(len(found))]

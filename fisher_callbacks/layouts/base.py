"""Where each attention head lives inside the Q/K/V/O projection weights.

An :class:`AttentionLayout` maps ``(layer, head, block)`` to the entries of a parameter tensor, for
every architecture family registered with :func:`register_layout`. The map is stored as an index
tensor per block (``[H_block, head_dim]`` positions along one axis of the weight), which covers
separate projections, fused QKV (GPT-2), per-head interleaved QKV (GPT-NeoX) and grouped layouts
(Falcon's new decoder architecture) with one code path.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

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
        shared: parameters of the same projection that every head of it uses, so they are not split
            into heads (LoRA: ``lora_A`` ``[r, in]`` of a Q/K/V projection, ``lora_B`` ``[out, r]``
            of O). They are captured and enter the Fisher, the stored gradients and the forgetting
            prediction, but no per-head map.
    """

    param: str
    axis: int
    index: torch.Tensor
    bias: str | None = None
    shared: tuple[str, ...] = ()

    @property
    def num_heads(self) -> int:
        return self.index.shape[0]

    @property
    def contiguous(self) -> bool:
        """True when head h occupies ``index[h, 0] : index[h, 0] + head_dim`` (a ``narrow`` suffices)."""
        d = self.index.shape[1]
        return bool((self.index - self.index[:, :1] == torch.arange(d)).all())


def _renamed(spec: BlockSpec | None, rename: Callable[[str], str]) -> BlockSpec | None:
    if spec is None:
        return None
    return replace(
        spec,
        param=rename(spec.param),
        bias=rename(spec.bias) if spec.bias else None,
        shared=tuple(rename(n) for n in spec.shared),
    )


@dataclass(eq=False)
class AttentionLayout:
    """Q/K/V/O head map of a transformer.

    Build it with :meth:`from_model`; the seeds' name :data:`QKOVConfig` is an alias.

    Attributes:
        layers: per layer, ``{"Q": BlockSpec, "K": ..., "V": ..., "O": ...}``; ``None`` marks a
            block that is not monitored (a projection without a LoRA adapter, or a frozen one, see
            :meth:`trainable_only`): it has no entries and its head-map cells are NaN.
        num_heads: query heads per layer (Q and O blocks have this many heads).
        num_kv_heads: key/value heads per layer (K and V blocks; ``< num_heads`` under GQA/MQA).
        head_dim: entries per head along the head axis.
        param_shapes: shape of every weight (and bias) the layout names.
        model_type: the registered layout that built this map.
        include_bias: whether Q/K/V biases are monitored too.
    """

    layers: list[dict[str, BlockSpec | None]]
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
                if spec is None:
                    continue
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
        if self.layers and not any(s is not None for specs in self.layers for s in specs.values()):
            raise LayoutError("no block of any layer is monitored")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        model_type: str | None = None,
        include_bias: bool | None = None,
        trainable_only: bool = False,
    ) -> AttentionLayout:
        """Map the attention of ``model`` (or of the first registered submodule inside it).

        ``model`` may be a Hugging Face model or anything that wraps one (a LightningModule, a
        ``peft`` ``PeftModel``, a ``torch.compile`` ``OptimizedModule``): the first module, in
        ``named_modules()`` order, whose ``config.model_type`` (or ``model_type`` attribute, or the
        explicit ``model_type`` argument for the root) has a registered layout is mapped, and the
        parameter names are given relative to ``model``. Projections wrapped by a ``peft`` LoRA
        layer are mapped on their adapter (see :meth:`from_projections`).

        Args:
            model: the model.
            model_type: registered layout to use for the root module.
            include_bias: monitor the Q/K/V biases too; ``None`` keeps what the builder chose
                (no biases for the built-in layouts).
            trainable_only: leave out frozen monitored weights (:meth:`trainable_only`, with a
                warning that names them).

        Raises:
            LayoutError: no module has a registered layout (the message names the model type(s)
                seen, the registered layouts and how to register one), or a module claims a
                registered type but its builder cannot map it (the message says what is missing).
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
            where = f"{type(module).__name__} at {prefix!r}" if prefix else type(module).__name__
            try:
                layout = builder(module)
            except (AttributeError, KeyError, TypeError, IndexError, LayoutError) as err:
                raise LayoutError(
                    f"{where} claims model_type {mtype!r}, but the registered {mtype!r} layout "
                    f"cannot map it: {err}. Give it the modules and config the builder expects, "
                    "or register a layout of its own with fisher_callbacks.register_layout(...)"
                ) from err
            if not isinstance(layout, AttentionLayout):
                raise LayoutError(
                    f"the layout builder for {mtype!r} returned {type(layout).__name__}, "
                    "not an AttentionLayout"
                )
            layout.model_type = mtype
            if prefix:
                layout = layout._with_prefix(prefix)
            if include_bias is not None and include_bias != layout.include_bias:
                layout = replace(layout, include_bias=include_bias)
            if trainable_only:
                layout, frozen = layout.trainable_only(model)
                if frozen:
                    warnings.warn(frozen_message(frozen), stacklevel=2)
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

        A projection wrapped by a ``peft`` LoRA layer (``peft.tuners.lora.Linear`` over an
        ``nn.Linear`` or a transformers ``Conv1D``, plain or DoRA, any scaling incl. rsLoRA) is
        mapped on its active adapter, what actually trains: for Q/K/V the rows of ``lora_B``
        (``[out, r]``) belong to heads exactly like the base weight's output features (axis 0 of
        ``lora_B`` also for GPT-2's ``Conv1D`` with ``fan_in_fan_out``, whose base weight has them
        on axis 1), and ``lora_A`` (``[r, in]``) is ``shared`` by all heads of the projection; for
        O the columns of ``lora_A`` (``[r, in]``) belong to heads and ``lora_B`` is shared. The
        frozen base weight is not monitored. A DoRA magnitude vector has no per-sample hook and is
        not monitored (it still counts wherever all trainable parameters do).

        Args:
            model: the module the names are relative to.
            layers: per layer ``{"Q": module name, "K": ..., "V": ..., "O": ...}`` (``nn.Linear``,
                transformers ``Conv1D`` or a peft LoRA layer over one of them). With a fused QKV
                projection give its name for Q, K and V.
            num_heads: query heads.
            num_kv_heads: key/value heads (GQA/MQA); defaults to ``num_heads``.
            fused: layout of a fused QKV projection: ``"concat"`` (``[Q | K | V]``, GPT-2, Phi-3,
                Falcon multi-query) or ``"interleaved"`` (per head ``[q, k, v]``, GPT-NeoX);
                ``None`` for separate projections.

        Raises:
            LayoutError: an unknown module name or type, a merged or multi-adapter LoRA layer, or
                a projection whose width is not ``heads * head_dim`` (the message gives the numbers).
        """
        num_kv_heads = num_kv_heads or num_heads
        if fused not in (None, "concat", "interleaved"):
            raise LayoutError(f"unknown fused layout {fused!r}: 'concat', 'interleaved' or None")
        modules = dict(model.named_modules())
        specs: list[dict[str, BlockSpec | None]] = []
        head_dim = None
        for li, names in enumerate(layers):
            proj = {b: _projection(modules, names[b]) for b in BLOCKS}
            q_out = proj["Q"].out_features
            groups = {None: num_heads, "concat": num_heads + 2 * num_kv_heads, "interleaved": 3 * num_heads}
            d = q_out // groups[fused]
            if d == 0 or q_out % groups[fused]:
                what = {
                    None: f"num_heads={num_heads}",
                    "concat": f"num_heads + 2 * num_kv_heads = {num_heads} + 2 * {num_kv_heads}",
                    "interleaved": f"3 * num_heads = 3 * {num_heads}",
                }
                raise LayoutError(
                    f"layer {li}: Q projection {names['Q']!r} has {q_out} output features, not a "
                    f"multiple of {what[fused]}"
                )
            head_dim = head_dim or d
            widths = {"O": (proj["O"].in_features, num_heads * d, "input features", "num_heads")}
            if fused is None:
                idx = {
                    "Q": contiguous_heads(num_heads, d),
                    "K": contiguous_heads(num_kv_heads, d),
                    "V": contiguous_heads(num_kv_heads, d),
                }
                for b in ("K", "V"):
                    widths[b] = (proj[b].out_features, num_kv_heads * d, "output features", "num_kv_heads")
            elif fused == "concat":
                idx = concat_qkv_heads(num_heads, num_kv_heads, d)
            else:
                idx = interleaved_qkv_heads(num_heads, d)
            for b, (have, want, what, heads) in widths.items():
                if have != want:
                    raise LayoutError(
                        f"layer {li}: {b} projection {names[b]!r} has {have} {what}, but "
                        f"{heads} * head_dim = {want // d} * {d} = {want} (head_dim {d} from "
                        f"Q {names['Q']!r}: {q_out} output features)"
                    )
            layer_specs: dict[str, BlockSpec | None] = {b: proj[b].qkv_spec(idx[b]) for b in ("Q", "K", "V")}
            layer_specs["O"] = proj["O"].o_spec(contiguous_heads(num_heads, d))
            specs.append(layer_specs)
        params = dict(model.named_parameters())
        shapes = {}
        for layer_specs in specs:
            for spec in layer_specs.values():
                for name in (spec.param, spec.bias, *spec.shared):
                    if name is not None:
                        if name not in params:
                            raise LayoutError(f"{type(model).__name__} has no parameter {name!r}")
                        shapes[name] = params[name].shape
        return cls(
            layers=specs,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim or 0,
            param_shapes=shapes,
        )

    def _with_prefix(self, prefix: str) -> AttentionLayout:
        return self.renamed(lambda name: f"{prefix}.{name}")

    def _with_bias(self) -> AttentionLayout:
        return replace(self, include_bias=True)

    def renamed(self, rename: Callable[[str], str] | Mapping[str, str]) -> AttentionLayout:
        """The same layout with every parameter name mapped through ``rename`` (a function, or a
        ``{old: new}`` mapping that leaves other names as they are); everything else is kept."""
        fn = (lambda n: rename.get(n, n)) if isinstance(rename, Mapping) else rename
        return replace(
            self,
            layers=[{b: _renamed(s, fn) for b, s in specs.items()} for specs in self.layers],
            param_shapes={fn(k): v for k, v in self.param_shapes.items()},
        )

    def trainable_only(self, model: nn.Module) -> tuple[AttentionLayout, list[str]]:
        """Leave out the monitored tensors of ``model`` that do not train (``requires_grad=False``).

        A block whose per-head weight is frozen becomes not monitored (``None``); a frozen shared
        factor or bias is dropped from its block. Nothing else changes (indices, head counts).

        Returns:
            ``(layout, frozen names)``; ``self`` and ``[]`` when everything trains.

        Raises:
            LayoutError: a monitored name is not a parameter of ``model``, or nothing monitored
                trains (the message says how to fix it).
        """
        params = dict(model.named_parameters())
        missing = [n for n in self.monitored_parameters() if n not in params]
        if missing:
            raise LayoutError(
                f"{len(missing)} monitored name(s) are not parameters of {type(model).__name__}, "
                f"e.g. {missing[0]!r}"
            )
        frozen = [n for n in self.monitored_parameters() if not params[n].requires_grad]
        if not frozen:
            return self, []

        def keep(spec: BlockSpec | None) -> BlockSpec | None:
            if spec is None or not params[spec.param].requires_grad:
                return None
            bias = spec.bias if spec.bias is None or params[spec.bias].requires_grad else None
            shared = tuple(n for n in spec.shared if params[n].requires_grad)
            return replace(spec, bias=bias, shared=shared)

        layers = [{b: keep(s) for b, s in specs.items()} for specs in self.layers]
        if not any(s is not None for specs in layers for s in specs.values()):
            raise LayoutError(
                f"none of the {len(frozen)} monitored attention weights of {type(model).__name__} "
                f"trains (all are frozen, requires_grad=False, e.g. {frozen[0]!r}): nothing to monitor. "
                "Unfreeze some Q/K/V/O projections or give them a LoRA adapter."
            )
        return replace(self, layers=layers), frozen

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

    def is_monitored(self, layer: int, block: str) -> bool:
        """Whether ``block`` of ``layer`` is monitored (False: no adapter there, or frozen)."""
        _check_block(block)
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.num_layers})")
        return self.layers[layer][block] is not None

    def monitored_mask(self, block: str) -> torch.Tensor:
        """``[L, H_block]`` bool: True where the block of that layer is monitored (head maps of
        the other cells are NaN and drawn as not monitored)."""
        rows = [self.is_monitored(layer, block) for layer in range(self.num_layers)]
        return torch.tensor(rows, dtype=torch.bool)[:, None].expand(-1, self.heads_in_block(block)).clone()

    @property
    def partial(self) -> bool:
        """True when some block of some layer is not monitored."""
        return any(s is None for specs in self.layers for s in specs.values())

    def spec(self, layer: int, block: str) -> BlockSpec:
        if not self.is_monitored(layer, block):
            raise LayoutError(
                f"block {block} of layer {layer} is not monitored (no adapter on that projection, "
                "or its weight is frozen)"
            )
        return self.layers[layer][block]

    def param_names(self, layer: int) -> dict[str, str]:
        """``{"Q": name, "K": name, "V": name, "O": name}`` of the per-head weights (a fused QKV
        gives one name thrice); blocks that are not monitored are left out."""
        return {b: self.spec(layer, b).param for b in BLOCKS if self.is_monitored(layer, b)}

    def monitored_parameters(self) -> list[str]:
        """Ordered unique names of every monitored tensor: per-head weights, their Q/K/V biases if
        ``include_bias``, and the ``shared`` factors (LoRA)."""
        names: dict[str, None] = {}
        for layer in range(self.num_layers):
            for block in BLOCKS:
                if not self.is_monitored(layer, block):
                    continue
                spec = self.spec(layer, block)
                names[spec.param] = None
                if self.include_bias and spec.bias is not None:
                    names[spec.bias] = None
                names.update(dict.fromkeys(spec.shared))
        return list(names)

    def shared_parameters(self) -> list[str]:
        """Ordered unique names of the monitored tensors that no head owns (see ``BlockSpec.shared``)."""
        names: dict[str, None] = {}
        for specs in self.layers:
            for spec in specs.values():
                if spec is not None:
                    names.update(dict.fromkeys(spec.shared))
        return list(names)

    def block_entries(self, layer: int, block: str) -> Iterator[tuple[str, bool]]:
        """``(name, is_bias)`` of each tensor whose head slices make up ``block`` of ``layer``
        (none when the block is not monitored; shared factors are not head slices)."""
        if not self.is_monitored(layer, block):
            return
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


def _is_lora_layer(module: nn.Module) -> bool:
    """A ``peft`` LoRA layer (``peft.tuners.lora.LoraLayer``), recognised without importing peft."""
    return all(isinstance(getattr(module, a, None), nn.ModuleDict) for a in ("lora_A", "lora_B")) and hasattr(
        module, "base_layer"
    )


_LORA_VARIANTS_OK = ("DoraLinearVariant",)  # variants whose adapter runs through lora_B(lora_A(x))


@dataclass(frozen=True)
class _Projection:
    """One projection module as the layout sees it (plain or a LoRA layer's active adapter)."""

    name: str
    in_features: int
    out_features: int
    weight: str  # the weight that trains: the module's own, or the base weight under a LoRA layer
    out_axis: int  # axis of the output features in ``weight``
    bias: str | None
    lora: tuple[str, str] | None = None  # (lora_A weight, lora_B weight) of the active adapter

    def qkv_spec(self, index: torch.Tensor) -> BlockSpec:
        """Heads on the output features: rows of ``lora_B`` ``[out, r]``, or the weight's out axis."""
        if self.lora is not None:
            lora_a, lora_b = self.lora
            return BlockSpec(param=lora_b, axis=0, index=index, bias=self.bias, shared=(lora_a,))
        return BlockSpec(param=self.weight, axis=self.out_axis, index=index, bias=self.bias)

    def o_spec(self, index: torch.Tensor) -> BlockSpec:
        """Heads on the input features: columns of ``lora_A`` ``[r, in]``, or the weight's in axis."""
        if self.lora is not None:
            lora_a, lora_b = self.lora
            return BlockSpec(param=lora_a, axis=1, index=index, shared=(lora_b,))
        return BlockSpec(param=self.weight, axis=1 - self.out_axis, index=index)


def _projection(modules: Mapping[str, nn.Module], name: str) -> _Projection:
    module = _get_module(modules, name)
    if _is_lora_layer(module):
        return _lora_projection(module, name)
    axis = _out_axis(module, name)
    weight = module.weight  # Linear [out, in]; Conv1D [in, out]
    bias = f"{name}.bias" if getattr(module, "bias", None) is not None else None
    return _Projection(
        name, int(weight.shape[1 - axis]), int(weight.shape[axis]), f"{name}.weight", axis, bias
    )


def _lora_projection(module: nn.Module, name: str) -> _Projection:
    """The active LoRA adapter of a peft layer; the base layer if no adapter is active here."""
    base = module.get_base_layer()
    if getattr(module, "merged", False):
        raise LayoutError(
            f"{name}: LoRA adapter(s) {list(module.merged_adapters)} are merged into the base weight, "
            "so the adapter no longer runs: call model.unmerge_adapter() to monitor the adapter, "
            "or model.merge_and_unload() to monitor the merged (plain) weights"
        )
    adapters = [] if module.disable_adapters else [a for a in module.active_adapters if a in module.lora_A]
    # Quantised bases (QLoRA) are neither; their weight is frozen and never monitored.
    base_axis = 1 if _is_conv1d(base) else 0
    base_bias = f"{name}.base_layer.bias" if getattr(base, "bias", None) is not None else None
    in_f, out_f = int(module.in_features), int(module.out_features)
    if not adapters:
        return _Projection(name, in_f, out_f, f"{name}.base_layer.weight", base_axis, base_bias)
    if len(adapters) > 1:
        raise LayoutError(
            f"{name}: {len(adapters)} active LoRA adapters {adapters}; monitoring supports one "
            "active adapter per projection (model.set_adapter(name))"
        )
    (adapter,) = adapters
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if variant is not None and type(variant).__name__ not in _LORA_VARIANTS_OK:
        raise LayoutError(
            f"{name}: LoRA variant {type(variant).__name__} of adapter {adapter!r} is not supported "
            f"(supported: plain LoRA, rsLoRA, DoRA)"
        )
    lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
    for part, sub in (("lora_A", lora_a), ("lora_B", lora_b)):
        if not isinstance(sub, nn.Linear):
            raise LayoutError(
                f"{name}.{part}.{adapter} is a {type(sub).__name__}; only LoRA adapters on linear "
                "projections (nn.Linear) are supported"
            )
    bias = f"{name}.lora_B.{adapter}.bias" if lora_b.bias is not None else base_bias
    return _Projection(
        name,
        in_f,
        out_f,
        f"{name}.base_layer.weight",
        base_axis,
        bias,
        lora=(f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight"),
    )


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # transformers.pytorch_utils.Conv1D, weight [in, out]


def _out_axis(module: nn.Module, name: str = "?") -> int:
    """Axis of the output features in the module's weight: 0 for Linear, 1 for Conv1D."""
    if isinstance(module, nn.Linear):
        return 0
    if _is_conv1d(module):
        return 1
    kind = f"{type(module).__module__}.{type(module).__name__}"
    hint = ""
    if kind.startswith("peft."):
        hint = (
            " (a peft layer that is not a LoRA layer over nn.Linear/Conv1D: only LoRA adapters, "
            "incl. rsLoRA and DoRA, on linear projections are supported)"
        )
    raise LayoutError(
        f"unsupported projection module {name!r} of type {kind}: expected nn.Linear, transformers "
        f"Conv1D, or a peft LoRA layer (peft.tuners.lora.Linear) over one of them{hint}. Register "
        "a layout with BlockSpec entries for other modules (fisher_callbacks.register_layout)"
    )


def frozen_message(frozen: Sequence[str]) -> str:
    """Warning text for monitored tensors left out because they do not train."""
    shown = ", ".join(frozen[:4]) + (f" and {len(frozen) - 4} more" if len(frozen) > 4 else "")
    return (
        f"{len(frozen)} monitored attention tensor(s) are frozen (requires_grad=False) and are "
        f"not monitored: {shown}; their blocks show as not monitored in the head maps"
    )


def canonical_name(name: str) -> str:
    """``name`` without ``torch.compile``'s ``_orig_mod`` components (``a._orig_mod.b`` -> ``a.b``)."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


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

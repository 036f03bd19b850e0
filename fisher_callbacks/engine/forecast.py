"""The per-step forecast of forgetting between two measurements.

``forecast_t = measured_b + g_A(theta_b) . (theta_t - theta_b)``: the drift measured at the last
measurement ``b`` (early probe or boundary) extended by the first-order change since, for every
reference task A, after every optimizer step. One matrix-vector product per parameter and step
over the predicted parameters, no forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .sharding import Shards

TensorDict = dict[str, torch.Tensor]


class Forecaster:
    """theta_b and every task's probe gradient there, and the forecast from them.

    Attributes:
        base: theta_b, ``{name: tensor}`` of the predicted-on parameters (once built: views into
            one flat fp32 buffer ``[N]``); None before the anchor.
        grads: g_A(theta_b) per task, ``{task: {name: tensor}}`` (once built: views into the rows
            of one ``[n_tasks, N]`` matrix, which the FisherMonitor keeps instead of its own copy).
        tasks: the tasks with a row, in the order of the rows.
        last_step: optimizer step of the last per-step call (None: none yet).
        failed: a forecast failed; no forecast for the rest of the fit.
        shards: how the parameters are split over the ranks (FSDP2): theta_b and the rows are
            this rank's blocks, and the dot products are summed over the ranks.
    """

    def __init__(self, grad_dtype: torch.dtype = torch.bfloat16) -> None:
        self.grad_dtype = grad_dtype
        self.base: TensorDict | None = None
        self.grads: dict[str, TensorDict] = {}
        self.flat_base: torch.Tensor | None = None  # [N] fp32
        self.flat_grads: torch.Tensor | None = None  # [n_tasks, N] grad_dtype
        # the live parameters (by name) with their column blocks of the rows, and rows . theta_b
        self._slices: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self._at_base: torch.Tensor | None = None  # [n_params, n_tasks] fp64 (host)
        self._dots: torch.Tensor | None = None  # [n_params, n_tasks] fp32 scratch
        self.tasks: list[str] = []
        self._names: list[str] = []  # the parameters of the buffers, in their order
        self.last_step: int | None = None
        self.failed = False
        self.shards = Shards()

    @property
    def ready(self) -> bool:
        """A forecast can be taken: built, and none failed."""
        return self.flat_base is not None and not self.failed

    def move(
        self, params: Mapping[str, torch.Tensor], tasks: Sequence[str], base: TensorDict | None = None
    ) -> None:
        """theta_b becomes ``base`` (when given) and the flat copies are rebuilt from :attr:`base`
        and :attr:`grads` (``params``: the module's named parameters; ``tasks``: those to forecast,
        each with a gradient in :attr:`grads`).

        :attr:`base` and :attr:`grads` become views into one flat fp32 copy of theta_b ``[N]`` and
        the matrix ``[n_tasks, N]`` (no second copy), over the parameters every task has a
        gradient of. The matrix is kept in :attr:`grad_dtype` (bfloat16 by default: half the
        bytes of the largest per-parameter state; theta_b stays fp32, since the forecast takes
        differences of it). Raises ``ValueError`` when no flat copy can be made (no parameter, or
        parameters on several devices): the forecast is then off until the next move.
        """
        if base is not None:
            self.base = base
        if self.base is None:
            self.flat_base = self.flat_grads = None
            return
        tasks = list(tasks)
        names = [n for n in self.base if n in params and all(n in self.grads[t] for t in tasks)]
        if not names:
            self.flat_base = self.flat_grads = None
            raise ValueError("no predicted parameter has a probe gradient")
        same = self.flat_base is not None and names == self._names
        if same and _shares_storage(self.base[names[0]], self.flat_base):
            flat = self.flat_base  # theta_b is already in the buffer (see rebase)
        else:  # into the old buffer when the parameters are the same, else a new one
            flat, self.base = _flat_views({n: self.base[n] for n in names}, self.flat_base if same else None)
        if same and tasks == self.tasks and self.flat_grads is not None:
            matrix = self.flat_grads  # the new gradients are copied over the old rows
        else:
            matrix = torch.empty(len(tasks), flat.numel(), dtype=self.grad_dtype, device=flat.device)
        for row, task in zip(matrix, tasks):
            self.grads[task] = _flat_views({n: self.grads[task][n] for n in names}, row)[1]
        self._slices, offset = [], 0
        self._dots = flat.new_empty(len(names), len(tasks))
        for i, n in enumerate(names):
            k = self.shards.local(n, params[n]).numel()
            rows = matrix[:, offset : offset + k]
            self._slices.append((n, params[n], rows))
            _mv(rows, flat[offset : offset + k], out=self._dots[i])
            offset += k
        self._at_base = self.shards.reduce(self._dots).cpu().double()
        self._names = names
        self.tasks = tasks
        self.flat_base = flat
        self.flat_grads = matrix

    def rebase(self, params: Mapping[str, torch.Tensor]) -> bool:
        """theta_b becomes the current ``params``, written over the old theta_b in its buffer (no
        new weight-sized copy). Returns False when there is no buffer of these parameters yet
        (the caller then hands :meth:`move` a fresh copy)."""
        if self.flat_base is None or self.base is None or any(n not in params for n in self._names):
            return False
        local = {n: self.shards.local(n, params[n]) for n in self._names}
        if any(local[n].shape != self.base[n].shape for n in self._names):
            return False
        for n in self._names:
            self.base[n].copy_(local[n].detach())
        return True

    def step(self, drift_at_base: Mapping[str, float]) -> dict[str, float]:
        """The forecast of every task at the parameters' current values: ``{task: drift_at_base
        + g_A(theta_b) . (theta_t - theta_b)}`` (nats).

        ``g_A . (theta_t - theta_b)`` is ``rows . theta_t - rows . theta_b`` per parameter (strided
        column blocks of the rows into one scratch, no copy of theta_t), ``rows . theta_b`` taken
        once when the base moved; the difference and the sum in fp64 on the host."""
        dots = self._dots
        for i, (name, param, rows) in enumerate(self._slices):
            _mv(rows, self.shards.local(name, param).detach().reshape(-1).float(), out=dots[i])
        first = (self.shards.reduce(dots).cpu().double() - self._at_base).sum(0).tolist()
        return {task: drift_at_base[task] + f for task, f in zip(self.tasks, first)}

    def to(self, device: torch.device) -> None:
        """Bring a restored (CPU) theta_b and its gradients to ``device``."""
        self.base = _to(self.base, device)
        self.grads = {t: _to(g, device) for t, g in self.grads.items()}

    def state_dict(self, keep_params: bool) -> dict[str, Any]:
        """``prev`` (theta_b) and ``prev_grad`` (g_A(theta_b)); left out unless ``keep_params``."""
        return {"prev": self.base if keep_params else None, "prev_grad": self.grads if keep_params else {}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.base = state.get("prev")
        self.grads = state.get("prev_grad", {})


def _shares_storage(view: torch.Tensor, flat: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()


_CHUNK = 1 << 18  # columns per fp32 block of low-precision rows: R x 1 MiB, read while in cache


def _mv(rows: torch.Tensor, vec: torch.Tensor, out: torch.Tensor) -> None:
    """``out = rows @ vec`` in fp32 (``vec`` fp32, ``rows`` [R, k] of any float dtype). Rows in a
    lower precision are widened a block of columns at a time into one reused fp32 scratch,
    accumulating in fp32: the transient is one block, never a widened copy of the rows."""
    if rows.dtype == torch.float32:
        torch.mv(rows, vec, out=out)
        return
    scratch = torch.empty(rows.shape[0], min(_CHUNK, vec.numel()), dtype=torch.float32, device=vec.device)
    out.zero_()
    for start in range(0, vec.numel(), _CHUNK):
        stop = min(start + _CHUNK, vec.numel())
        block = scratch[:, : stop - start]
        block.copy_(rows[:, start:stop])
        out.addmv_(block, vec[start:stop])


def _flat_views(tensors: TensorDict, out: torch.Tensor | None = None) -> tuple[torch.Tensor, TensorDict]:
    """One flat copy of ``tensors`` (``[N]``, N = total entries; fp32, or written into ``out`` in
    its dtype when given) and views of it per name. All on one device, else ``ValueError``."""
    if not tensors:
        raise ValueError("no predicted parameter has a probe gradient")
    first = next(iter(tensors.values()))
    if any(t.device != first.device for t in tensors.values()):
        raise ValueError("the predicted parameters are on several devices")
    total = sum(t.numel() for t in tensors.values())
    flat = torch.empty(total, dtype=torch.float32, device=first.device) if out is None else out
    views, offset = {}, 0
    for name, t in tensors.items():
        views[name] = flat[offset : offset + t.numel()].view(t.shape)
        views[name].copy_(t.detach())
        offset += t.numel()
    return flat, views


def _to(tensors: TensorDict | None, device: torch.device) -> TensorDict | None:
    return None if tensors is None else {n: t.to(device) for n, t in tensors.items()}

"""What the monitors agree on across DDP ranks: the warnings the user sees and the keys they log.

- :class:`WarningRelay`: every distinct warning a monitor catches or raises reaches the user ONCE,
  whichever rank raised it (under DDP the messages of all ranks are gathered and shown on global
  rank zero, naming the ranks);
- :func:`agreed_keys`: the metric names every rank can log (their intersection), so that
  a trainer-side ``sync_dist`` reduction never runs a collective on some ranks only.

Outside an initialised process group (one process) everything is local and nothing blocks.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from .._validate import SetupError

if TYPE_CHECKING:
    from .host import Host


def distributed() -> bool:
    """Whether a ``torch.distributed`` process group of more than one rank is running."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return torch.distributed.get_rank() if distributed() else 0


def gather(obj: object) -> list:
    """``obj`` of every rank (a collective under DDP), ``[obj]`` in one process."""
    if not distributed():
        return [obj]
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def agreed_keys(keys: Iterable[str]) -> set[str]:
    """The keys present on every rank (collective under DDP; all of ``keys`` in one process)."""
    per_rank = gather(sorted(set(keys)))
    common = set(per_rank[0])
    for names in per_rank[1:]:
        common &= set(names)
    return common


def _dedup_key(message: str) -> str:
    """Messages differing only in their numbers (sample counts, steps) count as one warning."""
    return re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", message)


class WarningRelay:
    """Distinct warnings of the monitors, each shown to the user once, from every rank.

    :meth:`catch` records the warnings raised inside a block (instead of swallowing them),
    :meth:`warn` records one message. In one process a new message is emitted at once. Under DDP
    messages wait for :meth:`flush`, which every rank must call at the same points (a collective:
    the monitors call it at the end of each validation boundary, after fit start and at train
    end): the new messages of all ranks are gathered and emitted on global rank zero, with the
    ranks that raised them when it is not rank 0 alone.

    A message is identified by its own text, without the monitor's name or the ``context`` of
    :meth:`catch`, and messages that differ only in numbers (``"from only 3 sample(s)"`` /
    ``"from only 6 sample(s)"``) count as one: the first is shown. The monitors of one
    FisherMonitor share one record (:meth:`view`), so a collector warning seen by two of them is
    shown once.

    Args:
        who: prefix of every message (the monitor's name).
    """

    def __init__(self, who: str) -> None:
        self.who = who
        self._seen: set[str] = set()
        self._pending: list[tuple[str, str]] = []  # (identity, text shown)

    def view(self, who: str) -> WarningRelay:
        """A relay that shares this one's record and pending messages, with its own prefix."""
        other = WarningRelay(who)
        other._seen, other._pending = self._seen, self._pending
        return other

    @contextmanager
    def catch(self, context: str = "") -> Iterator[None]:
        """Record every warning raised inside the block, shown prefixed with ``context``."""
        got: list[warnings.WarningMessage] = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    yield
                finally:
                    got = list(caught)
        finally:  # outside the recording (re-emitted here), also when the block raised
            for w in got:
                self._record(_dedup_key(str(w.message)), f"{context}{w.message}")

    @contextmanager
    def contain(self, what: str) -> Iterator[None]:
        """The last line of defence around a monitor's hook: a failure inside the block is one
        warning (``"{what} failed: ..."``) and training goes on. In one process only: under
        DDP/FSDP it propagates, since a rank that left the block early would leave the others
        waiting in a collective the block runs (the parts that can fail on one rank alone guard
        themselves, so their ranks stay in step). A :class:`~fisher_callbacks._validate.SetupError`
        (a setting only the fit can check) always propagates."""
        try:
            yield
        except SetupError:
            raise  # a mistake in the settings: the user's to fix, not a monitoring failure
        except Exception as err:
            if distributed():
                raise
            self.warn(f"{what} failed: {err!r}; training continues")

    def reset(self) -> None:
        """Forget the messages shown (a new fit shows them again); views share the reset."""
        self._seen.clear()
        self._pending.clear()

    def warn(self, message: str) -> None:
        """Record ``message``; emitted now in one process, at the next :meth:`flush` under DDP."""
        self._record(_dedup_key(message), message)

    def _record(self, key: str, message: str) -> None:
        if key in self._seen or any(k == key for k, _ in self._pending):
            return
        if distributed():
            self._pending.append((key, f"{self.who}: {message}"))
        else:
            self._seen.add(key)
            _emit(f"{self.who}: {message}")

    def flush(self) -> None:
        """Gather the pending messages of every rank and emit the new ones on rank zero.

        A collective under DDP (every rank must call it); emits nothing new in one process.
        """
        pending = list(self._pending)
        self._pending.clear()  # in place: the views share the list
        if not distributed():
            for key, text in pending:  # recorded while a process group was up, then torn down
                if key not in self._seen:
                    self._seen.add(key)
                    _emit(text)
            return
        by_key: dict[str, tuple[str, list[int]]] = {}
        for rank, messages in enumerate(gather(pending)):
            for key, text in messages:
                if key in self._seen:
                    continue
                _, ranks = by_key.setdefault(key, (text, []))
                if rank not in ranks:
                    ranks.append(rank)
        self._seen.update(by_key)  # every rank agrees on what was shown
        if _rank() != 0:
            return
        for text, ranks in by_key.values():
            label = "rank" if len(ranks) == 1 else "ranks"
            where = "" if ranks == [0] else f" [{label} {', '.join(map(str, ranks))}]"
            _emit(text + where)


def _emit(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=_caller_level())


def _caller_level() -> int:
    """``stacklevel`` of :func:`_emit`'s first caller outside this module and ``contextlib``: the
    monitor's line that warned or opened :meth:`WarningRelay.catch`, not the context manager's
    exit (``warnings.warn`` counts ``_emit`` as level 1)."""
    skip = {__file__, contextlib.__file__}
    frame, level = sys._getframe(2), 2  # the caller of _emit
    while frame is not None and frame.f_code.co_filename in skip:
        frame, level = frame.f_back, level + 1
    return level


def log_agreed(host: Host, values: dict[str, float], relay: WarningRelay, **log_kwargs) -> list[str]:
    """:meth:`Host.log_scalars` of the finite ``values`` whose keys every rank has; warn about
    the others.

    A non-finite value is never logged (a warning says so); a key that some rank lacks (its probe
    or its computation failed there) is logged by no rank, so ``sync_dist=True`` stays a
    collective of all ranks. A collective under DDP: every rank must call it at the same point.

    Returns:
        the keys logged, in the order of ``values``.
    """
    finite = {k: float(v) for k, v in values.items() if _finite(v)}
    for key in values.keys() - finite.keys():
        relay.warn(f"{key} is {values[key]}; not logged")
    common = agreed_keys(finite)
    for key in finite.keys() - common:
        relay.warn(f"{key} is missing on some rank; not logged on any rank")
    logged = {k: v for k, v in finite.items() if k in common}
    host.log_scalars(logged, **log_kwargs)
    return list(logged)


def _finite(value: float) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False

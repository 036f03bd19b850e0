"""The monitors' random numbers: a picklable seeded generator, and :func:`isolated_rng`.

Non-invasive by construction: every random draw of the monitors uses its own generator
(:class:`SeededGenerator`, or a ``torch.Generator`` seeded from a monitor's seed), and whatever
runs user code that may draw from the global streams (iterating a probe ``DataLoader`` draws its
base seed from the global torch RNG) runs inside :func:`isolated_rng`. A seeded fit therefore
trains bit-identically with and without the suite (same dropout masks, same shuffles).


A ``torch.Generator`` pickles through its state tensor, which multiprocessing's pickler sends as
shared memory; under ``ddp_spawn`` the children then fail to map it (seen here: "unable to resize
file"). :class:`SeededGenerator` keeps the seed and, once used, the generator's state as a CPU
``ByteTensor`` (plain bytes when pickled); the ``torch.Generator`` is created lazily in each
process from them.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Run the block with the global random streams restored on exit: torch's CPU generator, the
    current CUDA device's (when CUDA is initialised), Python's ``random`` and NumPy's.

    The monitors' boundary work and probe passes run inside it, so nothing they do (a probe
    ``DataLoader``'s base seed, a sampler without a generator, user code in a collate function)
    moves the training run's dropout masks or shuffles. Costs a copy of a few kB of state.
    """
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002 (the global one)
    try:
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002


class SeededGenerator:
    """A lazily created CPU ``torch.Generator`` that pickles as its seed and state.

    Args:
        seed: the initial seed.

    Attributes:
        seed: the initial seed (the state after :meth:`set_state` wins over it).
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._generator: torch.Generator | None = None
        self._state: torch.Tensor | None = None  # ByteTensor to restore on first use

    @property
    def generator(self) -> torch.Generator:
        """The ``torch.Generator`` (created on first use, from the saved state if any)."""
        if self._generator is None:
            gen = torch.Generator().manual_seed(self.seed)
            if self._state is not None:
                gen.set_state(self._state)
            self._generator, self._state = gen, None
        return self._generator

    def get_state(self) -> torch.Tensor:
        """The generator's state, a CPU ``ByteTensor`` (what ``torch.Generator.get_state`` gives)."""
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        """Restore a state from :meth:`get_state` (applied lazily: no generator is created here)."""
        self._generator = None
        self._state = state.detach().to("cpu", torch.uint8).clone()

    def __getstate__(self) -> dict[str, Any]:
        # Plain bytes, not a tensor: multiprocessing's pickler would send a tensor through shared
        # memory (a file descriptor), which is what made ddp_spawn fail at launch.
        state = self._state if self._generator is None else self._generator.get_state()
        return {"seed": self.seed, "state": None if state is None else state.numpy().tobytes()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self._generator = None
        raw = state["state"]
        self._state = None if raw is None else torch.frombuffer(bytearray(raw), dtype=torch.uint8)

"""QKOVInterferenceMonitor: the Lightning adapter of :class:`~fisher_callbacks.engine.qkov.QKOVEngine`
(QK-OV heatmaps, head maps, conflict tests and top conflicts at validation boundaries, logged to
every attached logger). All math is in :class:`~fisher_callbacks.interference.QKOVInterferenceMetric`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from ..engine.qkov import QKOVEngine
from ._boundary import BoundaryCallback
from ._host import LightningHost
from .fisher_monitor import FisherMonitor, find_fisher_monitor


class QKOVInterferenceMonitor(QKOVEngine, BoundaryCallback):
    """Per layer, head and block (Q, K, V, O) interference between task pairs.

    At each validation boundary (every ``every_n_validations``; never in the sanity check; at the
    end of a fit without validation; at the resume of a checkpoint written just before one) and for
    each ``(task_a, task_b)`` in ``pairs`` it computes the heatmap from the per-sample gradients
    stored by ``fisher_monitor`` and logs, under ``qkov/{task_a}_vs_{task_b}/``:

    - scalars per block ``{block}/mean_score`` (mean pair score; mostly task B's gradient size,
      see the averaging trap), ``{block}/fisher_overlap`` (mean over heads, in [0, 1]),
      ``{block}/conflict_cosine_min``, ``{block}/n_significant``, and overall
      ``most_conflicting_layer`` / ``most_conflicting_head`` (lowest conflict cosine) and
      ``n_significant``;
    - figures (rank zero, every logger) ``heatmap/conflict_cosine``, ``heatmap/fisher_overlap``
      and ``heatmap/{variant}_score`` (layer x head, one panel per block, significant conflicts
      marked); a table ``top_conflicts`` (W&B table / CSV) with TRUE sample ids; the raw arrays
      as ``.npz`` beside ``metrics.csv`` for CSV loggers.

    Args:
        fisher_monitor: the :class:`FisherMonitor` (default: the one in ``trainer.callbacks``, so a
            LightningCLI YAML can list the callbacks independently) whose collector holds the samples.
        pairs: task pairs ``(task_a, task_b)``; task A's samples are ``i``, its Fisher normalises.
        variant: ``"directional"``, ``"signed"`` or ``"symmetric"``.
        fdr_alpha, min_conflict_effect_size: conflict test settings.
        n_permutations: permutations of the first stage, run for every (layer, head, block) test.
        max_permutations: largest refinement stage of ``p_value="adaptive"``; ``None`` (default):
            ``ceil(2 m c(m) / fdr_alpha)`` for the ``m`` tests of a pair (``c(m) = sum 1/i`` for
            BY), e.g. 71,906 for MiniLM's 288 tests and 206,126 for the 720 of a 30-layer model
            with 9 query and 3 KV heads, so that even a lone conflict can pass BY.
        fdr_method: ``"by"`` (Benjamini-Yekutieli, valid under dependence; with m tests a lone
            conflict needs ``p <= fdr_alpha / (m c(m))``) or ``"bh"``.
        p_value: ``"adaptive"`` (default: exact permutation p-values, refined with fresh, ten
            times larger permutation sets for the tests near the floor until the BY decision no
            longer depends on it), ``"permutation"`` (one set of ``n_permutations``: floored at
            ``1 / (n_permutations + 1)``, so BY over many tests can rarely reject) or ``"normal"``
            (normal tail of the permutation null: approximate, anti-conservative far in the tail).
        top_k: top conflicts kept per block.
        fisher: ``"task_a"`` or ``"pooled"`` Fisher for the pair scores.
        max_samples: stored samples per task used (all by default).
        every_n_validations: compute at every n-th validation boundary.
        log_figures: draw and send figures.

    Pair names are collector keys (see :class:`FisherMonitor`): a probe set's name is the probe
    set, ``f"{task}@train"`` the training samples of a task that is also a probe set. At the
    first boundary a pair naming a task that is neither a probe set, the training task, a task
    tag seen in training nor a collector task is a ``ValueError`` listing the known tasks (a typo
    would otherwise log zeros). A pair with a task that has no stored sample at a boundary logs
    nothing (no key, no figure: zero maps would read as "no interference") and warns once. Every
    setting is checked in the constructor (:func:`~fisher_callbacks.interference.check_metric_options`);
    a failure of the computation at a boundary is a warning and no key, never a dead run. Every
    distinct warning of the computation reaches the user once.
    """

    def __init__(
        self,
        fisher_monitor: FisherMonitor | None = None,
        pairs: Sequence[Sequence[str]] = (("general", "train"),),
        variant: str = "directional",
        fdr_alpha: float = 0.05,
        fdr_method: str = "by",
        p_value: str = "adaptive",
        min_conflict_effect_size: float = 0.2,
        n_permutations: int = 200,
        max_permutations: int | None = None,
        top_k: int = 10,
        fisher: str = "task_a",
        max_samples: int | None = None,
        every_n_validations: int = 1,
        log_figures: bool = True,
    ) -> None:
        self._keep_arguments(QKOVInterferenceMonitor, locals())
        if fisher_monitor is not None and not isinstance(fisher_monitor, FisherMonitor):
            raise TypeError(f"fisher_monitor must be a FisherMonitor or None, got {fisher_monitor!r}")
        QKOVEngine.__init__(
            self,
            fisher_monitor,
            pairs,
            variant=variant,
            fdr_alpha=fdr_alpha,
            fdr_method=fdr_method,
            p_value=p_value,
            min_conflict_effect_size=min_conflict_effect_size,
            n_permutations=n_permutations,
            max_permutations=max_permutations,
            top_k=top_k,
            fisher=fisher,
            max_samples=max_samples,
            every_n_validations=every_n_validations,
            log_figures=log_figures,
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._begin_fit(stage)
        self.bind(find_fisher_monitor(trainer, self.fisher_monitor, type(self).__name__))
        self.prepare(LightningHost(trainer, pl_module))

    @property
    def state_key(self) -> str:
        return self._generate_state_key(pairs=self.pairs, variant=self.variant)

    def _boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.boundary(LightningHost(trainer, pl_module))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**QKOVEngine.state_dict(self), **self._boundary_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        QKOVEngine.load_state_dict(self, state_dict)
        self._load_boundary_state(state_dict)

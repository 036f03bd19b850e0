"""QKOVEngine: QK-OV heatmaps, head maps, conflict tests and top conflicts at boundaries.

Trainer-neutral: a trainer adapter (:class:`~fisher_callbacks.callbacks.QKOVInterferenceMonitor`
under Lightning, :mod:`fisher_callbacks.hf`) binds it to the suite's Fisher engine and calls
:meth:`QKOVEngine.boundary` with a :class:`~fisher_callbacks.engine.host.Host` at each boundary.
All math is in :class:`~fisher_callbacks.interference.QKOVInterferenceMetric`; what a heatmap
shows (scalars, figures, tables, arrays) is in :mod:`fisher_callbacks.engine.qkov_report`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from .._validate import SetupError, check_number
from ..interference import QKOVHeatmap, QKOVInterferenceMetric, check_metric_options
from ..layouts import AttentionLayout
from ..memory import attribute_ledger
from ..sinks import send_arrays, send_figure, send_table
from . import qkov_report as report
from .host import Host
from .ranks import WarningRelay, gather

RELAY_NAME = "QKOVInterferenceMonitor"
"""Prefix of every warning of the engine (the name users know it by)."""


class FisherSource(Protocol):
    """What the engine reads from the suite's Fisher engine (``FisherMonitor`` under Lightning)."""

    collector: Any  # a FisherCollector once set up, None before or when the suite stays out
    layout: AttentionLayout | None

    @property
    def relay(self) -> WarningRelay: ...

    def refresh(self, host: Host) -> None: ...

    def known_tasks(self) -> set[str]: ...


class QKOVEngine:
    """Per layer, head and block (Q, K, V, O) interference between task pairs, at boundaries.

    At every ``every_n_validations``-th :meth:`boundary` and for each ``(task_a, task_b)`` in
    ``pairs`` it computes the heatmap from the per-sample gradients stored by the Fisher
    engine's collector, keeps it in :attr:`latest` and reports it under
    ``qkov/{task_a}_vs_{task_b}/`` (see :class:`~fisher_callbacks.callbacks.QKOVInterferenceMonitor`
    for the keys, figures and the meaning of every argument).

    Args:
        fisher_monitor: the Fisher engine whose collector holds the samples (or :meth:`bind`
            it later).
        pairs, variant, fdr_alpha, fdr_method, p_value, min_conflict_effect_size,
        n_permutations, max_permutations, top_k, fisher, max_samples, every_n_validations,
        log_figures: as for ``QKOVInterferenceMonitor``; every setting is checked here.
    """

    def __init__(
        self,
        fisher_monitor: FisherSource | None = None,
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
        check_metric_options(
            variant=variant,
            fisher=fisher,
            n_permutations=n_permutations,
            fdr_alpha=fdr_alpha,
            fdr_method=fdr_method,
            min_conflict_effect_size=min_conflict_effect_size,
            top_k=top_k,
            p_value=p_value,
            max_permutations=max_permutations,
        )
        check_number("max_samples", max_samples, low=1, integer=True, optional=True)
        check_number("every_n_validations", every_n_validations, low=1, integer=True)
        if isinstance(pairs, str) or any(isinstance(p, str) or len(p) != 2 for p in pairs):
            raise ValueError(f"pairs must be (task_a, task_b) tuples, got {pairs!r}")
        self.fisher_monitor = fisher_monitor
        self.pairs = [tuple(p) for p in pairs]
        self.variant = variant
        self.fdr_alpha = fdr_alpha
        self.fdr_method = fdr_method
        self.p_value = p_value
        self.min_conflict_effect_size = min_conflict_effect_size
        self.n_permutations = n_permutations
        self.max_permutations = max_permutations
        self.top_k = top_k
        self.fisher = fisher
        self.max_samples = max_samples
        self.every_n_validations = int(every_n_validations)
        self.log_figures = log_figures
        self.latest: dict[tuple[str, str], QKOVHeatmap] = {}
        self.figure_paths: list[str] = []
        self._validations = 0
        self._pairs_checked = False
        self._relay = WarningRelay(RELAY_NAME)

    # ------------------------------------------------------------------ lifecycle
    def bind(self, fisher: FisherSource) -> None:
        """Read the samples of ``fisher``'s collector (instead of the one given, if any)."""
        self.fisher_monitor = fisher

    @property
    def relay(self) -> WarningRelay:
        """This monitor's warnings (a view of the FisherMonitor's record once bound)."""
        return self._relay

    def prepare(self, host: Host) -> None:
        """Ready for a fit on ``host``, after the Fisher engine's own ``prepare``: share its
        warning record (one record for the suite, so a warning seen by two monitors is shown
        once)."""
        if self.fisher_monitor is None:
            raise ValueError(f"{RELAY_NAME} needs a FisherMonitor: pass one or bind() it before the fit")
        self._relay = self.fisher_monitor.relay.view(RELAY_NAME)

    def boundary(self, host: Host) -> None:
        """Evaluate one boundary at ``host.step``: refresh the Fisher engine, then compute and
        report every pair (a collective under DDP: every rank calls it)."""
        self._validations += 1
        if (self._validations - 1) % self.every_n_validations:
            return
        fisher = self.fisher_monitor
        fisher.refresh(host)
        collector = fisher.collector
        if collector is None:
            return
        self._check_pairs()
        variant = self._effective_variant(collector)
        for task_a, task_b in self.pairs:
            heatmap = self._compute(collector, variant, task_a, task_b, host.step)
            if heatmap is None:
                continue
            self.latest[(task_a, task_b)] = heatmap
            try:  # logs without a collective (rank zero's scalars, figures), so a rank may fail alone
                self._report(host, heatmap, task_a, task_b)
            except Exception as err:
                self._relay.warn(f"{task_a} vs {task_b}: nothing logged at step {host.step}: {err!r}")
        self._relay.flush()

    # ------------------------------------------------------------------ computing
    def _effective_variant(self, collector) -> str:
        """The configured variant, or ``"signed"`` when the store keeps sketches (inner products
        only: every head map and test is variant-independent)."""
        store = getattr(collector, "store", None)
        if store is not None and not store.entrywise and self.variant != "signed":
            self._relay.warn(
                f"variant={self.variant!r} needs per-entry gradients; the "
                f"FisherMonitor keeps sketches (store={store.kind!r}), so pair scores are 'signed'"
            )
            return "signed"
        return self.variant

    def _compute(self, collector, variant: str, task_a: str, task_b: str, step: int) -> QKOVHeatmap | None:
        """The heatmap of one pair, or None (with a warning) when a task has no stored sample
        (zero maps would read as "no interference") or the computation failed."""
        empty = [t for t in (task_a, task_b) if collector.num_stored(t) == 0]
        if empty:
            self._relay.warn(
                f"{task_a} vs {task_b}: no stored samples for {' and '.join(map(repr, empty))} "
                f"at step {step}; nothing logged for this pair"
            )
            return None
        try:
            with self._relay.catch(f"{task_a} vs {task_b}: "):
                return self._metric(collector, variant).compute_heatmap(
                    task_a, task_b, max_samples=self.max_samples
                )
        except Exception as err:
            self._relay.warn(f"{task_a} vs {task_b} failed: {err!r}")
            return None

    def _metric(self, collector, variant: str) -> QKOVInterferenceMetric:
        return QKOVInterferenceMetric(
            self.fisher_monitor.layout,
            collector,
            variant=variant,
            fisher=self.fisher,
            n_permutations=self.n_permutations,
            max_permutations=self.max_permutations,
            fdr_alpha=self.fdr_alpha,
            fdr_method=self.fdr_method,
            p_value=self.p_value,
            min_conflict_effect_size=self.min_conflict_effect_size,
            top_k=self.top_k,
        )

    def _check_pairs(self) -> None:
        """Once, at the first boundary: every pair names a known task (all ranks' tasks)."""
        if self._pairs_checked:
            return
        self._pairs_checked = True
        known = set().union(*gather(sorted(self.fisher_monitor.known_tasks())))
        unknown = sorted({t for pair in self.pairs for t in pair if t not in known})
        if unknown:
            raise SetupError(
                f"{RELAY_NAME}: pairs name unknown task(s) {unknown}; known tasks: "
                f"{sorted(known)} (probe sets keep their name, training samples of a probe set's "
                "task are under '<task>@train')"
            )

    # ------------------------------------------------------------------ reporting
    def _report(self, host: Host, heatmap: QKOVHeatmap, task_a: str, task_b: str) -> None:
        """Scalars on every rank; figures, the top-conflict table and the arrays from rank zero."""
        # Heatmaps use each rank's own stored samples: log rank zero's, matching its figures
        # (averaging an argmax layer index across ranks would mean nothing).
        scalars = report.pair_scalars(heatmap, task_a, task_b)
        host.log_scalars(scalars, rank_zero_only=host.world_size > 1)
        if not (host.is_global_zero and self.log_figures):
            return
        sinks, step = host.sinks, host.step
        layout = self.fisher_monitor.layout
        figures = report.pair_figures(
            heatmap,
            task_a,
            task_b,
            step,
            significance_label=f"significant conflict ({self.fdr_method.upper()} q<={self.fdr_alpha})",
            partial=layout is not None and layout.partial,
        )
        for key, fig in figures.items():
            self.figure_paths.extend(str(p) for p in send_figure(sinks, key, fig, step))
            fig.clf()
        prefix = report.pair_prefix(task_a, task_b)
        columns, rows = report.top_conflict_table(heatmap, task_a, task_b)
        send_table(sinks, f"{prefix}/top_conflicts", columns, rows, step)
        send_arrays(sinks, prefix, report.head_map_arrays(heatmap), step)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"validations": self._validations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._validations = int(state.get("validations", 0))

    def memory_ledger(self, seen: set | None = None) -> dict[str, int]:
        """``{group: bytes}`` of the tensors the engine holds (the latest heatmaps), one group
        per attribute; tensors in ``seen`` are left out (see :mod:`fisher_callbacks.memory`)."""
        return attribute_ledger(self, seen)

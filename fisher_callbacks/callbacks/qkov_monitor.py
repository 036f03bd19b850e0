"""QKOVInterferenceMonitor: QK-OV heatmaps, head maps, conflict tests and top conflicts at
validation boundaries, logged to every attached logger. All math is in
:class:`~fisher_callbacks.interference.QKOVInterferenceMetric`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from matplotlib.figure import Figure
from typing_extensions import override

from .._validate import check_number
from ..engine.ranks import WarningRelay, gather
from ..interference import HEAD_MAPS, QKOVInterferenceMetric, check_metric_options
from ..layouts import BLOCKS
from ..loggers import log_figure, log_metrics, log_table, save_arrays
from ..plots import NOT_MONITORED_LABEL, plot_layer_head_heatmaps
from ._boundary import BoundaryCallback
from ._host import LightningHost
from .fisher_monitor import FisherMonitor, find_fisher_monitor

_SCORE_UNITS = {
    "directional": "C_i |g_j| / I",
    "signed": "g_i g_j / I (<0 conflict)",
    "symmetric": "|g_i| |g_j| / I",
}


class QKOVInterferenceMonitor(BoundaryCallback):
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
        if fisher_monitor is not None and not isinstance(fisher_monitor, FisherMonitor):
            raise TypeError(f"fisher_monitor must be a FisherMonitor or None, got {fisher_monitor!r}")
        self.fisher_monitor = fisher_monitor
        if isinstance(pairs, str) or any(isinstance(p, str) or len(p) != 2 for p in pairs):
            raise ValueError(f"pairs must be (task_a, task_b) tuples, got {pairs!r}")
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
        self.latest: dict[tuple[str, str], Any] = {}
        self.figure_paths: list[str] = []
        self._validations = 0
        self._pairs_checked = False
        self._relay = WarningRelay("QKOVInterferenceMonitor")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._begin_fit(stage)
        self.fisher_monitor = find_fisher_monitor(trainer, self.fisher_monitor, type(self).__name__)
        self._relay = self.fisher_monitor.relay.view("QKOVInterferenceMonitor")  # one record for the suite

    @property
    def state_key(self) -> str:
        return self._generate_state_key(pairs=self.pairs, variant=self.variant)

    def _boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validations += 1
        if (self._validations - 1) % self.every_n_validations:
            return
        self.fisher_monitor.refresh(LightningHost(trainer, pl_module))
        collector = self.fisher_monitor.collector
        if collector is None:
            return
        self._check_pairs()
        variant = self.variant
        store = getattr(collector, "store", None)
        if store is not None and not store.entrywise and variant != "signed":
            # Sketches keep inner products only; every head map and test is variant-independent.
            self._relay.warn(
                f"variant={variant!r} needs per-entry gradients; the "
                f"FisherMonitor keeps sketches (store={store.kind!r}), so pair scores are 'signed'"
            )
            variant = "signed"
        for task_a, task_b in self.pairs:
            empty = [t for t in (task_a, task_b) if collector.num_stored(t) == 0]
            if empty:
                # Zero maps would read as "no interference" on the dashboard: log nothing.
                self._relay.warn(
                    f"{task_a} vs {task_b}: no stored samples for {' and '.join(map(repr, empty))} "
                    f"at step {trainer.global_step}; nothing logged for this pair"
                )
                continue
            try:
                with self._relay.catch(f"{task_a} vs {task_b}: "):
                    heatmap = self._metric(collector, variant).compute_heatmap(
                        task_a, task_b, max_samples=self.max_samples
                    )
            except Exception as err:
                self._relay.warn(f"{task_a} vs {task_b} failed: {err!r}")
                continue
            self.latest[(task_a, task_b)] = heatmap
            self._log_scalars(trainer, pl_module, heatmap, task_a, task_b)
            if trainer.is_global_zero and self.log_figures:
                self._log_figures(trainer, heatmap, task_a, task_b)
        self._relay.flush()

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
            raise ValueError(
                f"QKOVInterferenceMonitor: pairs name unknown task(s) {unknown}; known tasks: "
                f"{sorted(known)} (probe sets keep their name, training samples of a probe set's "
                "task are under '<task>@train')"
            )

    # ------------------------------------------------------------------ logging
    def _log_scalars(self, trainer, pl_module, heatmap, task_a: str, task_b: str) -> None:
        prefix = f"qkov/{task_a}_vs_{task_b}"
        # Heatmaps use each rank's own stored samples: log rank zero's, matching its figures
        # (averaging an argmax layer index across ranks would mean nothing).
        rank_zero = trainer.world_size > 1
        values: dict[str, float] = {}
        n_sig_total = 0
        worst = (float("inf"), 0, 0)
        for block in BLOCKS:
            res = heatmap[block]
            # NaN cells are blocks that are not monitored (no adapter / frozen): left out of the
            # means; a block with no monitored cell logs nothing.
            values[f"{prefix}/{block}/mean_score"] = float(res["layer_head_avg"].float().nanmean())
            values[f"{prefix}/{block}/fisher_overlap"] = float(res["fisher_overlap"].float().nanmean())
            cos = res["conflict_cosine"].float().nan_to_num(nan=math.inf)
            values[f"{prefix}/{block}/conflict_cosine_min"] = float(cos.min()) if cos.numel() else 0.0
            n_sig = int(res["significant"].sum()) if "significant" in res else 0
            values[f"{prefix}/{block}/n_significant"] = float(n_sig)
            n_sig_total += n_sig
            if block == "Q" and cos.numel():
                flat = int(cos.argmin())
                layer, head = divmod(flat, cos.shape[1])
                worst = (float(cos.min()), int(res["layers"][layer]), int(res["heads"][head]))
        values[f"{prefix}/n_significant"] = float(n_sig_total)
        if math.isfinite(worst[0]):  # no measured cosine: no "layer 0" that reads as a finding
            values[f"{prefix}/most_conflicting_layer"] = float(worst[1])
            values[f"{prefix}/most_conflicting_head"] = float(worst[2])
        finite = {name: value for name, value in values.items() if np.isfinite(value)}
        log_metrics(trainer, pl_module, finite, rank_zero_only=rank_zero)

    def _log_figures(self, trainer, heatmap, task_a: str, task_b: str) -> None:
        step = trainer.global_step
        key = f"qkov/{task_a}_vs_{task_b}/heatmap"
        pair = f"{task_a} vs {task_b}"
        sig = {b: heatmap[b]["significant"] for b in BLOCKS if "significant" in heatmap[b]}
        layout = self.fisher_monitor.layout
        nan = {"nan_label": NOT_MONITORED_LABEL} if layout is not None and layout.partial else {}
        figs: dict[str, Figure] = {
            "conflict_cosine": plot_layer_head_heatmaps(
                {b: heatmap[b]["conflict_cosine"] for b in BLOCKS},
                title=f"Conflict cosine {pair}, step {step} (<0 = conflict)",
                value_label="cos_F (unitless)",
                significant=sig or None,
                significance_label=f"significant conflict ({self.fdr_method.upper()} q<={self.fdr_alpha})",
                diverging=True,
                **nan,
            ),
            "fisher_overlap": plot_layer_head_heatmaps(
                {b: heatmap[b]["fisher_overlap"] for b in BLOCKS},
                title=f"Fisher overlap {pair}, step {step}",
                value_label="overlap (0-1)",
                diverging=False,
                value_range=(0.0, 1.0),
                **nan,
            ),
            # Blocks differ by orders of magnitude here (V/O scores dwarf Q/K): one colour
            # scale per block, said on every bar.
            f"{heatmap.variant}_score": plot_layer_head_heatmaps(
                {b: heatmap[b]["layer_head_avg"] for b in BLOCKS},
                title=f"{heatmap.variant.capitalize()} score {pair}, step {step} (mean over pairs)",
                value_label=_SCORE_UNITS[heatmap.variant],
                shared_scale=False,
                **nan,
            ),
        }
        for name, fig in figs.items():
            paths = log_figure(trainer.loggers, f"{key}/{name}", fig, step)
            self.figure_paths.extend(str(p) for p in paths)
            fig.clf()
        rows = [
            [b, c["sample_i"], c["sample_j"], c["layer"], c["head"], float(c["score"])]
            for b in BLOCKS
            for c in heatmap[b]["top_conflicts"]
        ]
        log_table(
            trainer.loggers,
            f"qkov/{task_a}_vs_{task_b}/top_conflicts",
            ["block", f"sample_{task_a}", f"sample_{task_b}", "layer", "head", "score"],
            rows,
            step,
        )
        arrays = {}
        for b in BLOCKS:
            for entry in HEAD_MAPS:
                if entry in heatmap[b]:
                    value = heatmap[b][entry]
                    arrays[f"{b}_{entry}"] = value.numpy() if torch.is_tensor(value) else value
        save_arrays(trainer.loggers, f"qkov/{task_a}_vs_{task_b}", arrays, step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"validations": self._validations, **self._boundary_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validations = int(state_dict.get("validations", 0))
        self._load_boundary_state(state_dict)

"""What a QK-OV heatmap shows: scalars, figures, the top-conflict table and the raw arrays.

Pure functions of a :class:`~fisher_callbacks.interference.QKOVHeatmap`; the engine
(:class:`~fisher_callbacks.engine.qkov.QKOVEngine`) sends what they return to the host's sinks.
Every key sits under ``qkov/{task_a}_vs_{task_b}``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from matplotlib.figure import Figure

from ..interference import HEAD_MAPS, QKOVHeatmap
from ..layouts import BLOCKS
from ..plots import NOT_MONITORED_LABEL, plot_layer_head_heatmaps

SCORE_UNITS = {
    "directional": "C_i |g_j| / I",
    "signed": "g_i g_j / I (<0 conflict)",
    "symmetric": "|g_i| |g_j| / I",
}
"""Units of a pair score per variant, written on the score figure's colour bars."""


def pair_prefix(task_a: str, task_b: str) -> str:
    """``qkov/{task_a}_vs_{task_b}``: the prefix of every key of a pair."""
    return f"qkov/{task_a}_vs_{task_b}"


def pair_scalars(heatmap: QKOVHeatmap, task_a: str, task_b: str) -> dict[str, float]:
    """The finite scalars of one pair.

    Per block ``{block}/mean_score``, ``{block}/fisher_overlap`` (means over the monitored
    cells), ``{block}/conflict_cosine_min`` and ``{block}/n_significant``; overall
    ``n_significant`` and, when a Q cosine was measured, ``most_conflicting_layer`` /
    ``most_conflicting_head`` (the cell of the lowest Q conflict cosine). NaN cells are blocks
    that are not monitored (no adapter / frozen): a block with no monitored cell logs nothing.
    """
    prefix = pair_prefix(task_a, task_b)
    values: dict[str, float] = {}
    n_sig_total = 0
    worst = (math.inf, 0, 0)  # (cosine, layer, head) of the lowest Q conflict cosine
    for block in BLOCKS:
        res = heatmap[block]
        values[f"{prefix}/{block}/mean_score"] = float(res["layer_head_avg"].float().nanmean())
        values[f"{prefix}/{block}/fisher_overlap"] = float(res["fisher_overlap"].float().nanmean())
        cos = res["conflict_cosine"].float().nan_to_num(nan=math.inf)
        values[f"{prefix}/{block}/conflict_cosine_min"] = float(cos.min()) if cos.numel() else 0.0
        n_sig = int(res["significant"].sum()) if "significant" in res else 0
        values[f"{prefix}/{block}/n_significant"] = float(n_sig)
        n_sig_total += n_sig
        if block == "Q" and cos.numel():
            layer, head = divmod(int(cos.argmin()), cos.shape[1])
            worst = (float(cos.min()), int(res["layers"][layer]), int(res["heads"][head]))
    values[f"{prefix}/n_significant"] = float(n_sig_total)
    if math.isfinite(worst[0]):  # no measured cosine: no "layer 0" that reads as a finding
        values[f"{prefix}/most_conflicting_layer"] = float(worst[1])
        values[f"{prefix}/most_conflicting_head"] = float(worst[2])
    return {name: value for name, value in values.items() if math.isfinite(value)}


def pair_figures(
    heatmap: QKOVHeatmap,
    task_a: str,
    task_b: str,
    step: int,
    *,
    significance_label: str,
    partial: bool,
) -> dict[str, Figure]:
    """``{key: figure}``: conflict cosine, Fisher overlap and pair score, layer x head, one panel
    per block (significant conflicts marked on the cosine). ``partial``: the layout leaves some
    blocks unmonitored (drawn grey)."""
    key = f"{pair_prefix(task_a, task_b)}/heatmap"
    pair = f"{task_a} vs {task_b}"
    sig = {b: heatmap[b]["significant"] for b in BLOCKS if "significant" in heatmap[b]}
    nan = {"nan_label": NOT_MONITORED_LABEL} if partial else {}
    variant = heatmap.variant
    return {
        f"{key}/conflict_cosine": plot_layer_head_heatmaps(
            {b: heatmap[b]["conflict_cosine"] for b in BLOCKS},
            title=f"Conflict cosine {pair}, step {step} (<0 = conflict)",
            value_label="cos_F (unitless)",
            significant=sig or None,
            significance_label=significance_label,
            diverging=True,
            **nan,
        ),
        f"{key}/fisher_overlap": plot_layer_head_heatmaps(
            {b: heatmap[b]["fisher_overlap"] for b in BLOCKS},
            title=f"Fisher overlap {pair}, step {step}",
            value_label="overlap (0-1)",
            diverging=False,
            value_range=(0.0, 1.0),
            **nan,
        ),
        # Blocks differ by orders of magnitude here (V/O scores dwarf Q/K): one colour scale
        # per block, said on every bar.
        f"{key}/{variant}_score": plot_layer_head_heatmaps(
            {b: heatmap[b]["layer_head_avg"] for b in BLOCKS},
            title=f"{variant.capitalize()} score {pair}, step {step} (mean over pairs)",
            value_label=SCORE_UNITS[variant],
            shared_scale=False,
            **nan,
        ),
    }


def top_conflict_table(heatmap: QKOVHeatmap, task_a: str, task_b: str) -> tuple[list[str], list[list[Any]]]:
    """``(columns, rows)`` of the top conflicts of every block, TRUE sample ids."""
    columns = ["block", f"sample_{task_a}", f"sample_{task_b}", "layer", "head", "score"]
    rows = [
        [b, c["sample_i"], c["sample_j"], c["layer"], c["head"], float(c["score"])]
        for b in BLOCKS
        for c in heatmap[b]["top_conflicts"]
    ]
    return columns, rows


def head_map_arrays(heatmap: QKOVHeatmap) -> dict[str, Any]:
    """``{f"{block}_{map}": array}``: the ``[L, H_block]`` head maps as NumPy arrays."""
    arrays = {}
    for b in BLOCKS:
        for entry in HEAD_MAPS:
            if entry in heatmap[b]:
                value = heatmap[b][entry]
                arrays[f"{b}_{entry}"] = value.numpy() if torch.is_tensor(value) else value
    return arrays

"""Layer x head heatmap figures (one panel per attention block) for the monitors' loggers.

Figures are built on :class:`matplotlib.figure.Figure` with an Agg canvas and never touch pyplot:
no global figure registry (nothing to close, nothing leaks), no GUI, and the backend a user chose
with ``matplotlib.use`` stays as it is. Loggers take the figure itself (TensorBoard ``add_figure``,
``wandb.Image``), a PNG from :func:`save_figure`, or an RGB array from :func:`figure_to_array`.

Every map is ``[L, H_block]``: layers on the y axis (layer 0 at the top), heads on the x axis. Under
grouped-query attention the K and V panels have ``num_kv_heads`` columns and are drawn narrower.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

__all__ = [
    "figure_to_array",
    "plot_attribution_heatmap",
    "plot_forgetting_timeline",
    "plot_layer_head_heatmaps",
    "save_figure",
]

DIVERGING_CMAP = "RdBu_r"
"""Colormap of signed maps (blue < 0 < red), centred at 0 with symmetric limits."""
SEQUENTIAL_CMAP = "viridis"
"""Colormap of one-signed maps."""
NAN_COLOR = "#c8c8c8"
"""Colour of cells without a value (NaN / inf)."""
NOT_MONITORED_LABEL = "grey: not monitored (no adapter or frozen)"
"""``nan_label`` of maps whose NaN cells are blocks the layout does not monitor."""
DEFAULT_DPI = 120

_ANNOTATE_MAX = 8  # write cell values when the grid is at most this many layers and heads
_MAX_TICKS = 12  # thin out tick labels beyond 16 rows / columns to about this many
# Space (inches) that constrained layout takes for decorations, measured on the defaults below.
_PANEL_DECOR_W = 1.15  # y tick labels, "layer", colour bar, its tick labels and label
_ROW_DECOR_H = 0.65  # panel title, x tick labels, "head"
_TITLE_CHARS_PER_INCH = 9.5  # 12 pt title
_LEGEND_INCH_PER_CHAR = 0.075  # 9 pt legend


def _as_array(value: Any, name: str, dtype: type) -> np.ndarray:
    """A 2-D numpy copy of a numpy array, torch tensor (any device/dtype) or nested sequence."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu()
        value = value.numpy() if dtype is bool else value.double().numpy()
    array = np.array(value, dtype=dtype)
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(
            f"Map {name!r} must be a non-empty 2-D [layers, heads] array, got shape {array.shape}."
        )
    return array


def _tick_positions(n: int, spacing_points: float, label_points: float) -> np.ndarray:
    """Integer tick positions: all up to 16 when the labels fit, else a round step.

    Args:
        n: number of rows or columns.
        spacing_points: distance between neighbouring cells, in points.
        label_points: extent a label needs along the axis, in points.
    """
    for step in (1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64, 100, 128, 256):
        if (n <= 16 or n / step <= _MAX_TICKS + 1) and step * spacing_points >= label_points:
            return np.arange(0, n, step)
    return np.array([0, n - 1])


def _colour_limits(values: np.ndarray, diverging: bool) -> tuple[float, float]:
    """``(vmin, vmax)`` from the finite values; symmetric around 0 when diverging."""
    finite = values[np.isfinite(values)]
    if diverging:
        limit = float(np.abs(finite).max()) if finite.size else 0.0
        limit = limit if limit > 0 else 1.0
        return -limit, limit
    if finite.size == 0:
        return 0.0, 1.0
    vmin, vmax = float(finite.min()), float(finite.max())
    if vmin == vmax:  # constant map: anchor the scale at 0
        vmin, vmax = min(vmin, 0.0), max(vmax, 0.0)
        if vmin == vmax:
            vmax = 1.0
    return vmin, vmax


def _note(text: str) -> Line2D:
    """A legend entry without a marker: a line of text under the panels."""
    return Line2D([], [], linestyle="none", marker=None, label=text)


def _format_value(value: float) -> str:
    if not np.isfinite(value):
        return "–"
    if value == 0:
        return "0"
    if 1e-2 <= abs(value) < 1e3:
        return f"{value:.2g}"
    mantissa, exponent = f"{value:.1e}".split("e")  # compact: 7.1e-4, not 0.00071 or 7.1e-04
    return f"{mantissa}e{int(exponent)}"


def _draw_panel(
    ax: Axes,
    values: np.ndarray,
    significant: np.ndarray | None,
    *,
    name: str,
    cmap: Colormap,
    norm: Normalize,
    value_label: str,
    annotate: bool,
    cell_inches: float,
    marker: str = "o",
) -> None:
    """One block: heatmap, ticks, colour bar, optional cell values and markers on the cells of
    ``significant`` (``marker``: ``"o"`` significant cells, ``"X"`` the non-significant minority)."""
    fig = ax.get_figure()
    layers, heads = values.shape
    image = ax.imshow(
        np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest"
    )
    ax.set_title(name, fontsize=11, fontweight="bold")
    ax.set_xlabel("head", fontsize=9)
    ax.set_ylabel("layer", fontsize=9)
    cell_points = cell_inches * 72
    digits = len(str(heads - 1))  # 8 pt digits are ~5 pt wide
    xticks = _tick_positions(heads, cell_points, label_points=5.0 * digits + 3.0)
    yticks = _tick_positions(layers, cell_points, label_points=9.0)  # 8 pt line height
    ax.set_xticks(xticks, [str(i) for i in xticks], fontsize=8)
    ax.set_yticks(yticks, [str(i) for i in yticks], fontsize=8)
    ax.tick_params(length=2, pad=1.5)
    # Thin white grid between cells so neighbouring heads stay distinguishable.
    ax.set_xticks(np.arange(-0.5, heads, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, layers, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.4)
    ax.tick_params(which="minor", length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)

    # Colour bar of a fixed physical width (0.13 in) and the panel's full height, whatever the panel
    # width: fraction, pad and aspect are relative to the panel, so scale them by its size.
    panel_width, panel_height = heads * cell_inches, layers * cell_inches
    colorbar = fig.colorbar(
        image,
        ax=ax,
        fraction=min(0.13 / panel_width, 0.9),
        pad=0.08 / panel_width,
        aspect=max(panel_height / 0.13, 1.0),
    )
    colorbar.set_label(value_label, fontsize=9)
    colorbar.ax.tick_params(labelsize=8)

    if annotate:
        for (row, col), value in np.ndenumerate(values):
            if np.isfinite(value):
                r, g, b, _ = cmap(norm(value))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                colour = "white" if dark else "black"
            else:
                colour = "0.3"
            ax.text(col, row, _format_value(value), ha="center", va="center", fontsize=7, color=colour)

    if significant is not None and significant.any():
        rows, cols = np.nonzero(significant)
        # Centred dot; in annotated grids it moves to the cell's top-right corner, clear of the text.
        offset = 0.33 if annotate else 0.0
        size = (0.18 if annotate else 0.38) * cell_inches * 72  # points
        markers = ax.scatter(
            cols + offset,
            rows - offset,
            s=size**2,
            marker=marker,
            facecolors="white",
            edgecolors="black",
            linewidths=1.0,
            zorder=3,
        )
        markers.set_gid("significance")
    ax.set_xlim(-0.5, heads - 0.5)
    ax.set_ylim(layers - 0.5, -0.5)


def plot_layer_head_heatmaps(
    maps: Mapping[str, Any],
    *,
    title: str,
    value_label: str,
    significant: Mapping[str, Any] | None = None,
    diverging: bool | None = None,
    block_order: Sequence[str] = ("Q", "K", "V", "O"),
    significance_label: str = "significant",
    shared_scale: bool = True,
    value_range: tuple[float, float] | None = None,
    notes: Sequence[str] = (),
    cmap: str | None = None,
    annotate: bool | None = None,
    dpi: float = DEFAULT_DPI,
    nan_label: str = "grey: no value (NaN)",
) -> Figure:
    """Layer x head heatmaps, one panel per block, each with its own labelled colour bar.

    Panels follow ``block_order`` in reading order (blocks missing from ``maps`` are skipped; keys
    not in ``block_order`` come after, in insertion order), arranged in balanced rows so that the
    figure is roughly landscape (2 x 2 for four 12 x 12 blocks, one row for tall models). Cells are
    square (0.14-0.4 in, smaller for larger grids) and equal across panels, so GQA/MQA K and V
    panels are narrower than Q and O. Tick labels are integers, thinned to a round step beyond 16
    entries or when the cells are too small for them.

    Args:
        maps: ``{block: [L, H_block] values}`` (numpy arrays, torch tensors or nested lists); all
            maps share the layer count ``L`` in practice but need not. NaN/inf cells are drawn grey
            and named in the legend.
        title: figure title (the caller includes the variant and the task pair).
        value_label: colour bar label, with units (e.g. ``"cos_F (unitless)"``).
        significant: optional ``{block: [L, H_block] bool}``; True cells get a white dot with a
            black edge, explained in the legend as ``significance_label`` with the cell count.
            When every cell is True (more than one cell), no cell is dotted (dots everywhere pick
            out nothing) and the legend says ``"all N cells: {significance_label}"``; when most
            are, the others are crossed instead (white ``X``) and the legend says so.
        diverging: True: colormap centred at 0 with symmetric limits (``RdBu_r``); False:
            sequential (``viridis``); None (default): diverging iff the finite values have both
            signs.
        block_order: order of the panels.
        significance_label: legend text of the significance marker (e.g.
            ``"BY q ≤ 0.05 and effect ≥ 0.2"``).
        shared_scale: one colour scale for all panels (default, colours compare across blocks);
            False scales each panel by its own values, said on every colour bar ("per-block
            scale") and in the legend.
        value_range: fixed ``(vmin, vmax)`` of every panel (e.g. ``(0, 1)`` for a quantity in
            [0, 1]), overriding ``shared_scale`` and the limits from the values.
        notes: extra legend lines without a marker (e.g. which share of a total the cells show).
        cmap: colormap name overriding the default of the chosen kind.
        annotate: write each cell's value; default: when a panel is at most 8 x 8.
        dpi: figure resolution (dots per inch) for :func:`figure_to_array` and :func:`save_figure`.
        nan_label: legend text of the grey NaN cells (e.g. :data:`NOT_MONITORED_LABEL`).

    Returns:
        A :class:`~matplotlib.figure.Figure` on an Agg canvas, not registered with pyplot.

    Raises:
        ValueError: no maps, a map that is not a non-empty 2-D array, or a ``significant`` entry
            without a map or with another shape.
    """
    if not maps:
        raise ValueError("plot_layer_head_heatmaps needs at least one map.")
    names = [b for b in block_order if b in maps] + [b for b in maps if b not in block_order]
    values = {name: _as_array(maps[name], name, float) for name in names}
    masks: dict[str, np.ndarray] = {}
    for name, mask in (significant or {}).items():
        if name not in values:
            raise ValueError(f"significant[{name!r}] has no map; maps: {list(values)}.")
        masks[name] = _as_array(mask, f"significant[{name!r}]", bool)
        if masks[name].shape != values[name].shape:
            raise ValueError(
                f"significant[{name!r}] has shape {masks[name].shape}, its map {values[name].shape}."
            )

    pooled = np.concatenate([v.ravel() for v in values.values()])
    finite = pooled[np.isfinite(pooled)]
    if diverging is None:
        diverging = bool((finite < 0).any() and (finite > 0).any())
    colormap = colormaps[cmap or (DIVERGING_CMAP if diverging else SEQUENTIAL_CMAP)]
    colormap = colormap.with_extremes(bad=NAN_COLOR)
    if value_range is not None:
        shared_scale = True
        shared_norm = Normalize(float(value_range[0]), float(value_range[1]))
    else:
        shared_norm = Normalize(*_colour_limits(pooled, diverging))

    has_nan = bool((~np.isfinite(pooled)).any())
    handles: list[Any] = []
    marker = "o"
    if masks:
        count = int(sum(m.sum() for m in masks.values()))
        total = int(sum(m.size for m in masks.values()))
        if count == total and total > 1:  # dots on every cell would pick out nothing
            masks = {}
            handles.append(_note(f"all {total} cells: {significance_label}"))
        elif 2 * count > total:  # most cells: mark the few that are NOT, they are the news
            masks = {name: ~m for name, m in masks.items()}
            marker = "X"
            handles.append(
                Line2D(
                    [],
                    [],
                    linestyle="none",
                    marker="X",
                    markersize=7,
                    markerfacecolor="white",
                    markeredgecolor="black",
                    label=f"{significance_label}: {count} of {total} cells; "
                    f"crossed: the {total - count} that are not",
                )
            )
        else:
            handles.append(
                Line2D(
                    [],
                    [],
                    linestyle="none",
                    marker="o",
                    markersize=7,
                    markerfacecolor="white",
                    markeredgecolor="black",
                    label=f"{significance_label} ({count} cell{'' if count == 1 else 's'})",
                )
            )
    if has_nan:
        handles.append(Patch(facecolor=NAN_COLOR, edgecolor="0.5", label=nan_label))
    bar_label = value_label
    if not shared_scale and len(names) > 1:
        bar_label = f"{value_label} (per-block scale)"
        handles.append(_note("each block has its own colour scale: compare colours within a panel"))
    handles.extend(_note(text) for text in notes)

    # Geometry: square cells of 0.14-0.4 in (the figure is sized so that constrained layout leaves
    # that much per cell: ~1.15 in of labels and colour bar per panel, ~0.65 in of title and
    # x labels per row).
    n_panels = len(names)
    max_layers = max(v.shape[0] for v in values.values())
    max_heads = max(v.shape[1] for v in values.values())
    cell = min(0.4, max(0.14, 3.6 / max(max_layers, max_heads)))

    def grid(ncols: int) -> tuple[list[list[str]], list[float], float, float]:
        rows = [names[i : i + ncols] for i in range(0, n_panels, ncols)]
        widths = [sum(values[n].shape[1] * cell + _PANEL_DECOR_W for n in row) for row in rows]
        return rows, widths, max(widths), len(rows) * (max_layers * cell + _ROW_DECOR_H)

    # Panels per row: of the balanced arrangements (rows of equal length but the last), the one
    # whose figure is closest to a 1.4 : 1 landscape (2 x 2 for four 12 x 12 blocks, one row for
    # tall models).
    rows, row_widths, width, height = min(
        (grid(k) for k in sorted({math.ceil(n_panels / r) for r in range(1, n_panels + 1)})),
        key=lambda g: abs(math.log(g[2] / g[3] / 1.4)),
    )
    width = max(width + 0.1, 2.5)
    title_lines = textwrap.wrap(title, width=max(20, int(width * _TITLE_CHARS_PER_INCH))) or [""]
    legend_chars = [len(h.get_label()) for h in handles]
    legend_cols = len(handles)
    if sum(c * _LEGEND_INCH_PER_CHAR + 0.6 for c in legend_chars) > width:
        legend_cols = 1  # stack the entries when they do not fit side by side
        # and wrap each entry to the figure width (0.6 in: the marker and the margins)
        chars = max(20, int((width - 0.6) / _LEGEND_INCH_PER_CHAR))
        for h in handles:
            h.set_label("\n".join(textwrap.wrap(h.get_label(), chars)))
    height += 0.1 + 0.25 * len(title_lines)
    if handles:
        extra_lines = sum(h.get_label().count("\n") for h in handles)
        height += 0.3 * math.ceil(len(handles) / legend_cols) + 0.17 * extra_lines

    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle("\n".join(title_lines), fontsize=12)
    annotate_default = annotate is None
    subfigs = fig.subfigures(len(rows), 1, squeeze=False)[:, 0]
    for subfig, row in zip(subfigs, rows):
        # Constrained layout keeps the axes widths (without decorations) in these ratios: one unit
        # per head keeps cells square-ish across panels of different widths.
        ratios = [values[n].shape[1] for n in row]
        # Pad short rows so panels keep the same size as in the full rows.
        pad = (max(row_widths) - row_widths[rows.index(row)]) / cell
        axes = subfig.subplots(
            1,
            len(row) + (pad > 0.5),
            squeeze=False,
            width_ratios=[*ratios, pad] if pad > 0.5 else ratios,
        )[0]
        for ax, name in zip(axes, row):
            v = values[name]
            norm = shared_norm if shared_scale else Normalize(*_colour_limits(v, diverging))
            show_text = (
                (v.shape[0] <= _ANNOTATE_MAX and v.shape[1] <= _ANNOTATE_MAX)
                if annotate_default
                else bool(annotate)
            )
            _draw_panel(
                ax,
                v,
                masks.get(name),
                name=name,
                cmap=colormap,
                norm=norm,
                value_label=bar_label,
                annotate=show_text,
                cell_inches=cell,
                marker=marker,
            )
        if pad > 0.5:
            axes[-1].set_axis_off()

    if handles:
        fig.legend(
            handles=handles,
            loc="outside lower center",
            ncols=legend_cols,
            fontsize=9,
            frameon=False,
        )
    return fig


def plot_attribution_heatmap(
    values: Any,
    *,
    title: str,
    value_label: str,
    panel_title: str = "",
    significant: Any | None = None,
    **kwargs: Any,
) -> Figure:
    """One ``[L, H]`` map (e.g. predicted forgetting per layer and head) as a single panel.

    A thin wrapper of :func:`plot_layer_head_heatmaps` (one implementation of the drawing).

    Args:
        values: ``[L, H]`` map.
        title: figure title.
        value_label: colour bar label, with units.
        panel_title: title of the panel (e.g. the block or quantity), empty by default.
        significant: optional ``[L, H]`` bool mask of cells to mark.
        **kwargs: any other keyword of :func:`plot_layer_head_heatmaps`.

    Returns:
        The figure.
    """
    return plot_layer_head_heatmaps(
        {panel_title: values},
        title=title,
        value_label=value_label,
        significant=None if significant is None else {panel_title: significant},
        **kwargs,
    )


# Line styles of the timeline's series, in order: (colour, line style, marker).
_SERIES_STYLES = (
    ("#1f4e9c", "-", "o"),  # first series (measured): solid, strongest
    ("#e07b00", "--", "s"),
    ("#2a9d4a", ":", "^"),
    ("#7a3fa0", "-.", "D"),
    ("#8c564b", (0, (5, 1, 1, 1)), "v"),
)
THRESHOLD_COLOR = "#c0392b"
"""Colour of threshold lines and warning marks in the timeline."""


def _series(name: str, steps: Any, values: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` as float arrays of one length; ``None`` / non-finite values become NaN."""
    x = np.array([np.nan if v is None else float(v) for v in steps], dtype=float)
    y = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(
            f"series {name!r}: steps and values must be 1-D of one length, got {x.shape} and {y.shape}"
        )
    y[~np.isfinite(y)] = np.nan
    return x, y


def plot_forgetting_timeline(
    series: Mapping[str, tuple[Sequence[Any], Sequence[Any]]],
    *,
    title: str,
    value_label: str = "Δ probe loss (nats)",
    threshold: float | None = None,
    threshold_label: str = "warn threshold",
    stop_threshold: float | None = None,
    warning_steps: Sequence[int] = (),
    stop_step: int | None = None,
    secondary: Mapping[str, tuple[Sequence[Any], Sequence[Any]]] | None = None,
    secondary_label: str = "nats",
    band: tuple[Sequence[Any], Sequence[Any], Sequence[Any]] | None = None,
    band_label: str = "band: projected drift",
    dpi: float = DEFAULT_DPI,
) -> Figure:
    """Drift of one reference task over training steps, against its threshold, warnings marked.

    Generic over named series, so new ones (e.g. a forecast) plug in without changing the
    drawing: the first series is drawn solid with filled markers (the measured drift), the next
    ones dashed, dotted, dash-dotted. NaN, inf or ``None`` values leave a gap. A horizontal
    line marks ``threshold`` (and ``stop_threshold``), a vertical line the first warning (later
    warnings get a small triangle at the top), a black line the step where the run stopped.
    ``secondary`` series (e.g. the EWC quadratic, orders of magnitude smaller) are drawn in a
    panel of their own below, on the same step axis, so they neither flatten the main panel nor
    share its scale.

    Args:
        series: ``{name: (steps, values)}``, steps in optimizer steps (``trainer.global_step``),
            values in the unit of ``value_label``; at least one series.
        title: figure title.
        value_label: y axis label of the main panel, with units.
        threshold: warning threshold in the same unit (None: no line).
        threshold_label: legend text of the threshold line (its value is appended).
        stop_threshold: stop threshold, drawn as a second, darker line.
        warning_steps: steps at which the early warning fired.
        stop_step: step at which the run was stopped (None: not stopped).
        secondary: ``{name: (steps, values)}`` of the lower panel (None or empty: no panel).
        secondary_label: y axis label of the lower panel, with units.
        band: ``(steps, low, high)``: the early warning's band (the drift projected ahead at the
            slow and the fast measured rate, drawn at the step of each decision) as a shaded
            area; non-finite entries leave a gap (None: no band).
        band_label: legend text of the band.
        dpi: figure resolution (dots per inch).

    Returns:
        A :class:`~matplotlib.figure.Figure` on an Agg canvas, not registered with pyplot.

    Raises:
        ValueError: no series, or a series whose steps and values differ in length.
    """
    if not series:
        raise ValueError("plot_forgetting_timeline needs at least one series.")
    main = {name: _series(name, *xy) for name, xy in series.items()}
    lower = {name: _series(name, *xy) for name, xy in (secondary or {}).items()}
    fig = Figure(figsize=(6.4, 4.6 if lower else 3.6), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    if lower:
        ax, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    else:
        ax, ax2 = fig.subplots(), None
    fig.suptitle("\n".join(textwrap.wrap(title, 70)), fontsize=12)

    def draw(axes: Axes, curves: dict[str, tuple[np.ndarray, np.ndarray]], offset: int) -> None:
        for k, (name, (x, y)) in enumerate(curves.items()):
            colour, style, marker = _SERIES_STYLES[(k + offset) % len(_SERIES_STYLES)]
            filled = k + offset == 0
            axes.plot(
                x,
                y,
                color=colour,
                linestyle=style,
                marker=marker,
                markersize=5 if filled else 4,
                markerfacecolor=colour if filled else "white",
                linewidth=2.0 if filled else 1.5,
                label=name,
                zorder=3 if filled else 2,
            )

    draw(ax, main, 0)
    if band is not None and len(band[0]):
        x, low = _series(band_label, band[0], band[1])
        _, high = _series(band_label, band[0], band[2])
        ax.fill_between(x, low, high, color="#9ecae1", alpha=0.45, linewidth=0, label=band_label, zorder=1)
    if threshold is not None:
        ax.axhline(
            threshold,
            color=THRESHOLD_COLOR,
            linestyle="--",
            linewidth=1.2,
            label=f"{threshold_label} ({_format_value(threshold)})",
        )
    if stop_threshold is not None:
        ax.axhline(
            stop_threshold,
            color="#6e1a12",
            linestyle="-",
            linewidth=1.2,
            label=f"stop threshold ({_format_value(stop_threshold)})",
        )
    warnings_at = sorted({int(s) for s in warning_steps})
    for axes in (ax, ax2):
        if axes is None:
            continue
        if warnings_at:
            axes.axvline(
                warnings_at[0],
                color=THRESHOLD_COLOR,
                linewidth=1.5,
                alpha=0.8,
                label=f"first warning (step {warnings_at[0]})" if axes is ax else None,
            )
        if stop_step is not None:
            axes.axvline(
                stop_step,
                color="black",
                linewidth=1.5,
                label=f"stopped (step {stop_step})" if axes is ax else None,
            )
    if len(warnings_at) > 1:
        ax.plot(
            warnings_at[1:],
            [1.0] * (len(warnings_at) - 1),
            linestyle="none",
            marker="v",
            color=THRESHOLD_COLOR,
            markersize=6,
            transform=ax.get_xaxis_transform(),  # x in steps, y at the top of the axes
            clip_on=False,
            label=f"warning again ({len(warnings_at) - 1} more)",
        )
    ax.axhline(0.0, color="0.6", linewidth=0.8, zorder=1)
    ax.set_ylabel(value_label, fontsize=9)
    ax.grid(True, color="0.9", linewidth=0.6)
    ax.tick_params(labelsize=8)
    ax.legend(loc="upper left", fontsize=8, frameon=True, framealpha=0.85)
    if ax2 is not None:
        draw(ax2, lower, len(main))
        ax2.set_ylabel(secondary_label, fontsize=9)
        ax2.grid(True, color="0.9", linewidth=0.6)
        ax2.tick_params(labelsize=8)
        ax2.legend(loc="upper left", fontsize=8, frameon=True, framealpha=0.85)
    (ax2 if ax2 is not None else ax).set_xlabel("training step (trainer.global_step)", fontsize=9)
    # integer steps on the x axis
    ax.xaxis.get_major_locator().set_params(integer=True)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: float = DEFAULT_DPI) -> Path:
    """Write ``fig`` to ``path`` (PNG unless the suffix names another format), creating parents.

    Args:
        fig: the figure.
        path: target file; ``.png`` is appended when it has no suffix.
        dpi: resolution in dots per inch.

    Returns:
        The path written.
    """
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, facecolor="white")
    return path


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render ``fig`` at its own dpi to an ``[height, width, 3]`` uint8 RGB array (for loggers).

    A figure on a non-Agg canvas (e.g. a pyplot figure of another backend) is drawn on a temporary
    Agg canvas and gets its own canvas back.
    """
    original = fig.canvas
    canvas = original if isinstance(original, FigureCanvasAgg) else FigureCanvasAgg(fig)
    try:
        canvas.draw()
        rgba = np.asarray(canvas.buffer_rgba())  # [H, W, 4]
        return np.ascontiguousarray(rgba[..., :3])
    finally:
        if canvas is not original:
            fig.set_canvas(original)

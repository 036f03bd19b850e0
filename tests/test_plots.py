"""Tests of fisher_callbacks.plots: layer x head heatmap figures."""

from __future__ import annotations

import warnings

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from fisher_callbacks.plots import (
    DIVERGING_CMAP,
    SEQUENTIAL_CMAP,
    figure_to_array,
    plot_attribution_heatmap,
    plot_forgetting_timeline,
    plot_layer_head_heatmaps,
    save_figure,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def panels(fig: Figure) -> list:
    """Heatmap axes (those holding an image), in drawing order."""
    return [ax for ax in fig.get_axes() if ax.images]


def colorbar_axes(fig: Figure) -> list:
    return [ax for ax in fig.get_axes() if hasattr(ax, "_colorbar")]


def markers(ax) -> list:
    return [c for c in ax.collections if c.get_gid() == "significance"]


def legend_texts(fig: Figure) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


@pytest.fixture
def gqa_maps() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "Q": rng.normal(size=(6, 4)),
        "K": rng.normal(size=(6, 2)),
        "V": rng.normal(size=(6, 2)),
        "O": rng.normal(size=(6, 4)),
    }


def test_one_panel_per_block_with_titles_labels_and_colorbars(gqa_maps) -> None:
    fig = plot_layer_head_heatmaps(
        {k: gqa_maps[k] for k in ("O", "Q", "V")},  # order follows block_order, not the dict
        title="signed cos_F: math vs general",
        value_label="cos_F (unitless)",
    )
    assert isinstance(fig, Figure)
    axes = panels(fig)
    assert [ax.get_title() for ax in axes] == ["Q", "V", "O"]
    assert fig._suptitle.get_text() == "signed cos_F: math vs general"
    for ax in axes:
        assert ax.get_xlabel() == "head"
        assert ax.get_ylabel() == "layer"
    bars = colorbar_axes(fig)
    assert len(bars) == 3
    assert {cb.get_ylabel() for cb in bars} == {"cos_F (unitless)"}
    # Extra keys come after the known blocks; block_order can be changed.
    fig = plot_layer_head_heatmaps(
        {"extra": gqa_maps["Q"], "K": gqa_maps["K"]},
        title="t",
        value_label="v",
        block_order=("K",),
    )
    assert [ax.get_title() for ax in panels(fig)] == ["K", "extra"]


def test_gqa_panels_keep_their_widths_and_square_cells(gqa_maps) -> None:
    fig = plot_layer_head_heatmaps(gqa_maps, title="GQA", value_label="M")
    figure_to_array(fig)  # run the layout
    axes = dict(zip("QKVO", panels(fig)))
    assert axes["Q"].images[0].get_array().shape == (6, 4)
    assert axes["K"].images[0].get_array().shape == (6, 2)
    assert [int(t) for t in axes["K"].get_xticks()] == [0, 1]
    widths = {b: ax.get_window_extent().width for b, ax in axes.items()}  # pixels
    heights = {b: ax.get_window_extent().height for b, ax in axes.items()}
    assert widths["Q"] / widths["K"] == pytest.approx(2.0, rel=0.15)
    assert widths["O"] / widths["V"] == pytest.approx(2.0, rel=0.15)
    for block, n_heads in (("Q", 4), ("K", 2), ("V", 2), ("O", 4)):
        cell_w, cell_h = widths[block] / n_heads, heights[block] / 6
        assert cell_w / cell_h == pytest.approx(1.0, rel=0.2), block


def test_colormap_choice_and_symmetric_limits(gqa_maps) -> None:
    signed = plot_layer_head_heatmaps(gqa_maps, title="t", value_label="v")
    image = panels(signed)[0].images[0]
    assert image.get_cmap().name.startswith(DIVERGING_CMAP)
    vmin, vmax = image.get_clim()
    assert vmin == -vmax
    assert vmax == pytest.approx(max(np.abs(v).max() for v in gqa_maps.values()))
    # Shared scale: every panel has the same limits.
    assert {ax.images[0].get_clim() for ax in panels(signed)} == {(vmin, vmax)}

    positive = {k: np.abs(v) + 1.0 for k, v in gqa_maps.items()}
    seq = plot_layer_head_heatmaps(positive, title="t", value_label="v")
    image = panels(seq)[0].images[0]
    assert image.get_cmap().name.startswith(SEQUENTIAL_CMAP)
    lo, hi = image.get_clim()
    assert lo == pytest.approx(min(v.min() for v in positive.values()))
    assert hi == pytest.approx(max(v.max() for v in positive.values()))

    forced = plot_layer_head_heatmaps(positive, title="t", value_label="v", diverging=True)
    lo, hi = panels(forced)[0].images[0].get_clim()
    assert lo == -hi
    per_panel = plot_layer_head_heatmaps(positive, title="t", value_label="v", shared_scale=False)
    assert len({ax.images[0].get_clim() for ax in panels(per_panel)}) == 4


def test_significance_markers_and_legend(gqa_maps) -> None:
    sig = {"Q": np.zeros((6, 4), dtype=bool), "K": torch.zeros(6, 2, dtype=torch.bool)}
    sig["Q"][2, 3] = sig["Q"][5, 0] = True
    sig["K"][1, 1] = True
    fig = plot_layer_head_heatmaps(
        gqa_maps,
        title="t",
        value_label="v",
        significant=sig,
        significance_label="BY q ≤ 0.05, effect ≥ 0.2",
        annotate=False,
    )
    axes = dict(zip("QKVO", panels(fig)))
    (q_markers,) = markers(axes["Q"])
    assert sorted(map(tuple, q_markers.get_offsets().tolist())) == [(0.0, 5.0), (3.0, 2.0)]
    (k_markers,) = markers(axes["K"])
    assert k_markers.get_offsets().tolist() == [[1.0, 1.0]]
    assert markers(axes["V"]) == []
    assert markers(axes["O"]) == []
    assert legend_texts(fig) == ["BY q ≤ 0.05, effect ≥ 0.2 (3 cells)"]
    # Without a significance argument there are no markers and no legend.
    plain = plot_layer_head_heatmaps(gqa_maps, title="t", value_label="v")
    assert not any(markers(ax) for ax in panels(plain))
    assert plain.legends == []


def test_nan_and_zero_maps_neither_crash_nor_warn() -> None:
    maps = {
        "Q": np.zeros((3, 4)),
        "K": np.full((3, 1), np.nan),
        "V": np.array([[0.0], [np.nan], [np.inf]]),
        "O": torch.zeros(3, 4, dtype=torch.bfloat16),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plot_layer_head_heatmaps(maps, title="degenerate", value_label="v")
        image = figure_to_array(fig)
        all_nan = plot_layer_head_heatmaps({"Q": np.full((2, 2), np.nan)}, title="t", value_label="v")
        figure_to_array(all_nan)
        zero = plot_layer_head_heatmaps({"Q": np.zeros((12, 12))}, title="t", value_label="v")
        figure_to_array(zero)
    assert image.dtype == np.uint8
    assert "grey: no value (NaN)" in legend_texts(fig)
    assert panels(zero)[0].images[0].get_clim() == (0.0, 1.0)
    assert "grey: no value (NaN)" not in legend_texts(zero)
    # NaN cells are written as a dash in annotated grids.
    assert "–" in [t.get_text() for t in panels(all_nan)[0].texts]


def test_cell_values_are_annotated_only_on_small_grids() -> None:
    small = plot_layer_head_heatmaps({"Q": np.arange(12.0).reshape(3, 4) / 7}, title="t", value_label="v")
    texts = [t.get_text() for t in panels(small)[0].texts]
    assert len(texts) == 12
    assert texts[:2] == ["0", "0.14"]
    big = plot_layer_head_heatmaps({"Q": np.ones((12, 12))}, title="t", value_label="v")
    assert len(panels(big)[0].texts) == 0
    off = plot_layer_head_heatmaps({"Q": np.ones((2, 2))}, title="t", value_label="v", annotate=False)
    assert len(panels(off)[0].texts) == 0


def test_tick_labels_are_integers_and_thinned_on_large_grids() -> None:
    fig = plot_layer_head_heatmaps({"Q": np.ones((12, 12))}, title="t", value_label="v")
    ax = panels(fig)[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in range(12)]
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(i) for i in range(12)]
    # 32 layers: about 12 labels; the cells (0.14 in) are too narrow for "10", "11" side by side.
    fig = plot_layer_head_heatmaps(
        {"Q": np.ones((32, 12)), "K": np.ones((32, 4))}, title="t", value_label="v"
    )
    q, k = panels(fig)
    assert [int(t) for t in q.get_yticks()] == list(range(0, 32, 4))
    assert [t.get_text() for t in q.get_yticklabels()] == [str(i) for i in range(0, 32, 4)]
    assert [t.get_text() for t in q.get_xticklabels()] == [str(i) for i in range(0, 12, 2)]
    assert [t.get_text() for t in k.get_xticklabels()] == ["0", "1", "2", "3"]  # one digit fits


def test_attribution_heatmap_is_one_panel() -> None:
    values = torch.rand(5, 3)
    sig = torch.zeros(5, 3, dtype=torch.bool)
    sig[4, 2] = True
    fig = plot_attribution_heatmap(
        values,
        title="predicted forgetting of general",
        value_label="Δ loss (nats)",
        panel_title="all blocks",
        significant=sig,
    )
    (ax,) = panels(fig)
    assert ax.get_title() == "all blocks"
    np.testing.assert_allclose(ax.images[0].get_array(), values.double().numpy())
    assert len(markers(ax)) == 1
    assert colorbar_axes(fig)[0].get_ylabel() == "Δ loss (nats)"


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="at least one map"):
        plot_layer_head_heatmaps({}, title="t", value_label="v")
    with pytest.raises(ValueError, match="2-D"):
        plot_layer_head_heatmaps({"Q": np.ones(4)}, title="t", value_label="v")
    with pytest.raises(ValueError, match="2-D"):
        plot_layer_head_heatmaps({"Q": np.ones((0, 4))}, title="t", value_label="v")
    with pytest.raises(ValueError, match="shape"):
        plot_layer_head_heatmaps(
            {"Q": np.ones((2, 4))}, title="t", value_label="v", significant={"Q": np.ones((2, 2))}
        )
    with pytest.raises(ValueError, match="has no map"):
        plot_layer_head_heatmaps(
            {"Q": np.ones((2, 4))}, title="t", value_label="v", significant={"K": np.ones((2, 4))}
        )


def test_save_figure_and_figure_to_array(tmp_path) -> None:
    fig = plot_layer_head_heatmaps({"Q": np.eye(4), "K": -np.eye(4)}, title="t", value_label="v")
    path = save_figure(fig, tmp_path / "nested" / "dir" / "heatmap.png")
    assert path == tmp_path / "nested" / "dir" / "heatmap.png"
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5_000
    no_suffix = save_figure(fig, tmp_path / "plain")
    assert no_suffix.suffix == ".png"
    assert no_suffix.read_bytes().startswith(PNG_SIGNATURE)

    image = figure_to_array(fig)
    width, height = fig.get_size_inches() * fig.dpi
    assert image.shape == (round(height), round(width), 3)
    assert image.dtype == np.uint8
    assert image.flags.c_contiguous
    assert image.min() < 50  # some dark pixels (text, colours)
    assert image.max() == 255  # white background


def test_figure_to_array_restores_a_foreign_canvas() -> None:
    from matplotlib.backend_bases import FigureCanvasBase

    fig = Figure(figsize=(2, 1), dpi=50)
    canvas = FigureCanvasBase(fig)
    fig.add_subplot().plot([0, 1], [1, 0])
    assert figure_to_array(fig).shape == (50, 100, 3)
    assert fig.canvas is canvas


def test_no_pyplot_state_and_backend_untouched(gqa_maps) -> None:
    import matplotlib.pyplot as plt

    backend, open_figures = matplotlib.get_backend(), plt.get_fignums()
    fig = plot_layer_head_heatmaps(gqa_maps, title="t", value_label="v")
    figure_to_array(fig)
    assert plt.get_fignums() == open_figures
    assert matplotlib.get_backend() == backend


def test_fixed_value_range_and_per_block_scale_is_said_on_the_bar(gqa_maps) -> None:
    overlap = {k: 0.8 + 0.1 * np.abs(np.tanh(v)) for k, v in gqa_maps.items()}  # 0.8-0.9
    fig = plot_layer_head_heatmaps(overlap, title="t", value_label="overlap (0-1)", value_range=(0, 1))
    assert {ax.images[0].get_clim() for ax in panels(fig)} == {(0.0, 1.0)}
    assert {cb.get_ylabel() for cb in colorbar_axes(fig)} == {"overlap (0-1)"}
    scaled = {"Q": gqa_maps["Q"] * 1e-4, "V": gqa_maps["V"] * 10}
    fig = plot_layer_head_heatmaps(scaled, title="t", value_label="M", shared_scale=False)
    q, v = panels(fig)
    assert q.images[0].get_clim()[1] == pytest.approx(np.abs(scaled["Q"]).max())
    assert v.images[0].get_clim()[1] == pytest.approx(np.abs(scaled["V"]).max())
    assert {cb.get_ylabel() for cb in colorbar_axes(fig)} == {"M (per-block scale)"}
    assert any("own colour scale" in t for t in legend_texts(fig))


def test_every_cell_significant_is_said_in_the_legend_not_dotted(gqa_maps) -> None:
    sig = {k: np.ones(v.shape, dtype=bool) for k, v in gqa_maps.items()}
    fig = plot_layer_head_heatmaps(
        gqa_maps, title="t", value_label="v", significant=sig, significance_label="significant"
    )
    assert not any(markers(ax) for ax in panels(fig))
    assert legend_texts(fig) == ["all 72 cells: significant"]
    sig["K"][0, 0] = False  # most cells: the one that is not gets the marker (a cross)
    fig = plot_layer_head_heatmaps(
        gqa_maps, title="t", value_label="v", significant=sig, significance_label="sig", annotate=False
    )
    axes = dict(zip("QKVO", panels(fig)))
    assert [m.get_offsets().tolist() for ax in panels(fig) for m in markers(ax)] == [[[0.0, 0.0]]]
    assert markers(axes["K"])
    assert legend_texts(fig) == ["sig: 71 of 72 cells; crossed: the 1 that are not"]


def test_notes_are_legend_lines_wrapped_to_the_figure() -> None:
    note = "attention weights (the cells): +0.2 of +2.18 nats predicted over all trainable weights (9%)"
    fig = plot_layer_head_heatmaps({"Q": np.eye(2)}, title="t", value_label="v", notes=[note])
    (text,) = legend_texts(fig)
    assert text.replace("\n", " ") == note
    image = figure_to_array(fig)  # the legend fits: constrained layout does not complain
    assert image.shape[1] == round(fig.get_size_inches()[0] * fig.dpi)


def test_forgetting_timeline_is_generic_over_named_series(tmp_path) -> None:
    steps = [5, 10, 15, 20]
    fig = plot_forgetting_timeline(
        {
            "measured": (steps, [0.1, 0.4, 1.2, 1.9]),
            "predicted": (steps, np.array([0.1, 0.5, 1.1, 2.0])),
            "forecast": (steps, [None, 0.8, float("nan"), 2.5]),  # gaps where there is none
        },
        title="Forgetting of 'general'",
        threshold=1.0,
        stop_threshold=2.0,
        warning_steps=[10, 15, 20],
        stop_step=20,
        secondary={"EWC quadratic": (steps, torch.tensor([1e-4, 4e-4, 1e-3, 2e-3]).tolist())},
    )
    main, lower = fig.get_axes()
    lines = {line.get_label(): line for line in main.get_lines()}
    assert list(lines)[:3] == ["measured", "predicted", "forecast"]
    assert np.isnan(lines["forecast"].get_ydata()[0]) and np.isnan(lines["forecast"].get_ydata()[2])
    assert lines["measured"].get_linestyle() == "-" and lines["predicted"].get_linestyle() == "--"
    labels = [t.get_text() for t in main.get_legend().get_texts()]
    for expected in (
        "warn threshold (1)",
        "stop threshold (2)",
        "first warning (step 10)",
        "stopped (step 20)",
        "warning again (2 more)",
    ):
        assert expected in labels
    assert lines["warn threshold (1)"].get_ydata()[0] == 1.0
    assert lines["first warning (step 10)"].get_xdata()[0] == 10
    assert "EWC quadratic" in [line.get_label() for line in lower.get_lines()]
    assert lower.get_xlabel() == "training step (trainer.global_step)"
    assert save_figure(fig, tmp_path / "timeline.png").read_bytes().startswith(PNG_SIGNATURE)
    # one series, no threshold, no secondary: one panel
    single = plot_forgetting_timeline({"measured": ([1], [0.0])}, title="t")
    assert len(single.get_axes()) == 1
    with pytest.raises(ValueError, match="at least one series"):
        plot_forgetting_timeline({}, title="t")
    with pytest.raises(ValueError, match="one length"):
        plot_forgetting_timeline({"measured": ([1, 2], [0.0])}, title="t")

"""privrec.course.figures: book figures are drawn for the text column with readable text."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from privrec.course import figures  # noqa: E402


def test_a_book_figure_fills_the_column_and_every_text_is_at_least_10_px():
    fig, axes = figures.figure(1, 2)
    for ax in axes:
        ax.plot([1, 10, 100], [0.9, 0.8, 0.7], label="DP-SGD")
        ax.set(xscale="log", xlabel="ε (rating level)", ylabel="test RMSE", title="a panel")
        ax.legend()
    assert fig.get_figwidth() * fig.dpi == pytest.approx(690)
    assert figures.smallest_text_px(fig) >= figures.MIN_TEXT_PX
    assert figures.overlapping_tick_labels(fig) == []
    plt.close(fig)


def test_the_checks_catch_small_text_and_colliding_ticks():
    fig, ax = plt.subplots(figsize=(12, 3), dpi=100)  # drawn twice too wide: scaled to half
    ax.plot([0, 1], [0, 1])
    assert figures.smallest_text_px(fig) < figures.MIN_TEXT_PX
    ax.set_xticks([0.0, 0.001], ["3×10¹ interaction-level", "4×10¹ per bit"])
    assert figures.overlapping_tick_labels(fig)
    plt.close(fig)


def test_style_is_scoped_and_every_font_is_at_least_8_pt():
    before = plt.rcParams["font.size"]
    with figures.book_style():
        assert plt.rcParams["font.size"] == 9.0
    assert plt.rcParams["font.size"] == before
    sizes = [v for k, v in figures.BOOK_RC.items()
             if k.endswith("size") and k not in ("lines.markersize", "figure.figsize")]
    assert min(sizes) >= 8.0  # 8 pt at dpi 100 is 11 px
    assert set(figures.BOOK_RC) <= set(matplotlib.rcParams)


def test_bad_layouts_are_rejected():
    with pytest.raises(ValueError, match="ncols"):
        figures.figure(1, 3)
    with pytest.raises(TypeError, match="nrows"):
        figures.figure(1.5)
    with pytest.raises(ValueError, match="height"):
        figures.figure(height=0.2)


def test_describe_figure_reads_titles_labels_and_legends():
    fig, axes = figures.figure(2, 1)
    axes[0].plot([0, 1], label="Laplace")
    axes[0].plot([1, 0], label="Gaussian")
    axes[0].set(xlabel="noise", ylabel="density", title="noise at ε = 1")
    axes[0].legend()
    axes[1].set(xlabel="ε", ylabel="error")
    fig.suptitle("Two mechanisms")
    assert figures.describe_figure(fig) == (
        "Two mechanisms. 2 panels. 1: noise at ε = 1: density against noise (Laplace, Gaussian). "
        "2: error against ε.")
    plt.close(fig)

"""The book's figure style: figures drawn for the text column, with text a reader can read.

The HTML text column is about 688 px wide at a 1280 px window. A figure drawn ``COLUMN_IN``
inches wide at ``DPI`` dots per inch is about 690 px, so the page shows it at (almost) its natural
size, and a font of ``s`` points is ``s * DPI / 72`` pixels: the book's smallest size, 8 pt, is
11 px. On a phone the figure scales down with the column, like every image.

Use :func:`figure` for every new figure (it applies :data:`BOOK_RC` while the figure is made and
refuses more than two panels side by side), or :func:`book_style` around code that calls
``plt.subplots`` itself. :func:`smallest_text_px` and :func:`overlapping_tick_labels` let a test
(or the author) check a figure before it goes into the book.
"""

from __future__ import annotations

from privrec.core import checks

__all__ = ["COLUMN_IN", "DPI", "COLUMN_PX", "MIN_TEXT_PX", "BOOK_RC", "book_style",
           "use_book_style", "figure", "smallest_text_px", "overlapping_tick_labels",
           "describe_figure"]

COLUMN_IN = 6.9
"""Figure width in inches: the text column at :data:`DPI`."""
DPI = 100
"""Dots per inch of every book figure (also used when the inline backend saves the PNG)."""
COLUMN_PX = 688
"""Width of the HTML text column at a 1280 px window, in CSS pixels."""
MIN_TEXT_PX = 10.0
"""The smallest text size, in CSS pixels, that a figure may show at the column width."""

BOOK_RC: dict[str, object] = {
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "figure.figsize": (COLUMN_IN, 3.4),
    "figure.constrained_layout.use": True,
    "font.size": 9.0,
    "axes.titlesize": 10.0,
    "axes.labelsize": 9.0,
    "xtick.labelsize": 8.5,
    "ytick.labelsize": 8.5,
    "legend.fontsize": 8.5,
    "legend.title_fontsize": 8.5,
    "figure.titlesize": 10.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "lines.linewidth": 1.6,
    "lines.markersize": 5.0,
}
"""matplotlib rcParams of the book style: every font >= 8 pt (11 px at :data:`DPI`)."""


def book_style():
    """Context manager applying :data:`BOOK_RC` (``with book_style(): fig, ax = plt.subplots()``)."""
    import matplotlib

    return matplotlib.rc_context(BOOK_RC)


def use_book_style() -> None:
    """Apply :data:`BOOK_RC` globally (for the rest of the notebook session)."""
    import matplotlib

    matplotlib.rcParams.update(BOOK_RC)


def figure(nrows: int = 1, ncols: int = 1, *, height: float | None = None,
           sharex: bool = False, sharey: bool = False, squeeze: bool = True):
    """A new book figure, ``COLUMN_IN`` inches wide at ``DPI``, and its axes.

    Parameters
    ----------
    nrows : int
        Rows of panels, 1 to 6 (stack panels rather than putting them side by side).
    ncols : int
        Panels side by side, 1 or 2 (three panels side by side make every label unreadably small).
    height : float, optional
        Figure height in inches, 1 to 12; default 3.2 for one row plus 2.6 per further row.
    sharex, sharey, squeeze : bool
        As for :func:`matplotlib.pyplot.subplots`.

    Returns
    -------
    (matplotlib.figure.Figure, Axes or array of Axes)
        Exactly what ``plt.subplots`` returns, drawn with :data:`BOOK_RC`.
    """
    import matplotlib.pyplot as plt

    nrows = checks.int_in("nrows", nrows, 1, 6)
    ncols = checks.int_in("ncols", ncols, 1, 2)
    if height is None:
        height = 3.2 + 2.6 * (nrows - 1)
    height = checks.in_range("height", height, 1.0, 12.0, closed_high=True)
    with book_style():
        fig, axes = plt.subplots(nrows, ncols, figsize=(COLUMN_IN, height), dpi=DPI,
                                 sharex=sharex, sharey=sharey, squeeze=squeeze,
                                 layout="constrained")
    return fig, axes


def _visible_texts(fig):
    from matplotlib.text import Text

    for text in fig.findobj(Text):
        if text.get_visible() and text.get_text().strip():
            yield text


def smallest_text_px(fig, *, column_px: float = COLUMN_PX) -> float:
    """Size in CSS pixels of the smallest visible text when ``fig`` is shown in the text column.

    A figure wider than ``column_px`` is scaled down to it (as the page does), so its text shrinks
    by the same factor. Returns ``inf`` for a figure without text.
    """
    column_px = checks.positive("column_px", column_px)
    fig.canvas.draw()  # tick labels exist only once the figure is drawn
    width_px = fig.get_figwidth() * fig.dpi
    scale = min(1.0, column_px / width_px)
    sizes = [t.get_fontsize() * fig.dpi / 72.0 * scale for t in _visible_texts(fig)]
    return min(sizes, default=float("inf"))


def overlapping_tick_labels(fig) -> list[tuple[str, str]]:
    """Pairs of tick labels on the same axis of ``fig`` whose boxes overlap (should be empty)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    clashes: list[tuple[str, str]] = []
    for ax in fig.axes:
        for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
            shown = [t for t in labels if t.get_visible() and t.get_text().strip()]
            boxes = [t.get_window_extent(renderer) for t in shown]
            for i in range(len(shown)):
                for j in range(i + 1, len(shown)):
                    if boxes[i].overlaps(boxes[j]):
                        clashes.append((shown[i].get_text(), shown[j].get_text()))
    return clashes



def _describe_axes(ax) -> str:
    title = ax.get_title() or ax.get_title(loc="left") or ax.get_title(loc="right")
    x, y = ax.get_xlabel().strip(), ax.get_ylabel().strip()
    what = f"{y} against {x}" if x and y else y or x or "a plot"
    legend = ax.get_legend()
    entries = [t.get_text() for t in legend.get_texts()] if legend is not None else []
    text = (f"{title}: " if title else "") + what
    return text + (f" ({', '.join(entries)})" if entries else "")


def describe_figure(fig) -> str:
    """A one-sentence description of ``fig`` from its suptitle, panel titles, axis labels and
    legends, e.g. ``"Two panels. 1: test RMSE against ε (DP-SGD, input perturbation). 2: ..."``.

    The default alt text of :func:`privrec.course.static_widget.static_widget_html`'s frames, and a
    first draft for a figure cell's alt text (which should also say what the figure shows).
    """
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    suptitle = fig._suptitle.get_text() if getattr(fig, "_suptitle", None) is not None else ""
    head = f"{suptitle}. " if suptitle else ""
    if not axes:
        return (head or "A figure without axes.").strip()
    if len(axes) == 1:
        return f"{head}Plot of {_describe_axes(axes[0])}."
    panels = " ".join(f"{k}: {_describe_axes(ax)}." for k, ax in enumerate(axes, start=1))
    return f"{head}{len(axes)} panels. {panels}"

"""A static face for a chapter's ipywidget: every setting pre-drawn, switched by plain JavaScript.

In the published book an ``ipywidgets.interact`` figure is a frozen snapshot: the page has no
kernel to redraw it. :func:`static_widget_html` calls the widget's own drawing function once per
combination of control values, stores each figure (a small PNG) and what the function printed, and
returns one self-contained HTML fragment: a range slider per control and about thirty lines of
JavaScript that show the frame of the selected combination. Nothing is fetched from anywhere, so it
responds offline, in the book and in a notebook. :func:`privrec.course.explorer.explorer_html` is the
alternative for privacy-utility grids (it draws the chart in the browser from the numbers).

The root element carries ``data-selected`` (the JSON of the shown combination), for tests. Every
frame's ``<img>`` carries alt text that says what the figure shows (``alt``, or a description read
off the drawn figure's titles, axis labels and legend) and the setting it shows.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import io
import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from unittest import mock

__all__ = ["static_widget_html"]

_SCRIPT = r"""
(function () {
  const root = document.getElementById(ROOT_ID);
  const spec = JSON.parse(root.querySelector('script[type="application/json"]').textContent);
  const inputs = Array.from(root.querySelectorAll('input[type="range"]'));
  const frames = root.querySelectorAll('figure[data-key]');
  function show() {
    const key = inputs.map(el => el.value).join(',');
    const selected = {};
    for (const el of inputs) {
      const value = spec.values[el.name][Number(el.value)];
      selected[el.name] = value;
      root.querySelector('output[name="' + el.name + '"]').textContent = String(value);
    }
    for (const frame of frames) frame.style.display = frame.dataset.key === key ? '' : 'none';
    root.dataset.selected = JSON.stringify(selected);
  }
  for (const el of inputs) el.addEventListener('input', show);
  show();
})();
"""


def _json_value(value: object) -> object:
    """A control value as JSON: numbers and strings as they are, anything else (inf, tuples) as text."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "∞" if value > 0 else str(value)
    return value


def _png(figure, dpi: int | None) -> str:
    """``figure`` as a base64 PNG at ``dpi`` (default: the figure's own), reduced to a 128-colour
    palette: plots have few colours, and the page holds every frame."""
    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi or figure.dpi, bbox_inches="tight",
                   metadata={"Software": None})
    image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    small = io.BytesIO()
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        small, format="png", optimize=True)
    return base64.b64encode(small.getvalue()).decode("ascii")


def _render(draw: Callable, kwargs: Mapping[str, object], dpi: int | None) -> tuple[str, str, str]:
    """One frame: ``draw(**kwargs)`` as a base64 PNG, its printed text (plt.show suppressed) and a
    description of the figure (:func:`privrec.course.figures.describe_figure`)."""
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from .figures import describe_figure

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), mock.patch.object(plt, "show", lambda *a, **k: None):
        result = draw(**kwargs)
    figure = result if isinstance(result, Figure) else plt.gcf()
    png, description = _png(figure, dpi), describe_figure(figure)
    plt.close(figure)
    return png, printed.getvalue().rstrip(), description


def _alt_text(alt: str | Callable | None, kwargs: Mapping[str, object], labels: Mapping[str, str],
              description: str) -> str:
    """A frame's alt text: ``alt`` (a format string or a function of the control values) or the
    figure's description, followed by the setting the frame shows."""
    setting = ", ".join(f"{labels[name]} = {_json_value(value)}" for name, value in kwargs.items())
    if callable(alt):
        return str(alt(**kwargs))
    if isinstance(alt, str):
        return alt.format(**kwargs)
    return f"{description} Shown for {setting}."


def _start_index(controls: Mapping[str, Sequence[object]], name: str,
                 initial: Mapping[str, object] | None) -> int:
    options = list(controls[name])
    want = (initial or {}).get(name, options[0])
    if want not in options:
        raise ValueError(f"initial[{name!r}] must be one of {options}, got {want!r}")
    return options.index(want)


def _frames(draw: Callable, controls: Mapping[str, Sequence[object]], start: list[int],
            dpi: int | None, alt: str | Callable | None, labels: Mapping[str, str]) -> list[str]:
    """One ``<figure>`` per combination (only the ``start`` one visible), keyed by slider indices."""
    names = list(controls)
    figures = []
    for index in itertools.product(*(range(len(controls[name])) for name in names)):
        kwargs = {name: controls[name][k] for name, k in zip(names, index, strict=True)}
        png, text, description = _render(draw, kwargs, dpi)
        key = ",".join(map(str, index))
        display = "" if list(index) == start else "display:none;"
        caption = (f'<pre class="privrec-readout" style="font-size:13px;white-space:pre-wrap">'
                   f'{html.escape(text)}</pre>') if text else ""
        alt_text = html.escape(_alt_text(alt, kwargs, labels, description))
        figures.append(f'<figure data-key="{key}" style="{display}margin:0">'
                       f'<img src="data:image/png;base64,{png}" alt="{alt_text}" '
                       f'style="max-width:100%;height:auto">{caption}</figure>')
    return figures


def _sliders(controls: Mapping[str, Sequence[object]], labels: Mapping[str, str],
             start: list[int]) -> str:
    """One range input per control, at its start position, with an ``<output>`` for its value."""
    return "".join(
        f'<label style="display:inline-block;margin-right:1.5em">{html.escape(labels[name])} '
        f'<input type="range" name="{html.escape(name)}" min="0" max="{len(values) - 1}" '
        f'step="1" value="{k}"> <output name="{html.escape(name)}"></output></label>'
        for (name, values), k in zip(controls.items(), start, strict=True))


def static_widget_html(draw: Callable, controls: Mapping[str, Sequence[object]], *,
                       labels: Mapping[str, str] | None = None,
                       initial: Mapping[str, object] | None = None, title: str = "",
                       alt: str | Callable | None = None, dpi: int | None = None) -> str:
    """HTML that shows ``draw``'s figure for every combination of ``controls``, without a kernel.

    Parameters
    ----------
    draw:
        Called with one keyword argument per control; draws with matplotlib (returning the figure
        or leaving it current; ``plt.show()`` is suppressed); what it prints is shown below.
    controls:
        Control name -> the values its slider offers, in order (at most 64 frames in all).
    labels:
        Display names of the controls (default: the names).
    initial:
        Start value per control (default: the first value).
    title:
        A heading above the controls.
    alt:
        Alt text of every frame, saying what the figure shows: a format string filled with the
        control values (``"Noise of the Laplace and Gaussian mechanisms at ε = {eps}"``) or a
        function called with them. Default: the drawn figure's titles, axis labels and legend
        (:func:`privrec.course.figures.describe_figure`) and the frame's setting.
    dpi:
        Resolution of the stored figures; default the figure's own (100 for
        :func:`privrec.course.figures.figure`, so a frame is drawn for the text column).

    Returns
    -------
    str
        One ``<div class="privrec-static-widget">`` holding the frames, sliders and script.

    Raises
    ------
    ValueError
        For no controls, an empty control, over 64 frames, or an initial value not offered.
    """
    if not controls or any(len(values) == 0 for values in controls.values()):
        raise ValueError("controls must name at least one control, each with at least one value")
    if (n_frames := math.prod(len(values) for values in controls.values())) > 64:
        raise ValueError(f"controls give {n_frames} frames; at most 64 are allowed")
    names = list(controls)
    start = [_start_index(controls, name, initial) for name in names]
    labels = {name: name for name in names} | dict(labels or {})
    figures = _frames(draw, controls, start, dpi, alt, labels)
    spec = {"values": {name: [_json_value(v) for v in controls[name]] for name in names}}
    digest = hashlib.sha256(json.dumps([title, spec], default=str).encode()).hexdigest()[:12]
    root_id = f"privrec-static-{digest}"
    sliders = _sliders(controls, labels, start)
    payload = json.dumps(spec).replace("</", "<\\/")
    return (f'<div id="{root_id}" class="privrec-static-widget" style="font-family:sans-serif;'
            f'font-size:13px">' + (f"<strong>{html.escape(title)}</strong><br>" if title else "")
            + sliders + "".join(figures)
            + f'<script type="application/json">{payload}</script>'
            + f"<script>{_SCRIPT.replace('ROOT_ID', json.dumps(root_id))}</script></div>")

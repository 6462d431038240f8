"""A static face for a chapter's ipywidget: every setting pre-drawn, switched by plain JavaScript.

In the published book an ``ipywidgets.interact`` figure is a frozen snapshot: the page has no
kernel to redraw it. :func:`static_widget_html` calls the widget's own drawing function once per
combination of control values, stores each figure (a small PNG) and what the function printed, and
returns one self-contained HTML fragment: a range slider per control and about thirty lines of
JavaScript that show the frame of the selected combination. Nothing is fetched from anywhere, so it
responds offline, in the book and in a notebook. :func:`privrec.course.explorer.explorer_html` is the
alternative for privacy-utility grids (it draws the chart in the browser from the numbers).

The root element carries ``data-selected`` (the JSON of the shown combination), for tests.
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


def _render(draw: Callable, kwargs: Mapping[str, object], dpi: int) -> tuple[str, str]:
    """One frame: ``draw(**kwargs)`` as a base64 PNG and its printed text (plt.show suppressed)."""
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), mock.patch.object(plt, "show", lambda *a, **k: None):
        result = draw(**kwargs)
    figure = result if isinstance(result, Figure) else plt.gcf()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii"), printed.getvalue().rstrip()


def _start_index(controls: Mapping[str, Sequence[object]], name: str,
                 initial: Mapping[str, object] | None) -> int:
    options = list(controls[name])
    want = (initial or {}).get(name, options[0])
    if want not in options:
        raise ValueError(f"initial[{name!r}] must be one of {options}, got {want!r}")
    return options.index(want)


def _frames(draw: Callable, controls: Mapping[str, Sequence[object]], start: list[int],
            dpi: int) -> list[str]:
    """One ``<figure>`` per combination (only the ``start`` one visible), keyed by slider indices."""
    names = list(controls)
    figures = []
    for index in itertools.product(*(range(len(controls[name])) for name in names)):
        kwargs = {name: controls[name][k] for name, k in zip(names, index, strict=True)}
        png, text = _render(draw, kwargs, dpi)
        key = ",".join(map(str, index))
        display = "" if list(index) == start else "display:none;"
        caption = f'<pre style="font-size:11px">{html.escape(text)}</pre>' if text else ""
        figures.append(f'<figure data-key="{key}" style="{display}margin:0">'
                       f'<img src="data:image/png;base64,{png}" alt="{html.escape(str(kwargs))}" '
                       f'style="max-width:100%">{caption}</figure>')
    return figures


def static_widget_html(draw: Callable, controls: Mapping[str, Sequence[object]], *,
                       labels: Mapping[str, str] | None = None,
                       initial: Mapping[str, object] | None = None, title: str = "",
                       dpi: int = 60) -> str:
    """HTML that shows ``draw``'s figure for every combination of ``controls``, without a kernel.

    Parameters
    ----------
    draw:
        The widget's function: called with one keyword argument per control; it draws with
        matplotlib (returning the figure or leaving it current; ``plt.show()`` is suppressed) and
        may print a read-out, which is shown under the figure.
    controls:
        Control name -> the values its slider offers, in order (at most 64 frames in all).
    labels:
        Display names of the controls (default: the names).
    initial:
        Start value per control (default: the first value).
    title:
        A heading above the controls.
    dpi:
        Resolution of the stored figures.

    Returns
    -------
    str
        One ``<div class="privrec-static-widget">`` holding the frames, sliders and script.

    Raises
    ------
    ValueError
        For no controls, a control without values, more than 64 frames, or an initial value that
        is not among its control's values.
    """
    if not controls or any(len(values) == 0 for values in controls.values()):
        raise ValueError("controls must name at least one control, each with at least one value")
    names = list(controls)
    sizes = [len(controls[name]) for name in names]
    if (n_frames := math.prod(sizes)) > 64:
        raise ValueError(f"controls give {n_frames} frames; at most 64 are allowed")
    start = [_start_index(controls, name, initial) for name in names]
    labels = {name: name for name in names} | dict(labels or {})
    figures = _frames(draw, controls, start, dpi)
    spec = {"values": {name: [_json_value(v) for v in controls[name]] for name in names}}
    digest = hashlib.sha256(json.dumps([title, spec], default=str).encode()).hexdigest()[:12]
    root_id = f"privrec-static-{digest}"
    sliders = "".join(
        f'<label style="display:inline-block;margin-right:1.5em">{html.escape(labels[name])} '
        f'<input type="range" name="{html.escape(name)}" min="0" max="{size - 1}" step="1" '
        f'value="{k}"> <output name="{html.escape(name)}"></output></label>'
        for name, size, k in zip(names, sizes, start, strict=True))
    payload = json.dumps(spec).replace("</", "<\\/")
    return (f'<div id="{root_id}" class="privrec-static-widget" style="font-family:sans-serif;'
            f'font-size:13px">' + (f"<strong>{html.escape(title)}</strong><br>" if title else "")
            + sliders + "".join(figures)
            + f'<script type="application/json">{payload}</script>'
            + f"<script>{_SCRIPT.replace('ROOT_ID', json.dumps(root_id))}</script></div>")

"""A self-contained privacy-utility explorer for the static web page (no kernel, no internet).

:func:`explorer_html` turns a precomputed grid of results into one HTML fragment: the grid as
JSON, a few ``<input type="range">`` controls and about a hundred lines of plain JavaScript that
draw an SVG chart. Nothing is loaded from anywhere, so the explorer works in the published book
offline, in a notebook, and in a file opened from disk. ipywidgets cannot do this on their own: in
a static page they show their saved state but cannot recompute.

The chart plots a metric against :math:`\\varepsilon` (log scale, with the non-private result at
the right edge) with one line per value of the *series* control; the selected line is drawn
bold, the selected point is marked, and a read-out prints the selected configuration's numbers.
The :math:`\\varepsilon` axis carries a label (``epsilon_label``) so that a page can say which
privacy unit and :math:`\\delta` its guarantee is about ("user-level ε, δ = 1e-5"): guarantees
about different units are different relations and never share an axis.

Every configuration must appear once: the page looks records up by their control values, so two
records with the same values would make the shown point depend on record order.
"""

from __future__ import annotations

import html
import json
import math
import uuid
from collections.abc import Mapping, Sequence

__all__ = ["explorer_html"]

_SCRIPT = r"""
(function () {
  const root = document.getElementById(ROOT_ID);
  const spec = JSON.parse(root.querySelector('script[type="application/json"]').textContent);
  const controls = {};
  for (const el of root.querySelectorAll('input[type="range"]')) controls[el.name] = el;
  const metricSelect = root.querySelector('select[name="metric"]');
  const svg = root.querySelector('svg');
  const readout = root.querySelector('.privrec-readout');
  const legend = root.querySelector('.privrec-legend');
  const W = 680, H = 340, L = 64, R = 56, T = 14, B = 44;
  const NS = 'http://www.w3.org/2000/svg';
  function value(name) { return spec.values[name][Number(controls[name].value)]; }
  function label(v) { return v === null ? '\u221e' : String(v); }
  function el(tag, attrs, text) {
    const e = document.createElementNS(NS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    svg.appendChild(e); return e;
  }
  function matches(rec, fixed) {
    for (const k in fixed) if (rec[k] !== fixed[k]) return false;
    return true;
  }
  function draw() {
    const metric = metricSelect.value;
    const eps = value('epsilon');
    const series = spec.series ? value(spec.series) : null;
    const fixed = {};
    for (const name of spec.fixed) fixed[name] = value(name);
    for (const name in controls) {
      const out = root.querySelector('output[name="' + name + '"]');
      if (out) out.textContent = label(value(name));
    }
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const finite = spec.values.epsilon.filter(e => e !== null);
    const lo = Math.log(Math.min(...finite)), hi = Math.log(Math.max(...finite));
    const xOf = e => L + (W - L - R) * (e === null ? 1 : 0.9 * (Math.log(e) - lo) / (hi - lo || 1));
    const ys = spec.records.filter(r => matches(r, fixed)).map(r => r[metric]);
    for (const ref of spec.references) if (ref[metric] !== undefined) ys.push(ref[metric]);
    let y0 = Math.min(...ys), y1 = Math.max(...ys);
    const pad = (y1 - y0) * 0.08 || 0.01; y0 -= pad; y1 += pad;
    const yOf = v => T + (H - T - B) * (1 - (v - y0) / (y1 - y0));
    el('line', {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: '#444'});
    el('line', {x1: L, y1: T, x2: L, y2: H - B, stroke: '#444'});
    for (const e of spec.values.epsilon) {
      el('text', {x: xOf(e), y: H - B + 16, 'text-anchor': 'middle', 'font-size': 11}, label(e));
    }
    el('text', {x: (L + W - R) / 2, y: H - 6, 'text-anchor': 'middle', 'font-size': 12,
                class: 'privrec-xlabel'}, spec.epsilonLabel);
    for (let k = 0; k <= 4; k++) {
      const v = y0 + (y1 - y0) * k / 4;
      el('text', {x: L - 6, y: yOf(v) + 4, 'text-anchor': 'end', 'font-size': 11}, v.toFixed(3));
      el('line', {x1: L, y1: yOf(v), x2: W - R, y2: yOf(v), stroke: '#eee'});
    }
    el('text', {x: 14, y: (T + H - B) / 2, 'font-size': 12, 'text-anchor': 'middle',
                transform: 'rotate(-90 14 ' + (T + H - B) / 2 + ')'}, spec.metricLabels[metric]);
    for (const ref of spec.references) {
      if (ref[metric] === undefined) continue;
      el('line', {x1: L, y1: yOf(ref[metric]), x2: W - R, y2: yOf(ref[metric]),
                  stroke: '#888', 'stroke-dasharray': '5,4'});
      el('text', {x: W - R - 4, y: yOf(ref[metric]) - 4, 'text-anchor': 'end', 'font-size': 11,
                  fill: '#555'}, ref.label);
    }
    const seriesValues = spec.series ? spec.values[spec.series] : [null];
    const tags = [];
    for (const s of seriesValues) {
      const pts = spec.values.epsilon.map(e => {
        const want = Object.assign({}, fixed, {epsilon: e});
        if (spec.series) want[spec.series] = s;
        const rec = spec.records.find(r => matches(r, want));
        return rec ? [xOf(e), yOf(rec[metric])] : null;
      }).filter(p => p !== null);
      const selected = s === series;
      el('polyline', {points: pts.map(p => p.join(',')).join(' '), fill: 'none',
                      stroke: selected ? '#1f77b4' : '#999', 'stroke-width': selected ? 3 : 1.2});
      if (spec.series && pts.length) tags.push({y: pts[0][1], x: pts[0][0], s, selected});
    }
    // Label each line with its series value at its left end (smallest ε, where the lines are
    // furthest apart), pushing labels apart so that none overlaps another.
    tags.sort((a, b) => a.y - b.y);
    for (let k = 1; k < tags.length; k++) tags[k].y = Math.max(tags[k].y, tags[k - 1].y + 13);
    for (const t of tags) {
      el('text', {x: t.x + 6, y: t.y - 5, 'font-size': 12, fill: t.selected ? '#1f77b4' : '#555',
                  'font-weight': t.selected ? 'bold' : 'normal', class: 'privrec-series-label'},
         label(t.s));
    }
    const want = Object.assign({}, fixed, {epsilon: eps});
    if (spec.series) want[spec.series] = series;
    const rec = spec.records.find(r => matches(r, want));
    if (rec) {
      el('circle', {cx: xOf(eps), cy: yOf(rec[metric]), r: 6, fill: '#d62728',
                    class: 'privrec-point'});
      readout.textContent = spec.readout.map(
        k => spec.metricLabels[k] + ' ' + Number(rec[k]).toFixed(4)).join('   ') +
        (rec.note ? '   ' + rec.note : '');
    } else {
      readout.textContent = 'no result for this configuration';
    }
    if (spec.series) {
      legend.textContent = 'One line per ' + spec.seriesLabel + ' (bold blue: the selected ' +
        spec.seriesLabel + ' = ' + label(series) + '; grey: the other values); red dot: the selected ε.';
    }
    root.dataset.selected = JSON.stringify(rec || null);
  }
  for (const name in controls) controls[name].addEventListener('input', draw);
  metricSelect.addEventListener('change', draw);
  draw();
})();
"""


def _finite_json(value: object) -> object:
    if isinstance(value, float) and math.isinf(value):
        return None
    return value


def _check_records(records: Sequence[Mapping[str, object]], controls: list[str],
                   metrics: Mapping[str, str], series: str | None) -> None:
    """Raise ``ValueError`` unless every record has every control and metric, once per
    configuration."""
    if not records:
        raise ValueError("records must not be empty")
    if not controls or controls[0] != "epsilon":
        raise ValueError("controls must start with 'epsilon'")
    if series is not None and series not in controls:
        raise ValueError(f"series={series!r} must be one of controls {controls}")
    if not metrics:
        raise ValueError("metrics must name at least one metric")
    seen: dict[tuple, int] = {}
    for k, rec in enumerate(records):
        missing = [c for c in (*controls, *metrics) if c not in rec]
        if missing:
            raise ValueError(f"records[{k}] lacks {missing}")
        key = tuple(_finite_json(rec[c]) for c in controls)
        if key in seen:
            raise ValueError(f"records[{seen[key]}] and records[{k}] have the same configuration "
                             f"{dict(zip(controls, key, strict=True))}; each configuration must "
                             f"appear once")
        seen[key] = k


def _sliders(values: dict[str, list], labels: Mapping[str, str],
             start: Mapping[str, object]) -> str:
    """One range input per control, set to the position of its initial value."""
    html_parts = []
    for c, options in values.items():
        want = _finite_json(start[c])
        if want not in options:
            raise ValueError(f"initial[{c!r}] must be one of the records' values {options}, "
                             f"got {want!r}")
        html_parts.append(
            f'<label style="display:inline-block;margin-right:1.5em">{html.escape(labels[c])} '
            f'<input type="range" name="{html.escape(c)}" min="0" max="{len(options) - 1}" '
            f'step="1" value="{options.index(want)}"> <output name="{html.escape(c)}"></output>'
            f'</label>')
    return "".join(html_parts)


def _assemble(spec: dict, root_id: str, sliders: str, title: str, alt: str) -> str:
    """The explorer's ``<div>``: heading, sliders, metric menu, SVG, read-out, data and script."""
    metric_options = "".join(f'<option value="{html.escape(k)}">{html.escape(v)}</option>'
                             for k, v in spec["metricLabels"].items())
    payload = json.dumps(spec).replace("</", "<\\/")
    script = _SCRIPT.replace("ROOT_ID", json.dumps(root_id))
    return (
        f'<div id="{root_id}" class="privrec-explorer" style="font-family:sans-serif;'
        f'font-size:13px;max-width:688px">'
        + (f"<strong>{html.escape(title)}</strong><br>" if title else "")
        + sliders
        + '<label style="display:inline-block;white-space:nowrap">metric '
        + f'<select name="metric">{metric_options}</select></label>'
        + f'<svg viewBox="0 0 680 340" width="100%" role="img" aria-label="{html.escape(alt)}" '
        + 'style="max-width:680px;height:auto;display:block"></svg>'
        + '<div class="privrec-legend" style="font-size:13px;color:#444"></div>'
        + '<div class="privrec-readout" style="font-family:monospace;white-space:pre-wrap"></div>'
        + f'<script type="application/json">{payload}</script>'
        + f"<script>{script}</script></div>"
    )


def _default_alt(metrics: Mapping[str, str], epsilon_label: str, series_label: str) -> str:
    """What the chart shows, for its ``aria-label``."""
    return (f"Line chart of {' or '.join(metrics.values())} (menu) against {epsilon_label}"
            + (f", one line per {series_label}" if series_label else "")
            + "; the selected configuration is marked with a red dot and its numbers are "
              "printed below.")


def explorer_html(records: Sequence[Mapping[str, object]], *, controls: Sequence[str],
                  metrics: Mapping[str, str], series: str | None = None,
                  references: Sequence[Mapping[str, object]] = (),
                  control_labels: Mapping[str, str] | None = None,
                  initial: Mapping[str, object] | None = None, title: str = "",
                  epsilon_label: str = "ε", alt: str | None = None) -> str:
    """HTML for an offline explorer of ``records`` (one dict per configuration).

    Parameters
    ----------
    records:
        A value per ``controls`` name (``math.inf`` = non-private) and a number per ``metrics``
        key; an optional ``note`` string is shown in the read-out.
    controls:
        Names of the configuration fields that get a slider; must start with ``"epsilon"``.
    metrics:
        Metric key -> axis label, e.g. ``{"rmse": "test RMSE", "ndcg": "NDCG@10"}``.
    series:
        The control whose values are drawn as separate lines (e.g. clients per round).
    references:
        Horizontal reference lines: dicts with a ``label`` and a value per metric.
    control_labels, initial, title:
        Display labels, initial slider values (default: the first record's), and a heading.
    epsilon_label:
        The label of the :math:`\\varepsilon` axis; name the privacy unit and :math:`\\delta`
        (e.g. ``"user-level ε (δ = 1e-5)"``).
    alt:
        The chart's description (its ``aria-label``); default: metric, ε axis, series, marks.

    Returns
    -------
    str
        One ``<div>`` holding the data, the controls, an SVG and the script.

    Raises
    ------
    ValueError
        For no records or metrics, controls not starting with ``"epsilon"``, a series that is not
        a control, a record lacking a field, a repeated configuration, an unknown initial value.
    """
    controls = list(controls)
    _check_records(records, controls, metrics, series)
    labels = {c: c for c in controls} | dict(control_labels or {})
    # Distinct values (a set), so the order is total: ascending, non-private (None) last.
    values = {c: sorted({_finite_json(rec[c]) for rec in records},
                        key=lambda v: (v is None, 0 if v is None else v)) for c in controls}
    spec = {"records": [{k: _finite_json(v) for k, v in rec.items()} for rec in records],
            "values": values, "series": series,
            "fixed": [c for c in controls if c not in ("epsilon", series)],
            "metricLabels": dict(metrics), "readout": list(metrics),
            "references": [dict(r) for r in references], "epsilonLabel": str(epsilon_label),
            "seriesLabel": labels[series] if series else ""}
    digest = uuid.uuid5(uuid.NAMESPACE_URL, json.dumps(spec, sort_keys=True)).hex[:12]
    root_id = f"privrec-explorer-{digest}"
    sliders = _sliders(values, labels, {c: records[0][c] for c in controls} | dict(initial or {}))
    return _assemble(spec, root_id, sliders, title,
                     alt or _default_alt(metrics, str(epsilon_label), labels[series] if series else ""))

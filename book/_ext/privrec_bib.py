"""Sphinx extension of the PrivRec Book: one author-year citation style in the text and in the
bibliography.

The text cites with sphinxcontrib-bibtex's ``author_year`` reference style ("Dwork et al., 2006");
its bibliography labels come from the pybtex formatting style, whose default ``alpha`` labels
("[DMNS06]") match nothing in the text. This extension registers a pybtex style,
``privrec_authoryear``, whose labels are the same author-year text ("Dwork et al., 2006", with a
letter after the year where two works would share a label) and which sorts the bibliography by
author, year and title. ``_config.yml`` selects it with ``bibtex_default_style``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pybtex.plugin import register_plugin
from pybtex.richtext import Text
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle

STYLE = "privrec_authoryear"


def _plain(latex: str) -> str:
    """A name or year as plain text: braces and LaTeX accents resolved."""
    return str(Text.from_latex(latex)).strip()


def author_year(entry) -> str:
    """``"Dwork, 2006"``, ``"Dwork and Roth, 2014"`` or ``"Dwork et al., 2006"`` for one entry."""
    persons = entry.persons.get("author") or entry.persons.get("editor") or []
    last = [_plain(" ".join(p.prelast_names + p.last_names)) for p in persons]
    if not last:
        who = _plain(entry.fields.get("organization", entry.fields.get("title", entry.key)))
    elif len(last) == 1:
        who = last[0]
    elif len(last) == 2:
        who = f"{last[0]} and {last[1]}"
    else:
        who = f"{last[0]} et al."
    return f"{who}, {_plain(entry.fields.get('year', 'n.d.'))}"


class AuthorYearLabelStyle(BaseLabelStyle):
    """Author-year labels, made unique with a, b, … after the year (in bibliography order)."""

    def format_labels(self, sorted_entries):
        entries = list(sorted_entries)
        labels = [author_year(entry) for entry in entries]
        counts = Counter(labels)
        seen: Counter = Counter()
        for label in labels:
            if counts[label] > 1:
                suffix = "abcdefghijklmnopqrstuvwxyz"[seen[label]]
                seen[label] += 1
                yield label + suffix
            else:
                yield label


class AuthorYearStyle(UnsrtStyle):
    """The unsrt entry format, author-year labels, sorted by author, year and title."""

    default_label_style = STYLE
    default_sorting_style = "author_year_title"


def setup(app) -> dict[str, Any]:
    register_plugin("pybtex.style.labels", STYLE, AuthorYearLabelStyle)
    register_plugin("pybtex.style.formatting", STYLE, AuthorYearStyle)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

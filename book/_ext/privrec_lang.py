"""A link to the other edition at the top of every page: English <-> 中文 (issue 25).

The English book is built at ``_build/html`` and the Chinese one at ``_build/html/zh`` with the
same page names (``tools/zh_edition.py`` generates the Chinese sources), so a page's counterpart is
a relative link: one level down into ``zh/`` from English, one level up from Chinese. The Chinese
build sets ``privrec_edition = "zh"`` in its Sphinx config.
"""

from __future__ import annotations

from typing import Any

LINK = ('<nav class="privrec-lang" aria-label="{label}">'
        '<a href="{href}" hreflang="{lang}" lang="{lang}">{text}</a></nav>')


def counterpart(pagename: str, edition: str) -> str:
    """The relative URL of ``pagename``'s page in the other edition."""
    up = "../" * pagename.count("/")
    if edition == "zh":
        return f"{up}../{pagename}.html"
    return f"{up}zh/{pagename}.html"


def _add_link(app: Any, pagename: str, templatename: str, context: dict, doctree: Any) -> None:
    if doctree is None or "body" not in context:  # search, genindex: generated pages without a body
        return
    edition = app.config.privrec_edition
    if edition == "zh":
        link = LINK.format(label="Language", href=counterpart(pagename, edition), lang="en",
                           text="English")
    else:
        link = LINK.format(label="语言", href=counterpart(pagename, edition), lang="zh-CN",
                           text="中文版")
    context["body"] = link + context["body"]


def setup(app: Any) -> dict:
    app.add_config_value("privrec_edition", "en", "html")
    app.connect("html-page-context", _add_link)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

"""Sphinx extension of the PrivRec Book: pages without duplicated scripts; CI builds without
re-executing.

1. Every page's ``<script>`` list without duplicates.

Sphinx 7.4 registers an inline script that an extension adds after the builder started (as
sphinx-thebe and sphinx-togglebutton do, in ``env-before-read-docs``) twice: once with the file
name ``None`` (the builder) and once with ``''`` (the registry, re-read by ``init_js_files``).
The two objects compare unequal, so every page carried ``const THEBE_JS_URL = ...`` twice and
threw ``Identifier 'THEBE_JS_URL' has already been declared`` in the browser. This extension
drops the second copy of any script whose rendered tag is identical to an earlier one.

2. ``PRIVREC_BOOK_EXECUTE=off`` (set by ``.ci/run``) builds from the outputs stored in the
notebooks instead of executing them (``nb_execution_mode = "off"``): CI has just executed every
chapter under nbval and checked that its stored outputs reproduce, so the build shows exactly the
verified outputs and every chapter executes once per CI run. Unset (an author's ``make book``), the
book's ``execute_notebooks: cache`` applies: jupyter-cache re-executes what changed.
"""

from __future__ import annotations

import os
from typing import Any

from sphinx.util import logging

logger = logging.getLogger(__name__)
EXECUTE_ENV = "PRIVREC_BOOK_EXECUTE"


def _key(script: Any) -> tuple:
    """What the ``<script>`` tag renders from: the file (``None`` and ``''`` alike) and attributes."""
    attributes = tuple(sorted((k, str(v)) for k, v in getattr(script, "attributes", {}).items()))
    return getattr(script, "filename", script) or "", attributes


def deduplicate_scripts(app, pagename, templatename, context, doctree) -> None:
    """``html-page-context`` handler: keep the first of each identical script, in order."""
    scripts = context.get("script_files")
    if not isinstance(scripts, list):
        return
    seen: set[tuple] = set()
    unique = []
    for script in scripts:
        key = _key(script)
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique


def execution_from_environment(app, config) -> None:
    """``config-inited`` handler: ``PRIVREC_BOOK_EXECUTE=off`` turns notebook execution off."""
    mode = os.environ.get(EXECUTE_ENV, "").strip()
    if not mode:
        return
    if mode != "off":
        raise ValueError(f"{EXECUTE_ENV} must be 'off' or unset, got {mode!r}")
    config.nb_execution_mode = "off"
    logger.info(f"[privrec] {EXECUTE_ENV}=off: building from the notebooks' stored outputs")


def setup(app) -> dict[str, Any]:
    app.connect("config-inited", execution_from_environment)
    # Late priority: run after every other extension has added its scripts to the page.
    app.connect("html-page-context", deduplicate_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

"""Checks of the built HTML book, offline, in headless Chromium (run by `make check-book` after
`make book`; skipped when the book has not been built).

Every built page of every edition is opened at 1280 px and must load with no uncaught page error,
no console error, no failed request and no request that leaves the machine, and must read well
(issue 23): no TeX source in the text, no output or table wider than the text column, figures with
descriptive alt text drawn for the column, no solution visible without a click, no inert ipywidget.
The navigation is driven at 390 px and 900 px, every Explore section shows exactly one figure that
responds without a kernel, and search snippets show no TeX.
"""

import functools
import http.server
import json
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# PRIVREC_BOOK_HTML: check a book built elsewhere (`jupyter-book build --path-output DIR`).
HTML = Path(os.environ.get("PRIVREC_BOOK_HTML", ROOT / "_build" / "html")).resolve()
# `make check-book` sets PRIVREC_CHECK_BOOK=1 and then a missing build fails; elsewhere (e.g. the
# unit-test run in `make test`, before any build) the checks run only if a build exists.
REQUIRED = os.environ.get("PRIVREC_CHECK_BOOK") == "1"
BUILT = (HTML / "index.html").is_file()
pytestmark = pytest.mark.skipif(not REQUIRED and not BUILT,
                                reason="book not built (run `make book`, then `make check-book`)")

# The editions of the site: the English book at its root ("") and each translation in a folder of
# its own (issue 25: the Chinese edition under zh/). Every check below runs on every edition that
# was built; a new edition needs only its folder added here.
EDITION_DIRS = ("", "zh")
EDITIONS = [e for e in EDITION_DIRS if (HTML / e / "index.html").is_file()] if BUILT else []


def _edition_pages(edition: str) -> list[str]:
    """The pages of one edition, as paths relative to HTML (Sphinx's _static etc. excluded)."""
    root = HTML / edition
    nested = {d for d in EDITION_DIRS if d and d != edition}
    pages = []
    for path in root.rglob("*.html"):
        parts = path.relative_to(root).parts
        if parts[0].startswith("_") or parts[0] in nested:
            continue
        pages.append(path.relative_to(HTML).as_posix())
    return sorted(pages)


def _in_edition(page_path: str) -> tuple[str, str]:
    """(edition, path inside the edition) of a page path."""
    for edition in EDITION_DIRS:
        if edition and page_path.startswith(edition + "/"):
            return edition, page_path[len(edition) + 1:]
    return "", page_path


PAGES = [p for e in EDITIONS for p in _edition_pages(e)]
CHAPTER_PAGES = [p for p in PAGES if _in_edition(p)[1].startswith("chapters/")]


def _grouped(values, group=lambda v: v):
    """Parameters that xdist keeps together under `-n 2 --dist loadgroup`: all the checks of one
    page run in the worker that visited it, so each page is opened once (`make check-book`)."""
    return [pytest.param(v, marks=pytest.mark.xdist_group(f"page:{group(v)}"), id=v or "en")
            for v in values]

LOCAL = ("file://", "data:", "blob:", "about:")
SETTLE_MS = 20_000  # the longest a page may take to render its widgets and math
DESKTOP = {"width": 1280, "height": 900}
COLUMN_SLACK_PX = 1  # rounding of sub-pixel layout
# Visible TeX source: a dollar sign or a TeX command (as typed in the notebooks) in the page's text.
TEX = re.compile(r"\$|\\(?:[()\[\]]|(?:frac|tfrac|dfrac|varepsilon|epsilon|delta|Delta|sigma|"
                 r"Pr|mathcal|mathbb|mathrm|mathbf|operatorname|sqrt|sum|prod|cdot|times|le|leq|"
                 r"ge|geq|ne|approx|ln|log|exp|hat|tilde|bar|text|left|right|begin|end|tau|mu|"
                 r"lambda|alpha|beta|gamma|theta|pi|infty|in|top|lVert|rVert|ell|min|max|quad)"
                 r"(?![A-Za-z]))")


def _toc_files(node) -> list[str]:
    """Every `file:` entry of `_toc.yml`, recursively."""
    if isinstance(node, dict):
        found = [node["file"]] if "file" in node else []
        if "root" in node:
            found.append(node["root"])
        return found + [f for value in node.values() for f in _toc_files(value)]
    if isinstance(node, list):
        return [f for item in node for f in _toc_files(item)]
    return []


TOC = _toc_files(yaml.safe_load((ROOT / "_toc.yml").read_text()))


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Chromium is needed for the built-book checks (.ci/run installs it)")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


class Visit:
    """One page opened in a fresh tab, with everything that went wrong while it loaded."""

    def __init__(self, browser, page_path: str, viewport: dict | None = None, url: str = ""):
        self.page = browser.new_page(viewport=viewport or DESKTOP)
        self.requests: list[str] = []
        self.problems: list[str] = []
        self.pending: set = set()
        page = self.page
        page.on("request", lambda r: (self.requests.append(r.url), self.pending.add(r)))
        page.on("requestfinished", lambda r: self.pending.discard(r))
        page.on("requestfailed", lambda r: self.pending.discard(r))
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("console", lambda m: m.type == "error" and self.problems.append(
            f"console error: {m.text} ({m.location.get('url', '')})"))
        page.on("requestfailed", lambda r: self.problems.append(
            f"failed request: {r.url} ({r.failure})"))
        page.on("response", lambda r: r.status >= 400 and self.problems.append(
            f"HTTP {r.status}: {r.url}"))
        page.goto(url or (HTML / page_path).as_uri(), wait_until="load")

    def settle(self) -> "Visit":
        """Wait until widgets and math have rendered and every font has loaded (or failed)."""
        self.page.wait_for_function(
            """() => {
                const views = document.querySelectorAll(
                    'script[type="application/vnd.jupyter.widget-view+json"]').length;
                // without saved widget state a view never renders (test_no_inert_ipywidget...)
                const state = document.querySelector(
                    'script[type="application/vnd.jupyter.widget-state+json"]');
                const widgets = document.querySelectorAll('.jupyter-widgets').length;
                const math = document.querySelectorAll('.math').length;
                const rendered = document.querySelectorAll('mjx-container').length;
                return (views === 0 || !state || widgets > 0) && (math === 0 || rendered > 0);
            }""", timeout=SETTLE_MS)
        self.page.evaluate("() => document.fonts.ready.then(() => true)")
        quiet = 0  # ms without a request in flight (Playwright's "networkidle" hangs on file://)
        for _ in range(SETTLE_MS // 100):
            quiet = 0 if self.pending else quiet + 100
            if quiet >= 500:
                return self
            self.page.wait_for_timeout(100)
        raise AssertionError(f"requests still pending: {[r.url for r in self.pending][:3]}")

    def external(self) -> list[str]:
        return [u for u in self.requests if not u.startswith(LOCAL)]


# ---------------------------------------------------------------------------------------------
# One visit per page at 1280 px: what the reader sees (tests/built_book_inspect.js does the
# measuring in the page; each test below asserts one part of its report)
# ---------------------------------------------------------------------------------------------

INSPECT_JS = (Path(__file__).with_name("built_book_inspect.js")).read_text()


@functools.cache
def _report(browser, page_path: str) -> dict:
    visit = Visit(browser, page_path).settle()
    report = visit.page.evaluate(INSPECT_JS, TEX.pattern)  # also marks the Explore sections
    report["problems"] = visit.problems + [f"network request: {u}" for u in visit.external()]
    # Then the same page on a phone, and last, since it changes the page, every control of every
    # Explore figure moved: one visit per page for all of these checks.
    report["phone"] = _on_a_phone(visit)
    report["controls"] = _move_every_control(visit, page_path)
    visit.page.close()
    return report


def _move_every_control(visit: Visit, page_path: str) -> dict:
    """Move each control of each responding Explore figure to another end of its range: the
    figure's selection and drawing must change and exactly one figure stay visible."""
    roots = visit.page.locator("section.privrec-explore .privrec-static-widget, "
                               "section.privrec-explore .privrec-explorer")
    bad = []
    for k in range(roots.count()):
        root = roots.nth(k)
        names = root.locator('input[type="range"]').evaluate_all("els => els.map(e => e.name)")
        if not names:
            bad.append(f"figure {k} has no control")
        for name in names:
            before = (root.get_attribute("data-selected"), root.inner_html())
            root.locator(f'input[name="{name}"]').evaluate(
                "el => { el.value = el.value === '0' ? el.max : '0';"
                " el.dispatchEvent(new Event('input')); }")
            after = (root.get_attribute("data-selected"), root.inner_html())
            if after[0] == before[0]:
                bad.append(f"moving {name!r} selected nothing new")
            if after[1] == before[1]:
                bad.append(f"moving {name!r} left the figure as it was")
            visible = root.locator("figure:visible img, svg[role='img']").count()
            if visible != 1:
                bad.append(f"{visible} figures visible after moving {name!r}")
    problems = visit.problems + [f"network request: {u}" for u in visit.external()]
    return {"roots": roots.count(), "bad": bad, "problems": problems}


@pytest.mark.parametrize("edition", _grouped(EDITIONS, lambda e: f"edition {e}"))
def test_every_page_of_the_toc_was_built(edition):
    pages = {_in_edition(p)[1] for p in _edition_pages(edition)}
    missing = [f for f in TOC if f"{Path(f).with_suffix('')}.html" not in pages]
    assert not missing, f"pages of _toc.yml missing from the {edition or 'root'} edition: {missing}"


@pytest.mark.parametrize("page_path", _grouped(PAGES))
def test_page_loads_without_errors(browser, page_path):
    problems = _report(browser, page_path)["problems"]
    assert not problems, f"{page_path}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("page_path", _grouped(PAGES))
def test_no_tex_source_is_visible(browser, page_path):
    hits = _report(browser, page_path)["tex"]
    assert not hits, f"{page_path}: TeX source in the text (not rendered as math):\n  " + "\n  ".join(
        hits[:8])


@pytest.mark.parametrize("page_path", _grouped(PAGES))
def test_outputs_and_tables_fit_the_text_column(browser, page_path):
    report = _report(browser, page_path)
    wide = [f"{w['width']} px > {report['column']} px: {w['what']}" for w in report["wide"]]
    assert report["column"] >= 600, report["column"]
    assert not wide, f"{page_path}: wider than the text column at 1280 px:\n  " + "\n  ".join(wide[:8])


def _descriptive(alt: str) -> bool:
    alt = alt.strip()
    return (len(alt) >= 15 and len(alt.split()) >= 3 and not alt.startswith(("{", "_images", "<"))
            and not re.search(r"\.(png|jpe?g|gif|svg)$", alt, re.IGNORECASE))


@pytest.mark.parametrize("page_path", _grouped(PAGES))
def test_figures_have_alt_text_and_are_drawn_for_the_column(browser, page_path):
    report = _report(browser, page_path)
    bad = []
    for image in report["images"]:
        where = f"{image['kind']} {image['src']}"
        if not _descriptive(image["alt"]):
            bad.append(f"{where}: alt text {image['alt'][:60]!r} does not say what it shows")
        if image["shown"] and image["natural"] and image["shown"] < 0.9 * image["natural"]:
            bad.append(f"{where}: shown at {image['shown']:.0f} px of its {image['natural']} px "
                       f"(its text shrinks below 10 px): draw it 6.9 in wide at dpi 100")
        if image["figure"] and image["natural"] and image["natural"] < 0.8 * report["column"]:
            bad.append(f"{where}: drawn {image['natural']} px wide, for a {report['column']} px "
                       f"column: draw it 6.9 in wide at dpi 100 (privrec.course.figures)")
    assert not bad, f"{page_path}:\n  " + "\n  ".join(bad[:10])


@pytest.mark.parametrize("page_path", _grouped(PAGES))
def test_no_solution_is_visible_without_a_click(browser, page_path):
    shown = _report(browser, page_path)["solutions"]
    assert not shown, f"{page_path}: solution text visible without a click:\n  " + "\n  ".join(shown[:5])


@pytest.mark.parametrize("page_path", _grouped(PAGES))
def test_no_inert_ipywidget_in_the_page(browser, page_path):
    # A live ipywidget cannot recompute without a kernel: the published page shows the static face
    # and the live cell is tagged remove-cell (issue 23.3).
    widgets = _report(browser, page_path)["widgets"]
    assert widgets == 0, f"{page_path}: {widgets} ipywidget view(s) in the page; tag the cell remove-cell"


PHONE = {"width": 390, "height": 800}
PHONE_JS = """() => {
    const W = document.documentElement.clientWidth, out = [];
    for (const el of document.querySelectorAll('article *')) {
        const r = el.getBoundingClientRect();
        if (r.right <= W + 1 || !el.getClientRects().length) continue;
        let clipped = false;  // inside a box that scrolls or clips: the page does not move
        for (let a = el.parentElement; a && a !== document.body; a = a.parentElement) {
            if (getComputedStyle(a).overflowX !== 'visible') { clipped = true; break; }
        }
        if (!clipped) out.push(`${el.tagName.toLowerCase()} to ${Math.round(r.right)} px: ` +
                               (el.textContent || '').trim().slice(0, 60));
    }
    return {wide: out, width: document.documentElement.scrollWidth};
}"""


def _on_a_phone(visit: Visit) -> dict:
    """The page of ``visit`` narrowed to a phone's 390 px (CSS media queries and the figures'
    scaling apply as on a phone; the menu test loads pages at 390 px from the start)."""
    visit.page.set_viewport_size(PHONE)
    visit.page.evaluate("() => new Promise(r => requestAnimationFrame(() => "
                        "requestAnimationFrame(() => r(true))))")
    return visit.page.evaluate(PHONE_JS)


@pytest.mark.parametrize("page_path", _grouped(PAGES))
def test_no_page_scrolls_sideways_on_a_phone(browser, page_path):
    # At 390 px everything fits the screen: figures scale down, wide outputs scroll in their own
    # box, long code and math wrap or scroll; nothing makes the whole page wider than the phone.
    phone = _report(browser, page_path)["phone"]
    assert phone["width"] <= PHONE["width"] + 1 and not phone["wide"], \
        f"{page_path}: {phone['width']} px wide at 390 px:\n  " + "\n  ".join(phone["wide"][:5])


# ---------------------------------------------------------------------------------------------
# Explore sections: exactly one visible figure, and it responds to every control
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("page_path", _grouped(CHAPTER_PAGES))
def test_every_explore_section_has_exactly_one_figure(browser, page_path):
    report = _report(browser, page_path)
    explores = report["explores"]
    number = int(_in_edition(page_path)[1].split("/")[1][:2])
    if number <= 9:
        assert explores, f"{page_path}: no Explore section"
    bad = [f"{e['title']!r}: {e['figures']} visible figures, {e['roots']} that respond"
           for e in explores if e["figures"] != 1 or e["roots"] != 1]
    assert not bad, f"{page_path}: each Explore section shows ONE figure that responds:\n  " + \
        "\n  ".join(bad)


@pytest.mark.parametrize("page_path", _grouped([p for p in CHAPTER_PAGES
                                                if int(_in_edition(p)[1].split("/")[1][:2]) <= 9]))
def test_every_control_of_every_explore_figure_changes_it(browser, page_path):
    controls = _report(browser, page_path)["controls"]
    assert controls["roots"] >= 1, f"{page_path}: no figure that responds without a kernel"
    assert not controls["bad"], f"{page_path}:\n  " + "\n  ".join(controls["bad"])
    assert not controls["problems"], controls["problems"]


@pytest.mark.parametrize("edition", _grouped(EDITIONS, lambda e: f"edition {e}"))
def test_static_explorer_responds_offline(browser, edition):
    visit = Visit(browser, f"{edition}/chapters/05_user_level_privacy.html".lstrip("/"))
    page = visit.page
    root = page.locator(".privrec-explorer").first
    before = json.loads(root.get_attribute("data-selected"))
    cy_before = page.locator(".privrec-point").first.get_attribute("cy")
    page.eval_on_selector('.privrec-explorer input[name="epsilon"]',
                          "el => { el.value = 0; el.dispatchEvent(new Event('input')); }")
    after = json.loads(root.get_attribute("data-selected"))
    assert before["epsilon"] == 8.0 and after["epsilon"] == 0.5
    assert after["rmse"] != before["rmse"]
    assert page.locator(".privrec-point").first.get_attribute("cy") != cy_before
    assert not visit.external(), f"the page tried the network: {visit.external()[:3]}"
    assert not visit.problems, visit.problems


@pytest.mark.parametrize("edition", _grouped(EDITIONS, lambda e: f"edition {e}"))
def test_math_renders_from_the_vendored_mathjax(browser, edition):
    visit = Visit(browser, f"{edition}/chapters/02_differential_privacy.html".lstrip("/"))
    visit.page.wait_for_selector("mjx-container", timeout=SETTLE_MS)
    assert visit.page.locator("mjx-container").count() > 10
    visit.settle()
    assert not visit.external() and not visit.problems, visit.external() + visit.problems


@pytest.mark.parametrize("edition", _grouped(EDITIONS, lambda e: f"edition {e}"))
def test_every_widget_module_finds_its_fonts_in_the_vendored_folder(browser, edition):
    # Each AMD module of embed-amd.js takes its fonts from the folder of the URI that require.js
    # gives it; with only one module mapped, which @font-face a page used depended on load order
    # (a Chinese page requested fonts at zh/chapters/@jupyter-widgets/ under two workers).
    page_path = f"{edition}/chapters/02_differential_privacy.html".lstrip("/")
    visit = Visit(browser, page_path)
    source = (ROOT / "book/assets/static/vendor/embed-amd.js").read_text()
    modules = sorted(set(re.findall(r'define\("(@jupyter-widgets/[^"]+)"', source)))
    assert len(modules) >= 6, modules
    urls = visit.page.evaluate(
        "ids => ids.map(id => requirejs.s.contexts._.nameToUrl(id))", modules)
    vendor = (HTML / edition / "_static" / "vendor").as_uri() + "/"
    folders = {m: u[:u.rindex("/") + 1] for m, u in zip(modules, urls, strict=True)}
    assert all(f == vendor for f in folders.values()), (vendor, folders)
    visit.page.close()


@pytest.mark.parametrize("edition", _grouped(EDITIONS, lambda e: f"edition {e}"))
def test_wrapped_library_source_keeps_its_indentation(browser, edition):
    # show_source listings wrap inside the column; a continuation starts under the line's own
    # indentation plus four columns, never at the left edge (privrec-pages.js, hangingIndent).
    visit = Visit(browser, f"{edition}/chapters/11_deployment.html".lstrip("/"))
    report = visit.page.evaluate("""() => {
        const pres = document.querySelectorAll(
            'div.cell_output .output.text_html .highlight pre');
        let wrapped = 0, unsplit = 0;
        const bad = [];
        for (const pre of pres) {
            const lines = pre.querySelectorAll('span.privrec-line');
            if (!lines.length) { unsplit += 1; continue; }
            const probe = document.createElement('span');
            probe.textContent = '0'.repeat(10);
            lines[0].append(probe);
            const ch = probe.getBoundingClientRect().width / 10;
            probe.remove();
            for (const line of lines) {
                const range = document.createRange();
                range.selectNodeContents(line);
                const rects = Array.from(range.getClientRects()).filter(r => r.width > 0);
                const top = Math.min(...rects.map(r => r.top));
                const later = rects.filter(r => r.top > top + 2);
                if (!later.length) continue;
                wrapped += 1;
                const text = line.textContent;
                const hang = text.length - text.trimStart().length + 4;
                const left = Math.min(...later.map(r => r.left));
                const base = line.getBoundingClientRect().left;
                if (left < base + hang * ch - 1) bad.push(text.trim().slice(0, 50));
            }
        }
        return {listings: pres.length, unsplit, wrapped, bad};
    }""")
    visit.page.close()
    assert report["listings"] >= 3 and report["unsplit"] == 0, report
    assert report["wrapped"] >= 3, report  # the page has long lines: the check ran
    assert not report["bad"], report


# ---------------------------------------------------------------------------------------------
# Navigation on a phone (390 px), a small laptop (900 px) and a desktop (1280 px)
# ---------------------------------------------------------------------------------------------

def _first_chapter(edition: str) -> str:
    return next(p for p in CHAPTER_PAGES if _in_edition(p)[0] == edition)


@pytest.mark.parametrize("edition", _grouped(EDITIONS, lambda e: f"edition {e}"))
@pytest.mark.parametrize("width", [390, 900])
def test_the_chapter_menu_opens_and_its_links_work(browser, edition, width):
    start = _first_chapter(edition)
    visit = Visit(browser, start, viewport={"width": width, "height": 800}).settle()
    page = visit.page
    toggles = page.locator(".primary-toggle:visible")
    assert toggles.count() == 1, f"{toggles.count()} visible ☰ buttons at {width} px"
    assert not page.locator("#pst-primary-sidebar a.reference:visible").count()  # menu closed
    toggles.first.click()
    menu = page.locator("#pst-primary-sidebar-modal")
    page.wait_for_function("() => document.getElementById('pst-primary-sidebar-modal').open",
                           timeout=5_000)
    links = menu.locator("a.reference.internal:visible")
    hrefs = links.evaluate_all("els => els.map(e => e.getAttribute('href'))")
    here = start.split("/")[-1]
    # the last chapter in the menu (a link to another page; chapters link each other as NN_x.html)
    target = next(h for h in reversed(hrefs)
                  if re.search(r"(^|/)\d\d_\w+\.html$", h) and not h.endswith(here))
    assert len(hrefs) >= len(TOC) - 1, f"the menu shows {len(hrefs)} links at {width} px"
    with page.expect_navigation():
        menu.locator(f'a.reference.internal[href="{target}"]').first.click()
    assert page.url.endswith(target.split("/")[-1]), (page.url, target)
    # "Contents" (this page's sections) opens too, and its links jump within the page
    page.locator(".secondary-toggle:visible").first.click()
    page.wait_for_function("() => document.getElementById('pst-secondary-sidebar-modal').open",
                           timeout=5_000)
    assert page.locator("#pst-secondary-sidebar-modal a.nav-link:visible").count() >= 2
    assert not visit.external() and not visit.problems, visit.external() + visit.problems
    page.close()


@pytest.mark.parametrize("edition", _grouped(EDITIONS, lambda e: f"edition {e}"))
def test_the_menu_button_hides_and_shows_the_sidebar_on_a_desktop(browser, edition):
    visit = Visit(browser, _first_chapter(edition)).settle()
    page = visit.page
    sidebar = page.locator("#pst-primary-sidebar")
    assert sidebar.is_visible()
    page.locator(".primary-toggle:visible").first.click()
    page.wait_for_timeout(400)  # the theme's slide-out transition
    assert not sidebar.is_visible() or sidebar.bounding_box()["width"] < 5
    page.locator(".primary-toggle:visible").first.click()
    page.wait_for_timeout(400)
    assert sidebar.is_visible() and sidebar.bounding_box()["width"] > 100
    assert not visit.problems, visit.problems
    page.close()


# ---------------------------------------------------------------------------------------------
# Search: results with snippets (served over http, as a reader's browser fetches them)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


SEARCH_TERMS = {"": "sensitivity", "zh": "DP-SGD"}  # a word near math on several pages (Sphinx splits
# Chinese text without a dictionary, so the Chinese edition is searched for a Latin term)


@pytest.mark.parametrize("edition", _grouped(EDITIONS, lambda e: f"edition {e}"))
def test_search_finds_pages_and_its_snippets_show_no_tex(browser, server, edition):
    prefix = f"/{edition}" if edition else ""
    term = SEARCH_TERMS.get(edition, SEARCH_TERMS[""])
    visit = Visit(browser, "", url=f"{server}{prefix}/search.html?q={term}")
    page = visit.page
    page.wait_for_function("() => document.querySelectorAll('#search-results p.context').length >= 3",
                           timeout=SETTLE_MS)
    page.wait_for_timeout(1_000)  # the remaining snippets
    snippets = page.locator("#search-results p.context").all_inner_texts()
    tex = [s for s in snippets if TEX.search(s)]
    assert not tex, f"search snippets with TeX source: {[s[:120] for s in tex[:3]]}"
    assert any("ε" in s for s in snippets), "no snippet shows ε: is math converted to text?"
    assert not [u for u in visit.requests if not u.startswith((server, *LOCAL))]
    page.close()

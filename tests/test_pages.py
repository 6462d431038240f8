"""The front and back matter cannot go stale (issue 22.8): every chapter of `_toc.yml` is linked
from the introduction, the instructor's guide and the applications page; every glossary term that a
chapter or a page links with {term} exists in book/glossary.md; no page promises a chapter "in
preparation". Each check is a function of the repository root, so the tests at the end run it on a
mutated copy (tmp_path) and show that it fails.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# The pages that must link every chapter of the table of contents.
CHAPTER_INDEXES = ("book/intro.md", "book/instructor_guide.md", "book/applications.md")
TERM = re.compile(r"\{term\}`([^`]+)`")


def toc_chapters(root: Path) -> list[str]:
    """The chapters of the table of contents, as paths without suffix (``chapters/01_...``)."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    found = []

    def walk(node):
        if isinstance(node, dict):
            if str(node.get("file", "")).startswith("chapters/"):
                found.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc)
    return found


def links_to(text: str, chapter: str) -> bool:
    """Whether ``text`` links ``chapter`` with {doc} or a Markdown link (any relative prefix)."""
    name = re.escape(chapter.split("/")[-1])
    return bool(re.search(rf"\{{doc\}}`(?:[^`<]*<)?[./]*(?:chapters/)?{name}>?`", text)
                or re.search(rf"\]\([./]*(?:chapters/)?{name}(?:\.ipynb|\.md|\.html)?(?:#[^)]*)?\)", text))


def chapters_missing_from_indexes(root: Path) -> dict[str, list[str]]:
    """Index page -> the chapters of `_toc.yml` it does not link (empty when all are there)."""
    chapters = toc_chapters(root)
    missing = {}
    for page in CHAPTER_INDEXES:
        text = (root / page).read_text()
        absent = [c for c in chapters if not links_to(text, c)]
        if absent:
            missing[page] = absent
    return missing


def glossary_terms(root: Path) -> set[str]:
    """Every term of the ```{glossary} block of book/glossary.md, lower-cased (Sphinx matches terms
    case-insensitively)."""
    text = (root / "book" / "glossary.md").read_text()
    block = text.split("```{glossary}", 1)[1].split("\n```", 1)[0]
    return {line.strip().lower() for line in block.splitlines()
            if line.strip() and not line.startswith((" ", "\t", ":"))}


def _sources(root: Path) -> dict[str, str]:
    """The Markdown a reader sees, per file: book pages and the chapters' Markdown cells."""
    texts = {p.relative_to(root).as_posix(): p.read_text() for p in sorted((root / "book").glob("*.md"))}
    for path in sorted((root / "chapters").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        texts[path.relative_to(root).as_posix()] = "\n".join(
            "".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return texts


def linked_terms(text: str) -> list[str]:
    """The glossary targets of every {term} role in ``text`` (``{term}`shown <target>` `` too)."""
    targets = []
    for inner in TERM.findall(text):
        match = re.search(r"<([^<>]+)>\s*$", inner)
        targets.append(" ".join((match.group(1) if match else inner).split()))
    return targets


def unknown_terms(root: Path) -> dict[str, list[str]]:
    """File -> the {term} targets that are not glossary terms."""
    terms = glossary_terms(root)
    unknown = {}
    for name, text in _sources(root).items():
        bad = sorted({t for t in linked_terms(text) if t.lower() not in terms})
        if bad:
            unknown[name] = bad
    return unknown


def stale_promises(root: Path) -> dict[str, list[str]]:
    """Page -> its sentences that promise a chapter or page "in preparation" / "being written"."""
    stale = {}
    for path in sorted((root / "book").glob("*.md")):
        hits = re.findall(r"[^.\n]*(?:in preparation|being written|when (?:they are|it is) published)"
                          r"[^.\n]*", path.read_text())
        if hits:
            stale[path.relative_to(root).as_posix()] = hits
    return stale


# ---------------------------------------------------------------------------------------------
# The repository as it is
# ---------------------------------------------------------------------------------------------

def test_every_toc_chapter_is_linked_from_the_intro_the_guide_and_the_applications_page():
    assert len(toc_chapters(ROOT)) >= 9
    assert chapters_missing_from_indexes(ROOT) == {}


def test_every_linked_glossary_term_exists():
    assert len(glossary_terms(ROOT)) >= 200  # English and Chinese entries
    assert unknown_terms(ROOT) == {}


def test_no_page_promises_a_chapter_in_preparation():
    assert stale_promises(ROOT) == {}


def test_the_glossary_and_the_guide_use_the_books_notation():
    # notation.md: item factors v_i (q is the sampling rate), contribution bound τ (m is the cohort)
    for page in ("book/glossary.md", "book/instructor_guide.md"):
        text = (ROOT / page).read_text()
        assert not re.search(r"q_i|q_\{i\}|\(Q,", text), f"{page}: item factors are v_i / V"
    contribution = (ROOT / "book/glossary.md").read_text().split("contribution bounding", 1)[1][:300]
    assert "\\tau" in contribution and "$m$" not in contribution


def test_how_to_use_names_the_repository():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    text = (ROOT / "book/how_to_use.md").read_text()
    assert config["repository"]["url"] in text and "<this repository>" not in text


# ---------------------------------------------------------------------------------------------
# The checks fail on mutated copies
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def copy(tmp_path):
    for name in ("_toc.yml", "_config.yml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "book", tmp_path / "book", ignore=shutil.ignore_patterns("_ext", "assets"))
    shutil.copytree(ROOT / "chapters", tmp_path / "chapters",
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    return tmp_path


def test_a_new_toc_chapter_missing_from_the_indexes_fails(copy):
    toc = (copy / "_toc.yml").read_text()
    (copy / "_toc.yml").write_text(toc.replace(
        "      - file: chapters/09_attacks_as_measurements",
        "      - file: chapters/12_something_new\n      - file: chapters/09_attacks_as_measurements"))
    missing = chapters_missing_from_indexes(copy)
    assert set(missing) == set(CHAPTER_INDEXES)
    assert all(m == ["chapters/12_something_new"] for m in missing.values())


def test_a_chapter_removed_from_the_intro_fails(copy):
    intro = copy / "book" / "intro.md"
    chapter = toc_chapters(copy)[3]
    kept = [line for line in intro.read_text().splitlines() if chapter.split("/")[-1] not in line]
    intro.write_text("\n".join(kept))
    assert chapters_missing_from_indexes(copy) == {"book/intro.md": [chapter]}


def test_a_link_to_a_missing_glossary_term_fails(copy):
    path = sorted((copy / "chapters").glob("*.ipynb"))[0]
    notebook = json.loads(path.read_text())
    cell = next(c for c in notebook["cells"] if c["cell_type"] == "markdown")
    added = "See {term}`federated unicorns` and {term}`the unit <privacy unit>`.\n"
    cell["source"] = [added] + cell["source"]
    path.write_text(json.dumps(notebook))
    assert unknown_terms(copy) == {f"chapters/{path.name}": ["federated unicorns"]}


def test_a_glossary_term_removed_while_a_page_links_it_fails(copy):
    glossary = copy / "book" / "glossary.md"
    text = glossary.read_text()
    assert "\nclient drift\n" in text
    glossary.write_text(text.replace("\nclient drift\n", "\n"))
    unknown = unknown_terms(copy)
    assert any("client drift" in terms for terms in unknown.values()), unknown


def test_a_page_promising_a_chapter_in_preparation_fails(copy):
    page = copy / "book" / "applications.md"
    page.write_text(page.read_text() + "\nChapter 12 (in preparation) will cover unlearning.\n")
    assert list(stale_promises(copy)) == ["book/applications.md"]


def test_bibliography_labels_are_author_year_and_unique():
    # book/_ext/privrec_bib.py: the bibliography's labels are the text's author-year citations.
    import importlib.util

    from pybtex.database import parse_file

    spec = importlib.util.spec_from_file_location("privrec_bib", ROOT / "book/_ext/privrec_bib.py")
    bib = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bib)
    entries = list(parse_file(str(ROOT / "book/references.bib")).entries.values())
    labels = list(bib.AuthorYearLabelStyle().format_labels(entries))
    assert len(set(labels)) == len(labels) == len(entries)
    bad = [label for label in labels if not re.fullmatch(r"[^\s,][^,]*, (\d{4}[a-z]?|n\.d\.)", label)]
    assert not bad, bad
    dwork = next(e for e in entries if e.key == "dwork2006calibrating")
    assert bib.author_year(dwork) == "Dwork et al., 2006"

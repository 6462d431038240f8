"""The Chinese edition (中文版): generated from the English book and a translation store.

One source of truth for code and numbers, two languages of prose. Every unit of English prose -- a
markdown cell of a chapter (keyed by its notebook cell id) or a section of a front/back-matter page
(keyed by its heading) -- has a translation in ``book/zh/<path>.md`` that records the SHA-256 prefix
of the English text it translates::

    <!-- zh-unit: 3f7eef82 en-sha: 1a2b3c4d5e6f -->
    中文译文……

The generated Chinese chapter is the English notebook with each markdown cell replaced by its
translation; code cells and their executed outputs are copied unchanged, so every number is the same
nbval-verified number and nothing executes twice. A translation whose recorded hash differs from the
English unit's is *stale*; ``tests/test_zh_edition.py`` fails on any stale or missing unit.

Usage::

    python tools/zh_edition.py stale              # what to (re)translate, unit by unit
    python tools/zh_edition.py show PATH UNIT     # the English text of one unit and its hash
    python tools/zh_edition.py skeleton PATH      # the page's store file, every missing or stale unit
                                                  # as "TODO-EN" + English text, to translate in place
    python tools/zh_edition.py build OUT          # the Chinese book's sources in OUT (jupyter-book build OUT)
    python tools/zh_edition.py accept PATH UNIT   # after checking that a stale translation still says
                                                  # what the changed English says: record the new hash
    python tools/zh_edition.py preview OUT        # the same, English text where a translation is missing
                                                  # (a translator's check that the pages build; never CI)
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "book" / "zh"
META = STORE / "meta.yml"
MARK = re.compile(r"^<!-- zh-unit: (?P<uid>\S+) en-sha: (?P<sha>[0-9a-f]{12}) -->[ \t]*$", re.M)
HEADING = re.compile(r"^#{1,6}\s+(.*)$")
LABEL = re.compile(r"^\(\S+\)=\s*$")


def toc_files(toc_path: Path = ROOT / "_toc.yml") -> list[str]:
    """Every page of the English book, in reading order, as a path relative to the root with suffix."""
    toc = yaml.safe_load(toc_path.read_text())
    stems = [toc["root"]] + [c["file"] for part in toc.get("parts", []) for c in part["chapters"]]
    out = []
    for stem in stems:
        matches = [s for s in (".ipynb", ".md") if (toc_path.parent / f"{stem}{s}").is_file()]
        if not matches:
            raise FileNotFoundError(f"_toc.yml names {stem!r}, which has no .ipynb or .md file")
        out.append(stem + matches[0])
    return out


def _slug(text: str) -> str:
    text = re.sub(r"[`*_{}\[\]()$\\]", "", text.lower())
    return re.sub(r"[^0-9a-z\u4e00-\u9fff]+", "-", text).strip("-")[:48] or "section"


def _markdown_units(text: str) -> list[tuple[str, str]]:
    """A page split at its headings (outside code fences); a heading's label line goes with it."""
    blocks: list[tuple[str, list[str]]] = [("top", [])]
    fence, glossary, previous_blank = None, False, True
    for line in text.splitlines():
        stripped = line.strip()
        opened = re.match(r"^(`{3,}|~{3,}|:{3,})", stripped) if fence is None else None
        if opened:
            fence, glossary = opened.group(1), "{glossary}" in stripped
        elif fence is not None and stripped.startswith(fence) and not stripped[len(fence):].strip():
            fence, glossary = None, False
        heading = HEADING.match(line) if fence is None else None
        entry = (glossary and not opened and previous_blank and stripped
                 and not line[0].isspace() and not stripped.startswith(":"))
        previous_blank = not stripped
        if entry:  # one glossary entry (its term lines and definition) is one unit
            blocks.append(("term-" + _slug(stripped), [line]))
        elif heading:
            label = []
            previous = blocks[-1][1]
            while previous and (LABEL.match(previous[-1]) or not previous[-1].strip()):
                label.insert(0, previous.pop())
            blocks.append((_slug(heading.group(1)), [*label, line]))
        else:
            blocks[-1][1].append(line)
    units, seen = [], {}
    for uid, lines in blocks:
        body = "\n".join(lines).strip("\n")
        if not body.strip():
            continue
        seen[uid] = seen.get(uid, 0) + 1
        units.append((uid if seen[uid] == 1 else f"{uid}-{seen[uid]}", body))
    return units


def units_of(relpath: str, root: Path = ROOT) -> list[tuple[str, str]]:
    """(unit id, English text) of every unit of prose of a page."""
    path = root / relpath
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text())["cells"]
        missing = [i for i, c in enumerate(cells) if not c.get("id")]
        if missing:
            raise ValueError(f"{relpath}: cells {missing} have no id (nbformat >= 4.5 ids are required)")
        return [(c["id"], "".join(c["source"]).strip("\n")) for c in cells if c["cell_type"] == "markdown"]
    return _markdown_units(path.read_text())


def unit_hash(text: str) -> str:
    """The 12-hex-digit SHA-256 prefix of an English unit (surrounding blank lines ignored)."""
    return hashlib.sha256(text.strip().encode()).hexdigest()[:12]


def store_path(relpath: str, store: Path = STORE) -> Path:
    return store / Path(relpath).with_suffix(".md")


def read_store(relpath: str, store: Path = STORE) -> dict[str, tuple[str, str]]:
    """unit id -> (recorded English hash, Chinese text) of one page's translation file."""
    path = store_path(relpath, store)
    if not path.is_file():
        return {}
    text = path.read_text()
    marks = list(MARK.finditer(text))
    out = {}
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        out[mark["uid"]] = (mark["sha"], text[mark.end():end].strip("\n"))
    return out


def stale_units(root: Path = ROOT, store: Path = STORE) -> list[tuple[str, str, str]]:
    """(page, unit id, "missing" | "stale" | "orphan") for every unit whose translation is not current."""
    problems = []
    for relpath in toc_files(root / "_toc.yml"):
        english = units_of(relpath, root)
        zh = read_store(relpath, store)
        for uid, text in english:
            if uid not in zh or not zh[uid][1].strip() or zh[uid][1].lstrip().startswith(TODO):
                problems.append((relpath, uid, "missing"))
            elif zh[uid][0] != unit_hash(text):
                problems.append((relpath, uid, "stale"))
        problems += [(relpath, uid, "orphan") for uid in zh if uid not in dict(english)]
    return problems


TODO = "TODO-EN"


def skeleton(relpath: str, store: Path = STORE) -> Path:
    """Rewrite a page's store file in English order: current translations kept, every missing or
    stale unit replaced by ``TODO-EN`` and its English text (the test fails until it is translated)."""
    zh = read_store(relpath, store)
    parts = []
    for uid, text in units_of(relpath):
        sha = unit_hash(text)
        body = zh[uid][1] if uid in zh and zh[uid][0] == sha else f"{TODO}\n{text}"
        parts.append(f"<!-- zh-unit: {uid} en-sha: {sha} -->\n{body}\n")
    path = store_path(relpath, store)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path


def accept(relpath: str, uid: str, store: Path = STORE) -> None:
    """Re-stamp one unit's translation with the current English hash (a reviewer's decision that the
    translation still matches the changed English; the store file is otherwise unchanged)."""
    text = dict(units_of(relpath))[uid]
    path = store_path(relpath, store)
    pattern = re.compile(rf"^<!-- zh-unit: {re.escape(uid)} en-sha: [0-9a-f]{{12}} -->", re.M)
    source = path.read_text()
    if not pattern.search(source):
        raise SystemExit(f"{relpath}: no translation of unit {uid} to accept")
    path.write_text(pattern.sub(f"<!-- zh-unit: {uid} en-sha: {unit_hash(text)} -->", source))


def _zh_notebook(relpath: str, zh: dict[str, tuple[str, str]]) -> dict:
    nb = json.loads((ROOT / relpath).read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            text = zh[cell["id"]][1] if cell["id"] in zh else "".join(cell["source"])
            lines = text.split("\n")
            cell["source"] = [line + "\n" for line in lines[:-1]] + [lines[-1]]
    nb.setdefault("metadata", {})["language_edition"] = "zh"
    return nb


def _zh_config(meta: dict) -> dict:
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config["title"] = meta["title"]
    config["execute"]["execute_notebooks"] = "off"
    sphinx = config.setdefault("sphinx", {}).setdefault("config", {})
    sphinx["language"] = "zh_CN"
    sphinx["privrec_edition"] = "zh"
    return config


def _zh_toc(meta: dict) -> dict:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    for part in toc.get("parts", []):
        part["caption"] = meta["captions"].get(part["caption"], part["caption"])
    return toc


def _current(relpath: str, store: Path) -> dict[str, tuple[str, str]]:
    """The page's translations that are current (hash matches, not a TODO)."""
    zh = read_store(relpath, store)
    return {uid: zh[uid] for uid, text in units_of(relpath)
            if uid in zh and zh[uid][0] == unit_hash(text) and not zh[uid][1].lstrip().startswith(TODO)}


def build(out: Path, store: Path = STORE, *, preview: bool = False) -> None:
    """Write the Chinese book's sources into ``out``; fails on any missing or stale translation
    (``preview=True``: falls back to the English text instead, for a translator's build check)."""
    problems = [p for p in stale_units(ROOT, store) if p[2] != "orphan"]
    if problems and not preview:
        raise SystemExit("translations not current (run `python tools/zh_edition.py stale`):\n"
                         + "\n".join(f"  {page} {uid}: {why}" for page, uid, why in problems[:40]))
    meta = yaml.safe_load((store / META.name).read_text())
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "_config.yml").write_text(yaml.safe_dump(_zh_config(meta), allow_unicode=True, sort_keys=False))
    (out / "_toc.yml").write_text(yaml.safe_dump(_zh_toc(meta), allow_unicode=True, sort_keys=False))
    for name in ("_ext", "assets"):
        shutil.copytree(ROOT / "book" / name, out / "book" / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "book" / "references.bib", out / "book" / "references.bib")
    for relpath in toc_files():
        zh = _current(relpath, store)
        target = out / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        if relpath.endswith(".ipynb"):
            target.write_text(json.dumps(_zh_notebook(relpath, zh), ensure_ascii=False, indent=1) + "\n")
        else:
            target.write_text("\n\n".join(zh[uid][1] if uid in zh else text
                                          for uid, text in units_of(relpath)) + "\n")


def main(argv: list[str]) -> int:
    if argv[:1] == ["stale"]:
        problems = stale_units()
        for page, uid, why in problems:
            print(f"{why:8s} {page} {uid}")
        print(f"{len(problems)} unit(s) to translate" if problems else "every unit is current")
        return 1 if any(p[2] != "orphan" for p in problems) else 0
    if argv[:1] == ["show"] and len(argv) == 3:
        text = dict(units_of(argv[1]))[argv[2]]
        print(f"<!-- zh-unit: {argv[2]} en-sha: {unit_hash(text)} -->\n{text}")
        return 0
    if argv[:1] == ["accept"] and len(argv) == 3:
        accept(argv[1], argv[2])
        return 0
    if argv[:1] == ["skeleton"] and len(argv) == 2:
        print(skeleton(argv[1]))
        return 0
    if argv[:1] in (["build"], ["preview"]) and len(argv) == 2:
        build(Path(argv[1]).resolve(), preview=argv[0] == "preview")
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

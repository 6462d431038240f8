"""Link each chapter's key terms, at first use, to the glossary ({term} role of book/glossary.md).

For every English entry of the glossary (and a few abbreviations, see SYNONYMS) the first
occurrence in a chapter's markdown prose becomes ``{term}`text <entry>``` -- outside headings,
quotes, math, code, links, roles and HTML. Run it again after editing a chapter: it only adds links
for terms that are not linked yet.

Usage: python tools/glossary_links.py chapters/01_*.ipynb ...
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Abbreviations and variants the chapters use -> glossary entry.
SYNONYMS = {"RMSE": "root mean squared error", "MAE": "mean absolute error",
            "NDCG": "normalised discounted cumulative gain", "HR@10": "hit rate",
            "accountant": "privacy accountant", "ledger": "privacy ledger",
            "neighbouring": "neighbouring data sets", "randomised response": "randomized response",
            "federated averaging": "FedAvg", "secure aggregation": "secure aggregation",
            "k-RR": "k-ary randomized response",
            "rating-level": "rating-level differential privacy",
            "user-level": "user-level differential privacy", "local DP": "local differential privacy",
            "central DP": "central differential privacy", "RDP": "Rényi differential privacy",
            "audit": "empirical privacy audit"}
CJK = re.compile(r"[\u3000-\u9fff]")
# Entries too generic to link in running text.
SKIP = {"client", "delta", "prompt", "robustness", "composition", "re-identification"}
PROTECT = re.compile(
    r"```(?!\{)[\s\S]*?```"           # code fences (directives such as ```{admonition} stay prose)
    r"|\$\$[\s\S]*?\$\$|\$[^$\n]+\$"   # math
    r"|\{[a-z:]+\}`[^`]*`|`[^`]*`"     # roles, inline code
    r"|\[[^\]]*\]\([^)]*\)|<[^>]+>"    # links, HTML
    r"|^(?:#|>|:)[^\n]*",              # headings, quotes, directive options
    re.MULTILINE)


def glossary_entries(path: Path = ROOT / "book" / "glossary.md") -> list[str]:
    text = path.read_text().split("```{glossary}", 1)[1].split("\n```", 1)[0]
    return [line.strip() for line in text.splitlines()
            if line and not line.startswith((" ", ":")) and not CJK.search(line)]


def _patterns(entries: list[str]) -> list[tuple[re.Pattern, str]]:
    terms = {e: e for e in entries if e not in SKIP} | {k: v for k, v in SYNONYMS.items()
                                                          if v in entries}
    ordered = sorted(terms, key=len, reverse=True)  # longest first: "sequential composition" wins
    return [(re.compile(rf"(?<![\w-]){re.escape(t)}(?:s|es)?(?![\w-])",
                        0 if t.isupper() or t[0].isupper() else re.IGNORECASE), terms[t])
            for t in ordered]


def _link_first(source: str, pattern: re.Pattern, entry: str) -> str | None:
    """``source`` with the first unprotected match linked, or None when there is none."""
    position = 0
    for protected in [*PROTECT.finditer(source), None]:
        end = protected.start() if protected else len(source)
        match = pattern.search(source, position, end)
        if match:
            text = match.group(0)
            role = f"{{term}}`{text}`" if text == entry else f"{{term}}`{text} <{entry}>`"
            return source[:match.start()] + role + source[match.end():]
        if protected is None:
            return None
        position = protected.end()
    return None


def link_notebook(path: Path, entries: list[str]) -> list[str]:
    notebook = json.loads(path.read_text())
    cells = [c for c in notebook["cells"] if c["cell_type"] == "markdown"]
    linked_already = {m for c in cells for m in re.findall(r"\{term\}`(?:[^`<]*<)?([^`>]+)>?`",
                                                           "".join(c["source"]))}
    added = []
    for pattern, entry in _patterns(entries):
        if entry in linked_already:
            continue
        for cell in cells:
            new = _link_first("".join(cell["source"]), pattern, entry)
            if new is not None:
                cell["source"] = new.splitlines(keepends=True)
                linked_already.add(entry)
                added.append(entry)
                break
    if added:
        path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")
    return added


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    args = parser.parse_args(argv)
    entries = glossary_entries()
    for path in args.notebooks:
        added = link_notebook(path, entries)
        print(f"{path.name}: {len(added)} terms linked: {', '.join(added)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

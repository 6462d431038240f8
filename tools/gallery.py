"""Full-page screenshots of every built page, as a reader sees it (issue 23): `make gallery`.

``python tools/gallery.py [--html _build/html] [--out _build/gallery] [--widths 1280 390]`` opens
every page of the built book (every edition: zh/ included) in headless Chromium (offline, as
tests/test_built_book.py does), waits for math and figures, and writes
``OUT/<width>/<page path with / as __>.png``. The gallery is for looking, not committed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pages(html: Path) -> list[str]:
    """Every page of every edition (Sphinx's _static and friends excluded)."""
    found = []
    for path in sorted(html.rglob("*.html")):
        parts = path.relative_to(html).parts
        if any(part.startswith("_") for part in parts):
            continue
        found.append(path.relative_to(html).as_posix())
    return found


def shoot(html: Path, out: Path, widths: list[int]) -> int:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("gallery: Chromium is needed (apt-get install chromium)", file=sys.stderr)
        return 1
    targets = pages(html)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        for width in widths:
            folder = out / str(width)
            folder.mkdir(parents=True, exist_ok=True)
            for page_path in targets:
                page = browser.new_page(viewport={"width": width, "height": 900})
                page.goto((html / page_path).as_uri(), wait_until="load")
                page.wait_for_function("() => document.querySelectorAll('.math').length === 0"
                                       " || document.querySelectorAll('mjx-container').length > 0",
                                       timeout=20_000)
                page.evaluate("() => document.fonts.ready.then(() => true)")
                page.wait_for_timeout(300)
                name = page_path.removesuffix(".html").replace("/", "__") + ".png"
                page.screenshot(path=str(folder / name), full_page=True)
                page.close()
            print(f"gallery: {len(targets)} pages at {width} px -> {folder}")
        browser.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--html", type=Path, default=ROOT / "_build" / "html")
    parser.add_argument("--out", type=Path, default=ROOT / "_build" / "gallery")
    parser.add_argument("--widths", type=int, nargs="+", default=[1280, 390])
    args = parser.parse_args(argv)
    args.html, args.out = args.html.resolve(), args.out.resolve()
    if not (args.html / "index.html").is_file():
        print(f"gallery: no book at {args.html} (run `make book` first)", file=sys.stderr)
        return 1
    return shoot(args.html, args.out, args.widths)


if __name__ == "__main__":
    sys.exit(main())

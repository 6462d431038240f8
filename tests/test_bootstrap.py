"""Launch buttons that work (issue 15): a chapter's setup cell, run where privrec is missing, installs
the library and the chapter's first cells then run; where privrec is installed it does nothing.

Offline: the "repository" is a copy of this checkout's ``lib/`` (``PRIVREC_PIP_SPEC``), pip runs with
``--no-index --no-deps --no-build-isolation`` (``PRIVREC_PIP_ARGS``), and the data comes from the
local recbole carrier. The fresh environment is a ``venv`` that sees every package of ``.venv``
*except* privrec: a ``.pth`` file points at a directory of links to ``.venv``'s site-packages minus
privrec's files (editable finder, ``.pth`` hooks and dist-info), so ``import privrec`` fails there until
the setup cell has installed it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("bootstrap_cell", ROOT / "tools" / "bootstrap_cell.py")
bootstrap_cell = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bootstrap_cell)

# Chapters whose setup cell is in place (REQUIRED: every chapter, so each runs on Colab or Binder).
CHAPTERS = sorted(p for p in (ROOT / "chapters").glob("*.ipynb")
                  if bootstrap_cell.is_current(json.loads(p.read_text()))
                  or any(c.get("id") == bootstrap_cell.CELL_ID
                         for c in json.loads(p.read_text())["cells"]))
REQUIRED = tuple(p.stem for p in sorted((ROOT / "chapters").glob("*.ipynb")))


def _code_cells(path: Path) -> list[str]:
    cells = json.loads(path.read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def _bare_python(tmp: Path) -> Path:
    """A venv that sees .venv's packages except privrec; returns its python."""
    site = Path(sysconfig.get_paths()["purelib"])
    farm = tmp / "site"
    farm.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(("privrec", "__editable__")) or name.endswith(".pth"):
            continue
        (farm / entry.name).symlink_to(entry)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], check=True)
    python = tmp / "venv" / "bin" / "python"
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    venv_site = subprocess.run([str(python), "-c", where], check=True, capture_output=True,
                               text=True).stdout.strip()
    Path(venv_site, "_dotvenv_without_privrec.pth").write_text(f"{farm}\n")
    return python


def test_the_chapters_carry_the_current_setup_cell():
    names = {p.stem for p in CHAPTERS}
    assert set(REQUIRED) <= names, f"setup cell missing in {set(REQUIRED) - names}"
    stale = [p.name for p in CHAPTERS if not bootstrap_cell.is_current(json.loads(p.read_text()))]
    assert not stale, f"stale setup cell (run tools/bootstrap_cell.py): {stale}"
    for path in CHAPTERS:
        assert _code_cells(path)[0].startswith("# Setup for Colab")


def test_the_repository_lives_in_config_only():
    spec = bootstrap_cell.repository_spec()
    assert spec.startswith("privrec @ git+https://") and spec.endswith("#subdirectory=lib")
    import yaml
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    assert url.rstrip("/") in spec
    for path in CHAPTERS:
        assert spec in _code_cells(path)[0]


def test_chapter_two_asks_for_its_cross_check_packages():
    source = _code_cells(ROOT / "chapters" / "02_differential_privacy.ipynb")[0]
    assert "opacus" in source and "dp-accounting" in source


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem[:2])
def test_setup_cell_is_silent_where_privrec_is_installed(path):
    env = dict(os.environ, PRIVREC_PIP_SPEC="/nonexistent/lib")  # pip would fail loudly
    done = subprocess.run([sys.executable, "-c", _code_cells(path)[0]], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == ""


def test_setup_cell_installs_privrec_in_a_bare_environment(tmp_path):
    start = time.perf_counter()
    python = _bare_python(tmp_path)
    missing = subprocess.run([str(python), "-c", "import privrec"], capture_output=True, text=True)
    assert missing.returncode != 0 and "No module named 'privrec'" in missing.stderr
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "lib", checkout / "lib",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    chapter = ROOT / "chapters" / "01_embedding_recommenders.ipynb"
    setup, imports = _code_cells(chapter)[:2]
    script = "\n".join([setup, imports, "import privrec", "print('PRIVREC FROM', privrec.__file__)",
                        "print('RATINGS', len(ml.ratings))"])
    env = dict(os.environ, PRIVREC_PIP_SPEC=str(checkout / "lib"), MPLBACKEND="Agg",
               PRIVREC_PIP_ARGS="--no-index --no-deps --no-build-isolation --disable-pip-version-check",
               PRIVREC_CACHE=str(tmp_path / "cache"), PYTHONDONTWRITEBYTECODE="1")
    env.pop("PRIVREC_ML100K_DIR", None)
    done = subprocess.run([str(python), "-c", script], env=env, capture_output=True, text=True,
                          timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    installed = Path(done.stdout.split("PRIVREC FROM ")[1].split()[0])
    assert (tmp_path / "venv") in installed.parents, installed  # the copy pip installed, not lib/
    assert "RATINGS 100000" in done.stdout
    # A second run finds privrec and does nothing.
    again = subprocess.run([str(python), "-c", setup], env=dict(env, PRIVREC_PIP_SPEC="/nonexistent"),
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout == again.stderr == ""
    assert time.perf_counter() - start < 120


def test_binder_installs_the_lock_the_carrier_and_the_library():
    post_build = (ROOT / "binder" / "postBuild").read_text()
    carrier = next(line.split(":=")[1].strip() for line in (ROOT / "Makefile").read_text().splitlines()
                   if line.startswith("CARRIER :="))
    assert f"^{carrier}$" in post_build and carrier in (ROOT / "requirements.lock").read_text()
    assert "requirements.lock" in post_build and "-e ./lib" in post_build
    assert "download=False" in post_build  # the build fails if the data is not there
    assert not (ROOT / "binder" / "requirements.txt").exists()  # repo2docker must not resolve
    lock_python = (ROOT / "requirements.lock").read_text().split("# Python ")[1].split(",")[0]
    runtime = (ROOT / "binder" / "runtime.txt").read_text().strip()
    assert runtime == "python-" + ".".join(lock_python.split(".")[:2])
    for script in ("postBuild", "start"):
        path = ROOT / "binder" / script
        assert os.access(path, os.X_OK)
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0

"""The environment is the lock, and the Makefile's baseline-kernel settings take effect (issue 12)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version and " " not in line, f"not an exact pin: {line!r}"
            pins[canonicalize_name(name)] = version
    return pins


def _makefile_exports() -> dict[str, str]:
    text = (ROOT / "Makefile").read_text()
    return dict(re.findall(r"^export (\w+) :?= (.+)$", text, flags=re.MULTILINE))


def test_every_requirement_is_pinned_within_its_bounds():
    pins = _lock()
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is missing from requirements.lock (run `make lock`)"
        version = Version(pins[name])
        assert requirement.specifier.contains(version, prereleases=True) or \
            requirement.specifier.contains(version.public, prereleases=True), \
            f"requirements.lock pins {name}=={version}, outside {requirement.specifier}"


def test_the_installed_environment_is_the_lock():
    pins = _lock()
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    installed.pop("privrec", None)  # the editable library itself
    missing = {n: v for n, v in pins.items() if installed.get(n) != v}
    extra = sorted(set(installed) - set(pins))
    assert not missing and not extra, (
        f"environment differs from requirements.lock: locked but not installed as pinned "
        f"{missing}; installed but not locked {extra} (run `make setup`, or `make lock` after "
        f"changing requirements.txt)")


def test_makefile_disables_every_numpy_dispatch_target():
    from numpy._core._multiarray_umath import __cpu_dispatch__

    disabled = _makefile_exports()["NPY_DISABLE_CPU_FEATURES"].split()
    assert sorted(disabled) == sorted(__cpu_dispatch__)


def test_makefile_settings_select_the_baseline_kernels():
    env = {**_makefile_exports(), "PATH": "/usr/bin:/bin"}
    probe = ("import json, numpy, torch\n"
             "from numpy._core._multiarray_umath import __cpu_features__ as f, __cpu_dispatch__ as d\n"
             "print(json.dumps({'torch': torch.backends.cpu.get_cpu_capability(),"
             " 'numpy': sorted(k for k in d if f.get(k))}))\n")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         check=True, timeout=300)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"torch": "DEFAULT", "numpy": []}

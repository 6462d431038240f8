"""Chapter 8's speed settings change no result: glibc keeping freed memory (the Makefile's
``GLIBC_TUNABLES``) computes the same bits as glibc's defaults; a run whose memorisation nobody reads
skips the canary probe and reports the same utility; the memorisation probe converts to float64
through NumPy, bit for bit as torch does."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

from privrec.course.experiments import transformer as tx

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
ROOT = Path(__file__).resolve().parents[1]

# A small private run (DP-SGD, then the memorisation probe) in a fresh process.
_RUN = """
import json
from privrec.attacks.memorisation import plant_canaries
from privrec.course.experiments import transformer as tx
from privrec.recsys.data import leave_last_out_split, synthetic_movielens
tx.PRIVATE_MODEL, tx.N_SAMPLES = {"dim": 8, "max_len": 10}, 50
d = synthetic_movielens(n_users=40, n_items=30, n_ratings=600, seed=0)
train, test = leave_last_out_split(d.ratings)
planted, canaries = plant_canaries(train, n_users=40, n_items=30, repeats=(0, 1, 2),
                                   per_repeat=2, prefix_len=2, secret_len=2, seed=0)
protocol = tx.Protocol(40, 30, train, test, train, test, planted, canaries)
run = tx.run_private(protocol, "DP-SGD", 4.0, settings={"epochs": 1.0, "n_negatives": 10})
print(json.dumps({k: v for k, v in run.items() if k != "cpu_s"}, sort_keys=True))
"""


def _makefile_tunables() -> str:
    found = re.search(r"^export GLIBC_TUNABLES \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert found, "the Makefile exports GLIBC_TUNABLES"
    return found.group(1)


def _run(tunables: str | None, cache: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | {"PRIVREC_CACHE": cache}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    done = subprocess.run([sys.executable, "-c", _RUN], env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="GLIBC_TUNABLES is glibc's")
def test_the_kept_heap_changes_no_bit(tmp_path):
    kept = _run(_makefile_tunables(), str(tmp_path / "a"))
    assert kept == _run(None, str(tmp_path / "b"))
    assert "memorisation" in kept and kept["ndcg"] > 0


def test_a_run_without_the_probe_has_the_same_utility(monkeypatch, tmp_path):
    from privrec.attacks.memorisation import plant_canaries
    from privrec.recsys.data import leave_last_out_split, synthetic_movielens

    monkeypatch.setenv("PRIVREC_CACHE", str(tmp_path))
    monkeypatch.setattr(tx, "PRIVATE_MODEL", {"dim": 8, "max_len": 10})
    monkeypatch.setattr(tx, "N_SAMPLES", 50)
    d = synthetic_movielens(n_users=40, n_items=30, n_ratings=600, seed=0)
    train, test = leave_last_out_split(d.ratings)
    planted, canaries = plant_canaries(train, n_users=40, n_items=30, repeats=(0, 1),
                                       per_repeat=2, prefix_len=2, secret_len=2, seed=0)
    protocol = tx.Protocol(40, 30, train, test, train, test, planted, canaries)
    settings = {"epochs": 1.0, "n_negatives": 10}
    probed = tx.run_private(protocol, "DP-SGD", 4.0, settings=settings)
    bare = tx.run_private(protocol, "DP-SGD", 4.0, settings=settings, probe=False)
    assert "memorisation" in probed and "memorisation" not in bare
    drop = {"memorisation", "cpu_s"}
    assert {k: v for k, v in probed.items() if k not in drop} == \
        {k: v for k, v in bare.items() if k not in drop}


def test_the_numpy_conversion_to_double_is_torchs():
    import torch

    from privrec.attacks.memorisation import _as_double

    full = torch.randn(5, 3, 9, generator=torch.Generator().manual_seed(0))
    full[0, 0, 1:4] = torch.tensor([float("inf"), -0.0, 1e-45])
    for x in (full, full[..., 1:], full.transpose(0, 1)):
        y = _as_double(x)
        assert y.dtype == torch.float64 and y.is_contiguous()
        assert torch.equal(y, x.double()) and torch.equal(y.signbit(), x.double().signbit())

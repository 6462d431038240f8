"""Tests of privrec.course.experiments.transformer on a small synthetic protocol."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from privrec.attacks.memorisation import plant_canaries
from privrec.course.experiments import transformer as tx
from privrec.dp.ledger import PrivacyLedger
from privrec.recsys.data import leave_last_out_split, synthetic_movielens


@pytest.fixture()
def small(monkeypatch, tmp_path):
    monkeypatch.setenv("PRIVREC_CACHE", str(tmp_path))
    monkeypatch.setattr(tx, "PRIVATE_MODEL", {"dim": 8, "max_len": 10})
    monkeypatch.setattr(tx, "N_SAMPLES", 50)
    monkeypatch.setattr(tx, "PRIVATE", {
        "DP-SGD": tx.PRIVATE["DP-SGD"] | {"epochs": 1.0},
        "DP-FedAvg": tx.PRIVATE["DP-FedAvg"] | {"rounds": 2, "n_negatives": 10}})
    monkeypatch.setitem(tx.PRIVATE["DP-SGD"], "n_negatives", 10)
    d = synthetic_movielens(n_users=40, n_items=30, n_ratings=600, seed=0)
    train, test = leave_last_out_split(d.ratings)
    val_train, val_test = leave_last_out_split(train)
    planted, canaries = plant_canaries(train, n_users=40, n_items=30, repeats=(0, 1, 2),
                                       per_repeat=2, prefix_len=2, secret_len=2, seed=0)
    return tx.Protocol(40, 30, train, test, val_train, val_test, planted, canaries)


def test_popularity_release_has_user_sensitivity_one_and_is_recorded(small):
    book = PrivacyLedger(unit="user", n_units=40)
    exact = tx.popularity_release(small.train, n_users=40, n_items=30, noise_multiplier=0.0,
                                  ledger=PrivacyLedger(unit="user", n_units=40)).exp()
    one = small.train[small.train["user"] != 0]
    without = tx.popularity_release(one, n_users=40, n_items=30, noise_multiplier=0.0,
                                    ledger=PrivacyLedger(unit="user", n_units=40)).exp()
    assert float((exact - without).norm()) == pytest.approx(1.0, abs=1e-3)  # one whole user
    tx.popularity_release(small.train, n_users=40, n_items=30, noise_multiplier=2.0, ledger=book)
    assert book.events[0].noise_multiplier == 2.0 and book.events[0].unit == "user"


@pytest.mark.parametrize("method", tx.METHODS)
def test_a_private_run_spends_its_budget_and_is_cached(small, method):
    first = tx.run_private(small, method, 4.0)
    assert first["epsilon"] == pytest.approx(4.0, abs=0.05)
    book = PrivacyLedger.from_json(first["ledger"])
    assert book.unit == "user" and book.events[0].name == "user-level popularity"
    assert set(first["memorisation"]) == {"repeats", "exposure", "sampled", "extracted"}
    assert tx.run_private(small, method, 4.0) == first          # from the cache
    val = tx.run_private(small, method, 4.0, split="validation")
    assert "memorisation" not in val


def test_tuning_discloses_the_whole_procedure(small, monkeypatch):
    monkeypatch.setattr(tx, "TUNING", {"DP-SGD": {"lr": (0.5, 2.0)},
                                       "DP-FedAvg": {"server_lr": (0.5,)}})
    out = tx.validation_tuning(small, "DP-SGD", epsilon=2.0)
    assert out["choice"] in (0.5, 2.0) and len(out["scores"]) == 2
    whole = PrivacyLedger.from_json(out["whole"])
    assert whole.epsilon() > 2.0 + 0.5  # three runs at ε = 2 compose to more than one
    assert sum(e.name.startswith("tuning: ") for e in whole.events) == 4


def test_memorisation_by_repeats_and_bad_input(small):
    run = tx.run_private(small, "DP-SGD", math.inf)
    assert run["epsilon"] == math.inf
    table = tx.memorisation_by_repeats({"a": run})
    assert list(table.index) == [0, 1, 2] and ("a", "exposure") in table.columns
    with pytest.raises(ValueError, match="method"):
        tx.run_private(small, "SGD", 1.0)
    with pytest.raises(ValueError, match="split"):
        tx.run_private(small, "DP-SGD", 1.0, split="train")
    assert np.isfinite(table.to_numpy(dtype=float)).all()
    assert torch.get_num_threads() >= 1


def test_the_cache_key_names_every_privrec_module_a_run_executes():
    """A run's result may depend only on its key: every privrec module loaded by the experiment
    (in a fresh interpreter) is in _LIBRARY, whose sources are hashed into the key."""
    import subprocess
    import sys

    code = ("import json, sys; import privrec.course.experiments.transformer as tx; "
            "names = {m.__name__ for m in tx._LIBRARY}; "
            "print(json.dumps(sorted(n for n, m in sys.modules.items() if n.startswith('privrec.') "
            "and getattr(m, '__file__', '') and not n.endswith('__init__') "
            "and n not in names and m.__file__.endswith('.py') "
            "and not m.__file__.endswith('__init__.py'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    missing = set(json.loads(out.stdout))
    # Loaded but not part of any result: argument checks, result containers, the cache itself
    # (and its arithmetic tag, which it puts into every key), and the matrix-factorisation
    # clients, partitions and protocols the federated package imports.
    harmless = {"privrec.core.checks", "privrec.core.results", "privrec.course.book",
                "privrec.core.arithmetic",
                "privrec.federated.mf", "privrec.federated.mf_local", "privrec.federated.partitions",
                "privrec.federated.protocols"}
    assert missing <= harmless, missing - harmless


def test_runs_are_cached_on_their_settings_and_the_library_code(small, monkeypatch):
    seen = []
    monkeypatch.setattr(tx, "cached_json", lambda name, config, compute, modules: seen.append(
        (config, modules)) or {})
    tx.run_private(small, "DP-SGD", 4.0)
    tx.run_private(small, "DP-SGD", 8.0)
    assert seen[0][0] != seen[1][0]  # the target epsilon is part of the key
    assert tx in seen[0][1]  # the experiment's own code is part of the key

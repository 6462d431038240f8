"""The book's federated MF on Flower (issue 14): codecs, app config, and the loopback deployment.

Runs in ``.venv-flower`` (``make flower-test``; Flower does not fit the book's pins). In the book's
``.venv`` the module is skipped unless ``PRIVREC_REQUIRE_FLOWER=1``, which turns a missing Flower
into a failure (CI sets it in the Flower step).

The deployment test starts a SuperLink and three SuperNodes as processes on 127.0.0.1 (free
ports), runs FedAvgM and DP-FedAvg through ``flwr run``, kills one SuperNode mid-run, and checks the
models against privrec's simulator to 1e-5; every process is stopped, also on failure.
"""

from __future__ import annotations

import math
import os
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if os.environ.get("PRIVREC_REQUIRE_FLOWER") != "1":
    pytest.importorskip("flwr", reason="Flower lives in .venv-flower (make flower-test)")
sys.path.insert(0, str(ROOT / "flower"))

import deploy  # noqa: E402
import torch  # noqa: E402
from privrec_flower.engines import load_shared, max_abs_gap, simulate  # noqa: E402
from privrec_flower.task import (  # noqa: E402
    DEFAULTS,
    RunConfig,
    decode_update,
    encode_update,
    initial_shared,
    silo_data,
)

from privrec.dp.ledger import PrivacyLedger  # noqa: E402

TOL = 1e-5


def test_app_config_is_the_code_defaults():
    config = tomllib.loads((ROOT / "flower" / "pyproject.toml").read_text())
    assert config["tool"]["flwr"]["app"]["config"] == DEFAULTS
    with pytest.raises(ValueError, match="unknown run-config keys"):
        RunConfig.of({"num-rounds": 3})


def test_update_codec_round_trip_keeps_values_and_shared_index():
    cfg = RunConfig.of()
    model, _ = silo_data(cfg, 1)
    up = model.local_training(initial_shared(cfg), torch.tensor([1]))
    back = decode_update(encode_update(up), 1)
    assert back.rows.keys() == up.rows.keys() and back.dense.keys() == up.dense.keys()
    for name, part in up.rows.items():
        assert torch.equal(back.rows[name].row, part.row)
        assert torch.equal(back.rows[name].values, part.values)
        assert torch.equal(back.rows[name].examples, part.examples)
    assert back.rows["item_factors"].row is back.rows["item_bias"].row   # one index on the wire
    assert torch.equal(back.dense["global_bias"], up.dense["global_bias"])
    assert torch.equal(back.examples, up.examples)
    # the silo holds only its own users' ratings
    owners = model.partition.client_of_user[model.store.gather(torch.arange(3)).users.numpy()]
    assert set(owners.tolist()) == {1}


def _dp_kill_target(cfg: RunConfig, kill_after: int) -> int:
    """A silo that DP-FedAvg's seeded Poisson sampling picks in the round after the kill."""
    reference, _ = simulate(cfg)
    sampled = reference["rounds"][kill_after]["sampled"]
    assert sampled, "seed 0 samples nobody in that round: pick another round"
    return sampled[-1]


def test_loopback_deployment_matches_simulator_and_survives_a_killed_node(tmp_path):
    base = {"num-partitions": 3, "num-server-rounds": 3, "evaluate": False,
            "round-timeout": 40.0}
    fedavg, dp = RunConfig.of(base), RunConfig.of(base, dp=True)
    kill_after = 2
    target = _dp_kill_target(dp, kill_after)
    link = deploy.Loopback(3, work=tmp_path, say=print)
    try:
        with link:
            # a clear failure, no hang: a fourth silo that never connects
            with pytest.raises(RuntimeError, match="only 3 of num-partitions=4 SuperNodes"):
                link.run("missing-node", **{**base, "num-partitions": 4, "nodes-timeout": 3.0},
                         timeout=120)
            plain = link.run("fedavgm", **base, timeout=300)
            killed = link.run("dp-killed", **base, dp=True, kill_after_round=kill_after,
                              kill_node=target, timeout=300)
    finally:
        survivors = [p for proc in link.procs.values() for p in deploy.descendants(proc.pid)]
        assert link.alive() == [] and survivors == [], (link.alive(), survivors)

    # (a) vs (c), FedAvgM: every silo answered every round, same model
    simulated, shared = simulate(fedavg)
    assert [r["realised"] for r in plain["rounds"]] == [[0, 1, 2]] * 3
    assert [r["sampled"] for r in plain["rounds"]] == [r["sampled"] for r in simulated["rounds"]]
    assert max_abs_gap(shared, load_shared(tmp_path / "fedavgm" / "shared.npz")) < TOL
    assert all(r["bytes_up"] >= r["privrec_bytes_up"] > 0 for r in plain["rounds"])

    # DP-FedAvg with a node killed after round 2: the round completes with the survivors ...
    rounds = killed["rounds"]
    full, full_shared = simulate(dp)
    assert [r["sampled"] for r in rounds] == [r["sampled"] for r in full["rounds"]]
    assert [r["realised"] for r in rounds[:kill_after]] == [r["sampled"] for r in rounds[:kill_after]]
    assert target in rounds[kill_after]["sampled"] and target not in rounds[kill_after]["realised"]
    # ... the model is the simulator's with the realised cohort (same noise draws) ...
    reference, ref_shared = simulate(dp, realised=[r["realised"] for r in rounds])
    got = load_shared(tmp_path / "dp-killed" / "shared.npz")
    assert max_abs_gap(ref_shared, got) < TOL
    assert max_abs_gap(full_shared, got) > 1e-3          # the lost silo did change the model
    # ... and the ledger is every round at the nominal q, as the simulator's
    ledger = PrivacyLedger(unit="silo", n_units=3)
    for _ in range(3):
        ledger.record_gaussian("DP-FedAvg round", noise_multiplier=dp["noise-multiplier"],
                               sample_rate=dp["sample-rate"])
    assert math.isclose(killed["epsilon"], ledger.epsilon(), rel_tol=1e-12)
    assert math.isclose(killed["epsilon"], reference["epsilon"], rel_tol=1e-12)

"""The book's federated MF on Flower (issues 14, 19, 24, 26): a secure loopback deployment.

Runs in ``.venv-flower`` (``make flower-test``; Flower does not fit the book's pins). In the book's
``.venv`` the module is skipped unless ``PRIVREC_REQUIRE_FLOWER=1``, which turns a missing Flower
into a failure (CI sets it in the Flower step).

The deployment test starts a SuperLink with TLS (a CA made for the test) and SuperNode
authentication, registers three SuperNodes with the ``flwr`` CLI and checks, on 127.0.0.1:

* a SuperNode with an unregistered key, and a registered one that does not trust the CA, are
  refused, and never show up online;
* FedAvgM deployed equals privrec's simulator (the ServerApp runs the simulator's round function);
* DP-FedAvg under Flower's SecAgg+ equals the simulator within the stated quantisation error,
  the ServerApp never decodes an individual update, and the ledger is the simulator's;
* a SuperNode that drops out after sharing its SecAgg+ keys is recovered (threshold 2 of 3); two
  that drop out make the round fail with a clear error, quickly;
* a killed SuperNode in a DP-FedAvg round leaves the model of the realised cohort and the
  ledger at the nominal sampling rate;

and that every process and every key is gone afterwards, also on failure. A second deployment
runs chapter 7's FFA-LoRA MiniLM two-tower for one user-level DP-FedAvg round (``model = "lora"``)
and checks that it equals the simulator and that, of MiniLM, only LoRA's B travels.
"""

from __future__ import annotations

import math
import os
import signal
import stat
import sys
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if os.environ.get("PRIVREC_REQUIRE_FLOWER") != "1":
    pytest.importorskip("flwr", reason="Flower lives in .venv-flower (make flower-test)")
sys.path.insert(0, str(ROOT / "flower"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.common import parameters_to_ndarrays  # noqa: E402
from flwr.common.secure_aggregation.quantization import dequantize, quantize  # noqa: E402
from flwr.compat.common import recorddict_compat as compat  # noqa: E402
from loopback import Loopback  # noqa: E402
from measure import admission  # noqa: E402
from pki import LoopbackPKI  # noqa: E402
from privrec_flower.engines import load_shared, max_abs_gap, simulate  # noqa: E402
from privrec_flower.lora import decode_cohort, device_state, encode_cohort, restore_device  # noqa: E402
from privrec_flower.secure import Quantisation, as_equal_shares, clipped_upload  # noqa: E402
from privrec_flower.task import (  # noqa: E402
    DEFAULTS,
    RunConfig,
    decode_update,
    encode_update,
    initial_shared,
    make_strategy,
    silo_data,
    silo_split,
    write_silo_files,
)
from privrec_flower.timing import PHASES, breakdown  # noqa: E402
from procs import descendants  # noqa: E402
from runs import submit  # noqa: E402
from supernode_launcher import ShortClock, check_patch_point  # noqa: E402

from privrec.dp.ledger import PrivacyLedger  # noqa: E402
from privrec.federated.mf import initial_shared_state  # noqa: E402
from privrec.federated.updates import ClientUpdates, RowUpdates  # noqa: E402

TOL = 1e-5


def test_app_config_is_the_code_defaults():
    config = tomllib.loads((ROOT / "flower" / "pyproject.toml").read_text())
    assert config["tool"]["flwr"]["app"]["config"] == DEFAULTS
    with pytest.raises(ValueError, match="unknown run-config keys"):
        RunConfig.of({"num-rounds": 3})


def test_initial_state_is_the_library_data_free_function():
    cfg = RunConfig.of()
    expected = initial_shared_state(n_users=943, n_items=1682, dim=8, seed=0)
    got = initial_shared(cfg)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)


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
    # the silo holds only its own users' ratings
    owners = model.partition.client_of_user[model.store.gather(torch.arange(3)).users.numpy()]
    assert set(owners.tolist()) == {1}


def test_a_silo_file_holds_that_silo_only_and_is_ignored_for_another_config(tmp_path):
    cfg = RunConfig.of()
    paths = write_silo_files(cfg, tmp_path)
    train, test = silo_split(cfg, 2)
    with np.load(paths[2]) as data:
        assert np.array_equal(data["train/user"], train["user"].to_numpy())
        assert np.array_equal(data["test/rating"], test["rating"].to_numpy())
    (from_file, file_test), (cut, cut_test) = silo_data(cfg, 2, str(paths[2])), silo_data(cfg, 2)
    assert file_test.equals(cut_test)
    a = from_file.local_training(initial_shared(cfg), torch.tensor([2]))
    b = cut.local_training(initial_shared(cfg), torch.tensor([2]))
    assert torch.equal(a.rows["item_factors"].values, b.rows["item_factors"].values)
    other = RunConfig.of(seed=1)
    _, other_test = silo_data(other, 2, str(paths[2]))          # made for seed 0: not used
    assert other_test.equals(silo_split(other, 2)[1])


def test_client_clip_margin_keeps_the_quantised_norm_within_the_clip_bound():
    # 8 bits make the rounding visible: clipping to C itself lets rounding push norms past C
    q = Quantisation(clip_norm=0.5, bits=8, n_floats=400)
    rng = np.random.default_rng(0)
    directions = rng.standard_normal((200, q.n_floats))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)

    def quantised_norms(radius: float) -> np.ndarray:
        np.random.seed(1)               # Flower's stochastic rounding uses numpy's global state
        qs = quantize(list(directions * radius), q.clip_norm, q.levels)
        return np.linalg.norm(np.stack(dequantize(qs, q.clip_norm, q.levels)), axis=1)

    assert quantised_norms(q.clip_norm).max() > q.clip_norm               # the margin is needed
    assert quantised_norms(q.client_clip).max() <= q.clip_norm            # and enough
    assert q.step == 2 * 0.5 / 256 and math.isclose(q.margin, 20 * q.step)
    with pytest.raises(ValueError, match="too coarse"):
        _ = Quantisation(clip_norm=0.5, bits=2, n_floats=400).client_clip


def test_secagg_uploads_are_flat_because_flower_mishandles_0d_arrays():
    # flwr 1.42: dequantize returns a numpy scalar for a 0-d array, which the unmask stage's
    # in-place offset and scaling then miss; the upload must therefore contain no 0-d array
    assert not isinstance(dequantize([np.array(7)], 0.5, 1 << 4)[0], np.ndarray)
    cfg = RunConfig.of(dp=True)
    model, _ = silo_data(cfg, 0)
    shared = initial_shared(cfg)
    up = model.local_training(shared, torch.tensor([0]))
    q = Quantisation.of(cfg, sum(v.numel() for v in shared.values()))
    content = clipped_upload(up, {k: v.shape for k, v in shared.items()}, q, {})
    fitres = compat.recorddict_to_fitres(content, keep_input=True)
    arrays = parameters_to_ndarrays(fitres.parameters)
    assert [a.ndim for a in arrays] == [1, 1, 1] and fitres.num_examples == 1
    assert [a.size for a in arrays] == [v.numel() for v in shared.values()]
    total = math.sqrt(sum(float(np.square(a.astype(np.float64)).sum()) for a in arrays))
    assert q.client_clip * (1 - 1e-5) <= total <= q.client_clip * (1 + 1e-6)  # clipped here


def test_the_secure_sum_as_equal_shares_passes_dp_fedavg_unchanged():
    cfg = RunConfig.of(dp=True)
    shared = initial_shared(cfg)
    rng = torch.Generator().manual_seed(0)
    total = {k: torch.randn(v.shape, generator=rng) * 1e-3 for k, v in shared.items()}
    norm = math.sqrt(sum(float(v.square().sum()) for v in total.values()))
    total = {k: v * (1.2 / norm) for k, v in total.items()}     # the sum of 3 uploads of norm <= C
    strategy = make_strategy(cfg, n_clients=3)
    running = strategy.start(shared)
    strategy.accumulate(running, as_equal_shares(total, [0, 1, 2]))
    for k in total:
        assert torch.allclose(running.sums[k], total[k], atol=1e-7)
    assert running.clients == 3


def test_supernode_launcher_finds_its_patch_point_and_caps_sleeps():
    import flwr.supernode.start_client_internal as loop

    check_patch_point(loop)
    clock = ShortClock(0.01)
    start = time.perf_counter()
    clock.sleep(3)
    assert time.perf_counter() - start < 1.0 and clock.monotonic() > 0


def test_pki_certificates_chain_to_the_ca_and_keys_are_private(tmp_path):
    from cryptography import x509
    from flwr.cli.supernode.register import try_load_public_key

    pki = LoopbackPKI.create(tmp_path / "pki", 2)
    ca = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    link = x509.load_pem_x509_certificate(pki.superlink[0].read_bytes())
    link.verify_directly_issued_by(ca)
    names = link.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    assert try_load_public_key(pki.nodes[1][1])                 # what `flwr supernode register` reads
    for path in (pki.superlink[1], pki.nodes[0][0]):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_breakdown_phases_add_up_to_the_round():
    stamps = {"t-process": 1.3, "t-import": 1.5, "t-imported": 2.0, "t-in": 2.1, "t-data": 2.2,
              "t-decoded": 2.25, "t-trained": 2.5, "t-out": 2.55}
    parts = breakdown(started=1.0, pushed=1.1, stamps=stamps, got=2.9, ended=3.0)
    assert list(parts) == list(PHASES)
    assert math.isclose(sum(parts.values()), 2.0) and min(parts.values()) >= 0


def _secagg_bound(cfg: RunConfig, k: int) -> float:
    """Worst-case drift per coordinate after all rounds: each round's sum moves by at most
    k (margin + step) per coordinate, divided by qN, accumulated by the server momentum."""
    q = Quantisation.of(cfg, sum(v.numel() for v in initial_shared(cfg).values()))
    per_round = k * (q.margin + q.step) / (float(cfg["sample-rate"]) * k)
    return int(cfg["num-server-rounds"]) * per_round / (1 - float(cfg["server-momentum"]))


def _nominal_epsilon(cfg: RunConfig) -> float:
    ledger = PrivacyLedger(unit="silo", n_units=3)
    for _ in range(int(cfg["num-server-rounds"])):
        ledger.record_gaussian("DP-FedAvg round", noise_multiplier=cfg["noise-multiplier"],
                               sample_rate=cfg["sample-rate"])
    return ledger.epsilon()


def _pauser(link, silos, paused):
    def act():
        for s in silos:
            link.signal_node(s, signal.SIGSTOP)
            paused.append(s)
    return act


def _resume(link, paused):
    while paused:
        link.signal_node(paused.pop(), signal.SIGCONT)


def test_secure_loopback_deployment(tmp_path):
    base = {"num-partitions": 3, "num-server-rounds": 3, "evaluate": False, "round-timeout": 40.0}
    fedavg, dp = RunConfig.of(base), RunConfig.of(base, dp=True)
    reference, _ = simulate(dp)
    full = [r["round"] for r in reference["rounds"] if len(r["sampled"]) == 3]
    assert len(full) >= 2, "seed 0 must sample all three silos in two rounds"
    last = int(dp["num-server-rounds"])
    kill_target = reference["rounds"][last - 1]["sampled"][-1]
    drop_silo, below_silos = reference["rounds"][full[1] - 1]["sampled"][-1], [1, 2]
    link, paused, runs = Loopback(3, work=tmp_path), [], {}
    try:
        with link:
            runs["admission"] = admission(link, 3)
            with pytest.raises(RuntimeError, match="only 3 of num-partitions=4 SuperNodes"):
                submit(link, "missing-node", **{**base, "num-partitions": 4, "nodes-timeout": 3.0})
            runs["fedavgm"] = submit(link, "fedavgm", **base)
            runs["secagg"] = submit(link, "secagg", **base, dp=True, secagg=True)
            runs["dropout"] = submit(            # the node is back for the next round
                link, "dropout", **{**base, "round-timeout": 8.0}, dp=True, secagg=True,
                actions={f"keys-{full[1]}": _pauser(link, [drop_silo], paused),
                         f"round-{full[1] + 1}": lambda: _resume(link, paused)})
            start = time.perf_counter()
            with pytest.raises(RuntimeError, match=r"SecAgg\+ failed in round 1 at stage "
                                                   r"'collect masked vectors': 1 of 3"):
                submit(link, "below", **{**base, "round-timeout": 8.0}, dp=True, secagg=True,
                       actions={"keys-1": _pauser(link, below_silos, paused)})
            runs["below_seconds"] = time.perf_counter() - start
            _resume(link, paused)
            kill = {f"round-{last}": lambda: link.signal_node(kill_target, signal.SIGKILL)}
            runs["killed"] = submit(link, "killed", **{**base, "round-timeout": 15.0}, dp=True,
                                    actions=kill)
    finally:
        _resume(link, paused)
        survivors = [p for proc in link.procs.values() for p in descendants(proc.pid)]
        assert link.alive() == [] and survivors == [], (link.alive(), survivors)
        assert not (tmp_path / "pki").exists(), "the run's keys must be deleted"

    # admission: two refused SuperNodes, neither ever online; the three registered ones online
    probes = {p["kind"]: p for p in runs["admission"]["probes"]}
    assert probes["unregistered"]["exit_code"] not in (0, None)
    assert "Failed to activate SuperNode" in probes["unregistered"]["reason"]
    assert probes["untrusted-ca"]["exit_code"] not in (0, None)
    assert "CERTIFICATE_VERIFY_FAILED" in probes["untrusted-ca"]["reason"]
    assert runs["admission"]["online"] == 3 and runs["admission"]["registered_never_online"] == 1

    # FedAvgM: the deployed model is the simulator's
    simulated, shared = simulate(fedavg)
    assert [r["realised"] for r in runs["fedavgm"]["rounds"]] == [[0, 1, 2]] * 3
    assert [r["sampled"] for r in runs["fedavgm"]["rounds"]] == [
        r["sampled"] for r in simulated["rounds"]]
    assert max_abs_gap(shared, load_shared(tmp_path / "fedavgm" / "shared.npz")) < TOL
    assert all(r["bytes_up"] >= r["privrec_bytes_up"] > 0 for r in runs["fedavgm"]["rounds"])

    # SecAgg+: only the sum reached the ServerApp; the model within the quantisation bound
    secure = runs["secagg"]
    bound = _secagg_bound(dp, 3)
    _, dp_shared = simulate(dp)
    gap = max_abs_gap(dp_shared, load_shared(tmp_path / "secagg" / "shared.npz"))
    assert 0 < gap < bound, (gap, bound)
    assert all(r["updates_seen"] == 0 and len(r["stages"]) == 4 for r in secure["rounds"])
    assert [r["realised"] for r in secure["rounds"]] == [r["sampled"] for r in reference["rounds"]]
    assert math.isclose(secure["epsilon"], _nominal_epsilon(dp), rel_tol=1e-12)

    # a dropout after the keys were shared: recovered, the realised cohort's model and ledger
    rounds = runs["dropout"]["rounds"]
    assert drop_silo not in rounds[full[1] - 1]["realised"]
    assert rounds[full[1] - 1]["stages"][2]["answered"] == 2
    realised_ref, realised_shared = simulate(dp, realised=[r["realised"] for r in rounds])
    gap = max_abs_gap(realised_shared, load_shared(tmp_path / "dropout" / "shared.npz"))
    assert gap < bound, (gap, bound)
    assert math.isclose(runs["dropout"]["epsilon"], _nominal_epsilon(dp), rel_tol=1e-12)
    assert runs["below_seconds"] < 90, "below the threshold the round must fail, not hang"

    # a killed SuperNode (no SecAgg+): the realised cohort's model, the nominal ledger
    rounds = runs["killed"]["rounds"]
    assert kill_target in rounds[last - 1]["sampled"]
    assert kill_target not in rounds[last - 1]["realised"]
    ref, ref_shared = simulate(dp, realised=[r["realised"] for r in rounds])
    assert max_abs_gap(ref_shared, load_shared(tmp_path / "killed" / "shared.npz")) < TOL
    assert max_abs_gap(dp_shared, load_shared(tmp_path / "killed" / "shared.npz")) > 1e-3
    assert math.isclose(runs["killed"]["epsilon"], _nominal_epsilon(dp), rel_tol=1e-12)
    assert math.isclose(runs["killed"]["epsilon"], ref["epsilon"], rel_tol=1e-12)


# -- chapter 7's LoRA two-tower on the deployment -------------------------------------------------

LORA = {"model": "lora", "dp": True, "num-partitions": 3, "num-server-rounds": 1,
        "sample-rate": 0.02, "evaluate": False, "round-timeout": 300.0, "nodes-timeout": 300.0}


def test_lora_cohort_codec_and_device_state_round_trip():
    gen = torch.Generator().manual_seed(0)
    pos, row = torch.tensor([0, 0, 2]), torch.tensor([5, 9, 5])
    up = ClientUpdates(torch.tensor([3, 7, 8]), torch.tensor([20.0, 20.0, 0.0]),
                       {"item_bias": RowUpdates(pos, row, torch.randn(3, generator=gen),
                                                torch.tensor([1.0, 2.0, 1.0]))},
                       {"lora_B": torch.randn(3, 384, 8, generator=gen),
                        "global_bias": torch.randn(3, generator=gen)})
    back = decode_cohort(encode_cohort(up))
    assert torch.equal(back.clients, up.clients) and torch.equal(back.examples, up.examples)
    for name in ("client_pos", "row", "values", "examples"):
        assert torch.equal(getattr(back.rows["item_bias"], name), getattr(up.rows["item_bias"], name))
    assert all(torch.equal(back.dense[k], up.dense[k]) for k in up.dense)
    # a SuperNode keeps only its own users' rows, and its generator continues where it stopped
    head = type("Head", (), {})()
    head.user_factors, head.user_bias = torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)
    model = type("Model", (), {"head": head, "n_users": 6,
                               "user_parameter_names": ("user_factors", "user_bias")})()
    mine, rng = torch.tensor([1, 4]), torch.Generator().manual_seed(3)
    state, expected = device_state(model, mine, rng), torch.rand(2, generator=rng)
    kept = head.user_factors.clone()
    head.user_factors.zero_()
    restore_device(state, model, mine, rng)
    assert torch.equal(head.user_factors[mine], kept[mine]) and not head.user_factors[0].any()
    assert torch.equal(torch.rand(2, generator=rng), expected)


def test_lora_two_tower_round_on_the_secure_deployment(tmp_path):
    link = Loopback(3, work=tmp_path, preload=("lora",))
    try:
        with link:
            run = submit(link, "lora", timeout=600.0, **LORA)
    finally:
        survivors = [p for proc in link.procs.values() for p in descendants(proc.pid)]
        assert link.alive() == [] and survivors == [], (link.alive(), survivors)
        assert not (tmp_path / "pki").exists(), "the run's keys must be deleted"
    cfg = RunConfig.of(LORA)
    reference, shared = simulate(cfg)
    deployed, start = load_shared(tmp_path / "lora" / "shared.npz"), initial_shared(cfg)
    got, ref = run["rounds"][0], reference["rounds"][0]
    # users are the clients: the strategy's Poisson draw over 943 users, all of whom answered
    assert got["sampled"] == ref["sampled"] == got["realised"] and 5 <= len(got["sampled"]) <= 60
    assert got["updates_seen"] == len(got["sampled"])
    # the deployed model is the simulator's, and the round moved B (the fine-tuned MiniLM)
    assert max_abs_gap(shared, deployed) < 1e-6
    assert float((deployed["lora_B"] - start["lora_B"]).abs().max()) > 1e-4
    # what travelled: the two-tower head and, of MiniLM, only B (FFA-LoRA: A stays frozen)
    sent = {k.split("/")[1] for k in got["uploaded"] if k.startswith(("dense/", "rows/"))}
    assert sent == set(shared) and "lora_B" in sent and "lora_A" not in sent
    assert got["privrec_bytes_up"] == ref["bytes_up"] and got["bytes_up"] >= ref["bytes_up"]
    # the ledger: user level, the simulator's
    assert run["ledger"].startswith("user-level")
    assert math.isclose(run["epsilon"], reference["epsilon"], rel_tol=1e-12)

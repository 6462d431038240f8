"""Chapter 5's harnesses (privrec.course.experiments.user_level*): small synthetic data, few rounds."""

import math

import pandas as pd
import pytest
import torch

from privrec.course.experiments import user_level as ul
from privrec.course.experiments import user_level_search as us
from privrec.course.experiments import user_level_uploads as uu
from privrec.dp.ledger import PrivacyLedger, default_delta
from privrec.federated.dpfedavg import DPFedAvg
from privrec.federated.engine import FederatedSimulator
from privrec.federated.mf import BiasOnlyClients
from privrec.federated.strategies import FedAvg
from privrec.recsys.data import random_split, synthetic_movielens


@pytest.fixture(scope="module")
def setup():
    ml = synthetic_movielens(30, 40, 500, seed=0)
    train, test = random_split(ml.ratings, test_fraction=0.2, seed=0)
    return ul.Setup(ml.ratings, ml.n_users, ml.n_items, train, test,
                    *random_split(train, test_fraction=0.2, seed=1))


@pytest.fixture(autouse=True)
def small_grids(monkeypatch, tmp_path):
    monkeypatch.setenv("PRIVREC_CACHE", str(tmp_path))
    monkeypatch.setattr(us, "STAGE_A", {"clip_norm": (0.5, 1.0), "server_lr": (1.0,)})
    monkeypatch.setattr(us, "DIMS", (2, 4))
    monkeypatch.setattr(us, "ROUNDS", (2, 4, 6))
    monkeypatch.setattr(us, "EPSILONS", (2.0, math.inf))


def test_noise_multiplier_is_the_wrappers_calibration():
    dp = DPFedAvg.calibrated(FedAvg(), target_epsilon=4.0, rounds=7, n_clients=50,
                             sample_rate=0.3, clip_norm=1.0)
    assert ul.noise_multiplier(4.0, sample_rate=0.3, rounds=7, n_units=50) == dp.noise_multiplier
    assert ul.noise_multiplier(math.inf, sample_rate=0.3, rounds=7, n_units=50) == 0.0


def test_bias_only_clients_share_and_upload_only_biases(setup):
    clients = BiasOnlyClients(setup.train, n_users=setup.n_users, n_items=setup.n_items)
    shared = clients.shared_state()
    assert set(shared) == {"item_bias", "global_bias"}
    uploads = clients.local_training(shared, torch.arange(clients.n_clients))
    assert set(uploads.rows) | set(uploads.dense) <= {"item_bias", "global_bias"}
    assert float(uploads.norms().max()) > 0
    dp = DPFedAvg(FedAvg(), n_clients=clients.n_clients, sample_rate=1.0, clip_norm=0.5,
                  noise_multiplier=1.0)
    sim = FederatedSimulator(clients, dp)
    sim.fit(3)
    model = clients.released_model(sim.shared)
    assert float(model.user_factors.detach().abs().max()) == 0.0
    assert float(model.item_factors.detach().abs().max()) == 0.0
    assert float(model.item_bias.detach().abs().max()) > 0  # the biases did train


def test_checkpoints_equal_separate_runs_without_noise(setup):
    kw = dict(n_users=setup.n_users, n_items=setup.n_items, epsilon=math.inf, sample_rate=1.0,
              dim=2, clip_norm=0.5, server_lr=1.0)
    _, _, _, snaps = ul.train_run(setup.fit, rounds=5, checkpoints=(2, 5), **kw)
    _, short, _, _ = ul.train_run(setup.fit, rounds=2, **kw)
    assert all(torch.equal(snaps[2][0][k], short[k]) for k in short)
    assert PrivacyLedger.from_json(snaps[2][2]).events[0].count == 2


def test_validation_run_refuses_several_rounds_with_noise(setup):
    with pytest.raises(ValueError, match="epsilon = inf"):
        us.validation_run(setup, dim=2, clip_norm=0.5, server_lr=1.0, rounds=(2, 4),
                          epsilon=2.0)


def test_stage_c_stops_at_the_first_rise(setup, monkeypatch):
    rmse = {2: 1.0, 4: 0.9, 6: 0.95}
    calls = []

    def fake(setup_, *, rounds, epsilon, **tuned):
        calls.append(rounds)
        return [{"rounds": rounds, "val_rmse": rmse[rounds], "epsilon": epsilon, **tuned}]

    monkeypatch.setattr(us, "validation_run", fake)
    monkeypatch.setattr(us, "ROUNDS", (2, 4, 6, 8))
    rows = us.search_rounds(setup, {"dim": 2, "clip_norm": 0.5, "server_lr": 1.0}, 2.0)
    assert calls == [2, 4, 6]  # 8 never ran
    assert us._best(us._winnable(rows))["rounds"] == 4
    # a later, lower value is not reachable by the rule
    assert us._winnable([{"val_rmse": v} for v in (1.0, 1.1, 0.5)]) == [{"val_rmse": 1.0},
                                                                        {"val_rmse": 1.1}]


def test_search_grid_and_ledgers(setup, monkeypatch):
    monkeypatch.setattr(ul, "CLIENTS", (6, 30))
    monkeypatch.setattr(ul, "POPULATIONS", (15,))
    monkeypatch.setattr(ul, "SILOS", (3,))
    monkeypatch.setattr(ul, "EPSILONS", (2.0, math.inf))
    monkeypatch.setattr(ul, "SILO_EPSILONS", (math.inf,))
    search = us.staged_search(setup)
    assert search.tuned["dim"] in (2, 4) and set(search.rounds_for) == {2.0, math.inf}
    ab, c = us.search_tables(search)
    assert len(ab) == 4 and list(c.columns) == [2.0, math.inf]
    assert c[math.inf].notna().all()  # the free checkpoints are all shown
    surface = ul.surface(setup, search)
    assert list(surface["panel"].value_counts().sort_index()) == [4, 1, 2]
    finite = surface[surface["epsilon"] < math.inf]
    assert (finite["ledger_epsilon"] - finite["epsilon"]).abs().max() < 0.02
    assert set(surface.loc[surface["panel"] == "cross-silo", "unit"]) == {"silo"}
    pop = surface[surface["panel"] == "population"]
    assert pop["clients"].tolist() == pytest.approx([1.5, 1.5])  # q = 0.1 of 15 users
    # the composed search: more than the release alone, and every run counted once
    book, n_runs = us.search_ledger(setup, search, 2.0)
    release = ul.grid_run(setup, search, epsilon=2.0, sample_rate=1.0)
    assert n_runs == 4 + len(search.stage_c[2.0])
    assert book.epsilon() > release["ledger_epsilon"] + 1.0
    assert book.unit == "user" and book.delta == default_delta(setup.n_users)
    assert us.search_cost(setup, search).loc[2.0, "search runs"] == n_runs
    table, verdict = ul.extra_cohort(setup, search, surface, clients=15, neighbours=(6, 30),
                                     epsilons=(2.0, math.inf))
    assert list(table.index) == ["6", "15", "30"] and list(table.columns) == [2.0, math.inf]
    assert "of 2 epsilons" in verdict and verdict.startswith("test RMSE, user-level epsilon")
    assert table.to_string(float_format="{:.4f}".format) in verdict
    # what the chapter prints: the runs above, at most 80 characters a line
    refs = {"global mean": {"rmse": 1.1, "ndcg": 0.4}, "bias-only": {"rmse": 0.95, "ndcg": 0.8}}
    texts = {"setup": ul.setup_text(setup), "search": us.search_text(search),
             "headline": us.headline_text(setup, search, refs, epsilon=2.0),
             "cost": us.search_cost_text(setup, search, epsilon=2.0),
             "surface": ul.surface_text(setup, search, surface, epsilon=2.0),
             "device": ul.cross_device_text(setup, surface, surface.iloc[:2], clip_norm=0.5,
                                            epsilon=2.0)}
    assert all(len(line) <= 80 for text in texts.values() for line in text.splitlines())
    assert f"chosen: d = {search.tuned['dim']}" in texts["search"]
    assert f"{n_runs} distinct search runs" in texts["cost"]
    assert texts["headline"].count("user-level ε = ") == 2  # both private models' ledgers
    assert "silo-level ε = " in texts["surface"] and "over 15 users" in texts["surface"]
    assert f"delta = {default_delta(setup.n_users):.0e}" in texts["device"]
    curves = ul.panel_curves(surface, "cross-device")
    assert list(curves) == ["m = 6", "m = 30"]  # increasing cohort, positions of each epsilon
    assert all(x == [0, 1] and len(y) == 2 for x, y in curves.values())
    spec = ul.explorer_spec(setup, surface, refs)
    assert len(spec["records"]) == 4 and "rmse" in spec["references"][0]
    assert "ndcg" not in spec["references"][0]  # the global mean ranks nothing
    # a second call reads the cache: identical rows
    assert ul.grid_run(setup, search, epsilon=2.0, sample_rate=1.0) == release


def test_bias_verdicts_read_the_paired_interval():
    index = pd.MultiIndex.from_product([[1.0, 8.0], range(4)], names=["epsilon", "seed"])
    frame = pd.DataFrame({"embedding": [1.0, 1.01, 0.99, 1.0, 0.90, 0.91, 0.92, 0.90],
                          "bias-only": [1.0, 1.0, 1.0, 1.0, 0.95, 0.96, 0.95, 0.95]},
                         index=index)
    verdicts = ul.bias_verdicts(frame)
    assert verdicts.loc[1.0, "verdict"] == "tie"
    assert verdicts.loc[8.0, "verdict"] == "better"
    assert verdicts.loc[8.0, "high"] < 0


def test_sybil_cohort_isolates_the_victim_and_masking_hides_it(setup, monkeypatch):
    search = us.Search([], [], {}, {"dim": 2, "clip_norm": 0.5, "server_lr": 1.0}, {8.0: 3})
    sim, dp = uu.private_round(setup, search)
    report = uu.secure_aggregation(setup, sim, dp, cohort=6, dropouts=2)
    assert "plain upload" in report and "precision 1.000" in report
    assert "precision 1.000, recall 1.000" in uu.sybil_cohort(setup, sim, dp, cohort=6)
    attacks = uu.upload_attacks(setup, sim, dp)
    assert attacks.loc["received", "precision"] == 1.0
    assert attacks.loc["received", "rating RMSE"] < 1e-3
    assert attacks.loc["device-clipped", "rating RMSE"] > 0.1  # clipping rescales, inversion errs
    assert uu.upload_text(setup, sim, dp).endswith(f"noise multiplier {dp.noise_multiplier:.2f}")


def test_shortfall_raises_epsilon():
    planned, table = uu.shortfall(n_users=200, rounds=5, clients=40)
    eps = table["user-level ε"]
    assert eps.iloc[0] == pytest.approx(8.0, abs=0.02)
    assert (eps.iloc[1:] > eps.iloc[0]).all()
    assert table["noise multiplier"].iloc[0] == planned
    text = uu.shortfall_text(n_users=200, rounds=5, clients=40)
    assert f"planned sigma = {planned:.3f};" in text and len(text.splitlines()) == 8

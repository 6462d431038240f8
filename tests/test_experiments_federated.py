"""Chapter 4's harnesses (privrec.course.experiments.federated): small synthetic data, few rounds."""

import pandas as pd
import pytest

from privrec.course.experiments import federated as fx
from privrec.federated.partitions import iid_partition
from privrec.recsys.data import random_split, synthetic_movielens


@pytest.fixture(scope="module")
def setup():
    ml = synthetic_movielens(30, 40, 600, seed=0)
    return fx.Setup(ml, *random_split(ml.ratings, test_fraction=0.2, seed=0), dim=3)


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PRIVREC_CACHE", str(tmp_path))


def test_history_is_cached_and_keyed_on_the_configuration(setup):
    a = fx.history(setup, rounds=4, eval_every=2)
    assert a["round"] == [2, 4] and len(a["bytes_up"]) == 4
    assert fx.history(setup, rounds=4, eval_every=2) == a
    b = fx.history(setup, ("FedAvg", {"weighting": "per_client"}), rounds=4, eval_every=2)
    assert b["test_rmse"] != a["test_rmse"]
    with pytest.raises(ValueError, match="strategy"):
        fx.history(setup, ("FedSGD", {}), rounds=2, eval_every=1)


def test_one_local_step_makes_the_partition_irrelevant_and_three_do_not(setup):
    silos = iid_partition(setup.n_users, 4, seed=0)
    assert fx.partition_gap(setup, silos, rounds=3) < 1e-5
    assert fx.partition_gap(setup, silos, rounds=3, local_epochs=3, local_lr=0.3) > 1e-4
    assert fx.gap_text(3e-7) == "below 1e-5 (float rounding)"
    assert fx.gap_text(0.25) == "0.250"


def test_recipe_and_silo_tables(setup):
    histories = {"a": fx.history(setup, rounds=4, eval_every=2),
                 "b": fx.history(setup, ("FedAvgM", {"server_momentum": 0.5}), rounds=4,
                                 eval_every=2)}
    table = fx.recipe_table(histories, 1.0, early=2)
    assert list(table.columns) == ["round 2", "round 4", "minus central"]
    assert table.loc["a", "minus central"] == pytest.approx(histories["a"]["test_rmse"][-1] - 1)
    study = fx.silo_study(setup, {"IID": iid_partition(setup.n_users, 4, seed=0)}, rounds=2,
                          clients_per_round=2)
    assert fx.silo_table(study).shape == (1, 2)
    sizes = fx.silo_sizes({"IID": iid_partition(setup.n_users, 4, seed=0)}, setup.train)
    assert sizes.loc["IID", "fewest ratings"] <= sizes.loc["IID", "most ratings"]


def test_communication_counts_a_dense_upload_as_the_whole_table(setup):
    table, model_mb, raw_mb = fx.communication(setup, iid_partition(setup.n_users, 4, seed=0))
    assert raw_mb == pytest.approx(len(setup.train) * 12 / 1e6)
    dense = table[table["upload"] == "dense"].set_index("setting")
    sparse = table[table["upload"] == "sparse"].set_index("setting")
    # one user touches few rows, so sparse is smaller; a silo touches almost every row, so the
    # int32 row indices can make sparse the larger upload
    assert dense.iloc[0]["up MB"] > sparse.iloc[0]["up MB"]
    assert (dense["down MB"] == sparse["down MB"]).all()
    assert dense.iloc[0]["up MB"] == pytest.approx(setup.n_users * model_mb)


def test_attacks_read_every_item_and_rating(setup):
    sim = fx.simulate(setup, keep_updates=True)
    sim.fit(2)
    items, recovered = fx.attack_last_round(setup, sim)
    assert items["precision"] == 1.0 and items["recall"] == 1.0
    joined = recovered.merge(setup.train, left_on=["client", "item"], right_on=["user", "item"])
    assert (joined["rating_x"] - joined["rating_y"]).abs().max() < 1e-3
    assert "precision 1.000, recall 1.000" in fx.dp_upload_attack(setup, rounds=2,
                                                                   sample_rate=0.5)


def test_drop_modal_value_removes_the_shared_pseudo_rating():
    recovered = pd.DataFrame({"client": [0, 0, 0, 0, 1, 1, 1],
                              "item": [1, 2, 3, 4, 1, 2, 3],
                              "rating": [3.5, 3.5, 4.0, 2.0, 1.0, 5.0, 1.0]})
    kept = fx.drop_modal_value(recovered)
    assert kept["rating"].tolist() == [4.0, 2.0, 5.0]
    tie = pd.DataFrame({"client": [0, 0], "item": [1, 2], "rating": [4.0, 2.0]})
    assert fx.drop_modal_value(tie)["rating"].tolist() == [4.0]  # a tie drops the smaller


def test_fake_items_dilute_the_item_set_until_filtered(setup):
    before, after = fx.fake_item_filter(setup, rho=1.0, rounds=2)
    assert before["precision"] < 0.75
    assert after["precision"] > before["precision"]


def test_show_body_leaves_out_the_docstring():
    def documented(x):
        """A long docstring that the page does not need."""
        return x + 1

    code = fx.show_body(documented).data
    assert "docstring" not in code and "return x + 1" in code and code.startswith("def documented")

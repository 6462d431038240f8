"""privrec.recsys.two_tower: the model, central training, and the federated clients (FederatedImplicit)
-- what they upload, what stays on the device, and what the server starts from on neighbouring
data sets. Training through the federated engine and DP-FedAvg: tests/test_two_tower_dp.py."""

import numpy as np
import pandas as pd
import pytest
import torch

from privrec.federated.two_tower import FederatedImplicit
from privrec.recsys.data import synthetic_movielens
from privrec.recsys.metrics import evaluate_ranking
from privrec.recsys.models import BiasedMF
from privrec.recsys.two_tower import TwoTowerRecommender, fit_two_tower, shared_size


def _embeddings(n_items=80, dim=48, seed=0):
    return torch.randn(n_items, dim, generator=torch.Generator().manual_seed(seed))


def synthetic_with_text(seed=0):
    """Synthetic ratings whose item 'text embeddings' carry the true item structure."""
    ml = synthetic_movielens(n_users=60, n_items=80, n_ratings=1500, dim=3, seed=seed)
    counts = np.bincount(ml.ratings["item"], minlength=80).astype(np.float32)
    emb = _embeddings(seed=seed) * 0.3
    emb[:, 0] += torch.from_numpy(np.log1p(counts))  # a popularity-bearing text feature
    return ml, emb


def new_model(kind, n_users=60, emb=None, seed=0):
    if kind == "two_tower":
        return TwoTowerRecommender(n_users, _embeddings() if emb is None else emb, dim=4, rank=2,
                                   item_bias=True, seed=seed)
    return BiasedMF(n_users, 80, 4, seed=seed)


def test_two_tower_shapes_and_sizes():
    emb = _embeddings()
    model = TwoTowerRecommender(60, emb, dim=8, rank=3, seed=0)
    assert model.score_all().shape == (60, 80)
    q, b = model.item_vectors()
    assert q.shape == (80, 8) and b.shape == (80,)
    assert shared_size(model) == 3 * (48 + 8) + 48 + 1
    users, items = torch.tensor([0, 5, 59]), torch.tensor([1, 79, 0])
    assert torch.allclose(model(users, items), model.score_all()[users, items], atol=1e-5)
    # LoRA start: B = 0, so the item vectors are the frozen public projection.
    assert torch.allclose(q, model.base_vectors)
    assert torch.allclose(model.base_vectors, model.item_embeddings @ model.base_projection)
    full = TwoTowerRecommender(60, emb, dim=8, rank=None, item_bias=True)
    assert shared_size(full) == 48 * 8 + 48 + 1 + 80
    small = TwoTowerRecommender(60, emb, dim=8, text_dim=16, rank=2)
    assert small.embedding_dim == 16 and shared_size(small) == 2 * (16 + 8) + 16 + 1
    with pytest.raises(TypeError, match="shared_parameter_names"):
        shared_size(torch.nn.Linear(2, 2))


def test_shared_initialisation_does_not_depend_on_the_number_of_users():
    small, big = new_model("two_tower", n_users=60), new_model("two_tower", n_users=61)
    for name in small.shared_parameter_names:
        assert torch.equal(getattr(small, name), getattr(big, name)), name
    assert not torch.equal(new_model("two_tower", seed=1).adapter_down, small.adapter_down)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(rank=0), ValueError, "rank"),
    (dict(rank=9), ValueError, "rank"),
    (dict(rank=2.5), TypeError, "rank"),
    (dict(dim=0), ValueError, "dim"),
    (dict(text_dim=4), ValueError, "text_dim"),
    (dict(item_bias=1), TypeError, "item_bias"),
    (dict(n_users=0), ValueError, "n_users"),
    (dict(init_std=-1.0), ValueError, "init_std"),
    (dict(seed=-1), ValueError, "seed"),
])
def test_two_tower_bad_arguments(kwargs, error, match):
    args = dict(n_users=10, item_embeddings=_embeddings(), dim=8, rank=2) | kwargs
    with pytest.raises(error, match=match):
        TwoTowerRecommender(**args)


def test_two_tower_bad_embeddings_and_ids():
    with pytest.raises(ValueError, match="2-D"):
        TwoTowerRecommender(5, torch.zeros(10), dim=2)
    with pytest.raises(ValueError, match="floating"):
        TwoTowerRecommender(5, torch.zeros(10, 4, dtype=torch.long), dim=2)
    bad = _embeddings()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        TwoTowerRecommender(5, bad, dim=2)
    with pytest.raises(TypeError):
        TwoTowerRecommender(5, [[0.0, 1.0]], dim=1)
    model = TwoTowerRecommender(5, _embeddings(), dim=4, rank=2)
    with pytest.raises(ValueError, match="items"):
        model(torch.tensor([0]), torch.tensor([80]))
    with pytest.raises(ValueError, match="users"):
        model(torch.tensor([5]), torch.tensor([0]))
    with pytest.raises(ValueError, match="same length"):
        model(torch.tensor([0, 1]), torch.tensor([0]))


def test_fit_two_tower_learns_and_returns_a_non_private_fit_result():
    ml, emb = synthetic_with_text()
    train, test = ml.ratings.iloc[:1000], ml.ratings.iloc[1000:]
    model = TwoTowerRecommender(ml.n_users, emb, dim=4, rank=2, seed=0)
    before = evaluate_ranking(model, train, test)["ndcg"]
    result = fit_two_tower(model, train, epochs=15, lr=0.05, batch_size=128)
    losses = result.history["loss"]
    assert result.model is model and result.ledger is None and result.epsilon == float("inf")
    assert len(losses) == 15 and losses[-1] < losses[0] and result.seconds > 0
    assert evaluate_ranking(model, train, test)["ndcg"] > before + 0.05
    with pytest.raises(TypeError, match="shared_parameter_names"):
        fit_two_tower(torch.nn.Linear(2, 2), ml.ratings)
    with pytest.raises(ValueError, match="negative_items"):
        fit_two_tower(model, ml.ratings, negative_items=[])


@pytest.mark.parametrize("kind", ["two_tower", "mf"])
def test_on_epoch_sees_exactly_the_shorter_runs(kind):
    """One run to 4 epochs passes through the 2-epoch run bit for bit (the epoch search relies
    on it), and ``on_epoch`` is called once per epoch."""
    ml, emb = synthetic_with_text()
    short = new_model(kind, emb=emb)
    fit_two_tower(short, ml.ratings, epochs=2, lr=0.05, batch_size=128, seed=3)
    seen = {}

    def record(epoch, model):
        seen[epoch] = model.score_all().detach().clone()

    fit_two_tower(new_model(kind, emb=emb), ml.ratings, epochs=4, lr=0.05, batch_size=128, seed=3,
                  on_epoch=record)
    assert sorted(seen) == [1, 2, 3, 4]
    assert torch.equal(seen[2], short.score_all().detach())
    assert not torch.equal(seen[4], seen[2])
    with pytest.raises(TypeError, match="on_epoch"):
        fit_two_tower(short, ml.ratings, epochs=1, on_epoch=3)


@pytest.mark.parametrize("kind", ["two_tower", "mf"])
def test_held_out_items_are_never_touched_when_negatives_come_from_the_pool(kind):
    ml, emb = synthetic_with_text()
    train = ml.ratings[ml.ratings["item"] < 40]
    model = new_model(kind, emb=emb)
    tables = {n: getattr(model, n).detach().clone() for n in ("item_bias", "item_factors")
              if hasattr(model, n)}
    fit_two_tower(model, train, epochs=3, lr=0.05, negative_items=np.arange(40))
    for name, before in tables.items():  # cold rows keep their initial values exactly
        assert torch.equal(getattr(model, name)[40:], before[40:]), name
        assert bool((getattr(model, name)[:40] != before[:40]).any()), name
    fit_two_tower(model, train, epochs=1, lr=0.05)  # all items as negatives: cold rows move
    assert bool((model.item_bias[40:] != 0).all())


def _round(fed, shared, clients):
    return fed.local_training({k: v.clone() for k, v in shared.items()}, torch.as_tensor(clients))


@pytest.mark.parametrize("kind", ["two_tower", "mf"])
def test_uploads_hold_only_shared_changes_and_user_rows_stay_on_the_device(kind):
    ml, _ = synthetic_with_text()
    model = new_model(kind)
    fed = FederatedImplicit(model, ml.ratings, local_steps=2, local_batch=4, seed=0)
    shared, users_before = fed.shared_state(), model.user_factors.detach().clone()
    clients = torch.tensor([3, 10, 42])
    updates = _round(fed, shared, clients)
    assert set(updates.rows) | set(updates.dense) == set(model.shared_parameter_names)
    assert set(updates.rows) == {n for n in model.shared_parameter_names if n.startswith("item_")}
    assert torch.equal(updates.clients, clients)
    assert torch.equal(updates.examples, torch.full((3,), 2.0 * 4 * 5))
    changed = (model.user_factors.detach() != users_before).any(1)
    assert torch.equal(changed.nonzero().squeeze(1), clients)  # only the cohort's devices
    # Row-sparse: each client sends at most the 2 steps x 4 x 5 rows it drew, each once, sorted.
    for part in updates.rows.values():
        assert int(torch.bincount(part.client_pos).max()) <= 40
        for pos in range(3):
            mine = part.row[part.client_pos == pos]
            assert torch.equal(mine, torch.unique(mine))  # sorted, no repeats
    assert updates.norms().shape == (3,) and bool((updates.norms() > 0).all())
    total = updates.summed({k: v.shape for k, v in shared.items()})
    assert set(total) == set(shared) and all(total[k].shape == shared[k].shape for k in shared)


def test_a_client_without_ratings_uploads_nothing_and_keeps_its_rows():
    ml, _ = synthetic_with_text()
    model = new_model("two_tower", n_users=61)  # user 60 has no ratings
    fed = FederatedImplicit(model, ml.ratings, seed=0)
    before = model.user_factors[60].detach().clone()
    updates = _round(fed, fed.shared_state(), [5, 60])
    assert updates.examples.tolist() == [2 * 16 * 5.0, 0.0]
    assert float(updates.norms()[1]) == 0.0
    assert not (updates.rows["item_bias"].client_pos == 1).any()
    assert torch.equal(model.user_factors[60], before)


def test_uploads_depend_only_on_the_own_client():
    """Changing user 0's local rows changes user 0's upload and nobody else's."""
    ml, _ = synthetic_with_text()

    def uploads(perturb):
        model = new_model("two_tower")
        if perturb:
            with torch.no_grad():
                model.user_factors[0] += 1.0
        fed = FederatedImplicit(model, ml.ratings, seed=3)
        return _round(fed, fed.shared_state(), torch.arange(ml.n_users))

    plain, perturbed = uploads(False), uploads(True)
    assert not torch.allclose(plain.dense["adapter_up"][0], perturbed.dense["adapter_up"][0])
    for name in plain.dense:
        assert torch.equal(plain.dense[name][1:], perturbed.dense[name][1:])
    others = plain.rows["item_bias"].client_pos > 0
    assert torch.equal(plain.rows["item_bias"].values[others],
                       perturbed.rows["item_bias"].values[perturbed.rows["item_bias"].client_pos > 0])


def _neighbours():
    """D (60 users) and D' = D plus one user with 30 ratings."""
    ml, emb = synthetic_with_text()
    extra = pd.DataFrame({"user": np.full(30, 60, np.int64), "item": np.arange(30, dtype=np.int64),
                          "rating": np.full(30, 5.0, np.float32),
                          "timestamp": np.arange(30, dtype=np.int64)})
    return emb, ml.ratings, pd.concat([ml.ratings, extra], ignore_index=True)


@pytest.mark.parametrize("item_bias", [False, True])
def test_neighbouring_datasets_give_the_server_the_same_start(item_bias):
    """Add one user: the shared initial state, the public buffers and the negative pool are
    bit-identical, so nothing before the first noisy release depends on the private data."""
    emb, data, neighbour = _neighbours()
    feds = [FederatedImplicit(TwoTowerRecommender(n, emb, dim=4, rank=2, item_bias=item_bias,
                                                  seed=7), ratings, seed=0)
            for n, ratings in ((60, data), (61, neighbour))]
    first, second = (f.shared_state() for f in feds)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    for name in ("item_embeddings", "base_projection", "base_vectors"):
        assert torch.equal(getattr(feds[0].model, name), getattr(feds[1].model, name))
    assert torch.equal(feds[0].pool, feds[1].pool)
    assert feds[0].shared_size == feds[1].shared_size


def test_federated_implicit_bad_inputs():
    ml, _ = synthetic_with_text()
    model = new_model("two_tower")
    with pytest.raises(TypeError, match="shared_parameter_names"):
        FederatedImplicit(torch.nn.Linear(2, 2), ml.ratings)
    with pytest.raises(ValueError, match="train"):
        FederatedImplicit(model, ml.ratings.assign(item=ml.ratings["item"] + 100))
    for kwargs, match in ((dict(local_steps=0), "local_steps"), (dict(client_lr=-1.0), "client_lr"),
                          (dict(user_lr=0.0), "user_lr"), (dict(negative_items=[]), "negative"),
                          (dict(personalise_steps=-1), "personalise_steps")):
        with pytest.raises(ValueError, match=match):
            FederatedImplicit(model, ml.ratings, **kwargs)
    fed = FederatedImplicit(model, ml.ratings)
    with pytest.raises(ValueError, match="clients"):
        fed.local_training(fed.shared_state(), torch.tensor([60]))
    with pytest.raises(ValueError, match="sorted and distinct"):
        fed.local_training(fed.shared_state(), torch.tensor([3, 1]))


def test_uploads_carry_no_autograd_graph_even_with_a_frozen_shared_parameter():
    ml, _ = synthetic_with_text()
    model = new_model("two_tower")
    model.shared_parameter_names = tuple(n for n in model.shared_parameter_names
                                         if n != "adapter_down")  # frozen A, still a Parameter
    fed = FederatedImplicit(model, ml.ratings, seed=0)
    updates = _round(fed, fed.shared_state(), torch.arange(10))
    assert not updates.norms().requires_grad and "adapter_down" not in updates.dense
    assert not any(v.requires_grad for v in updates.dense.values())

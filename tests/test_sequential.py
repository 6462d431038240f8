"""Tests of privrec.recsys.sequential (the SASRec-style model) and privrec.federated.sequential."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from privrec.federated.protocols import FederatedModel
from privrec.federated.sequential import FederatedSequential, fit_dp_fedavg_sequential
from privrec.recsys.data import leave_last_out_split
from privrec.recsys.metrics import ranking_metrics
from privrec.recsys.sequential import (
    SASRec,
    causal_mask,
    evaluate_next_item,
    fit_sasrec,
    history_windows,
    next_item_scores,
    sequence_losses,
    training_windows,
    user_sequences,
)


def _cycle_data(n_users: int = 30, n_items: int = 20, length: int = 12) -> pd.DataFrame:
    """Every user walks the catalogue in order from a random start: item i is followed by i+1."""
    rng = np.random.default_rng(0)
    rows = [(u, (start + t) % n_items, 1.0, 1000 + t) for u in range(n_users)
            for start in [int(rng.integers(n_items))] for t in range(length)]
    return pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"]).astype(
        {"user": np.int64, "item": np.int64, "rating": np.float32, "timestamp": np.int64})


def test_sequences_are_in_time_order_with_ties_broken_by_item_id():
    ratings = pd.DataFrame({"user": [0, 0, 0, 1, 0], "item": [5, 2, 9, 1, 3],
                            "rating": np.float32(1), "timestamp": [20, 10, 10, 5, 30]})
    seq = user_sequences(ratings, n_users=2, n_items=10)
    assert seq.of(0).tolist() == [2, 9, 5, 3] and seq.of(1).tolist() == [1]
    shuffled = user_sequences(ratings.iloc[::-1], n_users=2, n_items=10)
    assert np.array_equal(seq.items, shuffled.items)
    # the same order as the leave-last-out split: the held-out item follows the sequence
    train, test = leave_last_out_split(ratings)
    assert test.loc[test["user"] == 0, "item"].item() == 3
    assert user_sequences(train, n_users=2, n_items=10).of(0).tolist() == [2, 9, 5]


def test_windows_shift_by_one_and_pad_on_the_left():
    ratings = pd.DataFrame({"user": 0, "item": [4, 7, 1, 2], "rating": np.float32(1),
                            "timestamp": [1, 2, 3, 4]})
    seq = user_sequences(ratings, n_users=1, n_items=10)
    inputs, targets = training_windows(seq, max_len=5)
    assert inputs.tolist() == [[0, 0, 5, 8, 2]]          # model ids (item + 1), 0 = padding
    assert targets.tolist() == [[-1, -1, 7, 1, 2]]       # the next item, catalogue ids
    inputs, targets = training_windows(seq, max_len=2)   # truncated to the newest items
    assert inputs.tolist() == [[8, 2]] and targets.tolist() == [[1, 2]]
    assert history_windows(seq, max_len=3).tolist() == [[8, 2, 3]]


def test_causal_mask_allows_exactly_the_past_and_present():
    inputs = torch.tensor([[0, 0, 3, 4, 5]])
    allowed = causal_mask(inputs)[0]
    for t in range(5):
        for j in range(5):
            expected = (j <= t and inputs[0, j] != 0) or j == t
            assert bool(allowed[t, j]) == expected, (t, j)


@pytest.mark.parametrize("t", [2, 5, 8])
def test_the_future_is_hidden_and_the_present_is_seen(t):
    """Fails if the mask is off by one either way: changing item t+1 must not move the state at
    t; changing item t must move it."""
    model = SASRec(30, dim=16, max_len=10, dropout=0.0, seed=0)
    x = torch.randint(1, 31, (1, 10))
    base = model(x)
    future = x.clone()
    future[0, t + 1:] = (future[0, t + 1:] % 30) + 1
    present = x.clone()
    present[0, t] = present[0, t] % 30 + 1
    assert torch.allclose(model(future)[0, :t + 1], base[0, :t + 1], atol=1e-6)
    assert not torch.allclose(model(present)[0, t], base[0, t], atol=1e-4)


def test_padding_and_items_outside_the_window_do_not_matter():
    model = SASRec(30, dim=16, max_len=6, dropout=0.0, seed=0)
    a = torch.tensor([[0, 0, 0, 4, 5, 6]])
    b = torch.tensor([[0, 9, 0, 4, 5, 6]])  # a padding row is never a key: only real items count
    b[0, 1] = 0
    assert torch.allclose(model(a)[0, 3:], model(b)[0, 3:], atol=1e-6)
    short = torch.tensor([[4, 5, 6]])       # right-aligned: the same positions as the padded window
    assert torch.allclose(model(short)[0], model(a)[0, 3:], atol=1e-6)


def test_output_layer_is_the_item_table_and_init_is_seeded():
    a, b = SASRec(30, dim=8, seed=3), SASRec(30, dim=8, seed=3)
    assert a.output.weight is a.items.weight
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    state = torch.random.get_rng_state()
    SASRec(30, dim=8, seed=4)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


def test_sampled_softmax_with_all_items_equals_the_full_softmax():
    model = SASRec(12, dim=8, max_len=5, dropout=0.0, seed=0)
    x = torch.randint(1, 13, (3, 5))
    y = torch.randint(0, 12, (3, 5))
    y[0, :2] = -1
    full = sequence_losses(model, x, y)
    sampled = sequence_losses(model, x, y, torch.arange(12))  # every item a "negative"
    assert torch.allclose(full, sampled, atol=1e-5)


def test_training_learns_a_sequential_pattern_that_popularity_cannot():
    ratings = _cycle_data()
    train, test = leave_last_out_split(ratings)
    model = SASRec(20, dim=16, max_len=8, dropout=0.0, seed=0)
    result = fit_sasrec(model, train, epochs=40, lr=0.01, batch_size=16, n_negatives=None)
    assert result.history["train_loss"][-1] < 0.5 * result.history["train_loss"][0]
    metrics = evaluate_next_item(model, train, test, n_users=30, k=1)
    assert metrics["hr"] > 0.9  # the next item of a cycle is always its successor


def test_evaluation_is_ranking_metrics_on_the_last_position(seqdata):
    train, test = leave_last_out_split(seqdata.ratings)
    model = SASRec(seqdata.n_items, dim=8, max_len=6, dropout=0.0, seed=1)
    scores = next_item_scores(model, user_sequences(train, n_users=seqdata.n_users,
                                                    n_items=seqdata.n_items))
    expected = ranking_metrics(scores, train, test)
    assert evaluate_next_item(model, train, test, n_users=seqdata.n_users) == expected
    # by hand for user 0: rank among unseen items, 1 / log2(rank + 2) inside the top 10
    row = scores[0].double().clone()
    row[torch.as_tensor(train.loc[train["user"] == 0, "item"].to_numpy())] = -math.inf
    item = int(test.loc[test["user"] == 0, "item"].iloc[0])
    rank = int((row > row[item]).sum() + (row == row[item]).sum() - 1)
    one = ranking_metrics(scores[:1], train[train["user"] == 0], test[test["user"] == 0])
    assert one["ndcg"] == pytest.approx(1 / math.log2(rank + 2) if rank < 10 else 0.0)


def test_bad_arguments_name_the_parameter(seqdata):
    with pytest.raises(TypeError, match="dim"):
        SASRec(10, dim="8")
    with pytest.raises(ValueError, match="dropout"):
        SASRec(10, dropout=1.5)
    with pytest.raises(ValueError, match="multiple of n_heads"):
        SASRec(10, dim=6, n_heads=4)
    with pytest.raises(TypeError, match="model must be a SASRec"):
        fit_sasrec(torch.nn.Linear(2, 2), seqdata.ratings)
    with pytest.raises(ValueError, match="timestamp"):
        user_sequences(seqdata.ratings.drop(columns="timestamp"), n_users=seqdata.n_users,
                       n_items=seqdata.n_items)
    with pytest.raises(ValueError, match="max_len"):
        training_windows(user_sequences(seqdata.ratings, n_users=seqdata.n_users, n_items=seqdata.n_items),
                         max_len=0)


# -- the federated model -----------------------------------------------------------------------

def test_federated_model_follows_the_protocol_and_trains_each_client_alone(seqdata):
    train, _ = leave_last_out_split(seqdata.ratings)
    model = SASRec(seqdata.n_items, dim=8, max_len=6, dropout=0.0, seed=0)
    clients = FederatedSequential(model, train, n_users=seqdata.n_users, local_steps=2,
                                  client_lr=0.3, n_negatives=None)
    assert isinstance(clients, FederatedModel) and clients.upload == "dense"
    shared = clients.shared_state()
    updates = clients.local_training(shared, torch.tensor([1, 4]))
    # client 4 alone, by hand: two SGD steps of its own loss from the broadcast model
    twin = SASRec(seqdata.n_items, dim=8, max_len=6, dropout=0.0, seed=0)
    opt = torch.optim.SGD(twin.parameters(), lr=0.3)
    for _ in range(2):
        opt.zero_grad()
        sequence_losses(twin, clients.inputs[4:5], clients.targets[4:5]).sum().backward()
        opt.step()
    for name, p in twin.named_parameters():
        assert torch.allclose(updates.dense[name][1], p.detach() - shared[name], atol=1e-5), name


def test_dp_fedavg_ledger_composes_the_prior_release(seqdata):
    from privrec.dp.ledger import PrivacyLedger

    train, test = leave_last_out_split(seqdata.ratings)
    prior = PrivacyLedger(unit="user", n_units=seqdata.n_users)
    prior.record_gaussian("prior", noise_multiplier=3.0)
    model = SASRec(seqdata.n_items, dim=8, max_len=6, dropout=0.0, seed=0)
    fit = fit_dp_fedavg_sequential(model, train, n_users=seqdata.n_users, target_epsilon=4.0,
                                   rounds=3, sample_rate=0.3, ledger=prior, n_negatives=None)
    assert fit.ledger.epsilon() == pytest.approx(4.0, abs=0.05)
    assert [e.name for e in fit.ledger.events] == ["prior", "DP-FedAvg round"]
    assert fit.ledger.events[1].count == 3 and len(prior.events) == 1  # the input is not changed
    assert set(evaluate_next_item(fit.model, train, test, n_users=seqdata.n_users)) == {"hr", "ndcg"}
    with pytest.raises(ValueError, match="dropout"):
        FederatedSequential(SASRec(seqdata.n_items, dim=8, dropout=0.1), train, n_users=seqdata.n_users)


def test_dp_fedavg_with_a_given_noise_multiplier_records_it(seqdata):
    train, _ = leave_last_out_split(seqdata.ratings)
    calibrated = fit_dp_fedavg_sequential(SASRec(seqdata.n_items, dim=8, max_len=6, dropout=0.0),
                                          train, n_users=seqdata.n_users, target_epsilon=4.0,
                                          rounds=2, sample_rate=0.3, n_negatives=None)
    sigma = calibrated.history["noise_multiplier"][0]
    given = fit_dp_fedavg_sequential(SASRec(seqdata.n_items, dim=8, max_len=6, dropout=0.0), train,
                                     n_users=seqdata.n_users, noise_multiplier=sigma, rounds=2,
                                     sample_rate=0.3, n_negatives=None)
    assert given.ledger.epsilon() == pytest.approx(calibrated.ledger.epsilon(), rel=1e-9)
    for name, p in given.model.named_parameters():
        assert torch.equal(p, dict(calibrated.model.named_parameters())[name]), name
    with pytest.raises(ValueError, match="exactly one"):
        fit_dp_fedavg_sequential(SASRec(seqdata.n_items, dim=8, max_len=6, dropout=0.0), train,
                                 n_users=seqdata.n_users, rounds=2, sample_rate=0.3)
    with pytest.raises(ValueError, match="noise_multiplier"):
        fit_dp_fedavg_sequential(SASRec(seqdata.n_items, dim=8, max_len=6, dropout=0.0), train,
                                 n_users=seqdata.n_users, noise_multiplier=-1.0, rounds=2,
                                 sample_rate=0.3, n_negatives=None)

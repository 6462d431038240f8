"""Tests for privrec.federated.strategies: sampling, weighted means on crafted uploads, server optimisers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privrec.federated.strategies import FedAdam, FedAvg, FedAvgM
from privrec.federated.updates import ClientUpdates, RowUpdates

SHAPES = {"table": torch.Size([4, 2]), "scalar": torch.Size([])}


def crafted(seed: int = 0) -> ClientUpdates:
    """Three clients: rows (client 0: rows 0, 1), (client 1: row 1), (client 2: row 3)."""
    gen = torch.Generator().manual_seed(seed)
    return ClientUpdates(
        clients=torch.tensor([2, 5, 9]), examples=torch.tensor([1.0, 3.0, 6.0]),
        rows={"table": RowUpdates(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 3]),
                                  torch.randn(4, 2, generator=gen), torch.tensor([1.0, 2.0, 3.0,
                                                                                  6.0]))},
        dense={"scalar": torch.randn(3, generator=gen)})


def zeros() -> dict[str, torch.Tensor]:
    return {k: torch.zeros(s) for k, s in SHAPES.items()}


def mean_change(strategy, updates) -> dict[str, torch.Tensor]:
    total = strategy.start(zeros())
    strategy.accumulate(total, updates)
    return strategy.finish(total)


def test_per_row_and_per_client_means_by_hand():
    up = crafted()
    v = up.rows["table"].values
    per_row = mean_change(FedAvg(), up)
    torch.testing.assert_close(per_row["table"][0], v[0])                       # only client 0
    torch.testing.assert_close(per_row["table"][1], (2 * v[1] + 3 * v[2]) / 5)  # row weights 2, 3
    torch.testing.assert_close(per_row["table"][2], torch.zeros(2))             # untouched
    torch.testing.assert_close(per_row["scalar"], (up.dense["scalar"] * up.examples).sum() / 10)
    per_client = mean_change(FedAvg(weighting="per_client"), up)
    torch.testing.assert_close(per_client["table"][1], (1 * v[1] + 3 * v[2]) / 10)
    torch.testing.assert_close(per_client["table"][3], 6 * v[3] / 10)


def test_streaming_two_chunks_equals_one():
    up = crafted()
    first = ClientUpdates(up.clients[:2], up.examples[:2],
                          {"table": RowUpdates(torch.tensor([0, 0, 1]), up.rows["table"].row[:3],
                                               up.rows["table"].values[:3],
                                               up.rows["table"].examples[:3])},
                          {"scalar": up.dense["scalar"][:2]})
    second = ClientUpdates(up.clients[2:], up.examples[2:],
                           {"table": RowUpdates(torch.tensor([0]), up.rows["table"].row[3:],
                                                up.rows["table"].values[3:],
                                                up.rows["table"].examples[3:])},
                           {"scalar": up.dense["scalar"][2:]})
    for weighting in ("per_row", "per_client"):
        strategy = FedAvg(weighting=weighting)
        total = strategy.start(zeros())
        strategy.accumulate(total, first)
        strategy.accumulate(total, second)
        streamed, whole = strategy.finish(total), mean_change(strategy, up)
        for key in SHAPES:
            torch.testing.assert_close(streamed[key], whole[key])
    joined = ClientUpdates.concat([first, second])
    assert torch.equal(joined.rows["table"].client_pos, up.rows["table"].client_pos)


def test_nobody_contributing_moves_nothing():
    strategy = FedAvg()
    change = strategy.finish(strategy.start(zeros()))
    assert all(bool((v == 0).all()) for v in change.values())


def test_sampling_is_seeded_without_replacement():
    strategy = FedAvg(clients_per_round=7, seed=9)
    draws = [strategy.sample(50) for _ in range(5)]
    assert all(len(torch.unique(d)) == 7 and d.tolist() == sorted(d.tolist()) for d in draws)
    again = FedAvg(clients_per_round=7, seed=9)
    assert all(torch.equal(d, again.sample(50)) for d in draws)
    assert FedAvg().sample(50).tolist() == list(range(50))
    counts = np.bincount(torch.cat([strategy.sample(50) for _ in range(400)]).numpy(), minlength=50)
    assert counts.min() > 20 and counts.max() < 100      # every client ~ 7/50 * 400 = 56 times


def _run(strategy, deltas):
    shared = {"w": torch.zeros(3)}
    for d in deltas:
        strategy.step(shared, {"w": d.clone()})
    return shared["w"]


DELTAS = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.5, 1.0, 0.0]),
          torch.tensor([-1.0, 0.0, 2.0])]


def test_fedavgm_is_momentum_by_hand_and_zero_momentum_is_fedavg():
    beta, lr = 0.7, 0.5
    v, w = torch.zeros(3), torch.zeros(3)
    for d in DELTAS:
        v = beta * v + d
        w = w + lr * v
    torch.testing.assert_close(_run(FedAvgM(server_momentum=beta, server_lr=lr), DELTAS), w)
    torch.testing.assert_close(_run(FedAvgM(server_momentum=0.0, server_lr=lr), DELTAS),
                               _run(FedAvg(server_lr=lr), DELTAS))


def test_fedadam_is_reddi_algorithm_2_by_hand():
    b1, b2, tau, lr = 0.9, 0.99, 1e-3, 0.1
    m, v, w = torch.zeros(3), torch.zeros(3), torch.zeros(3)
    for d in DELTAS:
        m = b1 * m + (1 - b1) * d
        v = b2 * v + (1 - b2) * d * d
        w = w + lr * m / (v.sqrt() + tau)
    torch.testing.assert_close(_run(FedAdam(beta1=b1, beta2=b2, tau=tau, server_lr=lr), DELTAS), w)
    # The first step moves every touched coordinate by about lr * (1 - b1) / sqrt(1 - b2).
    first = _run(FedAdam(server_lr=lr), DELTAS[:1])
    assert torch.allclose(first[:2].abs(), torch.full((2,), lr * 0.1 / 0.1), rtol=1e-2)


@pytest.mark.parametrize("call, match", [
    (lambda: FedAvg(clients_per_round=0), "clients_per_round"),
    (lambda: FedAvg(server_lr=0.0), "server_lr"),
    (lambda: FedAvg(weighting="median"), "weighting"),
    (lambda: FedAvg(seed=-1), "seed"),
    (lambda: FedAvgM(server_momentum=1.0), "server_momentum"),
    (lambda: FedAdam(beta1=1.0), "beta1"),
    (lambda: FedAdam(tau=0.0), "tau"),
    (lambda: FedAvg(clients_per_round=5).sample(4), "clients_per_round"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("call, error, match", [
    (lambda: FedAvg().sample("5"), TypeError, "n_clients"),
    (lambda: FedAvg().sample(0), ValueError, "n_clients"),
    (lambda: FedAvg().start([1.0]), TypeError, "shared"),
    (lambda: FedAvg().start({}), ValueError, "shared"),
    (lambda: FedAvg().accumulate(None, crafted()), TypeError, "total"),
    (lambda: FedAvg().accumulate(FedAvg().start(zeros()), [1.0]), TypeError, "updates"),
    (lambda: FedAvg().finish({}), TypeError, "total"),
    (lambda: FedAvg().step(zeros(), [1.0]), TypeError, "change"),
    (lambda: FedAvg().step(zeros(), {"other": torch.zeros(2)}), ValueError, "change"),
    (lambda: FedAvg().step({"table": torch.zeros(4, 2, dtype=torch.long)}, zeros()), TypeError,
     "shared"),
    (lambda: ClientUpdates.concat("ab"), TypeError, "parts"),
    (lambda: crafted().scaled([1.0, 1.0, 1.0]), TypeError, "factor"),
    (lambda: crafted().scaled(torch.ones(2)), ValueError, "factor"),
    (lambda: crafted().summed({"table": torch.Size([4, 2])}), ValueError, "scalar"),
    (lambda: ClientUpdates([2], torch.ones(1), {}, {}), TypeError, "clients"),
    (lambda: ClientUpdates(torch.tensor([2]), torch.ones(2), {}, {}), ValueError, "examples"),
    (lambda: ClientUpdates(torch.tensor([2]), torch.ones(1), {"t": 1}, {}), TypeError, "rows"),
    (lambda: ClientUpdates(torch.tensor([2]), torch.ones(1), {}, {"d": torch.ones(3)}),
     ValueError, "dense"),
    (lambda: RowUpdates(torch.tensor([0, 0]), torch.tensor([1, 2, 3]), torch.ones(3, 2),
                        torch.ones(3)), ValueError, "client_pos"),
])
def test_calls_name_their_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()

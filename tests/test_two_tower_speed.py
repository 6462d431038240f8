"""The two-tower shortcuts change no number: gathers by ``index_select`` instead of advanced
indexing (clients' positives, uploaded rows, user rows) and functional calls without the untying
pass."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from privrec.federated.dpfedavg import DPFedAvg
from privrec.federated.engine import FederatedSimulator
from privrec.federated.strategies import FedAvgM
from privrec.federated.two_tower import FederatedImplicit
from privrec.recsys.data import random_split, synthetic_movielens
from privrec.recsys.models import BiasedMF
from privrec.recsys.two_tower import TwoTowerRecommender, implicit_batch

ML = synthetic_movielens(n_users=50, n_items=70, n_ratings=1200, seed=4)
TRAIN, TEST = random_split(ML.ratings, seed=0)
EMB = torch.randn(ML.n_items, 24, generator=torch.Generator().manual_seed(2))


class _OldClients(FederatedImplicit):
    """The clients' gathers as they were (the functional call as it was: :func:`_untying_call`)."""

    def _draw(self, clients):
        counts = self.counts[clients, None]
        offsets = (torch.rand(len(clients), self.local_batch, generator=self.generator)
                   * counts).long().minimum(counts - 1)
        positives = self.items_by_user[self.starts[clients, None] + offsets]
        return implicit_batch(positives, self.pool, n_negatives=self.n_negatives,
                              generator=self.generator)

    def _package(self, clients, changes, position, touched):
        out = super()._package(clients, changes, position, touched)
        for n, r in out.rows.items():
            assert torch.equal(r.values, changes[n][r.client_pos, r.row])
        return out

    def _user_rows(self, clients):
        return {n: getattr(self.model, n).detach()[clients][:, None] for n in self.user_names}

    def _store_user_rows(self, clients, rows):
        with torch.no_grad():
            for n in self.user_names:
                getattr(self.model, n)[clients] = rows[n][:, 0]


def _model(kind):
    if kind == "mf":
        return BiasedMF(ML.n_users, ML.n_items, 4, seed=1)
    rank = None if kind == "full" else 2
    return TwoTowerRecommender(ML.n_users, EMB, 4, text_dim=8, rank=rank, item_bias=True, seed=1)


def _untying_call(module, params, args, **kwargs):
    """``torch.func.functional_call`` with its default untying pass, whatever the caller asks."""
    kwargs.pop("tie_weights", None)
    return _FUNCTIONAL_CALL(module, params, args, **kwargs)


_FUNCTIONAL_CALL = torch.func.functional_call


def _run(kind, old):
    if old:  # the previous clients: their gathers, and functional calls that untie
        with mock.patch.object(torch.func, "functional_call", _untying_call):
            return _simulate(kind, _OldClients)
    return _simulate(kind, FederatedImplicit)


def _simulate(kind, cls):
    model = _model(kind)
    clients = cls(model, TRAIN, local_steps=2, local_batch=4, n_negatives=2, client_lr=2.0,
                  personalise_steps=3, negative_items=torch.arange(60), seed=5)
    dp = DPFedAvg(FedAvgM(server_momentum=0.5), n_clients=clients.n_clients, sample_rate=0.3,
                  clip_norm=0.5, noise_multiplier=0.7, unit=clients.privacy_unit, seed=3)
    sim = FederatedSimulator(clients, dp, keep_updates=True)
    uploads = []
    for _ in range(4):
        sim.round()
        uploads.append(sim.last_updates)
    released = sim.released_model()
    return sim.shared, uploads, {n: p.detach().clone() for n, p in released.named_parameters()}


@pytest.mark.parametrize("kind", ["adapter", "full", "mf"])
def test_the_shortcuts_give_the_same_bits(kind):
    (shared, uploads, params), (ref_shared, ref_uploads, ref_params) = _run(kind, False), \
        _run(kind, True)
    assert shared.keys() == ref_shared.keys()
    assert all(torch.equal(shared[n], ref_shared[n]) for n in shared)
    assert params.keys() == ref_params.keys()
    assert all(torch.equal(params[n], ref_params[n]) for n in params)
    for up, ref in zip(uploads, ref_uploads, strict=True):
        assert torch.equal(up.clients, ref.clients) and torch.equal(up.examples, ref.examples)
        assert all(torch.equal(up.dense[n], ref.dense[n]) for n in ref.dense)
        for n, r in ref.rows.items():
            assert all(torch.equal(getattr(up.rows[n], f), getattr(r, f))
                       for f in ("client_pos", "row", "values", "examples"))


def test_a_model_with_tied_weights_is_refused():
    # the clients' functional call skips untying (tie_weights=False): a tied model must not pass
    model = TwoTowerRecommender(ML.n_users, EMB, dim=4)
    FederatedImplicit(model, TRAIN)                      # untied: accepted
    tied = TwoTowerRecommender(ML.n_users, EMB, dim=4)
    tied.register_parameter("alias", next(iter(tied.parameters())))
    with pytest.raises(ValueError, match="model must not tie parameters"):
        FederatedImplicit(tied, TRAIN)

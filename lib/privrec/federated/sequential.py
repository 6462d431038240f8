"""The Transformer recommender as a federated model: every user a client holding their own history.

:class:`FederatedSequential` satisfies :class:`privrec.federated.protocols.FederatedModel`, so the
book's one engine (:func:`privrec.federated.engine.federated_round`, driven by
:class:`~privrec.federated.engine.FederatedSimulator` here and by the Flower ServerApp in
deployment) trains :class:`~privrec.recsys.sequential.SASRec`, and
:class:`~privrec.federated.dpfedavg.DPFedAvg` makes it user-level private (McMahan et al. 2018):
each round a Poisson cohort of users trains locally, each whole update is clipped to norm
:math:`C`, and Gaussian noise :math:`\\sigma C` goes on the sum.

A client holds one user's time-ordered history (:func:`~privrec.recsys.sequential.user_sequences`).
In :meth:`FederatedSequential.local_training` it starts from the broadcast model and takes
``local_steps`` SGD steps (rate ``client_lr``) on its own sequence loss
(:func:`~privrec.recsys.sequential.sequence_losses`); all clients of a chunk run as one
``torch.func.vmap`` program. The model has no user parameters -- a user is represented only by
the items they read -- so *every* parameter is shared and the upload is the dense change of all of
them (the item table included: the softmax touches every row).
"""

from __future__ import annotations

import math
import time

import pandas as pd
import torch

from ..core.checks import check_sample_rate, epsilon_or_inf, int_in, non_negative, positive
from ..core.checks import seed as check_seed
from ..core.results import FitResult
from ..dp.ledger import PrivacyLedger
from ..recsys.sequential import SASRec, evaluate_next_item, sequence_losses, training_windows, user_sequences
from .dpfedavg import DPFedAvg, round_events
from .engine import FederatedSimulator
from .strategies import FedAvg
from .updates import ClientUpdates

__all__ = ["FederatedSequential", "fit_dp_fedavg_sequential"]


class FederatedSequential:
    """Every user a client for :class:`~privrec.recsys.sequential.SASRec` (module docstring).

    Parameters
    ----------
    model:
        The model; its seeded initialisation is the server's initial state (no data statistic).
        Its dropout must be 0 (the clients run under ``vmap``).
    train:
        Interactions with timestamps: client ``u`` holds user ``u``'s history.
    n_users:
        Number of clients (public).
    local_steps, client_lr:
        SGD steps each client takes per round and their step size.
    n_negatives:
        Shared uniform negatives per local step (sampled softmax); ``None``: the full softmax.
    seed:
        Seeds the negatives.

    Raises
    ------
    TypeError, ValueError
        For a model that is not a SASRec, dropout above 0 or bad settings.
    """

    privacy_unit, upload = "user", "dense"

    def __init__(self, model: SASRec, train: pd.DataFrame, *, n_users: int, local_steps: int = 2,
                 client_lr: float = 0.5, n_negatives: int | None = 256, seed: int = 0) -> None:
        if not isinstance(model, SASRec):
            raise TypeError(f"model must be a SASRec, got {type(model).__name__}")
        if model.dropout_rate != 0.0:
            raise ValueError(f"dropout must be 0 for federated clients, got {model.dropout_rate}")
        self.model, self.train = model, train
        self.n_clients = int_in("n_users", n_users, 1)
        sequences = user_sequences(train, n_users=self.n_clients, n_items=model.n_items)
        self.inputs, self.targets = training_windows(sequences, max_len=model.max_len)
        self.examples = (self.targets >= 0).sum(1).float()
        self.local_steps = int_in("local_steps", local_steps, 1)
        self.client_lr = positive("client_lr", client_lr)
        self.n_negatives = None if n_negatives is None else int_in("n_negatives", n_negatives, 1,
                                                                   model.n_items)
        self.generator = torch.Generator().manual_seed(check_seed("seed", seed))
        self.names = [n for n, _ in model.named_parameters()]
        wrapper = _SequenceLoss(model)

        def loss(params, inputs, targets, negatives):
            return torch.func.functional_call(
                wrapper, {f"model.{n}": v for n, v in params.items()},
                (inputs[None], targets[None], negatives))

        self._grad = torch.func.vmap(torch.func.grad(loss), in_dims=(0, 0, 0, None))

    def shared_state(self) -> dict[str, torch.Tensor]:
        """The model's current parameters (at the start: its seeded initialisation)."""
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def load_shared(self, shared: dict[str, torch.Tensor]) -> None:
        """Write ``shared`` into the model."""
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(shared[n])

    def chunks(self, clients: torch.Tensor, max_examples: int) -> list[torch.Tensor]:
        """Consecutive groups of the sorted ``clients``, about ``max_examples`` targets each."""
        size = max(1, int_in("max_examples", max_examples, 1) // self.model.max_len)
        return list(torch.split(torch.as_tensor(clients), size)) if len(clients) else []

    def _negatives(self) -> torch.Tensor | None:
        if self.n_negatives is None:
            return None
        return torch.randperm(self.model.n_items, generator=self.generator)[:self.n_negatives]

    @torch.no_grad()
    def local_training(self, shared: dict[str, torch.Tensor],
                       clients: torch.Tensor) -> ClientUpdates:
        """Each client's change of every parameter after ``local_steps`` SGD steps from
        ``shared`` (zero for a client with fewer than two items)."""
        clients = torch.as_tensor(clients, dtype=torch.long)
        if len(clients) and (int(clients.min()) < 0 or int(clients.max()) >= self.n_clients):
            raise ValueError(f"clients must be ids in [0, {self.n_clients})")
        local = {n: shared[n].expand(len(clients), *shared[n].shape).clone() for n in self.names}
        inputs, targets = self.inputs[clients], self.targets[clients]
        for _ in range(self.local_steps if len(clients) else 0):
            grads = self._grad(local, inputs, targets, self._negatives())
            for n in self.names:
                local[n].sub_(grads[n], alpha=self.client_lr)
        change = {n: local[n] - shared[n] for n in self.names}
        return ClientUpdates(clients, self.examples[clients], {}, change)

    def released_model(self, shared: dict[str, torch.Tensor]) -> SASRec:
        """The model with the released ``shared`` parameters (nothing is personalised)."""
        self.load_shared(shared)
        return self.model.eval()

    def evaluate(self, shared: dict[str, torch.Tensor], test: pd.DataFrame) -> dict[str, float]:
        """HR@10 and NDCG@10 of the released model (full ranking, the book's tie rule)."""
        return evaluate_next_item(self.released_model(shared), self.train, test,
                                  n_users=self.n_clients)


class _SequenceLoss(torch.nn.Module):
    """``model``'s summed sequence loss as a module, so ``functional_call`` can swap in one
    client's copy of the parameters."""

    def __init__(self, model: SASRec) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor,
                negatives: torch.Tensor | None) -> torch.Tensor:
        return sequence_losses(self.model, inputs, targets, negatives).sum()


def fit_dp_fedavg_sequential(model: SASRec, train: pd.DataFrame, *, n_users: int,
                             target_epsilon: float | None = None, rounds: int, sample_rate: float,
                             noise_multiplier: float | None = None,
                             clip_norm: float = 1.0, local_steps: int = 2, client_lr: float = 0.5,
                             server_lr: float = 1.0, n_negatives: int | None = 256, seed: int = 0,
                             delta: float | None = None, ledger: PrivacyLedger | None = None,
                             chunk: int = 64) -> FitResult:
    """DP-FedAvg of ``model`` for ``rounds`` rounds, every user a client, at user-level
    ``target_epsilon`` (``math.inf``: clipping only) for everything on the returned ledger, or
    with a given ``noise_multiplier`` (exactly one of the two).

    ``ledger`` holds earlier releases about the same users (e.g. a private popularity prior); σ is
    the smallest for which those releases and the rounds together stay within ``target_epsilon``
    (:meth:`~privrec.dp.ledger.PrivacyLedger.calibrate`). The server step is FedAvg's with rate
    ``server_lr`` on the noisy mean (post-processing). Returns the released model, the composed
    ledger (earlier releases, then the wrapper's rounds) and ``history["noise_multiplier"]``.
    """
    if (target_epsilon is None) == (noise_multiplier is None):
        raise ValueError("give exactly one of target_epsilon and noise_multiplier")
    clients = FederatedSequential(model, train, n_users=n_users, local_steps=local_steps,
                                  client_lr=client_lr, n_negatives=n_negatives, seed=seed)
    book = PrivacyLedger(unit="user", n_units=n_users, delta=delta) if ledger is None \
        else ledger.copy()
    rate = check_sample_rate(sample_rate)
    if noise_multiplier is not None:
        sigma = non_negative("noise_multiplier", noise_multiplier)
    elif math.isinf(target := epsilon_or_inf("target_epsilon", target_epsilon)):
        sigma = 0.0
    else:
        sigma = book.calibrate(lambda z: round_events(z, sample_rate=rate, rounds=rounds,
                                                      unit="user"), target_epsilon=target)
    wrapper = DPFedAvg(FedAvg(server_lr=server_lr), n_clients=n_users, sample_rate=rate,
                       clip_norm=clip_norm, noise_multiplier=sigma, delta=book.delta, seed=seed)
    sim = FederatedSimulator(clients, wrapper, chunk_ratings=int_in("chunk", chunk, 1)
                             * model.max_len)
    start = time.perf_counter()
    released = sim.fit(int_in("rounds", rounds, 1)).model
    book.extend(wrapper.ledger)
    return FitResult(released, {"noise_multiplier": [sigma]}, book, time.perf_counter() - start)

"""Chapter 8's experiments: the Transformer recommender, private two ways, and what it memorises.

The unit of work is one cached *run* (:func:`run_nonprivate`, :func:`run_private`): one model
trained on one split with one seed (and, if private, at one user-level :math:`\\varepsilon`),
scored with full-catalogue ranking and, on the test protocol, probed for the planted canaries
(:func:`privrec.attacks.memorisation.memorisation_table`). Each run is cached with
:func:`privrec.course.book.cached_json`, keyed on its settings and the source of the code it calls;
a private run returns its ledger as JSON.

The protocol (:func:`load_protocol`): chapter 1's leave-last-out split of MovieLens-100K; a
validation split cut from the training data the same way (settings are chosen there, never on the
test items); and the training data with canaries planted at the end of 60 users' histories, on which
every test-protocol model except the clean non-private headline model is trained (evaluation always
reads the clean histories). Private methods, both at unit ``"user"`` over the 943 users:

* ``"DP-SGD"`` -- :func:`privrec.central.user_dpsgd.fit_user_dpsgd`;
* ``"DP-FedAvg"`` -- :func:`privrec.federated.sequential.fit_dp_fedavg_sequential`;
* ``"private popularity"`` -- the smaller private model: one Gaussian release of item counts in
  which every user's items weigh :math:`1/\\sqrt{n_u}` (:func:`popularity_release`).

Both Transformer methods first spend ``prior_share`` of the budget on that release and start from
its log-scores as the output layer's item offsets (the private-biases-first recipe of chapter 3);
the rest goes to training, composed on one ledger.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ...attacks import memorisation
from ...attacks.memorisation import Canaries, memorisation_table, plant_canaries
from ...central import dpsgd, per_example, user_dpsgd
from ...central.user_dpsgd import fit_user_dpsgd
from ...core.checks import choice, epsilon_or_inf, flag
from ...dp import accounting, events, primitives
from ...dp import ledger as ledger_module
from ...dp.ledger import PrivacyEvent, PrivacyLedger
from ...dp.primitives import gaussian_noise
from ...federated import dpfedavg, engine, strategies, updates
from ...federated import sequential as federated_sequential
from ...federated.dpfedavg import round_events
from ...federated.sequential import fit_dp_fedavg_sequential
from ...recsys import data, metrics, models, sequential, train
from ...recsys.data import leave_last_out_split, load_movielens100k
from ...recsys.metrics import ranking_metrics
from ...recsys.models import BiasedMF
from ...recsys.sequential import SASRec, evaluate_next_item, fit_sasrec
from ...recsys.train import fit_implicit, popularity_scores
from ..book import cached_json

__all__ = ["EPSILONS", "METHODS", "NONPRIVATE", "PRIVATE_MODEL", "PRIVATE", "TUNING", "CANARY",
           "Protocol", "load_protocol", "popularity_release", "run_nonprivate", "run_private",
           "baselines", "validation_tuning", "grid", "by_seed", "memorisation_by_repeats"]

EPSILONS = (1.0, 2.0, 4.0, 8.0, 16.0, math.inf)
"""User-level budgets of the grid (``inf``: the same pipeline without noise)."""
METHODS = ("DP-SGD", "DP-FedAvg")
NONPRIVATE = {"dim": 64, "max_len": 50, "dropout": 0.2, "epochs": 8, "lr": 0.003,
              "n_negatives": None}
"""The non-private recipe (full softmax), chosen on the validation split."""
PRIVATE_MODEL = {"dim": 32, "max_len": 30}
"""The private models' size: smaller (the noise grows with the number of parameters)."""
PRIVATE = {
    "DP-SGD": {"sample_rate": 0.5, "epochs": 3.0, "clip_norm": 1.0, "lr": 8.0,
               "optimizer": "sgd", "prior_share": 0.25},
    "DP-FedAvg": {"sample_rate": 0.25, "rounds": 6, "clip_norm": 1.0, "local_steps": 2,
                  "client_lr": 0.5, "server_lr": 8.0, "prior_share": 0.25},
}
"""Default settings of the private methods (the step size is tuned: :data:`TUNING`)."""
TUNING = {"DP-SGD": {"lr": (0.5, 2.0, 8.0)}, "DP-FedAvg": {"server_lr": (0.5, 2.0, 8.0)}}
"""The validation search, at user-level ε = 8."""
CANARY = {"repeats": (0, 1, 2, 4, 8), "per_repeat": 4, "prefix_len": 4, "secret_len": 4}
"""Canaries: 4 secrets per repetition count (0 = a control never inserted), 4 + 4 items each."""
N_SAMPLES = 500
_PRIOR = "user-level popularity"
_LIBRARY = (data, metrics, models, sequential, train, primitives, accounting, events, ledger_module,
            dpsgd, per_example, user_dpsgd, strategies, engine, dpfedavg, updates,
            federated_sequential, memorisation, sys.modules[__name__])
"""Every module whose code a cached result depends on (this one included): part of the key."""


def _cached(name: str, config: dict, compute):
    """:func:`~privrec.course.book.cached_json` keyed on ``config`` and :data:`_LIBRARY` (and, as
    every cached result, on the arithmetic that computed it)."""
    return cached_json(name, config, compute, modules=_LIBRARY)


@dataclass(frozen=True)
class Protocol:
    """The chapter's data (module docstring): ``train``/``test`` (leave-last-out),
    ``val_train``/``val_test`` (the same cut of ``train``), ``planted`` (``train`` plus canaries)."""

    n_users: int
    n_items: int
    train: pd.DataFrame
    test: pd.DataFrame
    val_train: pd.DataFrame
    val_test: pd.DataFrame
    planted: pd.DataFrame
    canaries: Canaries


def load_protocol(*, seed: int = 0) -> Protocol:
    """ML-100K's splits and the planted training data (canaries seeded by ``seed``)."""
    ml = load_movielens100k()
    train_set, test = leave_last_out_split(ml.ratings)
    val_train, val_test = leave_last_out_split(train_set)
    planted, canaries = plant_canaries(train_set, n_users=ml.n_users, n_items=ml.n_items,
                                       seed=seed, **CANARY)
    return Protocol(ml.n_users, ml.n_items, train_set, test, val_train, val_test, planted,
                    canaries)


@torch.no_grad()
def popularity_release(train_set: pd.DataFrame, *, n_users: int, n_items: int,
                       noise_multiplier: float, ledger: PrivacyLedger, seed: int = 0,
                       ) -> torch.Tensor:
    """Noisy user-weighted item counts, one Gaussian release at user level, as log-scores.

    User :math:`u` adds :math:`1/\\sqrt{n_u}` to each item they rated, so their whole contribution
    has L2 norm 1 (sensitivity 1 under adding or removing a user); :math:`\\mathcal N(0, z^2)` goes
    on every item's count; the release is recorded on ``ledger``. Returns
    :math:`\\log\\max(\\tilde c_i, 10^{-3})` (post-processing)."""
    users = torch.as_tensor(train_set["user"].to_numpy())
    weight = torch.bincount(users, minlength=n_users).double().clamp(min=1).rsqrt()[users]
    counts = torch.zeros(n_items, dtype=torch.double).index_add_(
        0, torch.as_tensor(train_set["item"].to_numpy()), weight)
    gen = torch.Generator().manual_seed(seed)
    counts += gaussian_noise((n_items,), std=noise_multiplier, generator=gen, dtype=torch.double)
    ledger.record_gaussian(_PRIOR, noise_multiplier=noise_multiplier)
    return counts.clamp(min=1e-3).log().float()


@functools.cache
def _noise(method: str, epsilon: float, share: float, sample_rate: float, releases: int,
           n_users: int) -> tuple[float, float]:
    """``(z, σ)``: the prior's noise at ``share * epsilon`` alone, then the training noise for
    which the prior and ``releases`` steps (or rounds) at ``sample_rate`` end at ``epsilon``.

    The calibration reads no data, so runs that differ only in seed, step size or split share it
    (memoised: the search is the slowest part of a short private run)."""
    if math.isinf(epsilon):
        return 0.0, 0.0
    book = PrivacyLedger(unit="user", n_units=n_users)
    z = book.calibrate(lambda z: [PrivacyEvent(_PRIOR, "gaussian", z, 1.0, 1, "user")],
                       target_epsilon=share * epsilon)
    book.record_gaussian(_PRIOR, noise_multiplier=z)

    def steps(sigma: float) -> list[PrivacyEvent]:
        if method == "DP-FedAvg":
            return round_events(sigma, sample_rate=sample_rate, rounds=releases, unit="user")
        return [PrivacyEvent(user_dpsgd.STEP_NAME, "gaussian", sigma, sample_rate, releases, "user")]

    return z, book.calibrate(steps, target_epsilon=epsilon)


def _prior(train_set: pd.DataFrame, protocol: Protocol, z: float,
           seed: int) -> tuple[torch.Tensor, PrivacyLedger]:
    """The popularity prior with noise ``z`` on a fresh user-level ledger."""
    book = PrivacyLedger(unit="user", n_units=protocol.n_users)
    scores = popularity_release(train_set, n_users=protocol.n_users, n_items=protocol.n_items,
                                noise_multiplier=z, ledger=book, seed=seed)
    return scores, book


def _split(protocol: Protocol, split: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(fit on, context, test)``: the test protocol trains on the planted data."""
    if choice("split", split, ("test", "validation")) == "test":
        return protocol.planted, protocol.train, protocol.test
    return protocol.val_train, protocol.val_train, protocol.val_test


def _scored(model: SASRec, protocol: Protocol, split: str, probe: bool = True) -> dict:
    _, context, test = _split(protocol, split)
    out = evaluate_next_item(model, context, test, n_users=protocol.n_users)
    if split == "test" and probe:
        table = memorisation_table(model, protocol.canaries, n_samples=N_SAMPLES)
        out["memorisation"] = table.to_dict(orient="list")
    return out


def run_nonprivate(protocol: Protocol, *, planted: bool = False, seed: int = 0) -> dict:
    """The non-private model (:data:`NONPRIVATE`) on the clean or the planted training data."""
    def compute() -> dict:
        fit_on = protocol.planted if planted else protocol.train
        model = SASRec(protocol.n_items, dim=NONPRIVATE["dim"], max_len=NONPRIVATE["max_len"],
                       dropout=NONPRIVATE["dropout"], seed=seed)
        cpu = time.process_time()
        fit_sasrec(model, fit_on, epochs=NONPRIVATE["epochs"], lr=NONPRIVATE["lr"],
                   n_negatives=NONPRIVATE["n_negatives"], seed=seed)
        cpu = time.process_time() - cpu
        result = _scored(model, protocol, "test") if planted else evaluate_next_item(
            model, protocol.train, protocol.test, n_users=protocol.n_users)
        return result | {"cpu_s": cpu, "epsilon": math.inf}

    return _cached("transformer-nonprivate", {"planted": planted, "seed": seed, **NONPRIVATE},
                   compute)


def _train_private(method: str, model: SASRec, fit_on: pd.DataFrame, protocol: Protocol,
                   epsilon: float, settings: Mapping, seed: int):
    kw = {k: v for k, v in settings.items() if k != "prior_share"}
    releases = (dpsgd.dpsgd_steps(epochs=kw["epochs"], sample_rate=kw["sample_rate"])
                if method == "DP-SGD" else kw["rounds"])
    z, sigma = _noise(method, epsilon, settings["prior_share"], kw["sample_rate"], releases,
                      protocol.n_users)
    prior, book = _prior(fit_on, protocol, z, seed)
    with torch.no_grad():
        model.output.bias[1:] = prior
    fit = fit_user_dpsgd if method == "DP-SGD" else fit_dp_fedavg_sequential
    return fit(model, fit_on, n_users=protocol.n_users, noise_multiplier=sigma, seed=seed,
               ledger=book, **kw)


def run_private(protocol: Protocol, method: str, epsilon: float, *,
                settings: Mapping | None = None, split: str = "test", seed: int = 0,
                probe: bool = True) -> dict:
    """One private run; returns HR@10, NDCG@10, the ledger's ε and σ, the ledger (JSON), the CPU
    seconds and, on the test protocol with ``probe``, the canaries' exposure and extraction
    (``probe=False``: utility only, for runs whose memorisation nobody reads)."""
    method, eps = choice("method", method, METHODS), epsilon_or_inf("epsilon", epsilon)
    probe = flag("probe", probe)
    settings = dict(PRIVATE[method] | dict(settings or {}))

    def compute() -> dict:
        fit_on, _, _ = _split(protocol, split)
        model = SASRec(protocol.n_items, **PRIVATE_MODEL, dropout=0.0, seed=seed)
        cpu = time.process_time()
        fit = _train_private(method, model, fit_on, protocol, eps, settings, seed)
        cpu = time.process_time() - cpu
        return _scored(model, protocol, split, probe) | {
            "cpu_s": cpu, "epsilon": fit.ledger.epsilon(), "ledger": fit.ledger.to_json(),
            "sigma": fit.history["noise_multiplier"][0]}

    config = {"method": method, "epsilon": str(eps), "settings": settings, "split": split,
              "seed": seed, "model": PRIVATE_MODEL, "canary": CANARY, "samples": N_SAMPLES,
              "probe": probe}
    return _cached("transformer-private", config, compute)


def _private_popularity(protocol: Protocol, epsilon: float, seed: int) -> dict:
    z = 0.0 if math.isinf(epsilon) else PrivacyLedger(unit="user", n_units=protocol.n_users).calibrate(
        lambda z: [PrivacyEvent(_PRIOR, "gaussian", z, 1.0, 1, "user")], target_epsilon=epsilon)
    scores, book = _prior(protocol.train, protocol, z, seed)
    result = ranking_metrics(scores.expand(protocol.n_users, -1).clone(), protocol.train,
                             protocol.test)
    return result | {"epsilon": book.epsilon()}


def baselines(protocol: Protocol, *, epsilon: float = 8.0, seeds: Sequence[int] = (0,)) -> dict:
    """Popularity and chapter 1's implicit MF (dim 32, 20 epochs) on the test split, and the
    private popularity at user-level ``epsilon`` for each seed."""
    def compute() -> dict:
        kw = {"n_users": protocol.n_users, "n_items": protocol.n_items}
        mf = BiasedMF(protocol.n_users, protocol.n_items, 32, seed=0)
        fit_implicit(mf, protocol.train, epochs=20, reg=1e-4, progress=False)
        with torch.no_grad():
            mf_scores = mf.score_all()
        return {"popularity": ranking_metrics(popularity_scores(protocol.train, **kw),
                                              protocol.train, protocol.test),
                "implicit MF": ranking_metrics(mf_scores, protocol.train, protocol.test),
                "private popularity": [_private_popularity(protocol, epsilon, s) for s in seeds]}

    return _cached("transformer-baselines", {"epsilon": epsilon, "seeds": list(seeds)}, compute)


def validation_tuning(protocol: Protocol, method: str, *, epsilon: float = 8.0) -> dict:
    """The step-size search of :data:`TUNING` at ``epsilon`` on the validation split.

    Returns the validation NDCG@10 of every candidate, the choice (ties: the first listed), and
    the whole procedure's ledger (every tuning run, then the published test run) as JSON -- the
    disclosed cost of tuning on private data."""
    (name, values), = TUNING[choice("method", method, METHODS)].items()
    runs = [run_private(protocol, method, epsilon, settings={name: v}, split="validation")
            for v in values]
    scores = [r["ndcg"] for r in runs]
    best = values[int(np.flatnonzero(np.array(scores) == max(scores))[0])]  # first of the best
    final = run_private(protocol, method, epsilon, settings={name: best})
    whole = PrivacyLedger(unit="user", n_units=protocol.n_users)
    for r in runs:
        whole.extend(PrivacyLedger.from_json(r["ledger"]), prefix="tuning: ")
    whole.extend(PrivacyLedger.from_json(final["ledger"]), prefix="published: ")
    return {"parameter": name, "values": list(values), "scores": scores, "choice": best,
            "cpu_s": sum(r["cpu_s"] for r in runs), "whole": whole.to_json()}


def grid(protocol: Protocol, choices: Mapping[str, Mapping], *,
         epsilons: Sequence[float] = EPSILONS) -> pd.DataFrame:
    """One row per method and ε: the ledger's ε, σ, HR@10, NDCG@10, the mean exposure of the
    8-fold secrets and the share of secrets extracted (``choices``: method -> tuned settings)."""
    rows = []
    for method, settings in choices.items():
        for eps in epsilons:
            r = run_private(protocol, method, eps, settings=settings)
            mem = pd.DataFrame(r["memorisation"])
            rows.append({"method": method, "target ε": eps, "ε": r["epsilon"], "σ": r["sigma"],
                         "HR@10": r["hr"], "NDCG@10": r["ndcg"],
                         "exposure (8×)": mem.loc[mem["repeats"] == 8, "exposure"].mean(),
                         "extracted": mem.loc[mem["repeats"] > 0, "extracted"].mean()})
    return pd.DataFrame(rows)


def by_seed(protocol: Protocol, choices: Mapping[str, Mapping], *, epsilon: float = 8.0,
            seeds: Sequence[int] = (0, 1, 2)) -> pd.DataFrame:
    """Test NDCG@10 per seed (rows) of each private method and of the private popularity at
    ``epsilon`` (seed 0 is the grid's run, read from the cache; the seed changes initialisation,
    sampling and noise). Only the utility is read, so the other seeds skip the canary probe."""
    pops = baselines(protocol, epsilon=epsilon, seeds=seeds)["private popularity"]
    rows = {s: {m: run_private(protocol, m, epsilon, settings=kw, seed=s, probe=s == 0)["ndcg"]
                for m, kw in choices.items()} | {"private popularity": pops[k]["ndcg"]}
            for k, s in enumerate(seeds)}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("seed")


def memorisation_by_repeats(runs: Mapping[str, dict]) -> pd.DataFrame:
    """Mean extrapolated exposure (bits) and share extracted per repetition count, one column
    pair per named run (``runs``: label -> a test-protocol run)."""
    parts = {}
    for label, r in runs.items():
        mem = pd.DataFrame(r["memorisation"]).groupby("repeats")
        parts[(label, "exposure")] = mem["exposure"].mean()
        parts[(label, "extracted")] = mem["extracted"].mean()
    return pd.DataFrame(parts).rename_axis("repeats")

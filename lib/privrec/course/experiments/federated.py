"""Chapter 4's experiments: federated matrix factorisation, run by run, and the server's attacks.

The unit of work is one training *history* (:func:`history`): federated MF on ML-100K's 80/20
split under one server strategy, partition and client recipe, with the test RMSE every few rounds
and the bytes of every round. Histories are cached one by one with
:func:`privrec.course.book.cached_json`, keyed on the data, the configuration and the source of
the federated engine, so the comparisons, the silo study, the explorer's grid and the exercises
train each shared run once. The attacks (:func:`attack_last_round`) read one round's uploads,
which are not cached (they are cheap: three rounds).

A strategy is named by a small spec, ``("FedAvg", {...})`` or ``("FedAvgM", {...})``, so that a
configuration is plain data (JSON) and can key the cache.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ...attacks.update_inversion import (
    invert_ratings,
    item_set_attack,
    score_item_sets,
    score_ratings,
    true_item_sets,
)
from ...core.checks import choice, instance, int_in
from ...dp.primitives import clip_factors
from ...federated import dpfedavg, engine, mf, mf_local, partitions, strategies, updates
from ...federated.dpfedavg import DPFedAvg
from ...federated.engine import FederatedMF, FederatedSimulator
from ...federated.partitions import Partition, cross_device, iid_partition
from ...federated.strategies import FedAvg, FedAvgM
from ...recsys import data, metrics, models, train
from ...recsys.data import MovieLens, load_movielens100k, random_split
from ...recsys.metrics import evaluate_ratings
from ...recsys.models import BiasedMF
from ...recsys.train import fit_explicit
from ..book import cached_json
from .dp_basics import compact_summary

__all__ = ["Setup", "load_setup", "MB", "RECIPES", "simulate", "history", "central_reference",
           "compare_recipes", "recipe_table", "partition_gap", "gap_text", "silo_study",
           "silo_table", "silo_sizes", "communication", "explore_grid", "attack_last_round",
           "attack_report", "DEFENCES", "defence_table", "dp_upload_attack", "drop_modal_value",
           "fake_item_filter", "show_body"]

MB = 1e6
"""Bytes per megabyte in the tables."""
RECIPES: dict[str, tuple[tuple[str, dict], dict]] = {
    "FedAvg, closed-form users": (("FedAvg", {}), {}),
    "FedAvgM (beta 0.5, server lr 0.5)": (("FedAvgM", {"server_momentum": 0.5,
                                                        "server_lr": 0.5}), {}),
    "FedAvg, per-client weighting": (("FedAvg", {"weighting": "per_client"}), {}),
    "FedAvg, gradient steps on users": (("FedAvg", {}), {"user_solver": "gradient",
                                                         "local_epochs": 3, "local_lr": 0.2}),
}
"""Recipe name -> (strategy spec, client settings) of the federated-vs-centralised comparison."""
_LIBRARY = (dpfedavg, engine, mf, mf_local, partitions, strategies, updates, data, metrics,
            models, train)


@dataclass(frozen=True)
class Setup:
    """ML-100K, its seeded 80/20 split and the embedding dimension of every run."""

    ml: MovieLens
    train: pd.DataFrame
    test: pd.DataFrame
    dim: int = 32

    @property
    def n_users(self) -> int:
        return self.ml.n_users

    @property
    def n_items(self) -> int:
        return self.ml.n_items


def load_setup(source: str | None = None, *, dim: int = 32, seed: int = 0) -> Setup:
    """ML-100K (``source`` as :func:`~privrec.recsys.data.load_movielens100k`) split 80/20."""
    ml = load_movielens100k(source)
    return Setup(ml, *random_split(ml.ratings, test_fraction=0.2, seed=seed),
                 dim=int_in("dim", dim, 1))


def _strategy(spec: tuple[str, dict]):
    """``("FedAvg", kwargs)`` or ``("FedAvgM", kwargs)`` -> the server strategy."""
    kind, kwargs = spec
    return {"FedAvg": FedAvg, "FedAvgM": FedAvgM}[choice("strategy", kind, ("FedAvg", "FedAvgM"))](
        **kwargs)


def simulate(setup: Setup, strategy: tuple[str, dict] | object | None = None, *,
             keep_updates: bool = False, **model_kwargs) -> FederatedSimulator:
    """The clients of ``setup.train`` (a :class:`FederatedMF`) run under ``strategy`` (a spec, a
    strategy object, or ``None`` for FedAvg with every client)."""
    instance("setup", setup, Setup)
    if isinstance(strategy, tuple):
        strategy = _strategy(strategy)
    model = FederatedMF(setup.train, n_users=setup.n_users, n_items=setup.n_items,
                        dim=model_kwargs.pop("dim", setup.dim), **model_kwargs)
    return FederatedSimulator(model, strategy, keep_updates=keep_updates)


@functools.cache
def _code_version() -> str:
    own = (simulate, _strategy, history, central_reference, _defence_row)
    text = "".join(inspect.getsource(m) for m in _LIBRARY + own)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _digest(*arrays: object) -> str:
    """Content digest of ratings tables and id arrays."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(pd.util.hash_pandas_object(a, index=False).to_numpy().tobytes()
                 if isinstance(a, pd.DataFrame) else np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def history(setup: Setup, strategy: tuple[str, dict] = ("FedAvg", {}), *, rounds: int,
            eval_every: int, partition: Partition | None = None, **model_kwargs) -> dict:
    """One cached run: ``rounds`` rounds, test RMSE every ``eval_every`` rounds.

    Returns the simulator's history (``round``, ``test_rmse``, ``bytes_down``, ``bytes_up``).
    """
    owners = None if partition is None else partition.client_of_user
    config = {"data": _digest(setup.train, setup.test), "dim": setup.dim,
              "strategy": list(strategy), "rounds": int_in("rounds", rounds, 1),
              "eval_every": int_in("eval_every", eval_every, 1), "model": model_kwargs,
              "partition": None if owners is None else [_digest(owners), partition.n_clients],
              "code": _code_version()}

    def compute() -> dict:
        sim = simulate(setup, strategy, partition=partition, **model_kwargs)
        return sim.fit(rounds, test=setup.test, eval_every=eval_every).history

    return cached_json("ch4-history", config, compute)


def central_reference(setup: Setup, *, epochs: int = 30) -> dict:
    """Chapter 1's centralised MF (Adam, ``epochs`` epochs): test RMSE after each epoch."""
    config = {"data": _digest(setup.train, setup.test), "dim": setup.dim, "epochs": epochs,
              "code": _code_version()}

    def compute() -> dict:
        model = BiasedMF(setup.n_users, setup.n_items, setup.dim, seed=0,
                         global_mean=float(setup.train["rating"].mean()))
        fit = fit_explicit(model, setup.train, epochs=epochs, validation=setup.test, seed=0,
                           progress=False)
        return {"curve": fit.history["val_rmse"], "rmse": evaluate_ratings(model, setup.test)["rmse"]}

    return cached_json("ch4-central", config, compute)


def compare_recipes(setup: Setup, *, rounds: int = 40, eval_every: int = 4) -> dict[str, dict]:
    """The history of every recipe of :data:`RECIPES`, cross-device with all clients."""
    return {name: history(setup, spec, rounds=rounds, eval_every=eval_every, **kwargs)
            for name, (spec, kwargs) in RECIPES.items()}


def _at(h: Mapping, r: int) -> float:
    return h["test_rmse"][h["round"].index(r)]


def recipe_table(histories: Mapping[str, dict], central_rmse: float, *,
                 early: int = 8) -> pd.DataFrame:
    """Test RMSE of each recipe after ``early`` rounds and at the end, its gap to centralised."""
    last = next(iter(histories.values()))["round"][-1]
    return pd.DataFrame({
        f"round {early}": {k: _at(h, early) for k, h in histories.items()},
        f"round {last}": {k: h["test_rmse"][-1] for k, h in histories.items()},
        "minus central": {k: h["test_rmse"][-1] - central_rmse for k, h in histories.items()},
    }).rename_axis("recipe")


def partition_gap(setup: Setup, other: Partition, *, rounds: int = 5, **model_kwargs) -> float:
    """Largest difference of any shared parameter between cross-device training and training
    with the silos of ``other``, after ``rounds`` rounds of FedAvg with every client."""
    a = simulate(setup, **model_kwargs)
    b = simulate(setup, partition=other, **model_kwargs)
    a.fit(rounds), b.fit(rounds)
    return max(float((a.shared[k] - b.shared[k]).abs().max()) for k in a.shared)


def gap_text(gap: float) -> str:
    """The gap as printed: the two runs differ only in summation order, so a gap below 1e-5 is
    float rounding (its exact digits vary between machines and are not printed)."""
    return "below 1e-5 (float rounding)" if gap < 1e-5 else f"{gap:.3f}"


def silo_study(setup: Setup, silos: Mapping[str, Partition], *, epochs: Sequence[int] = (1, 3),
               rounds: int = 40, clients_per_round: int = 3,
               local_lr: float = 0.3) -> dict[tuple[str, int], dict]:
    """FedAvg with ``clients_per_round`` silos a round and each number of local epochs."""
    return {(name, e): history(setup, ("FedAvg", {"clients_per_round": clients_per_round,
                                                  "seed": 0}),
                               rounds=rounds, eval_every=2, partition=part, local_epochs=e,
                               local_lr=local_lr)
            for name, part in silos.items() for e in epochs}


def silo_table(study: Mapping[tuple[str, int], dict]) -> pd.DataFrame:
    """Final test RMSE: partitions (rows) by local epochs (columns)."""
    rows = pd.Series({key: h["test_rmse"][-1] for key, h in study.items()})
    return rows.unstack().rename(columns=lambda e: f"E = {e}").rename_axis("partition")


def silo_sizes(silos: Mapping[str, Partition], ratings: pd.DataFrame) -> pd.DataFrame:
    """Smallest and largest number of ratings a silo holds, per partition."""
    sizes = {name: part.examples_per_client(ratings) for name, part in silos.items()}
    return pd.DataFrame({"fewest ratings": {k: int(v.min()) for k, v in sizes.items()},
                         "most ratings": {k: int(v.max()) for k, v in sizes.items()}})


def communication(setup: Setup, silos: Partition) -> tuple[pd.DataFrame, float, float]:
    """Bytes of one round per setting (cross-device with every client and with 10% of them a
    round; ``silos`` with every silo and with 3 a round) and upload format; the shared model's
    and the raw training ratings' size in MB (int32 user, int32 item, float32 rating each)."""
    n, k = setup.n_users, silos.n_clients
    rows = []
    for name, part, m in ((f"cross-device, all {n}", None, None),
                          (f"cross-device, {round(0.1 * n)} a round", None, round(0.1 * n)),
                          (f"{k} IID silos, all", silos, None),
                          (f"{k} IID silos, 3 a round", silos, 3)):
        for upload in ("sparse", "dense"):
            record = simulate(setup, FedAvg(clients_per_round=m, seed=0), partition=part,
                              upload=upload).round()
            rows.append({"setting": name, "upload": upload, "down MB": record.bytes_down / MB,
                         "up MB": record.bytes_up / MB})
    sim = simulate(setup)
    return pd.DataFrame(rows), sim.shared_size * 4 / MB, len(setup.train) * 12 / MB


def explore_grid(setup: Setup, *, clients: Sequence[int] = (10, 100, 943),
                 fractions: Sequence[float] = (0.1, 0.3, 1.0), epochs: Sequence[int] = (1, 3),
                 rounds: int = 20) -> dict[tuple[int, float, int], tuple[int, dict]]:
    """(K, fraction, E) -> (clients a round m, history): IID silos (K = 943: cross-device)."""
    grid = {}
    for k in clients:
        part = (cross_device(setup.n_users) if k == setup.n_users
                else iid_partition(setup.n_users, k, seed=0))
        for fraction in fractions:
            m = max(1, round(fraction * k))
            for e in epochs:
                grid[k, fraction, e] = (m, history(
                    setup, ("FedAvg", {"clients_per_round": m, "seed": 0}), rounds=rounds,
                    eval_every=5, partition=part, local_epochs=e, local_lr=0.3))
    return grid


def attack_last_round(setup: Setup, sim: FederatedSimulator,
                      upload: updates.ClientUpdates | None = None, *,
                      rescaled: bool = False) -> tuple[dict, pd.DataFrame]:
    """Both attacks on the last round's uploads (or on ``upload``): the item-set attack's
    precision and recall, and the ratings the inversion recovers."""
    upload = sim.last_updates if upload is None else upload
    clients = sim.model
    truth = true_item_sets(setup.train, clients.partition.client_of_user, upload.clients.numpy())
    recovered = invert_ratings(upload, sim.last_broadcast, local_lr=clients.local_lr,
                               reg=clients.reg, bias_reg=clients.bias_reg, rescaled=rescaled)
    return score_item_sets(item_set_attack(upload), truth), recovered


def attack_report(setup: Setup, *, rounds: int = 3, user: int = 0, shown: int = 6) -> str:
    """Both attacks on round ``rounds`` of cross-device FedAvg, and ``user``'s first ratings
    next to the server's estimates."""
    victim = simulate(setup, keep_updates=True)
    victim.fit(rounds)
    items, recovered = attack_last_round(setup, victim)
    stars = score_ratings(recovered, setup.train)
    lines = [f"attacked clients: {len(victim.last_updates)}",
             f"item-set attack: precision {items['precision']:.4f}, recall {items['recall']:.4f}",
             f"rating inversion: RMSE {stars['rmse']:.1e} stars; exact star recovered for "
             f"{stars['exact']:.2%}", f"  of {stars['n_scored']:,} ratings"]
    mine = setup.train[setup.train["user"] == user].sort_values("item", kind="stable").head(shown)
    guess = recovered[recovered["client"] == user].set_index("item")["rating"]
    for item, true in zip(mine["item"], mine["rating"], strict=True):
        title = setup.ml.items.loc[item, "title"]
        lines.append(f"  user {user}: {title[:34]:34s} true {true:.0f}, server's estimate "
                     f"{guess[item]:.2f}")
    return "\n".join(lines)


DEFENCES: dict[str, dict] = {"none": {}, "dense upload": {"upload": "dense"},
                             "fake items, rho = 0.25": {"fake_items": 0.25},
                             "fake items, rho = 1": {"fake_items": 1.0},
                             "fake items, rho = 3": {"fake_items": 3.0}}
"""Defence name -> client settings of the defence table (FedRec's fake items, Lin et al. 2020)."""


def _defence_row(setup: Setup, settings: dict, rounds: int) -> dict:
    sim = simulate(setup, keep_updates=True, **settings)
    h = sim.fit(rounds, test=setup.test, eval_every=rounds).history
    items, recovered = attack_last_round(setup, sim)
    rho = settings.get("fake_items", 0.0)
    return {"precision": items["precision"], "1/(1+rho)": 1 / (1 + rho),
            "recall": items["recall"], "rating RMSE": score_ratings(recovered, setup.train)["rmse"],
            "up MB": h["bytes_up"][-1] / MB, "test RMSE": h["test_rmse"][-1]}


def defence_table(setup: Setup, *, rounds: int = 20) -> pd.DataFrame:
    """Each defence of :data:`DEFENCES` after ``rounds`` rounds: both attacks on the last
    round's uploads, the upload size of that round and the test RMSE (cached per defence)."""
    rows = {}
    for name, settings in DEFENCES.items():
        config = {"data": _digest(setup.train, setup.test), "dim": setup.dim,
                  "settings": settings, "rounds": rounds, "code": _code_version()}
        rows[name] = cached_json("ch4-defence", config,
                                 lambda s=settings: _defence_row(setup, s, rounds))
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("defence")


def dp_upload_attack(setup: Setup, *, rounds: int = 3, sample_rate: float = 0.1,
                     clip_norm: float = 0.5, noise_multiplier: float = 1.0) -> str:
    """Both attacks on the uploads of round ``rounds`` of DP-FedAvg (clipped by the server), and
    on the same uploads clipped on the device (the inversion then solves for the scale too)."""
    dp = DPFedAvg(FedAvg(), n_clients=setup.n_users, sample_rate=sample_rate,
                  clip_norm=clip_norm, noise_multiplier=noise_multiplier, seed=0)
    sim = simulate(setup, dp, keep_updates=True)
    sim.fit(rounds)
    clipped = sim.last_updates.scaled(clip_factors(dp.last_norms, clip_norm=clip_norm))
    lines = [f"DP-FedAvg round {rounds}: {len(clipped)} clients uploaded; norms before "
             f"clipping:", f"  median {dp.last_norms.median():.2f}, max "
             f"{dp.last_norms.max():.2f} (C = {clip_norm})"]
    for name, upload, rescaled in (("uploads", None, False), ("clipped", clipped, True)):
        items, recovered = attack_last_round(setup, sim, upload, rescaled=rescaled)
        lines.append(f"{name:8s}: item sets precision {items['precision']:.3f}, recall "
                     f"{items['recall']:.3f}; exact stars "
                     f"{score_ratings(recovered, setup.train)['exact']:.2%}")
    return "\n".join(lines + ["", compact_summary(sim.ledger)])


def drop_modal_value(recovered: pd.DataFrame, *, decimals: int = 3) -> pd.DataFrame:
    """Exercise 3's adaptive server: drop each client's most frequent recovered rating (to
    ``decimals``), the pseudo-rating every fake item shares; a tie goes to the smaller value."""
    key = recovered["rating"].round(decimals)
    counts = (recovered.assign(key=key).groupby(["client", "key"]).size()
              .reset_index(name="n"))
    mode = (counts.sort_values(["client", "n", "key"], ascending=[True, False, True],
                               kind="stable")
            .drop_duplicates("client").set_index("client")["key"])
    return recovered[key != recovered["client"].map(mode)]


def fake_item_filter(setup: Setup, *, rho: float = 1.0, rounds: int = 3) -> tuple[dict, dict]:
    """Exercise 3: the item-set attack's scores on round ``rounds`` of FedAvg with fake items
    (``rho`` per real item), before and after :func:`drop_modal_value`."""
    sim = simulate(setup, keep_updates=True, fake_items=rho)
    sim.fit(rounds)
    before, recovered = attack_last_round(setup, sim)
    truth = true_item_sets(setup.train, sim.model.partition.client_of_user,
                           sim.last_updates.clients.numpy())
    return before, score_item_sets(drop_modal_value(recovered)[["client", "item"]], truth)


def show_body(obj: object):
    """:func:`~privrec.course.book.show_source` without the docstring: the signature and the
    code, for functions whose docstring would make the listing too long for the page."""
    from IPython.display import Code

    source = textwrap.dedent(inspect.getsource(obj))
    node = ast.parse(source).body[0]
    first = node.body[0] if isinstance(node, ast.FunctionDef | ast.ClassDef) else None
    lines = source.splitlines()
    if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant):
        lines = lines[:first.lineno - 1] + lines[first.end_lineno:]
    return Code("\n".join(lines), language="python")

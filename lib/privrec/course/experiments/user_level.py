"""Chapter 5's experiments: user-level DP-FedAvg runs, the privacy-utility grid over ε × clients
per round (and population, and silos), and the private bias-only baseline.

Every training run is DP-FedAvg (:class:`~privrec.federated.dpfedavg.DPFedAvg` around FedAvg)
of federated MF on ML-100K, cached one by one with :func:`privrec.course.book.cached_json`, keyed
on the data's content, the configuration and the source of the code it runs; a run returns its
ledger as JSON (:meth:`~privrec.dp.ledger.PrivacyLedger.to_json`). The settings of every grid run
(clip norm, server learning rate, dimension, and T per ε) come from the staged validation search
of :mod:`~privrec.course.experiments.user_level_search` (its ``Search``, passed as ``search``).

The private bias-only baseline is the same DP-FedAvg on the bias-only model
(:class:`~privrec.federated.mf.BiasOnlyClients`): same users, ε, δ and unit, so "does the
embedding model beat it?" is a comparison of two user-level guarantees of the same kind
(:func:`paired_bias`).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from ...core.checks import epsilon_or_inf
from ...dp import accounting, events, ledger, primitives
from ...dp.ledger import PrivacyLedger, default_delta
from ...federated import dpfedavg, engine, mf, mf_local, partitions, strategies, updates
from ...federated.dpfedavg import DPFedAvg, round_events
from ...federated.engine import FederatedMF, FederatedSimulator
from ...federated.mf import BiasOnlyClients
from ...federated.partitions import iid_partition, subsample_users
from ...federated.strategies import FedAvg
from ...recsys import data, metrics, models, train
from ...recsys.data import load_movielens100k, random_split
from ...recsys.metrics import evaluate_ratings, heldout_ndcg
from ...recsys.models import BiasedMF
from ...recsys.train import fit_bias_baseline, fit_explicit, global_mean_model
from ..book import cached_json
from .dp_basics import compact_summary
from .private_training_studies import paired_intervals

__all__ = ["EPSILONS", "CLIENTS", "POPULATIONS", "POPULATION_RATE", "SILOS", "SILO_EPSILONS",
           "Setup", "load_setup", "noise_multiplier", "train_run", "code_version",
           "digest", "grid_run", "surface", "noise_on_average", "explorer_spec", "references",
           "bias_curve", "paired_bias", "bias_verdicts", "extra_cohort", "setup_text", "ledger_text",
           "surface_text", "cross_device_text", "PANELS", "panel_curves"]

EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, math.inf)
"""User-level (or silo-level) ε of the grid; ``inf``: clipping without noise."""
CLIENTS = (10, 50, 100, 300, 943)
"""Expected clients per round m of the cross-device grid (q = m / N)."""
POPULATIONS = (118, 236, 471, 943)
"""Users trained on in the population panel, each sampled with :data:`POPULATION_RATE`."""
POPULATION_RATE = 0.1
"""The sampling rate q of the population panel (the same for every population)."""
SILOS = (10, 50)
"""Numbers of IID silos of the cross-silo panel (every silo in every round)."""
SILO_EPSILONS = (0.5, 2.0, 8.0, math.inf)
"""Silo-level ε of the cross-silo panel (every other ε of the grid, and no noise)."""
_LIBRARY = (accounting, events, ledger, primitives, dpfedavg, engine, mf, mf_local, partitions,
            strategies, updates, data, metrics, models, train)


@dataclass(frozen=True)
class Setup:
    """ML-100K's seeded 80/20 split and the validation split carved from its training part; the
    user-level δ of every run is :func:`~privrec.dp.ledger.default_delta` of ``n_users``."""

    ratings: pd.DataFrame
    n_users: int
    n_items: int
    train: pd.DataFrame
    test: pd.DataFrame
    fit: pd.DataFrame
    val: pd.DataFrame


def load_setup(source: str | None = None) -> Setup:
    """ML-100K split 80/20 (seed 0), and ``fit``/``val`` split 80/20 (seed 1) from ``train``."""
    ml = load_movielens100k(source)
    train_set, test = random_split(ml.ratings, test_fraction=0.2, seed=0)
    return Setup(ml.ratings, ml.n_users, ml.n_items, train_set, test,
                 *random_split(train_set, test_fraction=0.2, seed=1))


def noise_multiplier(epsilon: float, *, sample_rate: float, rounds: int, n_units: int,
                     unit: str = "user", delta: float | None = None) -> float:
    """σ of ``rounds`` DP-FedAvg rounds at ``sample_rate`` that spend ``epsilon`` (``inf``: 0):
    the ledger's calibration that :meth:`DPFedAvg.calibrated` runs. The population enters only
    through δ (default :func:`~privrec.dp.ledger.default_delta`), so populations with the same δ
    share one search, run once per process."""
    delta = PrivacyLedger(unit=unit, n_units=n_units, delta=delta).delta  # checks δ·N
    return _calibrated(epsilon_or_inf("epsilon", epsilon), sample_rate, rounds, unit, delta)


@functools.cache
def _calibrated(epsilon: float, sample_rate: float, rounds: int, unit: str, delta: float) -> float:
    if math.isinf(epsilon):
        return 0.0
    return PrivacyLedger(unit=unit, delta=delta).calibrate(
        lambda z: round_events(z, sample_rate=sample_rate, rounds=rounds, unit=unit),
        target_epsilon=epsilon)


def _clients(ratings: pd.DataFrame, *, n_users: int, n_items: int, dim: int, partition=None,
             bias_only: bool = False, seed: int = 0):
    if bias_only:
        return BiasOnlyClients(ratings, n_users=n_users, n_items=n_items, partition=partition,
                               seed=seed)
    return FederatedMF(ratings, n_users=n_users, n_items=n_items, dim=dim, partition=partition,
                       seed=seed)


def train_run(ratings: pd.DataFrame, *, n_users: int, n_items: int, epsilon: float,
              sample_rate: float, rounds: int, dim: int, clip_norm: float, server_lr: float,
              partition=None, bias_only: bool = False, seed: int = 0,
              checkpoints: Sequence[int] = ()) -> tuple[object, dict | None, DPFedAvg, dict]:
    """DP-FedAvg for ``rounds`` rounds at the σ that spends ``epsilon`` over ``rounds`` rounds.

    Returns ``(clients, shared, wrapper, snapshots)``: the federated model (the devices), the
    final shared state (``None`` if training diverged: no model, privacy spent all the same), the
    DP wrapper with its ledger, and ``{round: (shared copy, pre-clipping norms)}`` at
    ``checkpoints``.
    """
    clients = _clients(ratings, n_users=n_users, n_items=n_items, dim=dim, partition=partition,
                       bias_only=bias_only, seed=seed)
    sigma = noise_multiplier(epsilon, sample_rate=sample_rate, rounds=rounds,
                             n_units=clients.n_clients, unit=clients.privacy_unit)
    dp = DPFedAvg(FedAvg(server_lr=server_lr), n_clients=clients.n_clients,
                  sample_rate=sample_rate, clip_norm=clip_norm, noise_multiplier=sigma,
                  unit=clients.privacy_unit, seed=seed)
    sim, snapshots = FederatedSimulator(clients, dp), {}
    try:
        for r in range(1, rounds + 1):
            sim.round()
            if r in checkpoints:
                snapshots[r] = ({k: v.clone() for k, v in sim.shared.items()}, dp.last_norms,
                                dp.ledger.to_json())
    except RuntimeError:  # diverged: nothing to release
        return clients, None, dp, snapshots
    return clients, sim.shared, dp, snapshots


@functools.cache
def code_version() -> str:
    """Digest of the library code every run depends on (part of every cache key)."""
    own = (noise_multiplier, _calibrated, _clients, train_run, _grid_row, _everyone,
           _test_scores, references)
    text = "".join(inspect.getsource(m) for m in _LIBRARY + own)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def digest(*frames: pd.DataFrame) -> str:
    """Content digest of ratings tables (user, item, rating, in row order)."""
    h = hashlib.sha256()
    for f in frames:
        h.update(pd.util.hash_pandas_object(f[["user", "item", "rating"]], index=False)
                 .to_numpy().tobytes())
    return h.hexdigest()[:16]


# -- the grid ------------------------------------------------------------------------------------

_EVERYONE: dict[tuple[int, int, bool], tuple[Setup, object]] = {}


def _everyone(setup: Setup, *, dim: int, bias_only: bool):
    """The clients of every training rating (seed 0), built once per setup, dimension and model:
    releasing a model overwrites every user's row (users without ratings keep their seeded
    row), so one object gives every run's released model exactly as a fresh one would."""
    key = (id(setup), dim, bias_only)
    if key not in _EVERYONE or _EVERYONE[key][0] is not setup:
        _EVERYONE[key] = (setup, _clients(setup.train, n_users=setup.n_users,
                                          n_items=setup.n_items, dim=dim, bias_only=bias_only))
    return _EVERYONE[key][1]


def _test_scores(setup: Setup, shared: dict | None, *, dim: int, bias_only: bool) -> dict:
    """Test RMSE and held-out NDCG@10 after *every* user personalises the released item model
    on their own training ratings (post-processing on the device)."""
    if shared is None:
        return {"rmse": math.inf, "ndcg": math.nan}
    model = _everyone(setup, dim=dim, bias_only=bias_only).released_model(shared)
    return {"rmse": round(evaluate_ratings(model, setup.test)["rmse"], 4),
            "ndcg": round(heldout_ndcg(model, setup.test), 4)}


def _grid_row(setup: Setup, config: dict) -> dict:
    population, silos = config["population"], config["silos"]
    ratings = (setup.train if population == setup.n_users else
               subsample_users(setup.train, n_users=setup.n_users, keep=population, seed=0)[0])
    _, shared, dp, _ = train_run(
        ratings, n_users=population, n_items=setup.n_items, epsilon=config["epsilon"],
        sample_rate=config["sample_rate"], rounds=config["rounds"],
        partition=None if silos is None else iid_partition(population, silos, seed=0),
        bias_only=config["bias_only"], seed=config["seed"], **config["tuned"])
    book = dp.ledger
    return _test_scores(setup, shared, dim=config["tuned"]["dim"],
                        bias_only=config["bias_only"]) | {
        "sigma": round(dp.noise_multiplier, 4), "unit": str(book.unit), "delta": book.delta,
        "ledger_epsilon": round(book.epsilon(), 3), "ledger": book.to_json()}


def grid_run(setup: Setup, search, *, epsilon: float, sample_rate: float,
             population: int | None = None, silos: int | None = None, seed: int = 0,
             bias_only: bool = False) -> dict:
    """One cached DP-FedAvg run with the settings of ``search`` (``search.tuned``, and T =
    ``search.rounds_for[epsilon]``), trained on all users (or a seeded subset of
    ``population``; or on ``silos`` IID silos, silo-level), scored on the test split.

    Returns the configuration, ``clients`` (expected per round, 4 decimals), the scores, σ,
    unit, δ, the ledger's ε and the ledger (JSON)."""
    population = setup.n_users if population is None else population
    config = {"epsilon": epsilon, "sample_rate": sample_rate, "population": population,
              "silos": silos, "seed": seed, "bias_only": bias_only, "tuned": search.tuned,
              "rounds": search.rounds_for[epsilon]}
    key = config | {"data": digest(setup.train, setup.test), "code": code_version()}
    row = cached_json("ch5-grid", key, lambda: _grid_row(setup, config))
    expected = round(sample_rate * (population if silos is None else silos), 4)
    return config | {"clients": expected} | row


def surface(setup: Setup, search) -> pd.DataFrame:
    """The whole grid: cross-device (ε × m), population (ε × N at q = 0.1) and cross-silo
    (:data:`SILO_EPSILONS` × K, silo-level), one row per run with a ``panel`` column."""
    rows = [grid_run(setup, search, epsilon=e, sample_rate=m / setup.n_users)
            | {"panel": "cross-device"} for m in CLIENTS for e in EPSILONS]
    rows += [grid_run(setup, search, epsilon=e, sample_rate=POPULATION_RATE, population=n)
             | {"panel": "population"} for n in POPULATIONS for e in EPSILONS]
    rows += [grid_run(setup, search, epsilon=e, sample_rate=1.0, silos=k)
             | {"panel": "cross-silo"} for k in SILOS for e in SILO_EPSILONS]
    return pd.DataFrame(rows)


def noise_on_average(grid: pd.DataFrame, *, clip_norm: float, epsilon: float = 8.0) -> pd.DataFrame:
    """At ``epsilon``, per cross-device cohort and per population: σ, the noise std on the
    average σC/m (m the expected cohort) and the test RMSE."""
    rows = grid[(grid["epsilon"] == epsilon) & (grid["panel"] != "cross-silo")]
    return pd.DataFrame({"panel": rows["panel"], "N": rows["population"], "m": rows["clients"],
                         "sigma": rows["sigma"].round(3),
                         "sigma*C/m": (rows["sigma"] * clip_norm / rows["clients"]).round(5),
                         "test RMSE": rows["rmse"]})


def explorer_spec(setup: Setup, grid: pd.DataFrame, refs: dict[str, dict]) -> dict:
    """The arguments of :func:`~privrec.course.explorer.explorer_html` for the cross-device runs
    (ε × m) with the non-private references (the global mean ranks nothing: RMSE only)."""
    device = grid[grid["panel"] == "cross-device"]
    records = [{"epsilon": r.epsilon, "clients": int(r.clients), "rmse": r.rmse, "ndcg": r.ndcg,
                "note": f"σ={r.sigma:.2f}, T={r.rounds}, ledger ε={r.ledger_epsilon:g}"}
               for r in device.itertuples()]
    return {"records": records, "controls": ["epsilon", "clients"], "series": "clients",
            "metrics": {"rmse": "test RMSE", "ndcg": "held-out NDCG@10"},
            "references": [{"label": name, **({"rmse": r["rmse"]} if name == "global mean" else r)}
                           for name, r in refs.items()],
            "initial": {"epsilon": 8.0, "clients": setup.n_users},
            "control_labels": {"epsilon": "user-level ε", "clients": "clients per round m"},
            "epsilon_label": f"user-level ε (δ = {default_delta(setup.n_users):.0e})",
            "title": f"DP-FedAvg on ML-100K: user-level ε × clients per round (N = {setup.n_users})"}


def references(setup: Setup) -> dict[str, dict]:
    """Non-private references on the test split: the global mean, the regularised bias-only
    model and chapter 1's centralised MF at d = 32 (library defaults)."""
    def compute() -> dict:
        central = BiasedMF(setup.n_users, setup.n_items, 32, seed=0,
                           global_mean=float(setup.train["rating"].mean()))
        fit_explicit(central, setup.train, progress=False)
        kw = {"n_users": setup.n_users, "n_items": setup.n_items}
        models_ = {"global mean": global_mean_model(setup.train, **kw),
                   "bias-only": fit_bias_baseline(setup.train, **kw),
                   "centralised MF d=32": central}
        return {name: {"rmse": round(evaluate_ratings(m, setup.test)["rmse"], 4),
                       "ndcg": round(heldout_ndcg(m, setup.test), 4)}
                for name, m in models_.items()}

    config = {"data": digest(setup.train, setup.test), "code": code_version()}
    return cached_json("ch5-references", config, compute)


# -- the private bias-only baseline --------------------------------------------------------------

def bias_curve(setup: Setup, search) -> pd.DataFrame:
    """The private bias-only model (:class:`~privrec.federated.mf.BiasOnlyClients`) through the
    same DP-FedAvg, every user in every round, at every ε with the searched C, lr_s and T: test
    RMSE and NDCG@10."""
    return pd.DataFrame([grid_run(setup, search, epsilon=e, sample_rate=1.0, bias_only=True)
                         for e in EPSILONS])


def paired_bias(setup: Setup, search, *, epsilons: Sequence[float] = (1.0, 8.0),
                seeds: Sequence[int] = range(5)) -> pd.DataFrame:
    """Test RMSE of the private embedding model and of the private bias-only model, both every
    user in every round, per ε and seed (the seed sets the initial factors and the noise; the
    split and the settings stay fixed): rows (ε, seed), columns ``embedding``, ``bias-only``."""
    rows = {(e, s): {name: grid_run(setup, search, epsilon=e, sample_rate=1.0, seed=s,
                                    bias_only=flag)["rmse"]
                     for name, flag in (("embedding", False), ("bias-only", True))}
            for e in epsilons for s in seeds}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(["epsilon", "seed"])


def bias_verdicts(paired: pd.DataFrame, *, level: float = 0.95) -> pd.DataFrame:
    """Per ε: mean of (embedding − bias-only) test RMSE over seeds, its t interval, and
    ``better``/``worse``/``tie`` for the embedding model (lower RMSE is better)."""
    out = {e: paired_intervals(frame.droplevel("epsilon"), "bias-only", level=level)
           .loc["embedding"] for e, frame in paired.groupby(level="epsilon", sort=True)}
    return pd.DataFrame.from_dict(out, orient="index").rename_axis("epsilon")


def extra_cohort(setup: Setup, search, grid: pd.DataFrame, *, clients: int = 500,
                 neighbours: tuple[int, int] = (300, 943),
                 epsilons: Sequence[float] = SILO_EPSILONS) -> tuple[pd.DataFrame, str]:
    """Exercise 2: cross-device runs with ``clients`` a round at ``epsilons``, between its
    ``neighbours`` of the grid: the test RMSE (rows m, columns ε) and the text printed (the
    table and what its rows show)."""
    extra = pd.DataFrame([grid_run(setup, search, epsilon=e, sample_rate=clients / setup.n_users)
                          for e in epsilons])
    device = grid[(grid["panel"] == "cross-device") & grid["clients"].isin(neighbours)
                  & grid["epsilon"].isin(list(epsilons))]
    table = pd.concat([device, extra]).pivot(index="clients", columns="epsilon", values="rmse")
    lo, hi = table.loc[list(neighbours)].min(), table.loc[list(neighbours)].max()
    between = (table.loc[clients] >= lo - 1e-4) & (table.loc[clients] <= hi + 1e-4)
    gap = (extra["ledger_epsilon"] - extra["epsilon"]).iloc[:-1].abs().max()
    table = table.rename(index="{:g}".format)
    return table, (
        f"test RMSE, user-level epsilon (delta = {default_delta(setup.n_users):.0e}), m = "
        f"{neighbours[0]}, {clients} and {neighbours[1]}\n"
        f"{table.to_string(float_format='{:.4f}'.format)}\n"
        f"m = {clients} lies between m = {neighbours[0]} and m = {neighbours[1]} (to 1e-4) at "
        f"{int(between.sum())} of {len(between)} epsilons;\nlarger m better at every epsilon: "
        f"{bool((table.diff().dropna() <= 1e-4).all().all())}; the m = {clients} ledgers' "
        f"largest\n|epsilon - target|: {gap:.3f}")


# -- what the chapter prints and draws ----------------------------------------------------------

def ledger_text(run: dict) -> str:
    """:func:`~privrec.course.experiments.dp_basics.compact_summary` of a run's ledger (JSON)."""
    return compact_summary(PrivacyLedger.from_json(run["ledger"]))


def setup_text(setup: Setup) -> str:
    """The number of users, their δ (:func:`~privrec.dp.ledger.default_delta`) and the splits."""
    delta, n = default_delta(setup.n_users), setup.n_users
    return (f"N = {n} users; user-level delta = {delta:.0e}, delta * N = {delta * n:.4f}\n"
            f"{len(setup.fit):,} fit + {len(setup.val):,} validation ratings (both from "
            f"training); {len(setup.test):,} test\nratings, used only to report chosen models")


def surface_text(setup: Setup, search, grid: pd.DataFrame, *, epsilon: float = 8.0) -> str:
    """How close every ledger is to its target ε, the δ of each privacy unit, and the ledgers of
    the smallest population and of the fewest silos at ``epsilon``."""
    finite = grid[grid["epsilon"] < math.inf]
    gap = (finite["ledger_epsilon"] - finite["epsilon"]).abs().max()
    deltas = grid.groupby("unit")["delta"].agg(["min", "max"]).rename_axis("privacy unit")
    extra = [grid_run(setup, search, epsilon=epsilon, sample_rate=POPULATION_RATE,
                      population=POPULATIONS[0]),
             grid_run(setup, search, epsilon=epsilon, sample_rate=1.0, silos=SILOS[0])]
    return "\n".join([f"{len(grid)} configurations; largest |ledger epsilon - target| over the "
                      f"finite ones: {gap:.3f}", deltas.to_string(float_format="{:.0e}".format)]
                     + ["\n" + ledger_text(r) for r in extra])


def cross_device_text(setup: Setup, grid: pd.DataFrame, bias: pd.DataFrame, *, clip_norm: float,
                      epsilon: float = 8.0) -> str:
    """The cross-device test RMSE (rows m, columns ε), the private bias-only curve (``bias``:
    :func:`bias_curve`) and :func:`noise_on_average` at ``epsilon``."""
    device = grid[grid["panel"] == "cross-device"].pivot(index="clients", columns="epsilon",
                                                         values="rmse")
    return "\n".join([
        f"test RMSE, cross-device, N = {setup.n_users}, user-level epsilon (delta = "
        f"{default_delta(setup.n_users):.0e});", "rows: expected clients per round m",
        device.rename(index="{:g}".format).to_string(float_format="{:.4f}".format),
        "private bias-only, q = 1: " + " ".join(f"{x:.4f}" for x in bias["rmse"]),
        f"\nat user-level epsilon = {epsilon:g}: sigma and the noise std on the average, "
        "sigma*C/m", noise_on_average(grid, clip_norm=clip_norm, epsilon=epsilon).to_string(
            index=False)])


PANELS = {"cross-device": ("clients", "m = {:g}"), "population": ("population", "N = {:g}"),
          "cross-silo": ("silos", "K = {:g} silos")}
"""Panel of the surface -> (the column its curves differ in, the curve label)."""


def panel_curves(grid: pd.DataFrame, panel: str) -> dict[str, tuple[list[int], list[float]]]:
    """One panel's curves: label -> (positions of its ε in :data:`EPSILONS`, test RMSE), in
    increasing ε."""
    key, label = PANELS[panel]
    frame = grid[grid["panel"] == panel].sort_values([key, "epsilon"], kind="stable")
    return {label.format(value): ([EPSILONS.index(e) for e in rows["epsilon"]],
                                  rows["rmse"].tolist())
            for value, rows in frame.groupby(key, sort=True)}

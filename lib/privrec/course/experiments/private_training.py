"""Chapter 3's experiments: private training of the embedding recommender, run by run.

The unit of work is one *run* (:func:`run`): a method trained on one data set with one seed at
one :math:`\\varepsilon`, scored on one test set. Runs are cached one by one with
:func:`privrec.course.book.cached_json`, keyed on the *content* of their data, their settings and
the source of the code they call, so the curves, the seed studies, the paired comparison and the
exercises train each shared run once. A private run returns its ledger as JSON
(:meth:`~privrec.dp.ledger.PrivacyLedger.to_json`).

Methods (:data:`METHODS`; one record is one rating, or one interaction for ``loss="logistic"``):
``"non-private"`` (Adam, no noise), ``"DP-SGD"`` (naive DP-SGD on every table),
``"private biases + DP-SGD"`` (:func:`~privrec.central.private_stats.fit_private_bias_residual`)
and ``"private bias-only"`` (:func:`fit_private_bias_only`, the private trivial baseline).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from ...central import dpsgd as dpsgd_module
from ...central import input_perturbation, per_example, private_stats
from ...central.dpsgd import LOSS_UNITS, STEP_NAME, dpsgd_steps, fit_dpsgd, noisy_average
from ...central.input_perturbation import laplace_perturb_ratings, randomized_response_interactions
from ...central.per_example import (
    clip_and_sum,
    mf_clipped_gradient_sum,
    mf_loss,
    per_example_gradients,
)
from ...central.private_stats import CENTER, bias_events, fit_private_bias_residual
from ...core.checks import choice, epsilon_or_inf, int_in
from ...core.results import FitResult
from ...dp import accounting, events, ledger, primitives
from ...dp.ledger import PrivacyEvent, PrivacyLedger, default_delta
from ...dp.primitives import poisson_sample
from ...recsys import data, metrics, models, train
from ...recsys.data import leave_last_out_split, load_movielens100k, random_split, synthetic_movielens
from ...recsys.metrics import evaluate_ranking, evaluate_ratings
from ...recsys.models import BiasedMF
from ...recsys.train import fit_explicit, fit_implicit, ratings_to_tensors
from ..book import cached_json

__all__ = ["EPSILONS", "METHODS", "NONPRIVATE", "Protocol", "load_protocol", "run",
           "fit_private_bias_only", "bias_noise", "noise_aware_rule", "input_perturbation_curve",
           "curve", "describe", "fast_path_check", "sparse_noise_demo"]

EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, math.inf)
"""The privacy budgets of the curves (``inf``: the same pipeline without noise)."""
METHODS = ("non-private", "DP-SGD", "private biases + DP-SGD", "private bias-only")
"""The methods :func:`run` trains."""
NONPRIVATE = {"squared": {"dim": 32, "epochs": 15, "batch_size": 2048, "lr": 0.01},
              "logistic": {"dim": 32, "epochs": 10, "batch_size": 4096, "lr": 0.01,
                           "reg": 1e-4, "loss": "logistic"}}
"""The non-private recipes, also trained on input-perturbed data (250 Adam steps for ranking)."""
_LIBRARY = (accounting, events, ledger, primitives, per_example, dpsgd_module, private_stats,
            input_perturbation, data, metrics, models, train)


@dataclass(frozen=True)
class Protocol:
    """ML-100K's two splits and a public synthetic twin with the same splits.

    ``train``/``test``: seeded 80/20 (RMSE); ``rank_train``/``rank_test``: leave-last-out
    (NDCG@10); ``twin_*``: the same splits of :func:`~privrec.recsys.data.synthetic_movielens`
    at ML-100K's size (generated data: looking at it costs no privacy).
    """

    ratings: pd.DataFrame
    n_users: int
    n_items: int
    train: pd.DataFrame
    test: pd.DataFrame
    rank_train: pd.DataFrame
    rank_test: pd.DataFrame
    twin_train: pd.DataFrame
    twin_test: pd.DataFrame
    twin_rank_train: pd.DataFrame
    twin_rank_test: pd.DataFrame

    @property
    def delta(self) -> float:
        """The rating-level δ of the curves: :func:`~privrec.dp.ledger.default_delta` of ``train``."""
        return default_delta(len(self.train))

    def split(self, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The 80/20 split with ``seed`` (seed 0 gives ``train``/``test``)."""
        return random_split(self.ratings, test_fraction=0.2, seed=int_in("seed", seed, 0))

    def task(self, loss: str, *, twin: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``(train, test)`` of the rating (``"squared"``) or ranking (``"logistic"``) task."""
        names = ("rank_train", "rank_test") if choice(
            "loss", loss, tuple(LOSS_UNITS)) == "logistic" else ("train", "test")
        return tuple(getattr(self, ("twin_" if twin else "") + name) for name in names)


def load_protocol(source: str | None = None, *, twin_seed: int = 1) -> Protocol:
    """ML-100K (``source`` as :func:`~privrec.recsys.data.load_movielens100k`), its splits and the
    twin (``synthetic_movielens`` with ML-100K's numbers of users, items and ratings)."""
    ml = load_movielens100k(source)
    twin = synthetic_movielens(ml.n_users, ml.n_items, len(ml.ratings), dim=3, seed=twin_seed)
    return Protocol(ml.ratings, ml.n_users, ml.n_items,
                    *random_split(ml.ratings, test_fraction=0.2, seed=0),
                    *leave_last_out_split(ml.ratings),
                    *random_split(twin.ratings, test_fraction=0.2, seed=0),
                    *leave_last_out_split(twin.ratings))


# -- one run ---------------------------------------------------------------------------------

@functools.cache
def _code_version() -> str:
    """Digest of the library code the runs depend on and of this module's fitters."""
    own = (run, _fit, _score, _bias_model, fit_private_bias_only, bias_noise, _twin_prefers)
    text = "".join(inspect.getsource(m) for m in _LIBRARY + own)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _digest(frame: pd.DataFrame) -> str:
    """Content digest of a ratings table (user, item, rating, in row order)."""
    values = pd.util.hash_pandas_object(frame[["user", "item", "rating"]], index=False)
    return hashlib.sha256(values.to_numpy().tobytes()).hexdigest()[:16]


@functools.cache
def _dpsgd_noise(target_epsilon: float, epochs: float, sample_rate: float, unit: str,
                 n_units: int) -> float:
    """The σ that :func:`~privrec.central.dpsgd.fit_dpsgd` calibrates for these steps on a fresh
    ledger (the same ``ledger.calibrate`` call), searched once per process."""
    if math.isinf(target_epsilon):
        return 0.0
    steps = dpsgd_steps(epochs=epochs, sample_rate=sample_rate)
    return PrivacyLedger(unit=unit, n_units=n_units).calibrate(
        lambda z: [PrivacyEvent.gaussian(STEP_NAME, noise_multiplier=z, sample_rate=sample_rate,
                                         count=steps, unit=unit)], target_epsilon=target_epsilon)


def bias_noise(target_epsilon: float, *, n_units: int, unit: str = "rating") -> float:
    """Noise multiplier of the bias releases (two at rating level, one at interaction level) when
    they alone cost ``target_epsilon`` on a fresh ledger over ``n_units`` records (``inf``: 0)."""
    target = epsilon_or_inf("target_epsilon", target_epsilon)
    if math.isinf(target):
        return 0.0
    return PrivacyLedger(unit=unit, n_units=n_units).calibrate(
        lambda z: bias_events(z, unit=unit), target_epsilon=target)


def _bias_model(biases: private_stats.PrivateBiases, n_users: int, n_items: int) -> BiasedMF:
    """The ``dim=0`` model of released biases (post-processing)."""
    model = BiasedMF(n_users, n_items, 0, global_mean=biases.global_mean)
    with torch.no_grad():
        model.user_bias.copy_(biases.user_bias)
        model.item_bias.copy_(biases.item_bias)
    return model


def fit_private_bias_only(train_set: pd.DataFrame, *, n_users: int, n_items: int,
                          target_epsilon: float, loss: str = "squared", noise_aware: bool = True,
                          seed: int = 0) -> FitResult:
    """The private trivial baseline: the whole budget on the bias releases, no factors.

    ``"squared"``: :func:`~privrec.central.private_stats.private_biases` (item sums and counts,
    then user residual sums and counts) at the noise that makes both releases cost
    ``target_epsilon`` at rating level; ``"logistic"``: the noisy item counts of
    :func:`~privrec.central.private_stats.private_item_popularity` (private popularity) at
    interaction level. Returns a ``dim=0`` BiasedMF and the ledger of its releases.
    """
    unit = LOSS_UNITS[choice("loss", loss, tuple(LOSS_UNITS))]
    book = PrivacyLedger(unit=unit, n_units=len(train_set))
    z = bias_noise(target_epsilon, n_units=len(train_set), unit=unit)
    kw = {"n_users": n_users, "n_items": n_items, "noise_multiplier": z, "ledger": book, "seed": seed}
    biases = (private_stats.private_biases(train_set, noise_aware=noise_aware, **kw)
              if unit == "rating" else private_stats.private_item_popularity(train_set, **kw))
    return FitResult(model=_bias_model(biases, n_users, n_items), history={}, ledger=book)


def _fit(method: str, train_set: pd.DataFrame, *, n_users: int, n_items: int,
         target_epsilon: float, seed: int, settings: dict) -> FitResult:
    """Train one model of ``method`` (see :data:`METHODS`) with ``settings``."""
    recipe = dict(settings)
    loss = recipe.get("loss", "squared")
    if method in ("private biases + DP-SGD", "private bias-only"):
        fit = fit_private_bias_residual if method != "private bias-only" else fit_private_bias_only
        return fit(train_set, n_users=n_users, n_items=n_items, target_epsilon=target_epsilon,
                   seed=seed, **recipe)
    mean = float(train_set["rating"].mean()) if method == "non-private" else CENTER
    model = BiasedMF(n_users, n_items, recipe.pop("dim"), seed=seed,
                     global_mean=mean if loss == "squared" else 0.0)
    if method == "non-private":
        fit = fit_explicit if recipe.pop("loss", "squared") == "squared" else fit_implicit
        return fit(model, train_set, seed=seed, progress=False, **recipe)
    sigma = recipe.pop("noise_multiplier", None)
    if sigma is None:
        sigma = _dpsgd_noise(target_epsilon, recipe["epochs"], recipe["sample_rate"],
                             LOSS_UNITS[loss], len(train_set))
    return fit_dpsgd(model, train_set, noise_multiplier=sigma, seed=seed, **recipe)


def _score(model: BiasedMF, test: pd.DataFrame, seen: pd.DataFrame, loss: str) -> dict:
    """RMSE on ``test``; or NDCG@10 (items in ``seen`` not recommended), the NDCG@10 of the item
    biases alone and the spread of the factor scores (std of p·v over std of b_i)."""
    if loss == "squared":
        return {"rmse": evaluate_ratings(model, test)["rmse"]}
    items = BiasedMF(model.n_users, model.n_items, 0)
    with torch.no_grad():
        items.item_bias.copy_(model.item_bias)
        spread = (model.user_factors @ model.item_factors.T).std() if model.dim else torch.zeros(())
    return {"ndcg": evaluate_ranking(model, seen, test)["ndcg"],
            "item bias ndcg": evaluate_ranking(items, seen, test)["ndcg"],
            "spread": float(spread / model.item_bias.detach().std().clamp(min=1e-12))}


def run(protocol: Protocol, method: str, train_set: pd.DataFrame, test: pd.DataFrame, *,
        seen: pd.DataFrame | None = None, target_epsilon: float = math.inf, seed: int = 0,
        **settings) -> dict:
    """One cached run: ``method`` trained on ``train_set`` with ``settings``, scored on ``test``.

    ``seen`` (ranking; default ``train_set``) holds the interactions not recommended again: the
    true ones when ``train_set`` is a perturbed copy. Returns ``rmse``, or ``ndcg`` with ``item
    bias ndcg`` and ``spread``; and ``epsilon`` and ``ledger`` (JSON), ``None`` if not private.
    """
    choice("method", method, METHODS)
    loss = choice("loss", settings.get("loss", "squared"), tuple(LOSS_UNITS))
    seen = train_set if seen is None else seen
    target = epsilon_or_inf("target_epsilon", target_epsilon)
    config = {"method": method, "data": [_digest(f) for f in (train_set, test, seen)],
              "epsilon": target, "seed": seed, "settings": settings, "code": _code_version()}

    def compute() -> dict:
        fit = _fit(method, train_set, n_users=protocol.n_users, n_items=protocol.n_items,
                   target_epsilon=target, seed=seed, settings=settings)
        book = fit.ledger
        return _score(fit.model, test, seen, loss) | {
            "epsilon": None if book is None else book.epsilon(),
            "ledger": None if book is None else book.to_json()}

    return cached_json("ch3-run", config, compute)


def _twin_prefers(protocol: Protocol, noise_multiplier: float) -> bool:
    """Twin test RMSE of the bias-only model with noise-aware shrinkage <= without it."""
    kw = {"n_users": protocol.n_users, "n_items": protocol.n_items,
          "noise_multiplier": noise_multiplier}
    rmse = [evaluate_ratings(_bias_model(private_stats.private_biases(
        protocol.twin_train, noise_aware=flag, **kw), protocol.n_users, protocol.n_items),
        protocol.twin_test)["rmse"] for flag in (True, False)]
    return rmse[0] <= rmse[1]


def noise_aware_rule(protocol: Protocol, settings: dict) -> Callable[[float], dict]:
    """``settings`` as a function of ε plus the twin's choice of the noise-aware shrinkage for the
    bias releases at the noise they get (a ``bias_share`` of ε; all of ε for the bias-only model):
    the bias-only model's twin test RMSE with and without it decides (ties: use it)."""
    share = settings.get("bias_share", 1.0)

    def at(epsilon: float) -> dict:
        z = bias_noise(epsilon * share, n_units=len(protocol.train))
        config = {"twin": _digest(protocol.twin_train), "z": z, "code": _code_version()}
        flag = cached_json("ch3-noise-aware", config, lambda: _twin_prefers(protocol, z))
        return dict(settings) | {"noise_aware": flag}

    return at


def input_perturbation_curve(protocol: Protocol, *, epsilons: Sequence[float] = EPSILONS,
                             seed: int = 0) -> pd.DataFrame:
    """The non-private recipes on Laplace-perturbed ratings (RMSE) and on randomized-response
    interactions (NDCG@10, epochs scaled so every run processes as many positives as 10 epochs
    of the true interactions); ``inf`` runs on the unperturbed data (the non-private reference)."""
    rows = {}
    for eps in epsilons:
        noisy = laplace_perturb_ratings(protocol.train, epsilon=eps, seed=seed)
        flipped = randomized_response_interactions(protocol.rank_train, n_users=protocol.n_users,
                                                   n_items=protocol.n_items, epsilon=eps, seed=seed)
        recipe = NONPRIVATE["logistic"] | {"epochs": max(1, round(
            NONPRIVATE["logistic"]["epochs"] * len(protocol.rank_train) / len(flipped)))}
        rows[eps] = {"rmse": run(protocol, "non-private", noisy, protocol.test, seed=seed,
                                 **NONPRIVATE["squared"])["rmse"],
                     "ndcg": run(protocol, "non-private", flipped, protocol.rank_test, seed=seed,
                                 seen=protocol.rank_train, **recipe)["ndcg"],
                     "reported": len(flipped)}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("ε")


# -- curves ----------------------------------------------------------------------------------

def curve(protocol: Protocol, method: str, settings: Callable[[float], dict] | dict, *,
          epsilons: Sequence[float] = EPSILONS, seed: int = 0, twin: bool = False) -> list[dict]:
    """:func:`run` of ``method`` at every ε on its loss's task (split 0, or the twin's);
    ``settings`` is a dict or a function of ε (e.g. :func:`noise_aware_rule`)."""
    out = []
    for eps in epsilons:
        kw = settings(eps) if callable(settings) else settings
        train_set, test = protocol.task(kw.get("loss", "squared"), twin=twin)
        out.append(run(protocol, method, train_set, test, target_epsilon=eps, seed=seed, **kw))
    return out


# -- the mechanics, demonstrated ---------------------------------------------------------

def describe(protocol: Protocol) -> str:
    """Sizes of the two splits and the δ of each unit (δ·N ≤ 0.01)."""
    lines = [f"80/20 split: {len(protocol.train):,} train / {len(protocol.test):,} test ratings; "
             f"leave-last-out: {len(protocol.rank_train):,} / {len(protocol.rank_test):,}"]
    for unit, n in (("rating", len(protocol.train)), ("interaction", len(protocol.rank_train))):
        lines.append(f"{unit}-level δ = {default_delta(n):g} (δ·N = {default_delta(n) * n:.4f})")
    return "\n".join(lines)


def fast_path_check(*, clip_norm: float = 0.5, seed: int = 0) -> str:
    """The closed-form clipped gradient sum (:func:`~privrec.central.per_example.mf_clipped_gradient_sum`)
    against torch.func's per-example gradients, clipped and summed, on 256 synthetic ratings."""
    small = synthetic_movielens(seed=seed)
    model = BiasedMF(small.n_users, small.n_items, 3, global_mean=3.5, init_std=0.5, seed=1)
    u, i, r = (t[:256] for t in ratings_to_tensors(small.ratings))
    dense = per_example_gradients(model, lambda m, *b: mf_loss(m, *b, reg=0.05, bias_reg=0.01),
                                  u, i, r)
    reference, _ = clip_and_sum(dense, clip_norm=clip_norm)
    fast, norms = mf_clipped_gradient_sum(model, u, i, r, clip_norm=clip_norm, reg=0.05,
                                          bias_reg=0.01)
    worst = max(float((fast[n] - reference[n]).abs().max()) for n in fast)
    return (f"torch.func per-example gradient of user_factors: {tuple(dense['user_factors'].shape)}"
            f"\nshare of ratings clipped at C = {clip_norm}: {float((norms > clip_norm).float().mean()):.2f}"
            f"\nfast path equals the torch.func path (max abs difference below 1e-5): {worst < 1e-5}")


def sparse_noise_demo(protocol: Protocol, *, sample_rate: float = 0.02, seed: int = 1) -> str:
    """One clipped item-factor gradient of a Poisson batch released two ways: noise on the rows
    the batch touched only, and noise on every row (:func:`~privrec.central.dpsgd.noisy_average`).
    Returns what an observer reads off each: which rows moved."""
    gen = torch.Generator().manual_seed(seed)
    users, items, ratings = ratings_to_tensors(protocol.train)
    batch = poisson_sample(len(protocol.train), sample_rate=sample_rate, generator=gen)
    model = BiasedMF(protocol.n_users, protocol.n_items, 8, global_mean=3.0, seed=0)
    clean, _ = mf_clipped_gradient_sum(model, users[batch], items[batch], ratings[batch],
                                       clip_norm=0.5)
    touched = torch.zeros(protocol.n_items, dtype=torch.bool)
    touched[items[batch]] = True
    noise = 0.5 * torch.randn(protocol.n_items, 8, generator=gen)
    sparse = clean["item_factors"] + noise * touched[:, None]
    dense = noisy_average(clean, noise_multiplier=1.0, clip_norm=0.5, expected_batch_size=1.0,
                          generator=gen)["item_factors"]
    return (f"items rated in this batch: {int(touched.sum())} of {protocol.n_items}\n"
            "noise on touched rows only -> moved rows = the batch's items: "
            f"{bool(((sparse != 0).any(1) == touched).all())}\nnoise on every row -> rows that "
            f"moved: {int((dense != 0).any(1).sum())} of {protocol.n_items} (no information)")

"""Chapter 3's studies built on the runs of :mod:`.private_training`: tuning on the public twin and
on a priced validation split, ledgers of a sweep in one table, seed studies, paired comparisons
against the trivial baselines, and the printed reports (each line at most 80 characters).

Every hyperparameter the curves use is chosen here on the synthetic twin (:func:`tune_naive`,
:func:`tune_improved`): generated data, so reading its test scores costs no privacy. The one search
on private data, :func:`validation_tuning`, composes all its runs on one ledger.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from ...central.input_perturbation import laplace_perturb_ratings, randomized_response_interactions
from ...core.checks import instance, int_in, real_array
from ...dp.ledger import PrivacyLedger
from ...recsys.data import random_split
from ...recsys.metrics import evaluate_ratings, ranking_metrics
from ...recsys.train import fit_bias_baseline, popularity_scores
from .private_training import EPSILONS, NONPRIVATE, Protocol, curve, noise_aware_rule, run

__all__ = ["SHORT", "table_text", "grid_search", "on_twin", "tune_naive", "tune_improved", "sweep_table",
           "sweep_report", "validation_tuning", "tuning_report", "reference_points",
           "input_perturbation_report", "curves", "curve_tables", "rr_change", "t_interval",
           "paired_intervals", "paired_comparison", "by_seed", "sigma_clip_grid",
           "bias_share_exercise", "reference_report", "seed_report", "paired_report",
           "curve_claims"]

SHORT = {"input perturbation": "input pert.", "private biases + DP-SGD": "biases+DP-SGD",
         "private bias-only": "priv. bias-only"}
"""Short method names for tables that must fit the text column."""


def table_text(frame: pd.DataFrame, digits: int = 4) -> str:
    """``frame`` rounded, with :data:`SHORT` method names, as text."""
    return frame.rename(columns=SHORT, index=SHORT).round(digits).to_string()


# -- tuning -------------------------------------------------------------------------------------

def grid_search(score: Callable[..., float], grid: Mapping[str, Sequence], *,
                minimise: bool = True) -> tuple[pd.DataFrame, dict]:
    """``score(**point)`` at every point of ``grid`` (``itertools.product``, in grid order).

    Returns the scores (indexed by the grid's keys) and the best point; ties go to the first
    point in grid order (``min``/``max`` return the first extreme)."""
    names = list(grid)
    points = [dict(zip(names, values, strict=True)) for values in itertools.product(*grid.values())]
    scores = [float(score(**point)) for point in points]
    pick = (min if minimise else max)(range(len(points)), key=scores.__getitem__)
    return pd.DataFrame(points).assign(score=scores).set_index(names), points[pick]


def on_twin(protocol: Protocol, method: str, base: dict, metric: str, *,
            rule: bool = False, epsilon: float = 8.0) -> Callable[..., float]:
    """A ``score`` for :func:`grid_search`: ``method`` with ``base | point`` at ``epsilon`` on the
    twin's task (with ``rule``, plus the twin's noise-aware choice, :func:`noise_aware_rule`)."""
    def score(**point) -> float:
        settings = noise_aware_rule(protocol, base | point) if rule else base | point
        return curve(protocol, method, settings, epsilons=[epsilon], twin=True)[0][metric]
    return score


def tune_naive(protocol: Protocol) -> tuple[dict, dict, str]:
    """Naive DP-SGD's settings for ratings and for interactions, chosen on the twin at ε = 8:
    clip norm x Adam step (dim 4, 20 epochs, q = 0.1, λ = 0.05), and clip norm x step (dim 8,
    10 epochs, logistic loss). Returns both settings and the printed grids."""
    base = {"dim": 4, "epochs": 20, "sample_rate": 0.1, "reg": 0.05}
    grid, best = grid_search(on_twin(protocol, "DP-SGD", base, "rmse"), {
        "clip_norm": (0.5, 2.0), "lr": (0.01, 0.05)})
    rank = {"dim": 8, "epochs": 10, "sample_rate": 0.1, "reg": 1e-4, "loss": "logistic"}
    grid_rank, best_rank = grid_search(on_twin(protocol, "DP-SGD", rank, "ndcg"), {
        "clip_norm": (0.5, 2.0), "lr": (0.01, 0.05)}, minimise=False)
    naive, naive_rank = base | best, rank | best_rank
    report = (f"twin test RMSE (ratings):\n{table_text(grid.unstack('lr'))}\n"
              f"twin NDCG@10 (interactions):\n{table_text(grid_rank.unstack('lr'))}\n"
              f"chosen:\n{_wrap(naive)}\n{_wrap(naive_rank)}")
    return naive, naive_rank, report


def _wrap(settings: dict) -> str:
    """A settings dict printed over lines of at most 80 characters."""
    items, lines = [f"{k!r}: {v!r}" for k, v in settings.items()], [""]
    for item in items:
        if len(lines[-1]) + len(item) > 74:
            lines.append("")
        lines[-1] += item + ", "
    return "{" + "\n ".join(line.rstrip() for line in lines).rstrip(", ") + "}"


def tune_improved(protocol: Protocol) -> tuple[Callable[[float], dict], dict, str]:
    """Private biases + DP-SGD's settings, chosen on the twin at ε = 8: bias share x clip norm
    (dim 4, 10 epochs, q = 0.1, step 0.05, λ = 0.05; the noise-aware shrinkage by
    :func:`noise_aware_rule`), and the bias share of the ranking variant (dim 8, C = 2). Returns
    the rating settings as a function of ε, the ranking settings and the printed grids."""
    base = {"dim": 4, "epochs": 10, "sample_rate": 0.1, "lr": 0.05, "reg": 0.05}
    grid, best = grid_search(on_twin(protocol, "private biases + DP-SGD", base, "rmse", rule=True),
                             {"bias_share": (0.25, 0.5), "clip_norm": (0.25, 1.0)})
    rank = {"dim": 8, "epochs": 10, "sample_rate": 0.1, "clip_norm": 2.0, "lr": 0.01,
            "reg": 1e-4, "loss": "logistic"}
    grid_rank, best_rank = grid_search(on_twin(protocol, "private biases + DP-SGD", rank, "ndcg"),
                                       {"bias_share": (0.3, 0.5)}, minimise=False)
    improved, bias_only = noise_aware_rule(protocol, base | best), noise_aware_rule(protocol, {})
    aware = pd.DataFrame({"improved": [improved(e)["noise_aware"] for e in EPSILONS],
                          "bias-only": [bias_only(e)["noise_aware"] for e in EPSILONS]},
                         index=pd.Index(EPSILONS, name="noise-aware at ε")).T
    report = (f"twin test RMSE:\n{table_text(grid.unstack('clip_norm'))}\n"
              f"twin NDCG@10:\n{table_text(grid_rank.T)}\nchosen:\n{_wrap(base | best)}\n"
              f"{_wrap(rank | best_rank)}\n{aware.to_string()}")
    return improved, rank | best_rank, report


# -- ledgers --------------------------------------------------------------------------------------

def sweep_table(ledgers: Mapping[object, str | PrivacyLedger], *,
                index: str = "target ε") -> tuple[str, pd.DataFrame]:
    """One table for runs whose ledgers differ only in their noise: ``(header, frame)``.

    The header says what every run shares (unit, δ, number of records, and each event ``[k]``:
    name, count, mechanism, q); the frame has a row per run: each event's noise multiplier
    ``σ[k]`` and the ledger's ε. Raises ``ValueError`` when the ledgers differ otherwise."""
    books = {k: PrivacyLedger.from_json(v) if isinstance(v, str) else
             instance("ledger", v, PrivacyLedger) for k, v in ledgers.items()}
    shape = {(b.unit, b.delta, b.n_units, tuple((e.name, str(e.mechanism), e.sample_rate, e.count)
                                              for e in b.events)) for b in books.values()}
    if len(shape) != 1:
        raise ValueError(f"ledgers must differ only in noise multipliers, got {len(shape)} shapes")
    unit, delta, n_units, kinds = shape.pop()
    header = f"{unit}-level, δ = {delta:g}, N = {n_units:,} {unit}s; every run releases" + "".join(
        f"\n  [{k}] {name} x {count} ({mech}, q = {q:g})"
        for k, (name, mech, q, count) in enumerate(kinds, 1))
    rows = {key: {f"σ[{k}]": e.noise_multiplier for k, e in enumerate(b.events, 1)}
            | {"ε": b.epsilon()} for key, b in books.items()}
    return header, pd.DataFrame.from_dict(rows, orient="index").rename_axis(index)


def sweep_report(runs: Sequence[dict], metric: str, *,
                 epsilons: Sequence[float] = EPSILONS) -> str:
    """:func:`sweep_table` of a curve's runs (one per ε), with their ``metric`` as a column."""
    header, table = sweep_table({e: r["ledger"] for e, r in zip(epsilons, runs, strict=True)})
    return f"{header}\n{table_text(table.assign(**{metric: [r[metric] for r in runs]}))}"


def validation_tuning(protocol: Protocol, settings: dict, grid: Mapping[str, Sequence], *,
                      epsilon: float = 8.0, seeds: Sequence[int] = (0, 1, 2)) -> dict:
    """Tune naive DP-SGD on a validation split of the private training ratings, priced honestly.

    Each grid point trains at ``epsilon`` on 90% of ``protocol.train`` and is scored on the rest;
    the best is retrained on all of it per seed and tested once. Returns the validation
    ``scores``, the ``choice``, the ``test`` RMSEs, the ``published`` run's ledger and the
    ledger of the ``whole`` procedure (every tuning run, then the published one), as JSON."""
    fit_set, val = random_split(protocol.train, test_fraction=0.1, seed=1)
    whole = PrivacyLedger(unit="rating", n_units=len(protocol.train))

    def score(**point) -> float:
        result = run(protocol, "DP-SGD", fit_set, val, target_epsilon=epsilon, **settings | point)
        whole.extend(PrivacyLedger.from_json(result["ledger"]), prefix="tuning: ")
        return result["rmse"]

    scores, best = grid_search(score, grid)
    final = [run(protocol, "DP-SGD", protocol.train, protocol.test, target_epsilon=epsilon,
                 seed=s, **settings | best) for s in seeds]
    whole.extend(PrivacyLedger.from_json(final[0]["ledger"]), prefix="published run: ")
    return {"scores": scores, "choice": best, "test": [r["rmse"] for r in final],
            "published": final[0]["ledger"], "whole": whole.to_json()}


def tuning_report(tuned: dict) -> str:
    """The validation grid, the choice, its test RMSE over seeds and the composed ledger."""
    mean, low, high = t_interval(tuned["test"])
    published, whole = (PrivacyLedger.from_json(tuned[k]) for k in ("published", "whole"))
    table = whole.table()[["event", "noise multiplier", "count", "epsilon alone"]]
    return (f"validation RMSE:\n{table_text(tuned['scores'].unstack(-1))}\nchosen {tuned['choice']}; "
            f"test RMSE over {len(tuned['test'])} seeds:\n  {mean:.4f}, 95% interval "
            f"[{low:.4f}, {high:.4f}] (per seed: {', '.join(f'{v:.4f}' for v in tuned['test'])})\n"
            f"the published model's ledger: ε = {published.epsilon():.3f}; the procedure's:\n"
            f"{table.round(4).to_string(index=False)}\ncomposed: {whole.unit}-level "
            f"ε = {whole.epsilon():.3f}, δ = {whole.delta:g}")


# -- references and curves ----------------------------------------------------------------------

def reference_points(protocol: Protocol, perturbed: pd.DataFrame) -> dict:
    """The non-private references: bias-only test RMSE, popularity NDCG@10, and MF's RMSE and
    implicit MF's NDCG@10 (the ``inf`` row of :func:`input_perturbation_curve`'s frame)."""
    sizes = {"n_users": protocol.n_users, "n_items": protocol.n_items}
    recipe = NONPRIVATE["logistic"]
    return {"bias-only": evaluate_ratings(fit_bias_baseline(protocol.train, **sizes),
                                          protocol.test)["rmse"],
            "popularity": ranking_metrics(popularity_scores(protocol.rank_train, **sizes),
                                          protocol.rank_train, protocol.rank_test)["ndcg"],
            "MF": perturbed.loc[math.inf, "rmse"], "implicit MF": perturbed.loc[math.inf, "ndcg"],
            "implicit steps": recipe["epochs"] * math.ceil(len(protocol.rank_train)
                                                           / recipe["batch_size"])}


def input_perturbation_report(protocol: Protocol, perturbed: pd.DataFrame, *,
                              epsilon: float = 8.0) -> str:
    """Randomized response's reported interactions per ε, and the ledger of Laplace input
    perturbation at ``epsilon`` as a rating-level (add/remove) release."""
    book = PrivacyLedger(unit="rating", n_units=len(protocol.train))
    laplace_perturb_ratings(protocol.train, epsilon=epsilon, seed=0, ledger=book)
    counts = perturbed[["reported"]].T.rename(index={"reported": "reported"})
    return (f"randomized response: reported interactions (true: {len(protocol.rank_train):,}; "
            f"pure ε-DP\nper interaction bit, no δ)\n{counts.to_string()}\n\nLaplace input "
            f"perturbation at ε = {epsilon:g}, as a release about one rating (add/remove):\n"
            f"ledger ε = {book.epsilon()}, δ = {book.delta:g}\n"
            + book.table()[["event", "mechanism", "epsilon alone"]].round(3).to_string(index=False))


def curves(protocol: Protocol, methods: Mapping[str, tuple]) -> dict[str, tuple[list, list]]:
    """``method -> (rating runs, ranking runs)``: :func:`curve` over :data:`EPSILONS` of each
    method with its ``(rating settings, ranking settings)``."""
    return {m: (curve(protocol, m, rating), curve(protocol, m, ranking))
            for m, (rating, ranking) in methods.items()}


def curve_tables(perturbed: pd.DataFrame, runs: Mapping[str, tuple]) -> tuple[pd.DataFrame, ...]:
    """Test RMSE and NDCG@10 per ε (rows) and method (columns), input perturbation first."""
    tables = []
    for metric, part in (("rmse", 0), ("ndcg", 1)):
        columns = {"input perturbation": perturbed[metric].to_numpy()} | {
            m: [r[metric] for r in pair[part]] for m, pair in runs.items()}
        tables.append(pd.DataFrame(columns, index=pd.Index(EPSILONS, name="ε")))
    return tuple(tables)


def rr_change(protocol: Protocol, *, epsilon: float = 8.0, seed: int = 0) -> tuple[int, int]:
    """``(fake interactions added, real ones removed)`` by randomized response at ``epsilon``."""
    flipped = randomized_response_interactions(protocol.rank_train, n_users=protocol.n_users,
                                               n_items=protocol.n_items, epsilon=epsilon, seed=seed)
    truth = set(zip(protocol.rank_train["user"], protocol.rank_train["item"], strict=True))
    reported = set(zip(flipped["user"], flipped["item"], strict=True))
    return len(reported - truth), len(truth - reported)


# -- seeds ----------------------------------------------------------------------------------------

def t_interval(values: object, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t confidence interval of the mean: ``(mean, low, high)``."""
    x = real_array("values", values).astype(np.float64).ravel()
    int_in("len(values)", len(x), 2)
    half = stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def paired_intervals(frame: pd.DataFrame, baseline: str, *, lower_is_better: bool = True,
                     level: float = 0.95) -> pd.DataFrame:
    """Per column but ``baseline``: the mean over rows (paired by seed) of column − baseline, its
    t interval, and ``better``/``worse`` when the interval excludes 0, else ``tie``."""
    rows = {}
    for column in frame.columns.drop(baseline):
        mean, low, high = t_interval(frame[column] - frame[baseline], level)
        good, bad = (high < 0, low > 0) if lower_is_better else (low > 0, high < 0)
        rows[column] = {"mean diff": mean, "low": low, "high": high,
                        "verdict": "better" if good else "worse" if bad else "tie"}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(f"minus {baseline}")


def paired_comparison(protocol: Protocol, settings: Mapping[str, dict], *, epsilon: float = 8.0,
                      seeds: Sequence[int] = range(5)) -> pd.DataFrame:
    """Test RMSE per seed (rows) on fresh 80/20 splits of the non-private bias-only model and of
    each private method of ``settings`` (method -> settings) at ``epsilon`` (columns). Split,
    initialisation, sampling and noise all change with the seed."""
    rows = {}
    for s in seeds:
        train_set, test = protocol.split(s)
        bias = fit_bias_baseline(train_set, n_users=protocol.n_users, n_items=protocol.n_items)
        rows[s] = {"bias-only": evaluate_ratings(bias, test)["rmse"]} | {
            method: run(protocol, method, train_set, test, target_epsilon=epsilon, seed=s,
                        **kw)["rmse"] for method, kw in settings.items()}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("seed")


def by_seed(protocol: Protocol, method: str, settings: dict, *, seeds: Sequence[int] = (0, 1, 2),
            epsilons: Sequence[float] = EPSILONS) -> pd.DataFrame:
    """Mean and standard deviation over ``seeds`` of a ranking method's NDCG@10 and of its item
    biases' NDCG@10, and the mean spread (std of p·v over std of b_i), per ε (seed 0: the curve)."""
    rows = {}
    for eps in epsilons:
        runs = pd.DataFrame([run(protocol, method, protocol.rank_train, protocol.rank_test,
                                 target_epsilon=eps, seed=s, **settings) for s in seeds])
        rows[eps] = {"whole": runs["ndcg"].mean(), "sd": runs["ndcg"].std(ddof=1),
                     "item biases": runs["item bias ndcg"].mean(),
                     "biases sd": runs["item bias ndcg"].std(ddof=1),
                     "spread": runs["spread"].mean()}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("ε")


def sigma_clip_grid(protocol: Protocol, settings: dict, *, clips: Sequence[float],
                    sigmas: Sequence[float]) -> pd.DataFrame:
    """Naive DP-SGD at fixed noise multipliers: test RMSE for every clip norm x σ, and the
    rating-level ε each σ costs (the same for every clip norm: ε depends on σ, q and steps)."""
    rows = []
    for clip, sigma in itertools.product(clips, sigmas):
        result = run(protocol, "DP-SGD", protocol.train, protocol.test,
                     **settings | {"clip_norm": clip, "noise_multiplier": sigma})
        rows.append({"C": clip, "σ": sigma, "ε": result["epsilon"], "rmse": result["rmse"]})
    return pd.DataFrame(rows)


def bias_share_exercise(protocol: Protocol, improved: Callable[[float], dict], *,
                        shares: Sequence[float] = (0.2, 0.5, 0.8), epsilon: float = 8.0) -> str:
    """Exercise: the improved method at ``epsilon`` with each bias share, on the twin (a
    legitimate basis for the choice) and on ML-100K's test set (for comparison only)."""
    rows = {}
    for share in shares:
        settings = noise_aware_rule(protocol, improved(epsilon) | {"bias_share": share})
        twin, real = (curve(protocol, "private biases + DP-SGD", settings, epsilons=[epsilon],
                            twin=t)[0] for t in (True, False))
        rows[share] = {"twin RMSE": twin["rmse"], "ML-100K test RMSE": real["rmse"],
                       "ledger ε": real["epsilon"]}
    frame = pd.DataFrame.from_dict(rows, orient="index").rename_axis("bias_share")
    return (f"{table_text(frame)}\nthe twin picks bias_share {frame['twin RMSE'].idxmin()}; the "
            f"private test set would pick {frame['ML-100K test RMSE'].idxmin()}")


# -- reports ------------------------------------------------------------------------------------

def reference_report(ref: Mapping[str, float]) -> str:
    """The non-private references of :func:`reference_points`, two lines."""
    return (f"non-private bias-only: test RMSE {ref['bias-only']:.4f}; popularity: NDCG@10 "
            f"{ref['popularity']:.4f}\nnon-private MF: test RMSE {ref['MF']:.4f}; implicit MF: "
            f"NDCG@10 {ref['implicit MF']:.4f} ({ref['implicit steps']} Adam steps)")


def seed_report(seeds: pd.DataFrame, curve_ndcg: pd.Series, popularity: float) -> str:
    """:func:`by_seed`'s table and the statements the chapter makes about it, checked."""
    finite = [e for e in seeds.index if math.isfinite(e)]
    checks = {"mean NDCG@10 over seeds never decreases as ε grows":
              seeds["whole"].is_monotonic_increasing,
              "the single-seed curve decreases somewhere": not curve_ndcg.is_monotonic_increasing,
              "item biases alone beat the whole model at every finite ε here": bool(
                  (seeds.loc[finite, "item biases"] > seeds.loc[finite, "whole"]).all())}
    return (f"{table_text(seeds)}\npopularity: {popularity:.4f}; mean and sd over seeds 0, 1, 2\n"
            + "\n".join(f"{claim}: {value}" for claim, value in checks.items())
            + f"\nlargest seed-to-seed sd of one run: {seeds['sd'].max():.4f}")


def paired_report(paired: pd.DataFrame, baselines: Sequence[str] = ("private bias-only",
                                                                     "bias-only")) -> tuple[str, dict]:
    """The paired table and :func:`paired_intervals` against each baseline; also the verdicts
    (``baseline -> method -> verdict``)."""
    parts, verdicts = [table_text(paired)], {}
    for baseline in baselines:
        diffs = paired_intervals(paired, baseline)
        verdicts[baseline] = diffs["verdict"].to_dict()
        parts.append(table_text(diffs))
    return "\n".join(parts), verdicts


def curve_claims(rmse: pd.DataFrame, ndcg: pd.DataFrame, ref: Mapping[str, float],
                 runs: Mapping[str, tuple]) -> str:
    """The statements the chapter makes about the curves (split 0, seed 0), each checked."""
    fin = [e for e in rmse.index if math.isfinite(e)]
    first = next((e for e in fin if rmse.loc[e, "input perturbation"] < ref["bias-only"]), "none")
    private = [(eps, r) for pair in runs.values() for part in pair
               for eps, r in zip(EPSILONS, part, strict=True)]
    checks = {
        "naive DP-SGD above the bias-only RMSE at every finite ε":
            bool((rmse.loc[fin, "DP-SGD"] > ref["bias-only"]).all()),
        "naive DP-SGD at ε = ∞ (clipping, no noise) above non-private MF":
            bool(rmse.loc[math.inf, "DP-SGD"] > ref["MF"]),
        "naive DP-SGD's NDCG@10 below popularity's at every finite ε":
            bool((ndcg.loc[fin, "DP-SGD"] < ref["popularity"]).all()),
        "smallest ε at which Laplace input perturbation beats bias-only": first,
        "private biases + DP-SGD below naive DP-SGD's RMSE at every ε":
            bool((rmse["private biases + DP-SGD"] < rmse["DP-SGD"]).all()),
        "private bias-only below private biases + DP-SGD at every finite ε": bool(
            (rmse.loc[fin, "private bias-only"] < rmse.loc[fin, "private biases + DP-SGD"]).all()),
        "every private run's ledger ε within 0.02 below its target": all(
            eps - 0.02 <= r["epsilon"] <= eps for eps, r in private if math.isfinite(eps)),
        "every ε = ∞ run's ledger says ε = ∞": all(
            math.isinf(r["epsilon"]) for eps, r in private if math.isinf(eps))}
    return "\n".join(f"{claim}: {value}" for claim, value in checks.items())

"""Chapter 2's experiments on the basic mechanisms: δ, Laplace counts and averages, Gaussian noise,
contribution bounds (and a private choice of the bound), local DP, and the Explore section's inputs.

Each function returns a small table or dict that the chapter prints; the randomness is seeded, so the
chapter's numbers are reproducible. The mechanisms themselves are :mod:`privrec.dp`'s.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ...core.checks import int_in, positive
from ...core.checks import seed as check_seed
from ...dp.ledger import PrivacyEvent, PrivacyLedger, default_delta
from ...dp.local_dp import k_randomized_response, k_rr_frequencies, randomized_response, rr_debias_mean
from ...dp.mechanisms import analytic_gaussian_sigma, clamp, laplace_mechanism
from ...dp.selection import private_quantile
from ...recsys.metrics import top_k

__all__ = ["item_counts", "bounded_item_counts", "trivial_release_report", "delta_table",
           "laplace_count_examples", "private_average", "private_average_examples",
           "private_average_errors", "error_bands", "optimal_sum_share", "star_histogram_release",
           "average_split_rmse", "gaussian_sigma_table", "capping_table", "private_cap_release",
           "capping_report", "rr_popularity_table", "krr_genre_table", "explore_inputs",
           "compact_summary", "print_table"]


def item_counts(ratings: pd.DataFrame, *, n_items: int) -> np.ndarray:
    """Number of ratings (= users, a user rates a movie at most once) of each movie, as floats."""
    return np.bincount(ratings["item"].to_numpy(), minlength=n_items).astype(np.float64)


def _rank_in_user(users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each rating, its position in a uniformly random order of its user's ratings."""
    order = rng.permutation(len(users))
    by_user = order[np.argsort(users[order], kind="stable")]
    starts = np.r_[0, np.flatnonzero(np.diff(users[by_user])) + 1]
    ranks = np.empty(len(users), dtype=np.int64)
    ranks[by_user] = np.arange(len(users)) - np.repeat(starts, np.diff(np.r_[starts, len(users)]))
    return ranks


def bounded_item_counts(ratings: pd.DataFrame, *, n_items: int, taus: tuple[int, ...],
                        rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Contribution bounding: item counts after each user keeps at most ``tau`` random ratings.

    One random order per user serves every ``tau`` (its first ``tau`` ratings are kept), so larger
    bounds keep supersets. After bounding, one user changes at most ``tau`` counts by 1 each.
    Returns ``{tau: counts}``.
    """
    rank = _rank_in_user(ratings["user"].to_numpy(), rng)
    items = ratings["item"].to_numpy()
    return {int_in("tau", tau, 1): np.bincount(items[rank < tau], minlength=n_items).astype(float)
            for tau in taus}


def trivial_release_report(n_users: int, *, draws: int = 200_000, seed: int = 0) -> str:
    """Simulate "publish one random user's whole history" ``draws`` times: user 0 is published
    with probability 1/n on D and never on D without user 0, a (0, 1/n)-DP total leak."""
    n_users = int_in("n_users", n_users, 1)
    published = np.random.default_rng(check_seed("seed", seed)).integers(0, n_users, draws)
    return (f"Pr[user 0's history is published] = 1/n = {1 / n_users:.5f} on D "
            f"(simulated {np.mean(published == 0):.5f}),\n"
            f"0 on D without user 0: a total leak that is (0, {1 / n_users:.5f})-DP")


def delta_table(*, n_users: int, n_ratings: int, n_train: int) -> pd.DataFrame:
    """The book's δ for each unit it protects: ``default_delta(n)`` and δ·n (at most 0.01)."""
    units = [("user", "MovieLens-100K users", n_users), ("rating", "all ratings", n_ratings),
             ("rating", "80% training split (ch. 1, 3)", n_train)]
    return pd.DataFrame([{"unit": unit, "records": what, "n": n, "δ": default_delta(n),
                          "δ·n": default_delta(n) * n} for unit, what, n in units])


def laplace_count_examples(counts: np.ndarray, titles: pd.Series, items: tuple[int, ...], *,
                           epsilons: tuple[float, ...] = (0.1, 1.0, 10.0)) -> pd.DataFrame:
    """One seeded rating-level Laplace release (sensitivity 1) of each movie's count per ε."""
    rows = []
    for item in items:
        for eps in epsilons:
            noisy = laplace_mechanism(float(counts[item]), sensitivity=1.0, epsilon=eps, seed=item)
            rows.append({"movie": titles[item], "count": int(counts[item]), "ε": eps,
                         "released": round(noisy, 1),
                         "rel. error": abs(noisy - counts[item]) / counts[item]})
    return pd.DataFrame(rows)


def private_average(values: object, *, epsilon: float,
                    generator: np.random.Generator, lower: float = 1.0,
                    upper: float = 5.0) -> float:
    """An ε-DP average rating (add/remove one rating): ε/2 for a clamped,
    centred sum, ε/2 for the count, then their ratio (post-processing),
    clipped to ``[lower, upper]``."""
    centre, half_width = (lower + upper) / 2, (upper - lower) / 2
    clamped = clamp(np.asarray(values, dtype=float) - centre,
                    lower=-half_width, upper=half_width)
    noisy_sum = laplace_mechanism(float(np.sum(clamped)),
                                  sensitivity=half_width, epsilon=epsilon / 2,
                                  generator=generator)
    noisy_count = laplace_mechanism(float(len(clamped)), sensitivity=1.0,
                                    epsilon=epsilon / 2, generator=generator)
    average = centre + noisy_sum / max(noisy_count, 1.0)
    return float(np.clip(average, lower, upper))


def private_average_examples(ratings: pd.DataFrame, titles: pd.Series, items: tuple[int, ...], *,
                             epsilon: float = 1.0, releases: int = 200, seed: int = 1) -> pd.DataFrame:
    """Mean and spread of ``releases`` draws of :func:`private_average` for each movie."""
    rng = np.random.default_rng(check_seed("seed", seed))
    rows = []
    for item in items:
        vals = ratings.loc[ratings["item"] == item, "rating"].to_numpy()
        draws = [private_average(vals, epsilon=epsilon, generator=rng) for _ in range(releases)]
        rows.append({"movie": titles[item], "n": len(vals), "true mean": vals.mean(),
                     "private mean": np.mean(draws), "private sd": np.std(draws)})
    return pd.DataFrame(rows)


def private_average_errors(ratings: pd.DataFrame, *, n_items: int, epsilon: float = 1.0,
                           releases: int = 100, seed: int = 2) -> pd.DataFrame:
    """Per movie: ratings n, RMSE of :func:`private_average`'s mechanism over ``releases`` draws
    (vectorised: Laplace(2/(ε/2)) on the centred sum, Laplace(1/(ε/2)) on the count), and the
    sampling error σ/√n of the true mean. Movies with fewer than 2 ratings are dropped."""
    rng = np.random.default_rng(check_seed("seed", seed))
    counts = item_counts(ratings, n_items=n_items)
    sums = (ratings.assign(c=ratings["rating"] - 3.0).groupby("item")["c"].sum()
            .reindex(range(n_items), fill_value=0.0).to_numpy())
    true_mean = 3.0 + sums / np.maximum(counts, 1)
    noisy_sum = sums[:, None] + rng.laplace(0.0, 2.0 / (epsilon / 2), (n_items, releases))
    noisy_cnt = counts[:, None] + rng.laplace(0.0, 1.0 / (epsilon / 2), (n_items, releases))
    private = np.clip(3.0 + noisy_sum / np.maximum(noisy_cnt, 1.0), 1, 5)
    sd = ratings.groupby("item")["rating"].std().reindex(range(n_items)).to_numpy()
    frame = pd.DataFrame({"n": counts, "private RMSE": np.sqrt(np.mean(
        (private - true_mean[:, None]) ** 2, axis=1)), "sampling error": sd / np.sqrt(counts)})
    return frame[counts >= 2]


def error_bands(errors: pd.DataFrame, *, edges: tuple[int, ...] = (2, 10, 100, 600)) -> pd.DataFrame:
    """Median private RMSE of :func:`private_average_errors` by bands of the number of ratings."""
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        band = errors[(errors["n"] >= lo) & (errors["n"] < hi)]
        rows.append({"ratings n": f"{lo} <= n < {hi}", "movies": len(band),
                     "median RMSE (stars)": band["private RMSE"].median()})
    return pd.DataFrame(rows)


def optimal_sum_share(values: object) -> float:
    """First-order optimal share of ε for the centred sum, 2^(2/3) / (2^(2/3) + |c̄|^(2/3))."""
    c_bar = abs(float(np.mean(np.asarray(values, dtype=float) - 3.0)))
    return 2 ** (2 / 3) / (2 ** (2 / 3) + c_bar ** (2 / 3))


def star_histogram_release(ratings: pd.DataFrame, *, epsilon: float = 0.5, seed: int = 0) -> str:
    """Exercise 1: the 1..5-star histogram under replace-one-rating neighbours (Δ1 = 2), Laplace."""
    hist = np.bincount(ratings["rating"].round().astype(int), minlength=6)[1:]
    noisy = laplace_mechanism(hist.astype(float), sensitivity=2.0, epsilon=epsilon, seed=seed)
    return (f"stars     {list(range(1, 6))}\ntrue      {hist.tolist()}\n"
            f"released  {np.round(noisy).astype(int).tolist()}\n"
            f"largest relative error {np.max(np.abs(noisy - hist) / hist):.2e}")


def average_split_rmse(values: object, *, shares: tuple[float, ...], epsilon: float = 1.0,
                       draws: int = 200_000, seed: int = 0) -> pd.DataFrame:
    """RMSE (stars) of the private average when a share of ε goes to the centred sum (sensitivity
    2) and the rest to the count, simulated with ``draws`` releases per share; the last row is
    the first-order optimal share (:func:`optimal_sum_share`)."""
    vals = np.asarray(values, dtype=float)
    s, n = float(np.sum(vals - 3.0)), float(len(vals))
    rng = np.random.default_rng(check_seed("seed", seed))
    rows = []
    for share in (*shares, optimal_sum_share(vals)):
        e1, e2 = share * epsilon, (1 - share) * epsilon
        est = 3 + (s + rng.laplace(0, 2 / e1, draws)) / np.maximum(n + rng.laplace(0, 1 / e2, draws), 1)
        rows.append({"share of ε for the sum": share,
                     "RMSE (stars)": float(np.sqrt(np.mean((est - vals.mean()) ** 2)))})
    rows[-1]["share of ε for the sum"] = f"{rows[-1]['share of ε for the sum']:.3f} (optimum)"
    return pd.DataFrame(rows)


def gaussian_sigma_table(epsilons: tuple[float, ...], *, delta: float) -> pd.DataFrame:
    """Classic (only for ε < 1) and analytic Gaussian σ for a sensitivity-1 query at ``delta``."""
    from ...dp.mechanisms import classic_gaussian_sigma

    return pd.DataFrame([{"ε": eps, "classic σ": classic_gaussian_sigma(
        sensitivity=1, epsilon=eps, delta=delta) if eps < 1 else math.nan,
        "analytic σ": analytic_gaussian_sigma(sensitivity=1, epsilon=eps, delta=delta)}
        for eps in epsilons])


def capping_table(ratings: pd.DataFrame, *, n_items: int, caps: tuple[int, ...],
                  epsilon: float = 1.0, delta: float, seed: int = 3) -> pd.DataFrame:
    """Exact expected RMSE per movie of user-level count releases at each cap τ (an *oracle*
    analysis: it compares with the true counts, so choosing τ from it uses the private data).

    Bias from one random bounding, plus the noise variance: Laplace 2(τ/ε)², analytic Gaussian σ²
    for :math:`\\ell_2` sensitivity √τ.
    """
    counts = item_counts(ratings, n_items=n_items)
    bounded = bounded_item_counts(ratings, n_items=n_items, taus=caps,
                                  rng=np.random.default_rng(check_seed("seed", seed)))
    rows = []
    for tau in caps:
        bias2 = np.mean((bounded[tau] - counts) ** 2)
        gauss = analytic_gaussian_sigma(sensitivity=math.sqrt(tau), epsilon=epsilon, delta=delta)
        rows.append({"cap τ": tau, "bias RMSE": math.sqrt(bias2),
                     "Laplace RMSE": math.sqrt(bias2 + 2 * (tau / epsilon) ** 2),
                     "Gaussian RMSE": math.sqrt(bias2 + gauss ** 2)})
    return pd.DataFrame(rows)


def capping_report(capping: pd.DataFrame, *, epsilon: float = 1.0) -> str:
    """The oracle's best cap of :func:`capping_table` (first on ties) and how its RMSE compares
    with rating-level Laplace counts (scale 1/ε, RMSE √2/ε) at the same ε."""
    best = capping.loc[capping["Gaussian RMSE"].idxmin()]  # idxmin: the first minimum
    rating_level = math.sqrt(2) / positive("epsilon", epsilon)
    return (f"oracle's best cap for the Gaussian mechanism: τ = {best['cap τ']:.0f}\n"
            f"(RMSE {best['Gaussian RMSE']:.1f} ratings per movie), "
            f"{best['Gaussian RMSE'] / rating_level:.0f} times the RMSE {rating_level:.2f} of\n"
            f"rating-level counts at the same ε (Laplace, b = {1 / epsilon:g})")


def private_cap_release(ratings: pd.DataFrame, *, n_items: int, q: float = 0.5,
                        cap_epsilon: float = 0.1, epsilon: float = 1.0, seed: int = 3) -> dict:
    """The private alternative: choose τ as an ε-DP quantile of the users' rating counts, then
    release the τ-bounded counts with Gaussian noise, the whole procedure at user-level ``epsilon``.

    The quantile (exponential mechanism over the public grid 1..``n_items``) is recorded on a
    user-level ledger as a pure ``cap_epsilon`` event; the Gaussian noise multiplier is calibrated
    by the ledger so that the total is ``epsilon``. Returns ``tau``, the ``ledger``, the noise
    ``sigma`` (= multiplier · √τ) and the expected ``rmse`` per movie (bias + noise, as in
    :func:`capping_table`).
    """
    positive("cap_epsilon", cap_epsilon)
    per_user = ratings.groupby("user").size().to_numpy()
    rng = np.random.default_rng(check_seed("seed", seed))
    tau = int(private_quantile(per_user, q=q, epsilon=cap_epsilon,
                               candidates=np.arange(1, n_items + 1), generator=rng))
    ledger = PrivacyLedger(unit="user", n_units=len(per_user))
    ledger.record_pure("cap τ: DP quantile", epsilon=cap_epsilon, mechanism="exponential")
    z = ledger.calibrate(lambda m: [PrivacyEvent.gaussian("τ-bounded counts", noise_multiplier=m,
                                                          unit="user")], target_epsilon=epsilon)
    ledger.record_gaussian("τ-bounded counts", noise_multiplier=z)
    counts = item_counts(ratings, n_items=n_items)
    bounded = bounded_item_counts(ratings, n_items=n_items, taus=(tau,), rng=rng)[tau]
    sigma = z * math.sqrt(tau)
    return {"tau": tau, "ledger": ledger, "sigma": sigma,
            "rmse": math.sqrt(np.mean((bounded - counts) ** 2) + sigma ** 2)}


def rr_popularity_table(ratings: pd.DataFrame, *, n_users: int, n_items: int,
                        epsilons: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0),
                        seed: int = 4) -> pd.DataFrame:
    """Popularity estimated from randomized response on every (user, movie) bit, per per-bit ε:
    the user-level ε (n_items · ε), the RMSE of the counts and the overlap with the true top 20."""
    interactions = np.zeros((n_users, n_items), dtype=np.int8)
    interactions[ratings["user"].to_numpy(), ratings["item"].to_numpy()] = 1
    counts = interactions.sum(axis=0).astype(float)
    top20 = set(top_k(counts, 20).tolist())  # ties: the smaller movie id
    rows = []
    for eps in epsilons:
        reports = randomized_response(interactions, epsilon=eps, seed=seed)
        est = rr_debias_mean(reports.mean(axis=0), epsilon=eps) * n_users
        rows.append({"per-bit ε": eps, "user-level ε": eps * n_items,
                     "RMSE (ratings)": np.sqrt(np.mean((est - counts) ** 2)),
                     "top-20 overlap": f"{len(top20 & set(top_k(est, 20).tolist()))}/20"})
    return pd.DataFrame(rows)


def krr_genre_table(ratings: pd.DataFrame, genres: pd.Series, *,
                    epsilons: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0), seeds: int = 20) -> pd.DataFrame:
    """k-RR of each user's last-rated movie's first genre (equal timestamps: the larger id is
    last), once per user at user-level ε; the mean L1 error of the estimated genre distribution."""
    last = ratings.sort_values(["user", "timestamp", "item"], kind="stable").groupby("user").tail(1)
    names = sorted({g.split("|")[0] for g in genres})
    genre_of_item = genres.map(lambda g: names.index(g.split("|")[0])).to_numpy()
    truth = genre_of_item[last["item"].to_numpy()]
    k = len(names)
    true_freq = np.bincount(truth, minlength=k) / len(truth)
    rows = []
    for eps in epsilons:
        errs = [np.abs(k_rr_frequencies(k_randomized_response(truth, k=k, epsilon=eps, seed=s),
                                        k=k, epsilon=eps) - true_freq).sum() for s in range(seeds)]
        rows.append({"ε": eps, "genres k": k, "users": len(truth), "mean L1 error": np.mean(errs)})
    return pd.DataFrame(rows)


def explore_inputs(ratings: pd.DataFrame, counts: np.ndarray, items: tuple[int, ...], *,
                   eps_grid: np.ndarray, delta: float, seed: int = 5) -> dict:
    """What the Explore widget reads: fixed standard Laplace and Gaussian draws, the analytic σ of
    each ε, and per movie (sum of r − 3, n, two sets of standard Laplace draws)."""
    rng = np.random.default_rng(check_seed("seed", seed))
    out = {"laplace": rng.laplace(size=20_000), "gauss": rng.standard_normal(20_000),
           "sigma": {float(e): analytic_gaussian_sigma(sensitivity=1.0, epsilon=float(e),
                                                       delta=delta) for e in eps_grid}}
    for item in items:
        vals = ratings.loc[ratings["item"] == item, "rating"].to_numpy()
        out[item] = (float(np.sum(vals - 3.0)), float(counts[item]), rng.laplace(size=2000),
                     rng.laplace(size=2000))
    return out


def compact_summary(ledger: PrivacyLedger) -> str:
    """:meth:`~privrec.dp.ledger.PrivacyLedger.summary` in at most 80 characters a line: the
    statement (ε, δ, unit, n) and one row per event with short column names."""
    table = ledger.table().rename(columns={"noise multiplier": "noise", "epsilon alone": "ε alone",
                                           "share of epsilon": "share"})
    head = (f"{ledger.unit}-level ε = {ledger.epsilon():.3f} at δ = {ledger.delta:g}"
            + (f" over {ledger.n_units:,} {ledger.unit}s" if ledger.n_units else ""))
    return head + "\n" + table.to_string(index=False, float_format=lambda x: f"{x:.4g}",
                                         na_rep="-")


def print_table(frame: pd.DataFrame, fmt: str = ".3f", *, index: bool = False) -> None:
    """Print ``frame`` compactly: floats with ``fmt``, NaN as "-", the index only if asked."""
    print(frame.to_string(index=index, float_format=lambda x: format(x, fmt), na_rep="-"))

"""Chapter 2's demonstrations of what goes wrong: the article's definition and Laplace scale, what
DP promises about beliefs, and floating-point Laplace noise that identifies its input.

Every function simulates with a seeded generator and returns a small table or dict to print.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ...core.checks import positive
from ...core.checks import seed as check_seed
from ...dp.discrete import discrete_laplace_mechanism
from ...dp.empirical import privacy_loss_lower_bound
from ...dp.local_dp import randomized_response, randomized_response_keep_probability
from ...dp.mechanisms import laplace_mechanism

__all__ = ["article_definition_demo", "LAPLACE_READINGS", "laplace_reading_audit",
           "range_vs_sensitivity", "posterior_table", "rr_attacker_table", "textbook_laplace",
           "can_produce", "float_leak_rates", "float_leak_report", "discrete_laplace_report",
           "halved_scale_audit"]


def article_definition_demo(star_sum: float, *, epsilon: float = 0.1, runs: int = 100_000,
                            seed: int = 6) -> pd.DataFrame:
    """Three mechanisms on neighbours that differ in one rating of a movie (5 stars vs 1 star).

    "leaky": publish the target's rating with probability ε (shared coins on both data sets), or
    ε/2 (independent runs); Laplace: the ε-DP sum of the ratings (sensitivity 4), shared coins.
    Columns: Pr[outputs differ] (the article's test: ≤ ε passes) and Pr[output = 5] on each side.
    """
    epsilon = positive("epsilon", epsilon)
    rng = np.random.default_rng(check_seed("seed", seed))
    publish = rng.random(runs) < epsilon
    shared = (np.where(publish, 5, 0), np.where(publish, 1, 0))
    independent = (np.where(rng.random(runs) < epsilon / 2, 5, 0),
                   np.where(rng.random(runs) < epsilon / 2, 1, 0))
    laplace = (laplace_mechanism(np.full(runs, star_sum), sensitivity=4.0, epsilon=epsilon, seed=11),
               laplace_mechanism(np.full(runs, star_sum - 4), sensitivity=4.0, epsilon=epsilon,
                                 seed=11))
    rows = []
    for name, (d1, d2) in (("leaky, shared coins", shared), ("leaky at ε/2, indep.", independent),
                           ("Laplace, shared coins", laplace)):
        differ = float(np.mean(d1 != d2))
        rows.append({"mechanism": name, "Pr[differ]": differ,
                     "article's test": "passes" if differ <= epsilon else "fails",
                     "Pr[5 | D1]": float(np.mean(d1 == 5)), "Pr[5 | D2]": float(np.mean(d2 == 5))})
    return pd.DataFrame(rows)


LAPLACE_READINGS = {"correct, b = Δ1/ε": lambda eps, d1, ds: d1 / eps,
                    "article as scale": lambda eps, d1, ds: 1.0 / (eps * ds),
                    "article as rate": lambda eps, d1, ds: eps * ds}
"""The correct Laplace scale and the two readings of the article's 1/(ε·Δs)."""


def laplace_reading_audit(star_sum: float, *, sensitivity: float = 4.0, attribute_range: float = 4.0,
                          epsilons: tuple[float, ...] = (0.5, 2.0), runs: int = 400_000,
                          seed: int = 7) -> pd.DataFrame:
    """Audit each reading of the Laplace scale with :func:`privacy_loss_lower_bound`.

    The mechanism runs ``runs`` times on the sum ``star_sum`` and on ``star_sum + sensitivity``;
    the audited lower bound on the privacy loss is compared with the claimed ε.
    """
    rng = np.random.default_rng(check_seed("seed", seed))
    rows = []
    for eps in epsilons:
        for name, scale_of in LAPLACE_READINGS.items():
            b = scale_of(eps, sensitivity, attribute_range)
            out_d1 = star_sum + rng.laplace(0.0, b, runs)
            out_d2 = star_sum + sensitivity + rng.laplace(0.0, b, runs)
            bins = np.linspace(star_sum - 4 * b, star_sum + sensitivity + 4 * b, 81)
            bound = privacy_loss_lower_bound(out_d1, out_d2, bins=bins)
            rows.append({"claimed ε": eps, "scale": name, "b": b, "true loss": sensitivity / b,
                         "audited ≥": bound, "verdict": "ok" if bound <= eps else "VIOLATES"})
    return pd.DataFrame(rows)


def range_vs_sensitivity(ages: pd.Series, *, epsilon: float = 0.5) -> str:
    """The count of users over 50 (Δ1 = 1) with the article's "range of the attribute" as Δs."""
    span, eps = int(ages.max() - ages.min()), positive("epsilon", epsilon)
    return (f"ages in ML-100K: {ages.min()} to {ages.max()}, so Δs = {span}\n"
            f"count of users over 50: Δ1 = 1, correct scale 1/ε = {1 / eps:g} at ε = {eps:g}\n"
            f"as a scale: b = 1/(ε·{span}) = {1 / (eps * span):.4f}, true loss {span * eps:g} = "
            f"{span} times the claimed ε\n"
            f"as a rate:  b = ε·{span} = {eps * span:g}, {eps * eps * span:.1f} times the noise "
            f"ε = {eps:g} needs\n            (right only at ε = 1/√{span} = "
            f"{1 / math.sqrt(span):.3f})")


def posterior_table(epsilons: tuple[float, ...], priors: tuple[float, ...] = (0.5, 0.05)) -> pd.DataFrame:
    """The largest posterior an ε-DP output allows from each prior: odds times at most e^ε."""
    def post(p: float, eps: float) -> float:
        return p * math.exp(eps) / (p * math.exp(eps) + 1 - p)

    return pd.DataFrame([{"ε": eps, **{f"from prior {p:g}": post(p, eps) for p in priors}}
                         for eps in epsilons])


def rr_attacker_table(epsilons: tuple[float, ...], *, n: int = 100_000, seed: int = 8) -> pd.DataFrame:
    """An attacker who believes randomized response's report of a bit that is 1: how often right,
    simulated on ``n`` bits, and in theory (the keep probability e^ε/(1+e^ε))."""
    bit = np.ones(n, dtype=np.int8)
    return pd.DataFrame([{"ε": eps, "attacker right": float(np.mean(
        randomized_response(bit, epsilon=eps, seed=seed) == bit)),
        "theory": randomized_response_keep_probability(epsilon=eps)} for eps in epsilons])


def textbook_laplace(f: float, b: float, n: int,
                     rng: np.random.Generator) -> np.ndarray:
    """The textbook floating-point sampler: f + sign · b · (−ln U),
    with U uniform on the grid of multiples of 2⁻⁵³ in (0, 1)."""
    u = rng.integers(1, 2**53, size=n) * 2.0**-53  # as random() gives
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    return f + sign * (b * -np.log(u))


def can_produce(y: np.ndarray, f: float, b: float, search: int = 40) -> np.ndarray:
    """Whether input ``f`` could have produced each output ``y`` of :func:`textbook_laplace`: try
    every grid point near the one that inverts the sampler."""
    n = y - f
    sign = np.where(n < 0, -1.0, 1.0)
    k0 = np.rint(np.exp(-np.abs(n) / b) * 2.0**53).astype(np.int64)
    hit = np.zeros(y.shape, dtype=bool)
    for d in range(-search, search + 1):
        k = np.clip(k0 + d, 1, 2**53 - 1)
        hit |= (f + sign * (b * -np.log(k * 2.0**-53))) == y
    return hit


def float_leak_rates(*, n: int = 50_000, seed: int = 9) -> dict[str, float]:
    """Outputs ``y0`` of the textbook sampler from f(D) = 0 and ``y1`` from f(D') = 1 (b = 1): the
    share each input reproduces (a sanity check, 1.0) and the share the *other* input can never
    produce (keys ``"y0 from 0"``, ``"y1 from 1"``, ``"y0 never from 1"``, ``"y1 never from 0"``)."""
    rng = np.random.default_rng(check_seed("seed", seed))
    y0, y1 = textbook_laplace(0.0, 1.0, n, rng), textbook_laplace(1.0, 1.0, n, rng)
    return {"y0 from 0": float(can_produce(y0, 0.0, 1.0).mean()),
            "y1 from 1": float(can_produce(y1, 1.0, 1.0).mean()),
            "y0 never from 1": float(1 - can_produce(y0, 1.0, 1.0).mean()),
            "y1 never from 0": float(1 - can_produce(y1, 0.0, 1.0).mean())}


def float_leak_report(*, n: int = 50_000, seed: int = 9) -> str:
    """:func:`float_leak_rates` as three printable lines."""
    leak = float_leak_rates(n=n, seed=seed)
    return (f"sanity: outputs reproducible from their own input: {leak['y0 from 0']:.3f}, "
            f"{leak['y1 from 1']:.3f}\n"
            f"outputs of f(D)=0 that f(D')=1 can never produce: {leak['y0 never from 1']:.1%}\n"
            f"outputs of f(D')=1 that f(D)=0 can never produce: {leak['y1 never from 0']:.1%}")


def discrete_laplace_report(values: np.ndarray, *, epsilon: float = 1.0, seed: int = 10,
                            audit_draws: int = 20_000) -> str:
    """Discrete-Laplace release of integer ``values`` and an audit of the mechanism on 0 vs 1."""
    values = np.asarray(values, dtype=np.int64)
    released = discrete_laplace_mechanism(values, sensitivity=1, epsilon=epsilon, seed=seed)
    a = discrete_laplace_mechanism(np.zeros(audit_draws, dtype=np.int64), sensitivity=1,
                                   epsilon=epsilon, seed=seed + 1)
    b = discrete_laplace_mechanism(np.ones(audit_draws, dtype=np.int64), sensitivity=1,
                                   epsilon=epsilon, seed=seed + 2)
    bound = privacy_loss_lower_bound(a, b, bins=np.arange(-10, 12) - 0.5)
    return (f"discrete-Laplace counts (ε = {epsilon:g}): {released.tolist()} "
            f"(true {values.tolist()})\nevery integer is a possible output from both inputs;\n"
            f"audited privacy loss >= {bound:.2f} (ε = {epsilon:g})")


def halved_scale_audit(*, epsilon: float = 0.5, draws: int = 400_000, seed: int = 0) -> float:
    """Exercise 3: audit Laplace noise of scale Δ1/(2ε) (Δ1 = 1) on the neighbours 0 and 1; the
    true privacy loss is 2ε, so the lower bound should exceed ε and stay below 2ε."""
    rng = np.random.default_rng(check_seed("seed", seed))
    b = 1.0 / (2 * positive("epsilon", epsilon))
    a, c = rng.laplace(0, b, draws), 1 + rng.laplace(0, b, draws)
    return privacy_loss_lower_bound(a, c, bins=np.linspace(-10, 11, 85))

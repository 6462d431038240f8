"""Chapter 2's accounting comparisons: sequential, advanced, RDP and PLD composition, and the grid of
RDP orders. The cross-checks against dp-accounting and Opacus import those packages lazily (they are
test-only dependencies of the library)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ...core.checks import check_delta, check_sample_rate, check_steps, positive
from ...dp.accounting import (
    DEFAULT_ORDERS,
    OPACUS_ORDERS,
    advanced_composition,
    compute_rdp,
    get_epsilon,
    get_noise_multiplier,
    rdp_to_epsilon,
)
from ...dp.mechanisms import gaussian_delta

__all__ = ["advanced_crossover", "crossover_report", "advanced_by_delta", "composed_epsilon",
           "composition_curves", "looser_steps", "rdp_epsilon_table", "opacus_cross_check",
           "pld_table", "order_table"]


def advanced_crossover(*, epsilon: float, delta_prime: float, max_steps: int = 2000) -> dict:
    """The first k (of a log grid up to ``max_steps``) at which advanced composition of k
    ε-DP queries beats sequential composition, and both bounds at ``max_steps``."""
    k_axis = np.unique(np.geomspace(1, max_steps, 40).astype(int))
    adv = np.array([advanced_composition(epsilon=epsilon, steps=int(k), delta_prime=delta_prime)[0]
                    for k in k_axis])
    return {"k": k_axis, "sequential": epsilon * k_axis, "advanced": adv,
            "crossover": int(k_axis[np.flatnonzero(adv < epsilon * k_axis)[0]])}


def crossover_report(*, epsilon: float, delta_prime: float, max_steps: int = 2000) -> str:
    """:func:`advanced_crossover` as two printable lines."""
    cross = advanced_crossover(epsilon=epsilon, delta_prime=delta_prime, max_steps=max_steps)
    return (f"k queries at ε0 = {epsilon:g}: advanced beats sequential composition from "
            f"k = {cross['crossover']} on\n(at k = {max_steps}: {cross['advanced'][-1]:.1f} vs "
            f"{cross['sequential'][-1]:.1f}, δ' = {delta_prime:g})")


def advanced_by_delta(*, epsilon: float, steps: int,
                      delta_primes: tuple[float, ...] = (1e-2, 1e-5, 1e-10, 1e-20, 1e-40)) -> pd.DataFrame:
    """Exercise 5: the advanced-composition ε' of ``steps`` ε-DP queries as δ' shrinks."""
    return pd.DataFrame([{"δ'": dp, "advanced ε'": advanced_composition(
        epsilon=epsilon, steps=steps, delta_prime=dp)[0], "sequential": steps * epsilon}
        for dp in delta_primes])


def composed_epsilon(sigma: float, steps: int, *, sample_rate: float, delta: float) -> float:
    """The pre-RDP state of the art for ``steps`` Poisson-subsampled Gaussian steps: each step's
    analytic-Gaussian ε at δ₀ = δ/(2·steps), amplified by subsampling (ε' = log(1 + q(e^ε − 1))),
    then the better of sequential and advanced composition (δ' = δ/2)."""
    sigma, steps = positive("sigma", sigma), check_steps(steps)
    q, delta = check_sample_rate(sample_rate), check_delta(delta)
    delta0 = delta / (2 * steps)
    lo, hi = 1e-4, 100.0
    for _ in range(60):  # bisection in log ε on the exact Gaussian condition
        mid = math.sqrt(lo * hi)
        ok = gaussian_delta(sigma=sigma, sensitivity=1.0, epsilon=mid) <= delta0
        lo, hi = (lo, mid) if ok else (mid, hi)
    step_eps = math.log1p(q * math.expm1(hi))
    return min(steps * step_eps,
               advanced_composition(epsilon=step_eps, steps=steps, delta_prime=delta / 2)[0])


def composition_curves(sigmas: tuple[float, ...], *, sample_rate: float, delta: float,
                       max_steps: int = 20_000) -> pd.DataFrame:
    """ε after t steps (log grid to ``max_steps``) by the RDP accountant and by
    :func:`composed_epsilon`, for each σ: columns sigma, steps, rdp, composed."""
    steps_axis = np.unique(np.geomspace(1, max_steps, 40).astype(int))
    rows = []
    for sigma in sigmas:
        curve = compute_rdp(sample_rate=sample_rate, noise_multiplier=sigma, steps=1)
        for t in steps_axis:
            rows.append({"sigma": sigma, "steps": int(t),
                         "rdp": rdp_to_epsilon(orders=DEFAULT_ORDERS, rdp=curve * t, delta=delta)[0],
                         "composed": composed_epsilon(sigma, int(t), sample_rate=sample_rate,
                                                      delta=delta)})
    return pd.DataFrame(rows)


def looser_steps(curves: pd.DataFrame) -> str:
    """For each σ of :func:`composition_curves`: the step counts at which RDP is looser."""
    lines = []
    for sigma, rows in curves.groupby("sigma"):
        looser = rows.loc[rows["rdp"] > rows["composed"], "steps"].tolist()
        lines.append(f"σ = {sigma}: RDP is looser than (ε, δ) composition at {looser or 'no'} steps")
    return "\n".join(lines)


def rdp_epsilon_table(sigmas: tuple[float, ...], *, sample_rate: float, steps: int,
                      delta: float) -> pd.DataFrame:
    """The RDP accountant's ε after ``steps`` subsampled Gaussian steps, for each σ."""
    return pd.DataFrame([{"σ": sigma, "steps": steps, "q": sample_rate, "ε": get_epsilon(
        noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta)}
        for sigma in sigmas])


def opacus_cross_check(*, sigma: float, sample_rate: float, steps: int, delta: float) -> str:
    """Opacus's RDP accountant against privrec's with Opacus's orders (α ≤ 63), and the σ that
    privrec needs for ε = 1 after ``steps`` steps."""
    from opacus.accountants import RDPAccountant

    theirs = RDPAccountant()
    theirs.history = [(sigma, sample_rate, steps)]
    ours = get_epsilon(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta,
                       orders=OPACUS_ORDERS)
    needed = get_noise_multiplier(target_epsilon=1.0, delta=delta, sample_rate=sample_rate,
                                  steps=steps)
    return (f"σ = {sigma:g}: Opacus {theirs.get_epsilon(delta=delta):.2f}, privrec with Opacus's "
            f"orders {ours:.2f}\nnoise multiplier for ε = 1 after {steps:,} steps: σ = {needed:.3f}")


def pld_table(*, sigma: float, sample_rate: float, delta: float,
              steps: tuple[int, ...] = (1, 10, 100, 1000)) -> pd.DataFrame:
    """ε of ``steps`` subsampled Gaussian steps by (ε, δ) composition, privrec's RDP accountant
    and dp-accounting's PLD accountant (Koskela et al. 2020; discretisation 1e-3)."""
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    rows = []
    for t in steps:
        pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
        pld.compose(dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(sigma)), t))
        rows.append({"steps": t,
                     "(ε, δ) composition": composed_epsilon(sigma, t, sample_rate=sample_rate,
                                                            delta=delta),
                     "RDP (privrec)": get_epsilon(noise_multiplier=sigma, sample_rate=sample_rate,
                                                  steps=t, delta=delta),
                     "PLD (dp-accounting)": pld.get_epsilon(delta)})
    return pd.DataFrame(rows)


def order_table(sigmas: tuple[float, ...], *, sample_rate: float, steps: int,
                delta: float) -> pd.DataFrame:
    """ε at Opacus's orders (α ≤ 63), privrec's default orders, and every integer α ≤ 1,000."""
    dense = np.unique(np.concatenate([OPACUS_ORDERS, np.arange(64, 1001)])).astype(float)
    rows = []
    for sigma in sigmas:
        eps = {}
        for name, grid in (("opacus", OPACUS_ORDERS), ("default", DEFAULT_ORDERS), ("dense", dense)):
            curve = compute_rdp(sample_rate=sample_rate, noise_multiplier=sigma, steps=steps,
                                orders=grid)
            eps[name] = rdp_to_epsilon(orders=grid, rdp=curve, delta=delta)
        best = eps["dense"][0]
        rows.append({"σ": f"{sigma:g}", "Opacus α≤63": eps["opacus"][0],
                     "default": eps["default"][0], "all α≤1000": best, "best α": int(eps["dense"][1]),
                     "Opacus +": f"{eps['opacus'][0] / best - 1:.1%}",
                     "default +": f"{eps['default'][0] / best - 1:.2%}"})
    return pd.DataFrame(rows)

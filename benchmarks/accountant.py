"""Privacy accountants in calls per second: privrec vs Opacus RDP vs dp-accounting (RDP and PLD).

Run: ``.venv/bin/python benchmarks/accountant.py`` (part of ``make bench``).

One call = the epsilon of a fresh DP-SGD run from scratch: ``steps`` Poisson-subsampled Gaussian
steps with ``noise_multiplier`` and ``sample_rate``, at ``delta``. Each contestant also prints the
epsilon it returns, so a fast wrong answer shows. privrec is timed twice: with its
``DEFAULT_ORDERS`` (Opacus's 151 orders plus integer orders up to 10,000: about 500 orders,
tighter at small epsilon, slower) and with ``OPACUS_ORDERS`` (the same grid as Opacus). The
dp-accounting RDP accountant uses its own default orders; its PLD accountant uses
``value_discretization_interval`` 1e-4 (its default) -- PLD is the tightest and the slowest.
Timing is interleaved (the machine is shared), one thread, median seconds per call.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from _common import interleaved_medians, save_section


def contestants(*, sigma: float, q: float, steps: int, delta: float) -> dict:
    from privrec.dp.accounting import DEFAULT_ORDERS, OPACUS_ORDERS, get_epsilon
    from privrec.dp.ledger import PrivacyLedger

    calls = {
        f"privrec get_epsilon, DEFAULT_ORDERS ({len(DEFAULT_ORDERS)})": lambda: get_epsilon(
            noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta),
        f"privrec get_epsilon, OPACUS_ORDERS ({len(OPACUS_ORDERS)})": lambda: get_epsilon(
            noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, orders=OPACUS_ORDERS),
    }

    def ledger() -> float:
        book = PrivacyLedger(unit="rating", delta=delta)
        book.record_gaussian("dp-sgd", noise_multiplier=sigma, sample_rate=q, count=steps)
        return book.epsilon()
    calls[f"privrec PrivacyLedger, DEFAULT_ORDERS ({len(DEFAULT_ORDERS)})"] = ledger

    try:
        from opacus.accountants import RDPAccountant as OpacusRDP
    except ImportError:  # pragma: no cover - opacus is in requirements.txt
        pass
    else:
        def opacus() -> float:
            acc = OpacusRDP()
            acc.history = [(sigma, q, steps)]
            return acc.get_epsilon(delta=delta)
        calls["Opacus RDPAccountant (151 orders)"] = opacus
    try:
        import dp_accounting
        from dp_accounting.pld import pld_privacy_accountant
        from dp_accounting.rdp import rdp_privacy_accountant
    except ImportError:  # pragma: no cover - dp-accounting is in requirements.txt
        pass
    else:
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
        n_orders = len(rdp_privacy_accountant.RdpAccountant()._orders)

        def dp_rdp() -> float:
            return rdp_privacy_accountant.RdpAccountant().compose(event).get_epsilon(delta)

        def dp_pld() -> float:
            return pld_privacy_accountant.PLDAccountant().compose(event).get_epsilon(delta)
        calls[f"dp-accounting RDP ({n_orders} orders)"] = dp_rdp
        calls["dp-accounting PLD"] = dp_pld
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--sample-rate", type=float, default=1024 / 80_000)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--delta", type=float, default=1e-7)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    calls = contestants(sigma=args.noise_multiplier, q=args.sample_rate, steps=args.steps,
                        delta=args.delta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps = {name: float(call()) for name, call in calls.items()}
        timing = interleaved_medians(calls, warmup=1, rounds=args.rounds)
    ref = timing[next(iter(calls))]["median_s"]
    rows = [{"accountant": name, "calls_per_s": round(1 / t["median_s"], 2),
             "ms_per_call": round(1e3 * t["median_s"], 3),
             "relative_to_privrec_default": round(ref / t["median_s"], 2),
             "epsilon": round(eps[name], 4)} for name, t in timing.items()]
    print(f"epsilon of {args.steps} steps, sigma={args.noise_multiplier}, q={args.sample_rate:.5f}, "
          f"delta={args.delta:g}; median over {args.rounds} interleaved rounds, 1 thread")
    print(f"{'accountant':<48}{'calls/s':>10}{'ms/call':>10}{'epsilon':>10}")
    for r in rows:
        print(f"{r['accountant']:<48}{r['calls_per_s']:>10.1f}{r['ms_per_call']:>10.2f}{r['epsilon']:>10.4f}")
    if not args.no_save:
        save_section("accountant", {
            "config": {"noise_multiplier": args.noise_multiplier, "sample_rate": args.sample_rate,
                       "steps": args.steps, "delta": args.delta, "rounds": args.rounds},
            "rows": rows})


if __name__ == "__main__":
    main()

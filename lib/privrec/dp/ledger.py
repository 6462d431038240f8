"""The privacy ledger: every release a private procedure makes, recorded and composed in one place.

A private trainer does not compute its own :math:`\\varepsilon`. It records each release -- a noisy
gradient step, a noisy statistic, a DP-FedAvg round -- as a :class:`PrivacyEvent` on a
:class:`PrivacyLedger`, and the :math:`(\\varepsilon, \\delta)` it reports is
:meth:`PrivacyLedger.epsilon`. The event vocabulary follows dp-accounting's ``DpEvent`` family
(``GaussianDpEvent``, ``LaplaceDpEvent``, ``PoissonSampledDpEvent``, ``SelfComposedDpEvent``),
folded into one small record: mechanism, noise multiplier, Poisson sampling rate and count.

Composition is Renyi DP (Mironov 2017, Proposition 1: RDP curves add), converted to
:math:`(\\varepsilon,\\delta)` with Balle et al. (2020, Theorem 21) by
:func:`privrec.dp.accounting.rdp_to_epsilon`. :meth:`PrivacyLedger.rdp` is the only place in
``privrec`` where RDP curves are added.

Every ledger names its **privacy unit** -- what one record is: a ``"rating"``, an
``"interaction"``, a ``"user"`` (one person's whole history) or a ``"silo"`` (one organisation's
data) -- and only events about that unit can be recorded on it (guarantees about different units
do not compose into a statement about either). ``n_units``, the number of records, is treated as
public, as Opacus does; with it the ledger enforces the book's rule
:math:`\\delta\\cdot n \\le 0.01` (a mechanism that publishes one random record in full is
:math:`(0, 1/n)`-DP, so :math:`\\delta` must be far below :math:`1/n`).

Examples
--------
>>> ledger = PrivacyLedger(unit="rating", n_units=80_000)
>>> ledger.delta
1e-07
>>> ledger.record_gaussian("DP-SGD step", noise_multiplier=1.0, sample_rate=0.01, count=1000)
>>> round(ledger.epsilon(), 2)
2.76
>>> ledger.record_gaussian("DP-SGD step", noise_multiplier=1.0, sample_rate=0.01, count=1000)
>>> ledger.events[0].count
2000
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from ..core.checks import check_delta, check_orders, check_sample_rate, choice, int_in, non_negative
from .accounting import DEFAULT_ORDERS, compute_rdp, find_noise_multiplier, laplace_rdp, rdp_to_epsilon

__all__ = ["UNITS", "MECHANISMS", "MAX_DELTA_TIMES_N", "PrivacyEvent", "PrivacyLedger",
           "default_delta", "RDPAccountant"]

#: The privacy units a ledger can be about (``"record"``: a generic row, for the Opacus-style API).
UNITS = ("rating", "interaction", "user", "silo", "record")
#: Mechanisms the ledger composes.
MECHANISMS = ("gaussian", "laplace")
#: The book's rule: delta times the number of records stays at or below this.
MAX_DELTA_TIMES_N = 0.01


def default_delta(n_units: int) -> float:
    """The largest power of ten :math:`\\delta` with :math:`\\delta\\cdot n \\le 0.01`.

    >>> default_delta(943), default_delta(80_000), default_delta(100)
    (1e-05, 1e-07, 0.0001)
    """
    n = int_in("n_units", n_units, 1)
    exponent = math.ceil(-math.log10(MAX_DELTA_TIMES_N / n) - 1e-12)
    return float(f"1e-{exponent}")


@dataclass(frozen=True)
class PrivacyEvent:
    """One kind of release, made ``count`` times.

    Attributes
    ----------
    name:
        What was released ("DP-SGD step", "item sums and counts", "DP-FedAvg round", ...).
    mechanism:
        ``"gaussian"`` (noise std = ``noise_multiplier`` times the L2 sensitivity) or ``"laplace"``
        (scale = ``noise_multiplier`` times the L1 sensitivity, i.e. :math:`1/\\varepsilon`).
    noise_multiplier:
        Noise relative to the sensitivity; 0 means no noise (infinite privacy loss).
    sample_rate:
        Poisson sampling probability of each record per release (1: every record, no sampling).
    count:
        How many times the release was made (composed).
    unit:
        The privacy unit (see :data:`UNITS`).
    """

    name: str
    mechanism: str
    noise_multiplier: float
    sample_rate: float = 1.0
    count: int = 1
    unit: str = "record"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"name must be a non-empty str, got {self.name!r}")
        choice("mechanism", self.mechanism, MECHANISMS)
        choice("unit", self.unit, UNITS)
        object.__setattr__(self, "noise_multiplier",
                           non_negative("noise_multiplier", self.noise_multiplier))
        object.__setattr__(self, "sample_rate", check_sample_rate(self.sample_rate))
        object.__setattr__(self, "count", int_in("count", self.count, 1))
        if self.mechanism == "laplace" and self.sample_rate != 1.0:
            raise ValueError("sample_rate must be 1 for a laplace event (no subsampled Laplace "
                             "analysis in privrec)")

    def rdp(self, orders: np.ndarray) -> np.ndarray:
        """This event's RDP curve at ``orders`` (all ``count`` releases)."""
        if self.mechanism == "gaussian":
            return compute_rdp(sample_rate=self.sample_rate, noise_multiplier=self.noise_multiplier,
                               steps=self.count, orders=orders)
        return self.count * laplace_rdp(noise_multiplier=self.noise_multiplier, orders=orders)

    def same_release(self, other: PrivacyEvent) -> bool:
        """True when ``other`` differs from this event only in ``count``."""
        return replace(other, count=self.count) == self


class PrivacyLedger:
    """Records the releases of one private procedure and reports what they cost together.

    Parameters
    ----------
    unit:
        The privacy unit every recorded event must share (see :data:`UNITS`).
    n_units:
        Number of records (public). With it, ``delta`` defaults to :func:`default_delta` and a
        ``delta`` with :math:`\\delta\\cdot n > 0.01` is refused.
    delta:
        The :math:`\\delta` of the reported :math:`(\\varepsilon,\\delta)`.
    orders:
        RDP orders (default :data:`privrec.dp.accounting.DEFAULT_ORDERS`).

    Raises
    ------
    ValueError
        For an unknown unit, ``delta`` outside (0, 1) or above the book's rule, or no ``delta``
        and no ``n_units``.
    """

    def __init__(self, *, unit: str, n_units: int | None = None, delta: float | None = None,
                 orders: Iterable[float] | None = None) -> None:
        self.unit = choice("unit", unit, UNITS)
        self.n_units = None if n_units is None else int_in("n_units", n_units, 1)
        if delta is None:
            if self.n_units is None:
                raise ValueError("give delta or n_units (delta then defaults to default_delta)")
            delta = default_delta(self.n_units)
        self.delta = check_delta(delta)
        if self.n_units is not None and self.delta * self.n_units > MAX_DELTA_TIMES_N * (1 + 1e-9):
            raise ValueError(f"delta must be <= {MAX_DELTA_TIMES_N} / n_units = "
                             f"{MAX_DELTA_TIMES_N / self.n_units:.3g} for {self.n_units} "
                             f"{self.unit}s, got {self.delta:g}")
        self.orders = check_orders(DEFAULT_ORDERS if orders is None else orders)
        self.events: list[PrivacyEvent] = []

    # -- recording ---------------------------------------------------------------------------

    def record(self, event: PrivacyEvent) -> None:
        """Add ``event``; consecutive releases of the same kind are merged into one row."""
        if not isinstance(event, PrivacyEvent):
            raise TypeError(f"event must be a PrivacyEvent, got {type(event).__name__}")
        if event.unit != self.unit:
            raise ValueError(f"event unit must be {self.unit!r} (this ledger's unit), got "
                             f"{event.unit!r}: guarantees about different units do not compose")
        if self.events and self.events[-1].same_release(event):
            last = self.events[-1]
            self.events[-1] = replace(last, count=last.count + event.count)
        else:
            self.events.append(event)

    def record_gaussian(self, name: str, *, noise_multiplier: float, sample_rate: float = 1.0,
                        count: int = 1) -> None:
        """Record ``count`` (Poisson-subsampled) Gaussian releases."""
        self.record(PrivacyEvent(name, "gaussian", noise_multiplier, sample_rate, count, self.unit))

    def record_laplace(self, name: str, *, epsilon: float, count: int = 1) -> None:
        """Record ``count`` Laplace releases, each pure ``epsilon``-DP (scale = sensitivity/epsilon)."""
        eps = non_negative("epsilon", epsilon)
        multiplier = math.inf if eps == 0 else 1.0 / eps
        if eps == 0:
            raise ValueError("epsilon must be > 0 for a laplace event")
        self.record(PrivacyEvent(name, "laplace", multiplier, 1.0, count, self.unit))

    def copy(self) -> PrivacyLedger:
        """An independent ledger with the same settings and events."""
        twin = PrivacyLedger(unit=self.unit, n_units=self.n_units, delta=self.delta,
                             orders=self.orders)
        twin.events = list(self.events)
        return twin

    # -- composing ---------------------------------------------------------------------------

    def rdp(self) -> np.ndarray:
        """The composed RDP curve (one value per order): the sum of the events' curves."""
        total = np.zeros_like(self.orders)
        for event in self.events:
            total = total + event.rdp(self.orders)
        return total

    def privacy_spent(self, delta: float | None = None) -> tuple[float, float]:
        """``(epsilon, best_order)`` at ``delta`` (default: the ledger's); ``(0, nan)`` if empty."""
        delta = self.delta if delta is None else check_delta(delta)
        if not self.events:
            return 0.0, math.nan
        return rdp_to_epsilon(orders=self.orders, rdp=self.rdp(), delta=delta)

    def epsilon(self, delta: float | None = None) -> float:
        """The :math:`\\varepsilon` of everything recorded, at ``delta`` (default the ledger's)."""
        return self.privacy_spent(delta)[0]

    def calibrate(self, events_for: Callable[[float], list[PrivacyEvent]], *,
                  target_epsilon: float) -> float:
        """The smallest noise multiplier ``z`` for which this ledger plus ``events_for(z)`` spends
        at most ``target_epsilon`` (the one noise search of the library). Records nothing."""

        def epsilon_at(z: float) -> float:
            trial = self.copy()
            for event in events_for(z):
                trial.record(event)
            return trial.epsilon()

        return find_noise_multiplier(epsilon_at, target_epsilon=target_epsilon)

    # -- showing -----------------------------------------------------------------------------

    def table(self) -> pd.DataFrame:
        """One row per event: mechanism, q, noise multiplier, count, the event's epsilon alone
        (at the ledger's delta) and its share of the composed RDP at the optimal order."""
        eps, order = self.privacy_spent()
        rows = []
        total = self.rdp()
        pick = int(np.flatnonzero(self.orders == order)[0]) if self.events and math.isfinite(
            eps) else None
        for event in self.events:
            curve = event.rdp(self.orders)
            alone = rdp_to_epsilon(orders=self.orders, rdp=curve, delta=self.delta)[0]
            share = (curve[pick] / total[pick]) if pick is not None and total[pick] > 0 else math.nan
            rows.append({"event": event.name, "mechanism": event.mechanism,
                         "q": event.sample_rate, "noise multiplier": event.noise_multiplier,
                         "count": event.count, "epsilon alone": alone, "share of epsilon": share})
        columns = ["event", "mechanism", "q", "noise multiplier", "count", "epsilon alone",
                   "share of epsilon"]
        return pd.DataFrame(rows, columns=columns)

    def summary(self) -> str:
        """A short printable statement: epsilon, delta, unit and the event table (rounded)."""
        table = self.table().round({"q": 5, "noise multiplier": 4, "epsilon alone": 3,
                                    "share of epsilon": 3})
        head = (f"{self.unit}-level (epsilon = {self.epsilon():.3f}, delta = {self.delta:.0e})"
                + (f" over {self.n_units} {self.unit}s" if self.n_units else ""))
        return head + "\n" + (table.to_string(index=False) if len(table) else "(no releases)")

    def __repr__(self) -> str:
        return (f"PrivacyLedger(unit={self.unit!r}, n_units={self.n_units}, delta={self.delta:g}, "
                f"events={len(self.events)})")


class RDPAccountant(PrivacyLedger):
    """Opacus-shaped view of a ledger of Poisson-subsampled Gaussian steps about a generic record.

    ``step(noise_multiplier=..., sample_rate=...)`` records one step, ``get_epsilon(delta)`` reports;
    consecutive equal steps merge as in Opacus's ``history``. Composition is the ledger's.
    """

    def __init__(self, orders: Iterable[float] | None = None) -> None:
        super().__init__(unit="record", delta=0.5, orders=orders)

    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` steps with this noise multiplier and sample rate."""
        self.record_gaussian("step", noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                             count=num_steps)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """``[(noise_multiplier, sample_rate, num_steps), ...]`` as in Opacus."""
        return [(e.noise_multiplier, e.sample_rate, e.count) for e in self.events]

    def get_epsilon(self, delta: float) -> float:
        """:math:`\\varepsilon` spent so far at ``delta`` (0 before any step)."""
        return self.epsilon(delta)

    @property
    def steps(self) -> int:
        """Total number of steps recorded."""
        return sum(e.count for e in self.events)

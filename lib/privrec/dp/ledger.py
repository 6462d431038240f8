"""The privacy ledger: every release a private procedure makes, recorded and composed in one place.

A private trainer does not compute its own :math:`\\varepsilon`. It records each release -- a noisy
gradient step, a noisy statistic, a private selection, a DP-FedAvg round -- as a
:class:`~privrec.dp.events.PrivacyEvent` (mechanism, optional Poisson sampling, count: the shape of
dp-accounting's ``SelfComposedDpEvent(PoissonSampledDpEvent(q, base), count)``) on a
:class:`PrivacyLedger`, and the :math:`(\\varepsilon, \\delta)` it reports is
:meth:`PrivacyLedger.epsilon`. (``Unit``, ``Mechanism`` and ``PrivacyEvent`` are defined in
:mod:`privrec.dp.events` and importable from here.)

Composition is Renyi DP (Mironov 2017, Proposition 1: RDP curves add), converted to
:math:`(\\varepsilon,\\delta)` with Balle et al. (2020, Theorem 21) by
:func:`privrec.dp.accounting.rdp_to_epsilon`. Pure :math:`\\varepsilon`-DP events (Laplace,
exponential mechanism, report-noisy-max) also compose by plain addition (Dwork & Roth 2014,
Theorem 3.16); the ledger reports the smaller of the two routes (:meth:`PrivacyLedger.privacy_spent`),
so one Laplace release at :math:`\\varepsilon = 8` reports 8, not the RDP conversion's 8.001.
:meth:`PrivacyLedger.rdp` is the only place in ``privrec`` where RDP curves are added.

Every ledger names its **privacy unit** (:class:`Unit`) -- what one record is: a rating, an
interaction, a user (one person's whole history) or a silo (one organisation's data) -- and only
events about that unit can be recorded on it. ``n_units``, the number of records, is treated as
public, as Opacus does; with it the ledger enforces the book's rule
:math:`\\delta\\cdot n \\le 0.01` (a mechanism that publishes one random record in full is
:math:`(0, 1/n)`-DP, so :math:`\\delta` must be far below :math:`1/n`). A ledger is saved and
loaded as JSON (:meth:`PrivacyLedger.save`, :meth:`PrivacyLedger.load`); the loaded ledger reports
the same :math:`\\varepsilon` bit for bit.

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
>>> PrivacyLedger.from_json(ledger.to_json()).epsilon() == ledger.epsilon()
True
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from ..core.checks import (
    check_delta,
    check_orders,
    function,
    instance,
    int_in,
    member,
    path_like,
    positive,
)
from .accounting import DEFAULT_ORDERS, find_noise_multiplier, rdp_to_epsilon
from .events import Mechanism, PrivacyEvent, Unit

__all__ = ["Unit", "Mechanism", "UNITS", "MECHANISMS", "MAX_DELTA_TIMES_N", "PrivacyEvent",
           "PrivacyLedger", "default_delta", "RDPAccountant"]


#: The privacy units, as strings.
UNITS = tuple(u.value for u in Unit)
#: The mechanisms, as strings.
MECHANISMS = tuple(m.value for m in Mechanism)
#: The book's rule: delta times the number of records stays at or below this.
MAX_DELTA_TIMES_N = 0.01
_FORMAT = "privrec.PrivacyLedger"


def default_delta(n_units: int) -> float:
    """The largest power of ten :math:`\\delta` with :math:`\\delta\\cdot n \\le 0.01`.

    >>> default_delta(943), default_delta(80_000), default_delta(100)
    (1e-05, 1e-07, 0.0001)
    """
    n = int_in("n_units", n_units, 1)
    exponent = math.ceil(-math.log10(MAX_DELTA_TIMES_N / n) - 1e-12)
    return float(f"1e-{exponent}")


def _compose(events: list[PrivacyEvent], orders: np.ndarray,
             delta: float) -> tuple[float, float, bool]:
    """``(epsilon, order, split)``: the smaller of RDP composition of all ``events`` (``split``
    False) and basic composition of their pure part with the RDP of the rest (``split`` True;
    ``order`` is the rest's RDP order, inf when there is no rest)."""
    if not events:
        return 0.0, math.nan, False
    total = sum((e.rdp(orders) for e in events), np.zeros_like(orders))
    eps, order = rdp_to_epsilon(orders=orders, rdp=total, delta=delta)
    pure = [e.pure_epsilon for e in events if e.mechanism.is_pure]
    if not pure:
        return eps, order, False
    rest = [e for e in events if not e.mechanism.is_pure]
    eps_rest, order_rest, _ = _compose(rest, orders, delta) if rest else (0.0, math.inf, False)
    if math.fsum(pure) + eps_rest < eps:
        return math.fsum(pure) + eps_rest, order_rest, True
    return eps, order, False


def _shares(events: list[PrivacyEvent], orders: np.ndarray, delta: float) -> list[float]:
    """Each event's share of the composed epsilon: on the RDP route its share of the RDP at the
    optimal order; on the split route a pure event's share is its sum over the total, the rest
    share the rest's epsilon by their RDP at the rest's order."""
    eps, order, split = _compose(events, orders, delta)
    if not math.isfinite(eps) or eps <= 0:
        return [math.nan] * len(events)
    pool = [e for e in events if not (split and e.mechanism.is_pure)]
    weight = 1.0 - math.fsum(e.pure_epsilon for e in events if e not in pool) / eps
    pick = np.flatnonzero(orders == order)
    curves = [e.rdp(orders)[pick[0]] if len(pick) else 0.0 for e in pool]
    total = math.fsum(curves)
    out = []
    for event in events:
        if split and event.mechanism.is_pure:
            out.append(event.pure_epsilon / eps)
        else:
            out.append(weight * curves[pool.index(event)] / total if total > 0 else math.nan)
    return out


class _JsonFile:
    """Saving and loading as JSON text or a file, for any class with ``to_dict``/``from_dict``."""

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON text (floats written exactly)."""
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        """The ledger :meth:`to_json` wrote."""
        instance("text", text, str)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"text must be a ledger's JSON, got invalid JSON ({err.msg})") from err
        return cls.from_dict(data)

    def save(self, path: Any) -> None:
        """Write :meth:`to_json` to ``path`` (``str`` or ``os.PathLike``)."""
        path_like("path", path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: Any) -> PrivacyLedger:
        """The ledger :meth:`save` wrote to ``path``."""
        file = path_like("path", path)
        if not file.is_file():
            raise FileNotFoundError(f"path must name an existing ledger file, got {str(file)!r}")
        return cls.from_json(file.read_text(encoding="utf-8"))


class PrivacyLedger(_JsonFile):
    """Records the releases of one private procedure and reports what they cost together.

    Parameters
    ----------
    unit:
        The privacy unit every recorded event must share (a :class:`Unit` or its string).
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

    _needs_delta = True

    def __init__(self, *, unit: Unit | str, n_units: int | None = None, delta: float | None = None,
                 orders: Iterable[float] | None = None) -> None:
        self.unit: Unit = member("unit", unit, Unit)
        self.n_units = None if n_units is None else int_in("n_units", n_units, 1)
        if delta is None and self.n_units is not None:
            delta = default_delta(self.n_units)
        if delta is None and self._needs_delta:
            raise ValueError("give delta or n_units (delta then defaults to default_delta)")
        self.delta = None if delta is None else check_delta(delta)
        if self.n_units and self.delta and self.delta * self.n_units > MAX_DELTA_TIMES_N * (1 + 1e-9):
            raise ValueError(f"delta must be <= {MAX_DELTA_TIMES_N} / n_units = "
                             f"{MAX_DELTA_TIMES_N / self.n_units:.3g} for {self.n_units} "
                             f"{self.unit}s, got {self.delta:g}")
        self.orders = check_orders(DEFAULT_ORDERS if orders is None else orders)
        self.events: list[PrivacyEvent] = []

    # -- recording ---------------------------------------------------------------------------

    def record(self, event: PrivacyEvent) -> None:
        """Add ``event``; consecutive releases of the same kind are merged into one row."""
        instance("event", event, PrivacyEvent)
        if event.unit is not self.unit:
            raise ValueError(f"event unit must be {str(self.unit)!r} (this ledger's unit), got "
                             f"{str(event.unit)!r}: guarantees about different units do not compose")
        if self.events and self.events[-1].same_release(event):
            last = self.events[-1]
            self.events[-1] = replace(last, count=last.count + event.count)
        else:
            self.events.append(event)

    def record_gaussian(self, name: str, *, noise_multiplier: float, sample_rate: float = 1.0,
                        count: int = 1) -> None:
        """Record ``count`` (Poisson-subsampled) Gaussian releases."""
        self.record(PrivacyEvent.gaussian(name, noise_multiplier=noise_multiplier,
                                          sample_rate=sample_rate, count=count, unit=self.unit))

    def record_laplace(self, name: str, *, epsilon: float, count: int = 1) -> None:
        """Record ``count`` Laplace releases, each pure ``epsilon``-DP (scale = sensitivity/epsilon)."""
        eps = positive("epsilon", epsilon)
        self.record(PrivacyEvent(name=name, mechanism=Mechanism.LAPLACE, noise_multiplier=1.0 / eps,
                                 count=count, unit=self.unit, epsilon=eps))

    def record_pure(self, name: str, *, epsilon: float, count: int = 1,
                    mechanism: Mechanism | str = Mechanism.EXPONENTIAL) -> None:
        """Record ``count`` pure ``epsilon``-DP releases: a private selection (``"exponential"``,
        ``"report_noisy_max"``; RDP curve :func:`privrec.dp.accounting.pure_dp_rdp`) or a Laplace
        release (``"laplace"``, the same as :meth:`record_laplace`)."""
        if member("mechanism", mechanism, Mechanism) is Mechanism.LAPLACE:
            self.record_laplace(name, epsilon=epsilon, count=count)
        else:
            self.record(PrivacyEvent.pure(name, epsilon=epsilon, count=count, unit=self.unit,
                                          mechanism=mechanism))

    def extend(self, source: PrivacyLedger | Iterable[PrivacyEvent], *, prefix: str = "") -> None:
        """Record every event of another ledger (or an iterable of events), names prefixed."""
        instance("prefix", prefix, str)
        events = source.events if isinstance(source, PrivacyLedger) else source
        for event in list(instance("source", events, Iterable)):
            instance("event", event, PrivacyEvent)
            self.record(replace(event, name=prefix + event.name))

    def copy(self) -> PrivacyLedger:
        """An independent ledger with the same settings and events."""
        return type(self).from_dict(self.to_dict())

    # -- composing ---------------------------------------------------------------------------

    def _delta(self, delta: float | None) -> float:
        if delta is not None:
            return check_delta(delta)
        if self.delta is None:
            raise ValueError("delta must be given: this accountant has no default delta")
        return self.delta

    def rdp(self) -> np.ndarray:
        """The composed RDP curve (one value per order): the sum of the events' curves."""
        return sum((e.rdp(self.orders) for e in self.events), np.zeros_like(self.orders))

    def privacy_spent(self, delta: float | None = None) -> tuple[float, float]:
        """``(epsilon, best_order)`` at ``delta`` (default: the ledger's); ``(0, nan)`` if empty.

        ``epsilon`` is the smaller of RDP composition of everything and the plain sum of the pure
        events plus the RDP composition of the rest; ``best_order`` is that route's RDP order
        (``inf`` when the pure sum alone wins)."""
        return _compose(self.events, self.orders, self._delta(delta))[:2]

    def epsilon(self, delta: float | None = None) -> float:
        """The :math:`\\varepsilon` of everything recorded, at ``delta`` (default the ledger's)."""
        return self.privacy_spent(delta)[0]

    def calibrate(self, events_for: Callable[[float], list[PrivacyEvent]], *,
                  target_epsilon: float) -> float:
        """The smallest noise multiplier ``z`` for which this ledger plus ``events_for(z)`` spends
        at most ``target_epsilon`` (the one noise search of the library). Records nothing."""
        function("events_for", events_for)

        def epsilon_at(z: float) -> float:
            trial = self.copy()
            trial.extend(events_for(z))
            return trial.epsilon()

        return find_noise_multiplier(epsilon_at, target_epsilon=target_epsilon)

    # -- showing and storing -----------------------------------------------------------------

    def table(self, delta: float | None = None) -> pd.DataFrame:
        """One row per event: mechanism, q, noise multiplier, count, the event's epsilon alone and
        its share of the composed epsilon (pure events on the pure route: their share of the sum;
        the rest: their share of the RDP at the optimal order)."""
        delta = self._delta(delta)
        shares = _shares(self.events, self.orders, delta)
        columns = ["event", "mechanism", "q", "noise multiplier", "count", "epsilon alone",
                   "share of epsilon"]
        rows = [[e.name, str(e.mechanism), e.sample_rate,
                 math.nan if e.noise_multiplier is None else e.noise_multiplier, e.count,
                 _compose([e], self.orders, delta)[0], share]
                for e, share in zip(self.events, shares, strict=True)]
        return pd.DataFrame(rows, columns=columns)

    def summary(self, delta: float | None = None) -> str:
        """A short printable statement: ε, δ, unit and the event table (rounded, compact headers:
        σ is the noise multiplier, "-" for a pure-ε event; it fits an 80-character column)."""
        delta = self._delta(delta)
        table = self.table(delta).round({"q": 5, "noise multiplier": 4, "epsilon alone": 3,
                                         "share of epsilon": 3})
        table = table.rename(columns={"noise multiplier": "σ", "epsilon alone": "ε alone",
                                      "share of epsilon": "share"})
        head = (f"{self.unit}-level (ε = {self.epsilon(delta):.3f}, δ = {delta:.0e})"
                + (f" over {self.n_units} {self.unit}s" if self.n_units else ""))
        return head + "\n" + (table.to_string(index=False, na_rep="-") if len(table) else "(no releases)")

    def to_dict(self) -> dict[str, Any]:
        """Settings and events as JSON-ready plain values (``orders`` None: the default grid)."""
        default = self.orders.shape == (len(DEFAULT_ORDERS),) and bool(
            np.all(self.orders == np.asarray(DEFAULT_ORDERS)))
        return {"format": _FORMAT, "version": 1, "unit": str(self.unit), "n_units": self.n_units,
                "delta": self.delta, "orders": None if default else self.orders.tolist(),
                "events": [e.to_dict() for e in self.events]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyLedger:
        """The ledger :meth:`to_dict` wrote (events recorded in order; same epsilon)."""
        instance("data", data, dict)
        if data.get("format") != _FORMAT or data.get("version") != 1:
            raise ValueError(f"data must be a {_FORMAT} version 1 dict, got format="
                             f"{data.get('format')!r}, version={data.get('version')!r}")
        ledger = cls.__new__(cls)
        PrivacyLedger.__init__(ledger, unit=data["unit"], n_units=data["n_units"],
                               delta=data["delta"], orders=data["orders"])
        ledger.events = [PrivacyEvent.from_dict(e) for e in instance("events", data["events"], list)]
        return ledger

    def __repr__(self) -> str:
        delta = "None" if self.delta is None else f"{self.delta:g}"
        return (f"{type(self).__name__}(unit={str(self.unit)!r}, n_units={self.n_units}, "
                f"delta={delta}, events={len(self.events)})")


class RDPAccountant(PrivacyLedger):
    """Opacus-shaped view of a ledger of Poisson-subsampled Gaussian steps about a generic record.

    ``step(noise_multiplier=..., sample_rate=...)`` records one step, ``get_epsilon(delta)``
    reports; consecutive equal steps merge as in Opacus's ``history``. Like Opacus's accountant it
    has no default :math:`\\delta`: ``epsilon``, ``table`` and ``summary`` need ``delta=``.
    """

    _needs_delta = False

    def __init__(self, orders: Iterable[float] | None = None) -> None:
        super().__init__(unit=Unit.RECORD, orders=orders)

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
        return self.epsilon(check_delta(delta))

    @property
    def steps(self) -> int:
        """Total number of steps recorded."""
        return sum(e.count for e in self.events)

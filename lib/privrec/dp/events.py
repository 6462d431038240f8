"""The vocabulary of privacy accounting: privacy units, mechanisms and events.

A :class:`PrivacyEvent` is one kind of release made ``count`` times, in the shape of
dp-accounting's event tree ``SelfComposedDpEvent(PoissonSampledDpEvent(q, base), count)``: a base
mechanism (a :class:`Mechanism` with its noise multiplier, or its pure :math:`\\varepsilon`), an
optional Poisson sampling rate and a count; :meth:`PrivacyEvent.to_dp_event` builds that tree, and
:meth:`PrivacyEvent.rdp` gives its Renyi-DP curve:

* Gaussian: the Poisson-subsampled Gaussian (Mironov, Talwar & Zhang 2019), ``count`` times;
* Laplace: Mironov (2017), Proposition 6, exact;
* exponential mechanism, report-noisy-max: any pure :math:`\\varepsilon`-DP mechanism is
  :math:`(\\alpha, \\min(\\varepsilon, \\alpha\\varepsilon^2/2))`-RDP (Bun & Steinke 2016,
  Proposition 1.4).

Events are composed and reported by :class:`privrec.dp.ledger.PrivacyLedger`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import Any

import numpy as np

from ..core.checks import check_sample_rate, instance, int_in, member, non_negative, positive, text
from .accounting import compute_rdp, laplace_rdp, pure_dp_rdp

__all__ = ["Unit", "Mechanism", "PrivacyEvent"]


class Unit(StrEnum):
    """The privacy unit a ledger is about (``RECORD``: a generic row, for the Opacus-style API)."""

    RATING = "rating"
    INTERACTION = "interaction"
    USER = "user"
    SILO = "silo"
    RECORD = "record"


class Mechanism(StrEnum):
    """The base mechanisms the ledger composes."""

    GAUSSIAN = "gaussian"
    LAPLACE = "laplace"
    EXPONENTIAL = "exponential"
    REPORT_NOISY_MAX = "report_noisy_max"

    @property
    def is_pure(self) -> bool:
        """True for the pure :math:`\\varepsilon`-DP mechanisms (all but the Gaussian)."""
        return self is not Mechanism.GAUSSIAN


@dataclass(frozen=True)
class PrivacyEvent:
    """One kind of release, made ``count`` times: ``count`` x (Poisson sampling at ``sample_rate``,
    then the base ``mechanism``). Build it by keyword or with :meth:`gaussian` / :meth:`pure`.

    Attributes
    ----------
    name:
        What was released ("DP-SGD step", "item sums and counts", "top-10 items", ...).
    mechanism:
        A :class:`Mechanism` (its string value is accepted).
    noise_multiplier:
        Gaussian: noise std over the L2 sensitivity (0: no noise, infinite privacy loss).
        Laplace: scale over the L1 sensitivity, :math:`1/\\varepsilon` (give it or ``epsilon``).
        ``None`` for the exponential mechanism and report-noisy-max.
    sample_rate:
        Poisson sampling probability of each record per release (1: no sampling; pure events
        only take 1).
    count:
        How many times the release was made (self-composed).
    unit:
        The privacy unit (a :class:`Unit` or its string).
    epsilon:
        The pure :math:`\\varepsilon` of one release (pure mechanisms; ``None`` for Gaussian).
    """

    name: str
    mechanism: Mechanism
    noise_multiplier: float | None = None
    sample_rate: float = 1.0
    count: int = 1
    unit: Unit = Unit.RECORD
    epsilon: float | None = None

    def __post_init__(self) -> None:
        text("name", self.name)
        mechanism = member("mechanism", self.mechanism, Mechanism)
        settings = {"mechanism": mechanism, "unit": member("unit", self.unit, Unit),
                    "sample_rate": check_sample_rate(self.sample_rate),
                    "count": int_in("count", self.count, 1)}
        settings.update(_noise_of(mechanism, self.noise_multiplier, self.epsilon))
        if mechanism.is_pure and settings["sample_rate"] != 1.0:
            raise ValueError(f"sample_rate must be 1 for a {mechanism} event (no subsampled "
                             "pure-DP analysis in privrec)")
        for key, value in settings.items():
            object.__setattr__(self, key, value)

    @classmethod
    def gaussian(cls, name: str, *, noise_multiplier: float, sample_rate: float = 1.0,
                 count: int = 1, unit: Unit | str) -> PrivacyEvent:
        """``count`` Poisson-subsampled Gaussian releases."""
        return cls(name=name, mechanism=Mechanism.GAUSSIAN, noise_multiplier=noise_multiplier,
                   sample_rate=sample_rate, count=count, unit=unit)

    @classmethod
    def pure(cls, name: str, *, epsilon: float, count: int = 1, unit: Unit | str,
             mechanism: Mechanism | str = Mechanism.EXPONENTIAL) -> PrivacyEvent:
        """``count`` pure ``epsilon``-DP releases (exponential, report-noisy-max or Laplace)."""
        mechanism = member("mechanism", mechanism, Mechanism)
        if not mechanism.is_pure:
            raise ValueError("mechanism must be a pure-epsilon mechanism "
                             f"{tuple(m.value for m in Mechanism if m.is_pure)}, got 'gaussian'")
        return cls(name=name, mechanism=mechanism, sample_rate=1.0, count=count, unit=unit,
                   epsilon=epsilon)

    @property
    def pure_epsilon(self) -> float | None:
        """``count`` times the pure :math:`\\varepsilon` (basic composition); ``None`` if Gaussian."""
        return None if self.epsilon is None else self.count * self.epsilon

    def rdp(self, orders: np.ndarray) -> np.ndarray:
        """This event's RDP curve at ``orders`` (all ``count`` releases)."""
        if self.mechanism is Mechanism.GAUSSIAN:
            return compute_rdp(sample_rate=self.sample_rate, noise_multiplier=self.noise_multiplier,
                               steps=self.count, orders=orders)
        if self.mechanism is Mechanism.LAPLACE:  # Mironov (2017), Proposition 6: exact
            return self.count * laplace_rdp(noise_multiplier=self.noise_multiplier, orders=orders)
        return self.count * pure_dp_rdp(epsilon=self.epsilon, orders=orders)

    def same_release(self, other: PrivacyEvent) -> bool:
        """True when ``other`` differs from this event only in ``count``."""
        return replace(other, count=self.count) == self

    def to_dict(self) -> dict[str, Any]:
        """The event as JSON-ready plain values (enums as their strings)."""
        return {k: (str(v) if isinstance(v, StrEnum) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyEvent:
        """The event :meth:`to_dict` wrote."""
        instance("data", data, dict)
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"data has unknown event fields {unknown}")
        return cls(**data)

    def to_dp_event(self) -> Any:
        """The same release as a dp-accounting ``DpEvent`` tree (needs ``dp_accounting``).

        Exponential and report-noisy-max become ``ZCDpEvent(rho=epsilon**2 / 2)``, the zCDP half
        of their curve (dp-accounting has no pure-epsilon RDP event); the rest map one to one.
        """
        import dp_accounting  # optional: only this cross-check needs it

        events = dp_accounting.dp_event
        if self.mechanism is Mechanism.GAUSSIAN:
            base = events.GaussianDpEvent(self.noise_multiplier)
        elif self.mechanism is Mechanism.LAPLACE:
            base = events.LaplaceDpEvent(self.noise_multiplier)
        else:
            base = events.ZCDpEvent(rho=self.epsilon ** 2 / 2)
        if self.sample_rate < 1.0:
            base = events.PoissonSampledDpEvent(self.sample_rate, base)
        return base if self.count == 1 else events.SelfComposedDpEvent(base, self.count)


def _noise_of(mechanism: Mechanism, noise_multiplier: object, epsilon: object) -> dict[str, Any]:
    """Checked ``noise_multiplier`` and ``epsilon`` of a ``mechanism`` event (Laplace: each
    determines the other, :math:`\\lambda = 1/\\varepsilon`)."""
    if mechanism is Mechanism.GAUSSIAN:
        if noise_multiplier is None or epsilon is not None:
            raise ValueError("a gaussian event takes noise_multiplier and no epsilon (its epsilon "
                             "follows from the ledger's delta)")
        return {"noise_multiplier": non_negative("noise_multiplier", noise_multiplier)}
    if mechanism is Mechanism.LAPLACE:
        if noise_multiplier is None and epsilon is None:
            raise ValueError("a laplace event takes epsilon or noise_multiplier (= 1/epsilon)")
        lam = None if noise_multiplier is None else positive("noise_multiplier", noise_multiplier)
        eps = None if epsilon is None else positive("epsilon", epsilon)
        if lam is not None and eps is not None and not math.isclose(lam * eps, 1.0, rel_tol=1e-9):
            raise ValueError(f"noise_multiplier must be 1/epsilon for a laplace event, got "
                             f"noise_multiplier={lam!r}, epsilon={eps!r}")
        return {"noise_multiplier": 1.0 / eps if lam is None else lam,
                "epsilon": 1.0 / lam if eps is None else eps}
    if noise_multiplier is not None or epsilon is None:
        raise ValueError(f"a {mechanism} event takes epsilon and no noise_multiplier")
    return {"epsilon": positive("epsilon", epsilon)}

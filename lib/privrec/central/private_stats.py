"""Private statistics of a ratings table: biases, popularity, and the bias-then-residual trainer.

Biases carry most of what a rating model knows (the bias-only model is hard to beat), and their
sufficient statistics -- per-row sums and counts -- have small sensitivity, so they are cheap to
release with the Gaussian mechanism. Every release is recorded on a
:class:`~privrec.dp.ledger.PrivacyLedger`, and :func:`fit_private_bias_residual` composes the bias
releases and DP-SGD on the residuals on *one* ledger, whose :math:`\\varepsilon` is the model's.

Public constants (never computed from the data): the centre :math:`c = 3` of the star scale, the
clipping bounds, the regularisation strengths. The number of records :math:`N` is treated as public
(as Opacus does). Everything else that touches the data goes through a noisy, ledgered release.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch

from ..core import checks
from ..core.results import FitResult
from ..dp.ledger import PrivacyEvent, PrivacyLedger
from ..dp.primitives import gaussian_noise
from ..recsys.data import validate_ratings
from ..recsys.models import BiasedMF
from ..recsys.train import ratings_to_tensors
from .dpsgd import DPSGD, LOSS_UNITS, fit_dpsgd

__all__ = ["CENTER", "PrivateBiases", "bias_events", "noisy_row_sums", "private_biases",
           "private_item_popularity", "fit_private_bias_residual"]

#: The public centre of the 1..5 star scale: the prior global mean and the clipping centre.
CENTER = 3.0

_RELEASES = {"rating": ("item sums and counts", "user residual sums and counts"),
             "interaction": ("item counts",)}


@dataclass(frozen=True)
class PrivateBiases:
    """Noisy global mean and user/item biases, and the ledger their releases were recorded on."""

    global_mean: float
    user_bias: torch.Tensor
    item_bias: torch.Tensor
    noise_multiplier: float
    ledger: PrivacyLedger


def bias_events(noise_multiplier: float, *, unit: str) -> list[PrivacyEvent]:
    """The releases of :func:`private_biases` (unit ``"rating"``: two) or
    :func:`private_item_popularity` (``"interaction"``: one), at noise multiplier ``z``: full-batch
    Gaussian releases, each with std ``z`` times its L2 sensitivity."""
    names = _RELEASES[checks.choice("unit", unit, tuple(_RELEASES))]
    return [PrivacyEvent(name, "gaussian", noise_multiplier, 1.0, 1, unit) for name in names]


def _ledger_for(ledger: PrivacyLedger | None, unit: str, n_units: int) -> PrivacyLedger:
    if ledger is None:
        return PrivacyLedger(unit=unit, n_units=n_units)
    checks.instance("ledger", ledger, PrivacyLedger)
    if ledger.unit != unit:
        raise ValueError(f"ledger unit must be {unit!r}, got {ledger.unit!r}")
    return ledger


def noisy_row_sums(index: torch.Tensor, values: torch.Tensor, size: int, std: float,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums and counts of ``values`` (row ``index[j]`` gets ``values[j]``), each plus
    :math:`\\mathcal N(0, \\text{std}^2)` on *every* row of ``size``, rated or not: one Gaussian
    release (std = noise multiplier x L2 sensitivity). Counts are clamped at 0 afterwards
    (post-processing)."""
    checks.instance("index", index, torch.Tensor)
    checks.instance("values", values, torch.Tensor)
    size = checks.int_in("size", size, 1)
    sums = torch.zeros(size, dtype=torch.double).index_add_(0, index, values)
    counts = torch.bincount(index, minlength=size).double()
    sums += gaussian_noise((size,), std=std, generator=generator, dtype=torch.double)
    counts += gaussian_noise((size,), std=std, generator=generator, dtype=torch.double)
    return sums, counts.clamp(min=0.0)


def _shrinkage(counts: torch.Tensor, reg: float, noise_std: float) -> torch.Tensor:
    """Denominator :math:`n + \\lambda(1 + s^2/\\max(n, 1))` of a noisy bias :math:`S/(\\cdot)`.

    Without noise this is the usual :math:`n+\\lambda`. A noisy sum carries extra variance
    :math:`s^2`; treating it as :math:`s^2/n` more variance per rating (public guess
    :math:`\\sigma_r^2 = 1` star^2) pulls rarely rated rows towards 0 harder. Post-processing.
    """
    return counts + reg * (1.0 + noise_std ** 2 / counts.clamp(min=1.0))


@torch.no_grad()
def private_biases(train: pd.DataFrame, *, n_users: int, n_items: int, noise_multiplier: float,
                   ledger: PrivacyLedger | None = None, center: float = CENTER,
                   rating_bound: float = 2.0, residual_bound: float = 2.0, reg_user: float = 15.0,
                   reg_item: float = 10.0, noise_aware: bool = True, seed: int = 0,
                   ) -> PrivateBiases:
    """Regularised biases (as :func:`~privrec.recsys.train.fit_bias_baseline`) from noisy sufficient
    statistics.

    Release 1 (items): :math:`S_i=\\sum_u \\mathrm{clip}(r_{ui}-c,\\pm B_r)` and the count
    :math:`n_i`, each plus :math:`\\mathcal N(0, z^2\\Delta^2)` with :math:`\\Delta=\\sqrt{B_r^2+1}`
    (one rating moves one item's sum by at most :math:`B_r` and its count by 1). Then
    :math:`\\hat\\mu = c + \\sum_i S_i/\\sum_i n_i` and
    :math:`b_i = (S_i - n_i(\\hat\\mu-c))/(\\lambda_i+n_i)`.
    Release 2 (users): :math:`T_u=\\sum_i\\mathrm{clip}(r_{ui}-\\hat\\mu-b_i,\\pm B)` and :math:`m_u`,
    noise :math:`z\\sqrt{B^2+1}`; :math:`b_u = T_u/(\\lambda_u+m_u)`. With ``noise_aware`` the
    shrinkage grows with the noise. With :math:`z=0` the estimates equal
    :func:`privrec.recsys.train.fit_bias_baseline`'s first alternating step (and the ledger says ε = ∞).

    Both releases are recorded on ``ledger`` (default: a new rating-level ledger over
    ``len(train)`` ratings), returned in :attr:`PrivateBiases.ledger`.

    Raises
    ------
    ValueError
        For bad parameters or a ledger about another unit than ``"rating"``.
    """
    validate_ratings(train, n_users=n_users, n_items=n_items, name="train")
    z = checks.non_negative("noise_multiplier", noise_multiplier)
    ledger = _ledger_for(ledger, "rating", len(train))
    center, reg_user, reg_item = (checks.real("center", center),
                                  checks.non_negative("reg_user", reg_user),
                                  checks.non_negative("reg_item", reg_item))
    bounds = (checks.positive("rating_bound", rating_bound),
              checks.positive("residual_bound", residual_bound))
    stds = [z * math.sqrt(b ** 2 + 1.0) for b in bounds]
    users, items, ratings = ratings_to_tensors(train)
    ratings = ratings.double()
    gen = torch.Generator().manual_seed(checks.seed("seed", seed))
    boost = 1.0 if checks.flag("noise_aware", noise_aware) else 0.0
    s_i, n_i = noisy_row_sums(items, (ratings - center).clamp(-bounds[0], bounds[0]), n_items,
                           stds[0], gen)
    offset = float(s_i.sum() / n_i.sum().clamp(min=1.0))
    offset = max(-bounds[0], min(bounds[0], offset))
    b_i = (s_i - n_i * offset) / _shrinkage(n_i, reg_item, boost * stds[0])
    mu = center + offset
    residual = (ratings - mu - b_i[items]).clamp(-bounds[1], bounds[1])
    t_u, m_u = noisy_row_sums(users, residual, n_users, stds[1], gen)
    b_u = t_u / _shrinkage(m_u, reg_user, boost * stds[1])
    for event in bias_events(z, unit="rating"):
        ledger.record(event)
    return PrivateBiases(global_mean=mu, user_bias=b_u.float(), item_bias=b_i.float(),
                         noise_multiplier=z, ledger=ledger)


@torch.no_grad()
def private_item_popularity(train: pd.DataFrame, *, n_users: int, n_items: int,
                            noise_multiplier: float, ledger: PrivacyLedger | None = None,
                            n_negatives: int = 4, seed: int = 0) -> PrivateBiases:
    """Implicit-feedback analogue of :func:`private_biases`: noisy item counts as item biases.

    One interaction adds 1 to one item's count (L2 sensitivity 1), so one Gaussian release
    :math:`\\tilde n_i = n_i + \\mathcal N(0, z^2)` on *every* item protects it (recorded on
    ``ledger``, default a new interaction-level ledger). With ``n_negatives`` uniform negatives per
    positive, the logistic model that knows only the item has :math:`b_i = \\log(n_i I/(k N))`;
    we plug in :math:`\\max(\\tilde n_i, 1/2)` and :math:`\\tilde N=\\sum_i \\tilde n_i`
    (post-processing). User biases do not change a user's ranking and stay 0.
    """
    validate_ratings(train, n_users=n_users, n_items=n_items, name="train")
    z = checks.non_negative("noise_multiplier", noise_multiplier)
    ledger = _ledger_for(ledger, "interaction", len(train))
    counts = torch.bincount(torch.as_tensor(train["item"].to_numpy()), minlength=n_items).double()
    gen = torch.Generator().manual_seed(checks.seed("seed", seed))
    counts = (counts + gaussian_noise((n_items,), std=z, generator=gen, dtype=torch.double))
    counts = counts.clamp(min=0.5)
    negatives = checks.int_in("n_negatives", n_negatives, 1)
    item_bias = torch.log(counts * n_items / (negatives * counts.sum()))
    for event in bias_events(z, unit="interaction"):
        ledger.record(event)
    return PrivateBiases(global_mean=0.0, user_bias=torch.zeros(n_users),
                         item_bias=item_bias.float(), noise_multiplier=z, ledger=ledger)


def _bias_noise(ledger: PrivacyLedger, target_epsilon: float, bias_share: float) -> float:
    """Noise multiplier of the bias releases: the smallest whose events alone cost
    ``bias_share * target_epsilon`` on an empty copy of ``ledger`` (``inf`` target: no noise)."""
    if math.isinf(target_epsilon):
        return 0.0
    empty = PrivacyLedger(unit=ledger.unit, n_units=ledger.n_units, delta=ledger.delta,
                          orders=ledger.orders)
    return empty.calibrate(lambda z: bias_events(z, unit=ledger.unit),
                           target_epsilon=bias_share * target_epsilon)


def fit_private_bias_residual(train: pd.DataFrame, *, n_users: int, n_items: int,
                              target_epsilon: float, delta: float | None = None,
                              bias_share: float = 0.25, dim: int = 16, epochs: float = 10,
                              sample_rate: float = 0.05, clip_norm: float = 0.5, lr: float = 0.01,
                              reg: float = 0.0, reg_user: float = 15.0, reg_item: float = 10.0,
                              noise_aware: bool = True, init_std: float = 0.1,
                              loss: str = "squared", n_negatives: int = 4, seed: int = 0,
                              validation: pd.DataFrame | None = None,
                              trainer: type[DPSGD] = DPSGD) -> FitResult:
    """Private biases (a ``bias_share`` of the budget), then DP-SGD on the factors only, on one ledger.

    The model is built first from public constants (global bias :data:`CENTER`, seeded factors);
    the bias releases are recorded on a new ledger (unit ``"rating"``, or ``"interaction"`` for
    ``loss="logistic"`` where the biases are :func:`private_item_popularity`); then DP-SGD's σ is
    calibrated by ``ledger.calibrate`` so that the *whole* ledger ends at ``target_epsilon``, and
    its steps go on the same ledger. The returned ``FitResult.ledger.epsilon()`` is the model's ε.
    ``target_epsilon=math.inf`` runs the same pipeline without noise (ε = ∞).
    """
    unit = LOSS_UNITS[checks.choice("loss", loss, tuple(LOSS_UNITS))]
    target = checks.epsilon_or_inf("target_epsilon", target_epsilon)
    bias_share = checks.in_range("bias_share", bias_share, 0.0, 1.0, closed_high=False)
    if bias_share == 0.0:
        raise ValueError("bias_share must be in (0, 1), got 0.0")
    validate_ratings(train, n_users=n_users, n_items=n_items, name="train")
    ledger = PrivacyLedger(unit=unit, n_units=len(train), delta=delta)
    model = BiasedMF(n_users, n_items, dim, global_mean=CENTER if loss == "squared" else 0.0,
                     init_std=init_std, seed=seed)
    z = _bias_noise(ledger, target, bias_share)
    if loss == "squared":
        biases = private_biases(train, n_users=n_users, n_items=n_items, noise_multiplier=z,
                                ledger=ledger, reg_user=reg_user, reg_item=reg_item,
                                noise_aware=noise_aware, seed=seed)
    else:
        biases = private_item_popularity(train, n_users=n_users, n_items=n_items,
                                         noise_multiplier=z, ledger=ledger,
                                         n_negatives=n_negatives, seed=seed)
    with torch.no_grad():
        model.global_bias.fill_(biases.global_mean)
        model.user_bias.copy_(biases.user_bias)
        model.item_bias.copy_(biases.item_bias)
    if dim == 0:
        return FitResult(model=model, history={}, ledger=ledger)
    return fit_dpsgd(model, train, target_epsilon=target, epochs=epochs, sample_rate=sample_rate,
                     clip_norm=clip_norm, lr=lr, reg=reg, trainable=("user_factors", "item_factors"),
                     loss=loss, n_negatives=n_negatives, seed=seed + 1, validation=validation,
                     ledger=ledger, trainer=trainer)

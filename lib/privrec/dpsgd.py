"""Private training of the embedding recommender: DP-SGD, input perturbation, private biases.

DP-SGD (Abadi et al. 2016, Algorithm 1) for :class:`~privrec.models.BiasedMF` at *rating level*:
a record is one rating, and two training sets are neighbours when one has a rating the other lacks
(add/remove). Each step

1. samples a batch by Poisson sampling -- every rating joins independently with probability
   :math:`q` (the sampling the RDP analysis of :mod:`privrec.accounting` assumes; fixed-size
   shuffled batches are a different mechanism);
2. computes each rating's gradient :math:`g_j` and clips it to norm :math:`C`:
   :math:`\\bar g_j = g_j\\,\\min(1, C/\\lVert g_j\\rVert)`;
3. adds :math:`\\mathcal N(0,\\sigma^2C^2)` noise to *every coordinate of every trainable table* and
   divides by the expected batch size :math:`qN`: :math:`\\tilde g=(\\sum_j\\bar g_j + \\sigma C\\xi)/(qN)`;
4. hands :math:`\\tilde g` to an optimiser (Adam here; any optimiser is post-processing).

Why every row gets noise. A rating about item :math:`i` changes only row :math:`i` of the gradient,
but *which* rows are non-zero is itself data: if only touched rows were noised, an item no sampled
rating touches would get an exactly-zero update, and an observer comparing the released tables
before and after the step would learn that nobody in the batch rated it -- for a rare item, that
one specific user did not rate it. The Gaussian mechanism's guarantee needs the same noise
distribution on all coordinates whatever the data are, so the noise is dense even though the
signal is sparse.

The fast path. An embedding model has a huge parameter vector, but one rating's gradient lives on
five small pieces: its user row :math:`p_u`, item row :math:`q_i`, the two biases and the global
bias. With :math:`e = \\hat r_{ui}-r_{ui}` and per-rating loss
:math:`e^2 + \\lambda(\\lVert p_u\\rVert^2+\\lVert q_i\\rVert^2) + \\lambda_b(b_u^2+b_i^2)` the pieces are
:math:`2(e\\,q_i+\\lambda p_u)`, :math:`2(e\\,p_u+\\lambda q_i)`, :math:`2(e+\\lambda_b b_u)`,
:math:`2(e+\\lambda_b b_i)` and :math:`2e`, so the per-example norm costs :math:`O(Bd)` and clipped
gradients are scattered into the tables with ``index_add_``. Nothing of size
``[batch, vocabulary, dim]`` is ever built (Opacus's generic embedding hook builds exactly that).
:func:`per_example_gradients` is the general ``torch.func`` (``vmap`` of ``grad``) path for any small
model; the tests use it to check the fast path.

What rating-level DP does not protect. The guarantee is about one rating. A user with 200 ratings
is 200 records: by group privacy their whole history is protected only at roughly
:math:`200\\varepsilon` (worse with :math:`\\delta`), i.e. not at all. Which films a person watches,
their taste profile, their presence in the data set -- all are user-level facts. User-level DP
(one record = one user's history) comes with the federated chapters.

Also here: the implicit-feedback fast path (logistic loss, sampled negatives), input perturbation
(Laplace on rating values, randomized response on the interaction matrix), and *private biases +
DP-SGD on residuals*, which closes the gap to the bias-only baseline (:func:`fit_private_bias_residual`).

Security note: noise comes from torch's Mersenne-Twister generator, which is fine for teaching and
measuring but not for a production release (Opacus's ``secure_mode`` uses a CSPRNG).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from .accounting import compute_rdp, get_noise_multiplier, rdp_to_epsilon
from .checks import check_delta, check_sample_rate
from .ledger import RDPAccountant
from .checks import non_negative, positive, real
from .data import validate_ratings
from .mechanisms import laplace_mechanism, randomized_response
from .metrics import evaluate_ratings
from .models import BiasedMF
from .train import ratings_to_tensors

__all__ = [
    "MF_PARAMETER_NAMES",
    "mf_per_example_gradients",
    "per_example_norms",
    "clip_factors",
    "mf_clipped_gradient_sum",
    "mf_loss",
    "mf_implicit_clipped_gradient_sum",
    "mf_implicit_loss",
    "per_example_gradients",
    "clip_and_sum",
    "add_gaussian_noise",
    "DPSGD",
    "DPSGDResult",
    "fit_dpsgd",
    "laplace_perturb_ratings",
    "randomized_response_interactions",
    "PrivateBiases",
    "private_biases",
    "private_item_popularity",
    "PrivateResidualResult",
    "fit_private_bias_residual",
]

#: Trainable tables of :class:`~privrec.models.BiasedMF`, in a fixed order.
MF_PARAMETER_NAMES = ("user_factors", "item_factors", "user_bias", "item_bias", "global_bias")

# Added to norms before dividing, as Opacus does, so a zero gradient is not a 0/0.
_NORM_EPS = 1e-6


# ----------------------------------------------------------------------------------------------
# Parameter checks
# ----------------------------------------------------------------------------------------------

def _check_epsilon_or_inf(name: str, value: object) -> float:
    """A privacy budget: finite > 0, or ``math.inf`` meaning "no noise"."""
    v = real(name, value)
    if math.isnan(v) or v <= 0:
        raise ValueError(f"{name} must be > 0 (math.inf for no privacy), got {value!r}")
    return v


def _check_trainable(trainable: Sequence[str] | None) -> tuple[str, ...]:
    names = MF_PARAMETER_NAMES if trainable is None else tuple(trainable)
    unknown = [n for n in names if n not in MF_PARAMETER_NAMES]
    if unknown or not names:
        raise ValueError(f"trainable must be a non-empty subset of {MF_PARAMETER_NAMES}, "
                         f"got {tuple(trainable) if trainable is not None else None}")
    return tuple(n for n in MF_PARAMETER_NAMES if n in names)


# ----------------------------------------------------------------------------------------------
# The fast path: closed-form per-rating gradients of BiasedMF
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def mf_per_example_gradients(model: BiasedMF, users: torch.Tensor, items: torch.Tensor,
                             ratings: torch.Tensor, *, reg: float = 0.0, bias_reg: float = 0.0,
                             trainable: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Each rating's gradient, restricted to the rows it touches.

    Returns ``{name: tensor}`` with ``[B, dim]`` for ``user_factors``/``item_factors`` (the gradient
    on row ``users[j]`` resp. ``items[j]``) and ``[B]`` for the biases and the global bias, for the
    per-rating loss :math:`(\\hat r-r)^2+\\lambda(\\lVert p_u\\rVert^2+\\lVert q_i\\rVert^2)
    +\\lambda_b(b_u^2+b_i^2)`. Ids are not checked (inner-loop function).
    """
    names = _check_trainable(trainable)
    p, q = model.user_factors[users], model.item_factors[items]
    b_u, b_i = model.user_bias[users], model.item_bias[items]
    two_err = 2.0 * (model.global_bias + b_u + b_i + (p * q).sum(-1) - ratings)
    grads = {}
    if "user_factors" in names:
        grads["user_factors"] = two_err[:, None] * q + (2.0 * reg) * p
    if "item_factors" in names:
        grads["item_factors"] = two_err[:, None] * p + (2.0 * reg) * q
    if "user_bias" in names:
        grads["user_bias"] = two_err + (2.0 * bias_reg) * b_u
    if "item_bias" in names:
        grads["item_bias"] = two_err + (2.0 * bias_reg) * b_i
    if "global_bias" in names:
        grads["global_bias"] = two_err
    return grads


def per_example_norms(per_example: dict[str, torch.Tensor]) -> torch.Tensor:
    """L2 norm of each example's whole gradient: ``[B]`` from ``{name: [B, ...]}``."""
    squares = [g.reshape(g.shape[0], -1).square().sum(1) for g in per_example.values()]
    return torch.stack(squares).sum(0).sqrt()


def clip_factors(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """:math:`\\min(1, C/(\\lVert g_j\\rVert+10^{-6}))`, the factor that clips each example to norm C."""
    clip_norm = positive("clip_norm", clip_norm)
    return (clip_norm / (norms + _NORM_EPS)).clamp(max=1.0)


@torch.no_grad()
def mf_clipped_gradient_sum(model: BiasedMF, users: torch.Tensor, items: torch.Tensor,
                            ratings: torch.Tensor, *, clip_norm: float, reg: float = 0.0,
                            bias_reg: float = 0.0, trainable: Sequence[str] | None = None,
                            ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """:math:`\\sum_j \\bar g_j` as dense tensors shaped like the parameters, and the norms ``[B]``.

    Cost :math:`O(Bd)` plus the dense tables (which the noise needs anyway).
    """
    rows = mf_per_example_gradients(model, users, items, ratings, reg=reg, bias_reg=bias_reg,
                                    trainable=trainable)
    norms = per_example_norms(rows)
    factor = clip_factors(norms, clip_norm)
    index = {"user_factors": users, "item_factors": items, "user_bias": users, "item_bias": items}
    summed = {}
    for name, g in rows.items():
        param = getattr(model, name)
        if name == "global_bias":
            summed[name] = (factor * g).sum().reshape(param.shape)
        else:
            scaled = g * (factor[:, None] if g.dim() == 2 else factor)
            summed[name] = torch.zeros_like(param).index_add_(0, index[name], scaled)
    return summed, norms


@torch.no_grad()
def mf_implicit_clipped_gradient_sum(model: BiasedMF, users: torch.Tensor, items: torch.Tensor, *,
                                     clip_norm: float, reg: float = 0.0,
                                     trainable: Sequence[str] | None = None,
                                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Clipped gradient sum for implicit feedback: ``items[:, 0]`` positive, ``items[:, 1:]`` negatives.

    Per-example loss :math:`\\sum_{j} \\mathrm{BCE}(s_{u x_j}, y_j) + \\lambda(\\lVert p_u\\rVert^2
    + \\lVert q_{x_j}\\rVert^2)` with :math:`y_0=1`, :math:`y_{j>0}=0` (as
    :func:`privrec.train.fit_implicit`). One example touches ``1 + n_negatives`` item rows, and a
    negative may repeat an item: the item part of the norm is then computed from the Gram matrix of
    the occurrences masked by "same item", so duplicates add *before* squaring -- the exact norm, which
    clipping needs (summing squares separately would under-estimate it and break the bound).
    Returns dense ``{name: sum}`` and the norms ``[B]``.
    """
    names = _check_trainable(trainable)
    if items.dim() != 2 or items.shape[0] != users.shape[0]:
        raise ValueError("items must be [B, 1 + n_negatives] with B = len(users)")
    k1 = items.shape[1]
    p = model.user_factors[users]                                    # [B, d]
    q = model.item_factors[items]                                    # [B, k+1, d]
    logits = (model.global_bias + model.user_bias[users, None] + model.item_bias[items]
              + torch.einsum("bd,bkd->bk", p, q))
    labels = torch.zeros_like(logits)
    labels[:, 0] = 1.0
    a = torch.sigmoid(logits) - labels                               # dBCE/dlogit, [B, k+1]
    rows: dict[str, torch.Tensor] = {}
    if "user_factors" in names:
        rows["user_factors"] = torch.einsum("bk,bkd->bd", a, q) + (2.0 * reg * k1) * p
    if "user_bias" in names:
        rows["user_bias"] = a.sum(1)
    if "global_bias" in names:
        rows["global_bias"] = a.sum(1)
    item_rows = {}
    if "item_factors" in names:
        item_rows["item_factors"] = a[:, :, None] * p[:, None, :] + (2.0 * reg) * q
    if "item_bias" in names:
        item_rows["item_bias"] = a
    sq = torch.zeros(len(users), dtype=p.dtype)
    for g in rows.values():
        sq = sq + g.reshape(len(users), -1).square().sum(1)
    # Exact item part: sum over occurrence pairs (j, l) on the same item of <g_j, g_l>. The diagonal
    # is cheap; off-diagonal pairs exist only in the few rows whose negatives repeat an item.
    same = items[:, :, None] == items[:, None, :]                    # [B, k+1, k+1]
    dup = (same.sum((1, 2)) > k1).nonzero().squeeze(1)
    for g in item_rows.values():
        flat = g.reshape(len(users), k1, -1)
        sq = sq + flat.square().sum((1, 2))
        if len(dup):
            gram = torch.bmm(flat[dup], flat[dup].transpose(1, 2))
            off = same[dup] & ~torch.eye(k1, dtype=torch.bool)
            sq = sq.index_add(0, dup, (gram * off).sum((1, 2)))
    norms = sq.clamp(min=0.0).sqrt()
    factor = clip_factors(norms, clip_norm)
    summed = {}
    for name, g in rows.items():
        param = getattr(model, name)
        scaled = g * (factor[:, None] if g.dim() == 2 else factor)
        if name == "global_bias":
            summed[name] = scaled.sum().reshape(param.shape)
        else:
            summed[name] = torch.zeros_like(param).index_add_(0, users, scaled)
    for name, g in item_rows.items():
        param = getattr(model, name)
        scaled = g * factor.reshape(-1, *([1] * (g.dim() - 1)))
        summed[name] = torch.zeros_like(param).index_add_(
            0, items.reshape(-1), scaled.reshape(-1, *param.shape[1:]))
    return {n: summed[n] for n in names}, norms


def mf_implicit_loss(model: BiasedMF, users: torch.Tensor, items: torch.Tensor, *,
                     reg: float = 0.0) -> torch.Tensor:
    """Summed loss that :func:`mf_implicit_clipped_gradient_sum` differentiates (autograd-friendly)."""
    logits = (model.global_bias + model.user_bias[users, None] + model.item_bias[items]
              + (model.user_factors[users][:, None, :] * model.item_factors[items]).sum(-1))
    labels = torch.zeros_like(logits)
    labels[:, 0] = 1.0
    bce = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
    k1 = items.shape[1]
    return bce + reg * (k1 * model.user_factors[users].square().sum()
                        + model.item_factors[items].square().sum())


def mf_loss(model: BiasedMF, users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor, *,
            reg: float = 0.0, bias_reg: float = 0.0) -> torch.Tensor:
    """Sum over the batch of the per-rating loss the fast path differentiates (autograd-friendly)."""
    err = model.predict_unchecked(users, items) - ratings
    penalty = (reg * (model.user_factors[users].square().sum(-1)
                      + model.item_factors[items].square().sum(-1))
               + bias_reg * (model.user_bias[users].square() + model.item_bias[items].square()))
    return (err.square() + penalty).sum()


# ----------------------------------------------------------------------------------------------
# The general path: torch.func per-example gradients for any small model
# ----------------------------------------------------------------------------------------------

class _LossModule(nn.Module):
    """Wraps ``loss_fn(model, *batch)`` as a module so ``functional_call`` can swap parameters."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model, *batch)


def per_example_gradients(model: nn.Module, loss_fn: Callable[..., torch.Tensor],
                          *batch: torch.Tensor, parameters: Sequence[str] | None = None,
                          ) -> dict[str, torch.Tensor]:
    """Per-example gradients of any model with ``torch.func.vmap`` over ``torch.func.grad``.

    Parameters
    ----------
    model:
        The module; its parameters are read, never changed.
    loss_fn:
        ``loss_fn(model, *example_batch) -> scalar``, called on a batch of one example (each tensor
        of ``batch`` with a leading dimension of 1); it must avoid data-dependent Python control
        flow (e.g. call ``BiasedMF.predict_unchecked`` rather than the checked ``forward``).
    batch:
        Tensors with a leading batch dimension ``B``.
    parameters:
        Names of the parameters to differentiate (default: all that require grad).

    Returns
    -------
    ``{name: [B, *param.shape]}`` -- dense, so only for small models (tests, cross-checks).
    """
    if not batch:
        raise ValueError("batch must contain at least one tensor")
    sizes = {t.shape[0] for t in batch}
    if len(sizes) != 1:
        raise ValueError(f"all batch tensors must share the leading dimension, got {sorted(sizes)}")
    named = dict(model.named_parameters())
    names = [n for n, p in named.items() if p.requires_grad] if parameters is None else list(parameters)
    unknown = [n for n in names if n not in named]
    if unknown or not names:
        raise ValueError(f"parameters must name parameters of the model, got {names}")
    wrapper = _LossModule(model, loss_fn)
    params = {f"model.{n}": named[n].detach() for n in names}

    def one_example(params: dict[str, torch.Tensor], *example: torch.Tensor) -> torch.Tensor:
        loss = torch.func.functional_call(wrapper, params, tuple(x.unsqueeze(0) for x in example))
        return loss.sum()

    grads = torch.func.vmap(torch.func.grad(one_example), in_dims=(None,) + (0,) * len(batch))(
        params, *batch)
    return {n: grads[f"model.{n}"] for n in names}


def clip_and_sum(per_example: dict[str, torch.Tensor], clip_norm: float,
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Clip each example's (dense) gradient to norm ``clip_norm`` and sum over the batch.

    Returns ``({name: summed}, norms)``; the reference the fast path is tested against.
    """
    norms = per_example_norms(per_example)
    factor = clip_factors(norms, clip_norm)
    summed = {n: (g * factor.reshape(-1, *([1] * (g.dim() - 1)))).sum(0)
              for n, g in per_example.items()}
    return summed, norms


# ----------------------------------------------------------------------------------------------
# Noise and the DP-SGD loop
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def add_gaussian_noise(summed: dict[str, torch.Tensor], *, noise_multiplier: float, clip_norm: float,
                       expected_batch_size: float, generator: torch.Generator | None = None,
                       ) -> dict[str, torch.Tensor]:
    """:math:`(\\sum_j\\bar g_j + \\sigma C\\xi)/(qN)` with :math:`\\xi\\sim\\mathcal N(0, I)` on every
    coordinate of every tensor -- touched or not (see the module docstring for why).

    Dividing by the *expected* batch size :math:`qN` (a public constant), not the realised one,
    keeps the sensitivity of the average at :math:`C/(qN)`; the realised size is itself private.
    """
    sigma = non_negative("noise_multiplier", noise_multiplier)
    clip_norm = positive("clip_norm", clip_norm)
    denom = positive("expected_batch_size", expected_batch_size)
    std = sigma * clip_norm
    out = {}
    for name, g in summed.items():
        noisy = g.clone()
        if std > 0:
            noisy.add_(torch.randn(g.shape, generator=generator, dtype=g.dtype), alpha=std)
        out[name] = noisy.div_(denom)
    return out


class DPSGD:
    """DP-SGD for :class:`~privrec.models.BiasedMF` at rating level (Abadi et al. 2016).

    Parameters
    ----------
    model:
        Trained in place.
    train:
        Ratings table; its length :math:`N` and ``sample_rate`` :math:`q` fix the expected batch.
    clip_norm:
        :math:`C`, the per-rating gradient norm bound (> 0).
    noise_multiplier:
        :math:`\\sigma` (>= 0; 0 means clipping without privacy, :math:`\\varepsilon=\\infty`).
    sample_rate:
        :math:`q \\in (0, 1]`, the Poisson inclusion probability of each rating per step.
    lr:
        Adam step size.
    reg, bias_reg:
        Per-rating L2 strengths inside the clipped loss.
    trainable:
        Tables to train (default all); the others stay fixed and get no noise because they are
        never released as a function of the data by this loop.
    loss:
        ``"squared"`` (explicit ratings) or ``"logistic"`` (implicit feedback: each training row is
        a positive, with ``n_negatives`` items drawn uniformly as its negatives; a record is then
        one interaction, and its negatives are part of its clipped gradient).
    n_negatives:
        Negatives per positive for ``loss="logistic"``.
    seed:
        Seeds batch sampling, negatives and noise.

    Attributes
    ----------
    accountant:
        A :class:`privrec.accounting.RDPAccountant` that records every noisy step.
    """

    def __init__(self, model: BiasedMF, train: pd.DataFrame, *, clip_norm: float,
                 noise_multiplier: float, sample_rate: float, lr: float = 0.01, reg: float = 0.0,
                 bias_reg: float = 0.0, trainable: Sequence[str] | None = None,
                 loss: str = "squared", n_negatives: int = 4, seed: int = 0) -> None:
        if not isinstance(model, BiasedMF):
            raise TypeError(f"model must be a BiasedMF, got {type(model).__name__}")
        validate_ratings(train, n_users=model.n_users, n_items=model.n_items, name="train")
        if len(train) == 0:
            raise ValueError("train must not be empty")
        self.model = model
        self.clip_norm = positive("clip_norm", clip_norm)
        self.noise_multiplier = non_negative("noise_multiplier", noise_multiplier)
        self.sample_rate = check_sample_rate(sample_rate)
        self.lr = positive("lr", lr)
        self.reg = non_negative("reg", reg)
        self.bias_reg = non_negative("bias_reg", bias_reg)
        self.trainable = _check_trainable(trainable)
        self.users, self.items, self.ratings = ratings_to_tensors(train)
        self.n_examples = len(self.ratings)
        self.expected_batch_size = self.sample_rate * self.n_examples
        self.generator = torch.Generator().manual_seed(int(seed))
        self.accountant = RDPAccountant()
        self.steps_taken = 0
        if loss not in ("squared", "logistic"):
            raise ValueError(f"loss must be 'squared' or 'logistic', got {loss!r}")
        self.loss = loss
        if isinstance(n_negatives, bool) or not isinstance(n_negatives, (int, np.integer)) \
                or n_negatives < 1:
            raise ValueError(f"n_negatives must be an int >= 1, got {n_negatives!r}")
        self.n_negatives = int(n_negatives)
        self.optimizer = torch.optim.Adam([getattr(model, n) for n in self.trainable], lr=self.lr)

    def sample_batch(self) -> torch.Tensor:
        """Indices of a Poisson sample: each rating independently with probability :math:`q`."""
        if self.sample_rate == 1.0:
            return torch.arange(self.n_examples)
        mask = torch.rand(self.n_examples, generator=self.generator) < self.sample_rate
        return mask.nonzero().squeeze(1)

    def noisy_gradient(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Clipped, summed, noised and normalised gradient of the ratings ``index``."""
        if self.loss == "squared":
            summed, _ = mf_clipped_gradient_sum(
                self.model, self.users[index], self.items[index], self.ratings[index],
                clip_norm=self.clip_norm, reg=self.reg, bias_reg=self.bias_reg,
                trainable=self.trainable)
        else:
            negatives = torch.randint(self.model.n_items, (len(index), self.n_negatives),
                                      generator=self.generator)
            items = torch.cat([self.items[index, None], negatives], 1)
            summed, _ = mf_implicit_clipped_gradient_sum(
                self.model, self.users[index], items, clip_norm=self.clip_norm, reg=self.reg,
                trainable=self.trainable)
        return add_gaussian_noise(summed, noise_multiplier=self.noise_multiplier,
                                  clip_norm=self.clip_norm,
                                  expected_batch_size=self.expected_batch_size,
                                  generator=self.generator)

    def step(self, index: torch.Tensor | None = None) -> None:
        """One DP-SGD step on a fresh Poisson batch (``index`` overrides it: benchmarks only --
        a fixed batch is not what the accountant assumes)."""
        grads = self.noisy_gradient(self.sample_batch() if index is None else index)
        for name, g in grads.items():
            getattr(self.model, name).grad = g
        self.optimizer.step()
        self.steps_taken += 1
        if self.noise_multiplier > 0:
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def epsilon(self, delta: float) -> float:
        """:math:`\\varepsilon` spent so far (``inf`` once a step ran with ``noise_multiplier == 0``)."""
        delta = check_delta(delta)
        if self.steps_taken == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        return self.accountant.get_epsilon(delta)


@dataclass
class DPSGDResult:
    """What :func:`fit_dpsgd` ran: its noise, its privacy cost, and per-epoch validation RMSE."""

    noise_multiplier: float
    epsilon: float
    delta: float
    steps: int
    sample_rate: float
    clip_norm: float
    val_rmse: list[float] = field(default_factory=list)
    seconds: float = 0.0


@functools.lru_cache(maxsize=256)
def _noise_for_target(*, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """:func:`privrec.accounting.get_noise_multiplier`, memoised (sweeps ask for the same values)."""
    return get_noise_multiplier(target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate,
                                steps=steps)


def _steps_for(epochs: float, sample_rate: float) -> int:
    return max(1, int(round(positive("epochs", epochs) / sample_rate)))


def fit_dpsgd(model: BiasedMF, train: pd.DataFrame, *, target_epsilon: float | None = None,
              noise_multiplier: float | None = None, delta: float = 1e-5, epochs: float = 10,
              sample_rate: float = 0.02, clip_norm: float = 1.0, lr: float = 0.01, reg: float = 0.0,
              bias_reg: float = 0.0, trainable: Sequence[str] | None = None,
              loss: str = "squared", n_negatives: int = 4, seed: int = 0,
              validation: pd.DataFrame | None = None) -> DPSGDResult:
    """Train ``model`` with DP-SGD for ``round(epochs / sample_rate)`` steps.

    Give exactly one of ``target_epsilon`` (then :math:`\\sigma` is the smallest noise multiplier
    with ``privrec.accounting.get_epsilon(...) <= target_epsilon`` at ``delta``; ``math.inf`` means
    :math:`\\sigma=0`, clipping only) or ``noise_multiplier``.
    """
    if (target_epsilon is None) == (noise_multiplier is None):
        raise ValueError("give exactly one of target_epsilon and noise_multiplier")
    delta = check_delta(delta)
    sample_rate = check_sample_rate(sample_rate)
    steps = _steps_for(epochs, sample_rate)
    if target_epsilon is not None:
        target_epsilon = _check_epsilon_or_inf("target_epsilon", target_epsilon)
        sigma = (0.0 if math.isinf(target_epsilon) else _noise_for_target(
            target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps))
    else:
        sigma = non_negative("noise_multiplier", noise_multiplier)
    if validation is not None:
        if loss != "squared":
            raise ValueError("validation RMSE needs loss='squared'")
        validate_ratings(validation, n_users=model.n_users, n_items=model.n_items, name="validation")
    trainer = DPSGD(model, train, clip_norm=clip_norm, noise_multiplier=sigma,
                    sample_rate=sample_rate, lr=lr, reg=reg, bias_reg=bias_reg,
                    trainable=trainable, loss=loss, n_negatives=n_negatives, seed=seed)
    steps_per_epoch = max(1, int(round(1 / sample_rate)))
    result = DPSGDResult(noise_multiplier=sigma, epsilon=math.inf, delta=delta, steps=steps,
                         sample_rate=sample_rate, clip_norm=trainer.clip_norm)
    start = time.perf_counter()
    for t in range(steps):
        trainer.step()
        if validation is not None and ((t + 1) % steps_per_epoch == 0 or t + 1 == steps):
            result.val_rmse.append(evaluate_ratings(model, validation)["rmse"])
    result.seconds = time.perf_counter() - start
    result.epsilon = trainer.epsilon(delta)
    return result


# ----------------------------------------------------------------------------------------------
# Input perturbation (the source article's approach), with the same model downstream
# ----------------------------------------------------------------------------------------------

def laplace_perturb_ratings(ratings: pd.DataFrame, *, epsilon: float, low: float = 1.0,
                            high: float = 5.0, clamp: bool = True, seed: int = 0) -> pd.DataFrame:
    """Each rating value plus Laplace noise of scale :math:`b=\\Delta/\\varepsilon`, :math:`\\Delta=`
    ``high - low`` (4 for stars 1..5), then clamped to ``[low, high]`` (post-processing).

    Each value is :math:`\\varepsilon`-DP against *changing that one rating's value* -- a local
    guarantee, no trusted curator needed. It does not hide *which* (user, item) pairs exist: the
    table of who rated what is published unchanged. ``epsilon=math.inf`` returns a copy.
    """
    validate_ratings(ratings)
    epsilon = _check_epsilon_or_inf("epsilon", epsilon)
    low, high = real("low", low), real("high", high)
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"need finite low < high, got low={low!r}, high={high!r}")
    out = ratings.copy()
    values = out["rating"].to_numpy(np.float64)
    if not math.isinf(epsilon):
        values = laplace_mechanism(values, sensitivity=high - low, epsilon=epsilon, seed=seed)
    if clamp:
        values = np.clip(values, low, high)
    out["rating"] = values.astype(np.float32)
    return out


def randomized_response_interactions(ratings: pd.DataFrame, *, n_users: int, n_items: int,
                                     epsilon: float, seed: int = 0) -> pd.DataFrame:
    """Randomized response (Warner 1965) on every cell of the user x item "interacted" matrix.

    Each of the :math:`U\\times I` bits is kept with probability :math:`e^\\varepsilon/(1+e^\\varepsilon)`
    and flipped otherwise: :math:`\\varepsilon`-DP per bit, so unlike Laplace on values it also hides
    *whether* a rating exists. Returns the noisy positives as a ratings table (``rating`` 1.0,
    ``timestamp`` 0), ready for :func:`privrec.train.fit_implicit`. At small :math:`\\varepsilon` most
    of the roughly :math:`UI/(1+e^\\varepsilon)` positives are fake.
    """
    validate_ratings(ratings, n_users=n_users, n_items=n_items)
    epsilon = _check_epsilon_or_inf("epsilon", epsilon)
    truth = torch.zeros(n_users, n_items, dtype=torch.bool)
    truth[torch.as_tensor(ratings["user"].to_numpy()), torch.as_tensor(ratings["item"].to_numpy())] = True
    if not math.isinf(epsilon):
        truth = randomized_response(truth.to(torch.uint8), epsilon=epsilon, seed=seed).bool()
    u, i = truth.nonzero(as_tuple=True)
    return pd.DataFrame({"user": u.numpy().astype(np.int64), "item": i.numpy().astype(np.int64),
                         "rating": np.ones(len(u), np.float32),
                         "timestamp": np.zeros(len(u), np.int64)})


# ----------------------------------------------------------------------------------------------
# Closing the gap: private biases, then DP-SGD on the residuals
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PrivateBiases:
    """Noisy global mean and user/item biases from two Gaussian releases of per-row sums.

    ``noise_multiplier`` is the :math:`z` of both releases (noise std = :math:`z` times each
    release's L2 sensitivity); ``epsilon`` what the two releases alone cost at ``delta``.
    """

    global_mean: float
    user_bias: torch.Tensor
    item_bias: torch.Tensor
    noise_multiplier: float
    epsilon: float
    delta: float


def _bias_rdp(noise_multiplier: float, orders: np.ndarray, releases: int = 2) -> np.ndarray:
    """RDP of ``releases`` full-batch Gaussian releases at noise multiplier ``noise_multiplier``."""
    if noise_multiplier == 0:
        return np.full(len(orders), np.inf)
    return compute_rdp(sample_rate=1.0, noise_multiplier=noise_multiplier, steps=releases,
                       orders=orders)


def _shrinkage(counts: torch.Tensor, reg: float, noise_std: float) -> torch.Tensor:
    """Denominator :math:`n + \\lambda(1 + s^2/\\max(n, 1))` of a noisy bias :math:`S/(\\cdot)`.

    Without noise this is the usual :math:`n+\\lambda` (a Gaussian prior on the bias with variance
    :math:`\\sigma_r^2/\\lambda`). A noisy sum :math:`S` carries extra variance :math:`s^2`; treating it
    as :math:`s^2/n` more variance per rating (with the public guess :math:`\\sigma_r^2 = 1` star^2)
    gives the extra term, so rarely rated rows are pulled towards 0 harder when the noise is large.
    Uses only noisy counts and public constants: post-processing.
    """
    return counts + reg * (1.0 + noise_std ** 2 / counts.clamp(min=1.0))


@torch.no_grad()
def private_biases(train: pd.DataFrame, *, n_users: int, n_items: int, noise_multiplier: float,
                   delta: float = 1e-5, center: float = 3.0, rating_bound: float = 2.0,
                   residual_bound: float = 2.0, reg_user: float = 15.0, reg_item: float = 10.0,
                   noise_aware: bool = True, seed: int = 0) -> PrivateBiases:
    """Regularised biases (as :func:`privrec.train.fit_bias_baseline`) from noisy sufficient statistics.

    Release 1 (items): for every item, :math:`S_i=\\sum_u \\mathrm{clip}(r_{ui}-c,\\pm B_r)` and the
    count :math:`n_i`, each plus :math:`\\mathcal N(0, z^2\\Delta_1^2)` with
    :math:`\\Delta_1=\\sqrt{B_r^2+1}` (one rating moves one item's sum by at most :math:`B_r` and its
    count by 1). Then :math:`\\hat\\mu = c + \\sum_i S_i/\\sum_i n_i` and
    :math:`b_i = (S_i - n_i(\\hat\\mu-c))/(\\lambda_i+n_i)`.

    Release 2 (users): :math:`T_u=\\sum_i\\mathrm{clip}(r_{ui}-\\hat\\mu-b_i,\\pm B)` and :math:`m_u`, with
    noise :math:`z\\sqrt{B^2+1}`; :math:`b_u = T_u/(\\lambda_u+m_u)`.

    With ``noise_aware`` the shrinkage grows with the noise (see ``_shrinkage``); without it the
    denominators are the plain :math:`n+\\lambda`. With :math:`z=0` the
    estimates equal :func:`privrec.train.fit_bias_baseline`'s first alternating step.
    Every item and every user gets noise, rated or not. The centre :math:`c=3` (the middle of the
    star scale) is public. Two Gaussian mechanisms at noise multiplier :math:`z` compose in RDP to
    :math:`\\alpha/z^2`; :attr:`PrivateBiases.epsilon` reports their cost alone.
    """
    validate_ratings(train, n_users=n_users, n_items=n_items, name="train")
    z = non_negative("noise_multiplier", noise_multiplier)
    delta = check_delta(delta)
    center = real("center", center)
    rating_bound = positive("rating_bound", rating_bound)
    residual_bound = positive("residual_bound", residual_bound)
    reg_user = non_negative("reg_user", reg_user)
    reg_item = non_negative("reg_item", reg_item)
    users, items, ratings = ratings_to_tensors(train)
    ratings = ratings.double()
    gen = torch.Generator().manual_seed(int(seed))

    def noisy_sums(index: torch.Tensor, values: torch.Tensor, size: int, bound: float):
        std = z * math.sqrt(bound ** 2 + 1.0)
        sums = torch.zeros(size, dtype=torch.double).index_add_(0, index, values)
        counts = torch.bincount(index, minlength=size).double()
        if std > 0:
            sums += std * torch.randn(size, generator=gen, dtype=torch.double)
            counts += std * torch.randn(size, generator=gen, dtype=torch.double)
        return sums, counts.clamp(min=0.0)

    s_i, n_i = noisy_sums(items, (ratings - center).clamp(-rating_bound, rating_bound), n_items,
                          rating_bound)
    offset = float(s_i.sum() / n_i.sum().clamp(min=1.0))
    offset = max(-rating_bound, min(rating_bound, offset))
    boost = 1.0 if noise_aware else 0.0
    b_i = (s_i - n_i * offset) / _shrinkage(n_i, reg_item,
                                            boost * z * math.sqrt(rating_bound ** 2 + 1))
    mu = center + offset
    residual = (ratings - mu - b_i[items]).clamp(-residual_bound, residual_bound)
    t_u, m_u = noisy_sums(users, residual, n_users, residual_bound)
    b_u = t_u / _shrinkage(m_u, reg_user, boost * z * math.sqrt(residual_bound ** 2 + 1))
    orders = RDPAccountant().orders
    eps = math.inf if z == 0 else rdp_to_epsilon(orders=orders, rdp=_bias_rdp(z, orders),
                                                 delta=delta)[0]
    return PrivateBiases(global_mean=mu, user_bias=b_u.float(), item_bias=b_i.float(),
                         noise_multiplier=z, epsilon=eps, delta=delta)


@torch.no_grad()
def private_item_popularity(train: pd.DataFrame, *, n_users: int, n_items: int,
                            noise_multiplier: float, delta: float = 1e-5, n_negatives: int = 4,
                            seed: int = 0) -> PrivateBiases:
    """Implicit-feedback analogue of :func:`private_biases`: noisy item counts as item biases.

    One interaction adds 1 to one item's count (L2 sensitivity 1), so a single Gaussian release
    :math:`\\tilde n_i = n_i + \\mathcal N(0, z^2)` on *every* item protects it. With ``n_negatives``
    uniform negatives per positive, the logistic model that knows only the item has
    :math:`b_i = \\log\\bigl(n_i / (k N / I)\\bigr)`; we plug in :math:`\\max(\\tilde n_i, 1/2)` and
    :math:`\\tilde N=\\sum_i \\tilde n_i` (post-processing). User biases do not change a user's
    ranking and stay 0.
    """
    validate_ratings(train, n_users=n_users, n_items=n_items, name="train")
    z = non_negative("noise_multiplier", noise_multiplier)
    delta = check_delta(delta)
    counts = torch.bincount(torch.as_tensor(train["item"].to_numpy()), minlength=n_items).double()
    if z > 0:
        gen = torch.Generator().manual_seed(int(seed))
        counts = counts + z * torch.randn(n_items, generator=gen, dtype=torch.double)
    counts = counts.clamp(min=0.5)
    item_bias = torch.log(counts * n_items / (n_negatives * counts.sum()))
    orders = RDPAccountant().orders
    eps = math.inf if z == 0 else rdp_to_epsilon(orders=orders, rdp=_bias_rdp(z, orders, 1),
                                                 delta=delta)[0]
    return PrivateBiases(global_mean=0.0, user_bias=torch.zeros(n_users), item_bias=item_bias.float(),
                         noise_multiplier=z, epsilon=eps, delta=delta)


@functools.lru_cache(maxsize=256)
def _split_budget(*, target_epsilon: float, delta: float, bias_share: float, sample_rate: float,
                  steps: int, bias_releases: int = 2) -> tuple[float, float]:
    """``(z, sigma)``: bias noise costing ``bias_share * target_epsilon`` alone, then the smallest
    DP-SGD noise whose RDP composed with it stays within ``target_epsilon``."""
    orders = RDPAccountant().orders
    z = get_noise_multiplier(target_epsilon=bias_share * target_epsilon, delta=delta,
                             sample_rate=1.0, steps=bias_releases)
    bias_rdp = _bias_rdp(z, orders, bias_releases)

    def total(sigma: float) -> float:
        rdp = bias_rdp + compute_rdp(sample_rate=sample_rate, noise_multiplier=sigma, steps=steps,
                                     orders=orders)
        return rdp_to_epsilon(orders=orders, rdp=rdp, delta=delta)[0]

    low, high = 0.0, 1.0
    while total(high) > target_epsilon:
        low, high = high, 2.0 * high
        if high > 1e6:
            raise ValueError(f"target_epsilon={target_epsilon} unreachable with these settings")
    while high - low > 1e-3 * high:
        mid = 0.5 * (low + high)
        if total(mid) <= target_epsilon:
            high = mid
        else:
            low = mid
    return z, high


@dataclass
class PrivateResidualResult:
    """What :func:`fit_private_bias_residual` ran and spent (``epsilon`` is the composed total)."""

    biases: PrivateBiases
    dpsgd: DPSGDResult
    epsilon: float
    delta: float


def fit_private_bias_residual(train: pd.DataFrame, *, n_users: int, n_items: int, target_epsilon: float,
                              delta: float = 1e-5, bias_share: float = 0.25, dim: int = 16,
                              epochs: float = 10, sample_rate: float = 0.05, clip_norm: float = 0.5,
                              lr: float = 0.01, reg: float = 0.0,
                              reg_user: float = 15.0, reg_item: float = 10.0,
                              noise_aware: bool = True, init_std: float = 0.1,
                              loss: str = "squared", n_negatives: int = 4, seed: int = 0,
                              validation: pd.DataFrame | None = None,
                              ) -> tuple[BiasedMF, PrivateResidualResult]:
    """Private biases (a ``bias_share`` of the budget), then DP-SGD on the factors only.

    Biases carry most of what a rating model knows (the bias-only model is hard to beat) and their
    sufficient statistics are sums with sensitivity about 2 -- cheap to release with the Gaussian
    mechanism. DP-SGD is then left to learn the residual interactions, with a smaller model and a
    larger batch (noise per step shrinks as :math:`1/(qN)`). The two parts compose in RDP, so the
    returned model is ``(target_epsilon, delta)``-DP at rating level. ``target_epsilon=math.inf``
    runs the same pipeline without noise.

    ``loss="logistic"`` is the implicit-feedback version: the biases are
    :func:`private_item_popularity` (one release) and DP-SGD uses the logistic loss with
    ``n_negatives`` sampled negatives.
    """
    if loss not in ("squared", "logistic"):
        raise ValueError(f"loss must be 'squared' or 'logistic', got {loss!r}")
    releases = 2 if loss == "squared" else 1
    target_epsilon = _check_epsilon_or_inf("target_epsilon", target_epsilon)
    delta = check_delta(delta)
    bias_share = real("bias_share", bias_share)
    if not (0.0 < bias_share < 1.0):
        raise ValueError(f"bias_share must be in (0, 1), got {bias_share!r}")
    sample_rate = check_sample_rate(sample_rate)
    steps = _steps_for(epochs, sample_rate)
    if math.isinf(target_epsilon):
        z, sigma = 0.0, 0.0
    else:
        z, sigma = _split_budget(target_epsilon=target_epsilon, delta=delta, bias_share=bias_share,
                                 sample_rate=sample_rate, steps=steps, bias_releases=releases)
    if loss == "squared":
        biases = private_biases(train, n_users=n_users, n_items=n_items, noise_multiplier=z,
                                delta=delta, reg_user=reg_user, reg_item=reg_item,
                                noise_aware=noise_aware, seed=seed)
    else:
        biases = private_item_popularity(train, n_users=n_users, n_items=n_items,
                                         noise_multiplier=z, delta=delta, n_negatives=n_negatives,
                                         seed=seed)
    model = BiasedMF(n_users, n_items, dim, global_mean=biases.global_mean, init_std=init_std,
                     seed=seed)
    with torch.no_grad():
        model.user_bias.copy_(biases.user_bias)
        model.item_bias.copy_(biases.item_bias)
    if dim > 0:
        run = fit_dpsgd(model, train, noise_multiplier=sigma, delta=delta, epochs=epochs,
                        sample_rate=sample_rate, clip_norm=clip_norm, lr=lr, reg=reg,
                        trainable=("user_factors", "item_factors"), loss=loss,
                        n_negatives=n_negatives, seed=seed + 1, validation=validation)
    else:
        run = DPSGDResult(noise_multiplier=0.0, epsilon=0.0, delta=delta, steps=0,
                          sample_rate=sample_rate, clip_norm=clip_norm)
    if math.isinf(target_epsilon):
        total = math.inf
    else:
        orders = RDPAccountant().orders
        rdp = _bias_rdp(z, orders, releases)
        if dim > 0:
            rdp = rdp + compute_rdp(sample_rate=sample_rate, noise_multiplier=sigma, steps=steps,
                                    orders=orders)
        total = rdp_to_epsilon(orders=orders, rdp=rdp, delta=delta)[0]
    return model, PrivateResidualResult(biases=biases, dpsgd=run, epsilon=total, delta=delta)

"""DP-SGD for the embedding recommender (Abadi et al. 2016, Algorithm 1), at rating level.

A record is one rating (squared loss) or one interaction (logistic loss); two training sets are
neighbours when one has a record the other lacks (add/remove). Each step

1. samples a batch by Poisson sampling (:meth:`DPSGD.sample_batch`) -- every record joins
   independently with probability :math:`q`, the sampling the RDP analysis assumes; the batch may
   be empty;
2. computes each record's gradient :math:`g_j` in closed form (:mod:`privrec.central.per_example`), clips
   it to norm :math:`C` and sums (:meth:`DPSGD.clipped_sum`);
3. adds :math:`\\mathcal N(0,\\sigma^2C^2)` noise to *every coordinate of every trainable table*
   and divides by the expected batch size :math:`qN` (:meth:`DPSGD.add_noise`):
   :math:`\\tilde g=(\\sum_j\\bar g_j + \\sigma C\\xi)/(qN)`;
4. hands :math:`\\tilde g` to Adam (any optimiser is post-processing) and records the step on the
   run's :class:`~privrec.dp.ledger.PrivacyLedger` -- also at :math:`\\sigma = 0`, where the ledger
   then reports :math:`\\varepsilon=\\infty`.

Why every row gets noise. A rating about item :math:`i` changes only row :math:`i` of the gradient,
but *which* rows are non-zero is itself data: if only touched rows were noised, an item no sampled
rating touches would get an exactly-zero update, and an observer comparing the released tables
before and after the step would learn that nobody in the batch rated it. The Gaussian mechanism's
guarantee needs the same noise distribution on all coordinates whatever the data are, so the noise
is dense even though the signal is sparse.

:math:`N` (the number of training records) is treated as public, as Opacus does: the expected batch
:math:`qN` divides the noisy sum, and the ledger's default :math:`\\delta` is
:func:`privrec.dp.ledger.default_delta` of it.

What rating-level DP does not protect. A user with 200 ratings is 200 records: by group privacy
their whole history is protected only at roughly :math:`200\\varepsilon` (worse with
:math:`\\delta`), i.e. not at all. User-level DP comes with the federated chapters.

Security note: noise is floating-point Gaussian from torch's Mersenne-Twister generator
(:func:`privrec.dp.primitives.gaussian_noise`), fine for teaching and measuring but not for a
production release: floating-point samples leak through their low-order bits (Mironov 2012), and
Opacus's ``secure_mode`` uses a cryptographic generator.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import pandas as pd
import torch
from torch.optim.adam import adam

from ..core.checks import (
    check_sample_rate,
    choice,
    epsilon_or_inf,
    instance,
    int_in,
    non_negative,
    positive,
)
from ..core.results import FitResult
from ..dp.ledger import PrivacyEvent, PrivacyLedger
from ..dp.primitives import gaussian_noise, poisson_sample
from ..recsys.data import validate_ratings
from ..recsys.metrics import evaluate_ratings
from ..recsys.models import BiasedMF
from ..recsys.train import ratings_to_tensors
from .per_example import mf_clipped_gradient_sum, mf_implicit_clipped_gradient_sum, trainable_names

__all__ = ["LOSS_UNITS", "BATCH_CHUNK", "BLOCK_ELEMENTS", "row_blocks", "noisy_average",
           "blocked_adam_step", "DPSGD", "dpsgd_steps", "fit_dpsgd"]

#: The privacy unit of one training record, by loss.
LOSS_UNITS = {"squared": "rating", "logistic": "interaction"}
STEP_NAME = "DP-SGD step"
#: Examples per chunk of the per-example pass, and elements per block of the dense passes (noise,
#: Adam): working sets that stay in the CPU cache, so that a step costs the same per record on
#: large tables as on small ones. Below these sizes one chunk is the unchunked computation; above
#: them the noise and Adam give the same numbers block by block (see :func:`row_blocks`) and only
#: the rounding of the global-bias sum changes.
BATCH_CHUNK = 1 << 14
BLOCK_ELEMENTS = 1 << 18


def row_blocks(table: torch.Tensor, block_elements: int = BLOCK_ELEMENTS) -> list:
    """Row slices covering ``table`` in blocks of about ``block_elements`` elements.

    Every block but the last holds a multiple of 16 elements and the last at least 16: torch's
    normal sampler fills blocks of 16 in order, so drawing block by block gives the very numbers
    one draw of the whole table gives (tested). A small table is one block (a 0-d one: ``...``).
    """
    instance("table", table, torch.Tensor)
    block_elements = int_in("block_elements", block_elements, 16)
    if table.dim() == 0:
        return [...]
    row = max(1, math.prod(table.shape[1:]))
    rows = max(16, block_elements // row // 16 * 16)
    blocks = [slice(a, min(a + rows, len(table))) for a in range(0, max(len(table), 1), rows)]
    if len(blocks) > 1 and (blocks[-1].stop - blocks[-1].start) * row < 16:
        blocks[-2:] = [slice(blocks[-2].start, blocks[-1].stop)]
    return blocks


def _noisy_table(g: torch.Tensor, std: float, denom: float,
                 generator: torch.Generator) -> torch.Tensor:
    """:math:`(g + \\mathcal N(0, \\text{std}^2)) / \\text{denom}`, drawn block by block."""
    blocks = row_blocks(g)
    if std == 0 or len(blocks) == 1:
        return (g + gaussian_noise(g.shape, std=std, generator=generator, dtype=g.dtype)) / denom
    out = torch.empty_like(g)
    for rows in blocks:
        noise = gaussian_noise(g[rows].shape, std=std, generator=generator, dtype=g.dtype)
        torch.add(g[rows], noise, out=out[rows]).div_(denom)
    return out


@torch.no_grad()
def blocked_adam_step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()`` of a plain :class:`torch.optim.Adam`, one :func:`row_blocks` block at
    a time: torch's own functional ``adam`` on row views (the same arithmetic, so the same
    numbers), with each block's parameters, gradient and moments in cache together. Any other
    optimiser or Adam variant (AMSGrad, fused, ...) takes its own ``step()``."""
    groups = instance("optimizer", optimizer, torch.optim.Optimizer).param_groups
    plain = type(optimizer) is torch.optim.Adam and not any(
        g["amsgrad"] or g["capturable"] or g["differentiable"] or g["fused"] or g["foreach"]
        for g in groups)
    params = [p for g in groups for p in g["params"] if p.grad is not None]
    if not plain or all(len(row_blocks(p)) == 1 for p in params):
        optimizer.step()
        return
    for group in groups:
        for p in (p for p in group["params"] if p.grad is not None):
            state = optimizer.state[p]
            if not state:  # as torch.optim.Adam initialises it
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            for rows in row_blocks(p):
                adam(
                    [p[rows]], [p.grad[rows]], [state["exp_avg"][rows]],
                    [state["exp_avg_sq"][rows]], [], [state["step"].clone()], foreach=False,
                    amsgrad=False, beta1=group["betas"][0], beta2=group["betas"][1],
                    lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                    maximize=group["maximize"])
            state["step"] += 1


@torch.no_grad()
def noisy_average(summed: dict[str, torch.Tensor], *, noise_multiplier: float, clip_norm: float,
                  expected_batch_size: float, generator: torch.Generator,
                  ) -> dict[str, torch.Tensor]:
    """:math:`(\\sum_j\\bar g_j + \\sigma C\\xi)/(qN)` with :math:`\\xi\\sim\\mathcal N(0, I)` on every
    coordinate of every tensor -- touched or not (see the module docstring for why).

    Dividing by the *expected* batch size :math:`qN` (public), not the realised one, keeps the
    sensitivity of the average at :math:`C/(qN)`; the realised size is itself private. The noise
    is :func:`privrec.dp.primitives.gaussian_noise`.
    """
    std = non_negative("noise_multiplier", noise_multiplier) * positive("clip_norm", clip_norm)
    denom = positive("expected_batch_size", expected_batch_size)
    instance("generator", generator, torch.Generator)
    instance("summed", summed, dict)
    return {name: _noisy_table(g, std, denom, generator) for name, g in summed.items()}


class DPSGD:
    """DP-SGD for :class:`~privrec.recsys.models.BiasedMF` at rating (or interaction) level.

    One step is ``add_noise(clipped_sum(sample_batch()))`` followed by Adam; the three methods are
    small and public so that an audit can subclass them (and break them on purpose).

    Parameters
    ----------
    model:
        Trained in place.
    train:
        Ratings table; its length :math:`N` (public) and ``sample_rate`` fix the expected batch.
    clip_norm:
        :math:`C`, the per-record gradient norm bound (> 0).
    noise_multiplier:
        :math:`\\sigma` (>= 0; 0 means clipping without privacy, :math:`\\varepsilon=\\infty`).
    sample_rate:
        :math:`q \\in (0, 1]`, the Poisson inclusion probability of each record per step.
    lr, reg, bias_reg:
        Adam step size; per-record L2 strengths inside the clipped loss.
    trainable:
        Tables to train (default all); the others stay fixed and get no noise.
    loss:
        ``"squared"`` (explicit ratings; unit ``"rating"``) or ``"logistic"`` (implicit feedback:
        each row is a positive with ``n_negatives`` uniform negatives; unit ``"interaction"``).
    n_negatives:
        Negatives per positive for ``loss="logistic"``.
    seed:
        Seeds batch sampling, negatives and noise.
    ledger:
        Where the steps are recorded (default: a new ledger of the loss's unit over :math:`N`
        records with ``delta``); pass one to compose with earlier releases.
    delta:
        :math:`\\delta` of a new ledger (default :func:`privrec.dp.ledger.default_delta`).

    Raises
    ------
    TypeError
        If ``model`` is not a BiasedMF.
    ValueError
        For out-of-range parameters, an empty ``train``, or a ledger about another unit.
    """

    def __init__(self, model: BiasedMF, train: pd.DataFrame, *, clip_norm: float,
                 noise_multiplier: float, sample_rate: float, lr: float = 0.01, reg: float = 0.0,
                 bias_reg: float = 0.0, trainable: Sequence[str] | None = None,
                 loss: str = "squared", n_negatives: int = 4, seed: int = 0,
                 ledger: PrivacyLedger | None = None, delta: float | None = None) -> None:
        if not isinstance(model, BiasedMF):
            raise TypeError(f"model must be a BiasedMF, got {type(model).__name__}")
        validate_ratings(train, n_users=model.n_users, n_items=model.n_items, name="train")
        int_in("len(train)", len(train), 1)
        self.model = model
        self.clip_norm = positive("clip_norm", clip_norm)
        self.noise_multiplier = non_negative("noise_multiplier", noise_multiplier)
        self.sample_rate = check_sample_rate(sample_rate)
        self.lr = positive("lr", lr)
        self.reg = non_negative("reg", reg)
        self.bias_reg = non_negative("bias_reg", bias_reg)
        self.trainable = trainable_names(trainable)
        self.loss = choice("loss", loss, tuple(LOSS_UNITS))
        self.n_negatives = int_in("n_negatives", n_negatives, 1)
        self.users, self.items, self.ratings = ratings_to_tensors(train)
        self.n_examples = len(self.ratings)
        self.expected_batch_size = self.sample_rate * self.n_examples
        self.generator = torch.Generator().manual_seed(int_in("seed", seed, 0))
        unit = LOSS_UNITS[self.loss]
        self.ledger = (PrivacyLedger(unit=unit, n_units=self.n_examples, delta=delta)
                       if ledger is None else ledger)
        instance("ledger", self.ledger, PrivacyLedger)
        if self.ledger.unit != unit:
            raise ValueError(f"ledger unit must be {unit!r} for loss={self.loss!r}, "
                             f"got {self.ledger.unit!r}")
        self.steps_taken = 0
        self.optimizer = torch.optim.Adam([getattr(model, n) for n in self.trainable], lr=self.lr)

    def sample_batch(self) -> torch.Tensor:
        """Ids of a Poisson sample (:func:`privrec.dp.primitives.poisson_sample`); may be empty."""
        return poisson_sample(self.n_examples, sample_rate=self.sample_rate,
                              generator=self.generator)

    def clipped_sum(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """:math:`\\sum_{j\\in\\text{index}}\\bar g_j`, dense per trainable table (zeros if empty),
        summed :data:`BATCH_CHUNK` examples at a time."""
        users, items = self.users[index], self.items[index]
        if self.loss == "logistic":
            negatives = torch.randint(self.model.n_items, (len(index), self.n_negatives),
                                      generator=self.generator)
            items = torch.cat([items[:, None], negatives], 1)
        ratings, summed = self.ratings[index], None
        for start in range(0, max(len(index), 1), BATCH_CHUNK):
            part = slice(start, start + BATCH_CHUNK)
            if self.loss == "squared":
                summed, _ = mf_clipped_gradient_sum(
                    self.model, users[part], items[part], ratings[part], clip_norm=self.clip_norm,
                    reg=self.reg, bias_reg=self.bias_reg, trainable=self.trainable, out=summed)
            else:
                summed, _ = mf_implicit_clipped_gradient_sum(
                    self.model, users[part], items[part], clip_norm=self.clip_norm, reg=self.reg,
                    trainable=self.trainable, out=summed)
        return summed

    def add_noise(self, summed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:func:`noisy_average` of ``summed`` with this run's :math:`\\sigma`, :math:`C`, :math:`qN`."""
        return noisy_average(summed, noise_multiplier=self.noise_multiplier,
                             clip_norm=self.clip_norm, expected_batch_size=self.expected_batch_size,
                             generator=self.generator)

    def noisy_gradient(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The released gradient for the records ``index``: ``add_noise(clipped_sum(index))``."""
        return self.add_noise(self.clipped_sum(index))

    def step(self, index: torch.Tensor | None = None) -> None:
        """One DP-SGD step on a fresh Poisson batch, recorded on the ledger (``index`` overrides
        the batch: benchmarks only -- a fixed batch is not what the accountant assumes)."""
        grads = self.noisy_gradient(self.sample_batch() if index is None else index)
        for name, g in grads.items():
            getattr(self.model, name).grad = g
        blocked_adam_step(self.optimizer)
        self.steps_taken += 1
        self.ledger.record_gaussian(STEP_NAME, noise_multiplier=self.noise_multiplier,
                                    sample_rate=self.sample_rate)

    def epsilon(self) -> float:
        """The ledger's :math:`\\varepsilon` (0 before any release; ``inf`` after a step at σ = 0)."""
        return self.ledger.epsilon()


def dpsgd_steps(*, epochs: float, sample_rate: float) -> int:
    """Number of steps of ``epochs`` passes at ``sample_rate``: ``max(1, round(epochs / q))``."""
    return max(1, int(round(positive("epochs", epochs) / check_sample_rate(sample_rate))))


def _noise_multiplier(ledger: PrivacyLedger, *, target_epsilon: float | None,
                      noise_multiplier: float | None, sample_rate: float, steps: int) -> float:
    """σ given directly, or the smallest one whose steps keep ``ledger`` within ``target_epsilon``
    (``math.inf``: no noise) -- :meth:`PrivacyLedger.calibrate`, the one search."""
    if (target_epsilon is None) == (noise_multiplier is None):
        raise ValueError("give exactly one of target_epsilon and noise_multiplier")
    if noise_multiplier is not None:
        return non_negative("noise_multiplier", noise_multiplier)
    target = epsilon_or_inf("target_epsilon", target_epsilon)
    if math.isinf(target):
        return 0.0
    return ledger.calibrate(
        lambda z: [PrivacyEvent(STEP_NAME, "gaussian", z, sample_rate, steps, ledger.unit)],
        target_epsilon=target)


def _check_fit(model: BiasedMF, train: pd.DataFrame, *, loss: str,
               validation: pd.DataFrame | None, trainer: object) -> str:
    """The arguments :func:`fit_dpsgd` checks before any calibration; returns the privacy unit."""
    if not (isinstance(trainer, type) and issubclass(trainer, DPSGD)):
        raise TypeError(f"trainer must be DPSGD or a subclass of it, got {trainer!r}")
    instance("model", model, BiasedMF)
    validate_ratings(train, n_users=model.n_users, n_items=model.n_items, name="train")
    unit = LOSS_UNITS[choice("loss", loss, tuple(LOSS_UNITS))]
    if validation is not None:
        choice("loss", loss, ("squared",))  # validation RMSE needs ratings
        validate_ratings(validation, n_users=model.n_users, n_items=model.n_items, name="validation")
    return unit


def fit_dpsgd(model: BiasedMF, train: pd.DataFrame, *, target_epsilon: float | None = None,
              noise_multiplier: float | None = None, delta: float | None = None,
              epochs: float = 10, sample_rate: float = 0.02, clip_norm: float = 1.0,
              lr: float = 0.01, reg: float = 0.0, bias_reg: float = 0.0,
              trainable: Sequence[str] | None = None, loss: str = "squared", n_negatives: int = 4,
              seed: int = 0, validation: pd.DataFrame | None = None,
              ledger: PrivacyLedger | None = None, trainer: type[DPSGD] = DPSGD) -> FitResult:
    """Train ``model`` with DP-SGD for :func:`dpsgd_steps` steps; every step goes on the ledger.

    Parameters
    ----------
    target_epsilon, noise_multiplier:
        Exactly one: the budget (σ is then calibrated by ``ledger.calibrate`` so that the ledger,
        including anything already on it, ends at most at ``target_epsilon``; ``math.inf`` means
        σ = 0) or σ itself.
    delta:
        :math:`\\delta` of a new ledger (default :func:`privrec.dp.ledger.default_delta` of
        ``len(train)``); ignored when ``ledger`` is given.
    validation:
        Ratings whose RMSE is recorded after every epoch in ``history["val_rmse"]`` (squared loss).
    ledger:
        A ledger to continue (e.g. after private biases); default a new one.
    trainer:
        The :class:`DPSGD` class to run (audits pass a subclass).

    Other parameters are those of :class:`DPSGD`.

    Returns
    -------
    FitResult
        ``model``, ``history`` (``val_rmse``), ``ledger`` (its ``epsilon()`` is the run's ε) and
        the training time.
    """
    unit = _check_fit(model, train, loss=loss, validation=validation, trainer=trainer)
    steps = dpsgd_steps(epochs=epochs, sample_rate=sample_rate)
    if ledger is None:
        ledger = PrivacyLedger(unit=unit, n_units=len(train), delta=delta)
    sigma = _noise_multiplier(ledger, target_epsilon=target_epsilon,
                              noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                              steps=steps)
    run = trainer(model, train, clip_norm=clip_norm, noise_multiplier=sigma, sample_rate=sample_rate,
                  lr=lr, reg=reg, bias_reg=bias_reg, trainable=trainable, loss=loss,
                  n_negatives=n_negatives, seed=seed, ledger=ledger)
    per_epoch = max(1, int(round(1 / run.sample_rate)))
    history: dict[str, list[float]] = {"val_rmse": []}
    start = time.perf_counter()
    for t in range(steps):
        run.step()
        if validation is not None and ((t + 1) % per_epoch == 0 or t + 1 == steps):
            history["val_rmse"].append(evaluate_ratings(model, validation)["rmse"])
    return FitResult(model=model, history=history, ledger=run.ledger,
                     seconds=time.perf_counter() - start)

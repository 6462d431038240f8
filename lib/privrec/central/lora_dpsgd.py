"""Interaction-level DP-SGD on the LoRA two-tower model: per-example gradients, Opacus, the ledger.

A trusted curator fine-tunes :class:`~privrec.recsys.lora.LoRATwoTower` with DP-SGD (Abadi et al.
2016): every step samples interactions with probability :math:`q` (Poisson), computes each one's
gradient -- a record is one interaction with its ``n_negatives`` sampled negatives, as in chapter 3
-- clips it to norm :math:`C`, sums, adds :math:`\\mathcal N(0,\\sigma^2C^2)` to every coordinate
and divides by :math:`qN`. The trainable parameters are the LoRA factors inside MiniLM (both, or only
:math:`B` for FFA-LoRA), the two-tower adapter and biases and the user tower: under central DP all of
them are released and all are noised. :math:`\\sigma` is calibrated on the ledger (unit:
interaction, :math:`\\delta` = ``default_delta(N)``), whose ε is the one reported.

:func:`per_example_gradients` is the library's ``torch.func`` computation;
:func:`opacus_lora_gradients` asks Opacus's hooks for the same LoRA gradients on the same model
(the tests and chapter 7 compare them to 1e-5).

References: Abadi et al. (2016), Deep learning with differential privacy, CCS; Yu et al. (2022),
Differentially private fine-tuning of language models, ICLR.
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..core.checks import epsilon_or_inf, instance, int_in, positive
from ..core.checks import seed as check_seed
from ..core.results import FitResult
from ..dp.events import PrivacyEvent
from ..dp.ledger import PrivacyLedger, default_delta
from ..dp.primitives import poisson_sample
from ..recsys.data import validate_ratings
from ..recsys.lora import LoRATwoTower
from ..recsys.two_tower import implicit_batch, negative_pool
from .dpsgd import noisy_average
from .per_example import clip_and_sum

__all__ = ["STEP_EVENT", "trainable_parameters", "example_losses", "per_example_gradients",
           "opacus_lora_gradients", "fit_lora_dpsgd"]

STEP_EVENT = "DP-SGD step"


def trainable_parameters(model: LoRATwoTower) -> dict[str, nn.Parameter]:
    """Name -> parameter of everything DP-SGD trains (``requires_grad``), by module path."""
    instance("model", model, LoRATwoTower)
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def example_losses(model: LoRATwoTower, users: torch.Tensor, items: torch.Tensor,
                   labels: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """``[B]`` binary cross-entropy of each record (``users [B]``, ``items [B, 1+n_neg]``)."""
    logits = model.predict_unchecked(users[..., None], items, width)
    return nn.functional.binary_cross_entropy_with_logits(
        logits, labels.expand_as(logits), reduction="none").mean(-1)


def per_example_gradients(model: LoRATwoTower, users: torch.Tensor, items: torch.Tensor,
                          labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{name: [B, *shape]}``: each record's gradient of every trainable parameter
    (``torch.func.vmap`` of ``torch.func.grad`` over the records, one program)."""
    params = {n: p.detach() for n, p in trainable_parameters(model).items()}
    width = int(model.encoder.lengths[items].max())

    def loss_of(p, user, its):
        out = torch.func.functional_call(_Losses(model, width), {f"model.{n}": v
                                                                 for n, v in p.items()},
                                         (user[None], its[None], labels))
        return out.sum()

    return torch.func.vmap(torch.func.grad(loss_of), in_dims=(None, 0, 0))(params, users, items)


class _Losses(nn.Module):
    def __init__(self, model: LoRATwoTower, width: int) -> None:
        super().__init__()
        self.model, self.width = model, width

    def forward(self, users, items, labels):
        return example_losses(self.model, users, items, labels, self.width)


def opacus_lora_gradients(model: LoRATwoTower, users: torch.Tensor, items: torch.Tensor,
                          labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-record gradients of the trainable **LoRA** factors computed by Opacus's
    ``GradSampleModule`` hooks on the same model (the other parameters frozen meanwhile)."""
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    lora = {n for n in saved if "lora_" in n and saved[n]}
    for n, p in model.named_parameters():
        p.requires_grad_(n in lora)
    with warnings.catch_warnings():
        return _opacus(model, users, items, labels, lora, saved)


def _opacus(model, users, items, labels, lora, saved):
    from opacus import GradSampleModule

    try:
        warnings.simplefilter("ignore")  # Opacus's hooks warn that no *input* needs a gradient
        wrapped = GradSampleModule(_Losses(model, int(model.encoder.lengths[items].max())),
                                   batch_first=True, loss_reduction="sum")
        wrapped(users, items, labels).sum().backward()
        out = {n: p.grad_sample.detach().clone() for n, p in model.named_parameters() if n in lora}
        wrapped._close()
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
            p.grad = None
            if hasattr(p, "grad_sample"):
                del p.grad_sample
    return out


def _calibrate(target_epsilon: float, *, sample_rate: float, steps: int, n: int,
               delta: float) -> float:
    if math.isinf(target_epsilon):
        return 0.0
    book = PrivacyLedger(unit="interaction", n_units=n, delta=delta)
    return book.calibrate(lambda z: [PrivacyEvent.gaussian(
        STEP_EVENT, noise_multiplier=z, sample_rate=sample_rate, count=steps,
        unit="interaction")], target_epsilon=target_epsilon)


def fit_lora_dpsgd(model: LoRATwoTower, train: pd.DataFrame, *, target_epsilon: float,
                   steps: int = 60, sample_rate: float = 0.002, clip_norm: float = 1.0,
                   lr: float = 0.01, n_negatives: int = 4, negative_items: object = None,
                   seed: int = 0) -> FitResult:
    """DP-SGD (module docstring) with Adam on the noisy average; ``target_epsilon=inf``: clipped,
    noise-free SGD with the same sampling (a reference run, no ledger).

    Returns
    -------
    FitResult
        ``history["loss"]`` per step; ``ledger``: the interaction-level ledger (``None`` without
        noise). ``ledger.epsilon()`` is the run's ε at ``δ = default_delta(len(train))``.
    """
    instance("model", model, LoRATwoTower)
    validate_ratings(train, n_users=model.n_users, n_items=model.n_items, name="train")
    target = epsilon_or_inf("target_epsilon", target_epsilon)
    steps, n = int_in("steps", steps, 1), int_in("len(train)", len(train), 1)
    q, clip_norm = positive("sample_rate", sample_rate), positive("clip_norm", clip_norm)
    delta = default_delta(n)
    sigma = _calibrate(target, sample_rate=q, steps=steps, n=n, delta=delta)
    gen = torch.Generator().manual_seed(check_seed("seed", seed))
    noise_gen = torch.Generator().manual_seed(check_seed("seed", seed) + 1)
    users = torch.as_tensor(train["user"].to_numpy(np.int64))
    items = torch.as_tensor(train["item"].to_numpy(np.int64))
    pool = negative_pool(model, negative_items)
    params = trainable_parameters(model)
    optimiser = torch.optim.Adam(list(params.values()), lr=positive("lr", lr))
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        index = poisson_sample(n, sample_rate=q, generator=gen)
        batch, labels = implicit_batch(items[index, None], pool,
                                       n_negatives=int_in("n_negatives", n_negatives, 1),
                                       generator=gen)
        batch = batch.reshape(len(index), -1)
        if len(index):
            grads = per_example_gradients(model, users[index], batch, labels)
            summed, _ = clip_and_sum(grads, clip_norm=clip_norm)
        else:
            summed = {name: torch.zeros_like(p) for name, p in params.items()}
        noisy = noisy_average(summed, noise_multiplier=sigma, clip_norm=clip_norm,
                              expected_batch_size=q * n, generator=noise_gen)
        for name, p in params.items():
            p.grad = noisy[name].reshape(p.shape)
        optimiser.step()
        with torch.no_grad():
            losses.append(float(example_losses(model, users[index], batch,
                                               labels).mean()) if len(index)
                          else math.nan)
    book = None
    if sigma > 0:
        book = PrivacyLedger(unit="interaction", n_units=n, delta=delta)
        book.record_gaussian(STEP_EVENT, noise_multiplier=sigma, sample_rate=q, count=steps)
    return FitResult(model, {"loss": losses}, book, time.perf_counter() - start)

"""What a sequence recommender memorises: canaries, exposure and extraction (Carlini et al. 2019).

*The Secret Sharer* measures unintended memorisation by planting **canaries**: a random secret,
here a sequence :math:`s` of :math:`k` catalogue items that follows a random prefix :math:`P` of
:math:`p` items, inserted at the end of the training histories of ``r`` canary users
(:func:`plant_canaries`; ``r`` = 1, 2, 4, 8 shows how memorisation grows with repetition). Then:

* **Exposure** (their Definition 4): with :math:`\\mathcal R` the :math:`V^k` sequences the secret
  was drawn from and :math:`P_x(c) = -\\log_2 \\Pr_\\theta(c \\mid P)` the log-perplexity of a
  continuation :math:`c` (:func:`continuation_log_likelihood`),

  .. math:: \\text{exposure}(s) = \\log_2|\\mathcal R| - \\log_2 \\text{rank}(s),\\qquad
            \\text{rank}(s) = |\\{c\\in\\mathcal R: P_x(c) \\le P_x(s)\\}|.

  :math:`|\\mathcal R|` is far too large to enumerate, so the rank is estimated from random
  continuations: the share of them at least as likely (sampled exposure, at most
  :math:`\\log_2 n`), and the **extrapolated** exposure of their Section 4.2, which fits a
  skew-normal distribution to the sampled log-perplexities (here by moments) and reads
  :math:`-\\log_2 F(P_x(s))`. A secret the model never saw has a uniform rank, so its exposure has
  mean :math:`1/\\ln 2 \\approx 1.44` bits: chance.
* **Extraction** (their Section 8): greedy or beam decoding from the prefix (:func:`extract`); a
  secret is extracted when the decoded sequence equals it exactly.

What DP promises (:func:`exposure_bound`): if training is :math:`(\\varepsilon,\\delta)`-DP with
respect to removing every copy of the secret, then averaged over the random secret
:math:`\\Pr[\\text{exposure}\\ge x] \\le e^{\\varepsilon}2^{-x}+\\delta`, so the expected exposure is at
most :math:`(\\varepsilon+1)/\\ln 2 + \\delta\\log_2|\\mathcal R|`. A secret in ``r`` users' histories is
a group of ``r`` users under user-level DP, and a group of :math:`rk` interactions under
interaction-level DP (:func:`group_guarantee`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import stats

from ..core.checks import check_delta, check_epsilon, epsilon_or_inf, int_in, non_negative
from ..core.checks import seed as check_seed
from ..recsys.data import validate_ratings
from ..recsys.sequential import SASRec

__all__ = ["CHANCE_EXPOSURE", "Canaries", "plant_canaries", "continuation_log_likelihood",
           "exposure_from_rank", "exposure", "extract", "memorisation_table", "group_guarantee",
           "exposure_bound"]

#: Mean exposure of a secret the model never saw: :math:`\\int_0^\\infty 2^{-x}dx = 1/\\ln 2`.
CHANCE_EXPOSURE = 1.0 / math.log(2.0)


@dataclass(frozen=True)
class Canaries:
    """Planted secrets. Row ``j``: ``prefixes[j]`` then ``secrets[j]`` (catalogue ids), inserted
    into the histories of ``users[j]`` (``repeats[j]`` users; 0 for a control that was never
    inserted)."""

    prefixes: np.ndarray
    secrets: np.ndarray
    repeats: np.ndarray
    users: tuple[np.ndarray, ...]
    n_items: int

    @property
    def max_exposure(self) -> float:
        """:math:`\\log_2|\\mathcal R| = k\\log_2 V` bits."""
        return self.secrets.shape[1] * math.log2(self.n_items)


def plant_canaries(train: pd.DataFrame, *, n_users: int, n_items: int,
                   repeats: tuple[int, ...] = (0, 1, 2, 4, 8), per_repeat: int = 4,
                   prefix_len: int = 5, secret_len: int = 5,
                   seed: int = 0) -> tuple[pd.DataFrame, Canaries]:
    """``train`` with canaries appended at the end of the canary users' histories.

    For each repetition count ``r`` in ``repeats``, ``per_repeat`` secrets are drawn, each a
    uniform prefix and a uniform secret (items with replacement); each is inserted into the
    histories of ``r`` distinct users (every canary user holds one secret), with timestamps after
    that user's last interaction, so it is the newest part of their history. ``r = 0`` makes a
    control: a fresh secret that is never inserted. Returns the new table and the
    :class:`Canaries`.
    """
    validate_ratings(train, n_users=int_in("n_users", n_users, 1),
                     n_items=int_in("n_items", n_items, 2))
    reps = np.array([int_in("repeats", r, 0) for r in repeats], dtype=np.int64)
    per, p, k = (int_in("per_repeat", per_repeat, 1), int_in("prefix_len", prefix_len, 1),
                 int_in("secret_len", secret_len, 1))
    if per * reps.sum() > n_users:
        raise ValueError(f"the canaries need {per * reps.sum()} distinct users, only {n_users} exist")
    rng = np.random.default_rng(check_seed("seed", seed))
    repeat_of = np.repeat(reps, per)
    prefixes = rng.integers(n_items, size=(len(repeat_of), p))
    secrets = rng.integers(n_items, size=(len(repeat_of), k))
    chosen = rng.choice(n_users, size=int(repeat_of.sum()), replace=False)
    users = tuple(np.sort(part, kind="stable")
                  for part in np.split(chosen, np.cumsum(repeat_of)[:-1]))
    last = train.groupby("user")["timestamp"].max().reindex(range(n_users), fill_value=0)
    rows = [pd.DataFrame({"user": u, "item": np.r_[prefixes[j], secrets[j]],
                          "rating": np.float32(1.0),
                          "timestamp": int(last.iloc[u]) + 1 + np.arange(p + k)})
            for j, group in enumerate(users) for u in group]
    planted = pd.concat([train[["user", "item", "rating", "timestamp"]], *rows], ignore_index=True)
    planted = planted.astype({"user": np.int64, "item": np.int64, "rating": np.float32,
                              "timestamp": np.int64})
    return planted, Canaries(prefixes, secrets, repeat_of, users, n_items)


@torch.no_grad()
def continuation_log_likelihood(model: SASRec, prefix: object, continuations: object, *,
                                batch_size: int = 1024) -> np.ndarray:
    """``[M]``: :math:`\\ln \\Pr_\\theta(c \\mid P)` of each continuation ``c`` (rows of
    ``continuations``, catalogue ids) after ``prefix``, under the full softmax."""
    prefix = torch.as_tensor(np.asarray(prefix, dtype=np.int64))
    cont = torch.as_tensor(np.atleast_2d(np.asarray(continuations, dtype=np.int64)))
    p, k = len(prefix), cont.shape[1]
    if p + k - 1 > model.max_len:
        raise ValueError(f"prefix and continuation need {p + k - 1} positions, the model has "
                         f"max_len={model.max_len}")
    model.eval()
    out = []
    for s in range(0, len(cont), int_in("batch_size", batch_size, 1)):
        part = cont[s:s + batch_size]
        full = torch.cat([prefix.expand(len(part), p), part], 1) + 1   # model ids
        hidden = model(full[:, :-1])[:, p - 1:]                          # states that predict c
        logp = torch.log_softmax(_as_double(model.logits(hidden)), -1)
        out.append(logp.gather(-1, part[..., None]).squeeze(-1).sum(1))
    return torch.cat(out).numpy()


def _as_double(values: torch.Tensor) -> torch.Tensor:
    """``values.double()`` (float32 to float64 is exact: the same numbers), converted by NumPy,
    which is vectorised where torch's baseline kernels (``ATEN_CPU_CAPABILITY=default``) convert
    one element at a time; a C-contiguous result, as ``double()`` gives. No gradient flows."""
    return torch.from_numpy(values.detach().numpy().astype(np.float64, order="C"))


def exposure_from_rank(rank: float, space_size: float) -> float:
    """Carlini et al.'s exposure, :math:`\\log_2|\\mathcal R| - \\log_2 \\text{rank}` (rank >= 1)."""
    rank, space = non_negative("rank", rank), non_negative("space_size", space_size)
    if not 1 <= rank <= space:
        raise ValueError(f"rank must be in [1, space_size] = [1, {space_size}], got {rank}")
    return math.log2(space) - math.log2(rank)


def _skewnorm_by_moments(x: np.ndarray) -> tuple[float, float, float]:
    """Skew-normal ``(a, loc, scale)`` with the sample's mean, variance and skewness (clipped to
    the family's range)."""
    mean, var = float(x.mean()), float(x.var())
    gamma = float(np.clip(stats.skew(x), -0.99, 0.99))
    g = abs(gamma) ** (2.0 / 3.0)
    delta = math.copysign(math.sqrt(math.pi / 2 * g / (g + ((4 - math.pi) / 2) ** (2 / 3))), gamma)
    scale = math.sqrt(var / (1 - 2 * delta ** 2 / math.pi))
    return delta / math.sqrt(1 - delta ** 2), mean - scale * delta * math.sqrt(2 / math.pi), scale


def exposure(model: SASRec, prefix: object, secret: object, *, n_samples: int = 1000,
             seed: int = 0) -> dict[str, float]:
    """Exposure of ``secret`` after ``prefix``, estimated from ``n_samples`` uniform random
    continuations of the same length (module docstring).

    Returns ``{"exposure": extrapolated, "sampled": -log2((#as likely + 1)/(n + 1)),
    "log_perplexity": P_x(secret) in bits, "max": log2|R|}``; the extrapolated value is capped to
    ``[0, max]``.
    """
    secret = np.asarray(secret, dtype=np.int64)
    rng = np.random.default_rng(check_seed("seed", seed))
    n = int_in("n_samples", n_samples, 10)
    randoms = rng.integers(model.n_items, size=(n, len(secret)))
    bits = -continuation_log_likelihood(model, prefix, np.vstack([secret, randoms])) / math.log(2)
    target, sample = bits[0], bits[1:]
    top = len(secret) * math.log2(model.n_items)
    a, loc, scale = _skewnorm_by_moments(sample)
    extrapolated = -stats.skewnorm.logcdf(target, a, loc, scale) / math.log(2)
    sampled = -math.log2((np.count_nonzero(sample <= target) + 1) / (n + 1))
    return {"exposure": float(min(max(extrapolated, 0.0), top)), "sampled": sampled,
            "log_perplexity": float(target), "max": top}


@torch.no_grad()
def extract(model: SASRec, prefix: object, *, length: int, beam_width: int = 1) -> np.ndarray:
    """The ``length`` items a beam search (``beam_width=1``: greedy) decodes after ``prefix``.

    The model reads the window of the whole canary (prefix, decoded items, padding for the
    rest), so positions match training and :func:`continuation_log_likelihood`. Every step keeps
    the ``beam_width`` most likely sequences; equal scores are ordered by the earlier beam, then
    the smaller item id (a stable sort), so the result is reproducible."""
    prefix = torch.as_tensor(np.asarray(prefix, dtype=np.int64))
    length, width = int_in("length", length, 1), int_in("beam_width", beam_width, 1)
    if len(prefix) + length - 1 > model.max_len:
        raise ValueError(f"prefix and {length} decoded items exceed max_len={model.max_len}")
    model.eval()
    p = len(prefix)
    seqs, scores = torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, dtype=torch.float64)
    for t in range(length):
        # The window of the whole canary, the undecoded future left as padding (causal: unseen),
        # so every position is where training put it (as in continuation_log_likelihood).
        future = torch.full((len(seqs), length - 1 - t), -1, dtype=torch.long)
        context = torch.cat([prefix.expand(len(seqs), -1), seqs, future], 1) + 1
        logp = torch.log_softmax(model.logits(model(context)[:, p - 1 + t]).double(), -1)
        total = (scores[:, None] + logp).reshape(-1)
        keep = torch.argsort(-total, stable=True)[:width]
        seqs = torch.cat([seqs[keep // model.n_items], (keep % model.n_items)[:, None]], 1)
        scores = total[keep]
    return seqs[0].numpy()


def memorisation_table(model: SASRec, canaries: Canaries, *, n_samples: int = 1000,
                       beam_width: int = 1, seed: int = 0) -> pd.DataFrame:
    """One row per canary: ``repeats``, extrapolated and sampled ``exposure`` and whether the
    decoded continuation of its prefix equals the secret (``extracted``)."""
    rows = []
    for j, (prefix, secret) in enumerate(zip(canaries.prefixes, canaries.secrets, strict=True)):
        exp = exposure(model, prefix, secret, n_samples=n_samples, seed=seed + j)
        decoded = extract(model, prefix, length=len(secret), beam_width=beam_width)
        rows.append({"repeats": int(canaries.repeats[j]), "exposure": exp["exposure"],
                     "sampled": exp["sampled"], "extracted": bool(np.array_equal(decoded, secret))})
    return pd.DataFrame(rows)


def group_guarantee(epsilon: float, delta: float, *, group_size: int) -> tuple[float, float]:
    """:math:`(k\\varepsilon, k e^{(k-1)\\varepsilon}\\delta)`: what an
    :math:`(\\varepsilon,\\delta)` guarantee about one unit says about a group of ``k`` units
    (Vadhan 2017, Lemma 2.2); :math:`\\delta` is capped at 1 (then nothing is promised)."""
    eps, k = check_epsilon(epsilon), int_in("group_size", group_size, 1)
    d = check_delta(delta)
    log_delta = math.log(k) + (k - 1) * eps + math.log(d)
    return k * eps, 1.0 if log_delta >= 0 else math.exp(log_delta)


def exposure_bound(epsilon: float, delta: float, *, max_exposure: float) -> float:
    """The largest expected exposure an :math:`(\\varepsilon,\\delta)`-DP training run allows for
    a secret (module docstring): :math:`\\min(\\text{max}, (\\varepsilon+1)/\\ln 2 +
    \\delta\\cdot\\text{max})`; ``epsilon = inf`` allows ``max``."""
    top, eps = non_negative("max_exposure", max_exposure), epsilon_or_inf("epsilon", epsilon)
    return min(top, (eps + 1.0) / math.log(2.0) + non_negative("delta", delta) * top)

"""User-level DP-SGD for the Transformer recommender: one example is one user's whole sequence.

DP-SGD (Abadi et al. 2016, Algorithm 1) protects whatever one *example* is. In
:mod:`privrec.central.dpsgd` an example is one rating, so a user with 200 ratings is 200 examples
and their history is protected only by group privacy. Here the example is the user: the loss of
user :math:`u` is the mean next-item cross-entropy over their whole sequence
(:func:`privrec.recsys.sequential.sequence_losses`), and two data sets are neighbours when one
has a user (with their entire history) that the other lacks. Each step

1. samples users by Poisson sampling with rate :math:`q` (the batch may be empty);
2. computes each sampled user's gradient :math:`g_u` of that loss with respect to *every*
   parameter of the model -- per-example gradients by ``torch.func`` (``vmap`` of ``grad``,
   :func:`privrec.central.per_example.per_example_gradients`), in chunks of users -- and clips it
   to norm :math:`C`: :math:`\\bar g_u = g_u\\min(1, C/\\lVert g_u\\rVert)`;
3. releases :math:`\\tilde g = (\\sum_u \\bar g_u + \\mathcal N(0, \\sigma^2C^2 I))/(qN)` with
   noise on every coordinate (:func:`privrec.central.dpsgd.noisy_average`) and hands it to Adam
   (post-processing);
4. records one Poisson-subsampled Gaussian event on the run's ledger at unit ``"user"`` over
   :math:`N` users (``N`` public, :math:`\\delta` = :func:`~privrec.dp.ledger.default_delta` of it).

Adding or removing one user changes the clipped sum by at most :math:`C`, however many items the
user has and however often a sequence repeats inside their history: the guarantee covers the
whole history. Sampled-softmax negatives are drawn from the catalogue independently of the data,
so they are public randomness.
"""

from __future__ import annotations

import copy
import math
import time

import pandas as pd
import torch
from torch import nn

from ..core.checks import check_sample_rate, choice, epsilon_or_inf, int_in, non_negative, positive
from ..core.checks import seed as check_seed
from ..core.results import FitResult
from ..dp.ledger import PrivacyEvent, PrivacyLedger
from ..dp.primitives import poisson_sample
from ..recsys.sequential import SASRec, causal_mask, sequence_losses, training_windows, user_sequences
from .dpsgd import DPSGD, dpsgd_steps
from .per_example import clip_and_sum, per_example_gradients

__all__ = ["STEP_NAME", "per_user_gradients", "per_user_clipped_sum", "UserDPSGD",
           "fit_user_dpsgd", "OpacusTwin", "opacus_per_user_gradients"]

#: The ledger's name for one user-level DP-SGD step.
STEP_NAME = "user-level DP-SGD step"


def per_user_gradients(model: SASRec, inputs: torch.Tensor, targets: torch.Tensor,
                       negatives: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``{name: [B, *shape]}``: the gradient of each user's sequence loss, user by user.

    ``inputs``/``targets`` are ``[B, L]`` windows (:func:`~privrec.recsys.sequential.training_windows`);
    every parameter is differentiated (the item table once: the output layer shares it)."""
    if not isinstance(model, SASRec):
        raise TypeError(f"model must be a SASRec, got {type(model).__name__}")
    if model.dropout_rate != 0.0:
        raise ValueError(f"dropout must be 0 for per-user gradients (got {model.dropout_rate}): a "
                         f"random mask per user is not the loss the accountant assumes")

    def loss(m: SASRec, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sequence_losses(m, x, y, negatives).sum()

    return per_example_gradients(model, loss, inputs, targets)


def per_user_clipped_sum(model: SASRec, inputs: torch.Tensor, targets: torch.Tensor,
                         negatives: torch.Tensor | None = None, *, clip_norm: float,
                         chunk: int = 64) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """:math:`\\sum_u \\bar g_u` (dense, one tensor per parameter; zeros for no users) and the
    pre-clipping norms ``[B]``, computed ``chunk`` users at a time."""
    positive("clip_norm", clip_norm)
    chunk = int_in("chunk", chunk, 1)
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    norms = []
    for s in range(0, len(inputs), chunk):
        grads = per_user_gradients(model, inputs[s:s + chunk], targets[s:s + chunk], negatives)
        summed, part = clip_and_sum(grads, clip_norm=clip_norm)
        for n, g in summed.items():
            total[n] += g
        norms.append(part)
    return total, torch.cat(norms) if norms else torch.zeros(0)


class UserDPSGD:
    """User-level DP-SGD for :class:`~privrec.recsys.sequential.SASRec` (module docstring).

    One step is ``add_noise(clipped_sum(sample_batch()))`` followed by Adam; the methods are public
    so that a test or an audit can call (or break) each one.

    Parameters
    ----------
    model:
        Trained in place; its dropout must be 0.
    train:
        Interactions with timestamps; each user's time-ordered history is one example.
    n_users:
        :math:`N`, the number of users (public): the Poisson population and the ledger's size.
    clip_norm, noise_multiplier, sample_rate:
        :math:`C > 0`, :math:`\\sigma \\ge 0` (0: clipping only, :math:`\\varepsilon=\\infty`),
        :math:`q \\in (0, 1]`.
    lr, optimizer:
        Step size and the optimiser the noisy gradient is handed to: ``"adam"`` or ``"sgd"``
        (post-processing either way; plain SGD does not rescale coordinates whose signal is
        mostly noise).
    n_negatives:
        Shared uniform negatives per step (sampled softmax); ``None``: the full softmax.
    seed:
        Seeds sampling, negatives and noise.
    ledger, delta:
        A ledger at unit ``"user"`` to continue, or the :math:`\\delta` of a new one (default
        :func:`~privrec.dp.ledger.default_delta` of ``n_users``).

    Raises
    ------
    TypeError, ValueError
        For a model that is not a SASRec, bad settings, or a ledger about another unit.
    """

    def __init__(self, model: SASRec, train: pd.DataFrame, *, n_users: int, clip_norm: float,
                 noise_multiplier: float, sample_rate: float, lr: float = 0.003,
                 n_negatives: int | None = 256, optimizer: str = "adam", seed: int = 0,
                 ledger: PrivacyLedger | None = None, delta: float | None = None,
                 chunk: int = 64) -> None:
        if not isinstance(model, SASRec):
            raise TypeError(f"model must be a SASRec, got {type(model).__name__}")
        self.model, self.n_users = model, int_in("n_users", n_users, 1)
        sequences = user_sequences(train, n_users=self.n_users, n_items=model.n_items)
        self.inputs, self.targets = training_windows(sequences, max_len=model.max_len)
        self.clip_norm = positive("clip_norm", clip_norm)
        self.noise_multiplier = non_negative("noise_multiplier", noise_multiplier)
        self.sample_rate = check_sample_rate(sample_rate)
        self.n_negatives = None if n_negatives is None else int_in("n_negatives", n_negatives, 1,
                                                                   model.n_items)
        self.chunk = int_in("chunk", chunk, 1)
        self.generator = torch.Generator().manual_seed(check_seed("seed", seed))
        self.ledger = PrivacyLedger(unit="user", n_units=self.n_users, delta=delta) \
            if ledger is None else ledger
        if self.ledger.unit != "user":
            raise ValueError(f"ledger unit must be 'user', got {self.ledger.unit!r}")
        kind = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[choice("optimizer", optimizer,
                                                                         ("adam", "sgd"))]
        self.optimizer = kind(model.parameters(), lr=positive("lr", lr))
        self.steps_taken = 0

    @property
    def expected_batch_size(self) -> float:
        """:math:`qN`, the public denominator."""
        return self.sample_rate * self.n_users

    def sample_batch(self) -> torch.Tensor:
        """A Poisson sample of user ids (may be empty)."""
        return poisson_sample(self.n_users, sample_rate=self.sample_rate, generator=self.generator)

    def negatives(self) -> torch.Tensor | None:
        """This step's shared negatives: uniform catalogue ids, drawn without looking at data."""
        if self.n_negatives is None:
            return None
        return torch.randperm(self.model.n_items, generator=self.generator)[:self.n_negatives]

    def clipped_sum(self, users: torch.Tensor) -> dict[str, torch.Tensor]:
        """:math:`\\sum_{u\\in\\text{users}}\\bar g_u` for every parameter (zeros if empty)."""
        summed, _ = per_user_clipped_sum(self.model, self.inputs[users], self.targets[users],
                                         self.negatives(), clip_norm=self.clip_norm,
                                         chunk=self.chunk)
        return summed

    # The release is record-level DP-SGD's, unchanged (only the example differs): noise σC on
    # the clipped sum, divided by qN (:func:`~privrec.central.dpsgd.noisy_average`).
    add_noise = DPSGD.add_noise
    noisy_gradient = DPSGD.noisy_gradient

    def step(self) -> None:
        """One step on a fresh Poisson sample, recorded on the ledger (also when it is empty)."""
        grads = self.noisy_gradient(self.sample_batch())
        for name, param in self.model.named_parameters():
            param.grad = grads[name]
        self.optimizer.step()
        self.steps_taken += 1
        self.ledger.record_gaussian(STEP_NAME, noise_multiplier=self.noise_multiplier,
                                    sample_rate=self.sample_rate)

    def epsilon(self) -> float:
        """The ledger's user-level :math:`\\varepsilon`."""
        return self.ledger.epsilon()


def _calibrated_sigma(ledger: PrivacyLedger, *, target_epsilon: float, sample_rate: float,
                      steps: int) -> float:
    """The smallest σ whose ``steps`` steps keep ``ledger`` within ``target_epsilon`` (inf: 0)."""
    target = epsilon_or_inf("target_epsilon", target_epsilon)
    if math.isinf(target):
        return 0.0
    return ledger.calibrate(lambda z: [PrivacyEvent(STEP_NAME, "gaussian", z, sample_rate, steps,
                                                    "user")], target_epsilon=target)


def fit_user_dpsgd(model: SASRec, train: pd.DataFrame, *, n_users: int,
                   target_epsilon: float | None = None, noise_multiplier: float | None = None,
                   epochs: float = 5.0, sample_rate: float = 0.25, clip_norm: float = 1.0,
                   lr: float = 0.003, n_negatives: int | None = 256, optimizer: str = "adam",
                   seed: int = 0, delta: float | None = None,
                   ledger: PrivacyLedger | None = None) -> FitResult:
    """Train ``model`` by user-level DP-SGD for ``round(epochs / sample_rate)`` steps.

    Give exactly one of ``target_epsilon`` (σ is then the ledger's calibration, so that the ledger
    -- including anything already on it -- ends at most at ``target_epsilon``; ``math.inf``: σ = 0)
    and ``noise_multiplier``. Other parameters are :class:`UserDPSGD`'s. Returns a
    :class:`~privrec.core.results.FitResult` whose ``ledger.epsilon()`` is the run's ε and whose
    ``history["noise_multiplier"]`` holds σ.
    """
    if (target_epsilon is None) == (noise_multiplier is None):
        raise ValueError("give exactly one of target_epsilon and noise_multiplier")
    steps = dpsgd_steps(epochs=epochs, sample_rate=sample_rate)
    book = PrivacyLedger(unit="user", n_units=int_in("n_users", n_users, 1), delta=delta) \
        if ledger is None else ledger
    sigma = (non_negative("noise_multiplier", noise_multiplier) if noise_multiplier is not None
             else _calibrated_sigma(book, target_epsilon=target_epsilon, sample_rate=sample_rate,
                                    steps=steps))
    run = UserDPSGD(model, train, n_users=n_users, clip_norm=clip_norm, noise_multiplier=sigma,
                    sample_rate=sample_rate, lr=lr, n_negatives=n_negatives, optimizer=optimizer,
                    seed=seed, ledger=book)
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        run.step()
    model.eval()
    return FitResult(model, {"noise_multiplier": [sigma]}, run.ledger, time.perf_counter() - start)


class _OpacusBlock(nn.Module):
    """A SASRec block whose attention is Opacus's ``DPMultiheadAttention`` (time-first)."""

    def __init__(self, block: nn.Module) -> None:
        from opacus.layers import DPMultiheadAttention

        super().__init__()
        self.norm1, self.norm2 = copy.deepcopy(block.norm1), copy.deepcopy(block.norm2)
        self.ffn = copy.deepcopy(block.ffn)
        ours = block.attention
        self.attention = DPMultiheadAttention(ours.out.in_features, ours.n_heads, bias=True)
        for mine, theirs in ((ours.query, self.attention.qlinear), (ours.key, self.attention.klinear),
                             (ours.value, self.attention.vlinear), (ours.out, self.attention.out_proj)):
            theirs.load_state_dict(mine.state_dict())

    def forward(self, h: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        a = self.norm1(h)
        h = h + self.attention(a, a, a, attn_mask=blocked, need_weights=False)[0]
        return h + self.ffn(self.norm2(h))


class OpacusTwin(nn.Module):
    """``model``'s function rebuilt from Opacus's layers, for cross-checks and benchmarks.

    The weights are copied; the attention is ``opacus.layers.DPMultiheadAttention`` (four linear
    layers, so Opacus's hooks see every parameter). Every module runs *time-first* (``[L, B, d]``,
    wrap with ``batch_first=False``): Opacus 1.6 checks the 3-D ``attn_mask`` against
    ``query.size(0)``, which is the window length only in that layout. The mask is
    :func:`~privrec.recsys.sequential.causal_mask` (padding rows keep their own key, so no row is
    all ``-inf``). ``tied=False`` gives the output layer its own copy of the item table (the same
    function; Opacus's ghost clipping refuses tied parameters). Only the full softmax: the sampled
    one indexes the table outside any module. Needs ``opacus``.
    """

    def __init__(self, model: SASRec, *, tied: bool = True) -> None:
        super().__init__()
        self.n_items, self.max_len = model.n_items, model.max_len
        self.n_heads = model.blocks[0].attention.n_heads
        self.items, self.positions = copy.deepcopy(model.items), copy.deepcopy(model.positions)
        self.blocks = nn.ModuleList(_OpacusBlock(b) for b in model.blocks)
        self.norm = copy.deepcopy(model.norm)
        self.output = nn.Linear(model.dim, model.n_items + 1)
        self.output.load_state_dict(model.output.state_dict())
        if tied:
            self.output.weight = self.items.weight

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[B, L, d]`` of ``inputs`` ``[B, L]``, as :meth:`SASRec.forward`."""
        x, length = inputs.T, inputs.shape[1]
        positions = torch.arange(self.max_len - length, self.max_len)[:, None].expand_as(x)
        h = self.items(x) + self.positions(positions)
        blocked = ~causal_mask(inputs).repeat_interleave(self.n_heads, 0)  # [B * heads, L, L]
        for block in self.blocks:
            h = block(h, blocked)
        return self.norm(h).transpose(0, 1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, L, n_items]``, the output layer applied time-first."""
        return self.output(hidden.transpose(0, 1)).transpose(0, 1)[..., 1:]


def _our_name(name: str) -> str:
    for theirs, mine in (("qlinear", "query"), ("klinear", "key"), ("vlinear", "value"),
                         ("out_proj", "out")):
        name = name.replace(f"attention.{theirs}", f"attention.{mine}")
    return name


def opacus_per_user_gradients(model: SASRec, inputs: torch.Tensor,
                              targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Opacus's per-user gradients (``GradSampleModule`` hooks on the :class:`OpacusTwin`) of the
    full-softmax sequence losses, keyed by ``model``'s parameter names: what
    :func:`per_user_gradients` must equal."""
    from opacus import GradSampleModule

    twin = OpacusTwin(model)
    wrapped = GradSampleModule(twin, batch_first=False, loss_reduction="sum")
    sequence_losses(twin, inputs, targets).sum().backward()
    grads = {_our_name(n): p.grad_sample.detach() for n, p in twin.named_parameters()}
    wrapped.zero_grad()
    return grads

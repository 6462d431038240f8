"""Per-example gradients of the embedding recommender: the closed form and the generic reference.

DP-SGD clips every example's gradient, so it needs them one by one. An embedding model has a huge
parameter vector, but one rating's gradient lives on five small pieces: its user row
:math:`p_u`, item row :math:`q_i`, the two biases and the global bias. With
:math:`e = \\hat r_{ui}-r_{ui}` and per-rating loss
:math:`e^2 + \\lambda(\\lVert p_u\\rVert^2+\\lVert q_i\\rVert^2) + \\lambda_b(b_u^2+b_i^2)` the pieces
are :math:`2(e\\,q_i+\\lambda p_u)`, :math:`2(e\\,p_u+\\lambda q_i)`, :math:`2(e+\\lambda_b b_u)`,
:math:`2(e+\\lambda_b b_i)` and :math:`2e`, so a per-example norm costs :math:`O(Bd)` and clipped
gradients are scattered into the tables with ``index_add_``. Nothing of size
``[batch, vocabulary, dim]`` is ever built (Opacus's generic embedding hook builds exactly that).

* :func:`mf_clipped_gradient_sum` -- squared loss (explicit ratings), closed form;
* :func:`mf_implicit_clipped_gradient_sum` -- logistic loss with sampled negatives (implicit
  feedback), closed form with exact norms when a negative repeats an item;
* :func:`per_example_gradients` -- the generic ``torch.func`` path (``vmap`` of ``grad``, Opacus's
  ``GradSampleModule`` idea) for any small model; the tests check the closed forms against it.

Clipping is :func:`privrec.dp.primitives.clip_factors` everywhere (one zero-guard). Every function
accepts an empty batch and then returns zero sums (a DP-SGD step on an empty Poisson sample still
releases its noise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..core.checks import function, instance, positive
from ..dp.primitives import clip_factors, row_norms
from ..recsys.models import BiasedMF

__all__ = [
    "MF_PARAMETER_NAMES",
    "trainable_names",
    "mf_per_example_gradients",
    "per_example_norms",
    "mf_clipped_gradient_sum",
    "mf_loss",
    "mf_implicit_clipped_gradient_sum",
    "mf_implicit_loss",
    "per_example_gradients",
    "clip_and_sum",
]

#: Trainable tables of :class:`~privrec.recsys.models.BiasedMF`, in a fixed order.
MF_PARAMETER_NAMES = ("user_factors", "item_factors", "user_bias", "item_bias", "global_bias")


def trainable_names(trainable: Sequence[str] | None) -> tuple[str, ...]:
    """``trainable`` as a tuple in :data:`MF_PARAMETER_NAMES` order (``None``: all of them).

    Raises ``ValueError`` for an empty selection or an unknown name.
    """
    if trainable is not None and (isinstance(trainable, str) or not isinstance(trainable, Sequence)):
        raise TypeError(f"trainable must be None or a sequence of names from "
                        f"{MF_PARAMETER_NAMES}, got {type(trainable).__name__}")
    names = MF_PARAMETER_NAMES if trainable is None else tuple(trainable)
    unknown = [n for n in names if n not in MF_PARAMETER_NAMES]
    if unknown or not names:
        raise ValueError(f"trainable must be a non-empty subset of {MF_PARAMETER_NAMES}, "
                         f"got {tuple(trainable) if trainable is not None else None}")
    return tuple(n for n in MF_PARAMETER_NAMES if n in names)


def per_example_norms(per_example: dict[str, torch.Tensor]) -> torch.Tensor:
    """L2 norm of each example's whole gradient: ``[B]`` from ``{name: [B, ...]}`` (B may be 0);
    :func:`privrec.dp.primitives.row_norms` of the parts."""
    return row_norms(instance("per_example", per_example, dict))


def _broadcast(factor: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``factor`` ``[B]`` shaped to multiply ``g`` ``[B, ...]`` row by row."""
    return factor.reshape(-1, *([1] * (g.dim() - 1)))


def _scatter(model: BiasedMF, name: str, rows: torch.Tensor, index: torch.Tensor | None,
             factor: torch.Tensor, out: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Clipped rows summed into a dense tensor shaped like parameter ``name`` (``index`` None:
    the scalar global bias), added to ``out[name]`` in place when ``out`` is given."""
    param = getattr(model, name)
    scaled = rows * _broadcast(factor, rows)
    if index is None:
        total = scaled.sum().reshape(param.shape)
        return total if out is None else out[name].add_(total)
    target = torch.zeros_like(param) if out is None else out[name]
    return target.index_add_(0, index, scaled.reshape(-1, *param.shape[1:]))


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
    names = trainable_names(trainable)
    p, q = model.user_factors[users], model.item_factors[items]
    b_u, b_i = model.user_bias[users], model.item_bias[items]
    two_err = 2.0 * (model.global_bias + b_u + b_i + (p * q).sum(-1) - ratings)
    grads = {"user_factors": lambda: two_err[:, None] * q + (2.0 * reg) * p,
             "item_factors": lambda: two_err[:, None] * p + (2.0 * reg) * q,
             "user_bias": lambda: two_err + (2.0 * bias_reg) * b_u,
             "item_bias": lambda: two_err + (2.0 * bias_reg) * b_i,
             "global_bias": lambda: two_err}
    return {name: grads[name]() for name in names}


@torch.no_grad()
def mf_clipped_gradient_sum(model: BiasedMF, users: torch.Tensor, items: torch.Tensor,
                            ratings: torch.Tensor, *, clip_norm: float, reg: float = 0.0,
                            bias_reg: float = 0.0, trainable: Sequence[str] | None = None,
                            out: dict[str, torch.Tensor] | None = None,
                            ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """:math:`\\sum_j \\bar g_j` as dense tensors shaped like the parameters, and the norms ``[B]``.

    :math:`\\bar g_j = g_j\\min(1, C/\\lVert g_j\\rVert)` (Abadi et al. 2016, Algorithm 1). Cost
    :math:`O(Bd)` plus the dense tables (which the noise needs anyway). ``out``: the sums of
    earlier chunks of the batch, added to in place (a batch summed chunk by chunk).
    """
    instance("model", model, BiasedMF)
    clip_norm = positive("clip_norm", clip_norm)
    rows = mf_per_example_gradients(model, users, items, ratings, reg=reg, bias_reg=bias_reg,
                                    trainable=trainable)
    norms = per_example_norms(rows)
    factor = clip_factors(norms, clip_norm=clip_norm)
    index = {"user_factors": users, "item_factors": items, "user_bias": users, "item_bias": items,
             "global_bias": None}
    return {name: _scatter(model, name, g, index[name], factor, out)
            for name, g in rows.items()}, norms


def _implicit_rows(model: BiasedMF, users: torch.Tensor, items: torch.Tensor, reg: float,
                   names: tuple[str, ...]) -> tuple[dict, dict]:
    """Per-example logistic-loss gradients: user-side rows ``[B, ...]`` and item-side rows
    ``[B, 1 + k, ...]`` (one per occurrence of an item in the example)."""
    k1 = items.shape[1]
    p = model.user_factors[users]                                    # [B, d]
    q = model.item_factors[items]                                    # [B, k+1, d]
    logits = (model.global_bias + model.user_bias[users, None] + model.item_bias[items]
              + torch.einsum("bd,bkd->bk", p, q))
    labels = torch.zeros_like(logits)
    labels[:, 0] = 1.0
    a = torch.sigmoid(logits) - labels                               # dBCE/dlogit, [B, k+1]
    user_side = {"user_factors": lambda: torch.einsum("bk,bkd->bd", a, q) + (2.0 * reg * k1) * p,
                 "user_bias": lambda: a.sum(1), "global_bias": lambda: a.sum(1)}
    item_side = {"item_factors": lambda: a[:, :, None] * p[:, None, :] + (2.0 * reg) * q,
                 "item_bias": lambda: a}
    return ({n: f() for n, f in user_side.items() if n in names},
            {n: f() for n, f in item_side.items() if n in names})


def _exact_square_norms(items: torch.Tensor, user_rows: dict, item_rows: dict) -> torch.Tensor:
    """Squared norms of whole per-example gradients when an example may repeat an item.

    The item part is the sum over occurrence pairs (j, l) *on the same item* of
    :math:`\\langle g_j, g_l\\rangle`: duplicates add before squaring -- the exact norm, which
    clipping needs (summing squares separately would under-estimate it and break the bound). The
    diagonal is cheap; off-diagonal pairs exist only in the few rows whose negatives repeat.
    """
    batch, k1 = items.shape
    sq = torch.zeros(batch, dtype=torch.float32)
    for g in user_rows.values():
        sq = sq + g.reshape(batch, -1 if batch else 1).square().sum(1)
    same = items[:, :, None] == items[:, None, :]                    # [B, k+1, k+1]
    dup = (same.sum((1, 2)) > k1).nonzero().squeeze(1)
    for g in item_rows.values():
        flat = g.reshape(batch, k1, -1 if batch else 1)
        sq = sq + flat.square().sum((1, 2))
        if len(dup):
            gram = torch.bmm(flat[dup], flat[dup].transpose(1, 2))
            off = same[dup] & ~torch.eye(k1, dtype=torch.bool)
            sq = sq.index_add(0, dup, (gram * off).sum((1, 2)))
    return sq.clamp(min=0.0)


@torch.no_grad()
def mf_implicit_clipped_gradient_sum(model: BiasedMF, users: torch.Tensor, items: torch.Tensor, *,
                                     clip_norm: float, reg: float = 0.0,
                                     trainable: Sequence[str] | None = None,
                                     out: dict[str, torch.Tensor] | None = None,
                                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Clipped gradient sum for implicit feedback: ``items[:, 0]`` positive, ``items[:, 1:]`` negatives.

    Per-example loss :math:`\\sum_{j} \\mathrm{BCE}(s_{u x_j}, y_j) + \\lambda(\\lVert p_u\\rVert^2
    + \\lVert q_{x_j}\\rVert^2)` with :math:`y_0=1`, :math:`y_{j>0}=0` (as
    :func:`privrec.recsys.train.fit_implicit`). One example touches ``1 + n_negatives`` item rows; a
    repeated negative is handled exactly (see ``_exact_square_norms``). Returns dense
    ``{name: sum}`` (added to ``out`` in place when given) and the norms ``[B]``.
    """
    instance("model", model, BiasedMF)
    clip_norm = positive("clip_norm", clip_norm)
    names = trainable_names(trainable)
    if items.dim() != 2 or items.shape[0] != users.shape[0]:
        raise ValueError("items must be [B, 1 + n_negatives] with B = len(users)")
    user_rows, item_rows = _implicit_rows(model, users, items, reg, names)
    norms = _exact_square_norms(items, user_rows, item_rows).sqrt()
    factor = clip_factors(norms, clip_norm=clip_norm)
    summed = {name: _scatter(model, name, g, None if name == "global_bias" else users, factor, out)
              for name, g in user_rows.items()}
    summed |= {name: _scatter(model, name, g, items.reshape(-1), factor, out)
               for name, g in item_rows.items()}
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
        ``loss_fn(model, *example_batch) -> scalar``, called on a batch of one example; it must
        avoid data-dependent Python control flow (call ``BiasedMF.predict_unchecked``).
    batch:
        Tensors with a leading batch dimension ``B``.
    parameters:
        Names of the parameters to differentiate (default: all that require grad).

    Returns
    -------
    dict
        ``{name: [B, *param.shape]}`` -- dense, so only for small models (tests, cross-checks).

    Raises
    ------
    ValueError
        For an empty ``batch``, tensors of different lengths, or unknown parameter names.
    """
    instance("model", model, nn.Module)
    function("loss_fn", loss_fn)
    if not batch:
        raise ValueError("batch must contain at least one tensor")
    sizes = {t.shape[0] for t in batch}
    if len(sizes) != 1:
        raise ValueError(f"all batch tensors must share the leading dimension, got {sorted(sizes)}")
    named = dict(model.named_parameters())
    names = [n for n, p in named.items() if p.requires_grad] if parameters is None else list(parameters)
    if not names or any(n not in named for n in names):
        raise ValueError(f"parameters must name parameters of the model, got {names}")
    wrapper = _LossModule(model, loss_fn)
    params = {f"model.{n}": named[n].detach() for n in names}

    def one_example(params: dict[str, torch.Tensor], *example: torch.Tensor) -> torch.Tensor:
        loss = torch.func.functional_call(wrapper, params, tuple(x.unsqueeze(0) for x in example))
        return loss.sum()

    grads = torch.func.vmap(torch.func.grad(one_example), in_dims=(None,) + (0,) * len(batch))(
        params, *batch)
    return {n: grads[f"model.{n}"] for n in names}


def clip_and_sum(per_example: dict[str, torch.Tensor], *, clip_norm: float,
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Clip each example's (dense) gradient to norm ``clip_norm`` and sum over the batch.

    Returns ``({name: summed}, norms)``; the reference the closed forms are tested against.
    """
    norms = per_example_norms(per_example)
    factor = clip_factors(norms, clip_norm=clip_norm)
    return {n: (g * _broadcast(factor, g)).sum(0) for n, g in per_example.items()}, norms

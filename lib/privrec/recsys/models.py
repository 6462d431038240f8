"""The embedding recommender: biased matrix factorisation (Koren, Bell & Volinsky 2009).

.. math::  \\hat r_{ui} = \\mu + b_u + b_i + p_u^\\top v_i

Parameters are split by who may hold them, because later chapters depend on it:

* user-side (``user_factors`` :math:`P`, ``user_bias`` :math:`b_u`): one row per user. In federated
  training these never leave the user's device; under DP-SGD each rating touches exactly one row.
* shared (``item_factors`` :math:`V`, ``item_bias`` :math:`b_i`, ``global_bias`` :math:`\\mu`): what a
  server aggregates and what a private release must protect.

``dim=0`` gives the bias-only model :math:`\\mu + b_u + b_i` with the same interface.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..core.checks import id_array, int_in, real, text

__all__ = ["BiasedMF", "as_index_tensor", "checked_pairs"]


def as_index_tensor(values: object, *, name: str, upper: int) -> torch.Tensor:
    """Convert ids to a 1-D int64 tensor, checking dtype and the range ``[0, upper)``."""
    text("name", name)
    upper = int_in("upper", upper, 0)
    if not isinstance(values, torch.Tensor):
        values = id_array(name, values)
    tensor = torch.as_tensor(values)
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer ids, got dtype {tensor.dtype}")
    tensor = tensor.long()
    if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= upper):
        raise ValueError(f"{name} ids must lie in [0, {upper}), got range "
                         f"[{int(tensor.min())}, {int(tensor.max())}]")
    return tensor


def checked_pairs(users: object, items: object, *, n_users: int,
                  n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated ``(users, items)`` id tensors of equal length, for any model's ``forward``."""
    users = as_index_tensor(users, name="users", upper=n_users)
    items = as_index_tensor(items, name="items", upper=n_items)
    if users.shape != items.shape:
        raise ValueError(f"users and items must have the same length, got {users.numel()} "
                         f"and {items.numel()}")
    return users, items


class BiasedMF(nn.Module):
    """Biased matrix factorisation with user-side and shared parameters kept apart.

    Parameters
    ----------
    n_users, n_items:
        Sizes of the id spaces (ids are contiguous, 0-based).
    dim:
        Embedding dimension; 0 gives the bias-only model.
    global_mean:
        Initial value of :math:`\\mu` (use the training mean).
    init_std:
        Standard deviation of the Gaussian initialisation of the factors.
    seed:
        Seed of the initialisation; the global torch RNG is left untouched.
    """

    user_parameter_names = ("user_factors", "user_bias")
    shared_parameter_names = ("item_factors", "item_bias", "global_bias")

    def __init__(self, n_users: int, n_items: int, dim: int = 32, *, global_mean: float = 0.0,
                 init_std: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        self.n_users = int_in("n_users", n_users, 1)
        self.n_items = int_in("n_items", n_items, 1)
        self.dim = int_in("dim", dim, 0)
        if not np.isfinite(real("global_mean", global_mean)):
            raise ValueError(f"global_mean must be finite, got {global_mean}")
        if not (np.isfinite(real("init_std", init_std)) and init_std >= 0):
            raise ValueError(f"init_std must be finite and >= 0, got {init_std}")
        gen = torch.Generator().manual_seed(int_in("seed", seed, 0))
        self.user_factors = nn.Parameter(torch.randn(self.n_users, self.dim, generator=gen) * init_std)
        self.item_factors = nn.Parameter(torch.randn(self.n_items, self.dim, generator=gen) * init_std)
        self.user_bias = nn.Parameter(torch.zeros(self.n_users))
        self.item_bias = nn.Parameter(torch.zeros(self.n_items))
        self.global_bias = nn.Parameter(torch.tensor(float(global_mean)))

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Predicted ratings for the (user, item) pairs; ids are checked."""
        users, items = checked_pairs(users, items, n_users=self.n_users, n_items=self.n_items)
        return self.predict_unchecked(users, items)

    def predict_unchecked(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` without input checks, for inner training loops on validated ids."""
        dot = (self.user_factors[users] * self.item_factors[items]).sum(-1)
        return self.global_bias + self.user_bias[users] + self.item_bias[items] + dot

    def score_all(self, users: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of every item for each user in ``users`` (all users by default): ``[U, n_items]``."""
        users = (torch.arange(self.n_users) if users is None
                 else as_index_tensor(users, name="users", upper=self.n_users))
        return (self.global_bias + self.user_bias[users, None] + self.item_bias[None, :]
                + self.user_factors[users] @ self.item_factors.T)

    def user_parameters(self) -> list[nn.Parameter]:
        """Parameters with one row per user (kept on the client in federated training)."""
        return [getattr(self, n) for n in self.user_parameter_names]

    def shared_parameters(self) -> list[nn.Parameter]:
        """Item-side and global parameters (aggregated by a server, protected by DP)."""
        return [getattr(self, n) for n in self.shared_parameter_names]

    def extra_repr(self) -> str:
        return f"n_users={self.n_users}, n_items={self.n_items}, dim={self.dim}"

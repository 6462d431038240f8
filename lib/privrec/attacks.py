"""What an honest-but-curious server learns from federated MF updates.

The source article says that keeping data on the clients "effectively prevents data leakage". For
matrix factorisation the opposite is easy to measure. The server follows the protocol of
:class:`~privrec.federated.FederatedMF` exactly and only looks at what it receives:

* :func:`item_set_attack` — the rows of the item table that a client's update changes are the
  items it rated (the gradient of a rating touches only its item's row). Scored against the truth
  with :func:`score_item_sets`.
* :func:`invert_ratings` — gradient inversion in the spirit of FedMF (Chai et al. 2020) and of
  deep leakage from gradients (Zhu et al. 2019): from one client's item-row and item-bias changes,
  the broadcast model and the public protocol constants, solve for the user's factor, bias and
  every rating. For one local step (the gradient-upload protocol of FCF) the solution is exact
  algebra. Scored with :func:`score_ratings`.

Defences live in the protocol: ``FederatedMF(upload="dense")`` (does *not* help: unrated rows
arrive as exact zeros) and ``FederatedMF(fake_items=rho)`` (FedRec, Lin et al. 2020), which drives
the item-set precision down to :math:`1/(1+\\rho)` at a utility and bandwidth cost. Hiding the
individual update itself needs secure aggregation (Bonawitz et al. 2017) or differential privacy.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

__all__ = [
    "item_set_attack",
    "true_item_sets",
    "score_item_sets",
    "invert_ratings",
    "score_ratings",
]


def _check_upload(upload: object) -> dict[str, torch.Tensor]:
    needed = ("clients", "pair_client", "pair_item", "item_factors", "item_bias")
    if not isinstance(upload, dict) or any(k not in upload for k in needed):
        raise ValueError(f"upload must be FederatedMF.last_upload, a dict with keys {needed}")
    return upload


def item_set_attack(upload: dict[str, torch.Tensor], *, tol: float = 0.0) -> pd.DataFrame:
    """The items the server infers each client rated: rows whose uploaded change is non-zero.

    Works the same on sparse and dense uploads (a dense upload's other rows are exact zeros).

    Parameters
    ----------
    upload:
        :attr:`FederatedMF.last_upload <privrec.federated.FederatedMF.last_upload>`.
    tol:
        A row counts as changed when the largest absolute change in it exceeds ``tol``.

    Returns
    -------
    ``DataFrame(client, item)``, one row per inferred (client, item) pair.
    """
    upload = _check_upload(upload)
    if not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be finite and >= 0, got {tol!r}")
    change = torch.maximum(upload["item_factors"].abs().amax(1), upload["item_bias"].abs())
    changed = change > tol
    clients = upload["clients"][upload["pair_client"][changed]]
    return pd.DataFrame({"client": clients.numpy().astype(np.int64),
                         "item": upload["pair_item"][changed].numpy().astype(np.int64)})


def true_item_sets(train: pd.DataFrame, client_of_user: np.ndarray,
                   clients: np.ndarray | torch.Tensor) -> pd.DataFrame:
    """``DataFrame(client, item)``: the (deduplicated) items each of ``clients`` really rated."""
    owner = np.asarray(client_of_user)[train["user"].to_numpy()]
    keep = np.isin(owner, np.asarray(clients))
    truth = pd.DataFrame({"client": owner[keep], "item": train["item"].to_numpy()[keep]})
    return truth.drop_duplicates(ignore_index=True)


def score_item_sets(predicted: pd.DataFrame, truth: pd.DataFrame) -> dict[str, float]:
    """Precision and recall of inferred (client, item) pairs, pooled over clients (micro) and
    averaged per client (macro, over clients with at least one prediction / true item)."""
    for name, df in (("predicted", predicted), ("truth", truth)):
        if not isinstance(df, pd.DataFrame) or not {"client", "item"} <= set(df.columns):
            raise ValueError(f"{name} must be a DataFrame with columns client, item")
    if len(predicted) == 0 or len(truth) == 0:
        raise ValueError("predicted and truth must not be empty")
    merged = predicted.merge(truth.assign(hit=True), on=["client", "item"], how="left")
    hit = merged["hit"].notna().to_numpy()
    per_client_tp = pd.Series(hit, index=merged["client"].to_numpy()).groupby(level=0).sum()
    per_client_pred = predicted.groupby("client").size()
    per_client_true = truth.groupby("client").size()
    return {
        "precision": float(hit.mean()),
        "recall": float(hit.sum() / len(truth)),
        "precision_per_client": float((per_client_tp / per_client_pred).mean()),
        "recall_per_client": float((per_client_tp.reindex(per_client_true.index, fill_value=0)
                                    / per_client_true).mean()),
    }


def invert_ratings(upload: dict[str, torch.Tensor], broadcast: dict[str, torch.Tensor], *,
                   local_lr: float, reg: float, bias_reg: float,
                   local_epochs: int = 1) -> pd.DataFrame:
    """Recover each client's ratings from one round of cross-device FedAvg updates.

    Assumes the public protocol of :class:`~privrec.federated.FederatedMF` with one client per
    user, ``user_solver="closed_form"`` and ``local_epochs=1``. For an uploaded row :math:`i` of
    client :math:`u` the client took one step from the broadcast :math:`(q_i, b_i)` with error
    :math:`e_{ui} = r_{ui}-\\hat r_{ui}`:

    .. math:: \\Delta b_i = \\eta(2e_{ui} - 2\\lambda_b b_i),\\qquad
              \\Delta q_i = \\eta(2e_{ui}\\,p_u - 2\\lambda q_i).

    The server therefore reads :math:`e_{ui}` off the bias change, :math:`p_u` off the factor
    changes (least squares over the rows), and :math:`b_u` off the optimality of the client's
    closed-form solve, :math:`\\sum_i e_{ui} = n_u\\lambda_b b_u`. Then
    :math:`r_{ui} = e_{ui} + \\mu + b_u + b_i + p_u^\\top q_i`. The same information lets FedMF's
    server solve for ratings from two consecutive gradients (Chai et al. 2020).

    ``local_epochs`` is the protocol's public setting; only 1 is supported (several local steps
    make the map from ratings to update non-linear: invert it by optimisation, as in DLG).

    Returns
    -------
    ``DataFrame(client, item, rating)`` with the recovered (unclamped) ratings of every uploaded row.
    """
    upload = _check_upload(upload)
    if local_epochs != 1:
        raise ValueError(f"local_epochs must be 1 for this exact inversion, got {local_epochs!r}; "
                         "multi-step updates need an optimisation attack (Zhu et al. 2019)")
    for name, value in (("local_lr", local_lr), ("reg", reg), ("bias_reg", bias_reg)):
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    if "pair_examples" in upload and bool((upload["pair_examples"] != 1).any()):
        raise ValueError("invert_ratings needs cross-device updates (one user per client); this "
                         "upload has rows that aggregate several ratings")
    items, position = upload["pair_item"], upload["pair_client"]
    n_clients = len(upload["clients"])
    q0 = broadcast["item_factors"][items].double()
    b0 = broadcast["item_bias"][items].double()
    mu = broadcast["global_bias"].double()
    err = (upload["item_bias"].double() / local_lr + 2 * bias_reg * b0) / 2
    scaled_p = (upload["item_factors"].double() / local_lr + 2 * reg * q0) / 2   # = e_ui * p_u
    num = torch.zeros(n_clients, q0.shape[1], dtype=torch.double).index_add_(
        0, position, err[:, None] * scaled_p)
    den = torch.zeros(n_clients, dtype=torch.double).index_add_(0, position, err.square())
    p = num / den.clamp(min=1e-300)[:, None]
    n_rows = torch.bincount(position, minlength=n_clients).double()
    b_u = torch.zeros(n_clients, dtype=torch.double).index_add_(0, position, err) / (n_rows * bias_reg)
    rating = err + mu + b_u[position] + b0 + (p[position] * q0).sum(1)
    return pd.DataFrame({"client": upload["clients"][position].numpy().astype(np.int64),
                         "item": items.numpy().astype(np.int64),
                         "rating": rating.float().numpy()})


def score_ratings(recovered: pd.DataFrame, train: pd.DataFrame,
                  client_of_user: np.ndarray | None = None) -> dict[str, float]:
    """Accuracy of recovered ratings on the (client, item) pairs that are real ratings.

    Returns RMSE, the share recovered to the exact star after rounding to 1..5, and how many pairs
    were scored. With one user per client (``client_of_user=None``) the client id is the user id.
    """
    if not isinstance(recovered, pd.DataFrame) or not {"client", "item", "rating"} <= set(
            recovered.columns):
        raise ValueError("recovered must be a DataFrame with columns client, item, rating")
    owner = (train["user"].to_numpy() if client_of_user is None
             else np.asarray(client_of_user)[train["user"].to_numpy()])
    truth = pd.DataFrame({"client": owner, "item": train["item"].to_numpy(),
                          "true": train["rating"].to_numpy(np.float64)})
    joined = recovered.merge(truth, on=["client", "item"], how="inner")
    if len(joined) == 0:
        raise ValueError("no recovered pair is a real rating")
    guess = joined["rating"].to_numpy(np.float64)
    true = joined["true"].to_numpy()
    return {"rmse": float(np.sqrt(np.mean((guess - true) ** 2))),
            "exact": float(np.mean(np.clip(np.rint(guess), 1, 5) == true)),
            "n_scored": int(len(joined))}

"""What an honest-but-curious server learns from federated MF updates.

The source article says that keeping data on the clients "effectively prevents data leakage". For
matrix factorisation the opposite is easy to measure. The server follows the protocol of
:class:`~privrec.federated.engine.FederatedMF` exactly and only looks at what it receives, a
:class:`~privrec.federated.updates.ClientUpdates` (the simulator keeps the last one with
``keep_updates=True``):

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
the item-set precision down to :math:`1/(1+\\rho)` at a utility and bandwidth cost. Central DP
(:class:`~privrec.federated.dpfedavg.DPFedAvg`) does *not* hide the uploads either: it clips on the server
(server-side fixed clipping), so the server receives the raw updates and both attacks run on them
unchanged; clipped on the client, an update keeps its item set (clipping rescales, it does not
zero rows) and ``invert_ratings(..., rescaled=True)`` solves for the unknown scale as well.
Hiding the individual update needs secure aggregation (Bonawitz et al. 2017) or local noise.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..core.checks import positive
from ..federated.updates import ClientUpdates

__all__ = [
    "item_set_attack",
    "true_item_sets",
    "score_item_sets",
    "invert_ratings",
    "score_ratings",
]


def _check_upload(upload: object) -> ClientUpdates:
    if not isinstance(upload, ClientUpdates):
        raise TypeError(f"upload must be a ClientUpdates, got {type(upload).__name__}")
    if not {"item_factors", "item_bias"} <= set(upload.rows):
        raise ValueError("upload must carry row updates of item_factors and item_bias (an MF "
                         "upload)")
    return upload


def item_set_attack(upload: ClientUpdates, *, tol: float = 0.0) -> pd.DataFrame:
    """The items the server infers each client rated: rows whose uploaded change is non-zero.

    Works the same on sparse and dense uploads (a dense upload's other rows are exact zeros).

    Parameters
    ----------
    upload:
        One round's uploads, e.g. :attr:`FederatedSimulator.last_updates
        <privrec.federated.engine.FederatedSimulator.last_updates>`.
    tol:
        A row counts as changed when the largest absolute change in it exceeds ``tol``.

    Returns
    -------
    ``DataFrame(client, item)``, one row per inferred (client, item) pair.
    """
    upload = _check_upload(upload)
    if not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be finite and >= 0, got {tol!r}")
    rows, bias = upload.rows["item_factors"], upload.rows["item_bias"]
    change = torch.maximum(rows.values.abs().amax(1), bias.values.abs())
    changed = change > tol
    clients = upload.clients[rows.client_pos[changed]]
    return pd.DataFrame({"client": clients.numpy().astype(np.int64),
                         "item": rows.row[changed].numpy().astype(np.int64)})


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


def _factor(a: torch.Tensor, g: torch.Tensor, v0: torch.Tensor, b0: torch.Tensor,
            position: torch.Tensor, n_clients: int, *, local_lr: float, reg: float,
            bias_reg: float) -> torch.Tensor:
    """Each client's :math:`p_u` from an unscaled upload: every factor row is :math:`e_{ui}p_u`."""
    scaled_p = (g / local_lr + 2 * reg * v0) / 2
    e = (a / local_lr + 2 * bias_reg * b0) / 2
    num = torch.zeros(n_clients, v0.shape[1], dtype=torch.double).index_add_(
        0, position, e[:, None] * scaled_p)
    den = torch.zeros(n_clients, dtype=torch.double).index_add_(0, position, e.square())
    return num / den.clamp(min=1e-300)[:, None]


def _factor_and_scale(a: torch.Tensor, g: torch.Tensor, v0: torch.Tensor, b0: torch.Tensor,
                      position: torch.Tensor, n_clients: int, *, local_lr: float, reg: float,
                      bias_reg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each client's :math:`p_u` and unknown scale :math:`f_u` from its rescaled upload.

    With :math:`c_i = 2\\eta\\lambda_b b_i`, :math:`k = 2\\eta\\lambda` and :math:`w = f p`, every
    uploaded row gives :math:`d` linear equations :math:`g_i = a_i p + c_i w - k f v_i`; the
    :math:`2d+1` unknowns :math:`(p, w, f)` are solved by least squares (normal equations summed
    over the client's rows; needs about 3 rows or more).
    """
    d = v0.shape[1]
    eye = torch.eye(d, dtype=torch.double)
    c, k = 2 * local_lr * bias_reg * b0, 2 * local_lr * reg
    blocks = torch.zeros(len(a), 2 * d + 1, 2 * d + 1, dtype=torch.double)
    blocks[:, :d, :d] = a[:, None, None] ** 2 * eye
    blocks[:, :d, d:2 * d] = blocks[:, d:2 * d, :d] = (a * c)[:, None, None] * eye
    blocks[:, d:2 * d, d:2 * d] = c[:, None, None] ** 2 * eye
    blocks[:, :d, -1] = blocks[:, -1, :d] = -k * a[:, None] * v0
    blocks[:, d:2 * d, -1] = blocks[:, -1, d:2 * d] = -k * c[:, None] * v0
    blocks[:, -1, -1] = k * k * v0.square().sum(1)
    rhs = torch.cat([a[:, None] * g, c[:, None] * g, -k * (v0 * g).sum(1, keepdim=True)], 1)
    gram = torch.zeros(n_clients, 2 * d + 1, 2 * d + 1, dtype=torch.double).index_add_(
        0, position, blocks)
    target = torch.zeros(n_clients, 2 * d + 1, dtype=torch.double).index_add_(0, position, rhs)
    z = torch.linalg.lstsq(gram, target[:, :, None]).solution[:, :, 0]
    return z[:, :d], z[:, -1]


def invert_ratings(upload: ClientUpdates, broadcast: dict[str, torch.Tensor], *,
                   local_lr: float, reg: float, bias_reg: float, local_epochs: int = 1,
                   rescaled: bool = False) -> pd.DataFrame:
    """Recover each client's ratings from one round of cross-device FedAvg updates.

    Assumes the public protocol of :class:`~privrec.federated.engine.FederatedMF` with one client per
    user, ``user_solver="closed_form"`` and ``local_epochs=1``. For an uploaded row :math:`i` of
    client :math:`u` the client took one step from the broadcast :math:`(v_i, b_i)` with error
    :math:`e_{ui} = r_{ui}-\\hat r_{ui}`:

    .. math:: \\Delta b_i = \\eta(2e_{ui} - 2\\lambda_b b_i),\\qquad
              \\Delta v_i = \\eta(2e_{ui}\\,p_u - 2\\lambda v_i).

    The server therefore reads :math:`e_{ui}` off the bias change, :math:`p_u` off the factor
    changes (least squares over the rows), and :math:`b_u` off the optimality of the client's
    closed-form solve, :math:`\\sum_i e_{ui} = n_u\\lambda_b b_u`. Then
    :math:`r_{ui} = e_{ui} + \\mu + b_u + b_i + p_u^\\top v_i`. The same information lets FedMF's
    server solve for ratings from two consecutive gradients (Chai et al. 2020).

    With ``rescaled=True`` each client's upload may have been multiplied by an unknown factor
    :math:`f_u` (clipping on the device, :math:`f_u=\\min(1, C/\\lVert\\Delta_u\\rVert)`): the
    server solves for :math:`f_u` too (:func:`_factor_and_scale`), so clipping does not hide the
    ratings either.

    ``local_epochs`` is the protocol's public setting; only 1 is supported (several local steps
    make the map from ratings to update non-linear: invert it by optimisation, as in DLG).

    Returns ``DataFrame(client, item, rating)``, the recovered (unclamped) rating of every uploaded
    row. Raises ``TypeError``/``ValueError`` for an upload that is not a cross-device MF
    ``ClientUpdates``, ``local_epochs`` other than 1, or a non-positive constant.
    """
    upload = _check_upload(upload)
    if local_epochs != 1:
        raise ValueError(f"local_epochs must be 1 for this exact inversion, got {local_epochs!r}; "
                         "multi-step updates need an optimisation attack (Zhu et al. 2019)")
    local_lr, reg, bias_reg = (positive(n, v) for n, v in
                               (("local_lr", local_lr), ("reg", reg), ("bias_reg", bias_reg)))
    rows, bias = upload.rows["item_factors"], upload.rows["item_bias"]
    if bool((rows.examples != 1).any()):
        raise ValueError("invert_ratings needs cross-device updates (one user per client); this "
                         "upload has rows that aggregate several ratings")
    items, position, n_clients = rows.row, rows.client_pos, len(upload)
    v0 = broadcast["item_factors"][items].double()
    b0 = broadcast["item_bias"][items].double()
    a, g = bias.values.double(), rows.values.double()
    if rescaled:
        p, scale = _factor_and_scale(a, g, v0, b0, position, n_clients, local_lr=local_lr,
                                     reg=reg, bias_reg=bias_reg)
    else:
        p, scale = _factor(a, g, v0, b0, position, n_clients, local_lr=local_lr, reg=reg,
                           bias_reg=bias_reg), torch.ones(n_clients, dtype=torch.double)
    rating = _ratings(a / (scale[position] * local_lr), p, v0, b0, position, n_clients,
                      global_bias=broadcast["global_bias"].double(), bias_reg=bias_reg)
    return pd.DataFrame({"client": upload.clients[position].numpy().astype(np.int64),
                         "item": items.numpy().astype(np.int64),
                         "rating": rating.float().numpy()})


def _ratings(bias_step: torch.Tensor, p: torch.Tensor, v0: torch.Tensor, b0: torch.Tensor,
             position: torch.Tensor, n_clients: int, *, global_bias: torch.Tensor,
             bias_reg: float) -> torch.Tensor:
    """Ratings from the recovered errors :math:`e_{ui}` (off the unscaled bias step), the user
    biases (off the closed-form solve's optimality) and the recovered :math:`p_u`."""
    err = (bias_step + 2 * bias_reg * b0) / 2
    n_rows = torch.bincount(position, minlength=n_clients).double()
    b_u = torch.zeros(n_clients, dtype=torch.double).index_add_(0, position, err) / (n_rows * bias_reg)
    return err + global_bias + b_u[position] + b0 + (p[position] * v0).sum(1)


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

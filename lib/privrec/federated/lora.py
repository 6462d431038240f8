"""Federated LoRA fine-tuning of the item encoder: plain LoRA and FFA-LoRA, one engine, one DP wrapper.

:class:`FederatedLoRA` is a :class:`~privrec.federated.protocols.FederatedModel` for
:class:`~privrec.recsys.lora.LoRATwoTower`: every user is a client holding its positives and its user
rows; a sampled client takes ``local_steps`` SGD steps on its own implicit-feedback loss (the loss of
:class:`~privrec.federated.two_tower.FederatedImplicit`) over its copy of the shared parameters -- the
adapter and biases of the two-tower head **and the LoRA factors inside MiniLM** -- and uploads their
change. All clients of a chunk train as one batched program: each client's copy of the parameters is
one slice of a stacked tensor, so one backward pass gives every client its own gradient.

Two ways to federate LoRA (Sun et al. 2024):

* ``lora="lora"``: clients train and upload :math:`A` and :math:`B`; the server averages each factor
  separately, so the new product is :math:`\\bar B\\bar A`, not the average
  :math:`\\overline{BA}` of the clients' products (:func:`product_error` measures the gap), and
  under DP-FedAvg the noise enters both factors and multiplies (:math:`\\xi_B\\xi_A`).
* ``lora="ffa"`` (FFA-LoRA): :math:`A` stays frozen at its public random initialisation; clients
  train and upload only :math:`B`. The update :math:`s\\,\\Delta B\\,A` is linear in what is averaged,
  so averaging is exact, the noise enters linearly, and the upload is smaller.

References: Sun, Qin, Wang & Li (2024), Improving LoRA in privacy-preserving federated learning,
ICLR; McMahan et al. (2018), DP recurrent language models, ICLR.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from ..core.checks import instance, int_in
from ..recsys.lora import LoRAEncoder, LoRATwoTower
from ..recsys.metrics import ranking_metrics
from .two_tower import ImplicitClients
from .updates import ClientUpdates

__all__ = ["FederatedLoRA", "product_error", "packed_tokens", "client_embeddings"]


class FederatedLoRA(ImplicitClients):
    """Every user a client fine-tuning the LoRA two-tower model (see the module docstring).

    Parameters
    ----------
    model:
        A :class:`~privrec.recsys.lora.LoRATwoTower`; its ``lora`` mode ("lora", "ffa", "frozen")
        decides which encoder factors are shared and trained.
    train:
        Ratings (positives).
    local_steps, local_batch, n_negatives, client_lr, user_lr, reg, negative_items,
    personalise_steps, seed:
        As in :class:`~privrec.federated.two_tower.FederatedImplicit` (the clients draw their
        positives and negatives with the same generator calls).

    Raises
    ------
    TypeError, ValueError
        For a model of the wrong kind, bad ratings or bad step settings.
    """

    def __init__(self, model: LoRATwoTower, train: pd.DataFrame, *, local_steps: int = 1,
                 local_batch: int = 4, n_negatives: int = 4, client_lr: float = 5.0,
                 user_lr: float = 1.0, reg: float = 1e-4, negative_items: object = None,
                 personalise_steps: int = 20, seed: int = 0) -> None:
        super().__init__(instance("model", model, LoRATwoTower), train, local_steps=local_steps,
                         local_batch=local_batch, n_negatives=n_negatives, client_lr=client_lr,
                         user_lr=user_lr, reg=reg, negative_items=negative_items,
                         personalise_steps=personalise_steps, seed=seed)
        self._z: tuple[torch.Tensor, torch.Tensor] | None = None

    def shared_state(self) -> dict[str, torch.Tensor]:
        """The model's shared parameters (seeded initialisation: no data statistic)."""
        return {n: self.model.parameter(n).detach().clone() for n in self.shared_names}

    def load_shared(self, shared: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n in self.shared_names:
                self.model.parameter(n).copy_(shared[n])

    def chunks(self, clients: torch.Tensor, max_examples: int) -> list[torch.Tensor]:
        """Consecutive groups of at most ``max_examples // examples_per_client`` clients."""
        size = max(1, int_in("max_examples", max_examples, 1) // self.examples_per_client)
        return list(torch.split(clients, size))

    def _embeddings(self, local: dict[str, torch.Tensor], items: torch.Tensor) -> torch.Tensor:
        frozen = None if "lora_A" in local or "lora_B" not in local else self._frozen_z()
        return client_embeddings(self.model.encoder, local, items, frozen_z=frozen)

    def _frozen_z(self) -> torch.Tensor:
        """:math:`Au_t` of every token (A frozen: computed once)."""
        enc = self.model.encoder
        key = enc.lora_a.weight.detach().clone()
        if self._z is None or not torch.equal(self._z[0], key):
            with torch.no_grad():
                self._z = (key, enc.lora_a(enc.ffn))
        return self._z[1]

    def client_losses(self, local: dict[str, torch.Tensor], users: dict[str, torch.Tensor],
                      items: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``[K]`` each client's loss: BCE on its items plus ``reg`` times its user rows' squares."""
        m = self.model
        x = (self._embeddings(local, items) - m.centre) @ m.directions          # [K, n, k]
        vectors = (x @ m.head.base_projection
                   + torch.bmm(torch.bmm(x, local["adapter_down"]), local["adapter_up"]))
        bias = torch.bmm(x, local["text_bias"][..., None])[..., 0] + local["global_bias"][:, None]
        if "item_bias" in local:
            bias = bias + torch.gather(local["item_bias"], 1, items)
        logits = (bias + users["user_bias"][:, None]
                  + (users["user_factors"][:, None, :] * vectors).sum(-1))
        bce = nn.functional.binary_cross_entropy_with_logits(
            logits, labels.expand_as(logits), reduction="none").mean(1)
        return bce + self.reg * (users["user_factors"].square().sum(1) + users["user_bias"].square())

    def local_training(self, shared: dict[str, torch.Tensor],
                       clients: torch.Tensor) -> ClientUpdates:
        """Train the (sorted) ``clients`` from ``shared``; return their uploads."""
        clients, active, local = self._cohort(shared, clients)
        users = {n: getattr(self.model.head, n).detach()[active].clone()
                 for n in self.model.user_parameter_names}
        touched = []
        for _ in range(self.local_steps if len(active) else 0):
            items, labels = self._draw(active)
            leaves = [v.requires_grad_() for v in (*local.values(), *users.values())]
            grads = torch.autograd.grad(self.client_losses(local, users, items, labels).sum(),
                                        leaves)
            with torch.no_grad():
                local = {n: v - self.client_lr * g
                         for (n, v), g in zip(local.items(), grads[:len(local)], strict=True)}
                users = {n: v - self.user_lr * g
                         for (n, v), g in zip(users.items(), grads[len(local):], strict=True)}
            touched.append(items)
        with torch.no_grad():
            for n, v in users.items():  # the user rows stay on the devices
                getattr(self.model.head, n)[active] = v
        position = torch.searchsorted(clients, active)
        changes = {n: torch.zeros(len(clients), *shared[n].shape).index_copy_(
            0, position, v.detach() - shared[n]) for n, v in local.items()}
        return self._package(clients, changes, position, touched)

    def released_model(self, shared: dict[str, torch.Tensor]) -> nn.Module:
        """The model with ``shared``, after every client refitted its user rows to it for
        ``personalise_steps`` steps (no communication)."""
        self.load_shared(shared)
        head, active = self.model.head, (self.counts > 0).nonzero().squeeze(1)
        with torch.no_grad():
            q, b = self.model.item_vectors()
            b = b + head.global_bias
        users = {n: getattr(head, n).detach()[active].clone() for n in ("user_factors",
                                                                         "user_bias")}
        for _ in range(self.personalise_steps if len(active) else 0):
            items, labels = self._draw(active)
            leaves = [v.requires_grad_() for v in users.values()]
            logits = (b[items] + users["user_bias"][:, None]
                      + (users["user_factors"][:, None, :] * q[items]).sum(-1))
            loss = (nn.functional.binary_cross_entropy_with_logits(
                logits, labels.expand_as(logits), reduction="none").mean(1)
                + self.reg * sum(v.reshape(len(active), -1).square().sum(1) for v in leaves))
            grads = torch.autograd.grad(loss.sum(), leaves)
            users = {n: (v - self.user_lr * g).detach()
                     for (n, v), g in zip(users.items(), grads, strict=True)}
        with torch.no_grad():
            for n, v in users.items():
                getattr(head, n)[active] = v
        return self.model

    def evaluate(self, shared: dict[str, torch.Tensor], test: pd.DataFrame) -> dict[str, float]:
        """HR@10 and NDCG@10 of the released model (full catalogue, training items excluded)."""
        model = self.released_model(shared)
        with torch.no_grad():
            return ranking_metrics(model.score_all(), self.train, test)


def product_error(broadcast: dict[str, torch.Tensor], updates: ClientUpdates) -> float:
    """How far averaging the factors separately is from averaging the products, for one round.

    With the clients' factors :math:`A_k = A + \\Delta A_k`, :math:`B_k = B + \\Delta B_k`, returns
    :math:`\\lVert \\bar B\\bar A - \\overline{B_kA_k}\\rVert_F / \\lVert \\overline{B_kA_k} - BA\\rVert_F`:
    the error of plain federated LoRA's new product relative to the change it should make
    (0 for FFA-LoRA, whose :math:`A` never moves). Unclipped, noise-free uploads.
    """
    if "lora_B" not in updates.dense:
        raise ValueError("updates must carry a lora_B change")
    if "lora_A" not in updates.dense:  # FFA-LoRA: A never moves, the average is exact
        return 0.0
    a, b = broadcast["lora_A"], broadcast["lora_B"]
    d_a = updates.dense.get("lora_A", torch.zeros(len(updates), *a.shape))
    d_b = updates.dense["lora_B"]
    mean_product = torch.einsum("kor,kri->oi", b + d_b, a + d_a) / len(updates)
    product_of_means = (b + d_b.mean(0)) @ (a + d_a.mean(0))
    change = (mean_product - b @ a).norm()
    return float((product_of_means - mean_product).norm() / change) if change > 0 else 0.0


def packed_tokens(enc: LoRAEncoder, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each client's tokens side by side, padding only at the end: ``(rows [K, W], item
    position [K, W])`` for ``items [K, n]``, pads pointing at the zero row and at position ``n``."""
    rows, mask = enc.tokens(items)                                         # [K, n, T]
    k, n, t = rows.shape
    flat = mask.reshape(k, -1)
    place = torch.cumsum(flat, 1) - 1
    width = int(place[:, -1].max()) + 1
    packed = torch.full((k, width), len(enc.ffn) - 1, dtype=torch.long)
    position = torch.full((k, width), n, dtype=torch.long)
    client, slot = torch.arange(k)[:, None].expand(k, n * t)[flat], place[flat]
    packed[client, slot] = rows.reshape(k, -1)[flat]
    position[client, slot] = torch.arange(n).repeat_interleave(t).expand(k, -1)[flat]
    return packed, position


def client_embeddings(enc: LoRAEncoder, local: dict[str, torch.Tensor], items: torch.Tensor, *,
                      frozen_z: torch.Tensor | None = None) -> torch.Tensor:
    """``[K, n, 384]``: each client's embeddings of its ``items [K, n]`` under its own LoRA
    factors ``local["lora_A"] [K, r, 1536]`` (absent: ``frozen_z`` = :math:`Au_t` of every token)
    and ``local["lora_B"] [K, 384, r]`` (absent: the frozen encoder)."""
    if "lora_B" not in local:  # frozen encoder: one embedding per item, no gradient
        with torch.no_grad():
            return enc.all_embeddings()[items]
    rows, position = packed_tokens(enc, items)
    if "lora_A" in local:  # each client's own A: u_t A_k^T
        z = torch.bmm(enc.ffn[rows], local["lora_A"].transpose(1, 2))
    else:  # A frozen (FFA-LoRA): z_t = A u_t, the same for every client
        z = frozen_z[rows]
    x = enc.base[rows] + torch.bmm(z, local["lora_B"].transpose(1, 2)) * enc.scaling
    norm = enc.top.LayerNorm
    out = nn.functional.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)
    k, n = items.shape
    sums = torch.zeros(k, n + 1, out.shape[-1]).scatter_add(
        1, position[..., None].expand_as(out), out)[:, :n]
    return nn.functional.normalize(sums / enc.lengths[items][..., None].to(sums.dtype), dim=-1)

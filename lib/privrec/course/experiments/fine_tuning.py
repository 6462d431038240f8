"""Chapter 7's experiments: the catalogue its runs are keyed on, the LoRA checks, a short central
DP-SGD run and the FFA-LoRA table.

:class:`LoRACatalogue` computes MiniLM's frozen top-layer inputs once (one transformer forward,
cached on disk under the CPU kernels that computed them) and finishes the sentence embeddings from
them, and keys every cached run on a digest of those floats; :func:`lora_checks` measures, on the
real catalogue, that the cached path reproduces the sentence-transformer embeddings, that merged
and unmerged adapters agree, and that the library's per-example LoRA gradients equal Opacus's and
plain autograd's; :func:`central_lora_run` fine-tunes with interaction-level DP-SGD and reports
the ledger and which encoder weights moved; :func:`ffa_table` sets FFA-LoRA beside plain
federated LoRA.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pandas as pd
import torch

from ...recsys.lora import frozen_embeddings, top_layer_inputs
from ...recsys.text_encoder import item_texts
from .large_models import Catalogue, Protocol, Split, new_model, run

__all__ = ["LoRACatalogue", "lora_checks", "central_lora_run", "ffa_table"]


class LoRACatalogue(Catalogue):
    """:class:`~privrec.course.experiments.large_models.Catalogue` built from one MiniLM forward.

    The frozen top-layer inputs are computed once and cached on disk (keyed on the texts, the code
    and :func:`~privrec.core.arithmetic.arithmetic_tag`); the sentence embeddings are finished from them
    (:func:`~privrec.recsys.lora.frozen_embeddings`, equal to sentence-transformers' to < 1e-6).
    ``key``, part of every cached run's key, is a SHA-256 of all these floats: a cached run is
    reused only with the very numbers it was computed from.
    """

    def __post_init__(self) -> None:
        self.texts = item_texts(self.items)
        self._inputs = top_layer_inputs(self.texts)
        self.embeddings = frozen_embeddings(self._inputs)
        digest = hashlib.sha256()
        for array in (self.embeddings, *self._inputs):
            digest.update(np.ascontiguousarray(array.numpy()).data)
        self.key = f"minilm-layer-inputs-{digest.hexdigest()[:24]}"


def lora_checks(catalogue: Catalogue, *, seed: int = 0) -> dict:
    """Correctness of the LoRA item tower on the real catalogue: pretrained path vs the
    sentence-transformer embeddings (128 texts drawn with ``seed``), merged vs unmerged scores,
    library per-example gradients vs Opacus and vs autograd one record at a time (max absolute
    differences)."""
    from ...central.lora_dpsgd import example_losses, opacus_lora_gradients, per_example_gradients
    from ...recsys.text_encoder import encode_items
    from ...recsys.two_tower import implicit_batch

    model = new_model("MiniLM + LoRA", catalogue, seed=seed)
    enc, every = model.encoder, torch.arange(catalogue.n_items)
    sample = torch.randperm(catalogue.n_items, generator=torch.Generator().manual_seed(seed))[:128]
    reference = encode_items([catalogue.texts[i] for i in sample.tolist()], use_cache=False)
    out = {}
    with torch.no_grad():
        out["pretrained path vs sentence-transformers"] = float(
            (enc.all_embeddings()[sample] - reference).abs().max())
        enc.lora_b.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
        out["merged vs unmerged embeddings"] = float(
            (enc.merged_forward(every) - enc.all_embeddings()).abs().max())
    gen = torch.Generator().manual_seed(seed)
    users = torch.randint(catalogue.n_users, (32,), generator=gen)
    items, labels = implicit_batch(torch.randint(catalogue.n_items, (32, 1), generator=gen),
                                   every, n_negatives=4, generator=gen)
    ours = per_example_gradients(model, users, items, labels)
    theirs = opacus_lora_gradients(model, users, items, labels)
    out["per-example LoRA gradients vs Opacus"] = max(
        float((ours[n] - g).abs().max()) for n, g in theirs.items())
    loop = 0.0
    for j in range(4):
        model.zero_grad()
        example_losses(model, users[j:j + 1], items[j:j + 1], labels).sum().backward()
        loop = max(loop, max(float((p.grad - ours[n][j]).abs().max()) for n, p in
                             model.named_parameters() if "lora_" in n))
    model.zero_grad()
    out["per-example LoRA gradients vs autograd per record"] = loop
    return out


def central_lora_run(catalogue: Catalogue, split: Split, *, target_epsilon: float = 8.0,
                     steps: int = 10, sample_rate: float = 0.0005, seed: int = 0) -> dict:
    """A short interaction-level DP-SGD fine-tuning of plain LoRA (and the head): its ledger, and
    which encoder weights moved (max change) -- the pretrained ones must not move at all."""
    from ...central.lora_dpsgd import fit_lora_dpsgd
    from ...recsys.lora import encoder_weights

    model = new_model("MiniLM + LoRA", catalogue, seed=seed)
    before = {n: p.detach().clone() for n, p in model.encoder.named_parameters()}
    fit = fit_lora_dpsgd(model, split.train, target_epsilon=target_epsilon, steps=steps,
                         sample_rate=sample_rate, negative_items=split.warm_items(
                             catalogue.n_items), seed=seed)
    moved = {n: float((p.detach() - before[n]).abs().max())
             for n, p in model.encoder.named_parameters()}
    dense, norm = encoder_weights()
    pretrained = dict(zip(("top.dense.base_layer.weight", "top.dense.base_layer.bias",
                           "top.LayerNorm.weight", "top.LayerNorm.bias"),
                          (dense.weight, dense.bias, norm.weight, norm.bias), strict=True))
    identical = all(torch.equal(dict(model.encoder.named_parameters())[n], p)
                    for n, p in pretrained.items())
    return {"ledger": fit.ledger.to_json(), "epsilon": fit.ledger.epsilon(), "moved": moved,
            "non-LoRA bit-identical to pretrained": identical, "seconds": fit.seconds}


def ffa_table(grid: pd.DataFrame, *, catalogue: Catalogue, split: Split, protocol: Protocol,
              chosen: dict, epsilons: tuple[float, ...] = (4.0, math.inf)) -> pd.DataFrame:
    """FFA-LoRA beside plain federated LoRA at ``epsilons``, with the same settings.

    FFA-LoRA's rows are its runs in ``grid`` (:func:`~.large_models.epsilon_grid`); its product
    error is 0 by construction (:math:`A` never moves). Plain LoRA runs here (cached), measuring
    :func:`~privrec.federated.lora.product_error` in its non-private run. Columns: warm and cold
    NDCG@10, KiB up and down per client per round, median product error (non-private rows).
    """
    rows = []
    for kind in ("MiniLM + FFA-LoRA", "MiniLM + LoRA"):
        for eps in epsilons:
            if kind in set(grid["model"]):
                r = grid[(grid["model"] == kind) & (grid["target epsilon"] == eps)].iloc[0]
            else:
                c = chosen[kind]
                r = run(kind, eps, catalogue=catalogue, split=split, protocol=protocol,
                        client_lr=c["client_lr"], user_lr=c["user_lr"], seed=0,
                        clip_norm=None if math.isinf(eps) else c["clip_norm"],
                        product_errors=math.isinf(eps))
            errors = r["product errors"] or [0.0]
            rows.append({"model": kind, "ε": eps, "warm": round(r["ndcg"], 4),
                         "cold": round(r["cold ndcg"], 4),
                         "up KiB": round(r["upload bytes per client"] / 1024, 1),
                         "down KiB": round(r["download bytes per client"] / 1024, 1),
                         "product error": round(float(np.median(errors)), 4)
                         if math.isinf(eps) else None})
    return pd.DataFrame(rows)

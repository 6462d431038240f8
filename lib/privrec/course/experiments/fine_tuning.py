"""Chapter 7's checks of the LoRA item tower and its short central DP-SGD run.

:func:`lora_checks` measures, on the real catalogue, that the cached path reproduces the
sentence-transformer embeddings, that merged and unmerged adapters agree, and that the library's
per-example LoRA gradients equal Opacus's and plain autograd's; :func:`central_lora_run` fine-tunes
with interaction-level DP-SGD and reports the ledger and which encoder weights moved.
"""

from __future__ import annotations

import torch

from .large_models import Catalogue, Split, new_model

__all__ = ["lora_checks", "central_lora_run"]


def lora_checks(catalogue: Catalogue, *, seed: int = 0) -> dict:
    """Correctness of the LoRA item tower on the real catalogue: pretrained path vs the
    sentence-transformer embeddings, merged vs unmerged scores, library per-example gradients vs
    Opacus and vs autograd one record at a time (max absolute differences)."""
    from ...central.lora_dpsgd import example_losses, opacus_lora_gradients, per_example_gradients
    from ...recsys.two_tower import implicit_batch

    model = new_model("MiniLM + LoRA", catalogue, seed=seed)
    enc, every = model.encoder, torch.arange(catalogue.n_items)
    out = {}
    with torch.no_grad():
        out["pretrained path vs sentence-transformers"] = float(
            (enc.all_embeddings() - catalogue.embeddings).abs().max())
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

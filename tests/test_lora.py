"""LoRA inside MiniLM (privrec.recsys.lora): cached path, merge, frozen weights, parameter counts."""

import pytest
import torch

from privrec.federated.engine import FederatedSimulator
from privrec.federated.lora import FederatedLoRA
from privrec.federated.strategies import FedAvgM
from privrec.federated.two_tower import FederatedImplicit
from privrec.recsys.lora import (
    LoRAEncoder,
    LoRATwoTower,
    encoder_weights,
    lora_parameter_table,
)
from privrec.recsys.two_tower import TwoTowerRecommender, shared_size


def build(lora_setup, lora="lora", seed=0):
    ml, inputs, emb = lora_setup
    head = TwoTowerRecommender(30, emb, 4, text_dim=8, rank=2, item_bias=True, seed=seed)
    return LoRATwoTower(head, LoRAEncoder(inputs, rank=4, seed=seed), emb, lora=lora)


def test_pretrained_path_equals_sentence_transformer(lora_setup):
    model = build(lora_setup)
    with torch.no_grad():
        assert (model.encoder.all_embeddings() - lora_setup[2]).abs().max() < 1e-5
        assert (model.encoder(torch.arange(24)) - lora_setup[2]).abs().max() < 1e-5


def test_zero_b_scores_like_the_frozen_model(lora_setup):
    model = build(lora_setup)
    with torch.no_grad():
        assert (model.score_all() - model.head.score_all()).abs().max() < 1e-4


def test_merged_and_unmerged_give_the_same_scores(lora_setup):
    model = build(lora_setup)
    with torch.no_grad():
        model.encoder.lora_b.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        items = torch.arange(24)
        unmerged = model.encoder(items)
        merged = model.encoder.merged_forward(items)
        assert (merged - unmerged).abs().max() < 1e-5
        assert (unmerged - lora_setup[2]).abs().max() > 1e-3  # B really moved the embeddings
        dense, _ = encoder_weights()  # merge_forward unmerged again: W2 is the pretrained one
        assert torch.equal(model.encoder.top.dense.base_layer.weight, dense.weight)


def test_only_lora_parameters_change_and_pretrained_stay_bit_identical(lora_setup):
    ml = lora_setup[0]
    model = build(lora_setup, lora="lora")
    before = {n: p.detach().clone() for n, p in model.encoder.named_parameters()}
    sim = FederatedSimulator(FederatedLoRA(model, ml.ratings, client_lr=5.0),
                             FedAvgM(clients_per_round=10, seed=0))
    for _ in range(3):
        sim.round()
    sim.released_model()
    dense, norm = encoder_weights()
    after = dict(model.encoder.named_parameters())
    for name, p in after.items():
        moved = not torch.equal(p, before[name])
        assert moved == ("lora_" in name), name
    assert torch.equal(after["top.dense.base_layer.weight"], dense.weight)
    assert torch.equal(after["top.dense.base_layer.bias"], dense.bias)
    assert torch.equal(after["top.LayerNorm.weight"], norm.weight)


def test_frozen_encoder_clients_equal_the_two_tower_clients(lora_setup):
    ml, _, emb = lora_setup
    kw = dict(local_steps=1, local_batch=3, personalise_steps=2, client_lr=2.0, seed=0)
    a = FederatedSimulator(FederatedLoRA(build(lora_setup, lora="frozen"), ml.ratings, **kw),
                           FedAvgM(clients_per_round=8, seed=0))
    head = TwoTowerRecommender(30, emb, 4, text_dim=8, rank=2, item_bias=True, seed=0)
    b = FederatedSimulator(FederatedImplicit(head, ml.ratings, **kw),
                           FedAvgM(clients_per_round=8, seed=0))
    for _ in range(2):
        a.round()
        b.round()
    assert max(float((a.shared[n] - b.shared[n]).abs().max()) for n in b.shared) < 1e-5


def test_parameter_table_counts(lora_setup):
    rows = {r["item tower"]: r for r in lora_parameter_table(ranks=(4, 8), head=100)}
    assert rows["LoRA r=8 (A and B)"]["encoder"] == 8 * (1536 + 384)
    assert rows["FFA-LoRA r=4 (B only)"]["encoder"] == 4 * 384
    # q, k, v, attention output (weights and biases), two LayerNorms, the two feed-forward maps
    assert rows["full fine-tuning, top layer"]["encoder"] == 4 * (384 * 384 + 384) + 4 * 384 \
        + 2 * 384 * 1536 + 1536 + 384
    assert rows["frozen MiniLM + adapter"]["trained"] == 100
    model = build(lora_setup, lora="ffa")
    assert shared_size(model.head) + 4 * 384 == sum(p.numel() for p in model.shared_parameters())


def test_bad_arguments(lora_setup):
    with pytest.raises(ValueError, match="lora"):
        build(lora_setup, lora="both")
    with pytest.raises(ValueError, match="rank"):
        LoRAEncoder(lora_setup[1], rank=0)
    with pytest.raises(TypeError, match="head"):
        LoRATwoTower(object(), LoRAEncoder(lora_setup[1]), lora_setup[2])

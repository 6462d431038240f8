"""LoRA under DP: per-example gradients (autograd, Opacus), FFA uploads, DP-FedAvg noise and ledger,
neighbouring data sets, DP-SGD's ledger and frozen weights."""

import math

import pytest
import torch

from privrec.central.lora_dpsgd import (
    example_losses,
    fit_lora_dpsgd,
    opacus_lora_gradients,
    per_example_gradients,
)
from privrec.dp.ledger import default_delta
from privrec.federated.dpfedavg import DPFedAvg
from privrec.federated.engine import FederatedSimulator
from privrec.federated.lora import FederatedLoRA, product_error
from privrec.federated.strategies import FedAvg
from privrec.recsys.lora import LoRAEncoder, LoRATwoTower, encoder_weights
from privrec.recsys.two_tower import TwoTowerRecommender, implicit_batch


def build(lora_setup, lora="lora"):
    _, inputs, emb = lora_setup
    head = TwoTowerRecommender(30, emb, 4, text_dim=8, rank=2, item_bias=True, seed=0)
    model = LoRATwoTower(head, LoRAEncoder(inputs, rank=4, seed=0), emb, lora=lora)
    with torch.no_grad():
        model.encoder.lora_b.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    return model


def batch(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    items, labels = implicit_batch(torch.randint(24, (n, 1), generator=gen), torch.arange(24),
                                   n_negatives=3, generator=gen)
    return torch.randint(30, (n,), generator=gen), items, labels


def test_per_example_lora_gradients_equal_autograd_and_opacus(lora_setup):
    model = build(lora_setup)
    users, items, labels = batch()
    ours = per_example_gradients(model, users, items, labels)
    theirs = opacus_lora_gradients(model, users, items, labels)
    assert set(theirs) == {n for n in ours if "lora_" in n} and len(theirs) == 2
    for j in range(len(users)):
        model.zero_grad()
        example_losses(model, users[j:j + 1], items[j:j + 1], labels).sum().backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert torch.allclose(p.grad, ours[name][j], atol=1e-6), name
    for name, g in theirs.items():
        assert (g - ours[name]).abs().max() < 1e-5
        assert g.abs().max() > 1e-4  # not trivially zero


def test_ffa_upload_has_only_b(lora_setup):
    ml = lora_setup[0]
    ffa = FederatedLoRA(build(lora_setup, "ffa"), ml.ratings)
    up = ffa.local_training(ffa.shared_state(), torch.arange(5))
    assert "lora_B" in up.dense and "lora_A" not in up.dense
    assert product_error(ffa.shared_state(), up) == 0.0
    plain = FederatedLoRA(build(lora_setup, "lora"), ml.ratings, client_lr=5.0)
    up = plain.local_training(plain.shared_state(), torch.arange(5))
    assert {"lora_A", "lora_B"} <= set(up.dense)
    assert product_error(plain.shared_state(), up) > 0.0


def test_dp_fedavg_over_lora_noise_and_ledger(lora_setup):
    ml = lora_setup[0]
    clients = FederatedLoRA(build(lora_setup, "ffa"), ml.ratings, client_lr=0.0, user_lr=1.0)
    server = DPFedAvg.calibrated(FedAvg(), target_epsilon=4.0, rounds=3, n_clients=30,
                                 sample_rate=0.5, clip_norm=0.5, seed=0)
    sim = FederatedSimulator(clients, server)
    start = {k: v.clone() for k, v in sim.shared.items()}
    sim.round()
    # client_lr = 0: every upload is zero, so the change is the noise / (qN) alone
    change = torch.cat([(sim.shared[k] - start[k]).reshape(-1) for k in start])
    expected = server.noise_multiplier * 0.5 / (0.5 * 30)
    assert abs(float(change.std()) / expected - 1) < 0.1
    sim.round()
    sim.round()
    assert sim.ledger.unit == "user" and sim.ledger.delta == default_delta(30)
    assert sim.ledger.epsilon() == pytest.approx(4.0, abs=0.02)


def test_neighbouring_data_sets_start_from_the_same_state(lora_setup):
    ml = lora_setup[0]
    without = ml.ratings[ml.ratings["user"] != 7]
    a = FederatedLoRA(build(lora_setup, "lora"), ml.ratings).shared_state()
    b = FederatedLoRA(build(lora_setup, "lora"), without).shared_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dpsgd_ledger_and_frozen_weights(lora_setup):
    ml = lora_setup[0]
    model = build(lora_setup)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit = fit_lora_dpsgd(model, ml.ratings, target_epsilon=2.0, steps=3, sample_rate=0.05)
    assert fit.ledger.unit == "interaction" and fit.ledger.epsilon() <= 2.0 + 1e-3
    dense, _ = encoder_weights()
    params = dict(model.named_parameters())
    assert torch.equal(params["encoder.top.dense.base_layer.weight"], dense.weight)
    assert not torch.equal(params["encoder.top.dense.lora_A.default.weight"],
                           before["encoder.top.dense.lora_A.default.weight"])
    assert math.isfinite(fit.history["loss"][-1])
    assert fit_lora_dpsgd(build(lora_setup), ml.ratings, target_epsilon=math.inf, steps=1,
                          sample_rate=0.05).ledger is None


def test_bad_arguments(lora_setup):
    with pytest.raises(TypeError, match="model"):
        FederatedLoRA(object(), lora_setup[0].ratings)
    with pytest.raises(ValueError, match="steps"):
        fit_lora_dpsgd(build(lora_setup), lora_setup[0].ratings, target_epsilon=1.0, steps=0)
    with pytest.raises(ValueError, match="lora_B"):
        product_error({}, FederatedLoRA(build(lora_setup, "frozen"), lora_setup[0].ratings)
                      .local_training(FederatedLoRA(build(lora_setup, "frozen"), lora_setup[0].ratings)
                                      .shared_state(), torch.arange(2)))

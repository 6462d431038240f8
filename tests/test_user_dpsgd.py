"""Tests of privrec.central.user_dpsgd: per-user gradients (against autograd and Opacus), clipping,
noise calibration, empty batches, the ledger against dp-accounting, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from privrec.central.user_dpsgd import (
    STEP_NAME,
    UserDPSGD,
    fit_user_dpsgd,
    per_user_clipped_sum,
    per_user_gradients,
)
from privrec.dp.ledger import PrivacyLedger, default_delta
from privrec.recsys.data import leave_last_out_split, synthetic_movielens
from privrec.recsys.sequential import SASRec, causal_mask, sequence_losses


@pytest.fixture(scope="module")
def data():
    return synthetic_movielens(n_users=40, n_items=30, n_ratings=600, seed=0)


def _batch(n_users=8, length=8, n_items=30, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(1, n_items + 1, (n_users, length), generator=gen)
    y = torch.randint(0, n_items, (n_users, length), generator=gen)
    x[0, :3], y[0, :3] = 0, -1  # one short history, left-padded
    return x, y


@pytest.mark.parametrize("negatives", [None, torch.tensor([3, 7, 11, 29])])
def test_per_user_gradients_equal_autograd_on_each_user_alone(negatives):
    model = SASRec(30, dim=16, max_len=8, dropout=0.0, seed=2)
    x, y = _batch()
    grads = per_user_gradients(model, x, y, negatives)
    for u in range(len(x)):
        model.zero_grad()
        sequence_losses(model, x[u:u + 1], y[u:u + 1], negatives).sum().backward()
        for name, p in model.named_parameters():
            assert torch.allclose(grads[name][u], p.grad, atol=1e-6), (u, name)


class _OpacusBlock(nn.Module):
    """The same block with Opacus's DPMultiheadAttention (weights copied)."""

    def __init__(self, block):
        from opacus.layers import DPMultiheadAttention

        super().__init__()
        self.norm1, self.norm2 = copy.deepcopy(block.norm1), copy.deepcopy(block.norm2)
        self.ffn = copy.deepcopy(block.ffn)
        dim = block.norm1.normalized_shape[0]
        # Opacus 1.6: one head with batch_first (its batch-first output reshape mixes heads) and a
        # 3-D mask checked against query.size(0) -- so the tests use B = L.
        self.attention = DPMultiheadAttention(dim, 1, bias=True, batch_first=True)
        ours = block.attention
        for mine, theirs in ((ours.query, self.attention.qlinear), (ours.key, self.attention.klinear),
                             (ours.value, self.attention.vlinear), (ours.out, self.attention.out_proj)):
            theirs.weight.data.copy_(mine.weight.data)
            theirs.bias.data.copy_(mine.bias.data)

    def forward(self, x, allowed):
        h = self.norm1(x)
        out, _ = self.attention(h, h, h, attn_mask=~allowed, need_weights=False)
        x = x + out
        return x + self.ffn(self.norm2(x))


class _OpacusTwin(nn.Module):
    def __init__(self, model: SASRec):
        super().__init__()
        self.items, self.positions = copy.deepcopy(model.items), copy.deepcopy(model.positions)
        self.blocks = nn.ModuleList(_OpacusBlock(b) for b in model.blocks)
        self.norm = copy.deepcopy(model.norm)
        self.output = nn.Linear(model.dim, model.n_items + 1)
        self.output.bias.data.copy_(model.output.bias.data)
        self.output.weight = self.items.weight  # tied, as in SASRec
        self.max_len, self.n_items = model.max_len, model.n_items

    def forward(self, inputs):
        pos = torch.arange(self.max_len - inputs.shape[1], self.max_len).expand_as(inputs)
        x = self.items(inputs) + self.positions(pos.contiguous())
        allowed = causal_mask(inputs)
        for block in self.blocks:
            x = block(x, allowed)
        return self.norm(x)

    def logits(self, hidden):
        return self.output(hidden)[..., 1:]


_OPACUS_NAMES = {"attention.qlinear": "attention.query", "attention.klinear": "attention.key",
                 "attention.vlinear": "attention.value", "attention.out_proj": "attention.out"}


def _ours(name: str) -> str:
    for theirs, mine in _OPACUS_NAMES.items():
        name = name.replace(theirs, mine)
    return name


def test_per_user_gradients_match_opacus_hooks_with_dp_attention():
    pytest.importorskip("opacus")
    from opacus.grad_sample import GradSampleModule

    model = SASRec(30, dim=16, max_len=8, dropout=0.0, seed=1)
    x, y = _batch()
    ours = per_user_gradients(model, x, y)
    twin = _OpacusTwin(model)
    assert torch.allclose(twin(x), model(x), atol=1e-6)
    GradSampleModule(twin, loss_reduction="sum")
    sequence_losses(twin, x, y).sum().backward()
    seen = set()
    for name, p in twin.named_parameters():
        assert torch.allclose(p.grad_sample, ours[_ours(name)], atol=1e-5), name
        seen.add(_ours(name))
    assert seen == set(ours)  # every parameter, the tied item table included


def test_per_user_norms_match_opacus_ghost_clipping_except_the_tied_table():
    """Opacus's ghost clipping refuses tied parameters; with the item table frozen its
    per-user norms of everything else equal ours."""
    pytest.importorskip("opacus")
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    model = SASRec(30, dim=16, max_len=8, dropout=0.0, seed=1)
    x, y = _batch()
    ours = per_user_gradients(model, x, y)
    twin = _OpacusTwin(model)
    with pytest.raises(NotImplementedError, match="tying"):
        ghost = GradSampleModuleFastGradientClipping(_OpacusTwin(model), loss_reduction="sum")
        sequence_losses(ghost._module, x, y)
    twin.items.weight.requires_grad_(False)
    ghost = GradSampleModuleFastGradientClipping(twin, loss_reduction="sum", max_grad_norm=1.0)
    sequence_losses(twin, x, y).sum().backward()
    expected = torch.stack([g.reshape(len(x), -1).square().sum(1) for n, g in ours.items()
                            if n != "items.weight"]).sum(0).sqrt()
    assert torch.allclose(ghost.get_norm_sample(), expected, atol=1e-5)


def test_each_user_moves_the_clipped_sum_by_at_most_c():
    model = SASRec(30, dim=16, max_len=8, dropout=0.0, seed=0)
    x, y = _batch()
    full, norms = per_user_clipped_sum(model, x, y, clip_norm=0.05, chunk=3)
    assert (norms > 0.05).all()  # every user is clipped here
    without, _ = per_user_clipped_sum(model, x[1:], y[1:], clip_norm=0.05, chunk=3)
    diff = torch.sqrt(sum((full[n] - without[n]).square().sum() for n in full))
    assert diff <= 0.05 * (1 + 1e-5)
    assert diff >= 0.05 * (1 - 1e-4)


def test_empty_batch_releases_pure_noise_of_the_calibrated_size(data):
    sigma, clip, q = 1.5, 0.8, 0.25
    train, _ = leave_last_out_split(data.ratings)
    run = UserDPSGD(SASRec(data.n_items, dim=8, max_len=6, dropout=0.0), train,
                    n_users=data.n_users, clip_norm=clip, noise_multiplier=sigma, sample_rate=q,
                    n_negatives=None)
    expected = sigma * clip / (q * data.n_users)
    empty = torch.zeros(0, dtype=torch.long)
    draws = [run.noisy_gradient(empty) for _ in range(30)]
    for name, _ in run.model.named_parameters():
        sample = torch.stack([d[name] for d in draws]).double()
        n = sample.numel()
        assert abs(sample.mean().item()) < 5 * expected / math.sqrt(n), name
        assert abs(sample.square().mean().item() / expected ** 2 - 1) < 5 * math.sqrt(2 / n), name
        assert (sample.square().mean(0) > 0).all(), name  # every coordinate gets noise

    class EmptyBatches(UserDPSGD):
        def sample_batch(self):
            return torch.zeros(0, dtype=torch.long)

    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    silent = EmptyBatches(run.model, train, n_users=data.n_users, clip_norm=clip,
                          noise_multiplier=sigma, sample_rate=q, n_negatives=None)
    silent.step()
    assert silent.ledger.events[0].count == 1 and silent.epsilon() > 0
    assert any(not torch.equal(before[n], p) for n, p in run.model.named_parameters())


def test_poisson_sampling_of_users(data):
    train, _ = leave_last_out_split(data.ratings)
    run = UserDPSGD(SASRec(data.n_items, dim=8, max_len=6, dropout=0.0), train,
                    n_users=data.n_users, clip_norm=1.0, noise_multiplier=1.0, sample_rate=0.3,
                    n_negatives=None)
    sizes = torch.tensor([len(run.sample_batch()) for _ in range(400)]).double()
    mean, sd = 0.3 * data.n_users, math.sqrt(data.n_users * 0.3 * 0.7)
    assert abs(sizes.mean().item() - mean) < 5 * sd / math.sqrt(400)
    assert (sizes == 0).sum() == 0 or sizes.min() >= 0  # a sample may be empty: sizes vary
    assert sizes.std().item() == pytest.approx(sd, rel=0.25)


def test_ledger_epsilon_equals_dp_accounting(data):
    dp_accounting = pytest.importorskip("dp_accounting")
    train, _ = leave_last_out_split(data.ratings)
    model = SASRec(data.n_items, dim=8, max_len=6, dropout=0.0)
    fit = fit_user_dpsgd(model, train, n_users=data.n_users, target_epsilon=3.0, epochs=1.0,
                         sample_rate=0.25, n_negatives=None)
    sigma, delta = fit.history["noise_multiplier"][0], default_delta(data.n_users)
    assert fit.ledger.unit == "user" and fit.ledger.delta == delta
    assert fit.ledger.events[0].name == STEP_NAME and fit.ledger.events[0].count == 4
    orders = [o for o in fit.ledger.orders if o == int(o)]  # dp-accounting's exact orders
    accountant = dp_accounting.rdp.RdpAccountant(orders=orders)
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.25, dp_accounting.GaussianDpEvent(sigma)), 4))
    ours = PrivacyLedger.from_json(fit.ledger.to_json())
    ours.orders = torch.tensor(orders, dtype=torch.float64).numpy()
    assert ours.rdp() == pytest.approx(accountant._rdp, rel=1e-6)
    assert ours.epsilon() == pytest.approx(accountant.get_epsilon(delta), rel=1e-6)
    assert fit.ledger.epsilon() <= accountant.get_epsilon(delta)  # more (fractional) orders
    assert fit.ledger.epsilon() <= 3.0 + 1e-9
    assert fit_user_dpsgd(SASRec(data.n_items, dim=8, max_len=6, dropout=0.0), train,
                          n_users=data.n_users, target_epsilon=math.inf, epochs=1.0,
                          sample_rate=0.5, n_negatives=None).ledger.epsilon() == math.inf


def test_calibration_counts_earlier_releases(data):
    train, _ = leave_last_out_split(data.ratings)
    prior = PrivacyLedger(unit="user", n_units=data.n_users)
    prior.record_gaussian("prior", noise_multiplier=2.0)
    alone = fit_user_dpsgd(SASRec(data.n_items, dim=8, max_len=6, dropout=0.0), train,
                           n_users=data.n_users, target_epsilon=4.0, epochs=1.0, sample_rate=0.5,
                           n_negatives=None)
    after = fit_user_dpsgd(SASRec(data.n_items, dim=8, max_len=6, dropout=0.0), train,
                           n_users=data.n_users, target_epsilon=4.0, epochs=1.0, sample_rate=0.5,
                           n_negatives=None, ledger=prior)
    assert after.history["noise_multiplier"][0] > alone.history["noise_multiplier"][0]
    assert after.ledger.epsilon() == pytest.approx(4.0, abs=0.05)


def test_bad_arguments(data):
    train, _ = leave_last_out_split(data.ratings)
    model = SASRec(data.n_items, dim=8, max_len=6, dropout=0.0)
    with pytest.raises(ValueError, match="dropout"):
        per_user_gradients(SASRec(data.n_items, dim=8, dropout=0.1), *_batch(n_items=30))
    with pytest.raises(TypeError, match="model must be a SASRec"):
        UserDPSGD(nn.Linear(2, 2), train, n_users=40, clip_norm=1, noise_multiplier=1,
                  sample_rate=0.5)
    with pytest.raises(ValueError, match="sample_rate"):
        UserDPSGD(model, train, n_users=40, clip_norm=1, noise_multiplier=1, sample_rate=0)
    with pytest.raises(ValueError, match="optimizer"):
        UserDPSGD(model, train, n_users=40, clip_norm=1, noise_multiplier=1, sample_rate=0.5,
                  optimizer="rmsprop", n_negatives=None)
    with pytest.raises(ValueError, match="exactly one"):
        fit_user_dpsgd(model, train, n_users=40)
    with pytest.raises(ValueError, match="unit"):
        UserDPSGD(model, train, n_users=40, clip_norm=1, noise_multiplier=1, sample_rate=0.5,
                  ledger=PrivacyLedger(unit="rating", n_units=10), n_negatives=None)

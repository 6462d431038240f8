"""Tests of privrec.central.user_dpsgd: per-user gradients (against autograd and Opacus: its hooks
with DPMultiheadAttention, fast gradient clipping and ghost clipping), clipping,
noise calibration, empty batches, the ledger against dp-accounting, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from privrec.central.user_dpsgd import (
    STEP_NAME,
    OpacusTwin,
    UserDPSGD,
    fit_user_dpsgd,
    opacus_per_user_gradients,
    per_user_clipped_sum,
    per_user_gradients,
)
from privrec.dp.ledger import PrivacyLedger, default_delta
from privrec.recsys.data import leave_last_out_split
from privrec.recsys.sequential import SASRec, sequence_losses


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


def _opacus_batch(seed=0):
    """5 users, window 8 (batch size != window: Opacus's batch-first mask check would fail)."""
    return _batch(n_users=5, length=8, seed=seed)


@pytest.mark.parametrize("heads", [1, 2])
def test_opacus_twin_computes_the_same_function(heads):
    pytest.importorskip("opacus")
    model = SASRec(30, dim=16, max_len=8, n_heads=heads, dropout=0.0, seed=1)
    x, _ = _opacus_batch()
    for tied in (True, False):
        twin = OpacusTwin(model, tied=tied)
        assert (twin.items.weight is twin.output.weight) == tied
        assert torch.allclose(twin(x), model(x), atol=1e-5)
        assert torch.allclose(twin.logits(twin(x)), model.logits(model(x)), atol=1e-5)
    broken = OpacusTwin(model)
    with torch.no_grad():
        broken.blocks[0].attention.vlinear.weight.mul_(-1.0)
    assert not torch.allclose(broken(x), model(x), atol=1e-3)  # the check can fail


@pytest.mark.parametrize("heads", [1, 2])
def test_per_user_gradients_match_opacus_hooks_with_dp_attention(heads):
    pytest.importorskip("opacus")
    model = SASRec(30, dim=16, max_len=8, n_heads=heads, dropout=0.0, seed=1)
    x, y = _opacus_batch()
    ours = per_user_gradients(model, x, y)
    theirs = opacus_per_user_gradients(model, x, y)
    assert set(theirs) == set(ours)  # every parameter, the tied item table included
    worst = max(float((ours[n] - theirs[n]).abs().max()) for n in ours)
    assert worst < 1e-5, worst
    y2 = y.clone()
    y2[1, -1] = (y2[1, -1] + 1) % 30  # another target for user 1 only
    moved = opacus_per_user_gradients(model, x, y2)
    assert not torch.allclose(moved["items.weight"][1], ours["items.weight"][1], atol=1e-5)
    assert torch.allclose(moved["items.weight"][2], ours["items.weight"][2], atol=1e-5)


def _norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([g.reshape(len(g), -1).square().sum(1) for g in grads.values()]).sum(0).sqrt()


def test_per_user_norms_match_opacus_fast_gradient_clipping():
    """Opacus's fast gradient clipping (per-layer gradients, then norms) accepts the tied table."""
    pytest.importorskip("opacus")
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    model = SASRec(30, dim=16, max_len=8, n_heads=2, dropout=0.0, seed=1)
    x, y = _opacus_batch()
    twin = OpacusTwin(model)
    wrapped = GradSampleModuleFastGradientClipping(twin, batch_first=False, loss_reduction="sum",
                                                   max_grad_norm=1.0, use_ghost_clipping=False)
    sequence_losses(twin, x, y).sum().backward()
    ours = _norms(per_user_gradients(model, x, y))
    assert float((wrapped.get_norm_sample() - ours).abs().max()) < 1e-5


class _Contiguous(nn.Module):
    """An embedding fed contiguous ids (Opacus's ghost norm of an embedding views its ids flat;
    SASRec's position ids are an expanded view)."""

    def __init__(self, table: nn.Embedding) -> None:
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids.contiguous())


def test_per_user_norms_match_opacus_ghost_clipping_on_the_untied_model():
    """Opacus's ghost clipping refuses the tied item table; with the output layer holding its own
    copy of the table (the same function) its per-user norms equal ours for that
    parametrisation, whose two table gradients add up to our tied one. (Ghost clipping runs on
    SASRec's own attention, four linear layers, batch-first: with DPMultiheadAttention the
    twin must run time-first, and Opacus 1.6's embedding norm sampler cannot read time-first
    ids.)"""
    pytest.importorskip("opacus")
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    model = SASRec(30, dim=16, max_len=8, n_heads=2, dropout=0.0, seed=1)
    x, y = _opacus_batch()
    with pytest.raises(NotImplementedError, match="tying"):
        twin = OpacusTwin(model)
        GradSampleModuleFastGradientClipping(twin, batch_first=False, loss_reduction="sum")
        sequence_losses(twin, x, y).sum().backward()
    plain = copy.deepcopy(model)
    plain.output.weight = nn.Parameter(model.items.weight.detach().clone())
    assert torch.equal(plain.logits(plain(x)), model.logits(model(x)))
    split = per_user_gradients(plain, x, y)  # the two tables are two parameters now
    untied = copy.deepcopy(plain)
    untied.positions = _Contiguous(untied.positions)
    ghost = GradSampleModuleFastGradientClipping(untied, loss_reduction="sum", max_grad_norm=1.0)
    sequence_losses(untied, x, y).sum().backward()
    assert float((ghost.get_norm_sample() - _norms(split)).abs().max()) < 1e-5
    tied = per_user_gradients(model, x, y)["items.weight"]
    assert torch.allclose(split["items.weight"] + split["output.weight"], tied, atol=1e-6)


def test_each_user_moves_the_clipped_sum_by_at_most_c():
    model = SASRec(30, dim=16, max_len=8, dropout=0.0, seed=0)
    x, y = _batch()
    full, norms = per_user_clipped_sum(model, x, y, clip_norm=0.05, chunk=3)
    assert (norms > 0.05).all()  # every user is clipped here
    without, _ = per_user_clipped_sum(model, x[1:], y[1:], clip_norm=0.05, chunk=3)
    diff = torch.sqrt(sum((full[n] - without[n]).square().sum() for n in full))
    assert diff <= 0.05 * (1 + 1e-5)
    assert diff >= 0.05 * (1 - 1e-4)


def test_empty_batch_releases_pure_noise_of_the_calibrated_size(seqdata):
    sigma, clip, q = 1.5, 0.8, 0.25
    train, _ = leave_last_out_split(seqdata.ratings)
    run = UserDPSGD(SASRec(seqdata.n_items, dim=8, max_len=6, dropout=0.0), train,
                    n_users=seqdata.n_users, clip_norm=clip, noise_multiplier=sigma, sample_rate=q,
                    n_negatives=None)
    expected = sigma * clip / (q * seqdata.n_users)
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
    silent = EmptyBatches(run.model, train, n_users=seqdata.n_users, clip_norm=clip,
                          noise_multiplier=sigma, sample_rate=q, n_negatives=None)
    silent.step()
    assert silent.ledger.events[0].count == 1 and silent.epsilon() > 0
    assert any(not torch.equal(before[n], p) for n, p in run.model.named_parameters())


def test_poisson_sampling_of_users(seqdata):
    train, _ = leave_last_out_split(seqdata.ratings)
    run = UserDPSGD(SASRec(seqdata.n_items, dim=8, max_len=6, dropout=0.0), train,
                    n_users=seqdata.n_users, clip_norm=1.0, noise_multiplier=1.0, sample_rate=0.3,
                    n_negatives=None)
    sizes = torch.tensor([len(run.sample_batch()) for _ in range(400)]).double()
    mean, sd = 0.3 * seqdata.n_users, math.sqrt(seqdata.n_users * 0.3 * 0.7)
    assert abs(sizes.mean().item() - mean) < 5 * sd / math.sqrt(400)
    assert (sizes == 0).sum() == 0 or sizes.min() >= 0  # a sample may be empty: sizes vary
    assert sizes.std().item() == pytest.approx(sd, rel=0.25)


def test_ledger_epsilon_equals_dp_accounting(seqdata):
    dp_accounting = pytest.importorskip("dp_accounting")
    train, _ = leave_last_out_split(seqdata.ratings)
    model = SASRec(seqdata.n_items, dim=8, max_len=6, dropout=0.0)
    fit = fit_user_dpsgd(model, train, n_users=seqdata.n_users, target_epsilon=3.0, epochs=1.0,
                         sample_rate=0.25, n_negatives=None)
    sigma, delta = fit.history["noise_multiplier"][0], default_delta(seqdata.n_users)
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
    assert fit_user_dpsgd(SASRec(seqdata.n_items, dim=8, max_len=6, dropout=0.0), train,
                          n_users=seqdata.n_users, target_epsilon=math.inf, epochs=1.0,
                          sample_rate=0.5, n_negatives=None).ledger.epsilon() == math.inf


def test_calibration_counts_earlier_releases(seqdata):
    train, _ = leave_last_out_split(seqdata.ratings)
    prior = PrivacyLedger(unit="user", n_units=seqdata.n_users)
    prior.record_gaussian("prior", noise_multiplier=2.0)
    alone = fit_user_dpsgd(SASRec(seqdata.n_items, dim=8, max_len=6, dropout=0.0), train,
                           n_users=seqdata.n_users, target_epsilon=4.0, epochs=1.0, sample_rate=0.5,
                           n_negatives=None)
    after = fit_user_dpsgd(SASRec(seqdata.n_items, dim=8, max_len=6, dropout=0.0), train,
                           n_users=seqdata.n_users, target_epsilon=4.0, epochs=1.0, sample_rate=0.5,
                           n_negatives=None, ledger=prior)
    assert after.history["noise_multiplier"][0] > alone.history["noise_multiplier"][0]
    assert after.ledger.epsilon() == pytest.approx(4.0, abs=0.05)


def test_bad_arguments(seqdata):
    train, _ = leave_last_out_split(seqdata.ratings)
    model = SASRec(seqdata.n_items, dim=8, max_len=6, dropout=0.0)
    with pytest.raises(ValueError, match="dropout"):
        per_user_gradients(SASRec(seqdata.n_items, dim=8, dropout=0.1), *_batch(n_items=30))
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

"""privrec.dpfedavg: clipping, the noisy fixed-denominator average, sampling, accounting."""

import math

import pytest
import torch

from privrec.accounting import get_epsilon
from privrec.dpfedavg import (
    clip_updates,
    dp_aggregate,
    noise_multiplier_for_target,
    poisson_sample_clients,
    user_level_epsilon,
)


def test_clipping_bounds_every_row_and_keeps_small_ones():
    updates = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    clipped, norms = clip_updates(updates, clip_norm=1.0)
    assert torch.allclose(norms, torch.tensor([5.0, 0.5, 0.0]))
    assert torch.allclose(clipped, torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]]))


def test_sensitivity_of_the_clipped_sum_is_the_clip_norm():
    gen = torch.Generator().manual_seed(0)
    updates = torch.randn(50, 20, generator=gen) * 10
    with_all = dp_aggregate(updates, clip_norm=0.5, noise_multiplier=0.0, expected_clients=10)
    without_one = dp_aggregate(updates[1:], clip_norm=0.5, noise_multiplier=0.0, expected_clients=10)
    # One client moves the (un-noised) average by at most C / m.
    assert (with_all - without_one).norm() <= 0.5 / 10 + 1e-6


def test_noise_std_is_sigma_c_over_m():
    gen = torch.Generator().manual_seed(1)
    zeros = torch.zeros(3, 200_000)
    out = dp_aggregate(zeros, clip_norm=2.0, noise_multiplier=1.5, expected_clients=30, generator=gen)
    assert abs(out.std().item() / (1.5 * 2.0 / 30) - 1) < 0.01


def test_poisson_sampling_rate():
    gen = torch.Generator().manual_seed(2)
    sizes = [len(poisson_sample_clients(1000, sample_rate=0.05, generator=gen)) for _ in range(200)]
    mean = sum(sizes) / len(sizes)
    assert abs(mean - 50) < 3  # std of the mean ~ sqrt(47.5 / 200) ~ 0.5
    assert len(poisson_sample_clients(7, sample_rate=1.0)) == 7


def test_accounting_round_trip():
    sigma = noise_multiplier_for_target(target_epsilon=4.0, delta=1e-3, n_clients=1000,
                                        clients_per_round=50, rounds=100)
    eps = user_level_epsilon(noise_multiplier=sigma, sample_rate=0.05, rounds=100, delta=1e-3)
    assert eps <= 4.0 and eps > 3.9
    assert eps == get_epsilon(noise_multiplier=sigma, sample_rate=0.05, steps=100, delta=1e-3)


@pytest.mark.parametrize("call, match", [
    (lambda: clip_updates(torch.zeros(2, 2), clip_norm=0), "clip_norm"),
    (lambda: clip_updates(torch.zeros(2), clip_norm=1), "2-D"),
    (lambda: clip_updates(torch.full((1, 2), math.nan), clip_norm=1), "NaN"),
    (lambda: dp_aggregate(torch.zeros(1, 2), clip_norm=1, noise_multiplier=-1, expected_clients=1),
     "noise_multiplier"),
    (lambda: dp_aggregate(torch.zeros(1, 2), clip_norm=1, noise_multiplier=1, expected_clients=0),
     "expected_clients"),
    (lambda: poisson_sample_clients(10, sample_rate=0), "sample_rate"),
    (lambda: noise_multiplier_for_target(target_epsilon=1, delta=1e-5, n_clients=10,
                                         clients_per_round=20, rounds=5), "clients_per_round"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()

"""The building blocks: norms, clipping, the Gaussian and Laplace samplers, Poisson sampling."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
from scipy import stats

from privrec.dp import primitives
from privrec.dp.mechanisms import add_gaussian_noise, clip_rows_l1, clip_rows_l2, laplace_mechanism
from privrec.dp.primitives import (
    clip_factors,
    clip_rows,
    gaussian_noise,
    laplace_noise,
    poisson_sample,
    row_norms,
)


def test_doctests():
    assert doctest.testmod(primitives).failed == 0


# -- Poisson sampling ------------------------------------------------------------------------

def test_poisson_sampler_can_return_an_empty_sample():
    """The RDP analysis of the subsampled Gaussian counts empty batches; a sampler that refuses
    them (or pads them) would not be the sampling the accountant assumes."""
    n, q, trials = 20, 0.05, 400
    gen = torch.Generator().manual_seed(0)
    empty = sum(len(poisson_sample(n, sample_rate=q, generator=gen)) == 0 for _ in range(trials))
    p_empty = (1 - q) ** n  # 0.358
    assert empty > 0
    assert stats.binomtest(empty, trials, p_empty).pvalue > 1e-3
    assert poisson_sample(0, sample_rate=0.5, generator=gen).shape == (0,)


def test_poisson_sampler_rate_and_independence():
    n, q = 200_000, 0.01
    gen = torch.Generator().manual_seed(1)
    sample = poisson_sample(n, sample_rate=q, generator=gen)
    assert sample.dtype == torch.int64 and torch.all(sample[1:] > sample[:-1])  # sorted, distinct
    assert stats.binomtest(len(sample), n, q).pvalue > 1e-3
    # inclusion does not depend on position: first and second half get the same share
    half = int((sample < n // 2).sum())
    assert stats.binomtest(half, len(sample), 0.5).pvalue > 1e-3
    assert torch.equal(poisson_sample(7, sample_rate=1.0, generator=gen), torch.arange(7))


@pytest.mark.parametrize("n", [1, 65_535, 65_536, 65_537, 200_003])
def test_poisson_sampler_does_not_depend_on_its_chunking(n):
    """The sampler draws in chunks; the sample is the one a single draw of n uniforms gives."""
    a = poisson_sample(n, sample_rate=0.3, generator=torch.Generator().manual_seed(5))
    u = torch.rand(n, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, (u < 0.3).nonzero().squeeze(1))


# -- norms and clipping ----------------------------------------------------------------------

def test_row_norms_l2_l1_parts_and_empty_batches():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-1.0, 1.0]])
    assert torch.allclose(row_norms(x), torch.tensor([5.0, 0.0, math.sqrt(2)]))
    assert torch.equal(row_norms(x, order=1), torch.tensor([7.0, 0.0, 2.0]))
    np.testing.assert_allclose(row_norms(x.numpy()), [5.0, 0.0, math.sqrt(2)], rtol=1e-6)
    parts = {"a": torch.tensor([[3.0], [0.0]]), "b": torch.tensor([4.0, 0.0])}
    assert torch.equal(row_norms(parts), torch.tensor([5.0, 0.0]))
    assert row_norms(torch.zeros(0, 3)).shape == (0,)
    assert row_norms(torch.zeros(0, 2, 2)).shape == (0,)
    assert row_norms({"a": torch.zeros(0, 3), "b": torch.zeros(0)}).shape == (0,)
    with pytest.raises(ValueError, match="share the leading dimension"):
        row_norms({"a": torch.zeros(2, 3), "b": torch.zeros(3)})


def test_clip_factors_and_zero_rows():
    factors = clip_factors(torch.tensor([0.0, 0.5, 1.0, 4.0]), clip_norm=1.0)
    assert torch.equal(factors, torch.tensor([1.0, 1.0, 1.0, 0.25]))
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.3, 0.4]])
    clipped, norms = clip_rows(x, clip_norm=1.0)
    assert torch.equal(clipped[0], torch.zeros(2)) and not torch.isnan(clipped).any()
    assert torch.allclose(clipped[1], torch.tensor([0.6, 0.8])) and torch.equal(clipped[2], x[2])
    assert torch.allclose(norms, torch.tensor([0.0, 5.0, 0.5]))
    zeros, _ = clip_rows(np.zeros((3, 4)), clip_norm=0.1)
    assert isinstance(zeros, np.ndarray) and np.array_equal(zeros, np.zeros((3, 4)))


def test_clipping_bounds_every_row_and_handles_empty_batches():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(500, 3, 4, generator=gen) * 5
    for order in (1, 2):
        clipped, _ = clip_rows(x, clip_norm=1.5, order=order)
        assert clipped.shape == x.shape
        assert float(row_norms(clipped, order=order).max()) <= 1.5 * (1 + 1e-6)
    empty, norms = clip_rows(torch.zeros(0, 3), clip_norm=1.0)
    assert empty.shape == (0, 3) and norms.shape == (0,)
    assert clip_rows_l2(np.zeros((0, 2)), clip_norm=1.0).shape == (0, 2)
    with pytest.raises(ValueError, match="NaN or infinite"):
        clip_rows(torch.tensor([[math.nan, 1.0]]), clip_norm=1.0)


def test_named_clippers_are_the_one_clipping():
    x = np.random.default_rng(3).normal(size=(20, 5)) * 3
    np.testing.assert_array_equal(clip_rows_l2(x, clip_norm=1.0), clip_rows(x, clip_norm=1.0)[0])
    np.testing.assert_array_equal(clip_rows_l1(x, clip_norm=1.0),
                                  clip_rows(x, clip_norm=1.0, order=1)[0])


# -- the samplers ----------------------------------------------------------------------------

def test_gaussian_noise_std_dtype_and_zero_std_draws_nothing():
    gen = torch.Generator().manual_seed(4)
    noise = gaussian_noise((200_000,), std=0.7, generator=gen)
    assert noise.dtype == torch.float32
    assert stats.kstest(noise.double().numpy() / 0.7, "norm").pvalue > 1e-3
    state = gen.get_state()
    assert torch.equal(gaussian_noise((3, 2), std=0.0, generator=gen), torch.zeros(3, 2))
    assert torch.equal(gen.get_state(), state)
    rng = np.random.default_rng(4)
    array = gaussian_noise(5, std=2.0, generator=rng)
    assert isinstance(array, np.ndarray) and array.dtype == np.float64
    np.testing.assert_array_equal(array, np.random.default_rng(4).standard_normal(5) * 2.0)


def test_laplace_noise_scale_for_both_generators():
    for gen in (torch.Generator().manual_seed(5), np.random.default_rng(5)):
        noise = laplace_noise((200_000,), scale=1.5, generator=gen)
        values = noise.numpy() if torch.is_tensor(noise) else noise
        assert values.dtype == np.float64
        assert stats.kstest(values, "laplace", args=(0.0, 1.5)).pvalue > 1e-3
    assert not laplace_noise((4,), scale=0.0, generator=np.random.default_rng(0)).any()


def test_mechanisms_draw_through_the_one_sampler():
    """add_gaussian_noise and laplace_mechanism add exactly the primitives' draws."""
    for make in (lambda: torch.Generator().manual_seed(6), lambda: np.random.default_rng(6)):
        out = add_gaussian_noise(np.zeros(8), std=1.3, generator=make())
        ref = gaussian_noise((8,), std=1.3, generator=make(), dtype=torch.float64)
        np.testing.assert_array_equal(out, ref.numpy() if torch.is_tensor(ref) else ref)
        out = laplace_mechanism(np.zeros(8), sensitivity=2.0, epsilon=0.5, generator=make())
        ref = laplace_noise((8,), scale=4.0, generator=make())
        np.testing.assert_array_equal(out, ref.numpy() if torch.is_tensor(ref) else ref)


def test_one_implementation_per_primitive():
    """No second Gaussian or Laplace sampler and no second row clipping in the library."""
    from pathlib import Path

    root = Path(primitives.__file__).resolve().parents[1]
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "primitives.py":
            continue
        source = path.read_text()
        for marker in ("def standard_normal", "def standard_laplace", "def gaussian_noise",
                       "def laplace_noise", "def row_norms", "def clip_rows("):
            if marker in source:
                offenders.append(f"{path.relative_to(root)}: {marker}")
    assert not offenders, offenders

"""privrec.federated.secagg: masks hide single uploads, cancel in the sum, and survive dropouts."""

import pytest
import torch

from privrec.federated.secagg import (
    MODULUS,
    SecureAggregationRound,
    dequantise,
    distributed_gaussian_noise,
    quantise,
)


def _updates(ids, size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {c: torch.randn(size, generator=gen) for c in ids}


@pytest.mark.parametrize("neighbours", [None, 2, 4])
def test_masks_cancel_in_the_sum(neighbours):
    ids = (2, 5, 11, 17, 23, 31)
    rnd = SecureAggregationRound(client_ids=ids, size=50, round_seed=7, neighbours=neighbours)
    updates = _updates(ids, 50)
    uploads = {c: rnd.masked_upload(c, updates[c]) for c in ids}
    total = rnd.aggregate(uploads)
    assert torch.allclose(total, sum(updates.values()).double(), atol=len(ids) / rnd.scale)


def test_single_upload_looks_uniform_and_reveals_nothing():
    ids = tuple(range(8))
    rnd = SecureAggregationRound(client_ids=ids, size=20_000, round_seed=1)
    update = torch.zeros(20_000)  # an all-zero update would be obvious without the mask
    upload = rnd.masked_upload(3, update).double() / MODULUS
    # Uniform on [0, 1): mean 1/2, variance 1/12.
    assert abs(upload.mean().item() - 0.5) < 0.01
    assert abs(upload.var().item() - 1 / 12) < 0.005
    # Decoding the masked upload as if it were plain gives garbage, not the update.
    assert dequantise(rnd.masked_upload(3, update), scale=rnd.scale).abs().mean() > 1000


def test_dropouts_are_recovered():
    ids = tuple(range(10))
    for neighbours in (None, 4):
        rnd = SecureAggregationRound(client_ids=ids, size=30, round_seed=3, neighbours=neighbours)
        updates = _updates(ids, 30, seed=1)
        uploads = {c: rnd.masked_upload(c, updates[c]) for c in ids if c not in (0, 4, 9)}
        expected = sum(updates[c] for c in uploads).double()
        assert torch.allclose(rnd.aggregate(uploads), expected, atol=10 / rnd.scale)


def test_aggregate_without_recovery_would_be_wrong():
    # The check above can fail: drop a client but forget its masks and the sum is garbage.
    ids = (0, 1, 2)
    rnd = SecureAggregationRound(client_ids=ids, size=10, round_seed=0)
    updates = _updates(ids, 10)
    uploads = {c: rnd.masked_upload(c, updates[c]) for c in (0, 1)}
    naive = sum(uploads.values()) % MODULUS
    assert not torch.allclose(dequantise(naive, scale=rnd.scale),
                              (updates[0] + updates[1]).double(), atol=1.0)


def test_quantisation_round_trip_and_range():
    x = torch.tensor([-1.5, 0.0, 2.25, 1e-6])
    assert torch.allclose(dequantise(quantise(x)), x.double(), atol=2**-16)
    with pytest.raises(ValueError, match="representable range"):
        quantise(torch.tensor([1e6]))
    with pytest.raises(ValueError, match="scale"):
        quantise(x, scale=0)
    with pytest.raises(ValueError, match="NaN"):
        quantise(torch.tensor([float("nan")]))


def test_bad_rounds_are_rejected():
    with pytest.raises(ValueError, match="client_ids"):
        SecureAggregationRound(client_ids=(1, 1), size=3)
    with pytest.raises(ValueError, match="size"):
        SecureAggregationRound(client_ids=(1, 2), size=0)
    with pytest.raises(ValueError, match="neighbours"):
        SecureAggregationRound(client_ids=(1, 2, 3, 4), size=3, neighbours=3)
    rnd = SecureAggregationRound(client_ids=(1, 2), size=3)
    with pytest.raises(ValueError, match="not in this round"):
        rnd.masked_upload(9, torch.zeros(3))
    with pytest.raises(ValueError, match="3 entries"):
        rnd.masked_upload(1, torch.zeros(4))
    with pytest.raises(ValueError, match="outside the round"):
        rnd.aggregate({9: torch.zeros(3, dtype=torch.long)})


def test_distributed_noise_shares_sum_to_the_target():
    gen = torch.Generator().manual_seed(0)
    shares = distributed_gaussian_noise(25, 40_000, total_std=2.0, generator=gen)
    assert abs(shares.std().item() - 2.0 / 5) < 0.01
    assert abs(shares.sum(0).std().item() - 2.0) < 0.03
    with pytest.raises(ValueError, match="total_std"):
        distributed_gaussian_noise(3, 4, total_std=-1.0)


@pytest.mark.parametrize("call, error, match", [
    (lambda: SecureAggregationRound("abc", 3), TypeError, "client_ids"),
    (lambda: SecureAggregationRound([0, 1, 2], 3).masked_upload(0, [1.0, 2.0, 3.0]), TypeError,
     "update"),
    (lambda: SecureAggregationRound([0, 1, 2], 3).aggregate([1]), TypeError, "uploads"),
    (lambda: SecureAggregationRound([0, 1, 2], 3).aggregate({0: [1]}), TypeError, "uploads"),
    (lambda: dequantise([1, 2]), TypeError, "encoded"),
    (lambda: dequantise(torch.ones(2)), TypeError, "encoded"),
])
def test_calls_name_their_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()

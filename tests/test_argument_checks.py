"""Every bad argument named (issue 19.7), swept over the public API of core, dp, recsys and central.

Each case calls one public function or constructor with one bad argument -- a string where a
number is expected, ids of the wrong type, a path of the wrong type, an object of the wrong kind --
and requires a ``TypeError`` or ``ValueError`` whose message names the parameter, raised by
``privrec.core.checks`` rather than by numpy, torch, pathlib or ``int()`` (whose messages name no
parameter). A function that accepts the bad value, or fails with someone else's message, fails
its case.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from privrec.central import dpsgd, input_perturbation, per_example, private_stats
from privrec.core import arrays, checks
from privrec.dp import accounting, discrete, empirical, local_dp, mechanisms, primitives
from privrec.dp.ledger import PrivacyEvent, PrivacyLedger, RDPAccountant, default_delta
from privrec.recsys import data, metrics, models, text_encoder, train, two_tower

ML = data.synthetic_movielens(20, 15, 120, seed=0)
R = ML.ratings
MF = models.BiasedMF(20, 15, 2, seed=0)
EMB = torch.randn(15, 6, generator=torch.Generator().manual_seed(0))
TT = two_tower.TwoTowerRecommender(20, EMB, 4, rank=2)
GEN = torch.Generator().manual_seed(0)
IDS = torch.tensor([0, 1])


def _ledger() -> PrivacyLedger:
    return PrivacyLedger(unit="rating", n_units=100)


def _summed() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(3)}


# (parameter named in the message, call); the expected kind is TypeError or ValueError.
CASES = [
    # core.checks and core.arrays
    ("x", lambda: checks.real("x", "1.0")),
    ("x", lambda: checks.int_in("x", 2.0, 0)),
    ("x", lambda: checks.text("x", 3)),
    ("x", lambda: checks.path_like("x", 3)),
    ("x", lambda: checks.id_array("x", [0.5, 1.0])),
    ("x", lambda: checks.real_array("x", "abc")),
    ("x", lambda: checks.flag("x", "yes")),
    ("generator", lambda: arrays.rng_for(0.0, 42, None)),
    ("seed", lambda: arrays.rng_for(0.0, None, "1")),
    ("value", lambda: arrays.as_data("abc")),
    # dp.primitives
    ("x", lambda: primitives.row_norms("abc")),
    ("order", lambda: primitives.row_norms(torch.ones(2, 2), order=3)),
    ("norms", lambda: primitives.clip_factors([1.0], clip_norm=1.0)),
    ("clip_norm", lambda: primitives.clip_factors(torch.ones(2), clip_norm="1")),
    ("x", lambda: primitives.clip_rows("abc", clip_norm=1.0)),
    ("clip_norm", lambda: primitives.clip_rows(torch.ones(2, 2), clip_norm=0.0)),
    ("std", lambda: primitives.gaussian_noise((2,), std="1", generator=GEN)),
    ("generator", lambda: primitives.gaussian_noise((2,), std=1.0, generator=3)),
    ("shape", lambda: primitives.gaussian_noise("ab", std=1.0, generator=GEN)),
    ("shape[1]", lambda: primitives.gaussian_noise((2, -1), std=1.0, generator=GEN)),
    ("scale", lambda: primitives.laplace_noise((2,), scale="1", generator=GEN)),
    ("n", lambda: primitives.poisson_sample("5", sample_rate=0.5, generator=GEN)),
    ("sample_rate", lambda: primitives.poisson_sample(5, sample_rate=0.0, generator=GEN)),
    ("generator", lambda: primitives.poisson_sample(5, sample_rate=0.5, generator=None)),
    # dp.mechanisms
    ("value", lambda: mechanisms.laplace_mechanism("abc", sensitivity=1.0, epsilon=1.0, seed=0)),
    ("sensitivity", lambda: mechanisms.laplace_mechanism(1.0, sensitivity="1", epsilon=1.0)),
    ("epsilon", lambda: mechanisms.laplace_mechanism(1.0, sensitivity=1.0, epsilon="1")),
    ("seed", lambda: mechanisms.laplace_mechanism(1.0, sensitivity=1.0, epsilon=1.0, seed="0")),
    ("std", lambda: mechanisms.add_gaussian_noise(1.0, std="1", seed=0)),
    ("value", lambda: mechanisms.add_gaussian_noise([1.0, "a"], std=1.0, seed=0)),
    ("calibration", lambda: mechanisms.gaussian_mechanism(
        1.0, sensitivity=1.0, epsilon=1.0, delta=1e-5, calibration=3)),
    ("delta", lambda: mechanisms.analytic_gaussian_sigma(sensitivity=1.0, epsilon=1.0, delta="x")),
    ("epsilon", lambda: mechanisms.classic_gaussian_sigma(sensitivity=1.0, epsilon=None,
                                                          delta=1e-5)),
    ("sigma", lambda: mechanisms.gaussian_delta(sigma="1", sensitivity=1.0, epsilon=1.0)),
    ("x", lambda: mechanisms.clip_rows_l2("abc", clip_norm=1.0)),
    ("x", lambda: mechanisms.clip_rows_l1({"a": 1}, clip_norm=1.0)),
    ("relation", lambda: mechanisms.clipped_sum_sensitivity(clip_norm=1.0, relation=3)),
    ("max_contributions", lambda: mechanisms.count_sensitivity(max_contributions=1.5)),
    ("lower", lambda: mechanisms.clamp([1.0], lower="a", upper=1.0)),
    ("x", lambda: mechanisms.clamp("abc", lower=0.0, upper=1.0)),
    ("upper", lambda: mechanisms.sum_sensitivity(lower=0.0, upper="5")),
    # dp.local_dp, dp.discrete, dp.empirical
    ("epsilon", lambda: local_dp.randomized_response_keep_probability(epsilon="1")),
    ("bits", lambda: local_dp.randomized_response("abc", epsilon=1.0, seed=0)),
    ("bits", lambda: local_dp.randomized_response([0, 2], epsilon=1.0, seed=0)),
    ("reported_mean", lambda: local_dp.rr_debias_mean("0.5", epsilon=1.0)),
    ("k", lambda: local_dp.k_rr_keep_probability(k="3", epsilon=1.0)),
    ("k", lambda: local_dp.k_randomized_response([0, 1], k=2.5, epsilon=1.0, seed=0)),
    ("values", lambda: local_dp.k_randomized_response(["a"], k=3, epsilon=1.0, seed=0)),
    ("k", lambda: local_dp.k_rr_frequencies([0, 1], k="3", epsilon=1.0)),
    ("reports", lambda: local_dp.k_rr_frequencies("abc", k=3, epsilon=1.0)),
    ("scale", lambda: discrete.discrete_laplace(scale="1", size=3, rand=random.Random(0))),
    ("size", lambda: discrete.discrete_laplace(scale=1.0, size="3", rand=random.Random(0))),
    ("rand", lambda: discrete.discrete_laplace(scale=1.0, size=3, rand=3)),
    ("value", lambda: discrete.discrete_laplace_mechanism("abc", sensitivity=1, epsilon=1.0)),
    ("sensitivity", lambda: discrete.discrete_laplace_mechanism([1], sensitivity=1.5, epsilon=1.0)),
    ("epsilon", lambda: discrete.discrete_laplace_mechanism([1], sensitivity=1, epsilon="1")),
    ("samples_a", lambda: empirical.histogram_log_ratios("abc", [1.0], bins=3)),
    ("bins", lambda: empirical.histogram_log_ratios([1.0], [1.0], bins="x")),
    ("z", lambda: empirical.privacy_loss_lower_bound([1.0], [1.0], bins=3, z="4")),
    # dp.accounting
    ("sample_rate", lambda: accounting.compute_rdp(sample_rate="a", noise_multiplier=1.0, steps=1)),
    ("steps", lambda: accounting.compute_rdp(sample_rate=0.1, noise_multiplier=1.0, steps=1.0)),
    ("orders", lambda: accounting.compute_rdp(sample_rate=0.1, noise_multiplier=1.0, steps=1,
                                              orders="abc")),
    ("rdp", lambda: accounting.rdp_to_epsilon(orders=[2.0], rdp="abc", delta=1e-5)),
    ("epsilons", lambda: accounting.sequential_composition(3)),
    ("epsilons", lambda: accounting.sequential_composition(["a"])),
    ("deltas", lambda: accounting.sequential_composition([1.0], deltas=0.1)),
    ("steps", lambda: accounting.advanced_composition(epsilon=0.1, steps=2.0, delta_prime=1e-5)),
    ("delta", lambda: accounting.get_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=1,
                                             delta="x")),
    ("noise_multiplier", lambda: accounting.laplace_rdp(noise_multiplier="1")),
    ("epsilon", lambda: accounting.pure_dp_rdp(epsilon="1")),
    ("epsilon_at", lambda: accounting.find_noise_multiplier(3, target_epsilon=1.0)),
    ("steps", lambda: accounting.get_noise_multiplier(target_epsilon=1.0, delta=1e-5,
                                                      sample_rate=0.1, steps="10")),
    # dp.ledger
    ("n_units", lambda: default_delta("10")),
    ("unit", lambda: PrivacyLedger(unit=3, n_units=10)),
    ("unit", lambda: PrivacyLedger(unit="users", n_units=10)),
    ("n_units", lambda: PrivacyLedger(unit="user", n_units="10")),
    ("delta", lambda: PrivacyLedger(unit="user", delta="x")),
    ("orders", lambda: PrivacyLedger(unit="user", n_units=10, orders="abc")),
    ("name", lambda: _ledger().record_gaussian(3, noise_multiplier=1.0)),
    ("noise_multiplier", lambda: _ledger().record_gaussian("s", noise_multiplier="1")),
    ("sample_rate", lambda: _ledger().record_gaussian("s", noise_multiplier=1.0, sample_rate="q")),
    ("count", lambda: _ledger().record_gaussian("s", noise_multiplier=1.0, count=1.5)),
    ("epsilon", lambda: _ledger().record_laplace("s", epsilon="1")),
    ("epsilon", lambda: _ledger().record_pure("s", epsilon=None)),
    ("mechanism", lambda: _ledger().record_pure("s", epsilon=1.0, mechanism="gaussian")),
    ("mechanism", lambda: _ledger().record_pure("s", epsilon=1.0, mechanism=3)),
    ("event", lambda: _ledger().record("event")),
    ("source", lambda: _ledger().extend(3)),
    ("event", lambda: _ledger().extend(["x"])),
    ("prefix", lambda: _ledger().extend([], prefix=3)),
    ("delta", lambda: _ledger().epsilon(delta="x")),
    ("events_for", lambda: _ledger().calibrate(3, target_epsilon=1.0)),
    ("target_epsilon", lambda: _ledger().calibrate(lambda z: [], target_epsilon="1")),
    ("path", lambda: _ledger().save(3)),
    ("path", lambda: _ledger().save(b"ledger.json")),
    ("path", lambda: PrivacyLedger.load(3)),
    ("text", lambda: PrivacyLedger.from_json(3)),
    ("text", lambda: PrivacyLedger.from_json("{")),
    ("data", lambda: PrivacyLedger.from_dict("x")),
    ("data", lambda: PrivacyLedger.from_dict({})),
    ("name", lambda: PrivacyEvent(name=3, mechanism="gaussian", noise_multiplier=1.0)),
    ("mechanism", lambda: PrivacyEvent(name="s", mechanism="gauss", noise_multiplier=1.0)),
    ("unit", lambda: PrivacyEvent(name="s", mechanism="gaussian", noise_multiplier=1.0, unit=2)),
    ("epsilon", lambda: PrivacyEvent(name="s", mechanism="exponential", epsilon="1")),
    ("data", lambda: PrivacyEvent.from_dict({"name": "s", "colour": 1})),
    ("orders", lambda: RDPAccountant(orders="abc")),
    ("noise_multiplier", lambda: RDPAccountant().step(noise_multiplier="1", sample_rate=0.1)),
    ("delta", lambda: RDPAccountant().get_epsilon("x")),
    ("delta", lambda: RDPAccountant().summary()),
    # recsys.data
    ("source", lambda: data.load_movielens100k(source=3)),
    ("cache_dir", lambda: data.load_movielens100k(source=None, download=False, cache_dir=3)),
    ("download", lambda: data.load_movielens100k(download="yes")),
    ("ratings", lambda: data.validate_ratings(3)),
    ("n_users", lambda: data.validate_ratings(R, n_users="20")),
    ("ratings", lambda: data.validate_ratings(R.assign(user=R["user"].astype(float)))),
    ("test_fraction", lambda: data.random_split(R, test_fraction="0.2")),
    ("seed", lambda: data.random_split(R, seed="0")),
    ("ratings", lambda: data.leave_last_out_split("x")),
    ("column", lambda: data.restrict_ids(R, column=3, ids=[0])),
    ("ids", lambda: data.restrict_ids(R, column="user", ids="abc")),
    ("ids", lambda: data.restrict_ids(R, column="user", ids=[0.5])),
    ("n_items", lambda: data.cold_start_split(R, n_items="15")),
    ("fraction", lambda: data.cold_start_split(R, n_items=15, fraction="0.1")),
    ("n_users", lambda: data.synthetic_movielens("20")),
    ("n_ratings", lambda: data.synthetic_movielens(20, 15, "100")),
    ("seed", lambda: data.synthetic_movielens(20, 15, 100, seed=0.5)),
    # recsys.models
    ("n_users", lambda: models.BiasedMF("20", 15, 2)),
    ("dim", lambda: models.BiasedMF(20, 15, "2")),
    ("global_mean", lambda: models.BiasedMF(20, 15, 2, global_mean="3")),
    ("seed", lambda: models.BiasedMF(20, 15, 2, seed="0")),
    ("users", lambda: MF(["a", "b"], [0, 1])),
    ("users", lambda: MF([0.5, 1.0], [0, 1])),
    ("items", lambda: MF([0, 1], [0, 99])),
    ("users", lambda: MF.score_all("abc")),
    ("values", lambda: models.as_index_tensor("abc", name="values", upper=3)),
    ("upper", lambda: models.as_index_tensor([0], name="values", upper="3")),
    # recsys.metrics
    ("ratings", lambda: metrics.canonical_order(3)),
    ("scores", lambda: metrics.top_k("abc", 2)),
    ("k", lambda: metrics.top_k(np.ones(3), "2")),
    ("predictions", lambda: metrics.rmse("abc", [1.0])),
    ("targets", lambda: metrics.mae([1.0], "abc")),
    ("model", lambda: metrics.evaluate_ratings(3, R)),
    ("clamp", lambda: metrics.evaluate_ratings(MF, R, clamp="1-5")),
    ("scores", lambda: metrics.ranking_metrics("x", R, R)),
    ("k", lambda: metrics.ranking_metrics(torch.zeros(20, 15), R, R, k="10")),
    ("model", lambda: metrics.evaluate_ranking(3, R, R)),
    ("k", lambda: metrics.heldout_ndcg(MF, R, k=0)),
    # recsys.train
    ("model", lambda: train.fit_explicit(3, R)),
    ("epochs", lambda: train.fit_explicit(MF, R, epochs="3")),
    ("lr", lambda: train.fit_explicit(MF, R, lr="x")),
    ("validation", lambda: train.fit_explicit(MF, R, epochs=1, validation=3)),
    ("progress", lambda: train.fit_explicit(MF, R, epochs=1, progress="yes")),
    ("n_negatives", lambda: train.fit_implicit(MF, R, n_negatives=1.5)),
    ("reg_user", lambda: train.fit_bias_baseline(R, n_users=20, n_items=15, reg_user="x")),
    ("n_users", lambda: train.global_mean_model(R, n_users="20", n_items=15)),
    ("n_items", lambda: train.popularity_scores(R, n_users=20, n_items="15")),
    ("ratings", lambda: train.ratings_to_tensors(3)),
    # recsys.text_encoder
    ("title", lambda: text_encoder.item_text(3)),
    ("items", lambda: text_encoder.item_texts(3)),
    ("device", lambda: text_encoder.load_text_encoder(device=3)),
    ("texts", lambda: text_encoder.embedding_cache_path("abc")),
    ("cache_dir", lambda: text_encoder.embedding_cache_path(["a"], cache_dir=3)),
    ("texts", lambda: text_encoder.encode_items(3)),
    ("encoder", lambda: text_encoder.encode_items(["a"], encoder=3, use_cache=False)),
    ("use_cache", lambda: text_encoder.encode_items(["a"], encoder=lambda t: np.ones((1, 2)),
                                                    use_cache="no")),
    ("embeddings", lambda: text_encoder.check_embeddings("abc")),
    ("k", lambda: text_encoder.principal_directions(EMB, "2")),
    ("dim", lambda: text_encoder.pca_projection(EMB, "2")),
    # recsys.two_tower
    ("n_users", lambda: two_tower.TwoTowerRecommender("20", EMB, 4)),
    ("item_embeddings", lambda: two_tower.TwoTowerRecommender(20, "abc", 4)),
    ("dim", lambda: two_tower.TwoTowerRecommender(20, EMB, "4")),
    ("rank", lambda: two_tower.TwoTowerRecommender(20, EMB, 4, rank="2")),
    ("item_bias", lambda: two_tower.TwoTowerRecommender(20, EMB, 4, item_bias="no")),
    ("init_std", lambda: two_tower.TwoTowerRecommender(20, EMB, 4, init_std="0.1")),
    ("items", lambda: TT.item_vectors("abc")),
    ("model", lambda: two_tower.parameter_names(3)),
    ("model", lambda: two_tower.shared_size(3)),
    ("negative_items", lambda: two_tower.negative_pool(TT, "abc")),
    ("n_negatives", lambda: two_tower.implicit_batch(IDS[:, None], IDS, n_negatives="2",
                                                     generator=GEN)),
    ("generator", lambda: two_tower.implicit_batch(IDS[:, None], IDS, n_negatives=2,
                                                   generator=3)),
    ("epochs", lambda: two_tower.fit_two_tower(TT, R, epochs="2")),
    ("seed", lambda: two_tower.fit_two_tower(TT, R, epochs=1, seed="0")),
    # central.per_example
    ("trainable", lambda: per_example.trainable_names(3)),
    ("trainable", lambda: per_example.trainable_names(["colour"])),
    ("per_example", lambda: per_example.per_example_norms("x")),
    ("model", lambda: per_example.mf_clipped_gradient_sum(3, IDS, IDS, torch.ones(2),
                                                          clip_norm=1.0)),
    ("clip_norm", lambda: per_example.mf_clipped_gradient_sum(MF, IDS, IDS, torch.ones(2),
                                                              clip_norm="1")),
    ("clip_norm", lambda: per_example.mf_implicit_clipped_gradient_sum(
        MF, IDS, torch.zeros(2, 3, dtype=torch.long), clip_norm="1")),
    ("model", lambda: per_example.per_example_gradients(3, per_example.mf_loss, IDS)),
    ("loss_fn", lambda: per_example.per_example_gradients(MF, 3, IDS)),
    ("clip_norm", lambda: per_example.clip_and_sum({"w": torch.ones(2, 2)}, clip_norm="1")),
    # central.dpsgd
    ("model", lambda: dpsgd.DPSGD(3, R, clip_norm=1.0, noise_multiplier=1.0, sample_rate=0.1)),
    ("clip_norm", lambda: dpsgd.DPSGD(MF, R, clip_norm="1", noise_multiplier=1.0,
                                      sample_rate=0.1)),
    ("seed", lambda: dpsgd.DPSGD(MF, R, clip_norm=1.0, noise_multiplier=1.0, sample_rate=0.1,
                                 seed="0")),
    ("ledger", lambda: dpsgd.DPSGD(MF, R, clip_norm=1.0, noise_multiplier=1.0, sample_rate=0.1,
                                   ledger=3)),
    ("trainable", lambda: dpsgd.DPSGD(MF, R, clip_norm=1.0, noise_multiplier=1.0,
                                      sample_rate=0.1, trainable=3)),
    ("target_epsilon", lambda: dpsgd.fit_dpsgd(MF, R, target_epsilon="1")),
    ("epochs", lambda: dpsgd.fit_dpsgd(MF, R, noise_multiplier=1.0, epochs="1")),
    ("validation", lambda: dpsgd.fit_dpsgd(MF, R, noise_multiplier=1.0, validation=3)),
    ("trainer", lambda: dpsgd.fit_dpsgd(MF, R, noise_multiplier=1.0, trainer=3)),
    ("train", lambda: dpsgd.fit_dpsgd(MF, "ratings", noise_multiplier=1.0)),
    ("epochs", lambda: dpsgd.dpsgd_steps(epochs="1", sample_rate=0.1)),
    ("summed", lambda: dpsgd.noisy_average(3, noise_multiplier=1.0, clip_norm=1.0,
                                           expected_batch_size=1.0, generator=GEN)),
    ("generator", lambda: dpsgd.noisy_average(_summed(), noise_multiplier=1.0, clip_norm=1.0,
                                              expected_batch_size=1.0, generator=3)),
    ("table", lambda: dpsgd.row_blocks("x")),
    ("block_elements", lambda: dpsgd.row_blocks(torch.ones(3), block_elements="8")),
    ("optimizer", lambda: dpsgd.blocked_adam_step(3)),
    # central.input_perturbation and central.private_stats
    ("ratings", lambda: input_perturbation.laplace_perturb_ratings(3, epsilon=1.0)),
    ("epsilon", lambda: input_perturbation.laplace_perturb_ratings(R, epsilon="1")),
    ("low", lambda: input_perturbation.laplace_perturb_ratings(R, epsilon=1.0, low="1")),
    ("clamp", lambda: input_perturbation.laplace_perturb_ratings(R, epsilon=1.0, clamp="yes")),
    ("ledger", lambda: input_perturbation.laplace_perturb_ratings(R, epsilon=1.0, ledger=3)),
    ("n_users", lambda: input_perturbation.randomized_response_interactions(
        R, n_users="20", n_items=15, epsilon=1.0)),
    ("noise_multiplier", lambda: private_stats.bias_events("1", unit="rating")),
    ("unit", lambda: private_stats.bias_events(1.0, unit=3)),
    ("index", lambda: private_stats.noisy_row_sums("x", torch.ones(2), 3, 1.0, GEN)),
    ("size", lambda: private_stats.noisy_row_sums(IDS, torch.ones(2), "3", 1.0, GEN)),
    ("n_users", lambda: private_stats.private_biases(R, n_users="20", n_items=15,
                                                     noise_multiplier=1.0)),
    ("noise_multiplier", lambda: private_stats.private_biases(R, n_users=20, n_items=15,
                                                              noise_multiplier="1")),
    ("noise_aware", lambda: private_stats.private_biases(R, n_users=20, n_items=15,
                                                         noise_multiplier=1.0, noise_aware=2)),
    ("ledger", lambda: private_stats.private_item_popularity(R, n_users=20, n_items=15,
                                                             noise_multiplier=1.0, ledger="l")),
    ("bias_share", lambda: private_stats.fit_private_bias_residual(
        R, n_users=20, n_items=15, target_epsilon=1.0, bias_share="0.25")),
]


@pytest.mark.parametrize("name, call", CASES, ids=[f"{i}-{n}" for i, (n, _) in enumerate(CASES)])
def test_bad_argument_is_named(name: str, call) -> None:
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    message = str(info.value)
    assert name in message, f"message does not name {name!r}: {message!r}"


def test_the_sweep_can_fail() -> None:
    """A call that accepts its argument, or fails without naming it, does not pass the check."""
    with pytest.raises(pytest.fail.Exception):
        test_bad_argument_is_named("epsilon", lambda: 1.0)
    with pytest.raises(AssertionError):
        test_bad_argument_is_named("epsilon", lambda: float("abc"))  # Python's own message

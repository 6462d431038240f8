"""The ablation: the same two-tower model fed public metadata without a language model.

Chapter 6's text model beats ID embeddings under DP, but it differs from them in two ways at once:
it knows what the language model learned about titles and genres (*semantics*) and it shares far
fewer parameters (*size*). This module builds the control that separates the two: item features
from the **same public catalogue fields** -- genre multi-hot, decade one-hot, title length and a
bag of the catalogue's most frequent title words -- with no pretrained model, fed to the *same*
:class:`~privrec.recsys.two_tower.TwoTowerRecommender` (same ``text_dim`` principal coordinates, same
adapter rank, same biases), so it has exactly the same number of shared parameters as the
frozen-MiniLM model. Any accuracy the language model adds on top of this is semantics, not size.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import torch

from ..core.checks import int_in
from .data import GENRES
from .two_tower import TwoTowerRecommender

__all__ = ["metadata_features", "metadata_two_tower", "title_words"]

_DECADES = tuple(range(1920, 2000, 10))


def title_words(title: str) -> list[str]:
    """Lower-case words of a title, without the year or a trailing article (``"Net, The"``).

    >>> title_words("Usual Suspects, The (1995)")
    ['usual', 'suspects']
    """
    title = re.sub(r"\(\d{4}\)", " ", str(title)).lower()
    title = re.sub(r",\s*(the|a|an|les|la|le|il|das|der|die)\s*$", " ", title.strip())
    return re.findall(r"[a-z0-9']+", title)


def metadata_features(items: pd.DataFrame, *, n_words: int = 200) -> torch.Tensor:
    """``[n_items, E]`` float32 features of the public catalogue fields (row order of ``items``).

    Columns: genre multi-hot (the 18 real genres), decade one-hot (1920s .. 1990s, earlier years in
    the first, unknown year none), title length in words (divided by its maximum) and a binary bag
    of the ``n_words`` most frequent title words (ties by the word, alphabetically). All public.

    Raises
    ------
    TypeError, ValueError
        If ``items`` is not a DataFrame with ``title``, ``year``, ``genres``, or ``n_words`` < 1.
    """
    if not isinstance(items, pd.DataFrame):
        raise TypeError(f"items must be a pandas DataFrame, got {type(items).__name__}")
    missing = [c for c in ("title", "year", "genres") if c not in items.columns]
    if missing:
        raise ValueError(f"items is missing column(s) {missing}; expected title, year, genres")
    n_words = int_in("n_words", n_words, 1)
    genres = [g for g in GENRES if g != "unknown"]
    genre = np.array([[g in str(gs).split("|") for g in genres] for gs in items["genres"]], float)
    years = pd.to_numeric(items["year"], errors="coerce").to_numpy(float)
    decade = np.zeros((len(items), len(_DECADES)))
    known = np.isfinite(years)
    decade[np.flatnonzero(known), np.clip((years[known] - 1920) // 10, 0, 7).astype(int)] = 1.0
    words = [title_words(t) for t in items["title"]]
    length = np.array([len(w) for w in words], float)
    counts = pd.Series([w for ws in words for w in set(ws)]).value_counts()
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n_words]  # tie: the word
    column = {w: j for j, (w, _) in enumerate(ranked)}
    bag = np.zeros((len(items), len(column)))
    for i, ws in enumerate(words):
        for w in ws:
            if w in column:
                bag[i, column[w]] = 1.0
    features = np.hstack([genre, decade, (length / max(length.max(), 1.0))[:, None], bag])
    return torch.as_tensor(features, dtype=torch.float32)


def metadata_two_tower(n_users: int, items: pd.DataFrame, dim: int = 16, *, text_dim: int = 64,
                       rank: int = 4, item_bias: bool = True, n_words: int = 200,
                       seed: int = 0) -> TwoTowerRecommender:
    """The two-tower model of chapter 6 with :func:`metadata_features` in place of MiniLM's
    embeddings: same arguments, same shared-parameter count for the same ``text_dim``/``rank``."""
    return TwoTowerRecommender(n_users, metadata_features(items, n_words=n_words), dim,
                               text_dim=text_dim, rank=rank, item_bias=item_bias, seed=seed)

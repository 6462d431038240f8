"""What a warm ClientApp executor reads before its first fork (``warm_clientapp.py --preload``).

Public data only: the catalogue of chapter 7's LoRA model (item texts, their MiniLM embeddings and
the frozen top-layer inputs, about 200 MB read from the library's disk cache). Every ClientApp
the executor forks shares these pages instead of reading them again. The app's own modules still
come from the installed FAB; :func:`privrec_flower.lora.catalogue` looks this module up in
``sys.modules`` and builds its own catalogue where it is absent (any other way of running the app).
"""

from __future__ import annotations

#: ``n_users -> Catalogue`` read by :func:`load_lora`.
CATALOGUES: dict[int, object] = {}


def load_lora(n_users: int = 943) -> None:
    """Read the LoRA model's public catalogue (and load MiniLM) into this process."""
    from privrec.course.experiments.large_models import Catalogue
    from privrec.recsys.data import load_movielens100k
    from privrec.recsys.text_encoder import load_text_encoder

    load_text_encoder()                       # kept in the library's in-process cache
    catalogue = Catalogue(load_movielens100k().items, n_users)
    catalogue.inputs()
    CATALOGUES[n_users] = catalogue

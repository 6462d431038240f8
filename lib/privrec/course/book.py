"""Small helpers the chapters share: showing library source in the page, seeding."""

from __future__ import annotations

import inspect
import random

import numpy as np
import torch

from ..core.arithmetic import arithmetic_tag

__all__ = ["show_source", "seed_everything", "cached_json"]


def show_source(obj: object):
    """Display the source of a privrec function or class, highlighted, in a notebook.

    Chapters call this instead of pasting library code, so the page always shows the code that ran.
    """
    from IPython.display import Code

    return Code(inspect.getsource(obj), language="python")


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch's global generators (library code takes explicit seeds too)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cached_json(name: str, config: dict, compute, *, modules: tuple = (),
                cache_dir: str | None = None):
    """Return ``compute()`` for ``config``, memoised as JSON on disk.

    The key hashes ``name``, the JSON of ``config``, the source code of ``modules`` (so editing the
    library invalidates old results) and :func:`~privrec.core.arithmetic.arithmetic_tag` (so a
    result computed with other kernels or threads, whose floats differ in the last bits, is not
    reused). The cache lives in ``$PRIVREC_CACHE`` (default
    ``~/.cache/privrec``); a fresh machine simply recomputes. Results must be JSON-serialisable;
    ``inf`` is stored as JSON's ``Infinity``.
    """
    import hashlib
    import json
    import os
    from pathlib import Path

    root = Path(cache_dir or os.environ.get("PRIVREC_CACHE", Path.home() / ".cache" / "privrec"))
    source = "".join(inspect.getsource(m) for m in modules)
    key = hashlib.sha256(json.dumps([name, config, source, arithmetic_tag()], sort_keys=True,
                                    default=str)
                         .encode()).hexdigest()[:24]
    path = root / "results" / f"{name}-{key}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass  # a torn write: recompute
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)
    return result

"""Small helpers the chapters share: showing library source in the page, seeding."""

from __future__ import annotations

import inspect
import random

import numpy as np
import torch

__all__ = ["show_source", "seed_everything"]


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

"""The one result shape every ``fit_*`` function returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # core sits below dp: the ledger is only named, never imported at run time
    from ..dp.ledger import PrivacyLedger

__all__ = ["FitResult"]


@dataclass
class FitResult:
    """What a training run produced.

    Attributes
    ----------
    model:
        The trained model.
    history:
        Named per-epoch (or per-round) curves, e.g. ``{"val_rmse": [...]}``.
    ledger:
        Every release the run made, for a private run; ``None`` for a non-private run (whose
        privacy loss is unbounded, not zero). A private run's reported epsilon is
        ``ledger.epsilon()``.
    seconds:
        Wall time of the training loop.
    """

    model: torch.nn.Module
    history: dict[str, list[float]] = field(default_factory=dict)
    ledger: PrivacyLedger | None = None
    seconds: float = 0.0

    @property
    def epsilon(self) -> float:
        """The ledger's epsilon; ``inf`` for a non-private run."""
        return float("inf") if self.ledger is None else self.ledger.epsilon()

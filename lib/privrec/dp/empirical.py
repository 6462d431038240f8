"""Auditing a mechanism from its outputs: the empirical privacy loss between two samples.

Run a mechanism many times on two neighbouring inputs, histogram the outputs, and compare bin
frequencies: for an :math:`\\varepsilon`-DP mechanism every bin's log ratio lies in
:math:`[-\\varepsilon, \\varepsilon]`. A bound found above the claim refutes it; one below proves
nothing (audits refute privacy claims, they cannot establish them). Importable from
:mod:`privrec.dp.mechanisms`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.checks import int_in, positive, real_array

__all__ = ["histogram_log_ratios", "privacy_loss_lower_bound"]


def histogram_log_ratios(samples_a: Any, samples_b: Any, *, bins: Any,
                         min_count: int = 100) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Per-bin estimates of :math:`\log(P_a(\text{bin}) / P_b(\text{bin}))` with standard errors.

    For an :math:`\varepsilon`-DP mechanism run on neighbours :math:`D_a, D_b`, every bin's true log
    ratio lies in :math:`[-\varepsilon, \varepsilon]` (a ratio of integrals is bounded by the
    pointwise ratio). Counts get +1 smoothing, which pulls estimates towards 0 -- so a violation found
    with it is real -- and the standard error is the delta-method :math:`\sqrt{1/(n_a+1)+1/(n_b+1)}`.
    Bins where *both* counts are below ``min_count`` are dropped; a bin full of outputs from one input
    and empty for the other is kept, because that is exactly what a broken mechanism produces.
    Returns ``(bin_centers, log_ratio, stderr)``.
    """
    a = real_array("samples_a", samples_a).ravel()
    b = real_array("samples_b", samples_b).ravel()
    min_count = int_in("min_count", min_count, 0)
    if isinstance(bins, str) or not isinstance(bins, (int, np.integer, list, tuple, np.ndarray)):
        raise TypeError(f"bins must be a number of bins or a sequence of edges, got "
                        f"{type(bins).__name__}")
    if a.size == 0 or b.size == 0:
        raise ValueError("samples_a and samples_b must be non-empty")
    counts_a, edges = np.histogram(a, bins=bins)
    counts_b, _ = np.histogram(b, bins=edges)
    keep = np.maximum(counts_a, counts_b) >= min_count
    centers = 0.5 * (edges[:-1] + edges[1:])
    ca = counts_a[keep].astype(np.float64) + 1.0
    cb = counts_b[keep].astype(np.float64) + 1.0
    log_ratio = np.log(ca / (a.size + 1.0)) - np.log(cb / (b.size + 1.0))
    stderr = np.sqrt(1.0 / ca + 1.0 / cb)
    return centers[keep], log_ratio, stderr


def privacy_loss_lower_bound(samples_a: Any, samples_b: Any, *, bins: Any, z: float = 4.0,
                             min_count: int = 100) -> float:
    r"""A high-confidence lower bound on the privacy loss :math:`\varepsilon` seen in two samples.

    :math:`\max_\text{bins}(|\widehat{\log\text{ratio}}| - z\cdot\text{se})` from
    :func:`histogram_log_ratios`. If it exceeds the claimed :math:`\varepsilon`, the mechanism (or its
    calibration) is not :math:`\varepsilon`-DP, up to a per-bin false-alarm probability of about
    :math:`\Phi(-z)` (3e-5 for ``z = 4``). A value below :math:`\varepsilon` proves nothing about
    other outputs or other neighbours: audits can refute privacy claims, not establish them.
    """
    z = positive("z", z)
    _, log_ratio, stderr = histogram_log_ratios(samples_a, samples_b, bins=bins, min_count=min_count)
    if log_ratio.size == 0:
        return 0.0
    return float(np.max(np.abs(log_ratio) - z * stderr))

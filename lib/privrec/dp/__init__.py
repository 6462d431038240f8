"""privrec.dp -- differential privacy itself: mechanisms, their primitives, and accounting.

Owns
    :mod:`~privrec.dp.primitives` (clip, Gaussian noise, Poisson sampling: one implementation each),
    :mod:`~privrec.dp.mechanisms` (Laplace, Gaussian), :mod:`~privrec.dp.local_dp` (randomized
    response), :mod:`~privrec.dp.discrete` (discrete Laplace), :mod:`~privrec.dp.selection` (private
    selection: exponential mechanism, report-noisy-max, private top-k),
    :mod:`~privrec.dp.empirical` (empirical privacy loss), :mod:`~privrec.dp.accounting` (the maths:
    composition theorems and RDP curves, pure functions) and :mod:`~privrec.dp.ledger` (the stateful
    privacy ledger: every release of a private procedure composed in one place; every ε the book
    reports is a ledger's).

May import
    :mod:`privrec.core` only. Knows nothing of recommenders: a mechanism takes arrays, not ratings.
"""

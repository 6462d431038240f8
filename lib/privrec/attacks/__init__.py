"""privrec.attacks -- attacks as measurements: what an adversary learns, measured.

Owns
    :mod:`~privrec.attacks.update_inversion` (what a curious server reads from one client's upload),
    :mod:`~privrec.attacks.reidentification` (linking a few known ratings to a user),
    :mod:`~privrec.attacks.inference` (AUC, TPR at low FPR, attribute inference),
    :mod:`~privrec.attacks.membership` (loss, calibrated and LiRA membership inference),
    :mod:`~privrec.attacks.audit` (one-run empirical lower bounds on ε) and
    :mod:`~privrec.attacks.memorisation` (canaries, exposure and extraction, Carlini et al. 2019).

May import
    every layer below it: :mod:`privrec.central`, :mod:`privrec.federated`, :mod:`privrec.dp`,
    :mod:`privrec.recsys`, :mod:`privrec.core` -- an attack runs the procedures it measures.
"""

"""privrec.core -- the bottom layer: what every other subpackage stands on.

Owns
    :mod:`~privrec.core.checks` (every argument check: wrong kind -> ``TypeError``, bad value ->
    ``ValueError``, both naming the parameter and the allowed range), :mod:`~privrec.core.arrays`
    (NumPy/torch plumbing of the samplers: generators, dtype-preserving combination) and
    :mod:`~privrec.core.results` (``FitResult``, the one result shape of every ``fit_*``) and
    :mod:`~privrec.core.arithmetic` (the tag naming a process's float arithmetic, for cache keys).

May import
    nothing from privrec (numpy, torch and the standard library only). ``results`` names the
    ledger's type for annotations only, under ``TYPE_CHECKING``.
"""

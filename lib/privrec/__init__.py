"""privrec: the library behind PrivRec Book.

The folder tree is the architecture. Subpackages by concern, in layers; a subpackage imports only
the layers below it, and siblings on one layer do not import each other (checked by import-linter,
``.importlinter``, in ``make lint``)::

    course      chapter helpers, figures, exercises, experiment harnesses
      |
    attacks     attacks as measurements: inversion, re-identification, membership, audit, memorisation
      |
    central | federated     private training by a curator | by clients (engine, strategies, DP-FedAvg)
      |
    dp | recsys             mechanisms, selection, accounting, ledger | data, models, metrics, training
      |
    core        argument checks, array plumbing, the result shape

Each subpackage's docstring says what it owns and what it may import. Import from the module that
defines an object (``from privrec.dp.ledger import PrivacyLedger``): nothing is re-exported, so an
object has one name.

Conventions: privacy parameters are keyword-only and named ``clip_norm``, ``noise_multiplier``,
``target_epsilon``, ``sample_rate``, ``delta``; a wrong kind of argument raises ``TypeError`` and a
bad value ``ValueError``, naming the parameter and the allowed range; every order that feeds a
printed number breaks ties explicitly (stable sorts, secondary key = id).
"""

from importlib.metadata import PackageNotFoundError, version

try:  # one version number: lib/pyproject.toml's
    __version__ = version("privrec")
except PackageNotFoundError:  # pragma: no cover - a source tree without installed metadata
    __version__ = "0+unknown"

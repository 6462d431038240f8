"""privrec: the library behind PrivRec Book.

One module per concept. The module map:

Data and models
    :mod:`~privrec.data` (MovieLens-100K, splits, cold-start split, user subsampling, synthetic twin),
    :mod:`~privrec.models` (biased matrix factorisation), :mod:`~privrec.train` (non-private
    training and baselines), :mod:`~privrec.metrics` (RMSE, HR@K, NDCG@K with an explicit tie rule),
    :mod:`~privrec.results` (``FitResult``, the one result shape of every ``fit_*``).
Differential privacy: mechanisms and accounting
    :mod:`~privrec.mechanisms` (Laplace, Gaussian), :mod:`~privrec.local_dp` (randomized response),
    :mod:`~privrec.discrete` (discrete Laplace), :mod:`~privrec.empirical` (empirical privacy loss),
    :mod:`~privrec.accounting` (composition theorems and RDP maths, pure functions),
    :mod:`~privrec.ledger` (the privacy ledger: every release of a private procedure, composed in one
    place; every reported epsilon is a ledger's), :mod:`~privrec.primitives` (clip, Gaussian noise,
    Poisson sampling: one implementation each).
Private training
    :mod:`~privrec.per_example` (closed-form per-rating gradients and the ``torch.func`` reference),
    :mod:`~privrec.dpsgd` (DP-SGD), :mod:`~privrec.input_perturbation` (noise on the data),
    :mod:`~privrec.private_stats` (private biases and popularity, bias-then-residual training).
Federated learning
    :mod:`~privrec.updates` (what clients upload; the protocol a federated model follows),
    :mod:`~privrec.partitions` (cross-device and cross-silo), :mod:`~privrec.strategies`
    (FedAvg, FedAvgM, FedAdam), :mod:`~privrec.dpfedavg` (DP-FedAvg as a wrapper around any
    strategy), :mod:`~privrec.federated` (the simulator) with :mod:`~privrec.federated_mf` and
    :mod:`~privrec.local_mf` (matrix factorisation as a federated model),
    :mod:`~privrec.secagg` (secure aggregation, simulated), :mod:`~privrec.attacks` (what a curious
    server learns from uploads).
Large models
    :mod:`~privrec.text_encoder` (a pretrained language model as item encoder),
    :mod:`~privrec.two_tower` (the two-tower recommender, trained centrally or through the same
    federated engine and DP wrapper).
Attacks as measurements
    :mod:`~privrec.reidentification`, :mod:`~privrec.inference` (AUC, TPR at low FPR, attribute
    inference), :mod:`~privrec.membership`, :mod:`~privrec.audit` (empirical lower bounds on epsilon).
The book
    :mod:`~privrec.book` (chapter helpers, result cache), :mod:`~privrec.explorer` and
    :mod:`~privrec.static_widget` (figures that respond without a kernel), :mod:`~privrec.exercises`,
    :mod:`~privrec.exercises_federated` and :mod:`~privrec.exercise_grading` (auto-checked
    exercises), :mod:`~privrec.checks` (every argument check), ``privrec._arrays`` (NumPy/torch
    plumbing of the samplers).

Conventions: privacy parameters are keyword-only and named ``clip_norm``, ``noise_multiplier``,
``target_epsilon``, ``sample_rate``, ``delta``; a wrong kind of argument raises ``TypeError`` and a
bad value ``ValueError``, naming the parameter and the allowed range; every order that feeds a
printed number breaks ties explicitly (stable sorts, secondary key = id).
"""

__version__ = "0.2.0"

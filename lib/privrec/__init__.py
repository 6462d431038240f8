"""privrec: the library behind PrivRec Book.

One module per concept: :mod:`privrec.data` (MovieLens-100K and splits), :mod:`privrec.models`
(the embedding recommender), :mod:`privrec.train` (training loops and baselines),
:mod:`privrec.metrics` (RMSE, MAE, HR@K, NDCG@K), :mod:`privrec.mechanisms` (Laplace, Gaussian,
randomized response, clipping, sensitivity), :mod:`privrec.accounting` (composition and the RDP
accountant), :mod:`privrec.dpsgd` (DP-SGD for the recommender, input perturbation, private biases),
:mod:`privrec.federated` (FedAvg/FedAvgM for MF, cross-device and cross-silo),
:mod:`privrec.attacks` (what a curious server learns from federated MF updates),
:mod:`privrec.dpfedavg` (user-level DP-FedAvg), :mod:`privrec.secagg` (secure aggregation,
distributed DP), :mod:`privrec.explorer` (the offline privacy-utility explorer),
:mod:`privrec.lm` (a language model as the item encoder), :mod:`privrec.book` (chapter helpers)
and :mod:`privrec.checks` (the argument checks every module shares).
"""

__version__ = "0.1.0"

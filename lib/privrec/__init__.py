"""privrec: the library behind PrivRec Book.

One module per concept: :mod:`privrec.data` (MovieLens-100K and splits), :mod:`privrec.models`
(the embedding recommender), :mod:`privrec.train` (training loops and baselines),
:mod:`privrec.metrics` (RMSE, MAE, HR@K, NDCG@K), :mod:`privrec.book` (chapter helpers);
:mod:`privrec.mechanisms` (Laplace, Gaussian, randomized response, clipping, sensitivity),
:mod:`privrec.accounting` (composition and the RDP accountant);
:mod:`privrec.lm` (a language model as the item encoder: two-tower model, DP-FedAvg);
:mod:`privrec.federated` (FedAvg/FedAvgM for MF, cross-device and cross-silo);
:mod:`privrec.attacks` (what a curious server learns from federated MF updates);
later chapters add DP-SGD, federated learning and attacks.
"""

__version__ = "0.1.0"

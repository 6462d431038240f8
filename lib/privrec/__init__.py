"""privrec: the library behind PrivRec Book.

One module per concept: :mod:`privrec.data` (MovieLens-100K and splits), :mod:`privrec.models`
(the embedding recommender), :mod:`privrec.train` (training loops and baselines),
:mod:`privrec.metrics` (RMSE, MAE, HR@K, NDCG@K), :mod:`privrec.book` (chapter helpers);
later chapters add mechanisms, accounting, DP-SGD, federated learning and attacks.
"""

__version__ = "0.1.0"

"""privrec.recsys -- recommenders without privacy: data, models, training, metrics.

Owns
    :mod:`~privrec.recsys.data` (MovieLens-100K from the recbole wheel, splits, synthetic twin),
    :mod:`~privrec.recsys.models` (biased matrix factorisation), :mod:`~privrec.recsys.train`
    (non-private training and baselines), :mod:`~privrec.recsys.metrics` (RMSE, HR@K, NDCG@K with an
    explicit tie rule), :mod:`~privrec.recsys.text_encoder` (a pretrained language model as item
    encoder), :mod:`~privrec.recsys.two_tower` (the two-tower recommender, central training),
    :mod:`~privrec.recsys.lora` (LoRA adapters inside the language model, via ``peft``),
    :mod:`~privrec.recsys.metadata_tower` (the same-size tower fed public metadata, the ablation's
    control) and :mod:`~privrec.recsys.sequential` (the SASRec-style Transformer recommender).

May import
    :mod:`privrec.core` only. Independent of :mod:`privrec.dp` (an import-linter contract): a
    model does not know whether it will be trained privately.
"""

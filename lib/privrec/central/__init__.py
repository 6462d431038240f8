"""privrec.central -- private training by a trusted curator (central DP).

Owns
    :mod:`~privrec.central.per_example` (closed-form per-example gradients and the ``torch.func``
    reference), :mod:`~privrec.central.dpsgd` (DP-SGD for matrix factorisation),
    :mod:`~privrec.central.input_perturbation` (noise on the data), :mod:`~privrec.central.private_stats`
    (private biases and popularity, bias-then-residual training), :mod:`~privrec.central.user_dpsgd`
    (user-level DP-SGD: one example is one user's whole history, for the Transformer recommender)
    and :mod:`~privrec.central.lora_dpsgd` (DP-SGD on the LoRA parameters of the language model).

May import
    :mod:`privrec.dp`, :mod:`privrec.recsys`, :mod:`privrec.core`. Independent of
    :mod:`privrec.federated` (an import-linter contract).
"""

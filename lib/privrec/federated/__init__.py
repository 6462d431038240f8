"""privrec.federated -- federated learning: what clients upload, how the server aggregates, DP on top.

Owns
    :mod:`~privrec.federated.protocols` (``FederatedModel`` and ``Strategy``: every member the engine
    and the DP wrapper use), :mod:`~privrec.federated.updates` (``ClientUpdates``: what clients
    upload), :mod:`~privrec.federated.partitions` (cross-device and cross-silo splits),
    :mod:`~privrec.federated.strategies` (FedAvg, FedAvgM, FedAdam), :mod:`~privrec.federated.dpfedavg`
    (DP-FedAvg as a wrapper around any strategy), :mod:`~privrec.federated.engine` (the one round
    function and the simulator that drives it; the Flower ServerApp drives the same function),
    the federated models -- :mod:`~privrec.federated.mf` with :mod:`~privrec.federated.mf_local`
    (matrix factorisation: each client's local solve), :mod:`~privrec.federated.two_tower`
    (implicit-feedback clients for any two-tower model), :mod:`~privrec.federated.lora` (LoRA and
    FFA-LoRA clients) and :mod:`~privrec.federated.sequential` (the Transformer's clients) -- and
    :mod:`~privrec.federated.secagg`
    (secure aggregation, simulated).

May import
    :mod:`privrec.dp`, :mod:`privrec.recsys`, :mod:`privrec.core`. Independent of
    :mod:`privrec.central` (an import-linter contract).
"""

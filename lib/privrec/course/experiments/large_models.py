"""Chapters 6 and 7's experiments: four item towers under user-level DP-FedAvg, tuned on a public twin.

One harness trains every model of the two chapters through the book's one federated engine and one
DP wrapper: ID-embedding MF, the **metadata tower** (public catalogue fields, no language model),
the frozen-MiniLM two-tower model and the LoRA-fine-tuned MiniLM (plain LoRA or FFA-LoRA). It
evaluates warm items (the candidate set excludes cold items when a split has them) and, where the
split holds out items entirely, cold-start items.

**Tuning never reads the private users.** :func:`public_twin` generates synthetic users who choose
movies of the *real, public* catalogue by genre and decade tastes drawn at random; step sizes are
chosen on it without noise and the clip norm with DP-FedAvg at a fixed ε (:func:`tune_on_twin`),
so the search costs no privacy and the ledgers below cover everything the private data touched.

Every run is cached with :func:`privrec.course.book.cached_json`, keyed on its settings and on the
source of the library modules it depends on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ...core.checks import choice, int_in
from ...core.checks import seed as check_seed
from ...dp import accounting, ledger, primitives
from ...federated import dpfedavg, engine, strategies, updates
from ...federated import lora as federated_lora
from ...federated import two_tower as federated_two_tower
from ...federated.dpfedavg import DPFedAvg
from ...federated.engine import BYTES_PER_FLOAT, FederatedSimulator
from ...federated.lora import FederatedLoRA, product_error
from ...federated.strategies import FedAvgM
from ...federated.two_tower import FederatedImplicit
from ...recsys import data, lora, metadata_tower, metrics, models, text_encoder, two_tower
from ...recsys.data import GENRES, restrict_ids
from ...recsys.lora import LoRAEncoder, LoRATwoTower, top_layer_inputs
from ...recsys.metadata_tower import metadata_two_tower
from ...recsys.metrics import ranking_metrics
from ...recsys.models import BiasedMF
from ...recsys.text_encoder import embedding_cache_path, encode_items, item_texts
from ...recsys.two_tower import TwoTowerRecommender
from ..book import cached_json

__all__ = ["KINDS", "Protocol", "CH6", "LORA", "Catalogue", "Split", "public_twin", "new_model",
           "federated_run", "server_for", "run", "tune_on_twin", "epsilon_grid", "best", "CODE"]

#: The item towers, by the name the tables print.
KINDS = ("MF", "metadata", "MiniLM", "MiniLM + LoRA", "MiniLM + FFA-LoRA")
DIM, TEXT_DIM, RANK, LORA_RANK = 16, 64, 4, 8

#: The library a cached result depends on (its source is part of every cache key).
CODE = (data, metrics, models, two_tower, text_encoder, lora, metadata_tower, accounting, ledger,
        primitives, dpfedavg, engine, strategies, updates, federated_lora, federated_two_tower)


@dataclass(frozen=True)
class Protocol:
    """Everything fixed in advance of a federated run (a budget, not tuned)."""

    rounds: int = 100
    sample_rate: float = 0.1
    local_steps: int = 2
    local_batch: int = 16
    n_negatives: int = 4
    personalise_steps: int = 20
    server_momentum: float = 0.9


#: Chapter 6's protocol (100 rounds, q = 0.1, 2 local steps of 16 positives).
CH6 = Protocol()
#: Chapter 7's, sized for a transformer layer on 2 CPU cores: 40 rounds, q = 0.05, one local step
#: of 4 positives (each with 4 negatives) per client.
LORA = Protocol(rounds=40, sample_rate=0.05, local_steps=1, local_batch=4)


@dataclass
class Catalogue:
    """The public side: the catalogue table, its texts and MiniLM embeddings (cached on disk)."""

    items: pd.DataFrame
    n_users: int
    texts: list[str] = field(init=False)
    embeddings: torch.Tensor = field(init=False)
    key: str = field(init=False)
    _inputs: object = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.texts = item_texts(self.items)
        self.embeddings = encode_items(self.texts)
        self.key = embedding_cache_path(self.texts).name

    @property
    def n_items(self) -> int:
        return len(self.items)

    def inputs(self):
        """MiniLM's frozen top-layer inputs for every text (computed once, cached on disk)."""
        if self._inputs is None:
            self._inputs = top_layer_inputs(self.texts)
        return self._inputs


@dataclass
class Split:
    """Training ratings and what to evaluate on. ``cold_items``: held out of training entirely
    (their ratings in ``cold_test``, items renumbered among them); the warm test ranks warm items."""

    name: str
    train: pd.DataFrame
    test: pd.DataFrame
    cold_items: np.ndarray | None = None
    cold_test: pd.DataFrame | None = None

    def warm_items(self, n_items: int) -> np.ndarray | None:
        return None if self.cold_items is None else np.setdiff1d(np.arange(n_items), self.cold_items)


def public_twin(items: pd.DataFrame, *, n_users: int, mean_count: int = 106, min_count: int = 20,
                taste: float = 1.5, seed: int = 0) -> pd.DataFrame:
    """Synthetic interactions of ``n_users`` invented users with the real (public) catalogue.

    A user's chance to pick movie :math:`i` is proportional to
    :math:`\\pi_i\\exp(\\beta\\,g_i^\\top w_u/\\sqrt{|g_i|} + c_i^\\top a_u)`: :math:`\\pi` a Zipf law over a
    random order of the movies (not their real popularity, which is private), :math:`g_i` the genre
    multi-hot, :math:`c_i` the decade one-hot, :math:`w_u, a_u` random tastes. Each user picks
    ``min_count`` plus a geometric number of movies (mean ``mean_count``), without replacement
    (Gumbel top-k). Uses no rating of any real user.
    """
    n_users = int_in("n_users", n_users, 2)
    rng = np.random.default_rng(check_seed("seed", seed))
    genre = np.array([[g in str(gs).split("|") for g in GENRES[1:]] for gs in items["genres"]], float)
    years = pd.to_numeric(items["year"], errors="coerce").fillna(1990).to_numpy(float)
    decade = np.eye(8)[np.clip((years - 1920) // 10, 0, 7).astype(int)]
    log_pop = -0.8 * np.log(1 + rng.permutation(len(items)))
    w, a = rng.normal(0, 1, (n_users, genre.shape[1])), rng.normal(0, 0.5, (n_users, 8))
    logits = (log_pop + taste * (w @ genre.T) / np.sqrt(np.maximum(genre.sum(1), 1))
              + a @ decade.T)
    counts = np.minimum(min_count + rng.geometric(1 / (mean_count - min_count), n_users),
                        len(items) // 2)
    keys = logits + rng.gumbel(size=logits.shape)
    rows = [np.argsort(-keys[u], kind="stable")[:counts[u]] for u in range(n_users)]
    users = np.repeat(np.arange(n_users), counts)
    return pd.DataFrame({"user": users, "item": np.concatenate(rows).astype(np.int64),
                         "rating": np.float32(1.0), "timestamp": np.int64(0)})


def new_model(kind: str, catalogue: Catalogue, *, seed: int = 0, variant: str = "default"):
    """The model of ``kind`` (:data:`KINDS`); ``variant`` names chapter 6's exercise variants of
    the MiniLM model ("full adapter", "no item bias", "frozen A")."""
    choice("kind", kind, KINDS)
    n = catalogue.n_users
    if kind == "MF":
        return BiasedMF(n, catalogue.n_items, DIM, seed=seed)
    if kind == "metadata":
        return metadata_two_tower(n, catalogue.items, DIM, text_dim=TEXT_DIM, rank=RANK, seed=seed)
    full = variant == "full adapter"
    head = TwoTowerRecommender(n, catalogue.embeddings, DIM, text_dim=None if full else TEXT_DIM,
                               rank=None if full else RANK, item_bias=variant != "no item bias",
                               seed=seed)
    if variant == "frozen A":  # A stays at its random initialisation, only B trains
        head.shared_parameter_names = tuple(n for n in head.shared_parameter_names
                                            if n != "adapter_down")
    if kind == "MiniLM":
        return head
    encoder = LoRAEncoder(catalogue.inputs(), rank=LORA_RANK, seed=seed)
    return LoRATwoTower(head, encoder, catalogue.embeddings,
                        lora="lora" if kind == "MiniLM + LoRA" else "ffa")


def evaluate(model, split: Split, n_items: int) -> dict[str, float]:
    """Warm NDCG@10 (and cold NDCG@10 when the split holds out items)."""
    with torch.no_grad():
        scores = model.score_all()
    if split.cold_items is None:
        return {"ndcg": ranking_metrics(scores, split.train, split.test)["ndcg"]}
    warm = split.warm_items(n_items)
    warm_scores = scores[:, torch.as_tensor(warm)].contiguous()
    out = {"ndcg": ranking_metrics(warm_scores, restrict_ids(split.train, column="item", ids=warm),
                                   restrict_ids(split.test, column="item", ids=warm))["ndcg"]}
    cold_scores = scores[:, torch.as_tensor(split.cold_items)].contiguous()
    out["cold ndcg"] = ranking_metrics(cold_scores, split.cold_test.iloc[:0],
                                       split.cold_test)["ndcg"]
    return out


def _clients(kind, model, split, protocol, catalogue, *, client_lr, user_lr, seed):
    cls = FederatedLoRA if "LoRA" in kind else FederatedImplicit
    return cls(model, split.train, local_steps=protocol.local_steps,
               local_batch=protocol.local_batch, n_negatives=protocol.n_negatives,
               personalise_steps=protocol.personalise_steps, client_lr=client_lr,
               user_lr=user_lr, negative_items=split.warm_items(catalogue.n_items), seed=seed)


def server_for(epsilon: float, protocol: Protocol, n_users: int, *, clip_norm: float | None,
               seed: int = 0):
    """DP-FedAvg around FedAvgM calibrated to user-level `epsilon` (δ = default_delta(n_users)),
    or plain FedAvgM with round(qN) clients a round when `epsilon` is inf."""
    if math.isinf(epsilon):
        return FedAvgM(server_momentum=protocol.server_momentum, weighting="per_client", seed=seed,
                       clients_per_round=round(protocol.sample_rate * n_users))
    return DPFedAvg.calibrated(FedAvgM(server_momentum=protocol.server_momentum), seed=seed,
                               target_epsilon=epsilon, rounds=protocol.rounds, n_clients=n_users,
                               sample_rate=protocol.sample_rate, clip_norm=clip_norm,
                               delta=ledger.default_delta(n_users))


def federated_run(kind: str, epsilon: float, *, catalogue: Catalogue, split: Split,
                  protocol: Protocol, client_lr: float, user_lr: float,
                  clip_norm: float | None = None, seed: int = 0, variant: str = "default",
                  product_errors: bool = False) -> dict:
    """Train one model federatedly -- DP-FedAvg at user-level ``epsilon`` (δ =
    ``default_delta(n_users)``), or plain FedAvgM when ``epsilon`` is inf -- and evaluate it.

    Returns NDCG(s), the ledger's ε and JSON, σ, the number of shared parameters ``D``, measured
    upload bytes per client per round and, with ``product_errors``, plain LoRA's per-round
    :func:`~privrec.federated.lora.product_error` (needs unclipped uploads: non-private runs)."""
    model = new_model(kind, catalogue, seed=seed, variant=variant)
    clients = _clients(kind, model, split, protocol, catalogue, client_lr=client_lr,
                       user_lr=user_lr, seed=seed)
    server = server_for(epsilon, protocol, catalogue.n_users, clip_norm=clip_norm, seed=seed)
    simulator = FederatedSimulator(clients, server, keep_updates=product_errors)
    errors, up, client_rounds = [], 0, 0
    for _ in range(protocol.rounds):
        record = simulator.round()
        up, client_rounds = up + record.bytes_up, client_rounds + len(record.clients)
        if product_errors and simulator.last_updates is not None:
            errors.append(product_error(simulator.last_broadcast, simulator.last_updates))
    result = evaluate(simulator.released_model(), split, catalogue.n_items)
    book = simulator.ledger
    return {**result, "epsilon": math.inf if book is None else book.epsilon(),
            "ledger": None if book is None else book.to_json(), "D": simulator.shared_size,
            "sigma": getattr(server, "noise_multiplier", 0.0),
            "upload bytes per client": up / max(client_rounds, 1),
            "download bytes per client": BYTES_PER_FLOAT * simulator.shared_size,
            "median norm": None if book is None else float(server.last_norms.median()),
            "product errors": errors}


def run(kind: str, epsilon: float, *, catalogue: Catalogue, split: Split, protocol: Protocol,
        **settings) -> dict:
    """:func:`federated_run`, cached on disk (key: the settings, the split's name, the embeddings'
    cache key, the protocol and the library's source)."""
    config = {"kind": kind, "epsilon": epsilon, "split": split.name, "embeddings": catalogue.key,
              "protocol": protocol.__dict__, **settings}
    return cached_json("large-models-federated", config,
                       lambda: federated_run(kind, epsilon, catalogue=catalogue, split=split,
                                             protocol=protocol, **settings),
                       modules=CODE + (public_twin, new_model, evaluate, federated_run))


def best(table: pd.DataFrame, by: str, columns: list[str]) -> pd.DataFrame:
    """The row per model with the highest ``by``; ties go to the smaller values of ``columns``."""
    ordered = table.sort_values(["model", by, *columns],
                                ascending=[True, False] + [True] * len(columns), kind="stable")
    return ordered.groupby("model", sort=False).head(1).set_index("model")


def _twin_score(kind, epsilon, **settings) -> float:
    """The twin's test NDCG@10 of one run, rounded; NaN when the run diverges (never chosen)."""
    try:
        return round(run(kind, epsilon, **settings)["ndcg"], 4)
    except RuntimeError as error:
        if "diverged" not in str(error):
            raise
        return math.nan


def tune_on_twin(kinds: tuple[str, ...], *, catalogue: Catalogue, twin: Split, protocol: Protocol,
                 steps=((2.0, 1.0), (2.0, 5.0), (5.0, 1.0), (5.0, 5.0)),
                 clips=(0.125, 0.25, 0.5), tuning_epsilon: float = 4.0) -> dict:
    """Choose (client step, user step) without noise, then the clip norm with DP-FedAvg at
    ``tuning_epsilon``, each by the twin's test NDCG@10 (ties: smaller values; a run that diverges
    scores NaN and is never chosen). Public data only.

    Returns ``{"steps": DataFrame, "clips": DataFrame, "chosen": {kind: settings}}``.
    """
    common = dict(catalogue=catalogue, split=twin, protocol=protocol)
    step_table = pd.DataFrame([{"model": k, "client_lr": c, "user_lr": u,
                                "twin NDCG@10": _twin_score(k, math.inf, client_lr=c, user_lr=u,
                                                            **common)}
                               for k in kinds for c, u in steps])
    chosen = {k: r[["client_lr", "user_lr"]].to_dict()
              for k, r in best(step_table, "twin NDCG@10", ["client_lr", "user_lr"]).iterrows()}
    clip_table = pd.DataFrame([{"model": k, "clip_norm": c,
                                "twin NDCG@10": _twin_score(k, tuning_epsilon, clip_norm=c,
                                                            **chosen[k], **common)}
                               for k in kinds for c in clips])
    for k, c in best(clip_table, "twin NDCG@10", ["clip_norm"])["clip_norm"].items():
        chosen[k]["clip_norm"] = float(c)
    return {"steps": step_table, "clips": clip_table, "chosen": chosen}


def epsilon_grid(kinds: tuple[str, ...], epsilons: tuple[float, ...], *, catalogue: Catalogue,
                 split: Split, protocol: Protocol, chosen: dict, seed: int = 0) -> pd.DataFrame:
    """One row per (model, ε): NDCG(s), ledger ε, σ, D, noise norm / C and relative loss."""
    rows = []
    for kind in kinds:
        settings = dict(chosen[kind])
        for eps in epsilons:
            clip = settings.get("clip_norm")
            r = run(kind, eps, catalogue=catalogue, split=split, protocol=protocol, seed=seed,
                    client_lr=settings["client_lr"], user_lr=settings["user_lr"],
                    clip_norm=None if math.isinf(eps) else clip)
            rows.append({"model": kind, "target epsilon": eps, **r,
                         "noise norm / C": r["sigma"] * math.sqrt(r["D"])
                         / (protocol.sample_rate * catalogue.n_users)})
    grid = pd.DataFrame(rows)
    reference = grid[grid["target epsilon"] == math.inf].set_index("model")["ndcg"]
    grid["relative loss"] = 1 - grid["ndcg"] / grid["model"].map(reference)
    return grid


def warm_cold_split(ratings: pd.DataFrame, *, n_items: int, seed: int = 0) -> Split:
    """10% of the movies held out entirely (cold), the rest split 80/20 at random (warm test)."""
    cold = data.cold_start_split(ratings, n_items=n_items, fraction=0.1, seed=seed)
    train, warm_test = data.random_split(cold.train, test_fraction=0.2, seed=seed)
    return Split(f"warm-cold-{seed}", train, warm_test, cold.cold_items, cold.test)


def twin_split(items: pd.DataFrame, *, n_users: int, seed: int = 1) -> Split:
    """The public twin's interactions (:func:`public_twin`), split 80/20 at random."""
    train, test = data.random_split(public_twin(items, n_users=n_users, seed=seed),
                                    test_fraction=0.2, seed=0)
    return Split(f"twin-{seed}", train, test)


def ledger_table(grid: pd.DataFrame, protocol: Protocol) -> pd.DataFrame:
    """One row per target ε of a grid whose models share each ε's ledger (checked): σ, q, rounds
    and the ledger's ε -- instead of one near-identical ledger per run."""
    private = grid[grid["ledger"].notna()]
    if not private.groupby("target epsilon")["ledger"].nunique().eq(1).all():
        raise ValueError("the runs at one target epsilon have different ledgers")
    rows = private.drop_duplicates("target epsilon")
    return pd.DataFrame({"target ε": rows["target epsilon"], "σ": rows["sigma"].round(4),
                         "q": protocol.sample_rate, "rounds": protocol.rounds,
                         "ledger ε": rows["epsilon"].round(3)}).reset_index(drop=True)


def grid_summary(grid: pd.DataFrame, *, baseline: float, epsilon: float = 8) -> list[str]:
    """For each model, two lines of at most 80 characters: its ``D`` and from which ε it beats
    ``baseline``; its loss at ``epsilon``."""
    at, ref = (grid[grid["target epsilon"] == e].set_index("model") for e in (epsilon, math.inf))
    lines = []
    for kind in dict.fromkeys(grid["model"]):
        above = grid[(grid["model"] == kind) & (grid["ndcg"] > baseline)]["target epsilon"]
        first = "never" if above.empty else ("only without noise" if math.isinf(above.min())
                                             else f"from epsilon = {above.min():g} up")
        lines += [f"{kind:>8}: D = {at.loc[kind, 'D']:,}; beats popularity {first}",
                  f"{'':>8}  at epsilon = {epsilon:g} loses {at.loc[kind, 'relative loss']:.1%} "
                  f"({ref.loc[kind, 'ndcg']:.3f} -> {at.loc[kind, 'ndcg']:.3f})"]
    return lines


def exercise_runs(catalogue: Catalogue, split: Split, chosen: dict, *,
                  protocol: Protocol = CH6) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Chapter 6's exercises 1-4: NDCG@10 at ε = 8 for seeds 0-2 (MiniLM, MF; seed 0 is the
    grid's run), and the MiniLM variants (full adapter, no item bias, frozen A) with the default
    model's settings."""
    def one(kind, eps, **extra):
        c = chosen[kind]
        return run(kind, eps, catalogue=catalogue, split=split, protocol=protocol,
                   client_lr=c["client_lr"], user_lr=c["user_lr"],
                   clip_norm=None if math.isinf(eps) else c["clip_norm"], **extra)

    seeds = pd.DataFrame([{"model": k, "seed": s, "NDCG@10 at 8": one(k, 8, seed=s)["ndcg"]}
                          for k in ("MiniLM", "MF") for s in range(3)])
    variants = pd.DataFrame([{"variant": v, "target epsilon": e, "D": r["D"], "NDCG@10": r["ndcg"]}
                             for v, e in (("full adapter", 4), ("full adapter", math.inf),
                                          ("no item bias", 8), ("no item bias", math.inf),
                                          ("frozen A", 2))
                             for r in [one("MiniLM", e, variant=v)]])
    return seeds, variants

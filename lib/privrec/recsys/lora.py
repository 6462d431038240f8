"""LoRA inside the language model: the item tower becomes text -> fine-tuned MiniLM -> item vector.

:mod:`privrec.recsys.two_tower` keeps all-MiniLM-L6-v2 frozen and trains a small adapter on its
cached sentence embeddings. Here the encoder itself is fine-tuned, parameter-efficiently: a rank-r
LoRA update (Hu et al. 2022), built with Hugging Face ``peft``, of the **last linear map of the top
transformer layer** (the feed-forward output projection ``W_2``, 1536 -> 384):

.. math:: x_t = h_t + W_2 u_t + b_2 + s\\,B A u_t,\\qquad
          e_i = \\operatorname{normalize}\\Big(\\tfrac1{T_i}\\sum_{t\\le T_i}\\operatorname{LN}(x_t)\\Big),

with :math:`u_t = \\operatorname{gelu}(W_1 h_t + b_1)` the token's feed-forward activation, :math:`h_t`
its attention output, :math:`A\\in\\mathbb R^{r\\times 1536}` (random at the start) and
:math:`B\\in\\mathbb R^{384\\times r}` (zero at the start), :math:`s = \\alpha/r`. Everything upstream of
:math:`W_2` is frozen and depends only on the **public** item texts, so :func:`top_layer_inputs`
computes :math:`(u_t, h_t)` once for the catalogue and caches them on disk; a training step then costs
a rank-r product per token instead of a transformer forward. (LoRA in the attention projections would
change everything after them, the whole feed-forward block included, and could not be cached.)

The rest of the model is the two-tower model of :mod:`privrec.recsys.two_tower`, composed, not copied:
:class:`LoRATwoTower` takes its user tower, adapter and biases from a
:class:`~privrec.recsys.two_tower.TwoTowerRecommender` built on the pretrained embeddings (same seed,
same shapes), and with :math:`B = 0` scores exactly like it.

References: Hu et al. (2022), LoRA, ICLR; Reimers & Gurevych (2019), Sentence-BERT, EMNLP.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import warnings
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..core.checks import choice, int_in, positive
from ..core.checks import seed as check_seed
from . import text_encoder
from .models import as_index_tensor, checked_pairs
from .text_encoder import load_text_encoder
from .two_tower import TwoTowerRecommender

__all__ = ["TOP_LAYER", "TopLayerInputs", "top_layer_cache_name", "top_layer_inputs",
           "LoRAEncoder", "frozen_embeddings", "LoRATwoTower", "lora_parameter_table",
           "encoder_weights"]

#: The transformer layer whose feed-forward output projection is adapted (0-based, of 6).
TOP_LAYER = 5


class TopLayerInputs(NamedTuple):
    """What the frozen part of MiniLM computes for each token of each item text (public):
    ``ffn`` ``[n_tokens + 1, 1536]`` (:math:`u_t`, the input of :math:`W_2`), ``residual``
    ``[n_tokens + 1, 384]`` (:math:`h_t`), ``token_index`` ``[n_items, T]`` (each item's token rows,
    padded with ``n_tokens``, the zero row), ``lengths`` ``[n_items]`` and ``base``
    ``[n_tokens + 1, 384]``: :math:`h_t + W_2u_t + b_2`, the pretrained input of the final
    LayerNorm (computed once here, shared by every :class:`LoRAEncoder` of the catalogue)."""

    ffn: torch.Tensor
    residual: torch.Tensor
    token_index: torch.Tensor
    lengths: torch.Tensor
    base: torch.Tensor


def _forward_with_hooks(texts: list[str], batch_size: int = 128) -> tuple[np.ndarray, np.ndarray,
                                                                          np.ndarray]:
    """``(u_t, h_t, token counts)`` of every text, in text order: one MiniLM forward with the texts
    batched by token count, so batches carry little padding (MovieLens: 27,748 token slots for its
    26,522 tokens, against 49,256 in catalogue order)."""
    model = load_text_encoder()
    bert, layer = model[0].auto_model, model[0].auto_model.encoder.layer[TOP_LAYER]
    counts = [len(ids) for ids in model.tokenizer(texts, truncation=True,
                                                  max_length=model.max_seq_length)["input_ids"]]
    order = np.argsort(np.array(counts), kind="stable")  # ties: text order
    captured: dict[str, torch.Tensor] = {}
    hooks = [layer.output.register_forward_hook(
        lambda _m, args, _out: captured.update(ffn=args[0], residual=args[1]))]
    ffn, residual = [None] * len(texts), [None] * len(texts)
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            for s in range(0, len(texts), batch_size):
                batch = order[s:s + batch_size].tolist()
                tok = model.tokenizer([texts[i] for i in batch], padding=True, truncation=True,
                                      max_length=model.max_seq_length, return_tensors="pt")
                bert(**tok)
                mask = tok["attention_mask"].bool()
                for j, i in enumerate(batch):
                    ffn[i], residual[i] = (captured[k][j][mask[j]] for k in ("ffn", "residual"))
    finally:
        for h in hooks:
            h.remove()
    return (torch.cat(ffn).numpy(), torch.cat(residual).numpy(),
            np.array([len(f) for f in ffn], dtype=np.int64))


def _load(path, key: str) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["key"]) != key:
                return None
            parts = {k: np.array(stored[k]) for k in ("ffn", "residual", "lengths")}
    except Exception:  # missing, truncated, not an npz, wrong fields: recompute
        return None
    ok = (parts["ffn"].ndim == 2 and len(parts["ffn"]) == len(parts["residual"])
          == int(parts["lengths"].sum()) and np.isfinite(parts["ffn"]).all())
    return parts if ok else None


def _save(path, key: str, parts: dict[str, np.ndarray]) -> None:
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            np.savez(out, key=np.array(key), **parts)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def top_layer_cache_name() -> str:
    """The model name :func:`top_layer_inputs` keys its disk cache on: MiniLM, the layer and a hash
    of the code that computes the inputs (a file written by other code is never read; the texts'
    key, :func:`~privrec.recsys.text_encoder.embedding_cache_path`, adds the arithmetic)."""
    code = hashlib.sha256(inspect.getsource(_forward_with_hooks).encode()).hexdigest()[:12]
    return f"{text_encoder.DEFAULT_MODEL}#layer{TOP_LAYER}-ffn-inputs#{code}"


def top_layer_inputs(texts: list[str], *, cache_dir=None, use_cache: bool = True) -> TopLayerInputs:
    """The frozen top-layer inputs of every text, cached on disk like
    :func:`~privrec.recsys.text_encoder.encode_items` (key: :func:`top_layer_cache_name` and a
    hash of the texts).

    One MiniLM forward over the texts on a cache miss (about 20 s for MovieLens's 1,682 titles on
    one CPU thread); a hit reads ~200 MB. The texts are public, so nothing here costs privacy.
    """
    name = top_layer_cache_name()
    path = text_encoder.embedding_cache_path(texts, model_name=name, cache_dir=cache_dir)
    texts = list(texts)  # checked by embedding_cache_path
    key = text_encoder._texts_key(name, texts)
    parts = _load(path, key) if use_cache else None
    if parts is None or len(parts["lengths"]) != len(texts):
        ffn, residual, lengths = _forward_with_hooks(texts)
        parts = {"ffn": ffn.astype(np.float32), "residual": residual.astype(np.float32),
                 "lengths": lengths.astype(np.int64)}
        if use_cache:
            _save(path, key, parts)
    return _unpack({k: torch.from_numpy(v) for k, v in parts.items()})


def _unpack(parts: dict[str, torch.Tensor]) -> TopLayerInputs:
    lengths = parts["lengths"].long()
    ffn, residual = parts["ffn"], parts["residual"]
    starts = torch.cumsum(lengths, 0) - lengths
    steps = torch.arange(int(lengths.max()))
    index = torch.where(steps < lengths[:, None], starts[:, None] + steps, len(ffn))
    ffn = torch.cat([ffn, torch.zeros(1, ffn.shape[1])])
    residual = torch.cat([residual, torch.zeros(1, residual.shape[1])])
    dense, _ = encoder_weights()
    base = (ffn @ dense.weight.T + dense.bias + residual).detach()
    base[-1] = 0.0  # the padding row
    return TopLayerInputs(ffn, residual, index, lengths, base)


class _TopOutput(nn.Module):
    """The last block of MiniLM's top layer: ``LN(x + W2 u + b2)`` (BertOutput without dropout)."""

    def __init__(self, dense: nn.Linear, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.dense, self.LayerNorm = dense, norm


def encoder_weights() -> tuple[nn.Linear, nn.LayerNorm]:
    """Fresh copies of the pretrained top-layer ``W_2`` and final LayerNorm (frozen)."""
    import copy

    layer = load_text_encoder()[0].auto_model.encoder.layer[TOP_LAYER].output
    dense, norm = copy.deepcopy(layer.dense), copy.deepcopy(layer.LayerNorm)
    for p in (*dense.parameters(), *norm.parameters()):
        p.requires_grad_(False)
    return dense, norm


class LoRAEncoder(nn.Module):
    """MiniLM's top feed-forward projection with a ``peft`` LoRA adapter, run on cached inputs.

    Parameters
    ----------
    inputs:
        :func:`top_layer_inputs` of the catalogue.
    rank:
        :math:`r`; the adapter has :math:`r(1536 + 384)` parameters.
    alpha:
        LoRA's :math:`\\alpha` (scaling :math:`s = \\alpha / r`); default :math:`\\alpha = r`.
    seed:
        Seeds ``peft``'s initialisation of :math:`A` (Kaiming-uniform; :math:`B = 0`): a public
        constant, the same on every machine and for every data set.
    """

    def __init__(self, inputs: TopLayerInputs, *, rank: int = 8, alpha: float | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        import peft

        self.rank = int_in("rank", rank, 1, 384)
        alpha = float(self.rank) if alpha is None else positive("alpha", alpha)
        dense, norm = encoder_weights()
        self.top = _TopOutput(dense, norm)
        config = peft.LoraConfig(r=self.rank, lora_alpha=alpha, target_modules=["dense"],
                                 lora_dropout=0.0, bias="none")
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(check_seed("seed", seed))
            peft.inject_adapter_in_model(config, self.top)
        self.scaling = float(self.top.dense.scaling["default"])
        self.register_buffer("ffn", inputs.ffn, persistent=False)
        self.register_buffer("base", inputs.base, persistent=False)  # h + W2 u + b2 (frozen)
        self.register_buffer("token_index", inputs.token_index, persistent=False)
        self.register_buffer("lengths", inputs.lengths, persistent=False)

    @property
    def lora_a(self) -> nn.Linear:
        return self.top.dense.lora_A["default"]

    @property
    def lora_b(self) -> nn.Linear:
        return self.top.dense.lora_B["default"]

    def tokens(self, items: torch.Tensor,
               width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(token rows [..., T], mask [..., T])`` of ``items``; ``T = width`` or, by default,
        the longest among them (pass ``width`` under ``torch.func.vmap``)."""
        if width is None:
            width = int(self.lengths[items].max()) if items.numel() else 1
        rows = self.token_index[items][..., :width]
        return rows, rows < len(self.ffn) - 1

    def pool(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``normalize(mean over tokens of LN(x))``: the sentence embedding (Sentence-BERT pooling)."""
        out = nn.functional.layer_norm(x, x.shape[-1:], self.top.LayerNorm.weight,
                                       self.top.LayerNorm.bias, self.top.LayerNorm.eps)
        weights = mask.to(out.dtype)
        pooled = (out * weights[..., None]).sum(-2) / weights.sum(-1, keepdim=True)
        return nn.functional.normalize(pooled, dim=-1)

    def forward(self, items: torch.Tensor,
                width: int | None = None) -> torch.Tensor:
        """Embeddings ``[..., 384]`` of ``items`` (any ids; unmerged LoRA)."""
        rows, mask = self.tokens(items, width)
        delta = self.lora_b(self.lora_a(self.ffn[rows])) * self.scaling
        return self.pool(self.base[rows] + delta, mask)

    def all_embeddings(self) -> torch.Tensor:
        """``[n_items, 384]`` embeddings of the whole catalogue: :math:`Au_t` once per token, then
        gathered (cheaper than :meth:`forward` when every item is needed)."""
        z = self.lora_a(self.ffn)
        items = torch.arange(len(self.lengths))
        rows, mask = self.tokens(items)
        return self.pool(self.base[rows] + self.lora_b(z[rows]) * self.scaling, mask)

    def merged_forward(self, items: torch.Tensor) -> torch.Tensor:
        """The same embeddings through ``peft``'s *merged* weight :math:`W_2 + sBA` (no side branch):
        ``LN(h + (W_2 + sBA) u + b_2)``. Equal to :meth:`forward` up to rounding."""
        rows, mask = self.tokens(items)
        dense = self.top.dense
        residual = self.base[rows] - dense.base_layer(self.ffn[rows])  # h_t, before merging
        pretrained = dense.base_layer.weight.detach().clone()
        dense.merge()
        try:
            return self.pool(residual + dense.base_layer(self.ffn[rows]), mask)
        finally:
            dense.unmerge()  # W + sBA - sBA is not W bit for bit: restore the exact weights
            with torch.no_grad():
                dense.base_layer.weight.copy_(pretrained)

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        """``{"lora_A": A, "lora_B": B}`` (the only trainable encoder weights)."""
        return {"lora_A": self.lora_a.weight, "lora_B": self.lora_b.weight}


def frozen_embeddings(inputs: TopLayerInputs) -> torch.Tensor:
    """``[n_items, 384]`` MiniLM's sentence embeddings, finished from the cached top-layer inputs
    (pretrained :math:`W_2` and LayerNorm, mean pooling, normalisation): those of
    :func:`~privrec.recsys.text_encoder.encode_items` to rounding (< 1e-6), without a second
    transformer forward. :math:`B = 0`, so the LoRA branch adds exactly zero."""
    with torch.no_grad():
        return LoRAEncoder(inputs, rank=1).all_embeddings()


class LoRATwoTower(nn.Module):
    """Two-tower recommender whose item tower is text -> LoRA-fine-tuned MiniLM -> adapter.

    Parameters
    ----------
    head:
        A :class:`~privrec.recsys.two_tower.TwoTowerRecommender` built on the *pretrained*
        embeddings of the same texts with ``text_dim`` set: its user tower, adapter and biases are
        this model's (shared objects), and its public principal directions project the fine-tuned
        embeddings.
    encoder:
        The :class:`LoRAEncoder` of the same catalogue.
    pretrained:
        ``[n_items, 384]`` the pretrained embeddings ``head`` was built on (public); their mean and
        principal directions are frozen constants of the item tower.
    lora:
        ``"lora"``: :math:`A` and :math:`B` are shared and trained; ``"ffa"``: only :math:`B`
        (FFA-LoRA, Sun et al. 2024; :math:`A` stays at its public random initialisation);
        ``"frozen"``: neither (the encoder is the pretrained one).
    """

    user_parameter_names = ("user_factors", "user_bias")

    def __init__(self, head: TwoTowerRecommender, encoder: LoRAEncoder, pretrained: torch.Tensor, *,
                 lora: str = "lora") -> None:
        super().__init__()
        if not isinstance(head, TwoTowerRecommender) or head.text_dim is None:
            raise TypeError("head must be a TwoTowerRecommender built with text_dim")
        if not isinstance(encoder, LoRAEncoder):
            raise TypeError(f"encoder must be a LoRAEncoder, got {type(encoder).__name__}")
        if encoder.lengths.numel() != head.n_items:
            raise ValueError(f"encoder has {encoder.lengths.numel()} items, head {head.n_items}")
        self.lora = choice("lora", lora, ("lora", "ffa", "frozen"))
        self.head, self.encoder = head, encoder
        self.n_users, self.n_items, self.dim = head.n_users, head.n_items, head.dim
        directions, _ = text_encoder.principal_directions(pretrained, head.text_dim)
        self.register_buffer("directions", directions.float(), persistent=False)
        self.register_buffer("centre", pretrained.double().mean(0).float(), persistent=False)
        lora_names = {"lora": ("lora_A", "lora_B"), "ffa": ("lora_B",), "frozen": ()}[self.lora]
        self.shared_parameter_names = head.shared_parameter_names + lora_names
        for name, p in encoder.lora_parameters().items():
            p.requires_grad_(name in lora_names)

    def parameter(self, name: str) -> nn.Parameter:
        """A user or shared parameter by its name (``lora_A``/``lora_B`` or the head's)."""
        lora = self.encoder.lora_parameters()
        return lora[name] if name in lora else getattr(self.head, name)

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.parameter(n) for n in self.shared_parameter_names]

    def item_tower(self, embeddings: torch.Tensor,
                   items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(vectors [..., d], biases [...])`` from item embeddings (the frozen model's adapter)."""
        h = self.head
        x = (embeddings - self.centre) @ self.directions
        vectors = x @ h.base_projection + (x @ h.adapter_down) @ h.adapter_up
        bias = x @ h.text_bias + (h.item_bias[items] if h.has_item_bias else 0.0)
        return vectors, bias

    def item_vectors(self, items: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q, b)`` of ``items`` (all by default), through the fine-tuned encoder."""
        if items is None:
            return self.item_tower(self.encoder.all_embeddings(), torch.arange(self.n_items))
        items = as_index_tensor(items, name="items", upper=self.n_items)
        return self.item_tower(self.encoder(items), items)

    def predict_unchecked(self, users: torch.Tensor, items: torch.Tensor,
                          width: int | None = None) -> torch.Tensor:
        """:meth:`forward` without checks; ``width`` as in :meth:`LoRAEncoder.tokens`."""
        q, b = self.item_tower(self.encoder(items, width), items)
        h = self.head
        return h.global_bias + h.user_bias[users] + b + (h.user_factors[users] * q).sum(-1)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores (logits) of (user, item) pairs; ids are checked."""
        users, items = checked_pairs(users, items, n_users=self.n_users, n_items=self.n_items)
        return self.predict_unchecked(users, items)

    def score_all(self, users: torch.Tensor | None = None) -> torch.Tensor:
        """``[U, n_items]`` scores of every item for ``users`` (all by default)."""
        h = self.head
        users = (torch.arange(self.n_users) if users is None
                 else as_index_tensor(users, name="users", upper=self.n_users))
        q, b = self.item_vectors()
        return (h.global_bias + h.user_bias[users, None] + b[None, :]
                + h.user_factors[users] @ q.T)


def lora_parameter_table(*, ranks: tuple[int, ...] = (4, 8, 16), head: int) -> list[dict]:
    """Trainable parameters of each way to adapt the item tower (rows for a table).

    ``head``: the shared parameters of the frozen-encoder adapter model (e.g.
    :func:`~privrec.recsys.two_tower.shared_size`). LoRA adds :math:`r(1536+384)` (FFA-LoRA only
    :math:`384r`); fully fine-tuning the top layer trains all its weights.
    """
    head = int_in("head", head, 0)
    layer = load_text_encoder()[0].auto_model.encoder.layer[TOP_LAYER]
    full = sum(p.numel() for p in layer.parameters())
    total = sum(p.numel() for p in load_text_encoder().parameters())
    rows = [{"item tower": "frozen MiniLM + adapter", "encoder": 0}]
    for r in ranks:
        r = int_in("rank", r, 1)
        rows.append({"item tower": f"LoRA r={r} (A and B)", "encoder": r * (1536 + 384)})
        rows.append({"item tower": f"FFA-LoRA r={r} (B only)", "encoder": r * 384})
    rows.append({"item tower": "full fine-tuning, top layer", "encoder": full})
    for row in rows:
        row.update({"adapter + biases": head, "trained": row["encoder"] + head,
                    "share of MiniLM": row["encoder"] / total})
    return rows

"""One user-level DP-SGD step of the Transformer recommender: privrec vs Opacus, in one process.

Run: ``.venv/bin/python benchmarks/transformer_step.py``. The model is chapter 8's private SASRec
(``PRIVATE_MODEL``: d = 32, window 30, 2 blocks, one head, tied item table, 1682 items), a batch of
128 users with full windows, clip norm 1, noise multiplier 1, SGD, one torch thread. Contestants:

- ``no privacy``: autograd on the batch's summed loss;
- ``privrec``: :meth:`privrec.central.user_dpsgd.UserDPSGD.noisy_gradient` (per-user gradients by
  ``torch.func``, clipping, noise on every coordinate) and the optimiser step;
- ``opacus hooks``: the same model rebuilt with Opacus's ``DPMultiheadAttention`` (weights copied),
  wrapped in ``GradSampleModule`` (backward hooks materialise per-user gradients), then clipping
  and noise by hand on ``grad_sample`` -- what Opacus's DP optimiser does;
- ``opacus ghost``: ``GradSampleModuleFastGradientClipping`` (ghost clipping), Opacus's fastest
  mode; Opacus 1.6 refuses tied parameters, which SASRec's output layer is, so its error is
  recorded.

Both privrec and Opacus use the full softmax here (Opacus sees only module calls, and the sampled
softmax indexes the item table directly). Timing: interleaved rounds, median per step; the ratio
comes from one run.
"""

from __future__ import annotations

import copy
import sys
import warnings

import torch
from _common import interleaved_medians, save_section
from torch import nn

from privrec.central.user_dpsgd import UserDPSGD
from privrec.course.experiments.transformer import PRIVATE_MODEL
from privrec.recsys.data import leave_last_out_split, load_movielens100k
from privrec.recsys.sequential import SASRec, causal_mask, sequence_losses

BATCH, CLIP, SIGMA, LR = 128, 1.0, 1.0, 1.0


class OpacusBlock(nn.Module):
    def __init__(self, block):
        from opacus.layers import DPMultiheadAttention

        super().__init__()
        self.norm1, self.norm2 = copy.deepcopy(block.norm1), copy.deepcopy(block.norm2)
        self.ffn = copy.deepcopy(block.ffn)
        dim = block.norm1.normalized_shape[0]
        self.attention = DPMultiheadAttention(dim, 1, bias=True, batch_first=True)
        a = block.attention
        for mine, theirs in ((a.query, self.attention.qlinear), (a.key, self.attention.klinear),
                             (a.value, self.attention.vlinear), (a.out, self.attention.out_proj)):
            theirs.weight.data.copy_(mine.weight.data)
            theirs.bias.data.copy_(mine.bias.data)

    def forward(self, x, allowed):
        h = self.norm1(x)
        out, _ = self.attention(h, h, h, attn_mask=~allowed, need_weights=False)
        x = x + out
        return x + self.ffn(self.norm2(x))


class OpacusTwin(nn.Module):
    """privrec's SASRec with Opacus's attention layer (same weights, same function)."""

    def __init__(self, model: SASRec):
        super().__init__()
        self.items, self.positions = copy.deepcopy(model.items), copy.deepcopy(model.positions)
        self.blocks = nn.ModuleList(OpacusBlock(b) for b in model.blocks)
        self.norm = copy.deepcopy(model.norm)
        self.output = nn.Linear(model.dim, model.n_items + 1)
        self.output.weight = self.items.weight
        self.max_len, self.n_items = model.max_len, model.n_items

    def forward(self, inputs):
        pos = torch.arange(self.max_len - inputs.shape[1], self.max_len).expand_as(inputs)
        x = self.items(inputs) + self.positions(pos.contiguous())
        allowed = causal_mask(inputs)
        for block in self.blocks:
            x = block(x, allowed)
        return self.norm(x)

    def logits(self, hidden):
        return self.output(hidden)[..., 1:]


def main() -> None:
    torch.set_num_threads(1)
    ml = load_movielens100k()
    train, _ = leave_last_out_split(ml.ratings)
    model = SASRec(ml.n_items, **PRIVATE_MODEL, dropout=0.0, seed=0)
    run = UserDPSGD(model, train, n_users=ml.n_users, clip_norm=CLIP, noise_multiplier=SIGMA,
                    sample_rate=BATCH / ml.n_users, lr=LR, optimizer="sgd", n_negatives=None)
    full = (run.targets >= 0).sum(1) == PRIVATE_MODEL["max_len"]
    users = full.nonzero().squeeze(1)[:BATCH]
    x, y = run.inputs[users], run.targets[users]
    gen = torch.Generator().manual_seed(0)

    plain = SASRec(ml.n_items, **PRIVATE_MODEL, dropout=0.0, seed=0)
    sgd = torch.optim.SGD(plain.parameters(), lr=LR)

    def no_privacy():
        sgd.zero_grad()
        sequence_losses(plain, x, y).sum().backward()
        sgd.step()

    def privrec():
        grads = run.noisy_gradient(users)
        for name, p in model.named_parameters():
            p.grad = grads[name]
        run.optimizer.step()

    steps, failed = {"no privacy": no_privacy, "privrec": privrec}, {}
    for mode in ("hooks", "ghost"):
        try:
            steps[f"opacus {mode}"] = opacus_step(mode, model, x, y, gen)
            steps[f"opacus {mode}"]()
        except Exception as exc:  # noqa: BLE001 - a mode Opacus rejects for this model is reported
            failed[f"opacus {mode}"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            steps.pop(f"opacus {mode}", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timing = interleaved_medians(steps, warmup=2, rounds=5)
    rows = [{"step": n, "ms": round(1e3 * t["median_s"], 1), "calls": t["calls"]}
            for n, t in timing.items()]
    rows += [{"step": n, "ms": None, "error": why} for n, why in failed.items()]
    ratio = {n: round(timing[n]["median_s"] / timing["privrec"]["median_s"], 2) for n in timing}
    section = {"config": {"batch_users": BATCH, **PRIVATE_MODEL, "items": ml.n_items,
                          "blocks": 2, "heads": 1, "softmax": "full", "clip_norm": CLIP,
                          "noise_multiplier": SIGMA, "optimizer": "SGD", "threads": 1},
               "rows": rows, "ratio_vs_privrec": ratio}
    print(section)
    if "--no-save" not in sys.argv:
        save_section("transformer", section)


def opacus_step(mode, model, x, y, gen):
    """A callable DP step with Opacus computing the per-user gradients (``mode``: hooks|ghost)."""
    from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping

    twin = OpacusTwin(model)
    params = [p for p in twin.parameters() if p.requires_grad]
    if mode == "ghost":
        wrapped = GradSampleModuleFastGradientClipping(twin, loss_reduction="sum",
                                                       max_grad_norm=CLIP)
        sequence_losses(twin, x[:2], y[:2])  # raises for tied parameters
    else:
        wrapped = GradSampleModule(twin, loss_reduction="sum")

    def step():
        wrapped.zero_grad()
        for p in params:
            p.grad_sample = None
        sequence_losses(twin, x, y).sum().backward()
        norms = torch.stack([p.grad_sample.reshape(len(x), -1).norm(dim=1) for p in params]).norm(dim=0)
        factor = (CLIP / norms).clamp(max=1.0)
        with torch.no_grad():
            for p in params:
                summed = torch.einsum("b,b...->...", factor, p.grad_sample)
                noisy = summed + SIGMA * CLIP * torch.randn(summed.shape, generator=gen)
                p -= LR * noisy / len(x)

    return step


if __name__ == "__main__":
    main()

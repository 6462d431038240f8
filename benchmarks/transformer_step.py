"""One user-level DP-SGD step of the Transformer recommender: privrec vs Opacus, in one process.

Run: ``.venv/bin/python benchmarks/transformer_step.py`` (``--no-save``: print only). The model is
chapter 8's private SASRec (``PRIVATE_MODEL``: d = 32, window 30, 2 blocks, one head, tied item
table, 1682 items), a batch of 128 users with full windows, clip norm 1, noise multiplier 1, SGD,
one torch thread. Contestants (each a whole step: per-user gradients or norms, clipping, noise on
every coordinate, the parameter update):

- ``no privacy``: autograd on the batch's summed loss;
- ``privrec``: :meth:`privrec.central.user_dpsgd.UserDPSGD.noisy_gradient` (per-user gradients
  by ``torch.func``) and the optimiser step;
- ``opacus hooks``: :class:`privrec.central.user_dpsgd.OpacusTwin` (Opacus's
  ``DPMultiheadAttention``, same weights, time-first) in ``GradSampleModule``: backward hooks
  materialise every per-user gradient, then clipping and noise as Opacus's DP optimiser does;
- ``opacus fast clipping``: the twin in ``GradSampleModuleFastGradientClipping`` with
  ``use_ghost_clipping=False``: per-layer gradients give the norms, a second backward pass of
  the re-weighted loss gives the clipped sum (what ``DPTensorFastGradientClipping`` does);
- ``opacus ghost``: ghost clipping (norms without per-user gradients, then the second pass). It
  refuses the tied item table, and with ``DPMultiheadAttention`` the model must run time-first,
  which its embedding norm sampler cannot read; so it runs on an untied copy of SASRec itself
  (its attention is four linear layers): the same function, but the norm it clips treats the two
  uses of the table as two parameters. The errors of the configurations that do not run are
  recorded with the rows.

Before timing, the per-user gradients (hooks) and norms (fast and ghost clipping) of this batch
are compared with privrec's; the largest absolute differences are saved. Full softmax throughout
(Opacus sees only module calls; the sampled softmax indexes the item table directly). Timing:
interleaved rounds, median per step; the ratios come from one run.
"""

from __future__ import annotations

import copy
import sys
import warnings

import torch
from _common import interleaved_medians, save_section
from torch import nn

from privrec.central.user_dpsgd import OpacusTwin, UserDPSGD, per_user_gradients
from privrec.course.experiments.transformer import PRIVATE_MODEL
from privrec.recsys.data import leave_last_out_split, load_movielens100k
from privrec.recsys.sequential import SASRec, sequence_losses

BATCH, CLIP, SIGMA, LR = 128, 1.0, 1.0, 1.0


class Contiguous(nn.Module):
    """An embedding fed contiguous ids (Opacus's ghost norm of an embedding views them flat)."""

    def __init__(self, table: nn.Embedding) -> None:
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids.contiguous())


def untied_copy(model: SASRec) -> SASRec:
    """The same function with the output layer's own copy of the item table."""
    untied = copy.deepcopy(model)
    untied.output.weight = nn.Parameter(model.items.weight.detach().clone())
    untied.positions = Contiguous(untied.positions)
    return untied


def norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([g.reshape(len(g), -1).square().sum(1) for g in grads.values()]).sum(0).sqrt()


def wrap(mode: str, model: SASRec):
    """``(module, wrapper)`` for one Opacus mode: hooks | fast | ghost | ghost-dpmha."""
    from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping

    if mode == "hooks":
        twin = OpacusTwin(model)
        return twin, GradSampleModule(twin, batch_first=False, loss_reduction="sum")
    module = untied_copy(model) if mode == "ghost" else OpacusTwin(model, tied=mode == "fast")
    wrapped = GradSampleModuleFastGradientClipping(
        module, batch_first=mode == "ghost", loss_reduction="sum", max_grad_norm=CLIP,
        use_ghost_clipping=mode != "fast")
    return module, wrapped


def opacus_step(mode: str, model: SASRec, x, y, gen):
    """A callable DP step with Opacus computing per-user gradients or norms, and its norms
    of the first call (for the cross-check)."""
    module, wrapped = wrap(mode, model)
    params = [p for p in module.parameters() if p.requires_grad]
    seen = {}

    def step():
        wrapped.zero_grad()
        if mode == "hooks":
            for p in params:
                p.grad_sample = None
            sequence_losses(module, x, y).sum().backward()
            n = torch.stack([p.grad_sample.reshape(len(x), -1).norm(dim=1) for p in params]).norm(dim=0)
            factor = (CLIP / n).clamp(max=1.0)
            summed = [torch.einsum("b,b...->...", factor, p.grad_sample) for p in params]
        else:
            wrapped.enable_hooks()
            losses = sequence_losses(module, x, y)
            losses.sum().backward(retain_graph=True)
            n = wrapped.get_norm_sample()
            wrapped.zero_grad()
            wrapped.disable_hooks()
            ((CLIP / (n + 1e-6)).clamp(max=1.0) * losses).sum().backward()
            summed = [p.grad for p in params]
        seen.setdefault("norms", n.detach())
        with torch.no_grad():
            for p, s in zip(params, summed, strict=True):
                p -= LR * (s + SIGMA * CLIP * torch.randn(s.shape, generator=gen)) / len(x)

    return step, seen


def main() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    ml = load_movielens100k()
    train, _ = leave_last_out_split(ml.ratings)
    model = SASRec(ml.n_items, **PRIVATE_MODEL, dropout=0.0, seed=0)
    run = UserDPSGD(model, train, n_users=ml.n_users, clip_norm=CLIP, noise_multiplier=SIGMA,
                    sample_rate=BATCH / ml.n_users, lr=LR, optimizer="sgd", n_negatives=None)
    full = (run.targets >= 0).sum(1) == PRIVATE_MODEL["max_len"]
    users = full.nonzero().squeeze(1)[:BATCH]
    x, y = run.inputs[users], run.targets[users]
    gen = torch.Generator().manual_seed(0)
    ours = per_user_gradients(model, x, y)

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

    check, failed = cross_check(model, x, y, ours), {}
    steps = {"no privacy": no_privacy, "privrec": privrec}
    for mode in ("hooks", "fast", "ghost", "ghost-dpmha"):
        name = {"fast": "opacus fast clipping"}.get(mode, f"opacus {mode}")
        try:
            steps[name], seen = opacus_step(mode, copy.deepcopy(model), x, y, gen)
            steps[name]()
        except Exception as exc:  # noqa: BLE001 - a mode Opacus rejects for this model is reported
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            steps.pop(name, None)
    timing = interleaved_medians(steps, warmup=1, rounds=5)
    rows = [{"step": n, "ms": round(1e3 * t["median_s"], 1), "calls": t["calls"]}
            for n, t in timing.items()]
    rows += [{"step": n, "ms": None, "error": why} for n, why in failed.items()]
    ratio = {n: round(timing[n]["median_s"] / timing["privrec"]["median_s"], 2) for n in timing}
    section = {"config": {"batch_users": BATCH, **PRIVATE_MODEL, "items": ml.n_items,
                          "blocks": 2, "heads": 1, "softmax": "full", "clip_norm": CLIP,
                          "noise_multiplier": SIGMA, "optimizer": "SGD", "threads": 1},
               "cross_check_max_abs_diff": check, "rows": rows, "ratio_vs_privrec": ratio,
               "notes": ["opacus ghost runs on an untied copy of the item table (Opacus refuses "
                         "tied parameters under ghost clipping): the same function, a different "
                         "clipped norm", "opacus ghost-dpmha: ghost clipping with "
                         "DPMultiheadAttention, which must run time-first (Opacus 1.6 checks a "
                         "3-D attn_mask against query.size(0)); its embedding norm sampler then "
                         "fails on the permuted ids"]}
    print(section)
    if "--no-save" not in sys.argv:
        save_section("transformer", section)


def cross_check(model: SASRec, x, y, ours: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest absolute differences, on the benchmark batch, between privrec and Opacus: per-user
    gradients (hooks), per-user norms (fast clipping; ghost on the untied copy, against the
    torch.func gradients of that copy)."""
    from privrec.central.user_dpsgd import opacus_per_user_gradients

    theirs = opacus_per_user_gradients(model, x, y)
    out = {"hooks gradients": max(float((ours[n] - theirs[n]).abs().max()) for n in ours)}
    for mode in ("fast", "ghost"):
        if mode == "fast":
            expected = norms(ours)
        else:  # privrec's per-user gradients of the untied copy (the two tables separate)
            plain = untied_copy(model)
            plain.positions = plain.positions.table
            expected = norms(per_user_gradients(plain, x, y))
        module, wrapped = wrap(mode, model)
        sequence_losses(module, x, y).sum().backward()
        out[f"{mode} clipping norms"] = float((wrapped.get_norm_sample() - expected).abs().max())
    return {k: float(f"{v:.3g}") for k, v in out.items()}


if __name__ == "__main__":
    main()

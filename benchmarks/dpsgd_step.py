"""One DP-SGD step on the MF recommender: privrec vs every Opacus mode, in one process.

Run: ``make bench-dpsgd`` (or ``.venv/bin/python benchmarks/dpsgd_step.py``). Sizes are ML-100K's
(943 users, 1682 items, 80 000 training ratings), embedding dim 32, batch 1024, clip norm 1,
noise multiplier 1, Adam, one torch thread. Ratings are random (a step's cost does not depend on
their values), so nothing is downloaded. Opacus is a benchmark dependency only.

Contestants, all on the same batches:

- ``no privacy``: autograd on the mean squared error, Adam (what ``fit_explicit`` does);
- ``privrec``: :class:`privrec.central.dpsgd.DPSGD` (closed-form per-rating gradient norms, clipping,
  noise on every row, Adam, one accountant step);
- Opacus ``hooks`` (its default: per-example gradients materialised by backward hooks),
  ``functorch`` (per-example gradients by ``vmap``), ``ew`` (expanded weights) and ``ghost``
  (ghost clipping: per-example norms without per-example gradients, then a second backward;
  Opacus's fastest mode), each through ``PrivacyEngine.make_private`` with an ``nn.Embedding``
  model of the same shape.

Timing: the contestants take turns in interleaved rounds (the machine is shared; a load burst
then hits all of them alike), median per step. Peak memory: each contestant runs again alone in
a fresh process, which reports its ``ru_maxrss`` and its resident memory before the first step;
the difference is the step's own peak.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import numpy as np
import pandas as pd
import torch
from _common import current_rss_mib, interleaved_medians, peak_rss_mib, run_measured, save_section
from torch import nn

N_USERS, N_ITEMS, N_TRAIN = 943, 1682, 80_000
OPACUS_MODES = ("hooks", "functorch", "ew", "ghost")
CLIP, SIGMA, LR = 1.0, 1.0, 0.01


class EmbeddingMF(nn.Module):
    """BiasedMF written with nn.Embedding layers, the form Opacus's grad samplers support."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.user_factors = nn.Embedding(N_USERS, dim)
        self.item_factors = nn.Embedding(N_ITEMS, dim)
        self.user_bias = nn.Embedding(N_USERS, 1)
        self.item_bias = nn.Embedding(N_ITEMS, 1)
        self.global_bias = nn.Embedding(1, 1)  # a bare nn.Parameter has no Opacus grad sampler

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        dot = (self.user_factors(users) * self.item_factors(items)).sum(-1)
        return (self.global_bias(torch.zeros_like(users)).squeeze(-1) + self.user_bias(users).squeeze(-1)
                + self.item_bias(items).squeeze(-1) + dot)


def make_data(batch: int):
    rng = np.random.default_rng(0)
    train = pd.DataFrame({"user": rng.integers(0, N_USERS, N_TRAIN),
                          "item": rng.integers(0, N_ITEMS, N_TRAIN),
                          "rating": rng.integers(1, 6, N_TRAIN).astype(np.float32)})
    tensors = tuple(torch.as_tensor(train[c].to_numpy()) for c in ("user", "item", "rating"))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(N_TRAIN, (batch,), generator=gen) for _ in range(16)]
    return train, tensors, batches


def plain_step(dim: int, tensors, batches):
    try:
        from privrec.central.per_example import mf_loss
    except ImportError:  # before the DP-SGD modules were split
        from privrec.central.dpsgd import mf_loss
    from privrec.recsys.models import BiasedMF

    users, items, ratings = tensors
    model = BiasedMF(N_USERS, N_ITEMS, dim, global_mean=3.5)
    adam = torch.optim.Adam(model.parameters(), lr=LR)
    state = {"i": 0}

    def step() -> None:
        idx = batches[state["i"] % len(batches)]
        state["i"] += 1
        loss = mf_loss(model, users[idx], items[idx], ratings[idx]) / len(idx)
        adam.zero_grad(set_to_none=True)
        loss.backward()
        adam.step()
    return step


def privrec_step(dim: int, train: pd.DataFrame, batches, batch: int):
    """privrec's DPSGD.step on a given batch (the API helper 'dp' keeps: DPSGD(...).step(index))."""
    from privrec.central.dpsgd import DPSGD
    from privrec.recsys.models import BiasedMF

    trainer = DPSGD(BiasedMF(N_USERS, N_ITEMS, dim, global_mean=3.5), train, clip_norm=CLIP,
                    noise_multiplier=SIGMA, sample_rate=batch / N_TRAIN, lr=LR, seed=0)
    state = {"i": 0}

    def step() -> None:
        trainer.step(batches[state["i"] % len(batches)])
        state["i"] += 1
    return step


def opacus_step(mode: str, dim: int, tensors, batches, batch: int):
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    users, items, ratings = tensors
    model = EmbeddingMF(dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loader = DataLoader(TensorDataset(users, items, ratings), batch_size=batch)
    criterion = nn.MSELoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
            noise_multiplier=SIGMA, max_grad_norm=CLIP, poisson_sampling=False,
            grad_sample_mode=mode)
    if mode == "ghost":
        model, optimizer, criterion, _ = made
    else:
        model, optimizer, _ = made
    state = {"i": 0}

    def step() -> None:
        idx = batches[state["i"] % len(batches)]
        state["i"] += 1
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(users[idx], items[idx]), ratings[idx])
        loss.backward()
        optimizer.step()
    return step


def build(name: str, args, train, tensors, batches):
    if name == "no privacy":
        return plain_step(args.dim, tensors, batches)
    if name == "privrec":
        return privrec_step(args.dim, train, batches, args.batch)
    return opacus_step(name.removeprefix("opacus "), args.dim, tensors, batches, args.batch)


def memory_child(name: str, args) -> None:
    """Child process: build one contestant, run it, print its peak memory as JSON."""
    import opacus  # noqa: F401 - imports are not the step's memory

    import privrec.central.dpsgd  # noqa: F401

    train, tensors, batches = make_data(args.batch)
    base = current_rss_mib()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = build(name, args, train, tensors, batches)
        for _ in range(5):
            step()
    print(json.dumps({"base_rss_mib": round(base, 1), "peak_rss_mib": round(peak_rss_mib(), 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args.memory_child, args)

    train, tensors, batches = make_data(args.batch)
    steps, failed = {}, {}
    for name in ("no privacy", "privrec", *(f"opacus {m}" for m in OPACUS_MODES)):
        try:
            steps[name] = build(name, args, train, tensors, batches)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(2):
                    steps[name]()
        except Exception as exc:  # noqa: BLE001 - a mode Opacus rejects for this model is reported
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            steps.pop(name, None)
    # privrec and no privacy are ~100x faster than Opacus: give them more calls per round.
    per_round = {"no privacy": 10, "privrec": 10}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timing = interleaved_medians(steps, warmup=3, rounds=args.rounds, per_round=per_round)

    rows = []
    for name in steps:
        mem = run_measured([sys.executable, __file__, "--memory-child", name, "--batch", str(args.batch),
                            "--dim", str(args.dim), "--threads", str(args.threads)],
                           timeout_s=600, memory_cap_mib=8000)
        rows.append({"step": name, "ms": round(1e3 * timing[name]["median_s"], 3),
                     "min_ms": round(1e3 * timing[name]["min_s"], 3), "calls": timing[name]["calls"],
                     "peak_mib": round(mem["peak_rss_mib"] - mem["base_rss_mib"], 1) if mem["ok"] else None})
    for name, why in failed.items():
        rows.append({"step": name, "ms": None, "error": why})
    ours = timing["privrec"]["median_s"]
    ratios = {name: round(t["median_s"] / ours, 1) for name, t in timing.items() if name != "privrec"}
    fastest = min((n for n in timing if n.startswith("opacus")), key=lambda n: timing[n]["median_s"])

    print(f"One DP-SGD step, batch {args.batch}, dim {args.dim}, {N_USERS} users x {N_ITEMS} items, "
          f"{args.threads} thread(s); median over {args.rounds} interleaved rounds")
    print(f"{'step':<20}{'ms/step':>10}{'x privrec':>11}{'peak MiB':>10}")
    for row in rows:
        if row.get("ms") is None:
            print(f"{row['step']:<20}  failed: {row['error']}")
            continue
        ratio = ratios.get(row["step"], 1.0)
        print(f"{row['step']:<20}{row['ms']:>10.2f}{ratio:>11.1f}{row['peak_mib'] or float('nan'):>10.1f}")
    print(f"fastest Opacus mode: {fastest}; {fastest} / privrec = {ratios[fastest]:.1f}x (bar: >= 5x)")
    grad_sample_mib = args.batch * (N_USERS + N_ITEMS) * (args.dim + 1) * 4 / 2**20
    print(f"per-example gradient tensors Opacus hooks materialise: about {grad_sample_mib:.0f} MiB")
    if not args.no_save:
        save_section("dpsgd", {
            "config": {"batch": args.batch, "dim": args.dim, "users": N_USERS, "items": N_ITEMS,
                       "train_ratings": N_TRAIN, "threads": args.threads, "rounds": args.rounds,
                       "clip_norm": CLIP, "noise_multiplier": SIGMA, "optimizer": "Adam"},
            "rows": rows, "ratio_vs_privrec": ratios, "fastest_opacus": fastest,
            "bar": {"fastest_opacus_over_privrec_at_least": 5.0}})


if __name__ == "__main__":
    main()

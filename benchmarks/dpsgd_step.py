"""One DP-SGD step on the MF recommender: privrec's fast path vs Opacus vs no privacy.

Run: ``make bench-dpsgd`` (or ``.venv/bin/python benchmarks/dpsgd_step.py``). Sizes are ML-100K's
(943 users, 1682 items, 80 000 training ratings), embedding dim 32, batch 1024, clip norm 1,
noise multiplier 1, Adam. Ratings are random (the step's cost does not depend on their values),
so nothing is downloaded. Opacus is a benchmark dependency only; privrec never imports it.

Reports the median time per step over repeats after warm-up, the ratios, and peak memory:
the resident-set growth of each phase (``resource.getrusage``; phases run from the expected
smallest to the largest so the monotone peak is attributable; the first phase also pays for
torch's own start-up allocations) and the size of the per-example
gradient tensors Opacus materialises, ``batch x (users + items) x (dim + 1)`` floats.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
import warnings

import numpy as np
import pandas as pd
import torch
from torch import nn

from privrec.dpsgd import DPSGD, mf_loss
from privrec.models import BiasedMF

N_USERS, N_ITEMS, N_TRAIN = 943, 1682, 80_000


def _rss_mib() -> float:
    scale = 1024 if sys.platform != "darwin" else 1024 * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _time(step, *, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--opacus-repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    train = pd.DataFrame({"user": rng.integers(0, N_USERS, N_TRAIN),
                          "item": rng.integers(0, N_ITEMS, N_TRAIN),
                          "rating": rng.integers(1, 6, N_TRAIN).astype(np.float32)})
    users = torch.as_tensor(train["user"].to_numpy())
    items = torch.as_tensor(train["item"].to_numpy())
    ratings = torch.as_tensor(train["rating"].to_numpy())
    gen = torch.Generator().manual_seed(0)

    def batch() -> torch.Tensor:
        return torch.randint(N_TRAIN, (args.batch,), generator=gen)

    clip, sigma, lr = 1.0, 1.0, 0.01
    q = args.batch / N_TRAIN
    rss0 = _rss_mib()

    # 1. No privacy: autograd on the mean squared error, Adam (what fit_explicit does per step).
    plain = BiasedMF(N_USERS, N_ITEMS, args.dim, global_mean=3.5)
    adam = torch.optim.Adam(plain.parameters(), lr=lr)

    def plain_step() -> None:
        idx = batch()
        loss = mf_loss(plain, users[idx], items[idx], ratings[idx]) / len(idx)
        adam.zero_grad(set_to_none=True)
        loss.backward()
        adam.step()

    t_plain = _time(plain_step, warmup=5, repeats=args.repeats)
    rss_plain = _rss_mib()

    # 2. privrec: closed-form per-rating norms, clipping, dense noise on every row, Adam.
    ours = DPSGD(BiasedMF(N_USERS, N_ITEMS, args.dim, global_mean=3.5), train, clip_norm=clip,
                 noise_multiplier=sigma, sample_rate=q, lr=lr, seed=0)
    t_ours = _time(lambda: ours.step(batch()), warmup=5, repeats=args.repeats)
    rss_ours = _rss_mib()

    # 3. Opacus: GradSampleModule + DPOptimizer, same clip, sigma, expected batch and optimiser.
    t_opacus = float("nan")
    try:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer
    except ImportError:  # pragma: no cover - opacus is in requirements.txt
        print("opacus not installed: skipping its row")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            emb = GradSampleModule(EmbeddingMF(args.dim))
            opt = DPOptimizer(torch.optim.Adam(emb.parameters(), lr=lr), noise_multiplier=sigma,
                              max_grad_norm=clip, expected_batch_size=args.batch)

        def opacus_step() -> None:
            idx = batch()
            loss = (emb(users[idx], items[idx]) - ratings[idx]).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        with warnings.catch_warnings():  # Opacus's full backward hooks warn on every step
            warnings.simplefilter("ignore")
            t_opacus = _time(opacus_step, warmup=2, repeats=args.opacus_repeats)
    rss_opacus = _rss_mib()

    grad_sample_mib = args.batch * (N_USERS + N_ITEMS) * (args.dim + 1) * 4 / 2**20
    print(f"One DP-SGD step, batch {args.batch}, dim {args.dim}, {N_USERS} users x {N_ITEMS} items, "
          f"{args.threads} thread(s); median of {args.repeats} (Opacus {args.opacus_repeats}) "
          f"after warm-up")
    print(f"{'step':<24}{'ms/step':>10}{'peak RSS growth MiB':>22}")
    print(f"{'no privacy (autograd)':<24}{1e3 * t_plain:>10.2f}{rss_plain - rss0:>22.1f}")
    print(f"{'privrec DP-SGD':<24}{1e3 * t_ours:>10.2f}{rss_ours - rss_plain:>22.1f}")
    print(f"{'Opacus DP-SGD':<24}{1e3 * t_opacus:>10.2f}{rss_opacus - rss_ours:>22.1f}")
    print(f"Opacus / privrec: {t_opacus / t_ours:.1f}x   (bar: >= 50x)")
    print(f"privrec / no privacy: {t_ours / t_plain:.2f}x   (bar: <= 2x)")
    print(f"Opacus per-example gradient tensors: about {grad_sample_mib:.0f} MiB per step; "
          f"privrec's per-example rows: {args.batch * (2 * args.dim + 3) * 4 / 2**10:.0f} KiB")


if __name__ == "__main__":
    main()

"""One DP-SGD step on the LoRA-fine-tuned MiniLM item tower: privrec vs Opacus, same model, one run.

Run: ``.venv/bin/python benchmarks/lora_step.py`` (writes the ``lora`` section of
``benchmarks/results.json``). The model is chapter 7's :class:`privrec.recsys.lora.LoRATwoTower`
on MovieLens-100K's 1,682 item texts (rank-8 LoRA on the top layer's feed-forward output
projection, its inputs cached from MiniLM's frozen layers); the trainable parameters are the two
LoRA factors (the head frozen, so that Opacus's hooks cover every trainable parameter). A batch is
``--batch`` records of one interaction plus four negatives, clip norm 1, noise multiplier 1, Adam,
one torch thread.

Contestants, on the same batches:

- ``no privacy``: autograd on the mean loss, Adam;
- ``privrec``: :func:`privrec.central.lora_dpsgd.per_example_gradients` (``torch.func.vmap``),
  clipping and summing, Gaussian noise on every coordinate, Adam;
- ``opacus hooks``: ``GradSampleModule`` + ``DPOptimizer`` (per-example gradients by backward hooks,
  clipping, noise, Adam) on the same module.

The contestants take turns in interleaved rounds (the machine is shared); the ratio is from that one
run, side by side.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from _common import interleaved_medians, save_section

from privrec.central.dpsgd import noisy_average
from privrec.central.lora_dpsgd import _Losses, example_losses, per_example_gradients
from privrec.central.per_example import clip_and_sum
from privrec.recsys.data import load_movielens100k
from privrec.recsys.lora import LoRAEncoder, LoRATwoTower, top_layer_inputs
from privrec.recsys.text_encoder import encode_items, item_texts
from privrec.recsys.two_tower import TwoTowerRecommender, implicit_batch

CLIP, SIGMA, LR = 1.0, 1.0, 0.01


def build_model() -> LoRATwoTower:
    ml = load_movielens100k()
    texts = item_texts(ml.items)
    emb = encode_items(texts)
    head = TwoTowerRecommender(ml.n_users, emb, 16, text_dim=64, rank=4, item_bias=True, seed=0)
    model = LoRATwoTower(head, LoRAEncoder(top_layer_inputs(texts), rank=8, seed=0), emb)
    for p in head.parameters():
        p.requires_grad_(False)
    return model


def batches(model: LoRATwoTower, size: int, count: int):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        items, labels = implicit_batch(torch.randint(model.n_items, (size, 1), generator=gen),
                                       torch.arange(model.n_items), n_negatives=4, generator=gen)
        out.append((torch.randint(model.n_users, (size,), generator=gen), items, labels))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build_model()
    params = [p for p in model.parameters() if p.requires_grad]
    data = batches(model, args.batch, 4)
    state = {"i": 0}

    def next_batch():
        state["i"] = (state["i"] + 1) % len(data)
        return data[state["i"]]

    plain = torch.optim.Adam(params, lr=LR)

    def no_privacy():
        users, items, labels = next_batch()
        plain.zero_grad(set_to_none=True)
        example_losses(model, users, items, labels).mean().backward()
        plain.step()

    ours_opt, noise = torch.optim.Adam(params, lr=LR), torch.Generator().manual_seed(1)

    def privrec():
        users, items, labels = next_batch()
        summed, _ = clip_and_sum(per_example_gradients(model, users, items, labels), clip_norm=CLIP)
        noisy = noisy_average(summed, noise_multiplier=SIGMA, clip_norm=CLIP,
                              expected_batch_size=len(users), generator=noise)
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        for n, p in named.items():
            p.grad = noisy[n]
        ours_opt.step()

    import copy

    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    twin = copy.deepcopy(model)  # Opacus's hooks stay off the model the other contestants use
    width = int(model.encoder.lengths.max())
    wrapped = GradSampleModule(_Losses(twin, width), batch_first=True, loss_reduction="mean")
    twin_params = [p for p in twin.parameters() if p.requires_grad]
    dp_opt = DPOptimizer(torch.optim.Adam(twin_params, lr=LR), noise_multiplier=SIGMA,
                         max_grad_norm=CLIP, expected_batch_size=args.batch)

    def opacus_hooks():
        users, items, labels = next_batch()
        dp_opt.zero_grad(set_to_none=True)
        wrapped(users, items, labels).mean().backward()
        dp_opt.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = interleaved_medians({"no privacy": no_privacy, "privrec": privrec,
                                     "opacus hooks": opacus_hooks}, warmup=1, rounds=args.rounds)
    rows = [{"step": name, "ms": round(t["median_s"] * 1e3, 1), "min_ms": round(t["min_s"] * 1e3, 1),
             "calls": t["calls"]} for name, t in times.items()]
    ours = times["privrec"]["median_s"]
    section = {"config": {"batch": args.batch, "records": "1 interaction + 4 negatives",
                          "trainable": "LoRA A (8x1536) and B (384x8) of MiniLM's top W2",
                          "threads": 1, "rounds": args.rounds, "clip_norm": CLIP,
                          "noise_multiplier": SIGMA, "optimizer": "Adam"},
               "rows": rows,
               "ratio_vs_privrec": {n: round(t["median_s"] / ours, 2) for n, t in times.items()
                                    if n != "privrec"}}
    for row in rows:
        print(f"{row['step']:>14}: {row['ms']:8.1f} ms (min {row['min_ms']:.1f})")
    save_section("lora", section)


if __name__ == "__main__":
    main()

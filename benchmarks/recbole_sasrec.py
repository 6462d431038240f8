"""RecBole's own SASRec as a peer of privrec's, on the same data, split and metric.

Run from the repository root with the book's environment::

    .venv/bin/python benchmarks/recbole_sasrec.py [--epochs 3] [--ours-epochs N]

It needs a second, benchmark-only environment with RecBole's runtime dependencies (never the book's
.venv): see ``benchmarks/recbole-requirements.txt``. Its interpreter is ``$PRIVREC_RECBOLE_PYTHON``
(default ``.venv-recbole/bin/python``).

What it does, in one process per library:

1. **Same data.** The book's leave-last-out split of MovieLens-100K (each user's items in time
   order, ties broken by item id; the last one held out) is written as RecBole atomic files whose
   timestamp column is each interaction's position in that order, so RecBole's "order by time,
   leave one out" (``eval_args: {split: {LS: test_only}, order: TO, mode: full}``) reproduces the
   book's split exactly (checked: same held-out item for every user).
2. **RecBole.** Its ``SASRec`` model, ``Trainer`` and full-ranking evaluator (``Hit@10``,
   ``NDCG@10``) run in the RecBole environment, with RecBole's default SASRec settings except the
   window (``MAX_ITEM_LIST_LENGTH``, the book's) and the number of epochs; its scores of every item
   for every user come back too.
3. **The metric, checked.** ``privrec.recsys.metrics.ranking_metrics`` (the book's tie rule) on
   RecBole's own scores must equal RecBole's NDCG@10; and one user's NDCG@10 is recomputed by hand
   (rank of the held-out item among the unseen items, :math:`1/\\log_2(\\text{rank}+2)`).
4. **privrec.** :func:`privrec.recsys.sequential.fit_sasrec` with the chapter's settings, timed the
   same way (process CPU time and wall time, one torch thread each).

The result is the ``recbole_sasrec`` section of ``benchmarks/results.json``, which chapter 8
prints (the chapter never needs the RecBole environment).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATASET = "ml100k_privrec"
RECBOLE_PYTHON = os.environ.get("PRIVREC_RECBOLE_PYTHON",
                                str(HERE.parent / ".venv-recbole" / "bin" / "python"))


def recbole_config(data_path: str, *, epochs: int, max_len: int) -> dict:
    """RecBole's configuration: its SASRec defaults, the book's window, leave-one-out in time."""
    return {
        "data_path": data_path, "checkpoint_dir": data_path, "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": max_len, "epochs": epochs, "train_neg_sample_args": None,
        "loss_type": "CE",
        "eval_args": {"split": {"LS": "test_only"}, "order": "TO", "group_by": "user",
                      "mode": "full"},
        "metrics": ["Hit", "NDCG"], "topk": [10], "valid_metric": "NDCG@10",
        "seed": 0, "reproducibility": True, "device": "cpu", "use_gpu": False,
        "show_progress": False, "state": "ERROR", "log_wandb": False,
    }


def run_recbole(data_path: str, epochs: int, max_len: int) -> None:
    """The RecBole side (run in the RecBole environment; privrec is not imported here)."""
    import numpy as np
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    torch.set_num_threads(1)
    config = Config(model="SASRec", dataset=DATASET,
                    config_dict=recbole_config(data_path, epochs=epochs, max_len=max_len))
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, _, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = SASRec(config, train_data.dataset)
    trainer = Trainer(config, model)
    cpu, wall = time.process_time(), time.perf_counter()
    trainer.fit(train_data, valid_data=None, saved=False, show_progress=False)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    result = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    users = dataset.field2id_token["user_id"]
    items = dataset.field2id_token["item_id"]
    n_items = max(int(t) for t in items[1:]) + 1
    scores = np.zeros((max(int(t) for t in users[1:]) + 1, n_items), dtype=np.float32)
    held = {}
    model.eval()
    with torch.no_grad():
        for interaction, _, _, positive_i in test_data:
            full = model.full_sort_predict(interaction).reshape(len(interaction), -1)
            rows = [int(users[u]) for u in interaction["user_id"].tolist()]
            cols = np.array([int(t) for t in items[1:]])
            scores[np.array(rows)[:, None], cols[None, :]] = full[:, 1:].numpy()
            for r, i in zip(rows, positive_i.tolist(), strict=True):
                held[r] = int(items[i])
    np.save(Path(data_path) / "recbole_scores.npy", scores)
    print(json.dumps({"hr": float(result["hit@10"]), "ndcg": float(result["ndcg@10"]),
                      "train_cpu_s": cpu, "train_wall_s": wall, "epochs": epochs,
                      "held_out": {str(k): v for k, v in sorted(held.items())},
                      "n_parameters": sum(p.numel() for p in model.parameters())}))


def write_atomic(path: Path) -> tuple:
    """The book's split as a RecBole atomic file (timestamp = position in the book's order)."""
    import numpy as np
    import pandas as pd

    from privrec.recsys.data import leave_last_out_split, load_movielens100k

    ml = load_movielens100k()
    ratings = ml.ratings
    order = np.lexsort((ratings["item"].to_numpy(), ratings["timestamp"].to_numpy(),
                        ratings["user"].to_numpy()))
    ranked = ratings.iloc[order].assign(position=lambda f: f.groupby("user").cumcount())
    (path / DATASET).mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame({"user_id:token": ranked["user"], "item_id:token": ranked["item"],
                          "timestamp:float": ranked["position"]})
    frame.to_csv(path / DATASET / f"{DATASET}.inter", sep="\t", index=False)
    train, test = leave_last_out_split(ratings)
    return ml, train, test


def by_hand(scores, train, test, user: int) -> dict:
    """One user's NDCG@10 from RecBole's scores, by the definition (no library)."""
    row = scores[user].astype("float64").copy()
    seen = train.loc[train["user"] == user, "item"].to_numpy()
    item = int(test.loc[test["user"] == user, "item"].iloc[0])
    target = row[item]
    row[seen] = -math.inf
    rank = int((row > target).sum() + (row == target).sum() - 1)   # the book's tie rule
    return {"user": user, "item": item, "rank": rank,
            "ndcg": 1.0 / math.log2(rank + 2) if rank < 10 else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="RecBole epochs")
    parser.add_argument("--recbole-child", help=argparse.SUPPRESS)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--child-dir", help="reuse a finished RecBole child run: the directory "
                        "holding its atomic files and scores, its JSON line in child.json")
    args = parser.parse_args()
    if args.recbole_child:
        return run_recbole(args.recbole_child, args.epochs, args.max_len)

    import numpy as np
    import torch
    from _common import run_measured, save_section

    from privrec.course.experiments.transformer import NONPRIVATE, load_protocol, run_nonprivate
    from privrec.recsys.metrics import ranking_metrics

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.child_dir or tmp)
        ml, train, test = write_atomic(work)
        if args.child_dir:
            peer = json.loads((work / "child.json").read_text()) | {"ok": True}
        else:
            peer = run_measured([RECBOLE_PYTHON, __file__, "--recbole-child", tmp, "--epochs",
                                 str(args.epochs), "--max-len", str(args.max_len)],
                                timeout_s=6 * 3600, memory_cap_mib=12000,
                                env={"OMP_NUM_THREADS": "1"})
        if not peer["ok"]:
            raise SystemExit(f"RecBole did not run: {peer.get('error')}")
        scores = np.load(work / "recbole_scores.npy")
    same_split = all(int(test.loc[test["user"] == int(u), "item"].iloc[0]) == i
                     for u, i in peer["held_out"].items())
    ours_on_theirs = ranking_metrics(torch.as_tensor(scores), train, test)
    hand = by_hand(scores, train, test, user=0)
    ours = run_nonprivate(load_protocol()) | {"settings": dict(NONPRIVATE)}  # the chapter's run
    section = {
        "data": "ML-100K, leave-last-out in time order (ties: item id), full ranking",
        "recbole": {k: peer[k] for k in ("hr", "ndcg", "train_cpu_s", "train_wall_s", "epochs",
                                          "n_parameters")},
        "privrec_cpu_note": "privrec: process CPU seconds of fit_sasrec (cached chapter run)",
        "recbole_settings": "RecBole 1.2.1 SASRec defaults (2 layers, 2 heads, hidden 64, "
                            "inner 256, dropout 0.5, CE loss, batch 2048, lr 0.001), "
                            f"MAX_ITEM_LIST_LENGTH {args.max_len}",
        "same_split": same_split,
        "privrec_metric_on_recbole_scores": ours_on_theirs,
        "one_user_by_hand": hand,
        "privrec": ours,
    }
    print(json.dumps(section, indent=1))
    if not args.no_save:
        save_section("recbole_sasrec", section)


if __name__ == "__main__":
    sys.exit(main())

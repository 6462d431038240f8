"""RecBole's own SASRec as a peer of privrec's, on the same data, split and metric.

Run from the repository root with the book's environment::

    .venv/bin/python benchmarks/recbole_sasrec.py [--epochs 1] [--timeout-s 1500]

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
   window (``MAX_ITEM_LIST_LENGTH``, the book's) and a fixed number of epochs (no validation set,
   so no early stopping); its scores of every item for every user come back too. RecBole trains
   on every prefix of every history (98,114 sequences, 48 batches of 2048 per epoch). Importing
   its sequential models switches on torch's autograd anomaly mode for the whole process (SINE's
   module does it), which costs ~40% of each step; it is switched off again (no number changes).
3. **The metric, checked.** RecBole's evaluator keeps a sequential user's past items among the
   candidates, the book's removes them, so the like-for-like number is
   ``privrec.recsys.metrics.ranking_metrics`` (the book's tie rule) on RecBole's scores; RecBole's
   own definition is recomputed from the same scores and must equal its reported numbers. One
   user's NDCG@10 is recomputed by hand (rank of the held-out item among the unseen items,
   :math:`1/\\log_2(\\text{rank}+2)`), and every user's test-time input must equal the user's last
   training items in the book's order.
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
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(2**32),
             "MALLOC_TRIM_THRESHOLD_": str(2**36)}
"""One thread; glibc keeps freed blocks instead of returning every 100 MB activation to the kernel
(measured: 1.3-1.6 s of system time per batch of 2048 in page faults, none with these)."""
COST_NOTE = [
    "Profiled 2026-12-07 (one batch of 2048 at a time, 1 thread, load 13-18 on 2 cores):",
    "6.3-7.1 s CPU per batch as RecBole imports (autograd anomaly mode on: aten::ne/any NaN",
    "checks ~35% of op time), 3.8-4.1 s with it off, 2.7-3.0 s with glibc's malloc",
    "thresholds raised (1.3-1.6 s of system time per batch were page faults). Data",
    "preparation 1.3 s CPU, full-ranking test evaluation < 1 s: neither matters. The rest is",
    "the workload: 98,114 prefixes x 50 positions per epoch, 13x the positions of the book's",
    "8 epochs over 943 users; wall time was 4-6x CPU time because the machine was shared.",
]
"""What the time goes to (a separate profiling run; the section's times are measured)."""
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


def _timed_trainer(trainer_class):
    """RecBole's ``Trainer`` unchanged, plus the process CPU and wall seconds of every epoch."""
    class TimedTrainer(trainer_class):
        epoch_times: list = []

        def _train_epoch(self, *args, **kwargs):
            cpu, wall = time.process_time(), time.perf_counter()
            loss = super()._train_epoch(*args, **kwargs)
            self.epoch_times.append({"cpu_s": round(time.process_time() - cpu, 1),
                                     "wall_s": round(time.perf_counter() - wall, 1),
                                     "loss": round(float(loss), 2)})
            print(json.dumps(self.epoch_times[-1]), file=sys.stderr, flush=True)
            return loss

    return TimedTrainer


def run_recbole(data_path: str, epochs: int, max_len: int) -> None:
    """The RecBole side (run in the RecBole environment; privrec is not imported here)."""
    import numpy as np
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    # Importing recbole.model.sequential_recommender imports its SINE model, whose module calls
    # torch.autograd.set_detect_anomaly(True) for the whole process: every backward step then
    # checks every gradient for NaN (measured: 6.3-7.1 s CPU per batch of 2048 instead of
    # 3.8-4.1 s). It changes no number, only the time, so it is switched off again here.
    anomaly_on_import = torch.is_anomaly_enabled()
    torch.autograd.set_detect_anomaly(False)
    torch.set_num_threads(1)
    load = [os.getloadavg()[0]]
    config = Config(model="SASRec", dataset=DATASET,
                    config_dict=recbole_config(data_path, epochs=epochs, max_len=max_len))
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, _, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = SASRec(config, train_data.dataset)
    trainer = _timed_trainer(Trainer)(config, model)
    cpu, wall = time.process_time(), time.perf_counter()
    trainer.fit(train_data, valid_data=None, saved=False, show_progress=False)  # fixed epochs
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    eval_cpu, eval_wall = time.process_time(), time.perf_counter()
    result = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    eval_cpu, eval_wall = time.process_time() - eval_cpu, time.perf_counter() - eval_wall
    load.append(os.getloadavg()[0])
    users = dataset.field2id_token["user_id"]
    items = dataset.field2id_token["item_id"]
    n_items = max(int(t) for t in items[1:]) + 1
    scores = np.zeros((max(int(t) for t in users[1:]) + 1, n_items), dtype=np.float32)
    held, history = {}, {}
    cols = np.array([int(t) for t in items[1:]])
    model.eval()
    with torch.no_grad():
        for interaction, _, _, positive_i in test_data:
            full = model.full_sort_predict(interaction).reshape(len(interaction), -1)
            rows = [int(users[u]) for u in interaction["user_id"].tolist()]
            scores[np.array(rows)[:, None], cols[None, :]] = full[:, 1:].numpy()
            seqs = interaction["item_id_list"].tolist()
            lengths = interaction["item_length"].tolist()
            for r, i, seq, n in zip(rows, positive_i.tolist(), seqs, lengths, strict=True):
                held[r] = int(items[i])
                history[r] = [int(items[j]) for j in seq[:n]]
    np.save(Path(data_path) / "recbole_scores.npy", scores)
    print(json.dumps({"hr": float(result["hit@10"]), "ndcg": float(result["ndcg@10"]),
                      "train_cpu_s": round(cpu, 1), "train_wall_s": round(wall, 1),
                      "eval_cpu_s": round(eval_cpu, 1), "eval_wall_s": round(eval_wall, 1),
                      "epochs": epochs, "per_epoch": trainer.epoch_times,
                      "train_sequences": len(train_data.dataset), "batches_per_epoch":
                      len(train_data), "anomaly_mode_on_import": anomaly_on_import,
                      "load_average_1min": [round(x, 2) for x in load],
                      "held_out": {str(k): v for k, v in sorted(held.items())},
                      "history": {str(k): v for k, v in sorted(history.items())},
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


def first_hit(scores, train, test) -> dict:
    """:func:`by_hand` for the lowest user id whose held-out item RecBole ranks in its top 10.

    A user outside the top 10 would only check 0 = 0; the library's NDCG@10 of that user alone
    (``ranking_metrics`` on the user's test row) comes with it.
    """
    import torch

    from privrec.recsys.metrics import ranking_metrics

    for user in sorted(test["user"].tolist()):
        hand = by_hand(scores, train, test, user=user)
        if hand["rank"] < 10:
            one = ranking_metrics(torch.as_tensor(scores), train, test[test["user"] == user])
            return hand | {"privrec_metric_ndcg": one["ndcg"]}
    return {}


def run_summary(work: Path, train, test) -> dict:
    """Epochs, times and both metrics of one finished RecBole run kept in ``work``."""
    import numpy as np
    import torch

    from privrec.recsys.metrics import ranking_metrics

    peer = json.loads((work / "child.json").read_text())
    book = ranking_metrics(torch.as_tensor(np.load(work / "recbole_scores.npy")), train, test)
    return {k: peer[k] for k in ("epochs", "train_cpu_s", "train_wall_s", "hr", "ndcg")} | {
        "book_metric_hr": book["hr"], "book_metric_ndcg": book["ndcg"]}


def recbole_definition(scores, test) -> dict:
    """HR@10 and NDCG@10 as RecBole defines them for sequential models: every item is a candidate.

    RecBole's full-sort evaluator masks a user's past items only for general (non-sequential)
    models; for SASRec the items the user has already seen stay in the ranking.
    """
    import numpy as np

    users = test["user"].to_numpy()
    target = scores[users, test["item"].to_numpy()][:, None]
    ranks = (scores[users] > target).sum(axis=1)   # tie-free: float32 scores, checked below
    ties = int(((scores[users] == target).sum(axis=1) > 1).sum())
    ndcg = np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0)
    return {"hr": float((ranks < 10).mean()), "ndcg": float(ndcg.mean()), "users_with_ties": ties}


def same_histories(peer: dict, train, max_len: int) -> bool:
    """RecBole's test-time input of every user equals the user's last ``max_len`` training items."""
    import numpy as np

    ordered = train.iloc[np.lexsort((train["item"].to_numpy(), train["timestamp"].to_numpy(),
                                     train["user"].to_numpy()))]
    ours = {str(u): g["item"].tolist()[-max_len:] for u, g in ordered.groupby("user")}
    return ours == peer["history"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1, help="RecBole epochs")
    parser.add_argument("--recbole-child", help=argparse.SUPPRESS)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--timeout-s", type=float, default=1500.0, help="kill RecBole after this")
    parser.add_argument("--extra-run", action="append", default=[], help="a --child-dir of "
                        "another finished run (other epochs) to list in the section")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--child-dir", help="keep the RecBole run in this directory (atomic "
                        "files, scores, child.json) and reuse it when child.json exists")
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
        if (work / "child.json").exists():
            peer = json.loads((work / "child.json").read_text()) | {"ok": True}
        else:
            peer = run_measured([RECBOLE_PYTHON, __file__, "--recbole-child", str(work),
                                 "--epochs", str(args.epochs), "--max-len", str(args.max_len)],
                                timeout_s=args.timeout_s, memory_cap_mib=12000, env=CHILD_ENV)
        if not peer["ok"]:
            raise SystemExit(f"RecBole did not run: {peer.get('error')}")
        if args.child_dir:
            (work / "child.json").write_text(json.dumps(peer))
        scores = np.load(work / "recbole_scores.npy")
    same_split = all(int(test.loc[test["user"] == int(u), "item"].iloc[0]) == i
                     for u, i in peer["held_out"].items()) and len(peer["held_out"]) == len(test)
    ours_on_theirs = ranking_metrics(torch.as_tensor(scores), train, test)
    hand = first_hit(scores, train, test)
    ours = run_nonprivate(load_protocol()) | {"settings": dict(NONPRIVATE)}  # the chapter's run
    keys = ("hr", "ndcg", "train_cpu_s", "train_wall_s", "eval_cpu_s", "eval_wall_s", "epochs",
            "per_epoch", "train_sequences", "batches_per_epoch", "n_parameters",
            "anomaly_mode_on_import", "load_average_1min")
    section = {
        "data": "ML-100K, leave-last-out in time order (ties: item id), full ranking",
        "recbole": {k: peer[k] for k in keys} | {"child_wall_s": peer.get("wall_s")},
        "recbole_settings": "RecBole 1.2.1 SASRec defaults (2 layers, 2 heads, hidden 64, "
                            "inner 256, dropout 0.5, CE loss, batch 2048, lr 0.001), "
                            f"MAX_ITEM_LIST_LENGTH {args.max_len}; {args.epochs} epoch(s), fixed "
                            "(no validation, no early stopping); 1 torch thread; autograd "
                            "anomaly mode off; glibc malloc thresholds raised (CHILD_ENV)",
        "recbole_metric_note": "RecBole's own HR/NDCG rank every item, the user's past items "
                               "included (its full-sort evaluator masks history only for "
                               "non-sequential models); the book's metric ranks unseen items",
        "recbole_definition_recomputed": recbole_definition(scores, test),
        "same_split": same_split,
        "same_test_histories": same_histories(peer, train, args.max_len),
        "privrec_metric_on_recbole_scores": ours_on_theirs,
        "one_user_by_hand": hand,
        "cost_note": COST_NOTE,
        **({"recbole_runs": [run_summary(Path(d), train, test) for d in args.extra_run]}
           if args.extra_run else {}),
        "privrec_cpu_note": "privrec: process CPU seconds of fit_sasrec (cached chapter run)",
        "privrec": ours,
    }
    print(json.dumps(section, indent=1))
    if not args.no_save:
        save_section("recbole_sasrec", section)


if __name__ == "__main__":
    sys.exit(main())

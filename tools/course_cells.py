"""The course kit's chapter cells (issue 15): auto-checked exercises and widget static faces.

``python tools/course_cells.py chapters/01_*.ipynb`` appends the chapter's auto-checked exercises
(a stub the reader replaces, a one-line check, a collapsed reference solution) unless they are
there already, and adds the static face of the chapter's ipywidget to the widget cell.
``--markdown`` prints the cells instead (for a chapter someone else is editing).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

INTRO = """## Check your own code

Each exercise below comes with a cell holding a stub: replace `raise NotImplementedError` with your
answer and run the cell. Until you have written something, the check says `YOUR TURN`; then it
runs your function on hidden cases, says `PASS` or names the typical mistake it recognises, and
never raises. The reference solution is in the
collapsed cell under each exercise: try first."""

# chapter number -> [(checker, function name, parameters, task in one paragraph)]
EXERCISES = {
    1: [("top_k", "my_top_k", "scores, k",
         "**Exercise A (top-K with a tie rule).** `scores` is a `(users, items)` NumPy array. Return "
         "each user's `k` highest-scoring item ids, best first, with the book's tie rule: among equal "
         "scores the smaller item id comes first. (Popularity scores tie a lot, so the rule decides "
         "real ranks.)"),
        ("choose_config", "my_choice", "results",
         "**Exercise B (tuning without peeking).** `results` is a list of dicts like the tuning grid "
         "above: `dim`, `reg`, `val_rmse` and `test_rmse`. Return the index of the configuration you "
         "would report; on a tie keep the first one listed.")],
    2: [("laplace_scale", "my_laplace_scale", "sensitivity, epsilon",
         "**Exercise A (the Laplace scale).** Return the scale $b$ of the Laplace noise that makes "
         "the release of a query with $\\ell_1$ sensitivity `sensitivity` $\\varepsilon$-DP. (The "
         "article's formula is among the mistakes the check recognises.)"),
        ("krr_keep_probability", "my_keep_probability", "epsilon, k",
         "**Exercise B ($k$-ary randomized response).** Return the probability that $k$-RR reports "
         "a user's true category out of `k`, at budget `epsilon`.")],
    3: [("dp_sgd_gradient", "my_dp_sgd_gradient",
         "per_example_grads, *, clip_norm, noise_multiplier, expected_batch_size, noise",
         "**Exercise A (one DP-SGD gradient).** `per_example_grads` is a `(batch, d)` array, one "
         "row per example of a Poisson-sampled batch; `noise` is a standard normal vector of length "
         "`d`. Return the noisy average gradient that DP-SGD applies."),
        ("noisy_table_gradient", "my_table_gradient", "rows, row_grads, *, n_rows, std, noise",
         "**Exercise B (noise on every row).** Example `j` touches embedding row `rows[j]` (rows can "
         "repeat) with the already clipped gradient `row_grads[j]`; `noise` is a standard normal "
         "`(n_rows, d)` array. Return the `(n_rows, d)` noisy summed gradient of the table.")],
    4: [("fedavg", "my_fedavg", "updates, n_examples",
         "**Exercise A (FedAvg's average).** `updates` is `(clients, d)`, `n_examples` each client's "
         "number of ratings. Return the server's (non-private) FedAvg average."),
        ("fedavgm_step", "my_fedavgm_step", "weights, velocity, update, *, server_lr, momentum",
         "**Exercise B (server momentum).** Return the new `(weights, velocity)` of FedAvgM after "
         "one round whose averaged client update is `update`.")],
    5: [("dp_fedavg", "my_dp_fedavg",
         "updates, n_examples, *, clip_norm, noise_multiplier, expected_clients, noise",
         "**Exercise A (DP-FedAvg's aggregate).** `updates` is `(clients, d)` for the clients "
         "sampled this round, `n_examples` their numbers of ratings, `noise` a standard normal "
         "vector. Return the user-level DP average the server applies."),
        ("group_epsilon", "my_group_epsilon", "epsilon, group_size",
         "**Exercise B (from ratings to people).** A mechanism is $\\varepsilon$-DP for one rating "
         "(pure DP). Return the guarantee it gives a user with `group_size` ratings.")],
    6: [("lora_parameter_count", "my_lora_count", "d_in, d_out, rank",
         "**Exercise A (what a client uploads).** Return the number of trainable parameters of a "
         "rank-`rank` LoRA update of a `d_out × d_in` weight matrix."),
        ("cold_start_scores", "my_cold_start_scores", "user_vectors, text_embeddings, adapter",
         "**Exercise B (scoring items nobody rated).** `user_vectors` is `(users, d)`, "
         "`text_embeddings` `(items, t)` from the frozen encoder, `adapter` the learned `(t, d)` "
         "map. Return the `(users, items)` score matrix.")],
    9: [("roc_auc", "my_auc", "member_scores, nonmember_scores",
         "**Exercise A (AUC with ties).** Return the area under the ROC curve of an attack that "
         "calls a higher score \"member\"."),
        ("tpr_bound", "my_tpr_bound", "epsilon, delta, fpr",
         "**Exercise B (the DP cap).** Return the largest true-positive rate that any membership "
         "attack can reach at false-positive rate `fpr` against an $(\\varepsilon, \\delta)$-DP model.")],
}


def _cell(kind: str, source: str, tags: list[str] | None = None, cell_id: str = "") -> dict:
    cell = {"cell_type": kind, "id": cell_id, "metadata": {"tags": tags} if tags else {},
            "source": source.splitlines(keepends=True)}
    if kind == "code":
        cell |= {"execution_count": None, "outputs": []}
    return cell


def exercise_cells(chapter: int) -> list[dict]:
    """The markdown intro, and per exercise: task, stub + check, collapsed solution."""
    cells = [_cell("markdown", INTRO, cell_id=f"course-intro-{chapter}")]
    for checker, name, params, task in EXERCISES[chapter]:
        cells.append(_cell("markdown", task, cell_id=f"course-{checker}-task"))
        stub = (f"from privrec.course import exercises as check\n\n\ndef {name}({params}):\n"
                f"    raise NotImplementedError  # your code here\n\n\ncheck.{checker}({name})")
        cells.append(_cell("code", stub, cell_id=f"course-{checker}-try"))
        solution = (f"from privrec.course.book import show_source\n\n"
                    f"display(show_source(check.SOLUTIONS[{checker!r}]))\n"
                    f"check.{checker}(check.SOLUTIONS[{checker!r}])")
        cells.append(_cell("code", solution, tags=["hide-cell"], cell_id=f"course-{checker}-solution"))
    return cells


def add_exercises(path: Path, chapter: int, before_last: bool = False) -> bool:
    notebook = json.loads(path.read_text())
    if any(c.get("id", "").startswith("course-intro-") for c in notebook["cells"]):
        return False
    at = len(notebook["cells"]) - (1 if before_last else 0)
    notebook["cells"][at:at] = exercise_cells(chapter)
    path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")
    return True


def as_markdown(chapter: int) -> str:
    parts = []
    for cell in exercise_cells(chapter):
        source = "".join(cell["source"])
        tags = cell["metadata"].get("tags")
        parts.append(f"### {cell['cell_type']} cell (id {cell['id']}{', tags ' + str(tags) if tags else ''})"
                     f"\n\n````{'python' if cell['cell_type'] == 'code' else 'markdown'}\n{source}\n````\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--markdown", type=int, help="print chapter N's cells as markdown")
    parser.add_argument("--before-last", action="store_true",
                        help="insert before the last cell (e.g. a timing cell)")
    args = parser.parse_args(argv)
    if args.markdown:
        print(as_markdown(args.markdown))
        return 0
    for path in args.notebooks:
        chapter = int(path.name[:2])
        print(f"{path}: exercises {'added' if add_exercises(path, chapter, args.before_last) else 'present'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

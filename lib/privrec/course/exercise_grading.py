"""The grader behind the book's auto-checked exercises (see :mod:`privrec.course.exercises`).

A checker runs the reader's function on hidden cases, compares each answer with a reference
solution and, when they differ, compares them with the *typical wrong answers* of that exercise
(the article's inverted Laplace scale, dividing by the realised batch, noise on touched rows only,
…). The first wrong answer that the attempt reproduces on every hidden case names the mistake;
otherwise the first failing case is shown. Every message is deterministic (no timings, no
addresses), so the book's executed notebooks compare exactly under nbval.
"""

from __future__ import annotations

import copy
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Feedback", "grade", "as_array", "clip_each", "NOT_ATTEMPTED"]

NOT_ATTEMPTED = ("write your answer in place of `raise NotImplementedError` in the function above, "
                 "then run this cell again to check it (in Jupyter, Binder or Colab).")


@dataclass(frozen=True)
class Feedback:
    """The verdict on one attempt: one paragraph in a notebook, truthy when it passed.

    Attributes
    ----------
    exercise:
        The checker's name, e.g. ``"laplace_scale"``.
    passed:
        Whether the attempt agreed with the reference on every hidden case.
    hint:
        What went right or, for a failed attempt, the specific mistake (or the first failing case).
    attempted:
        ``False`` while the function still raises ``NotImplementedError``: the line is then a
        neutral prompt ("YOUR TURN"), not a verdict, because the reader has not tried yet.
    """

    exercise: str
    passed: bool
    hint: str
    attempted: bool = True

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        """One paragraph wrapped at 80 characters (the width of the book's text column)."""
        verdict = "PASS" if self.passed else "TRY AGAIN" if self.attempted else "YOUR TURN"
        return textwrap.fill(f"{verdict} {self.exercise}: {self.hint}", width=80,
                             subsequent_indent="  ", break_on_hyphens=False)


def as_array(value: object) -> np.ndarray:
    """An answer as a float NumPy array: scalars, lists, NumPy arrays, torch tensors, tuples of them."""
    if isinstance(value, tuple):
        return np.concatenate([as_array(v).ravel() for v in value])
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=float)


def clip_each(rows: object, clip_norm: float) -> np.ndarray:
    """Each row of ``rows`` scaled to norm at most ``clip_norm`` (NumPy twin of
    :func:`privrec.dp.primitives.clip_rows`, for the exercises' reference answers)."""
    rows = np.asarray(rows, dtype=float)
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return rows * np.minimum(1.0, clip_norm / np.maximum(norms, clip_norm))


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-6, atol=1e-9, equal_nan=True))


def _short(value: np.ndarray) -> str:
    if value.ndim == 0:
        return f"{float(value):.6g}"
    return np.array2string(np.round(value, 4), precision=4, threshold=8, edgeitems=2,
                           suppress_small=True)


def _describe(case: Mapping[str, object]) -> str:
    parts = []
    for name, value in case.items():
        if isinstance(value, list) and value and isinstance(value[0], Mapping):
            parts.append(f"{name}=<{len(value)} records>")
            continue
        shown = (f"array of shape {tuple(np.shape(value))}" if np.ndim(value) > 0 and np.size(value) > 6
                 else _short(as_array(value)) if np.ndim(value) > 0 else repr(value))
        parts.append(f"{name}={shown}")
    return ", ".join(parts)


def _run(function: Callable, case: Mapping[str, object]) -> object:
    return function(**copy.deepcopy(dict(case)))


def grade(name: str, attempt: Callable, *, reference: Callable,
          cases: Sequence[Mapping[str, object]],
          mistakes: Sequence[tuple[Callable, str]] = (),
          diagnose: Callable[[Mapping[str, object], np.ndarray, np.ndarray], str | None] | None = None,
          praise: str = "") -> Feedback:
    """Run ``attempt`` on every case and explain the first difference from ``reference``.

    Parameters
    ----------
    name:
        The exercise's name, shown in the message.
    attempt:
        The reader's function, called with each case's entries as keyword arguments.
    reference:
        The reference solution, same signature.
    cases:
        The hidden cases (dicts of keyword arguments); each call gets a deep copy.
    mistakes:
        ``(wrong_function, hint)`` pairs: when the attempt equals ``wrong_function`` on every case,
        ``hint`` is the message.
    diagnose:
        Called as ``diagnose(case, answer, expected)`` on the first failing case when no listed
        mistake matched; a string it returns is the message.
    praise:
        Appended to the success message (what the reader has just shown).

    Returns
    -------
    Feedback
        ``passed`` and a one-line ``hint``; never raises for a wrong attempt.
    """
    if not callable(attempt):
        return Feedback(name, False, f"pass your function itself (got {type(attempt).__name__}).")
    answers = []
    for case in cases:
        try:
            answers.append(as_array(_run(attempt, case)))
        except NotImplementedError:
            return Feedback(name, False, NOT_ATTEMPTED, attempted=False)
        except Exception as error:  # noqa: BLE001 - any failure of the reader's code is feedback
            return Feedback(name, False, f"your function raised {type(error).__name__} ({error}) "
                                         f"on the hidden case {_describe(case)}.")
    expected = [as_array(_run(reference, case)) for case in cases]
    wrong = [k for k, (a, e) in enumerate(zip(answers, expected, strict=False)) if not _same(a, e)]
    if not wrong:
        return Feedback(name, True, f"correct on all {len(cases)} hidden cases. {praise}".strip())
    for mistake, hint in mistakes:
        if all(_same(a, as_array(_run(mistake, case))) for a, case in zip(answers, cases, strict=False)):
            return Feedback(name, False, hint)
    first = wrong[0]
    if diagnose is not None:
        hint = diagnose(cases[first], answers[first], expected[first])
        if hint:
            return Feedback(name, False, hint)
    return Feedback(name, False, f"wrong on the hidden case {_describe(cases[first])}: expected "
                                 f"{_short(expected[first])}, got {_short(answers[first])}.")

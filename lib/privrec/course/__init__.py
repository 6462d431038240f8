"""privrec.course -- the book around the library: chapter helpers, figures, exercises, experiments.

Owns
    :mod:`~privrec.course.book` (``show_source``, seeding, the code-keyed result cache),
    :mod:`~privrec.course.figures` (figures drawn for the text column, legible on a phone),
    :mod:`~privrec.course.explorer` and :mod:`~privrec.course.static_widget` (figures that respond
    without a kernel), :mod:`~privrec.course.benchmark_report` (chapter 10's tables from
    ``benchmarks/results.json``), :mod:`~privrec.course.exercise_grading` with the checkers of
    :mod:`~privrec.course.exercises` and its topic modules (``exercises_federated``,
    ``exercises_selection``, ``exercises_lora``, ``exercises_transformer``), and
    :mod:`privrec.course.experiments` (the experiment harnesses the chapters call: grids over ε,
    tuning searches on validation splits, cached runs, paired multi-seed comparisons).

May import
    every other subpackage; nothing imports it. This is the top layer.
"""

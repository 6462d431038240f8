"""The arithmetic a process computes floats with, as a key for disk caches.

The same float32 program gives results that differ in the last bits under another torch version,
another CPU kernel set (AVX2/AVX-512 against the baseline the Makefile pins with
``ATEN_CPU_CAPABILITY=default``), another MKL or OpenBLAS code path, or another thread count. A
disk cache keyed on :func:`arithmetic_tag` never hands one process another's floats: a chapter
executed from a warm cache prints what it prints from an empty one.
"""

from __future__ import annotations

import os

import torch

__all__ = ["ARITHMETIC_VARIABLES", "arithmetic_tag"]

#: Environment variables that select a kernel library's code path or its threads (Makefile).
ARITHMETIC_VARIABLES = ("OMP_NUM_THREADS", "ATEN_CPU_CAPABILITY", "MKL_CBWR",
                        "NPY_DISABLE_CPU_FEATURES", "OPENBLAS_CORETYPE")


def arithmetic_tag() -> str:
    """One line naming this process's arithmetic: torch's version and CPU kernels, its threads,
    and the variables of :data:`ARITHMETIC_VARIABLES`.

    >>> arithmetic_tag().startswith("torch")
    True
    """
    variables = ",".join(f"{name}={os.environ.get(name, '')}" for name in ARITHMETIC_VARIABLES)
    return (f"torch{torch.__version__}-{torch.backends.cpu.get_cpu_capability()}"
            f"-threads{torch.get_num_threads()}-{variables}")

"""Auto-checked exercises of chapter 7 (LoRA fine-tuning under DP, central and federated).

``from privrec.course import exercises_lora as check``; each checker returns a
:class:`~privrec.course.exercise_grading.Feedback` and never raises.
"""

from __future__ import annotations

import numpy as np

from .exercise_grading import Feedback, grade

__all__ = ["SOLUTIONS", "federated_lora_product", "lora_upload_floats"]


def _factors(seed: int, clients: int):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(2, 6)), rng.normal(size=(5, 2))
    return dict(a=a, b=b, delta_a=rng.normal(size=(clients, 2, 6)) * 0.3,
                delta_b=rng.normal(size=(clients, 5, 2)) * 0.3)


def federated_lora_product_solution(a, b, delta_a, delta_b):
    """The weight change :math:`\\bar B\\bar A - BA` of plain federated LoRA:
    the server averages the clients' factor changes separately
    (Sun et al. 2024)."""
    a_new = np.asarray(a) + np.asarray(delta_a).mean(0)
    b_new = np.asarray(b) + np.asarray(delta_b).mean(0)
    return b_new @ a_new - np.asarray(b) @ np.asarray(a)


def federated_lora_product(attempt) -> Feedback:
    """Check ``attempt(a, b, delta_a, delta_b)``: the change of :math:`BA` after the server averages
    ``delta_a`` ``[K, r, d_in]`` and ``delta_b`` ``[K, d_out, r]`` factor by factor."""
    cases = [_factors(s, k) for s, k in ((1, 3), (2, 5), (3, 8))]

    def average_of_products(a, b, delta_a, delta_b):
        products = np.einsum("kor,kri->koi", b + delta_b, a + delta_a)
        return products.mean(0) - b @ a

    return grade("federated_lora_product", attempt, reference=federated_lora_product_solution,
                 cases=cases, mistakes=[
                     (average_of_products,
                      "that is the average of the clients' products, what the server *should* "
                      "apply; averaging A and B separately gives (B + mean ΔB)(A + mean ΔA) - BA."),
                     (lambda a, b, delta_a, delta_b: np.asarray(delta_b).mean(0)
                      @ np.asarray(delta_a).mean(0),
                      "the cross terms are missing: (B + ΔB)(A + ΔA) - BA = ΔB·A + B·ΔA + ΔB·ΔA."),
                 ], praise="The gap to the average of the products is the 'wrong product'; with A "
                           "frozen (FFA-LoRA) ΔA = 0 and the two coincide.")


def lora_upload_floats_solution(d_in, d_out, rank, ffa):
    """Floats one client uploads for one LoRA-adapted matrix:
    :math:`r(d_{in}+d_{out})`, or only :math:`B`'s :math:`r\\,d_{out}`
    with FFA-LoRA."""
    return rank * d_out if ffa else rank * (d_in + d_out)


def lora_upload_floats(attempt) -> Feedback:
    """Check ``attempt(d_in, d_out, rank, ffa)``: floats uploaded per adapted matrix."""
    cases = [dict(d_in=1536, d_out=384, rank=8, ffa=False), dict(d_in=1536, d_out=384, rank=8,
                                                                  ffa=True),
             dict(d_in=4096, d_out=4096, rank=16, ffa=True)]
    return grade("lora_upload_floats", attempt, reference=lora_upload_floats_solution, cases=cases,
                 mistakes=[(lambda d_in, d_out, rank, ffa: rank * (d_in + d_out),
                            "with FFA-LoRA the client does not train A, so it uploads only B."),
                           (lambda d_in, d_out, rank, ffa: d_in * d_out,
                            "that is the full matrix; LoRA uploads its two thin factors.")],
                 praise="Fewer floats per round: less to send, and less to noise.")


SOLUTIONS = {"federated_lora_product": federated_lora_product_solution,
             "lora_upload_floats": lora_upload_floats_solution}

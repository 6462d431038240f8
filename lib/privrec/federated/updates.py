"""What clients upload in a federated round.

A model trained by the federated engine (:mod:`privrec.federated.engine`; its contract is
:class:`privrec.federated.protocols.FederatedModel`) splits its parameters in two:

* **shared** parameters, owned by the server and broadcast every round (item tables, towers);
* **user** parameters, owned by the clients, which never leave them (user factors and biases).

A cohort's upload is a :class:`ClientUpdates`: each client's change of the shared parameters,
stored *row-sparse* for tables where a client touches only the rows it rated (``rows``) and dense
for small parameters every client changes (``dense``). Strategies (:mod:`privrec.federated.strategies`) turn
it into one change of the shared parameters; the DP wrapper clips each client's whole change
(:meth:`ClientUpdates.norms` covers every part) and adds noise to every coordinate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core.checks import instance

__all__ = ["RowUpdates", "ClientUpdates", "as_float64"]


def _via_numpy(values: torch.Tensor) -> bool:
    return (values.dtype == torch.float32 and values.device.type == "cpu"
            and values.is_contiguous() and not values.requires_grad)


def as_float64(values: torch.Tensor) -> torch.Tensor:
    """``values.double()``, the same numbers (the conversion is exact); a contiguous float32 CPU
    tensor goes through NumPy, whose conversion is vectorised where torch's baseline kernels
    (``ATEN_CPU_CAPABILITY=default``) convert one element at a time."""
    return torch.from_numpy(values.numpy().astype(np.float64)) if _via_numpy(values) \
        else values.double()


def _squares64(values: torch.Tensor) -> torch.Tensor:
    """``values.double().square()``: exact float64 products (IEEE, so NumPy's are the same
    numbers as torch's; NumPy's are vectorised for a contiguous float32 CPU tensor)."""
    if not _via_numpy(values):
        return values.double().square()
    flat = values.numpy().astype(np.float64)
    return torch.from_numpy(np.multiply(flat, flat, out=flat))


@dataclass
class RowUpdates:
    """Changes of some rows of one shared table, for several clients.

    ``client_pos[p]`` is the position (in :attr:`ClientUpdates.clients`) of the client that sent
    pair ``p``, ``row[p]`` the table row, ``values[p]`` the change of that row and ``examples[p]``
    how many of the client's examples touch that row (FedAvg's per-row weight).
    """

    client_pos: torch.Tensor
    row: torch.Tensor
    values: torch.Tensor
    examples: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("client_pos", "row", "values", "examples"):
            tensor = instance(name, getattr(self, name), torch.Tensor)
            if tensor.dim() == 0 or len(tensor) != len(self.row):
                raise ValueError(f"{name} must have one entry per pair ({len(self.row)}), got "
                                 f"shape {tuple(tensor.shape)}")


@dataclass
class ClientUpdates:
    """One round's uploads: for each client of the cohort, its change of every shared parameter."""

    clients: torch.Tensor                  # [m] client ids, sorted
    examples: torch.Tensor                 # [m] local example counts (float)
    rows: dict[str, RowUpdates]            # row-sparse shared tables
    dense: dict[str, torch.Tensor]         # [m, *shape] changes of dense shared parameters

    def __post_init__(self) -> None:
        m = len(instance("clients", self.clients, torch.Tensor))
        if instance("examples", self.examples, torch.Tensor).shape != (m,):
            raise ValueError(f"examples must have one entry per client ({m})")
        for name, part in instance("rows", self.rows, dict).items():
            instance(f"rows[{name!r}]", part, RowUpdates)
        for name, value in instance("dense", self.dense, dict).items():
            if instance(f"dense[{name!r}]", value, torch.Tensor).dim() == 0 or len(value) != m:
                raise ValueError(f"dense[{name!r}] must have one row per client ({m})")

    def __len__(self) -> int:
        return len(self.clients)

    def norms(self) -> torch.Tensor:
        """``[m]`` L2 norm of each client's whole change (all tables and dense parts)."""
        squares = torch.zeros(len(self.clients), dtype=torch.float64)
        for part in self.rows.values():
            flat = part.values.reshape(len(part.row), -1)
            squares.index_add_(0, part.client_pos, _squares64(flat).sum(1))
        for value in self.dense.values():
            squares += _squares64(value.reshape(len(self.clients), -1)).sum(1)
        return squares.sqrt().float()

    def scaled(self, factor: torch.Tensor) -> ClientUpdates:
        """Each client's change multiplied by ``factor[client position]`` (e.g. clip factors)."""
        if instance("factor", factor, torch.Tensor).shape != (len(self),):
            raise ValueError(f"factor must have one entry per client ({len(self)})")
        rows = {name: RowUpdates(p.client_pos, p.row,
                                 p.values * factor[p.client_pos].reshape(-1, *[1] * (p.values.dim() - 1)),
                                 p.examples) for name, p in self.rows.items()}
        dense = {name: v * factor.reshape(-1, *[1] * (v.dim() - 1)) for name, v in self.dense.items()}
        return ClientUpdates(self.clients, self.examples, rows, dense)

    @staticmethod
    def concat(parts: list[ClientUpdates]) -> ClientUpdates | None:
        """One upload of the cohorts ``parts`` (disjoint clients, same keys); ``None`` if empty.

        Row tables that shared one ``client_pos``/``row`` tensor in every part share it again.
        """
        for part in instance("parts", parts, (list, tuple)):
            instance("parts[...]", part, ClientUpdates)
        if not parts:
            return None
        offsets = torch.tensor([0] + [len(p) for p in parts[:-1]]).cumsum(0)
        first, rows, shared_index = parts[0], {}, {}
        for name, head in first.rows.items():
            key = id(head.row)
            if key not in shared_index:
                positions = [p.rows[name].client_pos + o for p, o in zip(parts, offsets, strict=True)]
                shared_index[key] = (
                    torch.cat(positions),
                    torch.cat([p.rows[name].row for p in parts]),
                    torch.cat([p.rows[name].examples for p in parts]))
            pos, row, examples = shared_index[key]
            rows[name] = RowUpdates(pos, row, torch.cat([p.rows[name].values for p in parts]),
                                    examples)
        dense = {name: torch.cat([p.dense[name] for p in parts]) for name in first.dense}
        return ClientUpdates(torch.cat([p.clients for p in parts]),
                             torch.cat([p.examples for p in parts]), rows, dense)

    def summed(self, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
        """The sum over clients of every change, as dense tensors of the shared shapes."""
        missing = sorted((set(self.rows) | set(self.dense)) - set(instance("shapes", shapes, dict)))
        if missing:
            raise ValueError(f"shapes lacks the uploaded parameters {missing}")
        out = {}
        for name, part in self.rows.items():
            out[name] = torch.zeros(shapes[name]).index_add_(0, part.row, part.values)
        for name, value in self.dense.items():
            out[name] = value.sum(0).reshape(shapes[name])
        return out


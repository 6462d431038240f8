"""Flower's SecAgg+ carrying DP-FedAvg's sum of clipped updates: the server sees only the sum.

DP-FedAvg (:class:`privrec.federated.dpfedavg.DPFedAvg`) needs from a round only the *sum* of the
clients' clipped updates; its noise, fixed denominator :math:`qN` and ledger entry follow from
that sum. With SecAgg+ (Bell et al. 2020) the clients mask their updates so that the ServerApp can
unmask only the total:

* **client** (:func:`clipped_upload`): the ClientApp trains, then clips its whole update with
  the library's :func:`~privrec.dp.primitives.clip_factors` and
  :func:`~privrec.federated.strategies.add_weighted` (the calls DP-FedAvg's server makes in the
  simulator) and sends it dense (every coordinate;
  a sparse upload would reveal which items the silo rated) through Flower's ``secaggplus_mod``,
  which quantises it to ``secagg-bits`` bits on :math:`[-C, C]` (stochastic rounding), masks it
  and answers the four stages of the protocol;
* **server** (:func:`secure_sum`): Flower's ``SecAggPlusWorkflow`` runs the stages and hands back
  the mean of the realised uploads, from which the ServerApp takes the sum.

Quantisation. One quantisation step is :math:`\\Delta = 2C/2^b`; stochastic rounding moves each
coordinate by less than :math:`\\Delta`, so a clipped update of :math:`d` coordinates can grow by
less than :math:`\\sqrt d\\,\\Delta` in :math:`\\ell_2`. The client therefore clips to
:math:`C - \\sqrt d\\,\\Delta` (:class:`Quantisation`), so that what enters the sum has norm at
most :math:`C`: the DP sensitivity, hence the ledger, is the one the simulator uses. The price is
a relative shrink of :math:`\\sqrt d\\,\\Delta/C` on clipped updates and a random error below
:math:`k\\Delta` per coordinate of a sum of :math:`k` uploads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

from privrec.dp.primitives import clip_factors
from privrec.federated.strategies import add_weighted
from privrec.federated.updates import ClientUpdates
from privrec_flower.task import RunConfig
from privrec_flower.transport import RecordingGrid


@dataclass(frozen=True)
class Quantisation:
    """SecAgg+'s fixed-point grid for updates clipped to ``clip_norm`` (see the module doc)."""

    clip_norm: float
    bits: int
    n_floats: int

    @classmethod
    def of(cls, cfg: RunConfig, n_floats: int) -> Quantisation:
        return cls(float(cfg["clip-norm"]), int(cfg["secagg-bits"]), int(n_floats))

    @property
    def levels(self) -> int:
        """SecAgg+'s ``quantization_range``, :math:`2^b`."""
        return 1 << self.bits

    @property
    def step(self) -> float:
        """:math:`\\Delta = 2C/2^b`, one quantisation step."""
        return 2 * self.clip_norm / self.levels

    @property
    def margin(self) -> float:
        """:math:`\\sqrt d\\,\\Delta`, the most stochastic rounding can add to an update's norm."""
        return math.sqrt(self.n_floats) * self.step

    @property
    def client_clip(self) -> float:
        """The clients' clip bound :math:`C - \\sqrt d\\,\\Delta`."""
        if self.margin >= self.clip_norm:
            raise ValueError(f"secagg-bits={self.bits} is too coarse for clip-norm="
                             f"{self.clip_norm} and {self.n_floats} coordinates")
        return self.clip_norm - self.margin


# -- client ------------------------------------------------------------------------------------

def secagg_when_asked(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod`` for the SecAgg+ workflow's messages, a no-op for the rest."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_secagg_train(content: RecordDict) -> bool:
    """Whether a ``train`` message is the SecAgg+ workflow's (legacy ``FitIns`` layout)."""
    return "fitins.parameters" in content.array_records


def broadcast_of(content: RecordDict) -> dict[str, torch.Tensor]:
    """The shared parameters a SecAgg+ ``train`` message carries, by name."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    names = str(fitins.config["names"]).split(",")
    arrays = parameters_to_ndarrays(fitins.parameters)
    return {k: torch.from_numpy(np.array(a)) for k, a in zip(names, arrays, strict=True)}


def clipped_upload(up: ClientUpdates, shapes: dict[str, torch.Size], q: Quantisation,
                   metrics: dict) -> RecordDict:
    """This client's update clipped to :attr:`Quantisation.client_clip`, dense, as the legacy
    ``FitRes`` that ``secaggplus_mod`` quantises and masks (weight 1: a uniform sum).

    Every tensor goes flat (1-d): flwr 1.42's SecAgg+ unmasking turns a 0-d array into a numpy
    scalar and then skips its offset and scaling (``vec += offset`` on an immutable scalar), so
    the global bias would come back as :math:`\\sum_k x_k + (k-1)C`, silently.
    """
    dense = {name: torch.zeros(shape) for name, shape in shapes.items()}
    add_weighted(dense, up, clip_factors(up.norms(), clip_norm=q.client_clip))  # as DPFedAvg does
    arrays = [dense[k].numpy().astype(np.float32).reshape(-1) for k in shapes]
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 1, metrics)
    return compat.fitres_to_recorddict(fitres, keep_input=False)


# -- server ------------------------------------------------------------------------------------

class _FixedCohort(LegacyStrategy):
    """The legacy strategy SecAgg+ asks: "train these nodes" and "here is their mean"."""

    def __init__(self, grid, nodes: list[int], fitins: FitIns) -> None:
        self.grid, self.nodes, self.fitins = grid, nodes, fitins
        self.mean: list[np.ndarray] | None = None
        self.realised: list[int] = []

    def configure_fit(self, server_round, parameters, client_manager):
        return [(GridClientProxy(n, self.grid, 0), self.fitins) for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        self.realised = sorted(proxy.node_id for proxy, _ in results)
        self.mean = parameters_to_ndarrays(results[0][1].parameters) if results else None
        return (results[0][1].parameters if results else None), {}

    def initialize_parameters(self, client_manager) -> Parameters | None:
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def secure_sum(grid, context: Context, cfg: RunConfig, broadcast: dict[str, torch.Tensor],
               nodes: list[int], server_round: int, *, after_stage=None
               ) -> tuple[dict[str, torch.Tensor], list[int], list[dict]]:
    """Run SecAgg+ over ``nodes``: ``(sum of their uploads, realised nodes, stage records)``.

    Raises ``RuntimeError`` naming the stage when fewer SuperNodes than the reconstruction
    threshold remain (the masks cannot be removed; the round releases nothing).
    """
    names = list(broadcast)
    q = Quantisation.of(cfg, sum(v.numel() for v in broadcast.values()))
    params = ndarrays_to_parameters([broadcast[k].numpy() for k in names])
    cohort = _FixedCohort(grid, nodes, FitIns(params, {"server-round": server_round,
                                                       "names": ",".join(names)}))
    legacy = LegacyContext(context, strategy=cohort)
    legacy.state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: server_round}),
                               MAIN_PARAMS_RECORD: compat.parameters_to_arrayrecord(params, True)})
    recording = RecordingGrid(grid, poll=float(cfg["poll-interval"]),
                              timeout=float(cfg["round-timeout"]), after_stage=after_stage)
    SecAggPlusWorkflow(int(cfg["secagg-shares"]), int(cfg["secagg-threshold"]), max_weight=1.0,
                       clipping_range=q.clip_norm, quantization_range=q.levels,
                       timeout=float(cfg["round-timeout"]))(recording, legacy)
    if cohort.mean is None:
        last = recording.stages[-1] if recording.stages else {"stage": "setup", "answered": 0,
                                                              "sent": len(nodes)}
        raise RuntimeError(
            f"SecAgg+ failed in round {server_round} at stage '{last['stage']}': "
            f"{last['answered']} of {last['sent']} SuperNodes answered, fewer than the "
            f"reconstruction threshold {cfg['secagg-threshold']}: the masked sum cannot be "
            "unmasked, so this round releases nothing")
    k = len(cohort.realised)
    total = {name: torch.as_tensor(np.asarray(a, dtype=np.float64) * k).to(broadcast[name].dtype)
             .reshape(broadcast[name].shape) for name, a in zip(names, cohort.mean, strict=True)}
    return total, cohort.realised, recording.stages


def as_equal_shares(total: dict[str, torch.Tensor], clients: list[int]) -> ClientUpdates:
    """The secure sum as ``len(clients)`` equal dense uploads (each the mean).

    Every share has norm at most :math:`C` (a mean of vectors of norm at most :math:`C`), so
    DP-FedAvg's per-client clipping leaves them unchanged and its sum is the secure sum: the
    ServerApp runs the simulator's round function without ever holding one client's update.
    """
    k = len(clients)
    dense = {name: (value / k).unsqueeze(0).expand(k, *value.shape).clone()
             for name, value in total.items()}
    return ClientUpdates(torch.as_tensor(clients, dtype=torch.long), torch.ones(k), {}, dense)

"""Secure aggregation on Flower (run config `secagg = true`): SecAgg+ (Bell et al. 2020, "Secure
single-server aggregation with (poly)logarithmic overhead") through Flower's own protocol,
`flwr.server.workflow.SecAggPlusWorkflow` on the server and `flwr.client.mod.secaggplus_mod` at
each site, so the server learns only the sum of the clients' updates.

Flower 1.42 offers SecAgg+ on its legacy workflow path only: the workflow asks a legacy
`flwr.server.strategy.Strategy` whom to train (configure_fit) and hands it the unmasked aggregate
(aggregate_fit), and the mod reads the ClientApp's reply as a legacy FitRes. This module is the
adapter: fedxray's sampling, train messages and checks (fedxray.flower.strategy) go in, the
securely summed update comes out to the run's fedxray strategy. The rest of a run (evaluation,
history, checkpoints, resume) is the ordinary Flower run's.

What each client sends (fedxray.flower.client_app): its update (exchanged parameters minus the
global ones, in sorted key order), with a weight: its number of examples (FedAvg's weights; the
workflow pre-scales by weight / max_weight and divides by the securely summed weights), or 1
under client-level DP (clipped updates, unweighted; the server adds the noise to the sum). The
protocol quantises each weighted update coordinate to QUANTIZATION_RANGE levels over
[-clipping_range, clipping_range] with stochastic rounding, and masks it modulo 2^32. A client
refuses to send an update with a coordinate beyond the range (it would be clipped silently);
quantization_bound states what the quantisation costs.

What the server still learns in the clear: which clients completed the round, their example
counts and, without DP, their training losses (FitRes metrics, checked as in a plain round). What
it can no longer do: check or clip an individual update (MAX_UPDATE_FACTOR, robust means); under
client-level DP it relies on each site's own clipping, as Flower's DP + SecAgg+ example does.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

log = logging.getLogger(__name__)

# Flower's SecAgg+ defaults: 2^22 quantisation levels, masks modulo 2^32 (so up to 1024 clients
# sum without overflow).
QUANTIZATION_RANGE = 2**22
MODULUS_RANGE = 2**32
# Without client-level DP the updates have no set bound; Flower's default range holds any update
# of layer4 + fc that one round of training produces at fedxray's learning rates (a coordinate
# moves by at most about lr per step).
DEFAULT_CLIPPING_RANGE = 8.0
# Shares: every sampled client is every other's neighbour (num_shares 1.0: the full SecAgg graph,
# fine for tens of hospitals); a client's masks can be rebuilt from two thirds of them, so the round
# survives a third of the clients dropping out after sending their masked update, and fewer than
# two thirds of the clients colluding with the server learn nothing about the others.
NUM_SHARES = 1.0
RECONSTRUCTION_THRESHOLD = 2 / 3


def clipping_range(config) -> float:
    """The quantiser's range [-c, c] for each update coordinate: dp_clip_norm under client-level
    DP (an update clipped to L2 norm C has no coordinate beyond C), else DEFAULT_CLIPPING_RANGE."""
    if config.dp == "client" and math.isfinite(config.dp_clip_norm):
        return float(config.dp_clip_norm)
    return DEFAULT_CLIPPING_RANGE


def client_weight(config, num_examples: int) -> int:
    """The weight a client hands the protocol: its example count, or 1 under client-level DP."""
    return 1 if config.dp == "client" else int(num_examples)


def quantization_bound(weights: Sequence[int], max_weight: float, clip: float,
                       quantization_range: int = QUANTIZATION_RANGE) -> float:
    """An upper bound on |securely aggregated mean - exact weighted mean| for each coordinate, one
    round, n = len(weights) clients whose update coordinates lie in [-clip, clip].

    Client i scales by w_i = round(n_i / max_weight * Q) / Q and stochastically rounds
    (w_i x_i + c) Q / (2c) to an integer (error < 1); the server sums, maps back and divides by
    W = sum w_i. The rounding adds less than n * 2c / Q to the weighted sum; the weights' own
    rounding (|w_i - n_i / max_weight| <= 1 / (2Q)) moves the mean by less than
    max|x| * n / (Q W) <= c n / (Q W). Together: < 3 c n / (Q W)."""
    n = len(weights)
    q = quantization_range
    w = sum(round(k / max_weight * q) for k in weights) / q
    if n == 0 or w <= 0:
        raise ValueError(f"no weights to bound, got {list(weights)}")
    return 3 * clip * n / (q * w)


class _Proxy(ClientProxy):
    """The legacy workflow's handle on a node: it only reads node_id."""

    def get_properties(self, ins, timeout, group_id):
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


class _Bridge(LegacyStrategy):
    """The legacy Strategy the workflow drives: it trains the nodes it is told to, and keeps the
    results it is handed (FitRes with the clients' clear metrics and, in place of their parameters,
    the unmasked weighted mean of their updates) for fedxray to check and aggregate."""

    def __init__(self):
        self.nodes: list[int] = []
        self.results: list[tuple[ClientProxy, FitRes]] = []
        self.failures: list = []
        self.called = False

    def configure_fit(self, server_round, parameters, client_manager):
        return [(_node_proxy(n), FitIns(Parameters([], ""), {})) for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        self.results, self.failures, self.called = list(results), list(failures), True
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def _node_proxy(node_id: int) -> _Proxy:
    proxy = _Proxy(str(node_id))
    proxy.node_id = node_id
    return proxy


class _Workflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, sending fedxray's own train message (global state, round, trunk
    digest) to each node in place of a legacy FitIns."""

    def __init__(self, contents: dict[int, RecordDict], **kwargs):
        super().__init__(**kwargs)
        self.contents = contents

    def setup_stage(self, grid, context, state) -> bool:
        ok = super().setup_stage(grid, context, state)
        for node in state.nid_to_fitins:
            state.nid_to_fitins[node] = self.contents[node]
        return ok


class CountingGrid:
    """A Grid that counts the bytes of the messages sent and received through send_and_receive
    (the four stages of SecAgg+: keys, shares, masked vectors, unmasking)."""

    def __init__(self, grid: Grid):
        self._grid = grid
        self.sent = self.received = 0

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent += sum(content_bytes(m.content) for m in messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.received += sum(content_bytes(m.content) for m in replies if not m.has_error())
        return replies


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message's records: arrays as Flower counts them; config and metric values by
    their own size (bytes and text by length, numbers 8 each; flwr 1.42's ConfigRecord.count_bytes
    fails on an empty list, which the unmask stage sends)."""
    total = 0
    for record in content.values():
        if hasattr(record, "values") and not hasattr(record, "to_torch_state_dict"):
            for key, value in record.items():
                total += len(key)
                for item in value if isinstance(value, list) else [value]:
                    total += len(item) if isinstance(item, (bytes, str)) else 8
        else:
            total += record.count_bytes()
    return total


def secure_sum_round(grid: Grid, context: Context, server_round: int, messages: Sequence[Message],
                     *, max_weight: float, clip: float, timeout: float) -> tuple[_Bridge, CountingGrid]:
    """Run one SecAgg+ round over the nodes of `messages` (fedxray's train messages, one per node).
    Returns the bridge holding what the workflow handed over (bridge.called is False when the
    protocol halted: too few nodes stayed) and the byte counts."""
    contents = {m.metadata.dst_node_id: m.content for m in messages}
    bridge = _Bridge()
    bridge.nodes = sorted(contents)
    legacy = LegacyContext(context, strategy=bridge)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: int(server_round)})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = _Workflow(contents, num_shares=NUM_SHARES, reconstruction_threshold=RECONSTRUCTION_THRESHOLD,
                         max_weight=float(max_weight), clipping_range=float(clip),
                         quantization_range=QUANTIZATION_RANGE, modulus_range=MODULUS_RANGE, timeout=timeout)
    counting = CountingGrid(grid)
    workflow(counting, legacy)
    return bridge, counting


def fit_reply(update_arrays: list[np.ndarray], weight: int, metrics: dict) -> RecordDict:
    """A ClientApp's reply in the legacy FitRes form secaggplus_mod reads: the update arrays (what
    the mod quantises and masks, then removes), the weight, and the clear metrics."""
    import flwr.compat.common.recorddict_compat as compat
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(update_arrays), int(weight), dict(metrics))
    return compat.fitres_to_recorddict(fitres, keep_input=True)


def aggregated_arrays(fitres: FitRes) -> list[np.ndarray]:
    """The unmasked weighted mean the workflow put in every FitRes."""
    return parameters_to_ndarrays(fitres.parameters)

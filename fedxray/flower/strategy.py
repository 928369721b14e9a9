"""Flower's FedAvg with fedxray's client sampling and aggregation, so a Flower run computes what
the in-process FederatedRun computes."""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Optional, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from ..client import ClientUpdate
from ..config import Config
from ..federated import sample_clients
from .records import CLIENT_ID, METRICS, NUM_EXAMPLES, SERVER_ROUND, TRAIN_LOSS, aggregate, to_record

log = logging.getLogger(__name__)

# Called after each round's aggregation with (round, client ids, their updates).
OnTrain = Callable[[int, list[int], list[ClientUpdate]], None]


class FedXrayAvg(FedAvg):
    """FedAvg whose aggregation is fedxray.fedavg and whose sampling is fedxray's.

    - Sampling: each round trains the clients fedxray.federated.sample_clients picks for
      (num_clients, fraction_fit, seed, round), by fedxray client id. Nodes report their client
      id once (a query message; again if the set of connected nodes changes).
    - Aggregation: fedxray.fedavg over the replies in client-id order: float64 sums, example
      weights, integer buffers rounded (Flower's own FedAvg sums in float32 in arrival order and
      turns num_batches_tracked into a float64 array).
    - A failed client fails the round (no silent aggregation of the others), and there is no
      federated evaluation: the server evaluates the global model centrally.
    """

    def __init__(self, config: Config, keys: Sequence[str], on_train: Optional[OnTrain] = None,
                 timeout: float = 3600.0):
        super().__init__(fraction_train=config.fraction_fit, fraction_evaluate=0.0, min_train_nodes=1,
                         min_available_nodes=config.num_clients, weighted_by_key=NUM_EXAMPLES)
        self.config = config
        self.keys = list(keys)
        self.on_train = on_train
        self.timeout = timeout
        self.node_of: dict[int, int] = {}           # client id -> node id
        self.client_examples: dict[int, int] = {}   # client id -> examples it holds
        self.chosen: list[int] = []

    def connect(self, grid: Grid) -> dict[int, int]:
        """Wait for num_clients nodes, ask each its client id, and check ids are 0..num_clients-1."""
        k = self.config.num_clients
        nodes = sorted(grid.get_node_ids())
        while len(nodes) < k:
            log.info("waiting for hospitals: %d of %d SuperNodes connected", len(nodes), k)
            time.sleep(1.0)
            nodes = sorted(grid.get_node_ids())
        if set(nodes) == set(self.node_of.values()):
            return self.node_of
        queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        ids: dict[int, list[int]] = {}
        examples: dict[int, int] = {}
        for reply in grid.send_and_receive(queries, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                raise RuntimeError(f"SuperNode {node} could not say which client it is: {reply.error.reason}")
            metrics = reply.content[METRICS]
            cid = int(metrics[CLIENT_ID])
            ids.setdefault(cid, []).append(node)
            examples[cid] = int(metrics[NUM_EXAMPLES])
        twice = {c: n for c, n in ids.items() if len(n) > 1}
        missing = sorted(set(range(k)) - set(ids))
        unknown = sorted(set(ids) - set(range(k)))
        if twice or missing or unknown or len(ids) != len(nodes):
            raise ValueError(f"the connected SuperNodes do not hold clients 0..{k - 1} once each "
                             f"(num_clients={k}): client ids used twice {twice}, missing {missing}, "
                             f"unexpected {unknown}, {len(nodes) - sum(map(len, ids.values()))} "
                             f"node(s) did not answer. Fix each SuperNode's --node-config client-id.")
        self.node_of = {c: n[0] for c, n in sorted(ids.items())}
        self.client_examples = dict(sorted(examples.items()))
        log.info("clients on nodes: %s; examples: %s", self.node_of, self.client_examples)
        return self.node_of

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        c = self.config
        node_of = self.connect(grid)
        self.chosen = sample_clients(c.num_clients, c.fraction_fit, c.seed, server_round)
        log.info("round %d: training clients %s", server_round, self.chosen)
        config[SERVER_ROUND] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, [node_of[k] for k in self.chosen], MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        valid, errors = self._check_and_log_replies(list(replies), is_train=True)
        if errors:
            reasons = "; ".join(f"node {m.metadata.src_node_id}: {m.error.reason}" for m in errors)
            raise RuntimeError(f"round {server_round}: {len(errors)} client(s) failed, the round is not "
                               f"aggregated (the last checkpoint is round {server_round - 1}): {reasons}")
        got = sorted(int(m.content[METRICS][CLIENT_ID]) for m in valid)
        if got != self.chosen:
            raise RuntimeError(f"round {server_round}: replies from clients {got}, but clients {self.chosen} "
                               f"were asked to train (no reply within the timeout?)")
        state, pairs = aggregate([m.content for m in valid], self.keys)
        ids, updates = [k for k, _ in pairs], [u for _, u in pairs]
        if self.on_train is not None:
            self.on_train(server_round, ids, updates)
        n = sum(u.num_examples for u in updates)
        loss = sum(u.train_loss * u.num_examples for u in updates) / n
        return to_record(state), MetricRecord({TRAIN_LOSS: loss})

"""The Flower Strategy of fedxray: fedxray's client sampling, checks and fault handling around a
fedxray Strategy object (fedxray.strategies, the one the in-process run uses), which decides what
each client is sent besides the global state and how the replies combine. A Flower run thus
computes what the in-process FederatedRun computes, for every strategy, and a round survives the
hospitals that fail as far as the run's FaultPolicy allows."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from ..client import ClientUpdate
from ..config import Config
from ..dpsgd import PatientDPSpec, spec_for
from ..federated import planned_rounds, round_clients
from ..history import mean_train_loss, message_bytes
from ..objectives import pos_weight_from_counts
from ..strategies import Strategy
from .records import (IMAGE_LIST_DIGEST, POS_WEIGHT, SERVER_ROUND, TRAIN_LOSS, MessageError, QueryAnswer,
                      check_query_reply, check_reply_metrics, check_train_reply, to_record, to_state, train_message)
from .runconfig import FaultPolicy

log = logging.getLogger(__name__)

# Why a sampled client is left out of a round; the history records it as metric "dropped_<why>".
DROP_REASONS = {
    "offline": "its SuperNode was not connected when the round started (nothing was sent); restart it: "
               "it rejoins at the next round",
    "lost": "its SuperNode stopped sending heartbeats during the round; restart it: it rejoins at the next round",
    "no_reply": "the hospital is down or too slow: check its SuperNode, or raise round-timeout",
    "failed": "its ClientApp raised an error; see that site's SuperNode log",
    "refused": "its reply failed the server's checks",
    "incomplete": "it did not stay through the four stages of the SecAgg+ round (see its SuperNode log); its "
                  "update is not in the sum",
    "alone": "it was the only client sampled under client-level DP with secure aggregation: a secure sum of one "
             "update is that update, so it was not asked to train and the round added noise only",
}
POLL_S = 0.5   # how often the server asks the SuperLink for replies (Flower's send_and_receive: 3 s)


class RoundFailed(RuntimeError):
    """Fewer valid replies than the run's min-replies: the round is not aggregated and the
    checkpoint of the last complete round stays."""


@dataclass(frozen=True)
class Dropped:
    client_id: int
    node_id: int
    why: str      # a key of DROP_REASONS
    reason: str   # the details and the remedy, for the log and errors

    def __str__(self) -> str:
        return f"client {self.client_id} (node {self.node_id}) {self.why}: {self.reason}"


# Called after each round's aggregation with (round, client ids, their updates, dropped clients,
# the bytes of each message the round sent: one per client sent to, the dropped ones included,
# and the bytes received when the updates do not say: under SecAgg+ they hold no state).
OnTrain = Callable[..., None]   # (round, ids, updates, dropped, sent_bytes, received_bytes=None)


class FedXrayStrategy(FlowerStrategy):
    """A Flower Strategy over a fedxray Strategy: fedxray's sampling, checks and fault handling.

    - Identity: nodes report their client id, usable example count and image-list digest once
      (a query); a node that connects later (a restarted SuperNode) is queried and takes over its
      client when its count and digest are the ones reported before.
    - Sampling: each round trains the clients fedxray.federated.round_clients picks for
      (num_clients, fraction_fit, seed, round), by fedxray client id.
    - Messages: each sampled client gets the global state and, when the fedxray strategy has one
      for it (strategy.payload(k, global_state), e.g. SCAFFOLD's correction), its own payload.
    - Checks: every reply must come from the node asked, claim that node's client id and the
      example count reported at the query, and carry the keys, shapes and dtypes of the global
      state with finite values and a plausible update, and exactly the extra tensors its payload
      calls for (fedxray.flower.records.check_train_reply).
    - Faults: a client that is offline, does not answer within round-timeout, fails, or sends a
      refused reply is dropped from the round and recorded; the round is aggregated over the rest
      when at least min-replies remain (default: every sampled client), else RoundFailed.
    - Aggregation: strategy.aggregate(global state sent, valid updates in client-id order, round),
      the very code the in-process run calls, so its server state (momentum, moments, control
      variates) moves here too. (Flower's own FedAvg sums in float32 in arrival order and turns
      num_batches_tracked into a float64 array.) No federated evaluation: the server evaluates the
      global model centrally.
    """

    def __init__(self, config: Config, strategy: Strategy, faults: FaultPolicy = FaultPolicy(),
                 on_train: Optional[OnTrain] = None):
        if strategy.name != config.strategy:
            raise ValueError(f"strategy {strategy.name!r} given for a config of strategy {config.strategy!r}: "
                             f"build it with fedxray.parts.strategy_for(config, model)")
        self.config = config
        self.strategy = strategy
        self.faults = faults
        self.on_train = on_train
        self.node_of: dict[int, int] = {}           # client id -> node id
        self.client_examples: dict[int, int] = {}   # client id -> usable examples it holds
        self.client_digests: dict[int, str] = {}    # client id -> digest of its image list
        self.pos_weight: Optional[list[float]] = None   # the federation's, from the clients' label counts
        self.ignored_nodes: set[int] = set()        # nodes whose answers were refused
        self.chosen: list[int] = []                 # the round's sampled clients
        self.sent: dict = {}                        # the global state sent this round
        self.payloads: dict[int, dict] = {}         # client id -> the payload sent to it this round
        self.sent_bytes: dict[int, int] = {}        # client id -> bytes of the message sent to it
        self.asked: dict[str, int] = {}             # message id -> client id, this round
        self.offline: list[Dropped] = []            # sampled clients not sent anything
        self.dp_specs: dict[int, PatientDPSpec] = {}   # per-patient DP-SGD of each client (dp "example")

    # ------------------------------------------------------------------ who is who
    def connect(self, grid: Grid) -> dict[int, int]:
        """Wait for num_clients nodes, ask each its client id, count and digest, and check the ids
        are 0..num_clients-1 once each. Strict: a node that fails or is refused stops the run."""
        k = self.config.num_clients
        nodes = sorted(grid.get_node_ids())
        waited = time.monotonic()
        while len(nodes) < k:
            if time.monotonic() - waited > 10:
                log.info("waiting for hospitals: %d of %d SuperNodes connected", len(nodes), k)
                waited = time.monotonic()
            time.sleep(1.0)
            nodes = sorted(grid.get_node_ids())
        answers = self._query(grid, nodes)
        bad = {n: a for n, a in answers.items() if isinstance(a, str)}
        if bad:
            raise ValueError("the run cannot start: " + "; ".join(bad.values()))
        ids: dict[int, list[int]] = {}
        for node, a in answers.items():
            ids.setdefault(a.client_id, []).append(node)
        twice = {c: n for c, n in ids.items() if len(n) > 1}
        missing = sorted(set(range(k)) - set(ids))
        if twice or missing or len(answers) != len(nodes):
            raise ValueError(f"the connected SuperNodes do not hold clients 0..{k - 1} once each "
                             f"(num_clients={k}): client ids used twice {twice}, missing {missing}, "
                             f"{len(nodes) - len(answers)} node(s) did not answer within round-timeout="
                             f"{self.faults.round_timeout:g} s. Fix each SuperNode's --node-config client-id.")
        same = {}
        for node, a in sorted(answers.items()):
            same.setdefault(a.image_list_digest, []).append(a.client_id)
        shared = [sorted(c) for c in same.values() if len(c) > 1]
        if shared:   # one folder behind two client ids would count its patients twice
            raise ValueError(f"the run cannot start: clients {shared[0]} hold the same images and labels (the "
                             f"same data folder under two client-ids?); give each SuperNode its own hospital's "
                             f"data-dir")
        self.node_of = {c: n[0] for c, n in sorted(ids.items())}
        self.client_examples = {c: answers[n].num_examples for c, n in self.node_of.items()}
        self.client_digests = {c: answers[n].image_list_digest for c, n in self.node_of.items()}
        log.info("clients on nodes: %s; usable examples: %s", self.node_of, self.client_examples)
        if self.config.dp == "example":   # what each site's accountant must say, from its reported size
            self.dp_specs = {k: spec_for(self.config, n, self.config.dp_delta) for k, n in self.client_examples.items()}
        if self.config.pos_weight:   # from the counts each client reported: never from images
            weight = pos_weight_from_counts((answers[n].num_examples, answers[n].positives)
                                            for _, n in sorted(self.node_of.items()))
            self.pos_weight = [float(w) for w in weight]
            log.info("pos_weight from the clients' label counts: %s", [round(w, 2) for w in self.pos_weight])
        return self.node_of

    def refresh(self, grid: Grid) -> set[int]:
        """The connected nodes; a new node (a restarted SuperNode) is queried and takes over its
        client if that client's node is gone and it holds the same data as reported before."""
        online = set(grid.get_node_ids())
        new = sorted(online - set(self.node_of.values()) - self.ignored_nodes)
        answers = self._query(grid, new) if new else {}
        for node in set(new) - set(answers):
            answers[node] = (f"SuperNode {node} did not answer the query within round-timeout="
                             f"{self.faults.round_timeout:g} s (restart it to try again)")
        for node, a in sorted(answers.items()):
            if isinstance(a, str):
                problem = a
            elif self.node_of.get(a.client_id) in online:
                problem = (f"SuperNode {node} says it is client {a.client_id}, which node "
                           f"{self.node_of[a.client_id]} still is: two SuperNodes have client-id={a.client_id}")
            elif (a.num_examples, a.image_list_digest) != (self.client_examples[a.client_id],
                                                           self.client_digests[a.client_id]):
                problem = (f"SuperNode {node} says it is client {a.client_id} but holds other images or labels "
                           f"({a.num_examples} usable examples; {self.client_examples[a.client_id]} before): "
                           f"a client's data may not change during a run; restart the run in a new output-dir")
            else:
                log.info("client %d is back, now on node %d (was %d)", a.client_id, node, self.node_of[a.client_id])
                self.node_of[a.client_id] = node
                continue
            log.error("%s; the node is ignored", problem)
            self.ignored_nodes.add(node)
        return online

    def _query(self, grid: Grid, nodes: Sequence[int]) -> dict[int, QueryAnswer | str]:
        """node -> its checked answer, or the text of what went wrong (nodes that never answer are
        left out)."""
        queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        out: dict[int, QueryAnswer | str] = {}
        for reply in self.exchange(grid, queries, self.faults.round_timeout):
            node = reply.metadata.src_node_id
            if node not in nodes:
                continue
            if reply.has_error():
                out[node] = f"SuperNode {node} could not say which client it is: {reply.error.reason}"
                continue
            try:
                out[node] = check_query_reply(reply.content, node, self.config.num_clients)
            except MessageError as e:
                out[node] = str(e)
        return out

    def exchange(self, grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
        """Push messages, then pull their replies until all are in or timeout seconds pass (what
        Grid.send_and_receive does, polling every POLL_S and remembering which message went where)."""
        messages = list(messages)
        if not messages:
            return []
        ids = list(grid.push_messages(messages))
        by_node = {n: c for c, n in self.node_of.items()}
        self.asked = {mid: by_node.get(m.metadata.dst_node_id, -1) for mid, m in zip(ids, messages) if mid}
        pending = set(self.asked)
        replies: list[Message] = []
        end = time.monotonic() + timeout
        while pending:
            got = list(grid.pull_messages(list(pending)))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or time.monotonic() >= end:
                break
            time.sleep(POLL_S)
        return replies

    # ------------------------------------------------------------------ one round
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One message per sampled, connected client: the global state, config (with the round) and
        that client's payload from the fedxray strategy, when it has one."""
        c = self.config
        online = self.refresh(grid)
        self.chosen = round_clients(c, server_round)
        self.sent = to_state(arrays)
        self.offline = [Dropped(k, self.node_of[k], "offline", DROP_REASONS["offline"])
                        for k in self.chosen if self.node_of[k] not in online]
        targets = [k for k in self.chosen if self.node_of[k] in online]
        log.info("round %d: training clients %s", server_round, targets)
        config[SERVER_ROUND] = server_round
        if self.pos_weight is not None:
            config[POS_WEIGHT] = self.pos_weight
        self.payloads = {k: self.strategy.payload(k, self.sent) for k in targets}
        self.sent_bytes = {k: message_bytes(self.sent, self.payloads[k]) for k in targets}
        return [Message(content=train_message(arrays, config, self.payloads[k]), dst_node_id=self.node_of[k],
                        message_type=MessageType.TRAIN) for k in targets]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """The fedxray strategy's aggregate of the round's valid replies; the other sampled clients
        are dropped (logged and passed to on_train), or RoundFailed when fewer than min-replies remain."""
        c = self.config
        by_node = {n: k for k, n in self.node_of.items()}
        accepted: dict[int, ClientUpdate] = {}
        dropped: dict[int, Dropped] = {d.client_id: d for d in self.offline}
        for m in replies:
            k = self.asked.get(m.metadata.reply_to_message_id, by_node.get(m.metadata.src_node_id, -1))
            node = self.node_of.get(k)
            if k not in self.chosen or k in accepted or k in dropped:
                log.warning("round %d: ignored a reply from node %d that answers no pending message of this "
                            "round", server_round, m.metadata.src_node_id)
            elif m.has_error():
                why = "lost" if m.error.code == ErrorCode.NODE_UNAVAILABLE else "failed"
                dropped[k] = Dropped(k, node, why, f"{DROP_REASONS[why]}: {m.error.reason}")
            elif m.metadata.src_node_id != node:
                dropped[k] = Dropped(k, node, "refused", f"the reply to client {k}'s message came from node "
                                     f"{m.metadata.src_node_id}, not from its node {node}")
            else:
                try:
                    accepted[k] = check_train_reply(
                        m.content, client_id=k, node_id=m.metadata.src_node_id,
                        num_examples=self.client_examples[k], image_digest=self.client_digests[k],
                        sent=self.sent, payload=self.payloads.get(k, {}),
                        max_steps=c.local_epochs * math.ceil(self.client_examples[k] / c.batch_size),
                        dp=c.dp, epsilon=self.expected_epsilon(k, server_round))
                except MessageError as e:
                    dropped[k] = Dropped(k, node, "refused", str(e))
        for k in self.chosen:
            if k not in accepted and k not in dropped:
                dropped[k] = Dropped(k, self.node_of[k], "no_reply", f"no reply within round-timeout="
                                     f"{self.faults.round_timeout:g} s; {DROP_REASONS['no_reply']}")
        gone = self._gone(server_round, dropped, len(accepted))
        ids = sorted(accepted)   # the order in which the in-process run hands them over
        updates = [accepted[k] for k in ids]
        state = self.strategy.aggregate(self.sent, updates, server_round)
        if self.on_train is not None:
            self.on_train(server_round, ids, updates, gone, [self.sent_bytes[k] for k in sorted(self.sent_bytes)])
        return to_record(state), self._loss(updates)

    def expected_epsilon(self, client_id: int, server_round: int) -> Optional[float]:
        """Under per-patient DP-SGD, client_id's epsilon after server_round: its accountant over the
        rounds it was sampled for (fedxray.federated.planned_rounds; a round it missed is counted,
        so the figure is an upper bound); None otherwise."""
        if self.config.dp != "example":
            return None
        return self.dp_specs[client_id].epsilon_after(planned_rounds(self.config, server_round)[client_id])

    def _gone(self, server_round: int, dropped: dict[int, Dropped], valid: int) -> list[Dropped]:
        """The round's dropped clients (logged), or RoundFailed when fewer than min-replies are valid."""
        gone = [dropped[k] for k in sorted(dropped)]
        for d in gone:
            log.warning("round %d: %s", server_round, d)
        need = self.faults.required(len(self.chosen))
        if valid < need:
            raise RoundFailed(
                f"round {server_round}: {valid} valid replies from the {len(self.chosen)} sampled clients "
                f"{self.chosen}, min-replies requires {need}; the round is not aggregated and the checkpoint "
                f"of round {server_round - 1} is kept. Dropped: " + "; ".join(map(str, gone)) +
                ". Bring those hospitals back (or lower min-replies) and run `flwr run` again with the same "
                "output-dir: it resumes from that checkpoint.")
        return gone

    def _loss(self, updates: Sequence[ClientUpdate]) -> MetricRecord:
        """The round's example-weighted training loss; none under DP (clients send none) or when no
        client trained."""
        loss = mean_train_loss(updates)
        return MetricRecord({} if loss is None else {TRAIN_LOSS: loss})

    # ------------------------------------------------------------------ one round under SecAgg+
    def train_secure(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                     context) -> tuple[ArrayRecord, MetricRecord]:
        """One round with secure aggregation (fedxray.flower.secure): the sampled clients' train
        messages go out through Flower's SecAgg+ workflow, and the server receives only the
        weighted mean of their updates (unweighted under client-level DP), which the fedxray
        strategy turns into the new global state (DP: noise added to the sum, fixed denominator).
        Each client's clear numbers (client id, digest, count, loss or epsilon) are checked as in a
        plain round; a client that fails them is already in the sum, so the round fails instead.
        Clients that drop out during the protocol are left out of the sum by it (up to a third)."""
        import torch
        from .secure import aggregated_arrays, client_weight, clipping_range, secure_sum_round
        c = self.config
        messages = list(self.configure_train(server_round, arrays, config, grid))
        by_node = {n: k for k, n in self.node_of.items()}
        targets = sorted(by_node[m.metadata.dst_node_id] for m in messages)
        dropped: dict[int, Dropped] = {d.client_id: d for d in self.offline}
        keys = list(self.sent)
        if c.dp == "client" and len(self.chosen) < 2 and not self.offline:
            for k in targets:
                dropped[k] = Dropped(k, self.node_of[k], "alone", DROP_REASONS["alone"])
            for d in dropped.values():
                log.warning("round %d: %s", server_round, d)
            total = torch.zeros(sum(self.sent[k].numel() for k in keys), dtype=torch.float64)
            state = self.strategy.aggregate_sum(self.sent, total, server_round)
            if self.on_train is not None:
                self.on_train(server_round, [], [], [dropped[k] for k in sorted(dropped)], [], received_bytes=0)
            return to_record(state), MetricRecord({})
        if len(targets) < 2:
            raise RoundFailed(f"round {server_round}: secure aggregation needs at least 2 clients, but only {targets} "
                              f"of the sampled {self.chosen} are connected; bring the others back and run `flwr run` "
                              f"again with the same output-dir (it resumes from the checkpoint of round "
                              f"{server_round - 1})")
        weights = {k: client_weight(c, self.client_examples[k]) for k in targets}
        bridge, counting = secure_sum_round(grid, context, server_round, messages, max_weight=max(weights.values()),
                                            clip=clipping_range(c), timeout=self.faults.round_timeout)
        if not bridge.called:
            raise RoundFailed(f"round {server_round}: the SecAgg+ protocol halted: too few of the clients {targets} "
                              f"stayed through its stages to rebuild the masks (see the SuperLink log); nothing was "
                              f"aggregated and the checkpoint of round {server_round - 1} is kept. Run `flwr run` "
                              f"again with the same output-dir once the hospitals are back")
        accepted: dict[int, ClientUpdate] = {}
        for proxy, fitres in bridge.results:
            k = by_node.get(proxy.node_id, -1)
            who = f"client {k} (node {proxy.node_id})"
            try:
                if k not in targets:
                    raise MessageError(f"node {proxy.node_id}: it answered a SecAgg+ round it was not asked to")
                metrics = dict(fitres.metrics)
                digest = metrics.pop(IMAGE_LIST_DIGEST, None)
                if digest != self.client_digests[k]:
                    raise MessageError(f"{who}: it trained on other images or labels than it reported at the start "
                                       f"of the run (image-list digest {str(digest)[:12]}); restore its folder")
                if fitres.num_examples != weights[k]:
                    raise MessageError(f"{who}: it weighed its update by {fitres.num_examples!r}, expected "
                                       f"{weights[k]} ({'1 under client-level DP' if c.dp == 'client' else 'its examples'})")
                loss, eps = check_reply_metrics(metrics, who, k, proxy.node_id, self.client_examples[k], c.dp,
                                                self.expected_epsilon(k, server_round))
            except MessageError as e:
                raise RoundFailed(f"round {server_round}: {e}. Under secure aggregation its update is already in the "
                                  f"sum and cannot be left out: nothing was aggregated and the checkpoint of round "
                                  f"{server_round - 1} is kept") from None
            accepted[k] = ClientUpdate(state={}, num_examples=self.client_examples[k], train_loss=loss, client_id=k,
                                       epsilon=eps)
        for k in targets:
            if k not in accepted:
                dropped[k] = Dropped(k, self.node_of[k], "incomplete", DROP_REASONS["incomplete"])
        gone = self._gone(server_round, dropped, len(accepted))
        mean = self._secure_mean(server_round, aggregated_arrays(bridge.results[0][1]))
        ids = sorted(accepted)
        if c.dp == "client":   # unweighted: the mean times the clients in it is their sum
            total = torch.cat([mean[k].flatten() for k in keys]) * len(ids)
            state = self.strategy.aggregate_sum(self.sent, total, server_round)
        else:
            averaged = {k: (self.sent[k].to(torch.float64) + mean[k]).to(self.sent[k].dtype) for k in keys}
            state = self.strategy.aggregate(self.sent, [ClientUpdate(state=averaged, num_examples=1,
                                                                     train_loss=math.nan)], server_round)
        updates = [accepted[k] for k in ids]
        if self.on_train is not None:
            self.on_train(server_round, ids, updates, gone, [counting.sent], received_bytes=counting.received)
        return to_record(state), self._loss(updates)

    def _secure_mean(self, server_round: int, arrays: list) -> dict:
        """The unmasked mean update as tensors by key (the clients send their entries in sorted key
        order), checked against the global state's shapes and finite."""
        import torch
        names = sorted(self.sent)
        if len(arrays) != len(names):
            raise RoundFailed(f"round {server_round}: the securely summed update holds {len(arrays)} arrays, expected "
                              f"{len(names)} (one per exchanged entry): a client runs another fedxray version")
        out = {}
        for name, a in zip(names, arrays):
            t = torch.from_numpy(a.astype("float64"))
            if tuple(t.shape) != tuple(self.sent[name].shape) or not bool(torch.isfinite(t).all()):
                raise RoundFailed(f"round {server_round}: the securely summed update's {name!r} has shape "
                                  f"{tuple(t.shape)} (expected {tuple(self.sent[name].shape)}) or non-finite values: a "
                                  f"client runs another fedxray version or model")
            out[name] = t
        return out

    # ------------------------------------------------------------------ no federated evaluation
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """None: the server evaluates the global model on its own val and test folders."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        return None

    def summary(self) -> None:
        log.info("fedxray strategy %s %s; %d clients, fraction-fit %g, %s", self.strategy.name,
                 dict(self.strategy.hyperparameters), self.config.num_clients, self.config.fraction_fit, self.faults)

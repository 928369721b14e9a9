"""Trust nothing read back, survive what fails: the checks on every Flower message (oracle tests
with crafted replies), rounds that drop failed hospitals, a server that resumes, and the site
caches, first in process (ClientApps called by a fake Grid), then with real processes (a SuperNode
killed mid-run; the ServerApp killed and restarted)."""
import dataclasses
import math
import os
import re
import signal
import subprocess
import time

import numpy as np
import pandas as pd
import pytest
import torch

flwr = pytest.importorskip("flwr", reason="flwr not installed: pip install -e '.[flower]'")
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict  # noqa: E402

import fedxray  # noqa: E402
from fedxray import Config, run_federated  # noqa: E402
from fedxray.checkpoint import CheckpointError, image_list_digest, load_checkpoint  # noqa: E402
from fedxray.saved_model import load_final  # noqa: E402
from fedxray.client import Client, ClientUpdate  # noqa: E402
from fedxray.flower import client_app, write_client_folders, write_nih_folder, write_run_config  # noqa: E402
from fedxray.flower.records import (MAX_UPDATE_FACTOR, MessageError, check_query_reply,  # noqa: E402
                                    check_train_message, check_train_reply, query_reply, to_record,
                                    to_state, train_reply, update_problems)
from fedxray.flower.runconfig import FaultPolicy, run_config_from_config  # noqa: E402
from fedxray.flower.server_app import ServerRun  # noqa: E402
from fedxray.flower.strategy import FedXrayStrategy, RoundFailed  # noqa: E402
from fedxray.model import exchanged_keys, get_state, trunk_digest  # noqa: E402
from fedxray.parts import prepare  # noqa: E402
from fedxray.strategies import STRATEGIES, make_strategy  # noqa: E402
from test_flower import (DEADLINE_S, TINY, Federation, _frames, compare_with_in_process,  # noqa: E402,F401
                         need_flower_processes, processes)


# ----------------------------------------------------------------------------- crafted replies

def _sent():
    """A small global state with each kind of exchanged entry (weights, BN statistics, counter)."""
    g = torch.Generator().manual_seed(0)
    return {"layer4.0.conv1.weight": torch.randn(4, 3, 3, 3, generator=g),
            "layer4.0.bn1.running_var": torch.rand(4, generator=g) + 0.5,
            "layer4.0.bn1.num_batches_tracked": torch.tensor(7),
            "fc.bias": torch.randn(14, generator=g)}


def _trained(sent):
    """What a client sends back after one round: small moves, 2 more batches tracked."""
    state = {k: v + 0.01 if v.is_floating_point() else v + 2 for k, v in sent.items()}
    return ClientUpdate(state, num_examples=40, train_loss=0.31)


DIGEST = "ab" * 32   # the image-list digest client 1 reported at the query


def _check(content, sent, **kw):
    args = dict(client_id=1, node_id=11, num_examples=40, image_digest=DIGEST, sent=sent,
                max_steps=5)   # 1 epoch, batch 8
    return check_train_reply(content, **{**args, **kw})


def _edit_state(fn):
    def make(sent):
        u = _trained(sent)
        state = dict(u.state)
        fn(state)
        return train_reply(ClientUpdate(state, u.num_examples, u.train_loss), 1, DIGEST)
    return make


def _edit_metrics(**metrics):
    def make(sent):
        content = train_reply(_trained(sent), 1, DIGEST)
        values = {**dict(content["metrics"]), **metrics}
        content["metrics"] = MetricRecord({k: v for k, v in values.items() if v is not None})
        return content
    return make


def _scaled(factor):
    return _edit_state(lambda s: s.update({k: v * factor for k, v in s.items() if v.is_floating_point()}))


BAD_REPLIES = {
    "wrong dtype": (_edit_state(lambda s: s.update({"fc.bias": s["fc.bias"].double()})),
                    r"'fc.bias' has dtype torch.float64, expected torch.float32"),
    "wrong shape": (_edit_state(lambda s: s.update({"fc.bias": torch.zeros(15)})),
                    r"'fc.bias' has shape \(15,\), expected \(14,\)"),
    "extra key": (_edit_state(lambda s: s.update({"conv1.weight": torch.zeros(1)})),
                  r"1 unexpected key\(s\) \(first 'conv1.weight'\)"),
    "missing key": (_edit_state(lambda s: s.pop("fc.bias")), r"1 key\(s\) missing \(first 'fc.bias'\)"),
    "NaN": (_edit_state(lambda s: s["fc.bias"].__setitem__(3, float("nan"))),
            r"'fc.bias' holds 1 NaN or infinite value\(s\).*diverged"),
    "scaled by 1e30": (_scaled(1e30), r"far beyond what one round of training produces.*MAX_UPDATE_FACTOR"),
    "scaled by 1e10": (_scaled(1e10), r"far beyond"),
    "scaled to infinity": (_scaled(1e38), r"NaN or infinite"),
    "batches tracked went down": (_edit_state(lambda s: s.update({"layer4.0.bn1.num_batches_tracked": torch.tensor(6)})),
                                  r"num_batches_tracked' moved by -1..-1 batches; one round trains 0..5"),
    "batches tracked absurd": (_edit_state(lambda s: s.update({"layer4.0.bn1.num_batches_tracked": torch.tensor(10**15)})),
                               r"one round trains 0..5"),
    "num-examples inflated": (_edit_metrics(**{"num-examples": 4000}),
                              r"weighs 4000 examples, but it reported 40 usable examples"),
    "num-examples as float": (_edit_metrics(**{"num-examples": 40.0}), r"weighs 40.0 examples"),
    "spoofed client id": (_edit_metrics(**{"client-id": 0}),
                          r"claims to be client 0, but node 11 answered the query as client 1"),
    "NaN loss": (_edit_metrics(train_loss=float("nan")), r"train_loss is nan"),
    "negative loss": (_edit_metrics(train_loss=-1.0), r"train_loss is -1.0"),
    "runaway loss": (_edit_metrics(train_loss=1e200), r"train_loss is 1e\+200, expected a number from 0 to 100"),
    "negative variance": (_edit_state(lambda s: s.update({"layer4.0.bn1.running_var": -s["layer4.0.bn1.running_var"]})),
                          r"running_var' holds negative variances"),
    "extra metric": (_edit_metrics(secret=3), r"record 'metrics' holds .*'secret'"),
    "missing metric": (_edit_metrics(train_loss=None), r"record 'metrics' holds"),
    "extra record": (lambda sent: RecordDict({**train_reply(_trained(sent), 1, DIGEST), "more": ConfigRecord({"a": 1})}),
                     r"holds records \['arrays', 'config', 'metrics', 'more'\], expected \['arrays', 'config', "
                     r"'metrics'\]"),
    "other data": (lambda sent: train_reply(_trained(sent), 1, "cd" * 32),
                   r"trained on other images or labels than it reported at the start"),
    "no digest": (lambda sent: RecordDict({k: v for k, v in train_reply(_trained(sent), 1, DIGEST).items()
                                           if k != "config"}), r"holds records \['arrays', 'metrics'\]"),
    "no arrays": (lambda sent: RecordDict({"metrics": train_reply(_trained(sent), 1, DIGEST)["metrics"]}),
                  r"holds records \['metrics'\]"),
    "arrays as metrics": (lambda sent: RecordDict({**train_reply(_trained(sent), 1, DIGEST),
                                                   "arrays": MetricRecord({"a": 1})}),
                          r"record 'arrays' is a MetricRecord, expected a ArrayRecord"),
}


def test_a_valid_reply_is_accepted_as_sent():
    sent = _sent()
    update = _check(train_reply(_trained(sent), 1, DIGEST), sent)
    want = _trained(sent)
    assert (update.num_examples, update.train_loss) == (40, pytest.approx(0.31))
    for k, v in want.state.items():
        assert update.state[k].dtype == v.dtype and torch.equal(update.state[k], v), k


@pytest.mark.parametrize("case", list(BAD_REPLIES))
def test_a_bad_reply_is_refused_naming_the_client_and_the_problem(case):
    make, match = BAD_REPLIES[case]
    sent = _sent()
    with pytest.raises(MessageError, match=match) as err:
        _check(make(sent), sent)
    assert str(err.value).startswith("client 1 (node 11): ")


def _payload(sent):
    """A payload as SCAFFOLD's: one tensor per trainable parameter (the BatchNorm buffers have none)."""
    return {k: torch.full_like(sent[k], 0.5) for k in ("layer4.0.conv1.weight", "fc.bias")}


def _with_extra(edit):
    """A reply whose extra is one tensor per payload entry, edited by edit(extra)."""
    def make(sent):
        u = _trained(sent)
        extra = {k: torch.full_like(v, 0.1) for k, v in _payload(sent).items()}
        edit(extra)
        return train_reply(ClientUpdate(u.state, u.num_examples, u.train_loss, extra=extra), 1, DIGEST)
    return make


BAD_EXTRAS = {
    "wrong key": (_with_extra(lambda e: e.update({"layer4.0.bn1.running_var": e.pop("fc.bias")})),
                  r"'extra' record does not fit the payload sent to it: 1 key\(s\) missing \(first 'fc.bias'\); "
                  r"1 unexpected key\(s\) \(first 'layer4.0.bn1.running_var'\)"),
    "wrong shape": (_with_extra(lambda e: e.update({"fc.bias": torch.zeros(13)})),
                    r"'extra' record .*'fc.bias' has shape \(13,\), expected \(14,\)"),
    "wrong dtype": (_with_extra(lambda e: e.update({"fc.bias": e["fc.bias"].double()})),
                    r"'extra' record .*'fc.bias' has dtype torch.float64, expected torch.float32"),
    "NaN": (_with_extra(lambda e: e["fc.bias"].__setitem__(2, float("nan"))),
            r"'extra' record .*'fc.bias' holds 1 NaN or infinite value\(s\).*diverged"),
    "no extra": (_with_extra(lambda e: e.clear()),
                 r"holds records \['arrays', 'config', 'metrics'\], expected \['arrays', 'config', 'extra', "
                 r"'metrics'\].*the server sent this client a payload, so its reply must carry an extra record"),
}


def test_a_reply_with_the_extra_its_payload_calls_for_is_accepted_as_sent():
    sent = _sent()
    update = _check(_with_extra(lambda e: None)(sent), sent, payload=_payload(sent))
    assert update.client_id == 1 and set(update.extra) == set(_payload(sent))
    assert all(torch.equal(v, torch.full_like(v, 0.1)) for v in update.extra.values())


@pytest.mark.parametrize("case", list(BAD_EXTRAS))
def test_a_scaffold_reply_with_a_bad_extra_is_refused_naming_the_client(case):
    make, match = BAD_EXTRAS[case]
    sent = _sent()
    with pytest.raises(MessageError, match=match) as err:
        _check(make(sent), sent, payload=_payload(sent))
    assert str(err.value).startswith("client 1 (node 11): ")


def test_an_extra_the_server_did_not_ask_for_is_refused():
    sent = _sent()
    with pytest.raises(MessageError, match=r"client 1 \(node 11\): the message holds records \['arrays', 'config', "
                                           r"'extra', 'metrics'\], expected \['arrays', 'config', 'metrics'\].*"
                                           r"no payload, so its reply may carry no extra record"):
        _check(_with_extra(lambda e: None)(sent), sent)


def test_real_training_stays_within_the_bound_and_1e30_does_not(tiny_splits):
    """Three rounds of Adam at lr 1e-3 on a random trunk (where layer4's BatchNorm statistics
    move most) stay orders of magnitude inside MAX_UPDATE_FACTOR; the same update times 1e30 trips it."""
    torch.manual_seed(0)
    model = fedxray.build_model(14, None)
    keys = exchanged_keys(model)
    data = fedxray.NIHDataset(tiny_splits["train"], 64, preload=True)
    client = Client(0, data, model, batch_size=8, lr=1e-3)
    sent = get_state(model, keys)
    steps = math.ceil(len(data) / 8)
    worst = 0.0
    for r in (1, 2, 3):
        update = client.fit(sent, round_num=r)
        assert update_problems(update.state, sent, steps) == []
        for k, g in sent.items():
            if g.is_floating_point():
                worst = max(worst, float((update.state[k] - g).abs().max() / (1 + g.abs().max())))
        sent = update.state
    assert worst < MAX_UPDATE_FACTOR / 1000
    poisoned = {k: v * 1e30 if v.is_floating_point() else v for k, v in update.state.items()}
    assert update_problems(poisoned, sent, steps)


def _reply(content, src, reply_to=""):
    """A reply as the server pulls it: content (or an Error) from node src."""
    from flwr.app import Metadata
    meta = Metadata(run_id=1, message_id=f"r{src}-{reply_to}", src_node_id=src, dst_node_id=1,
                    reply_to_message_id=reply_to, group_id="", created_at=time.time(), ttl=3600.0,
                    message_type="train")
    key = "error" if isinstance(content, Error) else "content"
    return Message(metadata=meta, **{key: content})


def test_each_way_a_client_fails_is_told_apart_and_the_rest_is_averaged(caplog):
    from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
    sent = _sent()
    strategy = FedXrayStrategy(Config(num_clients=4, batch_size=8), make_strategy("fedavg", num_clients=4),
                               FaultPolicy(min_replies=1))
    strategy.node_of = {0: 10, 1: 11, 2: 12, 3: 13}
    strategy.client_examples = {k: 40 for k in range(4)}
    strategy.client_digests = {k: DIGEST for k in range(4)}
    strategy.chosen, strategy.sent, strategy.asked = [0, 1, 2, 3], sent, {"m1": 1}
    got = []
    strategy.on_train = lambda r, ids, updates, dropped, sent: got.append(
        (ids, [(d.client_id, d.why) for d in dropped]))
    valid = train_reply(_trained(sent), 0, DIGEST)
    replies = [_reply(valid, 10),
               _reply(Error(ErrorCode.NODE_UNAVAILABLE, "Node Unavailable"), SUPERLINK_NODE_ID, reply_to="m1"),
               _reply(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "<class 'OSError'>:<'disk full'>"), 12),
               _reply(valid, 10),                                      # a duplicate
               _reply(valid, 99)]                                      # a node nobody asked
    arrays, _ = strategy.aggregate_train(4, replies)
    assert got == [([0], [(1, "lost"), (2, "failed"), (3, "no_reply")])]
    for k, v in to_state(arrays).items():
        assert torch.equal(v, _trained(sent).state[k]), k                # the one valid reply, as sent
    assert "client 2 (node 12) failed: its ClientApp raised an error; see that site's SuperNode log: " \
           "<class 'OSError'>:<'disk full'>" in caplog.text
    assert "ignored a reply from node 99" in caplog.text and "ignored a reply from node 10" in caplog.text


# ----------------------------------------------------------------------------- crafted server messages

def _train_message(state, **config):
    values = {"server-round": 1, "trunk-digest": "ab" * 32, **config}
    return RecordDict({"arrays": to_record(state), "config": ConfigRecord({k: v for k, v in values.items()
                                                                           if v is not None})})


def test_a_client_refuses_a_bad_server_message_and_blames_the_server():
    own = _sent()
    got = check_train_message(_train_message(own, **{"server-round": 3}), own, client_id=1)
    assert got.server_round == 3 and got.trunk_digest == "ab" * 32
    assert all(torch.equal(got.state[k], v) for k, v in own.items())
    nan = {**own, "fc.bias": torch.full((14,), float("nan"))}
    with pytest.raises(MessageError, match=r"client 1: the server's train message \(round 1\).*'fc.bias' holds 14 "
                                           r"NaN.*The server is the source, not this site's data or training"):
        check_train_message(_train_message(nan), own, client_id=1)
    with pytest.raises(MessageError, match=r"lacks \['trunk-digest'\]"):
        check_train_message(_train_message(own, **{"trunk-digest": None}), own, client_id=1)
    with pytest.raises(MessageError, match=r"'trunk-digest' is 'abc', expected 64 hex digits"):
        check_train_message(_train_message(own, **{"trunk-digest": "abc"}), own, client_id=1)
    for bad in (0, -1, 1.0, "1", True):
        with pytest.raises(MessageError, match=r"'server-round' is .*expected an integer >= 1"):
            check_train_message(_train_message(own, **{"server-round": bad}), own, client_id=1)
    with pytest.raises(MessageError, match=r"'fc.bias' has shape \(13,\), expected \(14,\)"):
        check_train_message(_train_message({**own, "fc.bias": torch.zeros(13)}), own, client_id=1)
    with pytest.raises(MessageError, match=r"1 key\(s\) missing"):
        check_train_message(_train_message({k: v for k, v in own.items() if k != "fc.bias"}), own, client_id=1)
    with pytest.raises(MessageError, match=r"holds records"):
        check_train_message(RecordDict({"arrays": to_record(own)}), own, client_id=1)


def test_a_client_accepts_exactly_the_payload_its_strategy_expects():
    own = _sent()
    expected = _payload(own)
    message = _train_message(own)
    message["payload"] = to_record(expected)
    got = check_train_message(message, own, client_id=1, payload_reference=expected)
    assert set(got.payload) == set(expected) and all(torch.equal(got.payload[k], v) for k, v in expected.items())
    assert check_train_message(_train_message(own), own, client_id=1).payload == {}

    def with_payload(edit):
        payload = {k: v.clone() for k, v in expected.items()}
        edit(payload)
        content = _train_message(own)
        content["payload"] = to_record(payload)
        return content
    bad = {
        "wrong key": (with_payload(lambda p: p.update({"layer4.0.bn1.running_var": p.pop("fc.bias")})),
                      r"1 key\(s\) missing \(first 'fc.bias'\)"),
        "wrong shape": (with_payload(lambda p: p.update({"fc.bias": torch.zeros(3)})),
                        r"'fc.bias' has shape \(3,\), expected \(14,\)"),
        "NaN": (with_payload(lambda p: p["fc.bias"].__setitem__(0, float("inf"))),
                r"'fc.bias' holds 1 NaN or infinite value\(s\).*strategy state is corrupt"),
    }
    for case, (content, match) in bad.items():
        with pytest.raises(MessageError, match=r"client 1: the server's train message \(round 1\) holds a 'payload' "
                                               r"this client cannot use: " + match + ".*nothing was trained"):
            check_train_message(content, own, client_id=1, payload_reference=expected)
    with pytest.raises(MessageError, match=r"holds records \['arrays', 'config'\], expected \['arrays', 'config', "
                                           r"'payload'\].*expects a payload"):
        check_train_message(_train_message(own), own, client_id=1, payload_reference=expected)
    with pytest.raises(MessageError, match=r"holds records \['arrays', 'config', 'payload'\], expected "
                                           r"\['arrays', 'config'\].*expects no payload"):
        check_train_message(message, own, client_id=1)


NONE = [0] * 14   # a site's positives per finding: none


def test_query_replies_are_checked():
    digest = "0f" * 32
    assert check_query_reply(query_reply(1, 30, digest, NONE), 11, 2).client_id == 1
    with pytest.raises(MessageError, match=r"SuperNode 11 says it is client 2, but num_clients=2"):
        check_query_reply(query_reply(2, 30, digest, NONE), 11, 2)
    with pytest.raises(MessageError, match=r"client 1 \(node 11\): 'num-examples' is 0"):
        check_query_reply(query_reply(1, 0, digest, NONE), 11, 2)
    with pytest.raises(MessageError, match=r"'image-list-digest' is 'nope'"):
        check_query_reply(query_reply(1, 3, "nope", NONE), 11, 2)
    with pytest.raises(MessageError, match=r"holds records \['metrics'\]"):
        check_query_reply(RecordDict({"metrics": query_reply(1, 3, digest, NONE)["metrics"]}), 11, 2)


def test_a_sites_label_counts_are_checked_against_its_examples():
    # pos_weight is computed from these counts: one site claiming more positives than images (or a
    # negative count) would skew every site's loss.
    digest = "0f" * 32
    counts = list(range(14))
    assert check_query_reply(query_reply(1, 30, digest, counts), 11, 2).positives == tuple(counts)
    for bad, match in (([0] * 13, r"'label-counts' is .*expected a list of 14 counts"),
                       ([0] * 13 + [31], r"'label-counts\[Hernia\]' is 31, expected an integer >= 0 and <= 30"),
                       ([-1] + [0] * 13, r"'label-counts\[Atelectasis\]' is -1, expected an integer >= 0")):
        with pytest.raises(MessageError, match=r"client 1 \(node 11\): " + match):
            check_query_reply(query_reply(1, 30, digest, bad), 11, 2)
    old = query_reply(1, 30, digest, NONE)
    del old["metrics"]["label-counts"]                        # a site of an older fedxray
    with pytest.raises(MessageError, match=r"record 'metrics' holds \['client-id', 'num-examples'\], expected"):
        check_query_reply(old, 11, 2)


def test_a_client_takes_pos_weight_from_the_server_exactly_when_its_run_config_says_so():
    own = _sent()
    weights = [float(k + 1) for k in range(14)]
    got = check_train_message(_train_message(own, **{"pos-weight": weights}), own, client_id=1, pos_weight=True)
    assert got.pos_weight.tolist() == weights
    assert check_train_message(_train_message(own), own, client_id=1).pos_weight is None
    with pytest.raises(MessageError, match=r"lacks 'pos-weight', but this site's run config says pos-weight=true"):
        check_train_message(_train_message(own), own, client_id=1, pos_weight=True)
    with pytest.raises(MessageError, match=r"holds 'pos-weight', but this site's run config says pos-weight=false"):
        check_train_message(_train_message(own, **{"pos-weight": weights}), own, client_id=1)
    for bad in (weights[:13], [float("nan")] + weights[1:], [0.0] + weights[1:], [-1.0] + weights[1:]):
        with pytest.raises(MessageError, match=r"'pos-weight' is .*expected 14 finite positive weights"):
            check_train_message(_train_message(own, **{"pos-weight": bad}), own, client_id=1, pos_weight=True)


# ----------------------------------------------------------------------------- a federation in process

class ServerKilled(BaseException):
    """Stands for the ServerApp process being killed."""


class FakeGrid:
    """A Grid whose nodes are ClientApps called in this process: node 10 + k holds site k.
    faults(round, node, reply) may return another reply, None (the node stays silent) or raise."""

    def __init__(self, sites, run_config, faults=None, nodes=None):
        nodes = nodes or {10 + k: k for k in range(len(sites))}
        self.sites, self.run_config, self.faults = sites, run_config, faults
        self.online = dict(nodes)   # node -> site
        self.outbox: dict[str, Message] = {}
        self.round = 0
        self.replies: dict[tuple[int, int], Message] = {}   # (round, client) -> reply as sent
        self.payloads: dict[tuple[int, int], set] = {}      # (round, client) -> payload names sent
        self.configs: dict[tuple[int, int], dict] = {}      # (round, client) -> config record sent

    def get_node_ids(self):
        return sorted(self.online)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            node = msg.metadata.dst_node_id
            if msg.metadata.message_type == "train":
                self.round = int(msg.content["config"]["server-round"])
                payload = msg.content["payload"].keys() if "payload" in msg.content else ()
                self.payloads[(self.round, self.online.get(node, -1))] = set(payload)
                self.configs[(self.round, self.online.get(node, -1))] = dict(msg.content["config"])
            reply = self._answer(msg, node) if node in self.online else None
            if reply is not None and self.faults is not None and msg.metadata.message_type == "train":
                reply = self.faults(self.round, node, reply)
            if reply is not None:
                self.outbox[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def _answer(self, msg, node):
        k = self.online[node]
        ctx = Context(run_id=1, node_id=node, node_config={"data-dir": str(self.sites[k]), "client-id": k},
                      state=RecordDict(), run_config=self.run_config)
        try:
            reply = client_app.app(msg, ctx)
        except Exception as e:   # what a SuperNode sends back when its ClientApp raises
            return Message(Error(code=2, reason=f"{type(e)}:<'{e}'>"), reply_to=msg)
        if msg.metadata.message_type == "train":
            self.replies[(self.round, k)] = reply
        return reply

    def pull_messages(self, ids):
        return [self.outbox.pop(i) for i in list(ids) if i in self.outbox]


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """What a ServerApp process has and a test process lacks: the task identity that new Flower
    Messages read their run id and source node from."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture()
def folders(tiny_splits, tmp_path):
    parts = _frames(tiny_splits)
    return dict(parts=parts, sites=write_client_folders(parts, tmp_path / "sites"),
                val=write_nih_folder(tiny_splits["val"], tmp_path / "server" / "val"),
                test=write_nih_folder(tiny_splits["test"], tmp_path / "server" / "test"))


def _serve(config, folders, out, grid=None, faults=FaultPolicy(), grid_faults=None) -> ServerRun:
    """What the ServerApp's main does, over a FakeGrid."""
    client_app._sites.clear()
    grid = grid or FakeGrid(folders["sites"], run_config_from_config(config), grid_faults)
    server = ServerRun(config, folders["val"], folders["test"], out, faults)
    strategy = server.flower_strategy()
    strategy.connect(grid)
    server.start(strategy.client_examples, strategy.client_digests)
    server.run(grid, strategy)
    return server


def _silent_from_round(r, node):
    def faults(round_num, n, reply):
        return None if round_num >= r and n == node else reply
    return faults


def _history(out):
    return pd.read_csv(out / "history.csv", dtype={"client": str})


def strategy_config(name, **fields):
    """TINY running strategy `name` with its defaults; SCAFFOLD with plain SGD, which its
    correction assumes (its config_problems refuse Adam and momentum)."""
    if name == "scaffold":
        fields = {"optimizer": "sgd", "momentum": 0.0, "lr": 1e-2, **fields}
    return Config(**{**TINY, **fields}).with_strategy(name)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_on_flower_equals_the_in_process_run(name, folders, tiny_splits, tmp_path):
    """The ServerApp's objects over ClientApps in process: the same weights, history (bytes sent
    and received included) and strategy server state as fedxray.run_federated."""
    config = strategy_config(name)
    grid = FakeGrid(folders["sites"], run_config_from_config(config))
    _serve(config, folders, tmp_path / "flower", grid)
    sim = run_federated(config, tiny_splits, tmp_path / "sim", client_frames=folders["parts"])
    compare_with_in_process(tmp_path / "flower", tmp_path / "sim", sim.model, rounds=config.num_rounds)
    # What each message carried besides the state, and each reply: SCAFFOLD's tensors, one per
    # trainable exchanged parameter; nothing for the others.
    expected = {k for k, p in sim.model.named_parameters() if p.requires_grad} if name == "scaffold" else set()
    assert set(grid.payloads) == {(r, k) for r in (1, 2) for k in (0, 1)}
    for (r, k), keys in grid.payloads.items():
        content = grid.replies[(r, k)].content
        assert keys == expected, (r, k)
        assert (set(content["extra"].keys()) if "extra" in content else set()) == expected, (r, k)


def test_pos_weight_on_flower_equals_the_in_process_run(folders, tiny_splits, tmp_path):
    """pos_weight from the label counts the sites report at the query (counts, never images) gives
    the same weights, history and model as fedxray.run_federated, which counts the same tables."""
    config = Config(**{**TINY, "pos_weight": True})
    grid = FakeGrid(folders["sites"], run_config_from_config(config))
    _serve(config, folders, tmp_path / "flower", grid)
    sim = run_federated(config, tiny_splits, tmp_path / "sim", client_frames=folders["parts"])
    compare_with_in_process(tmp_path / "flower", tmp_path / "sim", sim.model, rounds=config.num_rounds)
    pooled = pd.concat(folders["parts"])[list(fedxray.LABELS)].to_numpy()
    oracle = (len(pooled) - pooled.sum(0)) / np.maximum(pooled.sum(0), 1)
    sent = grid.configs[(1, 0)]["pos-weight"]
    assert sent == pytest.approx(np.where(pooled.sum(0) > 0, oracle, 1.0).tolist())
    assert all(grid.configs[key]["pos-weight"] == sent for key in grid.configs)


def test_a_scaffold_reply_with_a_nan_extra_is_dropped_and_the_rest_aggregated(folders, tmp_path, caplog):
    """SCAFFOLD, min-replies 1: in round 2 client 1's control-variate change holds a NaN. It is
    refused and recorded; round 2 is the strategy's aggregate of client 0's reply alone (the
    last round is kept: with selection by validation the final state could be round 1's)."""
    config = strategy_config("scaffold", select_round="last")

    def poison(r, node, reply):
        if r == 2 and node == 11:
            extra = to_state(reply.content["extra"])
            extra["fc.bias"] = extra["fc.bias"].clone()
            extra["fc.bias"][0] = float("nan")
            reply.content["extra"] = to_record(extra)
        return reply

    grid = FakeGrid(folders["sites"], run_config_from_config(config), poison)
    server = _serve(config, folders, tmp_path / "flower", grid, FaultPolicy(min_replies=1))
    h = _history(tmp_path / "flower")
    dropped = h[h["metric"].str.startswith("dropped_")]
    assert dropped[["round", "client", "metric"]].values.tolist() == [[2, "1", "dropped_refused"]]
    assert re.search(r"client 1 \(node 11\) refused: client 1 \(node 11\): its 'extra' record does not fit the "
                     r"payload sent to it: 'fc.bias' holds 1 NaN", caplog.text)

    # The oracle: a fresh strategy fed the same replies (both in round 1, client 0's in round 2).
    fresh = ServerRun(config, folders["val"], folders["test"], tmp_path / "unused")
    state = fresh.global_state
    for r, clients in ((1, (0, 1)), (2, (0,))):
        for k in (0, 1):                     # as the server: a payload for every client it sends to
            fresh.strategy.payload(k, state)
        updates = []
        for k in clients:
            content = grid.replies[(r, k)].content
            updates.append(ClientUpdate(to_state(content["arrays"]), int(content["metrics"]["num-examples"]),
                                        float(content["metrics"]["train_loss"]), client_id=k,
                                        extra=to_state(content["extra"])))
        state = fresh.strategy.aggregate(state, updates, r)
    for k, v in state.items():
        assert torch.equal(server.global_state[k].cpu(), v.cpu()), k


def test_a_scaffold_site_expects_its_payload_and_replies_with_its_extra(folders):
    """The ClientApp of a SCAFFOLD run refuses a message without the payload its strategy expects;
    given one (one tensor per trainable exchanged parameter), it replies with an extra of the same
    names, the change of its control variate."""
    config = strategy_config("scaffold")
    ctx = Context(run_id=1, node_id=11, node_config={"data-dir": str(folders["sites"][1]), "client-id": 1},
                  state=RecordDict(), run_config=run_config_from_config(config))
    torch.manual_seed(config.seed)
    model = fedxray.build_model(14, None)
    state = get_state(model, exchanged_keys(model))
    trainable = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    message = RecordDict({"arrays": to_record(state),
                          "config": ConfigRecord({"server-round": 1, "trunk-digest": trunk_digest(model)})})
    client_app._sites.clear()
    with pytest.raises(MessageError, match=r"client 1: the server's train message: the message holds records "
                                           r"\['arrays', 'config'\], expected \['arrays', 'config', 'payload'\]"):
        client_app.app(_train_message_to(message), ctx)
    message["payload"] = to_record({k: torch.zeros_like(v) for k, v in trainable.items()})
    reply = client_app.app(_train_message_to(message), ctx)
    assert set(reply.content.keys()) == {"arrays", "config", "metrics", "extra"}
    extra = to_state(reply.content["extra"])
    assert set(extra) == set(trainable) and set(trainable) < set(state)
    assert all(extra[k].shape == v.shape and bool(torch.isfinite(extra[k]).all()) for k, v in trainable.items())
    assert any(bool(extra[k].abs().sum() > 0) for k in extra)


def test_a_silent_client_stops_a_strict_run_keeping_the_last_checkpoint(folders, tmp_path):
    config = Config(**TINY)
    out = tmp_path / "strict"
    faults = FaultPolicy(round_timeout=0.5)
    with pytest.raises(RoundFailed, match=r"round 2: 1 valid replies from the 2 sampled clients \[0, 1\], "
                                          r"min-replies requires 2.*checkpoint of round 1 is kept.*client 1 "
                                          r"\(node 11\) no_reply: no reply within round-timeout=0.5 s"):
        _serve(config, folders, out, faults=faults, grid_faults=_silent_from_round(2, 11))
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["round"] == 1 and _history(out)["round"].max() == 1
    assert not (out / "final_model.pt").exists()


def test_min_replies_drops_silent_offline_and_refused_clients_and_records_them(folders, tmp_path):
    """3 clients, min-replies 2: round 1 client 2 sends a 1e30-scaled state (refused), round 2
    client 1 stays silent (no reply), round 3 client 1's SuperNode is gone (offline). Every round
    is the fedavg of exactly the valid replies (the last round is kept, not the best-validation one)."""
    parts3 = fedxray.partition(pd.concat(folders["parts"]), 3, seed=0)
    sites = write_client_folders(parts3, tmp_path / "sites3")
    config = Config(**{**TINY, "num_clients": 3, "num_rounds": 3, "select_round": "last"})

    def faults(r, node, reply):
        if r == 1 and node == 12:
            state = {k: v * 1e30 if v.is_floating_point() else v for k, v in to_state(reply.content["arrays"]).items()}
            reply.content["arrays"] = to_record(state)
        if r == 2 and node == 11:
            return None
        if r == 3 and node == 11:
            raise AssertionError("an offline node got a message")
        return reply

    grid = FakeGrid(sites, run_config_from_config(config), faults)
    real_refresh = FedXrayStrategy.refresh

    def refresh(self, g):
        if g.round >= 2:                    # after round 2's messages: node 11 disconnects
            g.online.pop(11, None)
        return real_refresh(self, g)

    out = tmp_path / "tolerant"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FedXrayStrategy, "refresh", refresh)
        server = _serve(config, {**folders, "sites": sites}, out, grid, FaultPolicy(2, 0.5))
    h = _history(out)
    dropped = h[h["metric"].str.startswith("dropped_")]
    assert dropped[["round", "client", "metric"]].values.tolist() == [
        [1, "2", "dropped_refused"], [2, "1", "dropped_no_reply"], [3, "1", "dropped_offline"]]
    trained = h[(h["metric"] == "num_examples") & (h["split"] == "train")]
    assert trained.groupby("round")["client"].apply(list).to_dict() == {1: ["0", "1"], 2: ["0", "2"], 3: ["0", "2"]}
    sent = h[h["metric"] == "bytes_sent"].set_index("round")["value"]
    per_client = fedxray.state_nbytes(server.global_state)
    assert sent.to_dict() == {1: 3 * per_client, 2: 3 * per_client, 3: 2 * per_client}   # offline: not sent

    # Round 3's global state is the example-weighted fedavg of clients 0 and 2's replies.
    replies = [to_state(grid.replies[(3, k)].content["arrays"]) for k in (0, 2)]
    want = fedxray.fedavg(replies, [len(parts3[0]), len(parts3[2])])
    for k, v in want.items():
        assert torch.equal(server.global_state[k].cpu(), v), k
    assert load_final(out / "final_model.pt")["round"] == 3 and not (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("name", ["fedadam", "scaffold"])
def test_a_restarted_server_resumes_to_the_uninterrupted_result(name, folders, tiny_splits, tmp_path):
    """Killed after round 1 (in round 2), restarted: the same weights and history as one
    uninterrupted in-process run (round 3's weights need round 2's strategy server state, FedAdam's
    moments or SCAFFOLD's control variates, restored exactly); a restart on the finished run with
    other inputs is refused, naming what changed."""
    config = strategy_config(name, num_rounds=3)
    out = tmp_path / "restarted"

    def killed(r, node, reply):
        if r == 2:
            raise ServerKilled()
        return reply

    with pytest.raises(ServerKilled):
        _serve(config, folders, out, grid_faults=killed)
    assert load_checkpoint(out / "checkpoint.pt")["round"] == 1
    (out / ".checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint")   # a write the kill cut short
    _serve(config, folders, out)
    assert not list(out.glob(".*.tmp"))
    sim = run_federated(config, tiny_splits, tmp_path / "sim", client_frames=folders["parts"])
    compare_with_in_process(out, tmp_path / "sim", sim.model, rounds=3)

    # The same folder with another client's data, another config, or a damaged checkpoint.
    server = ServerRun(config, folders["val"], folders["test"], out)
    digests = load_final(out / "final_model.pt")["inputs"]
    clients = {k: digests[f"client_{k}"] for k in (0, 1)}
    again = ServerRun(config, folders["val"], folders["test"], out)   # the same run, finished: nothing to do
    again.start({0: 12, 1: 9}, clients)
    assert again.done and again.round == 3 and len(again.history()) == len(sim.history)
    saved = load_final(out / "final_model.pt")["state"]
    assert all(torch.equal(again.global_state[k].cpu(), saved[k]) for k in saved)
    again.run(grid=None, flower=None)                                 # returns before touching the grid
    with pytest.raises(CheckpointError, match=r"other images or labels for client_1"):
        server.start({0: 12, 1: 9}, {**clients, 1: "0" * 64})
    other = ServerRun(dataclasses.replace(config, lr=config.lr / 2), folders["val"], folders["test"], out)
    with pytest.raises(CheckpointError, match=r"another configuration.*'lr'"):
        other.start({0: 12, 1: 9}, clients)
    data = bytearray((out / "final_model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "final_model.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"final_model.pt"):
        ServerRun(config, folders["val"], folders["test"], out).start({0: 12, 1: 9}, clients)


def test_a_restarted_supernode_takes_over_its_client_only_with_the_same_data(folders, tmp_path):
    config = Config(**TINY)
    grid = FakeGrid(folders["sites"], run_config_from_config(config))
    strategy = FedXrayStrategy(config, make_strategy("fedavg", num_clients=2), FaultPolicy(round_timeout=0.5))
    client_app._sites.clear()
    strategy.connect(grid)
    assert strategy.node_of == {0: 10, 1: 11}
    grid.online = {10: 0, 21: 1, 22: 0}     # node 11 restarted as 21; 22 claims client 0 as well
    assert strategy.refresh(grid) == {10, 21, 22}
    assert strategy.node_of == {0: 10, 1: 21} and strategy.ignored_nodes == {22}
    other = write_client_folders([folders["parts"][0].iloc[:-1]], tmp_path / "changed")[0]
    grid.sites = [*folders["sites"], other]
    grid.online = {10: 0, 23: 2}            # client 1 back with fewer images: refused
    strategy.refresh(grid)
    assert strategy.node_of == {0: 10, 1: 21} and 23 in strategy.ignored_nodes


def test_with_caches_on_a_flower_run_equals_the_in_process_run(folders, tiny_splits, tmp_path):
    """image_cache + feature_cache: each site caches its own images (node cache folders), the server
    its val and test (config.cache_dir), and the result is the in-process run's."""
    config = Config(**{**TINY, "image_cache": True, "feature_cache": True, "cache_dir": str(tmp_path / "cache")})
    _serve(config, folders, tmp_path / "flower")
    sim = run_federated(config, tiny_splits, tmp_path / "sim", client_frames=folders["parts"])
    compare_with_in_process(tmp_path / "flower", tmp_path / "sim", sim.model, rounds=config.num_rounds,
                            own_info=("image_cache", "feature_cache_bytes"))   # the server caches val/test only
    for site in folders["sites"]:
        assert len(list((site / ".fedxray_cache").glob("images_64px_*/features_*.bin"))) == 1


def test_site_caches_are_built_once_and_reused_by_the_next_process(folders, tmp_path, monkeypatch):
    """With both caches on, the first message decodes the PNGs and runs the trunk once; a fresh
    process (module state cleared) decodes nothing and runs the trunk once (a 1-image probe). The
    query reports the usable examples: an undecodable PNG is left out, in the count and in training."""
    from fedxray.model import ChestXrayResNet
    site = folders["sites"][0]
    bad = sorted((site / "images").iterdir())[0]
    bad.unlink()
    bad.write_bytes(b"not a png")
    config = Config(**{**TINY, "image_cache": True, "feature_cache": True})
    ctx = Context(run_id=1, node_id=10, node_config={"data-dir": str(site), "client-id": 0},
                  state=RecordDict(), run_config=run_config_from_config(config))
    client_app._sites.clear()
    answer = client_app.app(_query_message(), ctx)
    frame = fedxray.load_nih(site)
    usable = frame[frame["image"] != bad.name]
    assert dict(answer.content["metrics"]) == {"client-id": 0, "num-examples": len(usable),   # counts of usable ones
                                               "label-counts": usable[list(fedxray.LABELS)].sum().tolist()}
    assert answer.content["config"]["image-list-digest"] == image_list_digest(usable)
    assert (site / ".fedxray_cache").is_dir()

    torch.manual_seed(config.seed)
    model = fedxray.build_model(14, None)
    state = get_state(model, exchanged_keys(model))
    message = RecordDict({"arrays": to_record(state),
                          "config": ConfigRecord({"server-round": 1, "trunk-digest": trunk_digest(model)})})
    calls = []
    real_trunk = ChestXrayResNet.trunk
    monkeypatch.setattr(ChestXrayResNet, "trunk", lambda self, x: calls.append(len(x)) or real_trunk(self, x))
    client_app._sites.clear()
    first = client_app.app(_train_message_to(message), ctx)
    assert first.content["metrics"]["num-examples"] == len(usable) and sum(calls) > len(usable)
    calls.clear()
    cached = _files(site / ".fedxray_cache")
    assert any(p.suffix == ".bin" for p in cached) and any(p.suffix == ".u8" for p in cached)
    client_app._sites.clear()                                       # a fresh process
    second = client_app.app(_train_message_to(message), ctx)
    assert calls == [1]                                              # the probe, no image
    assert _files(site / ".fedxray_cache") == cached                 # nothing decoded or written again
    for k, v in to_state(first.content["arrays"]).items():
        assert torch.equal(to_state(second.content["arrays"])[k], v), k


def _files(folder):
    """path -> (size, mtime) of the data files under folder (lock files left out)."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file() and "lock" not in p.name}


def _query_message():
    from test_flower import _message
    return _message(RecordDict(), "query")


def _train_message_to(content):
    from test_flower import _message
    return _message(content, "train")


# ----------------------------------------------------------------------------- real processes

def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _history_round(path) -> int:
    try:
        return int(pd.read_csv(path)["round"].max())
    except (OSError, ValueError, KeyError, pd.errors.EmptyDataError):
        return -1


@pytest.mark.slow
def test_a_killed_supernode_is_dropped_and_the_run_completes(folders, tmp_path, processes):
    """Real processes: SuperNode 1 (its whole process group) is SIGKILLed once round 1 is saved;
    with min-replies 1 the run aggregates client 0 alone and records client 1 as dropped."""
    need_flower_processes()
    until = time.monotonic() + DEADLINE_S
    config = Config(**TINY)
    out = tmp_path / "flower_run"
    overrides = write_run_config(tmp_path / "run_config.toml", config, out, folders["val"], folders["test"],
                                 FaultPolicy(min_replies=1, round_timeout=90.0))
    try:
        federation = Federation(processes, tmp_path, folders["sites"], until)
        run = federation.run(overrides)
        federation.wait(lambda: _history_round(out / "history.csv") >= 1, "round 1 is saved", run)
        _kill_group(processes.procs["supernode_1"])
        federation.wait((out / "final_model.pt").exists, "the run finishes without client 1", run,
                        may_die=("flwr_run", "supernode_1"))
        h = _history(out)
        assert h[h["round"] == 2].query("split == 'train' and metric == 'num_examples'")["client"].tolist() == ["0"]
        dropped = h[h["metric"].str.startswith("dropped_")]
        assert dropped[["round", "client"]].values.tolist() == [[2, "1"]], dropped
        assert dropped["metric"].iloc[0] in ("dropped_lost", "dropped_no_reply")   # heartbeat or timeout first
        assert load_final(out / "final_model.pt")["round"] == 2
        log = (tmp_path / "flwr_run.log").read_text(errors="replace")
        assert "round 2: client 1 (node " in log
        final = load_final(out / "final_model.pt")["state"]
        assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    except BaseException:
        print(processes.logs())
        raise


@pytest.mark.slow
def test_a_killed_server_resumes_and_ends_as_the_uninterrupted_run(folders, tiny_splits, tmp_path, processes):
    """Real processes: the ServerApp process is SIGKILLed once round 1's checkpoint is written;
    `flwr run` again with the same output-dir resumes it, and the run ends with the weights and
    history of fedxray.run_federated in process. FedAdam: its server moments come back from the
    checkpoint too."""
    need_flower_processes()
    until = time.monotonic() + DEADLINE_S
    config = Config(**{**TINY, "num_rounds": 3, "strategy": "fedadam"})
    out = tmp_path / "flower_run"
    overrides = write_run_config(tmp_path / "run_config.toml", config, out, folders["val"], folders["test"])
    try:
        federation = Federation(processes, tmp_path, folders["sites"], until)
        first = federation.run(overrides, "flwr_run_first")
        sim = run_federated(config, tiny_splits, tmp_path / "sim_run", client_frames=folders["parts"])

        def round_one_saved():
            return (_history_round(out / "history.csv") >= 1
                    and load_checkpoint(out / "checkpoint.pt")["round"] >= 1)
        federation.wait(round_one_saved, "round 1's checkpoint", first)
        servers = federation.serverapp_pids()
        assert len(servers) == 1, servers
        os.kill(servers[0], signal.SIGKILL)
        _kill_group(first)
        killed_at = load_checkpoint(out / "checkpoint.pt")["round"]
        assert killed_at < config.num_rounds and not (out / "final_model.pt").exists()
        # What an operator does after a server crash: stop the dead run (else the SuperNodes keep
        # fetching its last messages until the SuperLink expires it, about 40 s), then run again.
        run_id = re.search(r"Successfully started run (\d+)", (tmp_path / "flwr_run_first.log").read_text()).group(1)
        stop = subprocess.run(["flwr", "stop", run_id, "fedxray-test"], env=federation.cli_env, capture_output=True,
                              text=True, timeout=120)
        assert stop.returncode == 0, stop.stdout + stop.stderr

        second = federation.run(overrides, "flwr_run_second")
        federation.wait((out / "final_model.pt").exists, "the restarted run finishes", second,
                        may_die=("flwr_run",))
        log = (tmp_path / "flwr_run_second.log").read_text(errors="replace")
        assert f"after round {killed_at} of 3" in log
        compare_with_in_process(out, tmp_path / "sim_run", sim.model, rounds=3)
    except BaseException:
        print(processes.logs())
        raise


def test_a_query_claiming_more_examples_than_any_hospital_holds_is_refused():
    # A claim of 2**64 - 1 examples made fedavg overflow and killed the server; 10**12 outweighed
    # every honest site.
    digest = "ab" * 32
    for n in (2**31, 10**12, 2**64 - 1):
        with pytest.raises(MessageError, match=r"client 1 \(node 11\): 'num-examples' is \d+, expected an "
                                               r"integer >= 1 and <= 2,147,483,647"):
            check_query_reply(query_reply(1, n, digest, NONE), 11, 2)
    assert check_query_reply(query_reply(1, 2**31 - 1, digest, NONE), 11, 2).num_examples == 2**31 - 1


def test_two_clients_with_the_same_data_cannot_start_a_run():
    from fedxray.flower.records import QueryAnswer

    class Grid:
        def get_node_ids(self):
            return [10, 11]
    strategy = FedXrayStrategy(Config(num_clients=2), make_strategy("fedavg", num_clients=2))
    strategy._query = lambda grid, nodes: {10: QueryAnswer(0, 30, "ab" * 32, tuple(NONE)), 11: QueryAnswer(1, 30, "ab" * 32, tuple(NONE))}
    with pytest.raises(ValueError, match=r"clients \[0, 1\] hold the same images and labels"):
        strategy.connect(Grid())


def test_a_poisoned_global_model_is_blamed_on_the_server_by_the_client(tiny_splits):
    run = fedxray.federated.FederatedRun(prepare(Config(**TINY), tiny_splits), "unused")
    poisoned = {**run.global_state, "fc.bias": torch.full((14,), -3e5)}   # finite, within the bounds
    with pytest.raises(fedxray.DivergenceError, match="already has a loss of .* before any local step.*server's "
                                                      "model is corrupt or poisoned"):
        run.clients[0].fit(poisoned, round_num=2)


def test_a_read_only_site_cache_names_the_node_config_key(tmp_path, monkeypatch):
    from fedxray.flower import client_app
    monkeypatch.setattr(client_app.os, "access", lambda path, mode: False)   # as a read-only data-dir
    with pytest.raises(fedxray.DataError, match=r"\.fedxray_cache is not writable.*cache-dir="):
        client_app._check_writable(tmp_path / "site" / ".fedxray_cache")


def test_a_diverged_average_is_not_saved_and_not_blamed_on_the_lr_alone(tiny_splits, tmp_path):
    from fedxray.flower.server_app import ServerRun
    val = write_nih_folder(tiny_splits["val"], tmp_path / "val")
    server = ServerRun(Config(**TINY), val, val, tmp_path / "out")
    server.start({0: 10, 1: 10}, {0: "ab" * 32, 1: "cd" * 32})      # round 0 saved
    state = dict(server.global_state)
    weight = state["fc.weight"].clone()
    weight[:, ::2], weight[:, 1::2] = 3e38, -3e38                    # finite, but inf - inf logits
    with pytest.raises(fedxray.DivergenceError, match=r"round 1, the fedavg aggregate .*poisoned within the "
                                                      r"checks' bounds; nothing of round 1 was saved"):
        server.evaluate_round(1, to_record({**state, "fc.weight": weight}))
    assert fedxray.checkpoint.load_checkpoint(tmp_path / "out" / "checkpoint.pt")["round"] == 0

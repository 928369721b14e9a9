"""What crosses the network, as Flower records, and the checks on everything read back.

The exchanged state (layer4 + fc) travels as an ArrayRecord, numbers as a MetricRecord, text as
a ConfigRecord. A strategy's extra tensors travel as their own ArrayRecords: "payload" in a train
message (what fedxray's Strategy.payload gives that client, e.g. SCAFFOLD's correction), "extra"
in its reply (ClientUpdate.extra, e.g. the change of SCAFFOLD's control variate); each is there
exactly when it is not empty. Nothing a peer sends is trusted: every message is checked against what its
receiver expects (record and key names, the keys, shapes and dtypes of its own model, finite
values, plausible sizes, the sender's identity), and a message that fails is refused with a
MessageError naming the sender and the remedy. The checks are pure functions over records.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor, nn

from ..client import DIVERGED_LOSS, ClientUpdate
from ..data import LABELS
from ..model import state_problems, trunk_digest

# Record keys. "num-examples" is also what Flower's FedAvg weights by (its weighted_by_key).
ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
PAYLOAD, EXTRA = "payload", "extra"   # the strategy's tensors: server -> client, client -> server
NUM_EXAMPLES, TRAIN_LOSS, CLIENT_ID = "num-examples", "train_loss", "client-id"
SERVER_ROUND, TRUNK_DIGEST = "server-round", "trunk-digest"
IMAGE_LIST_DIGEST = "image-list-digest"   # fedxray.checkpoint.image_list_digest of a client's data
EPSILON = "epsilon"   # under per-patient DP-SGD, the client's epsilon after the round (checked by the server)
# A client's positives per finding (LABELS order), reported at the query: counts, never images; and
# the federation's BCE pos_weight the server computes from them and sends with every train message.
LABEL_COUNTS, POS_WEIGHT = "label-counts", "pos-weight"

# The bound that tells a training update from an absurd one. One round may move an exchanged
# float entry u away from the state g the server sent by at most
#     max|u - g| <= MAX_UPDATE_FACTOR * (1 + max|g|),
# i.e. six orders of magnitude of the entry's own scale. Why so loose: layer4's BatchNorm
# running_var follows the data, not the optimiser; with a random frozen trunk (no ImageNet
# weights) it jumps from 1 to hundreds in round 1. Measured on the 240-image NIH sample, largest
# ratio over 1 to 3 rounds: 401 (Adam, lr 1e-3, 224 px), 216 (Adam 1e-3, 64 px), 93 (SGD 1e-2),
# 8.0e3 (Adam 1e-2, ten times the default lr); weights move by well under 1. Why it still
# matters: a reply scaled by 1e30 (or 1e10) trips it by many orders, instead of poisoning the
# average and crashing later in the metrics. It is a sanity bound, not a defence against a client
# that poisons within it (that takes a robust aggregator).
MAX_UPDATE_FACTOR = 1e6
# More examples than any hospital holds (NIH has 112,120 images in all): a count this large is a
# forged weight, and it keeps the example sum exact in float64.
MAX_EXAMPLES = 2**31 - 1
_DIGEST = re.compile(r"[0-9a-f]{64}")
_SAME_VERSION = "run the same fedxray version on the server and every site"


class MessageError(ValueError):
    """A message that fails its receiver's checks; the text names the sender and the remedy."""


# --------------------------------------------------------------------------- conversions

def to_record(state: Mapping[str, Tensor]) -> ArrayRecord:
    """A state (name -> tensor) as an ArrayRecord, keys and dtypes kept."""
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def to_state(record: ArrayRecord) -> dict[str, Tensor]:
    return dict(record.to_torch_state_dict())


def train_message(state: ArrayRecord, config: ConfigRecord, payload: Mapping[str, Tensor]) -> RecordDict:
    """The content of the server's train message to one client: the global state, the round's
    settings, and that client's payload from the strategy (left out when empty)."""
    content = RecordDict({ARRAYS: state, CONFIG: config})
    if payload:
        content[PAYLOAD] = to_record(payload)
    return content


def reply_metrics(update: ClientUpdate, client_id: int, dp: Optional[str] = None) -> dict:
    """The numbers of a client's train reply: client id and example count; the training loss
    unless the run is differentially private (the guarantee does not cover it); the client's
    epsilon under per-patient DP-SGD."""
    out = {NUM_EXAMPLES: int(update.num_examples), CLIENT_ID: int(client_id)}
    if dp is None:
        out[TRAIN_LOSS] = float(update.train_loss)
    if dp == "example":
        out[EPSILON] = float(update.epsilon)
    return out


def train_reply(update: ClientUpdate, client_id: int, image_digest: str, dp: Optional[str] = None) -> RecordDict:
    """The content of a client's train reply: its exchanged state, its numbers (reply_metrics),
    the digest of the image list it trained on (so a site whose data changed is caught whatever
    its node id) and its objective's extra tensors (left out when empty)."""
    content = RecordDict({
        ARRAYS: to_record(update.state),
        METRICS: MetricRecord(reply_metrics(update, client_id, dp)),
        CONFIG: ConfigRecord({IMAGE_LIST_DIGEST: str(image_digest)}),
    })
    if update.extra:
        content[EXTRA] = to_record(update.extra)
    return content


def query_reply(client_id: int, num_examples: int, image_digest: str, positives) -> RecordDict:
    """A client's answer to the server's query: who it is, how many usable examples it holds, its
    positives per finding (for the federation's pos_weight) and the digest of its image list (names
    and labels; never the list itself)."""
    return RecordDict({METRICS: MetricRecord({CLIENT_ID: int(client_id), NUM_EXAMPLES: int(num_examples),
                                              LABEL_COUNTS: [int(p) for p in positives]}),
                       CONFIG: ConfigRecord({IMAGE_LIST_DIGEST: str(image_digest)})})


# --------------------------------------------------------------------------- checks

def update_problems(state: Mapping[str, Tensor], sent: Mapping[str, Tensor], max_steps: int) -> list[str]:
    """What no round of training produces, for a state that already fits `sent`: a float entry
    moved beyond MAX_UPDATE_FACTOR of its scale, an integer buffer (num_batches_tracked) that went
    down or up by more than the max_steps batches the client can have trained."""
    problems = []
    for k, g in sent.items():
        u = state[k]
        if k.endswith("running_var") and bool((u < 0).any()):
            problems.append(f"{k!r} holds negative variances, which no BatchNorm computes")
        if g.is_floating_point():
            moved = float((u.double() - g.double()).abs().max()) if g.numel() else 0.0
            bound = MAX_UPDATE_FACTOR * (1.0 + (float(g.double().abs().max()) if g.numel() else 0.0))
            if not moved <= bound:
                problems.append(f"{k!r} moved by {moved:.3g} from the state sent, beyond the bound "
                                f"{bound:.3g} (MAX_UPDATE_FACTOR={MAX_UPDATE_FACTOR:g} times its scale)")
        else:
            steps = (u.long() - g.long())
            if g.numel() and (int(steps.min()) < 0 or int(steps.max()) > max_steps):
                problems.append(f"{k!r} moved by {int(steps.min())}..{int(steps.max())} batches; one round "
                                f"trains 0..{max_steps} (local_epochs x ceil(num-examples / batch_size))")
    return problems


def _records(content: RecordDict, expected: Mapping[str, type], who: str, remedy: str) -> None:
    keys = set(content.keys())
    if keys != set(expected):
        raise MessageError(f"{who}: the message holds records {sorted(keys)}, expected {sorted(expected)}; "
                           f"{remedy}")
    for name, kind in expected.items():
        if not isinstance(content[name], kind):
            raise MessageError(f"{who}: record {name!r} is a {type(content[name]).__name__}, expected a "
                               f"{kind.__name__}; {remedy}")


def _keys(record: Mapping[str, Any], name: str, expected: set[str], who: str, remedy: str) -> None:
    if set(record.keys()) != expected:
        raise MessageError(f"{who}: record {name!r} holds {sorted(record.keys())}, expected {sorted(expected)}; "
                           f"{remedy}")


def _int(value: Any, key: str, who: str, remedy: str, minimum: int, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum \
            or (maximum is not None and value > maximum):
        upto = f" and <= {maximum:,}" if maximum is not None else ""
        raise MessageError(f"{who}: {key!r} is {value!r}, expected an integer >= {minimum}{upto}; {remedy}")
    return value


def _digest(value: Any, key: str, who: str, remedy: str) -> str:
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise MessageError(f"{who}: {key!r} is {str(value)[:80]!r}, expected 64 hex digits (SHA-256); {remedy}")
    return value


def _state(record: ArrayRecord, who: str, remedy: str, name: str = ARRAYS) -> dict[str, Tensor]:
    try:
        return to_state(record)
    except Exception as e:   # a foreign dtype or serialization: numpy/torch say why
        raise MessageError(f"{who}: its record {name!r} cannot be read as tensors ({type(e).__name__}: {e}); "
                           f"{remedy}") from None


def _expected_records(base: Mapping[str, type], optional: str, present: bool) -> dict[str, type]:
    """The records a message must hold: base, plus the strategy's ArrayRecord when it has tensors."""
    return {**base, optional: ArrayRecord} if present else dict(base)


@dataclass(frozen=True)
class QueryAnswer:
    client_id: int
    num_examples: int        # usable examples (the image cache leaves undecodable images out)
    image_list_digest: str   # fedxray.checkpoint.image_list_digest of those examples
    positives: tuple[int, ...] = ()   # positives per finding among them (LABELS order)


def check_query_reply(content: RecordDict, node_id: int, num_clients: int) -> QueryAnswer:
    """A SuperNode's answer to the query: one client id in 0..num_clients-1, a count >= 1, a digest."""
    who = f"SuperNode {node_id}"
    remedy = _SAME_VERSION
    _records(content, {METRICS: MetricRecord, CONFIG: ConfigRecord}, who, remedy)
    _keys(content[METRICS], METRICS, {CLIENT_ID, NUM_EXAMPLES, LABEL_COUNTS}, who, remedy)
    _keys(content[CONFIG], CONFIG, {IMAGE_LIST_DIGEST}, who, remedy)
    cid = _int(content[METRICS][CLIENT_ID], CLIENT_ID, who, "fix its --node-config client-id", 0)
    if cid >= num_clients:
        raise MessageError(f"{who} says it is client {cid}, but num_clients={num_clients} (ids 0..{num_clients - 1}): "
                           f"fix its --node-config client-id, or the run's num-clients")
    who = f"client {cid} (node {node_id})"
    n = _int(content[METRICS][NUM_EXAMPLES], NUM_EXAMPLES, who, "a count of usable images that its data folder "
             "can hold", 1, MAX_EXAMPLES)
    digest = _digest(content[CONFIG][IMAGE_LIST_DIGEST], IMAGE_LIST_DIGEST, who, remedy)
    counts = content[METRICS][LABEL_COUNTS]
    if not isinstance(counts, list) or len(counts) != len(LABELS):
        raise MessageError(f"{who}: {LABEL_COUNTS!r} is {str(counts)[:80]!r}, expected a list of {len(LABELS)} "
                           f"counts (positives per finding); {remedy}")
    positives = tuple(_int(p, f"{LABEL_COUNTS}[{LABELS[j]}]", who, f"a client has 0..{n} positives of a finding "
                           f"among its {n} examples; {remedy}", 0, n) for j, p in enumerate(counts))
    return QueryAnswer(cid, n, digest, positives)


def check_train_reply(content: RecordDict, *, client_id: int, node_id: int, num_examples: int,
                      image_digest: str, sent: Mapping[str, Tensor], max_steps: int,
                      payload: Optional[Mapping[str, Tensor]] = None, dp: Optional[str] = None,
                      epsilon: Optional[float] = None) -> ClientUpdate:
    """The ClientUpdate of a train reply from the node that holds client_id, after checking it:
    exactly the records and metrics of train_reply; the client id the node answered at the query;
    the example count and image-list digest it reported then; a loss from 0 to DIVERGED_LOSS, or
    under DP no loss and (per-patient DP-SGD) the epsilon the server expects (check_reply_metrics); the
    keys, shapes and dtypes of the state sent, finite values, and an update within the bounds of
    update_problems; and an "extra" record exactly when the server sent that client a payload, with
    the payload's names, shapes and dtypes and finite values."""
    who = f"client {client_id} (node {node_id})"
    remedy = _SAME_VERSION
    payload = dict(payload or {})
    base = {ARRAYS: ArrayRecord, METRICS: MetricRecord, CONFIG: ConfigRecord}
    _records(content, _expected_records(base, EXTRA, bool(payload)), who,
             f"{remedy}, with the same strategy (the server sent this client " +
             ("a payload, so its reply must carry an extra record)" if payload else
              "no payload, so its reply may carry no extra record)"))
    _keys(content[CONFIG], CONFIG, {IMAGE_LIST_DIGEST}, who, remedy)
    if content[CONFIG][IMAGE_LIST_DIGEST] != image_digest:
        raise MessageError(f"{who}: it trained on other images or labels than it reported at the start of the "
                           f"run (image-list digest {str(content[CONFIG][IMAGE_LIST_DIGEST])[:12]} vs "
                           f"{image_digest[:12]}): a site's data may not change during a run; restore its folder, "
                           f"or start a new run in another output-dir")
    loss, eps = check_reply_metrics(content[METRICS], who, client_id, node_id, num_examples, dp, epsilon)
    state = _state(content[ARRAYS], who, remedy)
    problems = state_problems(state, sent)
    if problems:
        raise MessageError(f"{who}: its state does not fit the global model: {'; '.join(problems[:3])}. "
                           f"A NaN or infinity means its training diverged (see its log); wrong keys, shapes "
                           f"or dtypes mean another model: {remedy}")
    problems = update_problems(state, sent, max_steps)
    if problems:
        raise MessageError(f"{who}: its update is far beyond what one round of training produces: "
                           f"{'; '.join(problems[:3])}. Its reply is corrupt or forged: check that site's "
                           f"fedxray version and log before it takes part again")
    extra = {}
    if payload:
        extra = _state(content[EXTRA], who, remedy, EXTRA)
        problems = state_problems(extra, payload)
        if problems:
            raise MessageError(f"{who}: its {EXTRA!r} record does not fit the payload sent to it: "
                               f"{'; '.join(problems[:3])}. A NaN or infinity means its training diverged (see "
                               f"its log); wrong names, shapes or dtypes mean another strategy or fedxray version: "
                               f"{remedy}, with the same strategy")
    return ClientUpdate(state=state, num_examples=num_examples, train_loss=loss, client_id=client_id, extra=extra,
                        epsilon=eps)


def check_reply_metrics(metrics: Mapping[str, Any], who: str, client_id: int, node_id: int, num_examples: int,
                        dp: Optional[str] = None, epsilon: Optional[float] = None) -> tuple[float, Optional[float]]:
    """The numbers of a train reply (reply_metrics), checked: exactly the keys the run's dp calls
    for; the client id the node answered at the query; the example count it reported then; a
    loss from 0 to DIVERGED_LOSS (none under DP: then NaN); under per-patient DP-SGD, the epsilon the
    server computes for it (epsilon). Returns (loss, epsilon)."""
    remedy = _SAME_VERSION
    expected = {NUM_EXAMPLES, CLIENT_ID} | ({TRAIN_LOSS} if dp is None else set()) | \
        ({EPSILON} if dp == "example" else set())
    if set(metrics.keys()) != expected:
        raise MessageError(f"{who}: record {METRICS!r} holds {sorted(metrics.keys())}, expected {sorted(expected)} "
                           f"(dp={dp!r}: {'no training loss leaves a client under DP' if dp else 'no DP'}); "
                           f"{remedy}, with the same run config")
    claimed = metrics[CLIENT_ID]
    if not isinstance(claimed, int) or claimed != client_id:
        raise MessageError(f"{who}: its reply claims to be client {claimed!r}, but node {node_id} answered the "
                           f"query as client {client_id}: a SuperNode may speak only for itself; check that "
                           f"site's fedxray and --node-config client-id")
    n = metrics[NUM_EXAMPLES]
    if not isinstance(n, int) or n != num_examples:
        raise MessageError(f"{who}: its reply weighs {n!r} examples, but it reported {num_examples} usable "
                           f"examples at the start of the run; FedAvg weighs a client by what it holds. If the "
                           f"site's data folder changed, restart the run (a resume checks every image list)")
    loss = math.nan
    if dp is None:
        loss = metrics[TRAIN_LOSS]
        if not isinstance(loss, (int, float)) or not math.isfinite(loss) or not 0 <= loss <= DIVERGED_LOSS:
            raise MessageError(f"{who}: its {TRAIN_LOSS} is {loss!r}, expected a number from 0 to {DIVERGED_LOSS:g} "
                               f"(a mean binary cross-entropy; fedxray's client stops above that); its training "
                               f"diverged or its reply is corrupt")
        loss = float(loss)
    eps = None
    if dp == "example":
        eps = metrics[EPSILON]
        if not isinstance(eps, float) or epsilon is None or not (eps == epsilon or math.isclose(eps, epsilon, rel_tol=1e-9)):
            raise MessageError(f"{who}: it reports epsilon {eps!r} after this round, but the run's settings and its "
                               f"{num_examples} examples give {epsilon!r}: its privacy accounting differs from the "
                               f"server's; {remedy}, with the same run config (dp-*, batch-size, local-epochs, "
                               f"num-rounds, seed)")
    return loss, eps


@dataclass(frozen=True)
class TrainInstruction:
    state: dict[str, Tensor]
    server_round: int
    trunk_digest: str
    payload: dict[str, Tensor]   # the strategy's tensors for this client; empty for most strategies
    pos_weight: Optional[Tensor] = None   # the federation's BCE pos_weight, when the run uses one


def check_train_message(content: RecordDict, reference: Mapping[str, Tensor], client_id: int,
                        payload_reference: Optional[Mapping[str, Tensor]] = None,
                        pos_weight: bool = False) -> TrainInstruction:
    """What a client accepts from the server: the global state with the keys, shapes and dtypes of
    its own model's exchanged state (reference) and finite values, a server round >= 1, the
    server's trunk digest (required: without it the trunk check would be skipped), and a "payload"
    record exactly when its strategy sends one (payload_reference: the names, shapes and dtypes it
    expects, e.g. SCAFFOLD's correction for each trainable exchanged parameter), finite; and, exactly
    when the run uses pos_weight, one finite positive weight per finding."""
    who = f"client {client_id}: the server's train message"
    remedy = _SAME_VERSION
    payload_reference = dict(payload_reference or {})
    _records(content, _expected_records({ARRAYS: ArrayRecord, CONFIG: ConfigRecord}, PAYLOAD, bool(payload_reference)),
             who, f"{remedy}, with the same strategy (this site's strategy "
             f"{'expects a payload' if payload_reference else 'expects no payload'}); nothing was trained")
    config = content[CONFIG]
    missing = [k for k in (SERVER_ROUND, TRUNK_DIGEST) if k not in config]
    if missing:
        raise MessageError(f"{who} lacks {missing} (has {sorted(config.keys())}): the server runs another "
                           f"fedxray version or is not fedxray's ServerApp; nothing was trained")
    r = _int(config[SERVER_ROUND], SERVER_ROUND, who, remedy, 1)
    digest = _digest(config[TRUNK_DIGEST], TRUNK_DIGEST, who, remedy)
    state = _state(content[ARRAYS], who, remedy)
    problems = state_problems(state, reference)
    if problems:
        raise MessageError(f"{who} (round {r}) holds a global state this client cannot train: "
                           f"{'; '.join(problems[:3])}. The server is the source, not this site's data or "
                           f"training: a NaN or infinity means the server's model is corrupt (restart it from "
                           f"its last good checkpoint); wrong keys, shapes or dtypes mean another model: {remedy}")
    payload = {}
    if payload_reference:
        payload = _state(content[PAYLOAD], who, remedy, PAYLOAD)
        problems = state_problems(payload, payload_reference)
        if problems:
            raise MessageError(f"{who} (round {r}) holds a {PAYLOAD!r} this client cannot use: "
                               f"{'; '.join(problems[:3])}. The server is the source: a NaN or infinity means its "
                               f"strategy state is corrupt (restart it from its last good checkpoint); wrong names, "
                               f"shapes or dtypes mean another strategy or model: {remedy}, with the same "
                               f"strategy; nothing was trained")
    weight = None
    if pos_weight != (POS_WEIGHT in config):
        raise MessageError(f"{who} (round {r}) {'lacks' if pos_weight else 'holds'} {POS_WEIGHT!r}, but this site's "
                           f"run config says pos-weight={str(pos_weight).lower()}: {remedy}, with the same run "
                           f"config; nothing was trained")
    if pos_weight:
        values = config[POS_WEIGHT]
        if not (isinstance(values, list) and len(values) == len(LABELS)
                and all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in values)):
            raise MessageError(f"{who} (round {r}): {POS_WEIGHT!r} is {str(values)[:120]!r}, expected {len(LABELS)} "
                               f"finite positive weights (one per finding); {remedy}; nothing was trained")
        weight = torch.tensor(values, dtype=torch.float32)
    return TrainInstruction(state, r, digest, payload, weight)


def check_trunk(model: nn.Module, expected: str, client_id: int) -> None:
    got = trunk_digest(model)
    if got != expected:
        raise ValueError(
            f"client {client_id}: its frozen trunk differs from the server's (digest {got[:12]} vs "
            f"{expected[:12]}): the hospital built its model from other weights (model.weights_source="
            f"{getattr(model, 'weights_source', '?')!r}). Give every site the same `weights` file.")

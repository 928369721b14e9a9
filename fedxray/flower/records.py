"""What crosses the network, as Flower records: the exchanged state (layer4 + fc) as an
ArrayRecord, a client's reply as a fedxray ClientUpdate, and a digest of the frozen trunk."""
from __future__ import annotations

from typing import Mapping, Sequence

from flwr.app import ArrayRecord, MetricRecord, RecordDict
from torch import Tensor, nn

from ..aggregation import fedavg
from ..client import ClientUpdate
from ..model import trunk_digest

# Record keys. "num-examples" is also what Flower's FedAvg weights by (its weighted_by_key).
ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
NUM_EXAMPLES, TRAIN_LOSS, CLIENT_ID = "num-examples", "train_loss", "client-id"
SERVER_ROUND, TRUNK_DIGEST = "server-round", "trunk-digest"


def to_record(state: Mapping[str, Tensor]) -> ArrayRecord:
    """A state (name -> tensor) as an ArrayRecord, keys and dtypes kept."""
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def to_state(record: ArrayRecord) -> dict[str, Tensor]:
    return dict(record.to_torch_state_dict())


def train_reply(update: ClientUpdate, client_id: int) -> RecordDict:
    """The content of a client's train reply: its exchanged state and three numbers, nothing else."""
    return RecordDict({
        ARRAYS: to_record(update.state),
        METRICS: MetricRecord({NUM_EXAMPLES: int(update.num_examples),
                               TRAIN_LOSS: float(update.train_loss), CLIENT_ID: int(client_id)}),
    })


def client_update(content: RecordDict) -> tuple[int, ClientUpdate]:
    """(client id, ClientUpdate) of a train reply."""
    metrics = content[METRICS]
    update = ClientUpdate(state=to_state(content[ARRAYS]), num_examples=int(metrics[NUM_EXAMPLES]),
                          train_loss=float(metrics[TRAIN_LOSS]))
    return int(metrics[CLIENT_ID]), update


def aggregate(contents: Sequence[RecordDict], keys: Sequence[str]
              ) -> tuple[dict[str, Tensor], list[tuple[int, ClientUpdate]]]:
    """fedxray.fedavg over train replies, in client-id order (as the in-process run sums them).

    Every reply must carry exactly `keys`: a client that sends anything else is refused, naming it.
    Returns the new global state and the (client id, update) pairs in that order.
    """
    pairs = sorted((client_update(c) for c in contents), key=lambda p: p[0])
    ids = [k for k, _ in pairs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"two replies claim the same client id: {ids}")
    expected = set(keys)
    for k, u in pairs:
        if set(u.state) != expected:
            raise ValueError(f"client {k} sent keys that differ from the exchanged set: unexpected "
                             f"{sorted(set(u.state) - expected)[:3]}, missing {sorted(expected - set(u.state))[:3]}")
    state = fedavg([u.state for _, u in pairs], [u.num_examples for _, u in pairs])
    return state, pairs


def check_trunk(model: nn.Module, expected: str, client_id: int) -> None:
    got = trunk_digest(model)
    if got != expected:
        raise ValueError(
            f"client {client_id}: its frozen trunk differs from the server's (digest {got[:12]} vs "
            f"{expected[:12]}): the hospital built its model from other weights (model.weights_source="
            f"{getattr(model, 'weights_source', '?')!r}). Give every site the same `weights` file.")


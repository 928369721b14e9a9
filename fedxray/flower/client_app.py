"""The Flower ClientApp of one hospital: it reads only its own NIH-layout folder (the SuperNode's
node config data-dir), trains layer4 + fc with fedxray's Client, and replies with the exchanged
state and three numbers (client id, number of examples, training loss). No image or label leaves."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..client import Client
from ..config import Config
from ..data import LABELS, NIHDataset, load_nih
from ..model import build_model
from .records import (ARRAYS, CLIENT_ID, CONFIG, METRICS, NUM_EXAMPLES, SERVER_ROUND, TRUNK_DIGEST,
                      check_trunk, to_state, train_reply)
from .runconfig import check_supported, config_from_run_config, node_settings

log = logging.getLogger(__name__)

# One Client per process, reused while the run config and node config stay the same. The
# deployment engine starts a fresh process for every message, so there it lives one message.
_cache: dict[str, Client] = {}


def _frame(data_dir: Path) -> pd.DataFrame:
    """The hospital's metadata with image paths: every row is one of its training examples."""
    return load_nih(data_dir)


def make_client(config: Config, data_dir: Path, client_id: int) -> Client:
    """A fedxray Client over the hospital's folder, built as FederatedRun builds its clients."""
    key = json.dumps([str(data_dir), client_id, config.to_dict()], sort_keys=True)
    if key in _cache:
        return _cache[key]
    check_supported(config)
    c = config
    device = c.resolve_device()
    torch.manual_seed(c.seed)   # the same random init as the server's (checked by the trunk digest)
    model = build_model(len(LABELS), c.weights).to(device)
    client = Client.from_config(client_id, NIHDataset(_frame(data_dir), c.image_size, preload=c.preload),
                                model, c, device)
    _cache.clear()
    _cache[key] = client
    return client


app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which client this node is, and how many examples it holds (for the server's checks)."""
    data_dir, client_id = node_settings(context.node_config)
    metrics = MetricRecord({CLIENT_ID: client_id, NUM_EXAMPLES: len(_frame(data_dir))})
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training from the global layer4 + fc."""
    data_dir, client_id = node_settings(context.node_config)
    config = config_from_run_config(context.run_config)
    client = make_client(config, data_dir, client_id)
    settings = msg.content[CONFIG]
    if TRUNK_DIGEST in settings:
        check_trunk(client.model, str(settings[TRUNK_DIGEST]), client_id)
    update = client.fit(to_state(msg.content[ARRAYS]), round_num=int(settings[SERVER_ROUND]))
    log.info("client %d, round %s: %d examples, train loss %.4f", client_id, settings[SERVER_ROUND],
             update.num_examples, update.train_loss)
    return Message(train_reply(update, client_id), reply_to=msg)

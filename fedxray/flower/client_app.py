"""The Flower ClientApp of one hospital: it reads only its own NIH-layout folder (the SuperNode's
node config data-dir), trains layer4 + fc with fedxray's Client, and replies with the exchanged
state and three numbers (client id, number of examples, training loss). No image or label leaves.

Every server message is checked before it is used (fedxray.flower.records.check_train_message).
The deployment engine starts a fresh process for every message, so with image_cache or
feature_cache on, the site's caches live on disk in its cache folder (node config cache-dir,
default <data-dir>/.fedxray_cache): the first message decodes every PNG (and runs the frozen
trunk over every image) once, and each later process opens them instead.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from ..cache import build_image_cache
from ..checkpoint import image_list_digest
from ..client import Client
from ..config import Config
from ..data import LABELS, DataError, NIHDataset, load_nih
from ..features import build_feature_cache
from ..model import build_model
from .records import check_train_message, check_trunk, query_reply, train_reply
from .runconfig import (CACHE_DIR, NodeSettings, check_supported, config_from_run_config, log_to_flower,
                        node_settings)

log = logging.getLogger(__name__)


@dataclass
class Site:
    """One hospital as its ClientApp sees it: its usable examples and a Client over them."""
    frame: pd.DataFrame   # the rows it trains on (the image cache leaves undecodable images out)
    client: Client
    digest: str           # image_list_digest(frame): what the server stores and compares on resume


# One Site per process, reused while the run config and node config stay the same. The deployment
# engine starts a fresh process for every message, so there it lives one message.
_sites: dict[str, Site] = {}


def usable_frame(config: Config, node: NodeSettings):
    """The hospital's metadata rows it can train on, and its image cache (None when off). With a
    cache, images that cannot be decoded are excluded (logged), so the count the query reports is
    the count that training weighs."""
    frame = load_nih(node.data_dir)
    if not (config.image_cache or config.feature_cache):
        return frame, None
    _check_writable(node.cache_dir)
    cache = build_image_cache(frame, config.image_size, node.cache_dir, progress=False)
    return cache.usable(frame), cache


def _check_writable(folder: Path) -> None:
    """The site's cache folder (or its nearest existing parent) must be writable: a cache is built,
    repaired and locked there."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not os.access(existing, os.W_OK):
        raise DataError(f"this site's cache folder {folder} is not writable ({existing} is read-only to this "
                        f"process): give the SuperNode a writable one, --node-config '... {CACHE_DIR}=\"/path\"'")


def load_site(config: Config, node: NodeSettings) -> Site:
    """The Site of this node, built as FederatedRun builds its clients (same seed, same model)."""
    key = json.dumps([str(node.data_dir), node.client_id, str(node.cache_dir), config.to_dict()], sort_keys=True)
    if key in _sites:
        return _sites[key]
    check_supported(config)
    c = config
    device = c.resolve_device()
    torch.manual_seed(c.seed)   # the same random init as the server's (checked by the trunk digest)
    model = build_model(len(LABELS), c.weights).to(device)
    frame, cache = usable_frame(c, node)
    if cache is None:
        dataset = NIHDataset(frame, c.image_size, preload=c.preload)
    elif not c.feature_cache:
        dataset = cache.dataset(frame)
    else:   # on disk, so the next message's process reads it instead of running the trunk again
        features = build_feature_cache(model, cache.dataset(frame), device, placement="disk",
                                       dtype=getattr(torch, c.feature_dtype), amp_dtype=c.resolve_amp(device),
                                       batch_size=c.eval_batch_size, progress=False)
        dataset = features.dataset(frame)
    site = Site(frame, Client.from_config(node.client_id, dataset, model, c, device), image_list_digest(frame))
    _sites.clear()
    _sites[key] = site
    return site


app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which client this node is, how many usable examples it holds, and their image-list digest."""
    log_to_flower()
    node = node_settings(context.node_config)
    frame, _ = usable_frame(config_from_run_config(context.run_config), node)
    return Message(query_reply(node.client_id, len(frame), image_list_digest(frame)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training from the global layer4 + fc, after checking what the server sent."""
    log_to_flower()
    node = node_settings(context.node_config)
    config = config_from_run_config(context.run_config)
    start = time.perf_counter()
    site = load_site(config, node)
    setup = time.perf_counter() - start
    client = site.client
    own = client.model.state_dict()
    sent = check_train_message(msg.content, {k: own[k] for k in client.keys}, node.client_id)
    check_trunk(client.model, sent.trunk_digest, node.client_id)
    start = time.perf_counter()
    update = client.fit(sent.state, round_num=sent.server_round)
    log.info("client %d, round %d: %d examples, train loss %.4f; fit %.2f s after %.2f s of setup (model, data%s)",
             node.client_id, sent.server_round, update.num_examples, update.train_loss,
             time.perf_counter() - start, setup, ", caches" if config.image_cache or config.feature_cache else "")
    return Message(train_reply(update, node.client_id, site.digest), reply_to=msg)

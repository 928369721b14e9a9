"""The Flower ClientApp of one hospital: it reads only its own NIH-layout folder (the SuperNode's
node config data-dir), trains layer4 + fc with fedxray's Client on its strategy's objective, and
replies with the exchanged state, three numbers (client id, number of examples, training loss)
and the objective's extra tensors (SCAFFOLD's new control variate). No image or label leaves.

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
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ..checkpoint import image_list_digest
from ..client import Client
from ..config import Config
from ..data import LABELS, DataError, load_nih
from ..objectives import label_counts
from ..federated import planned_rounds
from ..parts import DataSource, model_for, strategy_for
from .records import (IMAGE_LIST_DIGEST, MessageError, check_train_message, check_trunk, query_reply,
                      reply_metrics, train_reply)
from .runconfig import (CACHE_DIR, NodeSettings, check_supported, config_from_run_config, log_to_flower,
                        node_settings)

log = logging.getLogger(__name__)
_SAME_RUN = "run the same fedxray version and run config on the server and every site"


@dataclass
class Site:
    """One hospital as its ClientApp sees it: its usable examples, a Client over them that minimises
    its strategy's objective, and the payload it expects from the server."""
    frame: pd.DataFrame   # the rows it trains on (the image cache leaves undecodable images out)
    client: Client
    digest: str           # image_list_digest(frame): what the server stores and compares on resume
    # The names, shapes and dtypes of the strategy's payload for this client (SCAFFOLD: one
    # correction per trainable exchanged parameter; empty for most strategies).
    payload: dict[str, torch.Tensor]


# One Site per process, reused while the run config and node config stay the same. The deployment
# engine starts a fresh process for every message, so there it lives one message.
_sites: dict[str, Site] = {}


def site_data(config: Config, node: NodeSettings) -> tuple[pd.DataFrame, DataSource]:
    """The hospital's metadata rows it can train on, and the DataSource that serves them (its
    caches in the node's cache folder). With a cache, images that cannot be decoded are excluded
    (logged), so the count the query reports is the count that training weighs."""
    frame = load_nih(node.data_dir)
    if config.image_cache or config.feature_cache:
        _check_writable(node.cache_dir)
    source = DataSource(config, [frame], cache_dir=node.cache_dir)
    return source.usable(frame), source


def _check_writable(folder: Path) -> None:
    """The site's cache folder (or its nearest existing parent) must be writable: a cache is built,
    repaired and locked there."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not os.access(existing, os.W_OK):
        raise DataError(f"this site's cache folder {folder} is not writable ({existing} is read-only to this "
                        f"process): give the SuperNode a writable one, --node-config '... {CACHE_DIR}=\"/path\"'")


def load_site(config: Config, node: NodeSettings) -> Site:
    """The Site of this node, built as fedxray.parts builds the in-process clients (same seed,
    same model, same strategy objective)."""
    key = json.dumps([str(node.data_dir), node.client_id, str(node.cache_dir), config.to_dict()], sort_keys=True)
    if key in _sites:
        return _sites[key]
    check_supported(config)
    c = config
    device = c.resolve_device()
    model = model_for(c, device)   # the same random init as the server's (checked by the trunk digest)
    frame, source = site_data(c, node)
    # On disk, so the next message's process reads the features instead of running the trunk again.
    source.compute_features(model, [frame], device, c.resolve_amp(device), placement="disk")
    strategy = strategy_for(c, model)   # stateless here: only its objective and the payload's form
    # With pos_weight, every train message carries the federation's weights (checked), which replace
    # these before each fit; the site never computes its own.
    client = Client.from_config(node.client_id, source.dataset(frame), model, c, device, strategy.objective,
                                pos_weight=torch.ones(len(LABELS)) if c.pos_weight else None,
                                dp_delta=c.dp_delta)   # (Flower asks dp-delta of per-patient DP-SGD: check_supported)
    own = model.state_dict()
    payload = strategy.payload(node.client_id, {k: own[k].detach().cpu() for k in client.keys})
    site = Site(frame, client, image_list_digest(frame), {k: v.detach().cpu() for k, v in payload.items()})
    _sites.clear()
    _sites[key] = site
    return site


app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which client this node is, how many usable examples it holds, its positives per finding, and
    their image-list digest."""
    log_to_flower()
    node = node_settings(context.node_config)
    frame, _ = site_data(config_from_run_config(context.run_config), node)
    n, positives = label_counts(frame)   # counts, never images: for the federation's pos_weight
    return Message(query_reply(node.client_id, n, image_list_digest(frame), positives.tolist()), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training from the global layer4 + fc (and the strategy's payload), after
    checking what the server sent; the reply carries the objective's extra tensors, if any. With
    secagg the message goes through Flower's secaggplus_mod, which runs the protocol's stages and
    calls secure_train for the training one (fedxray.flower.secure)."""
    log_to_flower()
    config = config_from_run_config(context.run_config)
    if config.secagg:
        from flwr.client.mod import secaggplus_mod
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
        if RECORD_KEY_CONFIGS not in msg.content:
            raise MessageError(f"client {node_settings(context.node_config).client_id}: the run config says secagg=true, "
                               f"but the server's train message is not a SecAgg+ stage; {_SAME_RUN}")
        return secaggplus_mod(msg, context, secure_train)
    node = node_settings(context.node_config)
    site, update, _ = _fit(msg.content, config, node)
    return Message(train_reply(update, node.client_id, site.digest, config.dp), reply_to=msg)


def secure_train(msg: Message, context: Context) -> Message:
    """The training stage of a SecAgg+ round: the same checks and training as a plain round; the
    reply, in the legacy FitRes form the mod reads, holds the update (trained minus global state,
    sorted by key) for the mod to quantise and mask, its weight (its examples, or 1 under
    client-level DP) and the clear numbers of a plain reply."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
    from .secure import client_weight, clipping_range, fit_reply
    config = config_from_run_config(context.run_config)
    node = node_settings(context.node_config)
    content = RecordDict({k: v for k, v in msg.content.items() if k != RECORD_KEY_CONFIGS})
    site, update, sent = _fit(content, config, node)
    r, sent = sent.server_round, sent.state
    clip = clipping_range(config)
    arrays = []
    for key in sorted(sent):
        delta = update.state[key].detach().cpu().double() - sent[key].detach().cpu().double()
        worst = float(delta.abs().max()) if delta.numel() else 0.0
        if not worst <= clip * (1 + 1e-6):   # (float32 rounding of a clipped update)
            raise ValueError(f"client {node.client_id}, round {r}: its update moves "
                             f"{key!r} by {worst:.3g}, beyond the SecAgg+ quantiser's range +-{clip:g} (it would be "
                             f"clipped silently): nothing was sent. Lower the learning rate or the local epochs"
                             + (", or raise dp-clip-norm" if config.dp == "client" else ""))
        arrays.append(delta.numpy())
    metrics = {**reply_metrics(update, node.client_id, config.dp), IMAGE_LIST_DIGEST: site.digest}
    return Message(fit_reply(arrays, client_weight(config, update.num_examples), metrics), reply_to=msg)


def _fit(content: RecordDict, config: Config, node: NodeSettings):
    """Check the server's train message, train, log: (site, update, the checked TrainInstruction)."""
    start = time.perf_counter()
    site = load_site(config, node)
    setup = time.perf_counter() - start
    client = site.client
    own = client.model.state_dict()
    sent = check_train_message(content, {k: own[k] for k in client.keys}, node.client_id, site.payload,
                               pos_weight=config.pos_weight)
    if sent.pos_weight is not None:
        client.pos_weight = sent.pos_weight
    check_trunk(client.model, sent.trunk_digest, node.client_id)
    if config.dp == "example":   # this process is new: its accountant counts the rounds sampled before this one
        client.rounds_trained = planned_rounds(config, sent.server_round - 1)[node.client_id]
    start = time.perf_counter()
    update = client.fit(sent.state, round_num=sent.server_round, payload=sent.payload)
    log.info("client %d, round %d: %d examples, %s; fit %.2f s after %.2f s of setup (model, data%s)",
             node.client_id, sent.server_round, update.num_examples,
             f"epsilon {update.epsilon:.4g}" if update.epsilon is not None else
             "no loss sent (DP)" if config.dp else f"train loss {update.train_loss:.4f}",
             time.perf_counter() - start, setup, ", caches" if config.image_cache or config.feature_cache else "")
    return site, update, sent

"""Flower's run config and node config as fedxray settings: one run-config key per Config field
(kebab-case), plus the server's folders and its fault tolerance; each SuperNode names its own data
folder, client id and (optionally) cache folder."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from ..config import Config

# The Flower App (its pyproject.toml) that `flwr run` submits; its [tool.flwr.app.config] lists
# every key below with its default.
APP_DIR = Path(__file__).resolve().parent / "app"
# Run-config keys that are not Config fields: where the server reads and writes (absolute paths),
SERVER_KEYS = ("output-dir", "val-dir", "test-dir")
# and what the server does when hospitals fail (see FaultPolicy),
FAULT_KEYS = ("min-replies", "round-timeout")
FLOWER_KEYS = SERVER_KEYS + FAULT_KEYS
DEFAULT_ROUND_TIMEOUT_S = 3600.0
# Node-config keys of each SuperNode (`--node-config 'data-dir="/data/hospital_0" client-id=0'`);
# cache-dir is optional (default: <data-dir>/.fedxray_cache, see node_settings).
DATA_DIR, CLIENT_ID, CACHE_DIR = "data-dir", "client-id", "cache-dir"
NODE_CACHE = ".fedxray_cache"


@dataclass(frozen=True)
class FaultPolicy:
    """What a round does when hospitals fail, do not answer in time, or send a refused reply.

    min_replies: a round is aggregated over the clients that replied validly when at least this
    many did (the others are dropped and recorded); else the run stops, keeping the checkpoint of
    the last complete round. None (run config "") is the strict default: every sampled client.
    round_timeout: seconds the server waits for a round's replies (and for the query's answers).
    """
    min_replies: Optional[int] = None
    round_timeout: float = DEFAULT_ROUND_TIMEOUT_S

    def required(self, sampled: int) -> int:
        """Valid replies a round of `sampled` clients needs."""
        return sampled if self.min_replies is None else min(self.min_replies, sampled)


@dataclass(frozen=True)
class NodeSettings:
    data_dir: Path    # the hospital's NIH-layout folder: its training data
    client_id: int
    cache_dir: Path   # its own image and feature caches (never shared with another site)


@dataclass(frozen=True)
class ServerPaths:
    output_dir: Path   # history.csv, config.json, run_info.json, checkpoint.pt (while running), final_model.pt
    val_dir: Path      # NIH-layout folders held by the server, never sent to the clients
    test_dir: Path


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


def _optional(field: dataclasses.Field) -> bool:
    return "Optional" in str(field.type) or "None" in str(field.type)


def config_from_run_config(run_config: Mapping[str, Any]) -> Config:
    """The fedxray Config of a Flower run. TOML has no null: "" stands for None in Optional fields."""
    fields = {_key(f.name): f for f in dataclasses.fields(Config)}
    kwargs = {}
    for key, value in run_config.items():
        if key in FLOWER_KEYS:
            continue
        field = fields.get(key)
        if field is None:
            raise ValueError(f"run config key {key!r} is neither a fedxray Config field (as kebab-case, "
                             f"e.g. 'batch-size') nor one of {FLOWER_KEYS}")
        kwargs[field.name] = None if value == "" and _optional(field) else value
    return Config(**kwargs)


def check_supported(config: Config) -> None:
    """Refuse the settings the Flower app does not honour, rather than ignoring them."""
    problems = []
    if config.local_keys:
        problems.append(f"local-keys={config.local_keys!r} (personalization): the server evaluates one global "
                        f"model and never sees what the hospitals keep; leave local-keys \"\"")
    if config.site_test_fraction:
        problems.append(f"site-test-fraction={config.site_test_fraction}: each hospital's own test set is scored "
                        f"in process only; leave it 0")
    if config.max_images is not None:
        problems.append(f"max_images={config.max_images}: the folders define the data; cap the splits "
                        f"(fedxray.federated.cap_splits) before writing them and leave max-images \"\"")
    if config.dp == "example" and config.dp_delta is None:
        problems.append("dp='example' with dp-delta \"\": its default comes from the federation's patient count, which "
                        "no Flower server knows (the sites report images, not patients); set dp-delta, e.g. 1e-5 or "
                        "below 0.1 / the federation's patients")
    if config.secagg and config.dp != "client":
        sampled = most_sampled(config)
        if sampled < 2:
            problems.append(f"secagg with {sampled} client per round (num-clients={config.num_clients}, fraction-fit="
                            f"{config.fraction_fit}): a secure sum of one update is that update; sample at least 2")
    if problems:
        raise ValueError("the Flower app does not support " + "; ".join(problems))


def most_sampled(config: Config) -> int:
    """The most clients a round samples: fedxray.federated.sample_clients' fixed number, or every
    client under client-level DP (Poisson sampling: any number per round)."""
    if config.dp == "client":
        return config.num_clients
    from ..federated import sample_clients
    return len(sample_clients(config.num_clients, config.fraction_fit, config.seed, 1))


def run_config_from_config(config: Config) -> dict[str, Any]:
    """Config -> run-config values (kebab-case keys, None as "")."""
    return {_key(k): "" if v is None else v for k, v in config.to_dict().items()}


def fault_policy(run_config: Mapping[str, Any], config: Config) -> FaultPolicy:
    """The run's FaultPolicy from min-replies ("" or absent: every sampled client) and
    round-timeout (seconds, absent: DEFAULT_ROUND_TIMEOUT_S), checked against the config."""
    sampled = most_sampled(config)
    raw = run_config.get("min-replies", "")
    if raw == "":
        min_replies = None
    elif isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= sampled:
        raise ValueError(f"run config 'min-replies' must be \"\" (every sampled client) or an integer from 1 to "
                         f"the {sampled} client(s) sampled per round (num-clients={config.num_clients}, "
                         f"fraction-fit={config.fraction_fit}), got {raw!r}")
    else:
        min_replies = raw
    timeout = run_config.get("round-timeout", DEFAULT_ROUND_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ValueError(f"run config 'round-timeout' must be a number of seconds > 0, got {timeout!r}")
    return FaultPolicy(min_replies, float(timeout))


def server_paths(run_config: Mapping[str, Any]) -> ServerPaths:
    """The server's folders from the run config; each must be set, and absolute (the ServerApp
    runs in a process started by the SuperLink, whose working directory is not yours)."""
    paths = {}
    for key in SERVER_KEYS:
        value = str(run_config.get(key, ""))
        if not value or not os.path.isabs(value):
            raise ValueError(f"run config {key!r} must be an absolute path, got {value!r}: pass it with "
                             f"`flwr run ... --run-config '{key}=\"/abs/path\"'` or in a run-config TOML file")
        paths[key.replace("-", "_")] = Path(value)
    return ServerPaths(**paths)


def node_settings(node_config: Mapping[str, Any]) -> NodeSettings:
    """Data folder, client id and cache folder of a SuperNode, from its --node-config. The cache
    folder is the node's cache-dir, else <data-dir>/.fedxray_cache (a dot folder, which the image
    index never reads): per site, so two hospitals on one machine never share or lock each other's
    caches. The run config's cache-dir is the server's."""
    missing = [k for k in (DATA_DIR, CLIENT_ID) if k not in node_config]
    if missing:
        raise ValueError(f"SuperNode node config lacks {missing} (has {sorted(node_config)}): start it with "
                         f"--node-config '{DATA_DIR}=\"/path/to/hospital_k\" {CLIENT_ID}=k'")
    client_id = node_config[CLIENT_ID]
    if isinstance(client_id, bool) or not isinstance(client_id, int) or client_id < 0:
        raise ValueError(f"node config {CLIENT_ID} must be an integer >= 0, got {client_id!r}")
    data_dir = Path(str(node_config[DATA_DIR]))
    cache = str(node_config.get(CACHE_DIR, ""))
    return NodeSettings(data_dir, client_id, Path(cache) if cache else data_dir / NODE_CACHE)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"run config values must be finite, got {value}")
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        return json.dumps(str(value))   # a JSON string is a valid TOML basic string
    raise TypeError(f"run config values must be bool, int, float or str, got {type(value).__name__}")


def write_run_config(path: str | os.PathLike, config: Config, output_dir: str | os.PathLike,
                     val_dir: str | os.PathLike, test_dir: str | os.PathLike,
                     faults: FaultPolicy = FaultPolicy()) -> Path:
    """A TOML file of run-config overrides for `flwr run <app> <superlink> --run-config FILE`:
    every Config field, the server's folders (made absolute) and its fault policy."""
    values = run_config_from_config(config)
    values.update({"output-dir": Path(output_dir).resolve(), "val-dir": Path(val_dir).resolve(),
                   "test-dir": Path(test_dir).resolve(),
                   "min-replies": "" if faults.min_replies is None else faults.min_replies,
                   "round-timeout": float(faults.round_timeout)})
    path = Path(path)
    path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items()), encoding="utf-8")
    return path


def log_to_flower() -> None:
    """Send fedxray's INFO records where Flower's go: the SuperLink's log (`flwr log`) for the
    ServerApp, the SuperNode's output for a ClientApp."""
    ours, flowers = logging.getLogger("fedxray"), logging.getLogger("flwr")
    for handler in flowers.handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    ours.setLevel(logging.INFO)

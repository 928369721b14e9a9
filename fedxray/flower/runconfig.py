"""Flower's run config and node config as fedxray settings: one run-config key per Config field
(kebab-case), plus the server's folders; each SuperNode names its own data folder and client id."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..config import Config

# The Flower App (its pyproject.toml) that `flwr run` submits; its [tool.flwr.app.config] lists
# every key below with its default.
APP_DIR = Path(__file__).resolve().parent / "app"
# Run-config keys that are not Config fields: where the server reads and writes (absolute paths).
SERVER_KEYS = ("output-dir", "val-dir", "test-dir")
# Node-config keys of each SuperNode (`--node-config 'data-dir="/data/hospital_0" client-id=0'`).
DATA_DIR, CLIENT_ID = "data-dir", "client-id"


@dataclass(frozen=True)
class ServerPaths:
    output_dir: Path   # history.csv, config.json, checkpoint.pt, run_info.json, final_model.pt
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
        if key in SERVER_KEYS:
            continue
        field = fields.get(key)
        if field is None:
            raise ValueError(f"run config key {key!r} is neither a fedxray Config field (as kebab-case, "
                             f"e.g. 'batch-size') nor one of {SERVER_KEYS}")
        kwargs[field.name] = None if value == "" and _optional(field) else value
    return Config(**kwargs)


def check_supported(config: Config) -> None:
    """Refuse the settings the Flower app does not honour, rather than ignoring them."""
    problems = []
    if config.bn_policy != "average":
        problems.append(f"bn_policy={config.bn_policy!r} (FedBN): the server evaluates one global model "
                        f"and never sees the hospitals' BatchNorm statistics; use 'average'")
    if config.max_images is not None:
        problems.append(f"max_images={config.max_images}: the folders define the data; cap the splits "
                        f"(fedxray.federated.cap_splits) before writing them and leave max-images \"\"")
    for name in ("image_cache", "feature_cache"):
        if getattr(config, name, False):
            problems.append(f"{name}=True: the Flower app does not use fedxray's caches yet; set it false")
    if problems:
        raise ValueError("the Flower app does not support " + "; ".join(problems))


def run_config_from_config(config: Config) -> dict[str, Any]:
    """Config -> run-config values (kebab-case keys, None as "")."""
    return {_key(k): "" if v is None else v for k, v in config.to_dict().items()}


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


def node_settings(node_config: Mapping[str, Any]) -> tuple[Path, int]:
    """(data folder, client id) of a SuperNode, from its --node-config."""
    missing = [k for k in (DATA_DIR, CLIENT_ID) if k not in node_config]
    if missing:
        raise ValueError(f"SuperNode node config lacks {missing} (has {sorted(node_config)}): start it with "
                         f"--node-config '{DATA_DIR}=\"/path/to/hospital_k\" {CLIENT_ID}=k'")
    client_id = node_config[CLIENT_ID]
    if isinstance(client_id, bool) or not isinstance(client_id, int) or client_id < 0:
        raise ValueError(f"node config {CLIENT_ID} must be an integer >= 0, got {client_id!r}")
    return Path(str(node_config[DATA_DIR])), client_id


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
                     val_dir: str | os.PathLike, test_dir: str | os.PathLike) -> Path:
    """A TOML file of run-config overrides for `flwr run <app> <superlink> --run-config FILE`:
    every Config field, and the server's folders (made absolute)."""
    values = run_config_from_config(config)
    values.update({"output-dir": Path(output_dir).resolve(), "val-dir": Path(val_dir).resolve(),
                   "test-dir": Path(test_dir).resolve()})
    path = Path(path)
    path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items()), encoding="utf-8")
    return path

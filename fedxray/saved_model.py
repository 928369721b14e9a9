"""A finished run on disk, and the model it trained, loadable in one call.

When a run ends, its checkpoint is replaced by one sealed file: `final_model.pt` (or, for a run
asked to keep no weights, such as each client of the local-only baseline, `final_result.pt`).
It holds what the run trained (layer4 and fc, and each client's BatchNorm under FedBN), the
history, config, run info and input digests (so that running the same configuration again is
recognised as done, with the same checks as a resume) and a reference to the frozen trunk: its
digest and the weights it came from. The trunk itself is not stored with each run: named weights
("imagenet", a .pth file) are loaded again by name, and a random trunk, rebuilt from the run's
seed, is also stored once per output root (trunks/trunk-<digest>.pt) in case another torch
initialises differently. `load_model(path)` rebuilds the whole model and checks the trunk digest.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from .checkpoint import (FINAL_MODEL, FINAL_RESULT, HISTORY, MALFORMED, CheckpointError, decoded, is_seconds,
                         read_weights_file, seal, unsealed)
from .config import Config
from .data import LABELS
from .history import frame as history_frame
from .io import atomic_write
from .model import EXCHANGED_PREFIXES, ChestXrayResNet, build_model, private_norm, state_problems, trunk_digest

log = logging.getLogger(__name__)

FINISHED = (FINAL_MODEL, FINAL_RESULT)
KIND = "fedxray final model"
TRUNK_KIND = "fedxray trunk"
FORMAT = 1
TRUNKS = "trunks"
_TRUNK_SEARCH_DEPTH = 4      # the model's folder and three above (the notebook's root is two above)
_LOADING: set[Path] = set()    # final models being loaded now: a trunk source that leads back is refused
_FIELDS = ("kind", "format", "round", "state", "local_states", "labels", "trunk", "history", "config", "info",
           "inputs", "seconds", "checksum")


def trunk_file(digest: str) -> str:
    return f"trunk-{digest[:16]}.pt"


def is_random(source: str) -> bool:
    return str(source).startswith("random")


# --------------------------------------------------------------------------- writing

def save_final(output_dir: str | os.PathLike, model: ChestXrayResNet, round_num: int,
               local_states: Mapping[int, Mapping[str, torch.Tensor]], rows: list[dict], config: Config,
               info: dict, inputs: Mapping[str, str], seconds: float, keep_model: bool = True,
               trunk_dir: Optional[str | os.PathLike] = None) -> Path:
    """Write the finished run's one file (atomically, sealed): final_model.pt with the trained part
    of `model` (its layer4 and fc, as loaded now) when keep_model, else final_result.pt without
    weights; history.csv is written first, with every row. A random trunk is stored once in trunk_dir (default: output_dir's parent's trunks/)."""
    output_dir = Path(output_dir)
    digest = inputs["trunk"]
    source = model.weights_source
    stored = ""
    if keep_model and is_random(source):
        folder = Path(trunk_dir) if trunk_dir is not None else output_dir.parent / TRUNKS
        stored = str(store_trunk(model, folder, digest))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k.startswith(EXCHANGED_PREFIXES)}
    record = seal({
        "kind": KIND, "format": FORMAT, "round": int(round_num),
        "state": state if keep_model else {},
        "local_states": {int(c): {k: v.detach().cpu() for k, v in s.items()} for c, s in local_states.items()}
        if keep_model else {},
        "labels": list(LABELS),
        "trunk": {"digest": digest, "source": str(source), "seed": int(config.seed), "stored": stored},
        "history": json.dumps(rows), "config": json.dumps(config.to_dict()), "info": json.dumps(info),
        "inputs": {str(k): str(v) for k, v in inputs.items()}, "seconds": float(seconds),
    })
    path = output_dir / (FINAL_MODEL if keep_model else FINAL_RESULT)
    table = history_frame(rows)   # history.csv first: it holds the rows the last checkpoint did not
    atomic_write(output_dir / HISTORY, lambda tmp: table.to_csv(tmp, index=False))
    atomic_write(path, lambda tmp: torch.save(record, tmp))
    return path


def store_trunk(model: ChestXrayResNet, folder: Path, digest: str) -> Path:
    """folder/trunk-<digest>.pt, written once (an intact one already there is kept)."""
    path = folder / trunk_file(digest)
    if path.exists():
        try:
            _read_trunk(path, digest)
            return path
        except CheckpointError as e:
            log.warning("%s; writing it again", e)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith(EXCHANGED_PREFIXES)}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(seal({"kind": TRUNK_KIND, "digest": digest, "state": state}), tmp))
    return path


# --------------------------------------------------------------------------- reading

def load_final(path: str | os.PathLike) -> dict:
    """A verified finished-run record: round, state, local_states, trunk, history (rows), config
    (dict), info, inputs, seconds. CheckpointError names the file and the remedy."""
    path = Path(path)
    rec = read_weights_file(path, "final model")
    remedy = "delete it to train this run again (or start over with resume=False)"
    if not isinstance(rec, dict) or rec.get("kind") != KIND or rec.get("format") != FORMAT or set(rec) != set(_FIELDS):
        raise CheckpointError(f"{path} is not a fedxray final model of format {FORMAT} (a model saved by "
                              f"another fedxray version, or another file): {remedy}")
    rec = unsealed(rec, path, remedy)
    try:
        out = decoded(rec, "state")
        trunk = rec["trunk"]
        if not (isinstance(trunk, dict) and isinstance(trunk.get("digest"), str) and isinstance(trunk.get("source"), str)):
            raise ValueError("its trunk reference is malformed")
        if list(rec["labels"]) != list(LABELS):
            raise ValueError(f"its labels {rec['labels']} are not fedxray's {list(LABELS)}")
        if not is_seconds(rec["seconds"]):
            raise ValueError(f"its seconds {rec['seconds']!r} is not a time")
    except MALFORMED as e:
        raise CheckpointError(f"{path} has a malformed entry ({e}): {remedy}") from None
    return out


def finished(output_dir: str | os.PathLike) -> Optional[Path]:
    """The finished-run file in output_dir, if any."""
    for name in FINISHED:
        if (Path(output_dir) / name).exists():
            return Path(output_dir) / name
    return None


def load_model(path: str | os.PathLike, client: Optional[int] = None, weights: Optional[str] = None,
               trunk: Optional[str | os.PathLike] = None) -> ChestXrayResNet:
    """The whole model a run trained, from its final_model.pt, in eval mode on the CPU.

    The trunk is rebuilt from the weights the run used (or `weights`, e.g. the ImageNet file's
    path on this machine) and must have the digest the run recorded; else a stored trunk
    (`trunk`, or trunks/trunk-<digest>.pt in the file's folder or up to three folders above) is used.
    client: under personalization (local_keys "bn", "fc"), whose kept entries to use (default: the
        global model's).
    """
    path = Path(path)
    if path.resolve() in _LOADING:
        raise CheckpointError(f"{path}: its trunk is said to come from a final model that leads back to it "
                              f"(a file edited by hand?); pass weights= or trunk=")
    _LOADING.add(path.resolve())
    try:
        return _load_model(path, client, weights, trunk)
    finally:
        _LOADING.discard(path.resolve())


def _load_model(path: Path, client, weights, trunk) -> ChestXrayResNet:
    rec = load_final(path)
    if not rec["state"]:
        raise CheckpointError(f"{path} is a finished run that kept no weights (e.g. a local-only client); "
                              f"there is no model to load")
    ref = rec["trunk"]
    model, tried = None, []
    for candidate in _trunk_candidates(path, ref, weights, trunk):
        try:
            m = candidate()
        except (OSError, RuntimeError, CheckpointError) as e:
            tried.append(str(e))
            continue
        if trunk_digest(m) == ref["digest"]:
            model = m
            break
        tried.append(f"{m.weights_source}: another trunk (digest {trunk_digest(m)[:12]})")
    if model is None:
        raise CheckpointError(
            f"{path}: no trunk with digest {ref['digest'][:12]} (weights {ref['source']!r}) was found ("
            + "; ".join(tried) + "). Pass weights= the weights file the run used, or trunk= its "
            f"{trunk_file(ref['digest'])} (kept under {TRUNKS}/ in the run's output root)")
    if (rec.get("config") or {}).get("dp") or (rec.get("config") or {}).get("secagg"):
        private_norm(model)   # as fedxray.parts.model_for built it for a DP or secagg run
    problems = state_problems(rec["state"], {k: v for k, v in model.state_dict().items()
                                            if k.startswith(EXCHANGED_PREFIXES)})
    if problems:
        raise CheckpointError(f"{path}: its trained state does not fit ResNet-34 ({'; '.join(problems[:3])})")
    model.load_state_dict(rec["state"], strict=False)
    if client is not None:
        if client not in rec["local_states"]:
            raise ValueError(f"{path} holds no local state of client {client} "
                             f"(has {sorted(rec['local_states'])})")
        model.load_state_dict(rec["local_states"][client], strict=False)
    model.trained_by = str(path)
    return model.eval()


def _trunk_candidates(path: Path, ref: dict, weights: Optional[str], trunk) -> Sequence:
    digest, source = ref["digest"], ref["source"]

    def named(w):
        def build():
            if is_random(w):
                torch.manual_seed(int(ref.get("seed", 0)))   # as fedxray.parts.model_for built it
                return build_model(len(LABELS), None)
            return build_model(len(LABELS), w)
        return build

    def stored(file: Path):
        def build():
            state = _read_trunk(file, digest)
            m = build_model(len(LABELS), None)
            m.load_state_dict(state, strict=False)
            m.weights_source = source
            return m
        return build

    out = []
    if weights is not None:
        out.append(named(weights))
    if trunk is not None:
        out.append(stored(Path(trunk)))
    if source == "imagenet" or is_random(source):
        out.append(named(source))
    elif source.startswith("file:"):
        out.append(named(source.removeprefix("file:")))
    for folder in [path.parent, *path.parent.parents][:_TRUNK_SEARCH_DEPTH]:
        for f in (folder / trunk_file(digest), folder / TRUNKS / trunk_file(digest)):
            if f.exists():
                out.append(stored(f))
    return out


def _read_trunk(path: Path, digest: str) -> dict[str, torch.Tensor]:
    rec: Any = read_weights_file(path, "trunk")
    if not isinstance(rec, dict) or rec.get("kind") != TRUNK_KIND or rec.get("digest") != digest:
        raise CheckpointError(f"{path} is not the fedxray trunk {digest[:12]}")
    return unsealed(rec, path, "delete it")["state"]

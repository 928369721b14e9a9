"""Checkpoints and final models: written atomically with a checksum, read back with
torch.load(weights_only=True) (so a crafted file cannot run code), verified, and compared with the
run that resumes them (config, weights, trunk and every image list).

A checkpoint holds only tensors and plain values: states as tensors, the history, config and run
info as JSON text, the RNG states as tensors and numbers. Its `checksum` is a SHA-256 over all
of that, so a flipped byte in a tensor is caught, not trained on.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd
import torch

from .config import Config
from .data import LABELS
from .history import frame as history_frame
from .io import atomic_write, remove_orphan_temporaries

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
HISTORY = "history.csv"
CONFIG = "config.json"
RUN_INFO = "run_info.json"
FINAL_MODEL = "final_model.pt"      # a finished run: fedxray.saved_model
FINAL_RESULT = "final_result.pt"    # a finished run that kept no weights
RUN_FILES = (CHECKPOINT, HISTORY, CONFIG, RUN_INFO, FINAL_MODEL, FINAL_RESULT)
FORMAT = 2   # 1: the first release's pickled checkpoints (weights_only=False), no longer read
_FIELDS = ("format", "round", "global_state", "local_states", "history", "config", "info", "inputs",
           "extra", "rng", "checksum")


class CheckpointError(ValueError):
    """A checkpoint or model file that cannot be used; the message names it and the remedy."""


# --------------------------------------------------------------------------- digests

def image_list_digest(frame: pd.DataFrame) -> str:
    """SHA-256 of a table's image names and label vectors, in row order: what identifies the data
    a client, val or test was given (cheap: no image is read)."""
    h = hashlib.sha256()
    h.update("\n".join(frame["image"].astype(str)).encode())
    h.update(b"\0")
    h.update(np.ascontiguousarray(frame.loc[:, list(LABELS)].to_numpy(np.uint8)).tobytes())
    return h.hexdigest()


def payload_digest(obj: Any) -> str:
    """SHA-256 of a nest of dicts, lists, tensors and plain values (keys sorted, tensors by dtype,
    shape and bytes)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"cannot checksum a {type(obj).__name__}: keep checkpoints to tensors and plain values")


def seal(payload: dict) -> dict:
    """payload with a "checksum" entry: the SHA-256 of everything else in it."""
    return {**payload, "checksum": payload_digest(payload)}


def seal_problem(payload: dict) -> Optional[str]:
    """Why a sealed payload (see seal) cannot be trusted, as a predicate for its file's name
    ("fails its checksum ..."), or None when its checksum holds."""
    body = {k: v for k, v in payload.items() if k != "checksum"}
    try:
        actual = payload_digest(body)
    except TypeError as e:
        return f"holds unexpected content ({e})"
    stored = payload.get("checksum")
    if stored != actual:
        return (f"fails its checksum (stored {str(stored)[:12]}, computed {actual[:12]}): the file was damaged "
                f"or edited after fedxray wrote it")
    return None


# --------------------------------------------------------------------------- writing

def save_checkpoint(output_dir: str | os.PathLike, round_num: int, global_state: Mapping[str, torch.Tensor],
                    local_states: Mapping[int, Mapping[str, torch.Tensor]], rows: list[dict], config: Config,
                    info: dict, inputs: Mapping[str, str], extra: Optional[dict] = None) -> None:
    """history.csv, then checkpoint.pt, each atomically: the checkpoint names the last complete round.

    inputs: what identifies the run's inputs ("trunk" digest, "val", "test", "client_k" image-list
    digests); a resume whose inputs differ is refused. extra: more state of the caller (tensors and
    plain values only), returned as is by load_checkpoint.
    """
    output_dir = Path(output_dir)
    hist = history_frame(rows)
    atomic_write(output_dir / HISTORY, lambda tmp: hist.to_csv(tmp, index=False))
    seed_name, key, pos, has_gauss, gauss = np.random.get_state()
    ckpt = {
        "format": FORMAT, "round": int(round_num),
        "global_state": {k: v.detach().cpu() for k, v in global_state.items()},
        "local_states": {int(c): {k: v.detach().cpu() for k, v in s.items()} for c, s in local_states.items()},
        "history": json.dumps(rows), "config": json.dumps(config.to_dict()), "info": json.dumps(info),
        "inputs": {str(k): str(v) for k, v in inputs.items()}, "extra": dict(extra or {}),
        "rng": {"torch": torch.get_rng_state(), "numpy_name": str(seed_name),
                "numpy_key": torch.from_numpy(np.asarray(key, np.int64)), "numpy_pos": int(pos),
                "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(gauss)},
    }
    ckpt = seal(ckpt)
    atomic_write(output_dir / CHECKPOINT, lambda tmp: torch.save(ckpt, tmp))


def clean_orphans(output_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed process left while writing this folder's run files.
    Call it only while holding the folder's run lock (no other process is writing there)."""
    removed = remove_orphan_temporaries(output_dir, *RUN_FILES)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted write in %s", len(removed), output_dir)
    return removed


# --------------------------------------------------------------------------- reading

# Before torch 2.6, torch.load(weights_only=True) could be made to run code (CVE-2025-32434).
SAFE_LOAD_TORCH = (2, 6)


def check_safe_torch(path: str | os.PathLike) -> None:
    """Refuse to read a weights file with a torch whose weights_only loader is not safe."""
    version = tuple(int(x) for x in re.findall(r"\d+", str(torch.__version__))[:2])
    if version < SAFE_LOAD_TORCH:
        raise CheckpointError(f"not reading {path} with torch {torch.__version__}: before "
                              f"{'.'.join(map(str, SAFE_LOAD_TORCH))}, torch.load(weights_only=True) can be "
                              f"made to run code (CVE-2025-32434). Upgrade torch: pip install 'torch>=2.6'")


def read_weights_file(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """torch.load(path, weights_only=True), any failure as CheckpointError naming the file. A file
    that holds anything but tensors and plain values is refused before any of it runs."""
    path = Path(path)
    check_safe_torch(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        unsafe = "weights_only" in str(e) or "Unsupported global" in str(e)
        why = ("it holds Python objects other than tensors and plain values: a checkpoint of fedxray's first "
               "release (which pickled numpy's RNG state) or a file crafted to run code on load; it was not "
               "loaded and none of it ran" if unsafe else
               f"it is corrupt or truncated ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        raise CheckpointError(f"cannot read the {what} {path}: {why}. Delete it, or start over "
                              f"(resume=False or another output_dir)") from e


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A verified checkpoint: round, global_state, local_states, history (rows), config (dict),
    info, inputs, extra, rng. CheckpointError names the file and the remedy when it cannot be read,
    was written by another fedxray format, or fails its checksum."""
    path = Path(path)
    ckpt = read_weights_file(path)
    remedy = "delete it, or start over with resume=False (or another output_dir)"
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or set(ckpt) != set(_FIELDS):
        found = ckpt.get("format", "none") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a fedxray checkpoint of format {FORMAT} (found format "
                              f"{found}): {remedy}")
    ckpt = unsealed(ckpt, path, remedy)
    try:
        return decoded(ckpt, "global_state")
    except MALFORMED as e:
        raise CheckpointError(f"{path} has a malformed entry ({e}): {remedy}") from None


# What decoding a record with unexpected entries raises.
MALFORMED = (ValueError, TypeError, KeyError, AttributeError)


def unsealed(record: dict, path: Path, remedy: str) -> dict:
    """A sealed record (see seal) without its checksum, once the checksum holds; else
    CheckpointError naming the file and the remedy."""
    problem = seal_problem(record)
    if problem:
        raise CheckpointError(f"{path} {problem}; {remedy}")
    return {k: v for k, v in record.items() if k != "checksum"}


def decoded(record: dict, state_key: str) -> dict:
    """A checkpoint's or a finished run's record with its JSON entries (history, config, info)
    decoded, after checking that record[state_key] and each of its local_states maps names to
    tensors (one of MALFORMED otherwise)."""
    states = {state_key: record[state_key], **{f"local_states[{c}]": s for c, s in record["local_states"].items()}}
    for name, state in states.items():
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            raise ValueError(f"{name} is not a mapping of names to tensors")
    return {**record, **{k: json.loads(record[k]) for k in ("history", "config", "info")}}


def is_seconds(value: Any) -> bool:
    """A run time as a checkpoint or a finished run stores it: a finite float >= 0."""
    return isinstance(value, float) and math.isfinite(value) and value >= 0


def restore_rng(ckpt: dict) -> None:
    """Set torch's and numpy's global RNGs to the states a checkpoint saved."""
    rng = ckpt["rng"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state((rng["numpy_name"], rng["numpy_key"].numpy().astype(np.uint32), rng["numpy_pos"],
                         rng["numpy_has_gauss"], rng["numpy_gauss"]))


def check_resume(ckpt: dict, path: str | os.PathLike, config: Config, info: dict,
                 inputs: Mapping[str, str]) -> None:
    """Refuse to resume a checkpoint written by another experiment: another configuration, other
    weights, another trunk or other images for any client, val or test. The error lists each
    difference (saved vs now) and the remedy."""
    try:
        saved = Config.from_dict(ckpt["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} holds a configuration this fedxray cannot read ({e}): use another "
                              f"output_dir, or resume=False to start over") from None
    changes = []
    if not saved.same_experiment(config):
        diff = {k: (v, getattr(config, k)) for k, v in saved.to_dict().items() if v != getattr(config, k)}
        changes.append(f"another configuration (saved vs now: {diff})")
    if ckpt["info"].get("weights_source") != info.get("weights_source"):
        changes.append(f"other weights (saved {ckpt['info'].get('weights_source')!r}, now "
                       f"{info.get('weights_source')!r})")
    saved_inputs = ckpt["inputs"]
    for name in sorted(set(saved_inputs) | set(inputs), key=_input_order):
        before, now = saved_inputs.get(name), inputs.get(name)
        if before == now:
            continue
        if name == "trunk":
            changes.append("another frozen trunk (the weights file changed, or other weights were resolved)")
        elif before is None or now is None:
            changes.append(f"{name} {'was not in the saved run' if before is None else 'is not in this run'}")
        else:
            changes.append(f"other images or labels for {name}")
    if changes:
        raise CheckpointError(f"{path} was written by another run: " + "; ".join(changes) +
                              ". Use another output_dir, or resume=False to start over")


def _input_order(name: str):
    head, _, num = name.partition("_")
    return (head != "trunk", head, int(num) if num.isdigit() else -1, name)

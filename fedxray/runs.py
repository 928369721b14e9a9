"""Runs kept under one output root, as the notebook keeps them: each configuration in its own
folder, named by the parameters that differ from the defaults plus a short hash of everything that
identifies the run (so that a tweak never touches another run's files, and the same configuration
finds its folder again and resumes), and one table of every run (runs.csv)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd

from . import history as hist
from .checkpoint import HISTORY
from .config import RUNTIME_FIELDS, STRATEGY_FIELDS, Config
from .io import atomic_write, atomic_write_text
from .saved_model import finished
from .selection import reported_round

log = logging.getLogger(__name__)

MANIFEST = "run.json"     # what identifies the run; written once
TIMES = "times.json"      # seconds per notebook section, summed over sessions
RUNS_TABLE = "runs.csv"
LOCAL_ONLY = "local_only"
_LABEL_CHARS = 80


def parameters(config: Config, hyperparameters: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """What a run computes from: config's fields but those that only change how it executes, with
    the strategy hyperparameters as given for every strategy run (the notebook's), not only the
    main strategy's."""
    params = {k: v for k, v in config.to_dict().items() if k not in RUNTIME_FIELDS and k not in STRATEGY_FIELDS}
    return {**params, **{k: (hyperparameters or {}).get(k, getattr(config, k)) for k in STRATEGY_FIELDS}}


def changed(params: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    """The parameters that differ from the notebook's defaults for dataset ("nih" or "demo")."""
    defaults = parameters(Config.for_dataset(dataset))
    return {k: v for k, v in params.items() if k not in defaults or defaults[k] != v}


def label(diff: Mapping[str, Any]) -> str:
    """A folder-safe reading of the changed parameters, e.g. "lr=0.01_partition=dirichlet"."""
    if not diff:
        return "defaults"
    text = "_".join(f"{k}={v}" for k, v in diff.items())
    text = re.sub(r"[^A-Za-z0-9._=+,-]+", "-", text.replace(", ", ",")).strip("-_")
    return text[:_LABEL_CHARS].rstrip("-_") or "run"


@dataclasses.dataclass
class RunFolder:
    path: Path
    changed: dict[str, Any]
    new: bool            # created by this call


def run_folder(root: str | Path, config: Config, dataset: str, data: Mapping[str, Any],
               hyperparameters: Optional[Mapping[str, Any]] = None) -> RunFolder:
    """The folder under root of the run with these parameters (see `parameters`) on this data
    (dataset name, input digests, the weights actually used): found again when it exists, else
    created with its run.json. A run.json that does not match its folder's name is refused."""
    root = Path(root)
    params = parameters(config, hyperparameters)
    identity = json.loads(json.dumps({"dataset": dataset, "parameters": params, "data": dict(data)},
                                     sort_keys=True, default=str))
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    diff = changed(params, dataset)
    path = root / f"{label(diff)}-{key}"
    manifest = path / MANIFEST
    if manifest.exists():
        saved = read_manifest(manifest)
        if saved.get("identity") != identity:
            raise ValueError(f"{manifest} does not describe the run its folder name stands for (edited or "
                             f"copied by hand?): delete {path} to train this configuration again")
        return RunFolder(path, diff, new=False)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(manifest, json.dumps({"identity": identity, "changed": diff, "key": key,
                                            "created": time.strftime("%Y-%m-%d %H:%M:%S")},
                                           indent=2, default=str) + "\n")
    return RunFolder(path, diff, new=True)


def read_manifest(path: Path) -> dict:
    try:
        m = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable run manifest ({e}); delete its folder to train it again") from None
    if not isinstance(m, dict) or not {"identity", "changed", "key", "created"} <= set(m):
        raise ValueError(f"{path}: not a fedxray run manifest; delete its folder to train it again")
    return m


def read_times(folder: str | Path) -> dict[str, float]:
    """The folder's times.json (seconds per notebook section), {} when there is none; ValueError
    naming the file when it is not a mapping of names to numbers."""
    path = Path(folder) / TIMES
    if not path.exists():
        return {}
    try:
        times = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable ({e})") from None
    if not isinstance(times, dict) or not all(isinstance(v, (int, float)) for v in times.values()):
        raise ValueError(f"{path}: not a mapping of section names to seconds")
    return {str(k): float(v) for k, v in times.items()}


def add_times(folder: str | Path, seconds: Mapping[str, float]) -> dict[str, float]:
    """Add this session's seconds per section to the folder's times.json; the sums. A damaged
    times.json is replaced, with a warning naming it."""
    try:
        before = read_times(folder)
    except ValueError as e:
        log.warning("%s; starting the sums again", e)
        before = {}
    total = {**before, **{k: before.get(k, 0.0) + float(v) for k, v in seconds.items()}}
    atomic_write_text(Path(folder) / TIMES, json.dumps(total, indent=2) + "\n")
    return total


# --------------------------------------------------------------------------- the table

def _scores(history: pd.DataFrame) -> tuple[Optional[int], float, float, float]:
    """(round reported, val mean AUROC, test mean AUROC, test mean AUPRC) of a method's history, at
    the round its model selection chose (fedxray.selection.reported_round); a local-only history
    (one client per model) gives the mean over clients, each at its own round, and the latest of
    their rounds. A history written before AUPRC was recorded gives NaN for it."""
    test = history[(history["split"] == "test") & (history["metric"] == "mean_auroc")]
    if test.empty:
        return None, np.nan, np.nan, np.nan
    clients = sorted(set(test["client"].astype(str)))
    who = [hist.GLOBAL] if hist.GLOBAL in clients else clients
    scores, rounds = [], []
    for client in who:
        r = reported_round(history, client)
        at = history[(history["round"] == r) & (history["client"].astype(str) == client)]
        rounds.append(r)
        scores.append([float(at[(at["split"] == split) & (at["metric"] == metric)]["value"].mean())
                       for split, metric in (("val", "mean_auroc"), ("test", "mean_auroc"), ("test", "mean_auprc"))])
    val, test_auroc, test_auprc = (float(v) for v in pd.DataFrame(scores).mean())   # NaN-skipping
    return max(rounds), val, test_auroc, test_auprc


def _methods(folder: Path) -> dict[str, Path]:
    """Each method's folder in a run folder: the main strategy, the baselines, compare/<strategy>."""
    out = {}
    for h in sorted(folder.glob("*/" + HISTORY)) + sorted(folder.glob("compare/*/" + HISTORY)):
        name = "local-only" if h.parent.name == LOCAL_ONLY else h.parent.name
        out.setdefault(name, h.parent)
    return out


def _finished(method_dir: Path) -> bool:
    if method_dir.name == LOCAL_ONLY:
        clients = list(method_dir.glob("client_*"))
        return bool(clients) and all(finished(c) is not None for c in clients)
    return finished(method_dir) is not None


def run_row(folder: Path) -> dict[str, Any]:
    """One row of the runs table for a run folder; a file that cannot be read is named in 'problem'."""
    row: dict[str, Any] = {"folder": folder.name}
    problems = []
    try:
        m = read_manifest(folder / MANIFEST)
        row["created"] = m["created"]
        row.update({f"param {k}": v for k, v in m["changed"].items()})
        row["_parameters"] = m["identity"]["parameters"]
        main = m["identity"]["parameters"].get("strategy", "fedavg")
        row["weights"] = m["identity"]["data"].get("weights")
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        problems.append(str(e))
        main = None
    methods = _methods(folder)
    row["complete"] = bool(methods) and all(_finished(d) for d in methods.values())
    order = [main, "centralized", "local-only"]
    for name in sorted(methods, key=lambda n: (order.index(n) if n in order else len(order), n)):
        try:
            r, val, test, test_auprc = _scores(hist.read(methods[name] / HISTORY))
        except ValueError as e:
            problems.append(str(e))
            continue
        if name == main:
            row["round"] = r
        row[f"{name} val"], row[f"{name} test"], row[f"{name} test AUPRC"] = val, test, test_auprc
    try:
        times = read_times(folder)
        row["wall_s"] = round(sum(times.values()), 1) if times else np.nan
    except ValueError as e:
        problems.append(str(e))
    row["problem"] = "; ".join(problems)
    return row


def runs_table(root: str | Path, write: bool = True) -> pd.DataFrame:
    """Every run under root (folders holding a run.json), one row each, oldest first: the
    parameters that differ from the defaults in any run (each run's value), the weights used, whether every method finished, the
    round reported, validation and test mean AUROC and test mean AUPRC of each method, wall time and
    folder. Written to root/runs.csv when write."""
    root = Path(root)
    rows = [run_row(m.parent) for m in sorted(root.glob(f"*/{MANIFEST}"))]
    changed_anywhere = {k for r in rows for k in r if k.startswith("param ")}
    for r in rows:   # a parameter that one run changed shows every run's value of it
        full = r.pop("_parameters", {})
        r.update({k: full[k.removeprefix("param ")] for k in changed_anywhere
                  if k not in r and k.removeprefix("param ") in full})
    table = pd.DataFrame(rows)
    if not table.empty:
        table = table.sort_values(["created", "folder"], na_position="last", kind="stable").reset_index(drop=True)
        lead = ["created", *[c for c in table.columns if c.startswith("param ")], "weights", "complete", "round"]
        lead = [c for c in lead if c in table.columns]
        rest = [c for c in table.columns if c not in lead and c not in ("wall_s", "folder", "problem")]
        table = table[lead + rest + [c for c in ("wall_s", "folder", "problem") if c in table.columns]]
    if write:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write(root / RUNS_TABLE, lambda tmp: table.to_csv(tmp, index=False))
    return table

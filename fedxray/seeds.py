"""The comparison again under other seeds: how much of a gap between methods is the luck of one
seed (the partition, the head's initialisation, the clients sampled, the batch order).

The splits stay as given (the same validation and test patients for every seed), so each seed's
scores are on the same test set and differ only by what the seed draws.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Optional, Sequence

import pandas as pd

from . import history as hist
from .config import Config
from .federated import run_centralized, run_federated, run_local_only
from .parts import prepare
from .plots import local_only_table
from .selection import reported_round


def run_comparison(config: Config, splits: dict[str, pd.DataFrame], output_dir: str | Path,
                   compare: Sequence[str] = (), baselines: bool = True,
                   hyperparameters: Optional[Mapping[str, Optional[float]]] = None, resume: bool = True,
                   trunk_dir: Optional[str | Path] = None) -> dict[str, pd.DataFrame]:
    """config's strategy, then (baselines) centralized and local-only, then each strategy in compare,
    all on one set of prepared parts, each in its own folder under output_dir (as the notebook lays
    them out; a finished run is read back, not trained). Returns name -> history."""
    output_dir = Path(output_dir)
    parts = prepare(config, splits)
    out = {config.strategy: run_federated(config, splits, output_dir / config.strategy, parts=parts, resume=resume,
                                          trunk_dir=trunk_dir).history}
    if baselines:
        out["centralized"] = run_centralized(config, splits, output_dir / "centralized", parts=parts, resume=resume,
                                             trunk_dir=trunk_dir).history
        out["local-only"] = run_local_only(config, splits, output_dir / "local_only", parts=parts, resume=resume)
    for name in compare:
        if name not in out:
            cfg = config.with_strategy(name, **(hyperparameters or {}))
            out[name] = run_federated(cfg, splits, output_dir / "compare" / name, parts=parts, resume=resume,
                                      trunk_dir=trunk_dir).history
    return out


def reported_test_auroc(history: pd.DataFrame) -> float:
    """A run's test mean AUROC at its reported round; for run_local_only's table, the mean over the
    clients' own models (local_only_table's "mean" row)."""
    if (history["client"].astype(str) == hist.GLOBAL).any():
        test = hist.select(history, "test", "mean_auroc")
        return float(test[test["round"] == reported_round(history)]["value"].iloc[-1])
    return float(local_only_table(history).loc["mean", "test mean AUROC"])


def run_seeds(config: Config, splits: dict[str, pd.DataFrame], output_dir: str | Path, seeds: Sequence[int],
              done: Optional[Mapping[str, pd.DataFrame]] = None, **comparison) -> pd.DataFrame:
    """The comparison (run_comparison's keywords) once per seed in seeds, in output_dir/seed_<s>;
    done: the histories already trained with config.seed (not trained again). Returns one row per
    (seed, method): test mean AUROC at the reported round."""
    if not seeds:
        raise ValueError("run_seeds needs at least one seed")
    if len(set(seeds)) != len(seeds) or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds must be distinct integers, got {list(seeds)}")
    rows = []
    for s in seeds:
        if done is not None and s == config.seed:
            runs = done
        else:
            runs = run_comparison(dataclasses.replace(config, seed=s), splits, Path(output_dir) / f"seed_{s}",
                                  **comparison)
        rows += [{"seed": s, "method": name, "test mean AUROC": reported_test_auroc(h)} for name, h in runs.items()]
    return pd.DataFrame(rows)


def seed_summary(scores: pd.DataFrame) -> pd.DataFrame:
    """Per method (in the order first seen): seeds, mean, standard deviation (ddof 1; NaN for one
    seed), min and max of its test mean AUROC."""
    g = scores.groupby("method", sort=False)["test mean AUROC"]
    return pd.DataFrame({"seeds": g.size(), "mean": g.mean(), "std": g.std(ddof=1), "min": g.min(), "max": g.max()})

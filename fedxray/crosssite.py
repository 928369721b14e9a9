"""Cross-site evaluation: every model on every hospital's own test patients and on the pooled test
set, as FLamby's benchmarks and NVFlare's cross-site validation report it.

Rows are models, columns are "site 0", "site 1", ... (each site's held-out test patients,
Config.site_test_fraction) and "pooled" (the run's test set; on NIH the official test list). Three
kinds of model are read from the histories the runs already wrote (the site rows are scored once,
with each run's reported model, by fedxray.federated.final_rows):

- one global model (centralized, FedAvg, any strategy): the same model in every column;
- personalized (local_keys "bn" or "fc", or FedAvg fine-tuned at each site by run_finetuned):
  site k is scored with site k's own model, the pooled column with the average of the sites'
  predictions where the run scored one (FedBN, FedPer), else left empty (fine-tuning: no single
  model to score);
- local-only: one row per site's own model, scored everywhere (how well a hospital's model
  travels).
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import pandas as pd

from . import history as hist
from .data import LABELS
from .selection import reported_round

POOLED = "pooled"


def site_column(k: int) -> str:
    return f"site {int(k)}"


def eval_matrix(global_models: Mapping[str, pd.DataFrame] = {}, personalized: Mapping[str, pd.DataFrame] = {},
                local_only: Optional[pd.DataFrame] = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(matrix, long): matrix = models x ("site 0", ..., "pooled") of test mean AUROC; long = one row
    per (model, column, metric) with metric mean_auroc and auroc_<finding> for every finding (the
    per-finding values behind each cell), as eval_matrix.csv keeps them.

    global_models: name -> a run's history (FederatedRun, run_federated, run_centralized);
    personalized: name -> the history of a run with local_keys, or the table of run_finetuned;
    local_only: run_local_only's table (rows "local-only <k>"). A history without site rows (a run
    with site_test_fraction 0) raises ValueError: there is nothing to put in the site columns."""
    entries = []
    for name, h in global_models.items():
        entries += _cells(name, h, lambda k: hist.GLOBAL, hist.GLOBAL, reported_round(h))
    for name, h in personalized.items():
        own_round = reported_round(h)   # FedBN/FedPer: the run's; fine-tuning: each client's own, below
        entries += _cells(name, h, lambda k: str(k), hist.GLOBAL, own_round)
    if local_only is not None:
        for k in sorted({int(c) for c in local_only["client"].astype(str) if c.isdigit()}):
            entries += _cells(f"local-only {k}", local_only, lambda _k, k=k: str(k), str(k),
                              reported_round(local_only, str(k)))
    if not entries:
        raise ValueError("eval_matrix: no model given")
    long = pd.DataFrame(entries, columns=["model", "column", "metric", "value"])
    sites = sorted({c for c in long["column"] if c != POOLED}, key=lambda c: int(c.split()[1]))
    if not sites:
        raise ValueError("eval_matrix: the histories hold no site-test rows; run with site_test_fraction > 0")
    mean = long[long["metric"] == "mean_auroc"]
    matrix = mean.pivot(index="model", columns="column", values="value")
    matrix = matrix.reindex(index=list(dict.fromkeys(long["model"])), columns=[*sites, POOLED])
    matrix.columns.name = "test set"
    return matrix, long


def _cells(name: str, history: pd.DataFrame, site_model, pooled_model: str, selected: Optional[int]) -> list[tuple]:
    """The (model, column, metric, value) entries of one row of the matrix: site k's test scored with
    site_model(k)'s rows, the pooled test with pooled_model's rows at the selected round."""
    metrics = ["mean_auroc", *(f"auroc_{f}" for f in LABELS)]
    h = history[history["metric"].isin(metrics)]
    out = []
    splits = sorted({s for s in h["split"].astype(str) if hist.is_site_split(s)}, key=lambda s: int(s.split("_")[1]))
    for split in splits:
        k = int(split.split("_")[1])
        rows = h[(h["split"] == split) & (h["client"].astype(str) == site_model(k))]
        rows = rows[rows["round"] == rows["round"].max()] if len(rows) else rows   # scored once, at the reported round
        out += [(name, site_column(k), m, v) for m, v in zip(rows["metric"], rows["value"])]
    pooled = h[(h["split"] == "test") & (h["client"].astype(str) == pooled_model)]
    if selected is not None:
        pooled = pooled[pooled["round"] == selected]
    if len(pooled):
        out += [(name, POOLED, m, v) for m, v in zip(pooled["metric"], pooled["value"])]
    else:
        out.append((name, POOLED, "mean_auroc", np.nan))
    return out


def own_site_gain(matrix: pd.DataFrame, model: str, reference: str) -> pd.Series:
    """Per site, model's AUROC on that site's own test minus reference's, where reference is a
    model name or "local-only" (each site's own local model on its own test: the question a hospital
    asks before joining)."""
    sites = [c for c in matrix.columns if c != POOLED]
    if reference == "local-only":
        base = pd.Series({c: matrix.loc[f"local-only {c.split()[1]}", c] for c in sites})
    else:
        base = matrix.loc[reference, sites]
    return (matrix.loc[model, sites] - base).rename(f"{model} minus {reference}")

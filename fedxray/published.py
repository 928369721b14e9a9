"""Published per-finding test AUROC on NIH ChestX-ray14, to put beside ours.

The numbers ship in ``published_auroc.csv`` (long format: one row per source and finding), each
row naming its paper, table and what it was checked against. Two sources:

- ``wang2017``: Wang et al., the dataset's paper, arXiv:1705.02315v5 Table 17 (ResNet-50), on the
  official split (NIH's ``test_list.txt``). The CVPR 2017 version reports only 8 findings.
- ``chexnet2017``: Rajpurkar et al., arXiv:1711.05225v3 Table 2, on CheXNet's own random 70/10/20
  patient split: another test set, so not comparable as is.

The "Wang et al. (2017)" column of CheXNet's Table 2 (0.716, 0.807, ...) is not used: those values
differ from Wang et al.'s official-split Table 17, CheXNet cites arXiv:1705.02315 without a
version, and it describes that earlier work's split as a random 70/10/20 one.
"""
from __future__ import annotations

import os
from importlib import resources
from typing import Optional

import numpy as np
import pandas as pd

from .data import LABELS
from .evaluation import MEAN

CSV_FILE = "published_auroc.csv"
COLUMNS = ("source", "finding", "auroc", "split", "model", "citation", "where", "verified_against")
OFFICIAL = "official"        # the split column's value for NIH's train_val_list.txt / test_list.txt
_NOT_OFFICIAL = "no: {split}, another test set; not comparable as is"


def published_auroc(path: Optional[str | os.PathLike] = None) -> pd.DataFrame:
    """The published per-finding AUROC table, checked.

    Parameters
    ----------
    path : str or PathLike, optional
        A CSV with the columns of ``COLUMNS``; default the one shipped with fedxray.

    Returns
    -------
    pandas.DataFrame
        One row per (source, finding), columns ``COLUMNS``; ``auroc`` is float.

    Raises
    ------
    ValueError
        A missing column, or a row whose finding is not in LABELS, whose auroc is not a number in
        (0.5, 1), or whose (source, finding) repeats an earlier row; the message names the line.
    """
    if path is None:
        with resources.files("fedxray").joinpath(CSV_FILE).open("r", encoding="utf-8") as f:
            table, name = pd.read_csv(f, dtype=str, keep_default_na=False), CSV_FILE
    else:
        table, name = pd.read_csv(path, dtype=str, keep_default_na=False), str(path)
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{name}: missing column(s) {missing}; expected {list(COLUMNS)}")
    table = table[list(COLUMNS)].copy()
    auroc = pd.to_numeric(table["auroc"], errors="coerce")
    seen = set()
    for i, row in table.iterrows():
        where = f"{name} line {i + 2} (source {row['source']!r}, finding {row['finding']!r})"   # line 1: header
        if row["finding"] not in LABELS:
            raise ValueError(f"{where}: unknown finding; use the spelling of fedxray.LABELS {list(LABELS)}")
        if not 0.5 < auroc[i] < 1:       # NaN (not a number) fails too
            raise ValueError(f"{where}: auroc {row['auroc']!r} is not a number in (0.5, 1)")
        if (row["source"], row["finding"]) in seen:
            raise ValueError(f"{where}: duplicate (source, finding)")
        seen.add((row["source"], row["finding"]))
    table["auroc"] = auroc.astype(float)
    return table


def compare_with_published(ours: pd.Series, name: str = "ours",
                           published: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """Our per-finding test AUROC beside each published source.

    Parameters
    ----------
    ours : pandas.Series
        Per-finding AUROC indexed by finding names of LABELS; a "mean" entry (as in
        fedxray.plots.auroc_table) is ignored, a missing finding is NaN.
    name : str
        The column name for ours.
    published : pandas.DataFrame, optional
        The table of published_auroc(); default the shipped one.

    Returns
    -------
    pandas.DataFrame
        Rows LABELS then "mean"; columns ``name`` then one per source. The mean row averages the
        findings every column scores (published means are computed here, not quoted).
        ``attrs["comparable"]`` maps each source to whether its test set is ours (NIH's official
        split) or not, and why.
    """
    unknown = [f for f in ours.index if f not in LABELS and f != MEAN]
    if unknown:
        raise ValueError(f"ours has entries that are not findings of fedxray.LABELS: {unknown}")
    published = published_auroc() if published is None else published
    sources = list(dict.fromkeys(published["source"]))
    wide = published.pivot(index="finding", columns="source", values="auroc")
    table = pd.concat([ours.reindex(LABELS).astype(float).rename(name), wide.reindex(LABELS)[sources]], axis=1)
    table.columns.name = None
    scored = table.notna().all(axis=1)
    table.loc[MEAN] = table[scored].mean() if scored.any() else np.nan
    splits = published.drop_duplicates("source").set_index("source")["split"]
    table.attrs["comparable"] = {
        s: "yes: same official NIH test list (test_list.txt)" if splits[s] == OFFICIAL
        else _NOT_OFFICIAL.format(split=splits[s]) for s in sources}
    return table

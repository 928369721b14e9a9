"""Splitting the training patients among federated clients, and measuring how skewed the split is."""
from __future__ import annotations

import logging
import math
import numbers
import operator

import numpy as np
import pandas as pd

from .data import LABELS, NO_FINDING

log = logging.getLogger(__name__)

SCHEMES = ("iid", "dirichlet", "column", "quantity")
DEFAULT_COLUMN = "view"  # the natural sites of NIH: PA (upright, outpatient) vs AP (bedside)


def partition(train: pd.DataFrame, num_clients: int, scheme: str = "iid", alpha: float = 0.5,
              seed: int = 0, column: str | None = None, min_patients: int = 1) -> list[pd.DataFrame]:
    """Split the rows of train among num_clients clients, whole patients at a time.

    Every patient lands on exactly one client. The result depends only on the set of rows and
    the seed, not on their order (patients are sorted by id first). Each client's rows keep the
    order they have in train (index reset). Schemes:

    - "iid": patients shuffled and dealt round-robin; client sizes differ by at most one patient.
    - "dirichlet": label skew (Hsu et al. 2019, at patient level). Each patient's class is the
      rarest finding (fewest training patients) in any of their images, or "No Finding"; for each
      class, p ~ Dir(alpha * 1_K) and the class's patients are cut among clients in proportions p.
      Smaller alpha, more skew. Clients left under min_patients then take random patients from
      the largest client.
    - "quantity": size skew: shares ~ Dir(alpha * 1_K) of the patients beyond min_patients per
      client, patients dealt at random (labels iid).
    - "column": one site per value of a metadata column (default "view"). A patient belongs to the
      value of most of their images (ties: the first value in sorted order), so a site may hold a
      few images of other values. With as many clients as sites, site i (sorted by value) is
      client i. With more, the extra clients go one by one to the site with the most patients per
      client, which is split iid. With fewer, sites are merged: largest first, each onto the
      client with the fewest patients so far.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if "patient_id" not in train:
        raise ValueError("train has no 'patient_id' column: pass a table from fedxray.read_metadata")
    if column is not None and scheme != "column":
        raise ValueError(f"column={column!r} is only used by scheme='column', not {scheme!r}")
    if not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    num_clients = _integer(num_clients, "num_clients")
    min_patients = _integer(min_patients, "min_patients")
    pids = np.unique(train["patient_id"].to_numpy())
    n = len(pids)
    if not 1 <= num_clients <= n:
        raise ValueError(f"num_clients must be between 1 and the number of training patients ({n}), "
                         f"got {num_clients}")
    if min_patients < 0 or num_clients * min_patients > n:
        raise ValueError(f"min_patients={min_patients} is impossible for {num_clients} clients and {n} "
                         f"patients: it must be between 0 and {n // num_clients}")

    rng = np.random.default_rng(seed)
    if scheme == "iid":
        owner = rng.permutation(np.arange(n) % num_clients)
    elif scheme == "quantity":
        shares = rng.dirichlet(np.full(num_clients, float(alpha)))
        sizes = min_patients + _apportion(n - num_clients * min_patients, shares)
        owner = rng.permutation(np.repeat(np.arange(num_clients), sizes))
    elif scheme == "dirichlet":
        owner = _dirichlet(_primary_class(train, pids), num_clients, alpha, rng)
        owner = _fill_up(owner, num_clients, min_patients, rng)
    else:
        owner = _by_column(train, pids, column or DEFAULT_COLUMN, num_clients, rng)
        sizes = np.bincount(owner, minlength=num_clients)
        if sizes.min() < min_patients:
            k = int(sizes.argmin())
            raise ValueError(f"the {column or DEFAULT_COLUMN!r} split leaves client {k} with "
                             f"{sizes[k]} patient(s), fewer than min_patients={min_patients}: use "
                             f"fewer clients or a smaller min_patients")

    row_owner = owner[np.searchsorted(pids, train["patient_id"].to_numpy())]
    parts = [train[row_owner == k].reset_index(drop=True) for k in range(num_clients)]
    log.info("%s partition of %d patients into %d clients: %s patients", scheme, n, num_clients,
             np.bincount(owner, minlength=num_clients).tolist())
    return parts


def client_finding_table(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Clients x (images, patients, positive images per finding in LABELS order, "No Finding")."""
    table = pd.DataFrame(np.stack([_class_counts(p) for p in parts]), columns=[*LABELS, NO_FINDING])
    table.insert(0, "images", [len(p) for p in parts])
    table.insert(1, "patients", [p["patient_id"].nunique() for p in parts])
    table.index.name = "client"
    return table


def label_skew(parts: list[pd.DataFrame]) -> float:
    """Size-weighted mean total-variation distance of each client's finding mix from the pooled mix.

    A client's mix is its positive counts per finding plus its count of "No Finding" images,
    normalised to sum to 1 (an image with two findings counts once for each). The distance
    0.5 * sum |client - pooled| is the share of the client's labels that would have to change
    to match the pool; clients are weighted by their number of images. 0 for identical mixes,
    approaching 1 when clients hold disjoint findings.
    """
    if len(parts) == 0:
        raise ValueError("label_skew needs at least one client, got none")
    counts = np.stack([_class_counts(p) for p in parts]).astype(np.float64)
    per_client = counts.sum(1)
    if per_client.sum() == 0:
        raise ValueError("all clients are empty: no label skew to measure")
    pooled = counts.sum(0) / per_client.sum()
    mix = counts / np.maximum(per_client, 1)[:, None]
    tv = 0.5 * np.abs(mix - pooled).sum(1)
    images = np.array([len(p) for p in parts], dtype=np.float64)
    return float((images * tv).sum() / images.sum())


def _integer(value, name: str) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _labels(frame: pd.DataFrame) -> np.ndarray:
    missing = [c for c in LABELS if c not in frame]
    if missing:
        raise ValueError(f"the table lacks finding column(s) {missing}: pass a table from "
                         f"fedxray.read_metadata")
    return frame[list(LABELS)].to_numpy() > 0


def _class_counts(frame: pd.DataFrame) -> np.ndarray:
    """Positive images per finding, then images with no finding: int [len(LABELS) + 1]."""
    y = _labels(frame)
    return np.append(y.sum(0), (~y.any(1)).sum()).astype(np.int64)


def _primary_class(train: pd.DataFrame, pids: np.ndarray) -> np.ndarray:
    """Per patient: index of their rarest finding in LABELS, or len(LABELS) for none."""
    y = pd.DataFrame(_labels(train), columns=list(LABELS)).groupby(train["patient_id"].to_numpy())
    has = y.max().reindex(pids).to_numpy()
    # Rarest first, so a patient with Hernia and Effusion counts towards the scarce Hernia class
    # and rare findings are the ones that get concentrated on few clients.
    rank = np.where(has, has.sum(0), np.iinfo(np.int64).max)
    primary = rank.argmin(1)
    primary[~has.any(1)] = len(LABELS)
    return primary


def _apportion(n: int, p: np.ndarray) -> np.ndarray:
    """Cut n items into len(p) consecutive blocks of proportions p; int sizes summing to n."""
    cuts = np.minimum((np.cumsum(p)[:-1] * n).astype(np.int64), n)
    return np.diff(np.concatenate([[0], cuts, [n]]))


def _dirichlet(primary: np.ndarray, k: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    owner = np.empty(len(primary), dtype=np.int64)
    for c in np.unique(primary):
        idx = rng.permutation(np.flatnonzero(primary == c))
        p = rng.dirichlet(np.full(k, float(alpha)))
        owner[idx] = np.repeat(np.arange(k), _apportion(len(idx), p))
    return owner


def _fill_up(owner: np.ndarray, k: int, min_patients: int, rng: np.random.Generator) -> np.ndarray:
    """Move random patients from the largest client to any client under min_patients."""
    owner = owner.copy()
    sizes = np.bincount(owner, minlength=k)
    moved = 0
    for c in range(k):
        while sizes[c] < min_patients:
            # The largest client holds more than min_patients as long as any client is short.
            donor = int(sizes.argmax())
            j = rng.choice(np.flatnonzero(owner == donor))
            owner[j] = c
            sizes[donor] -= 1
            sizes[c] += 1
            moved += 1
    if moved:
        log.info("moved %d patient(s) from the largest clients to reach min_patients=%d", moved,
                 min_patients)
    return owner


def _by_column(train: pd.DataFrame, pids: np.ndarray, column: str, k: int,
               rng: np.random.Generator) -> np.ndarray:
    if column not in train:
        raise ValueError(f"column {column!r} is not in the table; columns: "
                         f"{list(map(str, train.columns))}")
    values = train[column]
    if values.isna().any():
        raise ValueError(f"column {column!r} has {int(values.isna().sum())} missing value(s): fill "
                         f"or drop those rows first")
    counts = pd.crosstab(train["patient_id"].to_numpy(), values.to_numpy()).reindex(pids)
    majority = counts.to_numpy().argmax(1)  # first maximum: ties go to the first value in sorted order
    sites, site_of = np.unique(majority, return_inverse=True)  # values that are some patient's majority
    names = [str(counts.columns[s]) for s in sites]
    sizes = np.bincount(site_of)
    owner = np.empty(len(pids), dtype=np.int64)
    if k < len(sites):
        client_of_site = np.empty(len(sites), dtype=np.int64)
        load = np.zeros(k, dtype=np.int64)
        for s in np.argsort(-sizes, kind="stable"):
            client_of_site[s] = int(load.argmin())
            load[client_of_site[s]] += sizes[s]
        owner[:] = client_of_site[site_of]
        log.info("%r: %d sites merged into %d clients: %s", column, len(sites), k,
                 {n: int(c) for n, c in zip(names, client_of_site)})
        return owner
    share = np.ones(len(sites), dtype=np.int64)
    for _ in range(k - len(sites)):
        share[int(np.argmax(sizes / share))] += 1
    first = np.concatenate([[0], np.cumsum(share)[:-1]])
    for s in range(len(sites)):
        idx = rng.permutation(np.flatnonzero(site_of == s))
        owner[idx] = first[s] + np.arange(len(idx)) % share[s]
    log.info("%r: clients per site %s", column, dict(zip(names, share.tolist())))
    return owner

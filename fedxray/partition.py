"""Splitting the training patients among federated clients, and measuring how skewed the split is.

A note on alpha: the Dirichlet schemes draw at patient level, on one class per patient (the rarest
finding in any of their images, or "No Finding"), and an NIH image often carries several findings.
A client's share of a finding therefore differs from its share of the patients whose class is that
finding, and a given alpha is NOT comparable with the same alpha in single-label papers (CIFAR-10,
Hsu et al. 2019): measure the skew you get with label_skew and client_finding_table instead.
"""
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
# Draws of a random scheme tried before a minimum client size is declared out of reach. A draw
# costs milliseconds at NIH scale; 100 refusals in a row mean the minimum is far in the tail.
MAX_DRAWS = 100
ZERO_POSITIVES = "findings without positives"   # column of client_finding_table


def partition(train: pd.DataFrame, num_clients: int, scheme: str = "iid", alpha: float = 0.5,
              seed: int = 0, column: str | None = None, min_client_patients: int = 1,
              min_client_images: int = 1, balanced_sizes: bool = False) -> list[pd.DataFrame]:
    """Split the rows of train among num_clients clients, whole patients at a time.

    Every patient lands on exactly one client. The result depends only on the set of rows and
    the seed, not on their order (patients are sorted by id first). Each client's rows keep the
    order they have in train (index reset). Schemes:

    - "iid": patients shuffled and dealt round-robin; client sizes differ by at most one patient.
    - "dirichlet": label skew (Hsu et al. 2019, at patient level). Each patient's class is the
      rarest finding (fewest training patients) in any of their images, or "No Finding"; for each
      class, p ~ Dir(alpha * 1_K) and the class's patients are cut among clients in proportions p.
      Smaller alpha, more skew. Client sizes then follow the draw too (size skew on top of label
      skew), unless balanced_sizes: every client gets the same number of patients (to one), and
      the classes are dealt rarest first, each cut in proportions p among the clients that still
      have room (a client that fills up drops out and the rest of the class is cut among the others
      in their proportions p). Rare findings thus keep their drawn concentration; the common
      classes, "No Finding" last, fill the remaining room. Only "dirichlet" takes balanced_sizes.
    - "quantity": size skew: shares ~ Dir(alpha * 1_K) of the patients beyond min_client_patients
      per client (so that minimum holds by construction), patients dealt at random (labels iid).
    - "column": one site per value of a metadata column (default "view"). A patient belongs to the
      value of most of their images (ties: the first value in sorted order), so a site may hold a
      few images of other values. With as many clients as sites, site i (sorted by value) is
      client i. With more, the extra clients go one by one to the site with the most patients per
      client, which is split iid. With fewer, sites are merged: largest first, each onto the
      client with the fewest patients so far.

    Minimum client size: every client must hold at least min_client_patients patients and
    min_client_images images. A random draw (iid, dirichlet, quantity) that leaves a client short
    is refused and drawn again from the same generator, as Flower Datasets' DirichletPartitioner
    does with min_partition_size: the split is the first acceptable draw, still fixed by the seed,
    and a minimum that the first draw meets changes nothing. After MAX_DRAWS refusals, ValueError
    names the closest draw's smallest client and the remedy. "column" has nothing to redraw: a
    short client is an error naming its value(s). The defaults (1 and 1: no empty client) hold
    by construction except in plain "dirichlet", where a tiny alpha with more clients than
    classes can leave a client without patients in every draw. Refusals condition the draw: a
    minimum far above the smallest clients the scheme gives makes the accepted splits less
    skewed than alpha alone says.

    Clients without a single positive image of a finding are logged as a WARNING (see
    zero_positive_findings): a client's local training never sees a positive of those findings.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if "patient_id" not in train:
        raise ValueError("train has no 'patient_id' column: pass a table from fedxray.read_metadata")
    if column is not None and scheme != "column":
        raise ValueError(f"column={column!r} is only used by scheme='column', not {scheme!r}")
    if balanced_sizes and scheme != "dirichlet":
        raise ValueError(f"balanced_sizes is only used by scheme='dirichlet', not {scheme!r}: "
                         f"'iid' and 'column' sizes are balanced already, and 'quantity' is size skew")
    if not isinstance(balanced_sizes, (bool, np.bool_)):
        raise ValueError(f"balanced_sizes must be True or False, got {balanced_sizes!r}")
    if not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    num_clients = _integer(num_clients, "num_clients")
    min_patients = _integer(min_client_patients, "min_client_patients")
    min_images = _integer(min_client_images, "min_client_images")
    pids = np.unique(train["patient_id"].to_numpy())
    n = len(pids)
    if not 1 <= num_clients <= n:
        raise ValueError(f"num_clients must be between 1 and the number of training patients ({n}), "
                         f"got {num_clients}")
    if min_patients < 0 or num_clients * min_patients > n:
        raise ValueError(f"min_client_patients={min_patients} is impossible for {num_clients} clients "
                         f"and {n} patients: it must be between 0 and {n // num_clients}")
    if min_images < 0 or num_clients * min_images > len(train):
        raise ValueError(f"min_client_images={min_images} is impossible for {num_clients} clients and "
                         f"{len(train)} images: it must be between 0 and {len(train) // num_clients}")
    row_patient = np.searchsorted(pids, train["patient_id"].to_numpy())
    images = np.bincount(row_patient, minlength=n)   # images per patient

    rng = np.random.default_rng(seed)
    if scheme == "column":
        name = column or DEFAULT_COLUMN
        owner, values = _by_column(train, pids, name, num_clients, rng)
        sizes, size_images = _sizes(owner, images, num_clients)
        short = np.flatnonzero((sizes < min_patients) | (size_images < min_images))
        if len(short):
            k = int(short[0])
            raise ValueError(f"the {name!r} split leaves client {k} ({name} {values[k]}) with "
                             f"{sizes[k]} patient(s) and {size_images[k]} image(s), fewer than "
                             f"min_client_patients={min_patients} or min_client_images={min_images}: "
                             f"use fewer clients or a smaller minimum")
    else:
        if scheme == "dirichlet":
            primary = _primary_class(train, pids)
        best, refused = None, 0
        for _ in range(MAX_DRAWS):
            if scheme == "iid":
                owner = rng.permutation(np.arange(n) % num_clients)
            elif scheme == "quantity":
                shares = rng.dirichlet(np.full(num_clients, float(alpha)))
                sizes = min_patients + _apportion(n - num_clients * min_patients, shares)
                owner = rng.permutation(np.repeat(np.arange(num_clients), sizes))
            elif balanced_sizes:
                owner = _balanced_dirichlet(primary, num_clients, alpha, rng)
            else:
                owner = _dirichlet(primary, num_clients, alpha, rng)
            sizes, size_images = _sizes(owner, images, num_clients)
            reach = _reach(sizes, size_images, min_patients, min_images)
            if reach.min() >= 1:
                break
            refused += 1
            if best is None or reach.min() > best[0]:
                k = int(reach.argmin())
                best = (reach.min(), k, sizes[k], size_images[k])
        else:
            _, k, p, i = best
            drawn = f"{scheme}{' (balanced sizes)' if balanced_sizes else ''} partition" + \
                (f" with alpha={alpha}" if scheme != "iid" else "")
            remedy = ("fewer clients or a smaller minimum" if scheme == "iid" else
                      "a larger alpha, fewer clients or a smaller minimum" +
                      (", or balanced_sizes=True" if scheme == "dirichlet" and not balanced_sizes else ""))
            raise ValueError(f"{drawn} of {n} patients ({len(train)} images) into {num_clients} clients: "
                             f"none of {MAX_DRAWS} draws gave every client at least "
                             f"min_client_patients={min_patients} patient(s) and min_client_images="
                             f"{min_images} image(s); in the closest draw, client {k} had {p} patient(s) "
                             f"and {i} image(s). Use {remedy}")
        if refused:
            log.info("%s partition: %d draw(s) refused for a client under min_client_patients=%d or "
                     "min_client_images=%d", scheme, refused, min_patients, min_images)

    parts = [train[owner[row_patient] == k].reset_index(drop=True) for k in range(num_clients)]
    log.info("%s partition of %d patients into %d clients: %s patients", scheme, n, num_clients,
             np.bincount(owner, minlength=num_clients).tolist())
    missing = zero_positive_findings(parts)
    if missing:
        log.warning("%s partition: %d of %d clients have no positive image of some finding (their local "
                    "training never sees one): %s", scheme, len(missing), num_clients,
                    "; ".join(f"client {k}: {', '.join(f)}" for k, f in missing.items()))
    return parts


def hold_out_site_tests(parts: list[pd.DataFrame], fraction: float, seed: int
                        ) -> tuple[list[pd.DataFrame], list[pd.DataFrame]]:
    """Each client's own test patients ("site test"): a share `fraction` of its patients, drawn
    stratified by their class (rarest finding, as the Dirichlet schemes draw), so each site's test
    mirrors the site's own finding mix, whatever scheme made the site. Returns (the clients' training
    tables without them, the site tests), in the clients' order and row order; whole patients only,
    so no patient is in two places. fraction 0 holds out nothing (empty site tests). A client keeps
    at least one training patient, and one too small to spare a test patient keeps an empty site
    test (both logged as a WARNING naming the client)."""
    if not (isinstance(fraction, numbers.Real) and 0 <= fraction < 1):
        raise ValueError(f"site_test_fraction must be a number in [0, 1), got {fraction!r}")
    train, tests = [], []
    for k, frame in enumerate(parts):
        pids = np.unique(frame["patient_id"].to_numpy())
        held = np.zeros(len(pids), dtype=bool)
        if fraction > 0 and len(pids):
            rng = np.random.default_rng([int(seed), k, 0x5173])
            # Systematic sampling over patients ordered by class (shuffled within it): every class
            # gives floor or ceil of its share, and the site gives round(fraction * patients) or one off.
            order = np.lexsort((rng.random(len(pids)), _primary_class(frame, pids)))
            start = rng.random()
            steps = np.floor(start + fraction * np.arange(len(pids) + 1))
            held[order[np.diff(steps) > 0]] = True
        if held.all() and len(pids):   # a site trains on at least one patient
            held[order[np.flatnonzero(np.diff(steps) > 0)[-1]]] = False
            log.warning("client %d holds %d patient(s): site_test_fraction=%s would leave it none to train on; one "
                        "is kept for training", k, len(pids), fraction)
        if fraction > 0 and not held.any():
            log.warning("client %d holds %d patient(s): too few for a site test at site_test_fraction=%s; its site "
                        "test is empty", k, len(pids), fraction)
        in_test = frame["patient_id"].isin(pids[held]).to_numpy()
        train.append(frame[~in_test].reset_index(drop=True))
        tests.append(frame[in_test].reset_index(drop=True))
    return train, tests


def client_finding_table(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Clients x (images, patients, positive images per finding in LABELS order, "No Finding",
    the number of findings without a positive image on that client)."""
    counts = np.stack([_class_counts(p) for p in parts])
    table = pd.DataFrame(counts, columns=[*LABELS, NO_FINDING])
    table.insert(0, "images", [len(p) for p in parts])
    table.insert(1, "patients", [p["patient_id"].nunique() for p in parts])
    table[ZERO_POSITIVES] = (counts[:, :len(LABELS)] == 0).sum(1)
    table.index.name = "client"
    return table


def zero_positive_findings(parts: list[pd.DataFrame]) -> dict[int, list[str]]:
    """Client -> the findings (LABELS order) of which it holds no positive image; only clients
    lacking at least one finding are listed, so {} means every client sees every finding."""
    missing = {}
    for k, p in enumerate(parts):
        absent = [name for name, c in zip(LABELS, _class_counts(p)) if c == 0]
        if absent:
            missing[k] = absent
    return missing


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


def _balanced_dirichlet(primary: np.ndarray, k: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Dirichlet label skew with every client holding n // k or n // k + 1 patients: classes
    rarest first, each cut in its drawn proportions among the clients with room left."""
    room = np.bincount(np.arange(len(primary)) % k, minlength=k)
    owner = np.empty(len(primary), dtype=np.int64)
    classes, size = np.unique(primary, return_counts=True)
    for c in classes[np.argsort(size, kind="stable")]:
        idx = rng.permutation(np.flatnonzero(primary == c))
        p = rng.dirichlet(np.full(k, float(alpha)))
        take = np.zeros(k, dtype=np.int64)
        left = len(idx)
        while left:
            # Each pass places the rest of the class or fills at least one client, so it ends
            # within k passes; the room left always holds the patients left.
            open_ = np.flatnonzero(take < room)
            w = p[open_]
            w = w / w.sum() if w.sum() > 0 else np.full(len(open_), 1 / len(open_))
            step = np.minimum(_apportion(left, w), room[open_] - take[open_])
            take[open_] += step
            left -= int(step.sum())
        room -= take
        owner[idx] = np.repeat(np.arange(k), take)
    return owner


def _sizes(owner: np.ndarray, images: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Patients and images per client."""
    return (np.bincount(owner, minlength=k),
            np.bincount(owner, weights=images, minlength=k).astype(np.int64))


def _reach(patients: np.ndarray, images: np.ndarray, min_patients: int, min_images: int) -> np.ndarray:
    """Per client, the smaller of its patients and images as a fraction of their minimum (>= 1:
    enough; a minimum of 0 always holds)."""
    reach = np.full(len(patients), np.inf)
    if min_patients:
        reach = np.minimum(reach, patients / min_patients)
    if min_images:
        reach = np.minimum(reach, images / min_images)
    return reach


def _by_column(train: pd.DataFrame, pids: np.ndarray, column: str, k: int,
               rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Owner per patient, and per client the value(s) it holds, for messages."""
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
        return owner, [" + ".join(repr(n) for n, c in zip(names, client_of_site) if c == j)
                       for j in range(k)]
    share = np.ones(len(sites), dtype=np.int64)
    for _ in range(k - len(sites)):
        share[int(np.argmax(sizes / share))] += 1
    first = np.concatenate([[0], np.cumsum(share)[:-1]])
    for s in range(len(sites)):
        idx = rng.permutation(np.flatnonzero(site_of == s))
        owner[idx] = first[s] + np.arange(len(idx)) % share[s]
    log.info("%r: clients per site %s", column, dict(zip(names, share.tolist())))
    return owner, [f"{names[s]!r}" + (f", one of its {share[s]} clients" if share[s] > 1 else "")
                   for s in range(len(sites)) for _ in range(share[s])]

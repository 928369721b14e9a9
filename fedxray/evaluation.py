"""How sure are we: patient-level bootstrap intervals of AUROC, paired differences between two
models on the same test patients, and the expected calibration error.

The unit of resampling is the patient, not the image: NIH patients have 1 to 184 images (3.6 on
average), and the images of one patient are not independent, so an image-level bootstrap would
give intervals that are too narrow. Each replicate draws the test patients with replacement
(a multinomial count per patient) and weighs every image by its patient's count; the AUROC under
integer weights is computed for all replicates at once (tied scores count one half, as
sklearn's roc_auc_score does), so 1,000 replicates of NIH's 25,596 test images take seconds.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd

from .data import LABELS

MEAN = "mean"          # the row of the mean over findings
_BLOCK = 100           # replicates computed together (memory: _BLOCK x images x 8 bytes, a few times)


def _inputs(y_true, scores: Sequence, patient_ids, labels):
    y = np.asarray(y_true)
    if y.ndim != 2:
        raise ValueError(f"y_true must be [images, findings], got shape {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must hold 0/1 labels only")
    out = []
    for i, s in enumerate(scores):
        s = np.asarray(s, dtype=np.float64)
        if s.shape != y.shape:
            raise ValueError(f"scores {i} have shape {s.shape}, y_true {y.shape}: one score per image and finding")
        if not np.isfinite(s).all():
            raise ValueError(f"scores {i} hold NaN or infinite values: score the model again")
        out.append(s)
    ids = np.asarray(patient_ids)
    if ids.shape != (len(y),):
        raise ValueError(f"patient_ids must give one patient per image ({len(y)}), got shape {ids.shape}")
    if pd.isna(ids).any():
        raise ValueError("patient_ids hold missing values: every image needs its patient")
    names = list(LABELS if labels is None else labels)
    if len(names) != y.shape[1]:
        raise ValueError(f"{len(names)} finding names for {y.shape[1]} columns: pass labels=")
    codes, _ = pd.factorize(ids)
    return y.astype(np.float64), out, codes, names


def _sorted(y: np.ndarray, s: np.ndarray):
    """One finding's images in score order, the labels in that order and where each group of tied
    scores starts: what every replicate's AUROC reuses."""
    order = np.argsort(s, kind="stable")
    sorted_s = s[order]
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    return order, y[order], starts


def _weighted_auroc(prepared, weights: np.ndarray) -> np.ndarray:
    """AUROC of one finding (prepared by _sorted) under each row of the image weights
    [replicates, n]: the weighted Mann-Whitney statistic, ties counted one half. NaN where a row
    weighs no positive or no negative."""
    order, sorted_y, starts = prepared
    w = weights[:, order]
    pos = np.add.reduceat(w * sorted_y, starts, axis=1)
    neg = np.add.reduceat(w * (1.0 - sorted_y), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    total_pos, total_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos * (below + 0.5 * neg)).sum(axis=1) / (total_pos * total_neg)
    auc[(total_pos == 0) | (total_neg == 0)] = np.nan
    return auc


def _replicates(y, scores, codes, n_boot: int, seed: int):
    """AUROC per replicate, finding and model: [models] arrays of [n_boot, findings], the same
    patients drawn for every model (so differences are paired)."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    rng = np.random.default_rng(seed)
    patients = int(codes.max()) + 1
    prepared = [[_sorted(y[:, j], s[:, j]) for j in range(y.shape[1])] for s in scores]
    out = [np.empty((n_boot, y.shape[1])) for _ in scores]
    for start in range(0, n_boot, _BLOCK):
        b = min(_BLOCK, n_boot - start)
        counts = rng.multinomial(patients, np.full(patients, 1.0 / patients), size=b)
        weights = counts[:, codes].astype(np.float64)     # each image weighs its patient's count
        for m, per_finding in enumerate(prepared):
            for j, p in enumerate(per_finding):
                out[m][start:start + b, j] = _weighted_auroc(p, weights)
    return out


def _point(y, s) -> np.ndarray:
    ones = np.ones((1, len(y)))
    return np.array([_weighted_auroc(_sorted(y[:, j], s[:, j]), ones)[0] for j in range(y.shape[1])])


def _table(estimate: np.ndarray, reps: np.ndarray, names: list[str]) -> pd.DataFrame:
    """Estimate and 95% percentile interval per finding, then for the mean over the findings the
    sample can score (a replicate in which one of them cannot be scored is left out of the mean's
    interval, as it is of that finding's)."""
    scorable = ~np.isnan(estimate)
    rows = {}
    for j, name in enumerate(names):
        r = reps[:, j][~np.isnan(reps[:, j])]
        lo, hi = (np.percentile(r, [2.5, 97.5]) if len(r) and scorable[j] else (np.nan, np.nan))
        rows[name] = (estimate[j], lo, hi, len(r) if scorable[j] else 0)
    means = reps[:, scorable].mean(axis=1) if scorable.any() else np.full(len(reps), np.nan)
    means = means[~np.isnan(means)]
    est = estimate[scorable].mean() if scorable.any() else np.nan
    lo, hi = np.percentile(means, [2.5, 97.5]) if len(means) else (np.nan, np.nan)
    rows[MEAN] = (est, lo, hi, len(means))
    return pd.DataFrame.from_dict(rows, orient="index", columns=["estimate", "lower", "upper", "n_boot"]) \
        .astype({"n_boot": int})


def bootstrap_auroc(y_true, y_score, patient_ids, n_boot: int = 1000, seed: int = 0,
                    labels: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """Per-finding and mean AUROC with patient-level bootstrap 95% intervals.

    y_true, y_score: [images, findings] (0/1 labels, finite scores); patient_ids: one per image.
    Returns one row per finding (labels, default LABELS) and one named "mean": the estimate on the
    whole sample, the 2.5% and 97.5% percentiles over n_boot replicates that resample patients
    with replacement (seeded), and how many replicates could score it (one that drew no positive
    of a finding cannot). A finding without positives (or negatives) in the sample is NaN and left
    out of the mean, as in fedxray.metrics.mean_auroc."""
    y, (s,), codes, names = _inputs(y_true, [y_score], patient_ids, labels)
    (reps,) = _replicates(y, [s], codes, n_boot, seed)
    return _table(_point(y, s), reps, names)


def paired_bootstrap(y_true, score_a, score_b, patient_ids, n_boot: int = 1000, seed: int = 0,
                     labels: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """AUROC of model A minus model B on the same images, with a paired patient-level bootstrap:
    every replicate draws one set of patients and scores both models on it, so what the two share
    (which patients are hard) cancels. Same table as bootstrap_auroc, of the differences; an
    interval that excludes 0 says the gap is not resampling noise. A model against itself gives
    exactly 0 everywhere."""
    y, (a, b), codes, names = _inputs(y_true, [score_a, score_b], patient_ids, labels)
    reps_a, reps_b = _replicates(y, [a, b], codes, n_boot, seed)
    return _table(_point(y, a) - _point(y, b), reps_a - reps_b, names)


def _binned(y_true, y_prob, n_bins: int):
    """Labels and probabilities [images, findings] as float arrays, checked, and each probability's
    bin among n_bins equal-width bins over [0, 1] (the last one closed)."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_prob, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 2:
        raise ValueError(f"y_true {y.shape} and y_prob {p.shape} must both be [images, findings]")
    if not ((p >= 0) & (p <= 1)).all():
        raise ValueError("y_prob must hold probabilities in [0, 1] (apply the sigmoid to the logits)")
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    return y, p, np.minimum((p * n_bins).astype(int), n_bins - 1)


def expected_calibration_error(y_true, y_prob, n_bins: int = 10) -> np.ndarray:
    """Expected calibration error of each finding: predicted probabilities in n_bins equal-width
    bins over [0, 1] (the last one closed), ECE = sum over bins of (images in bin / images) x
    |positive rate in bin - mean probability in bin|. Shape [findings]."""
    y, p, bins = _binned(y_true, y_prob, n_bins)
    out = np.zeros(y.shape[1])
    for j in range(y.shape[1]):
        pos = np.bincount(bins[:, j], weights=y[:, j], minlength=n_bins)
        conf = np.bincount(bins[:, j], weights=p[:, j], minlength=n_bins)
        out[j] = np.abs(pos - conf).sum() / len(y)   # sum_b n_b/N * |pos_b/n_b - conf_b/n_b|
    return out


def reliability(y_true, y_prob, n_bins: int = 10) -> pd.DataFrame:
    """The reliability diagram's table of all predictions pooled (every image and finding): per
    equal-width bin of predicted probability, its images, mean probability and positive rate.
    The ECE of the pooled predictions is sum(count / total x |positive_rate - mean_prob|)."""
    if np.shape(y_true) != np.shape(y_prob):
        raise ValueError(f"y_true and y_prob must have the same shape, got {np.shape(y_true)} and {np.shape(y_prob)}")
    y, p, bins = (a.ravel() for a in _binned(np.reshape(y_true, (-1, 1)), np.reshape(y_prob, (-1, 1)), n_bins))
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        table = pd.DataFrame({"lower": np.arange(n_bins) / n_bins, "upper": np.arange(1, n_bins + 1) / n_bins,
                              "count": count,
                              "mean_prob": np.bincount(bins, weights=p, minlength=n_bins) / count,
                              "positive_rate": np.bincount(bins, weights=y, minlength=n_bins) / count})
    return table

"""Per-finding AUROC and AUPRC (average precision) on pooled predictions, and their means over the
findings that can be scored."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


def auroc_per_finding(y_true, y_score) -> np.ndarray:
    """AUROC of each column of y_score [n, C] against the 0/1 labels y_true [n, C], shape [C].

    A column whose labels are all 0 or all 1 has no AUROC: it is NaN, without a warning.
    Accepts numpy arrays or torch tensors (any device).
    """
    return _per_finding(roc_auc_score, y_true, y_score)


def auprc_per_finding(y_true, y_score) -> np.ndarray:
    """Average precision (area under the precision-recall curve, sklearn's
    average_precision_score) of each column, with auroc_per_finding's inputs and checks, shape [C].

    Unlike AUROC it moves with prevalence (a random score gets the positive rate), so it shows a
    test set whose findings are more frequent than validation's. The same columns are NaN as for
    AUROC, without a warning: one with no positive has none, and one with no negative, which
    sklearn scores 1.0 whatever the scores, says nothing of the model and would lift the mean.
    """
    return _per_finding(average_precision_score, y_true, y_score)


def nanmean_scored(values) -> float:
    """Mean over the findings that could be scored (NaN ones skipped); NaN when none could."""
    a = _as_numpy(values, "values").astype(np.float64).ravel()
    scored = a[~np.isnan(a)]
    return float(scored.mean()) if len(scored) else float("nan")


def mean_auroc(aurocs) -> float:
    """Mean over the findings that have an AUROC (NaN ones skipped); NaN when none has one."""
    return nanmean_scored(aurocs)


def mean_auprc(auprcs) -> float:
    """Mean over the findings that have an AUPRC (NaN ones skipped); NaN when none has one."""
    return nanmean_scored(auprcs)


def _per_finding(score, y_true, y_score) -> np.ndarray:
    """score(labels, scores) of each column with both classes present; NaN for the others."""
    y, s = _checked(y_true, y_score)
    out = np.full(y.shape[1], np.nan)
    for j in range(y.shape[1]):
        # sklearn warns (or raises) on a single class: skip such columns, they stay NaN.
        if 0 < int(y[:, j].sum()) < len(y):
            out[j] = score(y[:, j], s[:, j])
    return out


def _checked(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    """y_true as int64 0/1 and y_score as finite float64, both [samples, findings] of one shape."""
    y = _as_numpy(y_true, "y_true")
    s = _as_numpy(y_score, "y_score")
    if y.ndim != 2 or s.ndim != 2:
        raise ValueError(f"y_true and y_score must be 2-D [samples, findings], got shapes "
                         f"{y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"y_true has shape {y.shape} but y_score has shape {s.shape}")
    s = s.astype(np.float64)
    if not np.isfinite(s).all():
        row, col = np.argwhere(~np.isfinite(s))[0]
        raise ValueError(f"y_score has {int((~np.isfinite(s)).sum())} non-finite value(s), first "
                         f"{s[row, col]} at row {row}, column {col}")
    bad = (y != 0) & (y != 1)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(f"y_true must hold only 0 and 1, found {y[row, col].item()} at row {row}, "
                         f"column {col}")
    return y.astype(np.int64), s


def _as_numpy(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; float64 first, as numpy has no bfloat16
        x = x.detach().cpu()
        x = (x.double() if x.is_floating_point() else x).numpy()
    a = np.asarray(x)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    return a

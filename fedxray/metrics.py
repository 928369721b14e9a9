"""Per-finding AUROC on pooled predictions, and its mean over the findings that can be scored."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def auroc_per_finding(y_true, y_score) -> np.ndarray:
    """AUROC of each column of y_score [n, C] against the 0/1 labels y_true [n, C], shape [C].

    A column whose labels are all 0 or all 1 has no AUROC: it is NaN, without a warning.
    Accepts numpy arrays or torch tensors (any device).
    """
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
    y = y.astype(np.int64)
    out = np.full(y.shape[1], np.nan)
    for j in range(y.shape[1]):
        positives = int(y[:, j].sum())
        # roc_auc_score warns (or raises) on a single class: skip such columns, they stay NaN.
        if 0 < positives < len(y):
            out[j] = roc_auc_score(y[:, j], s[:, j])
    return out


def mean_auroc(aurocs) -> float:
    """Mean over the findings that have an AUROC (NaN ones skipped); NaN when none has one."""
    a = _as_numpy(aurocs, "aurocs").astype(np.float64).ravel()
    scored = a[~np.isnan(a)]
    return float(scored.mean()) if len(scored) else float("nan")


def _as_numpy(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; float64 first, as numpy has no bfloat16
        x = x.detach().cpu()
        x = (x.double() if x.is_floating_point() else x).numpy()
    a = np.asarray(x)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    return a

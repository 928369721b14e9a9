"""What a client minimises: its data loss (BCE, computed by the Client) plus an objective's penalty.

An objective sees the client's live trainable exchanged parameters (`params`: name -> parameter,
on the training device), the global values it started from (`anchor`, detached) and the extra
tensors its strategy sent it (`payload`, same names; empty except for SCAFFOLD). `penalty` is
added to the loss at every step (in float32, outside autocast, so a GradScaler scales it like the
loss); `reply` is what the client sends back besides its state, once, after training.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import numpy as np
import torch
from torch import Tensor


class Objective:
    """Plain BCE: no penalty, nothing extra sent back (FedAvg and the server-side strategies)."""

    name = "bce"

    def penalty(self, params: Mapping[str, Tensor], anchor: Mapping[str, Tensor],
                payload: Mapping[str, Tensor]) -> Optional[Tensor]:
        """A 0-d tensor added to the data loss, or None for nothing."""
        return None

    def reply(self, params: Mapping[str, Tensor], anchor: Mapping[str, Tensor],
              payload: Mapping[str, Tensor], steps: int, lr: float) -> dict[str, Tensor]:
        """Tensors sent back besides the state (ClientUpdate.extra), after `steps` local steps of `lr`."""
        return {}


class Proximal(Objective):
    """FedProx (Li et al. 2020): (proximal_mu / 2) * sum ||w - w_global||^2, whose gradient
    proximal_mu * (w - w_global) pulls each client back towards the global model. proximal_mu = 0
    adds nothing at all (None), so FedProx with mu 0 is FedAvg bitwise."""

    name = "proximal"

    def __init__(self, proximal_mu: float):
        if isinstance(proximal_mu, bool) or not isinstance(proximal_mu, (int, float)) \
                or not math.isfinite(proximal_mu) or proximal_mu < 0:
            raise ValueError(f"Proximal: proximal_mu must be a finite number >= 0, got {proximal_mu!r}")
        self.proximal_mu = float(proximal_mu)

    def penalty(self, params, anchor, payload):
        if self.proximal_mu == 0:
            return None
        _check_names(params, anchor, "anchor", "the global values it started from")
        squares = torch.stack([(w.float() - anchor[k].float()).square().sum() for k, w in params.items()])
        return 0.5 * self.proximal_mu * squares.sum()

    def __repr__(self) -> str:
        return f"Proximal(proximal_mu={self.proximal_mu})"


class Corrected(Objective):
    """SCAFFOLD (Karimireddy et al. 2020, option II): the payload holds d = c - c_i per parameter;
    the penalty sum <w, d> has gradient exactly d, so plain SGD on loss + penalty steps along
    g - c_i + c, and a GradScaler handles it like any loss.

    reply() returns the client's NEW control variate c_i+ = c_i - c + (x - y) / (K * lr)
    = (x - y) / (K * lr) - d: the client knows only d, not c_i and c apart, so it cannot form the
    change c_i+ - c_i itself; the server, which keeps c_i, replaces its copy (Scaffold.aggregate).
    """

    name = "corrected"

    def penalty(self, params, anchor, payload):
        _check_names(params, payload, "payload", "SCAFFOLD's correction c - c_i")
        terms = torch.stack([(w.float() * payload[k].float()).sum() for k, w in params.items()])
        return terms.sum()

    def reply(self, params, anchor, payload, steps, lr):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"Corrected.reply: steps must be the number of local SGD steps taken (an integer "
                             f">= 1), got {steps!r}; a client that took no step has no control variate to send")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"Corrected.reply: lr must be the client's learning rate (> 0), got {lr!r}")
        _check_names(params, payload, "payload", "SCAFFOLD's correction c - c_i")
        _check_names(params, anchor, "anchor", "the global values it started from")
        scale = 1.0 / (steps * lr)
        return {k: ((_cpu64(anchor[k]) - _cpu64(w)) * scale - _cpu64(payload[k])).float() for k, w in params.items()}


def _cpu64(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float64)


def _check_names(params: Mapping[str, Tensor], other: Mapping[str, Tensor], what: str, meaning: str) -> None:
    if params.keys() != other.keys():
        missing, extra = sorted(set(params) - set(other)), sorted(set(other) - set(params))
        raise ValueError(f"the {what} ({meaning}) must hold exactly the trainable exchanged parameters: "
                         f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}, unexpected "
                         f"{extra[:3]}{' ...' if len(extra) > 3 else ''}; build it from the same global state "
                         f"with the model's buffers named as buffers")


def label_counts(labels) -> tuple[int, np.ndarray]:
    """(images, positives per finding) of a client's labels: a table with the LABELS columns or an
    [n, 14] 0/1 array. What a client reports for pos_weight: counts, never images."""
    from .data import LABELS
    y = labels.loc[:, list(LABELS)].to_numpy() if hasattr(labels, "loc") else np.asarray(labels)
    if y.ndim != 2 or y.shape[1] != len(LABELS):
        raise ValueError(f"labels must have {len(LABELS)} finding columns, got shape {y.shape}")
    return int(y.shape[0]), (y > 0).sum(axis=0).astype(np.int64)


def pos_weight_from_counts(counts) -> Tensor:
    """BCE pos_weight per finding from each client's (images, positives per finding): negatives /
    positives of the whole federation, the same as computed from the pooled labels. A finding without
    a positive anywhere keeps weight 1 (nothing to up-weight).

    Per-client weights would differ: under label skew a site with few positives of a finding would
    weigh them far more than the federation does, so the clients would pull the shared head towards
    different operating points, and FedAvg would average models trained for different losses."""
    counts = list(counts)
    if not counts:
        raise ValueError("pos_weight needs the label counts of at least one client")
    n = sum(int(c[0]) for c in counts)
    pos = np.sum([np.asarray(c[1], dtype=np.int64) for c in counts], axis=0)
    if (pos < 0).any() or (pos > n).any():
        raise ValueError(f"label counts are inconsistent: positives {pos.tolist()} for {n} images")
    weight = np.where(pos > 0, (n - pos) / np.maximum(pos, 1), 1.0)
    return torch.tensor(weight, dtype=torch.float32)

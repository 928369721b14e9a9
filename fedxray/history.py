"""The history format: one long table (round, split, client, metric, value) that both drivers
write and every plot reads. Its column names, the names of its special rows and the functions that
build and select rows live here and nowhere else."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from torch import Tensor

from .aggregation import state_nbytes
from .data import LABELS
from .metrics import auprc_per_finding, auroc_per_finding, nanmean_scored

COLUMNS = ["round", "split", "client", "metric", "value"]
# The `client` of rows that are not one client's: the global model's metrics, the example-weighted
# mean of the clients' training losses, and the server's communication counts.
GLOBAL, ALL, SERVER = "global", "all", "server"
SPLITS = ("train", "val", "test", "comm", "privacy")
# Site k's own held-out test patients (Config.site_test_fraction) are split "site_<k>".
SITE = "site_"


def site_split(k: int) -> str:
    return f"{SITE}{int(k)}"


def is_site_split(split: str) -> bool:
    return isinstance(split, str) and split.startswith(SITE) and split[len(SITE):].isdigit()


def row(round_num: int, split: str, client, metric: str, value: float) -> dict:
    return dict(round=int(round_num), split=split, client=str(client), metric=metric, value=float(value))


def metric_rows(round_num: int, split: str, client, probs: np.ndarray, labels: np.ndarray) -> list[dict]:
    """loss (BCE averaged over examples and findings), then mean_auroc and one auroc_<finding> per
    finding, then the same for AUPRC (mean_auprc, auprc_<finding>), all from pooled predictions."""
    p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    loss = float(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean()) if len(p) else float("nan")
    rows = [row(round_num, split, client, "loss", loss)]
    for metric, per_finding in (("auroc", auroc_per_finding), ("auprc", auprc_per_finding)):
        scores = per_finding(labels, probs)
        rows.append(row(round_num, split, client, f"mean_{metric}", nanmean_scored(scores)))
        rows += [row(round_num, split, client, f"{metric}_{name}", v) for name, v in zip(LABELS, scores)]
    return rows


def mean_train_loss(updates: Sequence) -> Optional[float]:
    """The example-weighted mean training loss of the updates that report one (under differential
    privacy clients report none: NaN); None when none does."""
    reported = [u for u in updates if not np.isnan(u.train_loss)]
    n = sum(u.num_examples for u in reported)
    return sum(u.train_loss * u.num_examples for u in reported) / n if n else None


def train_rows(round_num: int, client_ids: Sequence[int], updates: Sequence, sent_bytes: Sequence[int],
               received_bytes: Optional[int] = None) -> list[dict]:
    """A round's training and communication rows: each client's loss and examples, their
    example-weighted mean loss ("all"), and the bytes the server sent (sent_bytes: one entry per
    client it sent to, the global state plus any strategy payload) and received (each update's
    state plus its extra tensors, e.g. SCAFFOLD's control variates)."""
    r = round_num
    # Under differential privacy clients report no loss (NaN): it is not covered by the guarantee.
    reported = [(k, u) for k, u in zip(client_ids, updates) if not np.isnan(u.train_loss)]
    rows = [row(r, "train", k, "train_loss", u.train_loss) for k, u in reported]
    rows += [row(r, "train", k, "num_examples", u.num_examples) for k, u in zip(client_ids, updates)]
    loss = mean_train_loss(updates)
    if loss is not None:
        rows.append(row(r, "train", ALL, "train_loss", loss))
    rows.append(row(r, "comm", SERVER, "bytes_sent", sum(sent_bytes)))
    if received_bytes is None:   # (under secure aggregation the updates hold no state: it says what came in)
        received_bytes = sum(state_nbytes(u.state) + state_nbytes(u.extra) for u in updates)
    rows.append(row(r, "comm", SERVER, "bytes_received", received_bytes))
    return rows


def message_bytes(state: Mapping[str, Tensor], payload: Optional[Mapping[str, Tensor]] = None) -> int:
    """Bytes of one message from the server: the global state and a strategy's payload."""
    return state_nbytes(state) + state_nbytes(payload or {})


def frame(rows: Sequence[dict]) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=COLUMNS)


def select(history: pd.DataFrame, split: Optional[str] = None, metric: Optional[str] = None,
           client: Optional[str] = GLOBAL) -> pd.DataFrame:
    """The rows of one split, metric and client (None: any); by default the global model's."""
    keep = np.ones(len(history), dtype=bool)
    for column, value in (("split", split), ("metric", metric), ("client", client)):
        if value is not None:
            keep &= (history[column].astype(str) == str(value)).to_numpy()
    return history[keep]


def last_value(rows: Sequence[dict] | pd.DataFrame, split: str, metric: str, client: str = GLOBAL) -> float:
    """The latest value of a series, or NaN when it has none."""
    h = rows if isinstance(rows, pd.DataFrame) else frame(rows)
    s = select(h, split, metric, client)
    return float(s["value"].iloc[-1]) if len(s) else float("nan")


def read(path) -> pd.DataFrame:
    """A history.csv as written by fedxray, checked: its columns, integer rounds, known splits and
    numeric values (ValueError names the file and what is wrong)."""
    try:
        h = pd.read_csv(path, dtype={"client": str, "split": str, "metric": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable history CSV ({type(e).__name__}: {e})") from None
    if list(h.columns) != COLUMNS:
        raise ValueError(f"{path}: columns {list(h.columns)}, expected {COLUMNS}")
    if not pd.api.types.is_integer_dtype(h["round"]) or (h["round"] < 0).any():
        raise ValueError(f"{path}: column 'round' must hold integers >= 0")
    if not pd.api.types.is_numeric_dtype(h["value"]):
        raise ValueError(f"{path}: column 'value' must be numeric")
    unknown = sorted(s for s in set(h["split"]) - set(SPLITS) if not is_site_split(s))
    if unknown:
        raise ValueError(f"{path}: unknown split(s) {unknown[:3]}; expected {SPLITS} or {SITE}<k>")
    return h

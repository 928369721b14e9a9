"""Per-hospital folders in the NIH layout, written from one NIH copy and a partition, to try a
Flower federation on one machine (each SuperNode then reads only its own folder)."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..data import LABELS, NO_FINDING, DataError
from ..io import atomic_write

log = logging.getLogger(__name__)

CSV_NAME = "Data_Entry_2017.csv"
IMAGES = "images"
# The Kaggle header names that fedxray.read_metadata maps to its columns.
_HEADER = {"image": "Image Index", "finding_labels": "Finding Labels", "follow_up": "Follow-up #",
           "patient_id": "Patient ID", "age": "Patient Age", "sex": "Patient Gender", "view": "View Position"}


def write_nih_folder(frame: pd.DataFrame, folder: str | os.PathLike, link: bool = True) -> Path:
    """Write the rows of a metadata table (with a 'path' column) as an NIH-layout folder:
    images/<name> (hard links when link=True and the file system allows, else copies) and a
    Kaggle-flavour Data_Entry_2017.csv in the table's row order, written last, so a folder with a
    CSV is complete. fedxray.load_nih(folder) reads the same rows back. Refuses a non-empty folder.
    """
    folder = Path(folder)
    _check_empty(folder)
    missing = [c for c in ("path", *_HEADER, *LABELS) if c not in frame and c != "finding_labels"]
    if missing:
        raise DataError(f"the table lacks column(s) {missing}: pass a table from fedxray.load_nih "
                        f"(or read_metadata + attach_paths)")
    images = folder / IMAGES
    images.mkdir(parents=True, exist_ok=True)
    copied = 0
    for name, src in zip(frame["image"], frame["path"]):
        copied += not _link_or_copy(Path(src), images / name, link)
    if copied and link:
        log.info("%s: %d image(s) copied (hard links not possible across file systems)", folder, copied)
    table = pd.DataFrame({
        _HEADER["image"]: frame["image"].to_numpy(),
        _HEADER["finding_labels"]: finding_labels(frame),
        _HEADER["follow_up"]: frame["follow_up"].to_numpy(),
        _HEADER["patient_id"]: frame["patient_id"].to_numpy(),
        _HEADER["age"]: [_age_text(a) for a in frame["age"]],
        _HEADER["sex"]: frame["sex"].to_numpy(),
        _HEADER["view"]: frame["view"].to_numpy(),
    })
    atomic_write(folder / CSV_NAME, lambda tmp: table.to_csv(tmp, index=False))
    return folder


def write_client_folders(parts: Sequence[pd.DataFrame], out_dir: str | os.PathLike,
                         prefix: str = "hospital_", link: bool = True) -> list[Path]:
    """One NIH-layout folder per client, out_dir/hospital_k for parts[k] (e.g. from
    fedxray.partition), holding only that client's rows. Nothing is written unless every target
    folder is absent or empty, and no patient may be in two parts."""
    out = Path(out_dir)
    folders = [out / f"{prefix}{k}" for k in range(len(parts))]
    for folder in folders:
        _check_empty(folder)
    owner: dict[int, int] = {}
    for k, part in enumerate(parts):
        for pid in np.unique(part["patient_id"].to_numpy()):
            j = owner.setdefault(int(pid), k)
            if j != k:
                raise DataError(f"patient {pid} is in parts {j} and {k}: a patient's images must stay at "
                                f"one hospital (use fedxray.partition)")
    return [write_nih_folder(part, folder, link) for part, folder in zip(parts, folders)]


def finding_labels(frame: pd.DataFrame) -> list[str]:
    """The 'Finding Labels' text of each row from its label columns ('A|B', or 'No Finding')."""
    y = frame.loc[:, list(LABELS)].to_numpy() > 0
    return ["|".join(n for n, on in zip(LABELS, row) if on) or NO_FINDING for row in y]


def _age_text(age) -> str:
    # Positional notation, shortest text that reads back as the same float: 58, 0.0833...
    return "" if pd.isna(age) else np.format_float_positional(float(age), trim="-")


def _check_empty(folder: Path) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"{folder} already exists and is not empty: delete it, or choose another "
                              f"folder (nothing was written)")


def _link_or_copy(src: Path, dst: Path, link: bool) -> bool:
    """Hard-link src to dst, or copy it; True when linked."""
    if not src.is_file():
        raise FileNotFoundError(f"image {src} listed in the table does not exist")
    if link:
        try:
            os.link(src, dst)
            return True
        except OSError:
            pass
    shutil.copy2(src, dst)
    return False

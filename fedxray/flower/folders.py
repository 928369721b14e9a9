"""Per-hospital folders in the NIH layout, written from one NIH copy and a partition, to try a
Flower federation on one machine (each SuperNode then reads only its own folder)."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path, PurePosixPath, PureWindowsPath
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
    _check_table(frame, "the table")
    absent = [p for p in frame["path"] if not Path(p).is_file()]
    if absent:   # checked before writing, so a failure leaves no half-written folder
        raise FileNotFoundError(f"{len(absent)} image(s) listed in the table do not exist (first {absent[0]}); "
                                f"nothing was written to {folder}")
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
    for k, part in enumerate(parts):
        _check_table(part, f"part {k}")
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


def _check_table(frame: pd.DataFrame, what: str) -> None:
    """The columns write_nih_folder needs, and image names that stay inside images/, each once."""
    missing = [c for c in ("path", *_HEADER, *LABELS) if c not in frame and c != "finding_labels"]
    if missing:
        raise DataError(f"{what} lacks column(s) {missing}: pass a table from fedxray.load_nih "
                        f"(or read_metadata + attach_paths)")
    seen: set[str] = set()
    for row, name in enumerate(frame["image"]):
        # A name such as '../../x.png' or '/home/x.png' would be written outside the folder.
        if not _plain_name(name):
            raise DataError(f"{what}, row {row}: image name {name!r} is not a plain file name (no folder, "
                            f"separator, '.', '..', NUL or surrounding spaces): fix its 'image' value "
                            f"(nothing was written)")
        if name in seen:
            raise DataError(f"{what}, row {row}: image name {name!r} appears twice; each image must "
                            f"appear once (nothing was written)")
        seen.add(name)


def _plain_name(name: object) -> bool:
    # Both path flavours: 'a\\b' and 'C:x.png' are plain on POSIX but not on Windows.
    return (isinstance(name, str) and name not in ("", ".", "..") and "\0" not in name
            and name == name.strip()
            and PurePosixPath(name).name == name and PureWindowsPath(name).name == name)


def _link_or_copy(src: Path, dst: Path, link: bool) -> bool:
    """Hard-link src to dst, or copy it; True when linked. An existing dst (a file, or a link
    planted there) is never replaced nor written through."""
    if not src.is_file():
        raise FileNotFoundError(f"image {src} listed in the table does not exist")
    try:
        if link:
            try:
                os.link(src, dst)
                return True
            except FileExistsError:
                raise
            except OSError:
                pass          # another file system, or one without hard links: copy instead
        with open(src, "rb") as fin, open(dst, "xb") as fout:     # "x": exclusive creation
            shutil.copyfileobj(fin, fout, 1 << 20)
    except FileExistsError:
        raise FileExistsError(f"{dst} already exists (is another process writing this folder?); "
                              f"nothing was overwritten: delete the folder and write it again") from None
    shutil.copystat(src, dst)
    return False

"""The NIH ChestX-ray14 data layer: metadata in any CSV flavour, the image index, the patient split,
and the PyTorch dataset."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

# Order of the ChestX-ray14 paper and of most published AUROC tables.
LABELS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
NO_FINDING = "No Finding"
CSV_GLOB = "Data_Entry_2017*.csv"
CSV_NAMES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
BOX_FILE = "BBox_List_2017.csv"        # NIH's boxes around 984 findings on test images (read_boxes)
KAGGLE_INPUT = Path("/kaggle/input")

# ImageNet statistics, what torchvision's pretrained ResNet weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# CSV header (stripped, lower-case) -> our column. Several headers may map to one column.
_COLUMNS = {
    "image index": "image",
    "finding labels": "finding_labels",
    "follow-up #": "follow_up",
    "patient id": "patient_id",
    "patient age": "age",
    "patient gender": "sex",
    "patient sex": "sex",
    "view position": "view",
}
_REQUIRED = ("image", "finding_labels", "patient_id", "age", "sex", "view")
_HEADER_FOR = {"image": "Image Index", "finding_labels": "Finding Labels", "patient_id": "Patient ID",
               "age": "Patient Age", "sex": "Patient Gender (or Patient Sex)", "view": "View Position"}
# A line of an NIH split list: a bare image file name, no folder, comma or space.
_LIST_NAME = re.compile(r"[^\s,;/\\]+\.(?:png|jpe?g)", re.IGNORECASE)
_AGE_UNITS = {"Y": 1.0, "M": 1.0 / 12.0, "W": 7.0 / 365.25, "D": 1.0 / 365.25}
MAX_PLAUSIBLE_AGE = 120.0
_MAX_INT = 10**18 - 1          # 18 digits: every accepted id fits int64 exactly


class DataError(ValueError):
    """Raised for data that cannot be used as given; the message names the file and what to do."""


# --------------------------------------------------------------------------- metadata

def read_metadata(csv_path: str | os.PathLike) -> pd.DataFrame:
    """Read any flavour of Data_Entry_2017*.csv into one row per image.

    Columns: image, patient_id (int), view, age (years, float; NaN when implausible), sex,
    follow_up (int or -1), then one uint8 column per name in LABELS. The table's
    ``attrs["source"]`` holds the CSV path (used to find the split lists beside it).
    """
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"NIH metadata CSV not found: {path}. Point data_dir (or csv_path) at the folder holding "
            f"Data_Entry_2017.csv, or attach the NIH Chest X-rays dataset on Kaggle.")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError as e:
        raise DataError(f"{path} is empty: expected the NIH Data_Entry_2017 CSV") from e
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not a readable CSV ({e})") from e

    rename: dict[str, str] = {}
    for col in raw.columns:
        key = _COLUMNS.get(str(col).strip().lower())
        if key is not None and key not in rename.values():
            rename[col] = key
    missing = [c for c in _REQUIRED if c not in rename.values()]
    if missing:
        names = ", ".join(repr(_HEADER_FOR[c]) for c in missing)
        raise DataError(
            f"{path}: missing column(s) {names}; found {list(map(str, raw.columns))}. "
            f"Is this the NIH Data_Entry_2017 CSV?")
    raw = raw.rename(columns=rename)
    if len(raw) == 0:
        raise DataError(f"{path} has a header but no rows")

    out = pd.DataFrame({"image": raw["image"].str.strip()})
    if (out["image"] == "").any():
        rows = np.flatnonzero(out["image"] == "")[:5] + 2
        raise DataError(f"{path}: empty 'Image Index' on line(s) {rows.tolist()}")
    dup = out["image"].duplicated()
    if dup.any():
        raise DataError(f"{path}: {int(dup.sum())} duplicated image name(s), first "
                        f"{out['image'][dup].iloc[0]!r}; each image must appear once")
    out["patient_id"] = _parse_int(raw["patient_id"], path, "Patient ID", minimum=1)
    out["view"] = raw["view"].str.strip().str.upper()
    out["age"] = _parse_age(raw["age"], path)
    out["sex"] = raw["sex"].str.strip().str.upper()
    if "follow_up" in raw:
        out["follow_up"] = _parse_int(raw["follow_up"], path, "Follow-up #", minimum=0)
    else:
        out["follow_up"] = -1
    labels = parse_finding_labels(raw["finding_labels"], source=str(path))
    for j, name in enumerate(LABELS):
        out[name] = labels[:, j]
    out.attrs["source"] = str(path.resolve())
    return out


def _parse_int(col: pd.Series, path: Path, header: str, minimum: int) -> pd.Series:
    """Whole numbers >= minimum, read as text: '12', ' 12 ', '00000012' and '12.0' (a spreadsheet
    round-trip) are 12. Signs, exponents ('1e30'), fractions and more than 18 digits are refused:
    pd.to_numeric would read a huge id as a float that astype(int64) turns into one negative
    number, merging patients."""
    digits = col.str.extract(r"^\s*0*([0-9]{1,18})(?:\.0*)?\s*$", expand=False)
    vals = digits.fillna("-1").astype(np.int64)          # -1 < minimum: refused below
    bad = (vals < minimum).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: {int(bad.sum())} row(s) whose {header!r} is not a whole number from "
                        f"{minimum} to {_MAX_INT:,}, first {col.iloc[i]!r} on line {i + 2}: fix those "
                        f"rows (NIH patient ids run from 1 to 30805, follow-ups from 0), or check that "
                        f"this is the NIH Data_Entry_2017 CSV")
    return vals


def _parse_age(col: pd.Series, path: Path) -> pd.Series:
    """Ages as years. Accepts 58, 58.0 and the 2017 release's 058Y / 011M / 005D."""
    text = col.str.strip().str.upper()
    m = text.str.extract(r"^(\d+(?:\.\d+)?)\s*([YMWD]?)$")
    bad = m[0].isna() & (text != "")
    if bad.any():
        raise DataError(f"{path}: {int(bad.sum())} unreadable 'Patient Age' value(s), first "
                        f"{col[bad].iloc[0]!r}; expected 58 or 058Y/011M/005D")
    unit = m[1].fillna("").replace("", "Y").map(_AGE_UNITS)
    years = m[0].astype(float) * unit
    implausible = years > MAX_PLAUSIBLE_AGE
    if implausible.any():
        log.warning("%s: %d age(s) above %d years (max %.0f) set to NaN; the rows are kept",
                    path.name, int(implausible.sum()), MAX_PLAUSIBLE_AGE, years.max())
        years[implausible] = np.nan
    return years


# --------------------------------------------------------------------------- bounding boxes

# NIH's box file spells one finding differently from its labels.
BOX_SPELLINGS = {"Infiltrate": "Infiltration"}


def read_boxes(csv_path: str | os.PathLike) -> pd.DataFrame:
    """NIH's BBox_List_2017.csv as one row per box: image, finding (in LABELS' spelling:
    "Infiltrate" becomes "Infiltration"), x, y, w, h (floats, pixels of the 1024 x 1024 original;
    the demo's own box file uses its image size). Accepts the Kaggle header
    ``Image Index,Finding Label,Bbox [x,y,w,h],,,`` and rows with or without trailing empty
    fields. A finding that is not one of LABELS, a missing or non-numeric coordinate, a negative
    corner or a box without area is refused, naming the file, line and value. A file with a header
    and no box (a small demo's) gives an empty table, with a warning."""
    import csv
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"NIH box file not found: {path}. It is BBox_List_2017.csv beside "
                                f"Data_Entry_2017.csv in the NIH dataset")
    rows = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header[:2]] != ["image index", "finding label"] \
                or not any("bbox" in h.lower() for h in header[2:3]):
            raise DataError(f"{path}: expected the header 'Image Index,Finding Label,Bbox [x,y,w,h]', got "
                            f"{','.join(header or [])[:120]!r}. Is this NIH's BBox_List_2017.csv?")
        for line, fields in enumerate(reader, start=2):
            if not any(x.strip() for x in fields):
                continue
            if len(fields) < 6 or any(x.strip() for x in fields[6:]):
                raise DataError(f"{path}, line {line}: expected image, finding, x, y, w, h (and only empty fields "
                                f"after), got {','.join(fields)[:120]!r}")
            image, finding = fields[0].strip(), fields[1].strip()
            finding = BOX_SPELLINGS.get(finding, finding)
            if finding not in LABELS:
                raise DataError(f"{path}, line {line}: finding {fields[1].strip()!r} is not one of the 14 NIH "
                                f"findings {list(LABELS)} (nor {sorted(BOX_SPELLINGS)})")
            if not image:
                raise DataError(f"{path}, line {line}: empty image name")
            try:
                x, y, w, h = (float(v) for v in fields[2:6])
            except ValueError:
                raise DataError(f"{path}, line {line}: the box {fields[2:6]} is not four numbers") from None
            if not all(np.isfinite([x, y, w, h])) or x < 0 or y < 0 or w <= 0 or h <= 0:
                raise DataError(f"{path}, line {line}: the box x={x}, y={y}, w={w}, h={h} needs a corner >= 0 and a "
                                f"width and height > 0")
            rows.append((image, finding, x, y, w, h))
    if not rows:   # a small synthetic demo may have no boxed finding on its test images
        log.warning("%s has a header but no boxes", path)
    return pd.DataFrame(rows, columns=["image", "finding", "x", "y", "w", "h"]).astype(
        {"image": object, "finding": object, "x": float, "y": float, "w": float, "h": float})


def parse_finding_labels(labels: Iterable[str], source: str = "metadata") -> np.ndarray:
    """'A|B' strings -> uint8 matrix [n, 14] in LABELS order. 'No Finding' is all zeros.

    Names are matched exactly; an unknown name, or 'No Finding' joined with findings, raises an
    error naming the text and its row count.
    """
    labels = pd.Series(list(labels), dtype=object).fillna("").astype(str)
    uniq, inverse = np.unique(labels.to_numpy(), return_inverse=True)
    position = {name: j for j, name in enumerate(LABELS)}
    table = np.zeros((len(uniq), len(LABELS)), dtype=np.uint8)
    unknown: dict[str, int] = {}
    contradictory: dict[str, int] = {}
    counts = np.bincount(inverse, minlength=len(uniq))
    for i, text in enumerate(uniq):
        names = [n.strip() for n in text.split("|")]
        if NO_FINDING in names and set(names) != {NO_FINDING}:
            contradictory[text] = int(counts[i])
        for name in names:
            j = position.get(name)
            if j is not None:
                table[i, j] = 1
            elif name != NO_FINDING:
                unknown[name] = unknown.get(name, 0) + int(counts[i])
    if unknown:
        desc = ", ".join(f"{n!r} ({_rows(c)})" for n, c in sorted(unknown.items()))
        raise DataError(
            f"{source}: unknown finding name(s) in 'Finding Labels': {desc}. Known names: "
            f"{', '.join(LABELS)} and {NO_FINDING!r} (exact spelling, joined with '|').")
    if contradictory:
        texts = sorted(contradictory.items())
        desc = ", ".join(f"{t!r} ({_rows(c)})" for t, c in texts[:5]) + (", ..." if len(texts) > 5 else "")
        raise DataError(
            f"{source}: {NO_FINDING!r} combined with findings on {_rows(sum(contradictory.values()))} "
            f"of 'Finding Labels': {desc}. {NO_FINDING!r} means none of the 14 findings, so such a "
            f"row contradicts itself: keep either its findings or {NO_FINDING!r}.")
    return table[inverse]


def _rows(count: int) -> str:
    return f"{count} row{'s' if count != 1 else ''}"


def label_matrix(frame: pd.DataFrame) -> np.ndarray:
    """The float32 [n, 14] label matrix of a metadata table, aligned row for row."""
    return frame.loc[:, list(LABELS)].to_numpy(dtype=np.float32, copy=True)


# --------------------------------------------------------------------------- locating data

def find_csv(data_dir: str | os.PathLike | None = None,
             search_root: str | os.PathLike = KAGGLE_INPUT, max_depth: int = 4) -> Path:
    """The metadata CSV: in data_dir when given (or data_dir itself if it is a CSV file),
    else the first Data_Entry_2017*.csv found under search_root (Kaggle's /kaggle/input)."""
    if data_dir is not None:
        d = Path(data_dir)
        if d.is_file():
            return d
        if not d.is_dir():
            raise FileNotFoundError(f"data_dir {d} does not exist")
        for name in CSV_NAMES:
            if (d / name).is_file():
                return d / name
        found = sorted(d.glob(CSV_GLOB))
        if found:
            return found[0]
        raise FileNotFoundError(f"No {CSV_GLOB} in {d}: point data_dir at the folder holding "
                                f"the NIH metadata CSV")
    root = Path(search_root)
    if root.is_dir():
        found = _find_files(root, CSV_GLOB, max_depth)
        if found:
            found.sort(key=lambda p: (CSV_NAMES.index(p.name) if p.name in CSV_NAMES else 9, str(p)))
            return found[0]
    raise FileNotFoundError(
        f"{CSV_NAMES[0]} not found under {root}: attach the NIH Chest X-rays dataset on Kaggle, "
        f"or set data_dir (None runs the synthetic demo data in the notebook)")


def find_boxes(data_dir: str | os.PathLike | None = None, search_root: str | os.PathLike = KAGGLE_INPUT,
               max_depth: int = 4) -> Path | None:
    """NIH's box file (or the demo's): BBox_List_2017.csv beside the metadata CSV that find_csv
    finds, else the first one under search_root when data_dir is None; None when there is none."""
    try:
        beside = find_csv(data_dir, search_root, max_depth).parent / BOX_FILE
    except FileNotFoundError:
        beside = None
    if beside is not None and beside.is_file():
        return beside
    if data_dir is None and Path(search_root).is_dir():
        found = _find_files(Path(search_root), BOX_FILE, max_depth)
        if found:
            return found[0]
    return None


def _find_files(root: Path, pattern: str, max_depth: int) -> list[Path]:
    """Files matching pattern up to max_depth below root, not descending into image folders.
    Linked folders are followed, each real folder once, level by level (the shallowest route)."""
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    level = [root]
    for _ in range(max_depth + 1):
        nxt: list[Path] = []
        for d in level:
            if not _first_visit(d, seen):
                continue
            found.extend(sorted(p for p in d.glob(pattern) if p.is_file()))
            if d.name == "images":
                continue
            try:
                nxt.extend(sorted(e for e in d.iterdir() if e.is_dir() and not e.name.startswith(".")))
            except OSError:
                continue
        level = nxt
    return found


def _first_visit(folder: Path, seen: set[tuple[int, int]]) -> bool:
    """True the first time a real folder is reached, by any route: two links to one folder, or a
    link to an ancestor (a loop), are walked once. Keyed by device and inode, so bind mounts too."""
    st = folder.stat()
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return False
    seen.add(key)
    return True


def index_images(data_dir: str | os.PathLike, suffixes: Sequence[str] = (".png",)) -> dict[str, Path]:
    """Map image file name -> path for every image under data_dir, built once.

    Finds the Kaggle layout (images_001/images/*.png ... images_012/images/*.png), a flat folder,
    or any nesting below data_dir, following linked folders (setups that link images_001 to the
    Kaggle input). The same name in two places is an error (which one is meant?), unless both
    are the very same file reached by two routes (a file link, a hard link): the first route in
    sorted order is kept.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    index: dict[str, Path] = {}
    suffixes = tuple(s.lower() for s in suffixes)
    seen: set[tuple[int, int]] = set()
    _first_visit(root, seen)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in sorted(dirnames)
                       if not d.startswith(".") and _first_visit(Path(dirpath) / d, seen)]
        for name in filenames:
            if name.lower().endswith(suffixes):
                p = Path(dirpath) / name
                if name in index and not _same_file(index[name], p):
                    raise DataError(f"image {name!r} found twice: {index[name]} and {p}; "
                                    f"keep one copy under {root}")
                index.setdefault(name, p)
    return index


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:          # a broken link is not the other file
        return False


def attach_paths(metadata: pd.DataFrame, images: str | os.PathLike | Mapping[str, Path],
                 drop_missing: bool = False) -> pd.DataFrame:
    """A copy of metadata with a 'path' column, from an image folder or a prebuilt index.

    Images listed but absent raise an error (how many, the first few) unless drop_missing=True,
    which keeps the present ones and logs how many were dropped.
    """
    index = images if isinstance(images, Mapping) else index_images(images)
    where = str(images) if not isinstance(images, Mapping) else "the image index"
    paths = metadata["image"].map(index)
    missing = paths.isna()
    out = metadata.copy()
    if missing.any():
        n = int(missing.sum())
        first = ", ".join(metadata["image"][missing].head(5))
        if not drop_missing:
            raise FileNotFoundError(
                f"{n} of {len(metadata)} images listed in the metadata are missing under {where} "
                f"(first: {first}). Fix the data folder, or pass drop_missing=True to keep only "
                f"the {len(metadata) - n} present images.")
        log.warning("dropped %d of %d images missing under %s (first: %s)", n, len(metadata), where, first)
        out = out[~missing.to_numpy()].copy()
        paths = paths[~missing]
        if len(out) == 0:
            raise FileNotFoundError(f"none of the {len(metadata)} listed images exist under {where}")
    out["path"] = paths.astype(str).to_numpy()
    out.attrs = dict(metadata.attrs)
    return out.reset_index(drop=True)


def load_nih(data_dir: str | os.PathLike | None = None, drop_missing: bool = False) -> pd.DataFrame:
    """Find the CSV, read it, and attach image paths from the folder the CSV lives in."""
    csv = find_csv(data_dir)
    return attach_paths(read_metadata(csv), csv.parent, drop_missing=drop_missing)


# --------------------------------------------------------------------------- split

def read_split_list(path: str | os.PathLike) -> set[str]:
    """Image names in an NIH split list (one per line). An empty list, or lines that are not bare
    image names (a CSV given by mistake, paths), raise DataError naming the file."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [(k, line.strip()) for k, line in enumerate(f, start=1)]
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not a text file ({e}): expected the NIH {TRAIN_VAL_LIST} or "
                        f"{TEST_LIST}, one image name per line") from e
    names = [(k, text) for k, text in lines if text]
    if not names:
        raise DataError(f"{path} lists no images: expected one image name per line, as in the official "
                        f"NIH {TRAIN_VAL_LIST} and {TEST_LIST}. Re-download it, or remove both lists "
                        f"for a seeded patient split.")
    bad = [(k, text) for k, text in names if not _LIST_NAME.fullmatch(text)]
    if bad:
        k, text = bad[0]
        raise DataError(f"{path}: {len(bad)} of {len(names)} line(s) are not image names, first line {k}: "
                        f"{text[:80]!r}. A split list holds one bare image name per line, like "
                        f"00000001_000.png (was a CSV given by mistake?)")
    return {text for _, text in names}


def split_by_patient(metadata: pd.DataFrame, lists_dir: str | os.PathLike | None = None,
                     val_fraction: float = 0.1, seed: int = 0,
                     test_fraction: float = 0.2) -> dict[str, pd.DataFrame]:
    """Split into 'train', 'val', 'test' with no patient in two of them.

    With train_val_list.txt and test_list.txt in lists_dir (default: beside the CSV the metadata
    came from, when both are there), 'test' is exactly the official test list intersected with
    the metadata. Otherwise a seeded patient-level split holds out test_fraction of the patients.
    'val' is val_fraction of the train_val patients, chosen with the seed.
    """
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {frac}")
    lists = _split_lists(metadata, lists_dir)
    rng = np.random.default_rng(seed)
    pid = metadata["patient_id"].to_numpy()
    if lists is not None:
        train_val_names, test_names = read_split_list(lists[0]), read_split_list(lists[1])
        both = train_val_names & test_names
        if both:
            # An error, not a choice: the official lists are disjoint, so these files are wrong, and
            # either choice would silently move images into or out of the test set.
            raise DataError(
                f"{len(both)} image(s) are in both {lists[0]} and {lists[1]} (first: "
                f"{', '.join(sorted(both)[:5])}); the official NIH lists never share an image. "
                f"Re-download the lists, or remove both for a seeded patient split.")
        is_test = metadata["image"].isin(test_names).to_numpy()
        test_patients = np.unique(pid[is_test])
        stray = ~is_test & np.isin(pid, test_patients)
        if stray.any():
            raise DataError(
                f"{int(stray.sum())} image(s) not in {lists[1]} belong to test patients "
                f"(first {metadata['image'][stray].iloc[0]}); the split lists do not match "
                f"this metadata. Use split lists that match it.")
        listed = metadata["image"].isin(train_val_names).to_numpy() | is_test
        if not listed.all():
            log.warning("%d image(s) are in neither split list; they join train_val", int((~listed).sum()))
    else:
        log.info("no %s and %s beside the metadata (or in lists_dir): a seeded split holds out %.0f%% of "
                 "the patients for test", TRAIN_VAL_LIST, TEST_LIST, 100 * test_fraction)
        patients = np.unique(pid)
        n_test = int(round(test_fraction * len(patients)))
        test_patients = rng.permutation(patients)[:n_test]
        is_test = np.isin(pid, test_patients)
    rest = np.unique(pid[~is_test])
    n_val = int(round(val_fraction * len(rest)))
    val_patients = rng.permutation(rest)[:n_val]
    is_val = ~is_test & np.isin(pid, val_patients)
    is_train = ~is_test & ~is_val
    parts = {"train": is_train, "val": is_val, "test": is_test}
    return {k: metadata[m].reset_index(drop=True) for k, m in parts.items()}


def _split_lists(metadata: pd.DataFrame, lists_dir) -> tuple[Path, Path] | None:
    explicit = lists_dir is not None
    if not explicit:
        source = metadata.attrs.get("source")
        if not source:
            return None
        lists_dir = Path(source).parent
    d = Path(lists_dir)
    tv, te = d / TRAIN_VAL_LIST, d / TEST_LIST
    have = [p.name for p in (tv, te) if p.is_file()]
    if len(have) == 2:
        return tv, te
    if explicit or have:
        raise FileNotFoundError(
            f"{d} must hold both {TRAIN_VAL_LIST} and {TEST_LIST} (found {have or 'neither'}); "
            f"add the missing one, or remove both for a seeded patient split")
    return None


# --------------------------------------------------------------------------- images

class ImageDecodeError(OSError):
    """A file that is not a decodable image."""


def load_gray(path: str | os.PathLike, size: int | None = None) -> np.ndarray:
    """Decode an X-ray to an 8-bit grayscale array, optionally resized to size x size.

    Reads 8-bit grayscale, RGB/RGBA with equal channels (as some NIH files are), and 16-bit PNGs
    (scaled by their bit depth, not their max). A corrupt or truncated file, or one too large to be
    an X-ray (Pillow's decompression-bomb limit), raises ImageDecodeError naming it; nothing is
    ever replaced by a black image.
    """
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.float64)
                top = 65535.0 if mode != "I" or arr.max() > 255 else 255.0
                arr = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
                img = Image.fromarray(arr, mode="L")
            elif mode in ("RGB", "RGBA"):
                img = img.getchannel("R") if _channels_equal(img) else img.convert("L")
            elif mode == "LA":
                img = img.getchannel("L")
            elif mode != "L":
                img = img.convert("L")
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR, reducing_gap=3.0)
            return np.asarray(img, dtype=np.uint8).copy()
    except Image.DecompressionBombError as e:
        # Not an OSError. Pillow refuses above 2 x MAX_IMAGE_PIXELS; between 1x and 2x it only warns
        # (DecompressionBombWarning) and the image decodes.
        raise ImageDecodeError(
            f"cannot decode image {path}: {e} NIH X-rays are 1024x1024 (1,048,576 pixels), so this "
            f"file is not one: remove or replace it, or remove its row from the metadata. If images "
            f"this large are intended, raise PIL.Image.MAX_IMAGE_PIXELS before loading.") from e
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ImageDecodeError(f"cannot decode image {path}: {e}. The file is corrupt or truncated: "
                               f"re-download it, or remove its row from the metadata.") from e


def _channels_equal(img) -> bool:
    a = np.asarray(img)
    return bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())


def normalize_gray(gray, dtype=None):
    """uint8 [..., H, W] tensor -> float [..., 3, H, W], ImageNet-normalized (on gray's device)."""
    import torch
    dtype = dtype or torch.float32
    x = gray.to(dtype).div_(255.0).unsqueeze(-3)
    mean = torch.tensor(IMAGENET_MEAN, dtype=dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


class NIHDataset:
    """Map-style torch dataset over a metadata table with a 'path' column.

    Item i is (float32 [3, size, size] ImageNet-normalized image, float32 [14] labels). With
    preload=True every image is decoded once at construction (small data, e.g. the demo).
    """

    def __init__(self, frame: pd.DataFrame, image_size: int = 224, preload: bool = False):
        if "path" not in frame:
            raise DataError("the metadata table has no 'path' column: build it with "
                            "fedxray.attach_paths(metadata, data_dir) or fedxray.load_nih()")
        self.frame = frame.reset_index(drop=True)
        self.paths = self.frame["path"].tolist()
        self.labels = label_matrix(self.frame)
        self.pathologies = LABELS
        self.image_size = int(image_size)
        self._cache = None
        if preload:
            self._cache = np.stack([load_gray(p, self.image_size) for p in self.paths]) \
                if self.paths else np.zeros((0, self.image_size, self.image_size), np.uint8)

    def __len__(self) -> int:
        return len(self.paths)

    def gray(self, i: int) -> np.ndarray:
        return self._cache[i] if self._cache is not None else load_gray(self.paths[i], self.image_size)

    def __getitem__(self, i: int):
        import torch
        x = normalize_gray(torch.from_numpy(self.gray(i)))
        return x, torch.from_numpy(self.labels[i])

    def summary(self) -> pd.DataFrame:
        """Positive counts and prevalence per finding."""
        pos = self.labels.sum(0).astype(int)
        return pd.DataFrame({"positives": pos, "prevalence": pos / max(len(self), 1)}, index=list(LABELS))

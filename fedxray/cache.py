"""Caches that make an NIH epoch cost seconds instead of a quarter of an hour.

ImageCache: every PNG decoded once (grayscale, reduced, resized) into one uint8 memory-mapped array
[N, S, S] plus an index; training reads rows and normalises them on the device.
(The frozen trunk's cached features, built over an image cache, are in fedxray.features.)

Nothing read back is trusted. The index records, per image, the size and mtime of the PNG it was
decoded from and a CRC-32 of its cached row. The builder decodes again exactly the rows whose PNG
changed or whose bytes fail their CRC; ImageCache.open raises an error naming them. Every write to a cache
happens under a file lock, so two processes building one cache take turns: the second waits, then
finds the cache complete and checks it like any other.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .data import LABELS, DataError, ImageDecodeError, label_matrix, load_gray
from .io import LockedError, atomic_write, atomic_write_text, file_lock, remove_orphan_temporaries

log = logging.getLogger(__name__)

# Bump when the decoding or the files change: the cache key includes it, so a new version builds a
# new folder, and ImageCache.open refuses an old one with "delete the folder".
CACHE_VERSION = 2
CACHE_ENV = "FEDXRAY_CACHE_DIR"
KAGGLE_WORKING = Path("/kaggle/working")
INDEX, IMAGES, PROGRESS, LOCK = "index.json", "images.u8", "progress.npy", ".lock"
CHUNK = 32                        # images per task handed to a decoding process
SAVE_EVERY_S = 2.0                # how often the progress of an interrupted build is persisted
VERIFY_ROWS = 256                 # rows per CRC task (threads: zlib.crc32 releases the GIL)
# Left free beside a cache's data file: its index (NIH: ~15 MB of names, paths and CRCs), progress
# and meta files, and whatever else writes to the disk meanwhile. Writing a memory map onto a full
# disk kills the process (SIGBUS), so a cache that does not fit is refused before it is written.
DISK_MARGIN = 100_000_000
# Per row of a build in progress: decoded, the CRC-32 of its bytes, its PNG's size and mtime.
PROGRESS_DTYPE = np.dtype([("done", "u1"), ("crc", "<u4"), ("size", "<i8"), ("mtime_ns", "<i8")])

Loader = Callable[[str, int], np.ndarray]


def default_cache_dir() -> Path:
    """$FEDXRAY_CACHE_DIR, else /kaggle/working/fedxray_cache on Kaggle, else <repo>/data/cache
    (or ~/.cache/fedxray when fedxray is not run from its repository)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    if KAGGLE_WORKING.is_dir():
        return KAGGLE_WORKING / "fedxray_cache"
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file():
        return repo / "data" / "cache"
    return Path.home() / ".cache" / "fedxray"


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _rows(row: dict[str, int], names: Sequence[str], missing_means: str) -> np.ndarray:
    """Row of each name in a cache; an error counts and names the first images it lacks."""
    missing = [n for n in names if n not in row]
    if missing:
        raise KeyError(f"{len(missing)} image(s) {missing_means} (first: {missing[:3]})")
    return np.fromiter((row[n] for n in names), np.int64, count=len(names))


def _first(names: Sequence[str], rows: np.ndarray, k: int = 3) -> str:
    return ", ".join(names[r] for r in rows[:k])


# --------------------------------------------------------------------------- disk space

def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (powers of 1000, as disk sizes are quoted)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def allocated_bytes(path: Path) -> int:
    """Bytes of path already on disk (0 if absent). A data file created at its full size is sparse
    until its rows are written, so its blocks, not its length, say what a resumed build reuses."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return 0
    blocks = getattr(st, "st_blocks", None)    # POSIX: 512-byte units; absent on Windows
    return st.st_size if blocks is None else min(st.st_size, blocks * 512)


def require_disk_space(directory: Path, needed: int, what: str, turn_off: str) -> None:
    """Raise DataError, before anything is written, when the disk holding directory lacks needed
    bytes plus DISK_MARGIN. turn_off names the config switch that does without this cache."""
    probe = Path(directory)
    while not probe.exists() and probe != probe.parent:   # the folder is made only once it fits
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed + DISK_MARGIN <= free:
        return
    raise DataError(f"not enough disk space for {what} in {directory}: it needs {human_bytes(needed)} "
                    f"(plus {human_bytes(DISK_MARGIN)} spare), {human_bytes(free)} free. Free space on that "
                    f"disk, set cache_dir (or {CACHE_ENV}) to a folder on a larger disk, use a smaller "
                    f"image_size or max_images, or turn the cache off ({turn_off})")


# --------------------------------------------------------------------------- checks

def _stamp(path: str) -> tuple[int, int]:
    """(size, mtime_ns) of a source file: what identifies its content without reading it. A file
    replaced or re-downloaded at the same path gets a new mtime. (-1, -1) when it cannot be
    stat'ed (absent, or not a file path at all, as the benchmark's synthetic sources)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return -1, -1
    return st.st_size, st.st_mtime_ns


def _stamps(paths: Sequence[str]) -> np.ndarray:
    return np.array([_stamp(p) for p in paths], np.int64).reshape(-1, 2)


def _crc32(block: np.ndarray) -> np.ndarray:
    """CRC-32 of each row of a C-contiguous block (zlib's: ~2 GB/s per core, measured)."""
    return np.fromiter((zlib.crc32(r) for r in block), np.int64, count=len(block))


def _crc_rows(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """CRC-32 of array[rows], rows in any order: read in ascending blocks (a run of consecutive
    rows is a slice of the memory map, not a copy), checksummed on threads."""
    rows = np.asarray(rows, np.int64)
    out = np.empty(len(rows), np.int64)
    if not len(rows):
        return out
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    blocks = [ordered[i:i + VERIFY_ROWS] for i in range(0, len(ordered), VERIFY_ROWS)]

    def crc(block: np.ndarray) -> np.ndarray:
        if block[-1] - block[0] + 1 == len(block):
            return _crc32(array[block[0]:block[-1] + 1])
        return _crc32(array[block])

    with ThreadPoolExecutor(max(1, min(len(blocks), usable_cores()))) as pool:
        out[order] = np.concatenate(list(pool.map(crc, blocks)))
    return out


@contextlib.contextmanager
def _exclusive(lock: Path, purpose: str) -> Iterator[None]:
    """file_lock(lock) for the with-block, saying first when it has to wait for another process.
    The OS releases it if its holder dies, so a killed build never blocks the next one."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(lock, wait=False, purpose=purpose))
        except LockedError as e:
            log.warning("waiting: %s", e)
            stack.enter_context(file_lock(lock, purpose=purpose))
        except OSError as e:   # a read-only cache folder that needs writing
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise DataError(f"cannot write to {lock.parent} for {purpose} ({e.strerror.lower()}): the cache "
                            f"must be built or repaired there. Give a writable cache_dir (or set {CACHE_ENV})") from e
        yield


# --------------------------------------------------------------------------- image cache

class ImageCache:
    """A complete image cache on disk: row i of the uint8 array [N, S, S] is image names[i].

    Images that could not be decoded are listed in `excluded` (name -> reason): no dataset serves
    their rows. The array is memory-mapped, never read whole unless load() is called. Per image the
    index also holds its PNG's size and mtime when decoded and the CRC-32 of its row.
    """

    def __init__(self, directory: str | os.PathLike, index: dict):
        self.directory = Path(directory)
        self.image_size: int = int(index["image_size"])
        self.key: str = index["key"]
        self.names: list[str] = list(index["names"])
        self.paths: list[str] = list(index["paths"])
        self.excluded: dict[str, str] = dict(index["excluded"])
        self._row = {n: i for i, n in enumerate(self.names)}
        self._crc = np.asarray(index["crc32"], np.int64)
        self._stamps = np.stack([np.asarray(index["source_size"], np.int64),
                                 np.asarray(index["source_mtime_ns"], np.int64)], 1)
        self._excluded = np.zeros(len(self.names), bool)
        self._excluded[[self._row[n] for n in self.excluded]] = True
        self._array: Optional[np.memmap] = None
        n = len(self.names)
        if not (n == len(self.paths) == len(self._row) == len(self._crc) == len(self._stamps)
                == int(index["count"])) or len(self.excluded) != int(self._excluded.sum()):
            raise ValueError("its lists of names, paths, sizes, mtimes and CRCs disagree")

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "ImageCache":
        """The cache in directory, after checking every row: its PNG unchanged since it was decoded
        (size and mtime) and its bytes matching their CRC-32. This reads the whole data file
        (about 2 GB/s per core) and stats every PNG. A failed check raises DataError naming the
        folder, the images and the remedy; build_image_cache repairs instead of raising."""
        cache = cls._read(Path(directory))
        problem = cache._size_problem()
        if problem:
            raise DataError(f"{problem}: {cache._remedy()}")
        rows = np.arange(len(cache))
        changed, damaged = cache._faults(rows, _stamps(cache.paths))
        if len(changed) or len(damaged):
            raise DataError(f"the image cache {cache.directory} is out of date or damaged: "
                            f"{_fault_text(cache.names, changed, damaged)}. {cache._remedy()}")
        return cache

    @classmethod
    def _read(cls, directory: Path) -> "ImageCache":
        """The cache described by directory/index.json, its rows not yet checked."""
        try:
            index = json.loads((directory / INDEX).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {directory / INDEX} ({e}): delete the folder {directory} "
                            f"to rebuild it") from None
        if not isinstance(index, dict) or index.get("version") != CACHE_VERSION:
            version = index.get("version") if isinstance(index, dict) else None
            raise DataError(f"{directory} is an image cache of version {version}, this fedxray "
                            f"writes version {CACHE_VERSION}: delete the folder to rebuild it")
        try:
            return cls(directory, index)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise DataError(f"{directory / INDEX} is malformed ({e}): delete the folder {directory} "
                            f"to rebuild it") from None

    def _remedy(self) -> str:
        return (f"Rebuild the stale rows with build_image_cache(frame, {self.image_size}, "
                f"cache_dir={str(self.directory.parent)!r}) over these images (it decodes again exactly "
                f"those rows from their PNGs), or delete the folder {self.directory}")

    def _size_problem(self) -> Optional[str]:
        path, want = self.directory / IMAGES, len(self) * self.image_size ** 2
        size = path.stat().st_size if path.is_file() else None
        if size == want:
            return None
        return (f"{path} is missing" if size is None else
                f"{path} is {size} bytes, expected {want} ({len(self)} rows of "
                f"{self.image_size}x{self.image_size}): it was truncated or overwritten")

    def _faults(self, rows: np.ndarray, stamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Among rows (with their PNGs' current stamps): those whose PNG changed since it was
        decoded, and the cached ones whose bytes fail their CRC (all of them if the data file has
        the wrong size)."""
        changed = rows[(stamps != self._stamps[rows]).any(1)]
        cached = rows[~self._excluded[rows]]
        if self._size_problem():
            return changed, cached
        return changed, cached[_crc_rows(self.array, cached) != self._crc[cached]]

    def __len__(self) -> int:
        return len(self.names)

    def __getstate__(self):   # DataLoader workers open their own mapping; never pickle the data
        return {**self.__dict__, "_array": None}

    @property
    def array(self) -> np.memmap:
        if self._array is None:
            problem = self._size_problem()
            if problem:    # numpy would say only "mmap length is greater than file size"
                raise DataError(f"{problem}: {self._remedy()}")
            shape = (len(self.names), self.image_size, self.image_size)
            self._array = np.memmap(self.directory / IMAGES, np.uint8, mode="r", shape=shape)
        return self._array

    def load(self) -> np.ndarray:
        """The whole array in host memory (only when asked: NIH at 224 px is 5.6 GB)."""
        return np.array(self.array)

    def content_digest(self, rows: np.ndarray) -> str:
        """A digest of the cached bytes of these rows (their CRC-32s): it changes whenever one of
        them is decoded again, so whatever was computed from the rows (cached features) goes stale."""
        return _digest(self._crc[np.asarray(rows, np.int64)].astype("<i8").tobytes().hex())

    def rows(self, names: Sequence[str]) -> np.ndarray:
        """Row of each name; an error names the images this cache does not hold."""
        return _rows(self._row, names, f"not in the image cache {self.directory}; build the cache "
                                       f"over these images")

    def usable(self, frame: pd.DataFrame) -> pd.DataFrame:
        """frame without the images this cache excluded as undecodable (logged)."""
        bad = frame["image"].isin(list(self.excluded)).to_numpy()
        self.rows(frame["image"][~bad].tolist())    # every other image must be cached
        if bad.any():
            log.warning("%d undecodable image(s) left out (first: %s); see %s", int(bad.sum()),
                        ", ".join(frame["image"][bad].head(3)), self.directory / INDEX)
        return frame[~bad].reset_index(drop=True)

    def dataset(self, frame: pd.DataFrame) -> "CachedImageDataset":
        return CachedImageDataset(self, frame)

    def summary(self) -> str:
        text = f"{len(self) - len(self.excluded)} images of {self.image_size} px in {self.directory}"
        if self.excluded:
            text += f"; {len(self.excluded)} undecodable and excluded: " + "; ".join(
                f"{n} ({why})" for n, why in list(self.excluded.items())[:5])
        return text


def _fault_text(names: Sequence[str], changed: np.ndarray, damaged: np.ndarray) -> str:
    parts = []
    if len(changed):
        parts.append(f"{len(changed)} image(s) changed on disk since they were cached (size or "
                     f"mtime; first: {_first(names, changed)})")
    if len(damaged):
        parts.append(f"{len(damaged)} cached row(s) fail their CRC-32 (first: {_first(names, damaged)})")
    return "; ".join(parts)


class CachedImageDataset(Dataset):
    """Item i: (uint8 [S, S] image read from the cache, float32 [14] labels).

    The model's input is made on the device (fedxray.client.to_input): normalised to ImageNet
    statistics and expanded to 3 channels, with the same arithmetic as NIHDataset.
    """

    def __init__(self, cache: ImageCache, frame: pd.DataFrame):
        bad = frame["image"].isin(list(cache.excluded))
        if bad.any():
            raise DataError(f"{int(bad.sum())} image(s) are excluded from the cache as undecodable "
                            f"(first {frame['image'][bad].iloc[0]!r}): pass cache.usable(frame)")
        self.cache = cache
        self.frame = frame.reset_index(drop=True)
        self.rows = cache.rows(self.frame["image"].tolist())
        self.labels = label_matrix(self.frame)
        self.image_size = cache.image_size
        self.pathologies = LABELS

    def __len__(self) -> int:
        return len(self.rows)

    def gray(self, i: int) -> np.ndarray:
        return np.array(self.cache.array[self.rows[i]])

    def __getitem__(self, i: int):
        return torch.from_numpy(self.gray(i)), torch.from_numpy(self.labels[i])

    def __getitems__(self, indices: list[int]):
        """A whole batch in one read of the memory map (the DataLoader calls this when present)."""
        block = self.cache.array[self.rows[indices]]
        return [(torch.from_numpy(block[k]), torch.from_numpy(self.labels[i])) for k, i in enumerate(indices)]


def _unique_images(frame: pd.DataFrame) -> pd.DataFrame:
    if "path" not in frame:
        raise DataError("the metadata table has no 'path' column: build it with fedxray.load_nih()")
    frame = frame.drop_duplicates(["image", "path"])
    if frame["image"].duplicated().any():
        name = frame["image"][frame["image"].duplicated()].iloc[0]
        raise DataError(f"image {name!r} appears with two different paths; keep one")
    return frame


def _folder(root: Path, image_size: int, names: Sequence[str], paths: Sequence[str]) -> Path:
    return root / f"images_{image_size}px_{_digest(CACHE_VERSION, image_size, *names, *paths)}"


_warned_old: set[Path] = set()


def _candidates(root: Path, image_size: int, names: Sequence[str],
                paths: Sequence[str]) -> Iterator[ImageCache]:
    """Complete caches at image_size under root holding every (name, path) pair, rows unchecked:
    the exact one first, then larger ones (e.g. built over the whole dataset)."""
    exact = _folder(root, image_size, names, paths)
    dirs = [exact] + sorted(p.parent for p in root.glob(f"images_{image_size}px_*/{INDEX}")
                            if p.parent != exact)
    wanted = dict(zip(names, paths))
    for d in dirs:
        if not (d / INDEX).is_file():
            continue
        try:
            cache = ImageCache._read(d)
        except DataError as e:
            if d not in _warned_old:   # an old cache can hold gigabytes: say so, once per process
                log.warning("not using %s", e)
                _warned_old.add(d)
            continue
        held = dict(zip(cache.names, cache.paths))
        if cache.image_size == image_size and all(held.get(n) == p for n, p in wanted.items()):
            yield cache


def find_image_cache(cache_dir: str | os.PathLike, image_size: int, names: Sequence[str],
                     paths: Sequence[str]) -> Optional[ImageCache]:
    """A complete cache at image_size holding every (name, path) pair, with those rows up to date
    (PNG size and mtime unchanged) and intact (CRC-32): the exact one, else any larger one (e.g.
    built over the whole dataset), else None. A cache of other images, another size or another
    fedxray cache version is never used."""
    stamps = _stamps(paths)
    for cache in _candidates(Path(cache_dir), image_size, names, paths):
        changed, damaged = cache._faults(cache.rows(names), stamps)
        if not len(changed) and not len(damaged):
            return cache
        log.info("not using %s as it is: %s", cache.directory, _fault_text(cache.names, changed, damaged))
    return None


def build_image_cache(frame: pd.DataFrame, image_size: int, cache_dir: str | os.PathLike | None = None,
                      num_workers: Optional[int] = None, progress: bool = True,
                      loader: Loader = load_gray) -> ImageCache:
    """Decode every image of frame (columns image, path) once into a uint8 [N, S, S] memory map.

    Returns an existing complete cache that holds these images at this size, once their rows are
    checked (find_image_cache), else builds one in cache_dir (default: default_cache_dir()) under a
    name keyed by the size and the image list. A cache whose rows are stale (the PNG changed: a
    repaired file is decoded and included again) or damaged (CRC-32, a truncated data file) gets
    exactly those rows decoded again. Decoding runs over num_workers processes (None: every core;
    0: this process) with a progress bar, and is resumable: the rows done so far are persisted as it
    goes, and a rerun after an interruption decodes only the rest. A file that cannot be decoded is
    logged, listed in the index and excluded, never cached as data. The index is written, atomically,
    only when complete. Builds of one folder take turns (a file lock): a second process waits, then
    reuses what the first built. A disk without room for what the cache still needs raises
    DataError before anything is written (require_disk_space). loader(path, size) -> uint8
    [size, size] is the decoder (fedxray.load_gray: grayscale, no RGB conversion, Image.reduce
    before the resize).
    """
    frame = _unique_images(frame)
    names, paths = frame["image"].tolist(), frame["path"].astype(str).tolist()
    if not names:
        raise DataError("no images to cache: the metadata table is empty")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stamps = _stamps(paths)
    target = None
    for cache in _candidates(root, image_size, names, paths):
        changed, damaged = cache._faults(cache.rows(names), stamps)
        if not len(changed) and not len(damaged):
            return cache
        target = target or cache              # repaired in place: only its stale rows are decoded
    exact = _folder(root, image_size, names, paths)
    rows = {exact: len(names)} if target is None else {target.directory: len(target), exact: len(names)}
    for directory, n in rows.items():
        _require_image_space(directory, n, image_size)
        with _exclusive(directory / LOCK, f"building the image cache {directory}"):
            cache = _update(directory, directory == exact, names, paths, image_size, num_workers,
                            progress, loader)
        if cache is not None:
            return cache
    raise AssertionError("unreachable: the exact folder is always updated")


def _require_image_space(directory: Path, n: int, size: int) -> None:
    """Refuse to build or grow the data file of n rows of size x size in directory when the disk
    lacks what it still needs: its whole size less what a partial build already wrote."""
    require_disk_space(directory, n * size * size - allocated_bytes(directory / IMAGES),
                       f"the image cache ({n} images of {size} px)", "image_cache=False, feature_cache=False")


@dataclass
class _Progress:
    """What is known of each row of a cache folder while it is (re)built."""
    done: np.ndarray                  # bool: decoded, or tried and excluded
    crc: np.ndarray                   # int64 CRC-32 of the row's bytes, as decoded
    stamps: np.ndarray                # int64 [N, 2]: its PNG's (size, mtime_ns) before decoding
    excluded: dict[int, str] = field(default_factory=dict)

    @classmethod
    def fresh(cls, n: int) -> "_Progress":
        return cls(np.zeros(n, bool), np.zeros(n, np.int64), np.full((n, 2), -2, np.int64))

    @classmethod
    def of(cls, cache: ImageCache) -> "_Progress":
        return cls(np.ones(len(cache), bool), cache._crc.copy(), cache._stamps.copy(),
                   {cache._row[n]: why for n, why in cache.excluded.items()})

    @classmethod
    def load(cls, path: Path, n: int) -> Optional["_Progress"]:
        """The progress an interrupted build saved, or None. Excluded images are not saved: a
        resumed build tries them again."""
        try:
            saved = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            log.warning("ignoring the unreadable %s (%s): building from scratch", path, e)
            return None
        if saved.dtype != PROGRESS_DTYPE or saved.shape != (n,):
            log.warning("ignoring %s: it does not describe %d rows", path, n)
            return None
        return cls(saved["done"] == 1, saved["crc"].astype(np.int64),
                   np.stack([saved["size"], saved["mtime_ns"]], 1))

    def save(self, path: Path) -> None:
        saved = np.zeros(len(self.done), PROGRESS_DTYPE)
        saved["done"] = self.done
        saved["done"][list(self.excluded)] = 0
        saved["crc"], saved["size"], saved["mtime_ns"] = self.crc, self.stamps[:, 0], self.stamps[:, 1]

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:    # a file object: np.save would add ".npy" to a name
                np.save(f, saved)
        atomic_write(path, write)


def _update(directory: Path, exact: bool, names: list[str], paths: list[str], size: int,
            num_workers: Optional[int], progress: bool, loader: Loader) -> Optional[ImageCache]:
    """Under the folder's lock: bring the cache in directory up to date for the images (names,
    paths), decoding only the rows that are missing, changed or damaged. None when directory is a
    larger cache whose index vanished meanwhile (the caller then builds the exact folder)."""
    remove_orphan_temporaries(directory, INDEX, PROGRESS)   # a killed process's; we hold the lock
    cache = None
    if (directory / INDEX).is_file():
        try:
            cache = ImageCache._read(directory)
        except DataError as e:
            log.warning("rebuilding the image cache: %s", e)
    if cache is None and not exact:
        return None
    if cache is not None:
        all_names, all_paths, key = cache.names, cache.paths, cache.key
        state, scope = _Progress.of(cache), cache.rows(names)
    else:
        all_names, all_paths = names, paths
        key = _digest(CACHE_VERSION, size, *names, *paths)
        scope = np.arange(len(names))
        state = _Progress.load(directory / PROGRESS, len(names)) if (directory / PROGRESS).is_file() else None
        if state is None:    # rows left by a build that saved no progress are not trusted
            (directory / IMAGES).unlink(missing_ok=True)
            state = _Progress.fresh(len(names))
    n = len(all_names)
    array = _data_file(directory / IMAGES, n, size)
    stamps = _stamps(paths)          # taken again under the lock: the wait for it may have been long
    changed = scope[state.done[scope] & (stamps != state.stamps[scope]).any(1)]
    cached = scope[state.done[scope] & ~np.isin(scope, list(state.excluded))]
    damaged = cached[_crc_rows(array, cached) != state.crc[cached]]
    todo = np.union1d(np.union1d(changed, damaged), np.flatnonzero(~state.done))
    if cache is not None and not len(todo):
        return cache                  # another process finished or repaired it while we waited
    if len(changed) or len(damaged):
        log.warning("image cache %s: decoding again %s", directory, _fault_text(all_names, changed, damaged))
    elif state.done.any():
        log.info("resuming the image cache %s: %d of %d images left", directory, len(todo), n)
    else:
        log.info("building the image cache: %d images of %d px, %s in %s", n, size,
                 human_bytes(n * size * size), directory)
    state.done[todo] = False
    for r in todo:
        state.excluded.pop(int(r), None)
    _decode_rows(array, todo, all_paths, state, directory / PROGRESS, size, num_workers, progress, loader)
    index = {"version": CACHE_VERSION, "image_size": size, "key": key, "count": n,
             "names": all_names, "paths": all_paths,
             "excluded": {all_names[r]: state.excluded[r] for r in sorted(state.excluded)},
             "source_size": state.stamps[:, 0].tolist(), "source_mtime_ns": state.stamps[:, 1].tolist(),
             "crc32": state.crc.tolist()}
    array.flush()                     # the rows reach the file before the index that vouches for them
    atomic_write_text(directory / INDEX, json.dumps(index) + "\n")
    (directory / PROGRESS).unlink(missing_ok=True)
    built = ImageCache(directory, index)
    excluded = [r for r in todo if int(r) in state.excluded]
    if excluded:
        log.warning("image cache: %s", built.summary())
    return built


def _data_file(path: Path, n: int, size: int) -> np.memmap:
    """images.u8 opened for writing at its right size. A file of the wrong size is resized in
    place (never truncated to zero under a reader's mapping): rows past its old end read as zeros
    and then fail their CRC, so exactly those are decoded again."""
    want = n * size * size
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(want)
    elif path.stat().st_size != want:
        log.warning("%s is %d bytes, expected %d: resizing it; the rows it lost are decoded again",
                    path, path.stat().st_size, want)
        os.truncate(path, want)
    return np.memmap(path, np.uint8, mode="r+", shape=(n, size, size))


class _Decoded(NamedTuple):
    rows: np.ndarray                  # every row of the task
    stamps: np.ndarray                # their PNGs' (size, mtime_ns), taken before decoding
    ok: np.ndarray                    # the rows decoded, in block order
    block: np.ndarray                 # uint8 [len(ok), S, S]
    crc: np.ndarray                   # CRC-32 of each decoded image
    failures: list[tuple[int, str]]   # (row, reason) of the files that could not be decoded


def _decode_rows(array: np.memmap, todo: np.ndarray, paths: list[str], state: _Progress, progress_file: Path,
                 size: int, num_workers: Optional[int], progress: bool, loader: Loader) -> None:
    """Decode the rows todo into array, recording each in state (persisted now and then)."""
    from .progress import bar as progress_bar
    n = len(state.done)
    tasks = [(rows, [paths[r] for r in rows], size, loader) for rows in np.array_split(
        todo, max(1, -(-len(todo) // CHUNK))) if len(rows)]
    workers = usable_cores() if num_workers is None else num_workers
    workers = min(workers, len(tasks))
    bar = progress_bar(total=n, initial=n - len(todo), desc=f"image cache {size}px", unit="img", enabled=progress,
                       leave=False)
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    saved = time.monotonic()
    try:
        results = pool.imap_unordered(_decode_chunk, tasks) if pool else map(_decode_chunk, tasks)
        for got in results:
            array[got.ok] = got.block
            state.crc[got.ok] = got.crc
            state.stamps[got.rows] = got.stamps
            state.done[got.rows] = True
            for r, reason in got.failures:
                state.excluded[r] = reason
                log.warning("not cached: %s", reason)
            bar.update(len(got.rows))
            if time.monotonic() - saved > SAVE_EVERY_S:
                array.flush()         # the rows reach the file before the progress that says so
                state.save(progress_file)
                saved = time.monotonic()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        array.flush()
        state.save(progress_file)
        bar.close()


def _decode_chunk(task) -> _Decoded:
    rows, paths, size, loader = task
    stamps, ok, images, failures = [], [], [], []
    for r, p in zip(rows, paths):
        stamps.append(_stamp(p))   # before decoding: a file replaced meanwhile is decoded again next time
        try:
            img = loader(p, size)
        except (ImageDecodeError, FileNotFoundError) as e:
            failures.append((int(r), str(e)))
            continue
        if img.shape != (size, size) or img.dtype != np.uint8:
            raise ValueError(f"{getattr(loader, '__name__', loader)}({p!r}, {size}) returned "
                             f"{img.dtype} {img.shape}; expected uint8 ({size}, {size})")
        ok.append(int(r))
        images.append(img)
    block = np.stack(images) if images else np.zeros((0, size, size), np.uint8)
    return _Decoded(np.asarray(rows, np.int64), np.array(stamps, np.int64).reshape(-1, 2),
                    np.asarray(ok, np.int64), block, _crc32(block), failures)

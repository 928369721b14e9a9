"""Caches that make an NIH epoch cost seconds instead of a quarter of an hour.

ImageCache: every PNG decoded once (grayscale, reduced, resized) into one uint8 memory-mapped array
[N, S, S] plus an index; training reads rows and normalises them on the device.
FeatureCache: with no random augmentation the frozen trunk's layer3 output of an image is the same
for every client and round, so it is computed once and only layer4 + fc train on it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from .client import autocast, to_input
from .data import LABELS, DataError, ImageDecodeError, label_matrix, load_gray
from .io import atomic_write, atomic_write_text
from .model import trunk_digest

log = logging.getLogger(__name__)

CACHE_VERSION = 1                 # bump when the decoding changes: old caches are then not reused
CACHE_ENV = "FEDXRAY_CACHE_DIR"
KAGGLE_WORKING = Path("/kaggle/working")
INDEX, IMAGES, PROGRESS = "index.json", "images.u8", "done.u8"
CHUNK = 32                        # images per task handed to a decoding process
SAVE_EVERY_S = 2.0                # how often the done-mask of an interrupted build is persisted
# Room left on the GPU beside GPU-resident features, for layer4's activations and the optimizer.
GPU_RESERVE_FRACTION, GPU_RESERVE_MIN = 0.2, 2 << 30
FEATURE_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}

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


# --------------------------------------------------------------------------- image cache

class ImageCache:
    """A complete image cache on disk: row i of the uint8 array [N, S, S] is image names[i].

    Images that could not be decoded are listed in `excluded` (name -> reason): their rows hold
    no data and no dataset serves them. The array is memory-mapped, never read whole unless
    load() is called.
    """

    def __init__(self, directory: str | os.PathLike, index: dict):
        self.directory = Path(directory)
        self.image_size: int = int(index["image_size"])
        self.key: str = index["key"]
        self.names: list[str] = list(index["names"])
        self.paths: list[str] = list(index["paths"])
        self.excluded: dict[str, str] = dict(index["excluded"])
        self._row = {n: i for i, n in enumerate(self.names)}
        self._array: Optional[np.memmap] = None

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "ImageCache":
        d = Path(directory)
        index = json.loads((d / INDEX).read_text(encoding="utf-8"))
        if index.get("version") != CACHE_VERSION:
            raise DataError(f"{d} is an image cache of version {index.get('version')}, this fedxray "
                            f"writes version {CACHE_VERSION}: delete the folder to rebuild it")
        return cls(d, index)

    def __len__(self) -> int:
        return len(self.names)

    def __getstate__(self):   # DataLoader workers open their own mapping; never pickle the data
        return {**self.__dict__, "_array": None}

    @property
    def array(self) -> np.memmap:
        if self._array is None:
            shape = (len(self.names), self.image_size, self.image_size)
            self._array = np.memmap(self.directory / IMAGES, np.uint8, mode="r", shape=shape)
        return self._array

    def load(self) -> np.ndarray:
        """The whole array in host memory (only when asked: NIH at 224 px is 5.6 GB)."""
        return np.array(self.array)

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


def find_image_cache(cache_dir: str | os.PathLike, image_size: int, names: Sequence[str],
                     paths: Sequence[str]) -> Optional[ImageCache]:
    """A complete cache at image_size holding every (name, path) pair: the exact one, else any
    larger one (e.g. built over the whole dataset), else None. A cache of other images, another
    size or another fedxray cache version is never used."""
    root = Path(cache_dir)
    exact = root / f"images_{image_size}px_{_digest(CACHE_VERSION, image_size, *names, *paths)}"
    candidates = [exact] + sorted(p.parent for p in root.glob(f"images_{image_size}px_*/{INDEX}")
                                  if p.parent != exact)
    wanted = dict(zip(names, paths))
    for d in candidates:
        if not (d / INDEX).is_file():
            continue
        try:
            cache = ImageCache.open(d)
        except (DataError, ValueError, KeyError, OSError) as e:
            log.info("not using %s: %s", d, e)
            continue
        held = dict(zip(cache.names, cache.paths))
        if cache.image_size == image_size and all(held.get(n) == p for n, p in wanted.items()):
            return cache
    return None


def build_image_cache(frame: pd.DataFrame, image_size: int, cache_dir: str | os.PathLike | None = None,
                      num_workers: Optional[int] = None, progress: bool = True,
                      loader: Loader = load_gray) -> ImageCache:
    """Decode every image of frame (columns image, path) once into a uint8 [N, S, S] memory map.

    Returns an existing complete cache that holds these images at this size, else builds one in
    cache_dir (default: default_cache_dir()) under a name keyed by the size and the image list.
    Decoding runs over num_workers processes (None: every core; 0: this process) with a progress
    bar, and is resumable: the rows done so far are persisted as it goes, and a rerun after an
    interruption decodes only the rest. A file that cannot be decoded is logged, listed in the
    index and excluded, never cached as data. The index is written, atomically, only when complete.
    loader(path, size) -> uint8 [size, size] is the decoder (fedxray.load_gray: grayscale, no RGB
    conversion, Image.reduce before the resize).
    """
    frame = _unique_images(frame)
    names, paths = frame["image"].tolist(), frame["path"].astype(str).tolist()
    if not names:
        raise DataError("no images to cache: the metadata table is empty")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    found = find_image_cache(root, image_size, names, paths)
    if found is not None:
        return found
    key = _digest(CACHE_VERSION, image_size, *names, *paths)
    directory = root / f"images_{image_size}px_{key}"
    excluded = _decode_into(directory, names, paths, image_size, num_workers, progress, loader)
    index = {"version": CACHE_VERSION, "image_size": image_size, "key": key, "count": len(names),
             "names": names, "paths": paths, "excluded": excluded}
    atomic_write_text(directory / INDEX, json.dumps(index) + "\n")
    (directory / PROGRESS).unlink(missing_ok=True)
    cache = ImageCache(directory, index)
    if excluded:
        log.warning("image cache: %s", cache.summary())
    return cache


def _decode_into(directory: Path, names: list[str], paths: list[str], size: int,
                 num_workers: Optional[int], progress: bool, loader: Loader) -> dict[str, str]:
    """Fill directory/images.u8 with every row not yet done; return {name: reason} of the failures."""
    from tqdm.auto import tqdm
    directory.mkdir(parents=True, exist_ok=True)
    n, images, done_file = len(names), directory / IMAGES, directory / PROGRESS
    resume = (images.is_file() and images.stat().st_size == n * size * size
              and done_file.is_file() and done_file.stat().st_size == n)
    done = np.fromfile(done_file, np.uint8).astype(bool) if resume else np.zeros(n, bool)
    array = np.memmap(images, np.uint8, mode="r+" if resume else "w+", shape=(n, size, size))
    todo = np.flatnonzero(~done)
    if resume:
        log.info("resuming the image cache %s: %d of %d images left", directory, len(todo), n)
    tasks = [(rows, [paths[r] for r in rows], size, loader) for rows in np.array_split(
        todo, max(1, -(-len(todo) // CHUNK)))]
    workers = usable_cores() if num_workers is None else num_workers
    workers = min(workers, len(tasks))
    excluded: dict[str, str] = {}
    bar = tqdm(total=n, initial=n - len(todo), desc=f"image cache {size}px", unit="img", disable=not progress)
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    saved = time.monotonic()
    try:
        results = pool.imap_unordered(_decode_chunk, tasks) if pool else map(_decode_chunk, tasks)
        for rows, block, failures in results:
            array[rows] = block
            done[rows] = True
            for r, reason in failures:
                excluded[names[r]] = reason
                log.warning("not cached: %s", reason)
            bar.update(len(rows) + len(failures))
            if time.monotonic() - saved > SAVE_EVERY_S:
                _save_done(array, done, done_file)
                saved = time.monotonic()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        _save_done(array, done, done_file)
        bar.close()
    return {name: excluded[name] for name in names if name in excluded}


def _save_done(array: np.memmap, done: np.ndarray, path: Path) -> None:
    array.flush()   # the rows reach the file before the mask that says they are there
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(done.astype(np.uint8).tobytes()))


def _decode_chunk(task) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    rows, paths, size, loader = task
    ok, images, failures = [], [], []
    for r, p in zip(rows, paths):
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
    return np.asarray(ok, np.int64), block, failures


# --------------------------------------------------------------------------- feature cache

class FeatureCache:
    """The trunk's layer3 output for every image, row i for names[i]: a tensor on the device
    (GPU-resident when it fits) or a memory-mapped file."""

    def __init__(self, features: torch.Tensor | np.memmap, names: Sequence[str], key: str, trunk: str,
                 device: torch.device, path: Optional[Path] = None):
        self.features = features
        self.names = list(names)
        self.key = key
        self.trunk = trunk             # trunk_digest of the weights that computed them
        self.device = device           # where the model runs; memory-mapped batches are pinned for it
        self.path = path
        self._row = {n: i for i, n in enumerate(self.names)}

    @property
    def placement(self) -> str:
        return "disk" if self.path is not None else str(self.features.device)

    @property
    def nbytes(self) -> int:
        f = self.features
        return f.numel() * f.element_size() if isinstance(f, torch.Tensor) else f.nbytes

    def rows(self, names: Sequence[str]) -> np.ndarray:
        return _rows(self._row, names, "have no cached features")

    def check(self, model: torch.nn.Module) -> None:
        """Raise if model's trunk is not the one these features were computed with."""
        if trunk_digest(model) != self.trunk:
            raise ValueError("the model's trunk differs from the one the feature cache was computed "
                             "with: rebuild it with build_feature_cache(model, ...)")

    def dataset(self, frame: pd.DataFrame) -> "FeatureDataset":
        return FeatureDataset(self, frame)


class FeatureDataset(Dataset):
    """Item i: (layer3 features [256, S/16, S/16], float32 [14] labels). Models run model.head on
    them; fedxray.client.batches gathers whole batches by index where the features live."""

    is_features = True

    def __init__(self, cache: FeatureCache, frame: pd.DataFrame):
        self.cache = cache
        self.frame = frame.reset_index(drop=True)
        self.rows = cache.rows(self.frame["image"].tolist())
        self.labels = label_matrix(self.frame)
        self.pathologies = LABELS
        home = cache.features.device if isinstance(cache.features, torch.Tensor) else torch.device("cpu")
        self._rows_t = torch.from_numpy(self.rows).to(home)
        self._labels_t = torch.from_numpy(self.labels).to(home)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.batch(torch.tensor([i]))[0][0], torch.from_numpy(self.labels[i])

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and labels of the examples idx, as one batch."""
        f = self.cache.features
        if isinstance(f, torch.Tensor):
            idx = idx.to(f.device, non_blocking=True)
            return f[self._rows_t[idx]], self._labels_t[idx]
        x = torch.from_numpy(f[self.rows[idx.numpy()]])
        if self.cache.device.type == "cuda":
            x = x.pin_memory()
        return x, self._labels_t[idx]


def _fits_on_device(nbytes: int, device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    free, total = torch.cuda.mem_get_info(device)
    return nbytes + max(GPU_RESERVE_MIN, GPU_RESERVE_FRACTION * total) < free


@torch.no_grad()
def build_feature_cache(model, images: CachedImageDataset, device: torch.device | str, *,
                        batch_size: int = 256, amp_dtype: Optional[torch.dtype] = None,
                        dtype: torch.dtype = torch.float16, placement: str = "auto",
                        directory: str | os.PathLike | None = None, progress: bool = True) -> FeatureCache:
    """Run model.trunk once (eval mode, no_grad, the training autocast) over every image and keep
    the layer3 outputs in dtype.

    placement: "device" keeps them in a tensor on device (on a CPU device: in host memory);
    "disk" in a memory-mapped file in directory (default: the image cache's folder), reused by a
    later run whose trunk weights, images, dtype and autocast are the same; "auto": the GPU when
    they fit beside room for training, else disk. Valid only for the trunk weights they were
    computed with (see FeatureCache.check).
    """
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature dtype must be one of {list(FEATURE_DTYPES)}, got {dtype}")
    if placement not in ("auto", "device", "disk"):
        raise ValueError(f"placement must be 'auto', 'device' or 'disk', got {placement!r}")
    device = torch.device(device)
    names = images.frame["image"].tolist()
    if len(set(names)) != len(names):
        raise DataError("build_feature_cache needs each image once: drop duplicated names")
    model.to(device)
    trunk = trunk_digest(model)
    key = _digest(CACHE_VERSION, images.cache.key, _digest(*names), trunk, dtype, amp_dtype)
    size = images.image_size
    probe = model.trunk(to_input(torch.zeros(1, size, size, dtype=torch.uint8), device, None))
    shape = (len(names), *probe.shape[1:])
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    if placement == "auto":
        placement = "device" if _fits_on_device(nbytes, device) else "disk"
    path = None
    if placement == "device":
        out = torch.empty(shape, dtype=dtype, device=device)
    else:
        path = Path(directory or images.cache.directory) / f"features_{key}.bin"
        meta = path.with_suffix(".json")
        if meta.is_file() and json.loads(meta.read_text())["key"] == key:
            out = np.memmap(path, FEATURE_DTYPES[dtype], mode="r", shape=shape)
            return FeatureCache(out, names, key, trunk, device, path)
        meta.unlink(missing_ok=True)
        out = np.memmap(path, FEATURE_DTYPES[dtype], mode="w+", shape=shape)

    from tqdm.auto import tqdm
    was_training = model.training
    model.eval()
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, pin_memory=device.type == "cuda")
    start = 0
    for x, _ in tqdm(loader, desc="feature cache", unit="batch", disable=not progress, leave=False):
        with autocast(device, amp_dtype):
            f = model.trunk(to_input(x, device, amp_dtype))
        stop = start + len(f)
        if isinstance(out, torch.Tensor):
            out[start:stop] = f
        else:
            out[start:stop] = f.to("cpu", dtype).numpy()
        start = stop
    model.train(was_training)
    if path is not None:
        out.flush()
        out = np.memmap(path, FEATURE_DTYPES[dtype], mode="r", shape=shape)
        atomic_write_text(path.with_suffix(".json"), json.dumps(
            {"key": key, "shape": list(shape), "dtype": str(dtype), "names": len(names)}) + "\n")
    return FeatureCache(out, names, key, trunk, device, path)

"""The feature cache: with no random augmentation the frozen trunk's layer3 output of an image is
the same for every client and round, so it is computed once (over an image cache) and only
layer4 + fc train on it.

Features live on the GPU when they fit, else in a memory-mapped file reused by later runs. A file
is reused only when its meta (key, shape, dtype, rows, bytes) and a CRC-32 of every row match;
otherwise it is computed again, with a warning. It is built under a file lock into a temporary
file renamed when complete, so a killed build leaves nothing a later run trusts.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from .cache import (CACHE_VERSION, CachedImageDataset, _crc32, _crc_rows, _digest, _exclusive, _first, _rows,
                    human_bytes, require_disk_space)
from .device import autocast, eval_mode, to_input
from .data import LABELS, DataError, label_matrix
from .io import atomic_write, atomic_write_text, remove_orphan_temporaries
from .model import trunk_digest

log = logging.getLogger(__name__)

# Room left on the GPU beside GPU-resident features, for layer4's activations and the optimizer.
GPU_RESERVE_FRACTION, GPU_RESERVE_MIN = 0.2, 2 << 30
FEATURE_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}


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
    later run whose trunk weights, images, dtype and autocast are the same, once its meta and the
    CRC-32 of every row are checked (a file that fails is computed again); "auto": the GPU when
    they fit beside room for training, else disk. Two processes building one file take turns (a
    file lock), and the file appears under its name only when complete. Non-finite features (an
    fp16 overflow) raise DataError here rather than a NaN loss later. A file that does not fit on
    its disk raises DataError before it is written (require_disk_space). Valid only for the trunk
    weights they were computed with (see FeatureCache.check).
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
    # Keyed by the pixels too (the rows' CRCs): a PNG changed on disk is decoded again by the image
    # cache, and the features computed from its old pixels must not be served with the new ones.
    key = _digest(CACHE_VERSION, images.cache.key, _digest(*names), images.cache.content_digest(images.rows),
                  trunk, dtype, amp_dtype)
    size = images.image_size
    probe = model.trunk(to_input(torch.zeros(1, size, size, dtype=torch.uint8), device, None))
    shape = (len(names), *probe.shape[1:])
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    if placement == "auto":
        placement = "device" if _fits_on_device(nbytes, device) else "disk"

    def compute(out: torch.Tensor | np.ndarray) -> list[int]:
        return _compute_features(model, images, out, device, batch_size, amp_dtype, dtype, progress)

    if placement == "device":
        log.info("building the feature cache: %d images, %s on %s", len(names), human_bytes(nbytes), device)
        out = torch.empty(shape, dtype=dtype, device=device)
        compute(out)
        return FeatureCache(out, names, key, trunk, device)
    path = Path(directory or images.cache.directory) / f"features_{key}.bin"
    expect = {"key": key, "shape": list(shape), "dtype": str(dtype), "names": len(names), "bytes": nbytes}
    np_dtype = FEATURE_DTYPES[dtype]
    found, _ = _open_features(path, expect, names, np_dtype)
    if found is None:
        with _exclusive(path.with_suffix(".lock"), f"building the feature cache {path}"):
            found, why = _open_features(path, expect, names, np_dtype)   # built by another process?
            if found is None:
                if why:
                    log.warning("computing the feature cache again: %s", why)
                found = _write_features(path, expect, np_dtype, compute)
    return FeatureCache(found, names, key, trunk, device, path)


def _open_features(path: Path, expect: dict, names: Sequence[str],
                   np_dtype: type) -> tuple[Optional[np.memmap], str]:
    """(the features in path, "") when its meta matches expect and every row its CRC-32, else
    (None, why not: "" when there is no complete file at all)."""
    meta = path.with_suffix(".json")
    if not meta.is_file():
        return None, ""
    try:
        saved = json.loads(meta.read_text(encoding="utf-8"))
        crc = np.asarray(saved["crc32"], np.int64)
        mismatch = {k: saved.get(k) for k, v in expect.items() if saved.get(k) != v}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"{meta} is unreadable or malformed ({e!r})"
    if mismatch or crc.shape != (len(names),):
        return None, f"{meta} describes {mismatch or 'another number of rows'}, not {expect}"
    size = path.stat().st_size if path.is_file() else None
    if size != expect["bytes"]:
        return None, f"{path} is {'missing' if size is None else f'{size} bytes'}, expected {expect['bytes']}"
    features = np.memmap(path, np_dtype, mode="r", shape=tuple(expect["shape"]))
    bad = np.flatnonzero(_crc_rows(features, np.arange(len(names))) != crc)
    if len(bad):
        return None, (f"{len(bad)} row(s) of {path} fail their CRC-32 (first: {_first(names, bad)}): "
                      f"the file is damaged")
    return features, ""


def _write_features(path: Path, expect: dict, np_dtype: type,
                    compute: Callable[[np.ndarray], list[int]]) -> np.memmap:
    """Compute the features into a temporary file renamed to path when complete, then write the
    meta that vouches for them. A process killed midway leaves only a temporary, removed here by
    the next build (which holds the lock, so no one else is writing it)."""
    meta = path.with_suffix(".json")
    remove_orphan_temporaries(path.parent, path.name, meta.name)
    # The whole size: a stale file at path is replaced only once the new one is complete.
    rows = expect["shape"][0]
    require_disk_space(path.parent, expect["bytes"], f"the feature cache ({rows} images, {expect['dtype']})",
                       "feature_cache=False")
    log.info("building the feature cache: %d images, %s in %s", rows, human_bytes(expect["bytes"]), path)
    meta.unlink(missing_ok=True)      # the old file, if any, is no longer vouched for
    crc: list[int] = []

    def write(tmp: str) -> None:
        out = np.memmap(tmp, np_dtype, mode="w+", shape=tuple(expect["shape"]))
        crc.extend(compute(out))
        out.flush()

    atomic_write(path, write)
    atomic_write_text(meta, json.dumps({**expect, "crc32": crc}) + "\n")
    return np.memmap(path, np_dtype, mode="r", shape=tuple(expect["shape"]))


def _compute_features(model, images: CachedImageDataset, out: torch.Tensor | np.ndarray, device: torch.device,
                      batch_size: int, amp_dtype: Optional[torch.dtype], dtype: torch.dtype,
                      progress: bool) -> list[int]:
    """Fill out with model.trunk over images; return the CRC-32 of each row when out is an array
    (the bytes meant for the file, checksummed before they reach it)."""
    from .progress import bar
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, pin_memory=device.type == "cuda")
    start, crc, finite = 0, [], []
    with eval_mode(model):
        for x, _ in bar(loader, desc="feature cache", unit="batch", enabled=progress, leave=False):
            with autocast(device, amp_dtype):
                f = model.trunk(to_input(x, device, amp_dtype))
            f = f.to(dtype)           # fp16 storage: a value beyond 65504 becomes inf, caught below
            finite.append(torch.isfinite(f).flatten(1).all(1))
            stop = start + len(f)
            if isinstance(out, torch.Tensor):
                out[start:stop] = f
            else:
                block = f.cpu().numpy()
                out[start:stop] = block
                crc.extend(_crc32(block).tolist())
            start = stop
    bad = np.flatnonzero(~torch.cat(finite).cpu().numpy()) if finite else np.zeros(0, np.int64)
    if len(bad):
        names = images.frame["image"].tolist()
        hint = ("float16 holds values up to 65504: use feature_dtype='float32'" if dtype == torch.float16
                else "check the model's trunk weights")
        raise DataError(f"the trunk gave non-finite layer3 features for {len(bad)} image(s) (first: "
                        f"{_first(names, bad)}) from the image cache {images.cache.directory}: {hint}")
    return crc

"""The image and feature caches: the pixels and results they give, resume, corrupt files, staleness,
and the benchmark's command line."""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

import fedxray
from fedxray import Config, load_gray, run_federated
from fedxray.cache import (CACHE_VERSION, DISK_MARGIN, IMAGES, INDEX, PROGRESS, CachedImageDataset, ImageCache,
                           build_image_cache, find_image_cache, human_bytes)
from fedxray.features import build_feature_cache
from fedxray.data import DataError, ImageDecodeError
from fedxray.io import file_lock, orphan_temporaries
from fedxray.federated import FederatedRun
from fedxray.parts import prepare

from conftest import ROOT, write_tiny_nih

SIZE = 64


@pytest.fixture()
def tiny_meta(tiny_nih):
    return fedxray.load_nih(tiny_nih)


def test_cache_rows_are_load_gray_pixels(tiny_meta, tmp_path):
    cache = build_image_cache(tiny_meta, SIZE, tmp_path, num_workers=2, progress=False)
    ds = cache.dataset(tiny_meta)
    for i in (0, 7, len(tiny_meta) - 1):
        np.testing.assert_array_equal(ds.gray(i), load_gray(tiny_meta.path[i], SIZE))
    x, y = ds[3]
    assert x.dtype == torch.uint8 and x.shape == (SIZE, SIZE) and y.dtype == torch.float32
    batch = ds.__getitems__([5, 1, 5])                       # one read of the memory map per batch
    for (bx, by), i in zip(batch, [5, 1, 5]):
        assert torch.equal(bx, ds[i][0]) and torch.equal(by, ds[i][1])


def test_real_png_rows_match_load_gray(nih_sample, tmp_path):
    from PIL import Image
    meta = fedxray.load_nih(nih_sample)
    modes = [Image.open(p).mode for p in meta.path]          # reads headers only
    pick = meta.iloc[[modes.index("L"), modes.index("RGBA")]]   # NIH ships a few RGBA files
    cache = build_image_cache(pick, 128, tmp_path, num_workers=0, progress=False)
    for i, p in enumerate(pick.path):
        np.testing.assert_array_equal(cache.dataset(pick).gray(i), load_gray(p, 128))


def test_interrupted_build_resumes_to_the_same_bytes(tiny_meta, tmp_path, monkeypatch):
    monkeypatch.setattr(fedxray.cache, "CHUNK", 4)
    monkeypatch.setattr(fedxray.cache, "SAVE_EVERY_S", 0.0)   # persist the done-mask every chunk
    whole = build_image_cache(tiny_meta, SIZE, tmp_path / "a", num_workers=0, progress=False)

    calls = []

    def dies_after_10(path, size):
        if len(calls) == 10:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(path)
        return load_gray(path, size)
    with pytest.raises(KeyboardInterrupt):
        build_image_cache(tiny_meta, SIZE, tmp_path / "b", num_workers=0, progress=False, loader=dies_after_10)
    folder = tmp_path / "b" / whole.directory.name
    assert not (folder / INDEX).exists()                      # incomplete: no index, never used
    assert find_image_cache(tmp_path / "b", SIZE, tiny_meta.image.tolist(), tiny_meta.path.tolist()) is None
    assert np.load(folder / PROGRESS)["done"].sum() == 8      # two whole chunks of 4 were saved

    resumed_calls = []

    def counting(path, size):
        resumed_calls.append(path)
        return load_gray(path, size)
    resumed = build_image_cache(tiny_meta, SIZE, tmp_path / "b", num_workers=0, progress=False, loader=counting)
    assert len(resumed_calls) == len(tiny_meta) - 8           # only the missing rows are decoded
    assert (folder / "images.u8").read_bytes() == (whole.directory / "images.u8").read_bytes()
    assert resumed.names == whole.names and not resumed.excluded
    assert not (folder / PROGRESS).exists()


def test_corrupt_png_is_excluded_and_reported(tmp_path, caplog):
    root = write_tiny_nih(tmp_path / "nih", num_patients=6, images_per_patient=2)
    meta = fedxray.load_nih(root)
    bad = meta.image[3]
    with open(meta.path[3], "r+b") as f:                      # truncate: a corrupt download
        f.truncate(40)
    cache = build_image_cache(meta, SIZE, tmp_path / "cache", num_workers=2, progress=False)
    assert list(cache.excluded) == [bad] and "cannot decode" in cache.excluded[bad]
    assert bad in caplog.text and "1 undecodable" in cache.summary()
    index = json.loads((cache.directory / INDEX).read_text())
    assert list(index["excluded"]) == [bad]
    assert bad not in cache.usable(meta).image.tolist() and len(cache.usable(meta)) == len(meta) - 1
    with pytest.raises(DataError, match="excluded"):
        CachedImageDataset(cache, meta)

    splits = fedxray.split_by_patient(meta, val_fraction=0.2, seed=0, test_fraction=0.25)
    cfg = Config(num_clients=2, image_size=SIZE, weights=None, image_cache=True, progress=False,
                 cache_dir=str(tmp_path / "cache"))
    run = FederatedRun(prepare(cfg, splits), tmp_path / "run")
    assert run.info["excluded_images"] == [bad]
    held = sum(run.info["client_examples"]) + run.info["val_examples"] + run.info["test_examples"]
    assert held == len(meta) - 1


def test_stale_cache_is_not_reused(tiny_meta, tmp_path):
    first = build_image_cache(tiny_meta, SIZE, tmp_path, num_workers=0, progress=False)
    assert build_image_cache(tiny_meta.iloc[::2], SIZE, tmp_path, progress=False).directory == first.directory
    other_size = build_image_cache(tiny_meta, SIZE + 8, tmp_path, num_workers=0, progress=False)
    assert other_size.directory != first.directory and other_size.image_size == SIZE + 8
    moved = tiny_meta.copy()
    moved.loc[0, "path"] = tiny_meta.path[1]                  # the same name, another file
    assert build_image_cache(moved, SIZE, tmp_path, num_workers=0, progress=False).directory != first.directory
    extra = pd.concat([tiny_meta, tiny_meta.iloc[:1].assign(image="extra.png")])
    assert build_image_cache(extra, SIZE, tmp_path, num_workers=0, progress=False).directory != first.directory


def test_feature_cache_is_tied_to_the_trunk_and_reused_from_disk(tiny_meta, tmp_path):
    tiny_meta = tiny_meta.iloc[:12]
    images = build_image_cache(tiny_meta, SIZE, tmp_path, num_workers=0, progress=False).dataset(tiny_meta)
    torch.manual_seed(0)
    model = fedxray.build_model(weights=None)
    feats = build_feature_cache(model, images, "cpu", batch_size=16, placement="disk", progress=False)
    assert feats.placement == "disk" and feats.features.shape == (len(tiny_meta), 256, SIZE // 16, SIZE // 16)
    x = torch.stack([fedxray.NIHDataset(tiny_meta, SIZE)[i][0] for i in (2, 9)])
    torch.testing.assert_close(torch.from_numpy(feats.features[[2, 9]]).float(), model.trunk(x),
                               rtol=2e-3, atol=2e-3)           # fp16 storage
    stamp = os.stat(feats.path).st_mtime_ns
    again = build_feature_cache(model, images, "cpu", batch_size=16, placement="disk", progress=False)
    assert again.path == feats.path and os.stat(again.path).st_mtime_ns == stamp   # reused, not recomputed
    ds = feats.dataset(tiny_meta.iloc[[4, 1]])
    xb, yb = ds.batch(torch.tensor([1, 0]))
    assert torch.equal(xb[0], ds[1][0]) and torch.equal(yb[1], ds[0][1])

    feats.check(model)
    with torch.no_grad():
        model.layer3[0].conv1.weight.add_(0.1)
    with pytest.raises(ValueError, match="trunk differs"):
        feats.check(model)
    assert build_feature_cache(model, images, "cpu", placement="disk", progress=False).path != feats.path


# ------------------------------------------------------------------ nothing read back is trusted

def _counting(calls):
    def loader(path, size):
        calls.append(path)
        return load_gray(path, size)
    return loader


def _write_png(path, seed, size=32):
    from PIL import Image
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture()
def own_nih(tmp_path):
    """A tiny dataset of the test's own, free to damage."""
    return fedxray.load_nih(write_tiny_nih(tmp_path / "nih", num_patients=6, images_per_patient=2))


def test_replaced_png_is_decoded_again_and_only_it(own_nih, tmp_path):
    meta = own_nih
    first = build_image_cache(meta, SIZE, tmp_path / "cache", num_workers=0, progress=False)
    _write_png(meta.path[4], seed=99)                         # replaced at the same path
    with pytest.raises(DataError, match=f"changed on disk.*{meta.image[4]}.*build_image_cache"):
        ImageCache.open(first.directory)
    assert find_image_cache(tmp_path / "cache", SIZE, meta.image.tolist(), meta.path.tolist()) is None
    calls = []
    again = build_image_cache(meta, SIZE, tmp_path / "cache", num_workers=0, progress=False,
                              loader=_counting(calls))
    assert calls == [meta.path[4]] and again.directory == first.directory
    np.testing.assert_array_equal(again.dataset(meta).gray(4), load_gray(meta.path[4], SIZE))
    ImageCache.open(again.directory)                          # up to date again


def test_repaired_png_is_included_again(own_nih, tmp_path):
    meta = own_nih
    good = open(meta.path[3], "rb").read()
    with open(meta.path[3], "r+b") as f:                      # a corrupt download...
        f.truncate(40)
    cache = build_image_cache(meta, SIZE, tmp_path / "cache", num_workers=0, progress=False)
    assert list(cache.excluded) == [meta.image[3]]
    open(meta.path[3], "wb").write(good)                      # ...downloaded again, as the error advised
    calls = []
    fixed = build_image_cache(meta, SIZE, tmp_path / "cache", num_workers=0, progress=False,
                              loader=_counting(calls))
    assert calls == [meta.path[3]] and not fixed.excluded and fixed.directory == cache.directory
    np.testing.assert_array_equal(fixed.dataset(meta).gray(3), load_gray(meta.path[3], SIZE))


def test_truncated_data_file_is_refused_then_rebuilt_from_where_it_ends(own_nih, tmp_path):
    meta = own_nih
    cache = build_image_cache(meta, SIZE, tmp_path / "cache", num_workers=0, progress=False)
    whole = (cache.directory / IMAGES).read_bytes()
    os.truncate(cache.directory / IMAGES, 7 * SIZE * SIZE + 100)   # rows 0-6 intact, row 7 partly
    with pytest.raises(DataError, match="images.u8 is .* bytes, expected .*truncated.*build_image_cache"):
        ImageCache.open(cache.directory)
    calls = []
    again = build_image_cache(meta, SIZE, tmp_path / "cache", num_workers=0, progress=False,
                              loader=_counting(calls))
    assert calls == meta.path[7:].tolist()                    # exactly the rows it lost
    assert (again.directory / IMAGES).read_bytes() == whole


def test_flipped_byte_is_detected_and_only_its_row_rebuilt(own_nih, tmp_path):
    meta = own_nih
    cache = build_image_cache(meta, SIZE, tmp_path / "cache", num_workers=0, progress=False)
    whole = (cache.directory / IMAGES).read_bytes()
    with open(cache.directory / IMAGES, "r+b") as f:
        f.seek(5 * SIZE * SIZE + 123)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 0x10]))
    with pytest.raises(DataError, match=f"1 cached row.*CRC.*{meta.image[5]}"):
        ImageCache.open(cache.directory)
    calls = []
    again = build_image_cache(meta, SIZE, tmp_path / "cache", num_workers=0, progress=False,
                              loader=_counting(calls))
    assert calls == [meta.path[5]] and (again.directory / IMAGES).read_bytes() == whole


def test_larger_cache_gets_the_same_checks_and_is_repaired_in_place(own_nih, tmp_path):
    meta = own_nih
    whole = build_image_cache(meta, SIZE, tmp_path / "cache", num_workers=0, progress=False)
    _write_png(meta.path[2], seed=7)
    calls = []
    untouched = meta.iloc[[0, 1, 5]]                          # row 2 is not served: reused as is
    assert build_image_cache(untouched, SIZE, tmp_path / "cache", num_workers=0, progress=False,
                             loader=_counting(calls)).directory == whole.directory and not calls
    part = meta.iloc[[0, 2, 5]]
    got = build_image_cache(part, SIZE, tmp_path / "cache", num_workers=0, progress=False,
                            loader=_counting(calls))
    assert got.directory == whole.directory and calls == [meta.path[2]]
    np.testing.assert_array_equal(got.dataset(part).gray(1), load_gray(meta.path[2], SIZE))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [whole.directory.name]


def test_old_cache_version_is_refused_and_a_new_one_built(own_nih, tmp_path, caplog):
    meta = own_nih
    old = tmp_path / "cache" / f"images_{SIZE}px_0123456789abcdef"
    old.mkdir(parents=True)
    (old / INDEX).write_text(json.dumps({"version": CACHE_VERSION - 1, "image_size": SIZE}))
    with pytest.raises(DataError, match="version .*delete the folder"):
        ImageCache.open(old)
    cache = build_image_cache(meta, SIZE, tmp_path / "cache", num_workers=0, progress=False)
    assert cache.directory != old and str(old) in caplog.text and "delete the folder" in caplog.text


def test_undecodable_image_is_excluded_and_named(own_nih, tmp_path, monkeypatch):
    """Whatever load_gray raises ImageDecodeError for (here Pillow's DecompressionBombError for a
    PNG above Image.MAX_IMAGE_PIXELS) is excluded and named, and the rest is built."""
    meta = own_nih

    def refuses_one(path, size):
        if path == meta.path[1]:
            raise ImageDecodeError(f"cannot decode image {path}: too large")
        return load_gray(path, size)
    cache = build_image_cache(meta, SIZE, tmp_path / "a", num_workers=0, progress=False, loader=refuses_one)
    assert list(cache.excluded) == [meta.image[1]] and meta.path[1] in cache.excluded[meta.image[1]]

    from PIL import Image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)      # 32x32 = 1024 > 2 x 100: a "bomb"
    bombs = build_image_cache(meta.iloc[:2], SIZE, tmp_path / "b", num_workers=0, progress=False)
    assert sorted(bombs.excluded) == meta.image[:2].tolist()
    assert all(p in bombs.excluded[n] for n, p in zip(meta.image[:2], meta.path[:2]))


# ------------------------------------------------------------------ disk space

def _free_space(monkeypatch, free):
    """shutil.disk_usage reports `free` bytes free on every disk."""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=free))


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 999, 1000, 9_216_000, 5_626_000_000, 11.2e12)] == \
        ["0 B", "999 B", "1.0 kB", "9.2 MB", "5.6 GB", "11.2 TB"]


def test_image_cache_that_does_not_fit_is_refused_before_anything_is_written(own_nih, tmp_path, monkeypatch,
                                                                             caplog):
    meta, root = own_nih, tmp_path / "cache"
    want = len(meta) * SIZE * SIZE
    _free_space(monkeypatch, want + DISK_MARGIN - 1)
    with pytest.raises(DataError) as e:
        build_image_cache(meta, SIZE, root, num_workers=0, progress=False)
    message = str(e.value)
    assert str(root) in message and f"needs {human_bytes(want)}" in message
    assert f"{human_bytes(want + DISK_MARGIN - 1)} free" in message
    assert "cache_dir" in message and "max_images" in message and "image_cache=False" in message
    assert not root.exists()                                  # not even the folder or its lock

    _free_space(monkeypatch, want + DISK_MARGIN)
    with caplog.at_level("INFO", logger="fedxray.cache"):
        cache = build_image_cache(meta, SIZE, root, num_workers=0, progress=False)
    assert f"building the image cache: {len(meta)} images of {SIZE} px, {human_bytes(want)} in " \
           f"{cache.directory}" in caplog.text
    np.testing.assert_array_equal(cache.dataset(meta).gray(3), load_gray(meta.path[3], SIZE))


def test_resumed_build_needs_only_the_rows_it_has_not_written(own_nih, tmp_path, monkeypatch):
    meta, root = own_nih, tmp_path / "cache"
    monkeypatch.setattr(fedxray.cache, "CHUNK", 4)
    monkeypatch.setattr(fedxray.cache, "SAVE_EVERY_S", 0.0)

    calls = []

    def dies_after_8(path, size):
        if len(calls) == 8:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(path)
        return load_gray(path, size)
    with pytest.raises(KeyboardInterrupt):
        build_image_cache(meta, SIZE, root, num_workers=0, progress=False, loader=dies_after_8)
    data = next(root.glob(f"*/{IMAGES}"))
    st = os.stat(data)
    written = min(st.st_size, st.st_blocks * 512)             # the file is sparse where no row was written
    still = len(meta) * SIZE * SIZE - written
    assert st.st_size == len(meta) * SIZE * SIZE and written >= 8 * SIZE * SIZE
    _free_space(monkeypatch, still + DISK_MARGIN - 1)
    with pytest.raises(DataError, match=f"needs {human_bytes(still)}"):
        build_image_cache(meta, SIZE, root, num_workers=0, progress=False)
    assert os.stat(data).st_blocks == st.st_blocks and not (data.parent / INDEX).exists()
    _free_space(monkeypatch, still + DISK_MARGIN)
    resumed = build_image_cache(meta, SIZE, root, num_workers=0, progress=False)
    ImageCache.open(resumed.directory)


# The feature cache

@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return fedxray.build_model(weights=None)


@pytest.fixture()
def feature_setup(resnet, tiny_meta, tmp_path, monkeypatch):
    """The model (tests patch its trunk through monkeypatch) and 6 cached images of their own."""
    meta = tiny_meta.iloc[:6]
    images = build_image_cache(meta, SIZE, tmp_path, num_workers=0, progress=False).dataset(meta)
    monkeypatch.setattr(resnet, "trunk", resnet.trunk)
    return resnet, images


def _features(model, images, **kw):
    return build_feature_cache(model, images, "cpu", batch_size=4, placement="disk", progress=False, **kw)


def test_damaged_or_mismatched_feature_file_is_computed_again(feature_setup, caplog):
    model, images = feature_setup
    feats = _features(model, images)
    good = np.array(feats.features)
    del feats.features
    with open(feats.path, "r+b") as f:                        # one flipped bit in row 4
        f.seek(4 * good[0].nbytes + 10)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 0x01]))
    again = _features(model, images)
    assert "fail their CRC-32" in caplog.text and images.frame.image[4] in caplog.text
    np.testing.assert_array_equal(np.array(again.features), good)

    meta = feats.path.with_suffix(".json")
    saved = json.loads(meta.read_text())
    meta.write_text(json.dumps({**saved, "shape": [1, 2, 3]}))
    caplog.clear()
    np.testing.assert_array_equal(np.array(_features(model, images).features), good)
    assert "describes" in caplog.text and str(meta) in caplog.text


def test_feature_build_killed_midway_leaves_nothing_trusted(feature_setup):
    model, images = feature_setup
    real = model.trunk
    calls = []

    def dies_on_the_second_batch(x):
        calls.append(len(x))
        if len(calls) == 3:                                   # the probe, one batch, then death
            raise KeyboardInterrupt("simulated crash")
        return real(x)
    model.trunk = dies_on_the_second_batch                    # undone by feature_setup's monkeypatch
    with pytest.raises(KeyboardInterrupt):
        _features(model, images)
    folder = images.cache.directory
    assert not list(folder.glob("features_*.bin")) and not list(folder.glob("features_*.json"))
    assert not list(folder.glob(".features_*.tmp"))
    model.trunk = real
    feats = _features(model, images)
    orphan = folder / f".{feats.path.name}.abc.tmp"           # what a SIGKILL mid-write leaves
    orphan.write_bytes(b"half")
    feats.path.with_suffix(".json").unlink()                  # force a rebuild: it clears orphans
    _features(model, images)
    assert not orphan_temporaries(folder, feats.path.name)


def test_non_finite_features_are_an_error_not_a_nan_loss(feature_setup):
    model, images = feature_setup
    real = model.trunk
    model.trunk = lambda x: real(x) * 1e6                     # beyond float16's 65504
    with pytest.raises(DataError, match="non-finite.*float32"):
        build_feature_cache(model, images, "cpu", placement="device", progress=False)
    with pytest.raises(DataError, match="non-finite"):
        _features(model, images)
    assert not [p for p in images.cache.directory.glob("*features_*") if p.suffix != ".lock"]


def test_feature_build_waits_for_another_builder(feature_setup, caplog):
    import threading
    model, images = feature_setup
    first = _features(model, images)
    first.path.with_suffix(".json").unlink()
    result = {}
    with file_lock(first.path.with_suffix(".lock")):          # as another process would hold it
        worker = threading.Thread(target=lambda: result.update(f=_features(model, images)))
        worker.start()
        deadline = time.monotonic() + 30
        while "waiting" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "waiting" in caplog.text and str(first.path) in caplog.text
        time.sleep(0.5)
        assert worker.is_alive() and not first.path.with_suffix(".json").exists()
    worker.join(30)
    assert result["f"].path == first.path and first.path.with_suffix(".json").exists()


def test_feature_cache_that_does_not_fit_is_refused_before_it_is_written(feature_setup, monkeypatch, caplog):
    model, images = feature_setup
    folder = images.cache.directory
    nbytes = len(images) * 256 * (SIZE // 16) ** 2 * 2        # float16 layer3 output
    _free_space(monkeypatch, nbytes + DISK_MARGIN - 1)
    with pytest.raises(DataError) as e:
        _features(model, images)
    message = str(e.value)
    assert str(folder) in message and f"needs {human_bytes(nbytes)}" in message
    assert f"{human_bytes(nbytes + DISK_MARGIN - 1)} free" in message and "feature_cache=False" in message
    assert not [p for p in folder.iterdir() if "features_" in p.name and p.suffix != ".lock"]

    _free_space(monkeypatch, nbytes + DISK_MARGIN)
    with caplog.at_level("INFO", logger="fedxray.features"):
        feats = _features(model, images)
    assert feats.nbytes == nbytes
    assert f"building the feature cache: {len(images)} images, {human_bytes(nbytes)} in {feats.path}" in caplog.text


# ------------------------------------------------------------------ whole runs against the PNG path
# SGD, not Adam: Adam divides each step by sqrt(v), so a 1e-7 difference on a near-zero gradient
# (layer4's BN biases here) can become a whole lr-sized step; SGD keeps differences proportional.

def _config(tmp_path, **kw):
    base = dict(num_clients=2, num_rounds=2, batch_size=8, lr=1e-2, optimizer="sgd", image_size=SIZE,
                weights=None, preload=True, progress=False, eval_batch_size=64, seed=0,
                cache_dir=str(tmp_path / "cache"))
    return Config(**{**base, **kw})


@pytest.fixture(scope="module")
def runs(tiny_nih, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache_runs")
    splits = fedxray.split_by_patient(fedxray.load_nih(tiny_nih), val_fraction=0.2, seed=0, test_fraction=0.25)
    variants = {"png": {}, "images": dict(image_cache=True),
                "features32": dict(feature_cache=True, feature_dtype="float32"),
                "features16": dict(feature_cache=True, feature_dtype="float16")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # 4 runs; every variant sees the same arithmetic either way
    try:
        return {name: run_federated(_config(tmp, **kw), splits, tmp / name) for name, kw in variants.items()}
    finally:
        torch.set_num_threads(threads)


def _layer4_fc(result):
    return {k: v for k, v in result.model.state_dict().items() if k.startswith(("layer4.", "fc."))}


def test_image_cache_run_is_bitwise_identical(runs):
    pd.testing.assert_frame_equal(runs["png"].history, runs["images"].history)
    a, b = _layer4_fc(runs["png"]), _layer4_fc(runs["images"])
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert "image_cache" in runs["images"].info and "feature_cache" not in runs["images"].info


def _differences(ref, got) -> pd.DataFrame:
    both = ref.history.merge(got.history, on=["round", "split", "client", "metric"])
    assert len(both) == len(ref.history) == len(got.history)
    return both.assign(diff=(both.value_x - both.value_y).abs()).groupby("metric")["diff"].max()


def test_fp32_feature_cache_run_matches_the_png_path(runs):
    """Only the trunk's batching differs (64 images at a time vs 8): ~1e-6 relative in layer3."""
    ref, got = runs["png"], runs["features32"]
    assert got.info["feature_cache"] == "disk"                # a CPU run memory-maps its features
    a, b = _layer4_fc(ref), _layer4_fc(got)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4, msg=k)
    diff = _differences(ref, got)
    assert diff[["loss", "train_loss"]].max() <= 1e-5 and diff["mean_auroc"] <= 1e-6


def test_fp16_feature_cache_run_stays_within_mixed_precision_noise(runs):
    """fp16 storage rounds layer3's output to 2^-11 relative. On this tiny, random-weight run that
    moves losses by ~7e-4 and AUROC by ~0.03; bf16 autocast alone (the GPU default) moves the
    same uncached run by 3.4e-3 and 0.043. The bounds below are those of autocast."""
    diff = _differences(runs["png"], runs["features16"])
    assert diff[["loss", "train_loss"]].max() <= 3.5e-3 and diff["mean_auroc"] <= 0.05


def test_config_rejects_unknown_feature_dtype():
    with pytest.raises(ValueError, match="feature_dtype"):
        Config(feature_dtype="int8")


def test_bench_smoke_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "fedxray.bench", "--smoke", "--out", str(out),
                           "--workdir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"machine", "throughput", "build", "decode", "federated", "host_peak_rss_bytes",
            "speedup_vs_naive", "sweep"} <= set(result)
    assert {"image_cache", "feature_cache"} <= set(result["throughput"])
    assert any(k.startswith("naive_") for k in result["throughput"])
    assert all(v["images_per_s"] > 0 for v in result["throughput"].values())
    assert "images/s" in proc.stdout and "federated run" in proc.stdout


def test_features_follow_a_png_changed_on_disk(resnet, tiny_meta, tmp_path):
    # The first hardened version re-decoded the changed row but served the old features with it.
    meta = tiny_meta.iloc[:6]
    images = build_image_cache(meta, SIZE, tmp_path, num_workers=0, progress=False).dataset(meta)
    before = np.array(_features(resnet, images).features)
    png = meta.path.iloc[2]
    from PIL import Image
    Image.fromarray(255 - load_gray(png)).save(png)                  # another image at the same path
    os.utime(png, ns=(os.stat(png).st_atime_ns, os.stat(png).st_mtime_ns + 10**9))
    images = build_image_cache(meta, SIZE, tmp_path, num_workers=0, progress=False).dataset(meta)
    after = np.array(_features(resnet, images).features)
    with torch.no_grad():
        fresh = resnet.trunk(fedxray.client.to_input(torch.from_numpy(images.gray(2))[None], torch.device("cpu"), None))
    np.testing.assert_allclose(after[2], fresh[0].numpy().astype(np.float16), rtol=1e-2, atol=1e-2)
    assert not np.allclose(after[2], before[2], atol=1e-2)
    np.testing.assert_array_equal(after[[0, 1, 3, 4, 5]], before[[0, 1, 3, 4, 5]])


def test_a_read_only_cache_that_needs_repair_names_the_remedy(tiny_meta, tmp_path, monkeypatch):
    build_image_cache(tiny_meta, SIZE, tmp_path, num_workers=0, progress=False)
    os.utime(tiny_meta.path.iloc[0], ns=(1, 10**18))                  # a PNG newer than its row

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system", str(tmp_path / ".lock"))
    monkeypatch.setattr(fedxray.cache, "file_lock", read_only)
    with pytest.raises(DataError, match=r"read-only file system.*writable cache_dir.*FEDXRAY_CACHE_DIR"):
        build_image_cache(tiny_meta, SIZE, tmp_path, num_workers=0, progress=False)

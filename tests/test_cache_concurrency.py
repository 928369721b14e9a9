"""Two processes building one image cache folder, one of them SIGKILLed at a random moment: every
row of the cache that results is still exactly a fresh load_gray decode.

The builders are forked from the test process: real processes (their own pids, file descriptors
and locks, killed by the OS like any other) that start at once, where a spawned interpreter spends
5-15 s importing torch on a small machine. They use neither torch nor threads, so the fork is safe.
"""
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest

SIZE = 32
IMAGES = 200
DECODE_S = 0.01           # per image: 1 s of decoding over 2 processes, so the kill lands mid-build


def slow_gray(path: str, size: int) -> np.ndarray:
    from fedxray import load_gray
    time.sleep(DECODE_S)
    with open(os.environ["BUILDER_DECODED"], "ab") as f:   # one byte per decode: the test watches it
        f.write(b".")
    return load_gray(path, size)


def _builder(data: Path, cache: Path, work: Path, workers: int, save_every_s: float) -> None:
    import fedxray
    import fedxray.cache
    os.environ["BUILDER_DECODED"] = str(work / "decoded")   # seen by its decoding processes too
    fedxray.cache.CHUNK = 2                       # many small tasks: the kill lands between and within them
    fedxray.cache.SAVE_EVERY_S = save_every_s
    meta = fedxray.load_nih(data)
    while not (work / "go").exists():
        time.sleep(0.01)
    fedxray.cache.build_image_cache(meta, SIZE, cache, num_workers=workers, progress=False,
                                    loader=slow_gray)


def _wait_for(path: Path, size: int, procs, timeout: float = 60.0) -> None:
    start = time.monotonic()
    while not (path.exists() and path.stat().st_size >= size):
        for p in procs:
            assert p.exitcode is None, f"a builder exited early (exit code {p.exitcode})"
        assert time.monotonic() - start < timeout, f"{path} never appeared"
        time.sleep(0.01)


def _start(tmp_path: Path, name: str, data: Path, workers: int, save_every_s: float):
    work = tmp_path / name
    work.mkdir()
    proc = multiprocessing.get_context("fork").Process(
        target=_builder, args=(data, tmp_path / "cache", work, workers, save_every_s), name=name)
    proc.start()
    return proc


@pytest.mark.parametrize("victim, seed", [("second", 0), ("first", 1)])
def test_two_builders_one_killed_leave_every_row_right(tmp_path, victim, seed):
    """first starts building (2 decoding processes); second starts once first is under way and
    waits for the folder's lock. One of them is SIGKILLed after a seeded random delay:
    - second, the waiting one, soon after it starts when first has decoded 40%: before the lock,
      its start truncated the rows first had written, and first then completed the cache with them
      black (the issue's 30 of 240 rows);
    - first, mid-build with its decoding processes still running: second then resumes from the
      progress first saved.
    The survivor finishes; a last build in this process must find nothing to decode."""
    import fedxray
    from fedxray import load_gray
    from fedxray.cache import INDEX, ImageCache, build_image_cache

    from conftest import write_tiny_nih
    data = write_tiny_nih(tmp_path / "nih", num_patients=IMAGES, images_per_patient=1, size=SIZE)
    # The default 2 s between saves of the progress: second then starts before first saved any.
    save_every_s = 2.0 if victim == "second" else 0.0
    first = _start(tmp_path, "first", data, workers=2, save_every_s=save_every_s)
    second = _start(tmp_path, "second", data, workers=0, save_every_s=save_every_s)
    procs = [first, second]
    try:
        (tmp_path / "first" / "go").touch()
        _wait_for(tmp_path / "first" / "decoded", IMAGES * 2 // 5 if victim == "second" else 1, procs)
        (tmp_path / "second" / "go").touch()
        time.sleep(random.Random(seed).uniform(*((0.1, 0.3) if victim == "second" else (0.05, 0.6))))
        killed, survivor = (second, first) if victim == "second" else (first, second)
        assert killed.exitcode is None, "the kill came too late to test anything"
        killed.kill()                                         # SIGKILL
        survivor.join(60)
        killed.join(10)
        assert survivor.exitcode == 0 and killed.exitcode == -signal.SIGKILL
        if victim == "first":                                 # second resumed from first's progress
            assert 0 < (tmp_path / "second" / "decoded").stat().st_size < IMAGES
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()

    meta = fedxray.load_nih(data)
    calls = []

    def counting(path, size):
        calls.append(path)
        return load_gray(path, size)
    cache = build_image_cache(meta, SIZE, tmp_path / "cache", num_workers=0, progress=False, loader=counting)
    assert not calls and not cache.excluded and (cache.directory / INDEX).is_file()
    ImageCache.open(cache.directory)                          # every row's CRC and PNG stamp
    expected = np.stack([load_gray(p, SIZE) for p in meta.path])
    np.testing.assert_array_equal(cache.load()[cache.rows(meta.image.tolist())], expected)


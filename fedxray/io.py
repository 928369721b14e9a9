"""Atomic file writes and inter-process locks: a reader (or a resumed run) never sees a half-written
file, and two processes never write the same folder at once."""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

_UMASK = os.umask(0)
os.umask(_UMASK)
LOCK_POLL_S = 0.2


class LockedError(RuntimeError):
    """Another process holds the lock (the message names the file and that process)."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path), then rename tmp_path over path. On any error the target is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)   # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def orphan_temporaries(folder: str | os.PathLike, name: str) -> list[Path]:
    """The temporary files atomic_write(folder / name) leaves when its process is killed mid-write."""
    return sorted(Path(folder).glob(f".{name}.*.tmp"))


def remove_orphan_temporaries(folder: str | os.PathLike, *names: str) -> list[Path]:
    """Delete the orphan_temporaries of folder/name for each name; returns them. Call it only while
    holding the folder's lock, so that no live process is writing them."""
    removed = [p for name in names for p in orphan_temporaries(folder, name)]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, wait: bool = True, timeout: Optional[float] = None,
              purpose: str = "") -> Iterator[Path]:
    """Hold an exclusive advisory lock on the file `path` (created if absent) for the with-block.

    The lock is fcntl.flock on an open file: the operating system releases it when the holder
    exits or is killed, so a crashed process never leaves a stale lock behind. With wait=False,
    or when timeout seconds pass, LockedError names the file and the process holding it.
    purpose says in that message what the lock protects (e.g. "the image cache build").
    """
    import fcntl   # POSIX (Linux, macOS, Kaggle); fedxray's locks are not implemented on Windows
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    try:
        start = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                if not wait or (timeout is not None and time.monotonic() - start >= timeout):
                    holder = _read_holder(path)
                    raise LockedError(
                        f"{path} is locked by another process{f' (pid {holder})' if holder else ''}"
                        f"{f' for {purpose}' if purpose else ''}: wait for it to finish, or stop it; "
                        f"two processes must not write the same folder at once") from None
                time.sleep(LOCK_POLL_S)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield path
    finally:
        os.close(fd)   # closing the descriptor releases the lock


def _read_holder(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return ""

"""Crash-safe writes and single-writer locks: the one implementation every writer in the package uses.

- `atomic_write(path, write)`: the file is written under a temporary name in its own directory,
  flushed, fsynced and renamed over `path` (`os.replace` is atomic on POSIX), then the directory is
  fsynced. A reader sees the old file or the new one, never half of one; a killed writer leaves at
  most a temporary file named `.<name>.<random>.tmp`.
- `atomic_directory(path)`: a directory assembled under `.<name>.<random>.tmp` and moved into place;
  an old `path` is set aside as `.<name>.old.tmp` and removed only once the new one stands.
- `remove_orphans(directory)`: removes the temporary files and directories a killed writer left.
  Call it only while holding the directory's `WriterLock`: another live writer's temporaries look
  the same.
- `WriterLock(directory, what)`: an exclusive `fcntl.flock` on `<directory>/.lock`, held for the
  life of a writer (a training run, a dataset collection). A second writer fails at once with
  `LockError` naming the holder's PID. The kernel drops the lock when its process dies, however it
  dies, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from fmpolicy.errors import LockError

TMP_SUFFIX = ".tmp"
LOCK_FILE = ".lock"


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where the platform cannot fsync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: Path) -> str:
    """The prefix of every temporary name that stands for `path` (see `remove_orphans`)."""
    return f".{path.name}."


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(binary_file)` on a temporary file beside `path`, fsync it, rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_name(path), suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # what open() would give (mkstemp makes 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory; when the block ends without an error it becomes `path`.

    An existing `path` is replaced: it is renamed aside first and deleted only after the new one is
    in place, so a crash at any moment leaves the old or the new directory (plus a `.tmp` orphan).
    On an error the temporary directory is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_name(path), suffix=TMP_SUFFIX, dir=path.parent))
    try:
        yield tmp
        for file in tmp.rglob("*"):  # the files' contents reach the disk before the rename does
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            old = path.with_name(f"{temp_name(path)}old{TMP_SUFFIX}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_orphans(directory: str | os.PathLike) -> list[Path]:
    """Remove the `.<name>.<random>.tmp` files and directories that killed writers left directly in
    `directory`; returns what was removed. Only call it while holding the directory's `WriterLock`."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.glob(f".*{TMP_SUFFIX}"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


class WriterLock:
    """An exclusive lock on `<directory>/.lock` for the life of one writer (see the module docstring).

    Usable as a context manager, or with `acquire()` / `release()`. The lock file holds the holder's
    PID and what it is doing; it stays on disk after release (removing it would race with a writer
    that opened it in between), and only the kernel's flock says whether it is held.
    """

    def __init__(self, directory: str | os.PathLike, what: str):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "WriterLock":
        if self._fd is not None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockError(f"{self.directory} is in use by another writer ({holder}): two writers would "
                            f"overwrite each other's {self.what}. Wait for it to finish, stop it, or choose "
                            "another directory") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {self.what}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # a writer dropped without release() must not keep the lock for the process's life
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "pid unknown"

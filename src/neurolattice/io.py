"""Atomic file writes: a crash never leaves a half-written file where a good one was."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it
    over ``path`` (atomic on POSIX). On any error the temporary file is removed and ``path``
    is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


class RunError(RuntimeError):
    """A failure of a run that the command line reports in one line, exiting with ``status``:
    a full disk, a folder another process writes, an interrupted training (130, as a shell
    reports Ctrl-C). The message says what happened and what is left (the last good
    checkpoint, how to resume)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


LOCK = ".lock"


class FolderLock:
    """An exclusive lock on a run folder: ``with FolderLock(out): ...``. One process writes a run
    folder at a time; a second one gets a one-line :class:`RunError` naming the holder's pid.

    The lock is ``fcntl.flock`` on ``out/.lock`` (created with the folder if needed), so the
    operating system releases it when the holder exits in any way, ``kill -9`` included: a
    dead process never leaves a stale lock. The file holds the holder's pid, for the message.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunError(f"{self.folder} is in use: process {holder} is writing a run there "
                           f"(wait for it to end, or choose another --out)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock; the file stays (removing it would race)
            self._fd = None


def check_writable(path: str | os.PathLike, what: str, folder: bool) -> None:
    """One-line ``ValueError`` unless ``path`` can be written: a folder (``folder``) or a file
    (then not a folder itself), where its nearest existing ancestor is a folder in which a file
    can be made (tried: permissions, read-only mounts). Nothing is created. ``what`` names the
    option in the message (``--out``, ``--json``)."""
    path = Path(path)
    if not folder and path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file path")
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a folder")
    existing = (path if folder else path.parent).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} {path} cannot be written: {existing} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ValueError(f"{what} {path} is not writable: {err.strerror or err} in {existing}") from None

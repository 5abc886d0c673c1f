"""Atomic file writes: a reader sees the old file or the new one, never half of one.

The content goes to a temporary file in the destination's directory (same file system,
so the rename is atomic), which is flushed and fsynced before it is renamed over the
destination; the directory is then fsynced where the platform allows it, so the rename
survives a crash too. If anything fails before the rename, the temporary file is
removed and the destination is untouched.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"]


def _create_temp(path: Path) -> tuple[Path, int]:
    """A new hidden file beside `path`, opened for writing (mode 0o666 less the umask, as
    a plain open would give the destination)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:  # another writer drew the same name: draw again
            continue


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable, where directories can be opened and synced."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except (PermissionError, IsADirectoryError):  # Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # the file system cannot sync it
            raise
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Replace `path` with what `write(fh)` writes to a binary file handle; returns the path."""
    path = Path(path)
    tmp, fd = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(
    path: str | os.PathLike[str], payload: Any, default: Callable[[Any], Any] | None = None
) -> Path:
    """`payload` as indented JSON with sorted keys and a final newline; `default` as in json.dumps."""
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=default) + "\n")

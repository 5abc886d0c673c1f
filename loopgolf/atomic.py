"""Atomic file writes: a reader sees the old file or the new one, never half of one.

The content goes to a temporary file in the destination's directory (same file system,
so the rename is atomic), which is flushed and fsynced before it is renamed over the
destination; the directory is then fsynced where the platform allows it, so the rename
survives a crash too. If anything fails before the rename, the temporary file is
removed and the destination is untouched.

A directory is written the same way (`atomic_directory`): staged beside the destination,
every file in it fsynced, then renamed into place; what happens when the destination
already exists is the caller's choice (`Existing`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal

__all__ = [
    "Existing", "atomic_directory", "atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
]

# What atomic_directory does when the destination is already there:
#   "empty"    an empty directory is replaced; anything else fails (OSError) and the staged one is removed
#   "keep"     the destination stands and the staged directory is discarded (the same content twice)
#   "replace"  the destination is replaced whole: moved aside, the staged one renamed in, the old removed
Existing = Literal["empty", "keep", "replace"]


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


def _fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory, deepest first."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            path = Path(directory, name)
            if path.is_file() and not path.is_symlink():
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(Path(directory))


@contextlib.contextmanager
def atomic_directory(
    dest: str | os.PathLike[str], *, existing: Existing = "empty", mode: int | None = None
) -> Iterator[Path]:
    """Stage a directory for `dest`: the block writes into the yielded path (beside `dest`, so
    the rename is atomic); when it ends without an exception the staged tree is fsynced, given
    `mode` if set (a staged directory starts as 0o700), and renamed to `dest` under the
    `existing` policy. If the block or the rename fails, the staged directory is removed and
    `dest` is untouched: a reader sees no directory, the old one or the new one, never half.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield staging
        _fsync_tree(staging)
        if mode is not None:
            os.chmod(staging, mode)
        _rename_into_place(staging, dest, existing)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(dest.parent)


def _rename_into_place(staging: Path, dest: Path, existing: Existing) -> None:
    if not dest.exists():
        os.replace(staging, dest)
    elif existing == "keep":
        shutil.rmtree(staging)
    elif existing == "empty":
        dest.rmdir()  # fails unless empty
        os.replace(staging, dest)
    else:
        trash = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.old")
        os.replace(dest, trash)
        try:
            os.replace(staging, dest)
        except BaseException:
            os.replace(trash, dest)  # put the old one back
            raise
        shutil.rmtree(trash) if trash.is_dir() else trash.unlink()

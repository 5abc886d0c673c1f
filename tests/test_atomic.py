"""Atomic writes: the old file or the new one, never half of one, and no temporary file
left behind, whatever fails.

    python -m pytest tests/test_atomic.py
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest

from loopgolf.atomic import atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text

OLD = b"the old content\n"


@pytest.fixture
def old_file(tmp_path: Path) -> Path:
    path = tmp_path / "metrics.json"
    path.write_bytes(OLD)
    return path


def test_replaces_the_file_and_leaves_nothing_else(old_file: Path) -> None:
    payload = {"b": np.float32(0.5).item(), "a": [1, 2], "unicode": "é"}
    atomic_write_json(old_file, payload)
    assert old_file.read_text(encoding="utf-8") == json.dumps(payload, indent=2, sort_keys=True) + "\n"
    atomic_write_text(old_file, "é\n")
    assert old_file.read_bytes() == "é\n".encode()
    assert os.listdir(old_file.parent) == [old_file.name]


def test_a_new_file_gets_the_mode_a_plain_open_gives(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "atomic", b"x")
    (tmp_path / "plain").write_bytes(b"x")
    mode = stat.S_IMODE((tmp_path / "atomic").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain").stat().st_mode)


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_write_failing_midway_keeps_the_old_file_and_removes_the_temp(old_file: Path, error: BaseException) -> None:
    seen: list[str] = []

    def half_then_fail(fh: BinaryIO) -> None:
        fh.write(b"half of the new")
        fh.flush()
        seen.extend(os.listdir(old_file.parent))  # the temp file exists at this point
        raise error

    with pytest.raises(type(error)):
        atomic_write(old_file, half_then_fail)
    assert len(seen) == 2  # the old file and the temp
    assert old_file.read_bytes() == OLD
    assert os.listdir(old_file.parent) == [old_file.name]


def test_a_serializer_error_keeps_the_old_file(old_file: Path) -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        atomic_write_json(old_file, {"value": object()})
    assert old_file.read_bytes() == OLD
    assert os.listdir(old_file.parent) == [old_file.name]


def test_a_failing_rename_removes_the_temp(tmp_path: Path) -> None:
    target = tmp_path / "a_directory"
    (target / "inside").mkdir(parents=True)  # a non-empty directory cannot be replaced by a file
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert sorted(os.listdir(tmp_path)) == ["a_directory"]


def test_the_file_and_its_directory_are_synced_before_returning(
    old_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[tuple[bool, int, bytes]] = []  # (a directory?, its size, the destination's content then)
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        info = os.fstat(fd)
        synced.append((stat.S_ISDIR(info.st_mode), info.st_size, old_file.read_bytes()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    atomic_write_bytes(old_file, b"new content")
    assert synced[0] == (False, len(b"new content"), OLD)  # all the data, before the rename
    assert synced[-1][0] and synced[-1][2] == b"new content"  # then the directory, after it

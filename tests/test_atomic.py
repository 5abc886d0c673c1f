"""Atomic writes: the old file (or directory) or the new one, never half of one, and no
temporary file left behind, whatever fails.

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

from loopgolf.atomic import (
    Existing,
    atomic_directory,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)

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


# ------------------------------------------------------------------ directories


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _stage(staging: Path, content: bytes) -> None:
    (staging / "sub").mkdir()
    (staging / "sub" / "file.bin").write_bytes(content)
    (staging / "top.txt").write_bytes(content)


@pytest.mark.parametrize("existing", ["empty", "keep", "replace"])
def test_a_staged_directory_lands_whole(tmp_path: Path, existing: Existing) -> None:
    dest = tmp_path / "deep" / "out"
    with atomic_directory(dest, existing=existing) as staging:
        assert staging.parent == dest.parent and not dest.exists()
        _stage(staging, b"new")
    assert _tree(dest) == {"sub/file.bin": b"new", "top.txt": b"new"}
    assert os.listdir(dest.parent) == ["out"]


@pytest.mark.parametrize("existing", ["empty", "keep", "replace"])
@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_crash_mid_stage_leaves_no_half_directory(tmp_path: Path, existing: Existing, error: BaseException) -> None:
    dest = tmp_path / "out"
    with pytest.raises(type(error)), atomic_directory(dest, existing=existing) as staging:
        (staging / "half.bin").write_bytes(b"half of it")
        raise error
    assert os.listdir(tmp_path) == []
    dest.mkdir()  # and over an existing destination, whatever the policy: the old one untouched
    (dest / "old.txt").write_bytes(OLD)
    with pytest.raises(type(error)), atomic_directory(dest, existing=existing) as staging:
        (staging / "half.bin").write_bytes(b"half of it")
        raise error
    assert os.listdir(tmp_path) == ["out"] and _tree(dest) == {"old.txt": OLD}


def test_each_policy_for_an_existing_destination(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    with atomic_directory(dest, existing="empty") as staging:  # an empty directory is replaced
        _stage(staging, b"first")
    with pytest.raises(OSError), atomic_directory(dest, existing="empty") as staging:  # a full one is not
        _stage(staging, b"second")
    with atomic_directory(dest, existing="keep") as staging:  # the first copy stands
        _stage(staging, b"second")
    assert _tree(dest) == {"sub/file.bin": b"first", "top.txt": b"first"}
    with atomic_directory(dest, existing="replace") as staging:  # replaced whole: no old file survives
        (staging / "only.txt").write_bytes(b"third")
    assert _tree(dest) == {"only.txt": b"third"}
    assert os.listdir(tmp_path) == ["out"]


def test_a_staged_directory_gets_its_mode(tmp_path: Path) -> None:
    with atomic_directory(tmp_path / "out", mode=0o755):
        pass
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


def test_every_staged_file_is_synced_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "out"
    synced: list[tuple[bool, int, bool]] = []  # (a directory?, its size, dest there then)
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        info = os.fstat(fd)
        synced.append((stat.S_ISDIR(info.st_mode), info.st_size, dest.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    with atomic_directory(dest) as staging:
        _stage(staging, b"12345")
    files = [s for s in synced if not s[0]]
    assert files == [(False, 5, False)] * 2  # both files, before the rename
    assert synced[-1][0] and synced[-1][2]  # the parent directory, after it

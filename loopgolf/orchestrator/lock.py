"""One driver per sweep: an exclusive lock file in the sweep directory.

`<sweep>/driver.lock` holds the holder's PID, host and start time (JSON). A driver writes
that to a file of its own, then hard-links it to `driver.lock`: the link fails if the lock
exists, so of two drivers starting at once exactly one gets it, and the lock is never seen
half-written (an exclusive create would show a racing driver an empty file).
A second `sweep` or `resume` of the directory fails with one line naming the holder.
A lock whose holder is gone (same host, PID not running: the driver was killed) is
taken over with a message. A lock from another host cannot be checked from here and is
never taken over: remove the file by hand once that driver is known to be dead.
What this means on NFS and EFS is in docs/cluster.md.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loopgolf.atomic import atomic_write_text
from loopgolf.errors import LoopgolfError

LOCK_FILE = "driver.lock"


class SweepLocked(LoopgolfError):
    """Another driver holds the sweep directory."""


def _holder(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    return f"PID {holder.get('pid')} on host {holder.get('host')!r} since {holder.get('started_at')}"


def _create(path: Path, me: dict[str, Any]) -> bool:
    """Make `path` hold `me`, complete, unless it exists: False then."""
    mine = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}")
    atomic_write_text(mine, json.dumps(me))
    try:
        os.link(mine, path)  # atomic, and refused when `path` exists, on local disks, NFS and EFS
    except FileExistsError:
        return False
    finally:
        mine.unlink(missing_ok=True)
    return True


def _stale(holder: dict[str, Any]) -> bool:
    pid = holder.get("pid")
    same_host = holder.get("host") == socket.gethostname()
    return same_host and isinstance(pid, int) and pid != os.getpid() and not _alive(pid)


def acquire(sweep_dir: Path) -> dict[str, Any]:
    """Take the sweep's lock or raise SweepLocked naming its holder."""
    path = sweep_dir / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": dt.datetime.now(dt.UTC).isoformat()}
    for _ in range(3):  # a lost race for a stale lock: look again
        if _create(path, me):
            return me
        holder = _holder(path)
        if not holder and path.exists():
            raise SweepLocked(f"{path}: a lock file that names no holder; remove it if no driver runs this sweep")
        if not _stale(holder):
            if not path.exists():
                continue
            raise SweepLocked(
                f"sweep {str(sweep_dir)!r} is in use by another driver ({_describe(holder)}); "
                f"if that driver is gone, remove {path}"
            )
        stale = path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
        try:
            os.replace(path, stale)  # one of several takers gets it; the others look again
        except FileNotFoundError:
            continue
        print(f"loopgolf: taking over the lock of a driver that is gone ({_describe(holder)})", file=sys.stderr)
        stale.unlink(missing_ok=True)
    raise SweepLocked(f"{path}: could not take the lock (other drivers keep taking it)")


def release(sweep_dir: Path, me: dict[str, Any]) -> None:
    path = sweep_dir / LOCK_FILE
    if _holder(path) == me:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def sweep_lock(sweep_dir: Path) -> Iterator[None]:
    me = acquire(sweep_dir)
    try:
        yield
    finally:
        release(sweep_dir, me)

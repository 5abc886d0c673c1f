"""What the process tests read from /proc (Linux): trees, children, liveness, working directories."""

from __future__ import annotations

import os
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    """A process's /proc stat fields after its command name (which may hold spaces); None once gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Running or sleeping: neither gone nor a zombie waiting to be reaped."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it, from /proc's children lists."""
    seen, todo = [], [pid]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue  # the task ended while we looked
    return seen


def children(pid: int) -> list[int]:
    """The direct children of `pid`."""
    return [c for c in process_tree(pid) if c != pid and (f := _stat_fields(c)) is not None and int(f[1]) == pid]


def processes_in(root: Path) -> list[int]:
    """Processes whose working directory is under `root` (a script runs in its trial's run/)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if cwd.startswith(str(root) + "/"):
                found.append(int(entry.name))
    return found

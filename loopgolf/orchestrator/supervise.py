"""Run a user's command so that nothing of it outlives its trial.

    python -m loopgolf.orchestrator.supervise -- python train_gpt.py

The trial starts a launcher (`launch`) that forks the supervisor into a session of its
own (its own process group), and the supervisor starts the command as its child, in
that group. Every poll it records the
command's descendants from /proc, including those that left the group: torchrun starts
each worker in a session of its own, so a signal to the group alone would miss them.
It ends all of them (SIGTERM, then SIGKILL after `GRACE_SECONDS`):

- when it receives SIGTERM or SIGINT (the trial is stopped, or runs past its time);
- when the Tune worker exits or is killed (e.g. with the driver): the launcher sees its
  parent change and tells the supervisor; or Ray kills the launcher with the worker (it
  kills a worker's direct children) and the supervisor sees its own parent change;
- when the command exits, any descendant it left behind (a daemon, a stuck worker).

It exits with the command's status (128 + signal when a signal ended it). Linux only:
elsewhere it still signals its process group, but cannot see escaped descendants.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

POLL_SECONDS = 0.2
GRACE_SECONDS = 10.0  # between SIGTERM and SIGKILL: torchrun needs a moment to stop its workers


def _parents() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, start time) of every process, from /proc (empty where there is none)."""
    table = {}
    for entry in Path("/proc").iterdir() if Path("/proc/self/stat").exists() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it ended while we looked
        fields = stat[stat.rfind(")") + 2 :].split()  # after the command name, which may hold spaces
        table[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[19])
    return table


def descendants(root: int, table: dict[int, tuple[int, int, str]]) -> dict[int, str]:
    """Every process below `root` in the table, and, when root leads its process group, every
    other member of the group (an orphan that stayed in it), with its start time (to tell a
    reused pid)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    group = root if root in table and table[root][1] == root else None  # only a group root leads
    stack = [pid for pid, (_, pgrp, _) in table.items() if pgrp == group and pid != root]
    stack += children.get(root, [])
    found: dict[int, str] = {}
    while stack:
        pid = stack.pop()
        if pid in found:
            continue
        found[pid] = table[pid][2]
        stack.extend(children.get(pid, ()))
    return found


class Tree:
    """The processes the command started, remembered even after they are orphaned."""

    def __init__(self) -> None:
        self.seen: dict[int, str] = {}
        self.lock = threading.Lock()

    def scan(self) -> None:
        with self.lock:
            self.seen |= descendants(os.getpid(), _parents())

    def alive(self) -> list[int]:
        table = _parents()
        with self.lock:
            return [pid for pid, start in self.seen.items() if pid in table and table[pid][2] == start]

    def signal_all(self, sig: int) -> None:
        for pid in self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):  # it ended meanwhile
                os.kill(pid, sig)

    def end(self, grace: float = GRACE_SECONDS) -> None:
        """SIGTERM to every descendant, SIGKILL to what is left after `grace` seconds."""
        self.scan()
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.alive() and time.monotonic() < deadline:
            _reap()
            time.sleep(POLL_SECONDS)  # waiting on the processes' exit, polled
        self.scan()
        self.signal_all(signal.SIGKILL)
        _reap()


def _reap() -> None:
    """Collect exited children (zombies count as alive in /proc until reaped)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def supervise(argv: list[str], parent: int) -> int:
    """Run `argv` to its end, or end it with everything it started when told to or orphaned."""
    tree = Tree()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        child = subprocess.Popen(argv)
    except OSError as exc:
        print(f"loopgolf: cannot start {argv[0]!r}: {exc}", file=sys.stderr)
        return 127
    code: int | None = None
    while code is None:
        tree.scan()
        if stop.is_set() or os.getppid() != parent:
            tree.end()
            child.wait()
            return 143
        try:
            code = child.wait(timeout=POLL_SECONDS)
        except subprocess.TimeoutExpired:
            continue
    tree.end(grace=2.0)  # whatever the command left running
    return code if code >= 0 else 128 - code


def launch(argv: list[str]) -> int:
    """The trial's handle on the supervisor: it forks the supervisor into a session of its own
    and waits for it, passing SIGTERM / SIGINT on. Ray kills a worker's direct children when
    the worker exits (RAY_kill_child_processes_on_worker_exit), with SIGKILL: that reaches this
    launcher, never the supervisor, which sees the launcher go and ends the command's tree."""
    launcher = os.getpid()
    pid = os.fork()
    if pid == 0:  # the supervisor
        os.setsid()
        code = 1
        try:
            code = supervise(argv, parent=launcher)
        finally:
            os._exit(code)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, _frame: os.kill(pid, number))
    worker, told = os.getppid(), False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) % 256
        if os.getppid() != worker and not told:  # the trial's process died and left this launcher behind
            os.kill(pid, signal.SIGTERM)
            told = True
        time.sleep(POLL_SECONDS)  # polling two conditions: the supervisor's exit and the worker's life


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m loopgolf.orchestrator.supervise -- COMMAND [ARG...]", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(launch(argv))


if __name__ == "__main__":
    main()

"""Live progress of a sweep, read from its directory alone (no Ray): `loopgolf status`.

Each trial's directory, `<sweep>/trials/<trial_id>/`, holds its configuration
(`trial.json`), one line per progress report (`progress.jsonl`) and, once it has ended,
`metrics.json`. From those this module builds a `SweepProgress`: for every trial that
is training, its step, elapsed and budgeted training seconds, tokens per second and its
latest quick val bpb; for the sweep, how many trials are done, running, queued and
failed, and an estimate of the time left from the mean wall time of the trials that
have ended. The sweep's console prints the same compact counts line at every trial
event (`counts_line`), so the two always read alike.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from loopgolf.orchestrator.trialdir import METRICS_FILE, PROGRESS_FILE, TRIAL_FILE, TRIALS_DIR, read_json


@dataclasses.dataclass(frozen=True)
class TrialProgress:
    """A training trial's latest progress report."""

    trial_id: str
    step: int
    elapsed_seconds: float  # training seconds spent (the budget's clock)
    budget_seconds: float  # train_seconds of its config
    tokens_per_second: float | None  # over the last report interval (since the start for the first)
    quick_val_bpb: float | None
    updated_at: float  # POSIX time of the last report


@dataclasses.dataclass(frozen=True)
class SweepProgress:
    sweep: str
    total: int  # trials the sweep will run: configurations x seeds
    done: int  # ended as complete or rejected
    failed: int
    running: tuple[TrialProgress, ...]
    max_concurrent: int
    trial_seconds: tuple[float, ...]  # wall seconds of each ended trial

    @property
    def queued(self) -> int:
        return max(0, self.total - self.done - self.failed - len(self.running))

    @property
    def finished(self) -> bool:
        return self.done + self.failed >= self.total

    @property
    def eta_seconds(self) -> float | None:
        return eta_seconds(self.queued, [t.elapsed_seconds for t in self.running], self.trial_seconds,
                           self.max_concurrent)  # fmt: skip


def eta_seconds(
    queued: int, running_elapsed: Sequence[float], trial_seconds: Sequence[float], concurrency: int
) -> float | None:
    """Time left if every trial takes the mean wall time of those ended: the work still owed
    (whole trials queued, the rest of the running ones) spread over `concurrency` slots.
    None until a trial has ended."""
    if not trial_seconds:
        return None
    mean = sum(trial_seconds) / len(trial_seconds)
    owed = queued * mean + sum(max(0.0, mean - elapsed) for elapsed in running_elapsed)
    return owed / max(1, min(concurrency, queued + len(running_elapsed)))


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def counts_line(done: int, running: int, queued: int, failed: int, total: int, eta: float | None) -> str:
    """The sweep in one line: `[3/12 done, 2 running, 6 queued, 1 failed; ETA 4m10s]`."""
    return (f"[{done}/{total} done, {running} running, {queued} queued, {failed} failed; "
            f"ETA {_duration(eta)}]")  # fmt: skip


def trial_line(trial: TrialProgress, now: float) -> str:
    rate = f"{trial.tokens_per_second:,.0f} tok/s" if trial.tokens_per_second is not None else "? tok/s"
    bpb = f"{trial.quick_val_bpb:.4f}" if trial.quick_val_bpb is not None else "-"
    return (f"  {trial.trial_id}  step {trial.step:>6d}  {trial.elapsed_seconds:6.1f}/{trial.budget_seconds:g} s  "
            f"{rate:>14s}  quick val_bpb {bpb}  (updated {_duration(max(0.0, now - trial.updated_at))} ago)")


def render(progress: SweepProgress, now: float | None = None) -> str:
    """`loopgolf status`'s live part: the counts line, then one line per running trial."""
    now = time.time() if now is None else now
    lines = [f"sweep {progress.sweep} " + counts_line(progress.done, len(progress.running), progress.queued,
                                                      progress.failed, progress.total, progress.eta_seconds)]
    lines += [trial_line(t, now) for t in sorted(progress.running, key=lambda t: t.trial_id)]
    return "\n".join(lines)


# ------------------------------------------------------------------------- reading


def progress_reports(path: Path) -> list[dict[str, Any]]:
    """The reports of a progress.jsonl; a line torn by a kill (the last, unfinished) is skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    reports = []
    for line in text.splitlines():
        try:
            report = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(report, dict) and "step" in report and "elapsed_seconds" in report:
            reports.append(report)
    return reports


def _tokens_per_second(reports: Sequence[dict[str, Any]]) -> float | None:
    last = reports[-1]
    first = reports[-2] if len(reports) > 1 and reports[-2]["elapsed_seconds"] < last["elapsed_seconds"] else None
    tokens = last.get("train_tokens")
    if tokens is None:
        return None
    if first is not None and first.get("train_tokens") is not None:
        return (tokens - first["train_tokens"]) / (last["elapsed_seconds"] - first["elapsed_seconds"])
    return tokens / last["elapsed_seconds"] if last["elapsed_seconds"] > 0 else None


def trial_progress(directory: Path) -> TrialProgress | None:
    """A trial's latest progress; None when it has not reported yet."""
    reports = progress_reports(directory / PROGRESS_FILE)
    if not reports:
        return None
    last = reports[-1]
    record = read_json(directory / TRIAL_FILE) or {}
    budget = float(record.get("trial_config", {}).get("train_seconds", math.nan))
    bpb = last.get("quick_val_bpb")
    return TrialProgress(
        trial_id=directory.name,
        step=int(last["step"]),
        elapsed_seconds=float(last["elapsed_seconds"]),
        budget_seconds=budget,
        tokens_per_second=_tokens_per_second(reports),
        quick_val_bpb=float(bpb) if bpb is not None else None,
        updated_at=(directory / PROGRESS_FILE).stat().st_mtime,
    )


def _wall_seconds(metrics: dict[str, Any]) -> float | None:
    try:
        started = dt.datetime.fromisoformat(metrics["started_at"])
        ended = dt.datetime.fromisoformat(metrics["ended_at"])
    except (KeyError, TypeError, ValueError):
        return None
    return (ended - started).total_seconds()


def sweep_progress(sweep_dir: str | os.PathLike[str], name: str, total: int, max_concurrent: int) -> SweepProgress:
    """Read every trial directory of the sweep once."""
    done = failed = 0
    running: list[TrialProgress] = []
    seconds: list[float] = []
    root = Path(sweep_dir) / TRIALS_DIR
    for directory in sorted(root.iterdir()) if root.is_dir() else ():
        metrics = read_json(directory / METRICS_FILE)
        if metrics is None:
            current = trial_progress(directory)
            if current is not None:
                running.append(current)
            continue
        if metrics.get("status") == "failed":
            failed += 1
        else:
            done += 1
        wall = _wall_seconds(metrics)
        if wall is not None and metrics.get("status") != "rejected":
            seconds.append(wall)
    return SweepProgress(name, total, done, failed, tuple(running), max_concurrent, tuple(seconds))


def live_progress(sweep_dir: str | os.PathLike[str]) -> SweepProgress:
    """The progress of the sweep in `sweep_dir`, sized by its saved spec."""
    from loopgolf.orchestrator.sweep import read_sweep_spec

    spec = read_sweep_spec(sweep_dir)
    return sweep_progress(sweep_dir, spec.name, spec.num_samples * spec.seeds, spec.max_concurrent)


def as_dict(progress: SweepProgress) -> dict[str, Any]:
    """The progress as plain data (for the status command's JSON line)."""
    return dataclasses.asdict(progress) | {"queued": progress.queued, "eta_seconds": progress.eta_seconds}


def watch(
    read: Callable[[], SweepProgress], interval: float, out: TextIO = sys.stdout,
    ticks: Iterable[Any] | None = None,
) -> SweepProgress:
    """Redraw the progress every `interval` seconds until the sweep has finished (or Ctrl-C).
    On a terminal the block is redrawn in place; otherwise each refresh is appended."""
    in_place = out.isatty()
    progress = read()
    for _ in ticks if ticks is not None else itertools.count():  # forever, unless the caller bounds it
        text = render(progress)
        out.write(("\x1b[H\x1b[J" if in_place else "") + text + "\n")
        out.flush()
        if progress.finished:
            break
        time.sleep(interval)
        progress = read()
    return progress

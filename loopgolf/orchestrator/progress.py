"""Live progress of a sweep, read from its directory alone (no Ray): `loopgolf status`.

Each trial's directory, `<sweep>/trials/<trial_id>/`, holds its configuration
(`trial.json`), one line per progress report (`progress.jsonl`) and, once it has ended,
`metrics.json`. From those this module counts the sweep once (`SweepCounts`): for every
trial that is training, its step, elapsed and budgeted training seconds, tokens per second and its
latest quick val bpb; for the sweep, how many trials are done, running, queued and
failed, and an estimate of the time left from the mean wall time of the trials that
have ended. The sweep's console prints the same compact counts line at every trial
event (`counts_line`), so the two always read alike.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from loopgolf.orchestrator.ledger import unreadable_ledger
from loopgolf.orchestrator.study import final_trials
from loopgolf.orchestrator.sweepdir import planned_trials_of, read_sweep_spec
from loopgolf.orchestrator.trialdir import (
    PROGRESS_FILE,
    TRIAL_FILE,
    TRIALS_DIR,
    final_metrics,
    progress_lines,
    read_json,
)


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
class SweepCounts:
    """A sweep's trials, counted once from its trial directories (the truth: the ledger is
    rebuilt from them) for the console's line, `loopgolf status` and the sweep's last line."""

    sweep: str
    total: int  # trials the sweep will run: (configurations + their control arms) x seeds
    by_status: dict[str, int]  # trials with final metrics, by status (complete, rejected, stopped, failed)
    raised: int  # of those, trials whose code raised (a diverged trial is an outcome, not an error)
    running: tuple[TrialProgress, ...]
    max_concurrent: int
    trial_seconds: tuple[float, ...]  # wall seconds of each ended trial that trained
    best: tuple[str, str, float] | None = None  # (trial_id, metric, value): the first objective's best feasible

    @property
    def finished(self) -> int:
        """Trials with final metrics."""
        return sum(self.by_status.values())

    @property
    def failed(self) -> int:
        return self.by_status.get("failed", 0)

    @property
    def done(self) -> int:
        """Trials that ended as an outcome (complete, rejected, stopped)."""
        return self.finished - self.failed

    @property
    def queued(self) -> int:
        return max(0, self.total - self.finished - len(self.running))

    @property
    def all_ended(self) -> bool:
        return self.finished >= self.total

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


def render(progress: SweepCounts, now: float | None = None) -> str:
    """`loopgolf status`'s live part: the counts line, then one line per running trial."""
    now = time.time() if now is None else now
    lines = [f"sweep {progress.sweep} " + counts_line(progress.done, len(progress.running), progress.queued,
                                                      progress.failed, progress.total, progress.eta_seconds)]
    lines += [trial_line(t, now) for t in sorted(progress.running, key=lambda t: t.trial_id)]
    return "\n".join(lines)


# ------------------------------------------------------------------------- reading


def progress_reports(directory: Path) -> list[dict[str, Any]]:
    """A trial's progress reports (a line torn by a kill is skipped by `progress_lines`)."""
    return [r for r in progress_lines(directory) if "step" in r and "elapsed_seconds" in r]


def _tokens_per_second(reports: Sequence[dict[str, Any]]) -> float | None:
    last = reports[-1]
    first = reports[-2] if len(reports) > 1 and reports[-2]["elapsed_seconds"] < last["elapsed_seconds"] else None
    tokens = last.get("train_tokens")
    if tokens is None:
        return None
    if first is not None and first.get("train_tokens") is not None:
        return (tokens - first["train_tokens"]) / (last["elapsed_seconds"] - first["elapsed_seconds"])
    return tokens / last["elapsed_seconds"] if last["elapsed_seconds"] > 0 else None


def trial_progress(directory: Path) -> TrialProgress:
    """A started trial's latest progress (step 0 and no rate until its first report)."""
    reports = progress_reports(directory)
    record = read_json(directory / TRIAL_FILE) or {}
    budget = float(record.get("trial_config", {}).get("train_seconds", math.nan))
    if not reports:
        return TrialProgress(directory.name, 0, 0.0, budget, None, None, (directory / TRIAL_FILE).stat().st_mtime)
    last = reports[-1]
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


def wall_seconds(metrics: dict[str, Any]) -> float | None:
    """A trial's wall time, from the start and end its final metrics record."""
    try:
        started = dt.datetime.fromisoformat(metrics["started_at"])
        ended = dt.datetime.fromisoformat(metrics["ended_at"])
    except (KeyError, TypeError, ValueError):
        return None
    return (ended - started).total_seconds()


def _better(value: float, than: float | None, mode: str) -> bool:
    return than is None or (value < than if mode == "min" else value > than)


def count_sweep(
    sweep_dir: str | os.PathLike[str], name: str, total: int, max_concurrent: int,
    objective: tuple[str, str] | None = None,
) -> SweepCounts:
    """Read every trial directory of the sweep once. A trial is running from its trial.json
    (written when it starts) until its final metrics. `objective` (metric, mode) names the
    value whose best feasible, complete trial is reported."""
    by_status: dict[str, int] = {}
    raised = 0
    running: list[TrialProgress] = []
    seconds: list[float] = []
    best: tuple[str, str, float] | None = None
    metric, mode = objective or ("", "min")  # no objective: no best
    root = Path(sweep_dir) / TRIALS_DIR
    for directory in sorted(root.iterdir()) if root.is_dir() else ():
        metrics = final_metrics(directory)
        if metrics is None:
            if (directory / TRIAL_FILE).is_file():
                running.append(trial_progress(directory))
            continue
        status = str(metrics["status"])
        by_status[status] = by_status.get(status, 0) + 1
        raised += bool(metrics.get("raised"))
        wall = wall_seconds(metrics)
        if wall is not None and status != "rejected":  # a rejected trial never trains
            seconds.append(wall)
        value = metrics.get(metric) if metric else None
        eligible = status == "complete" and metrics.get("feasible") and value is not None
        if eligible and _better(float(value), best[2] if best else None, mode):
            best = (directory.name, metric, float(value))
    return SweepCounts(name, total, by_status, raised, tuple(running), max_concurrent, tuple(seconds), best)


def read_counts(sweep_dir: str | os.PathLike[str]) -> SweepCounts:
    """The counts of the sweep in `sweep_dir`, sized by its saved spec."""
    spec = read_sweep_spec(sweep_dir)
    return count_sweep(sweep_dir, spec.name, planned_trials_of(sweep_dir, spec)(), spec.max_concurrent,
                       next(iter(spec.objectives.items())))  # fmt: skip


def watch(
    read: Callable[[], SweepCounts], interval: float, out: TextIO = sys.stdout,
    ticks: Iterable[Any] | None = None,
) -> SweepCounts:
    """Redraw the progress every `interval` seconds until the sweep has finished (or Ctrl-C).
    On a terminal the block is redrawn in place; otherwise each refresh is appended."""
    in_place = out.isatty()
    progress = read()
    for _ in ticks if ticks is not None else itertools.count():  # forever, unless the caller bounds it
        text = render(progress)
        out.write(("\x1b[H\x1b[J" if in_place else "") + text + "\n")
        out.flush()
        if progress.all_ended:
            break
        time.sleep(interval)
        progress = read()
    return progress


@dataclasses.dataclass(frozen=True)
class SweepStatus:
    """`loopgolf status`: the counts, the study's view of its trials, and whether the ledger reads."""

    sweep_dir: Path
    counts: SweepCounts
    study_states: dict[str, int]  # the final state of each of the study's trial keys
    ledger_problem: str | None  # why results/trials.parquet cannot be read (it is rebuilt by a resume)


def read_status(sweep_dir: str | os.PathLike[str]) -> SweepStatus:
    """The sweep's status from its directory alone, without Ray."""
    sweep_dir = Path(sweep_dir).resolve()
    spec = read_sweep_spec(sweep_dir)
    planned = planned_trials_of(sweep_dir, spec)
    total = planned()  # loads the study once; the states below read the same object
    counts = count_sweep(sweep_dir, spec.name, total, spec.max_concurrent, next(iter(spec.objectives.items())))
    states: dict[str, int] = {}
    if planned.study is not None:
        for trial in final_trials(planned.study).values():  # one per trial: a re-run supersedes its lost first run
            states[trial.state.name] = states.get(trial.state.name, 0) + 1
    problem = unreadable_ledger(sweep_dir)
    return SweepStatus(sweep_dir, counts, states, f"{problem}; counted from the trial directories" if problem else None)


def as_dict(status: SweepStatus) -> dict[str, Any]:
    """The status as plain data: the status command's JSON line."""
    c = status.counts
    progress = dataclasses.asdict(c) | {"done": c.done, "failed": c.failed, "queued": c.queued,
                                        "eta_seconds": c.eta_seconds}  # fmt: skip
    for key in ("by_status", "raised", "best"):
        progress.pop(key)
    best = {"trial_id": c.best[0], c.best[1]: c.best[2]} if c.best else None
    return {
        "sweep": c.sweep, "sweep_dir": str(status.sweep_dir), "total": c.total, "finished": c.finished,
        "by_status": dict(c.by_status), "study": status.study_states, "best": best, "raised": c.raised,
        "ledger_problem": status.ledger_problem, "progress": progress,
    }  # fmt: skip


def print_status(status: SweepStatus, out: Any = sys.stdout) -> None:
    c = status.counts
    if status.ledger_problem:
        print(f"warning: {status.ledger_problem}; `loopgolf resume` rewrites it", file=out)
    counts = ", ".join(f"{v} {k}" for k, v in sorted(c.by_status.items())) or "none yet"
    print(f"sweep {c.sweep}: {c.finished}/{c.total} trials finished ({counts})", file=out)
    if status.study_states:
        print("optuna study: " + ", ".join(f"{v} {k.lower()}" for k, v in sorted(status.study_states.items())),
              file=out)  # fmt: skip
    if c.best:
        print(f"best {c.best[1]}: {c.best[2]:.4f} (trial {c.best[0]})", file=out)

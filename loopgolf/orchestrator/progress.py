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
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from loopgolf.errors import first_line
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
class SweepProgress:
    sweep: str
    total: int  # trials the sweep will run: (configurations + their control arms) x seeds
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


def sweep_progress(sweep_dir: str | os.PathLike[str], name: str, total: int, max_concurrent: int) -> SweepProgress:
    """Read every trial directory of the sweep once. A trial is running from its trial.json
    (written when it starts) until its final metrics."""
    done = failed = 0
    running: list[TrialProgress] = []
    seconds: list[float] = []
    root = Path(sweep_dir) / TRIALS_DIR
    for directory in sorted(root.iterdir()) if root.is_dir() else ():
        metrics = final_metrics(directory)
        if metrics is None:
            if (directory / TRIAL_FILE).is_file():
                running.append(trial_progress(directory))
            continue
        failed += metrics["status"] == "failed"
        done += metrics["status"] != "failed"
        wall = wall_seconds(metrics)
        if wall is not None and metrics["status"] != "rejected":  # a rejected trial never trains
            seconds.append(wall)
    return SweepProgress(name, total, done, failed, tuple(running), max_concurrent, tuple(seconds))


def live_progress(sweep_dir: str | os.PathLike[str]) -> SweepProgress:
    """The progress of the sweep in `sweep_dir`, sized by its saved spec."""
    from loopgolf.orchestrator.sweepdir import planned_total, read_sweep_spec

    spec = read_sweep_spec(sweep_dir)
    return sweep_progress(sweep_dir, spec.name, planned_total(sweep_dir, spec), spec.max_concurrent)


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


def sweep_status(sweep_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Progress from the ledger and the study, without Ray."""
    import pandas as pd

    from loopgolf.orchestrator.ledger import Ledger
    from loopgolf.orchestrator.study import final_trials
    from loopgolf.orchestrator.sweepdir import planned_total_reader, read_sweep_spec

    sweep_dir = Path(sweep_dir).resolve()
    spec = read_sweep_spec(sweep_dir)
    planned = planned_total_reader(sweep_dir, spec)
    total = planned()  # loads the study once; the states below read the same object
    ledger = Ledger(sweep_dir, spec.name, "")
    ledger_problem = None
    try:
        rows = pd.read_parquet(ledger.trials_file) if ledger.trials_file.exists() else pd.DataFrame(columns=["status"])
    except (OSError, ValueError) as exc:  # pyarrow's errors are OSError / ValueError subclasses
        first = first_line(exc)
        ledger_problem = f"{ledger.trials_file} is unreadable ({first}); counted from the trial directories"
        trial_rows = ledger.rows()[0]
        rows = pd.DataFrame(trial_rows) if trial_rows else pd.DataFrame(columns=["status"])
    by_status = rows["status"].value_counts().to_dict() if len(rows) else {}
    study_states: dict[str, int] = {}
    if planned.study is not None:
        for trial in final_trials(planned.study).values():  # one per trial: a re-run supersedes its lost first run
            study_states[trial.state.name] = study_states.get(trial.state.name, 0) + 1
    metric, mode = next(iter(spec.objectives.items()))
    best = None
    ok = rows[(rows["status"] == "complete") & rows.get("feasible", False)] if len(rows) else rows
    if len(ok) and metric in ok:
        best_row = ok.sort_values(metric, ascending=mode == "min").iloc[0]
        best = {"trial_id": best_row["trial_id"], metric: float(best_row[metric])}
    return {
        "sweep": spec.name,
        "sweep_dir": str(sweep_dir),
        "total": total,
        "finished": len(rows),
        "by_status": {k: int(v) for k, v in by_status.items()},
        "study": study_states,
        "best": best,
        "raised": int(rows["raised"].fillna(False).astype(bool).sum()) if "raised" in rows else 0,
        "ledger_problem": ledger_problem,
    }


def print_status(status: dict[str, Any], out: Any = sys.stdout) -> None:
    if status.get("ledger_problem"):
        print(f"warning: {status['ledger_problem']}; `loopgolf resume` rewrites it", file=out)
    counts = ", ".join(f"{v} {k}" for k, v in sorted(status["by_status"].items())) or "none yet"
    print(f"sweep {status['sweep']}: {status['finished']}/{status['total']} trials finished ({counts})", file=out)
    if status["study"]:
        print("optuna study: " + ", ".join(f"{v} {k.lower()}" for k, v in sorted(status["study"].items())), file=out)
    if status["best"]:
        (metric, value), = ((k, v) for k, v in status["best"].items() if k != "trial_id")
        print(f"best {metric}: {value:.4f} (trial {status['best']['trial_id']})", file=out)

"""The ledger: results/trials.parquet and curves.parquet; their writer, rebuild and Tune callback.

Truth lives in each trial's directory (trialdir.py): its config, final metrics and
progress reports. The Parquet files are an index over those: one row per trial with every config field
and metric, and the curves in long format (their schema is ledger_schema.py's). They
are rewritten whole on every finished trial (read, upsert by trial id, write a
temporary file, fsync, rename), so a reader never sees half a file and a trial that
finishes twice around a crash is still one row. A ledger that cannot be read is
rebuilt from the trial directories, with a warning; the ledger never raises into Tune
(an exception there would count as a trial failure and retrain the trial).

This module imports Ray only to build the Tune callback.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from loopgolf.errors import LoopgolfError, first_line
from loopgolf.orchestrator.arms import arm_of
from loopgolf.orchestrator.ledger_schema import CURVES_FILE, TRIALS_FILE, curves_schema, trials_schema, write_table
from loopgolf.orchestrator.protocol import trial_key
from loopgolf.orchestrator.trialdir import (
    METRICS_FILE,
    TRIAL_FILE,
    TRIAL_RECORD,
    TRIALS_DIR,
    final_metrics,
    progress_lines,
    read_json,
    trial_dir,
    write_json,
)

# ------------------------------------------------------- rows, from the trial directories

PROGRESS_METRICS = ("train_loss", "quick_val_bpb", "refine_fraction", "lr_scale")


def trial_row(sweep: str, code_version: str, directory: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """One trials.parquet row: identity, status, every config field, every metric."""
    config = read_json(directory / TRIAL_FILE) or {}
    flat = dict(config.get("trial_config", {}))
    row: dict[str, Any] = {**flat, **{k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}}
    for key, value in metrics.items():  # list-valued metrics the schema knows (decile statistics)
        if isinstance(value, list):
            row[key] = value
    row |= {
        "sweep": sweep,
        "trial_id": directory.name,
        "kind": config.get("kind") or "builtin",
        "status": metrics["status"],
        "error": metrics.get("error"),
        "config_id": config.get("config_id"),
        "seed": flat.get("seed", metrics.get("seed")),
        "code_version": code_version,
        "predicted_artifact_bytes": metrics.get("predicted_artifact_bytes", config.get("predicted_artifact_bytes")),
        "raised": bool(metrics.get("raised", False)),
        "arm": _arm(config, flat),
        "pair_id": config.get("pair_id"),
        "data_fingerprint": config.get("data_fingerprint"),
        "train_budget_seconds": flat.get("train_seconds"),
        "hardware": config.get("hardware"),
        "promoted_from": config.get("promoted_from"),
        "fidelity": config.get("fidelity"),
    }
    for field in trials_schema():  # a list column a trial lacks is null, not NaN (Arrow casts no float to a list)
        if pa.types.is_list(field.type) and row.get(field.name) is None:
            row[field.name] = None
    for key in ("artifact_path", "eval_tokens_path"):  # relative to the sweep directory: it may be moved
        if metrics.get(key):
            path = Path(metrics[key])  # absolute: a file in the trial's directory; relative: below it
            row[key] = f"{TRIALS_DIR}/{directory.name}/{path.name if path.is_absolute() else path.as_posix()}"
    for key in ("started_at", "ended_at"):
        row[key] = pd.Timestamp(row[key]) if row.get(key) else pd.NaT
    return row


def _arm(record: dict[str, Any], flat: dict[str, Any]) -> str | None:
    """The trial's arm; a builtin record written before arms were recorded has it in its config."""
    if record.get("arm") or (record.get("kind") or "builtin") != "builtin":
        return record.get("arm")
    return arm_of(flat) if flat else None


def curve_rows(sweep: str, directory: Path) -> list[dict[str, Any]]:
    """The learning curve; after a resume the re-run's value of a step replaces the lost run's."""
    latest: dict[tuple[int, str], dict[str, Any]] = {}
    for result in progress_lines(directory):
        if "elapsed_seconds" not in result or "step" not in result:
            continue
        for metric in PROGRESS_METRICS:
            value = result.get(metric)
            if value is None or not math.isfinite(float(value)):
                continue
            latest[(int(result["step"]), metric)] = {
                "sweep": sweep, "trial_id": directory.name, "step": int(result["step"]),
                "elapsed_seconds": float(result["elapsed_seconds"]), "train_tokens": int(result.get("train_tokens", 0)),
                "metric": metric, "value": float(value),
            }  # fmt: skip
    return [latest[k] for k in sorted(latest)]


# ------------------------------------------------------------------------- the ledger


@dataclasses.dataclass(frozen=True)
class Ledger:
    """The results tables of one sweep directory."""

    sweep_dir: Path
    sweep: str
    code_version: str

    @property
    def trials_file(self) -> Path:
        return self.sweep_dir / TRIALS_FILE

    @property
    def curves_file(self) -> Path:
        return self.sweep_dir / CURVES_FILE

    def finished_dirs(self) -> list[tuple[Path, dict[str, Any]]]:
        """Every trial directory with final metrics, in key order."""
        root = self.sweep_dir / TRIALS_DIR
        found = []
        for directory in sorted(root.iterdir()) if root.is_dir() else []:
            metrics = final_metrics(directory) if directory.is_dir() else None
            if metrics is not None:
                found.append((directory, metrics))
        return found

    def rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Trial rows and curve rows of every finished trial, from the trial directories."""
        trials, curves = [], []
        for directory, metrics in self.finished_dirs():
            trials.append(trial_row(self.sweep, self.code_version, directory, metrics))
            curves.extend(curve_rows(self.sweep, directory))
        return trials, curves

    def rebuild(self) -> int:
        """Rewrite both tables from the trial directories; returns the number of trials."""
        trials, curves = self.rows()
        write_table(pd.DataFrame(trials), self.trials_file, schema=trials_schema())
        write_table(pd.DataFrame(curves), self.curves_file, schema=curves_schema())
        return len(trials)

    def record(self, trial_id: str) -> None:
        """Upsert one finished trial; an unreadable table is rebuilt from the trial directories."""
        directory = trial_dir(self.sweep_dir, trial_id)
        metrics = final_metrics(directory)
        if metrics is None:
            raise LoopgolfError(f"{directory / METRICS_FILE}: the trial has no final metrics")
        try:
            old_trials = _read_table(self.trials_file)
            old_curves = _read_table(self.curves_file)
        except LoopgolfError as exc:
            print(f"loopgolf: warning: {exc}; rebuilding the ledger from the trial directories", file=sys.stderr)
            self.rebuild()
            return
        row = trial_row(self.sweep, self.code_version, directory, metrics)
        _upsert(old_trials, [row], trial_id, self.trials_file, trials_schema())
        _upsert(old_curves, curve_rows(self.sweep, directory), trial_id, self.curves_file, curves_schema())

    def record_failure(self, trial_id: str, config: dict[str, Any], error: str, raised: bool) -> None:
        """A trial that raised (after its retries), without final metrics of its own: the driver writes them."""
        directory = trial_dir(self.sweep_dir, trial_id)
        if read_json(directory / TRIAL_FILE) is None:
            write_json(directory / TRIAL_FILE, config)
        write_json(directory / METRICS_FILE, {"status": "failed", "error": error, "raised": raised})
        self.record(trial_id)

    def record_stopped(self, trial_id: str, config: dict[str, Any]) -> None:
        """A trial the scheduler stopped: its last quick metrics, status `stopped` (never compared)."""
        directory = trial_dir(self.sweep_dir, trial_id)
        if read_json(directory / TRIAL_FILE) is None:
            write_json(directory / TRIAL_FILE, config)
        write_json(directory / METRICS_FILE, stopped_metrics(directory))
        self.record(trial_id)


def stopped_metrics(directory: Path) -> dict[str, Any]:
    """A stopped trial's record: status `stopped` and where its curve ended (last quick bpb,
    the training seconds and steps it spent), so the compute it took is counted."""
    last = next((p for p in reversed(progress_lines(directory)) if "elapsed_seconds" in p), {})
    return {
        "status": "stopped", "error": "stopped before its final metrics (early stopping)", "raised": False,
        "quick_val_bpb": last.get("quick_val_bpb"), "train_seconds": last.get("elapsed_seconds", 0.0),
        "train_steps": last.get("step", 0), "train_tokens": last.get("train_tokens", 0),
    }  # fmt: skip


def _read_table(path: Path) -> pd.DataFrame | None:
    if not path.exists():
        return None
    try:
        return pq.read_table(path).to_pandas()
    except (OSError, pa.ArrowException) as exc:
        raise LoopgolfError(f"{path}: unreadable ({first_line(exc)})") from exc


def unreadable_ledger(sweep_dir: str | os.PathLike[str]) -> str | None:
    """Why the sweep's trials.parquet cannot be read, or None (a ledger not written yet reads)."""
    try:
        _read_table(Path(sweep_dir) / TRIALS_FILE)
    except LoopgolfError as exc:
        return str(exc)
    return None


def _upsert(old: pd.DataFrame | None, rows: list[dict[str, Any]], trial_id: str, path: Path, schema: pa.Schema) -> None:
    frames = [old[old["trial_id"] != trial_id]] if old is not None and "trial_id" in old else []
    frames = [f for f in frames if len(f)] + ([pd.DataFrame(rows)] if rows else [])
    write_table(pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(rows), path, schema=schema)


def ledger_callback(ledger: Ledger) -> Any:
    """A Tune callback that records each finished trial; it never raises into Tune."""
    from ray.tune import Callback

    class ResultsLedger(Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._record(trial, None)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._record(trial, _error_line(trial))

        def _record(self, trial: Any, error: str | None) -> None:
            trial_id = trial_key(trial)
            try:
                if error is not None:
                    ledger.record_failure(trial_id, _config_record(trial.config), error, raised=True)
                elif final_metrics(trial_dir(ledger.sweep_dir, trial_id)) is None:  # stopped early
                    ledger.record_stopped(trial_id, _config_record(trial.config))
                else:
                    ledger.record(trial_id)
            except Exception as exc:  # the trial is over; the ledger is rebuilt when the sweep ends
                print(f"loopgolf: warning: ledger: trial {trial_id}: {first_line(exc)}", file=sys.stderr)

    return ResultsLedger()


def _config_record(config: dict[str, Any]) -> dict[str, Any]:
    return {k: config[k] for k in TRIAL_RECORD if k in config}


def _error_line(trial: Any) -> str:
    path = Path(trial.error_file) if getattr(trial, "error_file", None) else None
    if path is not None and path.is_file():
        lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        if lines:
            return lines[-1][:500]
    return "the trial raised (see its error.txt)"

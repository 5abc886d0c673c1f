"""Tune callbacks in the driver: the Parquet results ledger, and MLflow runs.

The ledger (`results/trials.parquet`, `results/curves.parquet`) is rewritten whole on
every finished trial: read, upsert by trial id, write to a temporary file, rename.
That makes it idempotent, so a trial that finishes twice around a driver crash is
still one row, and atomic, so a reader never sees half a file. The callback keeps
no state of its own; after a resume it picks up from the files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune import Callback
from ray.tune.experiment import Trial

from loopgolf.analysis.results import curves_schema, trials_schema, write_table

PROGRESS_METRICS = ("train_loss", "quick_val_bpb", "refine_fraction", "lr_scale")


def _trial_status(trial: Trial, result: dict[str, Any], failed: bool) -> tuple[str, str | None]:
    if failed:
        error = None
        if trial.error_file and Path(trial.error_file).is_file():
            error = Path(trial.error_file).read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
            error = error[0] if error else None
        return "failed", error or "the trial raised (see its error.txt)"
    status = result.get("status")
    if status in ("complete", "rejected", "failed"):
        return status, result.get("error")
    return "failed", "stopped before its final metrics (early stopping)"


def trial_row(sweep: str, code_version: str, trial: Trial, result: dict[str, Any], failed: bool) -> dict[str, Any]:
    """One trials.parquet row: identity, status, every config field, every metric."""
    status, error = _trial_status(trial, result, failed)
    flat = dict(trial.config.get("trial_config", {}))
    row: dict[str, Any] = {**flat, **{k: v for k, v in result.items() if not isinstance(v, dict)}}
    row |= {
        "sweep": sweep,
        "trial_id": trial.trial_id,
        "status": status,
        "error": error,
        "config_id": trial.config.get("config_id"),
        "seed": flat.get("seed"),
        "code_version": code_version,
        "predicted_artifact_bytes": trial.config.get("predicted_artifact_bytes"),
    }
    for key in ("started_at", "ended_at"):
        row[key] = pd.Timestamp(row[key]) if row.get(key) else pd.NaT
    return row


def _result_lines(trial: Trial) -> list[dict[str, Any]]:
    """Every result the trial reported, from Tune's result.json (it survives driver restarts)."""
    path = Path(trial.local_path or "") / "result.json"
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            lines.append(json.loads(line))
    return lines


def curve_rows(sweep: str, trial: Trial) -> list[dict[str, Any]]:
    rows = []
    seen: set[tuple[int, str]] = set()
    for result in _result_lines(trial):
        if "elapsed_seconds" not in result or "step" not in result:
            continue
        for metric in PROGRESS_METRICS:
            value = result.get(metric)
            key = (int(result["step"]), metric)
            if value is None or key in seen or not math.isfinite(float(value)):
                continue
            seen.add(key)
            rows.append({
                "sweep": sweep, "trial_id": trial.trial_id, "step": int(result["step"]),
                "elapsed_seconds": float(result["elapsed_seconds"]), "train_tokens": int(result.get("train_tokens", 0)),
                "metric": metric, "value": float(value),
            })  # fmt: skip
    return rows


def upsert(path: Path, rows: list[dict[str, Any]], trial_id: str, schema: Any) -> None:
    """Replace this trial's rows in a Parquet file, atomically."""
    frames = []
    if path.is_file():
        existing = pd.read_parquet(path)
        frames.append(existing[existing["trial_id"] != trial_id])
    if rows:
        frames.append(pd.DataFrame(rows))
    frames = [f for f in frames if len(f)]
    merged = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(rows)
    write_table(merged, path, schema=schema)


class ResultsLedger(Callback):
    """Writes results/trials.parquet and results/curves.parquet as trials finish."""

    def __init__(self, sweep_dir: str, sweep: str, code_version: str) -> None:
        self.results_dir = Path(sweep_dir) / "results"
        self.sweep = sweep
        self.code_version = code_version

    def _record(self, trial: Trial, result: dict[str, Any], failed: bool) -> None:
        self.results_dir.mkdir(parents=True, exist_ok=True)
        row = trial_row(self.sweep, self.code_version, trial, result, failed)
        upsert(self.results_dir / "trials.parquet", [row], trial.trial_id, trials_schema())
        upsert(self.results_dir / "curves.parquet", curve_rows(self.sweep, trial), trial.trial_id, curves_schema())

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._record(trial, trial.last_result or {}, failed=False)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._record(trial, trial.last_result or {}, failed=True)


class MlflowTrials(MLflowLoggerCallback):
    """Ray's MLflow callback, with one run per trial even across resumes.

    Ray's callback keys runs by the in-memory Trial object, so a resumed trial opens a
    second run and leaves the first RUNNING. Here the run is found again by its
    `trial_id` tag. Params are the flat trial config; the artifact is the model file.
    """

    def log_trial_start(self, trial: Trial) -> None:
        if trial not in self._trial_runs:
            mlflow = self.mlflow_util._mlflow
            found = mlflow.search_runs(
                experiment_ids=[self.mlflow_util.experiment_id],
                filter_string=f"tags.trial_id = '{trial.trial_id}'",
                output_format="list",
            )
            if found:
                self._trial_runs[trial] = found[0].info.run_id
            else:
                tags = {**self.tags, "trial_id": trial.trial_id, "trial_name": str(trial)}
                self._trial_runs[trial] = self.mlflow_util.start_run(tags=tags, run_name=str(trial)).info.run_id
                params = dict(trial.config.get("trial_config", {}))
                params["config_id"] = trial.config.get("config_id")
                self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=params)

    def log_trial_result(self, iteration: int, trial: Trial, result: dict[str, Any]) -> None:
        numeric = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        step = int(result.get("step") or result.get("training_iteration") or 0)
        self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=numeric, step=step)

    def log_trial_end(self, trial: Trial, failed: bool = False) -> None:
        if trial not in self._trial_runs:  # failed before it ever started: give it a run all the same
            self.log_trial_start(trial)
        run_id = self._trial_runs[trial]
        artifact = (trial.last_result or {}).get("artifact_path")
        if artifact and Path(artifact).is_file():
            self.mlflow_util._mlflow.tracking.MlflowClient().log_artifact(run_id, artifact)
        self.mlflow_util.end_run(run_id=run_id, status="FAILED" if failed else "FINISHED")


class ProgressPrinter(Callback):
    """One line per finished trial: counts so far and the best value of the first objective."""

    def __init__(self, total: int, metric: str, mode: str) -> None:
        self.total, self.metric, self.mode = total, metric, mode

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._print(trials, trial)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._print(trials, trial)

    def _print(self, trials: list[Trial], trial: Trial) -> None:
        # Tune calls this before it marks `trial` terminated: count it as done here.
        done = [t for t in trials if t.status in (Trial.TERMINATED, Trial.ERROR) or t is trial]
        running = sum(t.status == Trial.RUNNING and t is not trial for t in trials)
        failed = sum(t.status == Trial.ERROR or (t.last_result or {}).get("status") == "failed" for t in done)
        values = [
            (t.last_result[self.metric], t.trial_id)
            for t in done
            if (t.last_result or {}).get("status") == "complete" and t.last_result.get("feasible")
            and self.metric in t.last_result
        ]
        best = (min if self.mode == "min" else max)(values) if values else None
        result = trial.last_result or {}
        this = f"{self.metric}={result[self.metric]:.4f}" if self.metric in result else result.get("status", "error")
        print(
            f"[{len(done)}/{self.total} done, {running} running, {failed} failed] trial {trial.trial_id}: {this}"
            + (f"; best {self.metric} {best[0]:.4f} ({best[1]})" if best else ""),
            flush=True,
        )

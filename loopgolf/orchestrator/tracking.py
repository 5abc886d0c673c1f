"""MLflow runs of a sweep, and the progress lines a sweep prints; both Tune callbacks.

Built on MLflow's public client (`MlflowClient`) and Tune's public `Callback`: one run
per trial, named and tagged by the trial's key, so a trial re-run after a resume
continues its run instead of opening a second one. Params are the flat trial config;
metrics every numeric value of every report, by step. With the embedded store
(`sqlite:///<sweep>/mlflow.db`) the artifact is not copied into MLflow (it is already
in the sweep directory; the run's `artifact_path` tag names it relative to the sweep,
so the directory stays relocatable); with a tracking server it is uploaded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from ray.tune import Callback

from loopgolf.orchestrator.progress import count_sweep, counts_line
from loopgolf.orchestrator.protocol import trial_key
from loopgolf.orchestrator.trialdir import TRIALS_DIR, final_metrics, trial_dir


class MlflowTracking(Callback):
    def __init__(self, tracking_uri: str, experiment: str, tags: dict[str, str], sweep_dir: str, upload: bool) -> None:
        self.tracking_uri, self.experiment, self.tags = tracking_uri, experiment, dict(tags)
        self.sweep_dir, self.upload = sweep_dir, upload
        self.runs: dict[str, str] = {}  # trial key -> MLflow run id
        self.client: Any = None
        self.experiment_id = ""

    def setup(self, **info: Any) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        found = self.client.get_experiment_by_name(self.experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)

    def _run(self, trial: Any) -> str:
        from mlflow.entities import Param

        key = trial_key(trial)
        if key in self.runs:
            return self.runs[key]
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.trial_id = '{key}'", max_results=1
        )  # fmt: skip
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, tags=self.tags | {"trial_id": key}, run_name=key)
            run_id = run.info.run_id
            params = dict(trial.config.get("trial_config", {})) | {"config_id": trial.config.get("config_id")}
            self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        self.runs[key] = run_id
        return run_id

    def _log(self, trial: Any, result: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step = int(result.get("step") or result.get("training_iteration") or 0)
        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), now, step)
            for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        ]
        if metrics:
            self.client.log_batch(self._run(trial), metrics=metrics)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._run(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any) -> None:
        self._log(trial, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FAILED")

    def _end(self, trial: Any, status: str) -> None:
        run_id = self._run(trial)
        directory = trial_dir(self.sweep_dir, trial_key(trial))
        metrics = final_metrics(directory) or {}
        artifact = metrics.get("artifact_path")
        if artifact:
            name = directory / str(artifact).rsplit("/", 1)[-1]
            self.client.set_tag(run_id, "artifact_path", f"{TRIALS_DIR}/{directory.name}/{name.name}")
            if self.upload and name.is_file():
                self.client.log_artifact(run_id, str(name))
        self.client.set_terminated(run_id, status=status)


def trial_outcome(result: dict[str, Any], metric: str, errored: bool) -> str:
    """How a trial ended, in a few words: its metric, or why it has none."""
    value = result.get(metric)
    if errored:
        return "error"
    if value is not None:
        return f"{metric}={float(value):.4f}"
    if result.get("status"):  # rejected (over the cap, never trained) or failed (diverged)
        return str(result["status"])
    # the scheduler stopped it: its last result is a progress report, with no status
    elapsed = result.get("elapsed_seconds")
    return "stopped early" + (f" at {float(elapsed):.0f} s" if elapsed is not None else "")


class ProgressPrinter(Callback):
    """One line per trial event (start, end, error): the sweep's counts and ETA, counted from the
    trial directories exactly as `loopgolf status` counts them, then the trial and the best value
    of the first objective so far (over the whole sweep, a resumed one's earlier trials too)."""

    def __init__(
        self, sweep_dir: str, total: int | Callable[[], int], max_concurrent: int, metric: str, mode: str
    ) -> None:
        self.sweep_dir, self.total, self.max_concurrent = sweep_dir, total, max_concurrent
        self.metric, self.mode = metric, mode

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(f"trial {trial_key(trial)} started")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, errored=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, errored=True)

    def _ended(self, trial: Any, errored: bool) -> None:
        result = {} if errored else dict(trial.last_result or {})
        self._line(f"trial {trial_key(trial)}: {trial_outcome(result, self.metric, errored)}", best=True)

    def _line(self, event: str, best: bool = False) -> None:
        # the trial's own files are written before Tune reports the event (the ledger callback,
        # earlier in the list, records an error), so the counts include this trial
        total = self.total() if callable(self.total) else self.total  # a sweep with arms learns its total
        c = count_sweep(self.sweep_dir, "", total, self.max_concurrent, (self.metric, self.mode))
        if best and c.best:
            event += f"; best {self.metric} {c.best[2]:.4f} ({c.best[0]})"
        print(counts_line(c.done, len(c.running), c.queued, c.failed, c.total, c.eta_seconds) + " " + event, flush=True)

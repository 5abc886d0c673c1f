"""Run, resume and inspect a sweep: Ray Tune's Tuner with SweepSearch (Optuna).

The sweep directory `<storage>/<name>/` holds everything about one sweep:

    spec.yaml             the resolved spec (what `resume` rebuilds the Tuner from)
    optuna.db             the Optuna study (sqlite; `optuna-dashboard sqlite:///...optuna.db`)
    mlflow.db             MLflow's tracking store, unless the spec names a server
    results/              trials.parquet, curves.parquet (the ledger), report.md and plots
    tuner.pkl, experiment_state-*.json, searcher-state-*.pkl, <trial dirs>   (Ray Tune's)
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

import loopgolf
from loopgolf.atomic import atomic_write_text
from loopgolf.errors import LoopgolfError
from loopgolf.orchestrator.spec import SweepSpec, spec_from_dict

SPEC_FILE = "spec.yaml"
# Save Tune's experiment state (and the searcher) at most this often, in seconds: the
# default (>= 10 s) makes in-flight trials restart from scratch after a driver crash.
EXPERIMENT_CHECKPOINT_SECONDS = "2"
# What the Tune trial of a data-parallel trial (workers > 1) reserves for itself: it only drives Ray Train.
DRIVER_MEMORY_BYTES = 64 * 2**20


class SweepError(LoopgolfError):
    """A sweep directory is missing, or not in the state the command needs."""


@dataclasses.dataclass(frozen=True)
class SweepOutcome:
    sweep_dir: Path
    trials: int
    errors: int


def code_version() -> str:
    """Package version plus the git commit of the source tree, when it is a checkout."""
    root = Path(loopgolf.__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{loopgolf.__version__}+{sha}" if sha else loopgolf.__version__


def _tracking_uri(spec: SweepSpec, sweep_dir: Path) -> str:
    return spec.tracking_uri or f"sqlite:///{sweep_dir / 'mlflow.db'}"


def _build(spec: SweepSpec, sweep_dir: Path) -> dict[str, Any]:
    """The pieces of the Tuner, rebuilt the same way for a new sweep and for a resume."""
    from ray import tune

    from loopgolf.orchestrator.callbacks import MlflowTrials, ProgressPrinter, ResultsLedger
    from loopgolf.orchestrator.search import SweepSearch, make_sampler
    from loopgolf.orchestrator.trainable import train_trial
    from loopgolf.search_spaces.spaces import ConfigSampler, apply_overrides, grid_values, named_space

    space = apply_overrides(named_space(spec.space), spec.overrides)
    total = spec.num_samples * spec.seeds
    search = SweepSearch(
        ConfigSampler(space, spec.base_config(), spec.equal_bytes, spec.artifact_bytes),
        spec.objectives,
        seeds=spec.seeds,
        total_trials=total,
        storage_url=f"sqlite:///{sweep_dir / 'optuna.db'}",
        study_name=spec.name,
        sampler=make_sampler(spec.algorithm, spec.search_seed, grid_values(space) if spec.algorithm == "grid" else {}),
    )
    scheduler = None
    if spec.early_stopping == "asha":
        scheduler = tune.schedulers.ASHAScheduler(
            metric="quick_val_bpb", mode="min", time_attr="elapsed_seconds",
            max_t=spec.train_seconds, grace_period=max(1.0, spec.train_seconds / 4),
        )  # fmt: skip
    if spec.workers == 1:
        trainable = tune.with_resources(
            tune.with_parameters(train_trial, data_dir=str(spec.data), cpus=spec.cpu, sweep_dir=str(sweep_dir)),
            {"cpu": spec.cpu, "gpu": spec.gpu},
        )
    else:  # the Tune trial only drives a TorchTrainer, whose workers hold the CPUs and GPUs (trainable.py)
        trainable = tune.with_resources(
            tune.with_parameters(
                train_trial, data_dir=str(spec.data), cpus=spec.cpu, gpus=spec.gpu, workers=spec.workers,
                sweep_dir=str(sweep_dir),
            ),
            # Tune needs a trial to ask for something; a little memory (a logical resource) rather
            # than a CPU, so that a node's CPUs all go to the workers (cpu: 8 x 2 workers on 16 cores).
            {"cpu": 0, "gpu": 0, "memory": DRIVER_MEMORY_BYTES},
        )
    callbacks = [
        ResultsLedger(str(sweep_dir), spec.name, code_version()),
        MlflowTrials(tracking_uri=_tracking_uri(spec, sweep_dir), experiment_name=spec.name, tags={"sweep": spec.name}),
        ProgressPrinter(total, next(iter(spec.objectives)), next(iter(spec.objectives.values()))),
    ]
    return {
        "trainable": trainable,
        "tune_config": tune.TuneConfig(
            search_alg=search, scheduler=scheduler, num_samples=total,
            max_concurrent_trials=spec.max_concurrent,
            # A data-parallel trial's actor owns its Ray Train run (controller, workers): never hand
            # it to the next trial, so a stopped trial (ASHA) takes its run down with it.
            reuse_actors=spec.workers == 1,
        ),
        "run_config": tune.RunConfig(
            name=spec.name,
            storage_path=str(sweep_dir.parent),
            failure_config=tune.FailureConfig(max_failures=2),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            verbose=0,
        ),
    }


def _init_ray(address: str | None, spec: SweepSpec) -> None:
    import ray

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", EXPERIMENT_CHECKPOINT_SECONDS)
    # Objectives (val_bpb from the artifact, ...) exist only in a trial's final report;
    # progress reports carry quick_val_bpb. Tune's check would reject those reports.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Frequent experiment snapshots are what we want (fresh resume state); don't warn.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if ray.is_initialized():
        return
    if address:
        # A cluster started with `ray start` uses token auth when ~/.ray/auth_token exists (the
        # Ray 2.60 default), but ray.init(address=<explicit address>) does not turn it on, as
        # it does for a local start or "auto": the connect hangs ~20 s, then fails with
        # InvalidAuthToken. So do what Ray does for "auto": with RAY_AUTH_MODE unset and a
        # token available (~/.ray/auth_token, RAY_AUTH_TOKEN[_PATH]), set RAY_AUTH_MODE=token
        # and reload Ray's cached config (setting the variable alone is too late once ray is
        # imported). As with "auto", a driver for a cluster started without auth then needs
        # RAY_AUTH_MODE=disabled: its trials' workers could not call back a token-mode driver.
        try:
            from ray._private.authentication.authentication_token_setup import (
                maybe_enable_token_auth_if_token_available,
            )
        except ImportError:  # a Ray without token auth
            pass
        else:
            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        ray.init(address=address, log_to_driver=False)
    else:  # a local Ray; its dashboard (if installed) listens on 127.0.0.1 only
        ray.init(include_dashboard=False, dashboard_host="127.0.0.1", log_to_driver=False)


def _finish(sweep_dir: Path, results: Any) -> SweepOutcome:
    return SweepOutcome(sweep_dir, trials=len(results), errors=len(results.errors))


def _write_eval_stream(spec: SweepSpec, sweep_dir: Path) -> None:
    """results/eval_stream.parquet, once: which document and position every scored token is
    (every trial scores the same tokens in the same windows; trial/eval_tokens.py)."""
    from loopgolf.trial.eval_tokens import write_stream

    base = spec.base_config()
    write_stream(sweep_dir / "results", spec.data, base.train.eval_tokens, base.model.seq_len)


def run_sweep(spec: SweepSpec, address: str | None = None) -> SweepOutcome:
    """Start a new sweep; fails if the sweep directory already holds one."""
    from ray import tune

    if not spec.is_local:
        raise SweepError(f"storage={spec.storage!r}: only local paths are supported by this version")
    sweep_dir = Path(spec.sweep_dir).resolve()
    if (sweep_dir / SPEC_FILE).exists():
        raise SweepError(f"sweep {str(sweep_dir)!r} already exists: continue it with `loopgolf resume {sweep_dir}`")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sweep_dir / SPEC_FILE, yaml.safe_dump(spec.to_yaml_dict(), sort_keys=False))
    _write_eval_stream(spec, sweep_dir)
    _init_ray(address, spec)
    pieces = _build(spec, sweep_dir)
    tuner = tune.Tuner(pieces["trainable"], tune_config=pieces["tune_config"], run_config=pieces["run_config"])
    return _finish(sweep_dir, tuner.fit())


def read_sweep_spec(sweep_dir: str | os.PathLike[str]) -> SweepSpec:
    path = Path(sweep_dir) / SPEC_FILE
    if not path.is_file():
        raise SweepError(f"{str(sweep_dir)!r} is not a sweep directory (no {SPEC_FILE})")
    return spec_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")))


def resume_sweep(sweep_dir: str | os.PathLike[str], address: str | None = None) -> SweepOutcome:
    """Continue an interrupted sweep: finished trials kept, in-flight ones from checkpoints."""
    from ray import tune

    sweep_dir = Path(sweep_dir).resolve()
    spec = read_sweep_spec(sweep_dir)
    if not (sweep_dir / "tuner.pkl").is_file():
        raise SweepError(f"{str(sweep_dir)!r} has no Tune state (tuner.pkl) yet: start it again with `loopgolf sweep`")
    _write_eval_stream(spec, sweep_dir)  # kept if there: a sweep killed before writing it gets it now
    _init_ray(address, spec)
    pieces = _build(spec, sweep_dir)
    tuner = tune.Tuner.restore(
        str(sweep_dir), trainable=pieces["trainable"], resume_unfinished=True, resume_errored=True,
    )  # fmt: skip
    return _finish(sweep_dir, tuner.fit())


def sweep_status(sweep_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Progress from the ledger and the study, without Ray."""
    import optuna
    import pandas as pd

    sweep_dir = Path(sweep_dir).resolve()
    spec = read_sweep_spec(sweep_dir)
    total = spec.num_samples * spec.seeds
    trials_file = sweep_dir / "results" / "trials.parquet"
    rows = pd.read_parquet(trials_file) if trials_file.is_file() else pd.DataFrame(columns=["status"])
    by_status = rows["status"].value_counts().to_dict() if len(rows) else {}
    study_states: dict[str, int] = {}
    if (sweep_dir / "optuna.db").is_file():
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=spec.name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
        for trial in study.get_trials(deepcopy=False):
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
    }


def print_status(status: dict[str, Any], out: Any = sys.stdout) -> None:
    counts = ", ".join(f"{v} {k}" for k, v in sorted(status["by_status"].items())) or "none yet"
    print(f"sweep {status['sweep']}: {status['finished']}/{status['total']} trials finished ({counts})", file=out)
    if status["study"]:
        print("optuna study: " + ", ".join(f"{v} {k.lower()}" for k, v in sorted(status["study"].items())), file=out)
    if status["best"]:
        (metric, value), = ((k, v) for k, v in status["best"].items() if k != "trial_id")
        print(f"best {metric}: {value:.4f} (trial {status['best']['trial_id']})", file=out)

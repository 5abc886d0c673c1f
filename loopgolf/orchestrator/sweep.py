"""Run, resume and inspect a sweep: Ray Tune's Tuner with SweepSearch (an Optuna study).

The sweep directory `<storage>/<name>/` is the whole state of one sweep:

    spec.yaml             the resolved spec (what `resume` rebuilds the Tuner from)
    driver.lock           the driver that holds the sweep (lock.py); absent when none does
    optuna.db             the Optuna study (sqlite; `optuna-dashboard sqlite:///...optuna.db`)
    mlflow.db             MLflow's tracking store, unless the spec names a server
    trials/<trial_id>/    each trial: trial.json, progress.jsonl, checkpoints/, artifact, metrics.json
    results/              trials.parquet, curves.parquet (the ledger), eval_stream.parquet
    report/               report.md with its PNG plots, and report.html (`loopgolf report`'s default)
    tune/<session>/       Ray Tune's own files of each driver session; never read again

Resume builds a fresh Tuner whose searcher continues the study (trials a dead driver
left running are re-queued with their config, seed and directory, and continue from
their newest checkpoint); it never loads Tune's pickles, and it finds everything
relative to where the directory is now, so a sweep directory can be copied or moved
and resumed there. Nothing resume reads can execute code: YAML (safe loader), sqlite,
JSON, Parquet and tensors-only checkpoints.

Ray, and the modules that import it at their top (search, scheduler, tracking, trainable),
are imported inside the functions that run after `_ray_environment` has set what Ray reads
when it is first imported.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml

import loopgolf
from loopgolf.atomic import atomic_write_text
from loopgolf.orchestrator.extend import extended_raw, with_history
from loopgolf.orchestrator.ledger import Ledger, ledger_callback
from loopgolf.orchestrator.ledger_schema import RESULTS_DIR
from loopgolf.orchestrator.lock import sweep_lock
from loopgolf.orchestrator.progress import count_sweep
from loopgolf.orchestrator.script import ScriptSampler
from loopgolf.orchestrator.script_trainable import script_trial
from loopgolf.orchestrator.spec import SweepSpec
from loopgolf.orchestrator.study import KEY, study_storage
from loopgolf.orchestrator.sweepdir import (
    SPEC_FILE,
    STUDY_FILE,
    SweepError,
    planned_trials_of,
    read_sweep_raw,
    read_sweep_spec,
)
from loopgolf.search_spaces.spaces import ConfigSampler, grid_values
from loopgolf.trial.eval_tokens import write_stream

TUNE_DIR = "tune"
# What the Tune trial of a data-parallel trial (workers > 1) reserves for itself: it only drives Ray Train.
DRIVER_MEMORY_BYTES = 64 * 2**20
# Exit statuses of `sweep` / `resume` (docs: README and the CLI's help).
EXIT_OK, EXIT_TRIALS_RAISED, EXIT_SEARCHER_FAILED = 0, 1, 3


@dataclasses.dataclass(frozen=True)
class SweepOutcome:
    """How a sweep (or a resume of one) ended, counted from the trial directories and the study."""

    sweep_dir: Path
    total: int  # trials the spec asks for
    finished: int  # trials with final metrics
    raised: int  # trials that raised an exception (errors; a diverged trial is an outcome, not one)
    unfinished: int  # trials the study still holds running or queued
    searcher_error: str | None = None

    @property
    def exit_status(self) -> int:
        if self.searcher_error is not None:
            return EXIT_SEARCHER_FAILED
        return EXIT_TRIALS_RAISED if self.raised else EXIT_OK

    def last_line(self) -> str:
        line = f"{self.finished}/{self.total} trials finished, {self.raised} raised an error"
        if self.searcher_error is not None:
            return f"{line}; the searcher failed ({self.searcher_error}): `loopgolf resume {self.sweep_dir}` continues"
        if self.unfinished:
            line += f"; {self.unfinished} not run"
        return line + (f" (exit {self.exit_status})" if self.exit_status else "")


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


def make_search(spec: SweepSpec, sweep_dir: Path) -> Any:
    from loopgolf.orchestrator.search import SweepSearch, make_sampler

    space = spec.search_space()
    if spec.trial is not None:
        sample: Any = ScriptSampler(space, spec.script_budget())
    else:
        sample = ConfigSampler(space, spec.base_config(), spec.equal_bytes, spec.artifact_bytes)
    return SweepSearch(
        sample,
        spec.objectives,
        seeds=spec.seeds,
        num_samples=spec.num_samples,
        storage=study_storage(sweep_dir),
        study_name=spec.name,
        sampler=make_sampler(spec.algorithm, spec.search_seed, grid_values(space) if spec.algorithm == "grid" else {}),
        space=space,
        controls=spec.control_arms(),
        promoted=(spec.promotion or {}).get("configs", ()),
        fidelity=json.dumps(spec.promotion["fidelity"], sort_keys=True) if spec.promotion else None,
    )


def _trainable(spec: SweepSpec, sweep_dir: Path) -> Any:
    from ray import tune

    if spec.trial is not None:  # the user's script, in a process group of its own (script_trainable.py)

        return tune.with_resources(
            tune.with_parameters(script_trial, trial=spec.trial, data_dir=str(spec.data), cpus=spec.cpu,
                                 gpus=spec.gpu, sweep_dir=str(sweep_dir)),
            {"cpu": spec.cpu, "gpu": spec.gpu},
        )  # fmt: skip
    from loopgolf.orchestrator.trainable import train_trial

    if spec.workers == 1:
        return tune.with_resources(
            tune.with_parameters(train_trial, data_dir=str(spec.data), cpus=spec.cpu, sweep_dir=str(sweep_dir)),
            {"cpu": spec.cpu, "gpu": spec.gpu},
        )
    # The Tune trial only drives a TorchTrainer, whose workers hold the CPUs and GPUs (trainable.py).
    # Tune needs a trial to ask for something; a little memory (a logical resource) rather than a
    # CPU, so that a node's CPUs all go to the workers (cpu: 8 x 2 workers on 16 cores).
    return tune.with_resources(
        tune.with_parameters(
            train_trial, data_dir=str(spec.data), cpus=spec.cpu, gpus=spec.gpu, workers=spec.workers,
            sweep_dir=str(sweep_dir),
        ),
        {"cpu": 0, "gpu": 0, "memory": DRIVER_MEMORY_BYTES},
    )  # fmt: skip


def _scheduler(spec: SweepSpec, sweep_dir: Path) -> Any:
    """The early-stopping scheduler; Pareto-aware halving rebuilds its rungs from the trial directories."""
    from ray import tune

    if spec.early_stopping == "asha":
        return tune.schedulers.ASHAScheduler(
            metric="quick_val_bpb", mode="min", time_attr="elapsed_seconds",
            max_t=spec.train_seconds, grace_period=max(1.0, spec.train_seconds / 4),
        )  # fmt: skip
    if spec.early_stopping == "pareto_halving":
        from loopgolf.orchestrator.scheduler import ParetoHalving

        return ParetoHalving(sweep_dir, list(spec.objectives), spec.halving_rungs(), spec.halving_eta)
    return None


def _tuner(spec: SweepSpec, sweep_dir: Path, search: Any, ledger: Any) -> Any:
    """A fresh Tuner, the same for a new sweep and a resume; its files go to tune/<session>/."""
    from ray import tune

    from loopgolf.orchestrator.tracking import MlflowTracking, ProgressPrinter

    scheduler = _scheduler(spec, sweep_dir)
    (metric, mode), = list(spec.objectives.items())[:1]
    callbacks = [
        ledger_callback(ledger),
        MlflowTracking(_tracking_uri(spec, sweep_dir), spec.name, {"sweep": spec.name}, str(sweep_dir),
                       upload=spec.tracking_uri is not None),
        ProgressPrinter(str(sweep_dir), planned_trials_of(sweep_dir, spec), spec.max_concurrent,
                        metric, mode),
    ]  # fmt: skip
    session = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    return tune.Tuner(
        _trainable(spec, sweep_dir),
        tune_config=tune.TuneConfig(
            search_alg=search, scheduler=scheduler, num_samples=search.max_trials,
            max_concurrent_trials=spec.max_concurrent,
            # A data-parallel trial's actor owns its Ray Train run (controller, workers): never hand
            # it to the next trial, so a stopped trial (ASHA) takes its run down with it.
            # A script trial's worker is its watchdog's parent: a stopped trial's worker goes, and the
            # script's processes with it (supervise.py), rather than serving the next trial.
            reuse_actors=spec.workers == 1 and spec.trial is None,
        ),
        run_config=tune.RunConfig(
            name=session,
            storage_path=str(sweep_dir / TUNE_DIR),
            failure_config=tune.FailureConfig(max_failures=2),  # a retry continues from the trial's checkpoints
            callbacks=callbacks,
            verbose=0,
        ),
    )  # fmt: skip


def _ray_environment(address: str | None) -> None:
    """Environment Ray reads when it is imported: set before the first `import ray`."""
    # Objectives (val_bpb from the artifact, ...) exist only in a trial's final report;
    # progress reports carry quick_val_bpb. Tune's check would reject those reports.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if address is None and not os.environ.get("RAY_ADDRESS"):
        # A local Ray on this machine only: every Ray process binds its servers to the node
        # IP, and with this (Ray's switch for single-machine use) the node IP is 127.0.0.1.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    elif "RAY_AUTH_MODE" not in os.environ and _token_file() is not None:
        # A cluster started with `ray start` uses token auth when ~/.ray/auth_token exists (the
        # Ray 2.60 default), but ray.init(address=<explicit address>) does not turn it on as it
        # does for a local start or "auto": the connect hangs ~20 s, then fails with
        # InvalidAuthToken. So do what Ray does for "auto". A driver for a cluster started
        # without auth then needs RAY_AUTH_MODE=disabled.
        os.environ["RAY_AUTH_MODE"] = "token"


def _token_file() -> Path | None:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path if path.is_file() else None


def _tighten_token_file() -> None:
    """Ray's auth token is a credential: readable by its owner only."""
    path = _token_file()
    if path is not None and path.stat().st_uid == os.getuid() and stat.S_IMODE(path.stat().st_mode) != 0o600:
        os.chmod(path, 0o600)


def _init_ray(address: str | None) -> None:
    _ray_environment(address)
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:  # a local Ray; its dashboard (if installed) listens on 127.0.0.1 only
        ray.init(include_dashboard=False, dashboard_host="127.0.0.1", log_to_driver=False)
    _tighten_token_file()


def _drive(spec: SweepSpec, sweep_dir: Path, address: str | None) -> SweepOutcome:
    """Run the Tuner until the study is done; then the ledger is rebuilt from the trial directories."""

    _init_ray(address)
    search = make_search(spec, sweep_dir)
    if search.requeued:
        print(f"loopgolf: {search.requeued} trial(s) left running by the last driver will run again, "
              "from their newest checkpoint", file=sys.stderr)  # fmt: skip
    if search.completed:
        print(f"loopgolf: {search.completed} replicate or arm trial(s) the last driver had not queued are queued",
              file=sys.stderr)  # fmt: skip
    ledger = Ledger(sweep_dir, spec.name, code_version())
    _tuner(spec, sweep_dir, search, ledger).fit()
    return finish_sweep(spec, sweep_dir, ledger, search.error)


def finish_sweep(spec: SweepSpec, sweep_dir: Path, ledger: Ledger, searcher_error: str | None) -> SweepOutcome:
    """Rebuild the ledger from the truth (whatever happened to it meanwhile), then count how the sweep ended."""
    ledger.rebuild()
    planned = planned_trials_of(sweep_dir, spec)
    counts = count_sweep(sweep_dir, spec.name, planned(), spec.max_concurrent)
    open_states = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    study = planned.study
    open_trials = study.get_trials(deepcopy=False, states=open_states) if study is not None else []
    return SweepOutcome(
        sweep_dir=sweep_dir,
        total=counts.total,
        finished=counts.finished,
        raised=counts.raised,
        unfinished=len({t.user_attrs.get(KEY, t.number) for t in open_trials}),
        searcher_error=searcher_error,
    )


def check_storage(storage: str) -> None:
    path = Path(storage)
    if path.exists() and not path.is_dir():
        raise SweepError(f"storage={storage!r}: is a file; expected a directory for sweeps")


def _write_eval_stream(spec: SweepSpec, sweep_dir: Path) -> None:
    """results/eval_stream.parquet, once: which document and position every scored token is
    (every trial scores the same tokens in the same windows; trial/eval_tokens.py)."""

    if spec.trial is not None:  # a script evaluates on its own; it writes no per-token files
        return
    base = spec.base_config()
    write_stream(sweep_dir / RESULTS_DIR, spec.data, base.train.eval_tokens, base.model.seq_len)


def run_sweep(spec: SweepSpec, address: str | None = None) -> SweepOutcome:
    """Start a new sweep; fails if the sweep directory already holds one, or another driver holds it."""
    if not spec.is_local:
        raise SweepError(f"storage={spec.storage!r}: only local paths are supported by this version")
    check_storage(spec.storage)
    sweep_dir = Path(spec.sweep_dir).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with sweep_lock(sweep_dir):
        if (sweep_dir / SPEC_FILE).exists():
            raise SweepError(f"sweep {str(sweep_dir)!r} already exists: continue it with `loopgolf resume {sweep_dir}`")
        atomic_write_text(sweep_dir / SPEC_FILE, yaml.safe_dump(spec.to_yaml_dict(), sort_keys=False))
        _write_eval_stream(spec, sweep_dir)
        return _drive(spec, sweep_dir, address)


def resume_sweep(
    sweep_dir: str | os.PathLike[str], address: str | None = None, sets: Sequence[str] = ()
) -> SweepOutcome:
    """Continue an interrupted sweep where its directory is now: finished trials kept, the
    ones a dead driver left running re-run from their newest checkpoint. `sets` extend it
    (more samples, a narrower space: extend.py), recorded in spec.yaml's history."""

    sweep_dir = Path(sweep_dir).resolve()
    read_sweep_spec(sweep_dir)  # a clear error before taking the lock of a directory that is no sweep
    if sets:
        extended_raw(read_sweep_raw(sweep_dir), sets)  # a refused change fails before the lock is taken
    with sweep_lock(sweep_dir):
        if not (sweep_dir / STUDY_FILE).is_file():
            raise SweepError(f"{str(sweep_dir)!r} has no study (optuna.db) yet: start it again with `loopgolf sweep`")
        if sets:
            stored = read_sweep_raw(sweep_dir)
            new = with_history(extended_raw(stored, sets), stored, sets, code_version())
            atomic_write_text(sweep_dir / SPEC_FILE, yaml.safe_dump(new, sort_keys=False))
        spec = read_sweep_spec(sweep_dir)
        _write_eval_stream(spec, sweep_dir)  # kept if there: a sweep killed before writing it gets it now
        return _drive(spec, sweep_dir, address)

"""The Ray Tune trainable: `run_trial` inside a Tune worker, with checkpoints and resume.

Everything a trial writes lives in its own directory, `<sweep>/trials/<trial_key>/`
(the key comes from the searcher and survives re-runs): `trial.json` (its config),
`progress.jsonl` (every progress report, the learning curve), `checkpoints/step_<N>/`
(a resumable training state — model, optimizers, step = data position, elapsed
training seconds, RNG — every checkpoint interval, written to a staging directory and
renamed, so each one there is complete), the artifact and `metrics.json`. A trial that
starts again (a Tune retry, or `loopgolf resume` after the driver died) continues from
the newest checkpoint in its directory, whatever Tune registered, with the remaining
budget, so it still trains for `train_seconds` in total; one that had already written
its final metrics reports them without training again.

A trial with `workers > 1` is data parallel, run by Ray Train inside the Tune trial,
the way Ray Train V2 (the default since Ray 2.50) supports it: the Tune function is a
light driver (it holds no CPU or GPU) that calls `TorchTrainer(...).fit()`; Ray Train
starts the workers with their own resources (`ScalingConfig`), sets up the gloo
(CPU) or nccl (CUDA) process group, and every worker runs `run_trial(...,
parallel=DataParallel)` on its slice of the global batch. (Passing a Trainer to the
Tuner, `Tuner(trainer)`, is the V1 API, deprecated, and refuses V2 trainers.)

- Progress: every worker calls `ray.train.report` at the same steps (they agree on the
  clock); `ProgressToTune` forwards rank 0's progress to the Tune trial.
- Checkpoints: rank 0's resumable state is a Ray Train checkpoint in the trial's
  directory (`<trial>/train/`, the two latest kept). When Tune restarts the trial (a
  failure, or `loopgolf resume` after the driver died), the driver starts a
  TorchTrainer with the same storage path and name, Ray Train restores its run from
  there, and every worker resumes from the latest state with the remaining budget,
  exactly as a single-process trial does from its own checkpoints.
- Final metrics: rank 0 reports them with a small checkpoint (`final.json`) so that
  they are the run's result; the driver adds the trial's identity and reports them to
  Tune. A restarted driver whose run had already finished finds `final.json` and
  reports the same metrics without training again.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from loopgolf.atomic import atomic_directory
from loopgolf.errors import LoopgolfError, first_line
from loopgolf.jsonio import json_default, short_digest
from loopgolf.orchestrator.trialdir import (
    TRIAL_RECORD,
    append_progress,
    finish,
    hardware,
    read_json,
    start_record,
    trial_dir,
)
from loopgolf.orchestrator.trialdir import now as _now
from loopgolf.trial.config import TrialConfig
from loopgolf.trial.distributed import DataParallel, backend_for, check_divisible
from loopgolf.trial.prepare import MANIFEST
from loopgolf.trial.train import run_trial

STATE_FILE = "training_state.pt"
CHECKPOINTS = "checkpoints"  # <trial dir>/checkpoints/step_<N>/training_state.pt, complete by construction
KEEP_CHECKPOINTS = 2
FINAL_FILE = "final.json"  # in the Ray Train checkpoint that carries a data-parallel trial's final metrics
TRAIN_RUN = "train"  # the Ray Train run of a data-parallel trial: <trial dir>/train


def save_state(state: dict[str, Any], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / STATE_FILE)


def load_state(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """A training state; weights_only: tensors, numbers and containers, never arbitrary objects."""
    path = Path(directory) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        first = first_line(exc)
        raise LoopgolfError(f"{path}: not a loadable training state ({first})") from None


def save_checkpoint(state: dict[str, Any], directory: Path) -> Path:
    """Write a checkpoint that is complete or absent: staged, fsynced, renamed to step_<N>."""
    final = directory / CHECKPOINTS / f"step_{int(state['step']):09d}"
    with atomic_directory(final, existing="keep") as staging:  # the same step twice (a re-run): the first stands
        save_state(state, staging)
    for old in checkpoints(directory)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(directory: Path) -> list[Path]:
    """The trial's complete checkpoints, oldest first (staging directories are not checkpoints)."""
    root = directory / CHECKPOINTS
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / STATE_FILE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


def trial_directory(sweep_dir: str, config: dict[str, Any]) -> Path:
    """The trial's own directory in the sweep: `<sweep>/trials/<trial_key>` (the searcher's key).

    Not Tune's trial directory: that is per session (a resumed trial gets a new one) and,
    with reused actors, a staging copy that may never reach the sweep directory.
    """
    if not sweep_dir or "trial_key" not in config:
        raise ValueError("train_trial: expected the sweep directory and a config with its trial_key")
    return trial_dir(sweep_dir, config["trial_key"])


def data_fingerprint(data_dir: str | os.PathLike[str]) -> str:
    """The prepared data's identity: a hash of its manifest (sources' and tokenizer's sha256,
    token and document counts; no paths), so a moved copy has the same fingerprint."""
    manifest = read_json(Path(data_dir) / MANIFEST)
    return short_digest(manifest, 16)


def _start(directory: Path, config: dict[str, Any], data_dir: str, where: str) -> dict[str, Any] | None:
    """Record the trial's config; its final metrics if it had already finished (never train twice)."""
    record = {k: config.get(k) for k in TRIAL_RECORD} | {"data_fingerprint": data_fingerprint(data_dir),
                                                          "hardware": where}  # fmt: skip
    return start_record(directory, record)


def train_trial(
    config: dict[str, Any], data_dir: str, cpus: float, gpus: float = 0.0, workers: int = 1, sweep_dir: str = ""
) -> None:
    """Tune function trainable; `config` is what the searcher returned.

    `workers > 1`: a data-parallel trial through Ray Train, `cpus` and `gpus` per worker.
    """
    directory = trial_directory(sweep_dir, config)
    finished = _start(directory, config, data_dir, hardware(cpus, gpus, workers))
    if finished is not None:  # it finished before the driver died: report it, do not train again
        tune.report(finished)
        return
    if workers > 1:
        _train_data_parallel(config, data_dir, cpus, gpus, workers, directory)
        return
    # One intra-op thread per CPU the trial holds: concurrent trials that each spin up
    # a thread per core oversubscribe the machine (measured: 10x slower steps on 2 cores).
    torch.set_num_threads(max(1, int(cpus)))
    trial_config = TrialConfig.from_flat(config["trial_config"])
    started_at = _now()
    saved = checkpoints(directory)
    resume_state = load_state(saved[-1]) if saved else None  # the newest complete one, whatever Tune knows

    def reporter(progress: dict[str, Any], state: dict[str, Any] | None) -> None:
        if state is not None:
            save_checkpoint(state, directory)
        append_progress(directory, progress | {"pid": os.getpid(), "checkpoint_step": state["step"] if state else None})
        tune.report(progress)

    metrics = run_trial(trial_config, data_dir, directory, reporter=reporter, resume_state=resume_state)
    metrics |= {
        "config_id": config["config_id"],
        "seed": trial_config.train.seed,
        "node_id": ray.get_runtime_context().get_node_id(),
        "started_at": started_at,
        "ended_at": _now(),
        "resumed_from_step": resume_state["step"] if resume_state else 0,
    }
    finish(directory, metrics, tune.report)


# ------------------------------------------------------------------ data parallel (Ray Train)


def _progress_to_tune() -> Any:
    """A Ray Train callback that forwards rank 0's progress reports to the Tune trial."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ProgressToTune(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if "status" in metrics[0]:  # the final metrics: the driver reports them, with the trial's identity
                return
            super().after_report(run_context, metrics, checkpoint)

    return ProgressToTune()


def _train_data_parallel(
    config: dict[str, Any], data_dir: str, cpus: float, gpus: float, workers: int, directory: Path
) -> None:
    """The Tune driver of a data-parallel trial: one TorchTrainer run, restored by name after a restart."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if not TorchTrainer.__module__.startswith("ray.train.v2"):
        raise RuntimeError("data-parallel trials (workers > 1) need Ray Train V2: unset RAY_TRAIN_V2_ENABLED=0")
    trial_config = TrialConfig.from_flat(config["trial_config"])
    check_divisible(trial_config, workers)
    # In the sweep itself (the trial's directory): the Ray Train run must be found again by a
    # driver of a later Ray session, and rank 0 may run on another node (multi-node needs shared storage).
    started_at = _now()
    per_worker = {"CPU": cpus} | ({"GPU": gpus} if gpus else {})
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "trial_config": config["trial_config"],
            "data_dir": data_dir,
            "out_dir": str(directory),
            "cpus": cpus,
            "use_gpu": gpus > 0,
        },
        torch_config=TorchConfig(backend=backend_for(gpus > 0)),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpus > 0, resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=TRAIN_RUN,
            storage_path=str(directory),
            callbacks=[_progress_to_tune()],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=0),  # Tune's failure policy restarts the trial
        ),
    )
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    if "status" not in metrics:
        raise RuntimeError(f"data-parallel trial ended without its final metrics (Ray Train run {result.path})")
    metrics.pop("checkpoint_dir_name", None)
    metrics |= {"config_id": config["config_id"], "seed": trial_config.train.seed, "started_at": started_at,
                "ended_at": _now()}  # fmt: skip
    finish(directory, metrics, tune.report)


def train_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker of a data-parallel trial (Ray Train has set up the process group)."""
    import ray
    import ray.train
    import ray.train.torch

    torch.set_num_threads(max(1, int(loop_config["cpus"])))
    config = TrialConfig.from_flat(loop_config["trial_config"])
    device = ray.train.torch.get_device() if loop_config["use_gpu"] else torch.device("cpu")
    parallel = DataParallel.from_process_group(device=device)
    resume_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            if (Path(directory) / FINAL_FILE).is_file():
                return  # the run had finished: its final report is already the run's result
            resume_state = load_state(directory)

    def reporter(progress: dict[str, Any], state: dict[str, Any] | None) -> None:
        # Every rank reports at the same steps (ray.train.report is a collective); rank 0 with the state.
        if parallel.is_main:
            append_progress(Path(loop_config["out_dir"]), progress | {"pid": os.getpid()})
        if state is None:
            ray.train.report(progress)
            return
        with tempfile.TemporaryDirectory() as staging:
            save_state(state, Path(staging))
            ray.train.report(progress, checkpoint=ray.train.Checkpoint.from_directory(staging))

    metrics = run_trial(
        config, loop_config["data_dir"], loop_config["out_dir"], reporter=reporter, resume_state=resume_state,
        parallel=parallel,
    )  # fmt: skip
    metrics |= {
        "node_id": ray.get_runtime_context().get_node_id(),
        "resumed_from_step": resume_state["step"] if resume_state else 0,
    }
    if not parallel.is_main:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as staging:
        payload = json.dumps(metrics, default=json_default, sort_keys=True)
        (Path(staging) / FINAL_FILE).write_text(payload, encoding="utf-8")
        ray.train.report(json.loads(payload), checkpoint=ray.train.Checkpoint.from_directory(staging))

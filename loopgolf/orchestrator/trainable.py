"""The Ray Tune trainable: `run_trial` inside a Tune worker, with checkpoints and resume.

Progress goes to `tune.report` every report interval; a resumable training state
(model, optimizers, step = data position, elapsed training seconds, RNG) rides along
as a Tune checkpoint every checkpoint interval. A restored trial continues from it
with the remaining budget, so it still trains for `train_seconds` in total.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from loopgolf.trial.config import TrialConfig
from loopgolf.trial.train import run_trial

STATE_FILE = "training_state.pt"


def save_state(state: dict[str, Any], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / STATE_FILE)


def load_state(directory: str | os.PathLike[str]) -> dict[str, Any]:
    # weights_only: tensors, numbers and containers only, never arbitrary objects.
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def train_trial(config: dict[str, Any], data_dir: str, cpus: float) -> None:
    """Tune function trainable; `config` is what ConfigSampler returned."""
    # One intra-op thread per CPU the trial holds: concurrent trials that each spin up
    # a thread per core oversubscribe the machine (measured: 10x slower steps on 2 cores).
    torch.set_num_threads(max(1, int(cpus)))
    trial_config = TrialConfig.from_flat(config["trial_config"])
    trial_dir = Path(tune.get_context().get_trial_dir())
    started_at = _now()
    checkpoint = tune.get_checkpoint()
    resume_state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resume_state = load_state(directory)
    staging = trial_dir / ".checkpoint-staging"

    def reporter(progress: dict[str, Any], state: dict[str, Any] | None) -> None:
        if state is None:
            tune.report(progress)
            return
        shutil.rmtree(staging, ignore_errors=True)
        save_state(state, staging)
        tune.report(progress, checkpoint=tune.Checkpoint.from_directory(str(staging)))
        shutil.rmtree(staging, ignore_errors=True)

    metrics = run_trial(trial_config, data_dir, trial_dir / "trial", reporter=reporter, resume_state=resume_state)
    tune.report(
        metrics
        | {
            "config_id": config["config_id"],
            "seed": trial_config.train.seed,
            "node_id": ray.get_runtime_context().get_node_id(),
            "started_at": started_at,
            "ended_at": _now(),
            "resumed_from_step": resume_state["step"] if resume_state else 0,
        }
    )

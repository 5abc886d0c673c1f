"""What the orchestrator tests share: a small sweep spec, the CLI as a process, a searcher."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from loopgolf.orchestrator.search import SweepSearch, make_sampler
from loopgolf.search_spaces.spaces import Choice, ConfigSampler
from loopgolf.trial.config import preset

OBJECTIVES = {"val_bpb": "min", "artifact_bytes": "min"}
SPACE = {"n_blocks": Choice((1, 2, 3)), "n_passes": Choice((1, 2)), "d_model": Choice((32, 64))}


def write_spec(path: Path, data_dir: Path, storage: Path, **changes: Any) -> Path:
    """A tiny shared_vs_unique sweep (3 proposals x 2 seeds, 3 s a trial); `changes` replace whole sections."""
    spec: dict[str, Any] = {
        "name": "t",
        "data": str(data_dir),
        "storage": str(storage),
        "space": "shared_vs_unique",
        "overrides": {"n_blocks": [1, 2], "n_passes": [1, 2], "n_prelude": 0, "n_coda": 0, "d_model": [32, 64]},
        "base": {
            "preset": "tiny", "batch_size": 8, "eval_tokens": 4096, "quick_eval_tokens": 1024, "bits": 8,
            "codec": "zlib", "report_every_seconds": 1.0, "checkpoint_every_seconds": 1.0,
        },
        "budget": {"artifact_bytes": 2_000_000, "train_seconds": 3},
        "search": {"algorithm": "random", "objectives": {"val_bpb": "min", "artifact_bytes": "min"}, "num_samples": 3},
        "seeds": 2,
        "max_concurrent": 2,
        "resources": {"cpu": 1},
    }  # fmt: skip
    for key, value in changes.items():
        spec[key] = value
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`loopgolf ARGS` in a fresh interpreter, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "loopgolf.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def searcher(
    tmp_path: Path, seeds: int = 2, total: int = 6, sampler: Any = None, space: Any = None, objectives: Any = None,
    controls: tuple[str, ...] = (), base: Any = None,
) -> SweepSearch:
    """`total` counts trials of unrouted proposals: num_samples = total / seeds."""
    base = base or preset("tiny").replace(bits=8, codec="zlib", max_artifact_bytes=2_000_000)
    space = space or SPACE
    return SweepSearch(
        ConfigSampler(space, base, equal_bytes=False, byte_budget=2_000_000),
        objectives or OBJECTIVES,
        seeds=seeds,
        num_samples=total // seeds,
        storage=f"sqlite:///{tmp_path / 'optuna.db'}",
        study_name="s",
        sampler=sampler or make_sampler("random", seed=0),
        space=space,
        controls=controls,
    )

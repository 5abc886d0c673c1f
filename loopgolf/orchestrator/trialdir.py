"""A trial's directory in the sweep, `<sweep>/trials/<trial_id>/`: the truth about the trial.

    trial.json       the trial's configuration (written when it starts)
    metrics.json     its final metrics (the trial's own, or the driver's record of an error)
    progress.jsonl   its progress reports, one JSON object a line (the learning curve)
    checkpoints/     its resumable training states (trainable.py)

JSON is written atomically (a temporary file beside it, fsynced, renamed over it) and
read with `json` only: nothing in a trial directory is loaded in a way that runs code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from loopgolf.atomic import atomic_write_json
from loopgolf.errors import LoopgolfError

# rejected: predicted over the byte cap, never trained; stopped: by early stopping, before its final metrics
STATUSES = ("complete", "rejected", "failed", "stopped")
TRIALS_DIR = "trials"
TRIAL_FILE = "trial.json"
METRICS_FILE = "metrics.json"
PROGRESS_FILE = "progress.jsonl"
# The keys of the Tune config (the searcher's) that trial.json keeps; the trainable adds where it ran.
TRIAL_RECORD = ("trial_key", "trial_config", "config_id", "predicted_artifact_bytes", "arm", "pair_id")


def trial_dir(sweep_dir: str | os.PathLike[str], trial_id: str) -> Path:
    return Path(sweep_dir) / TRIALS_DIR / trial_id


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically (loopgolf.atomic), creating the trial's directory if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, payload, default=_json_default)


def _json_default(value: object) -> object:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()  # type: ignore[attr-defined]
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from a file; None when the file is missing. Never executes anything."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LoopgolfError(f"{path}: not a readable JSON file ({str(exc).strip().splitlines()[0]})") from None
    if not isinstance(payload, dict):
        raise LoopgolfError(f"{path}: expected a JSON object, got {type(payload).__name__}")
    return payload


def final_metrics(directory: Path) -> dict[str, Any] | None:
    """The trial's final metrics when it has finished (status set), else None."""
    metrics = read_json(directory / METRICS_FILE)
    return metrics if metrics is not None and metrics.get("status") in STATUSES else None


def progress_lines(directory: Path) -> list[dict[str, Any]]:
    """The progress reports; a torn last line (the trial was killed mid-write) is skipped."""
    try:
        text = (directory / PROGRESS_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = []
    for line in text.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            lines.append(item)
    return lines

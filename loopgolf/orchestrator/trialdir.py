"""A trial's directory in the sweep, `<sweep>/trials/<trial_id>/`: the truth about the trial.

    trial.json       the trial's configuration (written when it starts)
    metrics.json     its final metrics (the trial's own, or the driver's record of an error)
    progress.jsonl   its progress reports, one JSON object a line (the learning curve)
    checkpoints/     its resumable training states (trainable.py)

JSON is written atomically (a temporary file beside it, fsynced, renamed over it) and
read with `json` only: nothing in a trial directory is loaded in a way that runs code.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from loopgolf.atomic import atomic_write_json
from loopgolf.errors import LoopgolfError, first_line
from loopgolf.jsonio import json_default
from loopgolf.orchestrator.protocol import RECORD_KEYS

# rejected: predicted over the byte cap, never trained; stopped: by early stopping, before its final metrics
STATUSES = ("complete", "rejected", "failed", "stopped")
TRIALS_DIR = "trials"
TRIAL_FILE = "trial.json"
METRICS_FILE = "metrics.json"
PROGRESS_FILE = "progress.jsonl"
# The keys of the Tune config (the searcher's) that trial.json keeps; the trainable adds where it ran.
TRIAL_RECORD = RECORD_KEYS


def trial_dir(sweep_dir: str | os.PathLike[str], trial_id: str) -> Path:
    return Path(sweep_dir) / TRIALS_DIR / trial_id


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically (loopgolf.atomic), creating the trial's directory if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, payload, default=json_default)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from a file; None when the file is missing. Never executes anything."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LoopgolfError(f"{path}: not a readable JSON file ({first_line(exc)})") from None
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


def append_progress(directory: Path, progress: dict[str, Any]) -> None:
    """One line of the learning curve; a line torn by a kill is skipped by the reader."""
    with open(directory / PROGRESS_FILE, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(progress, default=json_default, sort_keys=True) + "\n")


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def hardware(cpus: float, gpus: float, workers: int = 1) -> str:
    """Where a trial runs, as the report groups it: accelerator, CPU model and counts."""
    model = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]  # fmt: skip
        model = names[0] if names else model
    except OSError:
        pass  # not Linux: platform's name stands
    text = f"{cpus:g} cpu {model}"
    if gpus:
        import torch  # here only: the trial directory's readers need no torch

        if torch.cuda.is_available():
            text = f"{gpus:g} gpu {torch.cuda.get_device_name(0)}, {text}"
    return f"{workers} workers x ({text})" if workers > 1 else text


def environment_versions() -> dict[str, str]:
    """The versions a trial ran with (a record folder's requirements.txt is written from them)."""
    found = {"python": platform.python_version()}
    for name in ("torch", "numpy", "sentencepiece"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue  # not installed where the trial ran: nothing to pin
    return found


def start_record(directory: Path, record: dict[str, Any]) -> dict[str, Any] | None:
    """Record the trial's config when it first starts; its final metrics if it had already
    finished (a trial is never run twice)."""
    if read_json(directory / TRIAL_FILE) is None:
        write_json(directory / TRIAL_FILE, record | {"versions": environment_versions()})
    return final_metrics(directory)


def finish(directory: Path, metrics: dict[str, Any], report: Callable[[dict[str, Any]], None]) -> None:
    """Every trainable's ending: the final metrics to metrics.json (atomically), then to Tune."""
    write_json(directory / METRICS_FILE, metrics)
    report(metrics)

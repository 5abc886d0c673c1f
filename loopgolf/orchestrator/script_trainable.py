"""The script trial inside Ray Tune: run the user's script, stream its log, measure what it wrote.

A trial's directory `<sweep>/trials/<key>/` holds `trial.json`, `progress.jsonl`, the
script's `stdout.log` and `stderr.log`, its working directory `run/` (the script's
`logs/` and model files) and `metrics.json`. The script runs under supervise.py, in a
process group of its own: when Tune stops the trial, when the trial runs past
`train_seconds + eval_seconds + trial.grace_seconds`, or when the Tune worker dies
(the driver was killed), every process of it ends.

A script has no checkpoint protocol. A trial that had finished is never run again; one
a dead driver left running runs again from the start in a fresh `run/`, the earlier
attempt kept as `run.<n>/` (with its logs), and `metrics.json` says which `attempt` it
was.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loopgolf.errors import first_line
from loopgolf.orchestrator import supervise
from loopgolf.orchestrator.protocol import RECORD_KEYS, TrialRequest
from loopgolf.orchestrator.script import (
    LogState,
    ScriptError,
    ScriptTrial,
    code_sha256,
    command,
    data_fingerprint,
    final_metrics,
    tokenizer_for,
    trial_environment,
)
from loopgolf.orchestrator.trialdir import append_progress, finish, hardware, now, start_record, trial_dir

RUN_DIR = "run"
STDOUT, STDERR = "stdout.log", "stderr.log"
POLL_SECONDS = 0.25  # how often the log is read and the deadline checked
STOP_WAIT_SECONDS = 30.0  # for the supervisor to end the script's processes before it is killed itself

Report = Callable[[dict[str, Any]], None]


def supervisor_command(python: str = sys.executable) -> list[str]:
    """The supervisor, run by its file and isolated (-I): it needs only the standard library, so it
    starts whether or not loopgolf is importable from the trial's directory (a source tree on
    PYTHONPATH=. is not, from run/), and the user's PYTHONPATH reaches only the script."""
    return [python, "-I", str(Path(supervise.__file__).resolve())]


def fresh_run_dir(directory: Path) -> tuple[int, Path]:
    """This attempt's number and its empty `run/`; an earlier attempt's files move to `run.<n>/`."""
    directory.mkdir(parents=True, exist_ok=True)
    earlier = 1 + sum(1 for p in directory.glob(f"{RUN_DIR}.*") if p.name.removeprefix(f"{RUN_DIR}.").isdigit())
    run = directory / RUN_DIR
    if run.exists() or (directory / STDOUT).exists():
        kept = directory / f"{RUN_DIR}.{earlier}"
        kept.mkdir()
        for name in (RUN_DIR, STDOUT, STDERR):
            if (directory / name).exists():
                os.replace(directory / name, kept / name)
        earlier += 1
    run.mkdir()
    return earlier, run


def last_error_line(path: Path) -> str:
    """The last line of stderr that says something (torchrun ends with rules of '=')."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    said = [ln.strip() for ln in lines if any(c.isalnum() for c in ln)]
    return said[-1][:500] if said else ""


class LogTail:
    """Complete lines appended to a file since the last read (a partial line waits for its end)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.partial = path, 0, b""

    def lines(self) -> list[str]:
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        self.offset += len(chunk)
        *complete, self.partial = (self.partial + chunk).split(b"\n")
        return [line.decode("utf-8", errors="replace") for line in complete]


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Ask the supervisor to end the script's processes; kill its whole group if it does not."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_WAIT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def timeout_seconds(config: dict[str, Any], trial: ScriptTrial) -> float | None:
    """The trial's deadline in wall seconds; None for a fixed-step trial with no wall-clock budget."""
    train = float(config.get("train_seconds") or 0.0)
    if train <= 0:
        return None
    return train + float(config.get("max_eval_seconds") or 0.0) + trial.grace_seconds


def run_script(
    request: TrialRequest, trial: ScriptTrial, data: Path, directory: Path, *, cpus: float, gpus: float,
    report: Report,
) -> dict[str, Any]:
    """Run one attempt of the script to its end and return its final metrics."""
    attempt, run = fresh_run_dir(directory)
    config = dict(request.config)
    values = {k: v for k, v in config.items() if k.isupper()}
    env = trial_environment(
        trial, values, seed=request.seed, run_id=request.key, data=data,
        train_seconds=float(config.get("train_seconds") or 0.0), max_steps=int(config.get("max_steps") or 0),
        base=os.environ,
    )  # fmt: skip
    threads = max(1, int(cpus / max(1.0, gpus)))  # per process: torchrun starts one per GPU
    env.setdefault("OMP_NUM_THREADS", str(threads))
    argv = [*supervisor_command(), "--", *command(trial, gpus)]
    deadline = timeout_seconds(config, trial)
    state, started = LogState(trial.patterns()), time.monotonic()
    with open(directory / STDOUT, "wb") as out, open(directory / STDERR, "wb") as err:
        proc = subprocess.Popen(argv, cwd=run, env=env, stdout=out, stderr=err, start_new_session=True)
    tail, timed_out = LogTail(directory / STDOUT), False
    try:
        while True:
            try:
                code: int | None = proc.wait(timeout=POLL_SECONDS)
            except subprocess.TimeoutExpired:
                code = None
            for line in tail.lines():
                progress = state.feed(line)
                if progress is not None:
                    report(progress)
            if code is not None:
                break
            if deadline is not None and time.monotonic() - started > deadline:
                timed_out = True
                break
    finally:  # stopped by Tune (an exception out of report), timed out, or ended: nothing outlives it
        stop(proc)
    identity = {"attempt": attempt, "exit_code": proc.returncode, "wall_seconds": time.monotonic() - started}
    return identity | _outcome(trial, state, run, directory, config, proc.returncode if not timed_out else None,
                               deadline)


def _outcome(
    trial: ScriptTrial, state: LogState, run: Path, directory: Path, config: dict[str, Any], code: int | None,
    deadline: float | None,
) -> dict[str, Any]:
    """The final metrics of an attempt that ended with exit status `code` (None: it timed out)."""
    if code is None:
        error = f"timeout: the script ran past {deadline:g} s (train + eval + grace) and was killed"
        return {"status": "failed", "feasible": False, "raised": False, "reason": "timeout", "error": error}
    if code != 0:
        said = last_error_line(directory / STDERR) or f"exit status {code}"
        return {"status": "failed", "feasible": False, "raised": True, "reason": "exit",
                "error": f"the script exited with status {code}: {said}"}  # fmt: skip
    try:
        metrics = final_metrics(trial, state, run, directory / STDOUT, int(config["max_artifact_bytes"]))
    except ScriptError as exc:
        return {"status": "failed", "feasible": False, "raised": True, "reason": "output", "error": first_line(exc)}
    cap = float(config.get("max_eval_seconds") or 0.0)
    eval_seconds = metrics.get("eval_seconds")
    metrics["eval_violation"] = eval_seconds - cap if cap and eval_seconds is not None else 0.0
    metrics["feasible"] = metrics["feasible"] and metrics["eval_violation"] <= 0
    return metrics | {"status": "complete", "raised": False,
                      "artifact_path": f"{RUN_DIR}/{trial.model_file}"}  # fmt: skip


def script_trial(
    config: dict[str, Any], trial: ScriptTrial, data_dir: str, cpus: float, gpus: float = 0.0, sweep_dir: str = ""
) -> None:
    """Tune function trainable of a script trial; `config` is the searcher's TrialRequest."""
    from ray import tune

    request = TrialRequest.from_tune(config)
    directory = trial_dir(sweep_dir, request.key)
    data = Path(data_dir)
    record = {k: config.get(k) for k in RECORD_KEYS} | {
        "data_fingerprint": data_fingerprint(data, tokenizer_for(trial, data)),
        "hardware": hardware(cpus, gpus), "code_sha256": code_sha256(trial),
    }  # fmt: skip
    finished = start_record(directory, record)
    if finished is not None:  # it finished before the driver died: report it, never run it twice
        tune.report(finished)
        return

    def report(progress: dict[str, Any]) -> None:
        append_progress(directory, progress)
        tune.report(progress)

    started_at = now()
    metrics = run_script(request, trial, data, directory, cpus=cpus, gpus=gpus, report=report)
    metrics |= {"config_id": request.config_id, "seed": request.seed, "started_at": started_at, "ended_at": now(),
                "code_sha256": record["code_sha256"]}  # fmt: skip
    finish(directory, metrics, tune.report)

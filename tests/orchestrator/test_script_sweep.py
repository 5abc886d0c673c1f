"""Script sweeps end to end: the example script trained by real trials under Ray Tune.

- every trial's bytes, metrics and environment against what the script wrote and logged;
- the driver killed with kill -9 mid-sweep: no process of a script survives it, and
  `resume` runs every (configuration, seed) exactly once, the in-flight one again from
  the start (attempt 2);
- a 2-GPU trial launched through torchrun on a CPU machine whose Ray declares 2 GPUs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from tests.processes import alive, process_tree, processes_in

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "script_sweep.yaml"
SCRIPT = REPO / "examples" / "pg_script" / "train_gpt.py"
FAKE = Path(__file__).resolve().parents[1] / "fixtures" / "fake_train_gpt.py"

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _spec(tmp_path: Path, data: Path, **changes: Any) -> Path:
    raw = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    raw |= {"data": str(data), "storage": str(tmp_path / "sweeps"), "name": "s"}
    raw["trial"]["script"] = str(SCRIPT)
    raw["trial"]["env"] |= {"VAL_TOKENS": 4096}
    raw |= changes
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _cli(*args: str, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115  (closed by the child's exit)
    return subprocess.Popen([sys.executable, "-m", "loopgolf.cli", *args], stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)  # fmt: skip


def _wait(condition: Any, what: str, proc: subprocess.Popen | None = None, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert proc is None or proc.poll() is None, f"the driver exited while waiting for {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _elapsed(directory: Path) -> float:
    """The training seconds of a trial's latest progress line (a line being written is skipped)."""
    seconds = 0.0
    for line in (directory / "progress.jsonl").read_text().splitlines():
        try:
            seconds = float(json.loads(line)["elapsed_seconds"])
        except (ValueError, KeyError):
            continue
    return seconds


def _check_trial_against_its_files(sweep: Path, row: pd.Series, budget_seconds: float) -> None:
    directory = sweep / "trials" / row["trial_id"]
    run = directory / "run"
    assert row["model_bytes"] == (run / "final_model.int8.ptz").stat().st_size
    assert row["code_bytes"] == SCRIPT.stat().st_size
    assert row["artifact_bytes"] == row["model_bytes"] + row["code_bytes"] == row["artifact_bytes_logged"]
    log = (run / "logs" / f"{row['trial_id']}.txt").read_text()  # RUN_ID is the trial key
    assert log == (directory / "stdout.log").read_text()
    final = re.findall(r"^final_int8_zlib_roundtrip_exact val_loss:(\S+) val_bpb:(\S+)$", log, re.M)
    assert [(row["val_loss"], row["val_bpb"])] == [(float(a), float(b)) for a, b in final]
    assert f"seed:{row['seed']}\n" in log and f"max_wallclock_seconds:{budget_seconds:.3f}\n" in log
    assert re.search(rf"num_loops:{row['NUM_LOOPS']} ", log)  # the space's value reached the script


def test_script_sweep_killed_with_kill_9_resumes_every_trial_exactly_once(corpus_data: Path, tmp_path: Path) -> None:
    spec = _spec(tmp_path, corpus_data, budget={"artifact_bytes": 400_000, "train_seconds": 8},
                 search={"algorithm": "random", "objectives": {"val_bpb": "min", "artifact_bytes": "min"},
                         "num_samples": 3, "seed": 1}, seeds=2)  # fmt: skip
    sweep = tmp_path / "sweeps" / "s"

    def one_done_one_running() -> bool:
        """A finished trial, and a running one early in its budget (5+ of 8 s to go at the kill)."""
        done = {p.parent.name for p in sweep.glob("trials/*/metrics.json")}
        running = {p.parent.name for p in sweep.glob("trials/*/progress.jsonl")} - done
        return bool(done) and any(processes_in(sweep / "trials" / k) and _elapsed(sweep / "trials" / k) < 3.0
                                  for k in running)  # fmt: skip

    driver = _cli("sweep", str(spec), log=tmp_path / "driver.log")
    try:
        _wait(one_done_one_running, "a finished trial and a running one", driver)
        ray_processes = process_tree(driver.pid)  # the driver, Ray's GCS and raylet, the trials' workers
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    # A Ray worker dies a moment after its driver (sooner or later under load) and may finish its
    # trial meanwhile: what counts as in flight is what is unfinished once every process has gone.
    _wait(lambda: not any(alive(p) for p in ray_processes), "Ray to die with its driver",
          timeout=120)  # fmt: skip
    _wait(lambda: not processes_in(sweep), "every script process to end with the killed driver", timeout=120)
    in_flight = {p.parent.name for p in sweep.glob("trials/*/progress.jsonl")} - {
        p.parent.name for p in sweep.glob("trials/*/metrics.json")}
    resumed = _cli("resume", str(sweep), log=tmp_path / "resume.log")
    assert resumed.wait(timeout=900) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    trials = pd.read_parquet(sweep / "results" / "trials.parquet")
    assert len(trials) == 6 and trials["trial_id"].is_unique and (trials["status"] == "complete").all()
    assert not trials.duplicated(["config_id", "seed"]).any()  # every (configuration, seed) once
    assert sorted(trials["seed"]) == [0, 0, 0, 1, 1, 1] or trials["config_id"].nunique() < 3
    assert (trials["kind"] == "script").all() and trials["arm"].isna().all()
    assert in_flight  # at least one trial was running
    for key in in_flight:  # run again from the start, the lost attempt kept beside it
        row = trials.set_index("trial_id").loc[key]
        assert row["attempt"] == 2 and (sweep / "trials" / key / "run.1" / "stdout.log").is_file()
    for _, row in trials.iterrows():
        _check_trial_against_its_files(sweep, row, 8.0)


def test_a_two_gpu_script_trial_runs_through_torchrun_on_the_gpus_ray_assigns(
    corpus_data: Path, tmp_path: Path
) -> None:
    raw = {"name": "g", "data": str(corpus_data), "storage": str(tmp_path), "trial": {"script": str(FAKE)},
           "space": {"MODEL_SIZE": [100]}, "budget": {"artifact_bytes": 100_000, "train_seconds": 30},
           "search": {"algorithm": "grid", "num_samples": 1}, "resources": {"cpu": 1, "gpu": 2}}  # fmt: skip
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw), encoding="utf-8")
    code = (
        "import sys, ray\n"
        "from loopgolf.orchestrator import sweep\n"
        "from loopgolf.orchestrator.spec_file import load_spec\n"
        "sweep._ray_environment(None)\n"  # what the CLI sets before Ray starts, then a Ray that declares GPUs
        "ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)\n"
        f"outcome = sweep.run_sweep(load_spec({str(spec)!r}))\n"
        "sys.exit(outcome.exit_status)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "g" / "trials" / "trial_00000" / "run"
    ranks = [json.loads((run / f"env.{r}.json").read_text()) for r in (0, 1)]
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in ranks] == [("0", "0", "2"), ("1", "1", "2")]
    assert {e["CUDA_VISIBLE_DEVICES"] for e in ranks} == {"0,1"}  # the two GPUs Ray assigned the trial
    trials = pd.read_parquet(tmp_path / "g" / "results" / "trials.parquet")
    assert trials["status"].tolist() == ["complete"] and trials["model_bytes"].tolist() == [100]
    assert trials["hardware"].str.startswith("1 cpu").all()


def test_early_stopping_ends_a_script_trial_and_every_process_it_started(corpus_data: Path, tmp_path: Path) -> None:
    """ASHA stops the second seed (its val_bpb is worse at the first rung): the trial is recorded
    as stopped, and neither its script nor the child the script started in a session of its own
    survives."""
    raw = {"name": "e", "data": str(corpus_data), "storage": str(tmp_path), "space": {"MODEL_SIZE": [100]},
           "trial": {"script": str(FAKE), "env": {"FAKE_MODE": "slow"}}, "early_stopping": "asha", "seeds": 2,
           "budget": {"artifact_bytes": 100_000, "train_seconds": 6}, "max_concurrent": 1,
           "search": {"algorithm": "grid", "num_samples": 1, "objectives": {"val_bpb": "min"}}}  # fmt: skip
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw), encoding="utf-8")
    driver = _cli("sweep", str(spec), log=tmp_path / "driver.log")
    assert driver.wait(timeout=600) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    trials = pd.read_parquet(tmp_path / "e" / "results" / "trials.parquet").set_index("seed")
    assert trials["status"].to_dict() == {0: "complete", 1: "stopped"}
    stopped = tmp_path / "e" / "trials" / trials.loc[1, "trial_id"]
    assert trials.loc[1, "train_seconds"] < 6 and trials.loc[1, "quick_val_bpb"] == 3.0
    pids = [int((stopped / "run" / name).read_text()) for name in ("pid.0", "child.pid")]
    _wait(lambda: not any(alive(p) for p in pids),
          "the stopped trial's processes to end", timeout=60)  # fmt: skip

"""A sweep on a Ray cluster on one machine, and a worker node lost mid-trial.

In both clusters the head has no CPU for trials (as a real cluster's head may), so every
trial of `resources: {cpu: 1}` runs on a worker node by construction, never by timing:
two trials that were meant to overlap need not (Tune hands a finished trial's actor to a
pending trial, so a slow worker start under load could leave a worker idle).

- `ray start --head` + `ray start --address` with token auth, the way a real cluster runs
  (docs/cluster.md), and the `loopgolf sweep --address` driver connecting to it with no
  RAY_AUTH_MODE of its own (`_init_ray` turns it on when the token file exists).
- `ray.cluster_utils.Cluster`, whose `remove_node(..., allow_graceful=False)` SIGKILLs
  the worker node (raylet and all) while a trial trains on it; a spare worker joins
  after, and the lost trial resumes there from its checkpoint, beside the one that waited.

Isolation from other Ray users of this machine: every node runs under a private
RAY_TMPDIR (its session files, and the "current cluster" address file that a plain
`ray.init()` elsewhere would otherwise follow into this cluster), and the `ray start`
cluster under a private HOME holding its own token. Every process a test starts is
stopped by PID: the nodes' processes and everything they spawned (workers, agents).
Never `ray stop`: it kills every Ray process of the user on the machine.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
from ray.cluster_utils import Cluster

from tests.orchestrator.sweeps import write_spec

pytestmark = pytest.mark.ray  # its sweeps start Ray: one such test at a time (tests/conftest.py)

RAY = Path(sys.executable).with_name("ray")
BUDGET = 8.0  # train_seconds of the trial that loses its node: room to kill it mid-trial
KILL_AFTER = 3.0  # seconds of its training
REPORT_EVERY = 1.0


# ---------------------------------------------------------------------------- processes


def _psutil() -> Any:
    import psutil  # Ray's vendored copy (ray/thirdparty_files): on sys.path once ray is imported

    return psutil


def process_tree(pids: list[int]) -> list[Any]:
    """These processes and all their descendants that are alive now."""
    psutil = _psutil()
    found: dict[int, Any] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                found[proc.pid] = proc
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def running(procs: list[Any]) -> list[Any]:
    """Those still running; a zombie (exited, its parent gone, not yet reaped) is not."""
    psutil = _psutil()
    alive = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    return alive


def stop_processes(procs: list[Any], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is left after `grace` seconds; waits until none runs."""
    psutil = _psutil()
    for signal_them, wait in (("terminate", grace), ("kill", 5.0)):
        for proc in running(procs):
            with contextlib.suppress(psutil.NoSuchProcess):
                getattr(proc, signal_them)()
        deadline = time.monotonic() + wait
        while running(procs) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert not running(procs), running(procs)


def node_pids(node: Any) -> list[int]:
    """The processes a `ray._private.node.Node` started itself (raylet, gcs, ...)."""
    return [info.process.pid for infos in node.all_processes.values() for info in infos]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_tmpdir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private RAY_TMPDIR (short: Ray's unix socket paths must stay under 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="lgray-", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------- clusters


@pytest.fixture
def token_cluster(ray_tmpdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """`ray start` head (no CPU for trials) + worker (1 CPU) on 127.0.0.1 with token auth; yields
    the address.

    The driver and the nodes share a private HOME, so the token is this test's own; the
    driver gets no RAY_AUTH_MODE, the nodes get RAY_AUTH_MODE=token (as cluster.yaml does).
    """
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    node_env = {**os.environ, "RAY_AUTH_MODE": "token"}
    subprocess.run([str(RAY), "get-auth-token", "--generate"], env=node_env, check=True, capture_output=True)
    assert (home / ".ray" / "auth_token").is_file()
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    try:
        for args in (
            ["--head", "--num-cpus=0", f"--port={port}", f"--temp-dir={ray_tmpdir / 'ray'}",
             "--include-dashboard=false", f"--dashboard-port={free_port()}"],
            ["--num-cpus=1", f"--address={address}"],
        ):  # fmt: skip
            args += [f"--dashboard-agent-listen-port={free_port()}"]
            proc = subprocess.run([str(RAY), "start", *args, *common], env=node_env, capture_output=True, text=True,
                                  timeout=120)  # fmt: skip
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        yield address
    finally:
        # gcs_server, raylets and the Python daemons name the private temp dir in their
        # command lines; agents and workers are their children.
        psutil = _psutil()
        roots = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if any(str(ray_tmpdir) in arg for arg in proc.info["cmdline"] or ()):
                roots.append(proc.pid)
        stop_processes(process_tree(roots))


@contextlib.contextmanager
def local_cluster(cpus_per_node: list[int]) -> Iterator[tuple[Cluster, list[Any]]]:
    """A ray.cluster_utils.Cluster (no token auth): a head and len-1 workers, on this machine.

    (Its nodes listen on the machine's address: with node_ip_address=127.0.0.1 a driver,
    which resolves 127.0.0.1 to that address, could not reach the GCS.)

    Yields the cluster and its nodes (head first). Shutting down stops exactly the nodes'
    processes; whatever they spawned and left behind is stopped by PID here.
    """
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": cpus_per_node[0], "include_dashboard": False},
    )
    try:
        nodes = [cluster.head_node]
        for cpus in cpus_per_node[1:]:
            nodes.append(cluster.add_node(num_cpus=cpus))
        cluster.wait_for_nodes()
        yield cluster, nodes
    finally:
        spawned = process_tree([pid for node in cluster.list_all_nodes() for pid in node_pids(node)])
        cluster.shutdown()
        stop_processes(spawned)


# ---------------------------------------------------------------------------- the sweeps


def cluster_spec(path: Path, data_dir: Path, storage: Path, num_samples: int, train_seconds: float) -> Path:
    return write_spec(
        path, data_dir, storage, seeds=1, max_concurrent=2, resources={"cpu": 1},
        budget={"artifact_bytes": 2_000_000, "train_seconds": train_seconds},
        search={"algorithm": "random", "objectives": {"val_bpb": "min", "artifact_bytes": "min"},
                "num_samples": num_samples},
    )  # fmt: skip


def sweep_command(spec: Path, address: str) -> list[str]:
    return [sys.executable, "-m", "loopgolf.cli", "sweep", str(spec), "--address", address]


def finished_study_trials(sweep_dir: Path) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    return [t for t in study.trials if t.state.is_finished()]


@pytest.mark.slow
def test_sweep_on_a_token_auth_cluster_runs_its_trials_on_the_worker_node(
    token_cluster: str, corpus_data: Path, tmp_path: Path
) -> None:
    storage = tmp_path / "sweeps"
    spec = cluster_spec(tmp_path / "spec.yaml", corpus_data, storage, num_samples=2, train_seconds=3)
    proc = subprocess.run(sweep_command(spec, token_cluster), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2/2 trials finished (2 complete)" in proc.stdout
    trials = pd.read_parquet(storage / "t" / "results" / "trials.parquet")
    assert len(trials) == 2 and trials["trial_id"].is_unique and (trials["status"] == "complete").all()
    # The head has no CPU: both trials ran on the worker, which joined with the cluster's token.
    assert trials["node_id"].nunique() == 1 and trials["node_id"].notna().all(), trials[["trial_id", "node_id"]]
    assert len(finished_study_trials(storage / "t")) == 2


def _step_bound(results: list[dict[str, Any]]) -> float:
    """How far a trial's training clock may end from its budget: it stops at the step boundary
    nearest the budget, so within about a step, and a starved CPU (load ~6 on 2 cores) stretches
    a step of this tiny model from ~0.1 s to several. A step's length is read off its reports
    (step, elapsed): a resumed run's report of a step replaces the lost run's."""
    points = sorted({r["step"]: r["elapsed_seconds"] for r in results}.items())
    per_step = [(e2 - e1) / (s2 - s1) for (s1, e1), (s2, e2) in itertools.pairwise(points) if s2 > s1]
    return max([REPORT_EVERY, *per_step])


def _results(trial_dir: Path) -> list[dict[str, Any]]:
    """The trial's progress reports (its own progress.jsonl, in its directory in the sweep)."""
    path = trial_dir / "progress.jsonl"
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            lines.append(json.loads(line))
    return lines


@pytest.mark.slow
def test_worker_node_killed_mid_trial_the_trial_resumes_on_another_node(
    ray_tmpdir: Path, corpus_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cluster starts its nodes without token auth; the driver must not use it either (with
    # ~/.ray/auth_token present it would: the trials' actors could not reach the driver).
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    storage = tmp_path / "sweeps"
    sweep_dir = storage / "t"
    spec = cluster_spec(tmp_path / "spec.yaml", corpus_data, storage, num_samples=2, train_seconds=BUDGET)
    log = tmp_path / "driver.log"
    with local_cluster([0, 1]) as (cluster, (head, worker)), log.open("w") as out:
        driver = subprocess.Popen(
            sweep_command(spec, cluster.address), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            # Kill the worker node (the only one with a CPU, so the first trial runs there and the
            # second waits) once its trial is a few seconds into its budget, with a complete
            # checkpoint in its directory (the progress line written after it).
            victim = None
            deadline = time.monotonic() + 300  # a cap, not a wait: Ray starts slowly under load
            while victim is None:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                assert driver.poll() is None, log.read_text()[-3000:]
                on_worker = {p.pid for p in process_tree(node_pids(worker))}
                for trial_dir in sweep_dir.glob("trials/*/"):
                    last = (_results(trial_dir) or [{}])[-1] | {"trial_id": trial_dir.name}
                    if (
                        last.get("pid") in on_worker
                        and last.get("checkpoint_step")
                        and last["step"] > 0
                        and KILL_AFTER <= last["elapsed_seconds"] < BUDGET - 2
                    ):
                        victim = last
                time.sleep(0.2)
            left_behind = process_tree(node_pids(worker))
            cluster.remove_node(worker, allow_graceful=False)  # SIGKILL: raylet and all
            stop_processes(left_behind)  # its workers die with the raylet; make sure
            spare = cluster.add_node(num_cpus=2)  # where the lost trial and the waiting one go on, together
            driver.wait(timeout=900)  # a cap: at load ~6 Ray took minutes to declare the node dead and retry
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
    output = log.read_text()
    assert driver.returncode == 0, output[-3000:]
    assert "2/2 trials finished (2 complete)" in output

    trials = pd.read_parquet(sweep_dir / "results" / "trials.parquet").set_index("trial_id")
    assert len(trials) == 2 and trials.index.is_unique and (trials["status"] == "complete").all()
    lost = trials.loc[victim["trial_id"]]
    other = trials.drop(index=victim["trial_id"]).iloc[0]
    # The lost trial went on, on the spare node, from the last checkpoint it made on the worker
    # (at or after the one seen before the kill), and still trained for its budget.
    trial_dir = sweep_dir / "trials" / victim["trial_id"]
    results = _results(trial_dir)
    before = [r for r in results if r["pid"] == victim["pid"]]
    after = [r for r in results if r["pid"] != victim["pid"]]
    assert after and results[: len(before)] == before  # then it ran in another process
    # the newest checkpoint in its directory: at or after the last one its progress lines name
    assert lost["resumed_from_step"] >= max(r["checkpoint_step"] for r in before if r.get("checkpoint_step"))
    assert lost["resumed_from_step"] >= victim["step"] > 0
    assert lost["node_id"] == spare.node_id and head.node_id not in set(trials["node_id"])
    assert abs(lost["train_seconds"] - BUDGET) <= _step_bound(results)
    assert other["resumed_from_step"] == 0 and other["node_id"] == spare.node_id
    assert abs(other["train_seconds"] - BUDGET) <= _step_bound(_results(sweep_dir / "trials" / other.name))
    finished = finished_study_trials(sweep_dir)
    assert len(finished) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in finished)

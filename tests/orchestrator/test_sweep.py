"""Sweeps: spec validation, a real sweep on local Ray, and resume after SIGKILL of the driver."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import yaml

from loopgolf.errors import LoopgolfError
from loopgolf.orchestrator.search import final_trials
from loopgolf.orchestrator.spec_file import load_spec
from tests.orchestrator.sweeps import cli, write_spec
from tests.processes import alive, process_tree

pytestmark = pytest.mark.ray  # its sweeps start Ray: one such test at a time (tests/conftest.py)

DESIGN_COLUMNS = [
    "sweep", "trial_id", "status", "seed", "host", "node_id", "started_at", "ended_at", "code_version",
    "val_bpb", "val_bpb_prequant", "val_loss", "artifact_bytes", "model_bytes", "code_bytes", "params",
    "train_seconds", "train_tokens", "train_steps", "eval_seconds", "eval_passes_per_token",
    "eval_flops_per_token", "refine_fraction", "feasible", "d_model", "n_blocks", "n_passes", "signal", "bits",
]  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"space": "nope"}, "space 'nope': expected one of"),
        ({"overrides": {"n_blockz": [1]}}, "override 'n_blockz': unknown config field"),
        ({"overrides": {"refine_target": {"low": 0.5, "high": 0.1}}}, "empty range"),
        ({"budget": {"artifact_bytes": 1000, "train_seconds": 3}}, "no configuration fits budget.artifact_bytes=1,000"),
        ({"data": "/no/such/dir"}, "data='/no/such/dir': no such directory"),
        ({"early_stopping": "asha"}, "early_stopping=asha is refused with several objectives"),
        ({"search": {"algorithm": "bayes", "objectives": ["val_bpb"]}}, "search.algorithm='bayes'"),
        ({"search": {"objectives": {"bpb": "min"}}}, "unknown metric 'bpb'"),
        ({"seeds": 0}, "seeds=0: expected an integer >= 1"),
    ],
)
def test_bad_specs_fail_with_one_line_and_leave_no_sweep_dir(
    corpus_data: Path, tmp_path: Path, changes: dict[str, Any], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from loopgolf.cli import main

    storage = tmp_path / "sweeps"
    spec = write_spec(tmp_path / "spec.yaml", corpus_data, storage, **changes)
    with pytest.raises(LoopgolfError) as info:
        load_spec(spec)
    assert message in str(info.value)
    capsys.readouterr()
    assert main(["sweep", str(spec)]) == 2  # the CLI in this process (a fresh one per case costs seconds)
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0
    assert not storage.exists()


def test_a_bad_spec_exits_2_with_one_line_on_stderr(corpus_data: Path, tmp_path: Path) -> None:
    """The process itself: its exit status, and no import or start-up noise beside the error."""
    storage = tmp_path / "sweeps"
    spec = write_spec(tmp_path / "spec.yaml", corpus_data, storage, seeds=0)
    proc = cli("sweep", str(spec))
    assert proc.returncode == 2 and proc.stderr.startswith("loopgolf: error: ") and proc.stderr.count("\n") == 1
    assert "seeds=0: expected an integer >= 1" in proc.stderr
    assert proc.stdout == "" and not storage.exists()


def test_set_overrides_dotted_spec_fields(corpus_data: Path, tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "spec.yaml", corpus_data, tmp_path / "s")
    loaded = load_spec(spec, ["search.num_samples=5", "budget.train_seconds=7", "seeds=1"], name="other")
    assert (loaded.num_samples, loaded.train_seconds, loaded.seeds, loaded.name) == (5, 7.0, 1, "other")
    assert loaded.base_config().train.train_seconds == 7.0


def _study(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name="t", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")


def _check_ledger_and_study(sweep_dir: Path, expected: int, seeds: int) -> pd.DataFrame:
    trials = pd.read_parquet(sweep_dir / "results" / "trials.parquet")
    assert len(trials) == expected and trials["trial_id"].is_unique
    assert set(DESIGN_COLUMNS) <= set(trials.columns)
    # No configuration ran twice with one seed (one proposed again continues its seeds).
    assert (trials.groupby("config_id")["seed"].nunique() == trials.groupby("config_id").size()).all()
    assert trials.groupby("config_id").size().max() >= min(seeds, expected)
    finals = final_trials(_study(sweep_dir))
    assert sorted(finals) == sorted(trials["trial_id"])  # the study's trials are the ledger's, once each
    for trial_id in trials["trial_id"]:  # every row is its trial directory's final metrics
        assert json.loads((sweep_dir / "trials" / trial_id / "metrics.json").read_text())["status"] == "complete"
    return trials


def _wait_for(condition: Any, driver: subprocess.Popen, what: str, timeout: float = 300) -> Any:
    """Poll a condition while the driver runs (no fixed sleeps: a loaded machine only takes longer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert driver.poll() is None, f"driver exited while waiting for {what}: {_log(driver)[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _start(log: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A driver in its own process group; its output goes to a file (a pipe could fill and block it)."""
    with log.open("w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "loopgolf.cli", *args],
            stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env,
        )  # fmt: skip
    driver.log = log  # type: ignore[attr-defined]
    return driver


def _log(driver: subprocess.Popen) -> str:
    return driver.log.read_text(errors="replace")  # type: ignore[attr-defined]


def _listening_addresses(pids: list[int]) -> set[str]:
    """Local addresses of the TCP sockets these processes listen on (Linux /proc)."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:["):
                        inodes.add(link[len("socket:[") : -1])
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.add(_ip(fields[1].split(":")[0]))
    return found


def _ip(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # /proc prints 32-bit words host-order
    return str(ipaddress.ip_address(words))


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


@dataclasses.dataclass(frozen=True)
class FinishedSweep:
    """A real sweep run to its end, and what was seen of it while it ran."""

    sweep_dir: Path
    data_dir: Path
    returncode: int
    output: str
    listening: set[str]  # addresses its processes listened on once a trial had reported
    token_mode: int  # permission bits of the Ray token it wrote
    lock_pid: int  # the pid driver.lock named while it ran
    driver_pid: int


@pytest.fixture(scope="module")
def finished_sweep(corpus_data: Path, tmp_path_factory: pytest.TempPathFactory) -> FinishedSweep:
    """Two configurations x two seeds on local Ray, run once for the tests that read it."""
    tmp_path = tmp_path_factory.mktemp("finished")
    storage = tmp_path / "sweeps"
    spec = write_spec(tmp_path / "spec.yaml", corpus_data, storage,
                      search={"algorithm": "random", "objectives": {"val_bpb": "min", "artifact_bytes": "min"},
                              "num_samples": 2})  # fmt: skip
    sweep_dir = storage / "t"
    home = tmp_path / "home"  # Ray writes its token to ~/.ray/auth_token when none exists: a fresh one here
    env = os.environ | {"HOME": str(home)}
    env.pop("RAY_AUTH_MODE", None)
    driver = _start(tmp_path / "driver.log", "sweep", str(spec), env=env)
    try:
        _wait_for(lambda: list(sweep_dir.glob("trials/*/progress.jsonl")), driver, "a trial's first report")
        # Every socket the sweep listens on (driver, GCS, raylet, workers), seen mid-run.
        listening = _listening_addresses(process_tree(driver.pid))
        token_mode = stat.S_IMODE((home / ".ray" / "auth_token").stat().st_mode)
        lock_pid = json.loads((sweep_dir / "driver.lock").read_text())["pid"]
        driver.wait(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    return FinishedSweep(sweep_dir, corpus_data, driver.returncode, _log(driver), listening, token_mode, lock_pid,
                         driver.pid)  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="reads listening sockets from Linux /proc")
def test_real_sweep_one_row_and_run_per_trial_on_loopback_only(finished_sweep: FinishedSweep) -> None:
    sweep_dir, output = finished_sweep.sweep_dir, finished_sweep.output
    addresses = finished_sweep.listening
    assert addresses and all(_loopback(a) for a in addresses), addresses
    assert finished_sweep.token_mode == 0o600  # a credential: its owner's only
    assert finished_sweep.lock_pid == finished_sweep.driver_pid
    assert finished_sweep.returncode == 0, output[-3000:]
    assert "Pareto front" in output
    assert output.strip().splitlines()[-1] == "4/4 trials finished, 0 raised an error"
    assert not (sweep_dir / "driver.lock").exists()
    trials = _check_ledger_and_study(sweep_dir, expected=4, seeds=2)
    assert (trials["status"] == "complete").all() and trials["feasible"].all() and not trials["raised"].any()
    assert (trials["model_bytes"] + trials["code_bytes"] == trials["artifact_bytes"]).all()
    for path, size in zip(trials["artifact_path"], trials["model_bytes"], strict=True):  # every artifact in the sweep
        assert not Path(path).is_absolute() and (sweep_dir / path).stat().st_size == size
    curves = pd.read_parquet(sweep_dir / "results" / "curves.parquet")
    assert set(curves["trial_id"]) == set(trials["trial_id"])
    # unrouted (shared_vs_unique): no pairs; the report's grouping columns filled on every row
    assert (trials["arm"] == "no_refine").all() and trials["pair_id"].isna().all()
    manifest = json.loads((finished_sweep.data_dir / "manifest.json").read_text())
    fingerprint = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    assert (trials["data_fingerprint"] == fingerprint).all()
    assert (trials["train_budget_seconds"] == 3.0).all() and trials["hardware"].str.startswith("1 cpu ").all()
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{sweep_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(trials["trial_id"])
    assert all(r.info.status == "FINISHED" for r in runs)
    status = cli("status", str(sweep_dir))
    assert status.returncode == 0 and "4/4 trials finished (4 complete)" in status.stdout


class _Payload:
    """Unpickling this runs `touch <marker>`: planted in every file Tune wrote."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
        if p.is_file()
    }  # fmt: skip


@pytest.mark.slow
def test_killed_sweep_copied_elsewhere_resumes_there_exactly_once_without_loading_tune_state(
    corpus_data: Path, tmp_path: Path
) -> None:
    storage = tmp_path / "sweeps"
    spec = write_spec(tmp_path / "spec.yaml", corpus_data, storage,
                      budget={"artifact_bytes": 2_000_000, "train_seconds": 6},
                      search={"algorithm": "random", "objectives": {"val_bpb": "min", "artifact_bytes": "min"},
                              "num_samples": 2})  # fmt: skip
    sweep_dir = storage / "t"

    def finished() -> dict[str, dict[str, Any]]:
        found = {}
        for path in sweep_dir.glob("trials/*/metrics.json"):
            with contextlib.suppress(ValueError):  # being replaced right now
                found[path.parent.name] = json.loads(path.read_text())
        return found

    def finished_and_checkpointed() -> bool:
        # a trial finished, and an unfinished one has a complete checkpoint in its own directory,
        # early enough in its budget (training seconds, not wall) that it is still running at the kill
        in_flight = {p.parents[2].name for p in sweep_dir.glob("trials/*/checkpoints/step_*/training_state.pt")}
        for name in in_flight - set(done := finished()):
            records, progress = [], sweep_dir / "trials" / name / "progress.jsonl"
            for line in progress.read_text().splitlines() if progress.is_file() else []:
                with contextlib.suppress(ValueError):  # a line being written
                    records.append(json.loads(line))
            checkpointed = any(r.get("checkpoint_step") for r in records)
            if done and checkpointed and records and records[-1]["elapsed_seconds"] < 4.0:  # 2+ s of 6 s to go
                return True
        return False

    driver = _start(tmp_path / "driver.log", "sweep", str(spec))
    try:
        _wait_for(finished_and_checkpointed, driver, "a finished trial and a checkpointed unfinished one")
        processes = process_tree(driver.pid)  # the driver, Ray's GCS and raylet, the trials' workers
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    for pid in processes:  # kill -9 of the driver: wait until every process of its tree has died with it
        deadline = time.monotonic() + 120
        while alive(pid):
            assert time.monotonic() < deadline, f"process {pid} outlived the killed driver"
            time.sleep(0.1)
    before = pd.DataFrame.from_dict(finished(), orient="index")
    assert 1 <= len(before) < 4
    moved = tmp_path / "elsewhere" / "t-copy"
    shutil.copytree(sweep_dir, moved, symlinks=True)
    original = _digest(sweep_dir)
    marker = tmp_path / "payload-ran"
    planted = [p for p in (moved / "tune").rglob("*") if p.is_file()]
    assert {"tuner.pkl", "experiment_state"} <= {p.name.split("-")[0] for p in planted}
    for path in planted:  # Tune's pickles and state files: resume must not load any of them
        path.write_bytes(pickle.dumps(_Payload(marker)))

    proc = cli("resume", str(moved))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "4/4 trials finished, 0 raised an error"
    assert "taking over the lock of a driver that is gone" in proc.stderr  # the copied lock of the killed driver
    assert not marker.exists()
    assert _digest(sweep_dir) == original  # the original was neither read for state nor written
    trials = _check_ledger_and_study(moved, expected=4, seeds=2).set_index("trial_id")
    assert (trials["status"] == "complete").all()
    # Finished trials were not trained again: their rows are the same measurements.
    assert (trials.loc[before.index, "val_bpb"] == before["val_bpb"]).all()
    assert (trials.loc[before.index, "ended_at"] == pd.to_datetime(before["ended_at"])).all()
    assert ((trials["train_seconds"] - 6.0).abs() < 1.0).all()  # within a report interval of the budget
    assert (trials["resumed_from_step"] > 0).any()  # an in-flight trial went on from its checkpoint
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{moved / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(trials.index)  # one run per trial, resumed ones too


@pytest.mark.slow
def test_over_cap_configs_never_train_and_the_sampler_sees_them_infeasible(
    corpus_data: Path, tmp_path: Path
) -> None:
    from loopgolf.trial.config import preset
    from loopgolf.trial.estimate import predict_artifact_bytes

    small = preset("tiny").replace(d_model=32, n_heads=1, n_kv_heads=1, n_blocks=1, bits=8, codec="zlib")
    cap = predict_artifact_bytes(small) + 2_000  # only the smallest shapes fit
    storage = tmp_path / "sweeps"
    spec = write_spec(
        tmp_path / "spec.yaml", corpus_data, storage, seeds=1,
        overrides={"n_blocks": [1, 4], "n_passes": 1, "n_prelude": 0, "n_coda": 0, "d_model": 32},
        budget={"artifact_bytes": cap, "train_seconds": 2},
        search={"algorithm": "grid", "objectives": {"val_bpb": "min"}, "num_samples": 2},
    )  # fmt: skip
    proc = cli("sweep", str(spec))
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = pd.read_parquet(storage / "t" / "results" / "trials.parquet")
    rejected = trials[trials["status"] == "rejected"]
    assert len(rejected) == 1 and rejected["train_steps"].isna().all()
    assert (trials.loc[trials["status"] != "rejected", "status"] == "complete").sum() == 1  # the shape that fits
    assert (rejected["predicted_artifact_bytes"] > cap).all()
    study = _study(storage / "t")
    assert proc.stdout.strip().splitlines()[-1].startswith("2/2 trials finished, 0 raised")  # the grid ran out cleanly
    assert len(study.trials) == 2
    for t in study.trials:
        violation = t.system_attrs.get("constraints:predicted_byte_violation")
        assert violation is not None
        assert (violation > 0) == (t.params["n_blocks"] == 4)


# ------------------------------------------------------------------ extending a sweep (resume --set)

REFUSED_LATER = "so the trials so far would not be comparable with the new ones (start a new sweep)"


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["budget.train_seconds=5"], "--set budget.train_seconds=5: refused: it changes the budgets (bytes, train and "
         f"eval seconds), {REFUSED_LATER}"),
        (["budget.artifact_bytes=1000"], "refused: it changes the budgets"),
        (["data=/elsewhere"], "--set data='/elsewhere': refused: it changes the data, "),
        (["base.batch_size=4"], "refused: it changes the base configuration, "),
        (["seeds=3"], "refused: it changes the seeds per configuration, "),
        (["resources.cpu=2"], "refused: it changes the hardware a trial trains on (budgets are seconds), "),
        (["search.objectives=[val_bpb]"], "refused: it changes the objectives the study ranks"),
        (["tracking_uri=x"], "--set tracking_uri: a resume may change only search.num_samples, max_concurrent and "
         "overrides.<field>"),
        (["search.num_samples=3"], "--set search.num_samples=3: expected an integer above the sweep's 3 (a resume "
         "extends a sweep, it never shrinks it)"),
        (["search.num_samples=2"], "expected an integer above the sweep's 3"),
        (["search.num_samples=4.5"], "expected an integer above the sweep's 3"),
        (["overrides.d_model=[32]"], "overrides.d_model: [32, 64] -> [32]: a resume may only narrow a numeric range "
         "(Optuna fixes a categorical's choices and a dimension's kind for the whole study)"),
        (["overrides.refine_target={low: 0.2, high: 0.4}"],
         "overrides.refine_target: adds a dimension the sweep did not search; a resume may only narrow"),
        (["search.num_samples=5", "overrides.n_blocks=[1, 2, 3]"], "overrides.n_blocks: [1, 2] -> [1, 2, 3]"),
        (["max_concurrent=0"], "max_concurrent=0: expected an integer >= 1"),
    ],
)  # fmt: skip
def test_resume_set_refuses_what_makes_trials_incomparable(
    corpus_data: Path, tmp_path: Path, sets: list[str], message: str
) -> None:
    from loopgolf.orchestrator.extend import extended_raw

    stored = yaml.safe_load(write_spec(tmp_path / "spec.yaml", corpus_data, tmp_path / "s").read_text())
    before = json.dumps(stored, sort_keys=True)
    with pytest.raises(LoopgolfError) as info:
        extended_raw(stored, sets)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert json.dumps(stored, sort_keys=True) == before  # the stored mapping is not touched


def test_resume_set_narrows_a_range_and_records_it(corpus_data: Path, tmp_path: Path) -> None:
    from loopgolf.orchestrator.extend import extended_raw, with_history

    routing = {"space": "routing", "overrides": {"refine_target": {"low": 0.1, "high": 0.5}, "refine_passes": [0, 1]}}
    stored = yaml.safe_load(write_spec(tmp_path / "spec.yaml", corpus_data, tmp_path / "s", **routing).read_text())
    sets = ["search.num_samples=8", "overrides.refine_target={low: 0.2, high: 0.3}", "max_concurrent=1"]
    raw = extended_raw(stored, sets)
    assert raw["search"]["num_samples"] == 8 and raw["max_concurrent"] == 1
    assert raw["overrides"] == {"refine_target": {"low": 0.2, "high": 0.3}, "refine_passes": [0, 1]}
    first = with_history(raw, stored, sets, "v1")
    second = with_history(extended_raw(first, ["search.num_samples=9"]), first, ["search.num_samples=9"], "v2")
    assert [h["set"] for h in second["history"]] == [sets, ["search.num_samples=9"]]
    assert [h["code_version"] for h in second["history"]] == ["v1", "v2"]
    with pytest.raises(LoopgolfError, match=r"widens the range"):
        extended_raw(first, ["overrides.refine_target={low: 0.1, high: 0.3}"])


def test_resume_set_refused_on_the_command_line_changes_nothing(
    corpus_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from loopgolf.cli import main

    spec = load_spec(write_spec(tmp_path / "spec.yaml", corpus_data, tmp_path / "sweeps"))
    sweep_dir = Path(spec.sweep_dir)
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "spec.yaml").write_text(yaml.safe_dump(spec.to_yaml_dict(), sort_keys=False), encoding="utf-8")
    before = sorted(p.name for p in sweep_dir.iterdir()), (sweep_dir / "spec.yaml").read_bytes()
    capsys.readouterr()
    assert main(["resume", str(sweep_dir), "--set", "budget.train_seconds=5"]) == 2  # in this process: no start-up
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "refused: it changes the budgets" in err
    assert (sorted(p.name for p in sweep_dir.iterdir()), (sweep_dir / "spec.yaml").read_bytes()) == before


@pytest.mark.slow
def test_a_finished_sweep_extended_from_2_to_3_configurations_keeps_the_first_4_trials(
    finished_sweep: FinishedSweep, tmp_path: Path
) -> None:
    sweep_dir = tmp_path / "t"  # a copy: the finished sweep stays as the other tests read it
    shutil.copytree(finished_sweep.sweep_dir, sweep_dir, symlinks=True)
    before = _digest(sweep_dir / "trials")
    old_ids = sorted(pd.read_parquet(sweep_dir / "results" / "trials.parquet")["trial_id"])
    assert len(old_ids) == 4
    more = cli("resume", str(sweep_dir), "--set", "search.num_samples=3")
    assert more.returncode == 0, more.stderr[-3000:]
    assert more.stdout.strip().splitlines()[-1] == "6/6 trials finished, 0 raised an error"
    trials = _check_ledger_and_study(sweep_dir, expected=6, seeds=2)
    new_ids = sorted(set(trials["trial_id"]) - set(old_ids))
    assert len(new_ids) == 2 and min(new_ids) > max(old_ids)  # numbered after the old ones
    assert {k: v for k, v in _digest(sweep_dir / "trials").items() if k.split("/")[0] in old_ids} == before
    assert len(final_trials(_study(sweep_dir))) == 6  # one study: the sampler saw all six
    stored = yaml.safe_load((sweep_dir / "spec.yaml").read_text())
    assert stored["search"]["num_samples"] == 3 and [h["set"] for h in stored["history"]] == [["search.num_samples=3"]]


@pytest.mark.slow
def test_pareto_halving_sweep_killed_and_resumed_judges_each_trial_once_per_rung(
    corpus_data: Path, tmp_path: Path
) -> None:
    from loopgolf.analysis.pareto import pareto_front
    from loopgolf.analysis.results import load_results
    from loopgolf.orchestrator.scheduler import read_logs

    storage = tmp_path / "sweeps"
    spec = write_spec(tmp_path / "spec.yaml", corpus_data, storage, seeds=1, max_concurrent=2,
                      budget={"artifact_bytes": 2_000_000, "train_seconds": 4},
                      search={"algorithm": "random", "objectives": {"val_bpb": "min", "artifact_bytes": "min"},
                              "num_samples": 6},
                      early_stopping={"algorithm": "pareto_halving", "eta": 2, "min_seconds": 1.0})  # fmt: skip
    sweep_dir = storage / "t"
    driver = _start(tmp_path / "driver.log", "sweep", str(spec))
    try:  # kill -9 once some trial has been judged and stopped
        _wait_for(lambda: any(not d.keep for log in read_logs(sweep_dir).values() for d in log), driver, "a stop")
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    resumed = cli("resume", str(sweep_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = load_results(sweep_dir).set_index("trial_id")
    logs = read_logs(sweep_dir)
    for key, log in logs.items():
        rungs = [d.rung for d in log]
        assert rungs == sorted(set(rungs)), (key, rungs)  # never judged twice at a rung
        assert all(d.keep for d in log[:-1]), (key, log)  # nothing after a stop
        assert (trials.loc[key, "status"] == "stopped") == (not log[-1].keep), key
    stopped = set(trials.index[trials["status"] == "stopped"])
    assert stopped and stopped == {k for k, log in logs.items() if not log[-1].keep}
    assert trials.loc[sorted(stopped), "quick_val_bpb"].notna().all()
    study = {key: t.state for key, t in final_trials(_study(sweep_dir)).items()}
    assert {k for k, s in study.items() if s == optuna.trial.TrialState.PRUNED} == stopped
    front = pareto_front(trials.reset_index(), {"val_bpb": "min", "artifact_bytes": "min"})
    assert len(front) and not set(front["trial_id"]) & stopped


def test_a_spec_with_history_reads_as_its_spec(corpus_data: Path, tmp_path: Path) -> None:
    from loopgolf.orchestrator.extend import extended_raw, with_history
    from loopgolf.orchestrator.sweepdir import read_sweep_spec

    spec = load_spec(write_spec(tmp_path / "spec.yaml", corpus_data, tmp_path / "sweeps"))
    stored = spec.to_yaml_dict()
    extended = with_history(extended_raw(stored, ["search.num_samples=7"]), stored, ["search.num_samples=7"], "v")
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "spec.yaml").write_text(yaml.safe_dump(extended, sort_keys=False), encoding="utf-8")
    assert read_sweep_spec(sweep_dir) == dataclasses.replace(spec, num_samples=7)


def test_the_ledger_row_keeps_arm_pair_budget_and_both_eval_token_counts(tmp_path: Path) -> None:
    from loopgolf.orchestrator.ledger import Ledger
    from loopgolf.orchestrator.trialdir import write_json
    from loopgolf.trial.config import preset

    flat = preset("tiny").replace(refine_passes=1, signal="uniform", train_seconds=60.0, eval_tokens=4096).to_flat()
    metrics = {"status": "complete", "val_bpb": 2.0, "train_seconds": 2.5, "eval_tokens_scored": 4000}
    records = {
        "trial_00000": {"arm": "uniform", "pair_id": "abc", "data_fingerprint": "f" * 16, "hardware": "1 cpu x"},
        "trial_00001": {},  # a trial.json from before arms: the arm follows from the config
    }
    for key, extra in records.items():
        write_json(tmp_path / "trials" / key / "trial.json", {"trial_key": key, "trial_config": flat} | extra)
        write_json(tmp_path / "trials" / key / "metrics.json", metrics)
    Ledger(tmp_path, "s", "v").rebuild()
    rows = pd.read_parquet(tmp_path / "results" / "trials.parquet").set_index("trial_id")
    assert rows.loc["trial_00000", ["arm", "pair_id", "data_fingerprint", "hardware"]].tolist() == [
        "uniform", "abc", "f" * 16, "1 cpu x"]  # fmt: skip
    assert rows.loc["trial_00001", "arm"] == "uniform" and pd.isna(rows.loc["trial_00001", "pair_id"])
    assert (rows["train_budget_seconds"] == 60.0).all() and (rows["train_seconds"] == 2.5).all()
    assert (rows["eval_tokens"] == 4096).all() and (rows["eval_tokens_scored"] == 4000).all()

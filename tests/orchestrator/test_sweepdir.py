"""The sweep directory without a Ray sweep: lock, tamper-proof reading, the ledger as an index
of the trial directories, exit statuses, and spec values that used to slip through."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml

from loopgolf.errors import LoopgolfError
from loopgolf.orchestrator.ledger import Ledger, ledger_callback
from loopgolf.orchestrator.lock import LOCK_FILE, SweepLocked, acquire, release, sweep_lock
from loopgolf.orchestrator.progress import read_status
from loopgolf.orchestrator.spec import SpecError
from loopgolf.orchestrator.spec_file import load_spec
from loopgolf.orchestrator.sweep import SweepOutcome, finish_sweep
from loopgolf.orchestrator.sweepdir import SPEC_FILE, read_sweep_spec
from loopgolf.orchestrator.trainable import STATE_FILE, checkpoints, load_state, save_checkpoint
from loopgolf.orchestrator.trialdir import trial_dir, write_json
from tests.orchestrator.sweeps import cli, write_spec


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _sweep_dir(corpus_data: Path, tmp_path: Path) -> tuple[Path, Path]:
    spec_file = write_spec(tmp_path / "spec.yaml", corpus_data, tmp_path / "sweeps")
    sweep_dir = tmp_path / "sweeps" / "t"
    sweep_dir.mkdir(parents=True)
    spec = load_spec(spec_file)
    (sweep_dir / SPEC_FILE).write_text(yaml.safe_dump(spec.to_yaml_dict()), encoding="utf-8")
    return spec_file, sweep_dir


# ------------------------------------------------------------------ one driver per sweep


def test_a_second_driver_is_refused_naming_the_holder(corpus_data: Path, tmp_path: Path) -> None:
    spec_file, sweep_dir = _sweep_dir(corpus_data, tmp_path)
    (sweep_dir / "optuna.db").touch()
    with sweep_lock(sweep_dir):  # this process is the running driver
        for args in (("resume", str(sweep_dir)), ("sweep", str(spec_file))):
            proc = cli(*args)
            assert proc.returncode == 2, proc.stderr[-2000:]
            assert f"in use by another driver (PID {os.getpid()} on host {socket.gethostname()!r}" in proc.stderr
            assert proc.stderr.strip().splitlines()[-1].startswith("loopgolf: error: sweep")
    assert not (sweep_dir / LOCK_FILE).exists()  # released


def test_a_stale_lock_is_taken_over_and_a_foreign_host_lock_is_not(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started_at": "x"}))
    me = acquire(tmp_path)
    assert "taking over the lock of a driver that is gone" in capsys.readouterr().err
    assert json.loads((tmp_path / LOCK_FILE).read_text()) == me and me["pid"] == os.getpid()
    with pytest.raises(SweepLocked, match="in use by another driver"):
        acquire(tmp_path)  # held, even by this very process
    release(tmp_path, me)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": _dead_pid(), "host": "other-host", "started_at": "x"}))
    with pytest.raises(SweepLocked, match="host 'other-host'"):
        acquire(tmp_path)  # its PID means nothing here: never taken over


_RACER = """
import sys
from pathlib import Path
from loopgolf.orchestrator.lock import SweepLocked, acquire
sweep, go = Path(sys.argv[1]), Path(sys.argv[2])
while not go.exists():  # all start together
    pass
try:
    acquire(sweep)
    print("held", flush=True)
    sys.stdin.read()  # hold it until the test has counted
except SweepLocked as exc:
    print(str(exc), flush=True)
"""


def test_of_drivers_racing_for_the_lock_one_wins_and_the_others_name_it(tmp_path: Path) -> None:
    go = tmp_path / "go"
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, str(tmp_path), str(go)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True) for _ in range(6)]  # fmt: skip
    go.touch()
    lines = [r.stdout.readline().strip() for r in racers if r.stdout]
    for r in racers:
        r.communicate("", timeout=60)
    assert lines.count("held") == 1, lines
    assert all(line == "held" or "in use by another driver (PID" in line for line in lines), lines  # never empty
    winner = racers[lines.index("held")].pid  # it ended without releasing: its lock stays, complete
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == winner
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE, "go"]  # no private file left behind


# ------------------------------------------------------------------ nothing read executes code


def test_a_tampered_spec_is_refused_naming_the_file_and_runs_nothing(corpus_data: Path, tmp_path: Path) -> None:
    _, sweep_dir = _sweep_dir(corpus_data, tmp_path)
    marker = tmp_path / "ran"
    (sweep_dir / SPEC_FILE).write_text(f"!!python/object/apply:os.system ['touch {marker}']\n", encoding="utf-8")
    with pytest.raises(LoopgolfError, match=str(sweep_dir / SPEC_FILE)):
        read_sweep_spec(sweep_dir)
    proc = cli("resume", str(sweep_dir))
    assert proc.returncode == 2 and "spec.yaml': not valid YAML" in proc.stderr and not marker.exists()


def test_a_tampered_checkpoint_is_refused_naming_the_file_and_runs_nothing(tmp_path: Path) -> None:
    state = {"step": 7, "weights": torch.arange(4.0)}
    saved = save_checkpoint(state, tmp_path)
    assert load_state(saved)["step"] == 7 and torch.equal(load_state(saved)["weights"], torch.arange(4.0))
    marker = tmp_path / "ran"
    for protocol in (2, pickle.DEFAULT_PROTOCOL):
        (saved / STATE_FILE).write_bytes(pickle.dumps(_Payload(marker), protocol=protocol))
        with pytest.raises(LoopgolfError, match=str(saved / STATE_FILE)):
            load_state(saved)
    with pytest.raises(LoopgolfError, match=str(saved / STATE_FILE)):
        load_state(saved)
    assert not marker.exists()


def test_checkpoints_are_complete_newest_last_and_two_kept(tmp_path: Path) -> None:
    for step in (5, 10, 15):
        save_checkpoint({"step": step}, tmp_path)
    (tmp_path / "checkpoints" / ".staging-x").mkdir()  # a write cut off by a kill: not a checkpoint
    assert [p.name for p in checkpoints(tmp_path)] == ["step_000000010", "step_000000015"]


# ------------------------------------------------------------------ the ledger cannot break a sweep


def _finished_trial(sweep_dir: Path, key: str, metrics: dict[str, Any]) -> None:
    flat = {"d_model": 32, "n_blocks": 1, "seed": int(key[-1])}
    write_json(trial_dir(sweep_dir, key) / "trial.json", {"trial_key": key, "trial_config": flat, "config_id": "c1"})
    write_json(trial_dir(sweep_dir, key) / "metrics.json", metrics)
    (trial_dir(sweep_dir, key) / "progress.jsonl").write_text(
        json.dumps({"step": 1, "elapsed_seconds": 0.5, "train_loss": 3.0}) + "\n" + '{"step": 2, "elap'  # torn line
    )


def test_an_unreadable_ledger_is_rebuilt_from_the_trial_directories(tmp_path: Path, capsys: Any) -> None:
    ledger = Ledger(tmp_path, "t", "v")
    deciles = [0.1 * i for i in range(10)]
    _finished_trial(tmp_path, "trial_00000", {"status": "complete", "val_bpb": 2.5, "decile_ce_delta": deciles})
    ledger.record("trial_00000")
    ledger.trials_file.write_bytes(b"PAR1 garbage")  # e.g. a disk filled up under another tool
    _finished_trial(tmp_path, "trial_00001", {"status": "failed", "error": "non-finite loss", "val_bpb": None})
    ledger.record("trial_00001")
    assert "rebuilding the ledger from the trial directories" in capsys.readouterr().err
    rows = pd.read_parquet(ledger.trials_file).set_index("trial_id")
    assert list(rows.index) == ["trial_00000", "trial_00001"] and rows.loc["trial_00000", "val_bpb"] == 2.5
    assert rows.loc["trial_00001", "error"] == "non-finite loss" and not rows["raised"].any()
    assert list(rows.loc["trial_00000", "decile_ce_delta"]) == deciles  # a list column beside a trial without it
    assert rows.loc["trial_00001", "decile_ce_delta"] is None
    curves = pd.read_parquet(ledger.curves_file)
    assert len(curves) == 2 and set(curves["value"]) == {3.0}  # the torn line is skipped


def test_the_tune_callback_never_raises_into_tune(tmp_path: Path, capsys: Any) -> None:
    class Trial:  # what the callback reads of Tune's Trial
        def __init__(self) -> None:
            self.trial_id, self.error_file = "abc", None
            self.config = {"trial_key": "trial_00000", "trial_config": {"seed": 0}, "config_id": "c1"}

    callback = ledger_callback(Ledger(tmp_path / "no" / "such", "t", "v"))
    (tmp_path / "no").write_text("a file where the sweep directory should be")
    callback.on_trial_error(0, [], Trial())
    assert "warning: ledger: trial trial_00000" in capsys.readouterr().err


def test_status_reports_an_unreadable_ledger_instead_of_a_traceback(corpus_data: Path, tmp_path: Path) -> None:
    _, sweep_dir = _sweep_dir(corpus_data, tmp_path)
    _finished_trial(sweep_dir, "trial_00000", {"status": "complete", "val_bpb": 2.5, "feasible": True})
    (sweep_dir / "results").mkdir()
    (sweep_dir / "results" / "trials.parquet").write_bytes(b"not parquet")
    status = read_status(sweep_dir)
    assert status.counts.finished == 1 and "trials.parquet: unreadable" in str(status.ledger_problem)
    proc = cli("status", str(sweep_dir))
    assert proc.returncode == 0 and "warning:" in proc.stdout and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ exit statuses


def test_exit_status_counts_raised_trials_and_a_diverged_trial_is_not_an_error(
    corpus_data: Path, tmp_path: Path
) -> None:
    import optuna

    _, sweep_dir = _sweep_dir(corpus_data, tmp_path)
    spec = read_sweep_spec(sweep_dir)
    optuna.create_study(study_name="t", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    ledger = Ledger(sweep_dir, "t", "v")
    _finished_trial(sweep_dir, "trial_00000", {"status": "complete", "val_bpb": 2.5, "feasible": True})
    _finished_trial(sweep_dir, "trial_00001", {"status": "failed", "error": "non-finite loss (diverged)"})
    ok = finish_sweep(spec, sweep_dir, ledger, None)
    assert (ok.exit_status, ok.raised, ok.finished) == (0, 0, 2)
    assert ok.last_line() == "2/6 trials finished, 0 raised an error"
    _finished_trial(sweep_dir, "trial_00002", {"status": "failed", "error": "RuntimeError: boom", "raised": True})
    bad = finish_sweep(spec, sweep_dir, ledger, None)
    assert bad.exit_status == 1 and bad.last_line() == "3/6 trials finished, 1 raised an error (exit 1)"
    searcher = SweepOutcome(sweep_dir, 6, 3, 1, 0, "RuntimeError: x")
    assert searcher.exit_status == 3 and "the searcher failed (RuntimeError: x)" in searcher.last_line()


# ------------------------------------------------------------------ spec values


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": "."}, "name='.': expected letters"),
        ({"name": ".."}, "name='..': expected letters"),
        ({"budget": {"artifact_bytes": "lots", "train_seconds": 3}}, "artifact_bytes='lots': expected a number"),
    ],
)
def test_more_bad_specs_fail_with_one_line(
    corpus_data: Path, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    spec = write_spec(tmp_path / "spec.yaml", corpus_data, tmp_path / "sweeps", **changes)
    with pytest.raises(SpecError, match=message):
        load_spec(spec)
    proc = cli("sweep", str(spec))
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert not (tmp_path / "sweeps").exists()


def test_storage_naming_a_file_fails_with_one_line(corpus_data: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    spec = write_spec(tmp_path / "spec.yaml", corpus_data, tmp_path / "afile")
    proc = cli("sweep", str(spec))
    assert proc.returncode == 2 and "storage=" in proc.stderr and "is a file" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_yaml_exponent_numbers_are_numbers(corpus_data: Path, tmp_path: Path) -> None:
    text = write_spec(tmp_path / "s.yaml", corpus_data, tmp_path / "sweeps").read_text()
    raw = yaml.safe_load(text)
    raw["budget"] = {"artifact_bytes": "2e6", "train_seconds": "3e0"}  # what YAML 1.1 makes of 2e6 and 3e0
    raw["base"]["eval_tokens"] = "4.096e3"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    assert yaml.safe_load("x: 2e6")["x"] == "2e6"  # the reason
    spec = load_spec(tmp_path / "s.yaml")
    assert (spec.artifact_bytes, spec.train_seconds) == (2_000_000, 3.0) and isinstance(spec.artifact_bytes, int)
    assert spec.base_config().train.eval_tokens == 4096


def test_report_out_naming_a_file_fails_with_one_line(tmp_path: Path) -> None:
    _finished_trial(tmp_path, "trial_00000", {"status": "complete", "val_bpb": 2.5, "feasible": True})
    Ledger(tmp_path, "t", "v").rebuild()
    (tmp_path / "afile").write_text("x")
    proc = cli("report", str(tmp_path), "--out", str(tmp_path / "afile"))
    assert proc.returncode == 2 and "is a file; expected a directory" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and (tmp_path / "afile").read_text() == "x"


def test_analysis_reads_the_ledger_schema_without_importing_ray() -> None:
    code = (
        "import sys, loopgolf.analysis.results, loopgolf.analysis.pareto, loopgolf.analysis.report\n"
        "print(sorted(m for m in ('ray', 'optuna', 'mlflow') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-2000:]

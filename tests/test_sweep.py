"""Sweeps: spec validation, a real sweep on local Ray, and resume after SIGKILL of the driver."""

from __future__ import annotations

import os
import signal
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
from loopgolf.orchestrator.spec import load_spec

DESIGN_COLUMNS = [
    "sweep", "trial_id", "status", "seed", "host", "node_id", "started_at", "ended_at", "code_version",
    "val_bpb", "val_bpb_prequant", "val_loss", "artifact_bytes", "model_bytes", "code_bytes", "params",
    "train_seconds", "train_tokens", "train_steps", "eval_seconds", "eval_passes_per_token",
    "eval_flops_per_token", "refine_fraction", "feasible", "d_model", "n_blocks", "n_passes", "signal", "bits",
]  # fmt: skip


def write_spec(path: Path, data_dir: Path, storage: Path, **changes: Any) -> Path:
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
    }
    for key, value in changes.items():
        spec[key] = value
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loopgolf.orchestrator.cli", *args], capture_output=True, text=True, timeout=timeout
    )


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
    corpus_data: Path, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    storage = tmp_path / "sweeps"
    spec = write_spec(tmp_path / "spec.yaml", corpus_data, storage, **changes)
    with pytest.raises(LoopgolfError) as info:
        load_spec(spec)
    assert message in str(info.value)
    proc = cli("sweep", str(spec))
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert not storage.exists()


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
    study = _study(sweep_dir)
    finished = [t for t in study.trials if t.state.is_finished() and not t.user_attrs.get("orphaned")]
    assert len(finished) == expected
    return trials


@pytest.mark.slow
def test_real_sweep_writes_one_row_and_one_mlflow_run_per_trial(corpus_data: Path, tmp_path: Path) -> None:
    storage = tmp_path / "sweeps"
    spec = write_spec(tmp_path / "spec.yaml", corpus_data, storage)
    proc = cli("sweep", str(spec))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Pareto front" in proc.stdout
    sweep_dir = storage / "t"
    trials = _check_ledger_and_study(sweep_dir, expected=6, seeds=2)
    assert (trials["status"] == "complete").all() and trials["feasible"].all()
    assert (trials["model_bytes"] + trials["code_bytes"] == trials["artifact_bytes"]).all()
    for path, size in zip(trials["artifact_path"], trials["model_bytes"], strict=True):  # every artifact in the sweep
        assert Path(path).is_relative_to(sweep_dir.resolve()) and Path(path).stat().st_size == size
    curves = pd.read_parquet(sweep_dir / "results" / "curves.parquet")
    assert set(curves["trial_id"]) == set(trials["trial_id"])
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{sweep_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(trials["trial_id"])
    assert all(r.info.status == "FINISHED" for r in runs)
    status = cli("status", str(sweep_dir))
    assert status.returncode == 0 and "6/6 trials finished (6 complete)" in status.stdout


@pytest.mark.slow
def test_driver_sigkill_then_resume_runs_every_trial_exactly_once(corpus_data: Path, tmp_path: Path) -> None:
    storage = tmp_path / "sweeps"
    spec = write_spec(tmp_path / "spec.yaml", corpus_data, storage, budget={"artifact_bytes": 2_000_000,
                      "train_seconds": 6})  # fmt: skip
    sweep_dir = storage / "t"
    driver = subprocess.Popen(
        [sys.executable, "-m", "loopgolf.orchestrator.cli", "sweep", str(spec)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # kill once a trial finished and an unfinished one has checkpointed
            ledger = sweep_dir / "results" / "trials.parquet"
            done = set(pd.read_parquet(ledger)["trial_id"]) if ledger.is_file() else set()
            in_flight = {p.parent.name for p in sweep_dir.glob("*/checkpoint_*")}
            if done and any(not any(t in name for t in done) for name in in_flight):
                break
            assert driver.poll() is None, driver.stdout.read()[-3000:] if driver.stdout else ""
            time.sleep(0.25)
        time.sleep(2.5)  # > TUNE_GLOBAL_CHECKPOINT_S: the experiment state has registered that checkpoint
        os.killpg(driver.pid, signal.SIGKILL)
    finally:
        driver.wait()
    before = pd.read_parquet(sweep_dir / "results" / "trials.parquet")
    assert 1 <= len(before) < 6
    proc = cli("resume", str(sweep_dir))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    trials = _check_ledger_and_study(sweep_dir, expected=6, seeds=2)
    assert set(before["trial_id"]) <= set(trials["trial_id"])
    assert (trials["status"] == "complete").all()
    assert ((trials["train_seconds"] - 6.0).abs() < 1.0).all()  # within a report interval of the budget
    assert (trials["resumed_from_step"] > 0).any()  # an in-flight trial went on from its checkpoint


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
        overrides={"n_blocks": [1, 4], "n_passes": 1, "n_prelude": 0, "n_coda": 0, "d_model": [32, 64]},
        budget={"artifact_bytes": cap, "train_seconds": 2},
        search={"algorithm": "grid", "objectives": {"val_bpb": "min"}, "num_samples": 4},
    )  # fmt: skip
    proc = cli("sweep", str(spec))
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = pd.read_parquet(storage / "t" / "results" / "trials.parquet")
    rejected = trials[trials["status"] == "rejected"]
    assert len(rejected) >= 1 and rejected["train_steps"].isna().all()
    assert (rejected["predicted_artifact_bytes"] > cap).all()
    study = _study(storage / "t")
    for t in study.trials:
        violation = t.system_attrs.get("constraints:predicted_byte_violation")
        assert violation is not None
        config_rejected = t.params["n_blocks"] == 4 or t.params["d_model"] == 64
        assert (violation > 0) == config_rejected

"""The ledger (orchestrator/ledger.py): one row per trial, upserted by key; one curve row per
(step, metric), a re-run's value replacing the lost run's; only finished trials are rows.

    python -m pytest tests/test_ledger.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from loopgolf.orchestrator.ledger import Ledger, curve_rows
from loopgolf.orchestrator.trialdir import trial_dir, write_json


def _trial(sweep_dir: Path, key: str, metrics: dict[str, Any], progress: list[dict[str, Any]] = ()) -> None:
    flat = {"d_model": 32, "n_blocks": 1, "seed": int(key[-1])}
    write_json(trial_dir(sweep_dir, key) / "trial.json", {"trial_key": key, "trial_config": flat, "config_id": "c"})
    write_json(trial_dir(sweep_dir, key) / "metrics.json", metrics)
    lines = "".join(json.dumps(p) + "\n" for p in progress)
    (trial_dir(sweep_dir, key) / "progress.jsonl").write_text(lines, encoding="utf-8")


def _rows(ledger: Ledger) -> pd.DataFrame:
    return pd.read_parquet(ledger.trials_file).set_index("trial_id")


def test_record_upserts_one_row_per_trial_and_keeps_the_others(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, "s", "v")
    for key, bpb in (("trial_00000", 2.5), ("trial_00001", 2.4), ("trial_00002", 2.3)):
        _trial(tmp_path, key, {"status": "complete", "val_bpb": bpb})
        ledger.record(key)
    _trial(tmp_path, "trial_00001", {"status": "complete", "val_bpb": 2.0})  # its re-run finished
    ledger.record("trial_00001")
    rows = _rows(ledger)
    assert sorted(rows.index) == ["trial_00000", "trial_00001", "trial_00002"]  # no duplicate, none lost
    assert rows["val_bpb"].to_dict() == {"trial_00000": 2.5, "trial_00001": 2.0, "trial_00002": 2.3}
    assert (rows["sweep"] == "s").all() and (rows["code_version"] == "v").all()
    assert rows["seed"].to_dict() == {"trial_00000": 0, "trial_00001": 1, "trial_00002": 2}


def test_record_then_rebuild_give_the_same_tables(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, "s", "v")
    steps = [{"step": s, "elapsed_seconds": s / 2, "train_loss": 4.0 - s, "quick_val_bpb": 3.0 - s} for s in (1, 2)]
    for key in ("trial_00000", "trial_00001"):
        _trial(tmp_path, key, {"status": "complete", "val_bpb": 2.5}, steps)
        ledger.record(key)
    recorded = (pd.read_parquet(ledger.trials_file), pd.read_parquet(ledger.curves_file))
    assert ledger.rebuild() == 2
    pd.testing.assert_frame_equal(recorded[0], pd.read_parquet(ledger.trials_file))
    pd.testing.assert_frame_equal(recorded[1], pd.read_parquet(ledger.curves_file))
    assert len(recorded[1]) == 2 * 2 * 2  # trials x steps x metrics


def test_a_step_reported_again_after_a_resume_is_one_curve_row_with_the_later_value(tmp_path: Path) -> None:
    progress = [
        {"step": 10, "elapsed_seconds": 5.0, "train_loss": 3.0, "train_tokens": 100},
        {"step": 20, "elapsed_seconds": 10.0, "train_loss": 2.8},  # lost with the killed run
        {"step": 20, "elapsed_seconds": 10.2, "train_loss": 2.7, "quick_val_bpb": float("nan")},  # the re-run
        {"elapsed_seconds": 11.0, "train_loss": 9.9},  # no step: not a curve point
    ]
    _trial(tmp_path, "trial_00000", {"status": "complete"}, progress)
    rows = curve_rows("s", trial_dir(tmp_path, "trial_00000"))
    assert [(r["step"], r["metric"], r["value"], r["elapsed_seconds"]) for r in rows] == [
        (10, "train_loss", 3.0, 5.0),
        (20, "train_loss", 2.7, 10.2),  # a NaN quick_val_bpb is no point
    ]
    assert rows[0]["train_tokens"] == 100 and rows[1]["train_tokens"] == 0


@pytest.mark.parametrize("status", ["running", "COMPLETE", None, ""])
def test_a_trial_without_a_final_status_is_no_row(tmp_path: Path, status: str | None) -> None:
    ledger = Ledger(tmp_path, "s", "v")
    _trial(tmp_path, "trial_00000", {"status": "complete", "val_bpb": 2.5})
    _trial(tmp_path, "trial_00001", {"status": status, "val_bpb": 1.0})
    assert ledger.rebuild() == 1 and list(_rows(ledger).index) == ["trial_00000"]
    with pytest.raises(Exception, match="has no final metrics"):
        ledger.record("trial_00001")


def test_record_failure_writes_the_trials_own_metrics_and_keeps_its_config(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, "s", "v")
    config = {"trial_key": "trial_00003", "trial_config": {"d_model": 48, "seed": 3}, "config_id": "c9"}
    ledger.record_failure("trial_00003", config, "RuntimeError: boom", raised=True)
    row = _rows(ledger).loc["trial_00003"]
    assert (row["status"], row["error"], bool(row["raised"])) == ("failed", "RuntimeError: boom", True)
    assert (row["d_model"], row["config_id"]) == (48, "c9")

"""The ledger (orchestrator/ledger.py; its schema, ledger_schema.py): one row per trial,
upserted by key; one curve row per (step, metric), a re-run's value replacing the lost
run's; only finished trials are rows.

    python -m pytest tests/orchestrator/test_ledger.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loopgolf.errors import LoopgolfError, first_line
from loopgolf.orchestrator.ledger import (
    Ledger,
    _config_record,
    _error_line,
    curve_rows,
    ledger_callback,
    stopped_metrics,
    trial_row,
)
from loopgolf.orchestrator.ledger_schema import _arrow_type, _merge, curves_schema, trials_schema, write_table
from loopgolf.orchestrator.trialdir import read_json, trial_dir, write_json


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


# ------------------------------------------------------------------ rows of one trial


def test_a_trial_row_holds_identity_config_metrics_and_relative_paths(tmp_path: Path) -> None:
    metrics = {
        "status": "complete", "val_bpb": 2.5, "artifact_path": "/elsewhere/run/model.lgart",
        "eval_tokens_path": "", "started_at": "2026-12-02T10:00:00+00:00", "ended_at": None,
        "decile_ce_delta": [0.1] * 10, "per_layer": {"a": 1}, "seed": 9,
    }  # fmt: skip
    directory = trial_dir(tmp_path, "trial_00004")
    write_json(directory / "trial.json", {"trial_config": {"d_model": 32}, "config_id": "c1",
                                          "predicted_artifact_bytes": 1234})
    row = trial_row("s", "v", directory, metrics)
    assert row["artifact_path"] == "trials/trial_00004/model.lgart"  # movable with the sweep
    assert row["eval_tokens_path"] == ""  # empty: left as it was
    assert row["started_at"] == pd.Timestamp("2026-12-02T10:00:00+00:00") and row["ended_at"] is pd.NaT
    assert row["decile_ce_delta"] == [0.1] * 10 and row["decile_refined_frac"] is None and "per_layer" not in row
    assert (row["seed"], row["predicted_artifact_bytes"], row["config_id"]) == (9, 1234, "c1")  # from the metrics
    assert (row["sweep"], row["code_version"], row["trial_id"], row["raised"], row["error"]) == (
        "s", "v", "trial_00004", False, None)
    write_json(directory / "trial.json", {"trial_config": {"seed": 3}})
    row = trial_row("s", "v", directory, metrics | {"predicted_artifact_bytes": 99, "raised": 1})
    assert (row["seed"], row["predicted_artifact_bytes"], row["raised"]) == (3, 99, True)  # the config's seed wins


def test_a_stopped_trial_records_where_its_curve_ended(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, "s", "v")
    progress = [{"step": 5, "elapsed_seconds": 2.0, "quick_val_bpb": 3.1, "train_tokens": 50},
                {"step": 9, "elapsed_seconds": 4.0, "quick_val_bpb": 2.9, "train_tokens": 90},
                {"note": "no elapsed seconds: not a report"}]
    _trial(tmp_path, "trial_00001", {}, progress)
    (trial_dir(tmp_path, "trial_00001") / "metrics.json").unlink()
    ledger.record_stopped("trial_00001", {"trial_config": {"d_model": 64}})
    row = _rows(ledger).loc["trial_00001"]
    assert (row["status"], row["quick_val_bpb"], row["train_seconds"], row["train_steps"], row["train_tokens"]) == (
        "stopped", 2.9, 4.0, 9, 90)
    assert row["error"] == "stopped before its final metrics (early stopping)" and not row["raised"]
    assert row["d_model"] == 32  # the trial's own config file is kept, not overwritten
    assert stopped_metrics(tmp_path) == {
        "status": "stopped", "error": "stopped before its final metrics (early stopping)", "raised": False,
        "quick_val_bpb": None, "train_seconds": 0.0, "train_steps": 0, "train_tokens": 0}


def test_an_unreadable_ledger_is_rebuilt_from_the_trial_directories(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    ledger = Ledger(tmp_path, "s", "v")
    for key in ("trial_00000", "trial_00001"):
        _trial(tmp_path, key, {"status": "complete", "val_bpb": 2.0})
    ledger.trials_file.parent.mkdir(parents=True)
    ledger.trials_file.write_bytes(b"not parquet")
    ledger.record("trial_00001")
    assert sorted(_rows(ledger).index) == ["trial_00000", "trial_00001"]
    err = capsys.readouterr().err
    assert re.search(r"trials\.parquet: unreadable \(.*[Pp]arquet.*\); rebuilding", err)
    assert "trials.parquet: unreadable (" in err and "; rebuilding the ledger from the trial directories" in err
    assert ledger.finished_dirs()[0][0].name == "trial_00000" and len(ledger.finished_dirs()) == 2


# ------------------------------------------------------------------ the Parquet writer


def test_write_table_casts_to_the_schema_adds_its_missing_columns_and_keeps_extras(tmp_path: Path) -> None:
    fields = [pa.field("n", pa.int64()), pa.field("x", pa.float64()), pa.field("when", pa.timestamp("us", tz="UTC"))]
    schema = pa.schema(fields, metadata={"k": "v"})
    when = pd.Series(pd.to_datetime(["2026-12-02 12:00:00.1234567"]).tz_localize("Europe/Paris"))
    df = pd.DataFrame({"extra": ["e"], "n": [3.0], "when": when})
    table = pq.read_table(write_table(df, tmp_path / "t.parquet", schema))
    assert table.column_names == ["n", "x", "when", "extra"] and table.schema.metadata == {b"k": b"v"}
    assert table.schema.field("n").type == pa.int64() and table.column("x").null_count == 1
    assert [f.type for f in table.schema][:3] == [pa.int64(), pa.float64(), pa.timestamp("us", tz="UTC")]
    assert table.column("when").to_pylist()[0] == pd.Timestamp("2026-12-02 11:00:00.123456", tz="UTC").to_pydatetime()
    with pytest.raises(LoopgolfError, match=r"^column 'n': cannot store as int64 \("):
        write_table(pd.DataFrame({"n": [1.5]}), tmp_path / "bad.parquet", schema)
    with pytest.raises(LoopgolfError, match=r"^duplicate columns: \['n'\]$"):
        write_table(pd.DataFrame([[1, 2]], columns=["n", "n"]), tmp_path / "dup.parquet", schema)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]  # nothing half-written


def test_write_table_conforms_an_arrow_table(tmp_path: Path) -> None:
    schema = pa.schema([pa.field("n", pa.int64()), pa.field("s", pa.string())], metadata={"k": "v"})
    table = pa.table({"z": [1.5], "n": pa.array([7], pa.int32())})
    back = pq.read_table(write_table(table, tmp_path / "t.parquet", schema))
    assert back.column_names == ["n", "s", "z"]
    assert [f.type for f in back.schema] == [pa.int64(), pa.string(), pa.float64()]
    assert back.to_pylist() == [{"n": 7, "s": None, "z": 1.5}] and back.schema.metadata == {b"k": b"v"}
    assert pq.read_table(write_table(table, tmp_path / "raw.parquet")).column_names == ["z", "n"]  # no schema: as is
    with pytest.raises(LoopgolfError, match=r"^.*u\.parquet: column 's' is list<item: int64>, expected string \("):
        write_table(pa.table({"s": [[1]]}), tmp_path / "u.parquet", schema)


def test_the_schema_refuses_a_column_of_two_types_and_an_unknown_annotation() -> None:
    with pytest.raises(TypeError, match=r"^column 'a' is int64 and string$"):
        _merge([pa.field("a", pa.int64())], [pa.field("a", pa.string())])
    merged = _merge([pa.field("a", pa.int64())], [pa.field("a", pa.int64()), pa.field("b", pa.bool_())])
    assert [f.name for f in merged] == ["a", "b"]
    with pytest.raises(TypeError, match=r"^X\.f: no Parquet type for annotation <class 'bytes'>$"):
        _arrow_type(bytes, "X.f")
    types = [_arrow_type(h, "h") for h in (bool, int, float, str, Literal["a"], tuple[str, ...])]
    assert types == [pa.bool_(), pa.int64(), pa.float64(), pa.string(), pa.string(), pa.list_(pa.string())]
    with pytest.raises(TypeError):
        _arrow_type(tuple[int, ...], "h")
    schema = trials_schema()
    assert schema.metadata == {b"loopgolf.table": b"trials", b"loopgolf.schema_version": b"1"}
    assert schema.names.count("seed") == 1 and schema.names[:2] == ["sweep", "trial_id"]
    assert curves_schema().metadata[b"loopgolf.table"] == b"curves"


# ------------------------------------------------------------------ the Tune callback's helpers


def test_the_error_line_is_the_last_line_of_the_trials_error_file(tmp_path: Path) -> None:
    error = tmp_path / "error.txt"
    error.write_text("Traceback\n  ...\nRuntimeError: " + "x" * 600 + "\n\n", encoding="utf-8")
    assert _error_line(SimpleNamespace(error_file=str(error))) == ("RuntimeError: " + "x" * 600)[:500]
    default = "the trial raised (see its error.txt)"
    assert _error_line(SimpleNamespace(error_file=None)) == default
    assert _error_line(SimpleNamespace(error_file=str(tmp_path / "missing.txt"))) == default
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    assert _error_line(SimpleNamespace(error_file=str(tmp_path / "empty.txt"))) == default
    record = {"trial_key": "k", "trial_config": {}, "config_id": "c", "predicted_artifact_bytes": 1}
    assert _config_record(record | {"other": 2}) == record


def test_curves_carry_the_sweep_and_trial_and_a_rerecorded_trial_replaces_its_curve(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, "s", "v")
    assert ledger.rebuild() == 0  # no trials directory yet: empty tables
    first = [{"step": 1, "elapsed_seconds": 1.0, "train_loss": 4.0, "train_tokens": 10}]
    _trial(tmp_path, "trial_00000", {"status": "complete"}, first)
    _trial(tmp_path, "trial_00001", {"status": "complete"}, first)
    ledger.record("trial_00000")
    ledger.record("trial_00001")
    again = [*first, {"step": 2, "elapsed_seconds": 2.0, "train_loss": 3.5, "train_tokens": 20}]
    _trial(tmp_path, "trial_00000", {"status": "complete"}, again)  # its re-run reported one more step
    ledger.record("trial_00000")
    curves = pq.read_table(ledger.curves_file)
    assert curves.schema.metadata == curves_schema().metadata and curves.schema.field("train_tokens").type == pa.int64()
    points = sorted((r["trial_id"], r["sweep"], r["step"], r["value"]) for r in curves.to_pylist())
    assert points == [("trial_00000", "s", 1, 4.0), ("trial_00000", "s", 2, 3.5), ("trial_00001", "s", 1, 4.0)]
    ledger.rebuild()
    assert pq.read_table(ledger.curves_file).schema == curves.schema


def test_curve_rows_skip_what_is_not_a_point_and_go_on(tmp_path: Path) -> None:
    progress = [
        {"elapsed_seconds": 0.5, "train_loss": 9.0},  # no step
        {"step": 1, "elapsed_seconds": 1.0, "quick_val_bpb": 3.0},  # no train_loss: the other metrics still count
        {"step": 2, "elapsed_seconds": 2.0, "train_loss": None, "lr_scale": 0.5},
    ]
    _trial(tmp_path, "trial_00000", {"status": "complete"}, progress)
    rows = curve_rows("s", trial_dir(tmp_path, "trial_00000"))
    assert [(r["step"], r["metric"], r["value"]) for r in rows] == [(1, "quick_val_bpb", 3.0), (2, "lr_scale", 0.5)]
    assert {(r["sweep"], r["trial_id"]) for r in rows} == {("s", "trial_00000")}


def test_first_lines_of_exceptions() -> None:
    assert first_line(ValueError("  bad\nmore  ")) == "bad"
    assert first_line(ValueError()) == "ValueError"


def test_a_trial_without_a_config_record_and_a_stopped_one_without_a_trial_file(tmp_path: Path) -> None:
    directory = trial_dir(tmp_path, "trial_00002")
    write_json(directory / "trial.json", {"config_id": "c"})
    metrics = {"status": "complete", "eval_tokens_path": "/x/y/tokens.npy", "raised": False}
    row = trial_row("s", "v", directory, metrics)
    assert (row["eval_tokens_path"], row["seed"], row["raised"]) == ("trials/trial_00002/tokens.npy", None, False)
    ledger = Ledger(tmp_path, "s", "v")
    ledger.record_stopped("trial_00003", {"trial_key": "trial_00003", "trial_config": {"d_model": 64, "seed": 3}})
    assert read_json(trial_dir(tmp_path, "trial_00003") / "trial.json")["trial_config"] == {"d_model": 64, "seed": 3}
    row = _rows(ledger).loc["trial_00003"]
    assert (row["status"], row["d_model"], row["train_steps"]) == ("stopped", 64, 0)


def test_the_error_line_survives_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    error = tmp_path / "error.txt"
    error.write_bytes(b"Traceback\nValueError: caf\xe9\n")
    assert _error_line(SimpleNamespace(error_file=str(error))) == "ValueError: caf\ufffd"
    assert _error_line(SimpleNamespace()) == "the trial raised (see its error.txt)"  # no error_file attribute


def test_the_tune_callback_records_complete_stopped_and_errored_trials_and_never_raises(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ledger = Ledger(tmp_path, "s", "v")
    callback = ledger_callback(ledger)
    _trial(tmp_path, "trial_00000", {"status": "complete", "val_bpb": 2.5})
    callback.on_trial_complete(0, [], SimpleNamespace(config={"trial_key": "trial_00000"}, trial_id="t0"))
    stopped = {"trial_key": "trial_00001", "trial_config": {"d_model": 48}, "other": 1}
    callback.on_trial_complete(1, [], SimpleNamespace(config=stopped, trial_id="t1"))  # no final metrics: stopped
    (tmp_path / "err.txt").write_text("Traceback\nRuntimeError: boom\n", encoding="utf-8")
    errored = SimpleNamespace(config={"trial_config": {"d_model": 40}}, trial_id="trial_00002",
                              error_file=str(tmp_path / "err.txt"))
    callback.on_trial_error(2, [], errored)  # no trial_key: Tune's id names the directory
    rows = _rows(ledger)
    assert rows["status"].to_dict() == {"trial_00000": "complete", "trial_00001": "stopped", "trial_00002": "failed"}
    assert (rows.loc["trial_00002", "error"], bool(rows.loc["trial_00002", "raised"])) == ("RuntimeError: boom", True)
    assert (rows.loc["trial_00001", "d_model"], rows.loc["trial_00002", "d_model"]) == (48, 40)
    assert read_json(trial_dir(tmp_path, "trial_00001") / "trial.json") == {k: v for k, v in stopped.items()
                                                                          if k != "other"}
    ledger.trials_file.unlink()
    ledger.trials_file.mkdir()  # a table that cannot be written: a warning, not an exception into Tune
    callback.on_trial_complete(3, [], SimpleNamespace(config={"trial_key": "trial_00000"}, trial_id="t0"))
    err = capsys.readouterr().err
    assert err.startswith("loopgolf: warning: ledger: trial trial_00000: ") and not err.rstrip().endswith(": None")


def test_missing_values_are_nulls_and_extra_columns_keep_their_type_or_are_named(tmp_path: Path) -> None:
    schema = pa.schema([pa.field("n", pa.int64()), pa.field("x", pa.float64())])
    when = pd.Series(pd.to_datetime(["2026-12-02 12:00:00"] * 2).tz_localize("Europe/Paris"))
    df = pd.DataFrame({"n": [3.0, float("nan")], "x": [1.0, float("nan")], "extra": [0.5, float("nan")], "when": when})
    table = pq.read_table(write_table(df, tmp_path / "t.parquet", schema))
    assert table.column("n").to_pylist() == [3, None] and table.column("x").to_pylist() == [1.0, None]  # null, not NaN
    assert table.column("extra").to_pylist() == [0.5, None]
    when_type = table.schema.field("when").type  # an extra column: its own type, zone included
    assert pa.types.is_timestamp(when_type) and when_type.tz == "Europe/Paris"
    assert table.column("when").to_pylist()[0] == when[0].to_pydatetime()
    mixed = pd.DataFrame({"mix": pd.Series(["a", 1], dtype=object)})
    with pytest.raises(LoopgolfError, match=r"^column 'mix': cannot store as None \((?!None\))"):
        write_table(mixed, tmp_path / "m.parquet", schema)
    with pytest.raises(LoopgolfError, match=r"^column 'n': cannot store as int64 \((?!None\))"):
        write_table(pd.DataFrame({"n": [1.5]}), tmp_path / "bad.parquet", schema)

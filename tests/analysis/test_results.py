"""analysis/results.py: what the writer stores and the loaders return, beyond the schema basics.

(The schema, plain-pandas and error-message cases shared with the report live in test_analysis.py.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loopgolf.analysis.results import (
    CURVES_FILE,
    TRIALS_FILE,
    curves_schema,
    feasible_complete,
    load_curves,
    load_results,
    trials_files,
    trials_schema,
    write_table,
)
from loopgolf.errors import LoopgolfError


def _rows(**columns: list) -> pd.DataFrame:
    n = len(next(iter(columns.values())))
    return pd.DataFrame({"trial_id": [f"t{i}" for i in range(n)], "status": ["complete"] * n} | columns)


def test_extra_columns_survive_the_writer_and_the_loader_after_the_schema(tmp_path: Path) -> None:
    df = _rows(val_bpb=[1.0, 2.0], my_note=["a", "b"], my_count=[3, 4])
    write_table(df, tmp_path / "sw" / TRIALS_FILE, trials_schema())
    loaded = load_results(tmp_path / "sw")
    schema_names = trials_schema().names
    assert list(loaded.columns) == [*schema_names, "my_note", "my_count"]
    assert loaded["my_note"].tolist() == ["a", "b"] and loaded["my_count"].tolist() == [3, 4]
    assert loaded["val_bpb"].tolist() == [1.0, 2.0]


def test_write_table_without_a_schema_keeps_the_frame_as_it_is(tmp_path: Path) -> None:
    df = pd.DataFrame({"b": [1, 2], "a": ["x", "y"]})
    path = write_table(df, tmp_path / "deep" / "x.parquet")
    table = pq.read_table(path)
    assert table.column_names == ["b", "a"] and table.schema.metadata is None
    assert table.column("b").type == pa.int64()


def test_write_table_conforms_an_arrow_table_to_the_schema(tmp_path: Path) -> None:
    table = pa.table({"value": pa.array([1, 2], pa.int32()), "trial_id": ["a", "b"], "extra": [True, False]})
    path = write_table(table, tmp_path / CURVES_FILE, curves_schema())
    written = pq.read_table(path)
    assert written.column_names == [*curves_schema().names, "extra"]
    assert written.column("value").type == pa.float64() and written.column("value").to_pylist() == [1.0, 2.0]
    assert written.column("step").null_count == 2
    assert written.schema.metadata[b"loopgolf.table"] == b"curves"
    raw = write_table(table, tmp_path / "raw.parquet")  # no schema: the table as given
    assert pq.read_table(raw).column("value").type == pa.int32()


def test_an_int_column_with_nulls_is_stored_as_int64(tmp_path: Path) -> None:
    df = _rows(d_model=[128.0, np.nan], artifact_bytes=[1_000_000.0, 2_000_000.0])
    path = write_table(df, tmp_path / "t.parquet", trials_schema())
    table = pq.read_table(path)
    assert table.column("d_model").type == pa.int64() and table.column("d_model").to_pylist() == [128, None]
    assert table.column("artifact_bytes").to_pylist() == [1_000_000, 2_000_000]


def test_timestamps_are_stored_as_utc_instants(tmp_path: Path) -> None:
    local = pd.Series(pd.to_datetime(["2025-01-01 12:00:00"]).tz_localize("Europe/Paris"))
    path = write_table(_rows(started_at=local.tolist()), tmp_path / "t.parquet", trials_schema())
    stored = pq.read_table(path).column("started_at")
    assert stored.type == pa.timestamp("us", tz="UTC")
    assert stored.to_pylist()[0] == pd.Timestamp("2025-01-01 11:00:00", tz="UTC")


def test_a_column_that_cannot_be_stored_fails_and_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(LoopgolfError, match=r"^column 'd_model': cannot store as int64 \(.+\)$"):
        write_table(_rows(d_model=["wide"]), tmp_path / "t.parquet", trials_schema())
    with pytest.raises(LoopgolfError, match=r"^duplicate columns: \['a'\]$"):
        write_table(pd.DataFrame([[1, 2]], columns=["a", "a"]), tmp_path / "t.parquet")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_removes_its_temporary_file_and_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_table(_rows(val_bpb=[1.0]), tmp_path / "t.parquet", trials_schema())
    before = path.read_bytes()

    def disk_full(table: pa.Table, where: Any) -> None:  # `where` is the open temporary file
        where.write(b"PAR1 half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(pq, "write_table", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_table(_rows(val_bpb=[2.0]), path, trials_schema())
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"] and path.read_bytes() == before


def test_a_loaded_column_of_the_wrong_type_is_cast_or_named(tmp_path: Path) -> None:
    file = tmp_path / "sw" / TRIALS_FILE
    file.parent.mkdir(parents=True)
    pq.write_table(pa.table({"trial_id": ["a"], "status": ["complete"], "d_model": pa.array([64], pa.int32())}), file)
    assert load_results(tmp_path / "sw")["d_model"].tolist() == [64]
    pq.write_table(pa.table({"trial_id": ["a"], "status": ["complete"], "seed": ["x"]}), file)
    with pytest.raises(LoopgolfError) as info:
        load_results(tmp_path / "sw")
    assert str(info.value).startswith(f"{file}: column 'seed' is string, expected int64 (")


def test_the_sweep_column_is_filled_only_where_null(tmp_path: Path) -> None:
    file = tmp_path / "sw" / TRIALS_FILE
    file.parent.mkdir(parents=True)
    pd.DataFrame({"trial_id": ["a", "b"], "status": ["complete"] * 2, "sweep": ["named", None]}).to_parquet(file)
    assert load_results(tmp_path / "sw")["sweep"].tolist() == ["named", "sw"]
    loose = tmp_path / "loose.parquet"  # a file outside a results/ folder: its folder names the sweep
    pd.DataFrame({"trial_id": ["c"], "status": ["failed"]}).to_parquet(loose)
    assert load_results(loose)["sweep"].tolist() == [tmp_path.name]


def test_paths_resolve_to_files_once_each(tmp_path: Path) -> None:
    for name in ("s1", "s2"):
        write_table(_rows(val_bpb=[1.0]), tmp_path / name / TRIALS_FILE, trials_schema())
    (tmp_path / "notes.txt").write_text("not a sweep")
    expected = [(tmp_path / n / TRIALS_FILE).resolve() for n in ("s1", "s2")]
    assert trials_files(tmp_path / "s2", str(tmp_path / "s*"), tmp_path / "s1" / TRIALS_FILE) == expected[::-1]
    assert trials_files(str(tmp_path / "*")) == expected  # the text file matches the glob but is no sweep
    with pytest.raises(LoopgolfError, match=r"^no sweep directory given$"):
        load_results()


def test_sweeps_whose_extra_columns_disagree_cannot_be_combined(tmp_path: Path) -> None:
    write_table(_rows(note=["a"]), tmp_path / "s1" / TRIALS_FILE, trials_schema())
    write_table(_rows(note=[[1.0, 2.0]]), tmp_path / "s2" / TRIALS_FILE, trials_schema())
    with pytest.raises(LoopgolfError, match=r"^cannot combine \[.*s1.*s2.*\]: "):
        load_results(tmp_path / "s1", tmp_path / "s2")


def test_curves_need_their_columns(tmp_path: Path) -> None:
    file = tmp_path / "sw" / CURVES_FILE
    file.parent.mkdir(parents=True)
    pd.DataFrame({"trial_id": ["a"], "metric": ["m"]}).to_parquet(file)
    with pytest.raises(LoopgolfError, match=r"missing required column\(s\) \['value'\]$"):
        load_curves(tmp_path / "sw")
    pd.DataFrame({"trial_id": ["a"], "metric": ["m"], "value": [1.0], "status": ["odd"]}).to_parquet(file)
    assert load_curves(tmp_path / "sw")["status"].tolist() == ["odd"]  # curves have no status rule


def test_feasible_complete() -> None:
    df = pd.DataFrame({"status": ["complete", "complete", "complete", "rejected", "failed"],
                       "feasible": pd.array([True, False, None, True, True], dtype="boolean")})  # fmt: skip
    assert feasible_complete(df).tolist() == [True, False, False, False, False]
    with pytest.raises(LoopgolfError, match=r"^feasible rows: the frame has no \['feasible'\] column\(s\)$"):
        feasible_complete(df.drop(columns="feasible"))
    with pytest.raises(LoopgolfError, match=r"no \['status', 'feasible'\] column"):
        feasible_complete(pd.DataFrame({"x": [1]}))


def test_schema_metadata_names_the_table() -> None:
    assert trials_schema().metadata == {b"loopgolf.table": b"trials", b"loopgolf.schema_version": b"1"}
    assert curves_schema().metadata == {b"loopgolf.table": b"curves", b"loopgolf.schema_version": b"1"}
    assert curves_schema().names == ["sweep", "trial_id", "step", "elapsed_seconds", "train_tokens", "metric", "value"]

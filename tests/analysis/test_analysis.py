"""loopgolf.analysis: the results schema and loaders, Pareto fronts, hypervolume, the report, the CLI."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from optuna._hypervolume import compute_hypervolume
from optuna.study._multi_objective import _fast_non_domination_rank, _is_pareto_front
from scipy import stats

from loopgolf.analysis.pareto import (
    hypervolume,
    hypervolume_of,
    non_dominated,
    non_domination_rank,
    pareto_front,
    pareto_rank,
    parse_objectives,
)
from loopgolf.analysis.results import (
    CURVES_FILE,
    METRICS,
    TRIALS_FILE,
    curves_schema,
    load_curves,
    load_results,
    trials_schema,
    write_table,
)
from loopgolf.analysis.stats import summarize, welch_t_test
from loopgolf.errors import LoopgolfError
from loopgolf.trial.config import TrialConfig
from tests.analysis.synthetic_sweeps import full_sweep

# ------------------------------------------------------------------------- synthetic sweeps


def make_trials(
    configs: list[tuple[dict[str, Any], list[float]]], sweep: str = "s1", **common: Any
) -> pd.DataFrame:
    """One complete, feasible row per (config overrides, val_bpb per seed); metrics plausible."""
    rows = []
    for overrides, scores in configs:
        flat = TrialConfig().to_flat() | overrides
        config_id = hashlib.sha1(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:12]
        for seed, score in enumerate(scores):
            row = flat | {
                "sweep": sweep,
                "trial_id": f"{sweep}-{config_id}-{seed}",
                "status": "complete",
                "config_id": config_id,
                "seed": seed,
                "host": "h",
                "val_bpb": score,
                "val_bpb_prequant": score - 0.01,
                "artifact_bytes": 1_000_000,
                "eval_flops_per_token": 1e6,
                "feasible": True,
            }
            rows.append(row | common | overrides.get("_row", {}))
    df = pd.DataFrame(rows)
    return df.drop(columns=[c for c in df.columns if c == "_row"])


def write_sweep(root: Path, name: str, df: pd.DataFrame) -> Path:
    sweep_dir = root / name
    write_table(df, sweep_dir / TRIALS_FILE, trials_schema())
    return sweep_dir


# ------------------------------------------------------------------------- schema, writer, loader


def test_trials_schema_types_every_config_field_and_metric() -> None:
    schema = trials_schema()
    flat = TrialConfig().to_flat()
    assert set(flat) <= set(schema.names)
    assert schema.field("d_model").type == pa.int64()
    assert schema.field("mlp_mult").type == pa.float64()
    assert schema.field("signal").type == pa.string()
    assert schema.field("unet_skips").type == pa.bool_()
    assert schema.field("protect").type == pa.list_(pa.string())
    assert schema.field("started_at").type == pa.timestamp("us", tz="UTC")
    assert schema.field("decile_ce_delta").type == pa.list_(pa.float64())
    assert set(METRICS) <= set(schema.names)
    assert schema.field("artifact_bytes").type == pa.int64() and schema.field("feasible").type == pa.bool_()
    assert len(schema.names) == len(set(schema.names))  # seed and train_seconds are one column each


def test_plain_pandas_reads_what_write_table_wrote(tmp_path: Path) -> None:
    df = make_trials([({"protect": ["tok_emb*"], "_row": {"decile_ce_delta": [0.1] * 10}}, [1.5, 1.6])])
    df["started_at"] = pd.Timestamp("2025-01-01T00:00:00.123456789Z")
    path = write_table(df, tmp_path / "results" / "trials.parquet", trials_schema())
    assert [p.name for p in path.parent.iterdir()] == ["trials.parquet"]  # no temp file left behind
    plain = pd.read_parquet(path)
    assert plain["val_bpb"].tolist() == [1.5, 1.6]
    assert plain["d_model"].tolist() == [128, 128]
    assert list(plain["protect"].iloc[0]) == ["tok_emb*"]
    assert list(plain["decile_ce_delta"].iloc[1]) == [0.1] * 10
    assert plain["model_bytes"].isna().all()  # schema column the frame lacked: typed nulls
    assert pq.read_schema(path).field("model_bytes").type == pa.int64()
    write_table(df.head(1), path, trials_schema())  # replaces the file whole
    assert len(pd.read_parquet(path)) == 1


def test_load_results_adds_typed_nulls_and_the_sweep_name(tmp_path: Path) -> None:
    minimal = pd.DataFrame({"trial_id": ["a", "b"], "status": ["complete", "rejected"], "val_bpb": [1.2, None]})
    (tmp_path / "old_sweep" / "results").mkdir(parents=True)
    minimal.to_parquet(tmp_path / "old_sweep" / TRIALS_FILE)  # an older writer, without the schema
    df = load_results(tmp_path / "old_sweep")
    assert list(df.columns) == trials_schema().names
    assert df["sweep"].tolist() == ["old_sweep", "old_sweep"]
    assert str(df["d_model"].dtype) == "Int64" and df["d_model"].isna().all()
    assert str(df["feasible"].dtype) == "boolean"
    assert df["val_bpb"].dtype == np.float64 and math.isnan(df["val_bpb"].iloc[1])
    assert str(df["started_at"].dtype) == "datetime64[us, UTC]"


def test_load_results_reads_many_sweeps_and_globs(tmp_path: Path) -> None:
    write_sweep(tmp_path, "s1", make_trials([({}, [1.0, 1.1])], sweep="s1"))
    write_sweep(tmp_path, "s2", make_trials([({"d_model": 64}, [1.2])], sweep="s2"))
    df = load_results(tmp_path / "s1", tmp_path / "s2")
    assert sorted(df["sweep"].unique()) == ["s1", "s2"] and len(df) == 3
    globbed = load_results(str(tmp_path / "s*"), tmp_path / "s1")  # s1 twice: read once
    assert len(globbed) == 3 and globbed["d_model"].tolist() == [128, 128, 64]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing_dir", "no such sweep directory"),
        ("no_results", "results/trials.parquet: no such file"),
        ("garbage", "trials.parquet: cannot read Parquet"),
        ("bad_type", "expected int64 (Failed to parse string: 'wide'"),
        ("bad_status", "unknown trial status ['done']"),
        ("no_status", "missing required column(s) ['status']"),
        ("empty_glob", "no sweep directory matches"),
    ],
)
def test_load_results_errors_name_the_file(tmp_path: Path, setup: str, message: str) -> None:
    sweep = tmp_path / "sw"
    file = sweep / TRIALS_FILE
    if setup != "missing_dir":
        file.parent.mkdir(parents=True)
    if setup == "garbage":
        file.write_bytes(b"not parquet at all")
    elif setup == "bad_type":
        pd.DataFrame({"trial_id": ["a"], "status": ["complete"], "d_model": ["wide"]}).to_parquet(file)
    elif setup == "bad_status":
        pd.DataFrame({"trial_id": ["a"], "status": ["done"]}).to_parquet(file)
    elif setup == "no_status":
        pd.DataFrame({"trial_id": ["a"]}).to_parquet(file)
    target = str(tmp_path / "nothing*") if setup == "empty_glob" else sweep
    with pytest.raises(LoopgolfError) as info:
        load_results(target)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    if setup not in ("missing_dir", "empty_glob"):
        assert str(file) in str(info.value)
    if setup == "garbage":
        assert info.value.__cause__ is not None  # the read error is chained, not swallowed


def test_load_curves_long_format(tmp_path: Path) -> None:
    curves = pd.DataFrame(
        {"trial_id": ["a", "a"], "step": [1, 2], "elapsed_seconds": [0.5, 1.0], "metric": ["train_loss"] * 2,
         "value": [3.0, 2.5]}
    )
    write_table(curves, tmp_path / "sw" / CURVES_FILE, curves_schema())
    df = load_curves(tmp_path / "sw")
    assert list(df.columns) == curves_schema().names
    assert df["sweep"].tolist() == ["sw", "sw"] and str(df["step"].dtype) == "Int64"
    assert df["train_tokens"].isna().all()
    with pytest.raises(LoopgolfError, match=r"curves\.parquet: no such file"):
        load_curves(write_sweep(tmp_path, "only_trials", make_trials([({}, [1.0])])))


# ------------------------------------------------------------------------- Pareto


@pytest.mark.parametrize("n_objectives", [1, 2, 3, 4])
@pytest.mark.parametrize("ties", [False, True])
def test_non_dominated_matches_optuna(n_objectives: int, ties: bool) -> None:
    rng = np.random.default_rng(n_objectives * 10 + ties)
    for _ in range(20):
        n = int(rng.integers(1, 2000))
        x = rng.integers(0, 8, (n, n_objectives)).astype(float) if ties else rng.random((n, n_objectives))
        np.testing.assert_array_equal(non_dominated(x), _is_pareto_front(x, assume_unique_lexsorted=False))
        if n < 400:
            np.testing.assert_array_equal(non_domination_rank(x), _fast_non_domination_rank(x))


@pytest.mark.parametrize("shape", ["uniform", "anticorrelated", "all_on_front", "2d", "2d_ties"])
def test_non_dominated_large_matches_optuna(shape: str) -> None:
    rng = np.random.default_rng(3)
    x = rng.random((30_000, 3))  # large enough to take the prefilter and the block sweep
    if shape.startswith("2d"):
        x = x[:, :2] if shape == "2d" else np.round(x[:, :2] * 20)
    elif shape == "anticorrelated":
        x[:, 1] = 1 - x[:, 0] + 0.05 * rng.random(len(x))
    elif shape == "all_on_front":
        x = x[:3000]
        x[:, 2] = 3 - x[:, 0] - x[:, 1]
    np.testing.assert_array_equal(non_dominated(x), _is_pareto_front(x, assume_unique_lexsorted=False))


def _frame(points: list[tuple[float, ...]], **extra: list[Any]) -> pd.DataFrame:
    df = pd.DataFrame(points, columns=["a", "b", "c"][: len(points[0])])
    df["status"] = extra.pop("status", ["complete"] * len(df))
    df["feasible"] = extra.pop("feasible", [True] * len(df))
    return df.assign(**extra)


# (points, objectives, expected front row positions) — duplicates of a front point are all on it
EDGE_CASES = {
    "single row": ([(1, 1)], {"a": "min", "b": "min"}, [0]),
    "all equal": ([(2, 2)] * 4, {"a": "min", "b": "min"}, [0, 1, 2, 3]),
    "duplicates on front": ([(1, 3), (1, 3), (2, 2), (3, 3)], {"a": "min", "b": "min"}, [0, 1, 2]),
    "tie in one objective": ([(1, 2), (1, 3), (2, 1)], {"a": "min", "b": "min"}, [0, 2]),
    "weakly dominated": ([(1, 1), (1, 2), (2, 1)], {"a": "min", "b": "min"}, [0]),
    "min and max mixed": ([(1, 1), (2, 3), (3, 2)], {"a": "min", "b": "max"}, [0, 1]),
    "both max": ([(1, 1), (2, 3), (3, 2)], {"a": "max", "b": "max"}, [1, 2]),
    "NaN never competes": ([(0, float("nan")), (1, 1), (2, 0)], {"a": "min", "b": "min"}, [1, 2]),
    "one objective": ([(3,), (1,), (1,), (2,)], {"a": "min"}, [1, 2]),
    "three objectives": ([(1, 2, 3), (2, 1, 3), (1, 2, 4), (0, 5, 5)], {"a": "min", "b": "min", "c": "min"}, [0, 1, 3]),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_pareto_front_edge_cases(case: str) -> None:
    points, objectives, expected = EDGE_CASES[case]
    df = _frame(points)
    assert sorted(pareto_front(df, objectives).index) == expected
    ranks = pareto_rank(df, objectives)
    assert sorted(ranks.index[ranks == 0]) == expected


def test_only_feasible_complete_rows_compete() -> None:
    df = _frame(
        [(0, 0), (1, 1), (2, 0.5), (0.5, 3)],
        status=["rejected", "complete", "complete", "failed"],
        feasible=[False, True, pd.NA, True],
    )
    objectives = {"a": "min", "b": "min"}
    assert list(pareto_front(df, objectives).index) == [1]  # null feasible does not compete
    ranks = pareto_rank(df, objectives)
    assert str(ranks.dtype) == "Int64" and ranks.isna().tolist() == [True, False, True, True]
    assert list(pareto_front(df, objectives, feasible_only=False).index) == [0]
    assert pareto_rank(df, objectives, feasible_only=False).tolist() == [0, 1, 1, 1]


def test_pareto_front_is_sorted_by_the_objectives() -> None:
    df = _frame([(3, 1), (1, 3), (2, 2)])
    assert pareto_front(df, {"a": "min", "b": "min"})["a"].tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("val_bpb", "expected COLUMN:min|max"),
        ("val_bpb:lowest", "expected COLUMN:min|max"),
        ("val_bpb:min,,a:max", "got ''"),
        ("val_bpb:min,val_bpb:max", "given twice"),
    ],
)
def test_bad_objective_specs(spec: str, message: str) -> None:
    with pytest.raises(LoopgolfError) as info:
        parse_objectives(spec)
    assert message in str(info.value)


def test_parse_objectives_and_bad_columns() -> None:
    assert parse_objectives(" val_bpb:min , artifact_bytes:max") == {"val_bpb": "min", "artifact_bytes": "max"}
    df = _frame([(1, 2)]).assign(name=["x"])
    with pytest.raises(LoopgolfError, match="no such column"):
        pareto_front(df, {"nope": "min"})
    with pytest.raises(LoopgolfError, match="expected a numeric column"):
        pareto_front(df, {"name": "min"})
    with pytest.raises(LoopgolfError, match="direction 'up'"):
        pareto_front(df, {"a": "up"})  # type: ignore[dict-item]
    with pytest.raises(LoopgolfError, match=r"no \['feasible'\] column"):
        pareto_front(df.drop(columns="feasible"), {"a": "min"})
    assert len(pareto_front(df.drop(columns=["feasible", "status"]), {"a": "min"}, feasible_only=False)) == 1


# ------------------------------------------------------------------------- hypervolume


@pytest.mark.parametrize(
    ("points", "objectives", "reference", "expected"),
    [
        ([(1, 3), (2, 2), (3, 1)], {"a": "min", "b": "min"}, (4, 4), 6.0),  # staircase: 3 + 2 + 1
        ([(1, 3), (2, 2), (3, 1), (3, 3)], {"a": "min", "b": "min"}, (4, 4), 6.0),  # dominated point adds 0
        ([(1, 1), (5, 0)], {"a": "min", "b": "min"}, (4, 4), 9.0),  # (5, 0) is beyond the reference
        ([(1, 3), (3, 1)], {"a": "max", "b": "max"}, (0, 0), 5.0),  # max: reference is a lower bound
        ([(1, 1, 1)], {"a": "min", "b": "min", "c": "min"}, (2, 3, 4), 6.0),
        ([(0, 0, 1), (1, 1, 0)], {"a": "min", "b": "min", "c": "min"}, (2, 2, 2), 5.0),  # 4 + 2 - 1 overlap
        ([(5, 5)], {"a": "min", "b": "min"}, (4, 4), 0.0),
    ],
)
def test_hypervolume_hand_computed(points: list, objectives: dict, reference: tuple, expected: float) -> None:
    assert hypervolume(_frame(points), objectives, reference) == pytest.approx(expected)
    assert hypervolume(_frame(points), objectives, dict(zip(objectives, reference, strict=True))) == pytest.approx(
        expected
    )


@pytest.mark.parametrize("d", [2, 3])
def test_hypervolume_matches_optuna(d: int) -> None:
    rng = np.random.default_rng(d)
    for _ in range(10):
        x = rng.random((int(rng.integers(1, 300)), d))
        ref = np.full(d, 1.0)
        assert hypervolume_of(x, ref) == pytest.approx(compute_hypervolume(x, ref))


def test_hypervolume_rejects_other_dimensions() -> None:
    with pytest.raises(LoopgolfError, match="2 or 3 objectives"):
        hypervolume(_frame([(1,)]), {"a": "min"}, (2,))


# ------------------------------------------------------------------------- statistics


def test_welch_matches_scipy_and_summary_ci() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 7), rng.normal(0.5, 2, 5)
    t, p = welch_t_test(a, b)
    expected = stats.ttest_ind(a, b, equal_var=False)
    assert t == pytest.approx(expected.statistic) and p == pytest.approx(expected.pvalue)
    s = summarize(a)
    low, high = stats.t.interval(0.95, len(a) - 1, loc=a.mean(), scale=stats.sem(a))
    assert (s.n, s.ci_low, s.ci_high) == (7, pytest.approx(low), pytest.approx(high))


# ------------------------------------------------------------------------- report and CLI


def _cli(argv: list[str]) -> argparse.Namespace:
    from loopgolf.cli import build_parser  # the CLI over the analysis API

    return build_parser().parse_args(argv)


def test_cli_pareto_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = full_sweep(tmp_path)
    args = _cli(["pareto", str(sweep), "--format", "json", "--objectives", "val_bpb:min,eval_flops_per_token:min"])
    assert args.run(args) == 0
    records = json.loads(capsys.readouterr().out)
    expected = pareto_front(load_results(sweep), {"val_bpb": "min", "eval_flops_per_token": "min"})
    assert [r["trial_id"] for r in records] == expected["trial_id"].tolist()
    args = _cli(["pareto", str(sweep), "--format", "csv"])
    assert args.run(args) == 0
    assert pd.read_csv(__import__("io").StringIO(capsys.readouterr().out)).columns[-2:].tolist() == [
        "val_bpb",
        "artifact_bytes",
    ]
    args = _cli(["pareto", str(sweep)])
    assert args.run(args) == 0 and "trial_id" in capsys.readouterr().out


def test_cli_bad_input_is_one_loopgolf_error(tmp_path: Path) -> None:
    args = _cli(["pareto", str(tmp_path), "--objectives", "val_bpb:smallest"])
    with pytest.raises(LoopgolfError, match="expected COLUMN:min"):
        args.run(args)
    args = _cli(["report", str(tmp_path / "none")])
    with pytest.raises(LoopgolfError, match="no such sweep directory"):
        args.run(args)


def test_cli_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = write_sweep(tmp_path, "s", make_trials([({}, [1.0, 1.1])]))
    args = _cli(["report", str(sweep), "--out", str(tmp_path / "r")])
    assert args.run(args) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'r' / 'report.md'}"

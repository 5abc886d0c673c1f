"""analysis/pareto.py: directions, ordering, messages and the numpy core's edges.

(Fronts and ranks against Optuna's reference on random data, and the hand-computed
hypervolumes, are in test_analysis.py.)
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from loopgolf.analysis.pareto import (
    hypervolume,
    hypervolume_of,
    non_dominated,
    non_domination_rank,
    objective_matrix,
    pareto_front,
    pareto_rank,
    parse_objectives,
)
from loopgolf.errors import LoopgolfError


def _frame(points: list[tuple[float, ...]], **extra: list) -> pd.DataFrame:
    df = pd.DataFrame(points, columns=["a", "b", "c"][: len(points[0])])
    return df.assign(**({"status": "complete", "feasible": True} | extra))


@pytest.mark.parametrize(
    ("objectives", "order"),
    [
        ({"a": "max", "b": "max"}, [3, 2, 1]),  # the front is (3, 1), (2, 2), (1, 3): best a first
        ({"b": "max", "a": "max"}, [1, 2, 3]),  # sorted by the first objective, b, best first
        ({"a": "min", "b": "min"}, [0]),
    ],
)
def test_the_front_is_sorted_best_first_in_each_direction(objectives: dict, order: list[int]) -> None:
    df = _frame([(0, 0), (1, 3), (2, 2), (3, 1)])
    assert pareto_front(df, objectives).index.tolist() == order


def test_the_front_ties_are_broken_by_the_next_objective() -> None:
    df = _frame([(1, 5, 9), (1, 2, 3), (2, 6, 0), (1, 5, 9), (3, 0, 9)])  # all but the last on the front
    front = pareto_front(df, {"a": "min", "b": "max", "c": "min"})
    assert front.index.tolist() == [0, 3, 1, 2]  # a ascending, then b descending; duplicates in row order


def test_objective_matrix_negates_max_columns_and_masks_non_competing_rows() -> None:
    df = _frame([(1, 2), (3, float("nan")), (5, 6)], feasible=[True, True, False])
    mask, losses = objective_matrix(df, {"a": "min", "b": "max"})
    assert mask.tolist() == [True, False, False] and losses.tolist() == [[1.0, -2.0]]
    mask, losses = objective_matrix(df, {"b": "max"}, feasible_only=False)
    assert mask.tolist() == [True, False, True] and losses.tolist() == [[-2.0], [-6.0]]


def test_ranks_for_max_objectives_count_from_the_best() -> None:
    df = _frame([(1, 1), (2, 2), (3, 3), (3, 3)])
    assert pareto_rank(df, {"a": "max", "b": "max"}).tolist() == [2, 1, 0, 0]
    assert pareto_rank(df, {"a": "min", "b": "min"}).tolist() == [0, 1, 2, 2]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("val_bpb", "objectives 'val_bpb': expected COLUMN:min|max[,COLUMN:min|max...], got 'val_bpb'"),
        (":min", "objectives ':min': expected COLUMN:min|max[,COLUMN:min|max...], got ':min'"),
        ("a:up", "objectives 'a:up': expected COLUMN:min|max[,COLUMN:min|max...], got 'a:up'"),
        ("a:min, a:max", "objectives 'a:min, a:max': column 'a' given twice"),
        ("a:min:max", "objectives 'a:min:max': expected COLUMN:min|max[,COLUMN:min|max...], got 'a:min:max'"),
    ],
)
def test_parse_objectives_messages(spec: str, message: str) -> None:
    with pytest.raises(LoopgolfError) as info:
        parse_objectives(spec)
    assert str(info.value) == message


def test_bad_objectives_messages() -> None:
    df = _frame([(1, 2)]).assign(val_bpb=[1.0], params=[10], name=["x"], flag=[True])
    with pytest.raises(LoopgolfError) as info:
        pareto_front(df, {"nope": "min"})
    assert str(info.value) == "objective 'nope': no such column (e.g. val_bpb, params)"
    with pytest.raises(LoopgolfError) as info:
        pareto_front(df[["a", "status", "feasible"]], {"nope": "min"})
    assert str(info.value) == "objective 'nope': no such column (e.g. a)"  # no metric: the numeric columns
    with pytest.raises(LoopgolfError, match=r"^objective 'flag': expected a numeric column, got bool$"):
        pareto_front(df, {"flag": "min"})
    with pytest.raises(LoopgolfError, match=r"^objectives: expected at least one COLUMN: min\|max$"):
        pareto_front(df, {})


@pytest.mark.parametrize(
    ("values", "message"),
    [(np.array([1.0, 2.0]), r"^expected a 2-D array \(points x objectives\), got shape \(2,\)$"),
     (np.array([[1.0, np.nan]]), "^NaN in the objective values: drop those rows first$")],
)  # fmt: skip
def test_the_numpy_core_refuses_bad_input(values: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        non_dominated(values)
    with pytest.raises(ValueError, match=message):
        non_domination_rank(values)


def test_empty_inputs() -> None:
    empty = np.zeros((0, 2))
    assert non_dominated(empty).tolist() == [] and non_domination_rank(empty).tolist() == []
    assert non_dominated(empty).dtype == np.bool_  # a mask, usable as an index even when empty
    assert hypervolume_of(empty, [1.0, 1.0]) == 0.0
    assert hypervolume_of(np.zeros((0, 3)), [1.0, 1.0, 1.0]) == 0.0


def test_hypervolume_references() -> None:
    df = _frame([(1, 1), (2, 0)])
    objectives = {"a": "min", "b": "min"}
    assert hypervolume(df, objectives, {"b": 2, "a": 3}) == pytest.approx(2 * 1 + 1 * 1)  # by name, any order
    with pytest.raises(LoopgolfError, match=r"^hypervolume: reference has \['a'\], objectives are \['a', 'b'\]$"):
        hypervolume(df, objectives, {"a": 3})
    with pytest.raises(LoopgolfError, match=r"^hypervolume: 3 reference values for 2 objectives$"):
        hypervolume(df, objectives, [3, 2, 1])
    with pytest.raises(LoopgolfError, match=r"^hypervolume: reference \[3.0, inf\] must be finite$"):
        hypervolume(df, objectives, [3, float("inf")])
    with pytest.raises(LoopgolfError, match=r"expected 2 or 3 objectives and a reference of each, got 2 and \(3,\)"):
        hypervolume_of(np.array([[1.0, 1.0]]), [2.0, 2.0, 2.0])


def test_hypervolume_3d_counts_each_slice_once() -> None:
    points = np.array([[0.0, 0.0, 2.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [5.0, 0.0, 0.0]])
    # z in [0, 2): (1,1,0) alone, a 2x2 square; z in [2, 4): (0,0,2) too, the whole 3x3 square;
    # the duplicate adds nothing and (5,0,0) lies beyond the reference
    assert hypervolume_of(points, [3.0, 3.0, 4.0]) == pytest.approx(4 * 2 + 9 * 2)


def test_hypervolume_max_objectives_use_a_lower_bound() -> None:
    df = _frame([(3, 1), (1, 3), (0, 0)])
    assert hypervolume(df, {"a": "max", "b": "max"}, (0, 0)) == pytest.approx(3 + 3 - 1)
    assert hypervolume(df, {"a": "max", "b": "min"}, (0, 4)) == pytest.approx(3 * 3 + 0)
    # references away from 0, where negating them matters
    assert hypervolume(_frame([(3, 2), (2, 3)]), {"a": "max", "b": "max"}, (1, 1)) == pytest.approx(2 + 2 - 1)
    assert hypervolume(df, {"a": "max", "b": "min"}, (1, 4)) == pytest.approx(2 * 3)


def test_hypervolume_counts_only_competing_rows_unless_told() -> None:
    df = _frame([(1, 1), (0, 0)], feasible=[True, False])
    assert hypervolume(df, {"a": "min", "b": "min"}, (2, 2)) == pytest.approx(1)
    assert hypervolume(df, {"a": "min", "b": "min"}, (2, 2), feasible_only=False) == pytest.approx(4)


def test_ranks_are_integers_on_the_frames_own_index() -> None:
    """The numpy ranks are int64 (empty or not); the Series is named and keeps df's index."""
    assert non_domination_rank(np.zeros((0, 2))).dtype == np.int64
    ranks = non_domination_rank(np.array([[1.0, 2.0], [2.0, 3.0]]))
    assert ranks.dtype == np.int64 and ranks.tolist() == [0, 1]
    df = _frame([(2, 2), (1, 1), (3, 3)]).set_index(pd.Index([30, 10, 20]))
    series = pareto_rank(df, {"a": "min", "b": "min"})
    assert series.name == "pareto_rank" and series.index.tolist() == [30, 10, 20]
    assert series.to_dict() == {30: 1, 10: 0, 20: 2}


def test_nullable_columns_compete_where_they_hold_a_value() -> None:
    """A Parquet ledger reads back nullable Int64/Float64 columns: <NA> is a missing value, not an error."""
    df = _frame([(1, 2), (2, 1), (0, 0)]).astype({"a": "Int64", "b": "Float64"})
    df.loc[2, "a"] = pd.NA
    mask, losses = objective_matrix(df, {"a": "min", "b": "max"})
    assert mask.tolist() == [True, True, False] and losses.dtype == np.float64
    assert losses.tolist() == [[1.0, -2.0], [2.0, -1.0]]


def test_an_unknown_column_lists_at_most_twenty_numeric_ones() -> None:
    df = pd.DataFrame({f"x{i}": [float(i)] for i in range(25)} | {"name": ["a"]})
    with pytest.raises(LoopgolfError) as info:
        pareto_front(df, {"nope": "min"})
    assert str(info.value) == f"objective 'nope': no such column (e.g. {', '.join(f'x{i}' for i in range(20))})"

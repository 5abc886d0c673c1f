"""Pareto fronts, non-dominated sorting and hypervolume over the trials DataFrame.

Conventions (the tests pin each one):

- `objectives` maps a column to "min" or "max". Internally every objective is turned
  into a loss to minimize ("max" columns are negated).
- Only rows that compete are ranked: by default status "complete" and feasible
  (`feasible_only=True`), and in every case rows with a value in every objective. A row
  with NaN/null in an objective never competes, whatever `feasible_only` says.
- Point a dominates b when a is no worse in every objective and strictly better in one.
  Identical points do not dominate each other, so duplicates of a front point are all on
  the front (the same rule as Optuna's `_is_pareto_front`).
- `pareto_rank` is a nullable Int64 Series: 0 for the front, 1 for the front of the
  rest, ...; <NA> for rows that do not compete (so `df[rank == 0]` is the front).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd

from loopgolf.analysis.results import METRICS, ROUTED_ARM, feasible_complete
from loopgolf.errors import LoopgolfError

Direction = Literal["min", "max"]
Objectives = Mapping[str, Direction]

_DIRECTIONS = ("min", "max")
_PREFILTER_MIN_ROWS = 8192  # below this the prefilter costs more than it saves
_SMALL_BLOCK = 512  # all-pairs check up to this many points (512^2 booleans per column)


def parse_objectives(spec: str) -> dict[str, Direction]:
    """Parse "val_bpb:min,artifact_bytes:min" into {"val_bpb": "min", "artifact_bytes": "min"}."""
    objectives: dict[str, Direction] = {}
    for part in spec.split(","):
        name, sep, direction = part.strip().partition(":")
        name, direction = name.strip(), direction.strip()
        if not sep or not name or direction not in _DIRECTIONS:
            raise LoopgolfError(f"objectives {spec!r}: expected COLUMN:min|max[,COLUMN:min|max...], got {part!r}")
        if name in objectives:
            raise LoopgolfError(f"objectives {spec!r}: column {name!r} given twice")
        objectives[name] = direction  # type: ignore[assignment]  # checked against _DIRECTIONS above
    return objectives


def _is_number_column(values: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)


def _check_objectives(df: pd.DataFrame, objectives: Objectives) -> None:
    if not objectives:
        raise LoopgolfError("objectives: expected at least one COLUMN: min|max")
    for column, direction in objectives.items():
        if direction not in _DIRECTIONS:
            raise LoopgolfError(f"objective {column!r}: direction {direction!r}, expected 'min' or 'max'")
        if column not in df.columns:
            numeric = [str(c) for c in df.columns if _is_number_column(df[c])]
            known = [c for c in METRICS if c in numeric] or numeric[:20]  # a whole schema is too long for one line
            raise LoopgolfError(f"objective {column!r}: no such column (e.g. {', '.join(known)})")
        if not _is_number_column(df[column]):
            raise LoopgolfError(f"objective {column!r}: expected a numeric column, got {df[column].dtype}")


def objective_matrix(
    df: pd.DataFrame, objectives: Objectives, *, feasible_only: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(mask of competing rows, their losses: float64 array of shape (mask.sum(), len(objectives)))."""
    _check_objectives(df, objectives)
    columns = [df[c].to_numpy(dtype=np.float64, na_value=np.nan) for c in objectives]
    values = np.column_stack(columns)
    mask = ~np.isnan(values).any(axis=1)
    if feasible_only:
        mask &= feasible_complete(df).to_numpy()
    signs = np.array([1.0 if d == "min" else -1.0 for d in objectives.values()])
    return mask, values[mask] * signs


# ------------------------------------------------------------------ numpy core (minimize)


def _as_losses(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"expected a 2-D array (points x objectives), got shape {values.shape}")
    if np.isnan(values).any():
        raise ValueError("NaN in the objective values: drop those rows first")
    return values


def _unique_lexsorted(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, group, unique): values[order] is lexsorted, unique = its distinct rows,
    group[i] = index in unique of values[order][i]."""
    order = np.lexsort(values.T[::-1])
    ordered = values[order]
    new = np.ones(len(ordered), dtype=bool)
    new[1:] = np.any(ordered[1:] != ordered[:-1], axis=1)
    return order, np.cumsum(new) - 1, ordered[new]


def _le_all(dominators: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(len(dominators), len(points)) booleans: dominators[i] <= points[j] in every column."""
    le = dominators[:, None, 0] <= points[None, :, 0]
    for k in range(1, dominators.shape[1]):
        le &= dominators[:, None, k] <= points[None, :, k]
    return le


def _front_rest(rest: np.ndarray) -> np.ndarray:
    """Front mask of unique lexsorted points, given all columns but the first (`rest`).

    In lexicographic order a point can only be dominated by an earlier one, and an earlier
    distinct point p dominates q iff p[1:] <= q[1:] (p[0] <= q[0] holds by the order). So
    points are swept in blocks: a block is checked against the front found so far, its
    survivors against each other, and what survives joins the front for good. Blocks
    grow while few points survive and shrink when many do, bounding both checks.
    """
    n = len(rest)
    if n <= _SMALL_BLOCK:
        return ~np.triu(_le_all(rest, rest), 1).any(axis=0)
    on_front = np.zeros(n, dtype=bool)
    front = rest[:0]
    start, block = 0, 64
    while start < n:
        points = rest[start : start + block]
        if len(front):
            dominated = np.zeros(len(points), dtype=bool)
            step = max(1, (1 << 22) // len(points))  # ~4M booleans per comparison
            for j in range(0, len(front), step):
                dominated |= _le_all(front[j : j + step], points).any(axis=0)
            keep = np.flatnonzero(~dominated)
        else:
            keep = np.arange(len(points))
        survivors = len(keep)
        keep = keep[_front_rest(points[keep])]  # recursion: survivors < block, or block is small
        on_front[start + keep] = True
        front = np.concatenate([front, points[keep]])
        start += len(points)
        if survivors * 16 < block:
            block = min(block * 2, 1 << 16)
        elif survivors * 2 > block:
            block = max(block // 2, 64)
    return on_front


def _front_of_unique_lexsorted(unique: np.ndarray) -> np.ndarray:
    n, d = unique.shape
    if n == 0:
        return np.zeros(0, dtype=bool)
    if d == 1:
        on_front = np.zeros(n, dtype=bool)
        on_front[0] = True
        return on_front
    if d == 2:
        # sorted by x then y: a point is on the front iff its y beats every earlier y
        cummin = np.minimum.accumulate(unique[:, 1])
        on_front = np.ones(n, dtype=bool)
        on_front[1:] = unique[1:, 1] < cummin[:-1]
        return on_front
    return _front_rest(np.ascontiguousarray(unique[:, 1:]))


def _prefilter(values: np.ndarray) -> np.ndarray:
    """Indices of rows not strictly dominated by a few strong points of a random sample.

    Exact (a removed row is dominated by a real row), and on typical data it removes most
    rows with a handful of O(n) vector passes, before the O(n log n) sort.
    """
    n = len(values)
    rng = np.random.default_rng(0)  # fixed: the result never depends on it, the timing should not either
    sample = values[rng.choice(n, 2048, replace=False)]
    sample_front = sample[non_dominated(sample)]
    # the sample-front points that dominate most of the sample filter best
    counts = _le_all(sample_front, sample).sum(axis=1)
    alive = np.arange(n)
    for point in sample_front[np.argsort(-counts, kind="stable")[:32]]:
        rows = values[alive]
        dominated = np.all(point <= rows, axis=1) & np.any(point < rows, axis=1)
        if dominated.sum() * 100 < len(alive):  # diminishing returns: let the sweep do the rest
            break
        alive = alive[~dominated]
    return alive


def non_dominated(values: np.ndarray) -> np.ndarray:
    """Boolean mask of the non-dominated rows of `values` (n points x d losses, minimized).

    Duplicates of a non-dominated point are all non-dominated. NaN is an error (drop first).
    Complexity: O(n log n) for d <= 2 (lexsort, then a cumulative minimum). For d >= 3,
    O(n log n) to sort and O(n·h·d) for the block sweep against the front of size h: about
    linear on typical data, O(n²·d) in the worst case (every point on the front). Above 8192
    rows (d >= 2) an exact O(n·k·d) prefilter (k <= 32 sample-front points) first removes
    most dominated rows, so the sort and sweep see m << n rows on typical data.
    """
    values = _as_losses(values)
    n, d = values.shape
    if n == 0:
        return np.zeros(0, dtype=bool)
    alive = _prefilter(values) if d >= 2 and n > _PREFILTER_MIN_ROWS else np.arange(n)
    order, group, unique = _unique_lexsorted(values[alive])
    on_front = np.zeros(n, dtype=bool)
    on_front[alive[order]] = _front_of_unique_lexsorted(unique)[group]
    return on_front


def non_domination_rank(values: np.ndarray) -> np.ndarray:
    """Non-dominated sorting: int rank per row, 0 = the front, 1 = the front without rank 0, ...

    Complexity: one sort, then one front computation per rank: O(R · front(n)) for R ranks.
    """
    values = _as_losses(values)
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    order, group, unique = _unique_lexsorted(values)
    unique_rank = np.full(len(unique), -1, dtype=np.int64)
    remaining = np.arange(len(unique))
    rank = 0
    while len(remaining):  # a subset of unique lexsorted rows is still unique and lexsorted
        on_front = _front_of_unique_lexsorted(unique[remaining])
        unique_rank[remaining[on_front]] = rank
        remaining = remaining[~on_front]
        rank += 1
    ranks = np.empty(len(values), dtype=np.int64)
    ranks[order] = unique_rank[group]
    return ranks


# ------------------------------------------------------------------ DataFrame API


def pareto_front(df: pd.DataFrame, objectives: Objectives, *, feasible_only: bool = True) -> pd.DataFrame:
    """The non-dominated rows of `df` under `objectives`, sorted by the objectives in order.

    Only competing rows count (see the module docstring); duplicates are all kept.
    Complexity: that of `non_dominated` (1e6 rows x 3 objectives in well under 2 s).
    """
    mask, losses = objective_matrix(df, objectives, feasible_only=feasible_only)
    rows = np.flatnonzero(mask)[non_dominated(losses)]
    front = df.iloc[rows]
    ascending = [direction == "min" for direction in objectives.values()]
    return front.sort_values(list(objectives), ascending=ascending, kind="stable")


def pareto_rank(df: pd.DataFrame, objectives: Objectives, *, feasible_only: bool = True) -> pd.Series:
    """Non-dominated sorting rank of every row (Int64, index of `df`); <NA> where a row does not compete."""
    mask, losses = objective_matrix(df, objectives, feasible_only=feasible_only)
    ranks = pd.array(np.full(len(df), pd.NA), dtype="Int64")
    ranks[np.flatnonzero(mask)] = non_domination_rank(losses)
    return pd.Series(ranks, index=df.index, name="pareto_rank")


def _hv2d(points: np.ndarray, reference: np.ndarray) -> float:
    """Area dominated by `points` (any, not only a front) up to `reference`, minimized."""
    if len(points) == 0:
        return 0.0
    points = points[np.lexsort(points.T[::-1])]
    best_y = np.minimum.accumulate(points[:, 1])  # lowest y among points with x <= this x
    widths = np.append(points[1:, 0], reference[0]) - points[:, 0]
    return float(widths @ (reference[1] - best_y))


def hypervolume_of(values: np.ndarray, reference: Sequence[float] | np.ndarray) -> float:
    """Hypervolume (minimization) of the points that dominate `reference`, for 2 or 3 objectives.

    2 objectives: O(n log n). 3 objectives: slices along the third axis, O(h² log h) for a
    front of h points.
    """
    values = _as_losses(values)
    ref = np.asarray(reference, dtype=np.float64)
    d = values.shape[1]
    if d not in (2, 3) or ref.shape != (d,):
        raise LoopgolfError(f"hypervolume: expected 2 or 3 objectives and a reference of each, got {d} and {ref.shape}")
    if not np.isfinite(ref).all():
        raise LoopgolfError(f"hypervolume: reference {ref.tolist()} must be finite")
    points = values[np.all(values <= ref, axis=1)]
    points = points[non_dominated(points)] if len(points) else points
    if d == 2:
        return _hv2d(points, ref)
    points = points[np.argsort(points[:, 2], kind="stable")]
    heights = np.append(points[1:, 2], ref[2]) - points[:, 2]
    # between consecutive z values the dominated slice is the 2-D area of the points below
    return float(sum(h * _hv2d(points[: i + 1, :2], ref[:2]) for i, h in enumerate(heights) if h > 0))


def hypervolume(
    df: pd.DataFrame,
    objectives: Objectives,
    reference: Mapping[str, float] | Sequence[float],
    *,
    feasible_only: bool = True,
) -> float:
    """Hypervolume of the competing rows' front that dominates `reference` (2 or 3 objectives).

    `reference` gives one value per objective (a mapping by column, or a sequence in the
    order of `objectives`), in the column's own units and direction: for a "max" column the
    reference is a lower bound. Points that do not dominate the reference add nothing.
    """
    _, losses = objective_matrix(df, objectives, feasible_only=feasible_only)
    if isinstance(reference, Mapping):
        if set(reference) != set(objectives):
            raise LoopgolfError(f"hypervolume: reference has {sorted(reference)}, objectives are {sorted(objectives)}")
        ref = [float(reference[c]) for c in objectives]
    else:
        ref = [float(v) for v in reference]
        if len(ref) != len(objectives):
            raise LoopgolfError(f"hypervolume: {len(ref)} reference values for {len(objectives)} objectives")
    signs = np.array([1.0 if d == "min" else -1.0 for d in objectives.values()])
    return hypervolume_of(losses, np.asarray(ref) * signs)


def config_means(df: pd.DataFrame, objectives: Objectives) -> pd.DataFrame:
    """Each configuration a sampler proposed (never a control arm alone): the mean of every
    objective over its complete, feasible seeds, and how many seeds that is. One row per
    (sweep, config_id), sorted by the objectives in order (each in its direction)."""
    _check_objectives(df, objectives)
    ok = feasible_complete(df)
    if "arm" in df:  # a routed configuration or an unpaired one; its arms come along when it is promoted
        ok &= df["arm"].isna() | (df["arm"] == ROUTED_ARM) | df.get("pair_id", pd.Series(index=df.index)).isna()
    rows = df[ok]
    if rows.empty:
        return pd.DataFrame(columns=["sweep", "config_id", "seeds", *objectives])
    means = rows.groupby(["sweep", "config_id"], sort=False)[list(objectives)].mean()
    means.insert(0, "seeds", rows.groupby(["sweep", "config_id"], sort=False).size())
    ascending = [direction == "min" for direction in objectives.values()]
    return means.reset_index().sort_values(list(objectives), ascending=ascending, kind="stable", ignore_index=True)


def choose_configurations(df: pd.DataFrame, objectives: Objectives, *, top: int | None = None,
                          front: bool = False) -> list[str]:  # fmt: skip
    """What `loopgolf promote` re-runs: the `top` configurations by their mean over seeds on the
    first objective, or the feasible Pareto front of the configurations' means (never a
    single seed's value)."""
    if front == (top is not None):
        raise LoopgolfError("promote: expected exactly one of --front or --top K")
    if top is not None and (isinstance(top, bool) or top < 1):
        raise LoopgolfError(f"--top {top}: expected an integer >= 1")
    means = config_means(df, objectives)
    if means.empty:
        return []
    if front:
        mask, losses = objective_matrix(means.assign(status="complete", feasible=True), objectives)
        means = means.iloc[np.flatnonzero(mask)[non_dominated(losses)]]
    else:
        first = next(iter(objectives))
        means = means.sort_values(first, ascending=objectives[first] == "min", kind="stable").head(top)
    return [str(c) for c in means["config_id"]]

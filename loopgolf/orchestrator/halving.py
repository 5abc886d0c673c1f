"""Pareto-aware successive halving: the rung arithmetic and the keep/stop decision, pure.

A trial trains for `budget` seconds. Rungs sit at budget * eta^-k (k >= 1) down to
`min_seconds`; at a rung the trials that reached it are ranked by non-dominated sorting
on their objective vectors (all minimised), ties within the cut front broken by crowding
distance (the more isolated point keeps the front spread), and the best ceil(n / eta)
continue. Ray's scheduler (scheduler.py) and the replay benchmark both call these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

Point = Sequence[float]


def rung_seconds(budget_seconds: float, eta: int, min_seconds: float) -> tuple[float, ...]:
    """Rungs at budget * eta^-k for k >= 1 that are >= min_seconds, ascending."""
    if not budget_seconds > 0:
        raise ValueError(f"budget_seconds={budget_seconds!r}: expected > 0")
    if isinstance(eta, bool) or not isinstance(eta, int) or eta < 2:
        raise ValueError(f"eta={eta!r}: expected an integer >= 2")
    if not min_seconds > 0:
        raise ValueError(f"min_seconds={min_seconds!r}: expected > 0")
    rungs = []
    k = 1
    while (at := budget_seconds / eta**k) >= min_seconds:
        rungs.append(at)
        k += 1
    return tuple(reversed(rungs))


def dominates(a: Point, b: Point) -> bool:
    """a is no worse than b everywhere and better somewhere (minimisation)."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def nondominated_fronts(points: Mapping[str, Point]) -> list[list[str]]:
    """Keys by front: front 0 is dominated by nobody, front 1 only by front 0, and so on."""
    keys = sorted(points)
    beaten_by = {k: sum(dominates(points[o], points[k]) for o in keys) for k in keys}
    fronts: list[list[str]] = []
    current = [k for k in keys if beaten_by[k] == 0]
    while current:
        fronts.append(current)
        following = []
        for k in current:
            for o in keys:
                if dominates(points[k], points[o]):
                    beaten_by[o] -= 1
                    if beaten_by[o] == 0:
                        following.append(o)
        current = sorted(following)
    return fronts


def crowding_distance(points: Mapping[str, Point]) -> dict[str, float]:
    """NSGA-II's crowding distance within one front; equal points share their value's distance."""
    distinct = sorted({tuple(float(x) for x in p) for p in points.values()})
    distance = {p: 0.0 for p in distinct}
    if len(distinct) <= 2:
        return {k: math.inf for k in points}
    for m in range(len(distinct[0])):
        ordered = sorted(distinct, key=lambda p: p[m])
        span = ordered[-1][m] - ordered[0][m]
        distance[ordered[0]] = distance[ordered[-1]] = math.inf
        if span == 0:
            continue
        for prev, here, nxt in zip(ordered, ordered[1:], ordered[2:], strict=False):
            distance[here] += (nxt[m] - prev[m]) / span
    return {k: distance[tuple(float(x) for x in p)] for k, p in points.items()}


def survivors(points: Mapping[str, Point], eta: int) -> set[str]:
    """The best ceil(n / eta) keys by non-dominated rank, ties by crowding distance (larger
    first), then by key; at least one continues. All objectives are minimised."""
    if isinstance(eta, bool) or not isinstance(eta, int) or eta < 2:
        raise ValueError(f"eta={eta!r}: expected an integer >= 2")
    if not points:
        return set()
    widths = {len(p) for p in points.values()}
    if len(widths) != 1 or 0 in widths:
        raise ValueError(f"points: expected vectors of one non-zero length, got lengths {sorted(widths)}")
    keep = max(1, math.ceil(len(points) / eta))
    kept: list[str] = []
    for front in nondominated_fronts(points):
        if len(kept) + len(front) <= keep:
            kept.extend(front)
            continue
        crowd = crowding_distance({k: points[k] for k in front})
        kept.extend(sorted(front, key=lambda k: (-crowd[k], k))[: keep - len(kept)])
        break
    return set(kept)

"""Pareto-aware successive halving: the rung arithmetic and the keep/stop decision, pure.

A trial trains for `budget` seconds. Rungs sit at budget * eta^-k (k >= 1) down to
`min_seconds`; at a rung the trials that reached it are ranked by non-dominated sorting
on their objective vectors (all minimised), ties within the cut front broken by crowding
distance (the more isolated point keeps the front spread), and the best ceil(n / eta)
continue. Ray's scheduler (scheduler.py) and the replay benchmark both call these.

Asynchronous, as ASHA: a trial is judged when it reaches a rung, against every trial that
reached that rung before it (stopped ones included), and never waits. The synchronous
variant would pause trials at each rung until the rung is full: with max_concurrent well
below the number of trials that means paused trials holding checkpoints and idle slots,
and a sweep that cannot end until the sampler has proposed every trial. The price of
asynchrony: the first trials at a rung are judged against few peers (the first always
continues), so early on fewer are stopped than 1 - 1/eta.

`RungState` is everything the decisions depend on; it is rebuilt from the decisions
themselves (each trial's decision log, written before Tune acts on it), so a driver
killed with -9 and resumed neither decides a rung twice nor lets a stopped trial go on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

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


# ------------------------------------------------------------------ rung state


@dataclasses.dataclass(frozen=True)
class Decision:
    """One trial at one rung: its objective vector there (None: a control arm, never ranked),
    whether it continues, and the pair it stands for when it is a routed configuration."""

    rung: float
    keep: bool
    point: tuple[float, ...] | None = None
    pair: tuple[str, int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"rung": self.rung, "keep": self.keep, "point": self.point, "pair": self.pair}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Decision:
        point, pair = raw.get("point"), raw.get("pair")
        return cls(
            rung=float(raw["rung"]),
            keep=bool(raw["keep"]),
            point=tuple(float(x) for x in point) if point is not None else None,
            pair=(str(pair[0]), int(pair[1])) if pair is not None else None,
        )


@dataclasses.dataclass
class RungState:
    """Who reached which rung with which point, who was stopped, and the routed trials of each pair."""

    rungs: tuple[float, ...]
    eta: int
    points: dict[float, dict[str, tuple[float, ...]]] = dataclasses.field(default_factory=dict)
    decided: dict[str, set[float]] = dataclasses.field(default_factory=dict)
    stopped: dict[str, float] = dataclasses.field(default_factory=dict)
    # (pair_id, seed) -> its routed trials: several routed configurations (one per signal) share one pair
    pair_members: dict[tuple[str, int], set[str]] = dataclasses.field(default_factory=dict)

    def due(self, key: str, elapsed: float) -> list[float]:
        """Rungs the trial has reached and not been judged at, ascending."""
        done = self.decided.get(key, set())
        return [r for r in self.rungs if r <= elapsed and r not in done]

    def judge(self, key: str, rung: float, point: Sequence[float], pair: tuple[str, int] | None = None) -> Decision:
        """Rank the trial against every trial that reached `rung` so far (itself included)."""
        if rung in self.decided.get(key, set()):
            raise ValueError(f"trial {key!r} was already judged at rung {rung:g}")
        at_rung = self.points.get(rung, {}) | {key: tuple(float(x) for x in point)}
        decision = Decision(rung, key in survivors(at_rung, self.eta), tuple(float(x) for x in point), pair)
        self.apply(key, decision)
        return decision

    def apply(self, key: str, decision: Decision) -> None:
        """Record a decision (made now, or read back from a trial's log)."""
        self.decided.setdefault(key, set()).add(decision.rung)
        if decision.point is not None:
            self.points.setdefault(decision.rung, {})[key] = decision.point
        if not decision.keep:
            self.stopped.setdefault(key, decision.rung)
        if decision.pair is not None:
            self.join(decision.pair, key)

    def join(self, pair: tuple[str, int], key: str) -> None:
        """A routed trial of the pair has started reporting: its controls live while it does."""
        self.pair_members.setdefault(pair, set()).add(key)

    def pair_stopped(self, pair: tuple[str, int] | None) -> bool:
        """Has every routed trial of the pair (at this seed) seen so far been stopped?"""
        members = self.pair_members.get(pair, set()) if pair is not None else set()
        return bool(members) and all(key in self.stopped for key in members)


def rebuild_state(rungs: Sequence[float], eta: int, logs: Mapping[str, Sequence[Decision]]) -> RungState:
    """The state a driver had, from every trial's decision log (trial key -> its decisions in order)."""
    state = RungState(tuple(rungs), eta)
    for key in sorted(logs):
        for decision in logs[key]:
            state.apply(key, decision)
    return state

"""Pareto-aware successive halving: rungs and keep/stop decisions on hand-made cases."""

from __future__ import annotations

import itertools
import math

import pytest

from loopgolf.orchestrator.halving import crowding_distance, nondominated_fronts, rung_seconds, survivors


@pytest.mark.parametrize(
    ("budget", "eta", "min_seconds", "expected"),
    [
        (81.0, 3, 1.0, (1.0, 3.0, 9.0, 27.0)),
        (81.0, 3, 2.0, (3.0, 9.0, 27.0)),
        (81.0, 3, 27.0, (27.0,)),
        (81.0, 3, 28.0, ()),  # the first rung would come before min_seconds: no halving at all
        (60.0, 2, 7.0, (7.5, 15.0, 30.0)),
        (10.0, 4, 0.5, (0.625, 2.5)),
    ],
)
def test_rung_seconds(budget: float, eta: int, min_seconds: float, expected: tuple[float, ...]) -> None:
    assert rung_seconds(budget, eta, min_seconds) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("budget", "eta", "min_seconds", "bad"),
    [(0.0, 3, 1.0, "budget_seconds"), (10.0, 1, 1.0, "eta"), (10.0, 2.5, 1.0, "eta"), (10.0, True, 1.0, "eta"),
     (10.0, 3, 0.0, "min_seconds")],
)  # fmt: skip
def test_rung_seconds_refuses(budget: float, eta: int, min_seconds: float, bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        rung_seconds(budget, eta, min_seconds)


def test_fronts_of_a_hand_made_set() -> None:
    points = {"a": (1, 5), "b": (2, 2), "c": (5, 1), "d": (3, 3), "e": (6, 6), "f": (2, 2)}
    assert nondominated_fronts(points) == [["a", "b", "c", "f"], ["d"], ["e"]]


def _brute_front(points: dict[str, tuple[float, ...]]) -> set[str]:
    return {k for k, p in points.items() if not any(all(x <= y for x, y in zip(q, p, strict=True)) and q != p
                                                    for q in points.values())}  # fmt: skip


def test_first_front_matches_a_brute_force_oracle() -> None:
    grid = [(x, y, z) for x, y, z in itertools.product(range(3), repeat=3)]
    points = {f"t{i}": p for i, p in enumerate(grid[::2] + grid[1::5])}
    assert set(nondominated_fronts(points)[0]) == _brute_front(points)
    assert sorted(itertools.chain(*nondominated_fronts(points))) == sorted(points)


def test_crowding_distance_by_hand() -> None:
    # x spans 0..4, y spans 0..4; the inner points sum the gaps of their neighbours.
    points = {"a": (0, 4), "b": (1, 3), "c": (3, 1), "d": (4, 0)}
    got = crowding_distance(points)
    assert got["a"] == got["d"] == math.inf
    assert got["b"] == pytest.approx((3 - 0) / 4 + (4 - 1) / 4)
    assert got["c"] == pytest.approx((4 - 1) / 4 + (3 - 0) / 4)


@pytest.mark.parametrize(
    ("points", "eta", "expected"),
    [
        # one objective (quick bpb only): the best third
        ({"a": (3.0,), "b": (1.0,), "c": (2.0,), "d": (5.0,), "e": (4.0,), "f": (0.5,)}, 3, {"f", "b"}),
        # n < eta: one continues, the best
        ({"a": (2.0, 1.0), "b": (1.0, 0.5)}, 3, {"b"}),
        # a single trial always continues
        ({"only": (9.0, 9.0)}, 3, {"only"}),
        # front 0 = {a, b, c} has exactly ceil(9/3) = 3 members
        ({"a": (1, 9), "b": (5, 5), "c": (9, 1), "d": (6, 6), "e": (2, 10), "f": (10, 2), "g": (7, 7),
          "h": (8, 8), "i": (9, 9)}, 3, {"a", "b", "c"}),
        # front 0 holds 1, front 1 must be cut to 1 of 3 by crowding: its boundaries (inf) beat
        # the middle; ties between the two boundaries go to the smaller key
        ({"z": (0, 0), "p": (1, 5), "q": (3, 3), "r": (5, 1), "s": (6, 6), "t": (7, 7)}, 3, {"z", "p"}),
        # the cut front of five: both boundaries (inf), then the most isolated inner point
        ({"a": (0, 10), "b": (1, 9), "c": (2, 8), "d": (6, 4), "e": (10, 0), "x": (11, 11), "y": (12, 12),
          "w": (13, 13), "v": (14, 14), "u": (15, 15)}, 2, {"a", "e", "d", "b", "c"}),
        ({"a": (0, 10), "b": (1, 9), "c": (2, 8), "d": (6, 4), "e": (10, 0), "x": (11, 11), "y": (12, 12)},
         3, {"a", "e", "d"}),
        # duplicates: equal vectors share a front and a distance; the key breaks the tie
        ({"b": (1, 1), "a": (1, 1), "c": (1, 1), "d": (2, 2)}, 2, {"a", "b"}),
        ({"k2": (1.0, 2.0), "k1": (1.0, 2.0), "k3": (3.0, 3.0)}, 3, {"k1"}),
    ],
)  # fmt: skip
def test_survivors(points: dict[str, tuple[float, ...]], eta: int, expected: set[str]) -> None:
    assert survivors(points, eta) == expected


def test_survivors_keep_exactly_ceil_n_over_eta() -> None:
    for n, eta in itertools.product(range(1, 12), (2, 3, 4)):
        points = {f"t{i:02d}": ((i * 7) % 11, (i * 5) % 13, float(i % 3)) for i in range(n)}
        kept = survivors(points, eta)
        assert len(kept) == max(1, math.ceil(n / eta)), (n, eta)
        # nobody stopped dominates anybody kept
        assert not any(all(x <= y for x, y in zip(points[s], points[k], strict=True)) and points[s] != points[k]
                       for s in set(points) - kept for k in kept), (n, eta)  # fmt: skip


def test_survivors_empty_and_bad_input() -> None:
    assert survivors({}, 3) == set()
    with pytest.raises(ValueError, match="eta"):
        survivors({"a": (1.0,)}, 1)
    with pytest.raises(ValueError, match="lengths"):
        survivors({"a": (1.0,), "b": (1.0, 2.0)}, 2)

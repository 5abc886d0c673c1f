"""Pareto-aware successive halving: rungs and keep/stop decisions on hand-made cases."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
from optuna.trial import TrialState
from ray.tune.schedulers import TrialScheduler

from loopgolf.analysis.pareto import pareto_front
from loopgolf.analysis.results import load_results
from loopgolf.orchestrator.halving import (
    Decision,
    RungState,
    crowding_distance,
    nondominated_fronts,
    rebuild_state,
    rung_seconds,
    survivors,
)
from loopgolf.orchestrator.ledger import Ledger
from loopgolf.orchestrator.scheduler import ParetoHalving, predicted_objectives, read_logs, rung_point
from loopgolf.orchestrator.trialdir import final_metrics, trial_dir
from loopgolf.trial.config import preset
from loopgolf.trial.flops import flops_per_token
from tests.orchestrator.sweeps import searcher


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


# ------------------------------------------------------------------ rung state and its rebuild


def _arrive(state: RungState, arrivals: list[tuple[str, float, float]]) -> dict[str, list[Decision]]:
    """Trials report (key, elapsed, bpb) in this order; each judged at every rung it has reached."""
    logs: dict[str, list[Decision]] = {}
    for key, elapsed, bpb in arrivals:
        if key in state.stopped:
            continue
        for rung in state.due(key, elapsed):
            decision = state.judge(key, rung, (bpb,))
            logs.setdefault(key, []).append(decision)
            if not decision.keep:
                break
    return logs


ARRIVALS = [("a", 1.0, 3.0), ("b", 1.2, 2.0), ("c", 1.0, 4.0), ("d", 1.1, 1.0), ("e", 1.0, 5.0),
            ("a", 3.0, 2.9), ("d", 3.5, 0.9), ("b", 3.1, 1.9), ("f", 3.2, 2.5)]  # fmt: skip


def test_asynchronous_decisions_by_hand() -> None:
    state = RungState((1.0, 3.0), eta=3)
    logs = _arrive(state, ARRIVALS)
    # rung 1: a alone (keep); b beats a (keep 1 of 2); c (keep 1 of 3: b); d (keep 2 of 4: d, b); e (2 of 5)
    assert [d.keep for d in logs["a"]] == [True, True]  # first at both rungs
    assert [d.keep for d in logs["c"]] == [False] and [d.keep for d in logs["e"]] == [False]
    # rung 3: a (2.9) alone, kept; d (0.9) keeps 1 of 2; b (1.9) keeps 1 of 3 -> stopped
    assert [d.keep for d in logs["d"]] == [True, True] and [d.keep for d in logs["b"]] == [True, False]
    # f jumped past rung 1 with 2.5: at rung 1 it is 6th of 6 (keep 2: d, b) -> stopped there, never at 3
    assert [(d.rung, d.keep) for d in logs["f"]] == [(1.0, False)]
    assert state.stopped == {"c": 1.0, "e": 1.0, "f": 1.0, "b": 3.0}


def test_rebuilt_state_equals_the_live_one_and_decides_nothing_twice() -> None:
    live = RungState((1.0, 3.0), eta=3)
    logs = _arrive(live, ARRIVALS[:6])
    as_json = {k: [Decision.from_json(json.loads(json.dumps(d.to_json()))) for d in v] for k, v in logs.items()}
    rebuilt = rebuild_state((1.0, 3.0), 3, as_json)
    assert rebuilt == live
    assert rebuilt.due("a", 3.5) == [] and rebuilt.due("d", 1.5) == [] and rebuilt.due("d", 3.5) == [3.0]
    with pytest.raises(ValueError, match="already judged"):
        rebuilt.judge("a", 1.0, (0.0,))
    # the rest of the sweep decides as if the driver had never died
    rest_live, rest_rebuilt = _arrive(live, ARRIVALS[6:]), _arrive(rebuilt, ARRIVALS[6:])
    assert rest_live == rest_rebuilt and rebuilt == live


def test_a_stopped_pair_is_remembered() -> None:
    state = RungState((1.0,), eta=2)
    state.judge("r1", 1.0, (1.0,), pair=("cfg", 0))
    stop = state.judge("r2", 1.0, (2.0,), pair=("cfg", 1))
    assert not stop.keep and state.pair_stopped(("cfg", 1))
    assert rebuild_state((1.0,), 2, {"r1": [], "r2": [stop]}).pair_stopped(("cfg", 1))


def test_a_pair_shared_by_two_routed_configurations_dies_with_the_last_of_them() -> None:
    """Routed configurations that differ only in signal share one pair: its controls live
    while any of its routed trials (at that seed) does."""
    state = RungState((1.0, 3.0), eta=2)
    state.join(("cfg", 0), "entropy")  # both have reported; neither judged yet
    state.join(("cfg", 0), "margin")
    assert not state.pair_stopped(("cfg", 0)) and not state.pair_stopped(("other", 0))
    state.judge("x", 1.0, (0.0,))
    assert not state.judge("entropy", 1.0, (5.0,), pair=("cfg", 0)).keep
    assert not state.pair_stopped(("cfg", 0))  # margin still runs
    state.judge("y", 1.0, (0.1,))
    assert not state.judge("margin", 1.0, (6.0,), pair=("cfg", 0)).keep
    assert state.pair_stopped(("cfg", 0)) and not state.pair_stopped(("cfg", 1)) and not state.pair_stopped(None)


# ------------------------------------------------------------------ the Ray Tune scheduler (no Ray started)


def _config(key: str, n_passes: int = 1, predicted: int = 1000, **extra: Any) -> dict[str, Any]:
    flat = preset("tiny").replace(n_passes=n_passes).to_flat()
    return {"trial_key": key, "trial_config": flat, "config_id": key, "predicted_artifact_bytes": predicted} | extra


def _trial(config: dict[str, Any]) -> SimpleNamespace:
    return SimpleNamespace(trial_id="tune-" + config["trial_key"], config=config)


def _report(scheduler: ParetoHalving, trial: SimpleNamespace, elapsed: float, bpb: float) -> str:
    return scheduler.on_trial_result(None, trial, {"elapsed_seconds": elapsed, "quick_val_bpb": bpb, "step": 1})


def test_scheduler_stops_by_pareto_rank_logs_and_survives_a_driver_kill(tmp_path: Path) -> None:
    objectives = ["val_bpb", "artifact_bytes"]
    scheduler = ParetoHalving(tmp_path, objectives, (1.0, 3.0), eta=2)
    sizes = {"a": 500, "b": 400, "c": 3000, "d": 450, "e": 5000, "f": 100}
    trials = {k: _trial(_config(k, predicted=p)) for k, p in sizes.items()}
    assert _report(scheduler, trials["a"], 0.5, 9.0) == TrialScheduler.CONTINUE  # before the first rung
    expected = [  # (key, bpb at rung 1, decision): keep ceil(n/2) of the n that reached the rung so far
        ("a", 3.0, TrialScheduler.CONTINUE),  # alone
        ("b", 2.0, TrialScheduler.CONTINUE),  # (2, 400) dominates a: 1 of 2
        ("c", 4.0, TrialScheduler.STOP),  # fronts {b} {a} {c}: 2 of 3
        ("d", 2.5, TrialScheduler.CONTINUE),  # fronts {b} {d} {a} {c}: 2 of 4
        ("e", 1.5, TrialScheduler.CONTINUE),  # the best bpb, the most bytes: front {b, e}, then d: 3 of 5
        ("f", 5.0, TrialScheduler.CONTINUE),  # the worst bpb but the fewest bytes: front {b, e, f}: 3 of 6
    ]
    for key, bpb, decision in expected:
        assert _report(scheduler, trials[key], 1.0, bpb) == decision, key
    final = {"status": "complete", "elapsed_seconds": 9.0, "val_bpb": 1.0}
    assert scheduler.on_trial_result(None, trials["a"], final) == TrialScheduler.CONTINUE  # final reports: not judged
    logged = read_logs(tmp_path)
    assert logged["c"] == [Decision(1.0, False, (4.0, 3000.0))] and logged["f"] == [Decision(1.0, True, (5.0, 100.0))]
    assert scheduler.state.stopped == {"c": 1.0}
    # the driver dies (kill -9); a new one rebuilds the rungs from the trial directories
    again = ParetoHalving(tmp_path, objectives, (1.0, 3.0), eta=2)
    assert again.state == scheduler.state
    assert _report(again, trials["c"], 1.5, 1.0) == TrialScheduler.STOP  # stopped stays stopped, whatever its bpb
    assert _report(again, trials["b"], 1.5, 1.9) == TrialScheduler.CONTINUE and read_logs(tmp_path)["b"] == logged["b"]
    assert _report(again, trials["b"], 3.0, 1.9) == TrialScheduler.CONTINUE  # first at rung 3
    assert [d.rung for d in read_logs(tmp_path)["b"]] == [1.0, 3.0]


def test_predicted_objectives_are_the_configs_bytes_and_flops() -> None:
    one, two = predicted_objectives(_config("x", n_passes=1, predicted=7)), predicted_objectives(_config("y", 2))
    assert one["artifact_bytes"] == 7.0
    model = preset("tiny").replace(n_passes=2).model
    assert two["eval_flops_per_token"] == flops_per_token(model) > one["eval_flops_per_token"]
    assert rung_point(["eval_flops_per_token", "val_bpb"], 2.5, two) == (flops_per_token(model), 2.5)


def test_control_arms_are_never_ranked_and_die_with_their_routed_trials(tmp_path: Path) -> None:
    scheduler = ParetoHalving(tmp_path, ["val_bpb"], (1.0,), eta=2)
    first = _trial(_config("r0", arm="routed", pair_id="p"))
    routed = _trial(_config("r1", arm="routed", pair_id="p", **{"trial_config": preset("tiny").to_flat()}))
    control = _trial(_config("u0", arm="uniform", pair_id="p"))
    other_seed = _trial(_config("u1", arm="uniform", pair_id="p") | {"trial_config": preset("tiny").replace(
        seed=preset("tiny").train.seed + 1).to_flat()})  # fmt: skip
    assert _report(scheduler, control, 1.0, 0.1) == TrialScheduler.CONTINUE  # the best bpb, but never ranked
    assert _report(scheduler, first, 1.0, 1.0) == TrialScheduler.CONTINUE
    assert scheduler.state.points[1.0] == {"r0": (1.0,)}
    assert _report(scheduler, routed, 1.0, 2.0) == TrialScheduler.STOP  # 1 of 2 continues; r1 is worse
    # r0 and r1 share the pair and seed (two signals of one pair): r0 still runs, so its controls do
    assert _report(scheduler, control, 2.0, 0.1) == TrialScheduler.CONTINUE
    lone = _trial(_config("s0", arm="routed", pair_id="q"))
    lone_control = _trial(_config("v0", arm="uniform", pair_id="q"))
    assert _report(scheduler, lone, 1.0, 3.0) == TrialScheduler.STOP  # the worst of three: 2 continue
    assert _report(scheduler, lone_control, 2.0, 0.1) == TrialScheduler.STOP  # its only routed trial died
    assert _report(scheduler, other_seed, 2.0, 0.1) == TrialScheduler.CONTINUE  # another seed's pair lives
    rebuilt = ParetoHalving(tmp_path, ["val_bpb"], (1.0,), eta=2)
    assert "v0" in rebuilt.state.stopped and rebuilt.state.stopped == scheduler.state.stopped
    assert rebuilt.state.pair_stopped(("q", preset("tiny").train.seed))


# ------------------------------------------------------------------ a stopped trial's accounting


def test_a_stopped_trial_is_pruned_in_the_study(tmp_path: Path) -> None:
    search = searcher(tmp_path, seeds=1, total=2)
    search.suggest("t0")
    search.suggest("t1")
    search.on_trial_complete("t0", {"elapsed_seconds": 1.0, "quick_val_bpb": 2.0, "step": 3})  # Tune's last result
    search.on_trial_complete("t1", {"status": "stopped", "quick_val_bpb": 2.0})  # re-reported after a resume
    assert [t.state for t in search.study.trials] == [TrialState.PRUNED, TrialState.PRUNED]
    assert all(t.values is None for t in search.study.trials)


def test_a_stopped_trial_keeps_its_row_and_last_quick_metrics_and_never_competes(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, "s", "test")
    directory = trial_dir(tmp_path, "k0")
    directory.mkdir(parents=True)
    lines = [{"step": 10, "elapsed_seconds": 1.5, "quick_val_bpb": 3.25, "train_tokens": 640},
             {"step": 20, "elapsed_seconds": 3.0, "quick_val_bpb": 3.0, "train_tokens": 1280}]  # fmt: skip
    (directory / "progress.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"torn', "utf-8")
    ledger.record_stopped("k0", _config("k0"))
    row = load_results(tmp_path).set_index("trial_id").loc["k0"]
    assert (row["status"], row["quick_val_bpb"], row["train_seconds"], row["train_steps"]) == ("stopped", 3.0, 3.0, 20)
    assert final_metrics(directory)["status"] == "stopped"  # a re-run reports it, never trains again
    # a stopped row better than every complete one is still no part of a front
    rows = pd.DataFrame({"trial_id": ["s", "c1", "c2"], "status": ["stopped", "complete", "complete"],
                         "feasible": [True, True, True], "val_bpb": [0.5, 1.0, 2.0],
                         "artifact_bytes": [10, 30, 20]})  # fmt: skip
    assert list(pareto_front(rows, {"val_bpb": "min", "artifact_bytes": "min"})["trial_id"]) == ["c1", "c2"]

"""ParetoHalving: Pareto-aware successive halving as a Ray Tune scheduler (public TrialScheduler API).

At each rung (elapsed training seconds, halving.rung_seconds) a trial is ranked against
the trials that reached the rung before it on (quick val bpb at the rung, predicted
artifact bytes, analytic eval FLOPs), restricted to the sweep's objectives; the best
1/eta continue (halving.survivors). Bytes and FLOPs are known from the configuration
before training, so only bpb is read from the learning curve.

Every decision is written to the trial's `halving.json` before Tune acts on it; a
resumed driver rebuilds the rung state from those files (halving.rebuild_state), so no
trial is judged twice at a rung, and a trial stopped just before the driver died stops
again at its first report instead of training on.

Paired control arms (`arm` other than "routed", with a `pair_id`) live or die with their
routed configurations: they are never ranked (a control is there to be compared with its
routed trials, not to compete with them), and are stopped at their next report once every
routed trial of the same pair and seed seen so far has been stopped (routed
configurations that differ only in their signal share one pair and its controls). Stopping a control on its own
would leave a routed trial without its comparison; keeping controls of a stopped routed
trial would spend compute on a comparison nobody reads.

A stopped trial is told to Optuna as PRUNED (search.py: no final metrics), and its
ledger row has status `stopped` (ledger.py), so it never enters a front or a comparison.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from loopgolf.orchestrator.halving import Decision, RungState, rebuild_state
from loopgolf.orchestrator.ledger_schema import ROUTED_ARM
from loopgolf.orchestrator.protocol import trial_key
from loopgolf.orchestrator.trialdir import TRIALS_DIR, read_json, trial_dir, write_json
from loopgolf.trial.config import TrialConfig
from loopgolf.trial.flops import flops_per_token

DECISIONS_FILE = "halving.json"  # <trial dir>/halving.json: {"decisions": [Decision.to_json(), ...]}
QUICK_METRIC = "quick_val_bpb"
TIME_ATTR = "elapsed_seconds"


def predicted_objectives(config: Mapping[str, Any]) -> dict[str, float]:
    """What is known of a trial before it trains: its predicted bytes and analytic eval FLOPs."""
    model = TrialConfig.from_flat(config["trial_config"]).model
    refined = 0.0 if model.refine_passes == 0 else 1.0 if model.signal == "uniform" else model.refine_target
    return {
        "artifact_bytes": float(config["predicted_artifact_bytes"]),
        "eval_flops_per_token": float(flops_per_token(model, refined_fraction=refined)),
    }


def rung_point(objectives: Sequence[str], quick_bpb: float, known: Mapping[str, float]) -> tuple[float, ...]:
    """The objective vector at a rung, in the sweep's objective order (all minimised)."""
    return tuple(float(quick_bpb) if name == "val_bpb" else float(known[name]) for name in objectives)


def read_logs(sweep_dir: str | Path) -> dict[str, list[Decision]]:
    """Every trial's decision log in the sweep directory (trial key -> decisions in order)."""
    root = Path(sweep_dir) / TRIALS_DIR
    logs = {}
    for directory in sorted(root.iterdir()) if root.is_dir() else ():
        raw = read_json(directory / DECISIONS_FILE) if directory.is_dir() else None
        if raw is not None:
            logs[directory.name] = [Decision.from_json(d) for d in raw.get("decisions", [])]
    return logs


def pair_of(config: Mapping[str, Any]) -> tuple[str, int] | None:
    """(pair_id, seed) of a paired trial; None when it has no pair."""
    pair_id = config.get("pair_id")
    if pair_id is None:
        return None
    return str(pair_id), int(config["trial_config"].get("seed", 0))


def is_control(config: Mapping[str, Any]) -> bool:
    return config.get("pair_id") is not None and config.get("arm") not in (None, ROUTED_ARM)


class ParetoHalving(FIFOScheduler):
    """Runs trials in order (FIFO) and stops them at rungs by Pareto rank (module docstring)."""

    def __init__(self, sweep_dir: str | Path, objectives: Sequence[str], rungs: Sequence[float], eta: int) -> None:
        super().__init__()
        self.sweep_dir = str(sweep_dir)
        self.objectives = tuple(objectives)
        self.state: RungState = rebuild_state(rungs, eta, read_logs(sweep_dir))
        self.known: dict[str, dict[str, float]] = {}  # trial key -> predicted objectives (cache)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if "status" in result or TIME_ATTR not in result or result.get(QUICK_METRIC) is None:
            return TrialScheduler.CONTINUE  # a final report, or one without the quick metric
        config = trial.config
        key = trial_key(trial)
        if key in self.state.stopped:  # stopped before a driver died: it must not train on
            return TrialScheduler.STOP
        if is_control(config):
            return self._control(key, config, float(result[TIME_ATTR]))
        if pair_of(config) is not None:
            self.state.join(pair_of(config), key)  # type: ignore[arg-type]
        for rung in self.state.due(key, float(result[TIME_ATTR])):
            if key not in self.known:  # only what the objectives need: a script trial predicts nothing
                self.known[key] = predicted_objectives(config) if set(self.objectives) - {"val_bpb"} else {}
            point = rung_point(self.objectives, result[QUICK_METRIC], self.known[key])
            decision = self.state.judge(key, rung, point, pair_of(config))
            self._log(key, decision)
            if not decision.keep:
                return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def _control(self, key: str, config: Mapping[str, Any], elapsed: float) -> str:
        if not self.state.pair_stopped(pair_of(config)):
            return TrialScheduler.CONTINUE
        decision = Decision(rung=elapsed, keep=False)
        self.state.apply(key, decision)
        self._log(key, decision)
        return TrialScheduler.STOP

    def _log(self, key: str, decision: Decision) -> None:
        path = trial_dir(self.sweep_dir, key) / DECISIONS_FILE
        earlier = (read_json(path) or {}).get("decisions", [])
        write_json(path, {"decisions": [*earlier, decision.to_json()]})

    def debug_string(self) -> str:
        counts = {r: sum(1 for at in self.state.stopped.values() if at == r) for r in self.state.rungs}
        return "Pareto-aware halving: stopped " + ", ".join(f"{n} at {r:g}s" for r, n in counts.items())

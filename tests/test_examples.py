"""Every example in examples/ runs end to end with zero failed trials.

A trial whose code raises is a bug, not a data point, and a sweep reports failed trials
but goes on, so a spec that crashes some configurations still "works". Each sweep spec
runs through the real `loopgolf sweep` on the built-in corpus (`corpus_data`: what
`loopgolf data prepare --vocab-size 1024` makes) at a reduced budget (a
couple of seconds per trial, a few trials, one seed); everything else is the spec as
shipped. The trial example runs through `loopgolf trial`.

    python -m pytest tests/test_examples.py -m slow
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from loopgolf.orchestrator.ledger_schema import CONTROL_ARMS

pytestmark = pytest.mark.ray  # its sweeps start Ray: one such test at a time (tests/conftest.py)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
REDUCED = {  # dotted spec fields: the budget, never the configurations
    "budget.train_seconds": 2,
    "search.num_samples": 4,
    "seeds": 1,
    "base.eval_tokens": 4096,
    "base.quick_eval_tokens": 1024,
    "base.report_every_seconds": 1,
    "base.checkpoint_every_seconds": 2,
    "base.calibration_tokens": 4096,
}


REDUCED_SCRIPT = {  # a script sweep's budget: its own seconds and samples, fewer val tokens for the script
    "budget.train_seconds": 3,
    "search.num_samples": 4,
    "seeds": 1,
    "trial.env.VAL_TOKENS": 4096,
}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "loopgolf.cli", *args], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, f"loopgolf {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_every_example_is_covered() -> None:
    assert {p.name for p in EXAMPLES} >= {"routing.yaml", "smoke.yaml", "shared_vs_unique.yaml", "trial_tiny.yaml",
                                          "script_sweep.yaml"}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "example",
    EXAMPLES,
    ids=lambda p: p.stem,
)
def test_example_runs_with_zero_failed_trials(example: Path, corpus_data: Path, tmp_path: Path) -> None:
    spec = yaml.safe_load(example.read_text(encoding="utf-8"))
    if "search" not in spec:  # a trial config
        proc = run("trial", str(example), "--data", str(corpus_data), "--out", str(tmp_path / "trial"),
                   "--set", "train_seconds=2", "--set", "eval_tokens=4096", "--set", "calibration_tokens=4096")
        metrics = json.loads(proc.stdout.strip().splitlines()[-1])
        assert metrics["status"] == "complete", metrics.get("error")
        return
    reduced = REDUCED_SCRIPT if "trial" in spec else REDUCED
    overrides = [f"{key}={value}" for key, value in reduced.items()]
    run("sweep", str(example), "--data", str(corpus_data), "--storage", str(tmp_path), "--name", "ex",
        *(arg for o in overrides for arg in ("--set", o)))
    trials = pd.read_parquet(tmp_path / "ex" / "results" / "trials.parquet")
    assert len(trials) >= REDUCED["search.num_samples"]
    failed = trials[trials["status"] == "failed"]
    assert failed.empty, failed[["trial_id", "error"]].to_string()
    for pair_id, pair in trials[trials["pair_id"].notna()].groupby("pair_id"):  # every pair complete, once
        routed = pair[pair["arm"] == "routed"]
        assert not routed.duplicated(["config_id", "seed"]).any(), pair_id
        slots = sorted(zip(pair.loc[pair["arm"] != "routed", "arm"], pair.loc[pair["arm"] != "routed", "seed"],
                           strict=True))  # fmt: skip
        assert slots == sorted((arm, s) for arm in CONTROL_ARMS for s in set(routed["seed"])), (pair_id, slots)
    if spec.get("space") == "routing":  # every proposal of the routing example is routed: all paired
        pairs = trials["pair_id"].nunique()  # signals of one aux_loss share a pair, and its arms run once
        assert len(trials) == REDUCED["search.num_samples"] + pairs * len(CONTROL_ARMS)
        assert trials["pair_id"].notna().all()

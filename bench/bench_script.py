"""What loopgolf adds to a script trial: the example script alone vs the same run as a trial.

    python bench/bench_script.py [--data runs/demo/data] [--seconds 8]
    PYTHONPATH=. python3 bench/bench_script.py --gpus 1 --no-sweep --seconds 30 \
        --set MODEL_DIM=512 NUM_LAYERS=9 TRAIN_SEQ_LEN=1024 TRAIN_BATCH_TOKENS=65536   # on a GPU

Three runs of `examples/pg_script/train_gpt.py` with the same environment, one after the
other on this machine: (1) alone, `python train_gpt.py`; (2) as a trial without Ray
(`run_script`: the supervisor, the log streamed and parsed, the bytes measured); (3) as a
one-trial sweep (`loopgolf sweep`: Ray, Tune, Optuna, the ledger, MLflow, the report).
It prints each wall time and the ratio to (1), and the trial's own metrics. One sample
each: on a noisy machine, compare ratios from the same run, and read the load average it
prints. `--no-sweep` skips (3), for a machine without Ray (the GPU image); a missing
`--data` directory is prepared from the built-in corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from loopgolf.orchestrator.protocol import TrialRequest
from loopgolf.orchestrator.script import ScriptTrial, trial_environment
from loopgolf.orchestrator.script_trainable import run_script
from loopgolf.trial.prepare import PrepareConfig, prepare

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "pg_script" / "train_gpt.py"
SETTINGS = {"NUM_LAYERS": 4, "MODEL_DIM": 96, "NUM_LOOPS": 2, "MATRIX_LR": 0.02, "NUM_HEADS": 4, "NUM_KV_HEADS": 2,
            "VAL_LOSS_EVERY": 20, "VAL_TOKENS": 8192}  # fmt: skip


def alone(data: Path, seconds: float, settings: dict[str, Any], out: Path) -> float:
    env = trial_environment(ScriptTrial(script=SCRIPT), settings, seed=0, run_id="alone", data=data,
                            train_seconds=seconds, max_steps=0, base=os.environ) | {"OMP_NUM_THREADS": "1"}  # fmt: skip
    out.mkdir(parents=True)
    start = time.monotonic()
    subprocess.run([sys.executable, str(SCRIPT)], cwd=out, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - start


def as_trial(data: Path, seconds: float, settings: dict[str, Any], gpus: int, out: Path) -> tuple[float, dict]:
    config = settings | {"seed": 0, "train_seconds": seconds, "max_steps": 0, "max_artifact_bytes": 16_000_000,
                         "max_eval_seconds": 0.0}  # fmt: skip
    request = TrialRequest(key="trial", kind="script", config=config, config_id="bench")
    start = time.monotonic()
    metrics = run_script(request, ScriptTrial(script=SCRIPT), data, out, cpus=1, gpus=gpus, report=lambda _: None)
    if metrics["status"] != "complete":
        raise SystemExit(f"the script trial did not complete: {metrics.get('error')} (log in {out})")
    return time.monotonic() - start, metrics


def as_sweep(data: Path, seconds: float, settings: dict[str, Any], out: Path) -> tuple[float, float]:
    spec = {"name": "bench", "data": str(data), "storage": str(out),
            "trial": {"script": str(SCRIPT), "env": {k: v for k, v in settings.items() if k not in ("NUM_LAYERS",)}},
            "space": {"NUM_LAYERS": [settings["NUM_LAYERS"]]}, "budget": {"train_seconds": seconds},
            "search": {"algorithm": "grid", "num_samples": 1}, "max_concurrent": 1}  # fmt: skip
    path = out / "spec.yaml"
    out.mkdir(parents=True)
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "loopgolf.cli", "sweep", str(path)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    total = time.monotonic() - start
    metrics = json.loads((out / "bench" / "trials" / "trial_00000" / "metrics.json").read_text())
    return float(metrics["wall_seconds"]), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "runs" / "demo" / "data")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--gpus", type=int, default=0, help="GPUs the trial holds (more than 1: torchrun)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the one-trial sweep (needs Ray)")
    parser.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE", help="override the script's settings")
    args = parser.parse_args()
    settings = SETTINGS | dict(item.split("=", 1) for item in args.set)
    data = args.data.resolve()
    if not (data / "manifest.json").exists():
        prepare(PrepareConfig(out_dir=data, vocab_size=1024))
    root = Path(tempfile.mkdtemp(prefix="bench_script-"))
    walls = {"script alone": alone(data, args.seconds, settings, root / "alone")}
    walls["as a trial (run_script)"], metrics = as_trial(data, args.seconds, settings, args.gpus, root / "trial")
    if not args.no_sweep:
        sweep_trial, sweep_total = as_sweep(data, args.seconds, settings, root / "sweep")
        walls["as a trial in a sweep (its wall_seconds)"] = sweep_trial
        walls["the whole one-trial sweep (Ray start, report)"] = sweep_total
    print(f"load average {os.getloadavg()[0]:.2f}; train budget {args.seconds:g} s; gpus {args.gpus}; one sample each")
    for name, wall in walls.items():
        print(f"{name:48s} {wall:7.2f} s  {wall / walls['script alone']:5.2f}x")
    print(json.dumps({"settings": settings, "trial": metrics}, default=str))


if __name__ == "__main__":
    main()

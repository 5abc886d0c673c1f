"""Synthetic sweep directories with planted effects, for the report's tests.

A sweep here has what the experiment design promises (issue: paired arms, per-token
evaluation): a ledger with `arm` / `pair_id` / `eval_tokens_path`, one per-token Parquet
file per trial, `results/eval_stream.parquet`, and learning curves. Per-token CE is
drawn as token difficulty (shared by every trial: they score the same tokens) + a
configuration effect + a seed effect + noise, so the planted truth is known exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loopgolf.analysis.results import CURVES_FILE, TRIALS_FILE, curves_schema, trials_schema, write_table
from loopgolf.analysis.tokens import STREAM_FILE, eval_stream_schema, eval_tokens_schema
from loopgolf.trial.config import TrialConfig

UNIQUE = {"n_blocks": 6, "n_passes": 1, "d_model": 192}
LOOPED = {"n_blocks": 2, "n_passes": 3, "d_model": 256}
RELAXED = {"n_blocks": 1, "n_passes": 4, "d_model": 320, "phase": "scale"}
ROUTED = {"n_blocks": 2, "n_passes": 2, "d_model": 256, "refine_passes": 1, "signal": "entropy"}


def config_id(overrides: dict[str, Any]) -> str:
    flat = TrialConfig().to_flat() | overrides
    return hashlib.sha1(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:12]


class SweepWriter:
    """Builds one sweep directory; `trial(...)` adds a trial, `write()` writes the ledger."""

    def __init__(self, root: Path, name: str, *, docs: int = 40, tokens_per_doc: int = 60, seed: int = 0,
                 per_token: bool = True, fingerprint: str | None = "data-a") -> None:  # fmt: skip
        self.dir = root / name
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.per_token = per_token
        self.fingerprint = fingerprint
        n = docs * tokens_per_doc
        self.stream = pd.DataFrame({
            "token": self.rng.integers(0, 1024, n).astype(np.int32),
            "document": np.repeat(np.arange(docs) * 7 + 3, tokens_per_doc).astype(np.int64),  # ids need not be 0..D-1
            "position": np.tile(np.arange(tokens_per_doc), docs).astype(np.int32),
            "freq_bucket": self.rng.integers(0, 4, n).astype(np.int16),
        })  # fmt: skip
        self.bytes = self.rng.integers(1, 7, n).astype(np.int32)
        self.difficulty = self.rng.gamma(2.0, 1.2, n)  # nats, shared by every trial
        self.doc = np.repeat(np.arange(docs), tokens_per_doc)
        self.rows: list[dict[str, Any]] = []
        self.curves: list[dict[str, Any]] = []
        self.tokens: dict[str, pd.DataFrame] = {}

    def trial(self, overrides: dict[str, Any], seed: int, *, effect: float = 0.0, seed_sd: float = 0.01,
              arm: str | None = None, pair_id: str | None = None, refine_gain: float = 0.0,
              row: dict[str, Any] | None = None) -> str:  # fmt: skip
        """Add one trial; `effect` shifts every token's CE (nats), `refine_gain` lowers refined tokens' CE."""
        cid = config_id(overrides)
        trial_id = f"{self.name}-{cid}-{arm or 'x'}-{seed}"
        n = len(self.difficulty)
        ce = self.difficulty + effect + self.rng.normal(0, seed_sd) + self.rng.normal(0, 0.3, n)
        score = self.difficulty + self.rng.normal(0, 0.5, n)  # the router sees difficulty, noisily
        refined = np.zeros(n, dtype=bool)
        if arm == "routed":
            refined = score > np.quantile(score, 0.8)
            ce = ce - refine_gain * refined * (score > np.quantile(score, 0.9))  # helps the top decile only
        ce = np.maximum(ce, 0.01)
        bpb = float(ce.sum() / math.log(2) / self.bytes.sum())
        flat = TrialConfig().to_flat() | overrides
        record = flat | {
            "sweep": self.name, "trial_id": trial_id, "status": "complete", "config_id": cid, "seed": seed,
            "host": "h", "val_bpb": bpb, "val_bpb_prequant": bpb - 0.01, "artifact_bytes": 900_000,
            "max_artifact_bytes": 1_000_000, "eval_flops_per_token": 1e6, "train_seconds": 20.0,
            "eval_seconds": 2.0 * math.exp(self.rng.normal(0, 0.02)),
            "train_steps": 100, "train_tokens": 200_000, "tokens_per_second": 10_000.0, "feasible": True,
            "arm": arm, "pair_id": pair_id, "refine_fraction": float(refined.mean()), "refine_target": 0.2,
        }  # fmt: skip
        if self.fingerprint is not None:
            record["data_fingerprint"] = self.fingerprint
        if self.per_token:
            record["eval_tokens_path"] = f"trials/{trial_id}/eval_tokens.parquet"
            self.tokens[record["eval_tokens_path"]] = pd.DataFrame({
                "ce": ce.astype(np.float32), "base_ce": (ce + refined * 0.05).astype(np.float32), "refined": refined,
                "router_score": score.astype(np.float32), "bytes": self.bytes,
            })  # fmt: skip
        self.rows.append(record | (row or {}))
        for step in range(1, 6):
            self.curves.append({"sweep": self.name, "trial_id": trial_id, "step": step * 20,
                                "elapsed_seconds": step * 4.0, "metric": "quick_val_bpb",
                                "value": bpb + 0.5 / step})  # fmt: skip
        return trial_id

    def pair(self, overrides: dict[str, Any], seeds: range, *, refine_gain: float,
             arm_effects: dict[str, float] | None = None, arm_rows: dict[str, dict[str, Any]] | None = None) -> str:
        """A routed configuration and its four control arms on the same seeds."""
        pair_id = config_id(overrides)
        arm_effects = arm_effects or {}
        for arm in ("routed", "no_refine", "uniform", "stride", "random"):
            arm_overrides = overrides | ({"refine_passes": 0} if arm == "no_refine" else {})
            if arm not in ("routed", "no_refine"):
                arm_overrides = arm_overrides | {"signal": arm}
            for seed in seeds:
                self.trial(arm_overrides, seed, arm=arm, pair_id=pair_id, effect=arm_effects.get(arm, 0.0),
                           refine_gain=refine_gain if arm == "routed" else 0.0,
                           row=(arm_rows or {}).get(arm))  # fmt: skip
        return pair_id

    def write(self) -> Path:
        write_table(pd.DataFrame(self.rows), self.dir / TRIALS_FILE, trials_schema())
        write_table(pd.DataFrame(self.curves), self.dir / CURVES_FILE, curves_schema())
        if self.per_token:
            write_table(self.stream, self.dir / STREAM_FILE, eval_stream_schema())
            for path, frame in self.tokens.items():
                write_table(frame, self.dir / path, eval_tokens_schema())
        return self.dir


def full_sweep(root: Path, name: str = "full", *, per_token: bool = True, looped_effect: float = -0.15,
               refine_gain: float = 1.0, seeds: int = 3) -> Path:  # fmt: skip
    """Unique, looped (strict and relaxed) and one routed pair with all four arms."""
    w = SweepWriter(root, name, per_token=per_token)
    for seed in range(seeds):
        w.trial(UNIQUE, seed)
        w.trial(LOOPED, seed, effect=looped_effect)
        w.trial(RELAXED, seed, effect=0.0)
    w.pair(ROUTED, range(seeds), refine_gain=refine_gain,
           arm_rows={"uniform": {"eval_seconds": 3.0, "eval_flops_per_token": 1.25e6}})  # fmt: skip
    return w.write()

"""The trial protocol: what a trial is asked to run, across the Tune boundary.

Ray Tune hands a trainable a plain dict (its `config`); the searcher builds it and the
ledger, the schedulers and the tracking read it back. `TrialRequest` is that dict,
typed: one home for its keys, built by the searcher (`to_tune`) and read everywhere
else (`of` / `from_tune`). What a trial reports back is its final metrics (a dict
with `status` and the metric names of DESIGN's table), written to `metrics.json` in
its directory and reported to Tune by `trialdir.finish`.

Two kinds implement it, and neither knows the other:

- `builtin`: loopgolf's own `RecurrentLM` (trainable.py): `config` is the flat
  `TrialConfig` (`TrialConfig.to_flat()`).
- `script`: the user's training script (script_trainable.py): `config` holds the
  environment variables the space set (upper case) beside the sweep's budget fields
  (`seed`, `train_seconds`, `max_steps`, `max_artifact_bytes`, `max_eval_seconds`).

A third kind (a user's Python function, say) is a new value of `kind`, a sampler that
returns its `config`, and a trainable that takes a `TrialRequest` and ends with
`trialdir.finish`; the searcher, ledger and schedulers need nothing new.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

TrialKind = Literal["builtin", "script"]
KINDS: tuple[str, ...] = ("builtin", "script")
# The Tune config's keys (and trial.json's, which keeps them): stable, sweeps on disk use them.
KEY, KIND, CONFIG, CONFIG_ID, PREDICTED, ARM, PAIR, PROMOTED, FIDELITY = (
    "trial_key", "kind", "trial_config", "config_id", "predicted_artifact_bytes", "arm", "pair_id", "promoted_from",
    "fidelity",
)  # fmt: skip
RECORD_KEYS = (KEY, KIND, CONFIG, CONFIG_ID, PREDICTED, ARM, PAIR, PROMOTED, FIDELITY)


@dataclasses.dataclass(frozen=True)
class TrialRequest:
    """One trial as the searcher asks for it: which configuration, seed, arm and pair."""

    key: str  # names the trial's directory and ledger row; kept across re-runs
    kind: TrialKind
    config: Mapping[str, Any]  # the builtin's flat TrialConfig, or a script's env values and budget
    config_id: str  # the configuration without its seed: replicates share it
    predicted_artifact_bytes: int | None = None  # None: not predictable before the run (a script)
    arm: str | None = None  # routed or a control arm (orchestrator/arms.py); None for an unpaired kind
    pair_id: str | None = None
    promoted_from: str | None = None  # a promoted sweep's trial: "<source sweep>:<source config_id>"
    fidelity: str | None = None  # and the fields its sweep changed from the source's (JSON)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"trial kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if not self.key:
            raise ValueError("trial key: expected a non-empty string")

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    def to_tune(self) -> dict[str, Any]:
        return {KEY: self.key, KIND: self.kind, CONFIG: dict(self.config), CONFIG_ID: self.config_id,
                PREDICTED: self.predicted_artifact_bytes, ARM: self.arm, PAIR: self.pair_id,
                PROMOTED: self.promoted_from, FIDELITY: self.fidelity}  # fmt: skip

    @classmethod
    def from_tune(cls, config: Mapping[str, Any], fallback_key: str = "") -> TrialRequest:
        """A Tune config (or a trial.json record) as a request; records written before `kind`
        existed are builtin trials."""
        return cls(
            key=str(config.get(KEY) or fallback_key),
            kind=config.get(KIND) or "builtin",
            config=dict(config.get(CONFIG) or {}),
            config_id=str(config.get(CONFIG_ID) or ""),
            predicted_artifact_bytes=config.get(PREDICTED),
            arm=config.get(ARM),
            pair_id=config.get(PAIR),
            promoted_from=config.get(PROMOTED),
            fidelity=config.get(FIDELITY),
        )

    @classmethod
    def of(cls, tune_trial: Any) -> TrialRequest:
        """The request of a Tune `Trial` (callbacks, schedulers)."""
        return cls.from_tune(tune_trial.config, fallback_key=str(tune_trial.trial_id))


def trial_key(tune_trial: Any) -> str:
    """The key of a Tune `Trial`: the searcher's, or Tune's id for a trial no searcher keyed."""
    return str(tune_trial.config.get(KEY) or tune_trial.trial_id)

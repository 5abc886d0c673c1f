"""SweepSpec: a sweep described in YAML, validated before anything starts.

    name: smoke
    data: runs/demo/data            # a prepared data dir (relative to the current directory)
    storage: runs/sweeps            # the sweep lives in <storage>/<name>: a local path (run_sweep
                                    # refuses a URI such as s3://...; object stores are not supported)
    space: shared_vs_unique         # a named space (loopgolf.search_spaces.spaces)
    overrides: {n_passes: [1, 2]}   # fix a field, narrow a range, replace or add choices
    base: {preset: tiny, batch_size: 16}   # fixed trial fields under the sampled ones
    equal_bytes: false              # true: solve the width so every config spends the budget
    budget: {artifact_bytes: 16000000, train_seconds: 20, eval_seconds: 0}
    search: {algorithm: tpe, objectives: {val_bpb: min, artifact_bytes: min}, num_samples: 6, seed: 0}
    seeds: 1                        # replicates per configuration
    controls: null                  # arms run beside each routed configuration (orchestrator/arms.py);
                                    # null: all of no_refine, uniform, stride, random when the space routes
    max_concurrent: 2
    resources: {cpu: 1, gpu: 0, workers: 1}   # workers > 1: data parallel (Ray Train), cpu/gpu per worker
    tracking_uri: null              # default: sqlite:///<sweep>/mlflow.db
    early_stopping: null            # or asha (single objective only), or
                                    # {algorithm: pareto_halving, eta: 3, min_seconds: 2} (halving.py)

A script sweep (orchestrator/script.py) names the user's training script instead:

    trial: {script: train_gpt.py, env: {NUM_HEADS: 8}}
    space: {NUM_LAYERS: [9, 10, 11], MATRIX_LR: {low: 0.02, high: 0.06, log: true}}
    base: {max_steps: 0, seed: 0}   # ITERATIONS when > 0 (then train_seconds may be 0); the first SEED

Every bad value is one LoopgolfError naming it, raised before a directory is made.

Accounting: `num_samples` counts the configurations the sampler proposes. Each routed one
(signal entropy, margin, resid_norm or kl, refine_passes > 0) also runs each control arm,
so a sweep runs (num_samples + routed proposals x len(controls)) x seeds trials: at most
num_samples x (1 + len(controls)) x seeds, exactly that when every proposal is routed (a
routing grid). A pair is never left incomplete: the sweep ends when the last proposal's
arms have run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from loopgolf.errors import LoopgolfError
from loopgolf.orchestrator.arms import ArmsError, parse_controls, space_can_route
from loopgolf.orchestrator.halving import rung_seconds
from loopgolf.orchestrator.ledger_schema import METRICS as LEDGER_METRICS
from loopgolf.orchestrator.script import (
    ScriptTrial,
)
from loopgolf.search_spaces.spaces import apply_overrides, dimension, named_space
from loopgolf.trial.config import (
    TrialConfig,
    coerce_field,
    preset,
)

Algorithm = Literal["tpe", "nsga2", "random", "grid"]
EarlyStopping = Literal["asha", "pareto_halving"]
# What Pareto-aware halving can rank at a rung: quick val bpb stands for val_bpb; bytes and
# eval FLOPs are predicted from the configuration before training (scheduler.py).
HALVING_OBJECTIVES = ("val_bpb", "artifact_bytes", "eval_flops_per_token")
METRICS = tuple(m for m in LEDGER_METRICS if m != "feasible")  # what an objective may name: the numeric metrics



class SpecError(LoopgolfError):
    """A sweep spec value is missing or invalid."""


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    name: str
    data: Path
    storage: str = "runs/sweeps"
    space: str | Mapping[str, Any] = "shared_vs_unique"  # a named space; a script sweep's env var -> dimension
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    base: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    equal_bytes: bool = False
    artifact_bytes: int = 16_000_000
    train_seconds: float = 20.0
    eval_seconds: float = 0.0  # eval cap; 0 = none
    algorithm: Algorithm = "tpe"
    objectives: Mapping[str, str] = dataclasses.field(default_factory=lambda: {"val_bpb": "min"})
    num_samples: int = 6
    search_seed: int = 0
    seeds: int = 1
    max_concurrent: int = 2
    cpu: float = 1.0  # per trial; per worker when workers > 1
    gpu: float = 0.0  # per trial; per worker when workers > 1 (then 0 or 1: one GPU per rank)
    workers: int = 1  # data-parallel ranks per trial; > 1 runs the trial through Ray Train's TorchTrainer
    tracking_uri: str | None = None
    early_stopping: EarlyStopping | None = None
    halving_eta: int = 3  # pareto_halving: keep the best 1/eta at each rung
    halving_min_seconds: float | None = None  # pareto_halving: the first rung; None = train_seconds / eta^2
    controls: tuple[str, ...] | None = None  # None: every supported arm when the space can route
    trial: ScriptTrial | None = None  # a script sweep: `space` is then a mapping of env var -> dimension
    # a promoted sweep (orchestrator/promote.py): {source, fidelity: {dotted key: value}, configs: [{promoted_from,
    # params}]}; its proposals are those configurations, not the sampler's
    promotion: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.trial is not None:
            self._check_script()
        elif not isinstance(self.space, str):
            raise SpecError(f"space={self.space!r}: expected the name of a space (a mapping of environment "
                            "variables is a script sweep's: add `trial: {script: ...}`)")  # fmt: skip
        if "seed" in self.overrides:
            raise SpecError("overrides.seed: seeds are never searched (the challenge bans seed brute-forcing); set "
                            "base.seed, and `seeds: N` replicates every configuration")  # fmt: skip
        if self.promotion is not None:
            self._check_promotion()
        if self.controls is not None:
            try:  # the normal form: a tuple in the fixed order (a resume queues arms the same way)
                object.__setattr__(self, "controls", parse_controls(self.controls))
            except ArmsError as exc:
                raise SpecError(str(exc)) from None
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name) or set(self.name) == {"."}:
            raise SpecError(f"name={self.name!r}: expected letters, digits, '-', '_' or '.' (not only dots)")
        if self.is_local and Path(self.storage).exists() and not Path(self.storage).is_dir():
            raise SpecError(f"storage={self.storage!r}: is a file; expected a directory for sweeps")
        if not Path(self.data).is_dir():
            raise SpecError(f"data={str(self.data)!r}: no such directory (run `loopgolf data prepare --out ...`)")
        if self.trial is None and not (Path(self.data) / "manifest.json").is_file():
            raise SpecError(f"data={str(self.data)!r}: no manifest.json (run `loopgolf data prepare --out ...`)")
        if self.algorithm not in ("tpe", "nsga2", "random", "grid"):
            raise SpecError(f"search.algorithm={self.algorithm!r}: expected one of tpe, nsga2, random, grid")
        if not self.objectives:
            raise SpecError("search.objectives: expected at least one of " + ", ".join(METRICS))
        for metric, mode in self.objectives.items():
            if metric not in METRICS:
                raise SpecError(f"search.objectives: unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
            if mode not in ("min", "max"):
                raise SpecError(f"search.objectives.{metric}={mode!r}: expected min or max")
        for name in ("num_samples", "seeds", "max_concurrent"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise SpecError(f"{name}={getattr(self, name)!r}: expected an integer >= 1")
        if self.artifact_bytes < 1:
            raise SpecError(f"budget.artifact_bytes={self.artifact_bytes}: expected >= 1")
        fixed_steps = self.trial is not None and int(self.base.get("max_steps") or 0) > 0
        if self.train_seconds < 0 or (self.train_seconds == 0 and not fixed_steps) or self.eval_seconds < 0:
            zero = " (or 0 with base.max_steps: a fixed-step search)" if self.trial is not None else ""
            raise SpecError(f"budget: expected train_seconds > 0{zero} and eval_seconds >= 0")
        if self.cpu <= 0 or self.gpu < 0:
            raise SpecError(f"resources: cpu={self.cpu}, gpu={self.gpu}: expected cpu > 0 and gpu >= 0")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise SpecError(f"resources.workers={self.workers!r}: expected an integer >= 1")
        if self.workers > 1 and self.gpu not in (0, 1):
            raise SpecError(
                f"resources.gpu={self.gpu} with workers={self.workers}: expected 0 or 1 (GPUs per worker; each "
                "data-parallel rank drives one whole GPU)"
            )
        if self.early_stopping not in (None, "asha", "pareto_halving"):
            raise SpecError(
                f"early_stopping={self.early_stopping!r}: expected null, asha or {{algorithm: pareto_halving, ...}}"
            )
        if self.early_stopping == "pareto_halving":
            self._check_halving()
        if self.early_stopping == "asha" and len(self.objectives) > 1:
            raise SpecError(
                "early_stopping=asha is refused with several objectives: ASHA ranks trials on one metric, and the "
                "trials it stops would enter the multi-objective study with truncated values"
            )
        if self.early_stopping == "asha" and list(self.objectives) != ["val_bpb"]:
            raise SpecError("early_stopping=asha needs objectives {val_bpb: min}: it compares quick val bpb over time")

    def _check_promotion(self) -> None:
        promotion = self.promotion or {}
        configs = promotion.get("configs")
        if set(promotion) != {"source", "fidelity", "configs"} or not isinstance(configs, list) or not configs:
            raise SpecError("promotion: expected {source, fidelity, configs: [{promoted_from, params}, ...]} "
                            "(written by `loopgolf promote`)")  # fmt: skip
        if any(not isinstance(c, Mapping) or set(c) != {"promoted_from", "params"} for c in configs):
            raise SpecError("promotion.configs: expected items {promoted_from, params}")
        if self.num_samples != len(configs):
            raise SpecError(f"search.num_samples={self.num_samples}: a promoted sweep runs its {len(configs)} "
                            "configurations; expected that many")  # fmt: skip

    def _check_script(self) -> None:
        """What a script sweep cannot have: the builtin model's fields, widths and arms."""
        if not isinstance(self.space, Mapping) or not self.space:
            raise SpecError("space: a script sweep expects a mapping of environment variable -> dimension, "
                            "e.g. {NUM_LAYERS: [8, 9, 10]}")  # fmt: skip
        for name, value in {"overrides": self.overrides, "equal_bytes": self.equal_bytes,
                            "controls": self.controls}.items():  # fmt: skip
            if value:
                raise SpecError(f"{name}: applies to the builtin model, not to a script sweep; remove it")
        unknown = sorted(set(self.base) - {"max_steps", "seed"})
        if unknown:
            raise SpecError(f"base.{unknown[0]}: a script sweep's base takes max_steps and seed only "
                            "(the script's own settings go in trial.env)")  # fmt: skip
        for key in ("max_steps", "seed"):
            value = self.base.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SpecError(f"base.{key}={value!r}: expected an integer >= 0")
        if self.workers != 1:
            raise SpecError(f"resources.workers={self.workers}: a script trial is one process, or torchrun with "
                            "resources.gpu processes; expected workers: 1")  # fmt: skip
        if self.early_stopping == "pareto_halving" and set(self.objectives) != {"val_bpb"}:
            raise SpecError("early_stopping=pareto_halving in a script sweep needs objectives {val_bpb: min}: a "
                            "script's bytes are known only when it ends")  # fmt: skip

    def script_budget(self) -> dict[str, Any]:
        """The fields every script trial's config carries beside the space's values."""
        return {"seed": int(self.base.get("seed", 0)), "train_seconds": float(self.train_seconds),
                "max_steps": int(self.base.get("max_steps", 0)), "max_artifact_bytes": int(self.artifact_bytes),
                "max_eval_seconds": float(self.eval_seconds)}  # fmt: skip

    def _check_halving(self) -> None:
        eta = self.halving_eta
        if isinstance(eta, bool) or not isinstance(eta, int) or eta < 2:
            raise SpecError(f"early_stopping.eta={eta!r}: expected an integer >= 2")
        low = self.halving_min_seconds
        if low is not None and (isinstance(low, bool) or not isinstance(low, (int, float)) or low <= 0):
            raise SpecError(f"early_stopping.min_seconds={low!r}: expected a number of seconds > 0")
        if low is not None and low > self.train_seconds / eta:
            raise SpecError(
                f"early_stopping.min_seconds={low}: expected <= budget.train_seconds / eta = "
                f"{self.train_seconds / eta:g} (the last rung), or no trial would ever be stopped"
            )
        for metric, mode in self.objectives.items():
            if metric not in HALVING_OBJECTIVES or mode != "min":
                raise SpecError(
                    f"early_stopping=pareto_halving: objective {metric}: {mode} cannot be ranked at a rung; expected "
                    f"{', '.join(HALVING_OBJECTIVES)} minimised (quick bpb, predicted bytes, analytic eval FLOPs)"
                )
        if "val_bpb" not in self.objectives:
            raise SpecError("early_stopping=pareto_halving needs val_bpb among the objectives: it is the one learned "
                            "over time; the others are known before training")  # fmt: skip

    def halving_rungs(self) -> tuple[float, ...]:
        """Pareto-aware halving's rungs in elapsed training seconds (halving.py)."""
        low = self.halving_min_seconds or self.train_seconds / self.halving_eta**2
        return rung_seconds(self.train_seconds, self.halving_eta, low)

    @property
    def sweep_dir(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"

    @property
    def is_local(self) -> bool:
        return "://" not in self.storage

    @property
    def is_script(self) -> bool:
        return self.trial is not None

    def search_space(self) -> dict[str, Any]:
        """The named space with the spec's overrides applied; a script sweep's own dimensions."""
        if not isinstance(self.space, str):
            return {name: dimension(name, value) for name, value in self.space.items()}
        return apply_overrides(named_space(self.space), self.overrides)

    def control_arms(self) -> tuple[str, ...]:
        """The arms queued beside every routed configuration the sampler proposes."""
        if self.trial is not None:
            return ()
        if self.controls is not None:
            return self.controls
        routes = space_can_route(self.search_space(), self.base_config().to_flat())
        return parse_controls(None) if routes else ()

    def base_config(self) -> TrialConfig:
        """The fixed part of every trial: base fields plus the sweep's budgets."""
        values = dict(self.base)
        start = preset(str(values.pop("preset"))) if "preset" in values else TrialConfig()
        values = {k: coerce_field(k, v) for k, v in values.items()}
        values |= {
            "train_seconds": float(self.train_seconds),
            "max_artifact_bytes": int(self.artifact_bytes),
            "max_eval_seconds": float(self.eval_seconds),
        }
        return TrialConfig.from_flat(values, base=start)

    def to_yaml_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "data": str(Path(self.data).resolve()),
            "storage": self.storage,
            "space": self.space if isinstance(self.space, str) else dict(self.space),
            "overrides": dict(self.overrides),
            "base": dict(self.base),
            "equal_bytes": self.equal_bytes,
            "budget": {
                "artifact_bytes": self.artifact_bytes,
                "train_seconds": self.train_seconds,
                "eval_seconds": self.eval_seconds,
            },
            "search": {
                "algorithm": self.algorithm,
                "objectives": dict(self.objectives),
                "num_samples": self.num_samples,
                "seed": self.search_seed,
            },
            "seeds": self.seeds,
            "max_concurrent": self.max_concurrent,
            "resources": {"cpu": self.cpu, "gpu": self.gpu, "workers": self.workers},
            "tracking_uri": self.tracking_uri,
            "early_stopping": self._early_stopping_yaml(),
            "controls": list(self.controls) if self.controls is not None else None,
        } | ({"trial": self.trial.to_yaml_dict()} if self.trial is not None else {}) | (
            {"promotion": dict(self.promotion)} if self.promotion is not None else {})

    def _early_stopping_yaml(self) -> str | dict[str, Any] | None:
        if self.early_stopping != "pareto_halving":
            return self.early_stopping
        return {"algorithm": "pareto_halving", "eta": self.halving_eta, "min_seconds": self.halving_min_seconds}

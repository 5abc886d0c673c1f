"""The script trial: a user's Parameter Golf `train_gpt.py`, configured by environment variables.

    trial:
      script: path/to/train_gpt.py       # `python` when gpu <= 1, else torchrun --nproc_per_node=<gpu>
      env: {NUM_HEADS: 8}                # fixed for every trial
      model_file: final_model.int8.ptz   # what the script writes in its working directory
      code_files: [train_gpt.py]         # the counted code (relative to the script's folder)
      metrics: {final: '...'}            # regexes replacing the default patterns below
      tokenizer: null                    # default: <data>/tokenizer.model, or the challenge's layout
      names: {SEED: SEED, ...}           # the variables loopgolf sets, for forks that name them otherwise
      grace_seconds: 300                 # a trial is killed past train_seconds + eval_seconds + this
    space: {NUM_LAYERS: [8, 9, 10]}      # env var -> dimension, the syntax of `overrides`

This module is pure: the spec section, the environment a trial receives, its command
line, the log's patterns and what they match, and the bytes measured from disk. Running
it is script_trainable.py's job; the process group supervise.py's.

loopgolf sets, for every trial: MAX_WALLCLOCK_SECONDS (the sweep's train_seconds: equal
wall-clock), ITERATIONS (when the sweep fixes max_steps), SEED, RUN_ID (the trial key),
DATA_PATH and TOKENIZER_PATH. A space or env key that collides with one is refused.
Bytes are measured, not believed: `model_bytes` is the size of `model_file` on disk,
`code_bytes` the size of the `code_files`; the script's own "Total submission size" is
recorded beside them (`artifact_bytes_logged`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loopgolf.errors import LoopgolfError
from loopgolf.search_spaces.spaces import Dimension, flat_config_id, suggest


class ScriptError(LoopgolfError):
    """A script trial's spec, environment, log or files are not what is expected."""


# The variables loopgolf sets, by role; `trial.names` renames them for a fork.
ROLES = ("wallclock", "iterations", "seed", "run_id", "data", "tokenizer")
DEFAULT_NAMES: Mapping[str, str] = {
    "wallclock": "MAX_WALLCLOCK_SECONDS", "iterations": "ITERATIONS", "seed": "SEED", "run_id": "RUN_ID",
    "data": "DATA_PATH", "tokenizer": "TOKENIZER_PATH",
}  # fmt: skip
ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
_NUM = r"(?:[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)"

# The challenge baseline's lines. `final` matches every quantizer's roundtrip line of the
# records (final_int8_zlib_roundtrip_exact, final_int6_roundtrip_exact, ...); the last match
# in the log is the score, and the ledger says which line it was (`final_metric_line`).
DEFAULT_PATTERNS: Mapping[str, str] = {
    "train": rf"^step:(?P<step>\d+)/\d+ train_loss:(?P<train_loss>{_NUM}) train_time:(?P<train_time_ms>{_NUM})ms"
             rf" step_avg:(?P<step_avg_ms>{_NUM})ms",
    "val": rf"^step:(?P<step>\d+)/\d+ val_loss:(?P<val_loss>{_NUM}) val_bpb:(?P<val_bpb>{_NUM})"
           rf" train_time:(?P<train_time_ms>{_NUM})ms",
    "final": rf"^(?P<line>final_\w*?_exact) val_loss:(?P<val_loss>{_NUM}) val_bpb:(?P<val_bpb>{_NUM})",
    "model_bytes": r"^Serialized model[^:]*:\s*(?P<bytes>\d+) bytes",
    "code_bytes": r"^Code size:\s*(?P<bytes>\d+) bytes",
    "total_bytes": r"^Total submission size[^:]*:\s*(?P<bytes>\d+) bytes",
    "stopped_early": r"^stopping_early: wallclock_cap",
    "params": r"^model_params:(?P<params>\d+)",
    "eval_time": rf"^final_\w*?roundtrip val_loss:{_NUM} val_bpb:{_NUM} eval_time:(?P<eval_time_ms>{_NUM})ms",
}  # fmt: skip
REQUIRED_GROUPS: Mapping[str, tuple[str, ...]] = {
    "train": ("step", "train_loss", "train_time_ms"), "val": ("step", "val_bpb", "train_time_ms"),
    "final": ("val_loss", "val_bpb"), "total_bytes": ("bytes",),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ScriptTrial:
    """The spec's `trial:` section, validated: paths resolved, patterns compiled once."""

    script: Path
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    model_file: str = "final_model.int8.ptz"
    code_files: tuple[str, ...] = ()  # relative to the script's folder; () = the script alone
    metrics: Mapping[str, str] = dataclasses.field(default_factory=dict)  # pattern overrides by name
    tokenizer: Path | None = None
    names: Mapping[str, str] = dataclasses.field(default_factory=dict)  # role -> variable, over DEFAULT_NAMES
    grace_seconds: float = 300.0
    python: str = ""  # the interpreter; "" = the one running loopgolf

    def __post_init__(self) -> None:
        script = Path(self.script).expanduser().resolve()
        if not script.is_file():
            raise ScriptError(f"trial.script={str(self.script)!r}: no such file (expected the training script)")
        object.__setattr__(self, "script", script)
        object.__setattr__(self, "env", {str(k): env_text(f"trial.env.{k}", v) for k, v in self.env.items()})
        object.__setattr__(self, "code_files", tuple(self.code_files) or (script.name,))
        for name in self.code_files:
            if not (script.parent / name).is_file():
                raise ScriptError(f"trial.code_files: {name!r} is not a file in {script.parent}")
        if not self.model_file or Path(self.model_file).is_absolute() or ".." in Path(self.model_file).parts:
            raise ScriptError(f"trial.model_file={self.model_file!r}: expected a path inside the working directory")
        unknown = set(self.names) - set(ROLES)
        if unknown:
            raise ScriptError(f"trial.names: unknown role(s) {sorted(unknown)}; expected some of {list(ROLES)}")
        for key in [*self.env, *self.names.values()]:
            if not ENV_NAME.fullmatch(key):
                raise ScriptError(f"{key!r}: expected an environment variable name (A-Z, 0-9, _)")
        self.patterns()  # a bad regex fails now, not in a trial
        reserved = set(self.variables().values())
        clash = sorted(reserved & set(self.env))
        if clash:
            raise ScriptError(f"trial.env sets {clash[0]}, which loopgolf sets for every trial; remove it")
        if self.grace_seconds < 0:
            raise ScriptError(f"trial.grace_seconds={self.grace_seconds}: expected >= 0")

    def variables(self) -> dict[str, str]:
        """Role -> the variable name loopgolf sets for it."""
        return {role: self.names.get(role, DEFAULT_NAMES[role]) for role in ROLES}

    def patterns(self) -> dict[str, re.Pattern[str]]:
        unknown = set(self.metrics) - set(DEFAULT_PATTERNS)
        if unknown:
            raise ScriptError(f"trial.metrics: unknown pattern(s) {sorted(unknown)}; expected {list(DEFAULT_PATTERNS)}")
        compiled = {}
        for name, text in {**DEFAULT_PATTERNS, **self.metrics}.items():
            try:
                compiled[name] = re.compile(text, re.MULTILINE)
            except re.error as exc:
                raise ScriptError(f"trial.metrics.{name}={text!r}: not a regular expression ({exc})") from None
            missing = [g for g in REQUIRED_GROUPS.get(name, ()) if g not in compiled[name].groupindex]
            if missing:
                raise ScriptError(f"trial.metrics.{name}: expected the named group(s) {missing} in the pattern")
        return compiled

    def check_space(self, names: Sequence[str]) -> None:
        """Refuse a space dimension loopgolf sets, or that `env` fixes too."""
        reserved = set(self.variables().values())
        for name in names:
            if not ENV_NAME.fullmatch(name):
                raise ScriptError(f"space: {name!r}: expected an environment variable name (A-Z, 0-9, _)")
            if name in reserved:
                raise ScriptError(f"space: {name} is set by loopgolf for every trial (from the sweep's budget, seed "
                                  "or data); remove it from the space")  # fmt: skip
            if name in self.env:
                raise ScriptError(f"space: {name} is also fixed in trial.env; keep one of them")

    def to_yaml_dict(self) -> dict[str, Any]:
        return {"script": str(self.script), "env": dict(self.env), "model_file": self.model_file,
                "code_files": list(self.code_files), "metrics": dict(self.metrics),
                "tokenizer": str(self.tokenizer) if self.tokenizer else None, "names": dict(self.names),
                "grace_seconds": self.grace_seconds, "python": self.python}  # fmt: skip


def env_text(where: str, value: Any) -> str:
    """An environment value as the script will read it; bool as 1/0 (the challenge's scripts parse ints)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, str)):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    raise ScriptError(f"{where}={value!r}: expected a string, number or boolean (an environment value)")


def script_trial_from_dict(raw: Mapping[str, Any]) -> ScriptTrial:
    fields = {f.name for f in dataclasses.fields(ScriptTrial)}
    unknown = set(raw) - fields
    if unknown:
        raise ScriptError(f"trial: unknown field(s) {sorted(unknown)}; expected some of {sorted(fields)}")
    if "script" not in raw:
        raise ScriptError("trial: expected `script: path/to/train_gpt.py`")
    values = dict(raw)
    for key in ("env", "metrics", "names"):
        if values.get(key) is None:
            values.pop(key, None)
        elif not isinstance(values[key], Mapping):
            raise ScriptError(f"trial.{key}: expected a mapping, got {values[key]!r}")
    if isinstance(values.get("code_files"), str):
        values["code_files"] = [values["code_files"]]
    values["code_files"] = tuple(values.get("code_files") or ())
    if values.get("tokenizer"):
        values["tokenizer"] = Path(str(values["tokenizer"])).expanduser().resolve()
    if "grace_seconds" in values:
        values["grace_seconds"] = _number("trial.grace_seconds", values["grace_seconds"])
    return ScriptTrial(**values)


def _number(where: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ScriptError(f"{where}={value!r}: expected a number") from None


# ------------------------------------------------------------------------- data


def tokenizer_for(trial: ScriptTrial, data: Path) -> Path:
    """The tokenizer a script trial is given: `trial.tokenizer`, a prepared directory's own
    `tokenizer.model`, or the challenge's layout (data/datasets/fineweb10B_sp<V> beside
    data/tokenizers/fineweb_<V>_bpe.model)."""
    if trial.tokenizer is not None:
        if not trial.tokenizer.is_file():
            raise ScriptError(f"trial.tokenizer={str(trial.tokenizer)!r}: no such file")
        return trial.tokenizer
    if (data / "tokenizer.model").is_file():
        return data / "tokenizer.model"
    match = re.fullmatch(r"fineweb10B_sp(\d+)", data.name)
    if match:
        candidate = data.parent.parent / "tokenizers" / f"fineweb_{match.group(1)}_bpe.model"
        if candidate.is_file():
            return candidate
    raise ScriptError(f"data={str(data)!r}: no tokenizer.model in it and none in the challenge's layout; "
                      "set trial.tokenizer")  # fmt: skip


def check_script_data(data: Path) -> None:
    """A script reads shards itself: there must be train and val shards in the directory."""
    for split in ("train", "val"):
        if not any(data.glob(f"fineweb_{split}_*.bin")):
            raise ScriptError(f"data={str(data)!r}: no fineweb_{split}_*.bin shards (expected a prepared directory "
                              "or the challenge's fineweb10B_sp<V>)")  # fmt: skip


def data_fingerprint(data: Path, tokenizer: Path) -> str:
    """Identity of the data a script trial reads: shard names and sizes, and the tokenizer's bytes."""
    digest = hashlib.sha256()
    for shard in sorted(data.glob("fineweb_*.bin")):
        digest.update(f"{shard.name}:{shard.stat().st_size};".encode())
    digest.update(hashlib.sha256(tokenizer.read_bytes()).digest())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------- one trial


def trial_environment(
    trial: ScriptTrial, values: Mapping[str, Any], *, seed: int, run_id: str, data: Path,
    train_seconds: float, max_steps: int, base: Mapping[str, str],
) -> dict[str, str]:
    """The environment one trial's script receives: `base` (the process's), then `trial.env`,
    the space's values, and last what loopgolf sets (so nothing overrides the budget)."""
    names = trial.variables()
    env = dict(base) | dict(trial.env)
    env |= {name: env_text(name, value) for name, value in values.items()}
    env[names["wallclock"]] = env_text(names["wallclock"], float(train_seconds))
    if max_steps > 0:
        env[names["iterations"]] = str(int(max_steps))
    env |= {names["seed"]: str(int(seed)), names["run_id"]: run_id, names["data"]: str(data),
            names["tokenizer"]: str(tokenizer_for(trial, data))}  # fmt: skip
    return env


def command(trial: ScriptTrial, gpus: float) -> list[str]:
    """`python script`, or torchrun with one process per GPU when the trial holds more than one."""
    python = trial.python or sys.executable
    if gpus > 1:
        if not float(gpus).is_integer():
            raise ScriptError(f"resources.gpu={gpus}: expected a whole number of GPUs for a torchrun trial")
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(gpus)}",
                str(trial.script)]  # fmt: skip
    return [python, str(trial.script)]


@dataclasses.dataclass
class LogState:
    """What the log has said so far; `feed` one line at a time, as the script writes it."""

    patterns: Mapping[str, re.Pattern[str]]
    progress: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # step and val reports, in order
    found: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)  # the last match of each pattern

    def feed(self, line: str) -> dict[str, Any] | None:
        """Parse one line; a train or val line is returned as a progress report."""
        line = line.rstrip("\r\n")
        for name, pattern in self.patterns.items():
            match = pattern.search(line)
            if match is None:
                continue
            groups = {k: v for k, v in match.groupdict().items() if v is not None}
            self.found[name] = groups or {"line": match.group(0)}
            if name in ("train", "val"):
                report = _progress(name, groups)
                self.progress.append(report)
                return report
        return None


def _progress(kind: str, groups: Mapping[str, str]) -> dict[str, Any]:
    report: dict[str, Any] = {"step": int(groups["step"]), "elapsed_seconds": float(groups["train_time_ms"]) / 1000}
    if kind == "train":
        report["train_loss"] = float(groups["train_loss"])
        if "step_avg_ms" in groups:
            report["step_avg_ms"] = float(groups["step_avg_ms"])
    else:  # the periodic validation: what early stopping ranks (quick_val_bpb, as for builtin trials)
        report["quick_val_bpb"] = float(groups["val_bpb"])
        if "val_loss" in groups:
            report["quick_val_loss"] = float(groups["val_loss"])
    return report


def measured_bytes(trial: ScriptTrial, run_dir: Path) -> dict[str, int]:
    """model_bytes from the model file on disk, code_bytes from the counted code files."""
    model = run_dir / trial.model_file
    if not model.is_file():
        raise ScriptError(f"the script exited 0 but wrote no {trial.model_file} in {run_dir} (trial.model_file)")
    model_bytes = model.stat().st_size
    code_bytes = sum((trial.script.parent / name).stat().st_size for name in trial.code_files)
    return {"model_bytes": model_bytes, "code_bytes": code_bytes, "artifact_bytes": model_bytes + code_bytes}


def code_sha256(trial: ScriptTrial) -> str:
    """The counted code's identity, recorded with every trial (an edit mid-sweep shows)."""
    digest = hashlib.sha256()
    for name in trial.code_files:
        digest.update(name.encode() + b"\0" + (trial.script.parent / name).read_bytes())
    return digest.hexdigest()[:16]


def final_metrics(trial: ScriptTrial, state: LogState, run_dir: Path, log: Path, cap: int) -> dict[str, Any]:
    """The trial's metrics from its finished log and files (the script exited 0)."""
    final = state.found.get("final")
    if final is None:
        raise ScriptError(f"no final metric line in {log} (pattern trial.metrics.final: "
                          f"{state.patterns['final'].pattern!r})")  # fmt: skip
    metrics: dict[str, Any] = {"val_loss": float(final["val_loss"]), "val_bpb": float(final["val_bpb"]),
                               "final_metric_line": final.get("line", "final")}  # fmt: skip
    metrics |= measured_bytes(trial, run_dir)
    logged = state.found.get("total_bytes", {}).get("bytes")
    metrics["artifact_bytes_logged"] = int(logged) if logged is not None else None
    if logged is not None and int(logged) != metrics["artifact_bytes"]:
        metrics["warning"] = (f"the script logged {int(logged):,} total bytes; loopgolf measured "
                              f"{metrics['artifact_bytes']:,} (model file + code files)")  # fmt: skip
    if state.progress:  # the last step or val line: where training ended
        last = state.progress[-1]
        metrics |= {"train_steps": last["step"], "train_seconds": last["elapsed_seconds"]}
    avg = next((p["step_avg_ms"] for p in reversed(state.progress) if "step_avg_ms" in p), None)
    metrics["step_avg_ms"] = avg
    metrics["stopped_early"] = "stopped_early" in state.found
    if "params" in state.found and "params" in state.found["params"]:
        metrics["params"] = int(state.found["params"]["params"])
    if "eval_time" in state.found and "eval_time_ms" in state.found["eval_time"]:
        metrics["eval_seconds"] = float(state.found["eval_time"]["eval_time_ms"]) / 1000
    metrics["byte_violation"] = metrics["artifact_bytes"] - cap
    metrics["feasible"] = metrics["byte_violation"] <= 0
    return metrics


# ------------------------------------------------------------------------- the sampler


@dataclasses.dataclass(frozen=True)
class ScriptSampler:
    """Optuna's define-by-run function for a script sweep (picklable, no closures).

    Returns the Tune config's parts: the space's values beside the sweep's budget fields
    (`budget`: seed, train_seconds, max_steps, max_artifact_bytes, max_eval_seconds) as
    `trial_config`, and its `config_id`. Nothing is predicted before a script runs.
    """

    space: Mapping[str, Dimension]
    budget: Mapping[str, Any]

    def __call__(self, trial: Any) -> dict[str, Any]:
        values = {name: suggest(trial, name, dim) for name, dim in self.space.items()}
        seed = int(self.budget.get("seed", 0)) + int(trial.user_attrs.get("seed_index", 0))
        config = {**values, **self.budget, "seed": seed}
        return {"kind": "script", "trial_config": config, "config_id": flat_config_id(config),
                "predicted_artifact_bytes": None}  # fmt: skip

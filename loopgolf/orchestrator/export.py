"""Export: one configuration's trials as the record folder a submission pull request needs.

    loopgolf export SWEEP_DIR CONFIG_ID --out DIR [--seeds 3] [--author NAME --github-id ID]

From the sweep directory (its spec, ledger and trial directories) it writes:

- a script configuration: the script and its counted code files, each seed's train log
  (`train_seed<S>.log`, the script's own `logs/<RUN_ID>.txt`), `requirements.txt` (the
  versions the trials ran with), `submission.json` and `README.md`;
- a builtin configuration: each seed's artifact (`model_seed<S>.lgart`) and learning
  curve (`train_seed<S>.jsonl`), `submission.json` and a README saying plainly that it is
  not a single-file `train_gpt.py` submission.

`submission.json` has the fields the records use; its numbers are the ledger's, and
`author` / `github_id` are written only when given. A configuration with fewer complete
seeds than asked, a seed over the byte cap, or a failed seed is refused, naming which.
The folder is written beside its destination and renamed into place: complete or absent.
Lives here rather than in analysis/ (DESIGN's first plan) because it reads the sweep
directory itself: the spec, the trial directories and the scripts' logs.
"""

from __future__ import annotations

import datetime as dt
import json
import shlex
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from loopgolf.atomic import atomic_directory
from loopgolf.errors import LoopgolfError
from loopgolf.orchestrator.ledger_schema import TRIALS_FILE
from loopgolf.orchestrator.spec import SweepSpec
from loopgolf.orchestrator.sweepdir import read_sweep_spec
from loopgolf.orchestrator.trialdir import TRIAL_FILE, read_json, trial_dir


class ExportError(LoopgolfError):
    """A configuration that cannot be exported as a record folder, and why."""


def _rows(trials: pd.DataFrame, config_id: str) -> pd.DataFrame:
    ids = sorted({str(c) for c in trials["config_id"].dropna() if str(c).startswith(config_id)})
    if len(ids) != 1:
        what = "no configuration" if not ids else f"{len(ids)} configurations ({', '.join(ids[:4])})"
        raise ExportError(f"config_id {config_id!r}: {what} in this sweep matches; expected exactly one")
    return trials[trials["config_id"] == ids[0]].sort_values("seed")


def check_exportable(rows: pd.DataFrame, seeds: int) -> pd.DataFrame:
    """The configuration's seeds, when every one is complete and under the cap and there are enough."""
    failed = rows[rows["status"] != "complete"]
    if len(failed):
        first = failed.iloc[0]
        raise ExportError(f"seed {first['seed']} ({first['trial_id']}) is {first['status']}: {first.get('error')}")
    over = rows[~rows["feasible"].fillna(False).astype(bool)]
    if len(over):
        first = over.iloc[0]
        size = int(first["artifact_bytes"])
        raise ExportError(f"seed {first['seed']} ({first['trial_id']}) is over the cap: {size:,} bytes")
    if len(rows) < seeds:
        raise ExportError(f"{len(rows)} complete seed(s) ({', '.join(str(s) for s in rows['seed'])}); --seeds asks "
                          f"for {seeds} (promote it with more: `loopgolf promote ... --seeds {seeds}`)")  # fmt: skip
    return rows


def _number(value: Any) -> float | int | None:
    if value is None or pd.isna(value):
        return None
    return int(value) if float(value).is_integer() and not isinstance(value, float) else float(value)


def _seed_result(row: pd.Series) -> dict[str, Any]:
    return {"val_loss": float(row["val_loss"]), "val_bpb": float(row["val_bpb"]),
            "artifact_bytes": int(row["artifact_bytes"]), "steps": _number(row.get("train_steps")),
            "step_avg_ms": _number(row.get("step_avg_ms"))}  # fmt: skip


def submission(rows: pd.DataFrame, name: str, blurb: str, author: str | None, github_id: str | None,
               versions: Mapping[str, str]) -> dict[str, Any]:  # fmt: skip
    """submission.json: the records' fields, every number from the ledger."""
    seed_results = {str(int(r["seed"])): _seed_result(r) for _, r in rows.iterrows()}
    payload: dict[str, Any] = {
        "name": name, "blurb": blurb, "date": dt.date.today().isoformat(),
        "val_loss": float(rows["val_loss"].mean()), "val_bpb": float(rows["val_bpb"].mean()),
        "val_bpb_std": float(rows["val_bpb"].std(ddof=1)) if len(rows) > 1 else 0.0,
        "seeds": [int(s) for s in rows["seed"]], "seed_results": seed_results,
        "bytes_total": int(rows["artifact_bytes"].max()), "bytes_code": int(rows["code_bytes"].max()),
        "hardware": str(rows["hardware"].iloc[0]), "pytorch_version": versions.get("torch"),
    }  # fmt: skip
    if author:
        payload["author"] = author
    if github_id:
        payload["github_id"] = github_id
    return payload


def _settings(spec: SweepSpec, row: pd.Series) -> dict[str, Any]:
    """The configuration as a reader sets it: a script's variables, or the builtin's space fields."""
    names = [c for c in spec.search_space()]
    fixed = dict(spec.trial.env) if spec.trial is not None else {}
    return fixed | {n: row[n] for n in names if n in row and not pd.isna(row[n])}


def reproduce_commands(spec: SweepSpec, rows: pd.DataFrame) -> list[str]:
    """The exact commands that rerun each seed (a script's environment; the builtin's sweep)."""
    if spec.trial is None:
        return [f"loopgolf sweep spec.yaml   # the sweep's spec, seeds {', '.join(str(s) for s in rows['seed'])}"]
    names = spec.trial.variables()
    runner = (f"torchrun --standalone --nproc_per_node={int(spec.gpu)}" if spec.gpu > 1 else "python")
    commands = []
    for _, row in rows.iterrows():
        env = {k: row[k] for k in _settings(spec, row) if k in row} | dict(spec.trial.env)
        env |= {names["wallclock"]: float(spec.train_seconds), names["seed"]: int(row["seed"])}
        if int(spec.base.get("max_steps", 0)) > 0:
            env[names["iterations"]] = int(spec.base["max_steps"])
        text = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in sorted(env.items()))
        commands.append(f"{text} {runner} {spec.trial.script.name}")
    return commands


def readme(spec: SweepSpec, rows: pd.DataFrame, payload: Mapping[str, Any], record_test: str) -> str:
    """The record folder's README: the configuration, the per-seed table, the record test, how to rerun it."""
    kind = "script" if spec.trial is not None else "builtin"
    lines = [f"# {payload['name']}", "", str(payload["blurb"]), ""]
    if kind == "builtin":
        lines += ["**Not a single-file `train_gpt.py` submission**: this configuration is loopgolf's own model "
                  "(`RecurrentLM`); the artifacts here are loopgolf's container files, evaluated with "
                  "`loopgolf artifact eval`.", ""]  # fmt: skip
    settings = _settings(spec, rows.iloc[0])
    lines += ["## Configuration", "", "| setting | value |", "|---|---|"]
    lines += [f"| `{k}` | `{v}` |" for k, v in sorted(settings.items())]
    lines += ["", f"Budget: {spec.train_seconds:g} s of training, a {spec.artifact_bytes:,}-byte cap; "
              f"sweep `{spec.name}`, config_id `{rows['config_id'].iloc[0]}`"
              + (f", promoted from `{rows['promoted_from'].iloc[0]}`" if rows.get("promoted_from") is not None
                 and rows["promoted_from"].notna().any() else "") + ".", ""]  # fmt: skip
    lines += ["## Seeds", "", "| seed | val_loss | val_bpb | artifact bytes | steps | step avg (ms) |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for seed, r in payload["seed_results"].items():
        lines.append(f"| {seed} | {r['val_loss']:.8f} | {r['val_bpb']:.8f} | {r['artifact_bytes']:,} | "
                     f"{r['steps'] if r['steps'] is not None else '–'} | "
                     f"{r['step_avg_ms'] if r['step_avg_ms'] is not None else '–'} |")  # fmt: skip
    lines += ["", f"Mean val_bpb {payload['val_bpb']:.8f} (sd {payload['val_bpb_std']:.8f} over "
              f"{len(payload['seeds'])} seeds); largest artifact {payload['bytes_total']:,} bytes.", ""]  # fmt: skip
    lines += ["## Record test", "", record_test or "No reference was given: run `loopgolf export ... --reference "
              "val_bpb=<the current record>` (or `loopgolf report ... --reference`) for the challenge's rule.", ""]
    lines += ["## Reproduce", "", "```bash", *reproduce_commands(spec, rows), "```", ""]
    return "\n".join(lines)


def export_record(
    sweep_dir: str | Path, config_id: str, out: str | Path, *, seeds: int = 3, name: str | None = None,
    blurb: str = "", author: str | None = None, github_id: str | None = None, record_test: str = "",
) -> Path:
    """Write the record folder of one configuration (module docstring); returns its path."""
    sweep_dir, out = Path(sweep_dir).resolve(), Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out}: exists and is not an empty directory")
    spec = read_sweep_spec(sweep_dir)
    trials = pd.read_parquet(sweep_dir / TRIALS_FILE)
    rows = check_exportable(_rows(trials, config_id), seeds)
    records = [read_json(trial_dir(sweep_dir, key) / TRIAL_FILE) or {} for key in rows["trial_id"]]
    versions = next((r["versions"] for r in records if r.get("versions")), {})
    title = name or f"{spec.name} {rows['config_id'].iloc[0]}"
    payload = submission(rows, title, blurb or f"loopgolf sweep {spec.name}, configuration "
                         f"{rows['config_id'].iloc[0]}", author, github_id, versions)  # fmt: skip
    with atomic_directory(out, existing="empty") as staging:
        _write_files(spec, sweep_dir, rows, staging, versions)
        (staging / "submission.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        (staging / "README.md").write_text(readme(spec, rows, payload, record_test), encoding="utf-8")
    return out


def _write_files(spec: SweepSpec, sweep_dir: Path, rows: pd.DataFrame, staging: Path,
                 versions: Mapping[str, str]) -> None:  # fmt: skip
    for _, row in rows.iterrows():
        directory = trial_dir(sweep_dir, row["trial_id"])
        seed = int(row["seed"])
        if spec.trial is not None:
            own = directory / "run" / "logs" / f"{row['trial_id']}.txt"
            shutil.copy2(own if own.is_file() else directory / "stdout.log", staging / f"train_seed{seed}.log")
        else:
            shutil.copy2(sweep_dir / str(row["artifact_path"]), staging / f"model_seed{seed}.lgart")
            shutil.copy2(directory / "progress.jsonl", staging / f"train_seed{seed}.jsonl")
    if spec.trial is not None:
        for name in spec.trial.code_files:
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(spec.trial.script.parent / name, target)
        pins = [f"{k}=={v}" for k, v in sorted(versions.items()) if k != "python"]
        (staging / "requirements.txt").write_text("\n".join(pins) + "\n", encoding="utf-8")

"""The command line as a surface: every sub-command, flag and default, frozen; every example loads.

The table below is the `loopgolf` command line. A change to it (a new flag, a renamed
one, another default) fails this test until the table is updated with it, so that every
change to what users type is a deliberate one, reviewed beside the README.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loopgolf.cli import build_parser
from loopgolf.orchestrator.spec_file import load_spec
from loopgolf.trial.config import TrialConfig, load_trial_config
from tests.conftest import REPO

# (command, argument, kind, default). kind: the argparse action, then `:type`, `nargs=`,
# `choices=` and `required` where they apply; a positional argument is named by its dest.
SURFACE = [
    ("data prepare", "--text", "store nargs=+", None),
    ("data prepare", "--tokenizer", "store", None),
    ("data prepare", "--vocab-size", "store:int", None),
    ("data prepare", "--no-byte-fallback", "store_true", False),
    ("data prepare", "--out", "store required", None),
    ("data prepare", "--val-fraction", "store:float", 0.1),
    ("data prepare", "--shard-tokens", "store:int", 100_000_000),
    ("data prepare", "--overwrite", "store_true", False),
    ("trial", "config", "store", None),
    ("trial", "--data", "store required", None),
    ("trial", "--out", "store", None),
    ("trial", "--set", "append", None),
    ("artifact eval", "artifact", "store", None),
    ("artifact eval", "--data", "store required", None),
    ("artifact eval", "--eval-tokens", "store:int", None),
    ("artifact eval", "--device", "store choices=auto|cpu|cuda", "auto"),
    ("sweep", "spec", "store", None),
    ("sweep", "--address", "store", None),
    ("sweep", "--storage", "store", None),
    ("sweep", "--name", "store", None),
    ("sweep", "--data", "store", None),
    ("sweep", "--set", "append", None),
    ("resume", "sweep_dir", "store", None),
    ("resume", "--address", "store", None),
    ("resume", "--set", "append", None),
    ("promote", "sweep_dir", "store", None),
    ("promote", "--top", "store:int", None),
    ("promote", "--front", "store_true", False),
    ("promote", "--name", "store required", None),
    ("promote", "--seeds", "store:int", 3),
    ("promote", "--set", "append", None),
    ("promote", "--address", "store", None),
    ("export", "sweep_dir", "store", None),
    ("export", "config_id", "store", None),
    ("export", "--out", "store required", None),
    ("export", "--seeds", "store:int", 3),
    ("export", "--reference", "store", None),
    ("export", "--title", "store", None),
    ("export", "--blurb", "store", None),
    ("export", "--author", "store", None),
    ("export", "--github-id", "store", None),
    ("status", "sweep_dir", "store", None),
    ("status", "--watch", "store_true", False),
    ("status", "--interval", "store:float", 2.0),
    ("pareto", "sweep_dirs", "store nargs=+", None),
    ("pareto", "--objectives", "store", "val_bpb:min,artifact_bytes:min"),
    ("pareto", "--format", "store choices=table|csv|json", "table"),
    ("pareto", "--all", "store_true", False),
    ("report", "sweep_dirs", "store nargs=+", None),
    ("report", "--out", "store", None),
    ("report", "--reference", "store", None),
]


def _kind(action: argparse.Action) -> str:
    # "_StoreTrueAction" -> "store_true"
    kind = re.sub(r"(?<!^)(?=[A-Z])", "_", type(action).__name__.strip("_").removesuffix("Action")).lower()
    if action.type is not None:
        kind += f":{getattr(action.type, '__name__', action.type)}"
    if action.nargs not in (None, 0):
        kind += f" nargs={action.nargs}"
    if action.choices:
        kind += " choices=" + "|".join(map(str, action.choices))
    if action.required and action.option_strings:
        kind += " required"
    return kind


def surface(parser: argparse.ArgumentParser, command: str = "") -> list[tuple[str, str, str, object]]:
    """Walk the parser: one row per argument of every (sub-)command. argparse has no public
    way to list a parser's arguments, so this reads its `_actions`."""
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                rows += surface(sub, f"{command} {name}".strip())
            continue
        rows.append((command, "/".join(action.option_strings) or action.dest, _kind(action), action.default))
    return rows


def test_the_command_line_surface_is_frozen() -> None:
    actual = surface(build_parser())
    added = [row for row in actual if row not in SURFACE]
    removed = [row for row in SURFACE if row not in actual]
    assert not added and not removed, (
        f"the command line changed; if that is meant, update SURFACE (and the README): "
        f"new or changed {added}, gone or changed {removed}"
    )
    assert actual == SURFACE  # the order of --help too


def test_every_sub_command_runs_a_function_of_the_cli_module() -> None:
    parser = build_parser()
    commands = sorted({row[0] for row in SURFACE})
    for command in commands:
        args = parser.parse_args([*command.split(), *_required_arguments(command)])
        assert args.run.__module__ == "loopgolf.cli"
        assert args.run.__name__ == "_cmd_" + command.replace(" ", "_")


def _required_arguments(command: str) -> list[str]:
    positionals = [row for row in SURFACE if row[0] == command and not row[1].startswith("-")]
    required = [row[1] for row in SURFACE if row[0] == command and row[2].endswith("required")]
    return ["x"] * len(positionals) + [token for flag in required for token in (flag, "x")]


def test_a_missing_sub_command_is_a_usage_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "loopgolf.cli"], capture_output=True, text=True)
    assert proc.returncode == 2 and "the following arguments are required: command" in proc.stderr


# ------------------------------------------------------------------------- examples

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def test_there_are_examples_of_both_kinds() -> None:
    kinds = {"space" in yaml.safe_load(p.read_text(encoding="utf-8")) for p in EXAMPLES}
    assert kinds == {True, False}, "expected sweep specs (with `space`) and trial configs among examples/*.yaml"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_loads(example: Path, corpus_data: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load(example.read_text(encoding="utf-8"))
    if "space" in raw:  # a sweep spec; its data dir is the user's, so point it at prepared data
        spec = load_spec(example, (), data=corpus_data, storage=str(tmp_path))
        assert spec.name == raw["name"] and spec.space == raw["space"]
        assert spec.num_samples * spec.seeds >= 1 and Path(spec.sweep_dir) == tmp_path / spec.name
    else:
        config = load_trial_config(example, ())
        assert isinstance(config, TrialConfig)
        flat = config.to_flat()
        assert all(key == "preset" or flat[key] == value for key, value in raw.items()), example.name

"""Script trials: the spec, the environment a script receives, its log, its bytes, its processes.

The script here is `tests/fixtures/fake_train_gpt.py`: the challenge baseline's log lines
and files without the training, its behaviour chosen by FAKE_MODE. The example script that
really trains runs in test_examples.py and the sweep tests below.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from loopgolf.orchestrator.protocol import TrialRequest
from loopgolf.orchestrator.script import (
    DEFAULT_PATTERNS,
    LogState,
    ScriptError,
    ScriptTrial,
    command,
    script_trial_from_dict,
    tokenizer_for,
    trial_environment,
)
from loopgolf.orchestrator.script_trainable import fresh_run_dir, run_script, supervisor_command
from loopgolf.orchestrator.spec import SpecError
from loopgolf.orchestrator.spec_file import spec_from_dict
from tests.processes import alive, children

FAKE = Path(__file__).resolve().parents[1] / "fixtures" / "fake_train_gpt.py"
BUDGET = {"seed": 7, "train_seconds": 30.0, "max_steps": 0, "max_artifact_bytes": 100_000, "max_eval_seconds": 0.0}

# The challenge baseline's lines, as its train_gpt.py prints them.
BASELINE_LOG = """\
seed:1337
step:200/20000 train_loss:2.9123 train_time:9040ms step_avg:45.20ms
step:1000/20000 val_loss:2.4510 val_bpb:1.4516 train_time:45210ms step_avg:45.21ms
stopping_early: wallclock_cap train_time:600012ms step:13254/20000
Serialized model int8+zlib: 15815847 bytes (payload:22000000 raw_torch:22100000 payload_ratio:3.75x)
Code size: 47642 bytes
Total submission size int8+zlib: 15863489 bytes
final_int8_zlib_roundtrip val_loss:2.0727 val_bpb:1.2244 eval_time:1425ms
final_int8_zlib_roundtrip_exact val_loss:2.07269931 val_bpb:1.22436570
"""


def _gone(pids: list[int], timeout: float = 60) -> None:
    """Wait until none of `pids` is alive (a condition, polled), or fail naming the survivors."""
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"processes outlived their trial: {[p for p in pids if alive(p)]}"
        time.sleep(0.1)


def _request(**values: Any) -> TrialRequest:
    return TrialRequest(key="trial_00003", kind="script", config={**values, **BUDGET}, config_id="c0ffee")


def _run(tmp_path: Path, data: Path, trial: ScriptTrial, reports: list | None = None, **values: Any) -> dict:
    directory = tmp_path / "trials" / "trial_00003"
    report = reports.append if reports is not None else (lambda _: None)
    return run_script(_request(**values), trial, data, directory, cpus=1, gpus=0, report=report)


# ------------------------------------------------------------------------- the log


def test_the_baseline_log_gives_progress_and_the_final_roundtrip_score() -> None:
    state = LogState(ScriptTrial(script=FAKE).patterns())
    reports = [r for line in BASELINE_LOG.splitlines() if (r := state.feed(line)) is not None]
    assert reports == [
        {"step": 200, "elapsed_seconds": 9.04, "train_loss": 2.9123, "step_avg_ms": 45.2},
        {"step": 1000, "elapsed_seconds": 45.21, "quick_val_bpb": 1.4516, "quick_val_loss": 2.451},
    ]
    assert state.found["final"] == {"line": "final_int8_zlib_roundtrip_exact", "val_loss": "2.07269931",
                                    "val_bpb": "1.22436570"}  # fmt: skip
    assert state.found["total_bytes"]["bytes"] == "15863489" and "stopped_early" in state.found
    assert state.found["eval_time"]["eval_time_ms"] == "1425"


RECORD_LINES = ["final_int6_roundtrip_exact", "final_int8_zlib_roundtrip_exact", "final_int6_sliding_window_exact",
                "final_gptq_int6_lzma_roundtrip_exact"]


@pytest.mark.parametrize("line", RECORD_LINES)
def test_every_quantizer_final_line_is_matched_and_named(line: str) -> None:
    state = LogState(ScriptTrial(script=FAKE).patterns())
    state.feed("final_int8_zlib_roundtrip_exact val_loss:9.0 val_bpb:9.0")
    state.feed(f"{line} val_loss:2.01 val_bpb:1.11")  # the last final line is the score
    assert state.found["final"] == {"line": line, "val_loss": "2.01", "val_bpb": "1.11"}
    assert state.feed("final_int8_zlib_roundtrip val_loss:2.0727 val_bpb:1.2244 eval_time:1425ms") is None
    assert state.found["final"]["line"] == line  # the rounded line is not the exact one


def test_a_fork_replaces_a_pattern_and_must_keep_its_groups() -> None:
    custom = {"final": r"^FINAL loss=(?P<val_loss>\S+) bpb=(?P<val_bpb>\S+)"}
    state = LogState(ScriptTrial(script=FAKE, metrics=custom).patterns())
    state.feed("FINAL loss=2.5 bpb=1.5")
    assert state.found["final"] == {"val_loss": "2.5", "val_bpb": "1.5"}
    with pytest.raises(ScriptError, match=r"^trial\.metrics\.final: expected the named group\(s\) \['val_bpb'\]"):
        ScriptTrial(script=FAKE, metrics={"final": r"^FINAL (?P<val_loss>\S+)"})
    with pytest.raises(ScriptError, match=r"^trial\.metrics\.val=.*: not a regular expression"):
        ScriptTrial(script=FAKE, metrics={"val": "(unclosed"})
    with pytest.raises(ScriptError, match=r"^trial\.metrics: unknown pattern\(s\) \['score'\]"):
        ScriptTrial(script=FAKE, metrics={"score": "x"})
    assert set(DEFAULT_PATTERNS) >= {"train", "val", "final", "total_bytes"}


# ------------------------------------------------------------------------- the spec


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"script": "nope.py"}, "trial.script='nope.py': no such file (expected the training script)"),
        ({"script": str(FAKE), "env": {"SEED": 1}}, "trial.env sets SEED, which loopgolf sets for every trial; "
                                                    "remove it"),
        ({"script": str(FAKE), "env": {"LAYERS": [1, 2]}}, "trial.env.LAYERS=[1, 2]: expected a string, number or "
                                                          "boolean (an environment value)"),
        ({"script": str(FAKE), "env": {"lr": 1}}, "'lr': expected an environment variable name (A-Z, 0-9, _)"),
        ({"script": str(FAKE), "model_file": "/abs/model.ptz"}, "trial.model_file='/abs/model.ptz': expected a "
                                                                "path inside the working directory"),
        ({"script": str(FAKE), "code_files": ["missing.py"]}, "trial.code_files: 'missing.py' is not a file in "),
        ({"script": str(FAKE), "wat": 1}, "trial: unknown field(s) ['wat']; expected some of "),
        ({"env": {}}, "trial: expected `script: path/to/train_gpt.py`"),
        ({"script": str(FAKE), "names": {"seeds": "S"}}, "trial.names: unknown role(s) ['seeds']"),
    ],
)  # fmt: skip
def test_a_bad_trial_section_fails_with_one_line(raw: dict, message: str) -> None:
    with pytest.raises(ScriptError) as info:
        script_trial_from_dict(raw)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def _spec(data: Path, **changes: Any) -> dict[str, Any]:
    raw = {"name": "s", "data": str(data), "trial": {"script": str(FAKE)}, "space": {"NUM_LAYERS": [8, 9]},
           "budget": {"artifact_bytes": 100_000, "train_seconds": 5}}  # fmt: skip
    return raw | changes


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"space": {"SEED": [1, 2, 3]}}, "space: SEED is set by loopgolf for every trial"),
        ({"space": {"MAX_WALLCLOCK_SECONDS": [60, 600]}}, "space: MAX_WALLCLOCK_SECONDS is set by loopgolf"),
        ({"space": {"num_layers": [8, 9]}}, "space: 'num_layers': expected an environment variable name"),
        ({"space": "shared_vs_unique"}, "space: a script sweep expects a mapping of environment variable"),
        ({"trial": {"script": str(FAKE), "env": {"NUM_LAYERS": 9}}}, "space: NUM_LAYERS is also fixed in trial.env"),
        ({"overrides": {"n_passes": 2}}, "overrides: applies to the builtin model, not to a script sweep"),
        ({"equal_bytes": True}, "equal_bytes: applies to the builtin model, not to a script sweep"),
        ({"base": {"d_model": 64}}, "base.d_model: a script sweep's base takes max_steps and seed only"),
        ({"resources": {"workers": 2}}, "resources.workers=2: a script trial is one process, or torchrun"),
        ({"budget": {"artifact_bytes": 1000, "train_seconds": 0}}, "budget: expected train_seconds > 0 (or 0 with "
                                                                   "base.max_steps: a fixed-step search)"),
        ({"space": {"NUM_LAYERS": [[8], [9]]}}, "space.NUM_LAYERS=[8]: expected a string, number or boolean"),
        ({"early_stopping": {"algorithm": "pareto_halving"}}, "early_stopping=pareto_halving in a script sweep "
                                                              "needs objectives {val_bpb: min}"),
        ({"trial": {"script": str(FAKE), "tokenizer": "/no/such.model"}}, "trial.tokenizer='/no/such.model': no "
                                                                          "such file"),
    ],
)  # fmt: skip
def test_a_bad_script_sweep_fails_before_anything_runs(corpus_data: Path, changes: dict, message: str) -> None:
    if "early_stopping" in changes:
        changes |= {"search": {"objectives": {"val_bpb": "min", "artifact_bytes": "min"}}}
    with pytest.raises(SpecError) as info:
        spec_from_dict(_spec(corpus_data, **changes))
    assert str(info.value).startswith(message) and "\n" not in str(info.value), str(info.value)


def test_script_data_needs_shards_and_finds_the_challenge_tokenizer(tmp_path: Path, corpus_data: Path) -> None:
    with pytest.raises(SpecError, match=r"^data=.*: no fineweb_train_\*\.bin shards"):
        spec_from_dict(_spec(tmp_path))
    layout = tmp_path / "data" / "datasets" / "fineweb10B_sp1024"
    layout.mkdir(parents=True)
    (tmp_path / "data" / "tokenizers").mkdir()
    (tmp_path / "data" / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(b"sp")
    assert tokenizer_for(ScriptTrial(script=FAKE), layout) == tmp_path / "data/tokenizers/fineweb_1024_bpe.model"
    assert tokenizer_for(ScriptTrial(script=FAKE), corpus_data) == corpus_data / "tokenizer.model"
    spec = spec_from_dict(_spec(corpus_data, base={"max_steps": 50}, budget={"train_seconds": 0}))
    assert spec.script_budget() == {"seed": 0, "train_seconds": 0.0, "max_steps": 50, "max_artifact_bytes": 16_000_000,
                                    "max_eval_seconds": 0.0}  # fmt: skip
    assert spec.control_arms() == () and spec.to_yaml_dict()["trial"]["script"] == str(FAKE)
    assert spec_from_dict(spec.to_yaml_dict()) == spec  # what resume reads back is the same spec


def test_the_environment_sets_the_budget_last_and_renames_for_a_fork(corpus_data: Path) -> None:
    trial = ScriptTrial(script=FAKE, env={"NUM_HEADS": 8, "TIE": True}, names={"seed": "RANDOM_SEED"})
    env = trial_environment(trial, {"NUM_LAYERS": 9, "MATRIX_LR": 0.04}, seed=3, run_id="trial_00001",
                            data=corpus_data, train_seconds=0.0, max_steps=4950,
                            base={"PATH": "/bin", "NUM_LAYERS": "1", "ITERATIONS": "7"})  # fmt: skip
    assert env == {"PATH": "/bin", "NUM_HEADS": "8", "TIE": "1", "NUM_LAYERS": "9", "MATRIX_LR": "0.04",
                   "MAX_WALLCLOCK_SECONDS": "0.0", "ITERATIONS": "4950", "RANDOM_SEED": "3", "RUN_ID": "trial_00001",
                   "DATA_PATH": str(corpus_data), "TOKENIZER_PATH": str(corpus_data / "tokenizer.model")}  # fmt: skip
    wallclock = trial_environment(trial, {}, seed=0, run_id="k", data=corpus_data, train_seconds=600, max_steps=0,
                                  base={})  # fmt: skip
    assert wallclock["MAX_WALLCLOCK_SECONDS"] == "600.0" and "ITERATIONS" not in wallclock
    assert command(trial, 0) == [sys.executable, str(FAKE)] and command(trial, 1) == [sys.executable, str(FAKE)]
    assert command(trial, 8)[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8", str(FAKE)]


def test_the_supervisor_starts_where_loopgolf_is_not_importable(tmp_path: Path) -> None:
    """On the GPU image loopgolf ran from its source tree with PYTHONPATH=., which the trial's run/
    directory does not see: the supervisor still starts, and the user's PYTHONPATH reaches the script."""
    bare = Path(sys.base_prefix) / "bin" / "python3"  # the interpreter under the venv: no loopgolf installed
    if subprocess.run([bare, "-c", "import loopgolf"], cwd=tmp_path, capture_output=True).returncode == 0:
        pytest.skip(f"{bare} has loopgolf installed")
    show = [str(bare), "-c", "import os; print(os.environ['PYTHONPATH'])"]
    done = subprocess.run([*supervisor_command(str(bare)), "--", *show], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "PYTHONPATH": "."}, timeout=60)  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (0, ".\n", "")


# ------------------------------------------------------------------------- running one


def test_a_trial_measures_bytes_from_disk_and_passes_its_environment(tmp_path: Path, corpus_data: Path) -> None:
    reports: list[dict] = []
    metrics = _run(tmp_path, corpus_data, ScriptTrial(script=FAKE, env={"MODEL_SIZE": 4321}), reports,
                   NUM_LAYERS=9)  # fmt: skip
    run = tmp_path / "trials" / "trial_00003" / "run"
    env = json.loads((run / "env.0.json").read_text())
    assert {k: env[k] for k in ("NUM_LAYERS", "MODEL_SIZE", "SEED", "RUN_ID", "MAX_WALLCLOCK_SECONDS")} == {
        "NUM_LAYERS": "9", "MODEL_SIZE": "4321", "SEED": "7", "RUN_ID": "trial_00003", "MAX_WALLCLOCK_SECONDS": "30.0"}
    assert env["DATA_PATH"] == str(corpus_data) and env["TOKENIZER_PATH"] == str(corpus_data / "tokenizer.model")
    assert "ITERATIONS" not in env and (run / "pid.0").is_file()  # it ran in its own run/ directory
    assert metrics["model_bytes"] == 4321 == (run / "final_model.int8.ptz").stat().st_size
    assert metrics["code_bytes"] == FAKE.stat().st_size and metrics["artifact_bytes"] == 4321 + FAKE.stat().st_size
    assert metrics["artifact_bytes_logged"] == metrics["artifact_bytes"] and "warning" not in metrics
    assert metrics | {"wall_seconds": 0} == metrics | {
        "status": "complete", "val_bpb": 2.6, "val_loss": 4.498, "final_metric_line": "final_int8_zlib_roundtrip_exact",
        "train_steps": 20, "train_seconds": 0.2, "params": 4321, "eval_seconds": 1.5, "attempt": 1, "exit_code": 0,
        "feasible": True, "byte_violation": metrics["artifact_bytes"] - 100_000, "wall_seconds": 0,
        "artifact_path": "run/final_model.int8.ptz"}  # fmt: skip
    assert [r["step"] for r in reports] == [5, 10, 10, 15, 20, 20]
    assert [r["quick_val_bpb"] for r in reports if "quick_val_bpb" in r] == [2.75, 2.5]


def test_over_the_cap_is_infeasible_and_a_logged_total_that_disagrees_is_a_warning(
    tmp_path: Path, corpus_data: Path
) -> None:
    trial = ScriptTrial(script=FAKE, env={"MODEL_SIZE": 100_000, "LOG_SKEW": 5})
    metrics = _run(tmp_path, corpus_data, trial)
    assert metrics["status"] == "complete" and metrics["feasible"] is False
    assert metrics["byte_violation"] == FAKE.stat().st_size
    assert metrics["artifact_bytes_logged"] == metrics["artifact_bytes"] + 5
    assert metrics["warning"].startswith(f"the script logged {metrics['artifact_bytes'] + 5:,} total bytes")


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("fail", "the script exited with status 3: RuntimeError: CUDA out of memory (fake)"),
        ("nofinal", "no final metric line in {dir}/stdout.log (pattern trial.metrics.final: '^(?P<line>final_"),
        ("nomodel", "the script exited 0 but wrote no final_model.int8.ptz in {dir}/run (trial.model_file)"),
    ],
)
def test_a_failed_script_is_one_line_and_the_trial_fails(tmp_path: Path, corpus_data: Path, mode: str,
                                                         error: str) -> None:  # fmt: skip
    metrics = _run(tmp_path, corpus_data, ScriptTrial(script=FAKE, env={"FAKE_MODE": mode}))
    assert metrics["status"] == "failed" and metrics["raised"] is True and metrics["feasible"] is False
    assert metrics["error"].startswith(error.format(dir=tmp_path / "trials" / "trial_00003")), metrics["error"]
    assert "\n" not in metrics["error"]


def test_the_final_line_of_a_record_quantizer_is_the_score_and_named(tmp_path: Path, corpus_data: Path) -> None:
    metrics = _run(tmp_path, corpus_data, ScriptTrial(script=FAKE, env={"FAKE_MODE": "int6"}))
    assert metrics["final_metric_line"] == "final_int6_roundtrip_exact" and metrics["val_bpb"] == 2.6


def test_a_script_past_its_deadline_is_killed_with_everything_it_started(tmp_path: Path, corpus_data: Path) -> None:
    trial = ScriptTrial(script=FAKE, env={"FAKE_MODE": "spawn"}, grace_seconds=0)
    directory = tmp_path / "trials" / "trial_00003"
    request = TrialRequest(key="trial_00003", kind="script", config=BUDGET | {"train_seconds": 1.0}, config_id="c")
    metrics = run_script(request, trial, corpus_data, directory, cpus=1, gpus=0, report=lambda _: None)
    assert metrics["status"] == "failed" and metrics["reason"] == "timeout" and metrics["raised"] is False
    assert metrics["error"] == "timeout: the script ran past 1 s (train + eval + grace) and was killed"
    run = directory / "run"
    _gone([int((run / "pid.0").read_text()), int((run / "child.pid").read_text())])


def test_a_stopped_trial_ends_its_whole_process_group(tmp_path: Path, corpus_data: Path) -> None:
    """Tune stops a function trainable by raising out of its report: nothing of the script survives,
    not even a child it started in a session of its own (as torchrun starts its workers)."""

    class Stopped(Exception):
        pass

    run = tmp_path / "trials" / "trial_00003" / "run"

    def report(progress: dict) -> None:
        if "quick_val_bpb" in progress:  # the child was started before the first step
            raise Stopped

    trial = ScriptTrial(script=FAKE, env={"FAKE_MODE": "spawn"})
    with pytest.raises(Stopped):
        run_script(_request(), trial, corpus_data, tmp_path / "trials" / "trial_00003", cpus=1, gpus=0, report=report)
    _gone([int((run / "pid.0").read_text()), int((run / "child.pid").read_text())])


@pytest.mark.parametrize("victim", ["worker", "worker and launcher"])
def test_a_killed_worker_takes_the_script_with_it(tmp_path: Path, corpus_data: Path, victim: str) -> None:
    """kill -9 of the process that runs the trial (a Tune worker whose driver died), alone or with
    its direct children (Ray kills those when a worker exits): the script and the child it
    started in a session of its own end with it."""
    directory = tmp_path / "trials" / "trial_00003"
    code = (
        "import sys; from pathlib import Path\n"
        "from loopgolf.orchestrator.protocol import TrialRequest\n"
        "from loopgolf.orchestrator.script import ScriptTrial\n"
        "from loopgolf.orchestrator.script_trainable import run_script\n"
        f"trial = ScriptTrial(script={str(FAKE)!r}, env={{'FAKE_MODE': 'spawn'}})\n"
        f"request = TrialRequest(key='trial_00003', kind='script', config={BUDGET!r}, config_id='c')\n"
        f"run_script(request, trial, Path({str(corpus_data)!r}), Path({str(directory)!r}), cpus=1, gpus=0,"
        " report=lambda _: None)\n"
    )
    worker = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    child = directory / "run" / "child.pid"
    deadline = time.monotonic() + 120
    while not child.is_file():
        assert worker.poll() is None and time.monotonic() < deadline, "the script never started its child"
        time.sleep(0.1)
    pids = [int((directory / "run" / "pid.0").read_text()), int(child.read_text())]
    assert all(alive(p) for p in pids)
    launchers = children(worker.pid) if victim != "worker" else []
    assert len(launchers) == (1 if victim != "worker" else 0)
    for pid in [worker.pid, *launchers]:
        os.kill(pid, signal.SIGKILL)
    worker.wait()
    _gone(pids)


def test_a_rerun_starts_afresh_and_keeps_the_earlier_attempt(tmp_path: Path, corpus_data: Path) -> None:
    directory = tmp_path / "trials" / "trial_00003"
    first = _run(tmp_path, corpus_data, ScriptTrial(script=FAKE, env={"MODEL_SIZE": 10}))
    second = _run(tmp_path, corpus_data, ScriptTrial(script=FAKE, env={"MODEL_SIZE": 20}))
    assert (first["attempt"], second["attempt"]) == (1, 2)
    assert (directory / "run.1" / "run" / "final_model.int8.ptz").stat().st_size == 10
    assert (directory / "run.1" / "stdout.log").is_file()
    assert (directory / "run" / "final_model.int8.ptz").stat().st_size == 20 and second["model_bytes"] == 20
    assert fresh_run_dir(directory)[0] == 3 and not any((directory / "run").iterdir())


def test_a_script_configuration_is_described_by_its_variables() -> None:
    from loopgolf.analysis.evidence import describe_config

    row = {"kind": "script", "NUM_LAYERS": 9, "MATRIX_LR": 0.04, "EMPTY": None, "val_bpb": 1.2, "n_blocks": None}
    assert describe_config(row) == "MATRIX_LR=0.04 NUM_LAYERS=9"
    assert describe_config(pd.Series(row)) == "MATRIX_LR=0.04 NUM_LAYERS=9"

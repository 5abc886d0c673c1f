"""Live progress (`loopgolf status`): the ETA rule, reading progress files, and the lines shown."""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loopgolf.orchestrator.progress import (
    SweepCounts,
    TrialProgress,
    count_sweep,
    counts_line,
    eta_seconds,
    progress_reports,
    read_counts,
    render,
    trial_progress,
    watch,
)
from tests.orchestrator.sweeps import write_spec


def test_eta_is_the_work_owed_at_the_mean_trial_time_over_the_slots() -> None:
    assert eta_seconds(5, [1.0], [], 2) is None  # nothing has ended: no mean to go by
    # mean 10 s; 4 queued trials owe 40 s, running ones the rest of theirs (7 s, and 0 for one past the mean)
    assert eta_seconds(4, [3.0, 12.0], [8.0, 12.0], 2) == pytest.approx((40 + 7 + 0) / 2)
    assert eta_seconds(0, [4.0], [10.0], 8) == pytest.approx(6.0)  # one trial left: one slot, not eight
    assert eta_seconds(0, [], [10.0], 2) == 0.0


def test_eta_matches_a_simulation_when_every_trial_takes_the_mean() -> None:
    """Against a reference: greedy scheduling of equal trials onto the slots, when the work divides evenly."""
    rng = random.Random(0)
    for _ in range(200):
        slots, mean = rng.randint(1, 4), rng.uniform(5, 50)
        rounds = rng.randint(0, 5)
        queued = slots * rounds
        # every slot busy with a trial that started at the same moment, so the work divides evenly
        elapsed = rng.uniform(0, mean)
        finish = [mean - elapsed] * slots
        for _ in range(queued):
            at = min(range(slots), key=finish.__getitem__)
            finish[at] += mean
        assert eta_seconds(queued, [elapsed] * slots, [mean] * 3, slots) == pytest.approx(max(finish))


def test_counts_line() -> None:
    assert counts_line(3, 2, 6, 1, 12, 250.4) == "[3/12 done, 2 running, 6 queued, 1 failed; ETA 4m10s]"
    assert counts_line(0, 1, 3, 0, 4, None) == "[0/4 done, 1 running, 3 queued, 0 failed; ETA ?]"
    assert counts_line(0, 0, 0, 0, 4, 2 * 3600 + 61) .endswith("ETA 2h01m]")


def _trial_dir(root: Path, name: str, reports: list[dict], train_seconds: float = 30.0, tail: str = "") -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "trial.json").write_text(json.dumps({"trial_config": {"train_seconds": train_seconds}}))
    (directory / "progress.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reports) + tail)
    return directory


def test_a_torn_last_line_is_skipped_and_rates_come_from_the_last_interval(tmp_path: Path) -> None:
    reports = [
        {"step": 10, "elapsed_seconds": 2.0, "train_tokens": 20_000, "quick_val_bpb": 3.5},
        {"step": 30, "elapsed_seconds": 6.0, "train_tokens": 60_000, "quick_val_bpb": 3.1},
    ]
    directory = _trial_dir(tmp_path, "t1", reports, tail='{"step": 40, "elapsed_se')  # killed mid-write
    assert progress_reports(directory) == reports
    progress = trial_progress(directory)
    assert progress is not None
    assert (progress.step, progress.elapsed_seconds, progress.budget_seconds) == (30, 6.0, 30.0)
    assert progress.tokens_per_second == pytest.approx(40_000 / 4.0)
    assert progress.quick_val_bpb == 3.1
    one = trial_progress(_trial_dir(tmp_path, "t2", reports[:1]))
    assert one is not None and one.tokens_per_second == pytest.approx(10_000.0)
    started = trial_progress(_trial_dir(tmp_path, "t3", []))  # started, no report yet
    assert (started.step, started.tokens_per_second, started.quick_val_bpb) == (0, None, None)


@pytest.mark.parametrize(("mode", "best"), [("min", ("t2", 2.5)), ("max", ("t4", 3.5))])
def test_one_count_of_the_trial_directories(tmp_path: Path, mode: str, best: tuple[str, float]) -> None:
    """Statuses, raised trials, wall seconds and the best feasible complete value, read once."""
    ended = {
        "t1": {"status": "rejected", "started_at": "2026-01-01T00:00:00", "ended_at": "2026-01-01T00:00:01"},
        "t2": {"status": "complete", "feasible": True, "val_bpb": 2.5,
               "started_at": "2026-01-01T00:00:00", "ended_at": "2026-01-01T00:00:30"},
        "t3": {"status": "complete", "feasible": False, "val_bpb": 1.0},  # over the cap: never the best
        "t4": {"status": "complete", "feasible": True, "val_bpb": 3.5},
        "t5": {"status": "failed", "raised": True, "error": "RuntimeError: boom"},
        "t6": {"status": "failed", "error": "non-finite loss (diverged)"},
    }  # fmt: skip
    for name, metrics in ended.items():
        (_trial_dir(tmp_path / "trials", name, []) / "metrics.json").write_text(json.dumps(metrics))
    _trial_dir(tmp_path / "trials", "t7", [{"step": 3, "elapsed_seconds": 1.5}])  # training
    counts = count_sweep(tmp_path, "s", total=9, max_concurrent=2, objective=("val_bpb", mode))
    assert counts.by_status == {"rejected": 1, "complete": 3, "failed": 2}
    assert (counts.finished, counts.done, counts.failed, counts.raised, counts.queued) == (6, 4, 2, 1, 2)
    assert [t.trial_id for t in counts.running] == ["t7"] and counts.trial_seconds == (30.0,)
    assert counts.best == (best[0], "val_bpb", best[1]) and not counts.all_ended
    assert count_sweep(tmp_path, "s", total=6, max_concurrent=2).best is None  # no objective, no best


def _progress(running: tuple[TrialProgress, ...], done: int = 1, failed: int = 0) -> SweepCounts:
    by_status = {"complete": done} | ({"failed": failed} if failed else {})
    return SweepCounts("s", total=4, by_status=by_status, raised=0, running=running, max_concurrent=2,
                       trial_seconds=(20.0,))  # fmt: skip


def test_render_shows_one_line_per_running_trial() -> None:
    running = (TrialProgress("b", 300, 12.5, 30.0, 12_345.6, 2.7182, 990.0),
               TrialProgress("a", 5, 1.0, 30.0, None, None, 1000.0))  # fmt: skip
    text = render(_progress(running), now=1000.0).splitlines()
    assert text[0].startswith("sweep s [1/4 done, 2 running, 1 queued, 0 failed; ETA ")
    # owed: 1 queued x 20 s + (20 - 12.5) + (20 - 1) = 46.5 s over 2 slots
    assert text[0].endswith("ETA 0m23s]")
    assert text[1].split() == ["a", "step", "5", "1.0/30", "s", "?", "tok/s", "quick", "val_bpb", "-",
                               "(updated", "0m00s", "ago)"]  # fmt: skip
    assert text[2].split() == ["b", "step", "300", "12.5/30", "s", "12,346", "tok/s", "quick", "val_bpb", "2.7182",
                               "(updated", "0m10s", "ago)"]  # fmt: skip


def test_watch_redraws_until_the_sweep_has_finished() -> None:
    states = iter([_progress(()), _progress((), done=3), _progress((), done=3, failed=1)])
    out = io.StringIO()
    final = watch(lambda: next(states), interval=0.0, out=out)
    assert final.all_ended and out.getvalue().count("sweep s [") == 3
    assert "[3/4 done, 0 running, 0 queued, 1 failed" in out.getvalue().splitlines()[-1]


# ------------------------------------------------------------- a sweep captured mid-run


def _captured_mid_run(data: Path, tmp_path: Path) -> tuple[Path, str]:
    """A real sweep (four 4-second trials, one at a time), copied once a trial has ended and the
    next has reported progress, then killed."""
    storage = tmp_path / "sweeps"
    spec = write_spec(tmp_path / "spec.yaml", data, storage, seeds=1, max_concurrent=1,
                      budget={"artifact_bytes": 2_000_000, "train_seconds": 4},
                      search={"algorithm": "random", "objectives": {"val_bpb": "min"}, "num_samples": 4})  # fmt: skip
    sweep_dir, captured = storage / "t", tmp_path / "captured"
    driver = subprocess.Popen([sys.executable, "-m", "loopgolf.cli", "sweep", str(spec)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            progress = read_counts(sweep_dir) if (sweep_dir / "spec.yaml").is_file() else None
            if progress and progress.done and progress.running and progress.running[0].quick_val_bpb is not None:
                shutil.copytree(sweep_dir, captured, ignore=shutil.ignore_patterns("tune", "checkpoints"))
                break
            assert driver.poll() is None, driver.stdout.read()[-3000:] if driver.stdout else ""
            time.sleep(0.2)
        else:
            pytest.fail("no trial ended and another reported progress within 300 s")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    return captured, driver.stdout.read() if driver.stdout else ""


@pytest.mark.slow
@pytest.mark.ray
def test_status_of_a_sweep_captured_mid_run(corpus_data: Path, tmp_path: Path) -> None:
    captured, console = _captured_mid_run(corpus_data, tmp_path)
    trials = {d.name: d for d in (captured / "trials").iterdir()}
    ended = {n for n, d in trials.items() if (d / "metrics.json").is_file()}
    running = sorted(n for n, d in trials.items() if n not in ended and (d / "progress.jsonl").is_file())
    assert len(ended) >= 1 and len(running) == 1
    last = [json.loads(line) for line in (trials[running[0]] / "progress.jsonl").read_text().splitlines()
            if line.endswith("}")][-1]  # fmt: skip
    # `status` in a process where importing Ray fails: it must not need it
    code = ("import sys; sys.modules['ray'] = None; from loopgolf.cli import main; "
            f"sys.exit(main(['status', {str(captured)!r}]))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    counts = next(line for line in lines if line.startswith("sweep t ["))
    assert f"[{len(ended)}/4 done, 1 running, {3 - len(ended)} queued, 0 failed; ETA " in counts
    trial = next(line for line in lines if line.split()[:1] == [running[0]]).split()
    assert trial[1:4] == ["step", str(last["step"]), f"{last['elapsed_seconds']:.1f}/4"]
    assert trial[trial.index("val_bpb") + 1] == f"{last['quick_val_bpb']:.4f}"
    assert float(trial[5].replace(",", "")) > 0  # tokens per second
    payload = json.loads(lines[-1])["progress"]
    assert payload["done"] == len(ended) and payload["eta_seconds"] > 0
    # the sweep's console printed the same counts line at each trial event
    counts = r"\[\d/4 done, \d running, \d queued, \d failed; ETA (\?|\d+m\d\ds)\]"
    assert re.search(rf"^{counts} trial \S+ started$", console, re.M), console[-3000:]
    assert re.search(rf"^{counts} trial \S+: val_bpb=\d\.\d{{4}}; best val_bpb", console, re.M), console[-3000:]

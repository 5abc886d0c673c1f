"""Live progress (`loopgolf status`): the ETA rule, reading progress files, and the lines shown."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest

from loopgolf.orchestrator.progress import (
    SweepProgress,
    TrialProgress,
    counts_line,
    eta_seconds,
    progress_reports,
    render,
    trial_progress,
    watch,
)


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
    assert progress_reports(directory / "progress.jsonl") == reports
    progress = trial_progress(directory)
    assert progress is not None
    assert (progress.step, progress.elapsed_seconds, progress.budget_seconds) == (30, 6.0, 30.0)
    assert progress.tokens_per_second == pytest.approx(40_000 / 4.0)
    assert progress.quick_val_bpb == 3.1
    one = trial_progress(_trial_dir(tmp_path, "t2", reports[:1]))
    assert one is not None and one.tokens_per_second == pytest.approx(10_000.0)
    assert trial_progress(_trial_dir(tmp_path, "t3", [])) is None


def _progress(running: tuple[TrialProgress, ...], done: int = 1, failed: int = 0) -> SweepProgress:
    return SweepProgress("s", total=4, done=done, failed=failed, running=running, max_concurrent=2,
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
    assert final.finished and out.getvalue().count("sweep s [") == 3
    assert "[3/4 done, 0 running, 0 queued, 1 failed" in out.getvalue().splitlines()[-1]

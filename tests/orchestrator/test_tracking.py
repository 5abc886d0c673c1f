"""The sweep's console line says how each trial ended (orchestrator/tracking.py).

    python -m pytest tests/orchestrator/test_tracking.py
"""

from __future__ import annotations

from typing import Any

import pytest

from loopgolf.orchestrator.tracking import trial_outcome


@pytest.mark.parametrize(("result", "errored", "expected"), [
    ({"status": "complete", "val_bpb": 1.23456}, False, "val_bpb=1.2346"),
    ({"status": "rejected"}, False, "rejected"),
    ({"status": "failed", "error": "non-finite loss"}, False, "failed"),
    ({"step": 7, "elapsed_seconds": 6.4, "quick_val_bpb": 3.1}, False, "stopped early at 6 s"),  # a progress report
    ({}, False, "stopped early"),
    ({"status": "complete", "val_bpb": 1.0}, True, "error"),  # Tune's error wins over a stale result
])  # fmt: skip
def test_a_trial_line_says_how_the_trial_ended(result: dict[str, Any], errored: bool, expected: str) -> None:
    assert trial_outcome(result, "val_bpb", errored) == expected

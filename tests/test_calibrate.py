"""Every non-uniform arm evaluates at its refine_target: routed thresholds are calibrated
after training on held-out training tokens (never val), on the dequantized model the
artifact holds, and the artifact carries the threshold.

    python -m pytest tests/test_calibrate.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loopgolf.trial import calibrate
from loopgolf.trial.artifact import load_artifact
from loopgolf.trial.data import TrainBatches, list_shards, read_shard, shard_name, write_shard
from loopgolf.trial.train import run_trial
from tests.test_train import tiny


def test_held_out_tokens_are_the_train_tail_and_never_in_a_window(tmp_path: Path) -> None:
    """Token i of this split is i, so a window's first token is its start position."""
    write_shard(tmp_path / shard_name("train", 0), np.arange(10_000, dtype=np.uint16))
    write_shard(tmp_path / shard_name("train", 1), np.arange(10_000, 30_000, dtype=np.uint16))
    batches = TrainBatches(tmp_path, batch_size=256, seq_len=100, seed=0, holdout=4096)
    assert np.array_equal(batches.heldout, np.arange(30_000 - 4096, 30_000))
    ends = np.concatenate([np.concatenate([x, y[:, -1:]], axis=1) for x, y in map(batches.batch, range(40))])
    assert ends.max() < 30_000 - 4096  # no window reaches the held-out tail
    assert ends.max() > 30_000 - 4096 - 200  # while the rest of the last shard is used
    assert TrainBatches(tmp_path, 4, 100, 0, holdout=50_000).heldout.size == 10_000  # at most half the last shard


@pytest.mark.slow
@pytest.mark.parametrize("signal", ["entropy", "random"])  # stride is exact by construction (test_routing.py)
def test_evaluated_fraction_is_the_target(
    signal: str, corpus_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read: list[np.ndarray] = []
    real = calibrate.calibrate_router

    def spy(model: Any, tokens: np.ndarray, **kwargs: Any) -> float:
        read.append(tokens)
        return real(model, tokens, **kwargs)

    monkeypatch.setattr(calibrate, "calibrate_router", spy)
    config = tiny(
        max_steps=40, train_seconds=600.0, refine_passes=1, signal=signal, refine_target=0.25, refine_cap=0.5,
        eval_tokens=16_384, calibration_tokens=16_384, bits=6,
    )
    metrics = run_trial(config, corpus_data, tmp_path / signal)
    assert metrics["status"] == "complete"
    # The built-in corpus lists its documents sorted by topic, so the held-out tail of its
    # train split is not a random sample of the text as FineWeb's shuffled shards are: a
    # threshold calibrated there lands within 0.02 of the target on val, not 0.01.
    tolerance = 0.02 if signal == "entropy" else 0.01
    assert abs(metrics["refine_fraction"] - 0.25) <= tolerance
    assert abs(metrics["refine_fraction_prequant"] - 0.25) <= tolerance
    if signal != "entropy":
        assert not read and "refine_threshold" not in metrics  # the controls need no calibration
        return
    last = np.asarray(read_shard(list_shards(corpus_data, "train")[-1]))
    assert len(read) == 2 and all(np.array_equal(t, last[-16_384:]) for t in read)  # prequant, then dequantized
    model = load_artifact(metrics["artifact_path"])
    assert model.router_threshold.item() == pytest.approx(metrics["refine_threshold"], rel=1e-7)
    assert metrics["refine_threshold"] != metrics["refine_threshold_prequant"]

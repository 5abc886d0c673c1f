"""Every non-uniform arm evaluates at its refine_target: routed thresholds are calibrated
after training on held-out training tokens (never val), on the dequantized model the
artifact holds, and the artifact carries the threshold.

    python -m pytest tests/trial/test_calibrate.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loopgolf.trial import calibrate
from loopgolf.trial.artifact import load_artifact
from loopgolf.trial.data import TrainBatches, holdout_spans, shard_name, training_segments, write_shard
from loopgolf.trial.train import run_trial
from tests.trial.makers import tiny


@settings(max_examples=80, deadline=None, derandomize=True, database=None)
@given(
    lengths=st.lists(st.integers(0, 5_000), min_size=1, max_size=5),
    holdout=st.integers(0, 6_000),
    seq_len=st.integers(1, 300),
)
def test_held_out_windows_partition_the_split_with_training_segments(
    lengths: list[int], holdout: int, seq_len: int
) -> None:
    """Every train token is in exactly one place: a held-out window or a training segment;
    the windows are whole, inside one shard, about `holdout` tokens and at most half the split."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    shards = [np.arange(offsets[i], offsets[i + 1]) for i in range(len(lengths))]  # token = its position
    spans = holdout_spans(lengths, holdout, seq_len)
    width = seq_len + 1
    assert all(b - a == width and a >= 0 and b <= lengths[i] for i, a, b in spans)
    held = np.concatenate([shards[i][a:b] for i, a, b in spans]) if spans else np.zeros(0, dtype=np.int64)
    kept = np.concatenate(training_segments(shards, spans) or [np.zeros(0, dtype=np.int64)])
    assert np.array_equal(np.sort(np.concatenate([held, kept])), np.arange(offsets[-1]))
    assert len(held) <= min(holdout, offsets[-1] // 2)
    if len(lengths) == 1:  # one shard loses no window to a short shard
        assert len(spans) == min(holdout // width, offsets[-1] // 2 // width)


def test_held_out_windows_are_spread_over_the_split_and_never_trained_on(tmp_path: Path) -> None:
    """A topic-sorted corpus's tail is no sample of it: the windows come from every part of
    the split. Token i of this split is i, so a window's tokens are its positions."""
    write_shard(tmp_path / shard_name("train", 0), np.arange(10_000, dtype=np.uint16))
    write_shard(tmp_path / shard_name("train", 1), np.arange(10_000, 30_000, dtype=np.uint16))
    batches = TrainBatches(tmp_path, batch_size=256, seq_len=100, seed=0, holdout=4096)
    windows = batches.heldout_windows
    assert windows.shape == (4096 // 101, 101)
    assert np.all(np.diff(windows, axis=1) == 1)  # each window is contiguous text
    sixteenths = np.unique(windows[:, 0] * 16 // 30_000)
    assert sixteenths.tolist() == list(range(16))  # every sixteenth of the split is sampled
    trained = np.concatenate([np.concatenate([x, y[:, -1:]], axis=1) for x, y in map(batches.batch, range(40))])
    assert not np.isin(trained, windows).any()  # no training window reaches a held-out token
    for x, y in map(batches.batch, range(40)):  # nor bridges a cut (the text is contiguous)
        assert np.all(np.diff(np.concatenate([x, y[:, -1:]], axis=1), axis=1) == 1)
    assert TrainBatches(tmp_path, 4, 100, 0, holdout=50_000).heldout_windows.size <= 15_000  # at most half


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
    # The built-in corpus lists its documents sorted by topic: calibrating on windows spread
    # over the whole train split (not its tail) is what brings entropy within 0.01 of target.
    assert abs(metrics["refine_fraction"] - 0.25) <= 0.01
    assert abs(metrics["refine_fraction_prequant"] - 0.25) <= 0.01
    if signal != "entropy":
        assert not read and "refine_threshold" not in metrics  # the controls need no calibration
        return
    held = TrainBatches(corpus_data, 1, config.model.seq_len, 0, holdout=16_384).heldout_windows
    assert len(read) == 2 and all(np.array_equal(t, held) for t in read)  # prequant, then dequantized
    model = load_artifact(metrics["artifact_path"])
    assert model.router_threshold.item() == pytest.approx(metrics["refine_threshold"], rel=1e-7)
    assert metrics["refine_threshold"] != metrics["refine_threshold_prequant"]

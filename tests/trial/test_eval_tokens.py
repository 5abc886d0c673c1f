"""Per-token evaluation: every trial scores the same tokens, the per-token file adds up to
the trial's own numbers, and the sweep's eval stream says where each token is.

    python -m pytest tests/trial/test_eval_tokens.py
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from loopgolf.trial.config import preset
from loopgolf.trial.data import byte_table, list_shards, load_tokenizer, read_shard, val_tokens
from loopgolf.trial.eval_tokens import (
    AUTO_EVAL_LIMIT,
    eval_size,
    eval_stream_schema,
    eval_tokens_schema,
    write_stream,
    write_token_scores,
)
from loopgolf.trial.evaluate import evaluate
from loopgolf.trial.model import RecurrentLM
from loopgolf.trial.prepare import read_manifest, tokenizer_path
from loopgolf.trial.train import run_trial


def test_eval_size_defaults_to_the_whole_split_up_to_a_million() -> None:
    assert eval_size(50_000, 0) == 50_000
    assert eval_size(5_000_000, 0) == AUTO_EVAL_LIMIT
    assert eval_size(5_000_000, 65_536) == 65_536 and eval_size(1_000, 65_536) == 1_000


def test_stream_positions_documents_and_buckets(corpus_data: Path, tmp_path: Path) -> None:
    manifest = read_manifest(corpus_data)
    bos, vocab, seq_len = int(manifest["bos_id"]), int(manifest["tokenizer"]["vocab_size"]), 64
    path = write_stream(tmp_path, corpus_data, 20_000, seq_len)
    stream = pd.read_parquet(path)
    tokens = val_tokens(corpus_data, 20_000)
    n = (len(tokens) - 1) // seq_len * seq_len
    assert len(stream) == n and (stream["token"].to_numpy() == tokens[1 : n + 1]).all()
    document, position = -1 if tokens[0] == bos else 0, -1  # reference: walk the stream
    expected = []
    for t in tokens[: n + 1]:
        document, position = (document + 1, 0) if t == bos else (document, position + 1)
        expected.append((document, position))
    assert list(zip(stream["document"], stream["position"], strict=True)) == expected[1:]
    counts = sum(np.bincount(read_shard(p), minlength=vocab) for p in list_shards(corpus_data, "train"))
    pairs = stream.drop_duplicates("token")
    c, b = counts[pairs["token"].to_numpy()], pairs["freq_bucket"].to_numpy()
    assert not ((c[:, None] < c[None, :]) & (b[:, None] > b[None, :])).any()  # a commoner token: never a lower bucket
    assert b[np.argmax(c)] == 9 and set(b) <= set(range(10))
    before = path.stat().st_mtime_ns
    write_stream(tmp_path, corpus_data, 4_096, seq_len)  # written once: kept as it is
    assert path.stat().st_mtime_ns == before and len(pd.read_parquet(path)) == n
    assert pq.read_schema(path).remove_metadata() == eval_stream_schema().remove_metadata()  # the report's


def test_kept_tokens_add_up_to_the_evaluation(corpus_data: Path, tmp_path: Path) -> None:
    config = preset("tiny").replace(refine_passes=1, signal="entropy", refine_target=0.3, seq_len=128)
    torch.manual_seed(0)
    model = RecurrentLM(config.model)
    table = byte_table(load_tokenizer(tokenizer_path(corpus_data)), config.model.vocab_size)
    tokens = val_tokens(corpus_data, 6_000)
    result = evaluate(model, tokens, table, batch_size=4, device=torch.device("cpu"), keep_tokens=True)
    scores = result.token_scores
    assert scores is not None and len(scores.ce) == result.tokens == (len(tokens) - 1) // 128 * 128
    assert math.isclose(float(scores.ce.astype(np.float64).sum()) / result.tokens, result.val_loss, rel_tol=1e-5)
    assert int(scores.bytes.sum()) == result.bytes
    assert math.isclose(float(scores.refined.mean()), result.refine_fraction, abs_tol=1e-9)
    assert (scores.ce[~scores.refined] == scores.base_ce[~scores.refined]).all()
    assert scores.router_score is not None and np.isfinite(scores.router_score).all()
    path = write_token_scores(scores, tmp_path / "t.parquet")  # the schema the report reads
    assert pq.read_schema(path).remove_metadata() == eval_tokens_schema().remove_metadata()
    assert (pd.read_parquet(path)["ce"].to_numpy() == scores.ce).all()


@pytest.mark.slow
def test_trials_score_the_same_tokens_and_write_them_beside_the_artifact(corpus_data: Path, tmp_path: Path) -> None:
    base = preset("tiny").replace(batch_size=8, max_steps=3, eval_tokens=4_096, quick_eval_tokens=1_024)
    files = {}
    for name, values in {"routed": {"refine_passes": 1, "signal": "margin"}, "plain": {"n_blocks": 1}}.items():
        metrics = run_trial(base.replace(**values), corpus_data, tmp_path / name)
        assert metrics["status"] == "complete", metrics.get("error")
        path = Path(metrics["eval_tokens_path"])
        assert path.parent == Path(metrics["artifact_path"]).parent
        files[name] = pd.read_parquet(path)
        frame = files[name]
        assert len(frame) == metrics["eval_tokens_scored"] and int(frame["bytes"].sum()) == metrics["eval_bytes"]
        assert math.isclose(frame["ce"].astype(float).mean(), metrics["val_loss"], rel_tol=1e-5)
        assert frame["ce"].dtype == np.float32 and frame["refined"].dtype == bool
    assert files["plain"]["router_score"].isna().all() and not files["plain"]["refined"].any()
    assert (files["routed"]["bytes"] == files["plain"]["bytes"]).all()  # the same tokens, in the same order
    stream = pd.read_parquet(write_stream(tmp_path / "results", corpus_data, 4_096, base.model.seq_len))
    assert len(stream) == len(files["routed"])

"""Shared fixtures.

The suite needs nothing beside the repository. Its data is built once per test run from
what every machine has: the built-in corpus (Python's pydoc topics) prepared by
`loopgolf data prepare --vocab-size`, once with a byte-fallback tokenizer and once with
one that has none, so both the byte-fallback and the unknown-piece paths of the byte
accounting are exercised.

Tests against the challenge's real tokenizers and corpora use the `challenge` fixture.
They run when LOOPGOLF_CHALLENGE_DATA names a folder holding `tokenizers/` and
`corpora/`; otherwise they skip with a one-line reason, except under CI=true, where a
missing folder fails them, so CI never silently loses them.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from loopgolf.trial.config import TrialConfig, preset
from loopgolf.trial.model import RecurrentLM

# One intra-op thread: on a 2-core machine, two torch threads racing any other process
# make steps ~10x slower, and wall-clock-budgeted trials would then measure the noise.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
CHALLENGE_ENV = "LOOPGOLF_CHALLENGE_DATA"
VOCAB = 1024  # the challenge's smallest vocabulary, and the one its baseline uses


@dataclasses.dataclass(frozen=True)
class Challenge:
    """The challenge's data folder: tokenizers/fineweb_<V>_bpe.model and corpora/*.txt."""

    root: Path

    def tokenizer(self, vocab: int) -> Path:
        path = self.root / "tokenizers" / f"fineweb_{vocab}_bpe.model"
        if not path.is_file():
            pytest.fail(f"{CHALLENGE_ENV}={self.root}: no tokenizers/{path.name}")
        return path

    @property
    def shakespeare(self) -> Path:
        path = self.root / "corpora" / "tinyshakespeare.txt"
        if not path.is_file():
            pytest.fail(f"{CHALLENGE_ENV}={self.root}: no corpora/{path.name}")
        return path


def find_challenge_data() -> Challenge:
    """The folder LOOPGOLF_CHALLENGE_DATA names; skip without it (fail under CI=true)."""
    value = os.environ.get(CHALLENGE_ENV, "")
    root = Path(value).expanduser().resolve() if value else None
    if root is None:
        problem = f"{CHALLENGE_ENV} is not set (a folder holding the challenge's tokenizers/ and corpora/)"
    else:
        missing = [name for name in ("tokenizers", "corpora") if not (root / name).is_dir()]
        problem = f"{CHALLENGE_ENV}={value}: no {' or '.join(m + '/' for m in missing)} in it" if missing else ""
    if problem and os.environ.get("CI") == "true":
        pytest.fail(f"{problem}; under CI=true the challenge-data tests must run", pytrace=False)
    if problem:
        pytest.skip(problem)
    assert root is not None
    return Challenge(root)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that reads the challenge's data, so `-m challenge` selects them; put every
    test that starts Ray in one xdist group, so that two local Ray clusters never run at once
    (each would take the whole machine's CPUs for its trials, and the kill tests time their kills)."""
    for item in items:
        if "challenge" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.challenge)
        if item.get_closest_marker("ray") is not None:
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture(scope="session")
def challenge() -> Challenge:
    return find_challenge_data()


def _prepare_builtin(root: Path, byte_fallback: bool) -> Path:
    from loopgolf.trial.prepare import PrepareConfig, prepare

    out = root / ("builtin_bf" if byte_fallback else "builtin_nobf")
    prepare(PrepareConfig(out_dir=out, vocab_size=VOCAB, byte_fallback=byte_fallback))
    return out


@pytest.fixture(scope="session")
def corpus_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in corpus prepared with a trained 1024-piece byte-fallback BPE: the suite's data."""
    return _prepare_builtin(tmp_path_factory.mktemp("data"), byte_fallback=True)


@pytest.fixture(scope="session")
def corpus_data_no_fallback(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same corpus and vocabulary size, trained without byte fallback: unseen text is unknown."""
    return _prepare_builtin(tmp_path_factory.mktemp("data"), byte_fallback=False)


@pytest.fixture(scope="session")
def challenge_data(challenge: Challenge, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tinyshakespeare prepared with the challenge's 1024-piece tokenizer."""
    from loopgolf.trial.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("data") / "shakespeare_sp1024"
    prepare(PrepareConfig(out_dir=out, text_files=(challenge.shakespeare,), tokenizer=challenge.tokenizer(VOCAB)))
    return out


def trained_like(config: TrialConfig, seed: int = 0) -> RecurrentLM:
    """A model whose every tensor moved off its init (zero-init projections included)."""
    torch.manual_seed(seed)
    model = RecurrentLM(config.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if config.model.refine_passes:
        model.router_threshold.fill_(1.2345678)  # a calibrated threshold travels exactly
    return model.eval()


# For the artifact and QAT tests, every tensor kind: prelude/coda, unet skips, lora phase,
# an untied head, the router buffer; a low small-tensor threshold so the block matrices
# are quantized.
RICH = preset("small").replace(
    d_model=64, n_heads=4, n_kv_heads=2, n_prelude=1, n_coda=1, unet_skips=True, phase="lora",
    tie_embeddings=False, refine_passes=1, small_tensor_numel=2048, seq_len=32,
)


@pytest.fixture(scope="session", params=["builtin", pytest.param("challenge", marks=pytest.mark.challenge)])
def text_tokens(request: pytest.FixtureRequest) -> np.ndarray:
    """Token ids of real text with a 1024-piece tokenizer: the built-in corpus, and tinyshakespeare
    under the challenge's tokenizer when its data is there."""
    from loopgolf.trial.data import list_shards, load_tokenizer, read_shard

    if request.param == "challenge":
        challenge: Challenge = request.getfixturevalue("challenge")
        sp = load_tokenizer(challenge.tokenizer(VOCAB))
        return np.asarray(sp.encode(challenge.shakespeare.read_text(encoding="utf-8")), dtype=np.int64)
    data: Path = request.getfixturevalue("corpus_data")
    return np.concatenate([np.asarray(read_shard(p), dtype=np.int64) for p in list_shards(data, "train")])

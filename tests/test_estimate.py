"""The analytic estimate: params in closed form, and predicted artifact bytes against real
compression of trained models.

    python -m pytest tests/test_estimate.py
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from loopgolf.trial import estimate
from loopgolf.trial import model as model_module
from loopgolf.trial.artifact import CODE_FILES, code_bytes, save_artifact
from loopgolf.trial.config import CompressConfig, ModelConfig, TrialConfig, preset
from loopgolf.trial.estimate import count_params, inventory
from loopgolf.trial.model import RecurrentLM
from loopgolf.trial.quantize import quantize_model
from tests.conftest import REPO

# The prediction's stated tolerance on briefly trained tiny-family models: |predicted /
# actual - 1| of model_bytes. bench/bench_compress.py --check measures it on the whole
# calibration grid (see estimate.SAFETY_MARGIN's comment; zstd at ~1 bit per level is the
# one regime that varies more, and is not in this grid).
TOLERANCE = 0.03
# The calibration was made on models trained on English prose (tinyshakespeare, the challenge's
# tokenizer); on the built-in corpus (Python's documentation, code-heavy) briefly trained models
# compress better than predicted: +2.3% to +6.5% measured on `tiny`, i.e. conservative. There the
# test bounds the safe side as tightly and the conservative side by this wider margin.
OVER_PREDICTION_ON_OTHER_TEXT = 0.08


# ---------------------------------------------------------------------- param counts

PARAM_TABLE = [
    dict(zip(("phase", "unet_skips", "tie_embeddings", "n_prelude", "n_coda", "refine_passes"), combo, strict=True))
    for combo in itertools.product(["none", "scale", "lora", "embed"], [False, True], [True, False], [0, 2], [0, 1],
                                   [0, 2])
] + [
    {"d_model": 512, "n_heads": 8, "n_kv_heads": 4, "n_blocks": 9, "n_passes": 1, "unet_skips": True},  # pg_baseline
    {"d_model": 96, "n_heads": 3, "n_kv_heads": 1, "mlp_mult": 2.7, "vocab_size": 777, "lora_rank": 3,
     "phase": "lora", "n_passes": 5, "refine_passes": 1},
    {"d_model": 48, "n_heads": 6, "n_kv_heads": 6, "n_blocks": 1, "n_passes": 1, "activation": "gelu"},
]


@pytest.mark.parametrize("overrides", PARAM_TABLE, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_count_params_equals_unique_params(overrides: dict[str, object]) -> None:
    config = ModelConfig(**{"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "n_passes": 3, **overrides})
    with torch.device("meta"):
        model = RecurrentLM(config)
    assert count_params(config).total == model.unique_params()
    assert {s.name: s.shape for s in inventory(config)} == {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "compress",
    [CompressConfig(), CompressConfig(small_tensor_numel=1000, protect=("tok_emb.weight", "core.1.*"), protect_bits=8),
     CompressConfig(small_tensor_numel=0, protect=("*.mlp.*",), protect_bits=16)],
)
def test_count_groups_match_what_the_quantizer_stores(compress: CompressConfig) -> None:
    config = preset("small").replace(n_prelude=1, unet_skips=True, phase="lora", tie_embeddings=False,
                                     refine_passes=1)
    counts = count_params(config.model, compress)
    stored = quantize_model(RecurrentLM(config.model), compress)
    groups = stored.counts()
    assert (counts.quantized, counts.protected, counts.small) == (
        groups["quantized"], groups["protected"], groups["small"])
    assert counts.quantized_rows == sum(t.q.shape[0] for t in stored.tensors if t.q is not None)


# ---------------------------------------------------------------- byte prediction


def _train(config: TrialConfig, steps: int, tokens: np.ndarray) -> RecurrentLM:
    """A brief run of the trial's own optimizers (Muon + AdamW) on real text."""
    from loopgolf.trial.train import build_optimizers

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = RecurrentLM(config.model)
    optimizers = build_optimizers(model, config)
    seq = config.model.seq_len
    for _ in range(steps):
        rows = torch.from_numpy(np.stack([tokens[s : s + seq + 1] for s in rng.integers(0, len(tokens) - seq - 1, 8)]))
        model(rows[:, :-1], rows[:, 1:]).loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return model.eval()


PREDICTION_SHAPES = {
    "tiny": preset("tiny").replace(seq_len=64),
    "d128_unet_untied_lora": preset("small").replace(
        seq_len=64, unet_skips=True, tie_embeddings=False, phase="lora", refine_passes=1, n_prelude=1),
}


@pytest.fixture(scope="module")
def trained_models(text_tokens: np.ndarray) -> dict[str, RecurrentLM]:
    """Briefly trained on the built-in corpus, and on tinyshakespeare with the challenge's data."""
    return {name: _train(config, 60, text_tokens) for name, config in PREDICTION_SHAPES.items()}


@pytest.mark.parametrize("shape", list(PREDICTION_SHAPES))
def test_predicted_bytes_within_tolerance_of_real_compression(
    shape: str, trained_models: dict[str, RecurrentLM], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    model, base = trained_models[shape], PREDICTION_SHAPES[shape]
    bits = (8, 6, 5, 4) if shape == "tiny" else (6, 4)  # the larger model: fewer, to keep the file fast
    cases = [{"codec": c, "bits": b, "small_tensor_numel": 4096} for c in ("zlib", "lzma", "zstd", "brotli")
             for b in bits]
    # The challenge's fp16 rule (65,536) as calibrated. With the 4,096 default, int6 at k=12.85 under
    # brotli over-predicts by up to +3.9% on these briefly trained models (measured): conservative.
    challenge_rule = {"small_tensor_numel": 65_536}
    cases += [challenge_rule | {"codec": "zstd", "bits": 6},
              challenge_rule | {"codec": "brotli", "bits": 6, "clip_sigma": 12.85},
              challenge_rule | {"codec": "zstd", "bits": 5, "protect": ["tok_emb.weight"], "protect_bits": 16}]
    errors = {}
    for case in cases:
        config = base.replace(**case)
        info = save_artifact(model, config, tmp_path / "a.lga")
        predicted = estimate.estimate_bytes(config)
        assert predicted.code_bytes == info.code_bytes
        errors[str(case)] = predicted.model_bytes / info.model_bytes - 1
    over = TOLERANCE if request.node.callspec.params["text_tokens"] == "challenge" else OVER_PREDICTION_ON_OTHER_TEXT
    worst = max(errors.items(), key=lambda kv: abs(kv[1]))
    assert -TOLERANCE <= worst[1] <= over, f"{shape}: worst relative error {worst[1]:+.2%} at {worst[0]}"


@pytest.mark.parametrize(
    ("change", "relation"),
    [
        ({"n_passes": 4}, "equal"),  # looping reuses the core's weights: no byte more
        ({"seq_len": 1024}, "equal"),
        ({"n_blocks": 3}, "larger"),
        ({"n_prelude": 1}, "larger"),
        ({"tie_embeddings": False}, "larger"),  # a separate head matrix
        ({"bits": 4}, "smaller"),
        ({"bits": 6}, "smaller"),
        ({"protect": ["tok_emb.weight"], "protect_bits": 16}, "larger"),  # the embedding kept in fp16
        ({"clip_sigma": 4.0}, "smaller"),  # a coarser grid: fewer distinct levels to code
    ],
)
def test_the_prediction_moves_the_way_each_knob_does(change: dict, relation: str) -> None:
    base = preset("small").replace(bits=8, small_tensor_numel=0, codec="lzma")
    before, after = estimate.predict_artifact_bytes(base), estimate.predict_artifact_bytes(base.replace(**change))
    assert {"equal": after == before, "larger": after > before, "smaller": after < before}[relation], (before, after)


def test_the_prediction_is_model_bytes_rounded_up_plus_the_code_files_on_disk() -> None:
    predicted = estimate.estimate_bytes(preset("small"))
    on_disk = sum((REPO / name).stat().st_size for name in CODE_FILES)
    assert predicted.code_bytes == on_disk == code_bytes()
    assert predicted.artifact_bytes == math.ceil(predicted.model_bytes) + on_disk
    assert estimate.predict_artifact_bytes(preset("small")) == predicted.artifact_bytes


@pytest.mark.parametrize("overrides", [{}, {"n_passes": 3, "n_prelude": 1, "n_coda": 1}, {"phase": "lora"}])
def test_the_estimated_flops_are_what_the_model_reports_when_it_runs(overrides: dict) -> None:
    config = preset("tiny").model
    config = ModelConfig(**(dataclasses.asdict(config) | overrides | {"seq_len": 64}))
    model = RecurrentLM(config).eval()
    with torch.no_grad():
        stats = model(torch.zeros(2, 64, dtype=torch.long)).stats
    assert estimate.flops_per_token(config) == pytest.approx(stats.flops_per_token, rel=1e-12)
    if config.phase == "lora":  # a looped pass also runs the adapters
        return
    more = ModelConfig(**(dataclasses.asdict(config) | {"n_passes": config.n_passes + 1}))
    one_pass = config.n_blocks * model_module.block_flops_per_token(config)  # another pass costs its blocks
    assert estimate.flops_per_token(more) - estimate.flops_per_token(config) == pytest.approx(one_pass, rel=1e-12)

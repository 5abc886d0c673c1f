"""The analytic estimate: params in closed form, and predicted artifact bytes against real
compression of trained models.

    python -m pytest tests/trial/test_estimate.py
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from loopgolf.trial import estimate
from loopgolf.trial.artifact import save_artifact
from loopgolf.trial.code_bytes import CODE_FILES, code_bytes
from loopgolf.trial.config import CompressConfig, ModelConfig, TrialConfig, preset
from loopgolf.trial.estimate import count_params, inventory
from loopgolf.trial.model import ForwardStats, RecurrentLM
from loopgolf.trial.optim import build_optimizers
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


# ------------------------------------------------------------------ FLOPs per token

# Small shapes that exercise every term of the analytic count. Attention is left out of
# the comparison (see the test), so T and the batch can stay tiny: the test is fast.
FLOP_SHAPES = {
    "one_pass": {"n_passes": 1},
    "prelude_coda_3_passes": {"n_prelude": 1, "n_coda": 2, "n_passes": 3},
    "gqa_untied_head": {"n_heads": 4, "n_kv_heads": 1, "tie_embeddings": False},
    "mha_mlp_dim": {"n_heads": 2, "n_kv_heads": 2, "mlp_dim": 40, "activation": "gelu"},
    "share_attn": {"share": "attn", "n_passes": 3},
    "share_mlp": {"share": "mlp", "n_passes": 3, "n_coda": 1},
    "phase_lora": {"phase": "lora", "lora_rank": 3, "n_passes": 3},
    "unet_skips": {"unet_skips": True, "n_prelude": 1, "n_coda": 1},
    # uniform refines every token: the refined terms count at a known fraction, 1
    "refine_uniform": {"refine_passes": 2, "signal": "uniform", "n_coda": 1},
    "refine_uniform_lora_share_attn": {"refine_passes": 1, "signal": "uniform", "phase": "lora", "share": "attn",
                                       "n_passes": 3, "n_prelude": 1, "n_coda": 1, "tie_embeddings": False},
    # kl reads the head on two more states (a coda sits between); its cap refines half the tokens
    "refine_kl": {"refine_passes": 1, "signal": "kl", "n_coda": 1},
}


def _counted_matmul_flops(model: RecurrentLM, idx: torch.Tensor) -> tuple[float, ForwardStats]:
    """Matmul FLOPs torch's FlopCounterMode counts in one forward, attention left out, and
    the forward's own stats.

    On CPU, scaled_dot_product_attention runs a kernel FlopCounterMode has no formula for
    (measured with torch 2.13: it counts 0), and elsewhere it would count the full T x T
    score matrix rather than the causal half: so any op named *attention* is dropped, and
    what remains is every linear (mm, addmm, bmm), whichever torch version runs this.
    """
    # With autograd on: FlopCounterMode's module tracker hooks the inputs' gradients and
    # fails on a LoRA factor sliced from a parameter under no_grad or inference_mode.
    with FlopCounterMode(display=False) as counter:
        stats = model(idx).stats
    counts = counter.get_flop_counts()["Global"]
    return float(sum(flops for op, flops in counts.items() if "attention" not in str(op))), stats


@pytest.mark.parametrize("overrides", list(FLOP_SHAPES.values()), ids=list(FLOP_SHAPES))
def test_the_analytic_flops_match_torchs_flop_counter(overrides: dict[str, object]) -> None:
    """The analytic forward FLOPs per token against an independent count: torch's FlopCounterMode
    around a real forward (eager, gathered refinement).

    Compared: the matmul part only, i.e. per block application the `matmuls` term of
    block_flops_per_token (q, k, v, proj, fc, proj), LoRA's adapters, and each LM head
    application. The causal attention term, 4 d (T + 1) / 2 per block application, is
    subtracted from the analytic count, because FlopCounterMode does not see attention on
    CPU (see _counted_matmul_flops). Norms, RoPE and activations are in neither count.
    """
    config = ModelConfig(**{"vocab_size": 96, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "n_blocks": 2,
                            "n_passes": 2, "seq_len": 16, **overrides})
    batch, seq = 2, config.seq_len
    torch.manual_seed(0)
    model = RecurrentLM(config).eval()
    idx = torch.randint(0, config.vocab_size, (batch, seq))
    counted, stats = _counted_matmul_flops(model, idx)
    counted /= batch * seq
    refined = stats.refined_fraction
    if config.signal == "uniform" and config.refine_passes:
        assert refined == 1.0  # the refined terms below count in full
    c = config
    block_applications = c.effective_depth + refined * (c.n_blocks * c.refine_passes + c.n_coda)
    attention = 4 * c.d_model * (seq + 1) / 2 * block_applications
    analytic = estimate.flops_per_token(config, refined_fraction=refined) - attention
    assert counted == pytest.approx(analytic, rel=1e-12)
    # The forward's own report (what training logs) counts the same.
    assert stats.flops_per_token - attention == pytest.approx(counted, rel=1e-12)

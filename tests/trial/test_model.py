"""RecurrentLM: parameter counts, causality of routed refinement, the causal cap, KV reuse,
gradients, compute that scales with the refined fraction, and learning on real text.

Most tests run in float64 on a small model whose every parameter is perturbed away from
its init (zero-init projections, unit gains and zero phase deltas would otherwise make
blocks, passes and refinement no-ops, and the checks vacuous).

    .venv/bin/python -m pytest tests/trial/test_model.py
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from loopgolf.trial import selection as selection_module
from loopgolf.trial.blocks import QATLinear
from loopgolf.trial.config import FIXED_SIGNALS, ROUTED_SIGNALS, ModelConfig, preset
from loopgolf.trial.flops import block_flops_per_token, flops_per_token
from loopgolf.trial.model import RecurrentLM
from loopgolf.trial.routing import causal_cap
from tests.trial.makers import build, small, tokens

SIGNALS = ROUTED_SIGNALS + FIXED_SIGNALS


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These models are tiny: one thread is as fast, and immune to a busy machine's other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def set_low_threshold(model: RecurrentLM, idx: torch.Tensor, quantile: float = 0.1) -> None:
    """Put the threshold low, so most tokens want refinement and the cap binds."""
    if model.config.signal in ROUTED_SIGNALS:
        with torch.no_grad():
            model.router_threshold.fill_(float("nan"))  # uncalibrated: cap-only, to read the scores
            score = model(idx).router_score
            assert score is not None
            model.router_threshold.fill_(torch.quantile(score.flatten(), quantile).item())


# ------------------------------------------------------------------------- parameters


def closed_form_params(c: ModelConfig) -> int:
    d, kv, hidden = c.d_model, c.n_kv_heads * c.head_dim, c.mlp_hidden
    block = (d * d + 2 * d * kv + d * d) + 2 * d * hidden + (d + d + 2 * d + c.n_heads)  # matrices + control vectors
    total = (c.n_prelude + c.n_blocks + c.n_coda) * block + c.vocab_size * d * (1 if c.tie_embeddings else 2)
    if c.unet_skips:
        total += (c.n_prelude + c.n_blocks * c.n_passes + c.n_coda) // 2 * d
    index = c.n_passes + c.refine_passes
    total += {
        "none": 0,
        "scale": index * c.n_blocks * d,
        "embed": index * d,
        "lora": index * c.n_blocks * c.lora_rank * ((d + d) + (d + kv) + (d + hidden)),
    }[c.phase]
    return total


def test_pg_baseline_has_the_challenge_param_count() -> None:
    model = RecurrentLM(preset("pg_baseline").model)
    assert model.unique_params() == 17_059_912
    assert model.unique_params() == 9 * 1_835_008 + 524_288 + 9 * 2_056 + 4 * 512
    assert model.effective_params() == model.unique_params()  # n_passes = 1


@pytest.mark.parametrize(
    "overrides",
    [
        dict(n_passes=1, n_blocks=5),
        dict(n_passes=1, n_prelude=2, n_coda=1, tie_embeddings=False, unet_skips=True, mlp_mult=3.0),
        dict(n_passes=3, phase="scale", refine_passes=1),
        dict(n_passes=2, phase="lora", lora_rank=3, n_kv_heads=4),
        dict(n_passes=2, phase="embed", refine_passes=2, n_prelude=1, unet_skips=True),
    ],
)
def test_unique_and_effective_params_match_closed_form(overrides: dict[str, object]) -> None:
    config = small(**overrides)
    model = RecurrentLM(config)
    assert model.unique_params() == closed_form_params(config)
    core = sum(p.numel() for p in model.core.parameters())
    assert model.effective_params() == model.unique_params() + (config.n_passes - 1) * core


def test_parameter_names_and_qat_linears() -> None:
    config = small(n_prelude=1, n_coda=1, unet_skips=True, tie_embeddings=False, phase="scale")
    model = RecurrentLM(config)
    names = {n for n, _ in model.named_parameters()}
    for stem in ("prelude.0", "core.0", "core.1", "coda.0"):
        for leaf in ("attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.proj.weight", "attn.q_gain",
                     "mlp.fc.weight", "mlp.proj.weight", "attn_scale", "mlp_scale", "resid_mix"):
            assert f"{stem}.{leaf}" in names
    assert {"tok_emb.weight", "lm_head.weight", "skip_weights", "phase.scale"} <= names
    linears = [m for n, m in model.named_modules() if n.endswith((".q", ".k", ".v", ".proj", ".fc"))]
    assert len(linears) == 4 * 6 and all(isinstance(m, QATLinear) for m in linears)
    # Zero-init output projections and control vectors as in the baseline.
    assert not model.core[0].attn.proj.weight.any() and not model.core[0].mlp.proj.weight.any()
    assert torch.equal(model.core[0].resid_mix[1], torch.zeros(config.d_model))


def test_weight_transform_is_applied() -> None:
    config = small()
    model = build(config).eval()
    idx = tokens(config)
    before = model(idx).logits
    for m in model.modules():
        if isinstance(m, QATLinear):
            m.weight_transform = lambda w: torch.round(w * 4) / 4
    after = model(idx).logits
    assert not torch.allclose(before, after)


# --------------------------------------------------------------------------- causality


@pytest.mark.parametrize(
    ("signal", "train"),
    [(s, False) for s in SIGNALS] + [(s, True) for s in SIGNALS if s != "random"],  # random redraws per step
)
def test_refinement_is_causal(signal: str, train: bool) -> None:
    """Changing tokens after t changes nothing at positions <= t: logits, routing, scores."""
    config = small(
        n_prelude=1, n_coda=1, unet_skips=True, phase="lora", refine_passes=2,
        signal=signal, refine_cap=0.2, refine_target=0.2,  # random: i.i.d. at the cap, so the cap binds
    )
    model = build(config)
    idx = tokens(config)
    set_low_threshold(model, idx)
    model.train(train)
    model.threshold_frozen = True
    targets = idx.roll(-1, dims=1)
    model.restart_draws()  # the `random` signal: every forward below sees the same draw
    out = model(idx, targets, return_token_ce=True)
    assert out.refined is not None and out.router_score is not None and out.token_ce is not None
    wanted = out.router_score > model.threshold()
    if signal == "uniform":
        assert out.refined.all()
    elif signal == "stride":  # the pattern is the cap's own budget
        assert torch.equal(out.refined, wanted) and out.refined.sum() > 0
    else:
        assert 0 < out.refined.sum() < wanted.sum(), "the cap must bind in this test"
    # Refined tokens really got new logits; the rest kept their base logits.
    changed = (out.token_ce - out.base_token_ce).abs() > 0
    assert torch.equal(changed, out.refined)

    gen = torch.Generator().manual_seed(7)
    refined_positions = out.refined.any(0).nonzero().flatten().tolist()  # a leak shows first where t is refined
    for t in sorted({0, 5, config.seq_len - 2, *refined_positions} - {config.seq_len - 1}):
        other = idx.clone()
        other[:, t + 1 :] = torch.randint(0, config.vocab_size, other[:, t + 1 :].shape, generator=gen)
        model.restart_draws()
        alt = model(other)
        assert alt.refined is not None and alt.router_score is not None
        assert torch.equal(out.refined[:, : t + 1], alt.refined[:, : t + 1])
        torch.testing.assert_close(out.router_score[:, : t + 1], alt.router_score[:, : t + 1], atol=1e-10, rtol=0)
        torch.testing.assert_close(out.logits[:, : t + 1], alt.logits[:, : t + 1], atol=1e-10, rtol=0)
        assert not torch.allclose(out.logits[:, t + 1 :], alt.logits[:, t + 1 :])  # the change did reach the future


def test_causality_in_float32() -> None:
    config = small(n_coda=1, refine_passes=1, signal="entropy", refine_cap=0.3)
    model = build(config).float().eval()
    idx = tokens(config)
    out = model(idx)
    other = idx.clone()
    other[:, 20:] = (other[:, 20:] + 1) % config.vocab_size
    alt = model(other)
    assert out.refined is not None and alt.refined is not None and out.refined[:, :20].any()
    assert torch.equal(out.refined[:, :20], alt.refined[:, :20])
    torch.testing.assert_close(out.logits[:, :20], alt.logits[:, :20], atol=1e-6, rtol=0)


def reference_cap(want: torch.Tensor, cap: float) -> torch.Tensor:
    """The rule, written as the sequential loop it is."""
    out = torch.zeros_like(want)
    for b in range(want.size(0)):
        count = 0
        for t in range(want.size(1)):
            if want[b, t] and count + 1 <= cap * (t + 1) + 1e-9:
                out[b, t] = True
                count += 1
    return out


@pytest.mark.parametrize("cap", [0.05, 0.2, 0.25, 0.3, 0.5, 0.7, 1.0])
def test_causal_cap_is_the_greedy_prefix_rule(cap: float) -> None:
    gen = torch.Generator().manual_seed(3)
    want = torch.cat([torch.rand(4, 300, generator=gen) < p for p in (0.05, 0.3, 0.6, 1.0)])
    got = causal_cap(want, cap)
    assert torch.equal(got, reference_cap(want, cap))
    assert not (got & ~want).any()
    limit = cap * torch.arange(1, want.size(1) + 1, dtype=torch.float64) + 1e-9
    assert (got.long().cumsum(1) <= limit).all()


@pytest.mark.parametrize("signal", ["entropy", "stride", "random"])
def test_model_never_exceeds_the_cap_at_any_prefix(signal: str) -> None:
    for cap in (0.1, 0.25, 0.6):
        config = small(refine_passes=1, signal=signal, refine_cap=cap, refine_target=cap)
        model = build(config).eval()
        for seed in range(3):
            idx = tokens(config, batch=4, seed=seed)
            set_low_threshold(model, idx, quantile=0.0)
            refined = model(idx).refined
            assert refined is not None and refined.any()
            limit = cap * torch.arange(1, config.seq_len + 1, dtype=torch.float64) + 1e-9
            assert (refined.long().cumsum(1) <= limit).all()


# ----------------------------------------------------------------- refinement semantics


@pytest.mark.parametrize(
    ("n_prelude", "n_coda", "refine_passes", "seq_len", "phase"),
    [(0, 0, 1, 48, "none"), (1, 1, 1, 48, "scale"), (1, 2, 2, 48, "lora"), (0, 1, 1, 150, "embed"),
     (0, 0, 2, 1024, "none")],
)
def test_uniform_equals_a_dense_forward_with_more_passes(
    n_prelude: int, n_coda: int, refine_passes: int, seq_len: int, phase: str
) -> None:
    """`uniform` refines every token (whatever the cap): exactly n_passes + refine_passes core passes."""
    config = small(n_prelude=n_prelude, n_coda=n_coda, refine_passes=refine_passes, seq_len=seq_len, phase=phase)
    config = dataclasses.replace(config, signal="uniform", refine_target=0.1, refine_cap=0.2)
    model = build(config).eval()
    reference = RecurrentLM(dataclasses.replace(config, n_passes=config.n_passes + refine_passes, refine_passes=0))
    reference.double().eval()
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if k != "router_threshold"})
    idx = tokens(config, batch=2 if seq_len > 500 else 3)
    out, expect = model(idx, idx), reference(idx, idx)
    assert out.refined is not None and out.refined.all() and out.stats.refined_fraction == 1.0
    torch.testing.assert_close(out.logits, expect.logits, atol=1e-10, rtol=0)
    assert out.base_loss is not None and out.loss is not None and abs(out.base_loss.item() - out.loss.item()) > 1e-6


@pytest.mark.parametrize("signal", ["entropy", "random"])
def test_chunked_refined_attention_equals_one_chunk(signal: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refined queries are cut into chunks that read fewer keys; that must change nothing."""
    config = small(seq_len=200, n_coda=1, refine_passes=1, signal=signal, refine_cap=0.6, refine_target=0.5)
    model = build(config).eval()
    idx = tokens(config, batch=4)
    set_low_threshold(model, idx, quantile=0.5)
    model.restart_draws()
    chunked = model(idx)
    assert chunked.refined is not None
    assert chunked.refined.sum(1).max() > selection_module.QUERY_CHUNK  # two chunks or more
    monkeypatch.setattr(selection_module, "QUERY_CHUNK", 10_000)
    model.restart_draws()
    whole = model(idx)
    assert whole.refined is not None and torch.equal(whole.refined, chunked.refined)
    torch.testing.assert_close(chunked.logits, whole.logits, atol=1e-10, rtol=0)


def test_refinement_runs_only_on_selected_tokens() -> None:
    """MLP rows processed, stats and analytic FLOPs all scale with the refined fraction."""
    rows: dict[str, int] = {}

    def counter(key: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: object, output: torch.Tensor) -> None:
            rows[key] += output.shape[:-1].numel()

        return hook

    fractions = []
    for cap in (0.1, 0.25, 0.5):
        config = small(n_coda=1, refine_passes=2, signal="stride", refine_target=cap, refine_cap=cap)
        model = build(config).eval()
        rows.update(core=0, coda=0)
        model.core[0].mlp.fc.register_forward_hook(counter("core"))
        model.coda[0].mlp.fc.register_forward_hook(counter("coda"))
        idx = tokens(config, batch=4)
        out = model(idx)
        assert out.refined is not None
        n_tokens, n_sel = idx.numel(), int(out.refined.sum())
        assert n_sel <= cap * n_tokens
        assert rows["core"] == n_tokens * config.n_passes + n_sel * config.refine_passes
        assert rows["coda"] == n_tokens + n_sel
        fraction = n_sel / n_tokens
        assert out.stats.refined_fraction == pytest.approx(fraction)
        assert out.stats.block_applications_per_token == pytest.approx(
            config.n_blocks * config.n_passes + 1 + fraction * (config.n_blocks * 2 + 1)
        )
        extra = fraction * ((config.n_blocks * 2 + 1) * block_flops_per_token(config) + 2 * config.d_model * 64)
        assert out.stats.flops_per_token == pytest.approx(flops_per_token(config) + extra)
        assert out.stats.flops_per_token == pytest.approx(flops_per_token(config, fraction))
        fractions.append(fraction)
    assert fractions == sorted(fractions) and fractions[0] < 0.15


def test_flops_per_token_closed_form() -> None:
    c = preset("pg_baseline").model
    matmul = 2 * 1_835_008
    attention = 4 * 512 * (1024 + 1) / 2
    assert flops_per_token(c) == pytest.approx(9 * (matmul + attention) + 2 * 512 * 1024)
    looped = small(n_passes=3, n_prelude=1)
    assert flops_per_token(looped, looping=False) < flops_per_token(looped)
    assert flops_per_token(looped) - flops_per_token(looped, looping=False) == pytest.approx(
        2 * looped.n_blocks * block_flops_per_token(looped)
    )


def test_set_looping_runs_the_core_once_in_training_only() -> None:
    config = small(n_passes=3, n_prelude=1, n_coda=1, unet_skips=True, refine_passes=1, signal="stride",
                   refine_target=0.5)
    model = build(config).train()
    idx = tokens(config)
    looped = model(idx)
    model.set_looping(False)
    flat = model(idx)
    assert flat.stats.block_applications_per_token == pytest.approx(2 + config.n_blocks + 0.5 * (config.n_blocks + 1))
    assert looped.stats.block_applications_per_token - flat.stats.block_applications_per_token == pytest.approx(
        2 * config.n_blocks
    )
    assert flat.stats.flops_per_token == pytest.approx(flops_per_token(config, 0.5, looping=False))
    assert not torch.allclose(looped.logits, flat.logits)
    model.eval()  # eval always loops
    torch.testing.assert_close(model(idx).logits, looped.logits, atol=1e-10, rtol=0)


def test_threshold_tracks_training_and_freezes_in_eval() -> None:
    config = small(refine_passes=1, signal="entropy", refine_target=0.3, refine_cap=1.0)
    model = build(config)
    idx = tokens(config, batch=8)
    assert "router_threshold" in model.state_dict()
    assert math.isnan(model.router_threshold.item())
    model.train()
    for _ in range(40):  # the same batch: the EMA converges to its 70% score quantile
        out = model(idx)
    assert out.stats.refined_fraction == pytest.approx(0.3, abs=0.02)
    model.eval()
    before = model.router_threshold.clone()
    model(tokens(config, seed=9))
    assert torch.equal(model.router_threshold, before)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("phase", ["scale", "lora", "embed"])
def test_gradients_reach_refinement_and_every_pass(phase: str) -> None:
    """Index n_passes of the phase parameters is used only by the refinement pass."""
    config = small(phase=phase, refine_passes=1, signal="entropy", refine_cap=0.5, n_coda=1)
    model = build(config).train()
    idx = tokens(config)
    out = model(idx, idx.roll(-1, 1))
    assert out.loss is not None and out.refined is not None and out.refined.any()
    (out.loss + 0.5 * out.base_loss).backward()
    phase_params = {n: p for n, p in model.named_parameters() if n.startswith("phase.")}
    assert phase_params
    for name, p in phase_params.items():
        assert p.grad is not None, name
        for index in range(config.n_passes + config.refine_passes):
            assert p.grad[index].abs().sum() > 0, f"{name}[{index}] got no gradient"
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_loss_without_refinement_is_base_loss() -> None:
    config = small()
    model = build(config)
    idx = tokens(config)
    out = model(idx, idx, return_token_ce=True)
    assert out.base_loss is out.loss and out.router_score is None and out.refined is None
    assert out.token_ce is not None and out.token_ce.shape == idx.shape
    assert out.loss is not None and out.loss.item() == pytest.approx(out.token_ce.mean().item())
    assert out.stats.refined_fraction == 0.0


# ------------------------------------------------------------------------------ learning


def _train_tiny(config: ModelConfig, train: torch.Tensor) -> tuple[float, RecurrentLM]:
    """150 AdamW steps on random windows; the trainer's objective, loss + aux_loss * base_loss."""
    torch.manual_seed(0)
    model = RecurrentLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    batch, seq = 16, config.seq_len
    start = time.perf_counter()
    for _step in range(150):
        at = torch.randint(0, len(train) - seq - 1, (batch,), generator=gen)
        rows = torch.stack([train[i : i + seq + 1] for i in at.tolist()])
        out = model(rows[:, :-1], rows[:, 1:])
        assert out.loss is not None and out.base_loss is not None
        opt.zero_grad(set_to_none=True)
        (out.loss + config.aux_loss * out.base_loss).backward()
        opt.step()
    seconds = time.perf_counter() - start
    return seconds, model


def test_tiny_model_learns_real_text(text_tokens: np.ndarray) -> None:
    """`tiny` with entropy-routed refinement, 150 AdamW steps: well below the unigram entropy."""
    ids = text_tokens
    split = int(0.9 * len(ids))
    train, val = torch.from_numpy(ids[:split]), torch.from_numpy(ids[split:])
    counts = np.bincount(ids[:split], minlength=1024).astype(np.float64) + 1e-9
    probs = counts / counts.sum()
    unigram = float(-(probs * np.log(probs)).sum())

    config = dataclasses.replace(preset("tiny").model, refine_passes=1, signal="entropy", aux_loss=0.3)
    seconds, model = _train_tiny(config, train)
    model.eval()
    seq = config.seq_len
    windows = val[: (len(val) - 1) // seq * seq + 1]
    x, y = windows[:-1].view(-1, seq)[:32], windows[1:].view(-1, seq)[:32]
    with torch.no_grad():
        val_out = model(x, y)
    assert val_out.loss is not None and val_out.base_loss is not None
    val_loss = val_out.loss.item()
    print(f"unigram {unigram:.3f} nats, val {val_loss:.3f} (base {val_out.base_loss.item():.3f}), "
          f"refined {val_out.stats.refined_fraction:.2f}, {seconds:.1f}s")
    assert val_loss < unigram - 0.75
    assert 0 < val_out.stats.refined_fraction <= config.refine_cap

"""Routed refinement against a dense oracle, on randomized shapes and selections.

The model refines only the selected tokens: it gathers them, runs the core in padded,
chunked attention calls that read a prefix of the key table, and scatters the result
back. The oracle is the definition, written densely: run the refinement passes (and the
coda) over every position, where the query at t attends to positions <= t whose K/V are
freshly computed at selected positions and the last base pass's elsewhere; then keep the
refined logits at the selected positions only. Both run in float64 and must agree to 1e-9.
So must the padded layout a compiled forward uses (every row padded to a capacity rung,
the pad slots masked): each case checks both layouts.

Selections are drawn with any density and any imbalance between rows (rows that select
early and many against rows that select late and few make the per-chunk key counts
non-monotone, the shape of a crash this suite guards).

    python -m pytest tests/trial/test_refine_oracle.py
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from loopgolf.trial import selection
from loopgolf.trial.blocks import NO_COND, Block, rope_tables
from loopgolf.trial.config import ModelConfig
from loopgolf.trial.model import RecurrentLM
from loopgolf.trial.selection import (
    PaddedSelection,
    RecordKV,
    Selection,
    capacity_ladder,
    causal_attend,
    rung_for,
)
from tests.trial.makers import build

TOLERANCE = 1e-9


# ------------------------------------------------------------------------------- oracle


def _mixed(cache: RecordKV, mask: Tensor) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """Dense causal attention whose K/V are fresh at selected positions, cached elsewhere."""

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        keep = mask[:, :, None, None]
        return causal_attend(q, torch.where(keep, k, cache.k), torch.where(keep, v, cache.v))

    return attend


def _pass_part(model: RecurrentLM, p: int | None, j: int) -> torch.nn.Module | None:
    """Partial sharing, by definition: pass p >= 1 of core block j uses its own untied attention
    or MLP; pass 0 (and everything under share all) the block's own."""
    if p is None or p == 0 or model.config.share == "all":
        return None
    return model.untied[f"pass{p}"][j]


def dense_refined_logits(model: RecurrentLM, idx: Tensor, mask: Tensor, fresh: Tensor | None = None) -> Tensor:
    """The refined forward's logits by definition: every position computed, selected ones kept.

    `fresh` (default: the selection) marks the positions whose refined K/V the others see.
    """
    c = model.config
    fresh = mask if fresh is None else fresh
    x0 = F.rms_norm(model.tok_emb(idx), (c.d_model,))
    cos, sin = rope_tables(idx.size(1), c.head_dim, c.rope_base, x0)
    # The base forward as a list of layers, with the baseline's U-Net skips over it.
    layers: list[tuple[Block, int | None, int]] = [(b, None, 0) for b in model.prelude]
    layers += [(b, p, j) for p in range(c.n_passes) for j, b in enumerate(model.core)]
    layers += [(b, None, 0) for b in model.coda]
    n_enc = len(layers) // 2 if model.skip_weights is not None else 0
    first_coda = len(layers) - c.n_coda
    last_pass = c.n_prelude + c.n_blocks * (c.n_passes - 1)
    stack: list[Tensor] = []
    caches: dict[int, RecordKV] = {}
    coda_addends: list[Tensor | None] = []
    x = x0
    for i, (block, p, j) in enumerate(layers):
        addend = None
        if model.skip_weights is not None and i >= n_enc and stack:
            addend = model.skip_weights[i - n_enc] * stack.pop()
            x = x + addend
        if i >= first_coda:
            coda_addends.append(addend)
        if p is not None and j == 0:
            x = model.phase.start(x, p)
        attend = caches.setdefault(i, RecordKV()) if i >= last_pass else causal_attend
        x = block(x, x0, cos, sin, attend, model.phase.cond(p, j) if p is not None else NO_COND,
                  _pass_part(model, p, j))
        if i < n_enc:
            stack.append(x)
        if i == first_coda - 1:
            h = x  # the residual leaving the last core pass
    base_logits = model._logits(x)
    for r in range(c.refine_passes):
        p = c.n_passes + r
        h = model.phase.start(h, p)
        for j, block in enumerate(model.core):
            # a refinement pass reuses the last base pass's untied parts (refinement stores no weights)
            own = _pass_part(model, c.n_passes - 1, j)
            h = block(h, x0, cos, sin, _mixed(caches[last_pass + j], fresh), model.phase.cond(p, j), own)
    for i, block in enumerate(model.coda):
        if coda_addends[i] is not None:
            h = h + coda_addends[i]
        h = block(h, x0, cos, sin, _mixed(caches[first_coda + i], fresh))
    return torch.where(mask[..., None], model._logits(h), base_logits)


# ------------------------------------------------------------------------------- cases


def row_masks(batch: int, seq_len: int, rows: list[tuple[float, float, float]], seed: int) -> Tensor:
    """Per row: i.i.d. selection at `density` inside the window [lo, hi) of the sequence."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    for b in range(batch):
        density, lo, hi = rows[b % len(rows)]
        start, end = int(lo * seq_len), max(int(lo * seq_len) + 1, int(hi * seq_len))
        mask[b, start:end] = torch.rand(end - start, generator=gen) < density
    return mask


def check(config: ModelConfig, mask: Tensor, seed: int = 0, capacity: int | None = None) -> None:
    """Both layouts equal the oracle: gathered (exact sizes) and padded (the compiled one, at
    the ladder's rung for this mask, or at `capacity`)."""
    model = build(config, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    idx = torch.randint(0, config.vocab_size, mask.shape, generator=gen)
    with torch.no_grad():
        expect = dense_refined_logits(model, idx, mask)
        model.padded_refinement = False
        base = model(idx, refine_mask=torch.zeros_like(mask)).logits
    for padded in (False, True):
        model.padded_refinement, model.capacity_override = padded, capacity if padded else None
        with torch.no_grad():
            got = model(idx, refine_mask=mask)
        assert got.refined is not None and torch.equal(got.refined, mask)
        diff = (got.logits - expect).abs().max().item()
        assert diff <= TOLERANCE, f"padded={padded}: max |dlogit| = {diff:.3g} > {TOLERANCE}"
        assert got.stats.refined_fraction == pytest.approx(int(mask.sum()) / mask.numel(), rel=1e-6)
        if mask.any():  # the oracle is not vacuous: refinement changed the selected logits
            assert (got.logits - base)[mask].abs().max() > 1e-6
        assert torch.equal(got.logits[~mask], base[~mask])  # the rest, padding included, untouched


def tiny(**overrides: object) -> ModelConfig:
    base: dict[str, object] = dict(vocab_size=48, d_model=16, n_heads=2, n_kv_heads=1, n_blocks=1, n_passes=1,
                                   refine_passes=1, signal="uniform", refine_cap=1.0)
    return ModelConfig(**{**base, **overrides})  # type: ignore[arg-type]


def test_issue_reproduction_nonmonotone_chunk_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Row 0 selects every other position of 0..138, row 1 every fifth of 200..249 (T=256),
    cut into chunks of 64 queries as when the issue was filed."""
    monkeypatch.setattr(selection, "QUERY_CHUNK", 64)
    mask = torch.zeros(2, 256, dtype=torch.bool)
    mask[0, 0:139:2] = True
    mask[1, 200:250:5] = True
    chunks = Selection.from_mask(mask).chunks
    assert chunks == [(0, 64, 246), (64, 70, 139)]  # the key count falls from chunk 0 to chunk 1
    check(tiny(seq_len=256, d_model=32, n_heads=4, n_kv_heads=2, n_coda=1), mask)


rows_strategy = st.lists(
    st.tuples(
        st.sampled_from([0.0, 0.02, 0.1, 0.3, 0.5, 0.9, 1.0]),  # density
        st.floats(0.0, 0.9),  # window start, as a fraction of T
        st.floats(0.1, 1.0),  # window end
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
    batch=st.integers(1, 8),
    seq_len=st.sampled_from([1, 2, 7, 63, 64, 65, 129, 200, 256, 511, 1024]),
    heads=st.sampled_from([(2, 2), (2, 1), (4, 2), (4, 1)]),  # MHA and GQA
    n_prelude=st.integers(0, 1),
    n_blocks=st.integers(1, 2),
    n_passes=st.integers(1, 2),
    n_coda=st.integers(0, 2),
    unet_skips=st.booleans(),
    phase=st.sampled_from(["none", "scale", "lora", "embed"]),
    refine_passes=st.integers(1, 2),
    share=st.sampled_from(["all", "attn", "mlp"]),
    rows=rows_strategy,
    seed=st.integers(0, 2**16),
)
def test_gathered_refinement_equals_the_dense_oracle(
    batch: int, seq_len: int, heads: tuple[int, int], n_prelude: int, n_blocks: int, n_passes: int, n_coda: int,
    unet_skips: bool, phase: str, refine_passes: int, share: str, rows: list[tuple[float, float, float]], seed: int,
) -> None:
    config = tiny(
        seq_len=seq_len, n_heads=heads[0], n_kv_heads=heads[1], n_prelude=n_prelude, n_blocks=n_blocks,
        n_passes=n_passes, n_coda=n_coda, unet_skips=unet_skips, phase=phase, refine_passes=refine_passes,
        lora_rank=2, share=share,
    )
    check(config, row_masks(batch, seq_len, [(d, min(lo, hi), max(lo, hi)) for d, lo, hi in rows], seed), seed)


@pytest.mark.parametrize("share", ["attn", "mlp"])
def test_each_partial_sharing_mode_equals_the_dense_oracle(share: str) -> None:
    """Three passes, two blocks, two refinement passes: every untied part is used, and the
    refinement passes must take the last base pass's (the oracle's definition)."""
    config = tiny(seq_len=65, n_heads=4, n_kv_heads=2, n_blocks=2, n_passes=3, n_coda=1, refine_passes=2,
                  phase="lora", lora_rank=2, share=share)  # fmt: skip
    check(config, row_masks(3, 65, [(0.3, 0.0, 1.0), (0.9, 0.5, 1.0), (0.05, 0.0, 0.4)], seed=5))


def test_largest_shape_with_imbalanced_rows() -> None:
    """B=8, T=1024: dense early rows against sparse late rows, GQA, prelude, coda, skips."""
    config = tiny(seq_len=1024, n_heads=4, n_kv_heads=2, n_prelude=1, n_coda=1, unet_skips=True, phase="scale")
    rows = [(0.6, 0.0, 0.3), (0.05, 0.8, 1.0), (1.0, 0.0, 0.1), (0.01, 0.0, 1.0)]
    check(config, row_masks(8, 1024, rows, seed=3))


@pytest.mark.parametrize(
    ("overrides", "softcap"),
    [
        (dict(seq_len=200, n_heads=4, n_kv_heads=2, n_coda=1, unet_skips=True, phase="lora", lora_rank=2), 30.0),
        (dict(seq_len=130, n_prelude=1, n_passes=2, refine_passes=2, phase="scale"), 0.0),
    ],
)
def test_training_gradients_equal_the_dense_oracles(overrides: dict[str, object], softcap: float) -> None:
    """Training through the gathered layout (refined CE only on refined tokens, logits written
    into the base ones, K/V tables copied while autograd records) gives the gradients of the
    oracle's losses: CE of the dense refined logits + aux x CE of the base logits."""
    config = tiny(**overrides, logit_softcap=softcap)
    model = build(config, seed=5).train()
    model.padded_refinement = False
    mask = row_masks(3, config.seq_len, [(0.6, 0.0, 0.5), (0.1, 0.3, 1.0), (0.3, 0.0, 1.0)], seed=7)
    gen = torch.Generator().manual_seed(8)
    idx, tgt = (torch.randint(0, config.vocab_size, mask.shape, generator=gen) for _ in range(2))

    def grads(loss: Tensor) -> list[Tensor]:
        model.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]

    out = model(idx, tgt, refine_mask=mask)
    assert out.loss is not None and out.base_loss is not None
    got = grads(out.loss + 0.5 * out.base_loss)
    expect_logits = dense_refined_logits(model, idx, mask)
    base_logits = model(idx, refine_mask=torch.zeros_like(mask)).logits
    ce = F.cross_entropy(expect_logits.flatten(0, 1), tgt.flatten())
    torch.testing.assert_close(out.loss, ce, atol=TOLERANCE, rtol=0)
    expect = grads(ce + 0.5 * F.cross_entropy(base_logits.flatten(0, 1), tgt.flatten()))
    assert sum(int(g.abs().sum() > 0) for g in got) == len(got)  # every parameter is in the comparison
    for (name, _), g, e in zip(model.named_parameters(), got, expect, strict=True):
        torch.testing.assert_close(g, e, atol=TOLERANCE, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_oracle_sees_stale_keys() -> None:
    """The comparison is sharp: refined queries that read only the base pass's K/V are far off."""
    config = tiny(seq_len=64, n_coda=1)
    model = build(config).eval()
    mask = row_masks(2, 64, [(0.5, 0.0, 1.0)], seed=0)
    idx = torch.randint(0, config.vocab_size, mask.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(idx, refine_mask=mask).logits
        stale = dense_refined_logits(model, idx, mask, fresh=torch.zeros_like(mask))
    assert (got - stale).abs().max() > 1e-6


def test_padding_far_beyond_the_selection_changes_nothing() -> None:
    """A few selected tokens padded to capacity T: the pad slots (position 0) leave every result alone,
    including position 0 itself when a row selects it."""
    config = tiny(seq_len=96, n_heads=4, n_kv_heads=2, n_coda=1, unet_skips=True, phase="lora", lora_rank=2)
    mask = torch.zeros(3, 96, dtype=torch.bool)
    mask[0, [0, 5, 95]] = True
    mask[1, 40] = True  # row 2 selects nothing: all padding
    check(config, mask, capacity=96)


def test_padded_layout_holds_each_rows_selection_in_order() -> None:
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, [1, 4, 9]] = True
    mask[1, [0]] = True
    sel = PaddedSelection.from_mask(mask, 4)
    assert sel.slot_pos.tolist() == [[1, 4, 9, 0], [0, 0, 0, 0]]
    assert sel.scatter_at.tolist() == [[1, 4, 9, 10], [0, 10, 10, 10]]  # padding writes to the dump column


def test_capacity_ladder_is_bounded_and_ascending() -> None:
    assert capacity_ladder(512) == (184, 256, 368, 512)  # 512 / sqrt(2)^i rounded up to multiples of 8
    assert capacity_ladder(64) == (24, 32, 48, 64)
    assert capacity_ladder(5) == (5,) and capacity_ladder(0) == (1,)
    assert rung_for(0, (24, 32)) == 24 and rung_for(25, (24, 32)) == 32 and rung_for(32, (24, 32)) == 32
    with pytest.raises(ValueError, match="exceed the largest capacity 32"):
        rung_for(33, (24, 32))

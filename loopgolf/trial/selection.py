"""Attention for the tokens a refinement pass runs on, in two layouts.

A refinement pass runs the core (and the coda) again on the selected tokens only. Each
selected query attends to every position <= its own in its row: selected positions offer
their fresh K/V, the others the K/V the same block computed in the last base pass
(`RecordKV` keeps those). Two layouts hold the selected tokens:

    Selection / SelectedAttend          exact sizes: the n selected tokens flattened for
                                        linears, a per-row padded layout cut into query
                                        chunks for attention (eager runs, evaluation)
    PaddedSelection / PaddedAttend      a fixed (B, capacity) layout, capacity one of a few
                                        rungs (capacity_ladder): static shapes, for torch.compile

Both must equal the dense definition (tests/trial/test_refine_oracle.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# An attention strategy maps q (..., heads, hd) and k, v (..., kv_heads, hd) to (..., heads, hd).
# The block does not know which tokens it runs on; the strategy decides which keys each query sees.
Attend = Callable[[Tensor, Tensor, Tensor], Tensor]


def causal_attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Full sequences (B, T, heads, hd): every position attends to positions <= itself."""
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=q.size(-2) != k.size(-2)
    )
    return y.transpose(1, 2)


class RecordKV:
    """Causal attention that also keeps the K/V it used: the refinement pass reuses them."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self.k, self.v = k, v
        return causal_attend(q, k, v)


QUERY_CHUNK = 32  # refined query slots per attention call (see Selection); 32 measured best on CPU at T=1024


@dataclasses.dataclass
class Selection:
    """The refined tokens of a (B, T) mask, flattened row-major, plus a padded per-row layout.

    Linears and MLPs run on the n flat rows. Attention runs per batch row on a padded
    (B, n_max) layout: slot s of row b holds that row's s-th selected position (padding
    slots hold position 0 and are dropped afterwards). Slots ascend in position, so the
    slots are cut into chunks of QUERY_CHUNK and each chunk only reads keys up to its
    last position: the refined attention keeps most of the causal saving instead of
    scoring every query against all T keys.

    Moves between layouts are row copies through flat indices (index_select, index_copy_
    on (B * T, ...) or (B * n_max, ...) views): one batched copy, no per-element indexing.
    """

    rows: Tensor  # (n,) batch row of each selected token
    pos: Tensor  # (n,) its position, ascending within a row
    flat: Tensor  # (n,) its row in a (B * T, ...) view: rows * T + pos
    slot_index: Tensor  # (n,) its row in the padded (B * n_max, ...) layout: rows * n_max + rank in its row
    slot_pos: Tensor  # (B, n_max) position held by each slot
    chunks: list[tuple[int, int, int]]  # (first slot, end slot, keys read) per attention call
    n_keys: int  # keys the K/V table must hold: one past the last selected position of any row
    _masks: dict[torch.dtype, list[Tensor]] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_mask(cls, mask: Tensor) -> Selection:
        batch, seq_len = mask.shape
        rows, pos = mask.nonzero(as_tuple=True)
        slots = (mask.long().cumsum(1) - 1)[rows, pos]
        n_max = int(mask.sum(1).max()) if rows.numel() else 0
        slot_index = rows * n_max + slots
        slot_pos = torch.zeros(batch * n_max, dtype=torch.long, device=mask.device).index_copy_(0, slot_index, pos)
        slot_pos = slot_pos.view(batch, n_max)
        n_chunks = -(-n_max // QUERY_CHUNK)
        by_chunk = F.pad(slot_pos, (0, n_chunks * QUERY_CHUNK - n_max)).view(batch, n_chunks, QUERY_CHUNK)
        n_keys = (by_chunk.amax(dim=(0, 2)) + 1).tolist()  # one host sync per forward, not per block
        chunks = [(i * QUERY_CHUNK, min((i + 1) * QUERY_CHUNK, n_max), k) for i, k in enumerate(n_keys)]
        # Key counts are not monotone over chunks: a row with few, late selections puts its
        # last position in an early chunk. The table is sized by the largest.
        return cls(rows, pos, rows * seq_len + pos, slot_index, slot_pos, chunks, max(n_keys, default=0))

    @property
    def n(self) -> int:
        return int(self.rows.numel())

    def gather(self, x: Tensor) -> Tensor:
        """The selected tokens' rows of a (B, T, ...) tensor: (n, ...)."""
        return x.flatten(0, 1).index_select(0, self.flat)

    def at_positions(self, table: Tensor) -> Tensor:
        """The selected tokens' rows of a per-position (T, ...) table: (n, ...)."""
        return table.index_select(0, self.pos)

    def attend(self, cache: RecordKV) -> Attend:
        return SelectedAttend(cache, self)

    def scatter(self, into: Tensor, values: Tensor) -> Tensor:
        """`into` (B, T, ...) with the selected tokens' rows replaced by `values` (n, ...)."""
        return into.flatten(0, 1).index_copy(0, self.flat, values.to(into.dtype)).view_as(into)

    def scatter_(self, into: Tensor, values: Tensor) -> Tensor:
        """`scatter` written into `into` itself (contiguous; no copy of it); returns `into`."""
        into.view(-1, *into.shape[2:]).index_copy_(0, self.flat, values.to(into.dtype))
        return into

    def key_table(self, cache: Tensor, fresh: Tensor) -> Tensor:
        """The first n_keys positions of a (B, T, kv_heads, hd) K or V cache, the selected
        tokens' rows replaced by `fresh` (n, kv_heads, hd).

        Written into the cache while autograd records nothing: refinement is the cache's
        last reader, and each refinement pass rewrites the same positions before reading.
        While recording, the base pass's attention saved the cache for backward: a copy.
        """
        if torch.is_grad_enabled():
            return cache[:, : self.n_keys].index_put((self.rows, self.pos), fresh)
        return self.scatter_(cache, fresh)[:, : self.n_keys]

    def pad(self, x: Tensor) -> Tensor:
        """(n, ...) rows -> the padded (B, n_max, ...) layout, zeros in the padding slots."""
        batch, n_max = self.slot_pos.shape
        return x.new_zeros(batch * n_max, *x.shape[1:]).index_copy_(0, self.slot_index, x).unflatten(0, (batch, n_max))

    def unpad(self, x: Tensor) -> Tensor:
        """The padded (B, n_max, ...) layout -> the n selected rows."""
        return x.flatten(0, 1).index_select(0, self.slot_index)

    def masks(self, dtype: torch.dtype) -> list[Tensor]:
        """Additive attention masks per chunk, (B, 1, chunk, keys): 0 where key <= query, else -inf."""
        if dtype not in self._masks:
            masks = []
            for first, end, n_keys in self.chunks:
                allowed = torch.arange(n_keys, device=self.slot_pos.device) <= self.slot_pos[:, first:end, None]
                zero = torch.zeros((), dtype=dtype, device=allowed.device)
                masks.append(torch.where(allowed, zero, -math.inf)[:, None])
            self._masks[dtype] = masks
        return self._masks[dtype]


class SelectedAttend:
    """Attention for the selected tokens only, with latest-step KV reuse (Huginn-style).

    A selected query attends to every position <= its own in its row: non-selected
    positions offer the K/V this block computed for them in the last base pass, selected
    positions their freshly computed K/V. Cost grows with the number selected, not with T.
    """

    def __init__(self, cache: RecordKV, sel: Selection) -> None:
        if cache.k is None or cache.v is None:
            raise RuntimeError("SelectedAttend: the base pass did not record this block's K/V")
        self.k_cache, self.v_cache, self.sel = cache.k, cache.v, sel

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        s = self.sel
        keys = s.key_table(self.k_cache, k).transpose(1, 2)  # (B, kv_heads, keys, hd)
        values = s.key_table(self.v_cache, v).transpose(1, 2)
        q_pad = s.pad(q).transpose(1, 2)  # (B, heads, n_max, hd)
        gqa = q.size(-2) != k.size(-2)
        # Each chunk's output, (B, heads, chunk, hd), is laid out (B, chunk, heads, hd) in
        # memory on CPU: joined along the slots in that layout, the join is a plain copy.
        y = torch.cat(
            [
                F.scaled_dot_product_attention(
                    q_pad[:, :, first:end], keys[:, :, :n], values[:, :, :n], attn_mask=mask, enable_gqa=gqa
                ).transpose(1, 2)
                for (first, end, n), mask in zip(s.chunks, s.masks(q.dtype), strict=True)
            ],
            dim=1,
        )
        return s.unpad(y)


CAPACITY_RUNGS = 4  # padded capacities per trial: the refinement graphs torch.compile builds
CAPACITY_RATIO = 2**-0.5  # each rung holds 1/sqrt(2) of the one above: at most 1.41x padding above the lowest
CAPACITY_QUANTUM = 8  # rungs are multiples of this (tensor-core friendly tiles)


def capacity_ladder(limit: int) -> tuple[int, ...]:
    """Per-row capacities a padded refinement may use, ascending: `limit` (the most a row can
    select), then limit/sqrt(2), limit/2, ... (CAPACITY_RUNGS in all), rounded up to a multiple
    of CAPACITY_QUANTUM, at least 1. A forward pads its rows to the smallest rung that holds
    its fullest row, so a trial compiles at most CAPACITY_RUNGS refinement graphs."""
    if limit < 0:
        raise ValueError(f"capacity_ladder: limit={limit}: expected a token count >= 0")
    # 1e-9: limit/2 must round to itself, not one quantum up from sqrt(2)**-2's float error
    rungs = {min(limit, math.ceil(limit * CAPACITY_RATIO**i / CAPACITY_QUANTUM - 1e-9) * CAPACITY_QUANTUM)
             for i in range(CAPACITY_RUNGS)}
    return tuple(sorted({max(1, r) for r in rungs}))


def rung_for(count: int, ladder: tuple[int, ...]) -> int:
    """The smallest rung holding `count` tokens per row."""
    for rung in ladder:
        if count <= rung:
            return rung
    raise ValueError(f"rung_for: {count} selected tokens in a row exceed the largest capacity {ladder[-1]}")


@dataclasses.dataclass
class PaddedSelection:
    """The refined tokens of a (B, T) mask in a fixed (B, capacity) layout: static shapes, so a
    compiled forward builds one graph per capacity and never a data-dependent one.

    Slot s of row b holds the row's s-th selected position. Slots past the row's count are
    padding: they hold position 0, read key 0 only (a softmax over nothing would be NaN),
    and are written back nowhere (their scatter index is a dump column T, cut off after),
    so they change no result and receive no gradient. Every query reads all T keys under a
    causal mask: the causal saving of the chunked Selection would need data-dependent shapes.
    """

    slot_pos: Tensor  # (B, K) position held by each slot; 0 for padding
    scatter_at: Tensor  # (B, K) where each slot writes back: its position, or T for padding
    seq_len: int

    @classmethod
    def from_mask(cls, mask: Tensor, capacity: int) -> PaddedSelection:
        """Rows' selected positions in ascending order; a row selecting more than `capacity`
        keeps its first `capacity` (a forward picks a capacity that holds every row)."""
        batch, seq_len = mask.shape
        rank = mask.long().cumsum(1) - 1
        kept = mask & (rank < capacity)
        slot = torch.where(kept, rank, capacity)  # the overflow slot `capacity` is cut off below
        pos = torch.arange(seq_len, device=mask.device).expand(batch, seq_len)
        slot_pos = torch.zeros(batch, capacity + 1, dtype=torch.long, device=mask.device).scatter(1, slot, pos)
        slot_pos = slot_pos[:, :capacity]
        valid = torch.arange(capacity, device=mask.device) < kept.sum(1, keepdim=True)
        return cls(torch.where(valid, slot_pos, 0), torch.where(valid, slot_pos, seq_len), seq_len)

    def gather(self, x: Tensor) -> Tensor:
        """(B, T, ...) -> the slots' (B, K, ...)."""
        index = self.slot_pos.view(*self.slot_pos.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])
        return x.gather(1, index)

    def at_positions(self, table: Tensor) -> Tensor:
        """A per-position (T, ...) table -> the slots' (B, K, ...)."""
        return table[self.slot_pos]

    def attend(self, cache: RecordKV) -> Attend:
        return PaddedAttend(cache, self)

    def scatter(self, into: Tensor, values: Tensor) -> Tensor:
        """`into` (B, T, ...) with each real slot's position replaced by its row of `values` (B, K, ...)."""
        index = self.scatter_at.view(*self.scatter_at.shape, *([1] * (into.ndim - 2))).expand_as(values)
        return torch.cat((into, into[:, :1]), dim=1).scatter(1, index, values.to(into.dtype))[:, : self.seq_len]

    def key_mask(self) -> Tensor:
        """(B, 1, K, T) bool: slot s may read key j iff j <= its position."""
        return (torch.arange(self.seq_len, device=self.slot_pos.device) <= self.slot_pos[..., None])[:, None]


class PaddedAttend:
    """SelectedAttend on a PaddedSelection: fresh K/V at the selected positions, the base
    pass's elsewhere; every slot reads the whole (causally masked) key table."""

    def __init__(self, cache: RecordKV, sel: PaddedSelection) -> None:
        if cache.k is None or cache.v is None:
            raise RuntimeError("PaddedAttend: the base pass did not record this block's K/V")
        self.k_cache, self.v_cache, self.sel = cache.k, cache.v, sel

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        keys = self.sel.scatter(self.k_cache, k).transpose(1, 2)  # (B, kv_heads, T, hd)
        values = self.sel.scatter(self.v_cache, v).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=self.sel.key_mask(), enable_gqa=q.size(-2) != k.size(-2)
        )
        return y.transpose(1, 2)

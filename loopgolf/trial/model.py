"""RecurrentLM: a few shared transformer blocks applied for several passes, plus an
extra pass spent only on the tokens a causal router selects.

    tokens -> embedding -> prelude -> core (n_blocks, looped n_passes) -> coda -> norm -> logits
                                             |                                        |
                                             +-- refinement: the core again (and the coda) on the
                                                 selected tokens only; their logits replace the base ones

The model follows the Parameter Golf baseline (train_gpt.py): its blocks (blocks.py), optional
U-Net skips, a tied and tanh-softcapped head.

The file reads top to bottom: what a forward returns and costs, the U-Net skips, then
RecurrentLM: the base forward, the router's score and threshold, refinement, the forward.
(blocks.py holds the blocks and the phase conditioning that lets pass p of the shared core
differ from pass q; routing.py the causal cap, the control arms' selections and the
threshold search; selection.py the layouts of the selected tokens and their attention;
flops.py the analytic cost, flops_per_token.)

Causality is absolute. Whether token t is refined, and its logits, depend only on tokens
<= t: scores at t come from the (causal) base pass at t, the threshold is fixed during a
forward, the cap is a running count over the prefix, and refined queries attend to keys
at positions <= their own. There is never a top-k over the sequence.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loopgolf.trial.blocks import Block, Phase, Untied, rms_norm, rope_tables, untied_parts
from loopgolf.trial.config import FIXED_SIGNALS, ModelConfig
from loopgolf.trial.flops import forward_flops
from loopgolf.trial.routing import CAP_EPSILON, causal_cap, random_scores, stride_mask
from loopgolf.trial.selection import (
    PaddedSelection,
    RecordKV,
    Selection,
    capacity_ladder,
    causal_attend,
    rung_for,
)

EMBED_INIT_STD = 0.005  # the baseline's tied-embedding init
THRESHOLD_MOMENTUM = 0.5  # EMA of the per-batch score quantile that sets the training threshold: short, since
# scores drift while a model trains (0.9 lagged so far that a 15-step `entropy` run refined 5%, not 25%)


@dataclasses.dataclass
class ForwardStats:
    """What one forward cost. The refined share stays on the device until a property reads it:
    a read syncs with the device, so a compiled training step reads it only when it logs."""

    config: ModelConfig
    passes: int  # core passes of the base path
    seq_len: int
    refined_share: Tensor | float  # fraction of tokens refined (0 without refinement); 0-d tensor or float

    @property
    def refined_fraction(self) -> float:
        return float(self.refined_share)

    @property
    def block_applications_per_token(self) -> float:
        """prelude + core * passes + coda, + refined blocks averaged over tokens."""
        c = self.config
        return c.n_prelude + c.n_blocks * self.passes + c.n_coda + self.refined_fraction * (
            c.n_blocks * c.refine_passes + c.n_coda
        )

    @property
    def flops_per_token(self) -> float:
        """Analytic forward FLOPs per token of this forward (see flops.flops_per_token)."""
        return forward_flops(self.config, self.refined_fraction, self.passes, self.seq_len)


@dataclasses.dataclass
class ModelOutput:
    logits: Tensor  # (B, T, V) final logits, after refinement
    loss: Tensor | None  # mean CE (nats) of the final logits; None without targets
    base_loss: Tensor | None  # mean CE of the base-pass logits; the same tensor as loss without refinement
    token_ce: Tensor | None  # (B, T) per-token CE of the final logits, only with return_token_ce
    base_token_ce: Tensor | None  # (B, T) per-token CE of the base logits, only with return_token_ce
    router_score: Tensor | None  # (B, T) router score; None when refine_passes == 0
    refined: Tensor | None  # (B, T) bool mask of refined tokens; None when refine_passes == 0
    stats: ForwardStats


class _UNet:
    """The baseline's encoder/decoder skips over the virtual layer list of one base forward.

    The first floor(L/2) layers push their outputs; each later layer first adds
    skip_weights[k] * (the most recent unpopped output). The addend each layer received
    is kept so the refinement pass can give the coda the same skips.
    """

    def __init__(self, weights: Tensor | None, n_layers: int) -> None:
        self.weights, self.n_enc = weights, (n_layers // 2 if weights is not None else 0)
        self.stack: list[Tensor] = []
        self.addends: list[Tensor | None] = []

    def __call__(self, block: Block, x: Tensor, *args: object) -> Tensor:
        layer, addend = len(self.addends), None
        if self.weights is not None and layer >= self.n_enc and self.stack:
            addend = self.weights[layer - self.n_enc].to(x.dtype) * self.stack.pop()
            x = x + addend
        self.addends.append(addend)
        x = block(x, *args)
        if layer < self.n_enc:
            self.stack.append(x)
        return x


@dataclasses.dataclass
class _BasePass:
    logits: Tensor  # (B, T, V)
    h_prev: Tensor  # (B, T, d) residual entering the last core pass
    h_last: Tensor  # (B, T, d) residual leaving it
    core_kv: list[RecordKV]  # K/V of each core block in the last pass (empty without refinement)
    coda_kv: list[RecordKV]
    coda_skips: list[Tensor | None]  # U-Net addend each coda block received


class RecurrentLM(nn.Module):
    """prelude -> core (n_blocks, looped n_passes) -> coda -> head, with routed refinement."""

    router_threshold: Tensor

    def __init__(self, config: ModelConfig, router_seed: int = 0) -> None:
        """`router_seed`: the `random` signal's stream (the trial seed), so its draws replay."""
        super().__init__()
        c = self.config = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        nn.init.normal_(self.tok_emb.weight, std=EMBED_INIT_STD)
        self.prelude = nn.ModuleList(Block(c) for _ in range(c.n_prelude))
        self.core = nn.ModuleList(Block(c) for _ in range(c.n_blocks))
        self.coda = nn.ModuleList(Block(c) for _ in range(c.n_coda))
        self.untied = untied_parts(c)
        n_skips = c.effective_depth // 2 if c.unet_skips else 0  # min(encoder, decoder) layers
        self.skip_weights = nn.Parameter(torch.ones(n_skips, c.d_model)) if n_skips else None
        self.phase = Phase(c)
        self.lm_head: nn.Linear | None = None
        if not c.tie_embeddings:
            self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
            nn.init.zeros_(self.lm_head.weight)  # the baseline zero-inits an untied head
        if c.refine_passes:
            # NaN = no threshold yet (training tracks one, calibrate.py sets it): until then
            # every token passes and only the cap limits.
            self.register_buffer("router_threshold", torch.tensor(float("nan")))
        self.looping = True
        self.threshold_frozen = False  # True: training forwards leave router_threshold alone
        self.router_seed = router_seed
        self.train_draws = 0  # `random` draws made by training forwards (a resumed trial restores it)
        self.eval_draws = 0  # draws made by evaluation forwards since restart_draws()
        self._rope_cache: dict[tuple[int, torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}
        # Refined tokens in a fixed (B, capacity) layout: None = when torch.compile traces the
        # forward (static shapes), eager runs use the exact-size gathered layout.
        self.padded_refinement: bool | None = None
        self.capacity_override: int | None = None  # priming: compile this rung whatever the selection

    # ---- bookkeeping

    def set_looping(self, active: bool) -> None:
        """loop_start: before it training runs the core once; after it, n_passes times."""
        self.looping = bool(active)

    @property
    def n_passes_used(self) -> int:
        """Core passes of the base path: n_passes, except in training before loop_start. Eval always loops."""
        return self.config.n_passes if self.looping or not self.training else 1

    def unique_params(self) -> int:
        """Parameters stored: shared blocks counted once."""
        return sum(p.numel() for p in self.parameters())

    def effective_params(self) -> int:
        """Parameters of the unrolled base path: what the passes share counted n_passes times
        (each pass's untied parts are already counted once, as stored)."""
        core = sum(p.numel() for p in self.core.parameters())
        if len(self.untied):  # pass 0's own parts are in the core blocks; they are not shared
            kind = "mlp" if self.config.share == "attn" else "attn"
            core -= sum(p.numel() for block in self.core for p in getattr(block, kind).parameters())
        return self.unique_params() + (self.config.n_passes - 1) * core

    def own_parts(self, p: int, j: int) -> Untied | None:
        """Core block j's untied part in pass p (None: the block's own, as in pass 0 and share all).
        A refinement pass (p >= n_passes) uses the last base pass's: refinement stores nothing."""
        if not len(self.untied):
            return None
        p = min(p, self.n_passes_used - 1)
        return self.untied[f"pass{p}"][j] if p >= 1 else None

    def _rope(self, seq_len: int, like: Tensor) -> tuple[Tensor, Tensor]:
        if torch.compiler.is_compiling():  # in the graph: a cache filled while tracing would recompile
            return rope_tables(seq_len, self.config.head_dim, self.config.rope_base, like)
        key = (seq_len, like.device, like.dtype)
        cached = self._rope_cache.get(key)
        # Tables made under inference_mode (an evaluation) cannot enter autograd: remake them.
        if cached is None or (cached[0].is_inference() and not torch.is_inference_mode_enabled()):
            self._rope_cache[key] = rope_tables(seq_len, self.config.head_dim, self.config.rope_base, like)
        return self._rope_cache[key]

    def _logits(self, h: Tensor) -> Tensor:
        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(rms_norm(h), weight.to(h.dtype))
        if self.config.logit_softcap > 0:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits

    # ---- the base forward

    def _base_pass(self, x0: Tensor, cos: Tensor, sin: Tensor, record_kv: bool) -> _BasePass:
        c, passes = self.config, self.n_passes_used
        unet = _UNet(self.skip_weights, c.n_prelude + c.n_blocks * passes + c.n_coda)
        x = x0
        for block in self.prelude:
            x = unet(block, x, x0, cos, sin, causal_attend)
        core_kv = [RecordKV() for _ in self.core] if record_kv else []
        h_prev = x  # the residual entering the last pass (the core input when passes == 1)
        for p in range(passes):
            h_prev = x
            x = self.phase.start(x, p)
            for j, block in enumerate(self.core):
                attend = core_kv[j] if core_kv and p == passes - 1 else causal_attend
                x = unet(block, x, x0, cos, sin, attend, self.phase.cond(p, j), self.own_parts(p, j))
        h_last = x
        coda_kv = [RecordKV() for _ in self.coda] if record_kv else []
        for i, block in enumerate(self.coda):
            x = unet(block, x, x0, cos, sin, coda_kv[i] if coda_kv else causal_attend)
        coda_skips = unet.addends[len(unet.addends) - c.n_coda :]
        return _BasePass(self._logits(x), h_prev, h_last, core_kv, coda_kv, coda_skips)

    # ---- routing

    @torch.no_grad()
    def _router_score(self, base: _BasePass) -> Tensor:
        """Per-token score from the base pass; high = refine. Each depends on its own position only."""
        signal = self.config.signal
        if signal in ("entropy", "margin"):
            logp = F.log_softmax(base.logits, dim=-1)
            if signal == "entropy":
                return -(logp.exp() * logp).sum(-1)
            top2 = logp.exp().topk(2, dim=-1).values
            return top2[..., 1] - top2[..., 0]  # -(p1 - p2): a small margin is uncertain
        if signal == "resid_norm":
            change = (base.h_last - base.h_prev).norm(dim=-1)
            return (change / base.h_prev.norm(dim=-1).clamp_min(1e-12)).to(base.logits.dtype)
        if signal == "kl":  # KL(p_P || p_{P-1}) between the last two core passes, both read by norm+head
            last = base.logits if not self.coda else self._logits(base.h_last)
            logp, logq = F.log_softmax(last, dim=-1), F.log_softmax(self._logits(base.h_prev), dim=-1)
            return (logp.exp() * (logp - logq)).sum(-1)
        shape, device = base.logits.shape[:2], base.logits.device
        if signal == "uniform":
            return torch.ones(shape, device=device)
        if signal == "stride":
            return stride_mask(shape, self.config.refine_target, device).to(base.logits.dtype)
        return self._random_scores(shape, device)

    @torch.compiler.disable  # host-side draw counting: traced, it would recompile every forward
    def _random_scores(self, shape: tuple[int, int], device: torch.device) -> Tensor:
        stream = 0 if self.training else 1  # a fresh draw every forward, train and eval apart
        draw = self.train_draws if self.training else self.eval_draws
        if self.training:
            self.train_draws += 1
        else:
            self.eval_draws += 1
        return random_scores(shape, self.router_seed, stream, draw, device)

    def restart_draws(self) -> None:
        """Evaluation's `random` draws start over: every evaluation of a model sees the same masks."""
        self.eval_draws = 0

    def threshold(self) -> Tensor:
        """The threshold this forward selects with (a tensor, so no host sync)."""
        signal, device = self.config.signal, self.tok_emb.weight.device
        if signal == "uniform":
            return torch.tensor(-math.inf, device=device)
        if signal == "stride":
            return torch.tensor(0.5, device=device)  # the score is the pattern, 0 or 1
        if signal == "random":
            return torch.tensor(1.0 - self.config.refine_target, device=device)
        thr = self.router_threshold
        return torch.where(torch.isnan(thr), torch.full_like(thr, -math.inf), thr)

    def select(self, score: Tensor) -> Tensor:
        """The refined tokens: score > threshold under the causal cap; `uniform` refines every token."""
        want = score > self.threshold()
        return want if self.config.signal == "uniform" else causal_cap(want, self.config.refine_cap)

    # ---- padded refinement (for torch.compile)

    def pads_refinement(self) -> bool:
        """Whether this forward refines in the padded layout: when asked, else while compiling."""
        return torch.compiler.is_compiling() if self.padded_refinement is None else self.padded_refinement

    def refine_capacities(self, seq_len: int, chosen_mask: bool = False) -> tuple[int, ...]:
        """The per-row capacities (rungs) a padded forward at `seq_len` may use: what priming compiles.

        uniform refines all T tokens and stride exactly floor(target T): one rung each, no
        host read. The capped arms select at most floor(cap T) per row: a ladder below it.
        A caller's refine_mask may select anything: a ladder below T.
        """
        c = self.config
        if not chosen_mask and c.signal == "uniform":
            return (seq_len,)
        if not chosen_mask and c.signal == "stride":
            return (max(1, math.floor(c.refine_target * seq_len + CAP_EPSILON)),)
        limit = seq_len if chosen_mask else math.floor(c.refine_cap * seq_len + CAP_EPSILON)
        return capacity_ladder(limit)

    @torch.compiler.disable  # the one host read of a routed forward: its rung fixes the next graph's shapes
    def _read_rung(self, counts: Tensor, ladder: tuple[int, ...]) -> int:
        if self.capacity_override is not None:
            return self.capacity_override
        return rung_for(int(counts.max()), ladder)

    @torch.no_grad()
    def router_scores(self, idx: Tensor) -> Tensor:
        """(B, T) router scores of the base pass alone: what calibration reads."""
        if not self.config.refine_passes:
            raise ValueError("router_scores: the model has no refinement (refine_passes = 0)")
        x0 = rms_norm(self.tok_emb(idx))
        cos, sin = self._rope(idx.size(1), x0)
        return self._router_score(self._base_pass(x0, cos, sin, record_kv=False))

    @torch.no_grad()
    def _track_threshold(self, score: Tensor) -> None:
        """Move the threshold toward this batch's (1 - refine_target) score quantile (EMA).

        Called after selection, so a forward never selects with a threshold that saw its
        own (future) tokens.
        """
        flat = score.flatten().float()
        k = min(flat.numel(), max(1, math.ceil((1.0 - self.config.refine_target) * flat.numel())))
        q = flat.kthvalue(k).values.to(self.router_threshold.dtype)
        thr = self.router_threshold
        thr.copy_(torch.where(torch.isnan(thr), q, THRESHOLD_MOMENTUM * thr + (1 - THRESHOLD_MOMENTUM) * q))

    # ---- refinement

    def _refine(
        self, base: _BasePass, x0: Tensor, cos: Tensor, sin: Tensor, sel: Selection | PaddedSelection
    ) -> Tensor:
        """The core refine_passes more times, then the coda once, on the selected tokens: (n, d)
        gathered, or (B, capacity, d) padded.

        Each block reuses the K/V it computed for the other tokens in the last base pass.
        U-Net skips: the refined core passes get none; each coda block gets the skip it got
        in the base pass. With every token selected (uniform) and no skips, this is
        exactly a base forward with n_passes + refine_passes core passes.
        """
        c = self.config
        h, x0s, cs, sn = sel.gather(base.h_last), sel.gather(x0), sel.at_positions(cos), sel.at_positions(sin)
        for r in range(c.refine_passes):
            p = c.n_passes + r
            h = self.phase.start(h, p)
            for j, block in enumerate(self.core):
                h = block(h, x0s, cs, sn, sel.attend(base.core_kv[j]), self.phase.cond(p, j), self.own_parts(p, j))
        for i, block in enumerate(self.coda):
            skip = base.coda_skips[i]
            if skip is not None:
                h = h + sel.gather(skip)
            h = block(h, x0s, cs, sn, sel.attend(base.coda_kv[i]))
        return h

    # ---- forward

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, *, return_token_ce: bool = False,
        refine_mask: Tensor | None = None,
    ) -> ModelOutput:
        """`refine_mask` (B, T) bool, when given, replaces the router: exactly those tokens are
        refined (no threshold, no cap, no threshold tracking). For tests and analyses that need a
        chosen selection; routing stays causal only if the mask is."""
        c = self.config
        if idx.ndim != 2:
            raise ValueError(f"RecurrentLM: idx must be (batch, seq), got shape {tuple(idx.shape)}")
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"RecurrentLM: targets shape {tuple(targets.shape)} != idx shape {tuple(idx.shape)}")
        # Made before any graph break (_random_scores, _read_rung) and completed after: a
        # compiled forward's later graphs then read no pass count, so they serve both loop states.
        stats = ForwardStats(c, self.n_passes_used, idx.size(1), 0.0)
        x0 = rms_norm(self.tok_emb(idx))
        cos, sin = self._rope(idx.size(1), x0)
        base = self._base_pass(x0, cos, sin, record_kv=c.refine_passes > 0)

        base_ce = None if targets is None else _token_ce(base.logits, targets)
        logits, ce, score, refined = base.logits, base_ce, None, None
        if c.refine_passes:
            score = self._router_score(base)
            if refine_mask is not None:
                if refine_mask.shape != idx.shape or refine_mask.dtype != torch.bool:
                    raise ValueError(f"RecurrentLM: refine_mask must be bool of shape {tuple(idx.shape)}")
                refined = refine_mask
            else:
                refined = self.select(score)
                if self.training and not self.threshold_frozen and c.signal not in FIXED_SIGNALS:
                    self._track_threshold(score)
            if self.pads_refinement():
                # The rung is read here in forward: a graph break inside a called method would
                # also split the compiled forward at the call (two more graphs).
                ladder = self.refine_capacities(idx.size(1), refine_mask is not None)
                capacity = ladder[0] if len(ladder) == 1 else self._read_rung(refined.sum(1), ladder)
                logits, ce, stats.refined_share = self._padded_outputs(base, x0, cos, sin, refined, capacity, targets)
            else:
                logits, ce, stats.refined_share = self._gathered_outputs(base, x0, cos, sin, refined, targets, base_ce)

        loss = base_loss = token_ce = base_token_ce = None
        if ce is not None and base_ce is not None:
            loss = ce.mean()
            base_loss = loss if base_ce is ce else base_ce.mean()
            if return_token_ce:
                token_ce, base_token_ce = ce, base_ce

        return ModelOutput(logits, loss, base_loss, token_ce, base_token_ce, score, refined, stats)

    def _padded_outputs(
        self, base: _BasePass, x0: Tensor, cos: Tensor, sin: Tensor, refined: Tensor, capacity: int,
        targets: Tensor | None,
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Final logits, per-token CE (None without targets) and refined share of a compiled
        forward that refines the `refined` (B, T) tokens in rows padded to `capacity`."""
        padded = PaddedSelection.from_mask(refined, capacity)
        logits = padded.scatter(base.logits, self._logits(self._refine(base, x0, cos, sin, padded)))
        ce = None if targets is None else _token_ce(logits, targets)
        return logits, ce, refined.sum() / refined.numel()  # the share stays on the device

    def _gathered_outputs(
        self, base: _BasePass, x0: Tensor, cos: Tensor, sin: Tensor, refined: Tensor,
        targets: Tensor | None, base_ce: Tensor | None,
    ) -> tuple[Tensor, Tensor | None, float]:
        """The same for an eager forward, on exactly the refined tokens: the base logits and
        CE with the refined tokens' replaced."""
        sel = Selection.from_mask(refined)
        if not sel.n:
            return base.logits, base_ce, 0.0
        fresh = self._logits(self._refine(base, x0, cos, sin, sel))
        # Only the refined tokens' CE is new: the rest is the base CE, already computed.
        ce = None if targets is None or base_ce is None else sel.scatter(base_ce, _token_ce(fresh, sel.gather(targets)))
        # Written into the base logits, not a copy of them: the base CE has read them, and
        # autograd keeps no reference to them (log-softmax saves its output, tanh its own).
        return sel.scatter_(base.logits, fresh), ce, sel.n / refined.numel()


def _token_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-token CE of (..., V) logits against (...) targets."""
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none").view_as(targets)

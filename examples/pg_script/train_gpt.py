"""A tiny Parameter Golf style `train_gpt.py`, written by the loopgolf team.

Trains a small GPT (GQA attention with RoPE, relu^2 MLP, tied embeddings, an optional looped
segment of shared layers) on challenge-format token shards, then writes `final_model.pt`
and an int8+zlib artifact `final_model.int8.ptz`, evaluates the artifact round-tripped from
disk, and prints the challenge's log lines (also appended to `logs/<RUN_ID>.txt`).
Runs on CPU in seconds; `torchrun --nproc_per_node=N` works too (gloo on CPU, nccl on CUDA).

Environment variables (all optional): DATA_PATH, TOKENIZER_PATH, RUN_ID, SEED, ITERATIONS,
MAX_WALLCLOCK_SECONDS, WARMDOWN_ITERS, VAL_LOSS_EVERY, TRAIN_LOG_EVERY, TRAIN_SEQ_LEN,
TRAIN_BATCH_TOKENS, VAL_TOKENS, VOCAB_SIZE, NUM_LAYERS, MODEL_DIM, NUM_HEADS, NUM_KV_HEADS,
MLP_MULT, NUM_LOOPS, LOOP_START, LOOP_END, ENABLE_LOOPING_AT, MATRIX_LR, SCALAR_LR,
EMBED_LR, TIE_EMBEDDINGS. A value that does not parse or validate exits with code 2.
Imports only torch, numpy, sentencepiece and the standard library.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
INT8_OVER_NUMEL = 4096  # int8 only above this: for small tensors the row scales eat the savings
EVAL_BATCH_SEQS = 32


class ConfigError(Exception):
    """A bad setting or input file: reported as one line, exit code 2."""


@dataclasses.dataclass(frozen=True)
class Config:
    data_path: str = "./data/datasets/fineweb10B_sp1024"
    tokenizer_path: str = "./data/tokenizers/fineweb_1024_bpe.model"
    run_id: str = dataclasses.field(default_factory=lambda: str(uuid.uuid4()))
    seed: int = 1337
    iterations: int = 200
    max_wallclock_seconds: float = 600.0  # 0: no cap, only ITERATIONS
    warmdown_iters: int = 40
    val_loss_every: int = 50  # 0: validate only at the end
    train_log_every: int = 10
    train_seq_len: int = 128
    train_batch_tokens: int = 2048  # global, over all ranks
    val_tokens: int = 16384  # 0: the whole val split
    vocab_size: int = 1024
    num_layers: int = 4
    model_dim: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    mlp_mult: int = 2
    num_loops: int = 1  # times the segment [loop_start, loop_end] runs; 1 = no looping
    loop_start: int = 1
    loop_end: int = 2
    enable_looping_at: float = 0.0  # fraction of training after which looping switches on
    matrix_lr: float = 0.02
    scalar_lr: float = 0.02
    embed_lr: float = 0.05
    tie_embeddings: bool = True


BOOLS = {"0": False, "1": True, "false": False, "true": True}
PARSERS: dict[str, Callable[[str], object]] = {
    "str": str, "int": int, "float": float, "bool": lambda raw: BOOLS[raw.strip().lower()]
}


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def load_config(env: Mapping[str, str], world_size: int) -> Config:
    values: dict[str, object] = {}
    for field in dataclasses.fields(Config):
        name, raw = field.name.upper(), env.get(field.name.upper())
        if raw is None:
            continue
        try:
            values[field.name] = PARSERS[str(field.type)](raw)  # field.type is the annotation text: "int", ...
        except (ValueError, KeyError):
            raise ConfigError(f"{name}={raw!r} is not a valid {field.type}") from None
    cfg = Config(**values)  # type: ignore[arg-type]
    # Each check states what is valid, so NaN (false in every comparison) fails it. In order:
    # a later check may divide by a value that an earlier one vouched for.
    require(cfg.iterations >= 1, "ITERATIONS must be >= 1")
    require(cfg.max_wallclock_seconds >= 0, "MAX_WALLCLOCK_SECONDS must be >= 0")
    for name in ("warmdown_iters", "val_loss_every", "train_log_every", "val_tokens", "matrix_lr", "scalar_lr",
                 "embed_lr"):
        require(getattr(cfg, name) >= 0, f"{name.upper()} must be >= 0")
    for name in ("train_seq_len", "vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult",
                 "num_loops"):
        require(getattr(cfg, name) >= 1, f"{name.upper()} must be >= 1")
    per_step = world_size * cfg.train_seq_len
    require(cfg.train_batch_tokens > 0 and cfg.train_batch_tokens % per_step == 0,
            f"TRAIN_BATCH_TOKENS must be a positive multiple of WORLD_SIZE*TRAIN_SEQ_LEN={per_step}")
    require(cfg.model_dim % cfg.num_heads == 0 and cfg.model_dim // cfg.num_heads % 2 == 0,
            "MODEL_DIM / NUM_HEADS must be a whole, even head size (RoPE rotates pairs)")
    require(cfg.num_heads % cfg.num_kv_heads == 0, "NUM_HEADS must be a multiple of NUM_KV_HEADS")
    require(cfg.num_loops == 1 or 0 <= cfg.loop_start <= cfg.loop_end < cfg.num_layers,
            "NUM_LOOPS > 1 needs 0 <= LOOP_START <= LOOP_END < NUM_LAYERS")
    require(0.0 <= cfg.enable_looping_at <= 1.0, "ENABLE_LOOPING_AT must be in [0, 1]")
    return cfg


# ---------------------------------------------------------------- data


def read_shard(path: Path) -> np.ndarray:
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header.size != HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ConfigError(f"{path}: not a challenge shard (bad header)")
    tokens = np.fromfile(path, dtype="<u2", count=int(header[2]), offset=HEADER_INTS * 4)
    if tokens.size != int(header[2]):
        raise ConfigError(f"{path}: truncated ({tokens.size} of {int(header[2])} tokens)")
    return tokens


def shard_paths(data_path: str, split: str) -> list[Path]:
    paths = sorted(Path(data_path).glob(f"fineweb_{split}_[0-9][0-9][0-9][0-9][0-9][0-9].bin"))
    if not paths:
        raise ConfigError(f"DATA_PATH={data_path!r} has no fineweb_{split}_NNNNNN.bin shards")
    return paths


class TrainLoader:
    """Reads train shards in order, wrapping around; each step every rank takes its own
    contiguous slice of the same global chunk, so the run is deterministic."""

    def __init__(self, data_path: str, rank: int, world_size: int) -> None:
        self.paths, self.rank, self.world_size = shard_paths(data_path, "train"), rank, world_size
        self.shard_index, self.tokens, self.pos = 0, read_shard(self.paths[0]), 0

    def _take(self, n: int) -> np.ndarray:
        parts: list[np.ndarray] = []
        while n > 0:
            if self.pos == self.tokens.size:
                self.shard_index = (self.shard_index + 1) % len(self.paths)
                self.tokens, self.pos = read_shard(self.paths[self.shard_index]), 0
            part = self.tokens[self.pos : self.pos + n]
            parts.append(part)
            self.pos, n = self.pos + part.size, n - part.size
        return np.concatenate(parts)

    def next_batch(self, global_tokens: int, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        local = global_tokens // self.world_size
        chunk = self._take(global_tokens + 1)  # +1: the last target
        mine = torch.from_numpy(chunk[self.rank * local : (self.rank + 1) * local + 1].astype(np.int64))
        return mine[:-1].view(-1, seq_len).to(device), mine[1:].view(-1, seq_len).to(device)


def load_val_tokens(cfg: Config) -> Tensor:
    tokens = np.concatenate([read_shard(p) for p in shard_paths(cfg.data_path, "val")])
    usable = tokens.size - 1 if cfg.val_tokens == 0 else min(tokens.size - 1, cfg.val_tokens)
    usable = usable // cfg.train_seq_len * cfg.train_seq_len
    if usable <= 0:
        raise ConfigError(f"val split has fewer than TRAIN_SEQ_LEN+1={cfg.train_seq_len + 1} tokens")
    return torch.from_numpy(tokens[: usable + 1].astype(np.int32))


def byte_luts(sp: spm.SentencePieceProcessor, vocab_size: int, device: torch.device) -> tuple[Tensor, ...]:
    """Per-token lookup tables for val_bpb: base bytes, leading-space flag, boundary flag."""
    size = max(int(sp.vocab_size()), vocab_size)
    base, space, boundary = np.zeros(size, np.int64), np.zeros(size, np.bool_), np.ones(size, np.bool_)
    for i in range(int(sp.vocab_size())):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue  # boundary tokens: 0 bytes, and no space is owed after them
        boundary[i] = False
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            base[i] = 1
        else:
            space[i] = piece.startswith("▁")
            base[i] = len(piece.removeprefix("▁").encode("utf-8"))
    return tuple(torch.from_numpy(a).to(device) for a in (base, space, boundary))


# ---------------------------------------------------------------- model


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, mlp_mult: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.attn_norm, self.mlp_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.fc = nn.Linear(dim, mlp_mult * dim, bias=False)
        self.mlp_out = nn.Linear(mlp_mult * dim, dim, bias=False)

    def attention(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, self.kv_heads, self.head_dim).transpose(1, 3).unbind(2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        # each group of query heads shares one key/value head (GQA)
        k, v = (z.repeat_interleave(self.heads // self.kv_heads, dim=1) for z in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.attn_out(y.transpose(1, 2).reshape(b, t, d))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attention(self.attn_norm(x), cos, sin)
        return x + self.mlp_out(F.relu(self.fc(self.mlp_norm(x))).square())


class GPT(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        nn.init.normal_(self.embed.weight, std=0.02)  # N(0, 1) would make tied logits explode
        self.blocks = nn.ModuleList(
            Block(cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.mlp_mult) for _ in range(cfg.num_layers)
        )
        self.norm = nn.RMSNorm(cfg.model_dim)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.model_dim, cfg.vocab_size, bias=False)
        head_dim = cfg.model_dim // cfg.num_heads
        inv_freq = 10000.0 ** -(torch.arange(0, head_dim, 2).float() / head_dim)
        freqs = torch.outer(torch.arange(cfg.train_seq_len).float(), inv_freq)
        # non-persistent: recomputed, so they cost no artifact bytes
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def layer_order(self, looping: bool) -> list[int]:
        c = self.cfg
        if not looping or c.num_loops == 1:
            return list(range(c.num_layers))
        segment = list(range(c.loop_start, c.loop_end + 1))
        return list(range(c.loop_start)) + segment * c.num_loops + list(range(c.loop_end + 1, c.num_layers))

    def forward(self, idx: Tensor, looping: bool) -> Tensor:
        t = idx.size(1)
        cos, sin = self.cos[:t].to(self.embed.weight.dtype), self.sin[:t].to(self.embed.weight.dtype)
        x = self.embed(idx)
        for i in self.layer_order(looping):
            x = self.blocks[i](x, cos, sin)
        x = self.norm(x)
        return x @ self.embed.weight.T if self.head is None else self.head(x)


# ---------------------------------------------------------------- training


def build_optimizer(model: GPT, cfg: Config) -> torch.optim.Optimizer:
    matrices = [p for p in model.blocks.parameters() if p.ndim >= 2]
    scalars = [p for p in model.blocks.parameters() if p.ndim < 2] + list(model.norm.parameters())
    embeddings = [model.embed.weight] + ([] if model.head is None else [model.head.weight])
    groups = [(matrices, cfg.matrix_lr), (scalars, cfg.scalar_lr), (embeddings, cfg.embed_lr)]
    return torch.optim.Adam(
        [{"params": ps, "lr": lr, "base_lr": lr} for ps, lr in groups], betas=(0.9, 0.95), eps=1e-8
    )


def lr_scale(cfg: Config, step: int, elapsed_ms: float) -> float:
    """1.0, then linear decay to 0 over the last WARMDOWN_ITERS steps, whose count is
    estimated from the wall-clock cap when it will end training before ITERATIONS."""
    if cfg.warmdown_iters == 0:
        return 1.0
    remaining = float(cfg.iterations - step)
    if cfg.max_wallclock_seconds > 0 and step > 0:
        remaining_ms = max(1000.0 * cfg.max_wallclock_seconds - elapsed_ms, 0.0)
        remaining = min(remaining, remaining_ms / (elapsed_ms / step))
    return min(1.0, remaining / cfg.warmdown_iters)


def progress(cfg: Config, step: int, elapsed_ms: float) -> float:
    by_steps = step / cfg.iterations
    if cfg.max_wallclock_seconds == 0:
        return by_steps
    return max(by_steps, elapsed_ms / (1000.0 * cfg.max_wallclock_seconds))


def all_reduce(t: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


def average_gradients(model: nn.Module, world_size: int) -> None:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = all_reduce(torch.cat([g.reshape(-1) for g in grads])) / world_size  # one collective, not one per tensor
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.no_grad()
def evaluate(model: GPT, val: Tensor, luts: tuple[Tensor, ...], rank: int, world_size: int) -> tuple[float, float]:
    """(mean nats per target token, bits per byte) over all val windows, split across ranks."""
    seq_len, device = model.cfg.train_seq_len, model.embed.weight.device
    base, space, boundary = luts
    windows = (val.numel() - 1) // seq_len
    first, last = windows * rank // world_size, windows * (rank + 1) // world_size
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nats, tokens, bytes
    model.eval()
    for w in range(first, last, EVAL_BATCH_SEQS):
        chunk = val[w * seq_len : min(w + EVAL_BATCH_SEQS, last) * seq_len + 1].to(device, torch.int64)
        x, y = chunk[:-1].view(-1, seq_len), chunk[1:].view(-1, seq_len)
        with autocast(device):
            logits = model(x, looping=True)
        sums[0] += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").double()
        sums[1] += y.numel()
        sums[2] += (base[y] + (space[y] & ~boundary[x])).sum().double()
    model.train()
    nats, tokens, n_bytes = all_reduce(sums).tolist()
    return nats / tokens, nats / math.log(2) / n_bytes


def autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(model: GPT, cfg: Config, val: Tensor, luts: tuple[Tensor, ...], rank: int, world_size: int,
          log: Callable[[str], None]) -> None:
    device, loader = model.embed.weight.device, TrainLoader(cfg.data_path, rank, world_size)
    optimizer = build_optimizer(model, cfg)
    train_ms, elapsed_ms, step, capped = 0.0, 0.0, 0, False
    sync(device)
    t0 = time.perf_counter()
    while True:
        last = step == cfg.iterations or capped
        if last or (cfg.val_loss_every > 0 and step % cfg.val_loss_every == 0):
            train_ms = elapsed_ms  # validation is not training: bank the clock, restart it after
            val_loss, val_bpb = evaluate(model, val, luts, rank, world_size)
            log(f"step:{step}/{cfg.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
                f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms")
            t0 = time.perf_counter()
        if last:
            if capped:
                log(f"stopping_early: wallclock_cap train_time:{train_ms:.0f}ms step:{step}/{cfg.iterations}")
            return
        looping = cfg.num_loops > 1 and progress(cfg, step, elapsed_ms) >= cfg.enable_looping_at
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_scale(cfg, step, elapsed_ms)
        x, y = loader.next_batch(cfg.train_batch_tokens, cfg.train_seq_len, device)
        with autocast(device):
            logits = model(x, looping)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world_size > 1:
            average_gradients(model, world_size)
        optimizer.step()
        step += 1
        sync(device)
        elapsed_ms = train_ms + 1000.0 * (time.perf_counter() - t0)
        if world_size > 1:  # every rank must agree on the clock, or they would stop at different steps
            clock = torch.tensor([elapsed_ms], dtype=torch.float64, device=device)
            elapsed_ms = all_reduce(clock, dist.ReduceOp.MAX).item()
        capped = 0 < cfg.max_wallclock_seconds * 1000.0 <= elapsed_ms and step < cfg.iterations
        if cfg.train_log_every > 0 and (step % cfg.train_log_every == 0 or capped):
            train_loss = all_reduce(loss.detach().clone()).item() / world_size
            log(f"step:{step}/{cfg.iterations} train_loss:{train_loss:.4f} "
                f"train_time:{elapsed_ms:.0f}ms step_avg:{elapsed_ms / step:.2f}ms")


# ---------------------------------------------------------------- artifact


def quantize(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Big float matrices -> per-row symmetric int8 + fp16 row scales; other floats -> fp16."""
    packed: dict[str, Tensor] = {}
    for name, t in state.items():
        t = t.detach().cpu()
        if not t.is_floating_point():
            packed[f"raw/{name}"] = t
        elif t.ndim >= 2 and t.numel() > INT8_OVER_NUMEL:
            rows = t.float().reshape(t.shape[0], -1)
            scale = (rows.abs().amax(dim=1) / 127.0).clamp_min(1e-6).half()  # floor: an all-zero row
            q = torch.round(rows / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
            packed[f"int8/{name}"], packed[f"scale/{name}"] = q.reshape(t.shape), scale
        else:
            packed[f"fp16/{name}"] = t.half()
    return packed


def dequantize(packed: Mapping[str, Tensor]) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for key, t in packed.items():
        kind, name = key.split("/", 1)
        if kind == "int8":
            rows = t.float().reshape(t.shape[0], -1) * packed[f"scale/{name}"].float()[:, None]
            state[name] = rows.reshape(t.shape)
        elif kind in ("fp16", "raw"):
            state[name] = t
    return state


def nbytes(tensors: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def save_artifacts(model: GPT, log: Callable[[str], None]) -> None:
    state = model.state_dict()
    torch.save(state, "final_model.pt")
    packed = quantize(state)
    buffer = io.BytesIO()
    torch.save(packed, buffer)
    Path("final_model.int8.ptz").write_bytes(zlib.compress(buffer.getvalue(), level=9))
    size, code = os.path.getsize("final_model.int8.ptz"), len(Path(__file__).read_bytes())
    log(f"Serialized model int8+zlib: {size} bytes (payload:{nbytes(packed)} raw_torch:{buffer.tell()} "
        f"payload_ratio:{nbytes(state) / nbytes(packed):.2f}x)")
    log(f"Code size: {code} bytes")
    log(f"Total submission size int8+zlib: {size + code} bytes")


def roundtrip_eval(cfg: Config, val: Tensor, luts: tuple[Tensor, ...], rank: int, world_size: int,
                   device: torch.device, log: Callable[[str], None]) -> None:
    """Score the artifact as read back from disk, in a fresh model: what a submission gets."""
    blob = Path("final_model.int8.ptz").read_bytes()
    packed = torch.load(io.BytesIO(zlib.decompress(blob)), map_location="cpu", weights_only=True)
    model = GPT(cfg).to(device)
    model.load_state_dict(dequantize(packed), strict=True)
    sync(device)
    t0 = time.perf_counter()
    val_loss, val_bpb = evaluate(model, val, luts, rank, world_size)
    sync(device)
    log(f"final_int8_zlib_roundtrip val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
        f"eval_time:{1000.0 * (time.perf_counter() - t0):.0f}ms")
    log(f"final_int8_zlib_roundtrip_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}")


# ---------------------------------------------------------------- main


def make_logger(rank: int, run_id: str) -> Callable[[str], None]:
    path = Path("logs") / f"{run_id}.txt"
    if rank == 0:
        path.parent.mkdir(exist_ok=True)

    def log(line: str) -> None:
        if rank == 0:
            print(line, flush=True)
            with path.open("a", encoding="utf-8") as f:
                f.write(line + "\n")

    return log


def run(cfg: Config, rank: int, world_size: int, device: torch.device) -> None:
    if not Path(cfg.tokenizer_path).is_file():
        raise ConfigError(f"TOKENIZER_PATH={cfg.tokenizer_path!r} is not a file")
    sp = spm.SentencePieceProcessor(model_file=cfg.tokenizer_path)
    if int(sp.vocab_size()) != cfg.vocab_size:
        raise ConfigError(f"VOCAB_SIZE={cfg.vocab_size} but the tokenizer has {int(sp.vocab_size())} pieces")
    luts, val = byte_luts(sp, cfg.vocab_size, device), load_val_tokens(cfg)
    log = make_logger(rank, cfg.run_id)
    torch.manual_seed(cfg.seed)  # same seed on every rank: identical initial weights, no broadcast needed
    model = GPT(cfg).to(device)
    log(f"seed:{cfg.seed}")
    log(f"max_wallclock_seconds:{cfg.max_wallclock_seconds:.3f}")
    log(f"model_params:{sum(p.numel() for p in model.parameters())}")
    log(f"world_size:{world_size} device:{device.type} val_tokens:{val.numel() - 1} "
        f"num_loops:{cfg.num_loops} loop_segment:{cfg.loop_start}-{cfg.loop_end}")
    train(model, cfg, val, luts, rank, world_size, log)
    if rank == 0:
        save_artifacts(model, log)
    if world_size > 1:
        dist.barrier()  # the other ranks read the artifact rank 0 just wrote
    roundtrip_eval(cfg, val, luts, rank, world_size, device, log)


def fail(message: object) -> int:
    print(f"train_gpt.py: error: {message}", file=sys.stderr, flush=True)
    return 2


def main() -> int:
    try:  # set by torchrun; a plain `python train_gpt.py` is rank 0 of 1
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return fail("RANK, LOCAL_RANK and WORLD_SIZE must be integers")
    try:
        require(0 <= rank < world_size, f"RANK={rank} is not in [0, WORLD_SIZE={world_size})")
        cfg = load_config(os.environ, world_size)
    except ConfigError as e:
        return fail(e)
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # tiny matmuls: extra threads cost more than they give
    if world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        run(cfg, rank, world_size, device)
    except ConfigError as e:
        return fail(e)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Artifact compression: bytes per parameter for bits x codec, save/load times, and the
calibration of trial/estimate.py's byte prediction.

    python bench/bench_compress.py               # the benchmark (a few minutes on 2 CPU cores)
    python bench/bench_compress.py --calibrate   # re-measure estimate.py's tables and check them
    python bench/bench_compress.py --packing     # int8 vs bit-packed levels; byte-shuffle

Models are trained briefly on real text (tinyshakespeare, the challenge's 1024-piece
tokenizer, both read from the folder LOOPGOLF_CHALLENGE_DATA names) with the trial's own
optimizers (Muon for block matrices, AdamW for the rest), because a trained model
compresses differently from its initialization. Trained weights are cached under
runs/bench_compress/ (a local cache of our own training output).

The reference point is the challenge's baseline: int8 + zlib, 15,863,489 bytes for
17,059,912 params (0.9299 bytes per param, code included).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import challenge_data  # noqa: E402  (bench/common.py, the script's own directory)

from loopgolf.trial import artifact as A  # noqa: E402
from loopgolf.trial import artifact_parts as AP  # noqa: E402
from loopgolf.trial import codecs as C  # noqa: E402
from loopgolf.trial import estimate  # noqa: E402
from loopgolf.trial import quantize as Q  # noqa: E402
from loopgolf.trial.code_bytes import code_bytes  # noqa: E402
from loopgolf.trial.config import CompressConfig, TrialConfig, preset  # noqa: E402
from loopgolf.trial.model import RecurrentLM  # noqa: E402

DATA = challenge_data()  # the calibration is made on the challenge's text and tokenizer
assert DATA is not None
CORPUS = DATA / "corpora" / "tinyshakespeare.txt"
TOKENIZER = DATA / "tokenizers" / "fineweb_1024_bpe.model"
CACHE = ROOT / "runs" / "bench_compress"
BASELINE_BYTES, BASELINE_PARAMS = 15_863_489, 17_059_912
CODECS = ("zlib", "lzma", "zstd", "brotli")
BITS = (8, 6, 5, 4)

# The calibration family: tiny-family shapes covering every tensor kind the model has.
CALIBRATION_SHAPES: dict[str, dict[str, object]] = {
    "tiny": dict(preset("tiny").to_flat()),
    "small_unet_scale": {**preset("small").to_flat(), "unet_skips": True, "phase": "scale"},
    "d192_untied_lora_refine": {
        **preset("small").to_flat(), "d_model": 192, "n_heads": 3, "n_kv_heads": 1, "tie_embeddings": False,
        "phase": "lora", "refine_passes": 1,
    },
    "d256_prelude_coda": {**preset("d256").to_flat(), "n_prelude": 1, "n_coda": 1, "n_blocks": 1, "mlp_mult": 3.0},
    "unique9_embed": {**preset("unique9").to_flat(), "phase": "embed"},
}
BENCH_SHAPE = {  # pg_baseline's widths (rows of 512 and 1024) with 3 blocks, to train on a CPU
    **dataclasses.asdict(preset("pg_baseline").model), "n_blocks": 3, "seq_len": 128,
}


# --------------------------------------------------------------------------- training


def corpus_tokens() -> np.ndarray:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    return np.asarray(sp.encode(CORPUS.read_text(encoding="utf-8")), dtype=np.int64)


def train(config: TrialConfig, steps: int, tokens: np.ndarray, seed: int = 0) -> RecurrentLM:
    """`steps` steps of the trial's optimizers, warm-up 10 steps, linear warmdown over the second half."""
    from loopgolf.trial.optim import build_optimizers

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = RecurrentLM(config.model)
    optimizers = build_optimizers(model, config)
    seq, batch = config.model.seq_len, config.train.batch_size
    model.train()
    for step in range(steps):
        scale = min(1.0, (step + 1) / 10) * min(1.0, 2 * (steps - step) / steps)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
        starts = rng.integers(0, len(tokens) - seq - 1, size=batch)
        rows = torch.from_numpy(np.stack([tokens[s : s + seq + 1] for s in starts]))
        model(rows[:, :-1], rows[:, 1:]).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return model.eval()


def trained(name: str, flat: dict[str, object], steps: int, tokens: np.ndarray | None) -> RecurrentLM:
    """A trained model of the given shape, from the cache when it is there."""
    config = TrialConfig.from_flat({**flat, "seq_len": 128})
    path = CACHE / f"{name}_{steps}.pt"
    if path.exists():
        model = RecurrentLM(config.model)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    tick = time.perf_counter()
    model = train(config, steps, corpus_tokens() if tokens is None else tokens)
    seconds = time.perf_counter() - tick
    print(f"  trained {name} ({model.unique_params():,} params) for {steps} steps in {seconds:.0f} s")
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


# ----------------------------------------------------------------------- measurements


def section_bytes(state: Q.QuantizedState, codec: str) -> dict[str, float]:
    """Each kind of content compressed alone: quantized / protected levels, scales, fp16 kinds."""
    groups: dict[str, list[bytes]] = {"quantized": [], "protected_int": [], "scales": [], "matrix": [], "control": []}
    for t in state.tensors:
        if t.alias_of is not None:
            continue
        if t.plan.enc == "int":
            groups["quantized" if t.plan.group == "quantized" else "protected_int"].append(
                AP._pack_levels(t.q, t.plan.bits)
            )
            groups["scales"].append(t.scales.numpy().astype("<f2").tobytes())
        elif t.plan.enc == "half":
            groups[estimate.fp16_kind(t.name)].append(t.data.numpy().astype("<f2").tobytes())
    out = {}
    for key, chunks in groups.items():
        raw = b"".join(chunks)
        planes = AP._byte_planes(raw) if key in ("scales", "matrix", "control") else (raw,)
        out[key] = sum(len(C.compress_bytes(p, codec)) for p in planes if p)
    return out


def header_bytes(state: Q.QuantizedState, config: TrialConfig) -> int:
    return len(C.compress_bytes(AP.encode_parts(state, config)["header"], config.compress.codec))


def predicted_entropy_bytes(state: Q.QuantizedState, group: str) -> float:
    total = 0.0
    for t in state.tensors:
        if t.alias_of is None and t.plan.enc == "int" and t.plan.group == group:
            r = estimate.clip_ratio(t.shape[-1] if t.shape else 1, t.plan.clip_sigma)
            total += math.prod(t.shape) * estimate.level_entropy(t.plan.bits, r) / 8
    return total


def empirical_entropy_bytes(state: Q.QuantizedState) -> float:
    total = 0.0
    for t in state.tensors:
        if t.alias_of is None and t.plan.enc == "int" and t.plan.group == "quantized":
            _, counts = np.unique(t.q.numpy(), return_counts=True)
            p = counts / counts.sum()
            total += -(p * np.log2(p)).sum() * counts.sum() / 8
    return total


def gaussian_like(model: RecurrentLM, seed: int = 1) -> RecurrentLM:
    """The same model with every matrix replaced by Gaussian noise of its trained std."""
    import copy

    torch.manual_seed(seed)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            if estimate.fp16_kind(name) == "matrix":
                p.copy_(torch.randn_like(p) * p.std())
    return clone


# ------------------------------------------------------------------------ calibration

CLIP_SIGMAS = (0.0, 4.0, 8.0, 12.85, 20.0)


def _fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    b, a = np.polyfit(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), 1)
    return float(a), float(b)


def calibrate(steps: int) -> None:
    tokens = corpus_tokens()
    models = {name: trained(name, flat, steps, tokens) for name, flat in CALIBRATION_SHAPES.items()}
    ratio_acc: dict[tuple[str, int, str], list[float]] = {}  # (codec, bits, key) -> [actual, entropy, n]
    scale_acc = {c: [0.0, 0] for c in CODECS}
    fp16_acc = {c: {"matrix": [0.0, 0], "control": [0.0, 0]} for c in CODECS}
    header_pts: dict[str, tuple[list[float], list[float]]] = {c: ([], []) for c in CODECS}
    emp_vs_pred: list[tuple[float, float]] = []
    for name, model in models.items():
        base = TrialConfig.from_flat({**CALIBRATION_SHAPES[name], "seq_len": 128})
        for codec in CODECS:
            for bits in BITS:
                for k in CLIP_SIGMAS:
                    cc = CompressConfig(bits=bits, codec=codec, clip_sigma=k, small_tensor_numel=4096)
                    state = Q.quantize_model(model, cc)
                    sb = section_bytes(state, codec)
                    n = state.counts()["quantized"]
                    # k = 0 clips at the row max, whose ratio depends on the row length: one point per model
                    key = f"{k}" if k > 0 else f"rowmax:{name}"
                    acc = ratio_acc.setdefault((codec, bits, key), [0.0, 0.0, 0])
                    entropy = predicted_entropy_bytes(state, "quantized")
                    acc[0] += sb["quantized"]
                    acc[1] += entropy
                    acc[2] += n
                    scale_acc[codec][0] += sb["scales"]
                    scale_acc[codec][1] += sum(t.q.shape[0] for t in state.tensors if t.q is not None)
                    if codec == "zlib":
                        emp_vs_pred.append((empirical_entropy_bytes(state), entropy))
            # fp16: the default small threshold puts the tiny family's matrices in fp16, plus a protected embedding
            cc = CompressConfig(codec=codec, protect=("tok_emb.weight",), protect_bits=16)
            state = Q.quantize_model(model, cc)
            sb = section_bytes(state, codec)
            for kind in ("matrix", "control"):
                values = sum(
                    math.prod(t.shape) for t in state.tensors
                    if t.alias_of is None and t.plan.enc == "half" and estimate.fp16_kind(t.name) == kind
                )
                fp16_acc[codec][kind][0] += sb[kind]
                fp16_acc[codec][kind][1] += values
            header_pts[codec][0].append(len(state.tensors))
            header_pts[codec][1].append(header_bytes(state, dataclasses.replace(base, compress=cc)))

    worst = max(abs(e / p - 1) for e, p in emp_vs_pred)
    print(f"\nempirical vs Gaussian-predicted level entropy: worst relative difference {worst:.2%}")
    table: dict[str, dict[int, list[tuple[float, float]]]] = {c: {b: [] for b in BITS} for c in CODECS}
    for (codec, bits, _), (actual, entropy, n) in sorted(ratio_acc.items()):
        table[codec][bits].append((round(8 * entropy / n, 3), round(actual / entropy, 4)))
    tables = {
        "CODEC_RATIO": {c: {b: tuple(sorted(table[c][b])) for b in BITS} for c in CODECS},
        "SCALE_BYTES_PER_ROW": {c: round(v / n, 4) for c, (v, n) in scale_acc.items()},
        "FP16_BYTES_PER_VALUE": {
            c: {k: round(v / max(n, 1), 4) for k, (v, n) in fp16_acc[c].items()} for c in CODECS
        },
        "HEADER_BYTES": {c: tuple(round(x, 2) for x in _fit_line(*header_pts[c])) for c in CODECS},
    }
    print("\n# paste into loopgolf/trial/estimate.py")
    print(format_tables(tables))
    for name, value in tables.items():
        setattr(estimate, name, value)  # so --check in the same run checks the fresh tables


def format_tables(tables: dict[str, dict]) -> str:
    """The tables as estimate.py's Python literals, within 120 columns."""
    lines = ["CODEC_RATIO: dict[str, dict[int, tuple[tuple[float, float], ...]]] = {"]
    for codec, per_bits in tables["CODEC_RATIO"].items():
        lines.append(f'    "{codec}": {{')
        for bits, points in per_bits.items():
            lines.append(f"        {bits}: (")
            for i in range(0, len(points), 6):
                lines.append("            " + " ".join(f"({h}, {r})," for h, r in points[i : i + 6]))
            lines.append("        ),")
        lines.append("    },")
    lines.append("}")
    scales = ", ".join(f'"{c}": {v}' for c, v in tables["SCALE_BYTES_PER_ROW"].items())
    lines.append(f"SCALE_BYTES_PER_ROW: dict[str, float] = {{{scales}}}")
    lines.append("FP16_BYTES_PER_VALUE: dict[str, dict[str, float]] = {")
    lines += [f'    "{c}": {{"matrix": {v["matrix"]}, "control": {v["control"]}}},'
              for c, v in tables["FP16_BYTES_PER_VALUE"].items()]
    lines.append("}")
    lines.append("HEADER_BYTES: dict[str, tuple[float, float]] = {")
    lines += [f'    "{c}": {v!r},' for c, v in tables["HEADER_BYTES"].items()]
    lines.append("}")
    return "\n".join(lines)


def check_prediction(steps: int) -> dict[str, list[float]]:
    """Predicted vs actual model_bytes over the calibration models x bits x codec x settings."""
    tokens = corpus_tokens()
    errors: dict[str, list[float]] = {c: [] for c in CODECS}
    settings = [
        {}, {"small_tensor_numel": 4096}, {"clip_sigma": 12.85, "small_tensor_numel": 4096},
        {"protect": ["tok_emb.weight"], "protect_bits": 8, "small_tensor_numel": 4096},
        {"protect": ["tok_emb.weight"], "protect_bits": 16},
    ]
    for name, flat in CALIBRATION_SHAPES.items():
        model = trained(name, flat, steps, tokens)
        for variant, m in (("trained", model), ("gaussian", gaussian_like(model))):
            worst: tuple[float, str] = (0.0, "")
            for codec in CODECS if variant == "trained" else ("zstd",):
                for bits in BITS:
                    for extra in settings:
                        config = TrialConfig.from_flat({**flat, "seq_len": 128, "codec": codec, "bits": bits, **extra})
                        actual = len(A.encode_artifact(Q.quantize_model(m, config.compress), config))
                        err = estimate.estimate_bytes(config, code=0).model_bytes / actual - 1
                        if variant == "trained":
                            errors[codec].append(err)
                        worst = max(worst, (err, f"{codec} int{bits} {extra}"), key=lambda e: abs(e[0]))
            print(f"  {name:24s} {variant:8s} worst relative error {worst[0]:+.2%} ({worst[1]})")
    print("trained models, relative error of predicted model_bytes, per codec:")
    for codec, errs in errors.items():
        print(f"  {codec:7s} n={len(errs)} mean {np.mean(errs):+.2%} min {min(errs):+.2%} max {max(errs):+.2%}")
    return errors


# ---------------------------------------------------------------------------- packing


def _bitpack(q: torch.Tensor, bits: int) -> bytes:
    """Levels as a dense little-endian bit stream of `bits` bits each (the alternative to int8)."""
    u = (q.reshape(-1).numpy().astype(np.int16) + Q.qmax(bits)).astype(np.uint8)
    planes = (u[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def packing() -> None:
    """Which byte layout compresses best, per codec (the choices documented in artifact.py)."""
    model = trained("bench_d512", BENCH_SHAPE, 200, None)
    print("\nlevels: bytes per quantized value (int8 per level | bit-packed | nibbles at 4 bits)")
    for bits in (6, 5, 4):
        state = Q.quantize_model(model, CompressConfig(bits=bits))
        qs = [t.q for t in state.tensors if t.q is not None]
        n = sum(q.numel() for q in qs)
        as_int8 = b"".join(q.reshape(-1).numpy().tobytes() for q in qs)
        packed = b"".join(_bitpack(q, bits) for q in qs)
        row = []
        for codec in CODECS:
            sizes = [len(C.compress_bytes(as_int8, codec)) / n, len(C.compress_bytes(packed, codec)) / n]
            if bits == 4:
                sizes.append(len(C.compress_bytes(b"".join(AP._pack_levels(q, 4) for q in qs), codec)) / n)
            row.append(f"{codec} " + " | ".join(f"{v:.4f}" for v in sizes))
        print(f"  int{bits}: " + "   ".join(row))
    state = Q.quantize_model(model, CompressConfig(bits=6, protect=("tok_emb.weight",)))
    scales = b"".join(t.scales.numpy().astype("<f2").tobytes() for t in state.tensors if t.scales is not None)
    half = b"".join(t.data.numpy().astype("<f2").tobytes() for t in state.tensors if t.plan.enc == "half")
    print("fp16 sections: compressed bytes, plain | byte-shuffled, one frame | two byte-plane frames")
    for label, raw in (("scales", scales), ("fp16 tensors", half)):
        row = []
        for c in CODECS:
            lo, hi = AP._byte_planes(raw)
            sizes = (len(C.compress_bytes(raw, c)), len(C.compress_bytes(lo + hi, c)),
                     len(C.compress_bytes(lo, c)) + len(C.compress_bytes(hi, c)))
            row.append(f"{c} " + " | ".join(f"{v:,}" for v in sizes))
        print(f"  {label}: " + "   ".join(row))
    parts = AP.encode_parts(state, TrialConfig.from_flat({**BENCH_SHAPE, "bits": 6, "protect": ["tok_emb.weight"]}))
    interleaved = b"".join(
        AP._pack_levels(t.q, 6) + t.scales.numpy().astype("<f2").tobytes() if t.q is not None
        else t.data.numpy().astype("<f2").tobytes() if t.data is not None else b""
        for t in state.tensors
    )
    print("layout: compressed bytes, one frame per part (the format) | the parts as one stream | "
          "per tensor interleaved, unshuffled")
    for codec in CODECS:
        frames = len(A.pack_parts(parts, codec))
        stream = len(C.compress_bytes(b"".join(parts.values()), codec))
        mixed = len(C.compress_bytes(parts["header"] + interleaved, codec))
        print(f"  {codec}: {frames:,} | {stream:,} | {mixed:,}")


# -------------------------------------------------------------------------- benchmark


def _ce(model: RecurrentLM, windows: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(windows[:, :-1], windows[:, 1:]).loss)


def bench() -> None:
    tokens = corpus_tokens()
    model = trained("bench_d512", BENCH_SHAPE, 200, tokens)
    base = TrialConfig.from_flat(BENCH_SHAPE)
    # Quantization damage: cross-entropy of the roundtripped model minus the fp32 model's,
    # on 16 fixed windows of the training text (not a generalization measurement).
    starts = np.random.default_rng(123).integers(0, len(tokens) - 129, size=16)
    windows = torch.from_numpy(np.stack([tokens[s : s + 129] for s in starts]))
    ce_fp32 = _ce(model, windows)
    path = CACHE / "bench.lga"
    params = model.unique_params()
    code = code_bytes()
    baseline_model = (BASELINE_BYTES - 47_642) / BASELINE_PARAMS  # the challenge's model bytes per param
    baseline_total = BASELINE_BYTES / BASELINE_PARAMS
    print(f"\ntrained model: d_model 512, 3 blocks, vocab 1024, {params:,} params, 200 steps on tinyshakespeare")
    print(f"code_bytes {code:,}; baseline int8+zlib: {baseline_model:.4f} B/param model, {baseline_total:.4f} total")
    print("B/param = model_bytes / params; 'vs base' = that / the baseline's model B/param; 'total@17M' = the")
    print("artifact projected to the baseline's 17,059,912 params (B/param x params + code) / 15,863,489\n")
    print(f"'dCE' = cross-entropy of the loaded model - the fp32 model's ({ce_fp32:.4f} nats), 16 train windows\n")
    print(f"{'bits':>4} {'clip':>6} {'codec':>7} {'B/param':>8} {'vs base':>8} {'total@17M':>9} "
          f"{'pred err':>8} {'save s':>7} {'load s':>7} {'dCE':>7}")
    for bits in BITS:
        for clip in (0.0, 4.0, 12.85) if bits == 6 else (0.0,):
            for codec in CODECS:
                config = base.replace(bits=bits, codec=codec, clip_sigma=clip)
                info = A.save_artifact(model, config, path)
                tick = time.perf_counter()
                loaded = A.load_artifact(path)
                load = time.perf_counter() - tick
                d_ce = _ce(loaded, windows) - ce_fp32
                bpp = info.model_bytes / params
                projected = (bpp * BASELINE_PARAMS + code) / BASELINE_BYTES
                err = estimate.estimate_bytes(config, code=0).model_bytes / info.model_bytes - 1
                print(f"{bits:>4} {clip:>6.2f} {codec:>7} {bpp:>8.4f} {bpp / baseline_model:>8.3f} {projected:>9.3f} "
                      f"{err:>+8.2%} {info.save_seconds:>7.2f} {load:>7.2f} {d_ce:>+7.4f}")
    # Per-row scales make the int levels independent of each row's std, and trained rows are
    # close to Gaussian (see --calibrate), so Gaussian matrices stand in at full size.
    print("\nfull size: pg_baseline shape (17,059,912 params), Gaussian matrices, clip at the row max")
    full = preset("pg_baseline")
    big = RecurrentLM(full.model)
    with torch.no_grad():
        for name, p in big.named_parameters():
            if estimate.fp16_kind(name) == "matrix":
                p.normal_(0.0, 0.05)
    for bits in (8, 6):
        for codec in CODECS:
            config = full.replace(bits=bits, codec=codec)
            info = A.save_artifact(big, config, path)
            tick = time.perf_counter()
            A.load_artifact(path)
            load = time.perf_counter() - tick
            share = info.artifact_bytes / BASELINE_BYTES
            print(f"  int{bits} {codec:>7}: {info.artifact_bytes:>12,} bytes ({share:.3f} of the baseline), "
                  f"save {info.save_seconds:6.1f} s, load {load:5.1f} s")


# ------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibrate", action="store_true", help="re-measure estimate.py's tables, then check them")
    parser.add_argument("--check", action="store_true", help="predicted vs actual bytes on the calibration models")
    parser.add_argument("--packing", action="store_true", help="int8 vs bit-packed levels; byte-shuffle; layout")
    parser.add_argument("--steps", type=int, default=150, help="training steps of the calibration models")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the box is shared: more threads than free cores makes small ops 100x slower
    if args.calibrate:
        calibrate(args.steps)
    if args.check:
        check_prediction(args.steps)
    if args.packing:
        packing()
    if not (args.calibrate or args.check or args.packing):
        bench()


if __name__ == "__main__":
    main()

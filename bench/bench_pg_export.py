"""pg_int8 against the challenge's own export format, on the same weights.

Run: .venv/bin/python bench/bench_pg_export.py [--seed 0] [--std 0.02]

The challenge baseline (train_gpt.py) writes its int8 state as a torch.save'd dict
(quantized int8 tensors, fp16 row scales, passthrough fp32/fp16 tensors, dtype names)
compressed with zlib level 9. It is reimplemented here from the published facts of
that format, to measure its bytes beside loopgolf's `pg_int8` artifact of the same
weights: the pg_baseline shape (17,059,912 parameters), its block matrices and tied
embedding drawn Gaussian with `--std` (trained weights are close to Gaussian per row;
the zero-initialised projections are drawn too, as after training). Both reload to the
same weights, which the script checks. torch.save is used only to write (nothing is
loaded from a pickle here).
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
import zlib
from pathlib import Path

import torch

from loopgolf.trial import artifact as A
from loopgolf.trial.config import preset
from loopgolf.trial.model import RecurrentLM

CONTROL = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight")


def challenge_export(state: dict[str, torch.Tensor]) -> tuple[bytes, int, dict[str, torch.Tensor]]:
    """(zlib-9 bytes of the torch.save'd int8 dict, its raw int8 payload bytes, the reloaded weights)."""
    quantized, scales, dtypes, passthrough, qmeta, orig = {}, {}, {}, {}, {}, {}
    payload, reloaded = 0, {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        if t.numel() <= 65_536:
            kept = t.float() if any(p in name for p in CONTROL) else t.half()
            if kept.dtype == torch.float16:
                orig[name] = "float32"
            passthrough[name] = kept
            payload += kept.numel() * kept.element_size()
            reloaded[name] = kept.float()
            continue
        t32 = t.float()
        clip = torch.quantile(t32.abs(), 0.9999984, dim=1)
        scale = torch.clamp(clip / 127.0, min=1.0 / 127.0)
        q = torch.round(torch.clamp(t32, -clip[:, None], clip[:, None]) / scale[:, None]).clamp(-127, 127)
        quantized[name], scales[name] = q.to(torch.int8).contiguous(), scale.half().contiguous()
        dtypes[name], qmeta[name] = "float32", {"scheme": "per_row", "axis": 0}
        payload += q.numel() + 2 * scale.numel()
        reloaded[name] = q.float() * scales[name].float()[:, None]
    obj = {"__quant_format__": "int8_clean_per_row_v1", "quantized": quantized, "scales": scales, "dtypes": dtypes,
           "passthrough": passthrough, "qmeta": qmeta, "passthrough_orig_dtypes": orig}  # fmt: skip
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return zlib.compress(buffer.getvalue(), 9), payload, reloaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--std", type=float, default=0.02, help="std of the Gaussian block matrices and embedding")
    args = parser.parse_args()
    config = preset("pg_baseline").replace(recipe="pg_int8")
    torch.manual_seed(args.seed)
    model = RecurrentLM(config.model)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2 and p.numel() > 65_536:
                p.normal_(0.0, args.std)
            else:
                p.add_(torch.randn_like(p) * 0.05)  # control tensors moved off their init
    params = dict(model.named_parameters())
    tick = time.perf_counter()
    theirs, payload, reloaded = challenge_export(params)
    their_seconds = time.perf_counter() - tick
    with tempfile.TemporaryDirectory() as tmp:
        tick = time.perf_counter()
        info = A.save_artifact(model, config, Path(tmp) / "m.lgart")
        our_seconds = time.perf_counter() - tick
        ours = dict(A.load_artifact(Path(tmp) / "m.lgart").named_parameters())
    same = all(torch.equal(ours[n].float(), reloaded[n]) for n in params)
    print(f"pg_baseline shape, {sum(p.numel() for p in params.values()):,} params, Gaussian std {args.std}, "
          f"seed {args.seed}; load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"challenge format   int8 payload {payload:12,d} B   torch.save + zlib-9 {len(theirs):12,d} B  "
          f"({their_seconds:.1f} s)")  # fmt: skip
    print(f"loopgolf pg_int8   model bytes {info.model_bytes:13,d} B   ratio to the challenge's "
          f"{info.model_bytes / len(theirs):.4f}  ({our_seconds:.1f} s; + code {info.code_bytes:,} B)")  # fmt: skip
    print(f"reloaded weights identical: {same}")


if __name__ == "__main__":
    main()

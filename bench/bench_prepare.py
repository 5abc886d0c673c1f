"""Throughput of `loopgolf data prepare`: MB of text per second, per tokenizer.

Run: .venv/bin/python bench/bench_prepare.py [--repeat N]
The corpus is the challenge's tinyshakespeare.txt (from LOOPGOLF_CHALLENGE_DATA) concatenated
N times (the copies differ by a line so that documents are not all duplicates).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import challenge_data  # bench/common.py (the script's own directory)

from loopgolf.trial.prepare import PrepareConfig, prepare


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=8)
    args = parser.parse_args()
    data = challenge_data()
    assert data is not None
    base = (data / "corpora" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "corpus.txt"
        text.write_text("\n\n".join(f"Copy {i}.\n\n{base}" for i in range(args.repeat)), encoding="utf-8")
        megabytes = text.stat().st_size / 1e6
        for vocab in (1024, 4096, 8192):
            start = time.perf_counter()
            tokenizer = data / "tokenizers" / f"fineweb_{vocab}_bpe.model"
            prepare(PrepareConfig(Path(tmp) / f"out{vocab}", (text,), tokenizer))
            seconds = time.perf_counter() - start
            print(f"sp{vocab}: {megabytes:.1f} MB in {seconds:.2f} s = {megabytes / seconds:.1f} MB/s")
        start = time.perf_counter()
        prepare(PrepareConfig(Path(tmp) / "trained", vocab_size=1024))
        print(f"built-in corpus with a trained 1024 BPE: {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()

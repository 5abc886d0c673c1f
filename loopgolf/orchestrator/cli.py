"""The `loopgolf` command: a thin layer over the Python API.

Each sub-command parses its arguments, calls one API function and prints. Errors
about input (LoopgolfError) become one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from loopgolf.errors import LoopgolfError


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from loopgolf.trial.prepare import PrepareConfig, prepare

    config = PrepareConfig(
        out_dir=Path(args.out),
        text_files=tuple(Path(p) for p in args.text or ()),
        tokenizer=Path(args.tokenizer) if args.tokenizer else None,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        overwrite=args.overwrite,
    )
    source = ", ".join(args.text) if args.text else "the built-in corpus (Python's pydoc topics)"
    print(f"preparing {config.out_dir} from {source}", file=sys.stderr)
    manifest = prepare(config)
    for split in ("train", "val"):
        s = manifest["splits"][split]
        print(
            f"{split:5s}: {s['documents']:6d} docs  {s['tokens']:10,d} tokens  {s['bytes']:11,d} bytes  "
            f"({s['bytes'] / max(1, s['tokens']):.3f} bytes/token, {len(s['shards'])} shard(s))"
        )
    print(f"wrote {config.out_dir}/manifest.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopgolf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="prepare challenge-format shards").add_subparsers(dest="action", required=True)
    prep = data.add_parser("prepare", help="tokenize text into shards + manifest.json")
    prep.add_argument("--text", nargs="+", metavar="FILE", help="text files (default: a built-in English corpus)")
    tok = prep.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="MODEL", help="a SentencePiece .model file")
    tok.add_argument("--vocab-size", type=int, metavar="N", help="train a SentencePiece BPE of N pieces")
    prep.add_argument("--out", required=True, metavar="DIR")
    prep.add_argument("--val-fraction", type=float, default=0.1, metavar="F")
    prep.add_argument("--shard-tokens", type=int, default=100_000_000, metavar="N")
    prep.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    prep.set_defaults(run=_cmd_data_prepare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except LoopgolfError as exc:
        print(f"loopgolf: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loopgolf: interrupted", file=sys.stderr)
        return 130


def print_json_line(payload: dict) -> None:
    """The machine-readable last line of a command's standard output."""
    print(json.dumps(payload, sort_keys=True, default=str))


if __name__ == "__main__":
    sys.exit(main())

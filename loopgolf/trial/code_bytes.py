"""The code term of the artifact's bytes: `artifact_bytes = model_bytes + code_bytes`.

It counts the source a reader needs to rebuild and run the model from the artifact:
exactly the loopgolf modules that loading an artifact and running the model imports
(tests/trial/test_artifact.py checks this against the real import graph in a fresh
interpreter): the config dataclasses it is rebuilt from, the model and its blocks, the
dequantizer, the FLOP count its forward stats report (flops.py), the loader (artifact.py,
artifact_parts.py) and its codecs, the error base class, and the package __init__ files Python executes to
import them. Training (train.py, qat.py), the data pipeline and bits-per-byte scorer
(data.py, evaluate.py), this accounting, the orchestrator and the search spaces are not
needed to run the model; the scorer is the challenge's fixed definition, the same for
every entry. Third-party libraries (torch, numpy, the codec packages) are not counted,
as in the challenge.
"""

from __future__ import annotations

import os
from pathlib import Path

CODE_FILES: tuple[str, ...] = (
    "loopgolf/__init__.py",
    "loopgolf/errors.py",
    "loopgolf/trial/__init__.py",
    "loopgolf/trial/config.py",
    "loopgolf/trial/model.py",
    "loopgolf/trial/blocks.py",
    "loopgolf/trial/flops.py",
    "loopgolf/trial/routing.py",
    "loopgolf/trial/selection.py",
    "loopgolf/trial/quantize.py",
    "loopgolf/trial/artifact.py",
    "loopgolf/trial/artifact_parts.py",
    "loopgolf/trial/codecs.py",
)
_REPO_ROOT = Path(__file__).resolve().parents[2]  # CODE_FILES are relative to it


def code_bytes(files: tuple[str, ...] = CODE_FILES) -> int:
    """Summed on-disk sizes of the counted source files."""
    return sum(os.path.getsize(_REPO_ROOT / f) for f in files)

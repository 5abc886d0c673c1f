"""loopgolf.jsonio: the JSON rule for NumPy and torch scalars, and the short digests that name
configurations and data in users' sweep directories (which must never change).

    python -m pytest tests/test_jsonio.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from loopgolf.jsonio import json_default, short_digest
from loopgolf.search_spaces.spaces import flat_config_id


def test_numpy_and_torch_scalars_are_their_python_numbers() -> None:
    values = {"i": np.int64(3), "f": np.float32(0.5), "b": np.bool_(True), "t": torch.tensor(2.5), "n": [np.int8(1)]}
    assert json.loads(json.dumps(values, default=json_default)) == {"i": 3, "f": 0.5, "b": True, "t": 2.5, "n": [1]}


def test_what_json_cannot_hold_is_still_refused() -> None:
    with pytest.raises(TypeError, match="not JSON serializable: object"):
        json.dumps({"x": object()}, default=json_default)


def test_digests_are_pinned() -> None:
    """Computed with the code before jsonio existed: an id in an existing sweep directory."""
    flat = {"d_model": 64, "seed": 3, "signal": "kl", "refine_target": 0.25}
    assert flat_config_id(flat) == "982fb4713c7f"  # seed is not part of it
    manifest = {"tokenizer_sha256": "ab", "tokens": {"train": 10, "val": 2}, "documents": 7}
    assert short_digest(manifest, 16) == "3b2bbe2214aed2df"  # trainable.data_fingerprint's rule


def test_the_default_reaches_the_digest() -> None:
    with pytest.raises(TypeError):
        short_digest({"p": object()}, 12)
    assert len(short_digest({"p": object()}, 12, default=lambda _: "x")) == 12

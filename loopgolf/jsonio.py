"""JSON the way loopgolf writes it: one rule for values JSON does not know, one digest.

Every layer imports this module, so it imports nothing from loopgolf.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

__all__ = ["json_default", "short_digest"]


def json_default(value: object) -> object:
    """`json.dumps`'s `default`: a NumPy scalar (bools included) or a 0-d tensor as its Python
    number; anything else is not JSON."""
    item = getattr(value, "item", None)
    if callable(item):  # NumPy scalars and 0-d arrays, 0-d torch tensors
        return item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def short_digest(obj: Any, n: int, *, default: Callable[[Any], Any] | None = None) -> str:
    """The first `n` hex digits of the SHA-256 of `obj` as JSON with sorted keys.

    Ids made this way name trials and configurations in users' sweep directories: the
    JSON (`json.dumps` defaults: ASCII, ", " and ": " separators) must never change.
    """
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=default).encode()).hexdigest()[:n]

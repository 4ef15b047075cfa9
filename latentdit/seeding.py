"""The project's one seeding helper: every random stream (data order, training noise, dataset items,
per-sample sampling noise, VAE crops and splits) is seeded by :func:`seed_for` of a name and the
indices that identify it, so a stream never depends on the number of processes, the batch size or
what ran before it."""

from __future__ import annotations

import hashlib
from typing import Any


def seed_for(*parts: Any) -> int:
    """A 63-bit seed derived from the given parts (stable across processes and Python runs)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

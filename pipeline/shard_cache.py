"""A cache that lives for one shard task: what stages derive from the same media bytes (decoded
pixels) is computed once even when several stages of a fused task read those bytes.

The framework opens the cache around a fused shard task (``shard_cache_scope``) and clears it when
the task ends; stages call ``cached`` from their decode helpers and never see whether a scope is
open. Outside a scope ``cached`` just computes, so a stage run on its own behaves as before.

Entries are keyed by the bytes themselves (a dict lookup hashes them once per bytes object and
compares only on a hash match), so media passed in memory and media read again from a tar both
hit. Values must not be changed by their users: numpy arrays are stored read-only, so a stage that
writes into shared pixels fails loudly instead of corrupting the next stage's input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

# Enough for the decoded crops and images of a shard of a few hundred images; past it new entries
# are computed but not kept (a full shard of 10,000 images decoded would not fit in memory).
DEFAULT_BUDGET_BYTES = 768 << 20


class _ShardCache:
    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.entries: dict[tuple[str, bytes], Any] = {}
        self.hits = 0
        self.misses = 0


_CURRENT: _ShardCache | None = None


@contextmanager
def shard_cache_scope(budget_bytes: int = DEFAULT_BUDGET_BYTES) -> Iterator[None]:
    """Open the cache for one shard task; everything in it is dropped when the task ends."""
    global _CURRENT
    outer, _CURRENT = _CURRENT, _ShardCache(budget_bytes)
    try:
        yield
    finally:
        _CURRENT = outer


def cached(kind: str, data: bytes, make: Callable[[], T]) -> T:
    """``make()``, remembered for ``(kind, data)`` while a shard task's scope is open.

    ``kind`` names what is derived from the bytes (``"bgr"``, ``"bgr/2"`` for a half-scale decode),
    so different derivations of the same bytes never collide.
    """
    cache = _CURRENT
    if cache is None or not data:
        return make()
    entry_key = (kind, data)
    if entry_key in cache.entries:
        cache.hits += 1
        return cache.entries[entry_key]
    cache.misses += 1
    value = make()
    size = _size_of(value)
    if cache.used_bytes + size <= cache.budget_bytes:
        if isinstance(value, np.ndarray):
            value.setflags(write=False)  # shared with later stages: nobody may write into it
        cache.entries[entry_key] = value
        cache.used_bytes += size
    return value


def cache_counts() -> tuple[int, int]:
    """(hits, misses) of the open scope; (0, 0) when none is open."""
    return (_CURRENT.hits, _CURRENT.misses) if _CURRENT is not None else (0, 0)


def _size_of(value: Any) -> int:
    # The key's bytes are held as well; they are usually held anyway by the batch that read them.
    return int(value.nbytes) if isinstance(value, np.ndarray) else 64

"""Outside input of a source stage: its shards in order, the media it references, a fingerprint.

A source stage (``Stage.source``) builds one from its config (``Stage.open_source``); the runner
reads its shards on the driver, in order, and hands each to a worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from facecap.pipeline.dataset import MediaRef


@dataclass
class SourceShard:
    index: int
    table: pa.Table | None
    error: str | None = None


@dataclass
class Source:
    """A readable input: its shards in order, media it references and a fingerprint."""

    files: list[str]
    kind: str
    media: dict[str, MediaRef] = field(default_factory=dict)
    fingerprint: list[tuple[str, int | None]] = field(default_factory=list)
    shard_iter: Any = None
    # The folders or files the user named (a glob's fixed part): no output may overlap them.
    roots: list[str] = field(default_factory=list)

    def shards(self) -> Iterator[SourceShard]:
        return self.shard_iter()

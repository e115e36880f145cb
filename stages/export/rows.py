"""How one ok row becomes an exported sample: its caption, its JSON, its split, its FaceCaption-v2 row."""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any

import numpy as np
import orjson
import pyarrow as pa

from facecap.pipeline.errors import FacecapError

# Columns not worth a trainer's JSON: internal bookkeeping of the stages (and timings, which differ run to run).
SKIP_COLUMNS = {"status", "error", "source_file", "source_row", "fetch_seconds", "attempts", "reencoded", "quality_ms"}
TAR_BLOCK = 512


def split_of(rows: pa.Table, settings) -> np.ndarray:
    """Each row's split ("train" or "val"), by a stable hash of its key or of its identity cluster."""
    if settings.val_fraction <= 0:
        return np.full(rows.num_rows, "train", dtype=object)
    if settings.split_by == "identity":
        if "identity_cluster" not in rows.column_names:
            raise FacecapError("export --split-by identity needs identity clusters: run dedup with kind 'identity'")
        basis = [str(v) for v in rows.column("identity_cluster").to_pylist()]
    else:
        basis = rows.column("key").to_pylist()
    bucket = np.array([int.from_bytes(hashlib.sha256(b.encode()).digest()[:4], "big") / 2**32 for b in basis])
    return np.where(bucket < settings.val_fraction, "val", "train").astype(object)


def caption_of(row: dict[str, Any], settings) -> tuple[str, str]:
    captions = row.get("caption")
    if settings.caption == "short" and row.get("caption_short"):
        return str(row["caption_short"]), "caption_short"
    if captions is not None and len(captions):
        return str(captions[0]), "caption"
    if row.get("caption_short"):
        return str(row["caption_short"]), "caption_short"
    return str(row.get("alt_text") or ""), "alt_text"


def samples_json(rows: pa.Table, settings) -> tuple[list[bytes], list[dict[str, Any]]]:
    """Each row's caption (UTF-8) and its ``KEY.json`` content: every column worth a trainer's
    while, binary ones as null. Unwanted columns are dropped and binary ones nulled as whole
    columns before the rows become Python objects (per value it was a third of rendering)."""
    kept = rows.select([name for name in rows.column_names if name not in SKIP_COLUMNS])
    for position, column in enumerate(kept.schema):
        if _is_binary(column.type):
            kept = kept.set_column(position, column.name, pa.nulls(kept.num_rows))
    texts, metas = [], []
    for meta in kept.to_pylist():
        for column in ("caption_provenance", "attr_backends", "caption_versions"):
            if isinstance(meta.get(column), str):
                with contextlib.suppress(ValueError):  # not JSON after all: keep the text
                    meta[column] = json.loads(meta[column])
        text, meta["caption_source"] = caption_of(meta, settings)
        texts.append(text.encode())
        metas.append(meta)
    return texts, metas


def _is_binary(dtype: pa.DataType) -> bool:
    return pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype) or pa.types.is_fixed_size_binary(dtype)


def metadata_json(meta: dict[str, Any]) -> bytes:
    """UTF-8 JSON; NaN and infinities become null (JSON has neither), nested bytes too."""
    return orjson.dumps(meta, default=_as_text)


def _as_text(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return None
    return str(value)  # what json.dumps(default=str) wrote: Decimal, odd Arrow values


def facecaption_table(part: pa.Table) -> pa.Table:
    """FaceCaption v2 columns first (_id, url, caption, laion_caption, box as a JSON string), then ours."""
    n = part.num_rows
    boxes = part.column("box").to_pylist() if "box" in part.column_names else [None] * n
    captions = part.column("caption").to_pylist() if "caption" in part.column_names else [None] * n
    alt = part.column("alt_text").to_pylist() if "alt_text" in part.column_names else [None] * n
    columns: dict[str, pa.Array] = {
        "_id": part.column("key").combine_chunks(),
        "url": part.column("url").combine_chunks() if "url" in part.column_names else pa.nulls(n, pa.string()),
        "caption": pa.array([list(c) if c is not None else [] for c in captions], pa.list_(pa.string())),
        "laion_caption": pa.array([[a] if a else [] for a in alt], pa.list_(pa.string())),
        "box": pa.array([json.dumps([round(v) for v in b[:4]]) if b else None for b in boxes], pa.string()),
    }
    for name in part.column_names:
        if name in columns or name in SKIP_COLUMNS or name in ("key", "alt_text"):
            continue
        columns[name] = part.column(name).combine_chunks()
    return pa.table(columns)

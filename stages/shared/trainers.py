"""What trainers read beside WebDataset tars, for the export and ``recaption --write shards``.

- Megatron-Energon's ``NAME.tar.idx``: the byte offset of each sample's first header, then of the
  end of the samples, as little-endian uint64 (what ``energon prepare`` writes); the writers know
  the offsets from writing the tar (``SpooledTar.sample_offsets``).
- Hugging Face ``datasets`` features (as a dataset card's YAML writes them) for the samples'
  ``json`` member, from an Arrow schema unified over every sample.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

import pyarrow as pa


def tar_index(offsets: list[int]) -> bytes:
    return struct.pack(f"<{len(offsets)}Q", *offsets)


def tar_index_name(tar_name: str) -> str:
    return tar_name.removesuffix(".tar") + ".tar.idx"


def metadata_schema(metadata: Iterable[dict], chunk: int = 10_000) -> pa.Schema:
    """One Arrow schema over every sample's ``json`` member: a field null in the first samples and
    text later is text, a key some samples lack is still there (the loaders infer from the first
    few samples otherwise, and fail on the first later sample that differs)."""
    schemas, pending = [], []
    for meta in metadata:
        pending.append(meta)
        if len(pending) >= chunk:
            schemas.append(_schema_of(pending))
            pending = []
    if pending or not schemas:
        schemas.append(_schema_of(pending))
    return pa.unify_schemas(schemas, promote_options="permissive")


def _schema_of(dicts: list[dict]) -> pa.Schema:
    # pa.array infers one struct over every dict's keys (Table.from_pylist takes the first row's).
    return pa.schema(list(pa.array(dicts, type=None).type)) if dicts else pa.schema([])


def hf_feature(dtype: pa.DataType) -> dict[str, Any]:
    """A Hugging Face ``datasets`` feature, as its dataset card YAML writes it, for an Arrow type."""
    if pa.types.is_struct(dtype):
        return {"struct": [{"name": f.name, **hf_feature(f.type)} for f in dtype]}
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        inner = hf_feature(dtype.value_type)
        return {"list": inner.get("dtype") or inner.get("struct") or inner}
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return {"dtype": "string"}
    if pa.types.is_floating(dtype):
        return {"dtype": f"float{dtype.bit_width}"}
    if pa.types.is_integer(dtype) or pa.types.is_boolean(dtype) or pa.types.is_null(dtype):
        return {"dtype": str(dtype)}
    return {"dtype": "string"}  # anything else was written to JSON as text (default=str)

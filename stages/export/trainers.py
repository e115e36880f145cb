"""What trainers look for beside a WebDataset export's tars, so they load the folder as it is.

- Megatron-Energon (Megatron, NeMo): ``.nv-meta/`` with ``dataset.yaml`` (the sample type and
  which member fills which field), ``split.yaml`` (the shards of each split), ``.info.json`` and
  ``.info.yaml`` (samples per shard), and one ``NAME.tar.idx`` per tar (stages/shared/tarindex.py).
- Hugging Face ``datasets``: ``README.md`` with a dataset card whose ``configs`` name the tars of
  each split, so ``load_dataset(folder)`` picks the WebDataset builder instead of reading the
  wids indexes and the manifest as JSON data.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import yaml

from facecap.pipeline.storage import Storage

NV_META = ".nv-meta"


def write_energon_meta(out: Storage, shards: dict[str, list[dict]]) -> None:
    """``.nv-meta/``: a CaptioningSample (image from ``jpg``, caption from ``txt``) per sample."""
    counts = {shard["url"]: int(shard["nsamples"]) for split in shards.values() for shard in split}
    dataset = {
        "sample_type": {"__module__": "megatron.energon", "__class__": "CaptioningSample"},
        "field_map": {"image": "jpg", "caption": "txt"},
    }
    splits = {"split_parts": {split: [s["url"] for s in listed] for split, listed in shards.items()}, "exclude": []}
    out.write_bytes(f"{NV_META}/dataset.yaml", yaml.safe_dump(dataset, sort_keys=False).encode())
    out.write_bytes(f"{NV_META}/split.yaml", yaml.safe_dump(splits, sort_keys=False).encode())
    out.write_bytes(f"{NV_META}/.info.json", json.dumps({"shard_counts": counts}, indent=1).encode())
    out.write_bytes(f"{NV_META}/.info.yaml", yaml.safe_dump({"shard_counts": counts}, sort_keys=False).encode())


def dataset_card(name: str, splits: list[str], metadata: pa.Schema, prefix: str = "") -> str:
    """A Hugging Face dataset card: ``configs`` point each split at its tars, and ``dataset_info``
    declares the features (the image, the caption and every field of the ``json`` member), which
    the WebDataset builder would otherwise guess from the first five samples."""
    data_files = [{"split": split, "path": f"{prefix}{split}-*.tar"} for split in splits]
    features = [
        {"name": "__key__", "dtype": "string"},
        {"name": "__url__", "dtype": "string"},
        {"name": "jpg", "dtype": "image"},
        {"name": "txt", "dtype": "string"},
        {"name": "json", **hf_feature(pa.struct(list(metadata)))},
    ]
    card = {
        "configs": [{"config_name": "default", "data_files": data_files}],
        "dataset_info": {"config_name": "default", "features": features},
    }
    header = yaml.safe_dump(card, sort_keys=False)
    return (
        f"---\n{header}---\n\n# {name}\n\n"
        "WebDataset shards written by `facecap export`: per sample `KEY.jpg` (the face crop), `KEY.txt` "
        "(the caption) and `KEY.json` (box, landmarks, attributes, caption provenance, source).\n"
        "`datasets.load_dataset(<this folder>)` reads them with the WebDataset builder; the wids indexes "
        f"({', '.join(f'`{prefix}{s}.json`' for s in splits)}) and `.nv-meta/` (Megatron-Energon) sit beside them.\n"
    )


def metadata_schema(metadata: Iterable[dict], chunk: int = 10_000) -> pa.Schema:
    """One Arrow schema over every sample's ``json`` member: a field null in the first samples and
    text later is text, a key some samples lack is still there (the loaders infer from the first
    few samples otherwise, and fail on the first later sample that differs)."""
    schemas, pending = [], []
    for meta in metadata:
        pending.append(meta)
        if len(pending) >= chunk:
            schemas.append(pa.Table.from_pylist(pending).schema)
            pending = []
    if pending or not schemas:
        schemas.append(pa.Table.from_pylist(pending).schema)
    return pa.unify_schemas(schemas, promote_options="permissive")


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

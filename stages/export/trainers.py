"""What trainers look for beside a WebDataset export's tars, so they load the folder as it is.

- Megatron-Energon (Megatron, NeMo): ``.nv-meta/`` with ``dataset.yaml`` (the sample type and
  which member fills which field), ``split.yaml`` (the shards of each split), ``.info.json`` and
  ``.info.yaml`` (samples per shard), and one ``NAME.tar.idx`` per tar (stages/shared/trainers.py).
- Hugging Face ``datasets``: ``README.md`` with a dataset card whose ``configs`` name the tars of
  each split, so ``load_dataset(folder)`` picks the WebDataset builder instead of reading the
  wids indexes and the manifest as JSON data.
"""

from __future__ import annotations

import json

import pyarrow as pa
import yaml

from facecap.pipeline.storage import Storage
from facecap.stages.shared.trainers import hf_feature

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


def dataset_card(name: str, splits: list[str], metadata: pa.Schema | None, prefix: str = "") -> str:
    """A Hugging Face dataset card: ``configs`` point each split at its tars, and ``dataset_info``
    declares the features (the image, the caption and every field of the ``json`` member), which
    the WebDataset builder would otherwise guess from the first five samples. Without ``metadata``
    (a field whose values have no common type) the features are left to that guess."""
    data_files = [{"split": split, "path": f"{prefix}{split}-*.tar"} for split in splits]
    card: dict = {"configs": [{"config_name": "default", "data_files": data_files}]}
    if metadata is not None:
        features = [
            {"name": "__key__", "dtype": "string"},
            {"name": "__url__", "dtype": "string"},
            {"name": "jpg", "dtype": "image"},
            {"name": "txt", "dtype": "string"},
            {"name": "json", **hf_feature(pa.struct(list(metadata)))},
        ]
        card["dataset_info"] = {"config_name": "default", "features": features}
    header = yaml.safe_dump(card, sort_keys=False)
    return (
        f"---\n{header}---\n\n# {name}\n\n"
        "WebDataset shards written by `facecap export`: per sample `KEY.jpg` (the face crop), `KEY.txt` "
        "(the caption) and `KEY.json` (box, landmarks, attributes, caption provenance, source).\n"
        "`datasets.load_dataset(<this folder>)` reads them with the WebDataset builder; the wids indexes "
        f"({', '.join(f'`{prefix}{s}.json`' for s in splits)}) and `.nv-meta/` (Megatron-Energon) sit beside them.\n"
    )

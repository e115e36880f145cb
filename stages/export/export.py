"""Export a finished dataset for trainers: WebDataset shards with a wids index, or FaceCaption
v2-compatible Parquet.

Only ``ok`` rows are exported. WebDataset samples are ``KEY.jpg`` (the chosen crop), ``KEY.txt``
(the chosen caption) and ``KEY.json`` (every metadata column: box, landmarks, attributes, quality,
provenance, source URL, licence where known). Rows are shuffled globally with a seed and dealt
into shards of ``shard_samples`` (or fewer when ``shard_bytes`` is reached); within a shard members
are sorted by key, so each sample's files are contiguous. An optional validation split is taken by
a stable hash of the key, or of the identity cluster so no identity is in both splits. With an
opt-out list (``opt_out``, docs/dedup.md) the faces of the people on it are left out: each ok
row's aligned 112 crop is embedded and matched, so a dataset made before a person opted out
exports without them.

Memory: the metadata of every exported row is held once (about 1-2 KB a face); images are
streamed shard by shard from the stage tars they live in.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from facecap.pipeline.dataset import Dataset, SpooledTar, TarShardReader, config_hash
from facecap.pipeline.errors import FacecapError
from facecap.pipeline.status import OK
from facecap.pipeline.storage import Storage, StorageOptions, refuse_overlap
from facecap.stages.export.trainers import dataset_card, write_energon_meta
from facecap.stages.shared.trainers import metadata_schema, tar_index, tar_index_name

SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
# Columns not worth a trainer's JSON: internal bookkeeping of the stages (and timings, which differ run to run).
SKIP_COLUMNS = {"status", "error", "source_file", "source_row", "fetch_seconds", "attempts", "reencoded", "quality_ms"}
MAX_SHARD_SAMPLES = 1_000_000


@dataclass
class ExportSettings:
    format: Literal["webdataset", "parquet"] = "webdataset"
    crop: Literal["square", "aligned", "box", "aligned112"] = "square"
    caption: Literal["first", "short"] = "first"
    shard_samples: int = 10_000
    shard_bytes: int | None = None
    seed: int = 0
    val_fraction: float = 0.0
    split_by: Literal["key", "identity"] = "key"
    prefix: str = ""

    def check(self) -> None:
        if not 1 <= self.shard_samples <= MAX_SHARD_SAMPLES:
            raise FacecapError(f"export: shard size {self.shard_samples} must be 1..{MAX_SHARD_SAMPLES}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise FacecapError("export: the validation fraction must be in [0, 1)")


@dataclass
class ExportResult:
    output: str
    samples: dict[str, int] = field(default_factory=dict)
    shards: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    skipped_existing: int = 0
    opted_out: int = 0


def export(
    source: str,
    output: str,
    settings: ExportSettings,
    options: StorageOptions | None = None,
    opt_out: str | None = None,
) -> ExportResult:
    settings.check()
    options = options or StorageOptions.from_env()
    dataset = Dataset.at(source, options)
    manifest = dataset.require_manifest()
    if not manifest.complete:
        raise FacecapError(f"{source}: its '{manifest.stage}' run did not finish; run it again before exporting")
    # Writing into the dataset (or a folder holding it) would replace its manifest and shards.
    refuse_overlap(output, [dataset.uri, *(ref.root for ref in manifest.media.values())])
    rows, origin = _ok_rows(dataset)
    opted_out = _opted_out(dataset, manifest, rows, origin, opt_out) if opt_out else np.zeros(rows.num_rows, bool)
    rows, origin = rows.filter(pa.array(~opted_out)), origin[~opted_out]
    out = Storage(output, options)
    basis = {"source": dataset.uri, "source_config": manifest.config_hash, "settings": asdict(settings)}
    if opt_out:  # another list (or more people on it) is another export
        basis["opt_out_sha256"] = hashlib.sha256(Path(opt_out).read_bytes()).hexdigest()
    identity = config_hash(basis)
    previous = out.read_json("_manifest.json")
    if previous and previous.get("config_hash") != identity:
        raise FacecapError(f"{output} holds an export made from other settings or input; choose another folder")
    splits = _split(rows, settings)
    result = ExportResult(output=out.root, opted_out=int(opted_out.sum()))
    for split, positions in splits.items():
        order = np.random.default_rng(settings.seed).permutation(positions) if len(positions) else positions
        if settings.format == "webdataset":
            shards = _write_webdataset(dataset, manifest, rows, origin, order, split, out, settings, result)
            index = {
                "__kind__": "wids-shard-index-v1",
                "wids_version": 1,
                "name": f"{manifest.recipe.get('name', 'facecap') if manifest.recipe else 'facecap'}-{split}",
                "shardlist": shards,
            }
            out.write_bytes(f"{settings.prefix}{split}.json", json.dumps(index, indent=1).encode())
        else:
            shards = _write_parquet(rows, order, split, out, settings)
        result.shards[split] = shards
        result.samples[split] = int(sum(s["nsamples"] for s in shards))
    if settings.format == "webdataset":
        write_energon_meta(out, result.shards)
        name = manifest.recipe.get("name", "facecap") if manifest.recipe else "facecap"
        try:
            metadata = metadata_schema(_metadata(row, _caption_of(row, settings)[1]) for row in _iter_rows(rows))
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # a JSON field with values of several types
            metadata = None
        out.write_bytes("README.md", dataset_card(name, list(result.shards), metadata, settings.prefix).encode())
    out.write_bytes(
        "_manifest.json",
        json.dumps(
            {
                "kind": "facecap-export",
                "format": settings.format,
                "source": dataset.uri,
                "source_stage": manifest.stage,
                "settings": asdict(settings),
                "config_hash": identity,
                "samples": result.samples,
                "shards": result.shards,
                "time": time.time(),
            },
            indent=1,
        ).encode(),
    )
    return result


def _ok_rows(dataset: Dataset) -> tuple[pa.Table, np.ndarray]:
    """Every ok row (all columns) and the shard each came from."""
    tables, origin = [], []
    for shard in dataset.done_shards():
        table = dataset.read_shard(shard)
        table = table.filter(pc.equal(table.column("status"), OK))
        tables.append(table)
        origin.append(np.full(table.num_rows, shard, np.int32))
    if not tables:
        raise FacecapError(f"{dataset.uri}: no finished shards to export")
    rows = pa.concat_tables(tables, promote_options="permissive")
    bad = [k for k in rows.column("key").to_pylist() if not SAFE_KEY.match(k)]
    if bad:
        raise FacecapError(f"unsafe sample key {bad[0]!r}: keys must be letters, digits, '_' or '-'")
    return rows, np.concatenate(origin)


def _opted_out(dataset: Dataset, manifest, rows: pa.Table, origin: np.ndarray, opt_out: str) -> np.ndarray:
    """Which rows are faces of people on the opt-out list: their aligned 112 crops, embedded and matched."""
    from facecap.pipeline.dataset import shard_name
    from facecap.stages.shared.identity import IDENTITY_COSINE, FaceEmbedder, OptOutList, match
    from facecap.stages.shared.images import decode_bgr

    listing = OptOutList.load(opt_out)
    if not listing.people:
        return np.zeros(rows.num_rows, bool)
    if "aligned112" not in manifest.media:
        raise FacecapError("export --opt-out-embeddings embeds each face's aligned112 crop; this dataset has none")
    embedder = FaceEmbedder(listing.model)
    listing.check_model(embedder.model, embedder.sha256, "this machine's model file")
    keys = rows.column("key").to_pylist()
    vectors = np.zeros((len(keys), listing.vectors.shape[1]), np.float32)
    ref = manifest.media["aligned112"]
    member = ref.member_ext("aligned112")
    for shard in np.unique(origin):
        tar = ref.tar_for(int(shard)) or f"{shard_name(int(shard))}.tar"
        with TarShardReader(Storage(ref.root, dataset.storage.options), tar) as reader:
            for position in np.flatnonzero(origin == shard):
                crop = decode_bgr((reader.get(keys[position], [member]) or {}).get(member))
                if crop is None:
                    raise FacecapError(
                        f"{keys[position]}: its aligned112 crop is missing, so its consent cannot be checked"
                    )
                vectors[position] = embedder.embed(crop)
    person, _ = match(vectors, listing, IDENTITY_COSINE)
    return person >= 0


def _iter_rows(rows: pa.Table) -> Iterator[dict[str, Any]]:
    for batch in rows.to_batches(max_chunksize=10_000):
        yield from batch.to_pylist()


def _split(rows: pa.Table, settings: ExportSettings) -> dict[str, np.ndarray]:
    positions = np.arange(rows.num_rows)
    if settings.val_fraction <= 0:
        return {"train": positions}
    if settings.split_by == "identity":
        if "identity_cluster" not in rows.column_names:
            raise FacecapError("export --split-by identity needs identity clusters: run dedup with kind 'identity'")
        basis = [str(v) for v in rows.column("identity_cluster").to_pylist()]
    else:
        basis = rows.column("key").to_pylist()
    bucket = np.array([int.from_bytes(hashlib.sha256(b.encode()).digest()[:4], "big") / 2**32 for b in basis])
    validation = bucket < settings.val_fraction
    return {"train": positions[~validation], "val": positions[validation]}


def _caption_of(row: dict[str, Any], settings: ExportSettings) -> tuple[str, str]:
    captions = row.get("caption")
    if settings.caption == "short" and row.get("caption_short"):
        return str(row["caption_short"]), "caption_short"
    if captions is not None and len(captions):
        return str(captions[0]), "caption"
    if row.get("caption_short"):
        return str(row["caption_short"]), "caption_short"
    return str(row.get("alt_text") or ""), "alt_text"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, bytes):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _metadata(row: dict[str, Any], caption_source: str) -> dict[str, Any]:
    meta = {k: _json_safe(v) for k, v in row.items() if k not in SKIP_COLUMNS}
    for column in ("caption_provenance", "attr_backends", "caption_versions"):
        if isinstance(meta.get(column), str):
            with contextlib.suppress(ValueError):  # not JSON after all: keep the text
                meta[column] = json.loads(meta[column])
    meta["caption_source"] = caption_source
    return meta


def _crop_reader_factory(dataset: Dataset, manifest, settings: ExportSettings):
    ref = manifest.media.get(settings.crop)
    if ref is None:
        stored = ", ".join(sorted(n for n in manifest.media if n != "image")) or "none"
        raise FacecapError(
            f"export --crop {settings.crop}: the dataset stores no '{settings.crop}' crops (stored: {stored}); "
            "choose one of those or rerun detect with it in detect.crops"
        )
    member = ref.member_ext(settings.crop)

    def reader(shard: int) -> TarShardReader:
        from facecap.pipeline.dataset import shard_name

        return TarShardReader(
            Storage(ref.root, dataset.storage.options), ref.tar_for(shard) or f"{shard_name(shard)}.tar"
        )

    return reader, member


def _sample_sizes(rows, origin, open_reader, member, settings: ExportSettings) -> np.ndarray:
    """Bytes each sample takes in a tar: its crop (from the source tar's headers), caption and JSON,
    three member headers and their padding. Measured, not assumed: crops vary tenfold in size."""
    sizes = np.zeros(rows.num_rows, np.int64)
    keys = rows.column("key").to_pylist()
    for shard in np.unique(origin):
        positions = np.flatnonzero(origin == shard)
        with open_reader(int(shard)) as reader:
            for position, row in zip(positions, rows.take(pa.array(positions)).to_pylist(), strict=True):
                text, source = _caption_of(row, settings)
                meta = json.dumps(_metadata(row, source), ensure_ascii=False, default=str).encode()
                parts = [reader.size_of(keys[position], member) or 0, len(text.encode()), len(meta)]
                sizes[position] = sum(TAR_BLOCK + -(-part // TAR_BLOCK) * TAR_BLOCK for part in parts)
    return sizes


TAR_BLOCK = 512


def _write_webdataset(dataset, manifest, rows, origin, order, split, out, settings, result) -> list[dict[str, Any]]:
    open_reader, member = _crop_reader_factory(dataset, manifest, settings)
    sizes = _sample_sizes(rows, origin, open_reader, member, settings) if settings.shard_bytes else None
    shards: list[dict[str, Any]] = []
    for number, chunk in enumerate(_chunks(order, settings, sizes)):
        name = f"{settings.prefix}{split}-{number:06d}.tar"
        done = out.read_json(f"_done/{name}.json")
        if done and out.size(name) == done["size"]:
            shards.append({"url": name, "nsamples": done["nsamples"]})
            result.skipped_existing += 1
            continue
        spool = SpooledTar()
        try:
            by_shard: dict[int, list[int]] = {}
            for position in chunk:
                by_shard.setdefault(int(origin[position]), []).append(int(position))
            for shard, positions in sorted(by_shard.items()):
                with open_reader(shard) as reader:
                    for row in rows.take(pa.array(positions)).to_pylist():
                        crop = reader.get(row["key"], [member]) or {}
                        if member not in crop:
                            raise FacecapError(f"{row['key']}: its {settings.crop} crop is missing from shard {shard}")
                        text, source = _caption_of(row, settings)
                        meta = json.dumps(_metadata(row, source), ensure_ascii=False, default=str).encode()
                        spool.add(row["key"], {"jpg": crop[member], "txt": text.encode(), "json": meta})
            with out.open_write(name) as stream:
                digest = spool.write_sorted(stream)
            out.write_bytes(tar_index_name(name), tar_index(spool.sample_offsets))
        finally:
            spool.close()
        out.write_bytes(f"_done/{name}.json", json.dumps({"size": digest.size, "nsamples": len(chunk)}).encode())
        shards.append({"url": name, "nsamples": len(chunk)})
    return shards


def _chunks(order: np.ndarray, settings: ExportSettings, sizes: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """The shuffled rows dealt into shards: ``shard_samples`` each, or with a byte target as many as
    fit in ``shard_bytes`` by their measured ``sizes`` (at least one sample a shard)."""
    if settings.shard_bytes is None or sizes is None:
        for start in range(0, len(order), settings.shard_samples):
            yield order[start : start + settings.shard_samples]
        return
    start = 0
    while start < len(order):
        filled = np.cumsum(sizes[order[start : start + settings.shard_samples]])
        count = max(1, int(np.searchsorted(filled, settings.shard_bytes, side="right")))
        yield order[start : start + count]
        start += count


def _write_parquet(rows, order, split, out, settings) -> list[dict[str, Any]]:
    shards = []
    for number, start in enumerate(range(0, len(order), settings.shard_samples)):
        part = rows.take(pa.array(order[start : start + settings.shard_samples]))
        table = facecaption_table(part)
        name = f"{settings.prefix}{split}-{number:06d}.parquet"
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        out.write_bytes(name, buffer.getvalue())
        shards.append({"url": name, "nsamples": table.num_rows})
    return shards


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

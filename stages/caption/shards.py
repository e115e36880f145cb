"""``facecap recaption`` on WebDataset tars that are not a facecap dataset: a facecap export, an
img2dataset folder, or anyone's shards (local or ``s3://``, brace patterns, folders).

Each input tar is read in place (members by key, never copied unless new shards are asked for),
its samples' images (``jpg``, ``jpeg``, ``png`` or ``webp``) go through the caption stage's own
captioners, and per input shard the output folder gets:

- ``STEM.captions.parquet``: one row per key and caption version (``key``, ``version``, ``status``,
  ``error``, ``caption``, ``caption_short``, ``captioner``, ``engine``, ``model``, ``revision``,
  ``prompt_sha256``, ``seed``, ``region``, ``box``, ``time``, ``provenance``): the state a rerun
  starts from (``region``: ``face`` when detection on the fly found the face the VLM read);
- ``STEM_facecap.json``: ``{key: {"facecap": newest caption, "facecap_VERSION": caption, ...}}``,
  the per-shard caption file trainers such as Sana read beside a tar (``external_caption_suffixes``);
- with ``write: shards``, ``STEM.tar``: the same samples with ``txt`` replaced by the new caption and
  ``json`` given a ``recaption`` field (caption, version, provenance, the previous ``txt``), its
  Energon ``STEM.tar.idx``, and the input folder's wids indexes and ``.nv-meta/`` where they list
  only recaptioned shards (same names, same counts: they hold for the new tars), and an export's
  dataset card with the ``recaption`` field added to its features.

A caption version is a hash of what decides the text (captioner, engine, model, prompt, seed,
sampling, lengths): a rerun with the same one captions only keys without an ``ok`` caption of that
version (new shards, earlier failures); another prompt or model adds a version beside the old.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import posixpath
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import braceexpand
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

from facecap.pipeline.dataset import SpooledTar, TarShardReader
from facecap.pipeline.errors import FacecapError
from facecap.pipeline.stage import Batch, Stage, StageConfig
from facecap.pipeline.storage import Storage, StorageOptions, refuse_overlap, split
from facecap.stages.caption.stage import CaptionConfig, CaptionStage, _load_prompt
from facecap.stages.shared.trainers import hf_feature, metadata_schema, tar_index, tar_index_name

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
NV_META = ".nv-meta"
NV_META_FILES = ("dataset.yaml", "split.yaml", ".info.json", ".info.yaml")
SIDECAR_SUFFIX = "_facecap"
# What a sample's JSON may hold that must not reach the captioner as an attribute.
NOT_ATTRIBUTES = {"key", "status", "error", "caption", "caption_short", "caption_provenance", "caption_versions"}
SIDECAR_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("version", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("caption", pa.list_(pa.string())),
        ("caption_short", pa.string()),
        ("captioner", pa.string()),
        ("engine", pa.string()),
        ("model", pa.string()),
        ("revision", pa.string()),
        ("prompt_sha256", pa.string()),
        ("seed", pa.int64()),
        ("region", pa.string()),
        ("box", pa.list_(pa.float64())),
        ("time", pa.float64()),
        ("provenance", pa.string()),
    ]
)


@dataclass
class ShardResult:
    name: str
    samples: int = 0
    captioned: int = 0
    failed: int = 0
    skipped: bool = False
    error: str | None = None


@dataclass
class RecaptionResult:
    version: str
    shards: list[ShardResult] = field(default_factory=list)
    # New shards: the input's shard indexes copied beside them (wids, Energon's .nv-meta/).
    carried: list[str] = field(default_factory=list)

    @property
    def captioned(self) -> int:
        return sum(s.captioned for s in self.shards)


# --- input ---------------------------------------------------------------------------------------
def expand_shards(spec: str, options: StorageOptions | None = None) -> list[str]:
    """The tar URIs ``spec`` names: a tar, a brace pattern (``shards-{000000..000099}.tar``), a glob,
    or a folder (its ``*.tar``, as in an export or an img2dataset output), local or ``s3://``."""
    found: list[str] = []
    for item in braceexpand.braceexpand(spec):
        folder, name = split(item)
        if any(c in name for c in "*?["):
            storage = Storage(folder, options)
            found += [storage.uri(n) for n in storage.list() if fnmatch.fnmatch(n, name)]
        elif item.endswith(".tar"):
            storage = Storage(folder, options)
            if not storage.exists(name):
                raise FacecapError(f"recaption: no such shard {item}")
            found.append(storage.uri(name))
        else:
            storage = Storage(item, options)
            found += [storage.uri(n) for n in storage.list() if n.endswith(".tar")]
    if not found:
        raise FacecapError(f"recaption: {spec} names no WebDataset tars (*.tar)")
    twice = sorted(stem for stem, count in Counter(_stem(uri) for uri in found).items() if count > 1)
    if twice:
        raise FacecapError(f"recaption: two input shards are both named {twice[0]}.tar; give one folder at a time")
    return found


def _stem(uri: str) -> str:
    return posixpath.basename(uri).removesuffix(".tar")


def _image_of(members: dict[str, bytes]) -> tuple[str, bytes] | None:
    """The sample's image: its first jpg, jpeg, png or webp member (``JPG`` too)."""
    by_ext = {ext.lower(): data for ext, data in members.items()}
    for ext in IMAGE_EXTS:
        if ext in by_ext:
            return ext, by_ext[ext]
    return None


def _as_jpeg(ext: str, data: bytes) -> bytes:
    """The engines send JPEG: a png or webp image is re-encoded for the request (the tar is untouched);
    an image that does not decode raises."""
    if ext in ("jpg", "jpeg"):
        return data
    with Image.open(io.BytesIO(data)) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "JPEG", quality=95)
        return buffer.getvalue()


def _attributes(members: dict[str, bytes]) -> dict[str, Any]:
    """The sample's JSON fields (a facecap export's attributes feed the template captioner)."""
    raw = members.get("json")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    return {k: v for k, v in meta.items() if k not in NOT_ATTRIBUTES} if isinstance(meta, dict) else {}


class FaceFinder:
    """Face detection on the fly, for shards without face metadata: the registered detect stage
    (handed over by the command, which finds it by name; no stage imports another) keeps each
    image's largest confident face and cuts the crop the VLM reads (``caption.vlm.image``)."""

    def __init__(self, stage_cls: type[Stage], config: StageConfig, crop: str):
        self.crop = crop
        # Detect's own fields: one face per image, only the crop the captioner needs.
        self.config = config.model_copy(update={"multi_face": "largest", "crops": [crop]})
        stage_cls.preflight(self.config)
        self.stage = stage_cls(self.config)
        self.stage.setup()

    def describe(self) -> dict[str, Any]:
        return {"crop": self.crop, "detect": self.config.model_dump(mode="json")}

    def faces(self, images: dict[str, bytes]) -> dict[str, tuple[bytes, list[float]]]:
        """image key -> (its largest face's crop, the box in original pixels); no entry: no usable face."""
        if not images:
            return {}
        output = self.stage.process(Batch(rows=pd.DataFrame({"key": list(images)}), media={"image": images}))
        found = {}
        for row in output.rows.to_dict("records"):
            if row["status"] == "ok" and self.crop in output.media.get(row["key"], {}):
                found[row["image_key"]] = (output.media[row["key"]][self.crop], [float(v) for v in row["box"]])
        return found


# --- versions ------------------------------------------------------------------------------------
def caption_version(config: CaptionConfig, faces: FaceFinder | None = None) -> str:
    """What decides a caption's text, hashed: the same captioner, model, prompt, seed and face
    detection give the same version."""
    decides: dict[str, Any] = {"captioner": config.captioner, "seed": config.seed, "max_words": config.max_words}
    if faces is not None:
        decides["faces"] = faces.describe()
    if config.captioner == "template":
        decides["template"] = config.template.model_dump()
    else:
        decides.update(
            engine=config.engine,
            model=config.model,
            prompt=_load_prompt(config),
            sampling=config.sampling.model_dump(),
            vlm=config.vlm.model_dump() if config.captioner == "vlm" else None,
        )
    return hashlib.sha256(json.dumps(decides, sort_keys=True).encode()).hexdigest()[:12]


# --- the run -------------------------------------------------------------------------------------
def recaption_shards(
    spec: str,
    output: str,
    config: CaptionConfig,
    write: Literal["sidecars", "shards"] = "sidecars",
    options: StorageOptions | None = None,
    report: Callable[[ShardResult], None] | None = None,
    detect: tuple[type[Stage], StageConfig] | None = None,
) -> RecaptionResult:
    """Caption the samples of the tars ``spec`` names into ``output``; with ``detect`` (the detect
    stage and its config), each image's largest face is found first and its crop captioned."""
    options = options or StorageOptions.from_env()
    tars = expand_shards(spec, options)
    if write == "shards":  # new tars under the same names must not replace the inputs
        refuse_overlap(output, sorted({split(uri)[0] for uri in tars}))
    CaptionStage.preflight(config)
    faces = None
    if detect is not None:
        if config.captioner != "vlm" or config.vlm.image == "image":
            raise FacecapError(
                "recaption --faces: only a vlm captioner reading a face crop (caption.vlm.image) uses faces"
            )
        faces = FaceFinder(*detect, crop=config.vlm.image)
    version = caption_version(config, faces)
    out = Storage(output, options)
    result = RecaptionResult(version=version)
    stage: CaptionStage | None = None
    for uri in tars:
        stem = _stem(uri)
        done = out.read_json(f"_done/{stem}.json")
        source_size = Storage(split(uri)[0], options).size(split(uri)[1])
        if _finished(done, version, source_size, out, stem, write):
            shard = ShardResult(stem, samples=done["samples"], skipped=True)
        else:
            if stage is None:
                stage = CaptionStage(config)
                stage.setup()
            shard = _recaption_one(uri, stem, out, stage, version, write, options, faces)
            if shard.error is None:
                marker = {"source": uri, "source_size": source_size, "samples": shard.samples, "write": write}
                marker["versions"] = {**((done or {}).get("versions") or {}), version: {"failed": shard.failed}}
                if write == "shards":
                    marker["tar_size"] = out.size(f"{stem}.tar")
                out.write_bytes(f"_done/{stem}.json", json.dumps(marker, indent=1).encode())
        result.shards.append(shard)
        if report:
            report(shard)
    if write == "shards":
        result.carried = carry_indexes(tars, out, options)
    return result


def _finished(done: dict | None, version: str, source_size: int | None, out: Storage, stem: str, write: str) -> bool:
    """Nothing to do: this version captioned every key of this very input (and its tar is written)."""
    if not done or done.get("source_size") != source_size or done.get("versions", {}).get(version, {}).get("failed"):
        return False
    if version not in done.get("versions", {}):
        return False
    return write != "shards" or (done.get("write") == "shards" and out.size(f"{stem}.tar") == done.get("tar_size"))


def _recaption_one(
    uri: str,
    stem: str,
    out: Storage,
    stage: CaptionStage,
    version: str,
    write: str,
    options: StorageOptions,
    faces: FaceFinder | None,
) -> ShardResult:
    shard = ShardResult(stem)
    folder, name = split(uri)
    with TarShardReader(Storage(folder, options), name) as reader:
        if reader.error and not reader.stored_keys():
            shard.error = reader.error
            return shard
        keys = reader.stored_keys()
        shard.samples = len(keys)
        previous = _read_sidecar(out, stem)
        have = set(previous.loc[(previous.version == version) & (previous.status == "ok"), "key"])
        pending = [k for k in keys if k not in have]
        fresh = (
            _caption(reader, pending, stage, version, faces) if pending else pd.DataFrame(columns=SIDECAR_SCHEMA.names)
        )
        shard.captioned = int((fresh.status == "ok").sum()) if len(fresh) else 0
        shard.failed = int((fresh.status != "ok").sum()) if len(fresh) else 0
        redone = set(fresh.key) if len(fresh) else set()
        kept = previous[~((previous.version == version) & previous.key.isin(redone))]
        table = pd.concat([kept, fresh], ignore_index=True) if len(fresh) else kept
        table = table.sort_values(["key", "time"], kind="stable").reset_index(drop=True)
        _write_sidecars(out, stem, table)
        if write == "shards":
            _write_shard(out, stem, reader, keys, table)
    return shard


def _caption(
    reader: TarShardReader, keys: list[str], stage: CaptionStage, version: str, faces: FaceFinder | None
) -> pd.DataFrame:
    """Caption ``keys`` of one tar with the stage's captioner: one sidecar row per key."""
    config = stage.config
    media_name = config.vlm.image
    # The grammar has no engine to feed: large batches spare the per-batch DataFrame work. A server
    # gets at least its `concurrency` requests at a time (shards are captioned one after another).
    batch_size = config.batch_size or stage.spec(config).resources.batch_size
    if not config.batch_size and config.captioner == "template":
        batch_size = 1024
    elif not config.batch_size and config.engine == "openai":
        batch_size = max(batch_size, config.openai.concurrency)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(keys), batch_size):
        records, images = [], {}
        for key in keys[start : start + batch_size]:
            members = reader.get(key) or {}
            image = _image_of(members)
            if image is None and config.captioner == "vlm":
                rows.append(_row(key, version, "caption:missing_media", "no jpg, jpeg, png or webp member"))
                continue
            if image is not None and config.captioner == "vlm":
                images[key] = image
            records.append({**_attributes(members), "key": key, "image_key": key})
        if not records:
            continue
        regions: dict[str, tuple[str | None, list[float] | None]] = {}
        media: dict[str, bytes] = {}
        try:
            found = faces.faces({k: data for k, (_, data) in images.items()}) if faces else {}
            for key, image in images.items():
                if key in found:
                    media[key], box = found[key]
                    regions[key] = ("face", box)
                    continue
                try:
                    media[key], regions[key] = _as_jpeg(*image), ("image", None)
                except (OSError, ValueError) as exc:  # PIL's "cannot identify image file", truncation
                    rows.append(_row(key, version, "caption:undecodable", f"{image[0]} image: {exc}"))
            records = [r for r in records if r["key"] in media or config.captioner != "vlm"]
            if not records:
                continue
            output = stage.process(Batch(rows=pd.DataFrame(records), media={media_name: media})).rows
        except Exception as exc:  # the captioner raised for this batch: its keys are retried on the next run
            rows += [_row(r["key"], version, "caption:error", f"{type(exc).__name__}: {exc}") for r in records]
            continue
        for record in output.to_dict("records"):
            region, box = regions.get(record["key"], (None, None))
            rows.append({**_captioned_row(record, version), "region": region, "box": box})
    return pd.DataFrame(rows, columns=SIDECAR_SCHEMA.names)


def _row(key: str, version: str, status: str, error: str | None) -> dict[str, Any]:
    return {"key": key, "version": version, "status": status, "error": error, "time": time.time()}


def _captioned_row(record: dict[str, Any], version: str) -> dict[str, Any]:
    provenance = json.loads(record["caption_provenance"]) if isinstance(record.get("caption_provenance"), str) else {}
    caption = record.get("caption")
    return {
        **_row(record["key"], version, record["status"], record.get("error")),
        "caption": [str(c) for c in caption] if caption is not None and record["status"] == "ok" else None,
        "caption_short": record.get("caption_short") if record["status"] == "ok" else None,
        "captioner": provenance.get("captioner"),
        "engine": provenance.get("engine"),
        "model": provenance.get("model"),
        "revision": provenance.get("revision"),
        "prompt_sha256": provenance.get("prompt_sha256"),
        "seed": provenance.get("seed"),
        "time": provenance.get("time", time.time()),
        "provenance": record.get("caption_provenance"),
    }


# --- output --------------------------------------------------------------------------------------
def _empty() -> pd.DataFrame:
    return pd.DataFrame(columns=SIDECAR_SCHEMA.names)


def _read_sidecar(out: Storage, stem: str) -> pd.DataFrame:
    name = f"{stem}.captions.parquet"
    if not out.exists(name):
        return _empty()
    with out.open_read(name) as f:
        return pq.read_table(f).to_pandas()


def _write_sidecars(out: Storage, stem: str, table: pd.DataFrame) -> None:
    arrow = pa.Table.from_pandas(table, schema=SIDECAR_SCHEMA, preserve_index=False)
    buffer = io.BytesIO()
    pq.write_table(arrow, buffer, compression="zstd")
    out.write_bytes(f"{stem}.captions.parquet", buffer.getvalue())
    by_key: dict[str, dict[str, str]] = {}
    for row in table[table.status == "ok"].itertuples(index=False):  # sorted by time: the newest comes last
        text = row.caption[0] if row.caption is not None and len(row.caption) else row.caption_short
        entry = by_key.setdefault(row.key, {})
        entry[f"facecap_{row.version}"] = str(text)
        entry["facecap"] = str(text)
    out.write_bytes(f"{stem}{SIDECAR_SUFFIX}.json", json.dumps(by_key, ensure_ascii=False).encode())


def _write_shard(out: Storage, stem: str, reader: TarShardReader, keys: list[str], table: pd.DataFrame) -> None:
    """The input shard again, each captioned sample's ``txt`` the newest caption and its ``json`` a
    ``recaption`` field; a sample with no caption yet keeps its members as they were."""
    newest = table[table.status == "ok"].drop_duplicates("key", keep="last").set_index("key")
    spool = SpooledTar()
    try:
        for key in keys:
            members = dict(reader.get(key) or {})
            if key in newest.index:
                old_txt = members.get("txt")
                try:
                    meta = json.loads(members["json"]) if "json" in members else {}
                except ValueError:
                    meta = {}
                meta = meta if isinstance(meta, dict) else {"original_json": meta}
                meta["recaption"] = _recaption_field(newest.loc[key], old_txt)
                members["txt"] = meta["recaption"]["caption"][0].encode()
                members["json"] = json.dumps(meta, ensure_ascii=False).encode()
            spool.add(key, members)
        with out.open_write(f"{stem}.tar") as stream:
            spool.write_sorted(stream)
        out.write_bytes(tar_index_name(f"{stem}.tar"), tar_index(spool.sample_offsets))
    finally:
        spool.close()


def _recaption_field(row: Any, old_txt: bytes | None) -> dict[str, Any]:
    """The ``recaption`` field of a new shard's ``json``: the newest caption of the key and its provenance."""
    caption = [str(c) for c in row.caption] if row.caption is not None else [str(row.caption_short)]
    return {
        "caption": caption,
        "caption_short": row.caption_short,
        "version": row.version,
        "provenance": json.loads(row.provenance) if isinstance(row.provenance, str) else None,
        "previous_txt": old_txt.decode("utf-8", "replace") if old_txt is not None else None,
    }


def carry_indexes(tars: list[str], out: Storage, options: StorageOptions | None = None) -> list[str]:
    """New shards keep the names and sample counts of the old, so the input folder's shard indexes
    hold for them too: its wids indexes (``*.json``) and Energon's ``.nv-meta/`` are copied when
    every shard they list was recaptioned. Returns the names copied."""
    folders = {split(uri)[0] for uri in tars}
    if len(folders) != 1:
        return []
    source = Storage(folders.pop(), options)
    names = {posixpath.basename(uri) for uri in tars}
    carried = []
    for name in source.list():
        index = source.read_json(name) if name.endswith(".json") else None
        wids = isinstance(index, dict) and index.get("__kind__") == "wids-shard-index-v1"
        if wids and {str(s.get("url")) for s in index.get("shardlist", [])} <= names:
            carried.append(name)
    info = source.read_json(f"{NV_META}/.info.json")
    if isinstance(info, dict) and set(info.get("shard_counts", {})) <= names:
        carried += [f"{NV_META}/{n}" for n in NV_META_FILES if source.exists(f"{NV_META}/{n}")]
    for name in carried:
        out.write_bytes(name, source.read_bytes(name))
    if f"{NV_META}/.info.json" in carried and source.exists("README.md"):  # an export's dataset card
        card = _card_with_recaption(source.read_bytes("README.md").decode(), out, sorted(names))
        if card is not None:
            out.write_bytes("README.md", card.encode())
            carried.append("README.md")
    return carried


def _card_with_recaption(card: str, out: Storage, tar_names: list[str]) -> str | None:
    """An export's Hugging Face dataset card with the ``recaption`` field added to the features of
    ``json`` (its type unified over every recaptioned sample), so ``datasets.load_dataset`` reads
    the new folder as it read the old; None when the card declares no ``json`` struct."""
    if not card.startswith("---\n") or "\n---\n" not in card[4:]:
        return None
    header, _, body = card[4:].partition("\n---\n")
    meta = yaml.safe_load(header) or {}
    features = (meta.get("dataset_info") or {}).get("features") or []
    member = next((f for f in features if f.get("name") == "json" and "struct" in f), None)
    if member is None:
        return None
    fields = []
    for name in tar_names:
        table = _read_sidecar(out, name.removesuffix(".tar"))
        newest = table[table.status == "ok"].drop_duplicates("key", keep="last")
        fields += [{"recaption": _recaption_field(row, b"")} for row in newest.itertuples(index=False)]
    if not fields:
        return None
    recaption = metadata_schema(fields).field("recaption").type
    member["struct"] = [f for f in member["struct"] if f.get("name") != "recaption"]
    member["struct"].append({"name": "recaption", **hf_feature(recaption)})
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n{body}"

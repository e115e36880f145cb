"""Readers that turn outside input into the first dataset's shards.

Two kinds of input:
- URL lists: parquet, csv, tsv, jsonl, txt, each optionally gzipped; one file, a folder or a
  glob (local or ``s3://``). Rows are cut into shards of ``shard_size`` in input order, and the
  key of a row is its position in the whole input, so keys are the same on every run.
- img2dataset output folders (``00000.tar`` + ``00000.parquet`` per shard): one shard each,
  keys and images kept; the images stay where they are and are referenced, not copied.

Rows a reader cannot parse (a CSV line with the wrong number of fields, a JSONL line that is
not a JSON object) are kept with status ``ingest:malformed_row`` so the funnel still adds up.
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from typing import Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from facecap.pipeline.dataset import MediaRef, unsafe_key
from facecap.pipeline.errors import InputError
from facecap.pipeline.source import Source, SourceShard
from facecap.pipeline.stage import StageConfig
from facecap.pipeline.status import OK
from facecap.pipeline.storage import Storage, StorageOptions, is_remote, open_input, split

TEXT_FORMATS = {"csv", "tsv", "jsonl", "txt"}
SUFFIXES = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".txt": "txt",
}
# Names facecap itself gives meaning to; input columns with these names are renamed ``input_*``.
# "caption" too: the caption stage writes it (a list of generated captions), so an input column of
# that name that is not the alt text is kept as input_caption.
RESERVED = {"key", "status", "error", "url", "alt_text", "caption", "source_file", "source_row"}
MALFORMED = "ingest:malformed_row"
# "utf-8-sig" drops the byte-order mark spreadsheet tools put first, which would else stick to the
# first column name (CSV) or make the first line unparsable (JSONL) or an invalid URL (txt).
TEXT_ENCODING = "utf-8-sig"
READ_BATCH = 8192
JSONL_KEY_SAMPLE = 1000

csv.field_size_limit(64 << 20)


class SourceConfig(StageConfig):
    """Where the input is and how to read it (the ``ingest`` section extends this)."""

    input: list[str] = Field(default_factory=list, description="files, folders or globs (local or s3://)")
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl", "txt", "img2dataset"] = "auto"
    url_column: str = Field("url", description="column holding the image URL (LAION: URL)")
    caption_column: str | None = Field(
        "caption", description="input column holding the alt text (LAION: TEXT); stored as alt_text"
    )
    keep_columns: bool = Field(True, description="keep the input's other columns (SAMPLE_ID, NSFW, ...)")
    shard_size: int = Field(10_000, ge=1, le=10_000_000, description="rows per output shard")

    @field_validator("input", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


def open_source(config: SourceConfig, options: StorageOptions | None = None) -> Source:
    if not config.input:
        raise InputError("no input given: pass INPUT (a file, folder or glob) or set ingest.input")
    options = options or StorageOptions.from_env()
    if config.format == "img2dataset" or (
        config.format == "auto" and len(config.input) == 1 and _is_img2dataset(config.input[0], options)
    ):
        return _img2dataset_source(config.input[0], options)
    files = _expand_inputs(config.input, options)
    formats = {f: config.format if config.format != "auto" else _format_of(f) for f in files}
    fingerprint = [(f, _size_of(f, options)) for f in files]
    schema = _unified_schema(files, formats, config, options)

    def shards() -> Iterator[SourceShard]:
        batches = _iter_url_batches(files, formats, config, options, schema)
        for index, table in enumerate(_rechunk(batches, config.shard_size, schema)):
            yield SourceShard(index, table)

    # A named folder is read recursively: an output inside it would be read back as input. A glob's
    # matches are in ``files``.
    roots = [item for item in config.input if not any(ch in item for ch in "*?[")]
    return Source(files=files, kind="urls", fingerprint=fingerprint, shard_iter=shards, roots=roots)


# --- URL lists --------------------------------------------------------------------------------
def _expand_inputs(inputs: list[str], options: StorageOptions) -> list[str]:
    files: list[str] = []
    for item in inputs:
        found = _expand_one(item, options)
        if not found:
            raise InputError(f"{item}: no input files found (expected a file, a folder or a glob)")
        files.extend(found)
    return files


def _expand_one(item: str, options: StorageOptions) -> list[str]:
    has_glob = any(ch in item for ch in "*?[")
    if not is_remote(item):
        item = os.path.abspath(item.removeprefix("file://"))
    if is_remote(item):
        folder = item.split("*", 1)[0].rsplit("/", 1)[0] if has_glob else item
        storage = Storage(folder, options)
        info = storage.fs.get_file_info(storage._path(""))
        if info.type == pafs.FileType.File and not has_glob:
            return [item]
        selector = pafs.FileSelector(storage._path(""), recursive=True, allow_not_found=True)
        names = [i.path for i in storage.fs.get_file_info(selector) if i.type == pafs.FileType.File]
        uris = sorted(f"{item.split('://', 1)[0]}://{n}" for n in names)
        if has_glob:
            return [u for u in uris if fnmatch.fnmatch(u, item)]
        return [u for u in uris if _known_suffix(u)]
    if has_glob:
        return sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
    if os.path.isdir(item):
        found = []
        for root, _dirs, names in os.walk(item):
            found.extend(os.path.join(root, n) for n in names if _known_suffix(n) and not n.startswith("."))
        return sorted(found)
    return [item] if os.path.isfile(item) else []


def _known_suffix(name: str) -> bool:
    base = name.removesuffix(".gz")
    return os.path.splitext(base)[1].lower() in SUFFIXES


def _format_of(uri: str) -> str:
    base = uri.removesuffix(".gz")
    suffix = os.path.splitext(base)[1].lower()
    if suffix not in SUFFIXES:
        raise InputError(f"{uri}: cannot tell the format from the name; use --format (parquet, csv, tsv, jsonl, txt)")
    return SUFFIXES[suffix]


def _size_of(uri: str, options: StorageOptions) -> int | None:
    folder, name = split(uri)
    return Storage(folder, options).size(name)


def _open_parquet(uri: str, options: StorageOptions):
    """Parquet needs random access; a gzipped one is inflated into memory first."""
    if uri.endswith(".gz"):
        with open_input(uri, options) as stream:
            return pa.BufferReader(stream.read())
    folder, name = split(uri)
    return Storage(folder, options).open_read(name)


def _unified_schema(
    files: list[str], formats: dict[str, str], config: SourceConfig, options: StorageOptions
) -> pa.Schema:
    """One schema for every shard: url, alt_text, the kept extra columns, provenance."""
    extras: dict[str, pa.DataType] = {}
    without_urls: dict[str, list[str]] = {}
    for uri in files:
        columns = _input_columns(uri, formats[uri], options)
        names = [name for name, _ in columns]
        if names and config.url_column not in names:
            without_urls[uri] = names
            continue
        for name, dtype in columns:
            out = _output_name(name, config)
            if out in ("url", "alt_text") or not config.keep_columns:
                continue
            if out in extras and extras[out] != dtype:
                extras[out] = pa.string()  # files disagree on the type: keep text, lose nothing
            else:
                extras.setdefault(out, dtype)
    if without_urls and len(without_urls) == len(files):
        # Most likely a wrong --url-column: say so before any output is written.
        uri, names = next(iter(without_urls.items()))
        raise _no_url_column(uri, names, config)
    fields = [
        pa.field("key", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
        pa.field("url", pa.string()),
        pa.field("alt_text", pa.string()),
    ]
    fields += [pa.field(n, t) for n, t in extras.items()]
    fields += [pa.field("source_file", pa.string()), pa.field("source_row", pa.int64())]
    return pa.schema(fields)


def _output_name(name: str, config: SourceConfig) -> str:
    """The column an input column becomes: url, alt_text, ``input_<name>`` for reserved names, or itself."""
    if name == config.url_column:
        return "url"
    if config.caption_column and name == config.caption_column:
        return "alt_text"
    return f"input_{name}" if name in RESERVED else name


class _NoUrlColumn(InputError):
    pass


def _no_url_column(uri: str, names: list[str], config: SourceConfig) -> InputError:
    return _NoUrlColumn(f"{uri}: no column '{config.url_column}' (columns: {', '.join(names)}); set --url-column")


def _rows_without_urls(uri: str, fmt: str, error: str, options: StorageOptions) -> Iterator[pa.Table]:
    """One ``malformed_row`` per data row of a file that has no URL column."""
    if fmt == "parquet":
        with _open_parquet(uri, options) as handle:
            count = pq.ParquetFile(handle).metadata.num_rows
    else:
        with open_input(uri, options) as stream:
            text = io.TextIOWrapper(stream, encoding=TEXT_ENCODING, errors="surrogateescape", newline="")
            if fmt == "jsonl":
                count = sum(1 for line in text if line.strip())
            else:
                count = max(0, sum(1 for fields in _csv_reader(text, "," if fmt == "csv" else "\t") if fields) - 1)
    for start in range(0, count, READ_BATCH):
        n = min(READ_BATCH, count - start)
        yield pa.table(
            {
                "source_row": pa.array(range(start, start + n), pa.int64()),
                "status": pa.array([MALFORMED] * n, pa.string()),
                "error": pa.array([error] * n, pa.string()),
            }
        )


def _input_columns(uri: str, fmt: str, options: StorageOptions) -> list[tuple[str, pa.DataType]]:
    if fmt == "parquet":
        try:
            with _open_parquet(uri, options) as handle:
                schema = pq.read_schema(handle)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{uri}: not a readable Parquet file ({exc})") from None
        return [(f.name, _plain_type(f.type)) for f in schema]
    if fmt == "txt":
        return []
    if fmt in ("csv", "tsv"):
        with open_input(uri, options) as stream:
            text = io.TextIOWrapper(stream, encoding=TEXT_ENCODING, errors="surrogateescape", newline="")
            header = next(_csv_reader(text, "," if fmt == "csv" else "\t"), [])
        return [(_fix_text(h).strip(), pa.string()) for h in header]
    names: dict[str, None] = {}
    with open_input(uri, options) as stream:
        text = io.TextIOWrapper(stream, encoding=TEXT_ENCODING, errors="surrogateescape")
        for i, line in enumerate(text):
            if i >= JSONL_KEY_SAMPLE:
                break
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                names.update(dict.fromkeys(record))
    return [(n, pa.string()) for n in names]


def _plain_type(dtype: pa.DataType) -> pa.DataType:
    return pa.string() if pa.types.is_large_string(dtype) or pa.types.is_dictionary(dtype) else dtype


def _iter_url_batches(
    files: list[str],
    formats: dict[str, str],
    config: SourceConfig,
    options: StorageOptions,
    schema: pa.Schema,
) -> Iterator[pa.Table]:
    for uri in files:
        fmt = formats[uri]
        try:
            tables = _read_parquet(uri, config, options) if fmt == "parquet" else _read_text(uri, fmt, config, options)
            for table in tables:
                yield _conform(table, schema, uri)
        except _NoUrlColumn as missing:
            # One file of many without the URL column: its rows are kept, each saying why.
            for table in _rows_without_urls(uri, fmt, str(missing), options):
                yield _conform(table, schema, uri)


def _read_parquet(uri: str, config: SourceConfig, options: StorageOptions) -> Iterator[pa.Table]:
    try:
        parquet = pq.ParquetFile(_open_parquet(uri, options))
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{uri}: not a readable Parquet file ({exc})") from None
    if config.url_column not in parquet.schema_arrow.names:
        raise _no_url_column(uri, parquet.schema_arrow.names, config)
    # Renamed before facecap's own columns are added, so an input "status" cannot clash with them.
    names = [_output_name(n, config) for n in parquet.schema_arrow.names]
    row = 0
    for batch in parquet.iter_batches(batch_size=READ_BATCH):
        table = pa.Table.from_batches([batch]).rename_columns(names)
        table = table.append_column("source_row", pa.array(range(row, row + table.num_rows), pa.int64()))
        table = table.append_column("status", pa.array([OK] * table.num_rows, pa.string()))
        table = table.append_column("error", pa.nulls(table.num_rows, pa.string()))
        row += table.num_rows
        yield table


def _read_text(uri: str, fmt: str, config: SourceConfig, options: StorageOptions) -> Iterator[pa.Table]:
    rows: list[dict[str, Any]] = []
    for record in _text_records(uri, fmt, config, options):
        rows.append(record)
        if len(rows) >= READ_BATCH:
            yield _records_table(rows)
            rows = []
    if rows:
        yield _records_table(rows)


def _text_records(uri: str, fmt: str, config: SourceConfig, options: StorageOptions) -> Iterator[dict[str, Any]]:
    stream = open_input(uri, options)
    text = io.TextIOWrapper(stream, encoding=TEXT_ENCODING, errors="surrogateescape", newline="")
    with text:
        if fmt == "txt":
            for number, line in enumerate(text):
                url = _fix_text(line).strip()
                if url:
                    yield {"url": url, "source_row": number, "status": OK}
        elif fmt == "jsonl":
            yield from _jsonl_records(text, config)
        else:
            yield from _csv_records(uri, text, "," if fmt == "csv" else "\t", config)


def _csv_reader(text: io.TextIOBase, delimiter: str):
    # TSV (LAION's, img2dataset's) has no quoting: a caption starting with '"' is just text.
    if delimiter == "\t":
        return csv.reader(text, delimiter="\t", quoting=csv.QUOTE_NONE)
    return csv.reader(text, delimiter=delimiter)


def _csv_records(uri: str, text: io.TextIOBase, delimiter: str, config: SourceConfig) -> Iterator[dict]:
    reader = _csv_reader(text, delimiter)
    try:
        header = [_fix_text(h).strip() for h in next(reader)]
    except StopIteration:
        return
    if config.url_column not in header:
        raise _no_url_column(uri, header, config)
    names = [_output_name(h, config) for h in header]
    number = 0
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield {"status": MALFORMED, "error": f"unparsable line: {exc}", "source_row": number}
            number += 1
            continue
        if not fields:
            continue
        record: dict[str, Any] = {"source_row": number, "status": OK}
        if len(fields) != len(header):
            record["status"] = MALFORMED
            record["error"] = f"expected {len(header)} fields, got {len(fields)}"
        for name, value in zip(names, fields, strict=False):
            record[name] = _fix_text(value)
        number += 1
        yield record


def _jsonl_records(text: io.TextIOBase, config: SourceConfig) -> Iterator[dict]:
    for number, line in enumerate(text):
        if not line.strip():
            continue
        try:
            value = json.loads(_fix_text(line))
        except ValueError as exc:
            yield {"status": MALFORMED, "error": f"not JSON: {exc}", "source_row": number}
            continue
        if not isinstance(value, dict):
            yield {
                "status": MALFORMED,
                "error": f"expected a JSON object, got {type(value).__name__}",
                "source_row": number,
            }
            continue
        if config.url_column not in value:
            fields = ", ".join(map(str, value))[:200]
            yield {
                "status": MALFORMED,
                "error": f"no '{config.url_column}' field (fields: {fields})",
                "source_row": number,
            }
            continue
        record = {_output_name(k, config): _jsonl_value(v) for k, v in value.items()}
        record.update(source_row=number, status=OK)
        yield record


def _jsonl_value(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return _valid_unicode(text)


def _valid_unicode(value: str) -> str:
    """A JSON escape can hold half a surrogate pair (a caption cut mid-emoji); Arrow only takes valid UTF-8."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in value)


def _records_table(rows: list[dict[str, Any]]) -> pa.Table:
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        dtype = pa.int64() if name == "source_row" else pa.string()
        columns[name] = pa.array(values, dtype)
    return pa.table(columns)


def _fix_text(value: str) -> str:
    """Bytes that are not UTF-8 were most likely written as Windows-1252; decode them so."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("cp1252", errors="replace")


def _conform(table: pa.Table, schema: pa.Schema, uri: str) -> pa.Table:
    """Cast the reader's columns (already named as facecap names them) to the shared schema."""
    columns = {name: table.column(name) for name in table.column_names}
    n = table.num_rows
    arrays = []
    for f in schema:
        if f.name == "source_file":
            arrays.append(pa.array([uri] * n, pa.string()))
        elif f.name in columns:
            arrays.append(_cast(columns[f.name], f.type))
        else:
            arrays.append(pa.nulls(n, f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _cast(column: pa.ChunkedArray, dtype: pa.DataType) -> pa.ChunkedArray:
    if column.type == dtype:
        return column
    try:
        return column.cast(dtype)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        # Wrong types (a URL column of numbers, say) become text; validation judges them later.
        return pa.array([None if v is None else str(v) for v in column.to_pylist()], dtype)


def _rechunk(batches: Iterator[pa.Table], shard_size: int, schema: pa.Schema) -> Iterator[pa.Table]:
    """Cut the stream of batches into shards of exactly ``shard_size`` rows and assign keys."""
    pending: list[pa.Table] = []
    pending_rows = 0
    first_row = 0
    for batch in batches:
        pending.append(batch)
        pending_rows += batch.num_rows
        while pending_rows >= shard_size:
            merged = pa.concat_tables(pending)
            yield _with_keys(merged.slice(0, shard_size), first_row)
            first_row += shard_size
            rest = merged.slice(shard_size)
            pending, pending_rows = [rest], rest.num_rows
    if pending_rows:
        yield _with_keys(pa.concat_tables(pending), first_row)


def _with_keys(table: pa.Table, first_row: int) -> pa.Table:
    keys = pa.array([f"{i:010d}" for i in range(first_row, first_row + table.num_rows)], pa.string())
    return table.set_column(0, "key", keys).combine_chunks()


# --- img2dataset folders ----------------------------------------------------------------------
IMG2DATASET_RENAMES = {"error_message": "error"}
HTTP_CODE = re.compile(r"\b(403|404|410|429|500|502|503)\b")


def _is_img2dataset(item: str, options: StorageOptions) -> bool:
    if any(ch in item for ch in "*?[") or (not is_remote(item) and not os.path.isdir(item)):
        return False
    try:
        names = Storage(item, options).list()
    except (OSError, InputError):
        return False
    stems_tar = {n[:-4] for n in names if n.endswith(".tar")}
    stems_parquet = {n[:-8] for n in names if n.endswith(".parquet")}
    return bool(stems_tar & stems_parquet)


def _img2dataset_source(folder: str, options: StorageOptions) -> Source:
    storage = Storage(folder, options)
    names = storage.list()
    stems = sorted({n[:-8] for n in names if n.endswith(".parquet")} | {n[:-4] for n in names if n.endswith(".tar")})
    if not stems:
        raise InputError(f"{folder}: no img2dataset shards (NNNNN.parquet + NNNNN.tar) found")
    tars = [f"{s}.tar" for s in stems]
    media = {"image": MediaRef(root=storage.root, tars=tars, ext=_image_extension(storage, tars))}
    fingerprint = [(storage.uri(f"{s}.parquet"), storage.size(f"{s}.parquet")) for s in stems]

    def shards() -> Iterator[SourceShard]:
        for index, stem in enumerate(stems):
            try:
                table = _img2dataset_table(storage, stem)
            except (OSError, pa.ArrowInvalid, KeyError, ValueError) as exc:
                message = f"img2dataset shard {storage.uri(stem + '.parquet')} unreadable: {exc}"
                yield SourceShard(index, None, error=message.replace("\n", " "))
                continue
            yield SourceShard(index, table)

    return Source(
        files=[storage.uri(f"{s}.parquet") for s in stems],
        kind="img2dataset",
        media=media,
        fingerprint=fingerprint,
        shard_iter=shards,
    )


def _image_extension(storage: Storage, tars: list[str]) -> str:
    """img2dataset stores jpg, webp or png (its encode_format); look at the first image member."""
    for name in tars:
        if not storage.size(name):
            continue
        try:
            with storage.open_read(name) as f, tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    ext = member.name.rpartition(".")[2].lower()
                    if ext in ("jpg", "jpeg", "webp", "png"):
                        return ext
        except (tarfile.TarError, OSError):
            continue
    return "jpg"


def _img2dataset_table(storage: Storage, stem: str) -> pa.Table:
    with storage.open_read(f"{stem}.parquet") as f:
        raw = pq.read_table(f)
    if "key" not in raw.column_names or "url" not in raw.column_names:
        raise KeyError(f"{stem}.parquet has no key/url columns (columns: {raw.column_names})")
    raw = raw.sort_by("key")
    n = raw.num_rows
    statuses = raw.column("status").to_pylist() if "status" in raw.column_names else ["success"] * n
    errors = raw.column("error_message").to_pylist() if "error_message" in raw.column_names else [None] * n
    keys = raw.column("key").cast(pa.string()).to_pylist()
    # A key names tar members downstream: one like ../../x must never get that far.
    bad_keys = [unsafe_key(k) for k in keys]
    outcomes = [
        ("ingest:invalid_key", f"{bad}: {str(k)[:80]!r}")
        if bad
        else (_img2dataset_status(s, e), e if s != "success" else None)
        for k, bad, s, e in zip(keys, bad_keys, statuses, errors, strict=True)
    ]
    columns: dict[str, pa.Array] = {
        "key": pa.array(keys, pa.string()),
        "status": pa.array([status for status, _ in outcomes], pa.string()),
        "error": pa.array([error for _, error in outcomes], pa.string()),
        "url": raw.column("url").cast(pa.string()),
        "alt_text": raw.column("caption").cast(pa.string())
        if "caption" in raw.column_names
        else pa.nulls(n, pa.string()),
    }
    for name in raw.column_names:
        if name in ("key", "url", "caption", "status", "error_message"):
            continue
        columns[f"input_{name}" if name in RESERVED else name] = raw.column(name)
    columns["source_file"] = pa.array([storage.uri(f"{stem}.parquet")] * n, pa.string())
    columns["source_row"] = pa.array(range(n), pa.int64())
    return pa.table(columns)


def _img2dataset_status(status: str | None, error: str | None) -> str:
    """img2dataset's outcome in facecap's terms: download failures keep a download: reason."""
    if status == "success":
        return OK
    text = (error or status or "unknown").lower()
    # Whole numbers only: "timed out after 5000 ms" or a pixel count is no HTTP 500.
    code = HTTP_CODE.search(text)
    if code:
        return f"download:http_{code.group(1)}"
    if "timed out" in text or "timeout" in text:
        return "download:timeout"
    if "image decoding" in text or "cannot identify image" in text:
        return "download:undecodable"
    return "download:failed"

"""The one dataset format every stage reads and writes.

A dataset is a folder (local or ``s3://``)::

    _manifest.json            what made it: stage, effective config and hash, parent, media, code version
    part-00000.parquet        one row per sample: metadata, ``key``, ``status``, ``error``
    part-00000.tar            WebDataset members ``KEY.ext`` for the media this stage made (optional)
    _stats/part-00000.json    counts by status and timings for the shard
    _done/part-00000.json     written last: rows, and size + sha256 of every file of the shard
    _failed/part-00000.json   a shard that kept failing: its error and attempts

Shard ``i`` of every stage's dataset holds the rows that came from shard ``i`` of its parent, so
media written by any ancestor is found by shard index and key (see ``MediaRef``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from facecap import __version__
from facecap.pipeline.errors import DatasetError
from facecap.pipeline.redact import redact, redact_text
from facecap.pipeline.status import OK
from facecap.pipeline.storage import Storage, StorageOptions

FORMAT_VERSION = 1
MANIFEST = "_manifest.json"
STATS_DIR = "_stats"
DONE_DIR = "_done"
FAILED_DIR = "_failed"

# Columns every dataset has, in this order, before the stage-specific ones.
BASE_COLUMNS = {"key": pa.string(), "status": pa.string(), "error": pa.string()}


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


def config_hash(payload: Any) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass
class MediaRef:
    """Where the tar members of one media extension live.

    ``root`` is the dataset folder holding the tars; ``tars`` lists the tar file per shard index
    when the names are not ``part-NNNNN.tar`` (img2dataset folders use ``00000.tar``).
    """

    root: str
    tars: list[str] | None = None
    # The tar member extension when it differs from the media's name (media "image" -> ".webp").
    ext: str | None = None

    def member_ext(self, name: str) -> str:
        return self.ext or name

    def tar_for(self, shard: int) -> str | None:
        if self.tars is None:
            return f"{shard_name(shard)}.tar"
        return self.tars[shard] if shard < len(self.tars) else None


@dataclass
class Manifest:
    stage: str
    config: dict[str, Any]
    config_hash: str
    parent: str | None = None
    media: dict[str, MediaRef] = field(default_factory=dict)
    num_shards: int | None = None
    complete: bool = False
    # The whole effective recipe (all sections, after flags), for provenance; not hashed.
    recipe: dict[str, Any] | None = None
    # ``config`` and ``recipe`` are stored redacted (pipeline/redact.py); ``config_hash`` was
    # computed from the real config, so a changed key embedded in a URL still changes it.
    format_version: int = FORMAT_VERSION
    code_version: str = __version__
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def to_json(self) -> str:
        data = asdict(self)
        data["config"], data["recipe"] = redact(data["config"]), redact(data["recipe"])
        return json.dumps(data, indent=2, sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        data["media"] = {ext: MediaRef(**ref) for ext, ref in data.get("media", {}).items()}
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class ShardStats:
    shard: int
    rows_in: int
    rows_out: int
    by_status: dict[str, int]
    seconds: float
    attempts: int = 1
    node: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # CPU seconds of the worker process while it ran the shard (every thread: the models' pools
    # too), beside the wall ``seconds``: on a loaded machine the two part. None in older stats.
    cpu_seconds: float | None = None
    # What a report needs of this shard's rows, merged across shards (pipeline/summary.py).
    summary: dict = field(default_factory=dict)


@dataclass
class FileDigest:
    size: int
    sha256: str


class Dataset:
    """Read and write one dataset folder."""

    def __init__(self, storage: Storage):
        self.storage = storage

    @classmethod
    def at(cls, uri: str, options: StorageOptions | None = None) -> Dataset:
        """The dataset in folder ``uri`` (local or ``s3://``)."""
        return cls(Storage(uri, options))

    @property
    def uri(self) -> str:
        return self.storage.root

    # --- manifest -------------------------------------------------------------------------
    def manifest(self) -> Manifest | None:
        if not self.storage.exists(MANIFEST):
            return None
        try:
            return Manifest.from_json(self.storage.read_bytes(MANIFEST).decode())
        except (ValueError, TypeError) as exc:
            raise DatasetError(f"{self.storage.uri(MANIFEST)}: unreadable manifest ({exc})") from exc

    def stage_manifest(self) -> tuple[Manifest | None, str | None]:
        """(manifest, None) for a stage dataset; (None, why not) for any other folder, for commands
        that look through a run folder and must skip what is not theirs (an export, a user's files)."""
        if not self.storage.exists(MANIFEST):
            return None, "no _manifest.json"
        try:
            return self.manifest(), None
        except DatasetError:
            try:
                kind = json.loads(self.storage.read_bytes(MANIFEST)).get("kind")
            except (ValueError, AttributeError):
                kind = None
            return None, "a facecap export" if kind == "facecap-export" else "its _manifest.json is not a stage's"

    def require_manifest(self) -> Manifest:
        manifest = self.manifest()
        if manifest is None:
            raise DatasetError(f"{self.uri}: not a facecap dataset (no {MANIFEST}); run an earlier stage first")
        return manifest

    def write_manifest(self, manifest: Manifest) -> None:
        self.storage.write_bytes(MANIFEST, manifest.to_json().encode())

    # --- shard state ----------------------------------------------------------------------
    def done_marker(self, shard: int) -> dict | None:
        name = f"{DONE_DIR}/{shard_name(shard)}.json"
        if not self.storage.exists(name):
            return None
        try:
            return json.loads(self.storage.read_bytes(name))
        except ValueError:
            return None

    def is_done(self, shard: int, verify: str = "size") -> bool:
        """True when the shard's marker exists and its files match it.

        ``verify``: ``"none"`` trusts the marker, ``"size"`` (default) checks file sizes,
        ``"sha256"`` re-hashes every file. A shard whose files were truncated or replaced after
        the marker was written is therefore redone rather than trusted.
        """
        marker = self.done_marker(shard)
        if marker is None:
            return False
        if verify == "none":
            return True
        for name, digest in marker.get("files", {}).items():
            if self.storage.size(name) != digest["size"]:
                return False
            if verify == "sha256" and _sha256_of(self.storage, name) != digest["sha256"]:
                return False
        return True

    def done_shards(self) -> list[int]:
        return sorted(_shard_index(n) for n in _records(self.storage.list(DONE_DIR)))

    def failed_shards(self) -> dict[int, dict]:
        failed = {}
        for name in _records(self.storage.list(FAILED_DIR)):
            try:
                failed[_shard_index(name)] = json.loads(self.storage.read_bytes(name))
            except ValueError:
                failed[_shard_index(name)] = {"error": "unreadable failure record"}
        return failed

    def mark_failed(self, shard: int, error: str, attempts: int) -> str:
        """Record a shard that failed; returns the error as stored (redacted)."""
        error = redact_text(error)
        record = {"shard": shard, "error": error, "attempts": attempts, "time": time.time()}
        self.storage.write_bytes(f"{FAILED_DIR}/{shard_name(shard)}.json", json.dumps(record).encode())
        return error

    def clear_shard(self, shard: int) -> None:
        """Forget a shard's state so it is redone (files are overwritten atomically anyway)."""
        for folder in (DONE_DIR, FAILED_DIR, STATS_DIR):
            self.storage.delete(f"{folder}/{shard_name(shard)}.json")

    def shard_stat(self, shard: int) -> ShardStats | None:
        name = f"{STATS_DIR}/{shard_name(shard)}.json"
        if not self.storage.exists(name):
            return None
        return ShardStats(**json.loads(self.storage.read_bytes(name)))

    def shard_stats(self, with_summaries: bool = True) -> dict[int, ShardStats]:
        """Every shard's stats; without their report summaries when a caller holds them all at once
        (a few hundred bytes a shard instead of a few hundred kB)."""
        stats = {}
        for name in _records(self.storage.list(STATS_DIR)):
            data = json.loads(self.storage.read_bytes(name))
            if not with_summaries:
                data.pop("summary", None)
            stats[data["shard"]] = ShardStats(**data)
        return stats

    # --- shard data -----------------------------------------------------------------------
    def parquet_name(self, shard: int) -> str:
        return f"{shard_name(shard)}.parquet"

    def read_shard(self, shard: int, columns: list[str] | None = None) -> pa.Table:
        with self.storage.open_read(self.parquet_name(shard)) as f:
            return pq.read_table(f, columns=columns)

    def shard_indices(self) -> list[int]:
        return sorted(_shard_index(n) for n in self.storage.list() if n.startswith("part-") and n.endswith(".parquet"))

    def commit_shard(
        self,
        shard: int,
        table: pa.Table,
        tar_digest: FileDigest | None,
        stats: ShardStats,
    ) -> None:
        """Write the shard's Parquet, stats and, last, its done marker."""
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        data = buffer.getvalue()
        self.storage.write_bytes(self.parquet_name(shard), data)
        files = {self.parquet_name(shard): asdict(FileDigest(len(data), hashlib.sha256(data).hexdigest()))}
        if tar_digest is not None:
            files[f"{shard_name(shard)}.tar"] = asdict(tar_digest)
        self.storage.write_bytes(f"{STATS_DIR}/{shard_name(shard)}.json", json.dumps(asdict(stats)).encode())
        self.storage.delete(f"{FAILED_DIR}/{shard_name(shard)}.json")
        marker = {"shard": shard, "rows": table.num_rows, "files": files, "time": time.time()}
        self.storage.write_bytes(f"{DONE_DIR}/{shard_name(shard)}.json", json.dumps(marker).encode())

    # --- summary --------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The funnel of this dataset, as ``facecap stats --json`` prints it."""
        manifest = self.require_manifest()
        stats = self.shard_stats(with_summaries=False)  # the funnel only: flat in memory
        done = set(self.done_shards())
        failed = self.failed_shards()
        by_status: Counter[str] = Counter()
        rows = rows_in = 0
        seconds = 0.0
        cpu_seconds: list[float] = []  # of the shards whose stats keep them
        for shard in done:
            if shard in stats:
                by_status.update(stats[shard].by_status)
                rows += stats[shard].rows_out
                rows_in += stats[shard].rows_in
                seconds += stats[shard].seconds
                if stats[shard].cpu_seconds is not None:
                    cpu_seconds.append(stats[shard].cpu_seconds)
        total = manifest.num_shards if manifest.num_shards is not None else len(done | set(failed))
        ordered = dict(sorted(by_status.items(), key=lambda kv: (kv[0] != OK, -kv[1], kv[0])))
        # Rows this stage judged: those it passed and those it rejected (not earlier rejections).
        judged = sum(n for status, n in by_status.items() if status == OK or status.startswith(f"{manifest.stage}:"))
        return {
            "dataset": self.uri,
            "stage": manifest.stage,
            "rows": rows,
            "rows_in": rows_in,
            "by_status": ordered,
            "shards": {"total": total, "done": len(done), "failed": len(failed)},
            "judged": judged,
            "pass_rate": round(by_status.get(OK, 0) / judged, 4) if judged else None,
            "complete": manifest.complete and len(done) == total,
            "shard_seconds": round(seconds, 3),
            "shard_cpu_seconds": round(sum(cpu_seconds), 3) if cpu_seconds else None,
            "parent": manifest.parent,
        }


class SpooledTar:
    """Collects members in any order, then writes them as one tar sorted by key.

    Stages that finish rows out of order (downloads) still produce tars whose keys are sorted
    and whose members of a sample are contiguous. Members stay in memory up to ``memory_bytes``
    (a download shard of 1,000 images is about 60 MB; writing and rereading a temporary file took
    about 4% of the download stage's time), then the rest goes to a temporary file, so memory stays bounded.
    """

    def __init__(self, memory_bytes: int = 256 << 20) -> None:
        self._memory_left = memory_bytes
        self._spool: BinaryIO | None = None
        # key -> [(ext, bytes held in memory, or (offset, size) in the spool file)]
        self._index: dict[str, list[tuple[str, bytes | tuple[int, int]]]] = {}
        self.sample_offsets: list[int] = []

    def __len__(self) -> int:
        return len(self._index)

    def add(self, key: str, members: dict[str, bytes]) -> None:
        why = unsafe_key(key)
        if why:  # refused when added, not at the end of the shard
            raise ValueError(f"refusing tar member key {key[:80]!r}: {why}")
        entries = self._index.setdefault(key, [])
        for ext in sorted(members):
            data = members[ext]
            if len(data) <= self._memory_left:
                self._memory_left -= len(data)
                entries.append((ext, data))
                continue
            if self._spool is None:
                self._spool = tempfile.TemporaryFile(prefix="facecap-spool-")  # noqa: SIM115 - closed in close()
            offset = self._spool.seek(0, os.SEEK_END)
            self._spool.write(data)
            entries.append((ext, (offset, len(data))))

    def _data(self, held: bytes | tuple[int, int]) -> bytes:
        if isinstance(held, bytes):
            return held
        offset, size = held
        self._spool.seek(offset)
        return self._spool.read(size)

    def write_sorted(self, stream: BinaryIO) -> FileDigest:
        """Write the tar; ``sample_offsets`` then holds where each sample's first header starts
        and, last, where the end-of-archive blocks start (Megatron-Energon's ``.tar.idx``)."""
        hashing = HashingWriter(stream)
        tar = TarWriter(hashing)
        for key in sorted(self._index):
            tar.add(key, ((ext, self._data(held)) for ext, held in sorted(self._index[key], key=lambda e: e[0])))
        tar.finish()
        self.sample_offsets = tar.sample_offsets
        return hashing.digest()

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()
        self._index.clear()


class TarWriter:
    """Writes samples, in the order given, as one ustar tar: each sample's members together, in
    writes of about 8 MB. ``sample_offsets`` holds where each sample's first header starts and,
    after ``finish``, where the end-of-archive blocks start (Megatron-Energon's ``.tar.idx``)."""

    def __init__(self, stream: BinaryIO, flush_bytes: int = 8 << 20):
        self._stream = stream
        self._flush_bytes = flush_bytes
        self._pieces: list[bytes] = []
        self._pending = 0
        self.size = 0
        self.sample_offsets: list[int] = []

    def add(self, key: str, members: Iterable[tuple[str, bytes]]) -> None:
        self.sample_offsets.append(self.size)
        for ext, data in members:
            header, _, padding = tar_member_pieces(f"{key}.{ext}", data)
            self._pieces += (header, data, padding)
            added = len(header) + len(data) + len(padding)
            self.size += added
            self._pending += added
        if self._pending >= self._flush_bytes:
            self._write()

    def finish(self) -> int:
        """End of archive (two zero blocks, padded to a whole record, as tarfile writes it); the tar's size."""
        self.sample_offsets.append(self.size)
        end = bytes(2 * tarfile.BLOCKSIZE + (-(self.size + 2 * tarfile.BLOCKSIZE) % tarfile.RECORDSIZE))
        self._pieces.append(end)
        self.size += len(end)
        self._write()
        return self.size

    def _write(self) -> None:
        self._stream.writelines(self._pieces)  # no joined copy: a buffered file passes large pieces through
        self._pieces.clear()
        self._pending = 0


class HashingWriter:
    """Wraps an output stream, counting bytes and hashing them on the way through."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.size = 0
        self._hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.stream.write(data)
        self._hash.update(data)
        self.size += len(data)
        return len(data)

    def writelines(self, pieces: Iterable[bytes]) -> None:
        for piece in pieces:
            self.write(piece)

    def digest(self) -> FileDigest:
        return FileDigest(self.size, self._hash.hexdigest())


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Up to 200 ASCII letters, digits, '_' or '-' (a member name: then also dots, not first): one path
# part that is neither '.' nor '..', has no control character and no backslash.
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,200}")
_PLAIN_MEMBER = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}")


def unsafe_key(key: object, member: bool = False) -> str | None:
    """Why a sample key (or, with ``member``, a tar member name) cannot name tar members safely, or
    None: extracting a member named ``../x`` or ``/x`` (``tarfile.extractall``, ``tar -x``) writes
    outside the target folder."""
    if isinstance(key, str) and (_PLAIN_MEMBER if member else _PLAIN_KEY).fullmatch(key):
        return None  # the common case, safe by construction: skips the checks below
    if not isinstance(key, str) or not key:
        return "empty key"
    if len(key.encode("utf-8", "surrogateescape")) > 200:
        return "key longer than 200 bytes"
    if _CONTROL.search(key):
        return "control character in key"
    if "\\" in key or re.match(r"^[A-Za-z]:", key):
        return "backslash or drive letter in key"
    if key.startswith("/"):
        return "absolute path as key"
    if any(part in ("", ".", "..") for part in key.split("/")):
        return "'.', '..' or an empty part in key"
    if key.rpartition("/")[2].startswith("."):
        return "a name starting with a dot (no key before the extension)"
    if not member and "." in key.rpartition("/")[2]:
        return "a dot in key (WebDataset readers split the key from the extension at the first dot)"
    return None


def tar_member_pieces(name: str, data: bytes) -> tuple[bytes, bytes, bytes]:
    """One ustar member as (header, data, padding): what TarFile.addfile writes (mode 644, mtime
    0, no owner), minus its per-member Python overhead and copies, which showed up in download
    profiles (TarInfo.tobuf alone was a third of writing a shard's tar). Every tar facecap writes
    goes through here: an unsafe name is refused, never written."""
    why = unsafe_key(name, member=True)
    if why:
        raise ValueError(f"refusing tar member {name[:80]!r}: {why}")
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) <= 100 and len(data) < 8 << 30:
        header = _ustar_header(encoded, len(data))
    else:  # names split into ustar's prefix field, members of 8 GiB or more: tarfile's own code
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    return header, data, bytes(-len(data) % tarfile.BLOCKSIZE)


# The fields after the checksum: type "0" (a file), no link name, the ustar magic, no owner names,
# no device numbers, no prefix; then the 12 unused bytes of the 512-byte block.
_USTAR_AFTER_CHECKSUM = b"0" + bytes(100) + tarfile.POSIX_MAGIC + bytes(32 + 32 + 8 + 8 + 155 + 12)
_USTAR_MODE_UID_GID = b"0000644\0" + b"0000000\0" * 2
_USTAR_MTIME = b"00000000000\0"
_USTAR_CONSTANT_SUM = sum(_USTAR_MODE_UID_GID) + sum(_USTAR_MTIME) + 8 * ord(" ") + sum(_USTAR_AFTER_CHECKSUM)


def _ustar_header(name: bytes, size: int) -> bytes:
    size_field = b"%011o\0" % size
    # The checksum is the sum of the header's bytes, its own field counted as spaces.
    checksum = _USTAR_CONSTANT_SUM + sum(name) + sum(size_field)
    return b"".join(
        (
            name.ljust(100, b"\0"),
            _USTAR_MODE_UID_GID,
            size_field,
            _USTAR_MTIME,
            b"%06o\0 " % checksum,
            _USTAR_AFTER_CHECKSUM,
        )
    )


def tar_key_and_ext(member_name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the file name."""
    folder, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


class TarShardReader:
    """Random access to the members of one tar by key.

    Remote tars are copied to local disk first (one streaming GET instead of thousands of small
    range requests). A truncated or corrupt tar yields the members before the damage; ``error``
    then says what went wrong, and the missing keys show up as missing.
    """

    def __init__(self, storage: Storage, name: str):
        self.error: str | None = None
        self._tempfile: str | None = None
        self._index: dict[str, dict[str, tuple[int, int]]] = {}
        if not storage.exists(name):
            self.error = f"missing tar {storage.uri(name)}"
            self._file = None
            return
        if storage.remote:
            fd, self._tempfile = tempfile.mkstemp(suffix=".tar", prefix="facecap-")
            remote_stream = storage.fs.open_input_stream(storage._path(name), compression=None)
            with os.fdopen(fd, "wb") as local, remote_stream as remote:
                while chunk := remote.read(8 << 20):
                    local.write(chunk)
            self._file = open(self._tempfile, "rb")  # noqa: SIM115 - closed in close()
        else:
            self._file = open(storage._path(name), "rb")  # noqa: SIM115 - closed in close()
        self._build_index()

    def _build_index(self) -> None:
        if self._index_plain_ustar():
            return
        self._index = {}
        self._file.seek(0)
        try:
            with tarfile.open(fileobj=self._file, mode="r:") as tar:
                for member in tar:
                    if member.isfile():
                        key, ext = tar_key_and_ext(member.name)
                        self._index.setdefault(key, {})[ext] = (member.offset_data, member.size)
        except (tarfile.TarError, OSError, EOFError) as exc:
            self.error = f"damaged tar: {exc}"
        if self._index:
            # A truncated last member has a header but not all of its bytes.
            end = self._file.seek(0, os.SEEK_END)
            for key in list(self._index):
                exts = self._index[key]
                for ext, (offset, size) in list(exts.items()):
                    if offset + size > end:
                        del exts[ext]
                        self.error = self.error or "damaged tar: truncated member"
                if not exts:
                    del self._index[key]

    def _index_plain_ustar(self) -> bool:
        """Index a tar whose headers are all plain ustar (what facecap and most writers produce),
        reading 512 bytes a member: about 40x faster than ``tarfile``, which parses each header into
        an object. At anything else (PAX or GNU extension headers, a bad checksum, a truncated
        member, a name that is not UTF-8) it returns False and ``tarfile`` indexes the whole tar."""
        index: dict[str, dict[str, tuple[int, int]]] = {}
        end = self._file.seek(0, os.SEEK_END)
        offset = 0
        while offset + TAR_BLOCK <= end:
            self._file.seek(offset)
            header = self._file.read(TAR_BLOCK)
            if header == ZERO_BLOCK:
                break
            member = _ustar_member(header)
            if member is None:
                return False
            name, size, is_file = member
            if offset + TAR_BLOCK + size > end:
                return False  # truncated: tarfile's path reports it
            if is_file:
                key, ext = tar_key_and_ext(name)
                index.setdefault(key, {})[ext] = (offset + TAR_BLOCK, size)
            offset += TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK
        else:
            if offset != end:
                return False  # a partial header at the end
        self._index = index
        return True

    def stored_keys(self) -> list[str]:
        return sorted(self._index)

    def location(self, key: str, ext: str) -> tuple[int, int] | None:
        """Where one member's bytes lie in the tar: (offset, size), from its headers (no data read)."""
        return self._index.get(key, {}).get(ext)

    def size_of(self, key: str, ext: str) -> int | None:
        """The stored size of one member, from the tar's headers (no data read)."""
        found = self.location(key, ext)
        return found[1] if found else None

    def get(self, key: str, exts: Iterable[str] | None = None) -> dict[str, bytes] | None:
        members = self._index.get(key)
        if members is None or self._file is None:
            return None
        wanted = members.keys() if exts is None else [e for e in exts if e in members]
        out = {}
        for ext in wanted:
            offset, size = members[ext]
            self._file.seek(offset)
            out[ext] = self._file.read(size)
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tempfile:
            os.unlink(self._tempfile)

    def __enter__(self) -> TarShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


TAR_BLOCK = 512
ZERO_BLOCK = bytes(TAR_BLOCK)
# Regular files (tarfile's isfile()), and entries that carry no data a reader wants (directories,
# links, devices, FIFOs); any other type (PAX/GNU headers, sparse files) is left to tarfile.
_FILE_TYPES = (b"0", b"\0", b"7")
_OTHER_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")


def _ustar_member(header: bytes) -> tuple[str, int, bool] | None:
    """(name, size, is a regular file) of a plain ustar or v7 header; None if it is anything else."""
    try:
        stored = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:  # base-256 sizes, garbage
        return None
    # The checksum counts its own field as eight spaces.
    if stored != sum(header) - sum(header[148:156]) + 256:
        return None
    kind = header[156:157]
    if kind not in _FILE_TYPES and kind not in _OTHER_TYPES:
        return None
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    # A v7 "regular file" whose name ends in a slash is a directory (as tarfile reads it).
    is_file = kind in _FILE_TYPES and not (kind == b"\0" and name.endswith(b"/"))
    try:
        return name.decode("utf-8"), size, is_file
    except UnicodeDecodeError:
        return None


def iter_tar_members(path: str) -> Iterator[tuple[str, bytes]]:
    """All (member name, bytes) of a local tar, in order (for tests and inspection)."""
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if member.isfile():
                yield member.name, tar.extractfile(member).read()


def _records(names: list[str]) -> list[str]:
    """Shard records (``part-NNNNN.json``), not the temporaries a killed writer may leave."""
    return [n for n in names if os.path.basename(n).startswith("part-") and n.endswith(".json")]


def _sha256_of(storage: Storage, name: str) -> str:
    digest = hashlib.sha256()
    with storage.fs.open_input_stream(storage._path(name), compression=None) as stream:
        while chunk := stream.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _shard_index(name: str) -> int:
    base = os.path.basename(name)
    return int(base.split("-", 1)[1].split(".", 1)[0])

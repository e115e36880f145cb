"""Local paths and ``s3://`` behind one small interface (pyarrow filesystems).

Writes are atomic: a reader never sees half a file under its final name. Locally we write to a
temporary sibling and rename; on S3 a PUT only becomes visible when it completes, so the body is
spooled locally and uploaded to the final key once it is complete. Either way, a shard counts as
done only once its done marker exists, and that marker is written last.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import pyarrow.fs as pafs

from facecap.pipeline.errors import ConfigError, InputError


@dataclass(frozen=True)
class StorageOptions:
    """How to reach object storage. Picklable, so workers rebuild the same filesystem."""

    s3_endpoint: str | None = None
    s3_region: str | None = None
    s3_anonymous: bool = False
    # S3 calls that fail transiently are retried by the AWS SDK this many times.
    s3_retries: int = 5

    @classmethod
    def from_env(cls) -> StorageOptions:
        return cls(
            s3_endpoint=os.environ.get("FACECAP_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL"),
            s3_region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        )


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def absolute(uri: str | None) -> str | None:
    """A local path made absolute (workers may run in another folder); a remote URI as it is."""
    if uri is None or is_remote(uri):
        return uri
    return os.path.abspath(uri)


def _comparable(uri: str) -> str:
    """A URI in a form where 'inside' is a prefix test: real local paths, remote without a trailing '/'."""
    if is_remote(uri):
        return uri.rstrip("/")
    return os.path.realpath(uri.removeprefix("file://"))


def overlap(output: str, given: str) -> str | None:
    """How an output folder overlaps an input file or folder: 'is', 'is inside', 'contains', or None."""
    out, other = _comparable(output), _comparable(given)
    if out == other:
        return "is"
    separator = "/" if is_remote(out) else os.sep
    if out.startswith(other.rstrip(separator) + separator):
        return "is inside"
    if other.startswith(out.rstrip(separator) + separator):
        return "contains"
    return None


def refuse_overlap(output: str, inputs: list[str]) -> None:
    """One line, before anything is written or deleted, when the output folder is, is inside or
    contains an input: writing (or --overwrite's clearing) there would destroy what it reads."""
    for given in dict.fromkeys(inputs):
        relation = overlap(output, given)
        if relation:
            raise ConfigError(
                f"{output}: the output folder {relation} the input {given}; choose an output folder "
                "outside every input (nothing was written or deleted)"
            )


def join(base: str, *parts: str) -> str:
    """Join path parts with '/' for URIs and the OS separator for local paths."""
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


class Storage:
    """Files under one root (a local folder or an ``s3://bucket/prefix``)."""

    def __init__(self, root: str, options: StorageOptions | None = None):
        self.root = root.rstrip("/") if is_remote(root) else os.path.abspath(root.removeprefix("file://"))
        self.options = options or StorageOptions.from_env()
        self.remote = is_remote(self.root)
        self.fs, self._base = _filesystem(self.root, self.options)

    def __reduce__(self):
        # pyarrow filesystems pickle, but rebuilding from options keeps workers honest about config.
        return (Storage, (self.root, self.options))

    def uri(self, name: str) -> str:
        return join(self.root, name)

    def _path(self, name: str) -> str:
        return posixpath.join(self._base, name) if name else self._base

    def local_path(self, name: str) -> str:
        """The file's path on this machine, for direct reads (local storage only)."""
        if self.remote:
            raise ValueError(f"{self.uri(name)} is not on this machine")
        return self._path(name)

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self._path(name)).type != pafs.FileType.NotFound

    def size(self, name: str) -> int | None:
        info = self.fs.get_file_info(self._path(name))
        return None if info.type == pafs.FileType.NotFound else info.size

    def list(self, folder: str = "") -> list[str]:
        """Names (relative to the root) of the files directly inside ``folder``."""
        selector = pafs.FileSelector(self._path(folder), allow_not_found=True, recursive=False)
        infos = self.fs.get_file_info(selector)
        return sorted(
            posixpath.join(folder, posixpath.basename(i.path)) if folder else posixpath.basename(i.path)
            for i in infos
            if i.type == pafs.FileType.File
        )

    def makedirs(self, folder: str = "") -> None:
        self.fs.create_dir(self._path(folder), recursive=True)

    def read_bytes(self, name: str) -> bytes:
        # compression=None: pyarrow would otherwise gunzip "*.gz" names, so bytes would not round-trip.
        with self.fs.open_input_stream(self._path(name), compression=None) as stream:
            return stream.read()

    def read_json(self, name: str) -> dict | None:
        """A small JSON record (a done marker, an index), or None when it is absent or not JSON."""
        if not self.exists(name):
            return None
        try:
            return json.loads(self.read_bytes(name))
        except ValueError:
            return None

    def open_read(self, name: str) -> BinaryIO:
        """A seekable file (needed by Parquet and tar readers)."""
        return self.fs.open_input_file(self._path(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.open_write(name) as out:
            out.write(data)

    @contextlib.contextmanager
    def open_write(self, name: str) -> Iterator[BinaryIO]:
        """Write ``name`` atomically: it appears complete or not at all."""
        target = self._path(name)
        if self.remote:
            # Closing an S3 output stream completes the upload, even of a half-written body, and
            # pyarrow cannot abort it; so a body that raised would replace the old object with a
            # partial one. Spool locally (disk beyond 64 MiB) and upload only a finished body.
            with tempfile.SpooledTemporaryFile(max_size=64 << 20, prefix="facecap-") as spool:
                yield spool
                spool.seek(0)
                with self.fs.open_output_stream(target, compression=None) as stream:
                    shutil.copyfileobj(spool, stream, 8 << 20)
            return
        self.makedirs(posixpath.dirname(name))
        temp = f"{target}.tmp-{uuid.uuid4().hex[:12]}"
        stream = self.fs.open_output_stream(temp)
        try:
            yield stream
            stream.close()
        except BaseException:
            stream.close()
            with contextlib.suppress(OSError):
                self.fs.delete_file(temp)
            raise
        os.replace(temp, target)

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError, OSError):
            self.fs.delete_file(self._path(name))

    def remove_empty_folder(self, folder: str) -> None:
        """Remove ``folder`` if nothing is left in it. On S3 that is the marker object pyarrow leaves
        when it deletes a folder's last file (so the folder would still be listed)."""
        if not self.remote:
            with contextlib.suppress(OSError):  # not empty, or already gone
                os.rmdir(self._path(folder))
            return
        selector = pafs.FileSelector(self._path(folder), allow_not_found=True, recursive=True)
        if not self.fs.get_file_info(selector):
            with contextlib.suppress(OSError):
                self.fs.delete_dir(self._path(folder))

    def remove_temporaries(self, folder: str = "") -> int:
        """Delete ``*.tmp-*`` files a killed writer left behind, in ``folder`` and below; returns how many.

        Below too: a writer killed inside ``_stats/`` or ``_done/`` leaves its temporary there, and
        readers that list those folders would take it for a record.
        """
        selector = pafs.FileSelector(self._path(folder), allow_not_found=True, recursive=True)
        removed = 0
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.File and ".tmp-" in posixpath.basename(info.path):
                with contextlib.suppress(FileNotFoundError, OSError):
                    self.fs.delete_file(info.path)
                    removed += 1
        return removed


def _filesystem(root: str, options: StorageOptions) -> tuple[pafs.FileSystem, str]:
    if not is_remote(root):
        return pafs.LocalFileSystem(), root
    scheme, _, rest = root.partition("://")
    if scheme not in ("s3", "s3a"):
        raise InputError(f"{root}: unsupported storage scheme '{scheme}://' (use a local path or s3://)")
    kwargs: dict = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=options.s3_retries)}
    if options.s3_endpoint:
        endpoint = options.s3_endpoint
        kwargs["scheme"] = "https" if endpoint.startswith("https://") else "http"
        kwargs["endpoint_override"] = endpoint.split("://", 1)[-1]
    if options.s3_region:
        kwargs["region"] = options.s3_region
    if options.s3_anonymous:
        kwargs["anonymous"] = True
    return pafs.S3FileSystem(**kwargs), rest.rstrip("/")


def open_input(uri: str, options: StorageOptions | None = None) -> BinaryIO:
    """Open any local or S3 file for streaming reads, gunzipping ``*.gz`` transparently."""
    folder, name = split(uri)
    storage = Storage(folder, options)
    compression = "gzip" if name.endswith(".gz") else None
    try:
        return storage.fs.open_input_stream(storage._path(name), compression=compression)
    except FileNotFoundError as exc:
        raise InputError(f"{uri}: no such file") from exc


def split(uri: str) -> tuple[str, str]:
    """Split a file URI into (folder, file name)."""
    if is_remote(uri):
        return posixpath.dirname(uri), posixpath.basename(uri)
    path = os.path.abspath(uri.removeprefix("file://"))
    return os.path.dirname(path), os.path.basename(path)

"""Ingest: URL lists (or an img2dataset folder) become the first dataset, every URL judged.

Statuses: ``ingest:invalid_url`` (empty, not http(s), no host, overlong, whitespace or control
characters, bad port), ``ingest:opted_out`` (domain or URL sha256 on an opt-out list),
``ingest:duplicate_url`` (the same URL earlier in the input: the first one is kept), and
``ingest:malformed_row`` (set by the reader for lines it could not parse).
"""

from __future__ import annotations

import gzip
import hashlib
from typing import ClassVar
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
from pydantic import Field

from facecap.pipeline.registry import register
from facecap.pipeline.source import Source
from facecap.pipeline.stage import Batch, Output, Resources, Stage
from facecap.pipeline.storage import StorageOptions
from facecap.stages.ingest.readers import SourceConfig, open_source


class IngestConfig(SourceConfig):
    max_url_length: int = Field(2048, ge=16, description="longer URLs are invalid_url")
    opt_out: list[str] = Field(
        default_factory=list,
        description="local files (optionally .gz) of opted-out domains and/or URL sha256 hex digests",
    )
    dedup_urls: bool = Field(True, description="mark exact repeats of an earlier URL as duplicate_url")


class SeenHashes:
    """A set of 64-bit hashes in sorted numpy runs (8 bytes a URL, not ~70 as a Python set).

    Runs are merged like a log-structured tree, so adding n hashes costs O(n log n) overall.
    """

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(r) for r in self._runs)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        hashes = np.asarray(hashes, dtype=np.uint64)  # int64 or float keys would compare inexactly
        # Probing in sorted order walks each run front to back: about 3x faster than random probes.
        order = np.argsort(hashes)
        queries = hashes[order]
        found = np.zeros(len(hashes), dtype=bool)
        for run in self._runs:
            pos = np.searchsorted(run, queries)
            pos[pos == len(run)] = 0
            found |= run[pos] == queries
        result = np.empty_like(found)
        result[order] = found
        return result

    def add(self, hashes: np.ndarray) -> None:
        run = np.unique(np.asarray(hashes, dtype=np.uint64))
        # Runs stay disjoint (so len() counts each hash once) and never empty (contains indexes them).
        run = run[~self.contains(run)]
        if not len(run):
            return
        # Merge while the newest run is not more than twice the new one: every run is then more than twice
        # the next, so there are at most log2(n) runs to search even when batches shrink (more repeats later).
        while self._runs and len(self._runs[-1]) <= 2 * len(run):
            # Two sorted disjoint runs: a stable sort (timsort) merges them in linear time; np.union1d would
            # re-hash or re-sort everything (seconds per merge at 10M hashes).
            run = np.sort(np.concatenate([self._runs.pop(), run]), kind="stable")
        self._runs.append(run)


def url_hash64(url: str) -> int:
    return int.from_bytes(hashlib.blake2b(url.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def first_occurrences(urls: list[str], seen: SeenHashes) -> np.ndarray:
    """True where a URL appears neither earlier in ``urls`` nor in ``seen``; updates ``seen``."""
    hashes = np.fromiter((url_hash64(u) for u in urls), dtype=np.uint64, count=len(urls))
    _, first_index = np.unique(hashes, return_index=True)
    first_in_batch = np.zeros(len(urls), dtype=bool)
    first_in_batch[first_index] = True
    fresh = first_in_batch & ~seen.contains(hashes)
    seen.add(hashes)
    return fresh


class OptOutList:
    """Opted-out domains (a domain covers its subdomains) and sha256 digests of URLs."""

    def __init__(self, paths: list[str]):
        self.domains: set[str] = set()
        self.url_digests: set[str] = set()
        for path in paths:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8", errors="replace") as lines:
                for line in lines:
                    entry = line.split("#", 1)[0].strip().lower()
                    if not entry:
                        continue
                    if len(entry) == 64 and all(c in "0123456789abcdef" for c in entry):
                        self.url_digests.add(entry)
                    else:
                        self.domains.add(ascii_host(entry.removeprefix("*.").strip(".")))

    def __bool__(self) -> bool:
        return bool(self.domains or self.url_digests)

    def covers(self, url: str) -> bool:
        if self.url_digests and hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest() in self.url_digests:
            return True
        if not self.domains:
            return False
        try:
            host = ascii_host((urlsplit(url).hostname or "").lower().rstrip("."))
        except ValueError:
            return False
        labels = host.split(".")
        return any(".".join(labels[i:]) in self.domains for i in range(len(labels)))


def ascii_host(host: str) -> str:
    """A host name in its ASCII (punycode) form, so an opt-out of bücher.example covers xn--bcher-kva.example."""
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host


def url_problem(url: object, max_length: int) -> str | None:
    """Why ``url`` cannot be fetched, or None when it looks like a fetchable http(s) URL."""
    if not isinstance(url, str) or not url:
        return "empty URL"
    if len(url) > max_length:
        return f"URL longer than {max_length} characters ({len(url)})"
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        return "URL contains whitespace or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"malformed URL: {exc}"
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        return f"scheme '{scheme}' is not http or https" if scheme else "no scheme (expected http:// or https://)"
    host = parts.hostname
    if not host:
        return "no host"
    if port == 0:
        return "port 0"
    if not host.startswith("["):
        try:
            host.encode("idna")
        except UnicodeError:
            return f"invalid host name '{host}'"
        # Underscores are not valid in DNS host names but common in real image hosts, and fetchable.
        if any(not (ch.isalnum() or ch in "-.:_") for ch in host) or ".." in host:
            return f"invalid host name '{host}'"
    return None


@register
class IngestStage(Stage):
    name = "ingest"
    order = 10
    help = "Read URL lists (or an img2dataset folder) into facecap's dataset format, judging every URL."
    config_model = IngestConfig
    source = True
    consumes = ("url",)
    resources = Resources(cpus=1, batch_size=10_000)

    OPTED_OUT: ClassVar[str] = "_opted_out"
    REPEAT: ClassVar[str] = "_repeat"

    def __init__(self, config: IngestConfig):
        super().__init__(config)
        self.config: IngestConfig = config
        self._seen = SeenHashes()
        self._opt_out: OptOutList | None = None

    @classmethod
    def open_source(cls, config: IngestConfig, storage: StorageOptions) -> Source:
        return open_source(config, storage)

    def prepare_in_order(self, rows: pd.DataFrame) -> pd.DataFrame:
        # Runs on the driver in input order, so "first occurrence wins" holds across shards and
        # on resumed runs, and the opt-out list only has to be readable by the driver.
        if self._opt_out is None:
            self._opt_out = OptOutList(self.config.opt_out)
        urls = [u.strip() if isinstance(u, str) else "" for u in rows["url"]]
        rows = rows.copy()
        rows["url"] = [u if u else None for u in urls]
        # Rows the reader already rejected take no part: their URL must not shadow a later copy.
        live = (rows["status"] == self.ok()).to_numpy()
        repeat = np.zeros(len(rows), dtype=bool)
        if self.config.dedup_urls and live.any():
            live_urls = [u for u, keep in zip(urls, live, strict=True) if keep]
            repeat[live] = ~first_occurrences(live_urls, self._seen)
        rows[self.REPEAT] = repeat
        rows[self.OPTED_OUT] = [self._opt_out.covers(u) for u in urls] if self._opt_out else False
        return rows

    def process(self, batch: Batch) -> Output:
        rows = batch.rows
        statuses, errors = [], []
        for url, opted_out, repeat in zip(rows["url"], rows[self.OPTED_OUT], rows[self.REPEAT], strict=True):
            problem = url_problem(url, self.config.max_url_length)
            if problem:
                statuses.append(self.reject("invalid_url"))
                errors.append(problem)
            elif opted_out:
                statuses.append(self.reject("opted_out"))
                errors.append("URL or its domain is on an opt-out list")
            elif repeat:
                statuses.append(self.reject("duplicate_url"))
                errors.append("the same URL appears earlier in the input")
            else:
                statuses.append(self.ok())
                errors.append(None)
        out = rows.copy()
        out["status"] = statuses
        out["error"] = errors
        return Output(rows=out)

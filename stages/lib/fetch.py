"""Polite, bounded and safe HTTP(S) fetching of one URL at a time, from many threads.

- Every hop (the URL and each redirect) is resolved and checked before connecting: only
  http/https, and no loopback, private, link-local, multicast, reserved or cloud-metadata
  address unless private networks are allowed. We then connect to the checked address itself,
  so a second DNS answer cannot swap in another one.
- Connect, read and total timeouts; the body is read a socket read at a time, so a server that
  drips bytes is cut off at the total deadline, and a body larger than ``max_bytes`` (after
  gzip/deflate decoding, decoded in bounded steps) is refused while streaming.
- Retries with exponential backoff and jitter for transient failures only (connection errors,
  timeouts, 408, 429 honouring Retry-After, 5xx); per-host concurrency and request-rate limits.
- ``X-Robots-Tag`` opt-outs (noai, noimageai, noindex, noimageindex by default) are honoured.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import socket
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urljoin, urlsplit

import urllib3
from pydantic import BaseModel, ConfigDict, Field
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

DEFAULT_USER_AGENT = "facecap/0.1 (face image-text dataset builder; honours X-Robots-Tag noai)"
METADATA_ADDRESSES = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")
TRANSIENT = {"timeout", "connection_error", "dns_error", "http_408", "http_429", "tls_error", "bad_content_length"}
DNS_TTL = 60.0
READ_CHUNK = 1 << 20
X_ROBOTS_NON_AGENT = {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}


class HttpSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    connect_timeout: float = Field(5.0, gt=0, description="seconds to open a connection")
    read_timeout: float = Field(10.0, gt=0, description="seconds a single read may wait")
    total_timeout: float = Field(30.0, gt=0, description="seconds for the whole fetch, redirects included")
    retries: int = Field(2, ge=0, le=10, description="extra tries for transient failures")
    backoff: float = Field(0.5, ge=0, description="first retry delay; doubles each time, with jitter")
    max_retry_after: float = Field(20.0, ge=0, description="longest Retry-After (429/503) we wait for")
    max_redirects: int = Field(5, ge=0, le=30)
    max_bytes: int = Field(20_000_000, ge=1, description="largest (decoded) body accepted")
    user_agent: str = DEFAULT_USER_AGENT
    per_host_concurrency: int = Field(4, ge=1, description="requests in flight to one host, per worker")
    per_host_rate: float = Field(0.0, ge=0, description="requests per second to one host, per worker; 0 = no cap")


class SafetySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    allow_private_networks: bool = Field(
        False, description="allow loopback/private targets (local corpora and tests only)"
    )
    private_allowlist: list[str] = Field(
        default_factory=list,
        description="hosts, addresses or CIDR ranges allowed even when private networks are not (a mirror)",
    )
    honour_x_robots_tag: bool = True
    opt_out_directives: list[str] = Field(default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])


@dataclass
class FetchResult:
    reason: str | None  # None when the body was fetched
    detail: str | None = None
    data: bytes | None = None
    http_status: int | None = None
    final_url: str | None = None
    mime: str | None = None
    attempts: int = 0
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


class Refused(Exception):
    """A hop we will not connect to, or a response we will not accept."""

    def __init__(self, reason: str, detail: str, http_status: int | None = None, retry_after: float | None = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.http_status = http_status
        self.retry_after = retry_after


class HostLimiter:
    """At most ``concurrency`` requests in flight and ``rate`` requests/s per host."""

    def __init__(self, concurrency: int, rate: float):
        self.concurrency = concurrency
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._lock = threading.Lock()
        self._slots: dict[str, threading.BoundedSemaphore] = {}
        self._next_start: dict[str, float] = {}

    @contextlib.contextmanager
    def slot(self, host: str, deadline: float) -> Iterator[None]:
        with self._lock:
            semaphore = self._slots.setdefault(host, threading.BoundedSemaphore(self.concurrency))
        if not semaphore.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise Refused("timeout", f"waited too long for a free slot to {host}")
        try:
            if self.interval:
                with self._lock:
                    start = max(time.monotonic(), self._next_start.get(host, 0.0))
                    self._next_start[host] = start + self.interval
                delay = start - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            yield
        finally:
            semaphore.release()


class Fetcher:
    """Fetches URLs; safe to share between threads (connections are pooled per host)."""

    def __init__(self, http: HttpSettings, safety: SafetySettings, max_pools: int = 256):
        self.http = http
        self.safety = safety
        self.limiter = HostLimiter(http.per_host_concurrency, http.per_host_rate)
        self._pools: OrderedDict[tuple, urllib3.HTTPConnectionPool] = OrderedDict()
        self._pools_lock = threading.Lock()
        self._max_pools = max_pools
        self._directives = {d.lower() for d in safety.opt_out_directives}
        self._dns: dict[tuple[str, int], tuple[float, list]] = {}
        self._agent = http.user_agent.split("/", 1)[0].strip().lower()

    def close(self) -> None:
        with self._pools_lock:
            for pool in self._pools.values():
                pool.close()
            self._pools.clear()

    def fetch(self, url: str) -> FetchResult:
        deadline = time.monotonic() + self.http.total_timeout
        attempt = 0
        while True:
            attempt += 1
            result = self._fetch_once(url, deadline)
            result.attempts = attempt
            if result.ok or (result.reason not in TRANSIENT and not _is_5xx(result.reason)):
                return result
            if attempt > self.http.retries:
                return result
            delay = self._delay(attempt, result.retry_after)
            if delay is None or time.monotonic() + delay >= deadline:
                return result
            time.sleep(delay)

    def _delay(self, attempt: int, retry_after: float | None) -> float | None:
        if retry_after is not None:
            return retry_after if retry_after <= self.http.max_retry_after else None
        base = self.http.backoff * (2 ** (attempt - 1))
        return base * (0.5 + random.random())

    def _fetch_once(self, url: str, deadline: float) -> FetchResult:
        current = url
        status = None
        try:
            for _hop in range(self.http.max_redirects + 1):
                parts = urlsplit(current)
                address = self._checked_address(parts)
                host = parts.hostname or ""
                with self.limiter.slot(host, deadline):
                    response = self._request(parts, address, deadline)
                    status = response.status
                    if status in (301, 302, 303, 307, 308):
                        location = response.headers.get("Location")
                        response.close()  # never reuse a connection whose body we did not read
                        if not location:
                            raise Refused("bad_redirect", f"HTTP {status} without a Location header", status)
                        current = urljoin(current, location.strip())
                        continue
                    return self._read(response, current, deadline)
            raise Refused("too_many_redirects", f"more than {self.http.max_redirects} redirects", status)
        except Refused as refused:
            return FetchResult(
                refused.reason,
                refused.detail,
                http_status=refused.http_status,
                final_url=current,
                retry_after=refused.retry_after,
            )
        except (ConnectTimeoutError, ReadTimeoutError, TimeoutError) as exc:
            return FetchResult("timeout", _short(exc), http_status=status, final_url=current)
        except SSLError as exc:
            return FetchResult("tls_error", _short(exc), http_status=status, final_url=current)
        except ProtocolError as exc:
            # A body shorter than its Content-Length surfaces as IncompleteRead.
            broken = "IncompleteRead" in repr(exc) or "length" in str(exc)
            reason = "bad_content_length" if broken else "connection_error"
            return FetchResult(reason, _short(exc), http_status=status, final_url=current)
        except (NewConnectionError, HTTPError, OSError) as exc:
            return FetchResult("connection_error", _short(exc), http_status=status, final_url=current)

    # --- one hop ------------------------------------------------------------------------------
    def _checked_address(self, parts) -> str:
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise Refused("blocked_address", f"scheme '{scheme}' is not http or https")
        host = parts.hostname
        if not host:
            raise Refused("blocked_address", "URL has no host")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError as exc:
            raise Refused("blocked_address", f"bad port: {exc}") from None
        infos = self._resolve(host, port)
        for info in infos:
            address = ipaddress.ip_address(info[4][0].split("%", 1)[0])
            if self._allowlisted(host, address):
                continue
            problem = self._address_problem(address)
            if problem:
                raise Refused("blocked_address", f"{host} resolves to {address} ({problem})")
        return infos[0][4][0]

    def _resolve(self, host: str, port: int) -> list:
        """getaddrinfo, remembered for DNS_TTL seconds: LAION shards hit the same hosts again and again."""
        key = (host, port)
        now = time.monotonic()
        cached = self._dns.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise Refused("dns_error", f"cannot resolve {host}: {exc}") from None
        with self._pools_lock:
            if len(self._dns) > 10_000:
                self._dns.clear()
            self._dns[key] = (now + DNS_TTL, infos)
        return infos

    def _allowlisted(self, host: str, address: ipaddress._BaseAddress) -> bool:
        for entry in self.safety.private_allowlist:
            if entry.lower() == host.lower():
                return True
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
        return False

    def _address_problem(self, address: ipaddress._BaseAddress) -> str | None:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if address in METADATA_ADDRESSES:
            return "cloud metadata service"
        if address.is_multicast or address.is_unspecified:
            return "multicast or unspecified address"
        if self.safety.allow_private_networks:
            return None
        if address.is_loopback:
            return "loopback"
        if address.is_link_local:
            return "link-local"
        if address.is_private or address in SHARED_ADDRESS_SPACE:
            return "private network"
        if address.is_reserved or not address.is_global:
            return "reserved address"
        return None

    def _pool(self, scheme: str, address: str, port: int, host: str) -> urllib3.HTTPConnectionPool:
        key = (scheme, address, port, host)
        with self._pools_lock:
            pool = self._pools.get(key)
            if pool is not None:
                self._pools.move_to_end(key)
                return pool
            options = {"maxsize": self.http.per_host_concurrency, "block": False, "retries": False}
            if scheme == "https":
                pool = urllib3.HTTPSConnectionPool(
                    address, port, server_hostname=host, assert_hostname=host, cert_reqs="CERT_REQUIRED", **options
                )
            else:
                pool = urllib3.HTTPConnectionPool(address, port, **options)
            self._pools[key] = pool
            while len(self._pools) > self._max_pools:
                self._pools.popitem(last=False)[1].close()
            return pool

    def _request(self, parts, address: str, deadline: float) -> urllib3.BaseHTTPResponse:
        scheme = parts.scheme.lower()
        port = parts.port or (443 if scheme == "https" else 80)
        host = parts.hostname
        host_header = f"[{host}]" if ":" in host else host
        if parts.port:
            host_header += f":{parts.port}"
        left = deadline - time.monotonic()
        if left <= 0:
            raise Refused("timeout", f"total timeout of {self.http.total_timeout}s reached")
        timeout = urllib3.Timeout(connect=min(self.http.connect_timeout, left), read=min(self.http.read_timeout, left))
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return self._pool(scheme, address, port, host).urlopen(
            "GET",
            path,
            headers={
                "Host": host_header,
                "User-Agent": self.http.user_agent,
                "Accept": "image/avif,image/webp,image/png,image/jpeg,image/*;q=0.8,*/*;q=0.5",
                "Accept-Encoding": "gzip, deflate",
            },
            redirect=False,
            retries=False,
            preload_content=False,
            decode_content=False,
            timeout=timeout,
            assert_same_host=False,
        )

    def _read(self, response: urllib3.BaseHTTPResponse, url: str, deadline: float) -> FetchResult:
        status = response.status
        headers = response.headers
        try:
            if self.safety.honour_x_robots_tag:
                directive = self._opt_out(headers.getlist("X-Robots-Tag"))
                if directive:
                    raise Refused("opted_out_header", f"X-Robots-Tag: {directive}", status)
            if not 200 <= status < 300:
                raise Refused(f"http_{status}", f"HTTP {status}", status, _retry_after(headers.get("Retry-After")))
            declared = headers.get("Content-Length")
            if (
                declared
                and declared.isdigit()
                and int(declared) > self.http.max_bytes
                and not headers.get("Content-Encoding")
            ):
                raise Refused("too_large", f"Content-Length {declared} exceeds max_bytes {self.http.max_bytes}", status)
            body = self._body(response, headers.get("Content-Encoding", "").lower().strip(), deadline, status)
        finally:
            if response.isclosed():
                response.release_conn()  # fully read: the connection can serve the next request
            else:
                response.close()
        mime = (headers.get("Content-Type") or "").split(";", 1)[0].strip().lower() or None
        return FetchResult(None, data=body, http_status=status, final_url=url, mime=mime)

    def _body(self, response: urllib3.BaseHTTPResponse, encoding: str, deadline: float, status: int) -> bytes:
        decoder = _decoder(encoding, status)
        limit = self.http.max_bytes
        parts: list[bytes] = []
        size = 0
        while True:
            if time.monotonic() > deadline:
                raise Refused(
                    "timeout", f"body not complete within the total timeout of {self.http.total_timeout}s", status
                )
            chunk = response.read1(READ_CHUNK)
            if not chunk:
                break
            if decoder is not None:
                chunk = decoder.decompress(chunk, limit - size + 1)
                if decoder.unconsumed_tail:
                    raise Refused("too_large", f"decoded body exceeds max_bytes {limit}", status)
            size += len(chunk)
            if size > limit:
                raise Refused("too_large", f"body exceeds max_bytes {limit}", status)
            parts.append(chunk)
        if decoder is not None:
            tail = decoder.flush()
            size += len(tail)
            if size > limit:
                raise Refused("too_large", f"decoded body exceeds max_bytes {limit}", status)
            parts.append(tail)
        return b"".join(parts)

    def _opt_out(self, values: list[str]) -> str | None:
        for value in values:
            text = value.strip()
            head, sep, rest = text.partition(":")
            if sep and head.strip().lower() not in X_ROBOTS_NON_AGENT and " " not in head.strip():
                agent = head.strip().lower()
                if agent not in ("*", self._agent):
                    continue  # directives for another crawler
                text = rest
            for directive in text.split(","):
                if directive.strip().lower() in self._directives:
                    return directive.strip().lower()
        return None


def _decoder(encoding: str, status: int):
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj()
    raise Refused("unsupported_encoding", f"Content-Encoding {encoding!r} is not supported", status)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _is_5xx(reason: str | None) -> bool:
    return bool(reason) and reason.startswith("http_5")


def is_transient(reason: str) -> bool:
    return reason in TRANSIENT or _is_5xx(reason)


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:300]

"""Polite, bounded and safe HTTP(S) fetching of one URL at a time, from many threads.

- Every hop (the URL and each redirect) is resolved and checked before connecting: only
  http/https, and no loopback, private, link-local, multicast, reserved or cloud-metadata
  address unless private networks are allowed. We then connect to the checked address itself,
  so a second DNS answer cannot swap in another one. HTTP itself is ``http1``'s lean client.
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
import ssl
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import quote, urljoin, urlsplit

from pydantic import BaseModel, ConfigDict, Field

from facecap.stages.download import http1

DEFAULT_USER_AGENT = "facecap/0.1 (face image-text dataset builder; honours X-Robots-Tag noai)"
METADATA_ADDRESSES = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")
# IPv6 forms that carry an IPv4 address and, through a relay or translator, reach it.
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated (RFC 4291); :: and ::1 are themselves
IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # SIIT (RFC 2765)
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the well-known prefix (RFC 6052)
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # local-use prefixes (RFC 8215): /48 to /96
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
        self._idle = http1.ConnectionPool(http.per_host_concurrency, max_pools)
        self._dns_lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None
        self._directives = {d.lower() for d in safety.opt_out_directives}
        self._dns: dict[tuple[str, int], tuple[float, list]] = {}
        self._agent = http.user_agent.split("/", 1)[0].strip().lower()

    def close(self) -> None:
        self._idle.close()

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
                target = self._checked_target(parts)
                host = parts.hostname or ""
                with self.limiter.slot(host, deadline):
                    response = self._request(parts, target, deadline)
                    status = response.status
                    if status in (301, 302, 303, 307, 308):
                        location = response.headers.get("Location")
                        response.connection.close()  # never reuse a connection whose body we did not read
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
        except TimeoutError as exc:
            return FetchResult("timeout", _short(exc), http_status=status, final_url=current)
        except (ssl.SSLError, ssl.CertificateError) as exc:
            return FetchResult("tls_error", _short(exc), http_status=status, final_url=current)
        except http1.IncompleteBody as exc:
            return FetchResult("bad_content_length", _short(exc), http_status=status, final_url=current)
        except http1.ProtocolError as exc:
            return FetchResult("bad_response", _short(exc), http_status=status, final_url=current)
        except OSError as exc:
            return FetchResult("connection_error", _short(exc), http_status=status, final_url=current)

    # --- one hop ------------------------------------------------------------------------------
    def _checked_target(self, parts) -> tuple[int, tuple]:
        """(address family, socket address) to connect to, once every address of the host passed."""
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
        return infos[0][0], infos[0][4]

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
        with self._dns_lock:
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
        if isinstance(address, ipaddress.IPv6Address):
            forms, kind = embedded_ipv4(address)
            for form, inner in forms:
                problem = self._address_problem(inner) if kind != GUESSED else _metadata(inner)
                if problem:
                    return f"{form} of {inner}: {problem}"
            if kind == WRAPPER:
                return None  # judged by the IPv4 address it reaches (NAT64 of a public site, say)
            if kind == GUESSED and not self.safety.allow_private_networks:
                return "local-use NAT64 prefix"
        if address in METADATA_ADDRESSES:
            return _metadata(address)
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

    def _connection(self, key: tuple, target: tuple, deadline: float, fresh: bool) -> http1.Connection:
        """A kept-alive connection to ``key`` if one is idle (unless ``fresh``), else a new one."""
        connection = None if fresh else self._idle.take(key)
        if connection is not None:
            return connection
        scheme, _, host = key
        family, sockaddr = target
        left = deadline - time.monotonic()
        if left <= 0:
            raise Refused("timeout", f"total timeout of {self.http.total_timeout}s reached")
        tls = http1.tls_wrapper(self._tls_context(), host) if scheme == "https" else None
        return http1.connect(sockaddr, family, min(self.http.connect_timeout, left), self.http.read_timeout, tls)

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def _request(self, parts, target: tuple, deadline: float) -> http1.Response:
        """Send the GET and read the response head; a pooled connection the server has meanwhile
        closed, or whose answer does not start with a response head (stray bytes of the previous
        response that arrived after it was checked), is replaced once: nothing usable was
        received, so repeating the GET is safe."""
        scheme = parts.scheme.lower()
        host = parts.hostname
        host_header = f"[{host}]" if ":" in host else _ascii_host(host)
        if parts.port:
            host_header += f":{parts.port}"
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        message = http1.request_bytes(
            _request_target(path),
            {
                "Host": host_header,
                "User-Agent": self.http.user_agent,
                "Accept": "image/avif,image/webp,image/png,image/jpeg,image/*;q=0.8,*/*;q=0.5",
                "Accept-Encoding": "gzip, deflate",
            },
        )
        key = (scheme, target[1], host)
        for fresh in (False, True):
            connection = self._connection(key, target, deadline, fresh)
            connection.deadline = deadline
            try:
                connection.send(message)
                response = http1.read_response(connection)
            except BaseException as exc:
                connection.close()
                if connection.reused and isinstance(exc, (ConnectionError, http1.ProtocolError)):
                    continue
                raise
            if response is None:
                connection.close()
                if connection.reused:
                    continue
                raise ConnectionError("the server closed the connection without answering")
            response.pool_key = key
            return response
        raise ConnectionError("the server closed a kept-alive and a new connection without answering")

    def _read(self, response: http1.Response, url: str, deadline: float) -> FetchResult:
        status = response.status
        headers = response.headers
        try:
            if self.safety.honour_x_robots_tag:
                directive = self._opt_out(headers.getlist("X-Robots-Tag"))
                if directive:
                    raise Refused("opted_out_header", f"X-Robots-Tag: {directive}", status)
            if not 200 <= status < 300:
                raise Refused(f"http_{status}", f"HTTP {status}", status, _retry_after(headers.get("Retry-After")))
            encoding = (headers.get("Content-Encoding") or "").lower().strip()
            declared = response.content_length
            if declared is not None and declared > self.http.max_bytes and encoding in ("", "identity"):
                raise Refused("too_large", f"Content-Length {declared} exceeds max_bytes {self.http.max_bytes}", status)
            body = self._body(response, encoding, status)
        finally:
            self._release(response)
        mime = (headers.get("Content-Type") or "").split(";", 1)[0].strip().lower() or None
        return FetchResult(None, data=body, http_status=status, final_url=url, mime=mime)

    def _release(self, response: http1.Response) -> None:
        """A connection whose body was read to its end serves the next request; others are closed."""
        if response.reusable:
            self._idle.give_back(response.pool_key, response.connection)
        else:
            response.connection.close()

    def _body(self, response: http1.Response, encoding: str, status: int) -> bytes:
        decoder = _decoder(encoding, status)
        if decoder is None and response.content_length is not None:
            return response.read_all_into(response.content_length)  # checked against max_bytes above
        limit = self.http.max_bytes
        parts: list[bytes] = []
        size = 0
        while True:
            chunk = response.read(READ_CHUNK)
            if not chunk:
                break
            if decoder is not None:
                chunk = _inflate(decoder, chunk, limit - size + 1, encoding, status)
                if decoder.unconsumed_tail:
                    raise Refused("too_large", f"decoded body exceeds max_bytes {limit}", status)
            size += len(chunk)
            if size > limit:
                raise Refused("too_large", f"body exceeds max_bytes {limit}", status)
            parts.append(chunk)
        if decoder is not None:
            tail = _inflate(decoder, b"", 0, encoding, status)
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


WRAPPER, OWN, GUESSED = "wrapper", "own", "guessed"


def embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[list[tuple[str, ipaddress.IPv4Address]], str | None]:
    """The IPv4 addresses an IPv6 address carries, each named by its form, and what they mean:

    - ``WRAPPER``: the IPv6 address only reaches that IPv4 address (IPv4-mapped, SIIT, NAT64's
      well-known prefix, 6to4) and is judged by it alone;
    - ``OWN``: the IPv4 addresses are checked, then the IPv6 address itself (IPv4-compatible,
      Teredo: both its server and its de-obfuscated client);
    - ``GUESSED``: local-use NAT64 (64:ff9b:1::/48), whose prefix length (48 to 96) the operator
      chose, so the address is read at every length; none may be a cloud metadata address, and the
      prefix itself is a local network;
    - None: no IPv4 address inside.
    """
    value = int(address)
    if address.ipv4_mapped is not None:
        return [("IPv4-mapped form", address.ipv4_mapped)], WRAPPER
    if address in IPV4_TRANSLATED:
        return [("IPv4-translated form", ipaddress.IPv4Address(value & 0xFFFFFFFF))], WRAPPER
    if address in NAT64:
        return [("NAT64 form", ipaddress.IPv4Address(value & 0xFFFFFFFF))], WRAPPER
    if address.sixtofour is not None:
        return [("6to4 form", address.sixtofour)], WRAPPER
    if address.teredo is not None:
        server, client = address.teredo
        return [("Teredo client", client), ("Teredo server", server)], OWN
    if address in IPV4_COMPATIBLE and value > 1:
        return [("IPv4-compatible form", ipaddress.IPv4Address(value))], OWN
    if address in NAT64_LOCAL:
        lengths = (48, 56, 64, 96)
        return [(f"local-use NAT64 /{n} form", _rfc6052_ipv4(value, n)) for n in lengths], GUESSED
    return [], None


def _metadata(address: ipaddress._BaseAddress) -> str | None:
    return "cloud metadata service" if address in METADATA_ADDRESSES else None


def _rfc6052_ipv4(value: int, prefix: int) -> ipaddress.IPv4Address:
    """The IPv4 address inside an IPv4-embedded IPv6 address with a ``prefix``-bit prefix (RFC 6052
    section 2.2: the 32 bits follow the prefix and skip bits 64 to 71)."""
    octets = value.to_bytes(16, "big")
    start = prefix // 8
    carried = [i for i in range(start, 16) if i != 8][:4]
    return ipaddress.IPv4Address(bytes(octets[i] for i in carried))


def _decoder(encoding: str, status: int):
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj()
    raise Refused("unsupported_encoding", f"Content-Encoding {encoding!r} is not supported", status)


def _inflate(decoder, chunk: bytes, limit: int, encoding: str, status: int) -> bytes:
    """The next piece of a compressed body (``limit`` 0: the rest); a body that is not what its
    Content-Encoding says is a broken response, not a crash."""
    try:
        return decoder.decompress(chunk, limit) if limit else decoder.flush()
    except zlib.error as exc:
        raise Refused("bad_response", f"the {encoding} body does not decode: {exc}", status) from None


PRINTABLE_ASCII = "".join(chr(code) for code in range(0x21, 0x7F))


def _request_target(path: str) -> str:
    """The path and query as sent: spaces, control characters (no header injection through a
    CR LF in a URL) and non-ASCII percent-encoded as UTF-8, existing escapes left alone."""
    return path if path.isascii() and path.isprintable() and " " not in path else quote(path, safe=PRINTABLE_ASCII)


def _ascii_host(host: str) -> str:
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise Refused("dns_error", f"host {host!r} is not a valid name: {exc}") from None


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

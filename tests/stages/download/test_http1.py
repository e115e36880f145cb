"""The fetcher's own HTTP/1.1 client against raw answers: framing, keep-alive, limits and TLS."""

from __future__ import annotations

import datetime
import gzip
import ipaddress
import select
import socket
import ssl

import pytest
from rawhttp import RawServer

from facecap.stages.download import http1
from facecap.stages.download.fetch import Fetcher, HttpSettings, SafetySettings

BODY = bytes(range(256)) * 40


def fetcher(**http) -> Fetcher:
    settings = HttpSettings(**{"total_timeout": 4, "read_timeout": 2, "retries": 0, **http})
    return Fetcher(settings, SafetySettings(allow_private_networks=True))


def answer(body: bytes = BODY, status: str = "200 OK", headers: str = "", version: str = "HTTP/1.1") -> bytes:
    return f"{version} {status}\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body


def chunked(body: bytes, size: int = 1000) -> bytes:
    pieces = [
        f"{len(body[i : i + size]):x};ext=1\r\n".encode() + body[i : i + size] + b"\r\n"
        for i in range(0, len(body), size)
    ]
    return b"".join(pieces) + b"0\r\nTrailer-One: x\r\n\r\n"


@pytest.fixture
def server():
    with RawServer() as srv:
        yield srv


def test_kept_alive_connections_serve_the_next_requests(server):
    url = server.add("/a", answer())
    client = fetcher()
    results = [client.fetch(url) for _ in range(3)]
    assert all(r.ok and r.data == BODY for r in results)
    assert server.connections == 1


def test_a_kept_alive_connection_the_server_closed_is_replaced_within_the_same_try(server):
    url = server.add("/a", answer())
    server.close_idle_after_one = True
    client = fetcher()
    results = [client.fetch(url) for _ in range(3)]
    assert all(r.ok and r.data == BODY and r.attempts == 1 for r in results)
    assert server.connections == 3


FORGED = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"


@pytest.mark.parametrize(
    "lying",
    [
        answer(b"hello", headers="") + b"...and more" + FORGED,
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" + FORGED,
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" + FORGED,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"hello") + FORGED,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n" + chunked(b"hello"),
    ],
    ids=[
        "length-shorter-than-body",
        "forged-answer-after-body",
        "zero-length-with-body",
        "after-last-chunk",
        "chunked-and-a-length",
    ],
)
def test_bytes_past_the_framing_never_reach_the_next_request(server, lying):
    """Issue 22 item 5: a Content-Length shorter than the body left bytes on the kept-alive
    connection, and the next URL on that host read them as its own answer."""
    liar, honest = server.add("/liar", lying), server.add("/a", answer())
    client = fetcher()
    first = client.fetch(liar)
    assert first.ok and first.data in (b"hello", b"")
    second = client.fetch(honest)
    assert second.ok and second.data == BODY
    assert server.connections == 2  # the liar's connection was not reused


def test_stray_bytes_arriving_after_the_check_cost_one_fresh_connection(server):
    """Bytes the server sends only once the next request is on its way cannot be told from an
    answer until they fail to parse: the request is repeated once on a new connection."""
    liar = server.add("/liar", answer(b"hello"), late=b"garbage after the body\r\n\r\n")
    honest = server.add("/a", answer())
    client = fetcher()
    assert client.fetch(liar).data == b"hello"
    second = client.fetch(honest)
    assert second.ok and second.data == BODY and second.attempts == 1
    assert server.connections == 2


def test_an_idle_connection_that_received_bytes_or_an_end_is_not_handed_out():
    pool = http1.ConnectionPool(per_key=2)
    for stray in (b"HTTP/1.1 200 OK\r\n", b""):
        ours, theirs = socket.socketpair()
        pool.give_back(("http", "h"), http1.Connection(ours, 1.0))
        if stray:
            theirs.sendall(stray)
        else:
            theirs.close()
        select.select([ours], [], [], 5)  # the bytes (or the end) have arrived
        assert pool.take(("http", "h")) is None
        assert ours.fileno() == -1  # closed, not left open
        theirs.close()
    quiet_ours, quiet_theirs = socket.socketpair()
    quiet = http1.Connection(quiet_ours, 1.0)
    pool.give_back(("http", "h"), quiet)
    assert pool.take(("http", "h")) is quiet
    quiet_ours.close()
    quiet_theirs.close()


def test_chunked_bodies_with_extensions_and_trailers(server):
    url = server.add("/c", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(BODY))
    client = fetcher()
    assert client.fetch(url).data == BODY
    assert client.fetch(url).data == BODY  # the connection was left at a clean boundary
    assert server.connections == 1


def test_gzip_inside_chunks_is_decoded(server):
    packed = gzip.compress(BODY)
    url = server.add(
        "/g", b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(packed, 300)
    )
    assert fetcher().fetch(url).data == BODY


def test_a_body_that_ends_with_the_connection(server):
    url = server.add("/old", b"HTTP/1.0 200 OK\r\nContent-Type: image/jpeg\r\n\r\n" + BODY, close=True)
    client = fetcher()
    first, second = client.fetch(url), client.fetch(url)
    assert first.ok and first.data == BODY and first.mime == "image/jpeg" and second.data == BODY
    assert server.connections == 2  # never reused: the end of the body was the end of the connection


def test_informational_answers_are_skipped_and_bare_newlines_accepted(server):
    url = server.add("/info", b"HTTP/1.1 100 Continue\r\n\r\n" + answer())
    assert fetcher().fetch(url).data == BODY
    url = server.add("/lf", b"HTTP/1.1 200 OK\nContent-Length: 3\nX-Robots-Tag: noai\n\nabc")
    assert fetcher().fetch(url).reason == "opted_out_header"


@pytest.mark.parametrize(
    "raw, close, reason",
    [
        (b"SPDY/9 what\r\n\r\n", True, "bad_response"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", True, "bad_response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", True, "bad_response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\nabc", True, "bad_response"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc", True, "bad_response"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100\r\nabc", True, "bad_content_length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9000\r\n\r\nabc", True, "bad_content_length"),
        (b"HTTP/1.1 200 OK\r\nContent-Len", True, "bad_response"),
        (b"", True, "connection_error"),
    ],
    ids=[
        "status-line",
        "huge-header",
        "two-lengths",
        "negative-length",
        "chunk-size",
        "cut-chunk",
        "short",
        "cut-head",
        "silent",
    ],
)
def test_broken_framing_gets_a_reason_and_no_data(server, raw, close, reason):
    url = server.add("/x", raw, close=close)
    result = fetcher().fetch(url)
    assert (result.reason, result.data) == (reason, None)


def test_a_chunked_body_past_max_bytes_is_refused_while_streaming(server):
    url = server.add("/big", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(BODY))
    assert fetcher(max_bytes=5000).fetch(url).reason == "too_large"


def test_spaces_and_non_ascii_in_urls_are_percent_encoded_on_the_wire(server):
    server.add("/a%20b/%C3%A9?q=x%20y", answer())
    result = fetcher().fetch(server.url("/a b/é?q=x y"))
    assert result.ok
    assert server.requests[-1].split(b"\r\n")[0] == b"GET /a%20b/%C3%A9?q=x%20y HTTP/1.1"


def _certificate(tmp_path, name: str, sans: list):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "facecap test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return cert_file, context


def test_https_checks_the_certificate_and_the_host_name(tmp_path, monkeypatch):
    from cryptography import x509

    good_cert, good = _certificate(tmp_path, "good", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    other_cert, other = _certificate(tmp_path, "other", [x509.DNSName("other.example")])
    with RawServer(tls=good) as server:
        url = server.add("/s", answer())
        untrusted = fetcher().fetch(url.replace("http:", "https:"))
        assert untrusted.reason == "tls_error" and "CERTIFICATE_VERIFY_FAILED" in untrusted.detail
        monkeypatch.setenv("SSL_CERT_FILE", str(good_cert))
        client = fetcher()
        results = [client.fetch(url.replace("http:", "https:")) for _ in range(2)]
        assert all(r.ok and r.data == BODY for r in results)
        assert server.connections == 2  # the untrusted try, then one kept-alive TLS connection
    with RawServer(tls=other) as server:
        monkeypatch.setenv("SSL_CERT_FILE", str(other_cert))
        url = server.add("/s", answer())
        mismatch = fetcher().fetch(url.replace("http:", "https:"))
        assert mismatch.reason == "tls_error" and "mismatch" in mismatch.detail.lower()

"""The fetcher against a real loopback server answering like the worst of the web."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from facecap.corpus_server import CorpusServer
from facecap.stages.download import http1
from facecap.stages.download.fetch import Fetcher, HttpSettings, SafetySettings, is_transient

PHOTO = "deepface/img10.jpg"


@pytest.fixture(scope="module")
def server(face_photos):
    with CorpusServer(face_photos) as srv:
        yield srv


def fetcher(**http) -> Fetcher:
    settings = HttpSettings(**{"total_timeout": 4, "retries": 1, "backoff": 0.05, **http})
    return Fetcher(settings, SafetySettings(allow_private_networks=True))


def test_a_photo_arrives_whole(server, face_photos):
    result = fetcher().fetch(server.url(f"/files/{PHOTO}"))
    assert result.ok and result.http_status == 200 and result.mime == "image/jpeg"
    assert result.data == (face_photos / PHOTO).read_bytes()
    assert result.attempts == 1


@pytest.mark.parametrize(
    "path, reason, attempts",
    [
        ("/files/missing.jpg", "http_404", 1),
        ("/status/403", "http_403", 1),
        ("/status/500", "http_500", 2),
        ("/redirect-loop", "too_many_redirects", 1),
        ("/endless", "too_large", 1),
        ("/gzip-bomb", "too_large", 1),
        ("/wrong-length", "bad_content_length", 2),
    ],
)
def test_hostile_answers_get_their_reason(server, path, reason, attempts):
    started = time.monotonic()
    result = fetcher().fetch(server.url(path))
    assert (result.reason, result.attempts) == (reason, attempts)
    assert result.data is None
    assert time.monotonic() - started < 4.5


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_body_that_is_not_its_content_encoding_is_a_bad_response(server, face_photos, encoding):
    photo = (face_photos / PHOTO).read_bytes()
    url = server.add(f"/claims-{encoding}", photo, headers={"Content-Encoding": encoding})
    result = fetcher().fetch(url)
    assert result.reason == "bad_response" and result.data is None
    assert encoding in result.detail


def test_slow_drip_is_cut_at_the_total_deadline(server):
    started = time.monotonic()
    result = fetcher(total_timeout=1.5, read_timeout=1.0).fetch(server.url("/slow-drip"))
    assert result.reason == "timeout"
    assert 1.4 < time.monotonic() - started < 3.0


def test_429_waits_for_retry_after_then_succeeds(server):
    server.hits.clear()
    started = time.monotonic()
    result = fetcher(retries=2).fetch(server.url(f"/flaky/{PHOTO}?fail=1"))
    assert result.ok and result.attempts == 2
    result = fetcher(retries=1).fetch(server.url("/status/429?retry_after=1"))
    assert result.reason == "http_429" and result.attempts == 2
    assert time.monotonic() - started >= 1.0
    too_long = fetcher(retries=3, max_retry_after=0.5).fetch(server.url("/status/429?retry_after=30"))
    assert too_long.reason == "http_429" and too_long.attempts == 1


def test_permanent_errors_are_not_retried_and_transient_ones_are_classified():
    assert not is_transient("http_404") and not is_transient("blocked_address")
    assert all(is_transient(r) for r in ("timeout", "http_503", "http_429", "connection_error"))


def test_loopback_is_refused_unless_allowed(server):
    strict = Fetcher(HttpSettings(), SafetySettings())
    result = strict.fetch(server.url(f"/files/{PHOTO}"))
    assert result.reason == "blocked_address" and "loopback" in result.detail
    for url in (
        "http://169.254.169.254/latest/meta-data/",
        "http://10.1.2.3/x.jpg",
        "http://[::1]/x.jpg",
        "http://0.0.0.0/x.jpg",
        "file:///etc/passwd",
        "http://224.0.0.1/x.jpg",
        "http://2130706433/x.jpg",  # IPv4 spelled as one number, in hex, shortened, in octal
        "http://0x7f.1/x.jpg",
        "http://127.1/x.jpg",
        "http://017700000001/x.jpg",
        "http://[0:0:0:0:0:ffff:127.0.0.1]/x.jpg",
    ):
        assert strict.fetch(url).reason == "blocked_address", url


# IPv6 spellings of loopback and of the cloud metadata address (issue 22 item 8): each is refused
# by the IPv4 address it carries, with its form named.
IPV6_FORMS = {
    "2002:7f00:1::": "6to4 form of 127.0.0.1: loopback",
    "2002:a9fe:a9fe::": "6to4 form of 169.254.169.254: cloud metadata",
    "::ffff:127.0.0.1": "IPv4-mapped form of 127.0.0.1: loopback",
    "::ffff:0:7f00:1": "IPv4-translated form of 127.0.0.1: loopback",
    "::7f00:1": "IPv4-compatible form of 127.0.0.1: loopback",
    "64:ff9b::7f00:1": "NAT64 form of 127.0.0.1: loopback",
    "64:ff9b::a9fe:a9fe": "NAT64 form of 169.254.169.254: cloud metadata",
    "64:ff9b:1::a9fe:a9fe": "local-use NAT64 /96 form of 169.254.169.254: cloud metadata",
    "64:ff9b:1:a9fe:a9:fe00::": "local-use NAT64 /48 form of 169.254.169.254: cloud metadata",
    "64:ff9b:1:7f00:1::": "local-use NAT64 prefix",
    "2001:0:4136:e378:8000:63bf:80ff:fffe": "Teredo client of 127.0.0.1: loopback",  # client bits inverted
    "2001:0:4136:e378:8000:63bf:5601:5601": "Teredo client of 169.254.169.254: cloud metadata",
}


@pytest.mark.parametrize("address", list(IPV6_FORMS))
def test_ipv6_forms_are_judged_by_the_ipv4_address_they_carry(address, monkeypatch):
    strict = Fetcher(HttpSettings(), SafetySettings())
    literal = strict.fetch(f"http://[{address}]/x.jpg")
    assert literal.reason == "blocked_address" and IPV6_FORMS[address] in literal.detail, literal.detail
    real = socket.getaddrinfo

    def resolve(host, port, *args, **kwargs):
        if host == "images.example":
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    named = strict.fetch("http://images.example/x.jpg")
    assert named.reason == "blocked_address" and IPV6_FORMS[address] in named.detail, named.detail
    if "metadata" in IPV6_FORMS[address]:  # never, even where private networks are allowed
        assert (
            Fetcher(HttpSettings(), SafetySettings(allow_private_networks=True))
            .fetch("http://images.example/x.jpg")
            .reason
            == "blocked_address"
        )


@pytest.mark.parametrize("address", ["64:ff9b::808:808", "2002:808:808::1", "::ffff:8.8.8.8", "2606:4700::1111"])
def test_ipv6_forms_of_public_addresses_are_let_through(address, monkeypatch):
    """NAT64 is how an IPv6-only network reaches IPv4 sites: its form of a public address passes."""
    tried = []

    def resolve(host, port, *args, **kwargs):
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0))]

    def connect(sockaddr, *args, **kwargs):
        tried.append(sockaddr[0])
        raise ConnectionRefusedError("not on this test machine")

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setattr(http1, "connect", connect)
    result = Fetcher(HttpSettings(retries=0), SafetySettings()).fetch("http://images.example/x.jpg")
    assert (result.reason, tried) == ("connection_error", [address])


def test_every_redirect_hop_is_checked(server):
    guarded = Fetcher(HttpSettings(), SafetySettings(private_allowlist=["127.0.0.1"]))
    assert guarded.fetch(server.url(f"/files/{PHOTO}")).ok
    port = server.httpd.server_address[1]
    sneaky = server.url(f"/redirect?to=http://127.0.0.2:{port}/files/{PHOTO}")  # loopback, not allowlisted
    result = guarded.fetch(sneaky)
    assert result.reason == "blocked_address" and "loopback" in result.detail
    assert result.final_url.startswith("http://127.0.0.2")
    to_metadata = guarded.fetch(server.url("/redirect?to=http://169.254.169.254/"))
    assert to_metadata.reason == "blocked_address" and "metadata" in to_metadata.detail


def test_x_robots_tag_opt_outs(server, face_photos):
    body = (face_photos / PHOTO).read_bytes()
    cases = {
        "/xr/noai": ("noai", "opted_out_header"),
        "/xr/list": ("noindex, nofollow", "opted_out_header"),
        "/xr/ours": ("facecap: noimageai", "opted_out_header"),
        "/xr/other-bot": ("googlebot: noindex", None),
        "/xr/harmless": ("max-image-preview: large", None),
    }
    for path, (value, _) in cases.items():
        server.add(path, body, headers={"Content-Type": "image/jpeg", "X-Robots-Tag": value})
    for path, (_, reason) in cases.items():
        assert fetcher().fetch(server.url(path)).reason == reason, path
    ignoring = Fetcher(HttpSettings(), SafetySettings(allow_private_networks=True, honour_x_robots_tag=False))
    assert ignoring.fetch(server.url("/xr/noai")).ok


def test_user_agent_is_sent(server, face_photos):
    seen = {}
    handler_class = server.httpd.RequestHandlerClass
    original = handler_class.do_GET

    def spy(self):
        seen["ua"] = self.headers.get("User-Agent")
        return original(self)

    handler_class.do_GET = spy
    try:
        fetcher(user_agent="my-crawler/2.0 (+mailto:me@example.org)").fetch(server.url(f"/files/{PHOTO}"))
    finally:
        handler_class.do_GET = original
    assert seen["ua"] == "my-crawler/2.0 (+mailto:me@example.org)"


def test_per_host_concurrency_is_capped(server):
    server.max_active = 0
    # Each request is held until a second one arrives (not for a fixed 0.2 s, which a busy machine
    # can spend before the second request is even sent): with a cap of 2 the pairs always meet.
    pair = threading.Barrier(2)
    handler_class = server.httpd.RequestHandlerClass
    original = handler_class.do_GET

    def paired(self):
        with server._lock:
            server.active += 1
            server.max_active = max(server.max_active, server.active)
        try:
            pair.wait(timeout=30)
        finally:
            with server._lock:
                server.active -= 1
        return original(self)

    handler_class.do_GET = paired
    limited = fetcher(per_host_concurrency=2, total_timeout=10)
    threads = [threading.Thread(target=limited.fetch, args=(server.url(f"/files/{PHOTO}"),)) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        handler_class.do_GET = original
    assert not pair.broken
    assert server.max_active == 2


def test_per_host_rate_spaces_requests(server):
    paced = fetcher(per_host_rate=10, total_timeout=10)
    started = time.monotonic()
    for _ in range(6):
        assert paced.fetch(server.url(f"/files/{PHOTO}")).ok
    assert time.monotonic() - started >= 0.45

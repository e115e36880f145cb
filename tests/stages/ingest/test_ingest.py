"""The ingest stage: URL judging, opt-out lists, duplicate URLs, resume, the seen-URL set, the funnel."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import ingest, read_all, run

from facecap.pipeline.dataset import Dataset
from facecap.pipeline.storage import Storage
from facecap.stages.ingest.readers import MALFORMED
from facecap.stages.ingest.stage import OptOutList, SeenHashes, first_occurrences, url_hash64, url_problem

INVALID = "ingest:invalid_url"
OPTED_OUT = "ingest:opted_out"
DUPLICATE = "ingest:duplicate_url"


def write_csv(path: Path, urls: list[str]) -> Path:
    """A url,caption CSV; each URL is quoted so commas and spaces inside it survive."""
    lines = ["url,caption"] + [f'"{u}",c{i}' for i, u in enumerate(urls)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, urls: list[str | None]) -> Path:
    path.write_text("".join(json.dumps({"url": u, "caption": f"c{i}"}) + "\n" for i, u in enumerate(urls)))
    return path


def statuses(folder: Path) -> list[str]:
    return read_all(folder).column("status").to_pylist()


def summary(folder: Path) -> dict:
    return Dataset(Storage(str(folder))).summary()


# --- url_problem ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/a.jpg",
        "https://example.com/a.jpg",
        "HTTPS://EXAMPLE.COM/A.JPG",
        "http://example.com",
        "http://example.com:8080/a.jpg",
        "https://example.com:443/a.jpg?w=200&h=100#frag",
        "https://cdn.example.co.uk/path/with%20escape/a.jpg?x=1;y=2",
        "http://user:pass@example.com/a.jpg",
        "http://127.0.0.1/a.jpg",
        "http://[::1]:8080/a.jpg",
        "http://[2001:db8::1]/a.jpg",
        "http://bücher.example/a.jpg",
        "http://xn--bcher-kva.example/a.jpg",
        "https://例え.テスト/画像.jpg",
        "http://my-host.example/é.jpg",
        "http://h:/a.jpg",
        "http://a.example/" + "x" * 2000,
    ],
)
def test_fetchable_urls_have_no_problem(url):
    assert url_problem(url, 2048) is None


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("", "empty URL"),
        (None, "empty URL"),
        (float("nan"), "empty URL"),
        (123, "empty URL"),
        ("http://example.com/a b.jpg", "whitespace or control characters"),
        ("http://example.com/a\tb.jpg", "whitespace or control characters"),
        ("http://example.com/a\nb.jpg", "whitespace or control characters"),
        ("http://example.com/a\x00.jpg", "whitespace or control characters"),
        ("http://example.com/a\x7f.jpg", "whitespace or control characters"),
        ("http://example.com/a\u00a0b.jpg", "whitespace or control characters"),
        ("ftp://example.com/a.jpg", "scheme 'ftp' is not http or https"),
        ("javascript:alert(1)", "scheme 'javascript' is not http or https"),
        ("data:image/png;base64,AAAA", "scheme 'data' is not http or https"),
        ("file:///etc/passwd", "scheme 'file' is not http or https"),
        ("example.com/a.jpg", "no scheme"),
        ("//example.com/a.jpg", "no scheme"),
        ("/relative/a.jpg", "no scheme"),
        ("http://", "no host"),
        ("http:///a.jpg", "no host"),
        ("https://:80/a.jpg", "no host"),
        ("http://h:99999/", "malformed URL"),
        ("http://h:port/", "malformed URL"),
        ("http://h:0/", "port 0"),
        ("http://[::1/a.jpg", "malformed URL"),
        ("http://[not-an-ip]/a.jpg", "malformed URL"),
        ("http://a..b.example/", "invalid host name"),
        ("http://.example.com/", "invalid host name"),
        ("http://exa mple.com/", "whitespace or control characters"),
        ("http://exa<mple.com/", "invalid host name"),
        ("http://" + "a" * 64 + ".example/", "invalid host name"),
        ("http://a.example/" + "x" * 2100, "URL longer than 2048 characters (2117)"),
    ],
)
def test_unfetchable_urls_have_a_reason(url, reason):
    problem = url_problem(url, 2048)
    assert problem is not None
    assert reason in problem


def test_max_length_is_the_configured_one():
    url = "http://a.example/" + "x" * 30  # 47 characters
    assert url_problem(url, 47) is None
    assert url_problem(url, 46) == "URL longer than 46 characters (47)"


# --- statuses end to end ----------------------------------------------------------------------
def test_invalid_urls_are_rejected_with_their_reason(tmp_path):
    urls = ["http://ok.example/1.jpg", "ftp://ok.example/2.jpg", "", "http://ok.example/3 4.jpg", "http://h:99999/"]
    ingest(write_jsonl(tmp_path / "in.jsonl", [*urls, None]), tmp_path / "out")
    table = read_all(tmp_path / "out").to_pylist()
    assert [r["status"] for r in table] == ["ok"] + [INVALID] * 5
    assert [r["error"] for r in table][:3] == [None, "scheme 'ftp' is not http or https", "empty URL"]
    assert table[5]["error"] == "empty URL"
    assert "Port out of range" in table[4]["error"]


def test_surrounding_whitespace_is_stripped_not_rejected(tmp_path):
    urls = ["  http://a.example/1.jpg", "http://a.example/1.jpg\t", "   "]
    ingest(write_jsonl(tmp_path / "in.jsonl", urls), tmp_path / "out")
    rows = read_all(tmp_path / "out").to_pylist()
    assert [r["url"] for r in rows] == ["http://a.example/1.jpg", "http://a.example/1.jpg", None]
    assert [r["status"] for r in rows] == ["ok", DUPLICATE, INVALID]


@pytest.fixture
def opt_out_file(tmp_path) -> Path:
    digest = hashlib.sha256(b"http://free.example/secret.jpg").hexdigest()
    lines = [
        "# opted-out domains and URL digests",
        "",
        "blocked.example   # the whole domain",
        "*.wild.example",
        "Upper.Example.",
        "   ",
        digest.upper(),
    ]
    path = tmp_path / "optout.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


OPT_OUT_CASES = [
    ("http://blocked.example/a.jpg", True),
    ("http://cdn.blocked.example/a.jpg", True),
    ("https://a.b.blocked.example:8443/a.jpg", True),
    ("http://BLOCKED.EXAMPLE./a.jpg", True),
    ("http://notblocked.example/a.jpg", False),
    ("http://blocked.example.com/a.jpg", False),
    ("http://wild.example/a.jpg", True),
    ("http://x.wild.example/a.jpg", True),
    ("http://upper.example/a.jpg", True),
    ("http://free.example/secret.jpg", True),
    ("http://free.example/secret.jpg?x=1", False),
    ("http://free.example/other.jpg", False),
    ("http://example/a.jpg", False),
]


@pytest.mark.parametrize(("url", "covered"), OPT_OUT_CASES)
def test_opt_out_list_covers_domains_subdomains_and_url_digests(opt_out_file, url, covered):
    opt_out = OptOutList([str(opt_out_file)])
    assert opt_out.covers(url) is covered


def test_opt_out_list_ignores_comments_and_blank_lines(opt_out_file):
    opt_out = OptOutList([str(opt_out_file)])
    assert opt_out.domains == {"blocked.example", "wild.example", "upper.example"}
    assert len(opt_out.url_digests) == 1
    assert bool(opt_out)
    assert not OptOutList([])


def test_opt_out_of_an_international_domain_covers_both_spellings(tmp_path):
    (tmp_path / "a.txt").write_text("bücher.example\n")
    (tmp_path / "b.txt").write_text("xn--caf-dma.example\n")
    opt_out = OptOutList([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")])
    assert opt_out.covers("http://bücher.example/a.jpg")
    assert opt_out.covers("http://img.xn--bcher-kva.example/a.jpg")
    assert opt_out.covers("http://café.example/a.jpg")
    assert not opt_out.covers("http://bucher.example/a.jpg")


def test_opted_out_urls_end_to_end_with_a_gzipped_list(tmp_path, opt_out_file):
    gz = tmp_path / "optout.txt.gz"
    gz.write_bytes(gzip.compress(opt_out_file.read_bytes()))
    urls = [url for url, _ in OPT_OUT_CASES]
    result = ingest(write_csv(tmp_path / "in.csv", urls), tmp_path / "out", shard_size=4, opt_out=[str(gz)])
    assert result.ok
    rows = read_all(tmp_path / "out").to_pylist()
    assert [r["status"] == OPTED_OUT for r in rows] == [covered for _, covered in OPT_OUT_CASES]
    assert {r["error"] for r in rows if r["status"] == OPTED_OUT} == {"URL or its domain is on an opt-out list"}
    assert {r["status"] for r in rows if r["status"] != OPTED_OUT} == {"ok"}


def test_duplicates_keep_the_first_occurrence_across_shards_and_files(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    a = [f"http://h.example/{i}.jpg" for i in range(7)]
    b = ["http://h.example/3.jpg", "http://h.example/new.jpg", "http://h.example/0.jpg", "http://h.example/new.jpg"]
    write_csv(folder / "a.csv", a)
    write_jsonl(folder / "b.jsonl", b)
    result = ingest(folder, tmp_path / "out", shard_size=3)
    assert result.ok and result.shards == 4
    rows = read_all(tmp_path / "out").to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 7 + [DUPLICATE, "ok", DUPLICATE, DUPLICATE]
    assert rows[7]["error"] == "the same URL appears earlier in the input"
    # The first of a repeated URL is the one kept, whatever shard it is in.
    first = {}
    for r in rows:
        first.setdefault(r["url"], r["key"])
    assert all((r["key"] == first[r["url"]]) == (r["status"] == "ok") for r in rows)


def test_a_repeat_inside_one_shard_and_dedup_off(tmp_path):
    urls = ["http://h.example/a.jpg", "http://h.example/b.jpg", "http://h.example/a.jpg", "http://h.example/a.jpg"]
    path = write_csv(tmp_path / "in.csv", urls)
    ingest(path, tmp_path / "on")
    assert statuses(tmp_path / "on") == ["ok", "ok", DUPLICATE, DUPLICATE]
    ingest(path, tmp_path / "off", dedup_urls=False)
    assert statuses(tmp_path / "off") == ["ok"] * 4


def test_malformed_and_invalid_rows_do_not_shadow_a_later_copy(tmp_path):
    lines = [
        "url,caption",
        "http://h.example/a.jpg,first,but malformed",  # malformed: 3 fields
        "http://h.example/a.jpg,second",
        "ftp://h.example/b.jpg,invalid",
        "ftp://h.example/b.jpg,invalid again",
        "http://h.example/a.jpg,third",
        "http://h.example/c.jpg,x,y",
        "http://h.example/c.jpg,x,y",
    ]
    (tmp_path / "in.csv").write_text("\n".join(lines) + "\n")
    ingest(tmp_path / "in.csv", tmp_path / "out", shard_size=2)
    assert statuses(tmp_path / "out") == [MALFORMED, "ok", INVALID, INVALID, DUPLICATE, MALFORMED, MALFORMED]


def test_precedence_invalid_then_opted_out_then_duplicate(tmp_path):
    (tmp_path / "optout.txt").write_text("blocked.example\n")
    long_blocked = "http://blocked.example/" + "x" * 100
    urls = [
        "http://blocked.example/a b.jpg",  # invalid and opted out
        long_blocked,  # too long and opted out
        "http://blocked.example/a.jpg",  # opted out
        "http://blocked.example/a.jpg",  # opted out and a repeat
        "http://free.example/a.jpg",
        "http://free.example/a.jpg",  # a repeat
        long_blocked,  # too long, opted out and a repeat
    ]
    ingest(
        write_csv(tmp_path / "in.csv", urls),
        tmp_path / "out",
        shard_size=3,
        opt_out=[str(tmp_path / "optout.txt")],
        max_url_length=64,
    )
    assert statuses(tmp_path / "out") == [INVALID, INVALID, OPTED_OUT, OPTED_OUT, "ok", DUPLICATE, INVALID]


def write_img2dataset(folder: Path, shards: list[list[tuple[str, str, str | None]]]) -> Path:
    """img2dataset output with (key, url, error) samples; error None means downloaded."""
    folder.mkdir()
    for index, samples in enumerate(shards):
        with tarfile.open(folder / f"{index:05d}.tar", "w") as tar:
            for key, _url, error in samples:
                if error is None:
                    info = tarfile.TarInfo(f"{key}.jpg")
                    info.size = 4
                    tar.addfile(info, io.BytesIO(b"\xff\xd8\xff\xd9"))
        table = pa.table(
            {
                "key": [k for k, _, _ in samples],
                "url": [u for _, u, _ in samples],
                "caption": ["c"] * len(samples),
                "status": ["success" if e is None else "failed_to_download" for _, _, e in samples],
                "error_message": [e for _, _, e in samples],
            }
        )
        pq.write_table(table, folder / f"{index:05d}.parquet")
    return folder


def test_download_failures_take_no_part_in_dedup(tmp_path):
    a, b = "http://h.example/a.jpg", "http://h.example/b.jpg"
    folder = write_img2dataset(
        tmp_path / "i2d",
        [
            [("000000000", a, "HTTP Error 404: Not Found"), ("000000001", b, None)],
            [("000010000", a, None), ("000010001", b, None), ("000010002", "nope://x", "bad scheme")],
        ],
    )
    result = ingest(folder, tmp_path / "out")
    assert result.ok and result.shards == 2
    rows = read_all(tmp_path / "out").to_pylist()
    assert [(r["key"], r["status"]) for r in rows] == [
        ("000000000", "download:http_404"),
        ("000000001", "ok"),
        ("000010000", "ok"),  # the earlier copy failed to download: this one is the first kept
        ("000010001", DUPLICATE),
        ("000010002", "download:failed"),  # kept as img2dataset said, not re-judged as invalid_url
    ]


# --- resume -----------------------------------------------------------------------------------
def resume_input(tmp_path: Path) -> Path:
    """40 URLs in 4 shards of 10; shard 2 repeats URLs first seen in shards 0 and 1."""
    urls = [f"http://h{i % 5}.example/{i}.jpg" for i in range(40)]
    urls[21] = urls[3]
    urls[24] = urls[15]
    urls[27] = urls[22]
    urls[33] = urls[3]
    urls[12] = "nope://12"
    urls[25] = "nope://12"
    return write_csv(tmp_path / "in.csv", urls)


def parquet_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("part-*.parquet"))}


def test_resume_redoes_only_the_missing_shard_and_matches_an_uninterrupted_run(tmp_path):
    path = resume_input(tmp_path)
    first = ingest(path, tmp_path / "whole")
    assert first.ok and first.shards == 4 and first.processed == 4
    expected = statuses(tmp_path / "whole")
    assert [expected[i] for i in (21, 24, 27, 33, 12, 25)] == [DUPLICATE] * 4 + [INVALID] * 2

    out = tmp_path / "resumed"
    ingest(path, out)
    (out / "_done" / "part-00002.json").unlink()
    (out / "part-00002.parquet").unlink()
    untouched = {name: (out / name).stat().st_mtime_ns for name in ("part-00000.parquet", "part-00003.parquet")}
    again = ingest(path, out)
    assert again.ok
    assert (again.shards, again.processed, again.skipped) == (4, 1, 3)
    assert {name: (out / name).stat().st_mtime_ns for name in untouched} == untouched
    assert parquet_bytes(out) == parquet_bytes(tmp_path / "whole")
    assert len(parquet_bytes(out)) == 4
    # The redone shard still saw the URLs of the shards it skipped.
    assert statuses(out)[20:30] == expected[20:30]
    assert summary(out)["complete"] is True


def test_resume_of_a_truncated_shard_and_a_complete_rerun(tmp_path):
    path = resume_input(tmp_path)
    ingest(path, tmp_path / "whole")
    out = tmp_path / "out"
    ingest(path, out)
    shard = out / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])  # the marker no longer matches: redone
    again = ingest(path, out)
    assert (again.processed, again.skipped) == (1, 3)
    assert parquet_bytes(out) == parquet_bytes(tmp_path / "whole")
    third = ingest(path, out)
    assert third.nothing_to_do and third.processed == 0


# --- SeenHashes -------------------------------------------------------------------------------
def u64(values) -> np.ndarray:
    return np.asarray(list(values), dtype=np.uint64)


def test_seen_hashes_empty_and_small():
    seen = SeenHashes()
    assert len(seen) == 0
    assert seen.contains(u64([1, 2])).tolist() == [False, False]
    assert seen.contains(u64([])).tolist() == []
    seen.add(u64([5, 3, 5]))
    seen.add(u64([]))
    assert len(seen) == 2
    assert seen.contains(u64([3, 4, 5, 0, 2**64 - 1])).tolist() == [True, False, True, False, False]
    seen.add(u64([2**64 - 1, 3]))
    assert len(seen) == 3
    assert seen.contains(u64([2**64 - 1, 2**63, 3])).tolist() == [True, False, True]


def test_seen_hashes_equals_a_python_set_over_many_runs():
    rng = np.random.default_rng(7)
    seen, reference = SeenHashes(), set()
    pool = rng.integers(0, 2**64, size=3000, dtype=np.uint64)  # repeats across and within batches
    for step in range(300):
        size = int(rng.integers(0, 40))
        batch = np.concatenate([rng.choice(pool, size), rng.integers(0, 2**64, size=size // 4, dtype=np.uint64)])
        query = np.concatenate([batch, rng.choice(pool, 50), rng.integers(0, 2**64, size=10, dtype=np.uint64)])
        assert seen.contains(query).tolist() == [int(h) in reference for h in query], f"step {step}"
        seen.add(batch)
        reference.update(int(h) for h in batch)
        assert len(seen) == len(reference)
    assert len(seen._runs) <= math.log2(len(reference)) + 1


def test_seen_hashes_stay_few_runs_when_batches_shrink():
    seen, total = SeenHashes(), 0
    for size in range(400, 0, -1):  # later shards add fewer new URLs, as repeats grow
        seen.add(np.arange(total, total + size, dtype=np.uint64) * 7919)
        total += size
    assert len(seen) == total
    assert len(seen._runs) <= math.log2(total) + 1
    assert seen.contains(np.arange(0, total, dtype=np.uint64) * 7919).all()
    assert not seen.contains(np.arange(0, total, dtype=np.uint64) * 7919 + 1).any()


def test_first_occurrences_within_a_batch_and_against_earlier_batches():
    seen = SeenHashes()
    assert first_occurrences(["a", "b", "a", "c", "b"], seen).tolist() == [True, True, False, True, False]
    assert first_occurrences(["c", "d", "d", "a"], seen).tolist() == [False, True, False, False]
    assert first_occurrences([], seen).tolist() == []
    assert len(seen) == 4
    assert url_hash64("a") == url_hash64("a") != url_hash64("b")
    assert url_hash64("\ud800") != url_hash64("a")  # lone surrogates hash instead of raising


# --- the funnel -------------------------------------------------------------------------------
def test_funnel_adds_up_to_the_input_rows(tmp_path):
    (tmp_path / "optout.txt").write_text("blocked.example\n")
    lines = ["url,caption"]
    expected: Counter[str] = Counter()
    for i in range(57):
        kind = i % 6
        if kind == 0:
            lines.append(f"http://h.example/{i}.jpg,c,extra")
            expected[MALFORMED] += 1
        elif kind == 1:
            lines.append(f"nope://{i},c")
            expected[INVALID] += 1
        elif kind == 2:
            lines.append(f"http://blocked.example/{i}.jpg,c")
            expected[OPTED_OUT] += 1
        elif kind == 3 and i > 3:
            lines.append("http://h.example/1000.jpg,c")
            expected[DUPLICATE] += 1
        else:
            lines.append(f"http://h.example/{i if kind != 3 else 1000}.jpg,c")
            expected["ok"] += 1
    (tmp_path / "in.csv").write_text("\n".join(lines) + "\n")
    result = ingest(tmp_path / "in.csv", tmp_path / "out", shard_size=8, opt_out=[str(tmp_path / "optout.txt")])
    assert result.ok and result.shards == 8
    funnel = summary(tmp_path / "out")
    assert sum(funnel["by_status"].values()) == 57 == funnel["rows"] == funnel["rows_in"]
    assert funnel["by_status"] == dict(expected)
    assert Counter(statuses(tmp_path / "out")) == expected
    assert funnel["complete"] is True and funnel["shards"] == {"total": 8, "done": 8, "failed": 0}


def test_underscore_hosts_are_fetchable_urls():
    from facecap.stages.ingest.stage import url_problem

    assert url_problem("http://img_cdn.example.com/a.jpg", 2048) is None


TRAVERSING_KEYS = ["../../evil", "/abs/path", "a/../../b", "..", "a\\..\\b", "C:evil", "a//b", "x\x00y", "k.jpg"]


def test_img2dataset_keys_that_could_escape_a_tar_get_a_status_and_never_reach_a_tar(tmp_path):
    import insightface

    from facecap.stages.detect.stage import DetectConfig, DetectStage

    photo = (Path(insightface.__file__).parent / "data" / "images" / "t1.jpg").read_bytes()
    folder = tmp_path / "i2d"
    folder.mkdir()
    keys = ["000000000", *TRAVERSING_KEYS]
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for key in keys:
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(photo)
            tar.addfile(info, io.BytesIO(photo))
    pq.write_table(
        pa.table(
            {
                "key": keys,
                "url": [f"http://h.example/{i}.jpg" for i in range(len(keys))],
                "status": ["success"] * len(keys),
            }
        ),
        folder / "00000.parquet",
    )
    assert ingest(folder, tmp_path / "out").ok
    rows = read_all(tmp_path / "out").to_pylist()
    assert [r["status"] for r in rows if r["key"] == "000000000"] == ["ok"]
    bad = [r for r in rows if r["key"] != "000000000"]
    assert len(bad) == len(TRAVERSING_KEYS) and all(r["status"] == "ingest:invalid_key" for r in bad)
    assert all(r["error"] for r in bad)
    assert run(DetectStage, tmp_path / "out", tmp_path / "detect", DetectConfig(min_face_side=20)).ok
    members = []
    for tar_path in (tmp_path / "detect").glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            members += tar.getnames()
    assert members and all(name.startswith("000000000") for name in members)

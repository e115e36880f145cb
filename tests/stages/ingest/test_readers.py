"""Input readers: every URL-list format, folders and globs, shard cutting, bad input, img2dataset folders."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import tarfile
import uuid
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import ingest, read_all, run

from facecap.pipeline.dataset import Dataset, TarShardReader
from facecap.pipeline.errors import InputError
from facecap.pipeline.stage import Batch, Output, Stage
from facecap.pipeline.storage import Storage
from facecap.stages.ingest import readers as sources
from facecap.stages.ingest.readers import MALFORMED, SourceConfig, open_source

URLS = [f"http://img{i % 3}.example/photo/{i}.jpg" for i in range(7)]
CAPTIONS = [f"caption {i}, with a comma" for i in range(7)]


# --- building inputs --------------------------------------------------------------------------
def write_parquet(path: Path, table: pa.Table) -> Path:
    if path.name.endswith(".gz"):
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        path.write_bytes(gzip.compress(buffer.getvalue()))
    else:
        pq.write_table(table, path)
    return path


def write_text(path: Path, text: str) -> Path:
    data = text.encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def read_lines(path: Path, lines: list[str]) -> list[dict]:
    """The rows ingest reads from a file of these lines."""
    return read_rows(write_text(path, "\n".join(lines) + "\n"))


def write_urls(path: Path, urls: list[str], captions: list[str]) -> Path:
    """The same rows in the format the file name asks for."""
    fmt = sources._format_of(str(path))
    if fmt == "parquet":
        return write_parquet(path, pa.table({"url": urls, "caption": captions}))
    if fmt == "txt":
        return write_text(path, "".join(f"{u}\n" for u in urls))
    if fmt == "jsonl":
        lines = [json.dumps({"url": u, "caption": c}) + "\n" for u, c in zip(urls, captions, strict=True)]
        return write_text(path, "".join(lines))
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="," if fmt == "csv" else "\t", lineterminator="\n")
    writer.writerow(["url", "caption"])
    writer.writerows(zip(urls, captions, strict=True))
    return write_text(path, buffer.getvalue())


def read_rows(inputs: Path | str | list, **config) -> list[dict]:
    items = [str(i) for i in inputs] if isinstance(inputs, list) else [str(inputs)]
    source = open_source(SourceConfig(input=items, **config))
    tables = [shard.table for shard in source.shards()]
    return pa.concat_tables(tables).to_pylist()


def shard_tables(inputs: Path | str, **config) -> list[pa.Table]:
    return [shard.table for shard in open_source(SourceConfig(input=[str(inputs)], **config)).shards()]


def keys(n: int, start: int = 0) -> list[str]:
    return [f"{i:010d}" for i in range(start, start + n)]


# --- every format -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "urls.parquet",
        "urls.csv",
        "urls.tsv",
        "urls.jsonl",
        "urls.ndjson",
        "urls.txt",
        "urls.csv.gz",
        "urls.jsonl.gz",
        "urls.txt.gz",
        "urls.parquet.gz",
    ],
)
def test_every_format_reads_the_same_rows(tmp_path, name):
    path = write_urls(tmp_path / name, URLS, CAPTIONS)
    rows = read_rows(path, shard_size=3)
    assert [r["key"] for r in rows] == keys(7)
    assert [r["url"] for r in rows] == URLS
    expected_captions = [None] * 7 if ".txt" in name else CAPTIONS
    assert [r["alt_text"] for r in rows] == expected_captions
    assert {r["status"] for r in rows} == {"ok"}
    assert {r["error"] for r in rows} == {None}
    assert {r["source_file"] for r in rows} == {str(path)}
    assert [r["source_row"] for r in rows] == list(range(7))
    assert list(rows[0]) == ["key", "status", "error", "url", "alt_text", "source_file", "source_row"]


def test_format_override_reads_a_file_whose_name_says_nothing(tmp_path):
    path = write_text(tmp_path / "urls.list", "http://a.example/1.jpg\nhttp://a.example/2.jpg\n")
    with pytest.raises(InputError, match=r"urls\.list: cannot tell the format"):
        open_source(SourceConfig(input=[str(path)]))
    rows = read_rows(path, format="txt")
    assert [r["url"] for r in rows] == ["http://a.example/1.jpg", "http://a.example/2.jpg"]


def test_folder_of_mixed_files_is_read_in_sorted_order_with_contiguous_keys(tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    write_urls(folder / "b.jsonl", URLS[2:4], CAPTIONS[2:4])
    write_urls(folder / "a.csv", URLS[:2], CAPTIONS[:2])
    write_urls(folder / "c.parquet", URLS[4:6], CAPTIONS[4:6])
    write_urls(folder / "sub" / "d.txt.gz", URLS[6:], CAPTIONS[6:])
    write_text(folder / "README.md", "not an input\n")
    write_text(folder / ".hidden.csv", "url\nhttp://hidden.example/x.jpg\n")

    tables = shard_tables(folder, shard_size=3)
    assert [t.num_rows for t in tables] == [3, 3, 1]
    rows = pa.concat_tables(tables).to_pylist()
    assert [r["key"] for r in rows] == keys(7)
    assert [r["url"] for r in rows] == URLS
    names = [os.path.relpath(r["source_file"], folder) for r in rows]
    assert names == ["a.csv", "a.csv", "b.jsonl", "b.jsonl", "c.parquet", "c.parquet", "sub/d.txt.gz"]
    assert [r["source_row"] for r in rows] == [0, 1, 0, 1, 0, 1, 0]
    assert [r["alt_text"] for r in rows] == [*CAPTIONS[:6], None]


def test_glob_and_several_inputs(tmp_path):
    write_urls(tmp_path / "part-2.csv", URLS[4:], CAPTIONS[4:])
    write_urls(tmp_path / "part-1.csv", URLS[:4], CAPTIONS[:4])
    write_urls(tmp_path / "other.jsonl", ["http://other.example/o.jpg"], ["o"])
    rows = read_rows(tmp_path / "part-*.csv", shard_size=2)
    assert [r["url"] for r in rows] == URLS
    assert [r["key"] for r in rows] == keys(7)
    assert [os.path.basename(r["source_file"]) for r in rows] == ["part-1.csv"] * 4 + ["part-2.csv"] * 3
    # Several inputs: read in the order given, keys still run on.
    rows = read_rows([tmp_path / "other.jsonl", tmp_path / "part-*.csv"])
    assert [r["url"] for r in rows] == ["http://other.example/o.jpg", *URLS]
    assert [r["key"] for r in rows] == keys(8)


def test_relative_input_gives_absolute_source_file(tmp_path, monkeypatch):
    write_urls(tmp_path / "urls.csv", URLS, CAPTIONS)
    monkeypatch.chdir(tmp_path)
    rows = read_rows("urls.csv")
    assert {r["source_file"] for r in rows} == {str(tmp_path / "urls.csv")}
    assert os.path.isabs(rows[0]["source_file"])


# --- columns ----------------------------------------------------------------------------------
LAION = {
    "URL": ["http://a.example/1.jpg", "http://b.example/2.jpg", "http://c.example/3.jpg"],
    "TEXT": ["a cat", "a dog", None],
    "SAMPLE_ID": [101, 102, 103],
    "NSFW": ["UNLIKELY", "NSFW", "UNLIKELY"],
    "similarity": [0.31, 0.29, 0.4],
    "LICENSE": ["?", "cc-by", "?"],
    "status": ["success", "failed", "success"],
    "key": ["k1", "k2", "k3"],
}


def write_laion(path: Path) -> Path:
    fmt = sources._format_of(str(path))
    if fmt == "parquet":
        return write_parquet(path, pa.table(LAION))
    records = [dict(zip(LAION, values, strict=True)) for values in zip(*LAION.values(), strict=True)]
    if fmt == "jsonl":
        return write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(LAION)
    writer.writerows([["" if v is None else v for v in r.values()] for r in records])
    return write_text(path, buffer.getvalue())


@pytest.mark.parametrize("name", ["laion.parquet", "laion.csv", "laion.jsonl"])
def test_laion_columns_are_renamed_and_extras_kept(tmp_path, name):
    path = write_laion(tmp_path / name)
    table = pa.concat_tables(shard_tables(path, url_column="URL", caption_column="TEXT"))
    assert table.column_names == [
        "key",
        "status",
        "error",
        "url",
        "alt_text",
        "SAMPLE_ID",
        "NSFW",
        "similarity",
        "LICENSE",
        "input_status",
        "input_key",
        "source_file",
        "source_row",
    ]
    rows = table.to_pylist()
    assert [r["url"] for r in rows] == LAION["URL"]
    assert [r["alt_text"] for r in rows][:2] == ["a cat", "a dog"]
    # The input's own status and key are data, not facecap's: every row is ok with facecap keys.
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert [r["key"] for r in rows] == keys(3)
    assert [r["input_status"] for r in rows] == ["success", "failed", "success"]
    assert [r["input_key"] for r in rows] == ["k1", "k2", "k3"]
    assert [r["NSFW"] for r in rows] == LAION["NSFW"]
    assert [r["LICENSE"] for r in rows] == LAION["LICENSE"]
    if name.endswith(".parquet"):
        assert table.schema.field("SAMPLE_ID").type == pa.int64()
        assert table.schema.field("similarity").type == pa.float64()
        assert [r["SAMPLE_ID"] for r in rows] == [101, 102, 103]
        assert [r["similarity"] for r in rows] == [0.31, 0.29, 0.4]
    else:
        assert [r["SAMPLE_ID"] for r in rows] == ["101", "102", "103"]
        assert [float(r["similarity"]) for r in rows] == [0.31, 0.29, 0.4]


def test_laion_extras_survive_ingest(tmp_path):
    path = write_laion(tmp_path / "laion.parquet")
    result = ingest(path, tmp_path / "out", url_column="URL", caption_column="TEXT")
    assert result.ok
    table = read_all(tmp_path / "out")
    assert table.column("status").to_pylist() == ["ok"] * 3
    assert table.column("SAMPLE_ID").to_pylist() == [101, 102, 103]
    assert table.schema.field("similarity").type == pa.float64()
    assert table.column("input_status").to_pylist() == ["success", "failed", "success"]
    assert not any(name.startswith("_") for name in table.column_names)


@pytest.mark.parametrize("name", ["laion.parquet", "laion.csv", "laion.jsonl"])
def test_keep_columns_false_drops_extras(tmp_path, name):
    path = write_laion(tmp_path / name)
    rows = read_rows(path, url_column="URL", caption_column="TEXT", keep_columns=False)
    assert list(rows[0]) == ["key", "status", "error", "url", "alt_text", "source_file", "source_row"]
    assert [r["url"] for r in rows] == LAION["URL"]


def test_no_caption_column_keeps_an_input_caption_as_data(tmp_path):
    path = write_urls(tmp_path / "urls.csv", URLS[:2], CAPTIONS[:2])
    rows = read_rows(path, caption_column=None)
    assert [r["alt_text"] for r in rows] == [None, None]
    assert [r["input_caption"] for r in rows] == CAPTIONS[:2]


def test_url_column_named_for_another_format_still_reads_txt(tmp_path):
    # A LAION-style recipe (url_column URL) given a plain list of URLs.
    path = write_urls(tmp_path / "urls.txt", URLS[:2], CAPTIONS[:2])
    rows = read_rows(path, url_column="URL", caption_column="TEXT")
    assert [r["url"] for r in rows] == URLS[:2]


def test_parquet_files_disagreeing_on_a_column_type_read_it_as_text(tmp_path):
    write_parquet(tmp_path / "a.parquet", pa.table({"url": URLS[:2], "score": [1, 2], "same": [1.5, 2.5]}))
    write_parquet(tmp_path / "b.parquet", pa.table({"url": URLS[2:4], "score": ["x", None], "same": [3.5, 4.5]}))
    write_parquet(tmp_path / "c.parquet", pa.table({"url": URLS[4:5], "score": [7]}))
    table = pa.concat_tables(shard_tables(tmp_path, shard_size=2))
    assert table.schema.field("score").type == pa.string()
    assert table.schema.field("same").type == pa.float64()
    assert table.column("score").to_pylist() == ["1", "2", "x", None, "7"]
    assert table.column("same").to_pylist() == [1.5, 2.5, 3.5, 4.5, None]


def test_large_string_and_dictionary_columns_are_read_as_string(tmp_path):
    table = pa.table(
        {
            "url": pa.array(URLS[:3], pa.large_string()),
            "tag": pa.array(["a", "b", "a"]).dictionary_encode(),
        }
    )
    write_parquet(tmp_path / "a.parquet", table)
    out = pa.concat_tables(shard_tables(tmp_path / "a.parquet"))
    assert out.schema.field("url").type == pa.string()
    assert out.schema.field("tag").type == pa.string()
    assert out.column("tag").to_pylist() == ["a", "b", "a"]


# --- shard cutting ----------------------------------------------------------------------------
@pytest.mark.parametrize("shard_size", [1, 4, 10, 23, 1000])
def test_shards_hold_exactly_shard_size_rows_and_keys_do_not_depend_on_it(tmp_path, monkeypatch, shard_size):
    # Small read batches, so shards are cut across batch and file boundaries.
    monkeypatch.setattr(sources, "READ_BATCH", 3)
    urls = [f"http://h.example/{i}.jpg" for i in range(23)]
    write_urls(tmp_path / "a.csv", urls[:8], [f"c{i}" for i in range(8)])
    write_urls(tmp_path / "b.parquet", urls[8:17], [f"c{i}" for i in range(8, 17)])
    write_urls(tmp_path / "c.jsonl", urls[17:], [f"c{i}" for i in range(17, 23)])
    source = open_source(SourceConfig(input=[str(tmp_path)], shard_size=shard_size))
    shards = list(source.shards())
    assert [s.index for s in shards] == list(range(len(shards)))
    sizes = [s.table.num_rows for s in shards]
    full, rest = divmod(23, shard_size)
    assert sizes == [shard_size] * full + ([rest] if rest else [])
    table = pa.concat_tables(s.table for s in shards)
    assert table.column("key").to_pylist() == keys(23)
    assert table.column("url").to_pylist() == urls
    assert all(s.table.schema == shards[0].table.schema for s in shards)
    assert all(s.table.column("key").num_chunks == 1 for s in shards)


def test_source_fingerprint_names_every_file_and_its_size(tmp_path):
    a = write_urls(tmp_path / "a.csv", URLS, CAPTIONS)
    b = write_urls(tmp_path / "b.txt", URLS, CAPTIONS)
    source = open_source(SourceConfig(input=[str(tmp_path)]))
    assert source.kind == "urls"
    assert source.files == [str(a), str(b)]
    assert source.fingerprint == [(str(a), a.stat().st_size), (str(b), b.stat().st_size)]


# --- bad input --------------------------------------------------------------------------------
def test_csv_lines_with_the_wrong_field_count_become_malformed_rows(tmp_path):
    lines = [
        "url,caption",
        "http://a.example/0.jpg,zero",
        "http://a.example/1.jpg,one,extra",
        "http://a.example/2.jpg",
        "",
        '"http://a.example/3.jpg","three, quoted"',
        '"http://a.example/4.jpg","multi\nline"',
    ]
    rows = read_lines(tmp_path / "bad.csv", lines)
    assert [r["status"] for r in rows] == ["ok", MALFORMED, MALFORMED, "ok", "ok"]
    assert rows[1]["error"] == "expected 2 fields, got 3"
    assert rows[2]["error"] == "expected 2 fields, got 1"
    assert rows[2]["url"] == "http://a.example/2.jpg"
    assert [r["alt_text"] for r in rows] == ["zero", "one", None, "three, quoted", "multi\nline"]
    assert [r["source_row"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["key"] for r in rows] == keys(5)


def test_csv_line_the_parser_rejects_becomes_a_malformed_row_and_reading_goes_on(tmp_path):
    huge = "x" * 100
    path = write_text(tmp_path / "huge.csv", f"url,caption\nhttp://a.example/1.jpg,{huge}\nhttp://a.example/2.jpg,ok\n")
    old_limit = csv.field_size_limit(60)  # stands in for the 64 MiB limit
    try:
        rows = read_rows(path)
    finally:
        csv.field_size_limit(old_limit)
    assert [r["status"] for r in rows] == [MALFORMED, "ok"]
    assert rows[0]["error"] == "unparsable line: field larger than field limit (60)"
    assert [r["url"] for r in rows] == [None, "http://a.example/2.jpg"]
    assert [r["source_row"] for r in rows] == [0, 1]


def test_jsonl_lines_that_are_not_objects_become_malformed_rows(tmp_path):
    lines = [
        '{"url": "http://a.example/0.jpg", "caption": "zero", "n": 3, "tags": ["x", "é"]}',
        "{not json",
        "",
        '["http://a.example/1.jpg"]',
        "42",
        '{"url": "http://a.example/2.jpg"}',
    ]
    rows = read_lines(tmp_path / "bad.jsonl", lines)
    assert [r["status"] for r in rows] == ["ok", MALFORMED, MALFORMED, MALFORMED, "ok"]
    assert rows[1]["error"].startswith("not JSON: ")
    assert rows[2]["error"] == "expected a JSON object, got list"
    assert rows[3]["error"] == "expected a JSON object, got int"
    assert [r["source_row"] for r in rows] == [0, 1, 3, 4, 5]
    assert [r["url"] for r in rows] == ["http://a.example/0.jpg", None, None, None, "http://a.example/2.jpg"]
    # Values that are not strings are kept as their JSON text.
    assert rows[0]["n"] == "3"
    assert json.loads(rows[0]["tags"]) == ["x", "é"]


def test_malformed_rows_pass_through_ingest_and_the_funnel_adds_up(tmp_path):
    csv_lines = ["url,caption"] + [f"http://a.example/{i}.jpg,c{i}" + (",x" if i % 4 == 0 else "") for i in range(13)]
    (tmp_path / "in").mkdir()
    write_text(tmp_path / "in" / "a.csv", "\n".join(csv_lines) + "\n")
    jsonl_lines = [json.dumps({"url": f"http://b.example/{i}.jpg"}) if i % 3 else "{broken" for i in range(9)]
    write_text(tmp_path / "in" / "b.jsonl", "\n".join(jsonl_lines) + "\n")
    result = ingest(tmp_path / "in", tmp_path / "out", shard_size=5)
    assert result.ok and result.shards == 5
    table = read_all(tmp_path / "out")
    assert table.num_rows == 13 + 9
    statuses = table.column("status").to_pylist()
    assert statuses.count(MALFORMED) == 4 + 3
    assert statuses.count("ok") == 22 - 7
    summary = Dataset(Storage(str(tmp_path / "out"))).summary()
    assert summary["rows"] == summary["rows_in"] == 22
    assert sum(summary["by_status"].values()) == 22
    assert summary["by_status"][MALFORMED] == 7


@pytest.mark.parametrize("name", ["latin.csv", "latin.jsonl", "latin.tsv"])
def test_cp1252_bytes_decode(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        raw = '{"url": "http://a.example/1.jpg", "caption": "café – naïve"}\n'
    else:
        sep = "," if name.endswith(".csv") else "\t"
        raw = f"url{sep}caption\nhttp://a.example/1.jpg{sep}café – naïve\n"
    path.write_bytes(raw.encode("cp1252"))
    rows = read_rows(path)
    assert rows[0]["alt_text"] == "café – naïve"
    assert rows[0]["status"] == "ok"


def test_cp1252_and_utf8_lines_in_one_file(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_bytes("http://a.example/café.jpg\n".encode("cp1252") + "http://a.example/ünï.jpg\n".encode())
    assert [r["url"] for r in read_rows(path)] == ["http://a.example/café.jpg", "http://a.example/ünï.jpg"]


@pytest.mark.parametrize("name", ["bom.csv", "bom.jsonl", "bom.txt"])
def test_utf8_byte_order_mark_is_ignored(tmp_path, name):
    fmt = name.rsplit(".", 1)[1]
    body = {
        "csv": "url,caption\nhttp://a.example/1.jpg,cap\n",
        "jsonl": '{"url": "http://a.example/1.jpg", "caption": "cap"}\n',
        "txt": "http://a.example/1.jpg\n",
    }[fmt]
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    rows = read_rows(path)
    assert [(r["status"], r["url"]) for r in rows] == [("ok", "http://a.example/1.jpg")]


def test_json_escape_with_half_a_surrogate_pair_does_not_stop_the_read(tmp_path):
    path = write_text(
        tmp_path / "s.jsonl",
        '{"url": "http://a.example/1.jpg", "caption": "cut \\ud83d"}\n'
        '{"url": "http://a.example/2.jpg", "caption": "whole \\ud83d\\ude00"}\n',
    )
    rows = read_rows(path)
    assert [r["alt_text"] for r in rows] == ["cut \ufffd", "whole \U0001f600"]


def test_integer_url_column_becomes_text_and_is_judged_invalid(tmp_path):
    write_parquet(tmp_path / "ids.parquet", pa.table({"url": [123, None, 456], "caption": ["a", "b", "c"]}))
    rows = read_rows(tmp_path / "ids.parquet")
    assert [r["url"] for r in rows] == ["123", None, "456"]
    result = ingest(tmp_path / "ids.parquet", tmp_path / "out")
    assert result.ok
    table = read_all(tmp_path / "out")
    assert table.column("status").to_pylist() == ["ingest:invalid_url"] * 3
    assert table.column("error").to_pylist()[1] == "empty URL"


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("a.csv", "link,caption\nhttp://a.example/1.jpg,x\n"),
        ("a.tsv", "link\tcaption\nhttp://a.example/1.jpg\tx\n"),
        ("a.jsonl", '{"link": "http://a.example/1.jpg", "caption": "x"}\n'),
        ("a.parquet", None),
    ],
)
def test_missing_url_column_names_the_file_and_the_columns(tmp_path, name, body):
    path = tmp_path / name
    if body is None:
        write_parquet(path, pa.table({"link": ["http://a.example/1.jpg"], "caption": ["x"]}))
    else:
        write_text(path, body)
    with pytest.raises(InputError) as caught:
        open_source(SourceConfig(input=[str(path)]))
    message = str(caught.value)
    assert str(path) in message
    assert "no column 'url'" in message
    assert "columns: link, caption" in message


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_a_file_without_the_url_column_among_others_gives_each_row_a_status(tmp_path, kind):
    """One stray file in a big folder must not stop the run, nor lose its rows silently."""
    (tmp_path / "in").mkdir()
    write_urls(tmp_path / "in" / "a.csv", URLS, CAPTIONS)
    stray = tmp_path / "in" / f"b.{kind}"
    if kind == "csv":
        write_text(stray, "URL,TEXT\nhttp://b.example/1.jpg,x\nhttp://b.example/2.jpg,y\n")
    elif kind == "jsonl":
        write_text(stray, '{"URL": "http://b.example/1.jpg"}\n\n{"URL": "http://b.example/2.jpg"}\n')
    else:
        write_parquet(
            stray, pa.table({"URL": ["http://b.example/1.jpg", "http://b.example/2.jpg"], "TEXT": ["x", "y"]})
        )
    result = ingest(tmp_path / "in", tmp_path / "out")
    assert result.ok
    rows = read_all(tmp_path / "out").to_pylist()
    strays = [r for r in rows if r["source_file"].endswith(stray.name)]
    assert len(rows) == len(URLS) + 2 and len(strays) == 2
    assert {r["status"] for r in strays} == {"ingest:malformed_row"}
    assert all(
        "no column 'url' (columns: URL" in r["error"] or "no 'url' field (fields: URL" in r["error"] for r in strays
    )
    assert len({r["source_row"] for r in strays}) == 2


@pytest.mark.parametrize("missing", ["nothing-here.csv", "no-folder/", "*.nomatch"])
def test_missing_input_path_is_an_input_error(tmp_path, missing):
    with pytest.raises(InputError, match="no input files found"):
        open_source(SourceConfig(input=[str(tmp_path / missing)]))


def test_empty_input_list_and_empty_folder_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="no input given"):
        open_source(SourceConfig(input=[]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no input files found"):
        open_source(SourceConfig(input=[str(tmp_path / "empty")]))


@pytest.mark.parametrize("name", ["bad.parquet", "bad.parquet.gz"])
def test_garbage_parquet_is_an_input_error(tmp_path, name):
    path = tmp_path / name
    garbage = b"this is not parquet at all"
    path.write_bytes(gzip.compress(garbage) if name.endswith(".gz") else garbage)
    with pytest.raises(InputError, match=rf"{name}: not a readable Parquet file"):
        open_source(SourceConfig(input=[str(path)]))


def test_empty_files_give_no_rows(tmp_path):
    write_text(tmp_path / "a.csv", "")
    write_text(tmp_path / "b.csv", "url,caption\n")
    write_text(tmp_path / "c.txt", "\n\n")
    write_urls(tmp_path / "d.jsonl", URLS[:1], CAPTIONS[:1])
    rows = read_rows(tmp_path)
    assert [(r["key"], r["url"]) for r in rows] == [("0000000000", URLS[0])]


# --- img2dataset folders ----------------------------------------------------------------------
I2D_COLUMNS = [
    "key",
    "url",
    "caption",
    "status",
    "error_message",
    "width",
    "height",
    "original_width",
    "original_height",
]


def fixture_jpegs(face_photos: Path, n: int) -> list[Path]:
    with open(face_photos / "images.csv", newline="") as f:
        names = sorted(r["file"] for r in csv.DictReader(f) if r["file"].endswith(".jpg"))
    paths = [face_photos / name for name in names if (face_photos / name).stat().st_size < 60_000][:n]
    assert len(paths) == n, "not enough small JPEGs in the fixture folder"
    return paths


def write_img2dataset_shard(folder: Path, shard: int, samples: list[dict]) -> None:
    """One img2dataset shard: NNNNN.tar (successes only), NNNNN.parquet (every sample), stats."""
    stem = f"{shard:05d}"
    with tarfile.open(folder / f"{stem}.tar", "w") as tar:
        for s in samples:
            if s["status"] != "success":
                continue
            meta = {k: s[k] for k in ("key", "url", "caption", "width", "height")}
            for ext, data in (("jpg", s["jpg"]), ("txt", s["caption"].encode()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    columns = {name: [s.get(name) for s in samples] for name in I2D_COLUMNS}
    schema = pa.schema([(n, pa.string()) for n in I2D_COLUMNS[:5]] + [(n, pa.int32()) for n in I2D_COLUMNS[5:]])
    pq.write_table(pa.table(columns, schema=schema), folder / f"{stem}.parquet")
    successes = sum(s["status"] == "success" for s in samples)
    stats = {"count": len(samples), "successes": successes, "failed_to_download": len(samples) - successes}
    (folder / f"{stem}_stats.json").write_text(json.dumps(stats))


@pytest.fixture
def img2dataset_folder(tmp_path, face_photos) -> tuple[Path, dict[str, bytes]]:
    folder = tmp_path / "i2d"
    folder.mkdir()
    photos = fixture_jpegs(face_photos, 3)
    images = {}

    def ok(key: str, photo: Path) -> dict:
        images[key] = photo.read_bytes()
        return {
            "key": key,
            "url": f"http://faces.example/{photo.name}",
            "caption": f"a photo of {photo.stem}",
            "status": "success",
            "error_message": None,
            "jpg": images[key],
            "width": 150,
            "height": 150,
            "original_width": 150,
            "original_height": 150,
        }

    def failed(key: str, error: str) -> dict:
        url = f"http://gone.example/{key}.jpg"
        return {"key": key, "url": url, "caption": "gone", "status": "failed_to_download", "error_message": error}

    shard0 = [
        ok("000000000", photos[0]),
        failed("000000001", "HTTP Error 404: Not Found"),
        ok("000000002", photos[1]),
        failed("000000003", "<urlopen error [Errno -2] Name or service not known>"),
    ]
    shard1 = [
        failed("000010001", "The read operation timed out after 5000 ms"),
        ok("000010000", photos[2]),  # out of order on purpose: rows come back sorted by key
    ]
    write_img2dataset_shard(folder, 0, shard0)
    write_img2dataset_shard(folder, 1, shard1)
    return folder, images


def test_img2dataset_folder_is_detected_and_referenced_not_copied(img2dataset_folder):
    folder, _ = img2dataset_folder
    source = open_source(SourceConfig(input=[str(folder)]))
    assert source.kind == "img2dataset"
    assert source.files == [str(folder / "00000.parquet"), str(folder / "00001.parquet")]
    assert source.media["image"].root == str(folder)
    assert source.media["image"].tars == ["00000.tar", "00001.tar"]
    assert source.media["image"].ext == "jpg"
    assert [size for _, size in source.fingerprint] == [
        (folder / "00000.parquet").stat().st_size,
        (folder / "00001.parquet").stat().st_size,
    ]


class JpegSize(Stage):
    """A downstream stage that reads the img2dataset images through the media reference."""

    name = "jpegsize"
    consumes = ("url",)
    produces: ClassVar = {"jpg_bytes": pa.int64()}
    reads_media: ClassVar = {"image": "key"}

    def process(self, batch: Batch) -> Output:
        rows = batch.rows.copy()
        for key in rows["key"]:
            data = batch.media_of("image", key)
            assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9", "not a JPEG"
        rows["jpg_bytes"] = [len(batch.media_of("image", k)) for k in rows["key"]]
        return Output(rows=rows)


def test_img2dataset_ingest_keeps_keys_statuses_and_images(img2dataset_folder, tmp_path):
    folder, images = img2dataset_folder
    result = ingest(folder, tmp_path / "out")
    assert result.ok and result.shards == 2
    table = read_all(tmp_path / "out")
    rows = {r["key"]: r for r in table.to_pylist()}
    assert list(rows) == ["000000000", "000000001", "000000002", "000000003", "000010000", "000010001"]
    assert {k: r["status"] for k, r in rows.items()} == {
        "000000000": "ok",
        "000000001": "download:http_404",
        "000000002": "ok",
        "000000003": "download:failed",
        "000010000": "ok",
        "000010001": "download:timeout",
    }
    assert rows["000000001"]["error"] == "HTTP Error 404: Not Found"
    assert rows["000000003"]["error"] == "<urlopen error [Errno -2] Name or service not known>"
    assert rows["000000000"]["error"] is None
    assert rows["000000000"]["alt_text"].startswith("a photo of ")
    assert rows["000000000"]["width"] == 150 and rows["000000000"]["original_height"] == 150
    assert rows["000000000"]["source_file"] == str(folder / "00000.parquet")
    assert rows["000010000"]["source_row"] == 0  # sorted by key within the shard

    manifest = Dataset(Storage(str(tmp_path / "out"))).require_manifest()
    ref = manifest.media["image"]
    assert ref.root == str(folder) and ref.tars == ["00000.tar", "00001.tar"]
    assert not list((tmp_path / "out").glob("*.tar"))  # referenced, not copied
    for shard, prefix in ((0, "00000"), (1, "00001")):
        with TarShardReader(Storage(ref.root), ref.tar_for(shard)) as reader:
            assert reader.error is None
            for key in (k for k in rows if k.startswith(prefix)):
                if rows[key]["status"] != "ok":
                    assert reader.get(key) is None
                    continue
                assert reader.get(key, ["jpg"])["jpg"] == images[key]
                assert reader.get(key, ["txt"])["txt"].decode() == rows[key]["alt_text"]

    # A later stage reads the images through the manifest's reference.
    downstream = run(JpegSize, tmp_path / "out", tmp_path / "sizes")
    assert downstream.ok
    sizes = {r["key"]: r for r in read_all(tmp_path / "sizes").to_pylist()}
    assert {k: r["jpg_bytes"] for k, r in sizes.items() if r["status"] == "ok"} == {
        k: len(v) for k, v in images.items()
    }
    assert sizes["000000001"]["status"] == "download:http_404"


def test_img2dataset_shard_with_a_broken_parquet_fails_alone(img2dataset_folder, tmp_path):
    folder, _ = img2dataset_folder
    (folder / "00001.parquet").write_bytes(b"\x00garbage, not parquet\xff" * 10)
    result = ingest(folder, tmp_path / "out")
    assert result.shards == 2
    assert list(result.failed) == [1]
    assert "00001.parquet" in result.failed[1] and "unreadable" in result.failed[1]
    dataset = Dataset(Storage(str(tmp_path / "out")))
    assert dataset.done_shards() == [0]
    assert "00001.parquet" in dataset.failed_shards()[1]["error"]
    assert read_all(tmp_path / "out").num_rows == 4
    assert dataset.summary()["complete"] is False


def test_img2dataset_shard_without_its_parquet_fails_alone(img2dataset_folder, tmp_path):
    folder, _ = img2dataset_folder
    (folder / "00001.parquet").unlink()
    result = ingest(folder, tmp_path / "out")
    assert list(result.failed) == [1]
    assert "00001.parquet" in result.failed[1]
    assert Dataset(Storage(str(tmp_path / "out"))).done_shards() == [0]


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [
        ("success", None, "ok"),
        ("failed_to_download", "HTTP Error 403: Forbidden", "download:http_403"),
        ("failed_to_download", "HTTP Error 429: Too Many Requests", "download:http_429"),
        ("failed_to_download", "HTTP Error 503: Service Unavailable", "download:http_503"),
        ("failed_to_download", "<urlopen error timed out>", "download:timeout"),
        ("failed_to_download", "timed out after 5000 ms", "download:timeout"),
        ("failed_to_resize", "image decoding error", "download:undecodable"),
        (
            "failed_to_resize",
            "cannot identify image file <_io.BytesIO object at 0x7f4041234500>",
            "download:undecodable",
        ),
        ("failed_to_resize", "image size 4040x5000 too large", "download:failed"),
        ("failed_to_download", None, "download:failed"),
        (None, None, "download:failed"),
    ],
)
def test_img2dataset_status_mapping(status, error, expected):
    assert sources._img2dataset_status(status, error) == expected


# --- S3 ---------------------------------------------------------------------------------------
def test_s3_folder_and_glob_read_like_local_ones(s3_server, tmp_path):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    bucket = f"facecap-sources-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    local = tmp_path / "in"
    (local / "sub").mkdir(parents=True)
    files = {
        "a.csv": write_urls(local / "a.csv", URLS[:3], CAPTIONS[:3]),
        "b.jsonl.gz": write_urls(local / "b.jsonl.gz", URLS[3:5], CAPTIONS[3:5]),
        "sub/c.parquet": write_urls(local / "sub" / "c.parquet", URLS[5:], CAPTIONS[5:]),
        "notes.md": write_text(local / "notes.md", "not input"),
    }
    for name, path in files.items():
        client.put_object(Bucket=bucket, Key=f"in/{name}", Body=path.read_bytes())

    def without_file(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "source_file"} for r in rows]

    remote = read_rows(f"s3://{bucket}/in", shard_size=4)
    assert without_file(remote) == without_file(read_rows(local, shard_size=4))
    assert [r["url"] for r in remote] == URLS
    assert [r["source_file"] for r in remote][::3] == [
        f"s3://{bucket}/in/a.csv",
        f"s3://{bucket}/in/b.jsonl.gz",
        f"s3://{bucket}/in/sub/c.parquet",
    ]
    globbed = read_rows(f"s3://{bucket}/in/*.csv")
    assert [r["url"] for r in globbed] == URLS[:3]
    single = read_rows(f"s3://{bucket}/in/b.jsonl.gz")
    assert [r["key"] for r in single] == keys(2)
    with pytest.raises(InputError, match="no input files found"):
        open_source(SourceConfig(input=[f"s3://{bucket}/nothing/"]))


def test_tsv_captions_may_start_with_a_quote(tmp_path):
    path = tmp_path / "urls.tsv"
    path.write_text('url\tcaption\nhttp://a.example/1.jpg\t"Quoted start of a caption\nhttp://a.example/2.jpg\tplain\n')
    rows = pa.concat_tables(s.table for s in open_source(SourceConfig(input=[str(path)])).shards()).to_pylist()
    assert [r["alt_text"] for r in rows] == ['"Quoted start of a caption', "plain"]
    assert all(r["status"] == "ok" for r in rows)

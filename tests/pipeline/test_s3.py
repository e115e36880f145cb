"""S3 end to end against a real S3-compatible server (moto on 127.0.0.1): ingest, stats, rerun, Storage."""

from __future__ import annotations

import io
import json
import os
import uuid
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from facecap.cli import app
from facecap.pipeline.storage import Storage

pytestmark = pytest.mark.slow

# (conftest.py sets fake AWS credentials before any Ray starts: workers need them to sign.)

ROWS = 300
SHARD_SIZE = 50


def input_rows() -> tuple[list[str], Counter]:
    """URLs with every 10th invalid and every 25th a repeat of an earlier valid one; expected funnel."""
    urls, expected = [], Counter()
    for i in range(ROWS):
        if i % 10 == 9:
            urls.append(f"nope://host/{i}.jpg")
            expected["ingest:invalid_url"] += 1
        elif i % 25 == 24:
            urls.append(urls[i - 20])  # i - 20 ends in 4: a valid URL, not itself a repeat
            expected["ingest:duplicate_url"] += 1
        else:
            urls.append(f"http://host{i % 7}.example/img/{i}.jpg")
            expected["ok"] += 1
    return urls, expected


@pytest.fixture
def s3(s3_server):
    """A fresh bucket with the URL list uploaded as s3://BUCKET/in/urls.csv; returns (client, bucket)."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    bucket = f"facecap-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    # Versioned, so every PUT and DELETE leaves a trace: a no-op rerun must leave none.
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    urls, _ = input_rows()
    body = "url,caption\n" + "".join(f'{u},"caption {i}"\n' for i, u in enumerate(urls))
    client.put_object(Bucket=bucket, Key="in/urls.csv", Body=body.encode())
    return client, bucket


def keys_under(client, bucket: str, prefix: str) -> list[str]:
    names = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        names += [item["Key"].removeprefix(prefix) for item in page.get("Contents", [])]
    return sorted(names)


def history(client, bucket: str, prefix: str) -> list[tuple[str, str]]:
    """Every version and delete marker under ``prefix``."""
    entries = []
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        for kind in ("Versions", "DeleteMarkers"):
            entries += [(item["Key"], item["VersionId"]) for item in page.get(kind, [])]
    return sorted(entries)


def cli(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def check_ingest_on_s3(client, bucket: str, out: str, extra: list[str]) -> None:
    uri = f"s3://{bucket}/{out}"
    result = cli("ingest", f"s3://{bucket}/in/urls.csv", uri, "--shard-size", str(SHARD_SIZE), "-q", *extra)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # -q: nothing on success

    shards = [f"part-{i:05d}" for i in range(ROWS // SHARD_SIZE)]
    expected_keys = (
        ["_manifest.json"]
        + [f"_done/{s}.json" for s in shards]
        + [f"_stats/{s}.json" for s in shards]
        + [f"{s}.parquet" for s in shards]
    )
    assert keys_under(client, bucket, f"{out}/") == sorted(expected_keys)  # and no temporaries, no _failed

    tables = [
        pq.read_table(io.BytesIO(client.get_object(Bucket=bucket, Key=f"{out}/{s}.parquet")["Body"].read()))
        for s in shards
    ]
    rows = pa.concat_tables(tables).to_pylist()
    urls, expected = input_rows()
    assert [r["key"] for r in rows] == [f"{i:010d}" for i in range(ROWS)]
    assert [r["url"] for r in rows] == urls
    assert [r["alt_text"] for r in rows] == [f"caption {i}" for i in range(ROWS)]
    assert Counter(r["status"] for r in rows) == expected

    for s, table in zip(shards, tables, strict=True):
        marker = json.loads(client.get_object(Bucket=bucket, Key=f"{out}/_done/{s}.json")["Body"].read())
        assert marker["rows"] == table.num_rows == SHARD_SIZE
        size = client.head_object(Bucket=bucket, Key=f"{out}/{s}.parquet")["ContentLength"]
        assert marker["files"][f"{s}.parquet"]["size"] == size

    stats = cli("stats", uri, "--json")
    assert stats.exit_code == 0, stats.output
    summary = json.loads(stats.stdout)
    assert sum(summary["by_status"].values()) == summary["rows"] == summary["rows_in"] == ROWS
    assert summary["by_status"] == dict(expected)
    assert summary["shards"] == {"total": len(shards), "done": len(shards), "failed": 0}
    assert summary["complete"] and summary["dataset"] == uri

    before = history(client, bucket, f"{out}/")
    again = cli("ingest", f"s3://{bucket}/in/urls.csv", uri, "--shard-size", str(SHARD_SIZE), *extra)
    assert again.exit_code == 0, again.output
    assert "nothing to do" in again.stdout
    assert history(client, bucket, f"{out}/") == before  # nothing written, nothing deleted


def test_ingest_to_s3_with_the_local_executor(s3):
    client, bucket = s3
    check_ingest_on_s3(client, bucket, "out/ingest", ["--executor", "local"])


def test_ingest_to_s3_on_ray(s3, ray_local):
    client, bucket = s3
    worker_env = ray_local.get(ray_local.remote(lambda: os.environ.get("AWS_ACCESS_KEY_ID")).remote())
    assert worker_env, "Ray workers have no AWS credentials: Ray was started before they were set"
    check_ingest_on_s3(client, bucket, "out/ingest-ray", [])


def test_storage_on_s3_reads_writes_lists_and_deletes(s3):
    client, bucket = s3
    storage = Storage(f"s3://{bucket}/store/")
    assert storage.remote and storage.root == f"s3://{bucket}/store"
    assert storage.list() == [] and not storage.exists("a.bin") and storage.size("a.bin") is None

    storage.write_bytes("a.bin", b"alpha")
    storage.write_bytes("sub/b.json", b'{"b": 1}')
    storage.write_bytes("sub/c.json.gz", b"not gzip at all")  # stored and read back byte for byte
    assert storage.read_bytes("a.bin") == b"alpha"
    assert storage.size("a.bin") == 5 and storage.exists("a.bin")
    assert storage.list() == ["a.bin"]  # files directly inside, not the sub folder
    assert storage.list("sub") == ["sub/b.json", "sub/c.json.gz"]
    assert storage.read_bytes("sub/c.json.gz") == b"not gzip at all"
    assert client.get_object(Bucket=bucket, Key="store/sub/c.json.gz")["Body"].read() == b"not gzip at all"
    with storage.open_read("a.bin") as f:
        f.seek(2)
        assert f.read() == b"pha"

    big = bytes(range(256)) * 40_000  # ~10 MB: a multipart upload
    with storage.open_write("big.bin") as out:
        for start in range(0, len(big), 1 << 20):
            out.write(big[start : start + (1 << 20)])
    assert storage.size("big.bin") == len(big) and storage.read_bytes("big.bin") == big

    # A body that raises leaves nothing behind, and an existing object keeps its old content.
    with pytest.raises(RuntimeError), storage.open_write("new.bin") as out:
        out.write(b"half a file")
        raise RuntimeError("writer died")
    assert not storage.exists("new.bin")
    with pytest.raises(RuntimeError), storage.open_write("a.bin") as out:
        out.write(b"half")
        raise RuntimeError("writer died")
    assert storage.read_bytes("a.bin") == b"alpha"
    assert keys_under(client, bucket, "store/") == ["a.bin", "big.bin", "sub/b.json", "sub/c.json.gz"]

    storage.delete("a.bin")
    storage.delete("never-existed.bin")  # not an error
    assert not storage.exists("a.bin") and storage.list() == ["big.bin"]
    assert Storage(f"s3://{bucket}/store/sub").list() == ["b.json", "c.json.gz"]

"""S3 under faults (a proxy on 127.0.0.1 in front of moto): transient 500s and slow answers are
retried until the run completes; a permanent error fails with one clear line."""

from __future__ import annotations

import uuid

import pytest
from faultproxy import FaultProxy
from helpers import write_url_csv
from typer.testing import CliRunner

from facecap.cli import app
from facecap.pipeline.dataset import Dataset
from facecap.pipeline.storage import Storage, StorageOptions

pytestmark = pytest.mark.slow


@pytest.fixture
def bucket(s3_server):
    import boto3

    name = f"faults-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def test_transient_500s_and_slow_answers_are_retried_until_the_run_completes(s3_server, bucket, tmp_path, monkeypatch):
    csv = write_url_csv(tmp_path / "urls.csv", 120, broken_every=10)
    with FaultProxy(s3_server, fail_every=4, slow_every=5, delay=0.3) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        result = CliRunner().invoke(
            app, ["ingest", str(csv), f"s3://{bucket}/out", "--shard-size", "20", "--executor", "local", "-q"]
        )
        assert result.exit_code == 0, result.output
        assert proxy.injected >= 5  # the SDK retried each of them
    summary = Dataset(Storage(f"s3://{bucket}/out", StorageOptions(s3_endpoint=s3_server))).summary()
    assert summary["complete"] and summary["rows"] == 120 == sum(summary["by_status"].values())
    assert summary["shards"] == {"total": 6, "done": 6, "failed": 0}


def test_a_permanent_error_fails_with_one_clear_line(s3_server, bucket, tmp_path, monkeypatch):
    csv = write_url_csv(tmp_path / "urls.csv", 40)
    with FaultProxy(s3_server, deny=True) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        result = CliRunner().invoke(app, ["ingest", str(csv), f"s3://{bucket}/denied", "--executor", "local"])
    assert result.exit_code == 2, result.output
    assert "ACCESS_DENIED" in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if "error" in line.lower()]) == 1

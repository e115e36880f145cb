"""Fixtures shared by the framework's tests."""

from __future__ import annotations

import pytest
from helpers import ingest, write_url_csv


@pytest.fixture
def ingested(tmp_path):
    """45 URLs (every 9th invalid) ingested into 5 shards of 10."""
    csv = write_url_csv(tmp_path / "urls.csv", 45, broken_every=9)
    result = ingest(csv, tmp_path / "ingest", shard_size=10)
    assert result.ok and result.shards == 5
    return tmp_path / "ingest"

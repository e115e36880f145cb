"""Faults the runner survives: a full disk stops the run cleanly and a rerun resumes; a Ray
worker killed mid-shard is replaced and the shard retried; truncated outputs are redone."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections import Counter

import pytest
from helpers import ingest, ray_executor, read_all, run, write_url_csv
from toystages import MakeMedia, Sleepy, SleepyConfig
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.dataset import Dataset
from pipeline.errors import StorageFull
from pipeline.storage import Storage


@pytest.fixture
def ingested(tmp_path):
    csv = write_url_csv(tmp_path / "urls.csv", 50, broken_every=9)
    assert ingest(csv, tmp_path / "ingest", shard_size=10).ok
    return tmp_path / "ingest"


def fill_disk_at(monkeypatch, shard_file: str) -> None:
    """Make every write of ``shard_file`` (and later ones) fail as a full disk does."""
    original = Storage.write_bytes

    def write_bytes(self, name, data):
        if name >= shard_file and name.startswith("part-"):
            raise OSError(errno.ENOSPC, "No space left on device", name)
        return original(self, name, data)

    monkeypatch.setattr(Storage, "write_bytes", write_bytes)


def test_a_full_disk_stops_the_run_at_once_and_a_rerun_resumes(ingested, tmp_path, monkeypatch):
    reference = run(MakeMedia, ingested, tmp_path / "reference")
    assert reference.ok
    out = tmp_path / "make"
    with monkeypatch.context() as patch:
        fill_disk_at(patch, "part-00002")
        started = time.perf_counter()
        with pytest.raises(StorageFull, match=r"output storage is full.*free space under .* and rerun"):
            run(MakeMedia, ingested, out)
        assert time.perf_counter() - started < 10  # no retry storm
    dataset = Dataset(Storage(str(out)))
    assert dataset.done_shards() == [0, 1] and dataset.failed_shards() == {}
    assert not dataset.require_manifest().complete
    again = run(MakeMedia, ingested, out)
    assert again.ok and again.skipped == 2 and again.processed == 3
    assert read_all(out).to_pylist() == read_all(tmp_path / "reference").to_pylist()


def test_a_full_disk_is_one_line_and_exit_code_3_on_the_cli(tmp_path, monkeypatch):
    csv = write_url_csv(tmp_path / "urls.csv", 30)
    fill_disk_at(monkeypatch, "part-00001")
    result = CliRunner().invoke(
        app, ["ingest", str(csv), str(tmp_path / "out"), "--shard-size", "10", "--executor", "local", "-q"]
    )
    assert result.exit_code == 3
    assert "output storage is full" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_a_ray_worker_killed_mid_shard_is_replaced_and_the_shard_retried(ingested, tmp_path, ray_local):
    pids = tmp_path / "pids"
    pids.mkdir()
    outcome = {}

    def go():
        config = SleepyConfig(pid_folder=str(pids), seconds=4.0)
        outcome["result"] = run(Sleepy, ingested, tmp_path / "sleepy", config=config, executor=ray_executor())

    thread = threading.Thread(target=go)
    thread.start()
    deadline = time.time() + 60
    while not list(pids.iterdir()) and time.time() < deadline:
        time.sleep(0.1)
    victim = sorted(pids.iterdir())[0]
    os.kill(int(victim.read_text()), signal.SIGKILL)
    thread.join(timeout=120)
    result = outcome["result"]
    assert result.ok and result.shards == 5
    stats = Dataset(Storage(str(tmp_path / "sleepy"))).shard_stats()
    assert max(s.attempts for s in stats.values()) == 2  # the killed shard ran again
    rows = read_all(tmp_path / "sleepy").to_pandas()
    assert len(rows) == 50 and rows.key.is_unique
    assert Counter(rows.status)["ok"] == Counter(read_all(ingested).column("status").to_pylist())["ok"]

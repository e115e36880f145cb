"""Faults the runner survives: a full disk (a real, small tmpfs where mounting is allowed; a
simulated ENOSPC at the writer otherwise) stops the run cleanly and a rerun resumes; a Ray worker
killed mid-shard is replaced and the shard retried; truncated outputs are redone."""

from __future__ import annotations

import contextlib
import errno
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml
from helpers import ingest, media_hashes, ray_executor, read_all, run, run_killing_one_worker, write_url_csv
from toystages import MakeMedia
from typer.testing import CliRunner

from facecap.cli import app
from facecap.corpus_server import CorpusServer
from facecap.pipeline.dataset import Dataset
from facecap.pipeline.errors import StorageFull
from facecap.pipeline.storage import Storage


@pytest.fixture
def ingested(tmp_path):
    csv = write_url_csv(tmp_path / "urls.csv", 50, broken_every=9)
    assert ingest(csv, tmp_path / "ingest", shard_size=10).ok
    return tmp_path / "ingest"


def fill_disk_at(monkeypatch, shard_file: str) -> list[str]:
    """Make every write of ``shard_file`` (and later ones) fail as a full disk does; returns the refused names."""
    original = Storage.write_bytes
    refused = []

    def write_bytes(self, name, data):
        if name >= shard_file and name.startswith("part-"):
            refused.append(name)
            raise OSError(errno.ENOSPC, "No space left on device", name)
        return original(self, name, data)

    monkeypatch.setattr(Storage, "write_bytes", write_bytes)
    return refused


def test_a_full_disk_stops_the_run_at_once_and_a_rerun_resumes(ingested, tmp_path, monkeypatch):
    reference = run(MakeMedia, ingested, tmp_path / "reference")
    assert reference.ok
    out = tmp_path / "make"
    with monkeypatch.context() as patch:
        refused = fill_disk_at(patch, "part-00002")
        with pytest.raises(StorageFull, match=r"output storage is full.*free space under .* and rerun"):
            run(MakeMedia, ingested, out)
        # No retry storm, counted rather than timed: the first refused write stops the run.
        assert len(refused) == 1, refused
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


@contextlib.contextmanager
def small_disk(path: Path, megabytes: int):
    """A tmpfs of ``megabytes`` at ``path``; yields whether it could be mounted (root, CAP_SYS_ADMIN)."""
    path.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)]
    mounted = shutil.which("mount") is not None and subprocess.run(mount, capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def downloaded(work: Path) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(key, status) of every download row, and sha256 of every tar member."""
    rows = read_all(work / "download").select(["key", "status"]).to_pylist()
    return sorted((r["key"], r["status"]) for r in rows), media_hashes(work / "download")


@pytest.mark.slow
def test_a_really_full_disk_stops_facecap_run_and_a_rerun_after_freeing_space_resumes(
    tmp_path, face_photos, monkeypatch
):
    photos = sorted((face_photos / "deepface").glob("*.jpg"))[:24]  # 7.8 MB, kept as they are
    served = tmp_path / "served"
    served.mkdir()
    for photo in photos:
        shutil.copyfile(photo, served / photo.name)
    recipe = {
        "stages": ["ingest", "download"],
        "ingest": {"shard_size": 4},
        "download": {"safety": {"allow_private_networks": True}, "image": {"resize_mode": "no"}},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))

    def facecap_run(out: Path):
        args = ["run", "-c", str(tmp_path / "recipe.yaml"), "-i", str(tmp_path / "urls.txt"), "-o", str(out)]
        return CliRunner().invoke(app, [*args, "--executor", "local"])

    with CorpusServer(served) as server:
        (tmp_path / "urls.txt").write_text("".join(server.url(f"/files/{p.name}") + "\n" for p in photos))
        assert facecap_run(tmp_path / "reference").exit_code == 0
        with small_disk(tmp_path / "disk", megabytes=5) as real:
            if not real:  # no permission to mount: the writer meets the same error the kernel gives
                fill_disk_at(monkeypatch, "part-00002")
            out = tmp_path / "disk" / "work"
            full = facecap_run(out)
            assert full.exit_code == 3, full.output
            done = Dataset(Storage(str(out / "download"))).done_shards()
            assert 0 < len(done) < 6 or not real, f"the disk filled at an unexpected point: {done} done"
            assert "output storage is full" in full.output and "Traceback" not in full.output
            if real:  # free space: the disk grows
                subprocess.run(["mount", "-o", "remount,size=64m", str(tmp_path / "disk")], check=True)
            else:
                monkeypatch.undo()
            resumed = facecap_run(out)
            assert resumed.exit_code == 0, resumed.output
            assert downloaded(out) == downloaded(tmp_path / "reference")
            assert not list(out.rglob("*.tmp-*"))


@pytest.mark.slow
def test_a_ray_worker_killed_mid_shard_is_replaced_and_the_shard_retried(ingested, tmp_path, ray_local):
    result = run_killing_one_worker(ingested, tmp_path / "sleepy", tmp_path, ray_executor())
    assert result.ok and result.shards == 5
    stats = Dataset(Storage(str(tmp_path / "sleepy"))).shard_stats()
    assert max(s.attempts for s in stats.values()) == 2  # the killed shard ran again
    rows = read_all(tmp_path / "sleepy").to_pandas()
    assert len(rows) == 50 and rows.key.is_unique
    assert Counter(rows.status)["ok"] == Counter(read_all(ingested).column("status").to_pylist())["ok"]

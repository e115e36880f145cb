"""kill -9 of a running `facecap run` (every stage, Ray executor) at points inside the download and
detect stages, then a rerun: the final output equals an uninterrupted run's.

The kill lands exactly inside a write (a tar, a Parquet file, a done marker) through the kill
points in tests/killpoint/sitecustomize.py, whichever process makes that write (a Ray worker), and
at a seeded random moment of the run. "Equals" means, for every stage: the same rows (keys,
statuses and every column but timings), the same bytes for every tar member, the same funnel,
and no temporaries, failures or duplicate rows left behind.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from helpers import facecap_env, kill_session, snapshot

from facecap.corpus_server import CorpusServer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
FACECAP = str(Path(sys.executable).parent / "facecap")
KILLPOINTS = Path(__file__).parent / "killpoint"
PHOTOS = 30
SHARD_SIZE = 6  # 36 URLs: 6 shards per stage
RUN_TIMEOUT = 300


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, face_photos):
    """30 real photos and 6 broken URLs served from 127.0.0.1, and the demo recipe (every stage)."""
    root = tmp_path_factory.mktemp("runkill")
    served = root / "served"
    served.mkdir()
    photos = sorted((face_photos / "deepface").glob("*.jpg"))[:PHOTOS]
    for photo in photos:
        shutil.copyfile(photo, served / photo.name)
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    config["ingest"]["shard_size"] = SHARD_SIZE
    config["runner"] = {"max_retries": 0}  # a stalled write must not be retried elsewhere before the kill
    (root / "recipe.yaml").write_text(yaml.safe_dump(config))
    with CorpusServer(served) as server:
        server.add("/truncated.jpg", photos[0].read_bytes()[:3000], headers={"Content-Type": "image/jpeg"})
        urls = [server.url(f"/files/{p.name}") for p in photos]
        urls += [server.url(p) for p in ("/status/404", "/status/410", "/truncated.jpg", "/redirect-loop")]
        urls += ["ftp://files.example/a.jpg", urls[3]]  # refused by ingest: bad scheme, a repeat
        (root / "urls.csv").write_text("url,caption\n" + "\n".join(f"{u},alt {i}" for i, u in enumerate(urls)) + "\n")
        yield root, config["stages"]


def command(root: Path, out: Path) -> list[str]:
    return [FACECAP, "run", "-c", str(root / "recipe.yaml"), "-i", str(root / "urls.csv"), "-o", str(out)]


def run(args: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(args, env=facecap_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def reference(corpus):
    root, stages = corpus
    out = root / "reference"
    started = time.monotonic()
    run(command(root, out))
    wall = time.monotonic() - started
    snap = snapshot(out, stages)
    for stage, s in snap.items():
        assert s["complete"] and s["unique_keys"] and not s["temporaries"] and not s["failed"], stage
    assert snap["ingest"]["by_status"] == {"ok": 34, "ingest:invalid_url": 1, "ingest:duplicate_url": 1}
    download = Counter(snap["download"]["by_status"])
    assert download["ok"] == PHOTOS and download.total() == 36
    assert Counter(snap["detect"]["by_status"])["ok"] >= PHOTOS - 3
    return snap, wall


def start(root: Path, out: Path, **extra_env: str) -> subprocess.Popen:
    with open(out.parent / f"{out.name}.log", "wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            command(root, out),
            env=facecap_env(**extra_env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def log_of(out: Path) -> str:
    return (out.parent / f"{out.name}.log").read_text(errors="replace")[-4000:]


def resume_and_compare(root: Path, out: Path, stages: list[str], expected: dict) -> None:
    run(command(root, out))
    assert snapshot(out, stages) == expected
    again = run(command(root, out))
    assert again.stdout.count("nothing to do") == len(stages), again.stdout


@pytest.mark.parametrize(
    "write",
    ["download/part-00002.tar", "download/part-00003.parquet", "detect/part-00001.tar", "detect/_done/part-00004.json"],
)
def test_kill_9_inside_a_write_then_rerun_equals_an_uninterrupted_run(corpus, reference, write):
    root, stages = corpus
    expected, _ = reference
    out = root / ("killed-" + write.replace("/", "-"))
    flag = root / f"{out.name}.flag"
    proc = start(root, out, PYTHONPATH=str(KILLPOINTS), FACECAP_KILLPOINT=f"{write}:{flag}")
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not flag.exists():
            assert proc.poll() is None, f"the run ended ({proc.returncode}) before the kill point:\n{log_of(out)}"
            assert time.monotonic() < deadline, f"the kill point was never reached:\n{log_of(out)}"
            time.sleep(0.02)
    finally:
        kill_session(proc.pid)
        proc.wait()
    stage, name = write.split("/", 1)
    half_written = list((out / stage).glob(f"{name}.tmp-*"))
    assert half_written and half_written[0].stat().st_size > 0, "the kill did not land inside the write"
    assert not (out / stage / name).exists()
    resume_and_compare(root, out, stages, expected)


def done_markers(out: Path, stages: list[str]) -> int:
    return sum(len(list((out / s / "_done").glob("*.json"))) for s in stages)


def test_kill_9_at_a_random_moment_then_rerun_equals_an_uninterrupted_run(corpus, reference):
    root, stages = corpus
    expected, _ = reference
    out = root / "killed-random"
    # The moment is a seeded point of the run's progress (its k-th shard done, in a quarter to half of
    # the reference's), not of the clock: a busy machine stretches the run, not where the kill lands.
    total = done_markers(root / "reference", stages)
    kill_after = random.Random(20261202).randint(total // 4, total // 2)
    proc = start(root, out)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while done_markers(out, stages) < kill_after:
            assert proc.poll() is None, f"the run ended ({proc.returncode}) before {kill_after} shards:\n{log_of(out)}"
            assert time.monotonic() < deadline, f"fewer than {kill_after} shards done in {RUN_TIMEOUT}s:\n{log_of(out)}"
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before the kill after {kill_after} shards:\n{log_of(out)}"
    finally:
        kill_session(proc.pid)
        proc.wait()
    assert any((out / s / "_done").is_dir() for s in stages), "killed before any stage wrote a shard"
    resume_and_compare(root, out, stages, expected)

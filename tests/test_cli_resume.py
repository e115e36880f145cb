"""kill -9 of a running `facecap ingest`, then a rerun: the result equals an uninterrupted run's, byte for byte."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import facecap_env, kill_session

pytestmark = pytest.mark.slow

FACECAP = str(Path(sys.executable).parent / "facecap")
ROWS, SHARD_SIZE = 200_000, 2_000
SHARDS = ROWS // SHARD_SIZE
KILL_AFTER = SHARDS // 4  # done markers to wait for before the kill: well inside the run
RUN_TIMEOUT = 240  # seconds for one facecap run


def build_input(path: Path) -> Path:
    """200k URLs: some invalid, some repeating an earlier URL (also across shard boundaries)."""
    urls: list[str] = []
    for i in range(ROWS):
        if i % 97 == 13:
            urls.append(f"ftp://files.example/{i}.jpg")
        elif i % 89 == 7 and i > 7:
            urls.append(urls[i // 2])  # first seen in an earlier shard, often one done before the kill
        else:
            urls.append(f"https://cdn{i % 13}.example.com/photos/{i}/face.jpg")
    pq.write_table(pa.table({"url": urls, "caption": [f"a face {i}" for i in range(ROWS)]}), path)
    return path


def command(source: Path, out: Path, executor: str, *extra: str) -> list[str]:
    args = [FACECAP, "ingest", str(source), str(out), "--shard-size", str(SHARD_SIZE), "--max-retries", "0", *extra]
    return args + (["--executor", "local"] if executor == "local" else [])


def run(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(args, env=facecap_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(args)} ran over {RUN_TIMEOUT}s\n{out}\n{err}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def done_markers(out: Path) -> list[Path]:
    return sorted((out / "_done").glob("part-*.json"))


def run_and_kill(args: list[str], out: Path) -> int:
    """Start the run in its own session; SIGKILL the whole group once KILL_AFTER shards are done."""
    log = out.parent / f"{out.name}.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(args, env=facecap_env(), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while len(done_markers(out)) < KILL_AFTER:
            if proc.poll() is not None:
                pytest.fail(
                    f"facecap exited ({proc.returncode}) before {KILL_AFTER} shards were done; if it simply "
                    f"finished, the input is too small for this machine: raise ROWS\n{log.read_text()[-3000:]}"
                )
            assert time.monotonic() < deadline, f"no progress in {RUN_TIMEOUT}s\n{log.read_text()[-3000:]}"
            time.sleep(0.005)
    finally:
        kill_session(proc.pid)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = len(done_markers(out))
    assert KILL_AFTER <= done < SHARDS, f"{done} of {SHARDS} shards done at the kill: not mid-run"
    return done


def snapshot(out: Path) -> dict:
    """What must not depend on interruptions: shard bytes, keys, funnel, and no temporaries."""
    parts = sorted(out.glob("part-*.parquet"))
    stats = run([FACECAP, "stats", str(out), "--json"])
    assert stats.returncode == 0, stats.stderr
    summary = json.loads(stats.stdout)
    return {
        "sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in parts},
        "keys": [k for p in parts for k in pq.read_table(p, columns=["key"]).column("key").to_pylist()],
        "by_status": summary["by_status"],
        "rows": (summary["rows"], summary["rows_in"]),
        "shards": summary["shards"],
        "complete": summary["complete"],
        "done": [p.name for p in done_markers(out)],
        "temporaries": sorted(str(p.relative_to(out)) for p in out.rglob("*.tmp-*")),
        "failed": sorted(p.name for p in (out / "_failed").glob("*")),
    }


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return build_input(tmp_path_factory.mktemp("resume") / "urls.parquet")


@pytest.fixture(scope="module")
def reference(source) -> dict:
    """An uninterrupted run (local executor: the bytes do not depend on the executor)."""
    out = source.parent / "reference"
    result = run(command(source, out, "local", "-q"))
    assert result.returncode == 0, result.stderr
    snap = snapshot(out)
    assert len(snap["keys"]) == len(set(snap["keys"])) == ROWS and snap["keys"] == sorted(snap["keys"])
    assert sum(snap["by_status"].values()) == ROWS == snap["rows"][0] == snap["rows"][1]
    assert set(snap["by_status"]) == {"ok", "ingest:invalid_url", "ingest:duplicate_url"}
    assert snap["shards"] == {"total": SHARDS, "done": SHARDS, "failed": 0} and snap["complete"]
    assert snap["temporaries"] == [] and snap["failed"] == []
    return snap


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_kill_9_mid_run_then_rerun_equals_an_uninterrupted_run(source, reference, executor):
    out = source.parent / f"killed-{executor}"
    args = command(source, out, executor)
    done_at_kill = run_and_kill(args, out)

    # A kill can land while a file is being written; plant the temporaries such a writer leaves,
    # at the root and inside the record folders, so their cleanup is tested every time.
    for name in (f"part-{SHARDS - 1:05d}.parquet", f"_stats/part-{SHARDS - 1:05d}.json", "_done/part-00000.json"):
        (out / f"{name}.tmp-0123456789ab").write_bytes(b"half a fi")

    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr
    counts = re.search(r"(\d+)/(\d+) shards done \((\d+) now, (\d+) already\)", resumed.stdout)
    assert counts, resumed.stdout
    assert [int(g) for g in counts.groups()] == [SHARDS, SHARDS, SHARDS - done_at_kill, done_at_kill]

    assert snapshot(out) == reference

    again = run(args)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout + again.stderr

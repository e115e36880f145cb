"""Helpers shared by tests: tiny URL lists, running stages, reading datasets back."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from facecap.pipeline.config import RunnerConfig
from facecap.pipeline.dataset import Dataset
from facecap.pipeline.executors import LocalExecutor, RayExecutor
from facecap.pipeline.runner import StageResult, run_stage
from facecap.pipeline.storage import Storage
from facecap.pipeline.worker import StageJob
from facecap.stages.ingest.readers import open_source
from facecap.stages.ingest.stage import IngestConfig, IngestStage


def write_url_csv(path: Path, n: int, broken_every: int = 0) -> Path:
    lines = ["url,caption"]
    for i in range(n):
        url = f"http://host{i % 7}.example/img/{i}.jpg"
        if broken_every and i % broken_every == broken_every - 1:
            url = f"nope://{i}"
        lines.append(f'{url},"caption {i}"')
    path.write_text("\n".join(lines) + "\n")
    return path


def ingest(input_path: Path | str, output: Path | str, executor=None, shard_size: int = 10, **config) -> StageResult:
    cfg = IngestConfig(input=[str(input_path)], shard_size=shard_size, **config)
    job = StageJob(stage_cls=IngestStage, config=cfg, output=str(output))
    return run_stage(job, executor or LocalExecutor(), source=open_source(cfg))


def run(stage_cls, parent, output, config=None, executor=None, runner: RunnerConfig | None = None, revisit=False, **kw):
    cfg = config or stage_cls.config_model()
    job = StageJob(stage_cls=stage_cls, config=cfg, output=str(output), parent=str(parent), revisit=revisit)
    return run_stage(job, executor or LocalExecutor(), runner=runner, **kw)


def ray_executor() -> RayExecutor:
    return RayExecutor()


def read_all(folder: Path | str) -> pa.Table:
    dataset = Dataset(Storage(str(folder)))
    tables = [dataset.read_shard(i) for i in dataset.shard_indices()]
    return pa.concat_tables(tables) if tables else pa.table({})


def media_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every member of the dataset's tars, by member name."""
    hashes = {}
    for tar in sorted(folder.glob("part-*.tar")):
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                hashes[member.name] = hashlib.sha256(archive.extractfile(member).read()).hexdigest()
    return hashes


def read_parquet_dir(folder: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted(folder.glob("part-*.parquet")))


def detected_faces(root: Path, photos: dict[str, bytes], shard_size: int = 3, **detect) -> Path:
    """Serve ``photos`` (served name -> bytes) on loopback, then ingest, download and detect them.

    The alt text of each row is its served name. Returns ``root``, with ``root/detect`` written.
    """
    from facecap.corpus_server import CorpusServer
    from facecap.stages.detect.stage import DetectConfig, DetectStage
    from facecap.stages.download.fetch import SafetySettings
    from facecap.stages.download.stage import DownloadConfig, DownloadStage

    served = root / "served"
    served.mkdir(parents=True, exist_ok=True)
    for name, data in photos.items():
        (served / name).write_bytes(data)
    with CorpusServer(served) as server:
        csv = root / "urls.csv"
        csv.write_text("url,caption\n" + "\n".join(f"{server.url('/files/' + n)},{n}" for n in photos) + "\n")
        ingest(csv, root / "ingest", shard_size=shard_size)
        config = DownloadConfig(safety=SafetySettings(allow_private_networks=True))
        assert run(DownloadStage, root / "ingest", root / "download", config).ok
    settings = {"min_score": 0.8, "min_face_side": 40, **detect}
    assert run(DetectStage, root / "download", root / "detect", DetectConfig(**settings)).ok
    return root


def run_recipe(
    root: Path, photos: dict[str, bytes], changes: dict[str, dict], extra_urls: tuple[str, ...] = ()
) -> Path:
    """``facecap run`` of the demo recipe (with ``changes`` per section) on ``photos``, in-process."""
    import yaml
    from typer.testing import CliRunner

    from facecap.cli import app
    from facecap.corpus_server import CorpusServer

    config = yaml.safe_load((Path(__file__).parent.parent / "configs" / "demo.yaml").read_text())
    for section, values in changes.items():
        config.setdefault(section, {}).update(values)
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(config))
    served = root / "served"
    served.mkdir(parents=True, exist_ok=True)
    for name, data in photos.items():
        (served / name).write_bytes(data)
    with CorpusServer(served) as server:
        urls = [server.url(f"/files/{n}") for n in sorted(photos)] + [server.url(p) for p in extra_urls]
        (root / "urls.csv").write_text("url,caption\n" + "\n".join(f"{u},alt {i}" for i, u in enumerate(urls)) + "\n")
        args = ["run", "-c", str(recipe), "-i", str(root / "urls.csv"), "-o", str(root / "work"), "--executor", "local"]
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return root / "work" / config["stages"][-1]


def facecap_env(**extra: str) -> dict[str, str]:
    """The environment for a `facecap` subprocess: no Ray token, no usage stats, its own local Ray."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, OSError):
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(proc.pid) == sid:
                found.append(proc)
    return found


def kill_session(sid: int) -> None:
    """SIGKILL the process group, then anything else left in the session (Ray's processes), and wait."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while (left := session_processes(sid)) and time.monotonic() < deadline:
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        time.sleep(0.1)
    assert not session_processes(sid), "processes of the killed run survived"


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union)


def run_killing_one_worker(ingested: Path, out: Path, work: Path, executor) -> StageResult:
    """Run the Sleepy stage over ``ingested`` into ``out``, SIGKILL the first worker that starts a shard
    (its first attempt waits for a release file, so the kill lands mid-shard), then release the rest."""
    import threading

    from toystages import Sleepy, SleepyConfig, started_pids

    pids, release = work / "pids", work / "release"
    pids.mkdir()
    outcome = {}

    def go():
        config = SleepyConfig(pid_folder=str(pids), seconds=120.0, release_file=str(release))
        outcome["result"] = run(Sleepy, ingested, out, config=config, executor=executor)

    thread = threading.Thread(target=go)
    thread.start()
    deadline = time.time() + 60
    while not started_pids(pids) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(started_pids(pids)[0], signal.SIGKILL)
    release.touch()
    thread.join(timeout=120)
    return outcome["result"]


def peak_rss_growth_while(action) -> float:
    """Peak growth (MB) of this process's memory while ``action`` runs (sampled every 20 ms)."""
    process = psutil.Process()
    base = process.memory_info().rss
    peak = base
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        action()
    finally:
        done.set()
        sampler.join()
    return (peak - base) / 2**20


def without_clock(row: dict) -> dict:
    for column, value in row.items():
        if column.endswith("_provenance") and value:
            row[column] = {k: v for k, v in json.loads(value).items() if k != "time"}
    return row


def stage_snapshot(folder: Path) -> dict:
    dataset = Dataset(Storage(str(folder)))
    summary = dataset.summary()
    table = pa.concat_tables([dataset.read_shard(i) for i in dataset.shard_indices()])
    # Timings (fetch_seconds, quality_ms) and provenance times are all that may vary between runs.
    timings = [c for c in table.column_names if c.endswith(("_seconds", "_ms"))]
    rows = [without_clock(row) for row in table.drop_columns(timings).sort_by("key").to_pylist()]
    return {
        "rows": rows,
        "unique_keys": len({r["key"] for r in rows}) == len(rows),
        "media": media_hashes(folder),
        "by_status": summary["by_status"],
        "complete": summary["complete"],
        "shards": summary["shards"],
        "temporaries": sorted(str(p.relative_to(folder)) for p in folder.rglob("*.tmp-*")),
        "failed": sorted(p.name for p in (folder / "_failed").glob("*")),
    }


def snapshot(out: Path, stages: list[str]) -> dict[str, dict]:
    return {stage: stage_snapshot(out / stage) for stage in stages}

"""End-to-end soak: every stage of `facecap run` on a loopback corpus, with memory sampled throughout.

Builds SOAK_URLS realistic JPEGs (default 50,000; several sizes, ~3% broken) from real photos,
serves them from 127.0.0.1 (nginx when installed), runs `facecap run` through every registered
stage with the template captioner, then exports WebDataset shards. Prints, per stage: rows, ok
rows, wall seconds and rows/s; per process kind: peak RSS; and the memory trend (RSS of the
driver and of the largest worker in each quarter of the run): flat means no growth with dataset
size. Usage: `SOAK_URLS=5000 make bench-soak` for a shorter run. `SOAK_REUSE=1` keeps the corpus
and work folder of the last soak and resumes it (`facecap run` skips finished stages; delete a
stage's folder to redo it); `SOAK_QUALITY=light` runs quality without text and NSFW detection.

Scaling: `SOAK_WORKERS=1,2,4,8,16 make bench-soak` runs the same soak once per worker count (a
local Ray of W CPUs, all of them for the stage's workers) and prints rows/s per stage per count
and the efficiency of each doubling.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import bench_download
from common import machine

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench-out" / "soak"
URLS = int(os.environ.get("SOAK_URLS", "50000"))
SHARD = int(os.environ.get("SOAK_SHARD", "1000"))
REUSE = os.environ.get("SOAK_REUSE") == "1"
LIGHT_QUALITY = os.environ.get("SOAK_QUALITY") == "light"
WORKERS = [int(w) for w in os.environ.get("SOAK_WORKERS", "").split(",") if w.strip()]
FACECAP = str(Path(sys.executable).with_name("facecap"))
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
RESULT_LINE = re.compile(r"^(\w+): .*?([\d,]+) rows, ([\d,]+) ok, ([\d.]+)s ->")


def recipe(stages: list[str]) -> dict:
    config: dict = {
        "name": "soak",
        "stages": stages,
        "ray": {"num_cpus": 2},
        "ingest": {"shard_size": SHARD},
        "download": {
            "concurrency": 32,
            "http": {"per_host_concurrency": 64, "retries": 0},
            "safety": {"allow_private_networks": True},
            "image": {"resize_mode": "keep_ratio_largest", "image_size": 1024},
        },
        "detect": {"detector": "yunet", "min_face_side": 64},
    }
    if "quality" in stages and LIGHT_QUALITY:
        # Without the two per-image detectors (PP-OCR text 27 ms, NudeNet 15 ms an image): a third of the time.
        config["quality"] = {"text": False, "nsfw": False, "rules": [{"name": "sharp", "expr": "q_sharpness >= 20"}]}
    if "tag" in stages:
        config["tag"] = {"min_confident": 0}  # offline backends give few CelebA attributes: keep every face
    if "caption" in stages:
        config["caption"] = {"captioner": "template"}
    return config


class Sampler:
    """RSS of every process in the run's tree (and Ray's), once a second, by kind."""

    def __init__(self, root: int):
        self.root = root
        self.samples: list[tuple[float, dict[str, float], float]] = []  # time, kind -> max RSS MB, driver MB
        self.peaks: dict[str, float] = defaultdict(float)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        started = time.perf_counter()
        while not self._stop.is_set():
            by_kind: dict[str, float] = defaultdict(float)
            driver = 0.0
            try:
                root = psutil.Process(self.root)
                driver = root.memory_info().rss / 2**20
                for proc in root.children(recursive=True):
                    try:
                        kind = _kind(proc)
                        by_kind[kind] = max(by_kind[kind], proc.memory_info().rss / 2**20)
                    except psutil.Error:
                        continue
            except psutil.Error:
                pass
            for kind, rss in by_kind.items():
                self.peaks[kind] = max(self.peaks[kind], rss)
            self.peaks["driver (facecap run)"] = max(self.peaks["driver (facecap run)"], driver)
            self.samples.append((time.perf_counter() - started, dict(by_kind), driver))
            self._stop.wait(1.0)


def _kind(proc: psutil.Process) -> str:
    name = " ".join(proc.cmdline()[:3]) if proc.cmdline() else proc.name()
    for marker, kind in (
        ("ray::", "ray worker"),
        ("default_worker", "ray worker"),
        ("raylet", "raylet"),
        ("gcs_server", "gcs"),
        ("dashboard", "ray dashboard/agents"),
        ("agent", "ray dashboard/agents"),
    ):
        if marker in name:
            return kind
    return proc.name()


def main() -> None:
    from facecap.cli import REGISTRY

    bench_download.OUT = OUT
    bench_download.TARGET = URLS
    if REUSE and (OUT / "urls.parquet").is_file():
        # Resume: the corpus and the work folder stay; `facecap run` skips the stages already done.
        urls = pq.read_table(OUT / "urls.parquet", columns=["url"]).column("url").to_pylist()
        names = [url.split("/", 3)[3] for url in urls]
        port = int(urls[0].split("/")[2].rsplit(":", 1)[1])  # the same address: ingest's input is unchanged
        print(f"reusing the corpus and work folder of {len(names):,} URLs in {OUT}", flush=True)
    else:
        shutil.rmtree(OUT, ignore_errors=True)
        (OUT / "ntmp").mkdir(parents=True)
        print(f"building {URLS:,} images ...", flush=True)
        started = time.perf_counter()
        names = bench_download.build_corpus(OUT / "corpus")
        print(f"corpus ready in {time.perf_counter() - started:.0f}s", flush=True)
        port = None
    server, base, kind = bench_download.start_server(OUT / "corpus", port)
    stages = [s for s in ("ingest", "download", "detect", "quality", "tag", "caption", "dedup") if s in REGISTRY]
    if port is None:
        urls = pa.table({"url": [f"{base}/{n}" for n in names], "caption": ["a photo"] * len(names)})
        pq.write_table(urls, OUT / "urls.parquet")
    try:
        if WORKERS:
            scaling(stages, kind)
            return
        config = recipe(stages)
        output, returncode, wall, sampler = soak(config, OUT / "work")
    finally:
        server.terminate()
        server.wait()
    export_seconds = None
    if returncode == 0:
        t0 = time.perf_counter()
        exported = subprocess.run(
            [FACECAP, "export", str(OUT / "work" / stages[-1]), str(OUT / "export"), "--format", "webdataset", "-q"],
            env=ENV,
        )
        export_seconds = time.perf_counter() - t0 if exported.returncode == 0 else None
    report(output, returncode, wall, sampler, kind, export_seconds)


def soak(config: dict, work: Path) -> tuple[str, int, float, Sampler]:
    """One `facecap run` of ``config`` over the corpus, its memory sampled; (stdout, exit code, wall s, sampler)."""
    path = work.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [FACECAP, "run", "-c", str(path), "-i", str(OUT / "urls.parquet"), "-o", str(work)]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
    with Sampler(proc.pid) as sampler:
        output, _ = proc.communicate()
    return output, proc.returncode, time.perf_counter() - started, sampler


def scaling(stages: list[str], server: str) -> None:
    """The same soak with each worker count of SOAK_WORKERS: rows/s per stage and efficiency per doubling."""
    rates: dict[int, dict[str, float]] = {}
    walls: dict[int, float] = {}
    for workers in WORKERS:
        config = recipe(stages)
        # Every CPU of the local Ray goes to the pools here: W workers means W actors per stage.
        config["ray"] = {"num_cpus": workers, "reserve_cpus": 0}
        output, returncode, wall, _ = soak(config, OUT / f"work-{workers}")
        print(f"{workers} workers: exit code {returncode}, wall {wall:.0f}s", flush=True)
        walls[workers] = wall
        rates[workers] = {stage: rows / seconds for stage, rows, _, seconds in stage_lines(output) if seconds}
    print(f"\nmachine: {machine()}; corpus served by {server}; {URLS:,} URLs, shards of {SHARD}")
    header = "".join(f"{w:>10}" for w in WORKERS)
    print(f"\nrows/s by workers\n{'stage':<10}{header}")
    for stage in stages:
        print(f"{stage:<10}" + "".join(f"{rates[w].get(stage, 0.0):>10.1f}" for w in WORKERS))
    print(f"{'wall s':<10}" + "".join(f"{walls[w]:>10.0f}" for w in WORKERS))
    print("\nefficiency of each doubling: rows/s at 2W / (2 x rows/s at W); 1.00 is perfect")
    for low, high in itertools.pairwise(WORKERS):
        if high == 2 * low:
            per_stage = ", ".join(
                f"{stage} {rates[high][stage] / (2 * rates[low][stage]):.2f}"
                for stage in stages
                if rates[low].get(stage) and rates[high].get(stage)
            )
            print(f"  {low} -> {high}: whole run {walls[low] / (2 * walls[high]):.2f}; {per_stage}")


def stage_lines(output: str) -> list[tuple[str, int, int, float]]:
    """(stage, rows, ok rows, seconds) from each stage's result line of `facecap run`."""
    found = []
    for line in output.splitlines():
        match = RESULT_LINE.match(line.strip())
        if match:
            stage, rows, ok, seconds = match.groups()
            found.append((stage, int(rows.replace(",", "")), int(ok.replace(",", "")), float(seconds)))
    return found


def report(output: str, returncode: int, wall: float, sampler: Sampler, server: str, export_seconds) -> None:
    print(f"\nmachine: {machine()}; corpus served by {server}; {URLS:,} URLs, shards of {SHARD}")
    print(f"facecap run exit code {returncode}, wall time {wall:.0f}s")
    print(f"\n{'stage':<10}{'rows':>9}{'ok':>9}{'seconds':>9}{'rows/s':>9}")
    for stage, rows, ok, seconds in stage_lines(output):
        rate = rows / seconds if seconds else 0.0
        print(f"{stage:<10}{rows:>9,}{ok:>9,}{seconds:>9.1f}{rate:>9.1f}")
    if export_seconds is not None:
        print(f"{'export':<10}{'':>18}{export_seconds:>9.1f}")
    print(f"\n{'process kind':<24}{'peak RSS MB':>12}")
    for kind, peak in sorted(sampler.peaks.items(), key=lambda kv: -kv[1]):
        print(f"{kind:<24}{peak:>12.0f}")
    quarters = _quarters(sampler.samples)
    if quarters:
        print("\nmemory trend by quarter of the run (MB): driver | largest Ray worker")
        for index, (driver, worker) in enumerate(quarters, 1):
            print(f"  Q{index}: {driver:8.0f} | {worker:8.0f}")


def _quarters(samples: list[tuple[float, dict[str, float], float]]) -> list[tuple[float, float]]:
    if len(samples) < 4:
        return []
    size = len(samples) // 4
    result = []
    for q in range(4):
        chunk = samples[q * size : (q + 1) * size if q < 3 else len(samples)]
        result.append((max(s[2] for s in chunk), max(s[1].get("ray worker", 0.0) for s in chunk)))
    return result


if __name__ == "__main__":
    main()

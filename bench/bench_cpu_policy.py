"""CPU policy benchmark: a model stage (detect) on the process pool and the local Ray, before and
after the CPU policy (pipeline/cpu_policy.py), with the driver's own CPU use measured.

The fixture photos (``BENCH_COPIES`` copies, default 6) go through `facecap detect` (stage
defaults, YuNet) in shards of ``BENCH_SHARD`` images (default 40, so every worker has shards to
run). Each variant is one whole command: this checkout, and the code of ``BENCH_BEFORE_COMMIT``
(default 2f6c3c3, the commit the policy was built on) from its own worktree, run with this venv by
putting that worktree's ``facecap`` package first on ``PYTHONPATH``. Variants run interleaved,
``BENCH_REPEATS`` times (default 2), best wall time kept.

While each command runs, the CPU time of every process in its tree is sampled every 0.2 s and
split three ways: the driver (the command's own process), the workers (Ray's ``ray::`` processes,
or the fork server's children) and the rest (Ray's daemons, the fork server). "driver, busy" is
the driver's CPU use while the workers run shards (intervals where they use at least half a core):
what keeping a CPU free for the driver would buy. "others" is the CPU the rest of the machine
used meanwhile (other users of a shared machine), from /proc/stat.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
# Enough images that the shards, not Ray's start-up, take most of a run: 6 x 239 photos.
os.environ.setdefault("BENCH_COPIES", "6")
from bench_detect import build_img2dataset_folder, photos  # noqa: E402
from common import communicate_sampling, machine  # noqa: E402

OUT = REPO / "bench-out" / "cpu-policy"
SHARED = Path(os.environ.get("FACECAP_SHARED", REPO.parent / "shared"))
BEFORE_COMMIT = os.environ.get("BENCH_BEFORE_COMMIT", "2f6c3c3")
REPEATS = int(os.environ.get("BENCH_REPEATS", "2"))
SHARD = int(os.environ.get("BENCH_SHARD", "40"))
SAMPLE_SECONDS = 0.2
BUSY_WORKER_CORES = 0.5  # workers using at least this much CPU are running shards
# label -> (code: "before" or "after", executor)
VARIANTS = {
    "process pool, before": ("before", "processes"),
    "process pool, policy": ("after", "processes"),
    "local Ray, before": ("before", "ray"),
    "local Ray, policy": ("after", "ray"),
}


@dataclass
class TreeSample:
    """CPU-seconds of the driver, the workers and the rest of one command's process tree."""

    driver: float = 0.0
    workers: float = 0.0
    rest: float = 0.0


@dataclass
class Run:
    wall: float
    faces: int
    driver: float  # CPU-seconds over the whole command
    workers: float
    rest: float
    driver_busy_cores: float  # the driver's cores while workers ran shards
    busy_seconds: float  # how long the workers ran shards
    others_cores: float  # the rest of the machine, in cores, during the command


def machine_busy_seconds() -> float:
    """CPU-seconds this machine has spent busy since boot (every process, /proc/stat)."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def is_worker(process: psutil.Process, fork_servers: set[int]) -> bool:
    try:
        name = " ".join(process.cmdline()[:1])
        return name.startswith("ray::") or process.ppid() in fork_servers
    except psutil.Error:
        return False


def sample_tree(root: psutil.Process, last: dict[int, tuple[str, float]]) -> TreeSample:
    """Add this moment's CPU time of every process under ``root`` to ``last`` (pid -> kind, seconds),
    which keeps processes that have ended at their final reading; returns the totals by kind."""
    try:
        children = root.children(recursive=True)
    except psutil.Error:
        children = []
    fork_servers = set()
    for child in children:
        try:
            if "forkserver" in " ".join(child.cmdline()):
                fork_servers.add(child.pid)
        except psutil.Error:
            pass
    for process, kind in [(root, "driver"), *((c, None) for c in children)]:
        try:
            times = process.cpu_times()
            seconds = times.user + times.system
        except psutil.Error:
            continue
        if kind is None:
            # Once a worker, always one: when the pool shuts down, its workers outlive the fork
            # server for a moment and are no longer its children.
            known_worker = last.get(process.pid, ("",))[0] == "workers"
            kind = "workers" if known_worker or is_worker(process, fork_servers) else "rest"
        last[process.pid] = (kind, seconds)
    totals = TreeSample()
    for kind, seconds in last.values():
        setattr(totals, kind, getattr(totals, kind) + seconds)
    return totals


def run_sampled(cmd: list[str], env: dict[str, str]) -> tuple[float, list[tuple[float, TreeSample]], float, int]:
    machine_before = machine_busy_seconds()
    started = time.perf_counter()
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(process.pid)
    last: dict[int, tuple[str, float]] = {}
    samples: list[tuple[float, TreeSample]] = []

    def sample() -> None:
        samples.append((time.perf_counter() - started, sample_tree(root, last)))

    output = communicate_sampling(process, sample, SAMPLE_SECONDS)
    wall = time.perf_counter() - started
    if process.returncode:
        sys.exit(f"{' '.join(cmd[:4])} failed:\n{output[-3000:]}")
    return wall, samples, machine_busy_seconds() - machine_before, process.returncode


def split_into_shards(source: Path, folder: Path, size: int) -> int:
    """Rewrite a one-shard img2dataset folder as shards of ``size`` images (ingest keeps an
    img2dataset folder's shards as they are): every worker then has shards to run."""
    import tarfile

    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    table = pq.read_table(source / "00000.parquet")
    with tarfile.open(source / "00000.tar") as tar:
        members = {m.name.split(".")[0]: tar.extractfile(m).read() for m in tar.getmembers()}
    shards = 0
    for start in range(0, table.num_rows, size):
        part = table.slice(start, size)
        with tarfile.open(folder / f"{shards:05d}.tar", "w") as tar:
            for key in part.column("key").to_pylist():
                info = tarfile.TarInfo(f"{key}.jpg")
                info.size = len(members[key])
                tar.addfile(info, io.BytesIO(members[key]))
        pq.write_table(part, folder / f"{shards:05d}.parquet")
        shards += 1
    return shards


def before_checkout() -> Path:
    """A ``facecap`` package folder of the old commit's code, for PYTHONPATH."""
    tree = OUT / "before-tree"
    if not tree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), BEFORE_COMMIT], check=True)
    package_root = OUT / "before-path"
    package = package_root / "facecap"
    if not package.exists():
        # The installed layout: facecap is app/, with pipeline/, stages/ and configs/ inside it.
        package.mkdir(parents=True)
        for item in (tree / "app").iterdir():
            (package / item.name).symlink_to(item)
        for folder in ("pipeline", "stages", "configs"):
            (package / folder).symlink_to(tree / folder)
    return package_root


def run_variant(label: str, code: str, executor: str, before_path: Path) -> Run:
    out = OUT / f"out-{label.replace(' ', '-').replace(',', '')}"
    shutil.rmtree(out, ignore_errors=True)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "FACECAP_MODELS": str(SHARED / "models"),
    }
    env.pop("OMP_NUM_THREADS", None)
    if code == "before":
        env["PYTHONPATH"] = os.pathsep.join([str(before_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [
        sys.executable,
        "-c",
        "from facecap.launch import main; main()",
        "detect",
        str(OUT / "ingest"),
        str(out),
        "--executor",
        executor,
        "--set",
        "ray.num_cpus=2",
    ]
    wall, samples, machine_cpu, _ = run_sampled(cmd, env)
    stats = [json.loads(p.read_text()) for p in (out / "_stats").glob("part-*.json")]
    faces = sum(s["by_status"].get("ok", 0) for s in stats)
    final = samples[-1][1] if samples else TreeSample()
    busy_driver = busy_time = 0.0
    for (t0, a), (t1, b) in itertools.pairwise(samples):
        span = t1 - t0
        if span > 0 and (b.workers - a.workers) / span >= BUSY_WORKER_CORES:
            busy_driver += b.driver - a.driver
            busy_time += span
    tree_cpu = final.driver + final.workers + final.rest
    return Run(
        wall=wall,
        faces=faces,
        driver=final.driver,
        workers=final.workers,
        rest=final.rest,
        driver_busy_cores=busy_driver / busy_time if busy_time else 0.0,
        busy_seconds=busy_time,
        others_cores=max(0.0, machine_cpu - tree_cpu) / wall,
    )


def main() -> None:
    files = photos()
    shutil.rmtree(OUT / "images", ignore_errors=True)
    shutil.rmtree(OUT / "one-shard", ignore_errors=True)
    shutil.rmtree(OUT / "ingest", ignore_errors=True)
    datas = build_img2dataset_folder(OUT / "one-shard", files)
    shards = split_into_shards(OUT / "one-shard", OUT / "images", SHARD)
    facecap = str(Path(sys.executable).with_name("facecap"))
    ingest = [facecap, "ingest", str(OUT / "images"), str(OUT / "ingest"), "-q", "--executor", "local"]
    subprocess.run(ingest, check=True)
    before_path = before_checkout()
    runs: dict[str, list[Run]] = {label: [] for label in VARIANTS}
    load_before = os.getloadavg()
    for _ in range(REPEATS):
        for label, (code, executor) in VARIANTS.items():
            runs[label].append(run_variant(label, code, executor, before_path))
    load_after = os.getloadavg()
    print(f"machine: {machine()}")
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}")
    print(f"images: {len(datas)} JPEGs in {shards} shards of {SHARD}; `facecap detect` with stage defaults")
    print(f"before: commit {BEFORE_COMMIT}; best of {REPEATS} interleaved run(s) by wall time")
    header = (
        f"{'variant':<24}{'wall s':>8}{'img/s':>8}{'busy s':>8}{'driver':>8}{'driver,busy':>12}"
        f"{'workers':>9}{'w cores':>8}{'rest':>7}{'others':>8}  all walls"
    )
    print(header)
    for label, results in runs.items():
        best = min(results, key=lambda r: r.wall)
        walls = ", ".join(f"{r.wall:.1f}" for r in results)
        print(
            f"{label:<24}{best.wall:>8.1f}{len(datas) / best.wall:>8.1f}{best.busy_seconds:>8.1f}"
            f"{best.driver:>8.1f}{best.driver_busy_cores:>12.3f}{best.workers:>9.1f}"
            f"{best.workers / best.busy_seconds if best.busy_seconds else 0:>8.2f}{best.rest:>7.1f}"
            f"{best.others_cores:>8.2f}  {walls}"
        )
    print(
        "wall: the whole command; busy s: time the workers used >= half a core; driver, workers, rest:"
        " CPU-seconds; driver,busy: the driver's cores while workers ran; w cores: the workers' cores then;"
        " others: the rest of the machine's cores (other users) during the run"
    )


if __name__ == "__main__":
    main()

"""Scale benchmark: export, report, stats and dedup's decision on synthetic datasets of N rows.

For each N in SCALE_SIZES (default "100000,300000,1000000"), writes a finished dedup dataset of N
rows with bench/scale_data.py (facecap's own format: Parquet rows with every stage's columns and a
status mix, tiny real JPEG square crops in the tars, per-shard stats with their report summaries,
and dedup's pass-1 fingerprints with planted exact and near duplicates), then runs, each in a
fresh process with the memory of its process tree sampled every 0.1 s:

- ``facecap stats DIR --json`` and ``facecap report DIR``;
- ``facecap export`` as FaceCaption-v2 Parquet and as WebDataset (each output removed after it is
  measured, to keep the disk free);
- dedup's decision (pass 2, the driver's part): the stage's ``plan`` over the pass-1 summaries
  through the runner's own plan writer, once per kind set in SCALE_DEDUP_KINDS (default
  "exact,near;exact,near,face"), with recall and precision of the planted copies. The kinds
  embedding and identity need SCALE_EMBEDDINGS=1 (a 128-d embedding a face in the summaries:
  scale_data.py), e.g. SCALE_DEDUP_KINDS="exact,near,embedding;exact,near,identity".

Prints wall seconds, the peak RSS of the driver (the command's process) and of its largest child
process, and the fitted growth exponent of each (least squares of log value on log N; 1.0 is
linear, 0 is flat). Results also go to bench-out/scale/results.json. SCALE_DIR sets where the
datasets go (default bench-out/scale), SCALE_SHARD the rows per shard (10,000), SCALE_KEEP=1 keeps
the datasets, SCALE_STEPS=stats,report,dedup runs only the steps named so. The WebDataset export
runs last (the longest step, and the one needing the most disk: skipped when it would not fit with
2 GB to spare); so is a size whose data would not fit. SCALE_DISCARD_TARS=1 deletes each output tar
of the WebDataset export as soon as its done marker is written (their sizes still counted), so a
10M-row export (about 55 GB of tars) can be measured on a smaller disk: the export never reads its
tars back, so the command's work and memory are the same.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

SIZES = [int(s) for s in os.environ.get("SCALE_SIZES", "100000,300000,1000000").split(",") if s.strip()]
ROOT = Path(os.environ.get("SCALE_DIR", REPO / "bench-out" / "scale"))
SHARD = int(os.environ.get("SCALE_SHARD", "10000"))
KEEP = os.environ.get("SCALE_KEEP") == "1"
# Only the steps whose names start with one of these (e.g. "stats,report,dedup"); all by default.
STEPS = tuple(s.strip() for s in os.environ.get("SCALE_STEPS", "").split(",") if s.strip())
DEDUP_KINDS = [k.split(",") for k in os.environ.get("SCALE_DEDUP_KINDS", "exact,near;exact,near,face").split(";")]
# Where dedup's plan runs: "driver" (in one process) and/or "partitioned" (tasks on WORKERS processes).
DEDUP_PATHS = [p.strip() for p in os.environ.get("SCALE_DEDUP_PATHS", "driver,partitioned").split(",") if p.strip()]
WORKERS = int(os.environ.get("SCALE_WORKERS", "2"))
# "summaries": write only dedup's input (pass-1 summaries and the planted pairs), and run only dedup.
SUMMARIES_ONLY = os.environ.get("SCALE_DATA") == "summaries"
FACECAP = str(Path(sys.executable).with_name("facecap"))
SPARE = 2 << 30
# Bytes a row takes, measured on these datasets (2026-12-06): the dataset (Parquet, 1.5 KB tar
# members for the 80% of rows with a crop, stats, fingerprints) and a WebDataset export (jpg, txt and
# a JSON of every column for the 70% ok rows). Used only to refuse sizes that would fill the disk.
DATA_BYTES_PER_ROW = 2_000
SUMMARY_BYTES_PER_ROW = 600  # summaries-only data plus the partitioned plan's scratch files (estimate)
# With SCALE_EMBEDDINGS=1, per vector kind run at once: 0.73 faces a row, each with a 256-byte
# embedding in the summaries and a copy per LSH table (16) in the partitioned plan's scratch.
EMBEDDING_BYTES_PER_ROW = 3_200
VECTOR_KINDS = max((len({"embedding", "identity"} & set(k)) for k in DEDUP_KINDS), default=0)
WEBDATASET_BYTES_PER_ROW = 5_500
DISCARD_TARS = os.environ.get("SCALE_DISCARD_TARS") == "1"
SCATTER_BYTES_PER_ROW = 1_500  # what the WebDataset export keeps when its tars are discarded


def sample_tree(proc: subprocess.Popen, interval: float = 0.1) -> tuple[threading.Thread, dict]:
    """Sample the RSS of ``proc`` and of each of its descendants until it exits."""
    peaks = {"driver_mb": 0.0, "child_mb": 0.0, "tree_mb": 0.0}

    def run() -> None:
        try:
            root = psutil.Process(proc.pid)
        except psutil.Error:
            return
        while proc.poll() is None:
            try:
                main = root.memory_info().rss
                children = [_rss(c) for c in root.children(recursive=True)]
            except psutil.Error:
                break
            peaks["driver_mb"] = max(peaks["driver_mb"], main / 2**20)
            peaks["child_mb"] = max(peaks["child_mb"], max(children, default=0) / 2**20)
            peaks["tree_mb"] = max(peaks["tree_mb"], (main + sum(children)) / 2**20)
            time.sleep(interval)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, peaks


def _rss(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss
    except psutil.Error:
        return 0


def measured(cmd: list[str]) -> dict:
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    thread, peaks = sample_tree(proc)
    output, _ = proc.communicate()
    thread.join()
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{output[-3000:]}")
    return {"seconds": seconds, **peaks, "output": output}


class TarDiscarder:
    """Deletes each tar of an export in ``folder`` once its done marker exists, adding up its size."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.sweep()

    def sweep(self) -> None:
        for marker in (self.folder / "_done").glob("*.tar.json"):
            tar = self.folder / marker.name.removesuffix(".json")
            if tar.exists():
                self.bytes += tar.stat().st_size
                tar.unlink()

    def __enter__(self) -> TarDiscarder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sweep()


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def dedup_plan(data: str, plans: str, kinds: list[str], path: str = "driver") -> None:
    """In a fresh process: dedup's pass 2 over DATA/_summary, timed; then the planted copies checked.

    ``path`` "driver": the plan in this process (``decide``); "partitioned": fanned out as tasks on a
    process pool of SCALE_WORKERS workers (the run's executor in ``facecap dedup``), scratch files
    under PLANS (removed by the plan)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from facecap.pipeline.dataset import Dataset
    from facecap.pipeline.executors import ProcessExecutor
    from facecap.pipeline.runner import _DatasetSummaries, _write_plan
    from facecap.pipeline.storage import Storage
    from facecap.pipeline.worker import StageJob, summary_uri
    from facecap.stages.dedup import partitioned
    from facecap.stages.dedup.stage import DedupConfig, DedupStage

    summary = Dataset.at(summary_uri(data))
    shards = len(summary.shard_indices())
    spread = path == "partitioned"
    config = DedupConfig(kinds=kinds, partitioned_from_rows=0 if spread else 10**12)
    job = StageJob(stage_cls=DedupStage, config=config, output=plans)
    executor = ProcessExecutor(WORKERS) if spread else None
    summaries = _DatasetSummaries(summary, shards, executor, Storage(f"{plans}/_scratch"))
    started = time.perf_counter()
    _write_plan(job, summaries, Storage(plans), shards)
    seconds = time.perf_counter() - started
    import resource

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Checked after the peak was read: the planted pairs (the dataset's dedup:* rows and the image each
    # copies) against the rows the plan rejects. A pair is found when either side goes (the survivor
    # is whichever scores higher); a rejected row is right when its image is in a planted pair.
    planted, found, flagged, right = 0, 0, 0, 0
    pairs: dict[str, str] = {}
    marked: set[str] = set()
    for shard in range(shards):
        if os.path.exists(f"{data}/_truth"):  # only dedup's input was written: its planted pairs
            copies = pq.read_table(f"{data}/_truth/part-{shard:05d}.parquet")
        else:
            rows = Dataset.at(data).read_shard(shard, ["key", "status", "duplicate_of"])
            copies = rows.filter(pc.starts_with(rows.column("status"), "dedup:"))
        for key, original in zip(
            copies.column("key").to_pylist(), copies.column("duplicate_of").to_pylist(), strict=True
        ):
            pairs[key.split("_f")[0]] = original.split("_f")[0]
        plan = pq.read_table(f"{plans}/part-{shard:05d}.parquet", columns=["key", "decision"])
        marked.update(
            k.split("_f")[0] for k in plan.filter(pc.not_equal(plan.column("decision"), "")).column("key").to_pylist()
        )
        flagged += int(pc.sum(pc.not_equal(plan.column("decision"), "")).as_py() or 0)
    members = set(pairs) | set(pairs.values())
    planted = len(pairs)
    found = sum(1 for copy, original in pairs.items() if copy in marked or original in marked)
    right = len(marked & members)
    result = {"plan_seconds": seconds, "plan_peak_mb": peak_mb, "planted": planted, "flagged_rows": flagged}
    result["partitioned_steps"] = dict(partitioned.LAST_RUN) if spread else None
    result["recall"] = found / max(1, planted)
    result["precision"] = right / max(1, len(marked))
    print("RESULT " + json.dumps(result))


def exponent(sizes: list[int], values: list[float]) -> float | None:
    """Slope of log(value) on log(size): the growth exponent."""
    pairs = [(n, v) for n, v in zip(sizes, values, strict=True) if v and v > 0]
    if len(pairs) < 2:
        return None
    x = np.log([n for n, _ in pairs])
    y = np.log([v for _, v in pairs])
    return float(np.polyfit(x, y, 1)[0])


def free_bytes() -> int:
    ROOT.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(ROOT).free


def save(results: list[dict]) -> None:
    (ROOT / "results.json").write_text(json.dumps({"machine": machine(), "results": results}, indent=1))


def run_size(n: int, earlier: list[dict]) -> dict:
    from scale_data import write_dataset, write_summaries

    folder = ROOT / f"n{n}"
    shutil.rmtree(folder, ignore_errors=True)
    data = folder / "data"
    result: dict = {"n": n}
    started = time.perf_counter()
    write = write_summaries if SUMMARIES_ONLY else write_dataset
    result["generated"] = write(str(data), n, SHARD, workers=min(2, os.cpu_count() or 1))
    result["generate_seconds"] = time.perf_counter() - started
    result["data_bytes"] = folder_bytes(data)
    print(
        f"\n{n:,} rows: generated in {result['generate_seconds']:.0f} s, {result['data_bytes'] / 2**30:.2f} GiB",
        flush=True,
    )
    steps: dict[str, list[str]] = {
        "stats": [FACECAP, "stats", str(data), "--json"],
        "report": [FACECAP, "report", str(data), "-o", str(folder / "report.html"), "-q"],
        "export parquet": [FACECAP, "export", str(data), str(folder / "parquet"), "--format", "parquet", "-q"],
    }
    if SUMMARIES_ONLY:
        steps.clear()
    for kinds in DEDUP_KINDS:
        for path in DEDUP_PATHS:
            steps[f"dedup plan {path} ({'+'.join(kinds)})"] = [
                sys.executable,
                __file__,
                "--plan",
                str(data),
                str(folder / "plan"),
                ",".join(kinds),
                path,
            ]
    if not SUMMARIES_ONLY:  # last: the longest step, and the one that needs the most disk
        wds = [FACECAP, "export", str(data), str(folder / "wds"), "--format", "webdataset", "-q"]
        steps["export webdataset"] = wds
    steps = {name: cmd for name, cmd in steps.items() if not STEPS or name.startswith(STEPS)}
    result["steps"] = {}
    for name, cmd in steps.items():
        wds_bytes = SCATTER_BYTES_PER_ROW if DISCARD_TARS else WEBDATASET_BYTES_PER_ROW
        if name == "export webdataset" and free_bytes() < n * wds_bytes + SPARE:
            print(f"  {name}: skipped, the disk has {free_bytes() / 2**30:.1f} GiB free", flush=True)
            continue
        if name == "export webdataset" and DISCARD_TARS:
            with TarDiscarder(folder / "wds") as discarded:
                step = measured(cmd)
            step["discarded_tar_bytes"] = discarded.bytes
        else:
            step = measured(cmd)
        line = next((x for x in step.pop("output").splitlines() if x.startswith("RESULT ")), None)
        if line:
            step.update(json.loads(line[len("RESULT ") :]))
        for out in ("wds", "parquet", "plan"):
            if (folder / out).exists():
                step["output_bytes"] = folder_bytes(folder / out) + step.get("discarded_tar_bytes", 0)
                shutil.rmtree(folder / out)
        result["steps"][name] = step
        save([*earlier, result])  # after every step: a run stopped later keeps what it measured
        extra = ""
        if "recall" in step:
            extra = f", decision {step['plan_seconds']:.1f} s at {step['plan_peak_mb']:,.0f} MB peak"
            extra += f", recall {step['recall']:.3f}, precision {step['precision']:.3f}"
            for part, figures in (step.get("partitioned_steps") or {}).items():
                extra += f"\n      {part}: " + ", ".join(f"{k} {v:,.1f}" for k, v in figures.items())
        print(
            f"  {name}: {step['seconds']:.1f} s, driver {step['driver_mb']:,.0f} MB, "
            f"largest child {step['child_mb']:,.0f} MB{extra}",
            flush=True,
        )
    if not KEEP:
        shutil.rmtree(folder, ignore_errors=True)
    return result


def main() -> None:
    print(f"machine: {machine()}; shards of {SHARD:,} rows; data under {ROOT}")
    results = []
    for n in SIZES:
        need = n * (SUMMARY_BYTES_PER_ROW if SUMMARIES_ONLY else DATA_BYTES_PER_ROW) + SPARE
        if os.environ.get("SCALE_EMBEDDINGS") == "1":
            need += n * EMBEDDING_BYTES_PER_ROW * max(1, VECTOR_KINDS)
        if free_bytes() < need:
            print(f"\n{n:,} rows: skipped, needs about {need / 2**30:.1f} GiB, {free_bytes() / 2**30:.1f} free")
            continue
        results.append(run_size(n, results))
    save(results)
    if not results:
        return
    print(f"\n{'step':<34}{'rows':>11}{'seconds':>9}{'driver MB':>11}{'child MB':>10}")
    names = list(dict.fromkeys(name for r in results for name in r["steps"]))
    for name in names:
        done = [r for r in results if name in r["steps"]]
        for r in done:
            s = r["steps"][name]
            print(f"{name:<34}{r['n']:>11,}{s['seconds']:>9.1f}{s['driver_mb']:>11,.0f}{s['child_mb']:>10,.0f}")
        sizes = [r["n"] for r in done]
        time_exp = exponent(sizes, [r["steps"][name]["seconds"] for r in done])
        rss_exp = exponent(sizes, [r["steps"][name]["driver_mb"] for r in done])
        if time_exp is not None:
            growth = [r["steps"][name]["driver_mb"] for r in done]
            per_million = (growth[-1] - growth[0]) / ((sizes[-1] - sizes[0]) / 1e6)
            print(
                f"{'':<4}growth: time ~ n^{time_exp:.2f}, driver RSS ~ n^{rss_exp:.2f} "
                f"({per_million:+,.0f} MB per million rows)"
            )
        if "plan_seconds" in done[-1]["steps"][name] and len(done) >= 2:
            plan_exp = exponent(sizes, [r["steps"][name]["plan_seconds"] for r in done])
            print(f"{'':<4}decision alone: time ~ n^{plan_exp:.2f}")
    print(f"\nresults: {ROOT / 'results.json'}")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--plan":
        dedup_plan(sys.argv[2], sys.argv[3], sys.argv[4].split(","), sys.argv[5])
    else:
        main()

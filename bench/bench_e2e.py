"""End-to-end throughput (`make bench-e2e`): the whole recipe, with every quality measure on, over a
loopback corpus; this code side by side with an older commit, and against the models' floor.

Builds E2E_URLS realistic JPEGs (default 2,000; the download benchmark's corpus: the shared photos
re-encoded at ten widths, about 3% broken), serves them from 127.0.0.1 (nginx when installed), then
runs `facecap run` over every stage (ingest, download, detect with YuNet and four crops, quality
with its default measures, all on, tag with the offline backends, the template captioner, dedup) for
each variant of E2E_VARIANTS (default `fused,old`):

- `fused`: this checkout, default settings (fused stages, the auto executor);
- `unfused`: this checkout with `--no-fuse`;
- `fused@KEY=VALUE+KEY=VALUE`: this checkout with those `--set` overrides, e.g.
  `fused@quality.text=false` or `fused@quality.text_side=480`: what a change of the recipe would
  buy, measured beside the defaults (docs/performance.md);
- `old`: commit E2E_OLD_COMMIT (default 843965c), checked out with `git worktree add` into
  bench-out/e2e/old and run from its own venv (bench-out/e2e/old-venv), which installs that
  checkout editable and takes every dependency from this checkout's .venv through a .pth line:
  843965c still installed its packages as top-level `pipeline` and `stages`, so it cannot share
  this checkout's `facecap` namespace.

Printed per variant: wall seconds, URLs/s per core (URLs / wall / cores), and per stage rows,
ok rows, and rows/s per core (rows over the sum of that stage's shard seconds: each shard runs on
one core). Then the floor: detect, quality, tag and caption's own `process()` called in a plain
loop in this one process (one thread for the models, like a worker) over the images the `fused`
run downloaded, in chunks of one shard, rows and media passed in memory, with the per-task decode
cache open per chunk: what the models and their per-row code cost with no storage, no executor and
no download. The chain's model stages (detect to caption) are compared with it in core-seconds.

E2E_URLS=300 E2E_SHARD=100 make bench-e2e is a quick run; E2E_VARIANTS=fused skips the old commit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import bench_download
from common import machine

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench-out" / "e2e"
URLS = int(os.environ.get("E2E_URLS", "2000"))
SHARD = int(os.environ.get("E2E_SHARD", "250"))
VARIANTS = [v.strip() for v in os.environ.get("E2E_VARIANTS", "fused,old").split(",") if v.strip()]
OLD_COMMIT = os.environ.get("E2E_OLD_COMMIT", "843965c")
FLOOR = os.environ.get("E2E_FLOOR", "1") == "1"
CORES = os.cpu_count() or 1
FACECAP = str(Path(sys.executable).with_name("facecap"))
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
STAGES = ["ingest", "download", "detect", "quality", "tag", "caption", "dedup"]
MODEL_STAGES = ["detect", "quality", "tag", "caption"]


def recipe() -> dict:
    """The soak's recipe (offline: YuNet, template captions) with quality's defaults: every measure."""
    return {
        "name": "e2e",
        "stages": STAGES,
        "ray": {"num_cpus": CORES},
        "ingest": {"shard_size": SHARD},
        "download": {
            "concurrency": 32,
            "http": {"per_host_concurrency": 64, "retries": 0},
            "safety": {"allow_private_networks": True},
            "image": {"resize_mode": "keep_ratio_largest", "image_size": 1024},
        },
        "detect": {"detector": "yunet", "min_face_side": 64},
        "tag": {"min_confident": 0},  # offline backends give few CelebA attributes: keep every face
        "caption": {"captioner": "template"},
        "dedup": {"kinds": ["exact", "near"]},
    }


def old_facecap() -> str:
    """The old commit's `facecap`, in its own worktree and venv (made once, then reused)."""
    tree, venv = OUT / "old", OUT / "old-venv"
    if not (tree / ".git").exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), OLD_COMMIT], check=True)
    executable = venv / "bin" / "facecap"
    if not executable.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        site = next((venv / "lib").glob("python*/site-packages"))
        this_site = next((REPO / ".venv" / "lib").glob("python*/site-packages"))
        (site / "facecap-deps.pth").write_text(f"{this_site}\n")  # the dependencies of this checkout
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(tree)]
        subprocess.run(pip, check=True)
    return str(executable)


def variant_parts(variant: str) -> tuple[str, list[str]]:
    """(`fused`, `unfused` or `old`; its `--set` overrides) of a variant such as `fused@quality.text=false`
    (`unfused@...` too; `old` takes none: its recipe is the defaults of its own commit)."""
    base, _, settings = variant.partition("@")
    if base not in ("fused", "unfused", "old") or (settings and base == "old"):
        raise SystemExit(f"E2E_VARIANTS: {variant!r} is not old, fused or unfused, the last two with @KEY=VALUE+...")
    return base, [pair for pair in settings.split("+") if pair]


def work_folder(variant: str) -> Path:
    return OUT / ("work-" + "".join(c if c.isalnum() else "-" for c in variant))


def run_variant(variant: str, work: Path) -> float:
    shutil.rmtree(work, ignore_errors=True)
    path = work.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe(), sort_keys=False))
    base, settings = variant_parts(variant)
    executable = old_facecap() if base == "old" else FACECAP
    command = [executable, "run", "-c", str(path), "-i", str(OUT / "urls.parquet"), "-o", str(work), "-q"]
    if base == "unfused":
        command.append("--no-fuse")
    for pair in settings:
        command += ["--set", pair]
    print(f"{variant}: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    # From /tmp: the old commit's top-level `pipeline` package must not be shadowed by this folder's.
    finished = subprocess.run(command, env=ENV, cwd="/tmp", capture_output=True, text=True)
    wall = time.perf_counter() - started
    if finished.returncode != 0:
        raise SystemExit(
            f"{variant} failed ({finished.returncode}):\n{finished.stdout[-3000:]}\n{finished.stderr[-3000:]}"
        )
    return wall


def stage_figures(folder: Path) -> tuple[int, int, float, float | None]:
    """(rows, ok rows, shard seconds, shard CPU seconds or None where the stats lack them: an older
    commit), summed over passes, from the stage's own per-shard stats files."""
    rows = ok = 0
    seconds = 0.0
    cpu: float | None = 0.0
    for stats_dir in (folder / "_stats", folder / "_summary" / "_stats"):
        for path in sorted(stats_dir.glob("part-*.json")):
            stats = json.loads(path.read_text())
            seconds += stats["seconds"]
            cpu = None if cpu is None or stats.get("cpu_seconds") is None else cpu + stats["cpu_seconds"]
            if stats_dir.parent == folder:
                rows += stats["rows_out"]
                ok += stats["by_status"].get("ok", 0)
    return rows, ok, seconds, cpu


def report_variant(variant: str, wall: float, work: Path) -> dict[str, tuple[int, int, float, float | None]]:
    """Prints the variant's figures per stage; CPU s is the workers' CPU time in the shards (wall
    shard seconds stretch with other jobs' load on a shared machine, CPU seconds do not)."""
    figures = {stage: stage_figures(work / stage) for stage in STAGES}
    print(f"\n{variant}: wall {wall:.1f}s, {URLS / wall / CORES:.2f} URLs/s per core ({URLS:,} URLs, {CORES} cores)")
    print(f"  {'stage':<9}{'rows':>8}{'ok':>8}{'shard s':>10}{'CPU s':>9}{'rows/s/core':>13}")
    for stage, (rows, ok, seconds, cpu) in figures.items():
        rate = rows / seconds if seconds else 0.0
        cpu_text = "-" if cpu is None else f"{cpu:.1f}"
        print(f"  {stage:<9}{rows:>8,}{ok:>8,}{seconds:>10.1f}{cpu_text:>9}{rate:>13.1f}")
    measure_ms = quality_ms(work / "quality")
    if measure_ms:
        print("  quality ms per face, by measure: " + ", ".join(f"{k} {v:.1f}" for k, v in measure_ms.items()))
    return figures


def quality_ms(folder: Path) -> dict[str, float]:
    """Mean milliseconds per measured face of each quality measure (a per-image measure's time is
    shared by its faces), from the ``quality_ms`` column; empty for a commit without it."""
    parts = [pq.read_table(p) for p in sorted(folder.glob("part-*.parquet"))]
    parts = [t for t in parts if "quality_ms" in t.column_names]
    if not parts:
        return {}
    timed = [m for t in parts for m in t.column("quality_ms").to_pylist() if m]
    return {k: sum(m[k] or 0.0 for m in timed) / len(timed) for k in timed[0]} if timed else {}


def floor(download: Path) -> tuple[float, int, dict[str, float], dict[str, float]]:
    """The model stages' own ``process()`` in a plain loop here: (seconds, images, seconds by stage,
    CPU seconds by stage: on a machine shared with other jobs the two part, and the gap is their load)."""
    os.environ["OMP_NUM_THREADS"] = "1"  # one core, like one worker
    from facecap.cli import REGISTRY
    from facecap.pipeline.config import load_recipe
    from facecap.pipeline.shard_cache import shard_cache_scope
    from facecap.pipeline.stage import Batch
    from facecap.pipeline.threads import apply_thread_budget
    from facecap.pipeline.worker import batch_bounds

    apply_thread_budget()
    path = OUT / "floor.yaml"
    path.write_text(yaml.safe_dump(recipe(), sort_keys=False))
    config = load_recipe(path, REGISTRY)
    stages = []
    for name in MODEL_STAGES:
        stage = REGISTRY[name](getattr(config, name))
        stage.setup()  # not timed: a worker loads its models once
        stages.append(stage)
    by_stage: Counter[str] = Counter()
    cpu_by_stage: Counter[str] = Counter()
    images = 0
    for parquet in sorted(download.glob("part-*.parquet")):
        table = pq.read_table(parquet)
        rows = table.to_pandas()
        rows = rows[rows.status == "ok"].reset_index(drop=True)
        images += len(rows)
        media: dict[str, dict[str, bytes]] = {"image": {}}
        with tarfile.open(parquet.with_suffix(".tar")) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                if ext == "jpg":
                    media["image"][key] = tar.extractfile(member).read()
        with shard_cache_scope():  # each image decoded once, as in a fused task
            for stage in stages:
                rows = _floor_stage(stage, rows, media, (by_stage, cpu_by_stage), Batch, batch_bounds)
    return sum(by_stage.values()), images, dict(by_stage), dict(cpu_by_stage)


def _floor_stage(
    stage, rows: pd.DataFrame, media: dict, clocks: tuple[Counter, Counter], batch_cls, batch_bounds
) -> pd.DataFrame:
    """One stage over a chunk's ok rows, batch by batch; its media joins ``media``; returns its ok rows."""
    spec = type(stage).spec(stage.config)
    resources = spec.resources
    outputs = []
    table = pa.Table.from_pandas(rows[["key", *([type(stage).batch_by] if type(stage).batch_by else [])]])
    for start, stop in batch_bounds(table, type(stage).batch_by, resources.batch_size):
        part = rows.iloc[start:stop].reset_index(drop=True)
        wanted = {
            name: {k: media[name][k] for k in part[column] if k in media.get(name, {})}
            for name, column in spec.reads.items()
        }
        started, started_cpu = time.perf_counter(), time.process_time()
        output = stage.process(batch_cls(rows=part, media=wanted))
        clocks[0][type(stage).name] += time.perf_counter() - started
        clocks[1][type(stage).name] += time.process_time() - started_cpu
        outputs.append(output.rows)
        for key, members in output.media.items():
            for name, data in members.items():
                media.setdefault(name, {})[key] = data
    if not outputs:
        return rows.iloc[:0]
    result = pd.concat(outputs, ignore_index=True)
    return result[result.status == "ok"].sort_values("key").reset_index(drop=True)


def main() -> None:
    for variant in VARIANTS:
        variant_parts(variant)  # a mistyped variant fails before the corpus is built
    bench_download.OUT = OUT
    bench_download.TARGET = URLS
    shutil.rmtree(OUT / "corpus", ignore_errors=True)
    (OUT / "ntmp").mkdir(parents=True, exist_ok=True)
    print(f"building {URLS:,} images ...", flush=True)
    names = bench_download.build_corpus(OUT / "corpus")
    server, base, kind = bench_download.start_server(OUT / "corpus")
    urls = pa.table({"url": [f"{base}/{n}" for n in names], "caption": ["a photo"] * len(names)})
    pq.write_table(urls, OUT / "urls.parquet")
    walls: dict[str, float] = {}
    figures: dict[str, dict[str, tuple[int, int, float, float | None]]] = {}
    try:
        for variant in VARIANTS:
            walls[variant] = run_variant(variant, work_folder(variant))
    finally:
        server.terminate()
        server.wait()
    print(f"\nmachine: {machine()}; corpus served by {kind}; {URLS:,} URLs, shards of {SHARD}")
    for variant in VARIANTS:
        figures[variant] = report_variant(variant, walls[variant], work_folder(variant))
    if "old" in walls:
        for variant in walls:
            if variant != "old":
                print(f"\n{variant} against {OLD_COMMIT}: {walls['old'] / walls[variant]:.2f}x the URLs/s per core")
    if FLOOR and "fused" in walls:
        seconds, images, by_stage, cpu_by_stage = floor(OUT / "work-fused" / "download")
        per_stage = ", ".join(f"{stage} {value:.1f}s" for stage, value in by_stage.items())
        per_stage_cpu = ", ".join(f"{stage} {value:.1f}s" for stage, value in cpu_by_stage.items())
        print(
            f"\nfloor: {images:,} images through {'+'.join(MODEL_STAGES)} in {seconds:.1f}s on one core ({per_stage}); "
            f"CPU time {sum(cpu_by_stage.values()):.1f}s ({per_stage_cpu})"
        )
        for variant in walls:
            if variant == "old":
                continue
            chain = sum(figures[variant][stage][2] for stage in MODEL_STAGES)
            print(
                f"{variant}: the model stages' shard time is {chain:.1f} core-s, {chain / seconds:.2f}x the floor; "
                f"the whole run {walls[variant] * CORES:.1f} core-s, {walls[variant] * CORES / seconds:.2f}x the floor"
            )
            chain_cpu = [figures[variant][stage][3] for stage in MODEL_STAGES]
            if None not in chain_cpu:
                floor_cpu = sum(cpu_by_stage.values())
                print(
                    f"{variant}: the model stages' CPU time is {sum(chain_cpu):.1f} s, "
                    f"{sum(chain_cpu) / floor_cpu:.2f}x the floor's CPU time"
                )


if __name__ == "__main__":
    main()

"""Download benchmark: facecap versus img2dataset 1.47 on the same loopback corpus.

Builds >= 2,000 realistic JPEGs of several sizes (3% broken: dead links and truncated files)
from real photos, serves them from 127.0.0.1 (nginx when installed, else Python's server),
then runs, with the same settings (webdataset output, keep_ratio 512, jpg q95, 2 processes):
facecap's download stage (BENCH_EXECUTORS, default "auto,processes,ray": the default command with
no --executor, which picks the process pool on one machine, then each executor named),
img2dataset in its own venv (bench-out/img2dataset-venv; its pins
clash with facecap's), and the CPU floor: decode + resize + encode of every file from local
disk, no network, in 2 processes. Prints images/s, successes and peak memory for each.
BENCH_IMAGES sets the corpus size (default 3,000), BENCH_REPEATS the interleaved repeats.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, run_measured

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench-out" / "download"
I2D_VENV = REPO / "bench-out" / "img2dataset-venv"
# A web-like mix: most images under 1024 px, some large ones (LAION-Face is mostly 300-1000 px).
WIDTHS = (320, 400, 480, 512, 640, 800, 1024, 1280, 1600, 2400)
TARGET = int(os.environ.get("BENCH_IMAGES", "3000"))
BROKEN_EVERY = 66  # two kinds of breakage, each 1 in 66: ~3%
SHARD = 500


def source_photos() -> list[Path]:
    shared = Path(os.environ.get("FACECAP_SHARED", REPO.parent / "shared")) / "data" / "faces"
    if shared.is_dir():
        return sorted(p for p in shared.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    from facecap.demo import package_photos

    return package_photos()


def build_corpus(folder: Path) -> list[str]:
    """Write resized re-encodes of real photos; returns the relative paths (some broken)."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = source_photos()
    names: list[str] = []
    index = 0
    while len(names) < TARGET:
        for photo in photos:
            with Image.open(photo) as image:
                image = image.convert("RGB")
                width = WIDTHS[index % len(WIDTHS)]
                height = max(1, round(image.height * width / image.width))
                image = image.resize((width, height), Image.Resampling.BILINEAR)
                buffer = io.BytesIO()
                image.save(buffer, "JPEG", quality=88)
            data = buffer.getvalue()
            name = f"img/{index:05d}.jpg"
            if index % BROKEN_EVERY == 7:
                data = data[: len(data) // 2]  # truncated
            if index % BROKEN_EVERY != 21:  # else a dead link: the file is never written
                (folder / name).parent.mkdir(exist_ok=True)
                (folder / name).write_bytes(data)
            names.append(name)
            index += 1
            if len(names) >= TARGET:
                break
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, port: int | None = None) -> tuple[subprocess.Popen, str, str]:
    port = port or free_port()
    if shutil.which("nginx"):
        conf = OUT / "nginx.conf"
        user = "user root;" if os.geteuid() == 0 else ""
        conf.write_text(f"""{user}
worker_processes 1; daemon off; pid {OUT}/nginx.pid; error_log {OUT}/nginx.err;
events {{ worker_connections 1024; }}
http {{ access_log off; sendfile on; keepalive_requests 100000;
  client_body_temp_path {OUT}/ntmp; proxy_temp_path {OUT}/ntmp; fastcgi_temp_path {OUT}/ntmp;
  uwsgi_temp_path {OUT}/ntmp; scgi_temp_path {OUT}/ntmp;
  types {{ image/jpeg jpg; }}
  server {{ listen 127.0.0.1:{port}; root {folder}; }} }}
""")
        proc = subprocess.Popen(["nginx", "-c", str(conf)], stderr=subprocess.DEVNULL)
        kind = "nginx"
    else:
        proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(folder)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        kind = "python http.server"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}", kind


def ensure_img2dataset() -> Path | None:
    python = I2D_VENV / "bin" / "python"
    if not python.exists():
        print("setting up img2dataset 1.47 in its own venv (one time) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(I2D_VENV)], check=True)
        result = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "img2dataset==1.47.0"], capture_output=True, text=True
        )
        if result.returncode != 0:
            print(f"img2dataset could not be installed: {result.stderr.strip()[-500:]}")
            return None
    return I2D_VENV / "bin" / "img2dataset"


def _floor_one(path: str) -> int:
    from facecap.stages.shared.images import ImageRejected, ImageSettings, normalize

    try:
        normalize(Path(path).read_bytes(), ImageSettings(resize_mode="keep_ratio", image_size=512, quality=95))
        return 1
    except ImageRejected:
        return 0


def _floor_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # two processes on two cores: OpenCV's own threads only add overhead


def cpu_floor(folder: Path, names: list[str]) -> tuple[float, int]:
    paths = [str(folder / n) for n in names if (folder / n).exists()]
    started = time.perf_counter()
    with ProcessPoolExecutor(2, initializer=_floor_worker) as pool:
        ok = sum(pool.map(_floor_one, paths, chunksize=16))
    return time.perf_counter() - started, ok


def count_facecap(dataset: Path) -> int:
    stats = [json.loads(p.read_text()) for p in (dataset / "_stats").glob("*.json")]
    return sum(s["by_status"].get("ok", 0) for s in stats)


def count_img2dataset(folder: Path) -> int:
    return sum(json.loads(p.read_text()).get("successes", 0) for p in folder.glob("*_stats.json"))


def facecap_download(executor: str) -> tuple[object, Path]:
    """One `facecap download` run; ``executor`` "auto" passes no --executor (the default command)."""
    output = OUT / f"facecap-{executor}"
    shutil.rmtree(output, ignore_errors=True)
    facecap = str(Path(sys.executable).with_name("facecap"))
    chosen = [] if executor == "auto" else ["--executor", executor]
    measured = run_measured(
        [
            facecap,
            "download",
            str(OUT / "ingest"),
            str(output),
            "-q",
            *chosen,
            "--allow-private-networks",
            "--resize-mode",
            "keep_ratio",
            "--image-size",
            "512",
            "--output-format",
            "jpg",
            "--set",
            "download.image.quality=95",
            "--set",
            "download.concurrency=32",
            "--set",
            "download.http.per_host_concurrency=64",
            "--set",
            "ray.num_cpus=2",
        ],
        env=RAY_ENV,
    )
    if measured.returncode:
        sys.exit(f"facecap download --executor {executor} failed:\n{measured.output[-2000:]}")
    return measured, output


def img2dataset_download(img2dataset: Path) -> object:
    shutil.rmtree(OUT / "img2dataset", ignore_errors=True)
    return run_measured(
        [
            str(img2dataset),
            "--url_list",
            str(OUT / "urls.parquet"),
            "--input_format",
            "parquet",
            "--url_col",
            "url",
            "--caption_col",
            "caption",
            "--output_format",
            "webdataset",
            "--output_folder",
            str(OUT / "img2dataset"),
            "--processes_count",
            "2",
            "--thread_count",
            "32",
            "--image_size",
            "512",
            "--resize_mode",
            "keep_ratio",
            "--encode_quality",
            "95",
            "--encode_format",
            "jpg",
            "--number_sample_per_shard",
            str(SHARD),
            "--distributor",
            "multiprocessing",
            "--enable_wandb",
            "False",
            "--retries",
            "0",
            "--timeout",
            "10",
        ],
        env={"WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"},
    )


RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
REPEATS = int(os.environ.get("BENCH_REPEATS", "1"))
# facecap's executors to run: "auto" is the default command (no --executor: the process pool on one
# machine with no cluster named), "processes" and "ray" name theirs.
EXECUTORS = [e.strip() for e in os.environ.get("BENCH_EXECUTORS", "auto,processes,ray").split(",") if e.strip()]


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    (OUT / "ntmp").mkdir(parents=True)
    corpus = OUT / "corpus"
    names = build_corpus(corpus)
    size_mb = sum(p.stat().st_size for p in corpus.rglob("*.jpg")) / 2**20
    server, base, kind = start_server(corpus)
    # name -> (seconds of each repeat, ok, peak MB of the best repeat)
    results: dict[str, tuple[list[float], int, float | None]] = {}

    def record(name: str, seconds: float, ok: int, peak: float | None) -> None:
        times, _, best_peak = results.get(name, ([], ok, peak))
        results[name] = ([*times, seconds], ok, peak if seconds <= min(times, default=seconds) else best_peak)

    load_before = os.getloadavg()  # a shared machine: say how busy it was
    try:
        urls = [f"{base}/{n}" for n in names]
        pq.write_table(
            pa.table({"url": urls, "caption": [f"photo {i}" for i in range(len(urls))]}), OUT / "urls.parquet"
        )
        facecap = str(Path(sys.executable).with_name("facecap"))
        ingest = subprocess.run(
            [facecap, "ingest", str(OUT / "urls.parquet"), str(OUT / "ingest"), "-q", "--shard-size", str(SHARD)],
            env={**os.environ, **RAY_ENV},
        )
        if ingest.returncode:
            sys.exit("ingest failed")
        img2dataset = ensure_img2dataset()
        # Interleaved repeats: this machine's speed drifts by 10-20% over minutes (shared cores),
        # and every tool should meet the same drift; the best of each is compared.
        for _ in range(REPEATS):
            for executor in EXECUTORS:
                measured, output = facecap_download(executor)
                record(f"facecap ({executor})", measured.seconds, count_facecap(output), measured.peak_tree_rss_mb)
            if img2dataset:
                theirs = img2dataset_download(img2dataset)
                record(
                    "img2dataset 1.47", theirs.seconds, count_img2dataset(OUT / "img2dataset"), theirs.peak_tree_rss_mb
                )
            floor_seconds, floor_ok = cpu_floor(corpus, names)
            record("CPU floor (no network)", floor_seconds, floor_ok, None)
    finally:
        server.terminate()
        server.wait()

    print(f"machine: {machine()}")
    print(f"load average (1, 5, 15 min): before {load_before}, after {os.getloadavg()}")
    print(
        f"corpus: {len(names)} URLs ({size_mb:.0f} MB of JPEG, widths {WIDTHS[0]}-{WIDTHS[-1]} px, "
        f"~{100 / BROKEN_EVERY * 2:.0f}% broken), served by {kind} on 127.0.0.1"
    )
    print("settings: webdataset output, keep_ratio 512, jpg q95, 2 processes, 32 threads each")
    print(f"best of {REPEATS} interleaved run(s) each; 'all runs' lists every repeat's seconds")
    print(f"{'tool':<24}{'seconds':>9}{'images/s':>10}{'ok':>7}{'peak MB':>9}  all runs")
    for name, (times, ok, peak) in results.items():
        best = min(times)
        peak_text = f"{peak:>9.0f}" if peak is not None else f"{'':>9}"
        runs = ", ".join(f"{t:.1f}" for t in times)
        print(f"{name:<24}{best:>9.1f}{ok / best:>10.1f}{ok:>7}{peak_text}  {runs}")
    floor = min(results["CPU floor (no network)"][0])
    theirs = results.get("img2dataset 1.47")
    for executor in EXECUTORS:
        times, ok, _ = results[f"facecap ({executor})"]
        if theirs and theirs[1]:
            ratio = (ok / min(times)) / (theirs[1] / min(theirs[0]))
            print(f"facecap ({executor}) / img2dataset images/s: {ratio:.2f}x (target >= 1.5x)")
        print(f"facecap ({executor}) time / CPU floor time: {min(times) / floor:.2f}x (target <= 1.25x)")


if __name__ == "__main__":
    main()

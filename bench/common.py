"""Small helpers for benchmarks: run a command while sampling the memory of its process tree."""

from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil


@dataclass
class Measured:
    seconds: float
    peak_tree_rss_mb: float
    peak_main_rss_mb: float
    returncode: int
    output: str


def run_measured(cmd: list[str], env: dict[str, str] | None = None, interval: float = 0.1) -> Measured:
    """Run ``cmd``; report wall time and the peak summed RSS of it and all its descendants."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
    )
    peak_tree = peak_main = 0.0
    root = psutil.Process(proc.pid)

    def sample() -> None:
        nonlocal peak_tree, peak_main
        try:
            main = root.memory_info().rss
            tree = main + sum(_rss(c) for c in root.children(recursive=True))
            peak_main = max(peak_main, main / 2**20)
            peak_tree = max(peak_tree, tree / 2**20)
        except psutil.Error:
            pass

    output = communicate_sampling(proc, sample, interval)
    return Measured(time.perf_counter() - started, peak_tree, peak_main, proc.returncode, output)


def communicate_sampling(proc: subprocess.Popen, sample: Callable[[], None], interval: float) -> str:
    """Wait for ``proc`` and return its output, calling ``sample()`` every ``interval`` seconds
    meanwhile (on a thread: the output pipe must be drained while it runs)."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            sample()
            stop.wait(interval)

    sampler = threading.Thread(target=loop, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    stop.set()
    sampler.join()
    return output


def _rss(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss
    except psutil.Error:
        return 0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = psutil.virtual_memory().total / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB RAM, Python {platform.python_version()}"

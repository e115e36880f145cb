"""Run the whole test suite N times with one CPU core kept busy; print every test that failed.

``make test-stress`` (not part of CI). STRESS_RUNS (default 3) runs. Without arguments each run
takes every test module, in a shuffled order (seeded by STRESS_SEED, default random, printed), so a
test that passes only after another module has run shows up too; arguments go to pytest as they are.
The load is ``stress-ng --cpu 1`` when installed (Debian: ``apt-get install stress-ng``), else a
Python busy-loop process. Exits 1 if any test failed (or errored) in any run.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def start_hog() -> tuple[subprocess.Popen, str]:
    if shutil.which("stress-ng"):
        cmd = ["stress-ng", "--cpu", "1", "--cpu-method", "all", "--quiet"]
        # Its stderr says "finished prematurely" when stopped: expected, so not shown.
        return subprocess.Popen(cmd, start_new_session=True, stderr=subprocess.DEVNULL), "stress-ng --cpu 1"
    busy = "while True: pass"
    return subprocess.Popen([sys.executable, "-c", busy], start_new_session=True), "a Python busy loop"


def stop_hog(hog: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(hog.pid, 15)  # stress-ng forks its workers into the hog's own session
    try:
        hog.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(hog.pid, 9)
        hog.wait()


def failures(junit: Path) -> tuple[list[str], int]:
    """Test ids that failed or errored in a junit xml, and how many tests ran."""
    if not junit.is_file():
        return [], 0
    failed, total = [], 0
    for case in ET.parse(junit).getroot().iter("testcase"):
        total += 1
        if case.find("failure") is not None or case.find("error") is not None:
            module = case.get("classname", "").replace(".", "/")
            failed.append(f"{module}.py::{case.get('name')}")
    return failed, total


def shuffled_modules(rng: random.Random) -> list[str]:
    modules = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py"))
    rng.shuffle(modules)
    return modules


def main() -> int:
    runs = int(os.environ.get("STRESS_RUNS", "3"))
    seed = int(os.environ.get("STRESS_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    python = os.environ.get("PYTHON", sys.executable)
    failed_in: dict[str, list[int]] = defaultdict(list)
    broken: list[str] = []
    hog, load = start_hog()
    print(f"test-stress: {runs} runs of the suite with {load} running, module order seed {seed}", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="facecap-stress-") as tmp:
            for run in range(1, runs + 1):
                junit = Path(tmp) / f"run{run}.xml"
                started = time.monotonic()
                cmd = [python, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", f"--junitxml={junit}"]
                cmd += sys.argv[1:] or shuffled_modules(rng)
                rc = subprocess.run(cmd, cwd=REPO).returncode
                failed, total = failures(junit)
                for test in failed:
                    failed_in[test].append(run)
                minutes = (time.monotonic() - started) / 60
                summary = f"{total} tests, {len(failed)} failed, rc {rc}, {minutes:.1f} min"
                print(f"test-stress: run {run}/{runs}: {summary}", flush=True)
                if rc not in (0, 1) or (rc == 1 and not failed):
                    broken.append(f"run {run}: pytest exited {rc} without a failed test in its report")
    finally:
        stop_hog(hog)
    print(f"\ntest-stress: {len(failed_in)} test(s) failed in at least one of {runs} runs")
    for test, which in sorted(failed_in.items()):
        print(f"  {test}  (run {', '.join(map(str, which))})")
    for line in broken:
        print(f"  {line}")
    return 1 if failed_in or broken else 0


if __name__ == "__main__":
    sys.exit(main())

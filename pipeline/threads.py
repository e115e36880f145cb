"""The thread budget of one worker: how many threads a model library may start in it.

Ray sets ``OMP_NUM_THREADS`` to a worker's CPUs (the process pool does the same), but onnxruntime
and OpenCV ignore that variable and would each start a thread per core in every worker, so two
1-CPU workers on a 2-core machine would fight over four threads. The worker applies the budget
before a stage's ``setup()``; a stage sizes its own sessions with ``worker_threads()``.
"""

from __future__ import annotations

import os


def worker_threads() -> int:
    """Threads one inference may use in this worker (0: no budget was set, use every core)."""
    try:
        return max(0, int(os.environ.get("OMP_NUM_THREADS", "0")))
    except ValueError:
        return 0


def apply_thread_budget() -> int:
    """Hold OpenCV's thread pool to this worker's budget; returns the budget (0: none set)."""
    threads = worker_threads()
    if threads:
        import cv2

        cv2.setNumThreads(threads)
    return threads

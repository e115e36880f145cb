"""The thread budget of one worker: how many threads a model library may start in it.

The executor chooses the budget (pipeline/cpu_policy.py: workers x threads = the machine's CPUs)
and sets it as ``OMP_NUM_THREADS`` before the stage loads anything; Ray sets the same variable to
an actor's CPUs on a joined cluster. onnxruntime and OpenCV ignore that variable and would each
start a thread per core in every worker, so two 1-CPU workers on a 2-core machine would fight over
four threads. The worker applies the budget before a stage's ``setup()``; a stage sizes its own
sessions with ``worker_threads()``.
"""

from __future__ import annotations

import os
import sys


def set_thread_budget(threads: int) -> None:
    """Give this worker process ``threads`` threads; stages read it with ``worker_threads()``."""
    os.environ["OMP_NUM_THREADS"] = str(threads)


def worker_threads() -> int:
    """Threads one inference may use in this worker (0: no budget was set, use every core)."""
    try:
        return max(0, int(os.environ.get("OMP_NUM_THREADS", "0")))
    except ValueError:
        return 0


def apply_thread_budget() -> int:
    """Hold OpenCV's (and an already imported torch's) thread pool to this worker's budget;
    returns the budget (0: none set)."""
    threads = worker_threads()
    if threads:
        import cv2

        cv2.setNumThreads(threads)
        # torch reads OMP_NUM_THREADS once, when it is imported: a torch that the fork server
        # imported before the budget was set would otherwise keep a thread per core.
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(threads)
    return threads

"""The CPU policy: how many workers a stage gets on one machine, and how many threads each may use.

One rule for the process pool and the embedded local Ray alike:

- ``workers`` = the CPUs left after ``reserve_cpus`` (``ray.reserve_cpus``, default 0), divided by
  the CPUs one worker asks for (``Stage.resources.cpus``), capped by the GPUs where a worker asks
  for GPUs; always at least one.
- ``threads`` = those CPUs divided among the workers (at least what one worker asked for), so that
  workers x threads = the CPUs, and no core idles when the GPUs (or a large ask) cap the workers.

Why the default reserve is 0: the driver only waits while shards run. Measured during a detect run
on 2 cores (docs/performance.md, "CPU policy"), the driver used 1-2% of a core on the process
pool and on the local Ray alike, so keeping a core free for it left half of a 2-core machine idle
(one actor on the local Ray). Ray Data deadlocks when an actor pool takes every CPU because its own
operators need CPUs for tasks; facecap's workers start no Ray tasks of their own (only the driver
submits), so an actor pool may take every CPU. A joined cluster is left to Ray's own accounting:
its CPUs are spread over nodes, so a worker's thread budget stays what it asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

# Actors a stage that asks for neither CPUs nor GPUs may have: no resource bounds them.
UNBOUNDED_WORKERS = 64


@dataclass(frozen=True)
class WorkerPlan:
    """How a stage runs on a machine: ``workers`` processes or actors of ``threads`` threads each."""

    workers: int
    threads: int

    def describe(self) -> str:
        workers = f"{self.workers} worker{'s' if self.workers != 1 else ''}"
        return f"{workers} x {self.threads} thread{'s' if self.threads != 1 else ''}"


def plan_workers(
    cpus: float,
    cpus_per_worker: float,
    reserve_cpus: float = 0,
    gpus: float = 0,
    gpus_per_worker: float = 0,
) -> WorkerPlan:
    """The workers and threads per worker for a stage asking ``cpus_per_worker`` (and
    ``gpus_per_worker``) on a machine of ``cpus`` CPUs and ``gpus`` GPUs, ``reserve_cpus`` kept free."""
    # One worker always runs, even where the reserve (or a large ask) leaves less than it asked for.
    usable = max(cpus - reserve_cpus, min(cpus, cpus_per_worker), 1.0)
    if cpus_per_worker > 0:
        by_cpu = int(usable // cpus_per_worker)
    elif gpus_per_worker > 0:
        by_cpu = UNBOUNDED_WORKERS  # GPU-only workers: the GPUs bound them below
    else:
        by_cpu = int(usable)
    by_gpu = int(gpus // gpus_per_worker) if gpus_per_worker > 0 else by_cpu
    workers = max(1, min(by_cpu, by_gpu))
    threads = max(1, int(cpus_per_worker), int(usable // workers))
    return WorkerPlan(workers=workers, threads=threads)

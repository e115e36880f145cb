"""Starting or joining Ray with settings that work on a 2-core laptop and on a cluster."""

from __future__ import annotations

import atexit
import logging
import os

from facecap.pipeline.config import RayConfig

# Ray >= 2.5x writes ~/.ray/auth_token unless told not to; a local embedded Ray needs no token.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray

_started_here = False


def connect(config: RayConfig) -> None:
    """Join ``config.address`` / ``RAY_ADDRESS``, or start an embedded local Ray once."""
    global _started_here
    if ray.is_initialized():
        return
    address = config.address or os.environ.get("RAY_ADDRESS")
    common = dict(log_to_driver=False, configure_logging=True, logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **common)
        return
    ray.init(
        # "local" always starts a new instance: with no address, ray.init joins the cluster that the
        # last `ray start` on this machine recorded, and then rejects num_cpus with a ValueError.
        address="local",
        num_cpus=config.num_cpus or os.cpu_count() or 1,
        include_dashboard=False,
        object_store_memory=config.object_store_mb << 20,
        # Not a loopback guarantee: on Linux, Ray (2.60) swaps 127.0.0.1 for this machine's outward
        # IP, and its GCS, raylet and workers listen on all interfaces whatever is passed here. A
        # local run is reachable from the network; firewall its ports on a shared host.
        _node_ip_address="127.0.0.1",
        **common,
    )
    _started_here = True


def shutdown() -> None:
    """Stop the embedded Ray this process started (joined clusters are left running)."""
    global _started_here
    if _started_here and ray.is_initialized():
        ray.shutdown()
    _started_here = False


# Registered after `import ray` registered Ray's own exit hook, so this one runs first: Ray's hook
# sleeps half a second for log lines that are never forwarded here (log_to_driver is off).
atexit.register(shutdown)


def total_resources() -> tuple[float, float]:
    resources = ray.cluster_resources()
    return float(resources.get("CPU", 0)), float(resources.get("GPU", 0))


def pool_size(cpus_per_worker: float, gpus_per_worker: float, reserve_cpus: int) -> int:
    """Workers an actor pool may have: never every CPU (Ray deadlocks), at least one."""
    cpus, gpus = total_resources()
    by_cpu = int((cpus - reserve_cpus) // cpus_per_worker) if cpus_per_worker > 0 else 64
    by_gpu = int(gpus // gpus_per_worker) if gpus_per_worker > 0 else by_cpu
    return max(1, min(by_cpu, by_gpu))


def task_slots(cpus_per_task: float, gpus_per_task: float) -> int:
    cpus, gpus = total_resources()
    by_cpu = int(cpus // cpus_per_task) if cpus_per_task > 0 else 64
    by_gpu = int(gpus // gpus_per_task) if gpus_per_task > 0 else by_cpu
    return max(1, min(by_cpu, by_gpu))

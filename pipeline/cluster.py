"""Starting or joining Ray with settings that work on a 2-core laptop and on a cluster."""

from __future__ import annotations

import atexit
import logging
import os

from facecap.pipeline.config import RayConfig
from facecap.pipeline.cpu_policy import WorkerPlan, plan_workers

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


def is_local() -> bool:
    """Whether this process started the Ray it is connected to (one machine: the CPU policy's threads apply)."""
    return _started_here


def worker_plan(cpus_per_worker: float, gpus_per_worker: float, reserve_cpus: float) -> WorkerPlan:
    """The CPU policy (pipeline/cpu_policy.py) on the connected Ray's CPUs and GPUs."""
    cpus, gpus = total_resources()
    return plan_workers(cpus, cpus_per_worker, reserve_cpus, gpus, gpus_per_worker)


def task_slots(cpus_per_task: float, gpus_per_task: float) -> int:
    """Tasks Ray runs at once: Ray queues the rest, so no CPU is kept back here."""
    return worker_plan(cpus_per_task, gpus_per_task, reserve_cpus=0).workers

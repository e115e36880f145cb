"""Where shards run: Ray tasks, a Ray actor pool, or this process (for debugging).

An executor only runs ``process_shard`` and reports each outcome; deciding about retries,
failures and progress is the runner's job.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

from pipeline.config import RayConfig
from pipeline.dataset import ShardStats
from pipeline.worker import StageJob, process_shard


@dataclass
class Outcome:
    ticket: int
    stats: ShardStats | None = None
    error: str | None = None


class Executor(Protocol):
    def start(self, job: StageJob) -> int:
        """Prepare workers; returns how many shards may be in flight at once."""
        ...

    def submit(self, shard: int, source: pa.Table | None, attempt: int) -> int: ...

    def wait(self) -> list[Outcome]:
        """Block until at least one submitted shard finishes; return the finished ones."""
        ...

    def stop(self) -> None: ...


def describe_error(error: BaseException) -> str:
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        error = cause
    text = f"{type(error).__name__}: {error}".strip().replace("\n", " ")
    return text[:1000]


class LocalExecutor:
    """Runs each shard in this process as it is submitted. Simple, slow, easy to debug."""

    def __init__(self) -> None:
        self._done: list[Outcome] = []
        self._tickets = itertools.count()
        self._job: StageJob | None = None

    def start(self, job: StageJob) -> int:
        self._job = job
        return 1

    def submit(self, shard: int, source: pa.Table | None, attempt: int) -> int:
        ticket = next(self._tickets)
        try:
            stats = process_shard(self._job, shard, source, attempt)
            self._done.append(Outcome(ticket, stats=stats))
        except Exception as exc:
            self._done.append(Outcome(ticket, error=describe_error(exc)))
        return ticket

    def wait(self) -> list[Outcome]:
        done, self._done = self._done, []
        return done

    def stop(self) -> None:
        self._job = None


class RayExecutor:
    """Shards as Ray tasks, or on a pool of actors for stages with ``resources.actor``."""

    def __init__(self, ray_config: RayConfig | None = None, max_in_flight: int | None = None):
        self.ray_config = ray_config or RayConfig()
        self.max_in_flight = max_in_flight
        self._tickets = itertools.count()
        self._pending: dict[Any, tuple[int, Any]] = {}  # ref -> (ticket, actor or None)
        self._idle: deque = deque()
        self._job: StageJob | None = None

    def start(self, job: StageJob) -> int:
        import ray

        from pipeline import cluster

        cluster.connect(self.ray_config)  # only now: a run with nothing to do never starts Ray
        self._job = job
        resources = job.resources
        if resources.actor:
            size = cluster.pool_size(resources.cpus, resources.gpus, self.ray_config.reserve_cpus)
            actor_cls = ray.remote(_ShardActor).options(num_cpus=resources.cpus, num_gpus=resources.gpus)
            self._actor_cls = actor_cls
            self._job_ref = ray.put(job)
            self._idle = deque(actor_cls.remote(self._job_ref) for _ in range(size))
            # Never more shards than actors: submit() would create an extra actor for each, and those
            # wait forever for CPUs the pool holds (the run hangs).
            return min(self.max_in_flight or size, size)
        self._task = ray.remote(_run_shard_task).options(
            num_cpus=resources.cpus, num_gpus=resources.gpus, max_retries=0
        )
        self._job_ref = ray.put(job)
        return self.max_in_flight or 2 * cluster.task_slots(resources.cpus, resources.gpus)

    def submit(self, shard: int, source: pa.Table | None, attempt: int) -> int:
        ticket = next(self._tickets)
        if self._job.resources.actor:
            actor = self._idle.popleft() if self._idle else self._actor_cls.remote(self._job_ref)
            ref = actor.process.remote(shard, source, attempt)
            self._pending[ref] = (ticket, actor)
        else:
            ref = self._task.remote(self._job_ref, shard, source, attempt)
            self._pending[ref] = (ticket, None)
        return ticket

    def wait(self) -> list[Outcome]:
        import ray

        if not self._pending:
            return []
        ready, _ = ray.wait(list(self._pending), num_returns=1)
        rest = [ref for ref in self._pending if ref not in ready]
        if rest:
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        outcomes = []
        for ref in ready:
            ticket, actor = self._pending.pop(ref)
            try:
                outcomes.append(Outcome(ticket, stats=ray.get(ref)))
                if actor is not None:
                    self._idle.append(actor)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError) as exc:
                # The actor is gone (killed, node lost); a fresh one replaces it on next submit.
                outcomes.append(Outcome(ticket, error=describe_error(exc)))
            except Exception as exc:
                outcomes.append(Outcome(ticket, error=describe_error(exc)))
                if actor is not None:
                    self._idle.append(actor)
        return outcomes

    def stop(self) -> None:
        import ray

        for ref, (_ticket, actor) in list(self._pending.items()):
            if actor is None:
                ray.cancel(ref, force=True)
            else:
                # ray.cancel(force=True) raises ValueError for actor tasks; killing the actor stops its shard.
                ray.kill(actor)
        self._pending.clear()
        for actor in self._idle:
            ray.kill(actor)
        self._idle.clear()
        self._job = None


def _node_id() -> str | None:
    import ray

    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None


def _run_shard_task(job: StageJob, shard: int, source: pa.Table | None, attempt: int) -> ShardStats:
    return process_shard(job, shard, source, attempt, node=_node_id())


class _ShardActor:
    def __init__(self, job: StageJob):
        from pipeline.worker import stage_for

        self.job = job
        stage_for(job)  # load models once, before the first shard arrives

    def process(self, shard: int, source: pa.Table | None, attempt: int) -> ShardStats:
        return process_shard(self.job, shard, source, attempt, node=_node_id())

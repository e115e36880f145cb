"""Where shards run: Ray tasks, a Ray actor pool, a pool of local processes, or this process.

An executor only runs a job's ``run`` (``process_shard`` for a stage, a function for a task: see
pipeline/tasks.py) and reports each outcome; deciding about retries, failures and progress is the
caller's job.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import select
import signal
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Protocol

from facecap.pipeline.config import RayConfig
from facecap.pipeline.cpu_policy import WorkerPlan, plan_workers
from facecap.pipeline.errors import ConfigError
from facecap.pipeline.redact import redact_text
from facecap.pipeline.stage import Resources
from facecap.pipeline.tasks import Job
from facecap.pipeline.threads import set_thread_budget


@dataclass
class Outcome:
    ticket: int
    # What the job returned (a stage's ShardStats); None with ``error`` when it raised.
    stats: Any = None
    error: str | None = None


class Executor(Protocol):
    def start(self, job: Job) -> int:
        """Prepare workers; returns how many shards may be in flight at once."""
        ...

    def submit(self, shard: int, source: Any, attempt: int) -> int: ...

    def wait(self) -> list[Outcome]:
        """Block until at least one submitted shard finishes; return the finished ones."""
        ...

    def stop(self) -> None: ...


def describe_error(error: BaseException) -> str:
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        error = cause
    text = redact_text(f"{type(error).__name__}: {error}".strip().replace("\n", " "))
    return text[:1000]


class LocalExecutor:
    """Runs each shard in this process as it is submitted. Simple, slow, easy to debug."""

    def __init__(self) -> None:
        self._done: list[Outcome] = []
        self._tickets = itertools.count()
        self._job: Job | None = None

    def start(self, job: Job) -> int:
        self._job = job
        return 1

    def submit(self, shard: int, source: Any, attempt: int) -> int:
        ticket = next(self._tickets)
        try:
            stats = self._job.run(shard, source, attempt)
            self._done.append(Outcome(ticket, stats=stats))
        except Exception as exc:
            self._done.append(Outcome(ticket, error=describe_error(exc)))
        return ticket

    def wait(self) -> list[Outcome]:
        done, self._done = self._done, []
        return done

    def stop(self) -> None:
        self._job = None


class ProcessExecutor:
    """Shards on a pool of worker processes on this machine: no Ray to start (about 5 s and 0.6 GB
    saved in the download benchmark), for CPU work on one computer. Each process sets the stage up
    once and keeps it, like an actor. Workers come from a fork server that imported the stage's
    modules once, so they start in milliseconds without inheriting the driver's threads. A worker
    that dies fails only the shards it held or had queued (the runner retries them) and the pool
    is rebuilt.
    """

    def __init__(self, workers: int | None = None, max_in_flight: int | None = None, reserve_cpus: float = 0):
        self.workers = workers  # CPUs for the pool; default every core
        self.max_in_flight = max_in_flight
        self.reserve_cpus = reserve_cpus
        self.plan: WorkerPlan | None = None
        self._tickets = itertools.count()
        self._pending: dict[Future, int] = {}
        self._pool: ProcessPoolExecutor | None = None
        self._job: Job | None = None

    def start(self, job: Job) -> int:
        resources = job.resources
        if resources.gpus:
            raise ConfigError(
                f"stage '{job.name}' asks for {resources.gpus} GPU per worker, which the 'processes' executor "
                "does not schedule: use --executor ray"
            )
        self._job = job
        self.plan = plan_workers(self.workers or os.cpu_count() or 1, resources.cpus, self.reserve_cpus)
        return self.max_in_flight or 2 * self.plan.workers

    def _ensure_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["facecap.pipeline.worker", *self._job.modules])
            self._pool = ProcessPoolExecutor(
                self.plan.workers,
                mp_context=context,
                initializer=_init_process_worker,
                initargs=(self.plan.threads, os.getpid(), dict(os.environ)),
            )
        return self._pool

    def submit(self, shard: int, source: Any, attempt: int) -> int:
        ticket = next(self._tickets)
        try:
            future = self._ensure_pool().submit(_run_job, self._job, shard, source, attempt)
        except BrokenProcessPool:
            self._discard_pool()  # a worker died since the last wait: start afresh
            future = self._ensure_pool().submit(_run_job, self._job, shard, source, attempt)
        self._pending[future] = ticket
        return ticket

    def wait(self) -> list[Outcome]:
        done, _ = wait_futures(list(self._pending), return_when=FIRST_COMPLETED)
        outcomes = []
        broken = False
        for future in done:
            ticket = self._pending.pop(future)
            try:
                outcomes.append(Outcome(ticket, stats=future.result()))
            except BrokenProcessPool as exc:
                broken = True
                outcomes.append(Outcome(ticket, error=f"a worker process died ({exc})"))
            except Exception as exc:
                outcomes.append(Outcome(ticket, error=describe_error(exc)))
        if broken:
            self._discard_pool()
        return outcomes

    def _discard_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # Shards still running in a broken pool's other workers would be lost anyway; end them now.
        for process in list(getattr(pool, "_processes", {}).values()):
            process.kill()
        pool.shutdown(wait=True, cancel_futures=True)

    def stop(self) -> None:
        if self._pending:  # interrupted: do not wait for shards nobody will collect
            for future in self._pending:
                future.cancel()
            self._pending.clear()
            self._discard_pool()
        elif self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._job = None


def _run_job(job: Job, shard: int, source: Any, attempt: int) -> Any:
    return job.run(shard, source, attempt)


def _init_process_worker(threads: int, driver_pid: int, environment: dict[str, str]) -> None:
    # The driver owns Ctrl-C: it stops the pool; workers that caught it too would print tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The fork server is started once per process and keeps the environment of that moment, so a
    # worker takes the driver's as it is now (models folder, storage credentials set since then).
    os.environ.clear()
    os.environ.update(environment)
    set_thread_budget(threads)
    threading.Thread(target=_exit_with_driver, args=(driver_pid,), daemon=True).start()


def _exit_with_driver(driver_pid: int) -> None:
    """Workers are the fork server's children, not the driver's: a driver killed with -9 would
    leave them running (holding their memory) unless they leave with it. Half-written files are
    temporaries that the next run removes, as after any kill."""
    try:
        handle = os.pidfd_open(driver_pid)
        select.select([handle], [], [])  # readable once the driver has exited
    except (AttributeError, OSError):  # no pidfd (old kernel): look once a second
        while os.getppid() != 1 and _alive(driver_pid):
            time.sleep(1.0)
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RayExecutor:
    """Shards as Ray tasks, or on a pool of actors for stages with ``resources.actor``.

    An actor that dies (its worker killed, its node lost) takes only its shard with it: the runner
    retries that shard, which waits for any live actor. A replacement is started beside the
    survivors, but gets work only once Ray has placed it: after a node is lost the cluster may have
    no CPU for it, and a shard bound to an actor that never starts would hang the run.
    """

    placement_timeout = 300.0  # seconds queued shards wait when no actor is alive and none can start
    close_timeout = 60.0  # seconds idle actors get to close their stage when the run ends

    def __init__(self, ray_config: RayConfig | None = None, max_in_flight: int | None = None):
        self.ray_config = ray_config or RayConfig()
        self.max_in_flight = max_in_flight
        self._tickets = itertools.count()
        self._pending: dict[Any, tuple[int, Any]] = {}  # ref -> (ticket, actor or None)
        self._idle: deque = deque()
        self._queued: deque = deque()  # (ticket, shard, source, attempt) waiting for an idle actor
        self._starting: dict[Any, Any] = {}  # ready ref -> replacement actor not yet placed
        self._pool_size = 0
        self.plan: WorkerPlan | None = None
        self._actor_threads: int | None = None
        self._lost_reason = "no worker is alive for this stage"
        self._job: Job | None = None

    def start(self, job: Job) -> int:
        import ray

        from facecap.pipeline import cluster

        cluster.connect(self.ray_config)  # only now: a run with nothing to do never starts Ray
        self._job = job
        resources = job.resources
        _, gpus = cluster.total_resources()
        if resources.gpus > gpus:
            # Ray would queue the workers forever: say it now, before any shard runs.
            raise ConfigError(
                f"stage '{job.name}' needs {resources.gpus:g} GPU per worker and the Ray cluster has {gpus:g}: "
                f"run it where GPUs are (--ray-address), or set {job.name}.gpus=0 for a CPU build of its engine"
            )
        self._job_ref = ray.put(job)
        if resources.actor:
            self.plan = cluster.worker_plan(resources.cpus, resources.gpus, self.ray_config.reserve_cpus)
            self._pool_size = self.plan.workers
            # On the local Ray every actor shares this machine's cores: give each its share of
            # threads. Ray itself sets OMP_NUM_THREADS to the CPUs asked for, which is what a
            # joined cluster keeps (its CPUs are spread over nodes).
            self._actor_threads = self.plan.threads if cluster.is_local() else None
            self._actor_cls = ray.remote(_ShardActor).options(num_cpus=resources.cpus, num_gpus=resources.gpus)
            self._idle = deque(self._new_actor() for _ in range(self._pool_size))
            # Never more shards than actors: every extra one would only wait in the queue.
            return min(self.max_in_flight or self._pool_size, self._pool_size)
        self._task = ray.remote(_run_shard_task).options(
            num_cpus=resources.cpus, num_gpus=resources.gpus, max_retries=0
        )
        return self.max_in_flight or 2 * cluster.task_slots(resources.cpus, resources.gpus)

    def submit(self, shard: int, source: Any, attempt: int) -> int:
        ticket = next(self._tickets)
        if self._job.resources.actor:
            self._queued.append((ticket, shard, source, attempt))
            self._dispatch()
        else:
            ref = self._task.remote(self._job_ref, shard, source, attempt)
            self._pending[ref] = (ticket, None)
        return ticket

    def _dispatch(self) -> None:
        while self._queued and self._idle:
            ticket, shard, source, attempt = self._queued.popleft()
            actor = self._idle.popleft()
            self._pending[actor.process.remote(shard, source, attempt)] = (ticket, actor)

    def _new_actor(self) -> Any:
        return self._actor_cls.remote(self._job_ref, self._actor_threads)

    def _actors_alive(self) -> int:
        return len(self._idle) + sum(1 for _, actor in self._pending.values() if actor is not None)

    def _replace_lost_actor(self) -> None:
        if self._actors_alive() + len(self._starting) < self._pool_size:
            actor = self._new_actor()
            self._starting[actor.__ray_ready__.remote()] = actor

    def wait(self) -> list[Outcome]:
        import ray

        if self._queued and not self._pending and not self._starting:
            self._replace_lost_actor()  # every actor is gone: one more try at a fresh one
        refs = [*self._pending, *self._starting]
        if not refs:
            return self._give_up_queued()
        # With no shard running, only a replacement can make progress: do not wait for it forever.
        timeout = None if self._pending else self.placement_timeout
        ready, rest = ray.wait(refs, num_returns=1, timeout=timeout)
        if not ready:
            self._lost_reason = (
                f"no worker could start for this stage in {timeout:.0f}s (no free CPU/GPU left in the cluster?)"
            )
            return self._give_up_queued()
        if rest:
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        outcomes = [self._finished(ref) for ref in ready if ref in self._pending]
        for ref in ready:
            if ref in self._starting:
                self._started(ref)
        self._dispatch()
        if self._queued and not (self._pending or self._starting or self._idle):
            outcomes += self._give_up_queued()
        return outcomes

    def _started(self, ref: Any) -> None:
        import ray

        actor = self._starting.pop(ref)
        try:
            ray.get(ref)
            self._idle.append(actor)
        except Exception as exc:  # it could not start (its node is gone too, its models fail to load)
            self._lost_reason = describe_error(exc)
            ray.kill(actor)

    def _finished(self, ref: Any) -> Outcome:
        import ray

        ticket, actor = self._pending.pop(ref)
        try:
            outcome = Outcome(ticket, stats=ray.get(ref))
        except ray.exceptions.RayActorError as exc:
            # The actor is gone (killed, node lost): its shard goes back to the runner for a retry.
            self._lost_reason = describe_error(exc)
            if actor is not None:
                ray.kill(actor)
                self._replace_lost_actor()
            return Outcome(ticket, error=self._lost_reason)
        except Exception as exc:
            outcome = Outcome(ticket, error=describe_error(exc))
        if actor is not None:
            self._idle.append(actor)
        return outcome

    def _give_up_queued(self) -> list[Outcome]:
        """Queued shards with no actor left to run them go back to the runner as failed attempts."""
        import ray

        outcomes = [Outcome(ticket, error=self._lost_reason) for ticket, *_ in self._queued]
        self._queued.clear()
        for actor in self._starting.values():
            ray.kill(actor)
        self._starting.clear()
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
        if self._idle:
            # Idle actors close their stage first: ray.kill ends the actor's process at once, and
            # what the stage started (vLLM's engine processes) would live on, orphaned.
            closing = [actor.close.remote() for actor in self._idle]
            ray.wait(closing, num_returns=len(closing), timeout=self.close_timeout)
        for actor in [*self._idle, *self._starting.values()]:
            ray.kill(actor)
        self._idle.clear()
        self._starting.clear()
        self._queued.clear()
        self._job = None


def _node_id() -> str | None:
    import ray

    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None


def _run_shard_task(job: Job, shard: int, source: Any, attempt: int) -> Any:
    return job.run(shard, source, attempt, node=_node_id())


class _ShardActor:
    def __init__(self, job: Job, threads: int | None = None):
        self.job = job
        if threads:
            set_thread_budget(threads)  # before warm(): the models it loads size their pools by it
        job.warm()  # load models once, before the first shard arrives

    def process(self, shard: int, source: Any, attempt: int) -> Any:
        return self.job.run(shard, source, attempt, node=_node_id())

    def close(self) -> None:
        from facecap.pipeline.worker import close_stages

        close_stages()


def make_executor(
    name: str,
    ray_config: RayConfig | None = None,
    workers: int | None = None,
    max_in_flight: int | None = None,
    needs_gpus: bool = False,
) -> Executor:
    """The executor called ``name``; ``auto`` is Ray where a cluster is named (or GPUs are needed),
    else the process pool on this machine."""
    ray_config = ray_config or RayConfig()
    if name == "auto":
        named = ray_config.address or os.environ.get("RAY_ADDRESS")
        name = "ray" if named or needs_gpus else "processes"
    if name == "local":
        return LocalExecutor()
    if name == "processes":
        if ray_config.address:
            raise ConfigError("--executor processes runs on this machine only: drop --ray-address (or RAY_ADDRESS)")
        cpus, reserve = _process_pool_cpus(ray_config, workers)
        return ProcessExecutor(cpus, max_in_flight=max_in_flight, reserve_cpus=reserve)
    return RayExecutor(ray_config, max_in_flight=max_in_flight)


def _process_pool_cpus(ray_config: RayConfig, workers: int | None) -> tuple[int, float]:
    """The process pool's CPUs and the reserve taken from them: ``runner.workers`` names the
    pool's CPUs as given; otherwise ``ray.num_cpus`` (else every core) less ``ray.reserve_cpus``."""
    if workers:
        return workers, 0
    return ray_config.num_cpus or os.cpu_count() or 1, ray_config.reserve_cpus


def process_pool_plan(resources: Resources, ray_config: RayConfig, workers: int | None = None) -> WorkerPlan:
    """The workers and threads the process pool gives a stage of ``resources`` (for the run's output)."""
    cpus, reserve = _process_pool_cpus(ray_config, workers)
    return plan_workers(cpus, resources.cpus, reserve)

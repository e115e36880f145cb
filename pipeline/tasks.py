"""Work that is not a stage over shards, run on the same executors: a job's function over numbered
items (export's scatter and bucket passes), and the one dispatch loop that the runner shares.

An executor runs anything shaped like ``Job``: ``StageJob`` (a stage over a shard) and ``TaskJob``
(a module-level function over an item). The loop keeps a bounded number of items in flight,
retries a failing item, and reports each item's result or final error to the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from facecap.pipeline.errors import FacecapError, StorageFull, storage_full
from facecap.pipeline.stage import Resources

if TYPE_CHECKING:
    from facecap.pipeline.executors import Executor, Outcome


class Job(Protocol):
    """What an executor runs: picklable, with the resources one worker needs."""

    @property
    def name(self) -> str: ...

    @property
    def resources(self) -> Resources: ...

    @property
    def modules(self) -> tuple[str, ...]:
        """Modules a fresh worker imports before its first item (the process pool's fork server)."""

    def warm(self) -> None:
        """Load what every item needs once per worker (a stage's models); called on actors."""

    def run(self, number: int, payload: Any, attempt: int, node: str | None = None) -> Any: ...


@dataclass(frozen=True)
class TaskJob:
    """``function(number, payload)`` over items; ``function`` must be module-level (picklable)."""

    name: str
    function: Callable[[int, Any], Any]
    resources: Resources = field(default_factory=Resources)

    @property
    def modules(self) -> tuple[str, ...]:
        return (self.function.__module__,)

    def warm(self) -> None:
        """Nothing to load ahead: a task's function sets up what it needs on first use."""

    def run(self, number: int, payload: Any, attempt: int, node: str | None = None) -> Any:
        return self.function(number, payload)


@dataclass
class Task:
    number: int
    payload: Any = None
    attempt: int = 1


def dispatch(
    executor: Executor,
    job: Job,
    tasks: Iterable[Task],
    max_retries: int,
    done: Callable[[Task, Any], None],
    failed: Callable[[Task, str], None],
    where: str,
) -> None:
    """Run ``tasks`` on ``executor``: at most its capacity in flight, each retried up to
    ``max_retries`` times, then ``done(task, result)`` or ``failed(task, error)``.

    A full output storage stops the whole run (``StorageFull``): other items would only fail the
    same way. ``where`` names that storage in the message.
    """
    capacity = executor.start(job)
    in_flight: dict[int, Task] = {}

    def settle(outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            task = in_flight.pop(outcome.ticket)
            if outcome.error is None:
                done(task, outcome.stats)
            elif storage_full(outcome.error):
                raise StorageFull(
                    f"the output storage is full ({outcome.error}); item {task.number} and later ones were not "
                    f"written: free space under {where} and rerun the same command to resume"
                )
            elif task.attempt <= max_retries:
                task.attempt += 1
                in_flight[executor.submit(task.number, task.payload, task.attempt)] = task
            else:
                failed(task, outcome.error)

    try:
        for task in tasks:
            while len(in_flight) >= capacity:
                settle(executor.wait())
            in_flight[executor.submit(task.number, task.payload, task.attempt)] = task
        while in_flight:
            settle(executor.wait())
    finally:
        executor.stop()


def run_tasks(
    executor: Executor,
    job: TaskJob,
    payloads: Iterable[tuple[int, Any]],
    max_retries: int = 2,
    on_result: Callable[[int, Any], None] | None = None,
    where: str = "the output",
) -> dict[int, Any]:
    """``job`` over ``(number, payload)`` items; returns each number's result, or raises one line
    naming the first item that failed every try (the others still ran: a rerun resumes them)."""
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}

    def done(task: Task, result: Any) -> None:
        results[task.number] = result
        if on_result is not None:
            on_result(task.number, result)

    def failed(task: Task, error: str) -> None:
        errors[task.number] = error

    items = (Task(number, payload) for number, payload in payloads)
    dispatch(executor, job, items, max_retries, done, failed, where)
    if errors:
        number, error = min(errors.items())
        raise FacecapError(f"{job.name}: {len(errors)} item(s) failed; item {number}: {error}")
    return results

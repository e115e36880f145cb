"""Progress bars for long work (rich), and a silent twin for ``--quiet`` and scripts."""

from __future__ import annotations

from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class StageProgress(Protocol):
    def __enter__(self) -> StageProgress: ...
    def __exit__(self, *exc: object) -> None: ...
    def set_total(self, shards: int | None) -> None: ...
    def advance(self, rows: int, failed: bool = False, skipped: bool = False) -> None: ...
    def phase(self, label: str) -> None:
        """A new pass over the shards (global stages): restart the bar under this label."""


class Quiet:
    def __enter__(self) -> Quiet:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set_total(self, shards: int | None) -> None:
        return None

    def advance(self, rows: int, failed: bool = False, skipped: bool = False) -> None:
        return None

    def phase(self, label: str) -> None:
        return None


class RowsPerSecond(TextColumn):
    def __init__(self) -> None:
        super().__init__("")

    def render(self, task):  # type: ignore[override]
        elapsed = task.elapsed or 0.0
        rows = task.fields.get("rows", 0)
        rate = rows / elapsed if elapsed > 0 else 0.0
        failed = task.fields.get("failed", 0)
        text = f"{rows:,} rows  {rate:,.0f} rows/s"
        if failed:
            text += f"  [red]{failed} failed[/red]"
        return text


class Bars:
    """One bar per stage: shards done of total, rows, rows/s, failures, ETA."""

    def __init__(self, label: str, console: Console | None = None):
        self.label = label
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("shards"),
            TaskProgressColumn(),
            RowsPerSecond(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        self._task = None

    def __enter__(self) -> Bars:
        self._progress.__enter__()
        self._task = self._progress.add_task(self.label, total=None, rows=0, failed=0)
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)

    def set_total(self, shards: int | None) -> None:
        self._progress.update(self._task, total=shards)

    def phase(self, label: str) -> None:
        self._progress.reset(self._task, description=label, rows=0, failed=0)

    def advance(self, rows: int, failed: bool = False, skipped: bool = False) -> None:
        task = self._progress.tasks[self._task]
        self._progress.update(
            self._task,
            advance=1,
            rows=task.fields["rows"] + (0 if skipped else rows),
            failed=task.fields["failed"] + int(failed),
        )

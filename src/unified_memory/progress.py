"""Progress per table: a rich bar (rows, rows/s, ETA) on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _RowsPerSecond(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0:,.0f} rows/s")


class _PlainProgress:
    def __init__(self) -> None:
        self.last = 0.0

    def __call__(self, table: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last >= 2.0 or done >= total:
            print(f"  {table}: {done}/{total} rows", file=sys.stderr, flush=True)
            self.last = now


class _BarProgress:
    def __init__(self, bar: Progress) -> None:
        self.bar, self.tasks = bar, dict[str, TaskID]()

    def __call__(self, table: str, done: int, total: int) -> None:
        if table not in self.tasks:
            self.tasks[table] = self.bar.add_task(table, total=total)
        self.bar.update(self.tasks[table], completed=done)


@contextmanager
def reporter(enabled: bool) -> Iterator[object | None]:
    """A progress callback ``(table, done, total)``, or None when progress is off."""
    if not enabled:
        yield None
        return
    if not sys.stderr.isatty():
        yield _PlainProgress()
        return
    columns = (TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
               _RowsPerSecond(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        yield _BarProgress(bar)

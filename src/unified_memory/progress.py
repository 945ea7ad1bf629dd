"""Progress per table: a rich bar (rows, rows/s, ETA) on a terminal, plain lines otherwise.

:data:`Progress` is the one callback type the stages take; rich is imported only when a bar is shown.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress as Bar
    from rich.progress import ProgressColumn, TaskID

Progress = Callable[[str, int, int], None]
"""A progress callback: ``(table, rows done, rows total)``."""


class _PlainProgress:
    def __init__(self) -> None:
        self.last = 0.0

    def __call__(self, table: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last >= 2.0 or done >= total:
            print(f"  {table}: {done}/{total} rows", file=sys.stderr, flush=True)
            self.last = now


class _BarProgress:
    def __init__(self, bar: Bar) -> None:
        self.bar = bar
        self.tasks: dict[str, TaskID] = {}

    def __call__(self, table: str, done: int, total: int) -> None:
        if table not in self.tasks:
            self.tasks[table] = self.bar.add_task(table, total=total)
        self.bar.update(self.tasks[table], completed=done)


@contextmanager
def reporter(enabled: bool) -> Iterator[Progress | None]:
    """A progress callback ``(table, done, total)``, or None when progress is off."""
    if not enabled:
        yield None
        return
    if not sys.stderr.isatty():
        yield _PlainProgress()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as Bar

    columns = (TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
               _rows_per_second(), TimeRemainingColumn())
    with Bar(*columns, transient=False) as bar:
        yield _BarProgress(bar)


def _rows_per_second() -> ProgressColumn:
    from rich.progress import ProgressColumn, Task
    from rich.text import Text

    class RowsPerSecond(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(f"{task.speed or 0:,.0f} rows/s")

    return RowsPerSecond()

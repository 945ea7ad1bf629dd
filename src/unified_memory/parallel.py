"""Parallel connections for the migration's independent work, and where its time goes.

Worker connections are opened like the caller's own (same server, database, role and password, taken from
the open connection), run the tool's maintenance settings, and are closed at the end. ``Phases`` sums the
seconds spent per phase over every connection (with several workers the sum exceeds the wall time).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from typing import TypeVar

import psycopg

from .db import custom_plans, maintenance, scalar

log = logging.getLogger("unified_memory.parallel")

T = TypeVar("T")
R = TypeVar("R")

MAX_JOBS = 16
WORK_MEM = "64MB"  # per connection: a batch's materialised rows stay in memory, not temporary files


class Phases:
    """Seconds per phase, summed over every connection; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.add(name, time.monotonic() - started)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def rounded(self) -> dict[str, float]:
        """Seconds per phase, to the millisecond."""
        with self._lock:
            return {k: round(v, 3) for k, v in self.seconds.items()}


def server_cores(conn: psycopg.Connection) -> int:
    """The server's core count as far as the client can tell: this machine's when the server is local (a Unix
    socket or loopback), else ``max_parallel_workers`` (what the administrator lets one query use)."""
    host = conn.info.host or ""
    if host.startswith("/") or host in ("localhost", "127.0.0.1", "::1") or not host:
        return os.cpu_count() or 1
    return max(1, int(scalar(conn, "SELECT current_setting('max_parallel_workers')::int") or 1))


def default_jobs(conn: psycopg.Connection) -> int:
    """``--jobs`` when not given: the server's cores, capped at ``MAX_JOBS`` and by free connection slots."""
    free = int(scalar(conn, "SELECT current_setting('max_connections')::int - "
                            "(SELECT count(*) FROM pg_stat_activity) - 3") or 1)
    return max(1, min(server_cores(conn), MAX_JOBS, free))


def _connect_like(conn: psycopg.Connection) -> psycopg.Connection:
    params: dict[str, str] = dict(conn.info.get_parameters())
    password = conn.pgconn.password
    if password:
        params["password"] = password.decode()
    params["application_name"] = "unified-memory"
    return psycopg.connect(autocommit=True, **params)  # type: ignore[arg-type]


def _open_like(conn: psycopg.Connection, stack: ExitStack) -> psycopg.Connection:
    """A connection like ``conn`` with the maintenance settings, closed with ``stack``.

    Raises:
        psycopg.OperationalError: no connection (the server's or the role's connection limit, for one).
    """
    worker = stack.enter_context(_connect_like(conn))
    stack.enter_context(maintenance(worker))
    stack.enter_context(custom_plans(worker))
    worker.execute("SELECT set_config('work_mem', %s, false)", [WORK_MEM])
    return worker


@contextmanager
def companion(conn: psycopg.Connection) -> Iterator[psycopg.Connection]:
    """One more connection like ``conn``, with the same maintenance settings, for work that runs beside it."""
    with ExitStack() as stack:
        yield _open_like(conn, stack)


class Workers:
    """``n`` connections like ``conn`` (opened on first use), each with the maintenance settings."""

    def __init__(self, conn: psycopg.Connection, n: int) -> None:
        self.conn, self.n = conn, n
        self._stack = ExitStack()
        self._conns: list[psycopg.Connection] = []
        self.stop = threading.Event()  # set when one task failed or the caller was interrupted

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def connections(self) -> list[psycopg.Connection]:
        """Up to ``n`` connections: as many as the server and the role allow (the work then runs on fewer)."""
        while len(self._conns) < self.n:
            try:
                self._conns.append(_open_like(self.conn, self._stack))
            except psycopg.OperationalError as exc:
                log.warning("%d of %d parallel connections opened (%s): the work runs on fewer", len(self._conns),
                            self.n, exc.sqlstate or "no connection")
                self.n = max(1, len(self._conns))
                break
        return self._conns

    def map(self, fn: Callable[[psycopg.Connection, T], R], items: Sequence[T]) -> list[R]:
        """``fn(connection, item)`` for every item, at most ``n`` at a time; the first error stops the rest
        from starting and is raised."""
        conns = self.connections()[: len(items)] if self.n > 1 and len(items) > 1 else []
        if len(conns) <= 1:
            return [fn(self.conn, item) for item in items]
        queue = list(enumerate(items))
        results: dict[int, R] = {}
        lock, failed = threading.Lock(), self.stop

        def drain(worker: psycopg.Connection) -> None:
            while not failed.is_set():
                with lock:
                    if not queue:
                        return
                    index, item = queue.pop(0)
                try:
                    results[index] = fn(worker, item)
                except BaseException:
                    failed.set()
                    raise

        with ThreadPoolExecutor(max_workers=len(conns), thread_name_prefix="unified-memory") as pool:
            futures = [pool.submit(drain, c) for c in conns]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
            except BaseException:  # KeyboardInterrupt: the workers stop after their current batch
                failed.set()
                raise
            for future in futures:
                future.result()
        return [results[i] for i in range(len(items))]

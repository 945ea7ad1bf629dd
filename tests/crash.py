"""Helpers to SIGKILL a tool process at a chosen moment, seen from pg_stat_activity."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import psycopg


def spawn(args: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Run ``unified-memory ARGS`` in a child process."""
    return subprocess.Popen([sys.executable, "-m", "unified_memory.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


def kill_when(proc: subprocess.Popen[bytes], dsn: str, *, state: str, query_prefix: str = "",
              nth: int = 1, timeout: float = 60.0) -> bool:
    """SIGKILL ``proc`` the ``nth`` time its backend is seen in ``state`` running a query starting with
    ``query_prefix``; False when the process ended first."""
    seen, last_query = 0, {}
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as watcher:
        while time.monotonic() < deadline and proc.poll() is None:
            rows = watcher.execute(  # every connection of the tool (``--jobs`` opens several)
                "SELECT pid, state, query, query_start FROM pg_stat_activity "
                "WHERE application_name LIKE 'unified-memory%%' "
                "AND datname = current_database() AND pid <> pg_backend_pid()").fetchall()
            for pid, row_state, query, started in rows:
                fresh = last_query.get(pid) != started
                if row_state == state and str(query).lstrip().startswith(query_prefix) and fresh:
                    seen, last_query[pid] = seen + 1, started
            if seen >= nth:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.002)
    return False

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
    seen, last_query = 0, None
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as watcher:
        while time.monotonic() < deadline and proc.poll() is None:
            row = watcher.execute(
                "SELECT state, query, query_start FROM pg_stat_activity WHERE application_name LIKE 'unified-memory%%' "
                "AND datname = current_database() AND pid <> pg_backend_pid()").fetchone()
            if row and row[0] == state and str(row[1]).lstrip().startswith(query_prefix) and row[2] != last_query:
                seen, last_query = seen + 1, row[2]
                if seen >= nth:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return True
            time.sleep(0.002)
    return False

"""Shared benchmark plumbing: a scratch database per measurement, child-process timing with peak RSS."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo


def server_dsn(argv_dsn: str | None) -> str:
    """The server to measure on: --dsn, else UNIFIED_MEMORY_TEST_DSN, else the local PostgreSQL."""
    return argv_dsn or os.environ.get("UNIFIED_MEMORY_TEST_DSN") or "postgresql://postgres@127.0.0.1:5432/test"


@contextmanager
def scratch_database(server: str, template: str | None = None) -> Iterator[str]:
    """A new database (optionally a copy of ``template``), dropped afterwards."""
    name = f"um_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server, autocommit=True) as admin:
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            query = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template))
        admin.execute(query)
    params = conninfo_to_dict(server)
    params["dbname"] = name
    try:
        yield make_conninfo(**params)
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@dataclass
class ChildRun:
    seconds: float
    peak_rss_mb: float
    stdout: str


def run_tool(args: Sequence[str], env: dict[str, str] | None = None) -> ChildRun:
    """Run ``unified-memory ARGS`` as a child; wall time and that child's own peak RSS (``os.wait4``)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "unified_memory.cli", *args], stdout=out, stderr=err,
                                env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"tool failed ({proc.returncode}): {err.read().decode()[-2000:]}")
        return ChildRun(seconds, usage.ru_maxrss / 1024, out.read().decode())


def dbname(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])

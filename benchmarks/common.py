"""Shared benchmark plumbing: a scratch database per measurement, child-process timing with peak RSS."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
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


def run_tool(args: Sequence[str]) -> ChildRun:
    """Run ``unified-memory ARGS`` as a child; wall time and the child's peak RSS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "unified_memory.cli", *args], capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"tool failed ({done.returncode}): {done.stderr[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return ChildRun(seconds, max(peak, before) / 1024, done.stdout)


def dbname(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])

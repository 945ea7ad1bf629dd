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

from unified_memory.shapes import LEGACY_TABLES


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


# --------------------------------------------------------------------------------------- realistic payload
# The fixtures' texts ("memory item 17") and vectors (one value repeated 768 times) compress about 9x, far
# better than real memories: prose and embeddings of unrelated floats. Compression speed depends on that, so
# backup benchmarks also run on this payload: the same rows, with prose and random unit-range embeddings.
_VOCABULARY = """the a user prefers likes remembers said asked about meeting project deadline coffee tea morning evening
weekend trip to from with for on in at notes summary task todo reminder birthday family friend team manager
python database migration schema backup vector search memory model prompt answer question email calendar phone
call review design document draft budget invoice travel flight hotel train lisbon berlin tokyo paris london
dark mode editor keyboard shortcut release version bug fix test deploy server cluster cloud cost report weekly
monthly quarter goal plan idea insight preference context fact profile allergy peanuts vegetarian running gym
music jazz book novel film series episode recipe pasta dinner lunch breakfast doctor appointment insurance car
repair garden plants dog cat school homework kids daughter son partner anniversary gift shopping list groceries
milk bread eggs cheese apples password never share always before after because although when while since until
important urgent later maybe often rarely usually should must could would will can not very quite really"""

_REALISTIC_FUNCTIONS = (
    "SELECT setseed(0.17)",
    """CREATE FUNCTION pg_temp.prose(words text[]) RETURNS text LANGUAGE sql VOLATILE AS $$
        SELECT string_agg(words[1 + floor(random() * cardinality(words))::int], ' ')
        FROM generate_series(1, 6 + floor(random() * 70)::int) $$""",
    """CREATE FUNCTION pg_temp.embedding(dim int) RETURNS real[] LANGUAGE sql VOLATILE AS $$
        SELECT array_agg((random() - 0.5)::real) FROM generate_series(1, dim) $$""",
)
_REALISTIC_UPDATES = (  # parameters: words, dim, with_vector
    """UPDATE memory_items SET content = pg_temp.prose(%(words)s::text[]),
        embedding = CASE WHEN random() < %(with_vector)s THEN pg_temp.embedding(%(dim)s) END""",
    "UPDATE memory_entries SET content = pg_temp.prose(%(words)s::text[])",
    "UPDATE web_ui_memory_entries SET content = pg_temp.prose(%(words)s::text[])",
    """UPDATE long_term_memory SET memory_json = regexp_replace(memory_json, 'long-term memory [0-9]+/[0-9]+',
        pg_temp.prose(%(words)s::text[]), 'g')""",
)


def make_realistic(conn: psycopg.Connection, *, dim: int, with_vector: float = 0.9) -> None:
    """Rewrite the default-shape fixture tables' texts as prose and most memory_items vectors as random floats."""
    for statement in _REALISTIC_FUNCTIONS:
        conn.execute(statement)
    params = {"words": _VOCABULARY.split(), "dim": dim, "with_vector": with_vector}
    for update in _REALISTIC_UPDATES:
        conn.execute(update, params)  # type: ignore[arg-type]
    for table in LEGACY_TABLES:
        conn.execute(sql.SQL("VACUUM FULL ANALYZE {}").format(sql.Identifier(table)))

"""Each test gets its own fresh database on a real PostgreSQL.

``UNIFIED_MEMORY_TEST_DSN`` names the server (CI: the system PostgreSQL 15, no pgvector); when unset, an
embedded pgserver (PostgreSQL 16 + pgvector) is started once per test session in a temporary directory.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from unified_memory import schema


@pytest.fixture(scope="session")
def server_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    configured = os.environ.get("UNIFIED_MEMORY_TEST_DSN")
    if configured:
        yield configured
        return
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("pgserver") / "pgdata", cleanup_mode="stop")
    yield server.get_uri("postgres")
    server.cleanup()


@pytest.fixture
def new_database(server_dsn: str) -> Iterator[Callable[[], str]]:
    """A factory of fresh databases on the test server, all dropped at the end of the test."""
    names: list[str] = []

    def make() -> str:
        name = f"um_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        names.append(name)
        params = conninfo_to_dict(server_dsn)
        params["dbname"] = name
        return make_conninfo(**params)

    yield make
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        for name in names:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def dsn(new_database: Callable[[], str]) -> str:
    """A fresh database for this test, dropped afterwards."""
    return new_database()


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        yield connection


@pytest.fixture
def unified(conn: psycopg.Connection) -> psycopg.Connection:
    """A connection to a database with the unified schema applied."""
    schema.up(conn)
    return conn


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private data directory for the tool (backups, logs, Milvus Lite file)."""
    path = tmp_path / "um-home"
    monkeypatch.setenv("UNIFIED_MEMORY_HOME", str(path))
    monkeypatch.delenv("MILVUS_URI", raising=False)
    monkeypatch.delenv("MILVUS_HOST", raising=False)
    return path

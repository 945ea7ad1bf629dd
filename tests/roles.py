"""LOGIN roles for security tests: real, non-superuser logins that are members of the tool's roles."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

APP_ROLE = "unified_memory_app"
MAINTENANCE_ROLE = "unified_memory_maintenance"


@contextmanager
def login_roles(server_dsn: str) -> Iterator[Callable[[str, str], str]]:
    """A factory ``make(database_dsn, member_of) -> dsn`` of fresh LOGIN roles (dropped at the end)."""
    made: list[str] = []

    def make(database_dsn: str, member_of: str) -> str:
        name = f"um_login_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE "
                                  "PASSWORD 'x'").format(sql.Identifier(name)))
            admin.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(member_of), sql.Identifier(name)))
        made.append(name)
        params = conninfo_to_dict(database_dsn)
        params.update(user=name, password="x")
        return make_conninfo(**params)

    try:
        yield make
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            for name in made:
                admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))

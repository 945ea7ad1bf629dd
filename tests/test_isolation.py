"""Issue 11: isolation against a hostile tenant, probed as a real application LOGIN (never a superuser)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from roles import APP_ROLE, MAINTENANCE_ROLE, login_roles

NO_SUCH = uuid.UUID("00000000-0000-4000-8000-000000000001")


@pytest.fixture
def logins(server_dsn: str) -> Iterator[Callable[[str, str], str]]:
    with login_roles(server_dsn) as make:
        yield make


@pytest.fixture
def seeded(unified: psycopg.Connection) -> dict[str, Any]:
    """Two tenants with memories, one relationship and audit rows each (written by the superuser)."""
    ids: dict[str, Any] = {}
    for user in ("alice", "bob"):
        rows = unified.execute("INSERT INTO memories (user_id, text) VALUES (%s, 'one'), (%s, 'two') RETURNING id",
                               [user, user]).fetchall()
        ids[user] = [r[0] for r in rows]
        ids[user + "_rel"] = unified.execute(
            "INSERT INTO memory_relationships (source_memory_id, derived_memory_id, relationship_type, metadata) "
            "VALUES (%s, %s, 'reflection', '{\"secret\": 1}') RETURNING id", ids[user]).fetchone()[0]  # type: ignore[index]
        unified.execute("INSERT INTO memory_access_log (memory_id, user_id, access_type) VALUES (%s, %s, 'read')",
                        [ids[user][0], user])
    return ids


@pytest.fixture
def app(dsn: str, seeded: dict[str, Any], logins: Callable[[str, str], str]) -> Iterator[psycopg.Connection]:
    """A session of a real LOGIN member of the application role, declaring tenant alice per transaction."""
    with psycopg.connect(logins(dsn, APP_ROLE), autocommit=True, row_factory=dict_row) as conn:
        yield conn


def as_alice(conn: psycopg.Connection) -> None:
    conn.execute("SELECT set_config('app.user_id', 'alice', true), set_config('app.org_id', '', true)")


def error_of(conn: psycopg.Connection, statement: str, params: Any = None) -> tuple[str | None, str]:
    """(SQLSTATE, message) of a statement run as alice in its own rolled-back transaction."""
    with pytest.raises(psycopg.Error) as caught, conn.transaction(force_rollback=True):
        as_alice(conn)
        conn.execute(statement, params)
    message = caught.value.diag.message_primary or ""
    return caught.value.sqlstate, message


def rowcount_as_alice(conn: psycopg.Connection, statement: str, params: Any = None) -> int:
    with conn.transaction(force_rollback=True):
        as_alice(conn)
        return conn.execute(statement, params).rowcount


def test_the_login_is_a_real_application_role(app: psycopg.Connection) -> None:
    row = app.execute("SELECT rolsuper, rolbypassrls, pg_has_role(current_user, %s, 'MEMBER') AS member "
                      "FROM pg_roles WHERE rolname = current_user", [APP_ROLE]).fetchone()
    assert row == {"rolsuper": False, "rolbypassrls": False, "member": True}


def test_relationships_of_another_tenant_are_invisible_and_unchangeable(app: psycopg.Connection,
                                                                        seeded: dict[str, Any]) -> None:
    with app.transaction(force_rollback=True):
        as_alice(app)
        seen = app.execute("SELECT id FROM memory_relationships").fetchall()
        assert [r["id"] for r in seen] == [seeded["alice_rel"]]
        with app.cursor() as cur, cur.copy("COPY memory_relationships TO STDOUT") as copy:
            copied = b"".join(bytes(block) for block in copy)
        assert str(seeded["bob_rel"]).encode() not in copied and str(seeded["alice_rel"]).encode() in copied
        details = app.execute("SELECT count(*) AS n FROM memory_relationship_details").fetchone()
        assert details == {"n": 1}
    bob = seeded["bob_rel"]
    assert rowcount_as_alice(app, "UPDATE memory_relationships SET confidence_score = 0 WHERE id = %s", [bob]) == 0
    assert rowcount_as_alice(app, "DELETE FROM memory_relationships WHERE id = %s", [bob]) == 0
    assert error_of(app, "TRUNCATE memory_relationships")[0] == "42501"


def test_linking_to_a_foreign_memory_fails_exactly_like_a_missing_one(app: psycopg.Connection,
                                                                       seeded: dict[str, Any]) -> None:
    mine, foreign = seeded["alice"][0], seeded["bob"][0]
    insert = ("INSERT INTO memory_relationships (source_memory_id, derived_memory_id, relationship_type) "
              "VALUES (%s, %s, 'semantic_link')")
    to_foreign = error_of(app, insert, [mine, foreign])
    assert to_foreign == error_of(app, insert, [mine, NO_SUCH])
    assert to_foreign[0] == "42501"  # the policy refuses before the foreign key could tell
    assert error_of(app, insert, [foreign, seeded["bob"][1]]) == error_of(app, insert, [NO_SUCH, seeded["bob"][1]])
    update = "UPDATE memory_relationships SET derived_memory_id = %s WHERE id = %s"
    assert error_of(app, update, [foreign, seeded["alice_rel"]]) == error_of(app, update, [NO_SUCH,
                                                                                           seeded["alice_rel"]])
    call = "SELECT create_memory_relationship(%s, %s, 'semantic_link')"
    foreign_call, missing_call = error_of(app, call, [mine, foreign]), error_of(app, call, [mine, NO_SUCH])
    assert foreign_call[0] == missing_call[0] == "P0002"
    assert foreign_call[1].replace(str(foreign), "<id>") == missing_call[1].replace(str(NO_SUCH), "<id>")
    by_name = ("SELECT create_memory_relationship(source_id => %s, derived_id => %s, rel_type => 'reflection', "
               "confidence => 0.5, rel_metadata => '{}')")
    with app.transaction(force_rollback=True):
        as_alice(app)
        made = app.execute(by_name, [mine, seeded["alice"][1]]).fetchone()
        assert made is not None and made["create_memory_relationship"] == seeded["alice_rel"]


def test_functions_give_no_existence_oracle(app: psycopg.Connection, seeded: dict[str, Any]) -> None:
    foreign = seeded["bob"][0]
    access = "SELECT update_memory_access(%s, 'alice')"
    foreign_err, missing_err = error_of(app, access, [foreign]), error_of(app, access, [NO_SUCH])
    assert foreign_err[0] == missing_err[0] == "P0002"
    assert missing_err[1] == f"memory {NO_SUCH} not found"
    assert foreign_err[1] == f"memory {foreign} not found"
    with app.transaction(force_rollback=True):
        as_alice(app)
        deleted = app.execute("SELECT soft_delete_memory(%s, 'alice') AS a, soft_delete_memory(%s, 'alice') AS b, "
                              "soft_delete_memory(memory_id => %s, delete_user_id => 'alice') AS c",
                              [foreign, NO_SUCH, seeded["alice"][0]]).fetchone()
        assert deleted == {"a": False, "b": False, "c": True}
        app.execute("SELECT update_memory_access(memory_id => %s, access_user_id => 'alice', access_type => 'read')",
                    [seeded["alice"][1]])
        logged = app.execute("SELECT access_type FROM memory_access_log ORDER BY accessed_at, access_type").fetchall()
        assert sorted(r["access_type"] for r in logged) == ["delete", "read", "read"]


def test_inserting_a_foreign_id_is_refused_without_telling_whether_it_exists(app: psycopg.Connection,
                                                                                 seeded: dict[str, Any]) -> None:
    insert = "INSERT INTO memories (id, user_id, text) VALUES (%s, 'alice', 'x')"
    assert error_of(app, insert, [seeded["bob"][0]]) == error_of(app, insert, [NO_SUCH])
    assert error_of(app, insert, [NO_SUCH])[0] == "42501"


@pytest.mark.parametrize("column, value", [("source_table", "memory_items"), ("source_key", "k"),
                                           ("migrated_at", "2024-01-01")])
def test_provenance_is_written_only_by_the_migration(app: psycopg.Connection, column: str, value: str) -> None:
    insert = f"INSERT INTO memories (user_id, text, {column}) VALUES ('alice', 'x', %s)"  # noqa: S608 (fixed names)
    assert error_of(app, insert, [value])[0] == "42501"
    assert error_of(app, f"UPDATE memories SET {column} = %s", [value])[0] == "42501"  # noqa: S608
    assert error_of(app, "UPDATE memories SET id = gen_random_uuid()")[0] == "42501"


def test_the_audit_log_refuses_a_blank_user_and_a_blank_session_sees_nothing(app: psycopg.Connection,
                                                                              unified: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.CheckViolation):
        unified.execute("INSERT INTO memory_access_log (user_id, access_type) VALUES (' ', 'read')")
    with app.transaction(force_rollback=True):
        app.execute("SELECT set_config('app.user_id', '', true)")
        assert app.execute("SELECT count(*) AS n FROM memory_access_log").fetchone() == {"n": 0}
        assert app.execute("SELECT count(*) AS n FROM memory_relationships").fetchone() == {"n": 0}
    insert = "INSERT INTO memory_access_log (user_id, access_type, accessed_at) VALUES ('alice', 'read', now())"
    assert error_of(app, insert)[0] == "42501"  # the audit time is the server's
    for statement in ("UPDATE memory_access_log SET user_id = 'alice'", "DELETE FROM memory_access_log",
                      "TRUNCATE memory_access_log"):
        assert error_of(app, statement)[0] == "42501"


def test_maintenance_cannot_rewrite_the_audit_log(dsn: str, unified: psycopg.Connection, seeded: dict[str, Any],
                                                  logins: Callable[[str, str], str]) -> None:
    with psycopg.connect(logins(dsn, MAINTENANCE_ROLE), autocommit=True) as conn:
        conn.execute("SET ROLE unified_memory_maintenance")
        conn.execute("SET row_security = off")
        assert conn.execute("SELECT count(*) FROM memory_access_log").fetchone() == (2,)
        for statement in ("UPDATE memory_access_log SET user_id = 'x'", "DELETE FROM memory_access_log",
                          "TRUNCATE memory_access_log",
                          "CREATE TRIGGER t BEFORE INSERT ON memory_access_log FOR EACH ROW "
                          "EXECUTE FUNCTION set_memory_defaults()"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
        conn.execute("INSERT INTO memory_access_log (user_id, access_type) VALUES ('maintenance', 'read')")
    assert unified.execute("DELETE FROM memory_access_log WHERE user_id = 'maintenance'").rowcount == 1  # the owner

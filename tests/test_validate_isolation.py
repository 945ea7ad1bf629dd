"""Issue 11: validate proves isolation, and each way of breaking it fails exactly the right isolation checks."""

from __future__ import annotations

import psycopg
import pytest

from unified_memory import fixtures
from unified_memory.migrate import MigrationOptions, migrate
from unified_memory.validate import validate

_OPEN_POLICY = ("DROP POLICY {policy} ON {table}",
                "CREATE POLICY {policy} ON {table} USING (true) WITH CHECK (true)")


def _opened(policy: str, table: str) -> tuple[str, ...]:
    return tuple(s.format(policy=policy, table=table) for s in _OPEN_POLICY)


# how to break isolation -> the isolation checks that must fail (and no other isolation check)
BREAKAGES: dict[str, tuple[tuple[str, ...], set[str]]] = {
    "relationships_rls_not_forced": (("ALTER TABLE memory_relationships NO FORCE ROW LEVEL SECURITY",),
                                     {"isolation.rls"}),
    "relationships_rls_disabled": (("ALTER TABLE memory_relationships DISABLE ROW LEVEL SECURITY",),
                                   {"isolation.rls", "isolation.probes"}),
    "relationships_policy_opened": (_opened("memory_relationships_tenant_isolation", "memory_relationships"),
                                    {"isolation.probes"}),
    "relationships_policy_dropped": (("DROP POLICY memory_relationships_tenant_isolation ON memory_relationships",),
                                     {"isolation.reachable"}),  # fails closed: the application sees no link
    "memories_policy_opened": (_opened("memories_tenant_isolation", "memories"),
                               {"isolation.sessions", "isolation.probes"}),
    "access_log_policy_opened": (_opened("memory_access_log_tenant_isolation", "memory_access_log"),
                                 {"isolation.sessions", "isolation.probes"}),
    "provenance_writable": (("GRANT UPDATE (source_table, source_key) ON memories TO unified_memory_app",),
                            {"isolation.reserved_columns", "isolation.probes"}),
    "ids_writable": (("GRANT INSERT (id) ON memories TO unified_memory_app",),
                     {"isolation.reserved_columns", "isolation.probes"}),
    "audit_deletable_by_maintenance": (("GRANT DELETE ON memory_access_log TO unified_memory_maintenance",),
                                       {"isolation.audit_append_only"}),
    "schema_creatable": (("GRANT CREATE ON SCHEMA public TO unified_memory_app",), {"isolation.reachable"}),
    "truncate_granted": (("GRANT TRUNCATE ON memories TO unified_memory_app",), {"isolation.reachable"}),
    "unprotected_table": (("CREATE TABLE notes_of_everyone (note text)",
                           "GRANT SELECT ON notes_of_everyone TO unified_memory_app"), {"isolation.reachable"}),
    "definer_function": (("CREATE FUNCTION peek() RETURNS bigint LANGUAGE sql SECURITY DEFINER "
                          "AS $$ SELECT count(*) FROM memories $$",), {"isolation.reachable"}),
    "definer_link_function": (("ALTER FUNCTION create_memory_relationship(UUID, UUID, VARCHAR, REAL, JSONB) "
                               "SECURITY DEFINER",), {"isolation.reachable", "isolation.probes"}),
}


@pytest.fixture
def migrated(unified: psycopg.Connection) -> psycopg.Connection:
    fixtures.create(unified, rows=120)
    migrate(unified, MigrationOptions(batch_size=100))
    return unified


def _isolation_failures(conn: psycopg.Connection) -> dict[str, str]:
    return {c.name: c.message for c in validate(conn).failed() if c.name.startswith("isolation.")}


def test_the_isolation_checks_pass_and_show_what_they_enumerated(migrated: psycopg.Connection) -> None:
    report = validate(migrated)
    checks = {c.name: c for c in report.checks if c.name.startswith("isolation.")}
    assert {n: c.message for n, c in checks.items() if c.status != "pass"} == {}
    reachable = checks["isolation.reachable"].evidence["relations"]
    assert {"public.memories", "public.memory_relationships", "public.memory_access_log"} <= set(reachable)
    assert checks["isolation.reachable"].evidence["functions"] > 0
    assert checks["isolation.probes"].evidence["pairs"] == 2  # the probe tenants and two sampled ones


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_each_breakage_fails_exactly_its_isolation_checks(migrated: psycopg.Connection, breakage: str) -> None:
    statements, expected = BREAKAGES[breakage]
    for statement in statements:
        migrated.execute(statement.encode())
    failed = _isolation_failures(migrated)
    assert set(failed) == expected, failed

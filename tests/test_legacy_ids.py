"""Deterministic ids of legacy rows without a UUID (017, inlined by 026): Python's uuid3, and inlined."""

from __future__ import annotations

import uuid

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

NS = uuid.UUID("3334e2db-51f2-5d45-9545-6fec3e93dfe0")
# any text PostgreSQL can hold: no NUL, no lone surrogate (UTF-8 has no encoding for them)
NAMES = st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), max_size=200)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(NAMES, min_size=1, max_size=40))
def test_ids_are_python_uuid3(unified: psycopg.Connection, names: list[str]) -> None:
    rows = unified.execute("SELECT n, memory_migration_uuid(n) AS id FROM unnest(%s::text[]) AS n", [names])
    for name, got in rows:
        assert got == uuid.uuid3(NS, name), name


def test_the_planner_inlines_the_function(unified: psycopg.Connection) -> None:
    plan = "\n".join(r[0] for r in unified.execute(
        "EXPLAIN VERBOSE SELECT memory_migration_uuid('long_term_memory:' || i || '#0') FROM generate_series(1, 3) i"))
    assert "md5" in plan and "memory_migration_uuid" not in plan, plan


def test_down_restores_017s_definition_with_the_same_ids(unified: psycopg.Connection) -> None:
    from unified_memory import schema

    expected = [uuid.uuid3(NS, n) for n in ("memory_items:a", "long_term_memory:(0,1)#2", "é✓")]
    schema.down(unified, steps=1)  # 026, the newest file
    plan = "\n".join(r[0] for r in unified.execute(
        "EXPLAIN VERBOSE SELECT memory_migration_uuid('x' || i) FROM generate_series(1, 3) i"))
    assert "memory_migration_uuid" in plan  # 017's body is not inlinable
    got = [r[0] for r in unified.execute("SELECT memory_migration_uuid(n) FROM unnest(%s::text[]) WITH ORDINALITY "
                                         "AS u(n, i) ORDER BY i", [["memory_items:a", "long_term_memory:(0,1)#2",
                                                                   "é✓"]])]
    assert got == expected

"""The mapping evaluates each value once (``lets``, ``meta.legacy`` entries through strict ``jsonb_set``): the
results must be exactly those of the plain form, which evaluates an expression wherever it is written."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from unified_memory import fixtures, schema
from unified_memory.batchsql import mapped_source
from unified_memory.mapping import MAPPINGS, TableMapping, _entry, mapping_for

TEXT = st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), max_size=12)
SCALARS = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False,
                                                                              width=32) | TEXT
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=8)
TIMES = st.sampled_from(["2024-03-01T10:00:00Z", "2024-03-01 10:00:00", "2024-03-01 10:00:00+02", "0044-01-01",
                         "20000-01-01", "infinity", "not a time", "2024-02-30", ""])
ITEM = st.fixed_dictionaries({}, optional={
    "content": TEXT | JSON, "tags": JSON, "importance": st.integers(-5, 20) | st.floats(-5, 20) | JSON,
    "type": st.sampled_from(["fact", " Task ", "chat", "nonsense"]) | JSON, "created_at": TIMES | JSON,
    "metadata": st.dictionaries(st.sampled_from(["legacy", "a", "b"]), JSON, max_size=3) | JSON,
    "extra": JSON,
}) | TEXT | JSON


def _inlined(m: TableMapping, expr: str) -> str:
    for name, value in m.lets.items():
        expr = expr.replace(f"lets.{name}", f"({value})")
    return expr


def _plain_meta(m: TableMapping) -> str:
    """meta as it was written before: every value evaluated where it appears."""
    legacy = " || ".join(f"CASE WHEN ({v}) IS NOT NULL THEN jsonb_build_object('{k}', {v}) ELSE '{{}}'::jsonb END"
                         for k, v in m.legacy_parts())
    return _inlined(m, f"(({m.meta_object()}) - 'legacy' || CASE WHEN ({legacy}) = '{{}}'::jsonb THEN '{{}}'::jsonb "
                       f"ELSE jsonb_build_object('legacy', ({legacy})) END)")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(st.tuples(ITEM, st.booleans()), min_size=1, max_size=25))
def test_long_term_items_map_as_the_plain_form_does(unified: psycopg.Connection, items: list[tuple[Any, bool]]) -> None:
    m = mapping_for("long_term_memory", "L1")
    pairs = [(name, expr) for name, expr in m.column_sql()]
    checks = [sql.SQL("({})::text AS {}, ({})::text AS {}").format(
        sql.SQL(e), sql.Identifier(f"once_{n}"), sql.SQL(_inlined(m, e)), sql.Identifier(f"plain_{n}"))
        for n, e in pairs[:-1]]
    query = sql.SQL(
        "SELECT ({})::text AS once_meta, ({})::text AS plain_meta, {} "
        "FROM (SELECT x.item, '(0,' || x.i || ')' AS row_key, (x.i - 1)::int AS item_index, "
        "x.nul AS nul_replaced, 'u1'::text AS user_id "
        "FROM unnest(%(items)s::jsonb[], %(nuls)s::boolean[]) WITH ORDINALITY AS x(item, nul, i)) s{}").format(
        sql.SQL(m.meta_sql()), sql.SQL(_plain_meta(m)), sql.SQL(", ").join(checks), sql.SQL(m.lets_join()))
    with unified.cursor() as cur:
        cur.execute("SET TIME ZONE 'UTC'")
        rows = cur.execute(query, {"items": [Jsonb(i) for i, _ in items], "nuls": [n for _, n in items],
                                   "tz": "Europe/Lisbon"}).fetchall()
        assert cur.description is not None
        names = [d.name for d in cur.description]
    assert len(rows) == len(items)
    for row in rows:
        got = dict(zip(names, row, strict=True))
        for name, _ in pairs:
            assert got[f"once_{name}"] == got[f"plain_{name}"], name


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.tuples(st.sampled_from(["a", "b", "c", "it's"]), st.none() | JSON.map(Jsonb)),
                       max_size=6))
def test_an_entry_is_left_out_only_for_sql_null(unified: psycopg.Connection, values: list[tuple[str, Any]]) -> None:
    once = " || ".join([_entry(k, f"%(v{i})s::jsonb") for i, (k, _) in enumerate(values)] or ["'{}'::jsonb"])
    expected: dict[str, Any] = {}
    for key, value in values:
        if value is not None:  # a JSON null is kept; only SQL NULL leaves the key out
            expected[key] = value.obj
    got = unified.execute(sql.SQL("SELECT {} = %(expected)s::jsonb, {}").format(sql.SQL(once), sql.SQL(once)),
                          {"expected": Jsonb(expected), **{f"v{i}": v for i, (_, v) in enumerate(values)}}).fetchone()
    assert got is not None and got[0] is True, (got, expected)  # compared as jsonb: 1e16 equals 10000000000000000


@pytest.mark.parametrize("key", sorted(MAPPINGS))
def test_every_mapping_maps_the_fixture_rows_as_the_plain_form_does(conn: psycopg.Connection,
                                                                     key: tuple[str, str]) -> None:
    m = MAPPINGS[key]
    fixtures.create(conn, rows=120, shapes={m.table: m.shape})
    schema.up(conn)
    prelude, source = mapped_source(m)
    plain = [(n, _plain_meta(m) if n == "meta" else _inlined(m, e)) for n, e in m.column_sql()]
    differs = sql.SQL(", ").join(
        sql.SQL("count(*) FILTER (WHERE ({})::text IS DISTINCT FROM ({})::text) AS {}").format(
            sql.SQL(e), sql.SQL(p), sql.Identifier(n)) for (n, e), (_, p) in zip(m.column_sql(), plain, strict=True))
    query = sql.SQL("WITH {} mapped AS (SELECT 1) SELECT count(*) AS rows, {} {} WHERE {} IS NULL").format(
        prelude if m.expands else sql.SQL(""), differs, source, sql.SQL(m.reason_sql()))
    with conn.cursor(row_factory=dict_row) as cur:
        got = cur.execute(query, {"tz": "America/New_York", "after": None, "upper": None}).fetchone()
    assert got is not None and got.pop("rows") > 0
    assert {n: c for n, c in got.items() if c} == {}

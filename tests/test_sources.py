"""Issue 12: each mapping carries its source (rows of a keyed table, or long_term_memory's items)."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from unified_memory.mapping import MAPPINGS, PRECEDENCE
from unified_memory.shapes import LEGACY_TABLES, SHAPES
from unified_memory.sources import ITEM_KEYS, ItemSource, RowSource


def test_each_mapping_has_the_source_of_its_table() -> None:
    for (table, shape), m in MAPPINGS.items():
        if table == "long_term_memory":
            assert isinstance(m.source, ItemSource) and m.expands
            assert m.source.capture_key is None and not m.source.anti_join and "id" in m.source.uncompared
            assert m.order == "s.ctid" and m.source.row_key == "s.ctid::text"
        else:
            assert isinstance(m.source, RowSource) and not m.expands
            assert m.source.anti_join and not m.source.uncompared and m.source.row_key == m.key
            required = next(s.required for s in SHAPES if (s.table, s.name) == (table, shape))
            assert m.source.capture_key in required, (table, shape)
        assert m.key == m.source.key
        assert m.source.choose(rows="rows", items="items") == ("items" if m.expands else "rows")
    assert LEGACY_TABLES == PRECEDENCE


@pytest.mark.parametrize("row, index", [("(0,1)", 0), ("(12,7)", 3), ("(4294967295,65535)", 1024)])
def test_item_keys_round_trip_in_python_and_in_sql(conn: psycopg.Connection, row: str, index: int) -> None:
    key = ITEM_KEYS.of(row, index)
    assert key == f"{row}#{index}"
    assert ITEM_KEYS.parse(key) == (row, index) and ITEM_KEYS.row_of(key) == row
    retired = f"{key}~42"
    assert ITEM_KEYS.parse(retired) == (row, index) and ITEM_KEYS.row_of(retired) == row
    mapping_key = MAPPINGS[("long_term_memory", "L1")].key  # the migration's own key expression
    got = conn.cursor(row_factory=dict_row).execute(sql.SQL(
        "SELECT {key} AS key, {row} AS row, {index} AS index, {is_item} AS is_item, {is_row} AS is_row, "
        "{current} AS current, {retired_current} AS retired_current "
        "FROM (SELECT %(row)s::text AS row_key, %(index)s::int AS item_index, %(key)s::text AS k, "
        "%(retired)s::text AS r) s").format(
        key=sql.SQL(mapping_key), row=sql.SQL(ITEM_KEYS.sql_row("s.k")),
        index=sql.SQL(ITEM_KEYS.sql_index("s.k")), is_item=sql.SQL(ITEM_KEYS.sql_is_item("s.k")),
        is_row=sql.SQL(ITEM_KEYS.sql_is_row("s.row_key")), current=sql.SQL(ITEM_KEYS.sql_current("s.k")),
        retired_current=sql.SQL(ITEM_KEYS.sql_current("s.r"))),
        {"row": row, "index": index, "key": key, "retired": retired}).fetchone()
    assert got == {"key": key, "row": row, "index": index, "is_item": True, "is_row": True, "current": True,
                   "retired_current": False}


def test_ctid_keys_are_ordered_as_ctids_and_row_keys_as_text() -> None:
    items = MAPPINGS[("long_term_memory", "L1")].source
    rows = MAPPINGS[("memory_items", "I1")].source
    ctids = ["(9,20)", "(10,1)", "(2,300)"]
    assert items.latest(ctids) == "(10,1)"  # text order would say (9,20)
    assert rows.latest(ctids) == "(9,20)"
    assert items.resume_after("(10,1)") == "(10,1)" and rows.resume_after("(10,1)") is None

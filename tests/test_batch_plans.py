"""Statements that run once per batch do work in proportion to the batch, not to its position or to the table.

Each test explains a batch late in a table (``EXPLAIN (ANALYZE, FORMAT JSON)``) and bounds the rows the plan read
from the big tables. The plans these replaced hashed or walked every outcome of the table on every batch: a run
quadratic in the table's size, invisible on small tables.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from unified_memory import batchsql, fixtures, vectors
from unified_memory.mapping import mapping_for
from unified_memory.migrate import MigrationOptions, migrate

ROWS = 3000


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _rows_read(conn: psycopg.Connection, query: sql.Composable, params: dict[str, Any], relation: str) -> int:
    """Rows the plan's scans of ``relation`` returned, over all their loops (rolled back: it may write)."""
    with conn.transaction(force_rollback=True):
        found = conn.execute(sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) ") + query, params).fetchone()
    assert found is not None
    nodes = [n for n in _nodes(found[0][0]["Plan"]) if n.get("Relation Name") == relation]
    assert nodes, f"the plan does not read {relation}"
    return sum(int(n["Actual Rows"]) * int(n["Actual Loops"]) for n in nodes)


@pytest.mark.parametrize(("table", "shape"), [("memory_items", "I2"), ("memory_entries", "E1"),
                                              ("web_ui_memory_entries", "W1")])
def test_a_resumed_pass_probes_each_rows_outcome(unified: psycopg.Connection, table: str, shape: str) -> None:
    """A pass over a table that already has outcomes (a resumed or repeated run) finds the rows still waiting by
    probing the outcome indexes row by row, from the batch's start: not by hashing all the table's memories."""
    fixtures.create(unified, rows=ROWS)
    migrate(unified, MigrationOptions())
    m = mapping_for(table, shape)
    unified.execute("DELETE FROM memories WHERE source_table = %s AND abs(hashtext(source_key)) %% 10 = 0", [table])
    unified.execute("ANALYZE")
    after = unified.execute(sql.SQL("SELECT {o}::text FROM {t} s ORDER BY {o} OFFSET %s LIMIT 1").format(
        o=sql.SQL(m.order), t=sql.Identifier(table)), [ROWS * 7 // 10]).fetchone()
    assert after is not None
    memories = int(unified.execute("SELECT count(*) FROM memories WHERE source_table = %s", [table]).fetchone()[0])
    read = _rows_read(unified, batchsql.next_upper(m, pending=True),
                      {"after": after[0], "range_end": None, "limit": 500, "max_bytes": 1 << 30}, "memories")
    assert read < memories // 2, f"{read} of {table}'s {memories} memories read to choose a batch of 500"


def test_a_removals_pass_does_not_walk_the_live_changes_again(unified: psycopg.Connection) -> None:
    """``forget`` leaves the changes of live memories queued; each batch starts after the last one it saw."""
    fixtures.create(unified, rows=ROWS, shapes={"memory_items": "I1"})
    migrate(unified, MigrationOptions(tables=("memory_items",)))
    unified.execute("UPDATE memories SET embedding_id = id::text")
    unified.execute("UPDATE memories SET text = text || ' (edited)'")  # queues every memory: all live
    unified.execute("UPDATE memories SET deleted_at = now() WHERE id IN (SELECT id FROM memories LIMIT 100)")
    unified.execute("ANALYZE")
    queued = int(unified.execute("SELECT count(*) FROM memory_vector_outbox").fetchone()[0])
    late = unified.execute("SELECT max(seq) - 150 FROM memory_vector_outbox").fetchone()[0]
    read = _rows_read(unified, vectors._OUTBOX_REMOVALS, {"after": late, "limit": 50}, "memory_vector_outbox")
    assert queued > 2 * ROWS // 3 and read <= 150, f"{read} of {queued} queued changes read for a batch of 50"


@pytest.mark.parametrize("batch", ["_PENDING_BATCH", "_FULL_BATCH", "_POINTED_BATCH"])
def test_a_late_sync_batch_reads_only_its_own_kept_vectors(unified: psycopg.Connection, batch: str) -> None:
    """Keyset batches of ``vectors sync`` look their kept vectors up row by row. The plain LEFT JOIN planned as a
    merge join that walked memory_legacy_embeddings from its first row for every batch (22 ms a batch half-way
    through 99,000 memories, 2.5 ms now)."""
    fixtures.create(unified, rows=ROWS, shapes={"memory_items": "I1"})
    migrate(unified, MigrationOptions())
    if batch == "_POINTED_BATCH":
        unified.execute("UPDATE memories SET embedding_id = id::text")
    unified.execute("ANALYZE")
    after = unified.execute("SELECT id FROM memories ORDER BY id OFFSET 2500 LIMIT 1").fetchone()
    assert after is not None
    read = _rows_read(unified, getattr(vectors, batch), {"after": after[0], "limit": 50, "chars": 100},
                      "memory_legacy_embeddings")
    assert read <= 50, f"{read} kept vectors read for a batch of 50"

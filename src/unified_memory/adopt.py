"""Adoption of a database where the first implementation's 016 already ran, and its undoing.

The assistant's deployments applied the first implementation's ``016_unified_memory_schema.sql`` at their first
start: ``memories``, ``memory_access_log`` and ``memory_relationships`` with most columns nullable, an audit log
that cascades, no provenance and no isolation, possibly holding rows. ``schema up`` recognises that schema by its
shape (``detect``) and converts it in place, in the caller's one transaction (``adopt``):

1. its shape is saved (columns, constraints, indexes, triggers, functions, views) for ``schema down``;
2. rows that cannot meet our constraints are moved, whole, to ``unified_memory_adoption_aside`` with their reason;
3. its views, triggers, functions, indexes and constraints are dropped (the audit log leaves the cascading key);
4. NULLs are filled with our defaults (the rows' previous images are kept), then the columns are tightened to
   exactly the shape our 016 creates, read from a reference copy of 016 built in a scratch schema;
5. our 016 and 017 run as on a fresh database (indexes, functions, triggers, views, isolation, grants);
6. rows that are the first migration's copies of legacy rows become that row's migration, with the provenance
   and mapped values our migration would write (``claim``); every other row stays the application's own.

``revert`` undoes it: the shape found comes back with every row, set-aside rows included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.rows import dict_row, scalar_row
from psycopg.types.json import Jsonb

from . import contract, sqlfile
from .batchsql import mapped_source
from .checks import Serialised
from .errors import ShapeError
from .mapping import MEMORY_TYPES, NEURO_TYPES, PRECEDENCE, UI_SOURCES, TableMapping, mapping_for
from .shapes import detect as detect_shape
from .shapes import table_columns

Variant = Literal["with_streamlit", "without_streamlit", "no_ui_source_check"]

TABLES = ("memories", "memory_access_log", "memory_relationships")
FUNCTIONS = ("calculate_decay_score", "calculate_expires_at", "update_memory_access", "create_memory_relationship",
             "soft_delete_memory", "set_memory_defaults", "update_updated_at_column")
VIEWS = ("active_memories_with_decay", "memory_relationship_details", "memory_analytics_by_tenant",
         "memory_audit_summary")
ADOPTION = "unified_memory_adoption"
ASIDE = "unified_memory_adoption_aside"
IMAGES = "unified_memory_adoption_rows"
REFERENCE = "unified_memory_adoption_reference"
_PROVENANCE = {"source_table", "source_key", "migrated_at"}
_UI_CORE = ("'web'", "'desktop'", "'api'", "'ag_ui'", "'copilot'")
# functions the first implementation's triggers call: kept when a trigger outside its tables still uses them
_TRIGGER_FUNCTIONS = ("set_memory_defaults", "update_updated_at_column")


@dataclass
class Found:
    """A first-implementation schema recognised by its shape."""

    variant: Variant
    rows: dict[str, int]


@dataclass
class AdoptionReport(Serialised):
    """What the conversion changed (or, in a dry run, would change)."""

    variant: str
    dry_run: bool = False
    rows_found: dict[str, int] = field(default_factory=dict)
    set_aside: dict[str, int] = field(default_factory=dict)  # "table: reason" -> rows
    filled: dict[str, int] = field(default_factory=dict)  # "table.column" -> NULLs filled
    claimed: dict[str, int] = field(default_factory=dict)  # legacy table -> copies that became its migration
    application_rows: int = 0
    replaced: list[str] = field(default_factory=list)


@dataclass
class RevertReport(Serialised):
    """What ``schema down`` of an adopted 016 restored."""

    rows_restored: dict[str, int] = field(default_factory=dict)
    rows_kept_changed: int = 0
    constraints_not_valid: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- detection
def _core_columns(table: str) -> set[str]:
    core = set(contract.COLUMNS[table]) - _PROVENANCE
    return core - {"meta"} if table == "memory_access_log" else core


def detect(conn: psycopg.Connection) -> Found | None:
    """The first implementation's schema in the current schema, recognised by its shape; else None."""
    columns = {t: set(table_columns(conn, t)) for t in TABLES}
    if not columns["memories"] or _comment(conn, "memories").startswith("unified-memory 016"):
        return None
    if "source_table" in columns["memories"] or any(not _core_columns(t) <= columns[t] for t in TABLES):
        return None
    checks: list[str] = _column_values(
        conn, "SELECT pg_get_constraintdef(k.oid) FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid "
        "WHERE c.relnamespace = current_schema()::regnamespace AND c.relname = 'memories' AND k.contype = 'c'")
    ui = [d for d in checks if "ui_source" in d and all(v in d for v in _UI_CORE)]
    rows = {t: int(_count(conn, t)) for t in TABLES}
    # the columns decide; the ui_source CHECK (with or without 'streamlit') names the variant, if it is still there
    if not ui:
        return Found("no_ui_source_check", rows)
    return Found("with_streamlit" if "'streamlit'" in ui[0] else "without_streamlit", rows)


def adopted(conn: psycopg.Connection) -> bool:
    """Whether the ledger's 016 is an adoption (``schema down`` then reverts it instead of dropping tables)."""
    return _value(conn, "SELECT to_regclass(%s) IS NOT NULL", [ADOPTION]) is True


def _value(conn: psycopg.Connection, query: str | sql.SQL | sql.Composed, params: list[Any] | None = None) -> Any:
    """The one value ``query`` returns (None without a row)."""
    with conn.cursor(row_factory=scalar_row) as cur:
        return cur.execute(query.encode() if isinstance(query, str) else query, params).fetchone()


def _column_values(conn: psycopg.Connection, query: str) -> list[Any]:
    with conn.cursor(row_factory=scalar_row) as cur:
        return cur.execute(query.encode()).fetchall()


def _comment(conn: psycopg.Connection, table: str) -> str:
    return str(_value(conn, "SELECT obj_description(to_regclass(%s), 'pg_class')", [table]) or "")


def _count(conn: psycopg.Connection, table: str) -> int:
    return int(_value(conn, sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))) or 0)


# ------------------------------------------------------------------------------------------- catalog
_COLUMNS = """SELECT c.relname AS "table", a.attname AS "column", format_type(a.atttypid, a.atttypmod) AS type,
       a.attnotnull AS notnull, pg_get_expr(d.adbin, d.adrelid) AS "default"
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE c.relnamespace = current_schema()::regnamespace AND c.relname = ANY(%(tables)s) AND c.relkind = 'r'
  AND a.attnum > 0 AND NOT a.attisdropped ORDER BY c.relname, a.attnum"""
_CONSTRAINTS = """SELECT c.relname AS "table", k.conname AS name, k.contype::text AS type,
       pg_get_constraintdef(k.oid) AS def
FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
WHERE c.relnamespace = current_schema()::regnamespace AND c.relname = ANY(%(tables)s)
ORDER BY k.contype = 'f', k.conname"""
_INDEXES = """SELECT c.relname AS "table", i.relname AS name, pg_get_indexdef(x.indexrelid) AS def
FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class c ON c.oid = x.indrelid
WHERE c.relnamespace = current_schema()::regnamespace AND c.relname = ANY(%(tables)s)
  AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = x.indexrelid AND k.contype IN ('p', 'u', 'x'))
ORDER BY i.relname"""
_TRIGGERS = """SELECT c.relname AS "table", t.tgname AS name, pg_get_triggerdef(t.oid) AS def
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
WHERE NOT t.tgisinternal AND c.relnamespace = current_schema()::regnamespace AND c.relname = ANY(%(tables)s)
ORDER BY t.tgname"""
_FUNCTIONS = """SELECT p.oid::regprocedure::text AS signature, p.proname AS name, pg_get_functiondef(p.oid) AS def,
       obj_description(p.oid, 'pg_proc') AS comment
FROM pg_proc p
WHERE p.pronamespace = current_schema()::regnamespace AND p.proname = ANY(%(functions)s)
  AND NOT (p.proname = ANY(%(trigger_functions)s) AND EXISTS (
      SELECT 1 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
      WHERE t.tgfoid = p.oid AND NOT (c.relname = ANY(%(tables)s))))
ORDER BY p.proname"""
_VIEWS = """SELECT c.relname AS name, pg_get_viewdef(c.oid) AS def, c.reloptions::text[] AS options,
       obj_description(c.oid, 'pg_class') AS comment
FROM pg_class c WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'v' AND c.relname = ANY(%(views)s)
ORDER BY c.relname"""
_TABLE_COMMENTS = """SELECT c.relname AS "table", obj_description(c.oid, 'pg_class') AS comment FROM pg_class c
WHERE c.relnamespace = current_schema()::regnamespace AND c.relname = ANY(%(tables)s) AND c.relkind = 'r'"""

_CATALOG = {"columns": _COLUMNS, "constraints": _CONSTRAINTS, "indexes": _INDEXES, "triggers": _TRIGGERS,
            "functions": _FUNCTIONS, "views": _VIEWS, "comments": _TABLE_COMMENTS}


def catalog(conn: psycopg.Connection) -> dict[str, list[dict[str, Any]]]:
    """The shape of the three tables and of the first implementation's functions and views."""
    params = {"tables": list(TABLES), "functions": list(FUNCTIONS), "views": list(VIEWS),
              "trigger_functions": list(_TRIGGER_FUNCTIONS)}
    with conn.cursor(row_factory=dict_row) as cur:
        return {name: cur.execute(query, params).fetchall() for name, query in _CATALOG.items()}


def _ddl(text: str) -> bytes:
    """Definition text the server itself produced (pg_get_*def): executed as it is."""
    return text.encode()


def _reference(conn: psycopg.Connection, statements: list[sqlfile.Statement]) -> dict[str, list[dict[str, Any]]]:
    """The catalog of our 016 built in a scratch schema (dropped again): the exact shape to convert to."""
    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(REFERENCE)))
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(REFERENCE)))
    saved = str(_value(conn, "SELECT current_setting('search_path')"))
    conn.execute("SELECT set_config('search_path', %s, true)", [REFERENCE])
    try:
        for statement in statements:
            conn.execute(_ddl(statement.sql))
        shape = catalog(conn)
    finally:
        conn.execute("SELECT set_config('search_path', %s, true)", [saved])
    conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(REFERENCE)))
    return shape


# ------------------------------------------------------------------------------------------- conversion
def adopt(conn: psycopg.Connection, found: Found, statements: list[sqlfile.Statement],
          run_file: Callable[[str], None], *, dry_run: bool = False, source_timezone: str = "UTC") -> AdoptionReport:
    """Convert the first implementation's schema in place; the caller holds the one transaction.

    ``statements`` are our 016's; ``run_file(version)`` applies and records our 016, then (``"later"``) every
    later file, so that legacy copies are claimed with the mapping SQL of the whole schema.
    """
    report = AdoptionReport(found.variant, dry_run, dict(found.rows))
    for table in TABLES:
        conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(table)))
    found_shape = catalog(conn)
    target = _reference(conn, statements)
    _create_bookkeeping(conn)
    report.replaced = _drop_first_implementation(conn, found_shape)
    report.set_aside = _set_aside(conn)
    report.filled = _fill_nulls(conn, found_shape, target)
    _tighten(conn, found_shape, target)
    run_file("016")
    _fix_memories(conn, report)
    run_file("later")
    report.claimed = claim(conn, source_timezone)
    report.application_rows = _scalar_int(conn, "SELECT count(*) FROM memories WHERE source_table IS NULL")
    conn.execute("ANALYZE memories")
    conn.execute(sql.SQL("UPDATE {} i SET version_after = m.version FROM memories m "
                         "WHERE i.table_name = 'memories' AND m.id = i.current_id").format(sql.Identifier(IMAGES)))
    conn.execute(sql.SQL("INSERT INTO {} (variant, found_shape, report) VALUES (%s, %s, %s)").format(
        sql.Identifier(ADOPTION)), [found.variant, Jsonb(found_shape), Jsonb(report.to_dict())])
    return report


def _scalar_int(conn: psycopg.Connection, query: str) -> int:
    return int(_value(conn, query) or 0)


_BOOKKEEPING = (
    (ADOPTION, "CREATE TABLE IF NOT EXISTS {} (adopted_at TIMESTAMPTZ NOT NULL DEFAULT now(), variant TEXT NOT NULL, "
               "found_shape JSONB NOT NULL, report JSONB NOT NULL)"),
    (ASIDE, "CREATE TABLE IF NOT EXISTS {} (table_name TEXT NOT NULL, row_id UUID NOT NULL, reason TEXT NOT NULL, "
            "row_image JSONB NOT NULL, set_aside_at TIMESTAMPTZ NOT NULL DEFAULT now(), "
            "PRIMARY KEY (table_name, row_id))"),
    (IMAGES, "CREATE TABLE IF NOT EXISTS {} (table_name TEXT NOT NULL, row_id UUID NOT NULL, current_id UUID NOT NULL, "
             "image JSONB NOT NULL, version_after INTEGER, PRIMARY KEY (table_name, row_id))"),
)


def _create_bookkeeping(conn: psycopg.Connection) -> None:
    """The adoption record, the rows kept aside, and the previous images of changed rows (no access but ours)."""
    for name, statement in _BOOKKEEPING:
        conn.execute(sql.SQL(statement).format(sql.Identifier(name)))
        conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(
            sql.Identifier(name), sql.Literal(f"unified-memory adoption of a first-implementation 016: {name}")))
        conn.execute(sql.SQL("REVOKE ALL ON {} FROM PUBLIC").format(sql.Identifier(name)))


def _drop_first_implementation(conn: psycopg.Connection, shape: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Its views, triggers, functions, indexes and constraints (primary keys stay); names returned."""
    dropped = []
    for view in shape["views"]:
        conn.execute(sql.SQL("DROP VIEW {}").format(sql.Identifier(view["name"])))
        dropped.append(f"view {view['name']}")
    for trigger in shape["triggers"]:
        conn.execute(sql.SQL("DROP TRIGGER {} ON {}").format(sql.Identifier(trigger["name"]),
                                                            sql.Identifier(trigger["table"])))
        dropped.append(f"trigger {trigger['name']}")
    for function in shape["functions"]:
        conn.execute(b"DROP FUNCTION " + _ddl(function["signature"]))
        dropped.append(f"function {function['signature']}")
    for index in shape["indexes"]:
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(index["name"])))
        dropped.append(f"index {index['name']}")
    for constraint in shape["constraints"]:
        if constraint["type"] != "p":
            conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                sql.Identifier(constraint["table"]), sql.Identifier(constraint["name"])))
            dropped.append(f"constraint {constraint['name']}")
    return dropped


# ------------------------------------------------------------------------------------------- rows kept aside
def _in(column: str, values: tuple[str, ...]) -> sql.Composed:
    return sql.SQL("{c} IS NOT NULL AND {c} NOT IN ({v})").format(
        c=sql.Identifier(column), v=sql.SQL(", ").join(sql.Literal(v) for v in values))


def _aside_rules() -> dict[str, list[tuple[str, sql.Composable]]]:
    """Per table, (reason, condition): rows that cannot meet our constraints, first match wins."""
    not_array = "jsonb_typeof({0}) NOT IN ('array', 'null')"
    return {
        "memories": [
            ("empty_text", sql.SQL("text IS NULL OR btrim(text) = ''")),
            ("blank_user_id", sql.SQL("user_id IS NULL OR btrim(user_id) = ''")),
            ("importance_range", sql.SQL("importance NOT BETWEEN 1 AND 10")),
            ("decay_tier_vocabulary", _in("decay_tier", ("short", "medium", "long", "pinned"))),
            ("ui_source_vocabulary", _in("ui_source", UI_SOURCES.allowed)),
            ("memory_type_vocabulary", _in("memory_type", MEMORY_TYPES.allowed)),
            ("neuro_type_vocabulary", _in("neuro_type", NEURO_TYPES.allowed)),
            ("tags_not_array", sql.SQL(not_array.format("tags"))),
            ("meta_not_object", sql.SQL("jsonb_typeof(meta) NOT IN ('object', 'null')")),
            ("source_memories_not_array", sql.SQL(not_array.format("source_memories"))),
            ("derived_memories_not_array", sql.SQL(not_array.format("derived_memories"))),
            ("decay_lambda_range", sql.SQL("decay_lambda NOT BETWEEN 0 AND 1")),
            ("importance_decay_range", sql.SQL("importance_decay NOT BETWEEN 0 AND 1")),
            ("access_count_negative", sql.SQL("access_count < 0")),
            ("reflection_count_negative", sql.SQL("reflection_count < 0")),
        ],
        "memory_relationships": [
            ("memory_set_aside", sql.SQL("EXISTS (SELECT 1 FROM {} a WHERE a.table_name = 'memories' "
                                         "AND a.row_id IN (x.source_memory_id, x.derived_memory_id))").format(
                sql.Identifier(ASIDE))),
            ("relationship_type_vocabulary", _in("relationship_type", (
                "reflection", "consolidation", "pattern", "decay_promotion", "semantic_link"))),
            ("confidence_range", sql.SQL("confidence_score NOT BETWEEN 0 AND 1")),
            ("self_reference", sql.SQL("source_memory_id = derived_memory_id")),
        ],
        "memory_access_log": [
            ("blank_user_id", sql.SQL("user_id IS NULL")),
            ("access_type_vocabulary", sql.SQL("access_type IS NULL OR access_type NOT IN "
                                               "('read', 'write', 'update', 'delete', 'search')")),
        ],
    }


def _set_aside(conn: psycopg.Connection) -> dict[str, int]:
    """Move rows that cannot meet our constraints, whole, to the aside table with their reason."""
    counts: dict[str, int] = {}
    for table, rules in _aside_rules().items():
        reason = sql.SQL("CASE {} END").format(sql.SQL(" ").join(
            sql.SQL("WHEN {} THEN {}").format(cond, sql.Literal(name)) for name, cond in rules))
        rows = conn.execute(sql.SQL(
            "INSERT INTO {aside} (table_name, row_id, reason, row_image) "
            "SELECT {t}, x.id, r.reason, to_jsonb(x) FROM {table} x CROSS JOIN LATERAL (SELECT {reason} AS reason) r "
            "WHERE r.reason IS NOT NULL RETURNING reason").format(
            aside=sql.Identifier(ASIDE), t=sql.Literal(table), table=sql.Identifier(table), reason=reason)).fetchall()
        for (name,) in rows:
            counts[f"{table}: {name}"] = counts.get(f"{table}: {name}", 0) + 1
    for table in ("memory_relationships", "memory_access_log", "memories"):
        conn.execute(sql.SQL(
            "DELETE FROM {table} WHERE id IN (SELECT row_id FROM {aside} WHERE table_name = {t})").format(
            table=sql.Identifier(table), aside=sql.Identifier(ASIDE), t=sql.Literal(table)))
    return counts


# ------------------------------------------------------------------------------------------- NULLs and shape
def _by_column(shape: dict[str, list[dict[str, Any]]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(c["table"], c["column"]): c for c in shape["columns"]}


def _fill_nulls(conn: psycopg.Connection, found: dict[str, list[dict[str, Any]]],
                target: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
    """NULLs (and JSON nulls) of columns that become NOT NULL get our default; the rows' images are kept."""
    have = _by_column(found)
    filled: dict[str, int] = {}
    for table in TABLES:
        cols = [c for c in target["columns"] if c["table"] == table and c["notnull"] and c["default"]
                and (table, c["column"]) in have and not have[(table, c["column"])]["notnull"]]
        if not cols:
            continue
        conds = {c["column"]: _null(c) for c in cols}
        with conn.cursor(row_factory=dict_row) as cur:
            counted = cur.execute(sql.SQL("SELECT {} FROM {}").format(
                sql.SQL(", ").join(sql.SQL("count(*) FILTER (WHERE {}) AS {}").format(cond, sql.Identifier(name))
                                   for name, cond in conds.items()),
                sql.Identifier(table))).fetchone()
        assert counted is not None
        filled.update({f"{table}.{name}": int(n) for name, n in counted.items() if n})
        any_null = sql.SQL(" OR ").join(conds.values())
        _save_images(conn, table, any_null)
        conn.execute(sql.SQL("UPDATE {} SET {} WHERE {}").format(
            sql.Identifier(table),
            sql.SQL(", ").join(sql.SQL("{c} = CASE WHEN {cond} THEN {d} ELSE {c} END").format(
                c=sql.Identifier(c["column"]), cond=conds[c["column"]], d=sql.SQL(c["default"])) for c in cols),
            any_null))
    return filled


def _null(column: dict[str, Any]) -> sql.Composed:
    if column["type"] == "jsonb":
        return sql.SQL("({c} IS NULL OR {c} = 'null'::jsonb)").format(c=sql.Identifier(column["column"]))
    return sql.SQL("{} IS NULL").format(sql.Identifier(column["column"]))


def _save_images(conn: psycopg.Connection, table: str, where: sql.Composable) -> None:
    conn.execute(sql.SQL("INSERT INTO {images} (table_name, row_id, current_id, image) "
                         "SELECT {t}, x.id, x.id, to_jsonb(x) FROM {table} x WHERE {where} "
                         "ON CONFLICT DO NOTHING").format(
        images=sql.Identifier(IMAGES), t=sql.Literal(table), table=sql.Identifier(table), where=where))


def _tighten(conn: psycopg.Connection, found: dict[str, list[dict[str, Any]]],
             target: dict[str, list[dict[str, Any]]]) -> None:
    """Columns, defaults, nullability and constraints exactly as our 016 creates them; 016's table comments."""
    _alter_columns(conn, _by_column(found), target["columns"])
    has_pk = {c["table"] for c in found["constraints"] if c["type"] == "p"}
    for constraint in target["constraints"]:
        if constraint["type"] == "p" and constraint["table"] in has_pk:
            continue
        conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} ").format(
            sql.Identifier(constraint["table"]), sql.Identifier(constraint["name"])) + sql.SQL(constraint["def"]))
    for row in target["comments"]:
        conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(sql.Identifier(row["table"]),
                                                                sql.Literal(row["comment"])))


def _alter_columns(conn: psycopg.Connection, have: dict[tuple[str, str], dict[str, Any]],
                   want: list[dict[str, Any]], *, drop_extra: bool = False) -> None:
    """One ALTER TABLE per table turning the columns ``have`` into ``want`` (types, defaults, NOT NULL)."""
    for table in TABLES:
        actions: list[sql.Composable] = []
        wanted = [c for c in want if c["table"] == table]
        for col in wanted:
            name, now = sql.Identifier(col["column"]), have.get((table, col["column"]))
            if now is None:
                actions.append(sql.SQL("ADD COLUMN {} {}{}{}").format(
                    name, sql.SQL(col["type"]), sql.SQL(" DEFAULT " + col["default"] if col["default"] else ""),
                    sql.SQL(" NOT NULL" if col["notnull"] else "")))
                continue
            if now["type"] != col["type"]:
                actions.append(sql.SQL("ALTER COLUMN {n} TYPE {t} USING {n}::{t}").format(
                    n=name, t=sql.SQL(col["type"])))
            if now["default"] != col["default"]:
                actions.append(sql.SQL("ALTER COLUMN {} SET DEFAULT {}").format(name, sql.SQL(col["default"]))
                               if col["default"] else sql.SQL("ALTER COLUMN {} DROP DEFAULT").format(name))
            if col["notnull"] != now["notnull"]:
                actions.append(sql.SQL("ALTER COLUMN {} {} NOT NULL").format(
                    name, sql.SQL("SET" if col["notnull"] else "DROP")))
        if drop_extra:
            names = {c["column"] for c in wanted}
            actions += [sql.SQL("DROP COLUMN {}").format(sql.Identifier(c)) for (t, c) in have
                        if t == table and c not in names]
        if actions:
            conn.execute(sql.SQL("ALTER TABLE {} ").format(sql.Identifier(table)) + sql.SQL(", ").join(actions))


def _fix_memories(conn: psycopg.Connection, report: AdoptionReport) -> None:
    """What our insert trigger would have set: decay_lambda by neuro_type, expiry by tier (pinned never)."""
    wrong = sql.SQL("decay_lambda IS NULL OR (decay_tier = 'pinned') <> (expires_at IS NULL)")
    _save_images(conn, "memories", wrong)
    _update_trigger(conn, "DISABLE")
    rows = conn.execute(sql.SQL(
        "UPDATE memories SET decay_lambda = coalesce(decay_lambda, default_decay_lambda(neuro_type)), "
        "expires_at = CASE WHEN decay_tier = 'pinned' THEN NULL "
        "ELSE coalesce(expires_at, calculate_expires_at(decay_tier, created_at)) END WHERE {}").format(wrong)).rowcount
    _update_trigger(conn, "ENABLE")
    if rows:
        report.filled["memories.decay_lambda/expires_at"] = rows


def _update_trigger(conn: psycopg.Connection, action: Literal["DISABLE", "ENABLE"]) -> None:
    """Our update trigger on memories, found by its function: 016 names it memories_before_update, 025
    update_memories_updated_at (the first implementation's name)."""
    name = _value(conn, "SELECT tgname FROM pg_trigger WHERE tgrelid = 'memories'::regclass "
                        "AND tgfoid = 'memories_before_update()'::regprocedure AND NOT tgisinternal")
    if name is None:
        raise ShapeError("memories has no update trigger executing memories_before_update()")
    conn.execute(sql.SQL("ALTER TABLE memories {} TRIGGER {}").format(sql.SQL(action), sql.Identifier(name)))


# ------------------------------------------------------------------------------------------- legacy copies
def claim(conn: psycopg.Connection, source_timezone: str = "UTC") -> dict[str, int]:
    """Rows that are the first migration's copies of legacy rows become that row's migration.

    A copy of a keyed legacy row has the row's id and its text; a long_term_memory item was copied with a random
    id, so its copy is paired by owner and text (and takes the item's id). The mapped columns, expiry and
    provenance are set exactly as our migration sets them, so the migration counts the row and never copies it
    again; the copy's previous image is kept for ``schema down``.
    """
    claimed: dict[str, int] = {}
    _update_trigger(conn, "DISABLE")
    for table in PRECEDENCE:
        try:
            found = detect_shape(conn, table)
        except ShapeError:
            continue
        if found is None:
            continue
        m = mapping_for(table, found.shape)
        query = _claim_items(m) if m.expands else _claim_rows(m)
        with conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(query, {"tz": source_timezone}).fetchone()
        claimed[table] = int(row["claimed"]) if row else 0
    _update_trigger(conn, "ENABLE")
    return claimed


def _claim_parts(m: TableMapping) -> dict[str, sql.Composable]:
    columns = m.column_sql()
    return {
        "exprs": sql.SQL(", ").join(sql.SQL("{} AS {}").format(sql.SQL(e), sql.Identifier(n)) for n, e in columns),
        "targets": sql.SQL(", ").join(sql.Identifier(n) for n, _ in columns),
        "values": sql.SQL(", ").join(sql.SQL("hit.{}").format(sql.Identifier(n)) for n, _ in columns),
        "key": sql.SQL(m.key), "reason": sql.SQL(m.reason_sql()), "t": sql.Literal(m.table),
        "embedding": sql.SQL(m.embedding or "NULL::real[]"), "images": sql.Identifier(IMAGES),
    }


def _claim_tail(m: TableMapping) -> sql.Composed:
    return sql.SQL(_CLAIM_TAIL).format(**_claim_parts(m))


_CLAIM_TAIL = """,
img AS (
    INSERT INTO {images} (table_name, row_id, current_id, image)
    SELECT 'memories', t.id, hit.id, to_jsonb(t) FROM memories t JOIN hit ON t.id = hit.old_id
    ON CONFLICT (table_name, row_id) DO UPDATE SET current_id = EXCLUDED.current_id
    RETURNING 1
),
vec AS (
    INSERT INTO memory_legacy_embeddings (memory_id, source, dimension, embedding)
    SELECT hit.id, {t}, cardinality(hit.embedding), hit.embedding FROM hit WHERE hit.embedding IS NOT NULL
    ON CONFLICT DO NOTHING RETURNING 1
),
log AS (
    UPDATE memory_access_log l SET memory_id = hit.id FROM hit WHERE l.memory_id = hit.old_id AND hit.id <> hit.old_id
    RETURNING 1
),
upd AS (
    UPDATE memories t SET ({targets}, expires_at, version, source_table, source_key, migrated_at)
        = ({values}, calculate_expires_at(hit.decay_tier, now()), 1, {t}, hit.source_key, now())
    FROM hit WHERE t.id = hit.old_id
    RETURNING 1
)
SELECT (SELECT count(*) FROM upd) AS claimed, (SELECT count(*) FROM img) AS images,
       (SELECT count(*) FROM vec) AS vectors, (SELECT count(*) FROM log) AS log_rows"""


def _claim_rows(m: TableMapping) -> sql.Composed:
    return sql.SQL("""WITH mapped AS (
    SELECT {key} AS source_key, {reason} AS reason, {embedding} AS embedding, {exprs} FROM {table} s{lets}
),
hit AS (
    SELECT mp.*, t.id AS old_id FROM mapped mp JOIN memories t ON t.id = mp.id AND t.text = mp.text
    WHERE mp.reason IS NULL AND t.source_table IS NULL
      AND NOT EXISTS (SELECT 1 FROM memories y WHERE y.source_table = {t} AND y.source_key = mp.source_key)
)""").format(table=sql.Identifier(m.table), lets=sql.SQL(m.lets_join()), **_claim_parts(m)) + _claim_tail(m)


def _claim_items(m: TableMapping) -> sql.Composed:
    prelude, source = mapped_source(m)
    return sql.SQL("""WITH {prelude}
mapped AS (
    SELECT {key} AS source_key, {reason} AS reason, {embedding} AS embedding, {exprs} {source}
),
items AS (
    SELECT mp.*, row_number() OVER (PARTITION BY mp.user_id, mp.text ORDER BY mp.source_key) AS n FROM mapped mp
    WHERE mp.reason IS NULL
      AND NOT EXISTS (SELECT 1 FROM memories y WHERE y.source_table = {t} AND y.source_key = mp.source_key)
      AND NOT EXISTS (SELECT 1 FROM memories z WHERE z.id = mp.id)
),
copies AS (
    SELECT t.id AS old_id, t.user_id, t.text,
           row_number() OVER (PARTITION BY t.user_id, t.text ORDER BY t.created_at, t.id) AS n
    FROM memories t
    WHERE t.source_table IS NULL
      AND NOT EXISTS (SELECT 1 FROM memory_relationships r WHERE t.id IN (r.source_memory_id, r.derived_memory_id))
),
hit AS (
    SELECT i.*, c.old_id FROM items i JOIN copies c ON c.user_id = i.user_id AND c.text = i.text AND c.n = i.n
)""").format(prelude=prelude, source=source, **_claim_parts(m)) + _claim_tail(m)


# ------------------------------------------------------------------------------------------- undo
# our triggers under 016's names and (when 025 was not undone first) under the first implementation's
_OURS_TRIGGERS = ("memories_before_insert", "memories_before_update", "set_memory_defaults_trigger",
                  "update_memories_updated_at")
# 016's names of the indexes 025 renames (contract.INDEXES has the names after 025)
_OURS_016_INDEXES = ("idx_memories_user_org", "idx_memories_created_at", "idx_memories_updated_at",
                     "idx_memories_expires_at", "idx_memories_deleted_at", "idx_memories_tier_expires",
                     "idx_memories_importance_created", "idx_memories_embedding_id", "idx_memories_session_created",
                     "idx_memories_conversation_created", "idx_memories_ui_source_created",
                     "idx_memories_memory_type_created", "idx_memories_neuro_type_created",
                     "idx_memories_access_count_last", "idx_memories_user_org_type_created",
                     "idx_memories_user_org_importance_created", "idx_memory_access_log_type_time",
                     "idx_memory_access_log_time")
_OURS_FUNCTIONS = ("memories_before_update()", "memories_before_insert()",
                   "soft_delete_memory(uuid, varchar, varchar, varchar)",
                   "create_memory_relationship(uuid, uuid, varchar, real, jsonb)",
                   "update_memory_access(uuid, varchar, varchar, varchar, varchar, inet, text, text, integer, text, "
                   "integer, integer)",
                   "calculate_decay_score(timestamptz, text, integer, integer)",
                   "calculate_expires_at(text, timestamptz)", "default_decay_lambda(text)")
_OURS_POLICIES = (("memories_tenant_isolation", "memories"),
                  ("memory_access_log_tenant_isolation", "memory_access_log"))


def revert(conn: psycopg.Connection) -> RevertReport:
    """Undo the adoption in the caller's transaction: the shape found comes back, with every row."""
    found: dict[str, list[dict[str, Any]]] = _value(conn, sql.SQL("SELECT found_shape FROM {}").format(
        sql.Identifier(ADOPTION)))
    assert found is not None
    report = RevertReport()
    for table in TABLES:
        conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(table)))
    _drop_ours(conn)
    now_shape = catalog(conn)
    for constraint in now_shape["constraints"]:
        if constraint["type"] != "p":
            conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                sql.Identifier(constraint["table"]), sql.Identifier(constraint["name"])))
    _alter_columns(conn, _by_column(now_shape), found["columns"], drop_extra=True)
    _restore_rows(conn, report)
    _restore_objects(conn, found, report)
    for name in (ADOPTION, IMAGES):
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
    if not _count(conn, ASIDE):
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(ASIDE)))
    return report


def _drop_ours(conn: psycopg.Connection) -> None:
    for view in VIEWS:
        conn.execute(sql.SQL("DROP VIEW IF EXISTS {}").format(sql.Identifier(view)))
    for trigger in _OURS_TRIGGERS:
        conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON memories").format(sql.Identifier(trigger)))
    for signature in _OURS_FUNCTIONS:
        conn.execute(b"DROP FUNCTION IF EXISTS " + signature.encode())
    for policy, table in _OURS_POLICIES:
        conn.execute(sql.SQL("DROP POLICY IF EXISTS {} ON {}").format(sql.Identifier(policy), sql.Identifier(table)))
        conn.execute(sql.SQL("ALTER TABLE {} NO FORCE ROW LEVEL SECURITY, DISABLE ROW LEVEL SECURITY").format(
            sql.Identifier(table)))
    for index in (*contract.INDEXES, *_OURS_016_INDEXES):
        conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(index)))


def _restore_rows(conn: psycopg.Connection, report: RevertReport) -> None:
    """Previous images of the rows the adoption changed (unless changed since), then the rows set aside."""
    images, aside = sql.Identifier(IMAGES), sql.Identifier(ASIDE)
    kept = conn.execute(sql.SQL(
        "DELETE FROM {} i USING memories m WHERE i.table_name = 'memories' "
        "AND m.id = i.current_id AND m.version IS DISTINCT FROM i.version_after").format(images))
    report.rows_kept_changed = kept.rowcount
    for table in TABLES:
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in table_columns(conn, table))
        ident = sql.Identifier(table)
        if table == "memories":
            conn.execute(sql.SQL("UPDATE memory_access_log l SET memory_id = i.row_id FROM {} i "
                                 "WHERE i.table_name = 'memories' AND l.memory_id = i.current_id "
                                 "AND i.current_id <> i.row_id").format(images))
        restored = conn.execute(sql.SQL(
            "UPDATE {t} x SET ({cols}) = (SELECT {cols} FROM jsonb_populate_record(NULL::{t}, i.image)) "
            "FROM {images} i WHERE i.table_name = {name} AND x.id = i.current_id").format(
            t=ident, cols=cols, images=images, name=sql.Literal(table))).rowcount
        inserted = conn.execute(sql.SQL(
            "WITH back AS (INSERT INTO {t} SELECT r.* FROM {aside} a, jsonb_populate_record(NULL::{t}, a.row_image) r "
            "WHERE a.table_name = {name} ON CONFLICT DO NOTHING RETURNING id) "
            "DELETE FROM {aside} a USING back WHERE a.table_name = {name} AND a.row_id = back.id").format(
            t=ident, aside=aside, name=sql.Literal(table))).rowcount
        report.rows_restored[table] = restored + inserted


def _restore_objects(conn: psycopg.Connection, found: dict[str, list[dict[str, Any]]], report: RevertReport) -> None:
    for constraint in found["constraints"]:
        if constraint["type"] == "p":
            continue
        add = sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} ").format(
            sql.Identifier(constraint["table"]), sql.Identifier(constraint["name"])) + sql.SQL(constraint["def"])
        try:
            with conn.transaction():
                conn.execute(add)
        except (psycopg.errors.CheckViolation, psycopg.errors.ForeignKeyViolation):
            conn.execute(add + sql.SQL(" NOT VALID"))  # rows written since break it: kept, and said so
            report.constraints_not_valid.append(constraint["name"])
    for index in found["indexes"]:
        conn.execute(_ddl(index["def"]))
    for function in found["functions"]:
        conn.execute(_ddl(function["def"]))
        if function["comment"]:
            conn.execute(b"COMMENT ON FUNCTION " + _ddl(function["signature"]) + b" IS "
                         + sql.Literal(function["comment"]).as_bytes(conn))
    for trigger in found["triggers"]:
        conn.execute(_ddl(trigger["def"]))
    for view in found["views"]:
        options = sql.SQL(" WITH ({})").format(sql.SQL(", ").join(sql.SQL(o) for o in view["options"])) \
            if view["options"] else sql.SQL("")
        conn.execute(sql.SQL("CREATE VIEW {}{} AS ").format(sql.Identifier(view["name"]), options)
                     + sql.SQL(view["def"]))
        if view["comment"]:
            conn.execute(sql.SQL("COMMENT ON VIEW {} IS {}").format(sql.Identifier(view["name"]),
                                                                  sql.Literal(view["comment"])))
    for row in found["comments"]:
        conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(sql.Identifier(row["table"]),
                                                                sql.Literal(row["comment"])))

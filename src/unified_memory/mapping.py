"""The legacy-to-unified mapping, as data: one ``TableMapping`` per (legacy table, shape).

Each reads like the guide's mapping table: target column <- source expression, with the defaults for
neuro_type / decay_tier / importance and the normalisation rules. The same objects drive the migration SQL,
the dry-run plan and the validator's reconciliation. Expressions are SQL over the source row ``s``; they are
constants of this module, never built from input. Originals that were normalised, or that have no column of
their own, are kept in ``meta.legacy``. Decisions where the guide is silent are in the README's mapping section.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .sources import ItemSource, RowSource, Source

# ------------------------------------------------------------------------------------- vocabularies


@dataclass(frozen=True)
class Vocabulary:
    """A CHECK list of the unified schema, with the synonyms legacy data uses and a fallback."""

    allowed: tuple[str, ...]
    synonyms: dict[str, str]
    fallback: str

    def normalise(self, expr: str, default: str) -> str:
        """SQL: ``expr`` lower-cased into the vocabulary; NULL gives ``default``, the unknown ``fallback``."""
        clean = f"lower(btrim(({expr})::text))"
        whens = " ".join(f"WHEN {_lit(k)} THEN {_lit(v)}" for k, v in self.synonyms.items())
        allowed = ", ".join(_lit(a) for a in self.allowed)
        return (f"(CASE WHEN ({expr}) IS NULL THEN {_lit(default)} WHEN {clean} IN ({allowed}) THEN {clean} "
                f"ELSE (CASE {clean} {whens} ELSE {_lit(self.fallback)} END) END)")


MEMORY_TYPES = Vocabulary(
    ("general", "fact", "preference", "context", "conversation", "insight", "episodic", "semantic", "procedural"),
    {"task": "procedural", "todo": "procedural", "how_to": "procedural", "profile": "fact", "doc_chunk": "semantic",
     "document": "semantic", "knowledge": "semantic", "note": "general", "chat": "conversation",
     "message": "conversation", "reflection": "insight", "event": "episodic"},
    "general",
)
NEURO_TYPES = Vocabulary(
    ("episodic", "semantic", "procedural", "general", "fact", "preference", "context", "conversation", "insight"),
    {"task": "procedural", "skill": "procedural", "knowledge": "semantic", "event": "episodic"},
    "general",
)
UI_SOURCES = Vocabulary(
    ("web", "streamlit", "desktop", "api", "ag_ui", "copilot"),
    {"legacy": "api", "webui": "web", "web_ui": "web", "ag-ui": "ag_ui", "agui": "ag_ui", "cli": "api",
     "electron": "desktop", "tauri": "desktop", "copilotkit": "copilot"},
    "api",
)

# owner rules: scope 'user:<id>' names the user; 'global' is the reserved tenant below; anything else
# (convo:<id>, NULL) names no owner and, without a real user_id column, the row is quarantined.
GLOBAL_OWNER = "system:global"

# -------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Column:
    """How one column of ``memories`` is filled from the source row."""

    expr: str
    vocab: Vocabulary | None = None
    default: str | None = None
    clamp: tuple[int, int] | None = None
    keep_as: str | None = None  # meta.legacy key for the original value when it was changed
    transform: str | None = None  # SQL template over the original, ``{x}``

    def sql(self) -> str:
        if self.transform is not None:
            return "(" + self.transform.format(x=f"({self.expr})") + ")"
        if self.vocab is not None:
            return self.vocab.normalise(self.expr, self.default or self.vocab.fallback)
        if self.clamp is not None:
            low, high = self.clamp
            # greatest()/least() skip NULLs, so NULL must be caught before them
            return (f"CASE WHEN ({self.expr}) IS NULL THEN {self.default} "
                    f"ELSE least(greatest(({self.expr}), {low}), {high})::int END")
        if self.default is not None:
            return f"coalesce(({self.expr}), {self.default})"
        return f"({self.expr})"

    def kept_original(self) -> str | None:
        """SQL for the original value when normalisation changed it (else NULL), or None if not tracked."""
        if self.keep_as is None:
            return None
        return (f"CASE WHEN ({self.expr}) IS NOT NULL AND ({self.expr})::text IS DISTINCT FROM ({self.sql()})::text "
                f"THEN to_jsonb({self.expr}) END")


def fixed(value: str) -> Column:
    """A default the guide gives for every row of a table (neuro_type, decay_tier, importance)."""
    return Column(_lit(value) if not value.isdigit() else value)


def naive(column: str) -> str:
    """A TIMESTAMP without time zone, read in the source time zone (``--source-timezone``)."""
    return f"(s.{column} AT TIME ZONE %(tz)s)"


# Legacy times outside these bounds (infinity, -infinity, year 0044 or 20000) are not kept as the memory's time:
# the decay arithmetic and the tenant's views must never meet them. The original text goes to meta.legacy.
TIME_BOUNDS = ("timestamptz '1900-01-01 00:00:00+00'", "timestamptz '2200-01-01 00:00:00+00'")


def in_bounds(expr: str) -> str:
    """A legacy time inside ``TIME_BOUNDS``, else NULL (the column's default then applies)."""
    low, high = TIME_BOUNDS
    return f"CASE WHEN ({expr}) >= {low} AND ({expr}) < {high} THEN ({expr}) END"


def out_of_bounds(expr: str) -> str:
    """The original text of a legacy time outside ``TIME_BOUNDS`` (NULL when it is inside or NULL)."""
    return f"CASE WHEN ({expr}) IS NOT NULL AND ({in_bounds(expr)}) IS NULL THEN ({expr})::text END"


def json_array(expr: str) -> Column:
    """Tags as a JSON array: arrays kept, a string wrapped, anything else [] (original kept)."""
    return Column(expr, keep_as="tags", transform="CASE jsonb_typeof({x}) WHEN 'array' THEN {x} "
                                                  "WHEN 'string' THEN jsonb_build_array({x}) ELSE '[]'::jsonb END")


def importance(expr: str, default: int) -> Column:
    """Importance clamped into 1..10 (the original kept), NULL gives the table's default."""
    return Column(expr, clamp=(1, 10), default=str(default), keep_as="importance")


@dataclass(frozen=True)
class TableMapping:
    """How one legacy table in one shape becomes memories."""

    table: str
    shape: str
    source: Source  # rows of a keyed table, or items of long_term_memory: keys, predicates, statements
    columns: dict[str, Column]
    meta: str  # SQL: the source's own metadata (any JSON; made an object)
    legacy: dict[str, str] = field(default_factory=dict)  # meta.legacy key -> SQL, kept verbatim
    quarantine: tuple[tuple[str, str], ...] = ()  # (reason, SQL condition), first match wins
    size: str = "0"  # SQL: stored bytes of the row's big values, to bound a batch
    embedding: str | None = None  # SQL: a vector as real[], kept for the vectors step
    # name -> SQL over ``s``: a value several expressions share, computed once per row and read as ``lets.name``
    lets: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """SQL: the source key, text, unique per memory."""
        return self.source.key

    @property
    def order(self) -> str:
        """The keyset column (``s.id``), or ``s.ctid`` for a table without a key."""
        return self.source.order

    @property
    def order_type(self) -> str:
        return self.source.order_type

    @property
    def expands(self) -> bool:
        """One row gives several memories (long_term_memory)."""
        return self.source.expands

    @property
    def targets(self) -> list[str]:
        return list(self.columns)

    def lets_join(self) -> str:
        """SQL to follow the source in a FROM clause: the ``lets``, evaluated once per row (``OFFSET 0`` keeps
        the planner from copying them back into every expression that reads them)."""
        if not self.lets:
            return ""
        values = ", ".join(f"{expr} AS {name}" for name, expr in self.lets.items())
        return f" CROSS JOIN LATERAL (SELECT {values} OFFSET 0) lets"

    def column_sql(self) -> list[tuple[str, str]]:
        """(target, SQL) for every mapped column, meta included."""
        return [(name, col.sql()) for name, col in self.columns.items()] + [("meta", self.meta_sql())]

    def meta_object(self) -> str:
        """SQL: the source metadata when it is a JSON object, else ``{}``."""
        return f"CASE WHEN jsonb_typeof({self.meta}) = 'object' THEN {self.meta} ELSE {_EMPTY} END"

    def legacy_parts(self) -> list[tuple[str, str]]:
        """(meta.legacy key, SQL) for every original kept; a key is left out where its SQL is NULL."""
        parts = list(self.legacy.items())
        parts += [(c.keep_as, kept) for c in self.columns.values() if c.keep_as and (kept := c.kept_original())]
        parts.append(("metadata", f"CASE WHEN jsonb_typeof({self.meta}) <> 'object' THEN {self.meta} END"))
        if "created_at" in self.columns:
            parts.append(("created_at_missing", f"CASE WHEN ({self.columns['created_at'].expr}) IS NULL THEN true END"))
        parts.append(("meta_legacy", f"({self.meta}) -> 'legacy'"))
        return parts

    def meta_sql(self) -> str:
        """The source metadata as an object, plus ``legacy`` holding originals (JSON NULLs kept exactly), no
        ``legacy`` when there is none. Each value is evaluated once: the migration and validation run this on
        every row."""
        legacy = " || ".join(_entry(k, v) for k, v in self.legacy_parts())
        return f"(({self.meta_object()}) - 'legacy' || {_entry('legacy', f'nullif({legacy}, {_EMPTY})')})"

    def reason_sql(self) -> str:
        """SQL: the quarantine reason of a row (NULL when it can migrate)."""
        if not self.quarantine:
            return "NULL::text"
        return "CASE " + " ".join(f"WHEN {cond} THEN {_lit(reason)}" for reason, cond in self.quarantine) + " END"


_EMPTY = "'{}'::jsonb"


def _entry(key: str, value: str) -> str:
    """SQL: ``{key: value}``, or ``{}`` when ``value`` is SQL NULL (a JSON null is kept); ``value`` is
    evaluated once (``jsonb_set`` is strict)."""
    return f"coalesce(jsonb_set({_EMPTY}, ARRAY[{_lit(key)}], to_jsonb({value})), {_EMPTY})"


def _lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


# ------------------------------------------------------------------------------------- mappings
_BLANK = "btrim(coalesce({}, '')) = ''"
_USER_SCOPE = "CASE WHEN left(s.scope, 5) = 'user:' AND length(s.scope) > 5 THEN substr(s.scope, 6) " \
              f"WHEN s.scope = 'global' THEN {_lit(GLOBAL_OWNER)} END"
_CONVO_SCOPE = "CASE WHEN left(s.scope, 6) = 'convo:' AND substr(s.scope, 7) ~* " \
               "'^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN substr(s.scope, 7)::uuid END"
_COMMON_QUARANTINE = (("empty_text", _BLANK.format("s.content")),)
_BY_ID = RowSource("s.id::text", "s.id", "uuid")

_ITEMS_I1 = TableMapping(
    table="memory_items", shape="I1", source=_BY_ID,
    columns={
        "id": Column("s.id"),
        "user_id": Column(_USER_SCOPE),
        "org_id": Column("NULL::varchar"),
        "text": Column("s.content"),
        "memory_type": Column("s.kind", vocab=MEMORY_TYPES, default="general", keep_as="kind"),
        "created_at": Column(in_bounds(naive("created_at")), default="now()"),
        "conversation_id": Column(_CONVO_SCOPE),
        "neuro_type": fixed("semantic"),
        "decay_tier": fixed("medium"),
        "importance": fixed("5"),
    },
    meta="s.metadata",
    legacy={"scope": "s.scope", "created_at_out_of_range": out_of_bounds(naive("created_at"))},
    quarantine=_COMMON_QUARANTINE + (("missing_owner", f"({_USER_SCOPE}) IS NULL"),),
    size="octet_length(s.content) + coalesce(pg_column_size(s.metadata), 0)",
    embedding="s.embedding::real[]",
)

_I2_OWNER = f"coalesce(s.user_id::text, {_USER_SCOPE})"
_ITEMS_I2 = TableMapping(
    table="memory_items", shape="I2", source=_BY_ID,
    columns={
        **_ITEMS_I1.columns,
        "user_id": Column(_I2_OWNER),
        "org_id": Column("s.tenant_id::text"),
        "memory_type": Column("coalesce(s.memory_type, s.kind)", vocab=MEMORY_TYPES, default="general",
                              keep_as="memory_type"),
        "conversation_id": Column(f"coalesce(s.conversation_id, {_CONVO_SCOPE})"),
        "neuro_type": Column("s.neuro_type", vocab=NEURO_TYPES, default="semantic", keep_as="neuro_type"),
        "importance": importance("s.importance_score", 5),
        "access_count": Column("greatest(s.access_count, 0)", default="0"),
        "last_accessed": Column(in_bounds("s.last_accessed")),
        "session_id": Column("s.session_id"),
        "ui_source": Column("s.ui_source", vocab=UI_SOURCES, default="api", keep_as="ui_source"),
        "ai_generated": Column("s.ai_generated", default="false"),
        "user_confirmed": Column("s.user_confirmed", default="true"),
        "tags": json_array("s.tags"),
        "reflection_count": Column("greatest(s.reflection_count, 0)", default="0"),
        "importance_decay": Column("CASE WHEN s.importance_decay IS NOT NULL "
                                   "THEN least(greatest(s.importance_decay, 0), 1) END", default="1.0"),
    },
    meta="s.metadata",
    legacy={"scope": "s.scope", "kind": "s.kind", "created_at_out_of_range": out_of_bounds(naive("created_at")),
            "last_accessed_out_of_range": out_of_bounds("s.last_accessed")},
    quarantine=_COMMON_QUARANTINE + (("missing_owner", f"({_I2_OWNER}) IS NULL"),),
    size=_ITEMS_I1.size,
    embedding="s.embedding::real[]",
)

_I3_OWNER = f"coalesce(nullif(btrim(s.user_id), ''), {_USER_SCOPE})"
_UUID_TEXT = "'^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'"
_ITEMS_I3 = TableMapping(
    table="memory_items", shape="I3", source=RowSource("s.memory_id", "s.memory_id", "text"),
    columns={
        "id": Column(f"CASE WHEN s.memory_id ~ {_UUID_TEXT} THEN s.memory_id::uuid "
                     "ELSE memory_migration_uuid('memory_items:' || s.memory_id) END"),
        "user_id": Column(_I3_OWNER),
        "org_id": Column("s.tenant_id"),
        "text": Column("s.content"),
        "memory_type": Column("s.kind", vocab=MEMORY_TYPES, default="general", keep_as="kind"),
        "created_at": Column(in_bounds(naive("created_at")), default="now()"),
        "conversation_id": Column(_CONVO_SCOPE),
        "neuro_type": fixed("semantic"),
        "decay_tier": fixed("medium"),
        "importance": fixed("5"),
    },
    meta="s.metadata",
    legacy={"memory_id": "s.memory_id", "scope": "s.scope", "source": "s.source",
            "created_at_out_of_range": out_of_bounds(naive("created_at")),
            "updated_at": naive("updated_at"), "expires_at": naive("expires_at")},
    quarantine=_COMMON_QUARANTINE + (("missing_owner", f"({_I3_OWNER}) IS NULL"),),
    size=_ITEMS_I1.size,
    embedding="s.embeddings::real[]",
)

_ENTRIES_E1 = TableMapping(
    table="memory_entries", shape="E1", source=_BY_ID,
    columns={
        "id": Column("s.id"),
        "user_id": Column("s.user_id::text"),
        "org_id": Column("NULL::varchar"),  # E1 has no tenant_id, whatever the guide says
        "text": Column("s.content"),
        "importance": importance("s.importance_score", 5),
        "memory_type": Column("s.memory_type", vocab=MEMORY_TYPES, default="general", keep_as="memory_type"),
        "ui_source": Column("s.ui_source", vocab=UI_SOURCES, default="api", keep_as="ui_source"),
        "tags": Column("to_jsonb(s.tags)", default="'[]'::jsonb"),
        "session_id": Column("s.session_id"),
        "conversation_id": Column("s.conversation_id"),
        "access_count": Column("greatest(s.access_count, 0)", default="0"),
        "last_accessed": Column(in_bounds(naive("last_accessed"))),
        "ai_generated": Column("s.ai_generated", default="false"),
        "user_confirmed": Column("s.user_confirmed", default="true"),
        "created_at": Column(in_bounds(naive("created_at")), default="now()"),
        "neuro_type": fixed("episodic"),
        "decay_tier": fixed("short"),
    },
    meta="s.memory_metadata",
    legacy={"created_at_out_of_range": out_of_bounds(naive("created_at")),
            "last_accessed_out_of_range": out_of_bounds(naive("last_accessed")),
            "vector_id": "s.vector_id", "embedding_id": "s.embedding_id", "query": "s.query", "result": "s.result",
            "ttl": naive("ttl"), "timestamp": "s.timestamp", "updated_at": naive("updated_at")},
    quarantine=_COMMON_QUARANTINE,
    size="octet_length(s.content) + coalesce(pg_column_size(s.memory_metadata), 0) "
         "+ coalesce(pg_column_size(s.result), 0) + coalesce(octet_length(s.query), 0)",
)


def _web_ui(table: str, shape: str) -> TableMapping:
    return TableMapping(
        table=table, shape=shape, source=_BY_ID,
        columns={
            "id": Column("s.id"),
            "user_id": Column("s.user_id::text"),
            "org_id": Column("s.tenant_id"),
            "text": Column("s.content"),
            "memory_type": Column("s.memory_type", vocab=MEMORY_TYPES, default="general", keep_as="memory_type"),
            "ui_source": Column("s.ui_source", vocab=UI_SOURCES, default="api", keep_as="ui_source"),
            "tags": json_array("s.tags"),
            "session_id": Column("s.session_id"),
            "ai_generated": Column("s.ai_generated", default="false"),
            "created_at": Column(in_bounds("s.created_at"), default="now()"),
            "neuro_type": fixed("episodic"),
            "decay_tier": fixed("short"),
        },
        meta="s.metadata",
        legacy={"created_at_out_of_range": out_of_bounds("s.created_at")},
        quarantine=_COMMON_QUARANTINE + (("missing_owner", "s.user_id IS NULL"),),
        size="octet_length(s.content) + coalesce(pg_column_size(s.metadata), 0) + pg_column_size(s.tags)",
    )


# long_term_memory: the source rows ``s`` are the items of a row's memory_json (``ItemSource``).
_ITEMS = ItemSource()
_LT_TEXT = "CASE jsonb_typeof(s.item) WHEN 'string' THEN s.item #>> '{}' ELSE s.item ->> 'content' END"
_LT_TIME = "lets.item_time"  # parsed once per item: a PL/pgSQL call with an exception block before 16
_LT_IMPORTANCE = ("CASE WHEN jsonb_typeof({x}) = 'number' "
                  "THEN least(greatest(round(({x})::text::numeric), 1), 10)::int ELSE 6 END")
_LONG_TERM = TableMapping(
    table="long_term_memory", shape="L1", source=_ITEMS,
    columns={
        "id": Column(f"memory_migration_uuid('long_term_memory:' || {_ITEMS.key})"),
        "user_id": Column("s.user_id"),
        "text": Column(_LT_TEXT),
        "tags": json_array("(s.item -> 'tags')"),
        "importance": Column("s.item -> 'importance'", transform=_LT_IMPORTANCE, keep_as="importance"),
        "memory_type": Column("s.item ->> 'type'", vocab=MEMORY_TYPES, default="general", keep_as="type"),
        "created_at": Column(in_bounds(_LT_TIME), default="now()"),
        "neuro_type": fixed("semantic"),
        "decay_tier": fixed("long"),
    },
    meta="(CASE WHEN jsonb_typeof(s.item) = 'object' THEN s.item -> 'metadata' END)",
    legacy={"row": "s.row_key", "item_index": "s.item_index",
            "item": "CASE WHEN jsonb_typeof(s.item) = 'object' THEN s.item - 'content' - 'tags' - 'metadata' END",
            "created_at": "CASE WHEN s.item ? 'created_at' THEN s.item -> 'created_at' END",
            "json_nul_replaced": "CASE WHEN s.nul_replaced THEN true END"},  # a \u0000 escape became \ufffd
    quarantine=(
        ("item_null", "jsonb_typeof(s.item) = 'null'"),
        ("item_nested_array", "jsonb_typeof(s.item) = 'array'"),
        ("item_scalar", "jsonb_typeof(s.item) IN ('number', 'boolean')"),
        ("item_no_content", "jsonb_typeof(s.item) = 'object' "
                            "AND jsonb_typeof(s.item -> 'content') IS DISTINCT FROM 'string'"),
        ("empty_text", _BLANK.format(_LT_TEXT)),
    ),
    size="coalesce(octet_length(s.memory_json), 0)",
    lets={"item_time": "memory_migration_parse_time(s.item ->> 'created_at', %(tz)s)"},
)

MAPPINGS: dict[tuple[str, str], TableMapping] = {
    (m.table, m.shape): m for m in (_ITEMS_I1, _ITEMS_I2, _ITEMS_I3, _ENTRIES_E1, _web_ui("memory_entries", "E2"),
                                   _web_ui("web_ui_memory_entries", "W1"), _LONG_TERM)
}

# Precedence for ids present in two tables: the first table migrated keeps the id; later rows with the same
# id are recorded as duplicates naming the memory they duplicate.
PRECEDENCE = ("memory_items", "memory_entries", "web_ui_memory_entries", "long_term_memory")

# Columns compared by reconciliation (time-dependent ones, expires_at and migrated_at, are not).
RECONCILED = ("id", "user_id", "org_id", "text", "importance", "memory_type", "neuro_type", "decay_tier",
              "ui_source", "tags", "meta", "session_id", "conversation_id", "created_at")


def mapping_for(table: str, shape: str) -> TableMapping:
    """The mapping of ``table`` in ``shape``."""
    return MAPPINGS[(table, shape)]

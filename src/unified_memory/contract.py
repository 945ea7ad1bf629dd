"""What schema 016 promises, as data: the validator compares the live catalog with it.

Written from the schema contract (not read back from the SQL file), so that an edit to the database or to
the file that breaks the contract is caught. Types are ``information_schema.columns.data_type`` names.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ColumnRule:
    """A column: its type, whether it may be NULL, and a fragment its default must contain (or None)."""

    type: str
    nullable: bool = True
    default: str | None = None


_UUID, _VC, _TEXT, _INT = "uuid", "character varying", "text", "integer"
_JSONB, _TS, _BOOL, _REAL = "jsonb", "timestamp with time zone", "boolean", "real"

COLUMNS: dict[str, dict[str, ColumnRule]] = {
    "memories": {
        "id": ColumnRule(_UUID, False, "gen_random_uuid()"),
        "user_id": ColumnRule(_VC, False),
        "org_id": ColumnRule(_VC),
        "text": ColumnRule(_TEXT, False),
        "embedding_id": ColumnRule(_VC),
        "importance": ColumnRule(_INT, default="5"),
        "decay_tier": ColumnRule(_VC, default="'short'"),
        "tags": ColumnRule(_JSONB, default="'[]'"),
        "meta": ColumnRule(_JSONB, default="'{}'"),
        "created_at": ColumnRule(_TS, default="now()"),
        "updated_at": ColumnRule(_TS),
        "expires_at": ColumnRule(_TS),
        "deleted_at": ColumnRule(_TS),
        "version": ColumnRule(_INT, default="1"),
        "session_id": ColumnRule(_VC),
        "conversation_id": ColumnRule(_UUID),
        "ui_source": ColumnRule(_VC, default="'api'"),
        "memory_type": ColumnRule(_VC, default="'general'"),
        "ai_generated": ColumnRule(_BOOL, default="false"),
        "user_confirmed": ColumnRule(_BOOL, default="true"),
        "access_count": ColumnRule(_INT, default="0"),
        "last_accessed": ColumnRule(_TS),
        "neuro_type": ColumnRule(_VC, default="'episodic'"),
        "decay_lambda": ColumnRule(_REAL),
        "reflection_count": ColumnRule(_INT, default="0"),
        "source_memories": ColumnRule(_JSONB, default="'[]'"),
        "derived_memories": ColumnRule(_JSONB, default="'[]'"),
        "importance_decay": ColumnRule(_REAL, default="1"),
        "last_reflection": ColumnRule(_TS),
        "source_table": ColumnRule(_VC),
        "source_key": ColumnRule(_TEXT),
        "migrated_at": ColumnRule(_TS),
    },
    "memory_access_log": {
        "id": ColumnRule(_UUID, False, "gen_random_uuid()"),
        "memory_id": ColumnRule(_UUID),
        "user_id": ColumnRule(_VC, False),
        "org_id": ColumnRule(_VC),
        "access_type": ColumnRule(_VC, False),
        "correlation_id": ColumnRule(_VC),
        "accessed_at": ColumnRule(_TS, default="now()"),
        "ip_address": ColumnRule("inet"),
        "user_agent": ColumnRule(_TEXT),
        "request_path": ColumnRule(_TEXT),
        "response_status": ColumnRule(_INT),
        "query_text": ColumnRule(_TEXT),
        "results_count": ColumnRule(_INT),
        "processing_time_ms": ColumnRule(_INT),
        "meta": ColumnRule(_JSONB, default="'{}'"),
    },
    "memory_relationships": {
        "id": ColumnRule(_UUID, False, "gen_random_uuid()"),
        "source_memory_id": ColumnRule(_UUID, False),
        "derived_memory_id": ColumnRule(_UUID, False),
        "relationship_type": ColumnRule(_VC, False),
        "confidence_score": ColumnRule(_REAL, default="1"),
        "metadata": ColumnRule(_JSONB, default="'{}'"),
        "created_at": ColumnRule(_TS, default="now()"),
        "updated_at": ColumnRule(_TS, default="now()"),
    },
}

# CHECK constraints whose absence would let bad data in (name -> table)
CONSTRAINTS: dict[str, str] = {
    "memories_text_not_empty": "memories", "memories_importance_range": "memories",
    "memories_decay_tier_vocab": "memories", "memories_tags_array": "memories", "memories_meta_object": "memories",
    "memories_ui_source_vocab": "memories", "memories_memory_type_vocab": "memories",
    "memories_neuro_type_vocab": "memories", "memories_decay_lambda_range": "memories",
    "memories_importance_decay_range": "memories", "memories_source_unique": "memories",
    "memory_access_log_type_vocab": "memory_access_log", "memory_relationships_no_self": "memory_relationships",
    "memory_access_log_user_id_not_blank": "memory_access_log",
    "memory_relationships_unique": "memory_relationships",
    "memory_relationships_confidence_range": "memory_relationships",
}

INDEXES: tuple[str, ...] = (  # the first implementation's names (025 gave them to ours)
    "idx_memories_tenant", "idx_memories_user", "idx_memories_org", "idx_memories_created", "idx_memories_updated",
    "idx_memories_expires", "idx_memories_deleted", "idx_memories_decay_tier", "idx_memories_importance",
    "idx_memories_importance_decay", "idx_memories_tags", "idx_memories_meta", "idx_memories_embedding",
    "idx_memories_session", "idx_memories_conversation", "idx_memories_ui_source", "idx_memories_memory_type",
    "idx_memories_neuro_type", "idx_memories_access_count", "idx_memories_last_accessed", "idx_memories_tenant_type",
    "idx_memories_tenant_importance", "idx_memories_decay_cleanup",
    "idx_memory_access_log_memory", "idx_memory_access_log_user", "idx_memory_access_log_org",
    "idx_memory_access_log_correlation", "idx_memory_access_log_type", "idx_memory_access_log_accessed",
    "idx_memory_relationships_source", "idx_memory_relationships_derived", "idx_memory_relationships_type",
    "idx_memory_relationships_created",
)

# function name -> number of arguments of the one definition that must exist (no ambiguous overloads)
FUNCTIONS: dict[str, int] = {
    "calculate_decay_score": 4, "calculate_expires_at": 2, "update_memory_access": 12,
    "create_memory_relationship": 5, "soft_delete_memory": 4, "default_decay_lambda": 1,
}
NOT_IMMUTABLE = ("calculate_decay_score", "calculate_expires_at")
TRIGGERS: dict[str, str] = {"set_memory_defaults_trigger": "memories", "update_memories_updated_at": "memories"}
VIEWS: dict[str, tuple[str, ...]] = {  # view -> tables it must read
    "active_memories_with_decay": ("memories",),
    "memory_relationship_details": ("memories", "memory_relationships"),
    "memory_analytics_by_tenant": ("memories",),
    "memory_audit_summary": ("memory_access_log",),
}
POLICIES: dict[str, str] = {"memories_tenant_isolation": "memories",
                            "memory_access_log_tenant_isolation": "memory_access_log",
                            "memory_relationships_tenant_isolation": "memory_relationships"}
RLS_TABLES = ("memories", "memory_access_log", "memory_relationships")
APP_ROLE = "unified_memory_app"

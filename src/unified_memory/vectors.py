"""Vectors: the unified Milvus collection, following ``memories``, tenant-filtered on every read.

Each live memory (not soft-deleted, not expired) becomes one entity whose primary key is the memory's UUID, and
``memories.embedding_id`` is set exactly while the collection holds it. Its vector comes, in order, from the
memory_items embedding the migration kept (``memory_legacy_embeddings``), from the old Milvus collections by the
``vector_id`` a memory_entries row carried (``meta.legacy.vector_id``), or from the embedder.

``sync`` reads only what changed: the outbox ``memory_vector_outbox`` (filled by migration 021's triggers on
every edit of a field the collection holds, soft delete, expiry change and hard delete), the memories no vector
points at yet (``idx_memories_vector_pending``), and the memories whose expiry has passed. A live memory is
upserted, anything else is deleted from the collection; the database side (pointer, outbox rows) is written only
after Milvus has answered, so a crash at any point only repeats work.

Reads filter on the tenant, ``is_deleted`` and ``expires_at`` in Milvus, and then keep only hits that are live
in PostgreSQL at that moment (a memory forgotten since the last sync is never served). A tenant with n live
memories gets min(k, n) of its own: small tenants are ranked exactly, large ones by the index, with an exact
pass whenever the index returns fewer than it should.
"""

from __future__ import annotations

import logging
import struct
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypedDict, cast

import numpy as np
import psycopg
from psycopg import sql
from psycopg.abc import Buffer
from psycopg.adapt import Loader
from psycopg.pq import Format
from psycopg.rows import class_row, dict_row

from . import privileges
from .checks import FAIL, PASS, SECONDS, WARN, Check, Serialised, Status, json_field
from .db import custom_plans, first_column, maintenance, relation_exists, scalar
from .embedders import Embedder, Vectors
from .errors import LockBusy, VectorStoreError
from .health import vector_lag
from .milvus import DataType, MilvusClient, MilvusException
from .progress import Progress
from .settings import DEFAULT_COLLECTION, DEFAULT_DIMENSION, redact_uri

log = logging.getLogger("unified_memory.vectors")

OLD_COLLECTIONS = ("kari_memories", "memory_embeddings", "ag_ui_memories", "chat_memories", "copilot_memories")
TEXT_CHARS = 16000  # at most 64,000 bytes of UTF-8: under Milvus' 65,535-byte VARCHAR limit
PARTITIONS = 64
SYNC_LOCK = (0x756D, 21)  # advisory lock key pair: 'um', migration 021 (one sync at a time per database)

# name, type, VARCHAR length, nullable; the vector field and the primary key are added around these
SCALARS: tuple[tuple[str, DataType, int | None, bool], ...] = (
    ("user_id", DataType.VARCHAR, 255, False), ("org_id", DataType.VARCHAR, 255, True),
    ("importance", DataType.INT32, None, False), ("decay_tier", DataType.VARCHAR, 20, False),
    ("memory_type", DataType.VARCHAR, 50, False), ("neuro_type", DataType.VARCHAR, 20, False),
    ("ui_source", DataType.VARCHAR, 50, False), ("created_at", DataType.INT64, None, False),
    ("expires_at", DataType.INT64, None, True), ("is_deleted", DataType.BOOL, None, False),
    ("source_table", DataType.VARCHAR, 64, True), ("text", DataType.VARCHAR, 65535, False),
)
FIELDS = tuple(name for name, _, _, _ in SCALARS)
SCALAR_INDEXES = ("user_id", "org_id", "memory_type", "decay_tier", "is_deleted", "expires_at")
VECTOR_INDEX = {"index_type": "HNSW", "metric_type": "COSINE", "params": {"M": 16, "efConstruction": 200}}
# Search: tenants with at most EXACT_LIMIT live memories are ranked exactly (all their vectors, fetched by the
# partition-key filter); larger ones through HNSW with ef = max(EF_MIN, EF_FACTOR * k), and an exact pass when
# the index returns fewer own hits than the tenant has (benchmarks/bench_search.py measured both).
EXACT_LIMIT = 5000
EF_MIN, EF_FACTOR = 256, 8

_COLUMNS = sql.SQL("""
SELECT m.id::text AS id, m.user_id, m.org_id, m.importance, m.decay_tier, m.memory_type, m.neuro_type, m.ui_source,
       extract(epoch FROM m.created_at)::bigint AS created_at, extract(epoch FROM m.expires_at)::bigint AS expires_at,
       m.deleted_at IS NOT NULL AS is_deleted, m.source_table, left(m.text, %(chars)s) AS text,
       e.embedding, m.meta -> 'legacy' ->> 'vector_id' AS vector_id,
       (m.deleted_at IS NULL AND (m.expires_at IS NULL OR m.expires_at > now())) AS live
FROM memories m LEFT JOIN LATERAL (SELECT embedding FROM memory_legacy_embeddings WHERE memory_id = m.id OFFSET 0) e
     ON true""")
_LIVE = sql.SQL("m.deleted_at IS NULL AND (m.expires_at IS NULL OR m.expires_at > now())")
_AFTER = sql.SQL("(%(after)s::uuid IS NULL OR m.id > %(after)s::uuid)")


def _select(where: sql.Composable, order: sql.Composable = sql.SQL("m.id"), *, limit: bool = True) -> sql.Composed:
    query = sql.SQL("{} WHERE {} ORDER BY {}").format(_COLUMNS, where, order)
    return query + sql.SQL(" LIMIT %(limit)s") if limit else query


# memories no vector points at yet (every new one): the partial index idx_memories_vector_pending finds them
_PENDING_BATCH = _select(sql.SQL("{} AND m.embedding_id IS NULL AND {}").format(_AFTER, _LIVE))
_FULL_BATCH = _select(sql.SQL("{} AND {}").format(_AFTER, _LIVE))
_BY_IDS = _select(sql.SQL("m.id = ANY(%(ids)s::uuid[])"), limit=False)
_POINTED_BATCH = _select(sql.SQL("{} AND m.embedding_id IS NOT NULL").format(_AFTER))
_POINTED_SAMPLE = _select(sql.SQL("m.embedding_id IS NOT NULL"), sql.SQL("md5(m.id::text || %(seed)s)"))
_PENDING_COUNT = sql.SQL("SELECT count(*) FROM memories m WHERE {} AND (%(full)s OR m.embedding_id IS NULL)").format(
    _LIVE)
# keyset on seq: a removals-only pass leaves the live changes queued, and a batch must not walk them again
_OUTBOX = sql.SQL("SELECT o.seq, o.memory_id::text AS memory_id FROM memory_vector_outbox o WHERE o.seq > %(after)s{} "
                  "ORDER BY o.seq LIMIT %(limit)s")
_OUTBOX_ALL = _OUTBOX.format(sql.SQL(""))
_OUTBOX_REMOVALS = _OUTBOX.format(sql.SQL(
    " AND NOT EXISTS (SELECT FROM memories m WHERE m.id = o.memory_id AND {} OFFSET 0)").format(_LIVE))
_OUTBOX_DONE = "DELETE FROM memory_vector_outbox WHERE seq = ANY(%s)"
# along idx_memories_vector_expiry, not a scan from the table's first page past the rows earlier batches
# unpointed; deletions come through the outbox
_EXPIRED = ("SELECT id::text FROM memories WHERE embedding_id IS NOT NULL AND expires_at IS NOT NULL "
            "AND expires_at <= now() ORDER BY expires_at LIMIT %s")
_POINT = ("UPDATE memories SET embedding_id = id::text WHERE id = ANY(%s::uuid[]) "
          "AND embedding_id IS DISTINCT FROM id::text")
_UNPOINT = "UPDATE memories SET embedding_id = NULL WHERE id = ANY(%s::uuid[]) AND embedding_id IS NOT NULL"
_LIVE_IDS = sql.SQL("SELECT m.id::text FROM memories m WHERE m.id = ANY(%s::uuid[]) AND {}").format(_LIVE)
_PER_TENANT = ("SELECT user_id, org_id, count(*) AS n FROM memories WHERE embedding_id IS NOT NULL "
               "GROUP BY user_id, org_id")
_TENANT_LIVE = sql.SQL("SELECT count(*) FROM memories m WHERE m.user_id = %(user)s "
                       "AND m.org_id IS NOT DISTINCT FROM %(org)s AND {}").format(_LIVE)
_TENANT_POINTED = sql.SQL("SELECT m.id::text FROM memories m WHERE m.user_id = %(user)s AND m.org_id IS NOT "
                          "DISTINCT FROM %(org)s AND {} AND m.embedding_id IS NOT NULL LIMIT %(limit)s").format(_LIVE)
_HITS = sql.SQL("SELECT m.id::text AS id, m.user_id, m.org_id, m.memory_type, m.text FROM memories m "
                "WHERE m.id = ANY(%(ids)s::uuid[]) AND m.user_id = %(user)s AND m.org_id IS NOT DISTINCT FROM "
                "%(org)s AND {}").format(_LIVE)


class MemoryRow(TypedDict):
    """One memory under the collection's field names, with where its vector may come from: ``embedding`` is the
    vector the migration kept, if any (read as a dict: a batch becomes its entities without a class per row)."""

    id: str
    user_id: str
    org_id: str | None
    importance: int
    decay_tier: str
    memory_type: str
    neuro_type: str
    ui_source: str
    created_at: int
    expires_at: int | None
    is_deleted: bool
    source_table: str | None
    text: str
    embedding: Vectors | None
    vector_id: str | None
    live: bool


def entity(row: MemoryRow, vector: Vectors | list[float]) -> dict[str, Any]:
    """The collection's entity for this memory: its fields, the text cut to fit, and ``vector``."""
    entity: dict[str, Any] = {**row, "text": _fit(row["text"]), "embedding": vector}
    del entity["vector_id"], entity["live"]
    return entity


class _Float4ArrayLoader(Loader):
    """Binary ``real[]`` to a float32 array through numpy: the generic loader makes a Python float per element."""

    format = Format.BINARY
    _ITEM = np.dtype([("length", ">i4"), ("value", ">f4")])

    def load(self, data: Buffer) -> Vectors:
        raw = bytes(data)
        ndim, has_null = struct.unpack_from(">ii", raw)
        if ndim == 0:
            return np.empty(0, dtype=np.float32)
        if ndim != 1 or has_null:
            raise VectorStoreError("a kept embedding is not a one-dimensional array without NULLs")
        (count,) = struct.unpack_from(">i", raw, 12)
        return np.frombuffer(raw, dtype=self._ITEM, count=count, offset=20)["value"].astype(np.float32)


FLOAT4_ARRAY_OID = 1021


def _rows(conn: psycopg.Connection, query: sql.Composed, params: dict[str, Any]) -> list[MemoryRow]:
    with conn.cursor(binary=True, row_factory=dict_row) as cur:
        cur.adapters.register_loader(FLOAT4_ARRAY_OID, _Float4ArrayLoader)
        return cast(list[MemoryRow], cur.execute(query, {"chars": TEXT_CHARS, **params}).fetchall())


def _ids(conn: psycopg.Connection, query: str | sql.Composed, params: Sequence[Any] | dict[str, Any]) -> list[str]:
    """The single text column (memory ids) of ``query``'s rows."""
    return [str(i) for i in first_column(conn, query, params)]


@dataclass(frozen=True)
class CollectionSpec:
    """The unified collection: its name and vector dimension."""

    name: str = DEFAULT_COLLECTION
    dimension: int = DEFAULT_DIMENSION


# ------------------------------------------------------------------------------------------- up
@dataclass
class UpResult(Serialised):
    """What ``vectors up`` did."""

    collection: str
    action: Literal["created", "existing"]
    indexes_created: list[str] = field(default_factory=list)
    entities: int = 0


def schema_for(spec: CollectionSpec) -> Any:
    """The collection schema: UUID primary key, tenant partition key, nullable scalars, the vector."""
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, max_length=36, is_primary=True)
    for name, dtype, length, nullable in SCALARS:
        extra: dict[str, Any] = {"max_length": length} if length else {}
        schema.add_field(name, dtype, nullable=nullable, is_partition_key=name == "user_id", **extra)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=spec.dimension)
    return schema


def up(client: MilvusClient, spec: CollectionSpec) -> UpResult:
    """Create the collection and its indexes if missing; an incompatible existing one is reported, not altered.

    Raises:
        VectorStoreError: the collection exists with another schema, or Milvus refused.
    """
    with _milvus(f"creating {spec.name}"):
        result = UpResult(spec.name, "existing")
        if client.has_collection(spec.name):
            require_compatible(client, spec)
        else:
            client.create_collection(spec.name, schema=schema_for(spec), num_partitions=PARTITIONS)
            result.action = "created"
        result.indexes_created = _ensure_indexes(client, spec)
        client.load_collection(spec.name)
        result.entities = count(client, spec)
    log.info("vectors up collection=%s action=%s indexes_created=%d", spec.name, result.action,
             len(result.indexes_created))
    return result


def incompatibilities(client: MilvusClient, spec: CollectionSpec) -> list[str]:
    """How an existing collection differs from the spec (empty when compatible)."""
    fields = {f["name"]: f for f in client.describe_collection(spec.name)["fields"]}
    problems = []
    expected = [("id", DataType.VARCHAR, False)] + [(n, t, nl) for n, t, _, nl in SCALARS] + [
        ("embedding", DataType.FLOAT_VECTOR, False)]
    for name, dtype, nullable in expected:
        found = fields.get(name)
        if found is None:
            problems.append(f"field {name} is missing")
        elif found["type"] != dtype:
            problems.append(f"field {name} is {found['type'].name}, expected {dtype.name}")
        elif bool(found.get("nullable")) != nullable:
            problems.append(f"field {name} nullable={bool(found.get('nullable'))}, expected {nullable}")
    vector = fields.get("embedding")
    if vector is not None and vector.get("params", {}).get("dim") != spec.dimension:
        problems.append(f"embedding has dimension {vector['params'].get('dim')}, expected {spec.dimension}")
    if fields.get("user_id", {}).get("is_partition_key") is not True:
        problems.append("user_id is not the partition key")
    if not fields.get("id", {}).get("is_primary"):
        problems.append("id is not the primary key")
    return problems


def require_compatible(client: MilvusClient, spec: CollectionSpec) -> None:
    """Refuse a missing or incompatible collection before reading or writing it.

    Raises:
        VectorStoreError: the collection does not exist or differs from the spec (nothing is changed).
    """
    if not client.has_collection(spec.name):
        raise VectorStoreError(f"collection {spec.name} does not exist: run `unified-memory vectors up` first")
    problems = incompatibilities(client, spec)
    if problems:
        raise VectorStoreError(f"collection {spec.name} is incompatible (left as it is): " + "; ".join(problems))


_READY: weakref.WeakKeyDictionary[MilvusClient, set[CollectionSpec]] = weakref.WeakKeyDictionary()


def _ready(client: MilvusClient, spec: CollectionSpec) -> None:
    """``require_compatible`` and load, once per client and collection (searches come many at a time)."""
    if spec not in _READY.get(client, set()):
        require_compatible(client, spec)
        client.load_collection(spec.name)
        _READY.setdefault(client, set()).add(spec)


def _ensure_indexes(client: MilvusClient, spec: CollectionSpec) -> list[str]:
    existing = set(client.list_indexes(spec.name))
    params = client.prepare_index_params()
    wanted = [f for f in ("embedding", *SCALAR_INDEXES) if f not in existing]
    for name in wanted:
        if name == "embedding":
            params.add_index("embedding", **VECTOR_INDEX)
        else:
            params.add_index(name, index_type="INVERTED")
    if wanted:
        client.create_index(spec.name, params)
    return wanted


def count(client: MilvusClient, spec: CollectionSpec) -> int:
    """Entities in the collection."""
    rows = client.query(spec.name, filter="", output_fields=["count(*)"])
    return int(rows[0]["count(*)"]) if rows else 0


# ------------------------------------------------------------------------------------------- sync
def _samples(no_vector: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """Memories left without a vector: how many per reason, and the first ids (never their text)."""
    return {reason: {"count": len(ids), "sample_ids": ids[:10]} for reason, ids in no_vector.items()}


@dataclass
class SyncResult(Serialised):
    """What ``vectors sync`` did: entities written and removed, vectors per source, memories left without one."""

    json_derived: ClassVar[dict[str, str]] = {"rows_per_second": "rows_per_second"}
    json_order: ClassVar[tuple[str, ...]] = ("collection", "synced", "removed", "outbox_changes", "batches",
                                             "vector_sources", "seconds", "rows_per_second", "no_vector")

    collection: str
    synced: int = 0
    removed: int = 0
    changes: int = field(default=0, metadata=json_field(key="outbox_changes"))
    batches: int = 0
    sources: Counter[str] = field(default_factory=Counter, metadata=json_field(key="vector_sources"))
    no_vector: dict[str, list[str]] = field(default_factory=dict, metadata=json_field(convert=_samples))
    seconds: float = field(default=0.0, metadata=SECONDS)

    @property
    def rows_per_second(self) -> float:
        return round(self.synced / self.seconds, 1) if self.seconds else 0.0

    @property
    def idle(self) -> bool:
        """Nothing was there to do."""
        return not (self.synced or self.removed or self.changes or self.no_vector)


@dataclass
class _Syncer:
    """One sync run's collaborators."""

    conn: psycopg.Connection
    client: MilvusClient
    spec: CollectionSpec
    embedder: Embedder | None
    result: SyncResult
    batch_size: int
    old: _OldCollections | None = None

    def vectors_for(self, rows: list[MemoryRow]) -> list[dict[str, Any]]:
        if self.old is None:
            self.old = _OldCollections(self.client, self.spec.dimension)
        return _entities(rows, self.old, self.embedder, self.spec.dimension, self.result)

    def remove(self, ids: list[str]) -> None:
        """Take memories out of the collection, then clear their pointers."""
        if ids:
            self.client.delete(self.spec.name, ids=ids)
            self.conn.execute(_UNPOINT, [ids])
            self.result.removed += len(ids)


def sync(conn: psycopg.Connection, client: MilvusClient, spec: CollectionSpec, embedder: Embedder | None, *,
         batch_size: int = 1000, full: bool = False, progress: Progress | None = None) -> SyncResult:
    """Bring the collection in step with ``memories``: queued changes, unsynced memories, passed expiries.

    ``full`` re-upserts every live memory and removes every entity that is not one (memories hard-deleted
    before migration 021 was applied leave such entities behind).

    Raises:
        VectorStoreError: the collection is missing or incompatible, or Milvus refused.
        LockBusy: another sync of this database is running.
    """
    started = time.monotonic()
    result = SyncResult(spec.name)
    with _sync_lock(conn), maintenance(conn), custom_plans(conn), _milvus("syncing vectors"):
        require_compatible(client, spec)
        privileges.require(conn, "vectors", legacy=())
        client.load_collection(spec.name)
        run = _Syncer(conn, client, spec, embedder, result, batch_size)
        if relation_exists(conn, "memory_vector_outbox"):
            _apply_outbox(run)
        _upsert_pending(run, full=full, progress=progress)
        _remove_expired(run)
        if full:
            _remove_orphans(run)
    result.seconds = time.monotonic() - started
    log.info("vectors sync collection=%s synced=%d removed=%d changes=%d batches=%d no_vector=%d", spec.name,
             result.synced, result.removed, result.changes, result.batches,
             sum(len(v) for v in result.no_vector.values()))
    return result


def forget(conn: psycopg.Connection, client: MilvusClient, spec: CollectionSpec) -> SyncResult:
    """Only the removals of a sync (queued deletes, passed expiries): what rollback and cleanup call after them."""
    started = time.monotonic()
    result = SyncResult(spec.name)
    with _sync_lock(conn), maintenance(conn), _milvus("removing forgotten memories from the collection"):
        if not client.has_collection(spec.name):
            return result
        client.load_collection(spec.name)
        run = _Syncer(conn, client, spec, None, result, 1000)
        if relation_exists(conn, "memory_vector_outbox"):
            _apply_outbox(run, removals_only=True)
        _remove_expired(run)
    result.seconds = time.monotonic() - started
    return result


@contextmanager
def _sync_lock(conn: psycopg.Connection) -> Iterator[None]:
    if scalar(conn, "SELECT pg_try_advisory_lock(%s, %s)", SYNC_LOCK) is not True:
        raise LockBusy("another vectors sync is running on this database (advisory lock held); try again later")
    try:
        yield
    finally:
        if not conn.closed:
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", SYNC_LOCK)


def _apply_outbox(run: _Syncer, *, removals_only: bool = False) -> None:
    """Every queued change (only those of memories no longer live with ``removals_only``): live memories
    upserted, the others removed; their outbox rows deleted after."""
    after = 0
    while True:
        with run.conn.cursor(row_factory=class_row(_Queued)) as cur:
            queued = cur.execute(_OUTBOX_REMOVALS if removals_only else _OUTBOX_ALL,
                                 {"after": after, "limit": run.batch_size}).fetchall()
        if not queued:
            return
        after = queued[-1].seq
        ids = sorted({q.memory_id for q in queued})
        rows = {r["id"]: r for r in _rows(run.conn, _BY_IDS, {"ids": ids})}
        if removals_only:  # one that came back to life meanwhile stays queued for the next full sync
            queued = [q for q in queued if q.memory_id not in rows or not rows[q.memory_id]["live"]]
            ids = sorted({q.memory_id for q in queued})
            if not ids:
                continue
        entities = run.vectors_for([rows[i] for i in ids if i in rows and rows[i]["live"]])
        if entities:
            run.client.upsert(run.spec.name, entities)
        run.remove([i for i in ids if i not in rows or not rows[i]["live"]])
        with run.conn.transaction():
            if entities:
                run.conn.execute(_POINT, [[e["id"] for e in entities]])
            run.conn.execute(_OUTBOX_DONE, [[q.seq for q in queued]])
        run.result.changes += len(ids)
        run.result.synced += len(entities)
        run.result.batches += 1


@dataclass
class _Queued:
    seq: int
    memory_id: str


def _upsert_pending(run: _Syncer, *, full: bool, progress: Progress | None) -> None:
    """Keyset batches of live memories without a vector (or all live ones with ``full``).

    While batch n is upserted, a worker thread points ``embedding_id`` of batch n-1 (whose upsert has returned)
    and reads and embeds batch n+1: one batch ahead at most, so memory stays flat. Into an empty collection
    the batches are inserted, not upserted (no id can be there twice: the run holds the sync lock).
    """
    conn, result = run.conn, run.result
    total = int(scalar(conn, _PENDING_COUNT, {"full": full}))
    if total == 0:
        return
    write = run.client.insert if count(run.client, run.spec) == 0 else run.client.upsert
    query = _FULL_BATCH if full else _PENDING_BATCH

    def prepare(after: str | None) -> tuple[str | None, list[dict[str, Any]]]:
        rows = _rows(conn, query, {"after": after, "limit": run.batch_size})
        return (rows[-1]["id"] if rows else None), run.vectors_for(rows)

    def point_then_prepare(written: list[str], after: str) -> tuple[str | None, list[dict[str, Any]]]:
        if written:  # the batch before the one being written now: its write has returned
            conn.execute(_POINT, [written])
        return prepare(after)

    done = 0
    with ThreadPoolExecutor(max_workers=1) as ahead:
        last, entities = prepare(None)
        written: list[str] = []
        while last is not None:
            following = ahead.submit(point_then_prepare, written, last)
            if entities:
                write(run.spec.name, entities)
            written = [e["id"] for e in entities]
            result.batches, result.synced, done = result.batches + 1, result.synced + len(entities), done + 1
            if progress is not None:
                progress("vectors", min(done * run.batch_size, total), total)
            last, entities = following.result()
        if written:
            conn.execute(_POINT, [written])


def _remove_expired(run: _Syncer) -> None:
    """Memories whose expiry has passed (or that are deleted) while a vector still points at them."""
    while ids := _ids(run.conn, _EXPIRED, [run.batch_size]):
        run.remove(ids)


def _remove_orphans(run: _Syncer) -> None:
    """Entities that are not a live memory (``full`` only): hard deletes from before the outbox existed."""
    iterator = run.client.query_iterator(run.spec.name, batch_size=5000, filter="", output_fields=["id"])
    try:
        while batch := iterator.next():
            ids = [str(e["id"]) for e in batch]
            live = set(_ids(run.conn, _LIVE_IDS, [ids]))
            gone = [i for i in ids if i not in live]
            if gone:
                run.client.delete(run.spec.name, ids=gone)
                run.conn.execute(_UNPOINT, [gone])
                run.result.removed += len(gone)
    finally:
        iterator.close()


def _entities(rows: list[MemoryRow], old: _OldCollections, embedder: Embedder | None, dimension: int,
              result: SyncResult) -> list[dict[str, Any]]:
    vectors = resolve_vectors(rows, old, embedder, dimension)
    entities = []
    for row in rows:
        vector, source = vectors[row["id"]]
        if vector is None:
            result.no_vector.setdefault(source, []).append(row["id"])
            continue
        result.sources[source] += 1
        entities.append(entity(row, vector))
    return entities


def _fit(text: str) -> str:
    data = text.encode("utf-8")
    return text if len(data) <= 65535 else data[:65535].decode("utf-8", errors="ignore")


def resolve_vectors(rows: Sequence[MemoryRow], old: _OldCollections, embedder: Embedder | None,
                    dimension: int) -> dict[str, tuple[Vectors | None, str]]:
    """id -> (vector, source) for a batch: kept embedding, else old collection, else embedder, else a reason."""
    found: dict[str, tuple[Vectors | None, str]] = {}
    for row in rows:
        if row["embedding"] is not None and len(row["embedding"]) == dimension:
            found[row["id"]] = (row["embedding"], "memory_items_embedding")  # real[] arrives as float32
    by_vector_id = old.lookup({row["vector_id"] for row in rows if row["id"] not in found and row["vector_id"]})
    for row in rows:
        if row["id"] not in found and row["vector_id"] in by_vector_id:
            found[row["id"]] = (by_vector_id[str(row["vector_id"])], "old_collection")
    missing = [row for row in rows if row["id"] not in found]
    if missing and embedder is not None:
        for row, vector in zip(missing, embedder.embed([r["text"] for r in missing]), strict=True):
            found[row["id"]] = (vector, f"embedder:{embedder.name}")
    for row in missing:
        if row["id"] not in found:
            reason = "dimension_mismatch" if row["embedding"] is not None else "no_source_and_no_embedder"
            found[row["id"]] = (None, reason)
    return found


class _OldCollections:
    """The old collections present in this Milvus, looked up by their primary key (the legacy vector_id)."""

    def __init__(self, client: MilvusClient, dimension: int) -> None:
        self.client, self.sources = client, []
        present = set(client.list_collections())
        for name in OLD_COLLECTIONS:
            if name in present:
                fields = client.describe_collection(name)["fields"]
                pk = next(f for f in fields if f.get("is_primary"))
                vec = next((f for f in fields if f["type"] == DataType.FLOAT_VECTOR
                            and f.get("params", {}).get("dim") == dimension), None)
                if vec is not None:
                    client.load_collection(name)
                    self.sources.append((name, pk["name"], pk["type"], vec["name"]))

    def lookup(self, vector_ids: set[str | None]) -> dict[str, Vectors]:
        found: dict[str, Vectors] = {}
        wanted_all = {v for v in vector_ids if v}
        for name, pk, pk_type, vec in self.sources:
            wanted = [v for v in wanted_all - set(found) if pk_type != DataType.INT64 or v.isdigit()]
            if not wanted:
                continue
            keys = [int(v) for v in wanted] if pk_type == DataType.INT64 else wanted
            for hit in self.client.get(name, ids=keys, output_fields=[vec]):
                found[str(hit[pk])] = np.asarray(hit[vec], dtype=np.float32)
        return found


# ------------------------------------------------------------------------------------------- follow
def follow(conn: psycopg.Connection, client: MilvusClient, spec: CollectionSpec, embedder: Embedder | None, *,
           interval: float = 1.0, until_idle: bool = False, batch_size: int = 1000,
           report: Callable[[SyncResult], None] | None = None) -> SyncResult:
    """Sync again and again (every ``interval`` seconds when idle); with ``until_idle``, stop at the first
    pass that finds nothing to do. Returns the totals; stops on Ctrl-C between passes."""
    total = SyncResult(spec.name)
    started = time.monotonic()
    try:
        while True:
            step = sync(conn, client, spec, embedder, batch_size=batch_size)
            for name in ("synced", "removed", "changes", "batches"):
                setattr(total, name, getattr(total, name) + getattr(step, name))
            total.sources.update(step.sources)
            for reason, ids in step.no_vector.items():
                total.no_vector.setdefault(reason, []).extend(ids[:10])
            if report is not None and not step.idle:
                report(step)
            if step.idle and until_idle:
                break
            if step.idle:
                time.sleep(interval)
    except KeyboardInterrupt:
        log.info("vectors sync --follow stopped by the operator")
    total.seconds = time.monotonic() - started
    return total


# ------------------------------------------------------------------------------------------- reads
_LITERAL = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r"})


def literal(value: str) -> str:
    """``value`` as a Milvus expression string literal, matched exactly whatever it holds.

    Milvus' grammar takes any character but ``"``, ``\\``, CR and LF literally inside double quotes (non-ASCII,
    other control characters and bidi marks included), and knows ``\\"``, ``\\\\``, ``\\n`` and ``\\r``; a
    ``\\u`` or ``\\x`` escape is refused by Milvus Lite, so nothing else is escaped.
    """
    return '"' + value.translate(_LITERAL) + '"'


def tenant_filter(user_id: str, org_id: str | None, *, live_at: int | None = None) -> str:
    """The filter every read path adds: this tenant only, and with ``live_at`` only memories live then."""
    parts = [f"user_id == {literal(user_id)}",
             "org_id is null" if org_id is None else f"org_id == {literal(org_id)}"]
    if live_at is not None:
        parts.append(f"is_deleted == false and (expires_at is null or expires_at > {int(live_at)})")
    return " and ".join(parts)


@dataclass
class SearchResult(Serialised):
    """A tenant-filtered search: hits (id, score, memory type, text), how they were found, how long it took."""

    user_id: str
    org_id: str | None
    hits: list[dict[str, Any]] = field(default_factory=list)
    strategy: Literal["exact", "index", "index+exact"] = "exact"
    seconds: float = field(default=0.0, metadata=SECONDS)


def search(conn: psycopg.Connection, client: MilvusClient, spec: CollectionSpec, embedder: Embedder, *,
           user_id: str, org_id: str | None, text: str, k: int = 5) -> SearchResult:
    """Semantic search within one tenant; the search is audited through ``update_memory_access``.

    Raises:
        VectorStoreError: the collection is missing or incompatible, or Milvus refused.
    """
    started = time.monotonic()
    result = SearchResult(user_id, org_id)
    with maintenance(conn), _milvus("searching"):
        _ready(client, spec)
        tenant = {"user": user_id, "org": org_id, "limit": EXACT_LIMIT + 1}
        own = _ids(conn, _TENANT_POINTED, tenant)
        probe = embedder.embed([text])[0]
        if len(own) <= EXACT_LIMIT:  # a small tenant: its vectors by primary key, ranked exactly
            scored = exact_by_ids(client, spec, probe, own, k)
        else:
            scored = _indexed(conn, client, spec, result, probe, int(scalar(conn, _TENANT_LIVE, tenant)), k)
        result.hits = _hits(conn, user_id, org_id, scored)[:k]
    result.seconds = time.monotonic() - started
    with maintenance(conn):
        conn.execute("SELECT update_memory_access(NULL, %s, %s, 'search', NULL, NULL, NULL, 'vectors search', 200, "
                     "%s, %s, %s)", [user_id, org_id, text, len(result.hits), int(result.seconds * 1000)])
    return result


def _indexed(conn: psycopg.Connection, client: MilvusClient, spec: CollectionSpec, result: SearchResult,
             probe: Vectors, live: int, k: int) -> list[tuple[str, float]]:
    """A large tenant: HNSW with a wide ef, filtered on the tenant; exact over the tenant when it returns fewer
    than min(k, live) live hits."""
    tenant = tenant_filter(result.user_id, result.org_id, live_at=int(time.time()))
    hits = client.search(spec.name, [probe], limit=k + 16, filter=tenant, output_fields=[],
                         search_params={"params": {"ef": max(EF_MIN, EF_FACTOR * k)}})[0]
    scored = _live_only(conn, [(str(h["id"]), float(h["distance"])) for h in hits])
    result.strategy = "index"
    if len(scored) < min(k, live):  # the index missed some of the tenant's memories: rank them all
        result.strategy = "index+exact"
        scored = _live_only(conn, exact_search(client, spec, probe, tenant, k + 16))
    return scored


def exact_by_ids(client: MilvusClient, spec: CollectionSpec, probe: Vectors, ids: list[str],
                 k: int) -> list[tuple[str, float]]:
    """Brute force over the given entities (fetched by primary key, the fastest read Milvus has)."""
    ranked = _TopK(k, _unit(probe))
    for i in range(0, len(ids), 1000):
        ranked.add(client.get(spec.name, ids=ids[i:i + 1000], output_fields=["embedding"]))
    return ranked.best()


def exact_search(client: MilvusClient, spec: CollectionSpec, probe: Vectors, filter_: str,
                 k: int) -> list[tuple[str, float]]:
    """Brute force over every entity the filter selects, streamed; the best ``k`` by cosine."""
    ranked = _TopK(k, _unit(probe))
    iterator = client.query_iterator(spec.name, batch_size=2000, filter=filter_, output_fields=["embedding"])
    try:
        while batch := iterator.next():
            ranked.add(batch)
    finally:
        iterator.close()
    return ranked.best()


def _unit(vector: Vectors) -> np.ndarray:
    query = np.asarray(vector, dtype=np.float32)
    return query / max(float(np.linalg.norm(query)), 1e-12)


@dataclass
class _TopK:
    """The best ``k`` (id, cosine) seen so far, merged batch by batch."""

    k: int
    query: np.ndarray
    ids: list[str] = field(default_factory=list)
    scores: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float32))

    def add(self, batch: list[dict[str, Any]]) -> None:
        if not batch:
            return
        matrix = np.asarray([e["embedding"] for e in batch], dtype=np.float32)
        norms = np.linalg.norm(matrix, axis=1)
        scores = matrix @ self.query / np.where(norms == 0, 1.0, norms)
        ids = self.ids + [str(e["id"]) for e in batch]
        merged = np.concatenate([self.scores, scores])
        keep = np.argsort(-merged, kind="stable")[:self.k]
        self.ids, self.scores = [ids[i] for i in keep], merged[keep]

    def best(self) -> list[tuple[str, float]]:
        return [(i, float(s)) for i, s in zip(self.ids, self.scores, strict=True)]


def _live_only(conn: psycopg.Connection, scored: list[tuple[str, float]]) -> list[tuple[str, float]]:
    if not scored:
        return scored
    live = set(_ids(conn, _LIVE_IDS, [[i for i, _ in scored]]))
    return [(i, s) for i, s in scored if i in live]


def _hits(conn: psycopg.Connection, user_id: str, org_id: str | None,
          scored: list[tuple[str, float]]) -> list[dict[str, Any]]:
    """The hits with their current tenant, type and text from PostgreSQL (what is served is what is there now)."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = {r["id"]: r for r in cur.execute(_HITS, {"ids": [i for i, _ in scored], "user": user_id,
                                                         "org": org_id})}
    return [{"id": i, "score": round(s, 4), **{k: v for k, v in rows[i].items() if k != "id"}}
            for i, s in scored if i in rows]


# ------------------------------------------------------------------------------------------- verify
@dataclass
class VerifyResult(Serialised):
    """Vector checks: per-tenant counts, every entity's fields and vector (or a sample), a filtered search."""

    json_derived: ClassVar[dict[str, str]] = {"status": "status"}
    json_order: ClassVar[tuple[str, ...]] = ("status",)

    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    @property
    def status(self) -> Status:
        return PASS if self.ok else FAIL

    def raise_for_failure(self) -> None:
        """Raises VectorStoreError when a check failed (the CLI's exit code 11)."""
        if not self.ok:
            raise VectorStoreError("the collection differs from memories (see the failed checks above)")


def verify(conn: psycopg.Connection, client: MilvusClient, spec: CollectionSpec, embedder: Embedder | None, *,
           sample: int | None = None, seed: str = "um", batch_size: int = 1000) -> VerifyResult:
    """Compare the collection with the memories a vector points at: counts per tenant, then every field (text
    included) and vector of every entity in streamed batches, or of ``sample`` memories; a filtered search.

    Raises:
        VectorStoreError: the collection is missing or incompatible, or Milvus refused.
    """
    result = VerifyResult()
    with maintenance(conn), custom_plans(conn), _milvus("verifying vectors"):
        require_compatible(client, spec)
        client.load_collection(spec.name)
        result.checks.append(_tenant_counts(conn, client, spec))
        compare = _Comparison(client, spec, _OldCollections(client, spec.dimension), embedder)
        for rows in _pointed(conn, sample, seed, batch_size):
            compare.batch(rows)
        result.checks.append(compare.check(sample))
        result.checks.append(_filtered_search(client, spec, compare.first))
        result.checks.append(_lag_check(conn))
    return result


def _pointed(conn: psycopg.Connection, sample: int | None, seed: str, batch_size: int) -> Iterator[list[MemoryRow]]:
    if sample is not None:
        rows = _rows(conn, _POINTED_SAMPLE, {"limit": sample, "seed": seed})
        for i in range(0, len(rows), batch_size):
            yield rows[i:i + batch_size]
        return
    after = None
    while rows := _rows(conn, _POINTED_BATCH, {"after": after, "limit": batch_size}):
        yield rows
        after = rows[-1]["id"]


def _tenant_counts(conn: psycopg.Connection, client: MilvusClient, spec: CollectionSpec) -> Check:
    with conn.cursor(row_factory=dict_row) as cur:
        expected = {(r["user_id"], r["org_id"]): int(r["n"]) for r in cur.execute(_PER_TENANT)}
    actual: Counter[tuple[str, str | None]] = Counter()
    iterator = client.query_iterator(spec.name, batch_size=5000, filter="", output_fields=["user_id", "org_id"])
    try:
        while batch := iterator.next():
            actual.update((str(e["user_id"]), e.get("org_id")) for e in batch)
    finally:
        iterator.close()
    differing = sorted((t for t in set(expected) | set(actual) if expected.get(t, 0) != actual.get(t, 0)),
                       key=lambda tenant: (tenant[0], tenant[1] or ""))
    evidence = {"tenants": len(expected), "memories_with_vector": sum(expected.values()),
                "entities": sum(actual.values()),
                "differing_tenants": [{"user_id": u, "org_id": o, "memories": expected.get((u, o), 0),
                                       "entities": actual.get((u, o), 0)} for u, o in differing[:20]]}
    if differing:
        return Check("vectors.tenant_counts", FAIL, f"{len(differing)} tenants differ between memories and "
                                                    f"{spec.name}", evidence)
    return Check("vectors.tenant_counts", PASS, f"{evidence['entities']} entities for {len(expected)} tenants, "
                                                "equal per tenant", evidence)


@dataclass
class _Comparison:
    """Entity by entity: every field the collection holds, the text, and the vector against its source."""

    client: MilvusClient
    spec: CollectionSpec
    old: _OldCollections
    embedder: Embedder | None
    compared: int = 0
    problems: list[str] = field(default_factory=list)
    wrong: Counter[str] = field(default_factory=Counter)
    first: MemoryRow | None = None

    def batch(self, rows: list[MemoryRow]) -> None:
        self.first = self.first or (rows[0] if rows else None)
        got = {str(e["id"]): e for e in self.client.get(self.spec.name, ids=[r["id"] for r in rows],
                                                         output_fields=[*FIELDS, "embedding"])}
        expected = resolve_vectors(rows, self.old, self.embedder, self.spec.dimension)
        for row in rows:
            self.compared += 1
            stored = got.get(row["id"])
            if stored is None:
                self._problem(row["id"], "missing")
                continue
            wanted = entity(row, [])
            for name in FIELDS:
                if stored.get(name) != wanted[name]:
                    self._problem(row["id"], name)
            vector = expected[row["id"]][0]
            if vector is not None and _cosine(vector, stored["embedding"]) < 0.9999:
                self._problem(row["id"], "embedding")

    def _problem(self, memory_id: str, what: str) -> None:
        self.wrong[what] += 1
        if len(self.problems) < 50:
            self.problems.append(f"{memory_id} is missing from the collection" if what == "missing"
                                 else f"{memory_id} differs in {what}")

    def check(self, sample: int | None) -> Check:
        scope = f"{self.compared} sampled" if sample is not None else f"all {self.compared}"
        evidence = {"compared": self.compared, "sampled": sample is not None, "differences": dict(self.wrong),
                    "problems": self.problems}
        if not self.wrong:
            return Check("vectors.entities", PASS, f"{scope} entities equal their memories (every field, the text "
                                                   "and the vector)", evidence)
        return Check("vectors.entities", FAIL, f"{sum(self.wrong.values())} differences in {scope} entities: "
                     + "; ".join(self.problems[:5]), evidence)


def _filtered_search(client: MilvusClient, spec: CollectionSpec, row: MemoryRow | None) -> Check:
    if row is None:
        return Check("vectors.tenant_search", PASS, "nothing to search", {})
    memory_id, tenant = row["id"], (row["user_id"], row["org_id"])
    stored = client.get(spec.name, ids=[memory_id], output_fields=["embedding"])
    if not stored:
        return Check("vectors.tenant_search", FAIL, f"found nothing: the sampled memory {memory_id} has no vector "
                                                    "in the collection to search with", {"hits": 0})
    hits = client.search(spec.name, [stored[0]["embedding"]], limit=20, filter=tenant_filter(*tenant),
                         output_fields=["user_id", "org_id"], search_params={"params": {"ef": EF_MIN}})[0]
    foreign = [h["id"] for h in hits if (h["entity"]["user_id"], h["entity"].get("org_id")) != tenant]
    evidence = {"hits": len(hits), "foreign_ids": foreign[:10],
                "top_score": round(float(hits[0]["distance"]), 4) if hits else None}
    if not hits:
        return Check("vectors.tenant_search", FAIL, "a search for a stored vector, filtered on its tenant, found "
                                                    "nothing", evidence)
    if foreign:
        return Check("vectors.tenant_search", FAIL, f"a tenant-filtered search returned {len(foreign)} hits of "
                                                    "other tenants", evidence)
    return Check("vectors.tenant_search", PASS, f"a search filtered on one tenant returned {len(hits)} hits, all "
                                                "its own", evidence)


def _lag_check(conn: psycopg.Connection) -> Check:
    behind = vector_lag(conn)
    if behind is None:
        return Check("vectors.lag", WARN, "migration 021 (the vector outbox) is not applied: changes to memories "
                                          "after a sync are not followed", {})
    if behind["queued_changes"] or behind["memories_without_vector"]:
        return Check("vectors.lag", WARN, f"{behind['queued_changes']} queued changes and "
                                          f"{behind['memories_without_vector']} live memories without a vector wait "
                                          "for `vectors sync`", behind)
    return Check("vectors.lag", PASS, "the collection has every change of memories", behind)


def _cosine(a: Vectors, b: Sequence[float]) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y) / norm if norm else 0.0


@contextmanager
def _milvus(context: str) -> Iterator[None]:
    try:
        yield
    except MilvusException as exc:
        raise VectorStoreError(f"{context}: Milvus refused [{exc.code}] {redact_uri(str(exc.message))}") from None


def open_client(uri: str) -> MilvusClient:
    """A Milvus client: a Milvus Lite file path, or a server URI (http://user:password@host:port, ?token=...)."""
    try:
        return MilvusClient(uri)
    except MilvusException as exc:
        raise VectorStoreError(f"cannot open Milvus at {redact_uri(uri)}: {redact_uri(str(exc.message))}") from None
    except Exception as exc:  # pymilvus raises connection and parameter errors outside its own root
        raise VectorStoreError(f"cannot open Milvus at {redact_uri(uri)}: {type(exc).__name__}") from None

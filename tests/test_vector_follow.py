"""Issue 17: the collection follows memories, search finds what each tenant has, any tenant id works, verify
proves equality. Real PostgreSQL (both servers) and a real Milvus Lite file per test."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from typer.testing import CliRunner

from unified_memory import fixtures, schema
from unified_memory.backup import backup, default_path
from unified_memory.cli import app
from unified_memory.embedders import HashingEmbedder
from unified_memory.errors import VectorStoreError
from unified_memory.health import health
from unified_memory.migrate import MigrationOptions, migrate
from unified_memory.milvus import MilvusClient
from unified_memory.vectors import CollectionSpec, follow, search, sync, up, verify

SPEC = CollectionSpec("kari_memories_unified", 768)
EMBEDDER = HashingEmbedder(768)


@pytest.fixture
def milvus(tmp_path: Path) -> Iterator[MilvusClient]:
    client = MilvusClient(str(tmp_path / "milvus.db"))
    yield client
    client.close()


def add(conn: psycopg.Connection, user: str, org: str | None, texts: list[str]) -> list[str]:
    """Memories written the way an application writes them; their ids."""
    return [str(conn.execute("INSERT INTO memories (user_id, org_id, text, decay_tier) VALUES (%s, %s, %s, 'long') "
                             "RETURNING id", [user, org, text]).fetchone()[0]) for text in texts]  # type: ignore[index]


def stored(client: MilvusClient, ids: list[str], spec: CollectionSpec = SPEC) -> dict[str, dict[str, object]]:
    return {str(e["id"]): e for e in client.get(spec.name, ids=ids, output_fields=["text", "org_id"])}


def hit_ids(conn: psycopg.Connection, client: MilvusClient, user: str, org: str | None, text: str,
            k: int = 50) -> list[str]:
    return [h["id"] for h in search(conn, client, SPEC, EMBEDDER, user_id=user, org_id=org, text=text, k=k).hits]


def test_soft_delete_expiry_edit_and_hard_delete_reach_the_collection(unified: psycopg.Connection,
                                                                      milvus: MilvusClient) -> None:
    up(milvus, SPEC)
    texts = ["the blue heron nests by the river", "my passport number is secret", "I prefer green tea at noon",
             "the garage code is 4711", "the old flat was on elm street", "keep this one"]
    soft, expired, edited, hard, later, kept = add(unified, "ana", None, texts)
    first = sync(unified, milvus, SPEC, EMBEDDER)
    assert first.synced == 6 and len(stored(milvus, [soft, expired, edited, hard, later, kept])) == 6

    assert unified.execute("SELECT soft_delete_memory(%s)", [soft]).fetchone() == (True,)
    assert soft not in hit_ids(unified, milvus, "ana", None, texts[0])  # already not served before the sync
    unified.execute("UPDATE memories SET expires_at = now() - interval '1 minute' WHERE id = %s", [expired])
    unified.execute("UPDATE memories SET text = 'the car is parked on level three' WHERE id = %s", [edited])
    unified.execute("DELETE FROM memories WHERE id = %s", [hard])
    unified.execute("UPDATE memories SET expires_at = now() + interval '2 seconds' WHERE id = %s", [later])
    step = sync(unified, milvus, SPEC, EMBEDDER)
    assert (step.changes, step.removed, step.synced) == (5, 3, 2)
    left = stored(milvus, [soft, expired, edited, hard, later, kept])
    assert set(left) == {edited, later, kept} and left[edited]["text"] == "the car is parked on level three"
    queued = unified.execute("SELECT count(*) FROM memory_vector_outbox").fetchone()
    assert queued == (0,)
    for text in texts:
        hits = search(unified, milvus, SPEC, EMBEDDER, user_id="ana", org_id=None, text=text, k=10).hits
        assert {h["id"] for h in hits} <= {edited, later, kept}
        assert all(h["text"] != "the garage code is 4711" and h["text"] != texts[2] for h in hits)

    time.sleep(2.5)  # `later` expires with nobody touching it: the next sync takes it out
    assert later not in hit_ids(unified, milvus, "ana", None, texts[4])
    assert sync(unified, milvus, SPEC, EMBEDDER).removed == 1
    assert set(stored(milvus, [later, kept, edited])) == {kept, edited}
    pointers = dict(unified.execute("SELECT id::text, embedding_id IS NOT NULL FROM memories").fetchall())
    assert pointers == {soft: False, expired: False, edited: True, later: False, kept: True}
    assert verify(unified, milvus, SPEC, EMBEDDER).ok
    unified.execute("UPDATE memories SET deleted_at = NULL WHERE id = %s", [soft])  # undelete comes back
    assert sync(unified, milvus, SPEC, EMBEDDER).synced == 1 and soft in stored(milvus, [soft])


def test_the_application_role_queues_its_changes(unified: psycopg.Connection, dsn: str,
                                                 milvus: MilvusClient) -> None:
    up(milvus, SPEC)
    (memory,) = add(unified, "bo", "acme", ["the meeting moved to tuesday"])
    sync(unified, milvus, SPEC, EMBEDDER)
    role = f"um_app_{uuid.uuid4().hex[:8]}"
    unified.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE unified_memory_app").format(sql.Identifier(role)))
    try:
        with psycopg.connect(make_conninfo(**{**conninfo_to_dict(dsn), "user": role})) as app_conn:
            app_conn.execute("SET LOCAL app.user_id = 'bo'")
            app_conn.execute("SET LOCAL app.org_id = 'acme'")
            assert app_conn.execute("SELECT soft_delete_memory(%s)", [memory]).fetchone() == (True,)
            app_conn.commit()
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app_conn.execute("SELECT * FROM memory_vector_outbox")
            app_conn.rollback()
            with pytest.raises(psycopg.errors.InsufficientPrivilege):  # queued by the triggers, as their owner
                app_conn.execute("INSERT INTO memory_vector_outbox (memory_id) VALUES (%s)", [memory])
            app_conn.rollback()
    finally:
        unified.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    assert sync(unified, milvus, SPEC, EMBEDDER).removed == 1 and stored(milvus, [memory]) == {}


def test_rollback_takes_the_migrated_memories_out_of_the_collection(conn: psycopg.Connection, dsn: str,
                                                                    tmp_path: Path, home: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    fixtures.create(conn, rows=150, shapes={"memory_items": "I1"})
    schema.up(conn)
    path = default_path(tmp_path)
    backup(conn, path)
    migrate(conn, MigrationOptions(batch_size=100))
    (own,) = add(conn, "carla", None, ["written by the application after the migration"])
    monkeypatch.setenv("MILVUS_URI", str(tmp_path / "cli.db"))
    runner = CliRunner()
    for command in (["vectors", "up"], ["vectors", "sync"]):
        assert runner.invoke(app, ["--dsn", dsn, "-q", *command]).exit_code == 0
    victim = conn.execute("SELECT user_id, text FROM memories WHERE source_table IS NOT NULL LIMIT 1").fetchone()
    assert victim is not None
    done = runner.invoke(app, ["--dsn", dsn, "rollback", "--yes", str(path)])
    assert done.exit_code == 0, done.output
    client = MilvusClient(str(tmp_path / "cli.db"))
    client.load_collection(SPEC.name)
    left = client.query(SPEC.name, filter="", output_fields=["id"], limit=10000)
    client.close()
    assert [e["id"] for e in left] == [own]
    found = runner.invoke(app, ["--dsn", dsn, "--json", "vectors", "search", "--user", victim[0], victim[1]])
    assert found.exit_code == 0 and json.loads(found.output)["hits"] == []


HOSTILE = ["José Ñandú", 'say "hi"', "back\\slash\\", "tab\there", "new\nline\r", "\u202eevil", "'", "日本語",
           'x" or user_id != "', "a\\\"b"]


def test_any_tenant_id_finds_exactly_its_own_memories(unified: psycopg.Connection, milvus: MilvusClient) -> None:
    up(milvus, SPEC)
    own = {user: add(unified, user, user if i % 2 else None, [f"note {j} about the harbour of {i}"
                                                             for j in range(3 + i)])
           for i, user in enumerate(HOSTILE)}
    add(unified, "plain", None, ["note 1 about the harbour of 1"])
    sync(unified, milvus, SPEC, EMBEDDER)
    for i, user in enumerate(HOSTILE):
        org = user if i % 2 else None
        result = search(unified, milvus, SPEC, EMBEDDER, user_id=user, org_id=org, text="note about the harbour",
                        k=100)
        assert sorted(h["id"] for h in result.hits) == sorted(own[user]), repr(user)
        assert {(h["user_id"], h["org_id"]) for h in result.hits} == {(user, org)}
    assert verify(unified, milvus, SPEC, EMBEDDER).ok


def test_verify_fails_on_a_tampered_text_org_or_vector(unified: psycopg.Connection, milvus: MilvusClient) -> None:
    up(milvus, SPEC)
    ids = add(unified, "dan", "org1", [f"memory number {i} of dan" for i in range(400)])
    sync(unified, milvus, SPEC, EMBEDDER)
    assert verify(unified, milvus, SPEC, EMBEDDER).ok
    original = milvus.get(SPEC.name, ids=ids[100:103], output_fields=["*"])
    tampered = [{**original[0], "text": original[0]["text"] + "!"}, {**original[1], "org_id": "org2"},
                {**original[2], "embedding": [-x for x in original[2]["embedding"]]}]
    milvus.upsert(SPEC.name, tampered)
    result = verify(unified, milvus, SPEC, EMBEDDER)
    checks = {c.name: c for c in result.checks}
    assert not result.ok and checks["vectors.entities"].evidence["differences"] == {
        "text": 1, "org_id": 1, "embedding": 1}
    assert checks["vectors.tenant_counts"].status == "fail"  # org2 is a tenant memories does not have
    milvus.upsert(SPEC.name, original)
    assert verify(unified, milvus, SPEC, EMBEDDER).ok
    milvus.upsert(SPEC.name, [{**original[0], "is_deleted": True}])
    assert not verify(unified, milvus, SPEC, EMBEDDER).ok


def test_incompatible_collections_are_refused_by_every_command(unified: psycopg.Connection, dsn: str,
                                                               tmp_path: Path, home: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    add(unified, "eve", None, ["something to sync"])
    client = MilvusClient(str(tmp_path / "other.db"))
    flat = MilvusClient.create_schema(auto_id=False)
    from unified_memory.milvus import DataType

    flat.add_field("id", DataType.VARCHAR, max_length=36, is_primary=True)
    flat.add_field("user_id", DataType.VARCHAR, max_length=255)
    flat.add_field("embedding", DataType.FLOAT_VECTOR, dim=768)
    index = client.prepare_index_params()
    index.add_index("embedding", index_type="FLAT", metric_type="COSINE")
    client.create_collection(SPEC.name, schema=flat, index_params=index)
    for call in (lambda: sync(unified, client, SPEC, EMBEDDER), lambda: verify(unified, client, SPEC, EMBEDDER),
                 lambda: search(unified, client, SPEC, EMBEDDER, user_id="eve", org_id=None, text="x")):
        with pytest.raises(VectorStoreError, match="user_id is not the partition key"):
            call()
    client.close()
    monkeypatch.setenv("MILVUS_URI", str(tmp_path / "cli.db"))
    runner = CliRunner()
    assert runner.invoke(app, ["--dsn", dsn, "-q", "vectors", "up"]).exit_code == 0
    for command in (["vectors", "verify", "--dim", "384"], ["vectors", "sync", "--dim", "384", "--embedder", "none"],
                    ["vectors", "search", "--dim", "384", "--user", "eve", "x"],
                    ["vectors", "up", "--dim", "384"]):
        out = runner.invoke(app, ["--dsn", dsn, *command])
        assert out.exit_code == 11 and "Traceback" not in out.output, (command, out.output)
    out = runner.invoke(app, ["--dsn", dsn, "vectors", "verify", "--dim", "384"])
    assert out.exit_code == 11 and "dimension 768, expected 384" in out.output


def test_options_secrets_and_terminal_output(unified: psycopg.Connection, dsn: str, tmp_path: Path, home: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    for bad in (["vectors", "search", "-k", "0", "--user", "u", "x"], ["vectors", "sync", "--batch-size", "0"],
                ["vectors", "verify", "--sample", "0"], ["vectors", "up", "--dim", "0"]):
        out = runner.invoke(app, ["--dsn", dsn, *bad])
        assert out.exit_code == 2, (bad, out.output)
    monkeypatch.setenv("MILVUS_URI", "http://root:hunter2secret@127.0.0.1:9?token=tok3n")
    out = runner.invoke(app, ["--dsn", dsn, "--json", "vectors", "up"])
    assert out.exit_code == 11 and "hunter2secret" not in out.output and "tok3n" not in out.output, out.output
    monkeypatch.setenv("MILVUS_URI", str(tmp_path / "t.db"))
    add(unified, "fay", None, ["\x1b[2J\x1b[31mred alert\u202e gnirts desrever \x07 bell"])
    for command in (["vectors", "up"], ["vectors", "sync"]):
        assert runner.invoke(app, ["--dsn", dsn, "-q", *command]).exit_code == 0
    out = runner.invoke(app, ["--dsn", dsn, "vectors", "search", "--user", "fay", "red alert"])
    assert out.exit_code == 0 and "\\x1b[31mred alert\\u202e" in out.output
    assert "\x1b" not in out.output and "\u202e" not in out.output and "\x07" not in out.output


def test_follow_until_idle_and_health_show_the_lag(unified: psycopg.Connection, milvus: MilvusClient) -> None:
    up(milvus, SPEC)
    ids = add(unified, "gus", None, [f"item {i}" for i in range(30)])
    unified.execute("UPDATE memories SET text = text || ' edited' WHERE id = ANY(%s::uuid[])", [ids[:5]])
    before = health(unified).vectors
    assert before is not None and before["memories_without_vector"] == 30 and before["queued_changes"] == 5
    sync(unified, milvus, SPEC, EMBEDDER)
    unified.execute("DELETE FROM memories WHERE id = ANY(%s::uuid[])", [ids[:4]])
    behind = health(unified).vectors
    assert behind is not None and behind["queued_changes"] == 4 and behind["oldest_change_seconds"] >= 0
    total = follow(unified, milvus, SPEC, EMBEDDER, until_idle=True, interval=0.05)
    assert total.removed == 4
    assert health(unified).vectors == {"queued_changes": 0, "oldest_change_seconds": None,
                                       "memories_without_vector": 0}


def test_an_existing_deployment_picks_up_changes_made_before_the_outbox(conn: psycopg.Connection,
                                                                         milvus: MilvusClient) -> None:
    schema.up(conn, target="017")
    up(milvus, SPEC)
    ids = add(conn, "hal", None, [f"before the outbox {i}" for i in range(6)])
    sync(conn, milvus, SPEC, EMBEDDER)  # a collection synced by the previous version
    conn.execute("UPDATE memories SET deleted_at = now() WHERE id = %s", [ids[0]])
    conn.execute("UPDATE memories SET text = 'changed before 021' WHERE id = %s", [ids[1]])
    conn.execute("DELETE FROM memories WHERE id = %s", [ids[2]])  # invisible to PostgreSQL from now on
    schema.up(conn)
    queued = conn.execute("SELECT memory_id::text FROM memory_vector_outbox ORDER BY seq").fetchall()
    assert sorted(q[0] for q in queued) == sorted(ids[:2])
    step = sync(conn, milvus, SPEC, EMBEDDER)
    assert step.removed == 1 and stored(milvus, [ids[1]])[ids[1]]["text"] == "changed before 021"
    assert not verify(conn, milvus, SPEC, EMBEDDER).ok  # the hard-deleted one is an orphan entity
    assert sync(conn, milvus, SPEC, EMBEDDER, full=True).removed == 1
    assert verify(conn, milvus, SPEC, EMBEDDER).ok and set(stored(milvus, ids)) == set(ids[1:2] + ids[3:])


RECALL_FILL = """
INSERT INTO memories (user_id, org_id, text, decay_tier)
SELECT 'tenant-' || t, CASE WHEN t % 3 = 0 THEN 'org-' || t % 7 END,
       'memory w' || abs(hashtext(t || 'a' || i)) % 200 || ' w' || abs(hashtext(t || 'b' || i)) % 200, 'long'
FROM (SELECT t, CASE WHEN t = 0 THEN 7000 WHEN t <= 3 THEN 2500 WHEN t <= 20 THEN 300 WHEN t <= 120 THEN 40
                     ELSE 1 + t % 9 END AS n FROM generate_series(0, 549) t) sizes, generate_series(1, n) i"""


def test_every_tenant_gets_min_k_n_of_its_own_hits(unified: psycopg.Connection, milvus: MilvusClient) -> None:
    """550 tenants from 1 to 7,000 memories (about 25,000) in one collection: min(k, n) own hits for each."""
    unified.execute(RECALL_FILL)
    spec, embedder = CollectionSpec("recall", 16), HashingEmbedder(16)
    up(milvus, spec)
    assert sync(unified, milvus, spec, embedder, batch_size=5000).synced >= 20000
    unified.execute("UPDATE memories SET deleted_at = now() WHERE user_id = 'tenant-1' AND text LIKE '%w1 %'")
    tenants = unified.execute("SELECT user_id, org_id, count(*) FILTER (WHERE deleted_at IS NULL) FROM memories "
                              "GROUP BY 1, 2").fetchall()
    assert len(tenants) >= 500 and {n for _, _, n in tenants} >= {1, 9, 40, 300, 7000}
    short = []
    for number, (user, org, n) in enumerate(tenants):
        hits = search(unified, milvus, spec, embedder, user_id=user, org_id=org, text=f"memory w{number % 200}",
                      k=5).hits
        if len(hits) != min(5, n) or {(h["user_id"], h["org_id"]) for h in hits} != {(user, org)}:
            short.append((user, org, n, len(hits)))
    assert short == []

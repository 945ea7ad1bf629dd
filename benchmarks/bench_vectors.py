"""Vector sync speed: ``unified-memory vectors sync`` beside a plain pymilvus insert of the same vectors.

    python benchmarks/bench_vectors.py --rows 30000 [--rounds 2] [--dsn postgresql://...]

Data: ``--rows`` memory_items (shape I1) rows, every one with a 768-dimension embedding, migrated; so every
vector the sync writes is a kept legacy vector, and the baseline can insert exactly the same vectors. Tool: a
child process running ``vectors up`` then ``vectors sync`` (read from PostgreSQL, upsert, point embedding_id)
into its own Milvus Lite file; the rate uses the time inside ``sync`` (the child reports it; the baseline too is
timed around its inserts only), wall time beside it. Milvus Lite runs inside the client process, so the child's
peak RSS includes the embedded Milvus server (about 650 MB of it as soon as a client opens a file).
Baseline: a child process too, given the same entities, read beforehand (not timed) as lists of floats, to
``MilvusClient.insert`` in batches of 1,000 into an identical fresh collection in its own Milvus Lite file.
Baseline and tool alternate for ``--rounds`` rounds, each on a fresh file (Milvus Lite is pure Python in the
client's process and two cores are shared with PostgreSQL, so one run varies by several percent); the best of
each side is compared. A second tool figure, for memories without a kept vector, uses the built-in hashing
embedder.
Incremental: after that, 1% of the memories are edited (text) and 0.1% soft-deleted; ``vectors sync`` then
applies only those changes (the outbox of migration 021), timed beside ``vectors sync --full`` (every live
memory re-upserted and every entity checked) of the same state, in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from common import run_tool, scratch_database, server_dsn
from psycopg import sql

from unified_memory import fixtures, schema
from unified_memory.embedders import HashingEmbedder
from unified_memory.migrate import MigrationOptions, migrate
from unified_memory.milvus import MilvusClient
from unified_memory.vectors import TEXT_CHARS, CollectionSpec, up

ENTITIES = """
SELECT m.id::text, m.user_id, m.org_id, m.importance, m.decay_tier, m.memory_type, m.neuro_type, m.ui_source,
       extract(epoch FROM m.created_at)::bigint, extract(epoch FROM m.expires_at)::bigint, m.deleted_at IS NOT NULL,
       m.source_table, left(m.text, %s), e.embedding
FROM memories m JOIN memory_legacy_embeddings e ON e.memory_id = m.id ORDER BY m.id"""
BASELINE_DSN = "UM_BENCH_BASELINE_DSN"
NAMES = ("id", "user_id", "org_id", "importance", "decay_tier", "memory_type", "neuro_type", "ui_source",
         "created_at", "expires_at", "is_deleted", "source_table", "text", "embedding")


def baseline_child(db: str, path: Path) -> None:
    """In its own process: read every entity (not timed), then time the plain insert loop; prints JSON."""
    with psycopg.connect(db) as conn:
        rows = [dict(zip(NAMES, r, strict=True)) for r in conn.execute(ENTITIES, [TEXT_CHARS], binary=True)]
    for row in rows:
        row["embedding"] = [float(x) for x in row["embedding"]]
    client = MilvusClient(str(path))
    up(client, CollectionSpec())
    started = time.monotonic()
    for i in range(0, len(rows), 1000):
        client.insert(CollectionSpec().name, rows[i:i + 1000])
    seconds = time.monotonic() - started
    client.close()
    print(json.dumps({"seconds": seconds, "entities": len(rows)}))


def baseline(db: str, path: Path) -> tuple[float, int]:
    done = subprocess.run([sys.executable, __file__, "--baseline-child", str(path)], check=True,  # the DSN by
                          capture_output=True, text=True, env={**os.environ, BASELINE_DSN: db})  # env: not in ps
    figures = json.loads(done.stdout)
    return figures["seconds"], figures["entities"]


def tool_sync(db: str, path: Path, embedder: str) -> dict[str, float]:
    """Wall time of the child, the time inside ``sync`` it reports, and its peak RSS (Milvus Lite included)."""
    with psycopg.connect(db, autocommit=True) as conn:  # every memory waits for its vector again
        conn.execute("UPDATE memories SET embedding_id = NULL WHERE embedding_id IS NOT NULL")
        conn.execute("VACUUM memories")
    env = {"MILVUS_URI": str(path)}
    run_tool(["--dsn", db, "-q", "--data-dir", str(path.parent / "home"), "vectors", "up"], env)
    sync = run_tool(["--dsn", db, "-q", "--json", "--data-dir", str(path.parent / "home"), "vectors", "sync",
                     "--embedder", embedder], env)
    return {"wall_seconds": round(sync.seconds, 2), "sync_seconds": json.loads(sync.stdout)["seconds"],
            "peak_rss_mb_with_milvus_lite": round(sync.peak_rss_mb, 1)}


def embedder_alone(conn: psycopg.Connection) -> dict[str, float]:
    """The hashing embedder by itself on the same texts, in the sync's batches of 1,000 (old: one text at a time,
    pure Python, kept here as the reference)."""
    texts = [r[0] for r in conn.execute("SELECT left(text, %s) FROM memories ORDER BY id", [TEXT_CHARS])]
    embedder = HashingEmbedder(768)
    started = time.monotonic()
    for i in range(0, len(texts), 1000):
        embedder.embed(texts[i:i + 1000])
    seconds = time.monotonic() - started
    return {"texts": len(texts), "seconds": round(seconds, 2), "rows_per_s": round(len(texts) / seconds)}


def incremental(db: str, path: Path) -> dict[str, object]:
    """1% edited and 0.1% soft-deleted, then ``vectors sync`` (changes only) beside ``vectors sync --full``."""
    with psycopg.connect(db, autocommit=True) as conn:
        edited = conn.execute("UPDATE memories SET text = text || ' (edited)' WHERE abs(hashtext(id::text)) % 100 = 0"
                              ).rowcount
        deleted = conn.execute("UPDATE memories SET deleted_at = now() WHERE abs(hashtext(id::text)) % 1000 = 1"
                               ).rowcount
    env = {"MILVUS_URI": str(path)}
    home = ["--data-dir", str(path.parent / "home")]
    changed = run_tool(["--dsn", db, "-q", "--json", *home, "vectors", "sync", "--embedder", "hashing"], env)
    full = run_tool(["--dsn", db, "-q", "--json", *home, "vectors", "sync", "--full", "--embedder", "hashing"], env)
    return {"edited": edited, "soft_deleted": deleted,
            "incremental_sync": {"seconds": json.loads(changed.stdout)["seconds"], "wall": round(changed.seconds, 2),
                                 "synced": json.loads(changed.stdout)["synced"],
                                 "removed": json.loads(changed.stdout)["removed"]},
            "full_sync": {"seconds": json.loads(full.stdout)["seconds"], "wall": round(full.seconds, 2),
                          "synced": json.loads(full.stdout)["synced"]}}


def best_of(rounds: int, db: str, work: Path) -> tuple[list[float], list[dict[str, float]], int]:
    """Baseline and tool (kept vectors) alternating, each on a fresh Milvus Lite file."""
    base_runs: list[float] = []
    tool_runs: list[dict[str, float]] = []
    entities = 0
    for n in range(max(1, rounds)):
        seconds, entities = baseline(db, work / f"baseline{n}.db")
        base_runs.append(seconds)
        shutil.rmtree(work / f"baseline{n}.db", ignore_errors=True)
        tool_runs.append(tool_sync(db, work / f"tool{n}.db", "none"))
        shutil.rmtree(work / f"tool{n}.db", ignore_errors=True)
    return base_runs, tool_runs, entities


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--baseline-child":
        baseline_child(os.environ[BASELINE_DSN], Path(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=30_000, help="memory_items rows (each with a vector)")
    parser.add_argument("--rounds", type=int, default=2, help="baseline and tool runs, alternating (best kept)")
    parser.add_argument("--dsn", help="server to measure on (a database is created and dropped)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="um-bench-vectors-"))
    try:
        with scratch_database(server_dsn(args.dsn)) as db:
            with psycopg.connect(db, autocommit=True) as conn:
                fixtures.create(conn, rows=args.rows, shapes={"memory_items": "I1"})
                conn.execute(sql.SQL("UPDATE memory_items SET embedding = (SELECT array_agg(((hashtext(id::text || k)) "
                                     "% 1000) / 1000.0) FROM generate_series(1, 768) k)::{}").format(
                    sql.SQL(fixtures.vector_type(conn))))
                schema.up(conn)
                migrate(conn, MigrationOptions(tables=("memory_items",)))
                conn.execute("VACUUM ANALYZE")
                embedding = embedder_alone(conn)
            base_runs, tool_runs, entities = best_of(args.rounds, db, work)
            base_seconds = min(base_runs)
            tool = min(tool_runs, key=lambda run: run["sync_seconds"])
            with psycopg.connect(db, autocommit=True) as conn:
                conn.execute("DELETE FROM memory_legacy_embeddings")
            embedded = tool_sync(db, work / "embedded.db", "hashing")
            changes = incremental(db, work / "embedded.db")
        print(json.dumps({
            "entities": entities,
            "baseline_plain_insert": {"seconds": round(base_seconds, 2), "rows_per_s": round(entities / base_seconds),
                                      "rounds": [round(s, 2) for s in base_runs]},
            "tool_sync_kept_vectors": {**tool, "rows_per_s": round(entities / tool["sync_seconds"]),
                                       "rounds": [run["sync_seconds"] for run in tool_runs]},
            "ratio_tool_to_baseline": round(base_seconds / tool["sync_seconds"], 2),
            "tool_sync_hashing_embedder": {**embedded, "rows_per_s": round(entities / embedded["sync_seconds"])},
            "hashing_embedder_alone": embedding,
            "one_percent_changed": changes,
        }, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

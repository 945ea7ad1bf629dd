"""Tenant-filtered search: own hits, recall and latency of ``vectors search`` beside a plain filtered search.

    python benchmarks/bench_search.py [--dim 128] [--k 5] [--dsn postgresql://...]

Data: 600 tenants of very different sizes in one collection (one of 7,000 memories, three of 2,500, seventeen
of 300, a hundred of 40, the rest 1 to 9: about 26,000 memories), texts of random words, vectors from the
hashing embedder, synced by ``vectors sync`` into a fresh Milvus Lite file. For every tenant one query (a word
mix), at k:
- baseline: ``MilvusClient.search`` with the tenant filter and default search parameters, as the tool did before;
- tool: ``vectors.search`` (exact ranking for tenants up to EXACT_LIMIT live memories, HNSW with a larger ef
  above it, an exact pass if the index returns too few).
Reported: tenants that got fewer than min(k, n) own hits, recall@k against an exact ranking (for the tenants
the index serves), and latency per search (mean and p95).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import psycopg
from common import scratch_database, server_dsn

from unified_memory import schema, vectors
from unified_memory.embedders import HashingEmbedder, Vectors
from unified_memory.milvus import MilvusClient

FILL = """
INSERT INTO memories (user_id, org_id, text, decay_tier)
SELECT 'tenant-' || t, CASE WHEN t % 3 = 0 THEN 'org-' || t % 7 END,
       'memory ' || i || ' w' || abs(hashtext(t || 'a' || i)) % 300 || ' w' || abs(hashtext(t || 'b' || i)) % 300
       || ' w' || abs(hashtext(t || 'c' || i)) % 300, 'long'
FROM (SELECT t, CASE WHEN t = 0 THEN 7000 WHEN t <= 3 THEN 2500 WHEN t <= 20 THEN 300 WHEN t <= 120 THEN 40
                     ELSE 1 + t % 9 END AS n FROM generate_series(0, 599) t) sizes, generate_series(1, n) i"""
OWN = "SELECT id::text FROM memories WHERE user_id = %s AND org_id IS NOT DISTINCT FROM %s"
TENANTS = "SELECT user_id, org_id, count(*) AS n FROM memories GROUP BY 1, 2 ORDER BY n DESC, 1"


def baseline(client: MilvusClient, spec: vectors.CollectionSpec, probe: Vectors, user: str, org: str | None,
             k: int) -> tuple[list[str], float]:
    started = time.monotonic()
    hits = client.search(spec.name, [probe], limit=k, output_fields=["user_id"],
                         filter=vectors.tenant_filter(user, org, live_at=int(time.time())))[0]
    return [str(h["id"]) for h in hits], time.monotonic() - started


def measure(conn: psycopg.Connection, client: MilvusClient, spec: vectors.CollectionSpec,
            embedder: HashingEmbedder, k: int, every: int) -> dict[str, object]:
    tenants = [t for number, t in enumerate(conn.execute(TENANTS).fetchall()) if t[2] >= 40 or number % every == 0]
    stats: dict[str, dict[str, list[float]]] = {"baseline": {"short": [], "ms": [], "recall": []},
                                                "tool": {"short": [], "ms": [], "recall": []}}
    for number, (user, org, n) in enumerate(tenants):
        text = f"w{number % 300} w{(number * 7) % 300} memory"
        probe = embedder.embed([text])[0]
        own = [r[0] for r in conn.execute(OWN, [user, org])]
        truth = [i for i, _ in vectors.exact_by_ids(client, spec, probe, own, k)]
        base_ids, base_s = baseline(client, spec, probe, user, org, k)
        started = time.monotonic()
        tool_ids = [h["id"] for h in vectors.search(conn, client, spec, embedder, user_id=user, org_id=org,
                                                    text=text, k=k).hits]
        tool_s = time.monotonic() - started
        for name, ids, seconds in (("baseline", base_ids, base_s), ("tool", tool_ids, tool_s)):
            stats[name]["short"].append(float(len(ids) < min(k, n)))
            stats[name]["ms"].append(seconds * 1000)
            stats[name]["recall"].append(len(set(ids) & set(truth)) / len(truth) if truth else 1.0)
    return {name: {"tenants": len(tenants), "tenants_short_of_min_k_n": int(sum(s["short"])),
                   "mean_recall_at_k": round(statistics.mean(s["recall"]), 4),
                   "min_recall_at_k": round(min(s["recall"]), 4),
                   "latency_ms_mean": round(statistics.mean(s["ms"]), 1),
                   "latency_ms_p95": round(statistics.quantiles(s["ms"], n=20)[-1], 1)}
            for name, s in stats.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--every", type=int, default=1, help="of the tenants under 40 memories, measure every Nth")
    parser.add_argument("--dsn", help="server to measure on (a database is created and dropped)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="um-bench-search-"))
    try:
        with scratch_database(server_dsn(args.dsn)) as db, psycopg.connect(db, autocommit=True) as conn:
            schema.up(conn)
            conn.execute(FILL)
            spec, embedder = vectors.CollectionSpec("bench_search", args.dim), HashingEmbedder(args.dim)
            client = MilvusClient(str(work / "search.db"))
            vectors.up(client, spec)
            synced = vectors.sync(conn, client, spec, embedder, batch_size=2000)
            result = {"memories": synced.synced, "dim": args.dim, "k": args.k, "exact_limit": vectors.EXACT_LIMIT,
                      **measure(conn, client, spec, embedder, args.k, args.every)}
            client.close()
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

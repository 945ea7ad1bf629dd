"""What the tenant context costs: ``unified_memory.store`` operations beside the same SQL without it.

    python benchmarks/bench_store.py --tenants 200 --per-tenant 250 --ops 2000 [--dsn postgresql://...]

Data: ``--tenants`` x ``--per-tenant`` memories written server-side, then synced into a Milvus Lite collection
(hashing embedder, 64 dimensions). Store: ``with store.tenant(user) as t: t.remember(...) / t.recall() /
t.search(...)`` over a pool of a real LOGIN member of ``unified_memory_app`` (row-level security enforced).
Baseline: the very same ``Tenant`` methods (the same SQL, with the same explicit tenant predicates, in the same
pipelined transaction) over a pool of the superuser, without declaring any role or tenant and without
row-level security. The two sides run interleaved, operation by operation, ``--ops`` each per kind; the figures
are 1 / median latency (robust to bursts of load on a shared machine) and the mean rate. One operation = one
transaction, one thread, one pooled connection per side.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import psycopg
from common import scratch_database, server_dsn
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool

from unified_memory import schema
from unified_memory.embedders import embedder_for
from unified_memory.milvus import MilvusClient
from unified_memory.store import Store, Tenant, VectorSearch
from unified_memory.vectors import CollectionSpec, sync, up

SEED = """
INSERT INTO memories (user_id, text, memory_type, tags, importance, created_at)
SELECT 'bench-user-' || (g %% %(tenants)s), 'memory ' || g || ' about ' || (ARRAY['tea', 'garden', 'travel',
       'music', 'work'])[1 + g %% 5], (ARRAY['fact', 'preference', 'context'])[1 + g %% 3],
       jsonb_build_array((ARRAY['tea', 'garden', 'travel'])[1 + g %% 3]), 1 + g %% 10,
       now() - (g %% 1000) * interval '1 minute'
FROM generate_series(1, %(rows)s) AS g"""

Op = Callable[[Tenant], object]
OPS: dict[str, Op] = {
    "remember": lambda t: t.remember("a new memory about tea", memory_type="fact", tags=["tea"]),
    "recall": lambda t: t.recall(limit=20),
    "search": lambda t: t.search("tea garden", k=10),
}


@contextmanager
def app_login(server: str, database: str) -> Any:
    name = f"um_bench_app_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'bench' IN ROLE unified_memory_app").format(
            sql.Identifier(name)))
    params = conninfo_to_dict(database)
    params.update(user=name, password="bench")
    try:
        yield make_conninfo(**params)
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def direct(pool: ConnectionPool, vectors: VectorSearch) -> Callable[[str], AbstractContextManager[Tenant]]:
    """The baseline's ``tenant``: the same transaction shape and SQL, no declared role or tenant."""
    @contextmanager
    def tenant(user: str) -> Any:
        with pool.connection() as conn, conn.pipeline(), conn.transaction():
            yield Tenant(conn, user, None, vectors)
    return tenant


def paired(sides: dict[str, Callable[[str], AbstractContextManager[Tenant]]], op: Op, users: list[str],
           n: int) -> dict[str, list[float]]:
    """Latencies of ``n`` operations per side, the sides interleaved op by op (alternating which goes first),
    so that a burst of load on the shared machine hits both alike."""
    rng = random.Random(7)
    latencies: dict[str, list[float]] = {s: [] for s in sides}
    for i in range(n):
        user = rng.choice(users)
        for side in (("store", "direct") if i % 2 == 0 else ("direct", "store")):
            started = time.perf_counter()
            with sides[side](user) as t:
                op(t)
            latencies[side].append(time.perf_counter() - started)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn")
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--per-tenant", type=int, default=250)
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--search-ops", type=int, default=300, help="Operations per side for search (slower).")
    parser.add_argument("--only", choices=list(OPS), action="append", help="Measure only these operations.")
    args = parser.parse_args()
    server = server_dsn(args.dsn)
    users = [f"bench-user-{i}" for i in range(args.tenants)]
    with scratch_database(server) as database, tempfile.TemporaryDirectory() as tmp:
        spec, embedder = CollectionSpec("bench_store", 64), embedder_for("hashing", 64)
        client = MilvusClient(str(Path(tmp) / "milvus.db"))
        with psycopg.connect(database, autocommit=True) as conn:
            schema.up(conn)
            conn.execute(SEED, {"tenants": args.tenants, "rows": args.tenants * args.per_tenant})
            conn.execute("ANALYZE memories")
            up(client, spec)
            sync(conn, client, spec, embedder, batch_size=2000)
        vectors = VectorSearch(client, spec, embedder)
        with app_login(server, database) as login, Store.open(login, min_size=1, max_size=1, vectors=vectors) as st, \
                ConnectionPool(database, min_size=1, max_size=1) as pool:
            sides = {"store": st.tenant, "direct": direct(pool, vectors)}
            print("| operation | direct SQL (median) | store (median) | store, mean ops/s | direct, mean ops/s "
                  "| tenant context cost (median latency) |")
            print("| --- | ---: | ---: | ---: | ---: | ---: |")
            for name, op in OPS.items():
                if args.only and name not in args.only:
                    continue
                paired(sides, op, users, max(args.ops // 10, 10))  # warm up: plans, caches, pool
                lat = paired(sides, op, users, args.search_ops if name == "search" else args.ops)
                med = {s: statistics.median(v) for s, v in lat.items()}
                mean_rate = {s: len(v) / sum(v) for s, v in lat.items()}
                print(f"| {name} | {1 / med['direct']:,.3g} ops/s | {1 / med['store']:,.3g} ops/s | "
                      f"{mean_rate['store']:,.3g} | {mean_rate['direct']:,.3g} | "
                      f"{(med['store'] / med['direct'] - 1) * 100:+.1f}% |", flush=True)
        client.close()


if __name__ == "__main__":
    main()

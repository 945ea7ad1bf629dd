"""Issue 11: unified_memory.store, the application's way in, over a real application LOGIN and Milvus Lite."""

from __future__ import annotations

import random
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from roles import APP_ROLE, login_roles

from unified_memory.embedders import embedder_for
from unified_memory.errors import ConfigError, NotFound, StaleVersion
from unified_memory.milvus import MilvusClient
from unified_memory.store import Store, VectorSearch
from unified_memory.vectors import CollectionSpec, sync, up


@pytest.fixture
def logins(server_dsn: str) -> Iterator[Callable[[str, str], str]]:
    with login_roles(server_dsn) as make:
        yield make


@pytest.fixture
def store(unified: psycopg.Connection, dsn: str, logins: Callable[[str, str], str]) -> Iterator[Store]:
    with Store.open(logins(dsn, APP_ROLE), min_size=2, max_size=4) as opened:
        yield opened


def test_the_store_refuses_a_login_that_bypasses_row_level_security(unified: psycopg.Connection, dsn: str) -> None:
    with pytest.raises(ConfigError, match="neither superuser nor BYPASSRLS"):
        Store.open(dsn)  # the test server's superuser
    with pytest.raises(ConfigError, match="non-blank user_id"), Store.__new__(Store).tenant(" "):
        pass


def test_remember_recall_get_update_forget_relate_and_audit(store: Store, unified: psycopg.Connection) -> None:
    with store.tenant("alice") as t:
        tea = t.remember("likes green tea", memory_type="preference", tags=["drinks", "tea"], importance=8)
        walk = t.remember("walks at noon", memory_type="procedural", tags=["habits"], importance=3)
        assert tea.user_id == "alice" and tea.org_id is None and tea.version == 1
        assert {m.id for m in t.recall()} == {walk.id, tea.id}  # one transaction: the same created_at
        assert [m.id for m in t.recall(order="importance")] == [tea.id, walk.id]
        assert [m.id for m in t.recall(memory_type="preference")] == [tea.id]
        assert [m.id for m in t.recall(tags=["tea"])] == [tea.id]
        assert [m.id for m in t.recall(min_importance=5)] == [tea.id]
        changed = t.update(tea.id, text="likes oolong tea", tags=["drinks"], expected_version=1)
        assert changed.version == 2 and changed.text == "likes oolong tea"
        with pytest.raises(StaleVersion):
            t.update(tea.id, importance=9, expected_version=1)
        link = t.relate(tea.id, walk.id, "semantic_link", confidence=0.7)
        t.record_access(tea.id, "read", request_path="/memories")
        assert t.forget(walk.id) and not t.forget(walk.id)
        assert t.get(walk.id) is None and t.get(tea.id) == t.update(tea.id, importance=8)
    with store.tenant("alice", org_id="acme") as work:
        assert work.recall() == []  # personal memories are not the org's
        assert work.get(tea.id) is None
        with pytest.raises(NotFound):
            work.relate(tea.id, walk.id)
        with pytest.raises(NotFound):
            work.record_access(tea.id)
        with pytest.raises(NotFound):
            work.update(tea.id, importance=1)
    rows = unified.execute("SELECT access_type FROM memory_access_log WHERE user_id = 'alice' ORDER BY 1").fetchall()
    assert [r[0] for r in rows] == ["delete", "read"]
    assert unified.execute("SELECT count(*) FROM memory_relationships WHERE id = %s", [link]).fetchone() == (1,)


def test_a_failed_block_rolls_back_and_the_context_never_outlives_it(store: Store) -> None:
    with pytest.raises(psycopg.errors.CheckViolation), store.tenant("bob") as t:
        t.remember("kept?")
        t.remember("bad", importance=11)
    with store.tenant("bob") as t:
        assert t.recall() == []
    for _ in range(4):
        with store.pool.connection() as conn:
            row = conn.execute("SELECT current_user, coalesce(current_setting('app.user_id', true), '') AS u, "
                               "count(*) FROM memories").fetchone()
            assert row is not None and row[0] != APP_ROLE and row[1] == "" and row[2] == 0


def test_many_tenants_on_one_pool_in_parallel_threads_never_see_each_other(store: Store) -> None:
    tenants = [(f"user-{i}", None if i % 3 else f"org-{i % 2}") for i in range(12)]
    written: dict[tuple[str, str | None], set[uuid.UUID]] = defaultdict(set)
    lock = threading.Lock()
    problems: list[str] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(25):
            user, org = rng.choice(tenants)
            with store.tenant(user, org) as t:
                made = t.remember(f"memory of {user}", tags=[user])
                seen = t.recall(limit=1000)
                foreign = [m.id for m in seen if (m.user_id, m.org_id) != (user, org)]
                with lock:
                    written[(user, org)].add(made.id)
                    others = set().union(*(ids for key, ids in written.items() if key != (user, org)))
                probe = rng.choice(sorted(others)) if others else None
                if foreign or (probe is not None and t.get(probe) is not None):
                    problems.append(f"{user}/{org} saw another tenant's memory")

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(work, range(8)))
    assert problems == []
    for (user, org), ids in written.items():
        with store.tenant(user, org) as t:
            assert {m.id for m in t.recall(limit=1000)} == ids


def test_search_is_filtered_on_the_tenant_and_read_back_through_rls(store: Store, unified: psycopg.Connection,
                                                                    tmp_path: Path) -> None:
    spec, embedder = CollectionSpec("store_test", 64), embedder_for("hashing", 64)
    client = MilvusClient(str(tmp_path / "milvus.db"))
    for user in ("alice", "bob"):
        with store.tenant(user) as t:
            t.remember(f"{user} likes green tea in the morning")
            t.remember(f"{user} keeps a garden")
    up(client, spec)
    sync(unified, client, spec, embedder)
    searching = Store(store.pool, vectors=VectorSearch(client, spec, embedder))
    with searching.tenant("alice") as t:
        hits = t.search("green tea", k=10)
    assert hits and all(h.memory.user_id == "alice" for h in hits)
    assert hits[0].memory.text == "alice likes green tea in the morning"
    logged = unified.execute("SELECT results_count FROM memory_access_log WHERE access_type = 'search'").fetchone()
    assert logged == (len(hits),)
    client.close()

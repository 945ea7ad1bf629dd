"""Issue 16: metrics, the dashboard and the alert rules, health in the exposition format, clean output.

Against a real PostgreSQL (a migrated database per test) and a real Milvus Lite; the served endpoint is hit
over HTTP on a free loopback port by concurrent threads.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from typer.testing import CliRunner

from unified_memory import fixtures, metrics, schema
from unified_memory.cli import app
from unified_memory.db import maintenance
from unified_memory.embedders import HashingEmbedder
from unified_memory.migrate import MigrationOptions, migrate
from unified_memory.milvus import MilvusClient
from unified_memory.validate import Check, ValidationReport, record_run, validate
from unified_memory.vectors import CollectionSpec, sync, up

REPO = Path(__file__).resolve().parent.parent
SPEC = CollectionSpec("kari_memories_unified", 64)
# the contract's tables of issues 13 and 17: created here as the contract defines them when a schema file
# has not (the exporter reads them only when they exist)
CHANGES = ("CREATE TABLE IF NOT EXISTS memory_migration_changes ("
           "change_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
           "source_table text NOT NULL, op text NOT NULL, captured_at timestamptz NOT NULL DEFAULT clock_timestamp(), "
           "applied_at timestamptz)")
OUTBOX = ("CREATE TABLE IF NOT EXISTS memory_vector_outbox (memory_id uuid, "
          "queued_at timestamptz NOT NULL DEFAULT clock_timestamp())")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition text, by name and sorted labels (through prometheus_client's parser)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def one(conn: psycopg.Connection, query: str) -> float:
    row = conn.execute(query).fetchone()
    assert row is not None
    return float(row[0])


def connector(dsn: str) -> Callable[[], AbstractContextManager[psycopg.Connection]]:
    return lambda: psycopg.connect(dsn, autocommit=True)


def prepare(conn: psycopg.Connection, milvus_file: Path, rows: int = 200) -> None:
    """A migrated, validated store with every kind of figure non-zero: deleted, expired, decaying memories,
    accesses with errors, waiting live-migration changes and outbox rows, a filled collection."""
    fixtures.create(conn, rows=rows)
    schema.up(conn)
    migrate(conn, MigrationOptions(batch_size=500))
    conn.execute("UPDATE memories SET deleted_at = now() WHERE id IN (SELECT id FROM memories ORDER BY id LIMIT 7)")
    conn.execute("UPDATE memories SET expires_at = now() - interval '1 day' WHERE deleted_at IS NULL AND id IN "
                 "(SELECT id FROM memories WHERE decay_tier <> 'pinned' ORDER BY id DESC LIMIT 5)")
    conn.execute("UPDATE memories SET created_at = now() - interval '400 days', neuro_type = 'episodic', "
                 "expires_at = now() + interval '1 day' WHERE id IN "
                 "(SELECT id FROM memories WHERE deleted_at IS NULL AND decay_tier <> 'pinned' ORDER BY id LIMIT 30 "
                 "OFFSET 40)")
    conn.execute("INSERT INTO memory_access_log (memory_id, user_id, access_type, response_status, accessed_at) "
                 "SELECT id, user_id, (ARRAY['read', 'search', 'update'])[1 + n % 3], "
                 "CASE WHEN n % 4 = 0 THEN 500 ELSE 200 END, now() - (n % 3) * interval '40 minutes' "
                 "FROM (SELECT id, user_id, row_number() OVER (ORDER BY id) AS n FROM memories LIMIT 60) m")
    conn.execute(CHANGES)
    conn.execute("INSERT INTO memory_migration_changes (source_table, op, captured_at, applied_at) "
                 "SELECT 'memory_items', 'U', now() - n * interval '1 minute', CASE WHEN n > 8 THEN now() END "
                 "FROM generate_series(1, 12) n")
    client = MilvusClient(str(milvus_file))
    try:
        up(client, SPEC)
        sync(conn, client, SPEC, HashingEmbedder(SPEC.dimension))
    finally:
        client.close()
    conn.execute(OUTBOX)  # after the sync, which drains what 021's triggers queued
    conn.execute("INSERT INTO memory_vector_outbox (memory_id, queued_at) SELECT id, now() - interval '90 seconds' "
                 "FROM memories LIMIT 4")
    validate(conn)


@pytest.fixture
def store(conn: psycopg.Connection, tmp_path: Path) -> tuple[psycopg.Connection, Path]:
    milvus_file = tmp_path / "milvus.db"
    prepare(conn, milvus_file)
    return conn, milvus_file


def exposition(dsn: str, milvus_file: Path | None) -> str:
    count = metrics.milvus_counter(str(milvus_file), SPEC.name) if milvus_file else None
    read = metrics.reader(connector(dsn), count_entities=count)
    return metrics.render(metrics.SnapshotCollector(read, tolerate_errors=False))


def test_every_metric_has_the_value_sql_gives(store: tuple[psycopg.Connection, Path], dsn: str) -> None:
    conn, milvus_file = store
    s = parse(exposition(dsn, milvus_file))
    assert value(s, "unified_memory_up") == 1
    assert total(s, "unified_memory_memories", state="live") == one(
        conn, "SELECT count(*) FROM memories WHERE deleted_at IS NULL AND (expires_at IS NULL OR expires_at > now())")
    assert total(s, "unified_memory_memories", state="soft_deleted") == 7
    assert total(s, "unified_memory_memories", state="expired") == 5
    assert value(s, "unified_memory_memories", state="live", decay_tier="long", memory_type="general") == one(
        conn, "SELECT count(*) FROM memories WHERE deleted_at IS NULL AND (expires_at IS NULL OR expires_at > now()) "
              "AND decay_tier = 'long' AND memory_type = 'general'")
    candidates = one(conn, "SELECT count(*) FROM active_memories_with_decay WHERE should_cleanup")
    assert candidates >= 30 and total(s, "unified_memory_decay_cleanup_candidates") == candidates
    assert value(s, "unified_memory_tenants") == one(
        conn, "SELECT count(DISTINCT user_id) FROM memories WHERE deleted_at IS NULL")
    largest = one(conn, "SELECT max(n) FROM (SELECT count(*) AS n FROM memories WHERE deleted_at IS NULL "
                        "GROUP BY user_id) t")
    assert value(s, "unified_memory_largest_tenant_share") == pytest.approx(
        largest / one(conn, "SELECT count(*) FROM memories WHERE deleted_at IS NULL"))
    for table, reason, n in conn.execute("SELECT source_table, reason, count(*) FROM memory_migration_quarantine "
                                         "GROUP BY 1, 2"):
        assert value(s, "unified_memory_quarantine_rows", source_table=table, reason=reason) == n
    assert value(s, "unified_memory_migration_last_run_status", status="succeeded") == 1
    assert total(s, "unified_memory_migration_last_run_status") == 1
    assert value(s, "unified_memory_migration_last_run_duration_seconds") == pytest.approx(one(
        conn, "SELECT extract(epoch FROM finished_at - started_at) FROM memory_migration_runs"), abs=1e-3)
    assert value(s, "unified_memory_migration_last_run_rows") == one(
        conn, "SELECT (SELECT count(*) FROM memories) + (SELECT count(*) FROM memory_migration_quarantine)")
    assert value(s, "unified_memory_migration_last_run_rows_per_second") > 0
    assert value(s, "unified_memory_live_migration_waiting") == 8
    assert 8 * 60 <= value(s, "unified_memory_live_migration_oldest_age_seconds") < 8 * 60 + 600
    assert value(s, "unified_memory_vector_outbox_waiting") == 4
    assert 90 <= value(s, "unified_memory_vector_outbox_oldest_age_seconds") < 90 + 600
    for kind, n, errors in conn.execute(
            "SELECT access_type, count(*), count(*) FILTER (WHERE response_status >= 400) FROM memory_access_log "
            "WHERE accessed_at > now() - interval '1 hour' GROUP BY 1"):
        assert value(s, "unified_memory_access_log_rows_last_hour", access_type=kind) == n
        assert value(s, "unified_memory_access_log_errors_last_hour", access_type=kind) == errors
    assert value(s, "unified_memory_access_log_error_ratio_last_hour") == pytest.approx(one(
        conn, "SELECT avg((response_status >= 400)::int) FROM memory_access_log "
              "WHERE accessed_at > now() - interval '1 hour'"))
    assert 0 < value(s, "unified_memory_access_log_error_ratio_last_hour") < 1
    checks, failed = conn.execute("SELECT checks, failed FROM memory_validation_runs").fetchone() or (0, 0)
    assert value(s, "unified_memory_validation_last_run_checks") == checks > 0
    assert value(s, "unified_memory_validation_last_run_failed_checks") == failed
    assert value(s, "unified_memory_validation_last_run_passed") == (1 if failed == 0 else 0)
    assert value(s, "unified_memory_table_size_bytes", table="memories") == one(
        conn, "SELECT pg_table_size('memories')")
    assert value(s, "unified_memory_index_size_bytes", table="memories", index="memories_pkey") == one(
        conn, "SELECT pg_relation_size('memories_pkey')")
    assert value(s, "unified_memory_vectors_up") == 1
    synced = one(conn, "SELECT count(*) FROM memories WHERE embedding_id IS NOT NULL")
    assert value(s, "unified_memory_memories_with_vector") == synced > 0
    assert value(s, "unified_memory_vectors_collection_entities") == synced


def test_a_failed_validation_is_the_last_result(store: tuple[psycopg.Connection, Path], dsn: str) -> None:
    conn, _ = store
    conn.execute("DROP INDEX idx_memories_decay_cleanup")  # the schema contract fails
    report = validate(conn)
    s = parse(exposition(dsn, None))
    assert value(s, "unified_memory_validation_last_run_passed") == 0
    assert value(s, "unified_memory_validation_last_run_failed_checks") == len(report.failed()) > 0
    assert ("unified_memory_vectors_up", ()) not in s  # no Milvus configured: no vector metric at all


def test_milvus_failures_become_vectors_up_0(unified: psycopg.Connection, dsn: str, tmp_path: Path) -> None:
    s = parse(exposition(dsn, tmp_path / "empty-milvus.db"))  # a Milvus Lite without the collection
    assert value(s, "unified_memory_vectors_up") == 0 and value(s, "unified_memory_up") == 1
    assert not any(name == "unified_memory_vectors_collection_entities" for name, _ in s)
    broken = metrics.vector_families(lambda: 1 // 0)  # whatever the failure, a metric, never a crash
    assert [f.samples[0].value for f in broken] == [0]


def test_label_sets_stay_bounded_with_10000_tenants(unified: psycopg.Connection, dsn: str) -> None:
    before = parse(exposition(dsn, None))
    unified.execute(
        "INSERT INTO memories (user_id, org_id, text, decay_tier, memory_type, deleted_at, expires_at) "
        "SELECT 'tenant-' || (n % 10000), CASE WHEN n % 3 = 0 THEN 'org-' || (n % 97) END, 'note ' || n, "
        "(ARRAY['short', 'medium', 'long', 'pinned'])[1 + n % 4], "
        "(ARRAY['general', 'fact', 'preference', 'insight', 'procedural'])[1 + n % 5], "
        "CASE WHEN n % 11 = 0 THEN now() END, CASE WHEN n % 13 = 0 THEN now() - interval '1 hour' END "
        "FROM generate_series(1, 30000) n")
    unified.execute("INSERT INTO memory_access_log (user_id, access_type, response_status) "
                    "SELECT 'tenant-' || n, 'read', 200 FROM generate_series(1, 10000) n")
    text = exposition(dsn, None)
    after = parse(text)
    assert value(after, "unified_memory_tenants") == 10000
    assert "tenant-" not in text and "org-" not in text
    labelled = {name for name, labels in after if labels and not name.startswith("unified_memory_index_")}
    assert {(n, ls) for n, ls in after if n in labelled} == {(n, ls) for n, ls in before if n in labelled}
    assert len(after) < 400
    with pytest.raises(psycopg.errors.QueryCanceled):  # every query runs under the statement_timeout
        metrics.snapshot(unified, timeout_ms=1)
    assert unified.execute("SHOW statement_timeout").fetchone() == ("0",)  # local to the snapshot's transaction
    assert unified.execute("SELECT current_user = session_user").fetchone() == (True,)


def test_serving_answers_concurrent_scrapes_from_one_cached_snapshot(
        store: tuple[psycopg.Connection, Path], dsn: str) -> None:
    reads = 0

    def counting() -> metrics.Snapshot:
        nonlocal reads
        reads += 1
        time.sleep(0.2)  # a slow snapshot: scrapes arriving meanwhile must wait for it, not start their own
        return metrics.reader(connector(dsn))()

    collector = metrics.SnapshotCollector(counting, interval=3600)
    server = metrics.serve(collector, port=0)
    bodies: list[str] = []
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        start = threading.Barrier(16)

        def scrape() -> None:
            start.wait()
            with urllib.request.urlopen(url, timeout=30) as response:
                assert response.status == 200
                bodies.append(response.read().decode())

        threads = [threading.Thread(target=scrape) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(bodies) == 16 and len(set(bodies)) == 1
        assert reads == 1 and collector.refreshes == 1
        assert value(parse(bodies[0]), "unified_memory_snapshot_refreshes_total") == 1
        store[0].execute("INSERT INTO memories (user_id, text) VALUES ('late', 'after the snapshot')")
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.read().decode() == bodies[0]  # within the interval: the cached snapshot
    finally:
        server.stop()
    assert reads == 1


def test_refreshes_at_most_every_interval_and_a_failing_database_is_up_0(dsn: str) -> None:
    now = [0.0]
    collector = metrics.SnapshotCollector(metrics.reader(connector(dsn)), interval=10, clock=lambda: now[0])
    first = parse(metrics.render(collector))  # no schema in this database: up 0, no exception
    assert value(first, "unified_memory_up") == 0 and collector.failures == 1
    now[0] = 5.0
    metrics.render(collector)
    assert collector.refreshes == 1
    now[0] = 10.0
    metrics.render(collector)
    assert collector.refreshes == 2


@pytest.fixture
def login_role(conn: psycopg.Connection, dsn: str) -> Iterator[str]:
    """A real LOGIN role with a password, member of unified_memory_maintenance (not superuser): its DSN."""
    schema.up(conn)
    name, secret = f"um_metrics_{uuid.uuid4().hex[:8]}", f"S3cret-{uuid.uuid4().hex}"
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE unified_memory_maintenance").format(
        sql.Identifier(name), sql.Literal(secret)))
    params = conninfo_to_dict(dsn)
    params.update(user=name, password=secret)
    try:
        yield make_conninfo(**params)
    finally:
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_secrets_and_memory_text_never_appear(conn: psycopg.Connection, login_role: str, home: Path) -> None:
    fixtures.create(conn, rows=150)
    migrate(conn, MigrationOptions())
    validate(conn)
    secret = str(conninfo_to_dict(login_role)["password"])
    runner = CliRunner()
    printed = runner.invoke(app, ["--dsn", login_role, "metrics"])
    assert printed.exit_code == 0, printed.output
    health = runner.invoke(app, ["--dsn", login_role, "health", "--format", "prometheus"])
    assert health.exit_code == 0, health.output
    assert value(parse(printed.stdout), "unified_memory_up") == 1
    assert value(parse(health.stdout), "unified_memory_health_healthy") == 1
    texts = [str(r[0]) for r in conn.execute("SELECT text FROM memories UNION SELECT user_id FROM memories")]
    for output in (printed.output, health.output):
        assert secret not in output and "password" not in output
        assert not [t for t in texts if len(t) > 6 and t in output]


def test_the_maintenance_role_records_validation_runs(conn: psycopg.Connection, login_role: str) -> None:
    report = ValidationReport(checks=[Check("a", "pass", "ok"), Check("b", "fail", "no"), Check("c", "warn", "hm")])
    with psycopg.connect(login_role, autocommit=True) as session, maintenance(session):
        record_run(session, report, datetime.now(UTC))
        row = session.execute("SELECT status, checks, failed, warnings, failed_checks FROM memory_validation_runs"
                              ).fetchone()
    assert row == ("failed", 3, 1, 1, ["b"])


def test_health_prometheus_has_the_json_figures_and_fails_like_every_command(unified: psycopg.Connection,
                                                                               dsn: str, home: Path) -> None:
    fixtures.create(unified, rows=100)
    migrate(unified, MigrationOptions())
    runner = CliRunner()
    as_json = json.loads(runner.invoke(app, ["--dsn", dsn, "health", "--json"]).stdout)
    s = parse(runner.invoke(app, ["--dsn", dsn, "health", "--format", "prometheus"]).stdout)
    for name, n in as_json["counts"].items():
        assert value(s, "unified_memory_health_records", count=name) == n
    for name, n in as_json["quality"].items():
        assert value(s, "unified_memory_health_quality_problems", check=name) == n
    assert value(s, "unified_memory_health_quarantined") == as_json["quarantined"]
    assert value(s, "unified_memory_health_healthy") == 1
    unified.execute("UPDATE memory_migration_runs SET status = 'failed'")
    failed = runner.invoke(app, ["--dsn", dsn, "health", "--format", "prometheus"])
    assert failed.exit_code == 10 and "FAILED: health found problems: last migration run" in failed.stderr
    assert value(parse(failed.stdout), "unified_memory_health_healthy") == 0
    failed_json = runner.invoke(app, ["--dsn", dsn, "--json", "health"])
    assert failed_json.exit_code == 10
    assert json.loads(failed_json.stdout.strip().splitlines()[-1])["status"] == "failed"
    bad = runner.invoke(app, ["--dsn", dsn, "health", "--format", "xml"])
    assert bad.exit_code == 2 and "FAILED: --format takes text, json or prometheus" in bad.stderr


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
             "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions, keywords, label lists,
    label matchers or durations."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    names = re.findall(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr)
    return {n for n in names if n.lower() not in _KEYWORDS}


def test_alert_rules_and_the_dashboard_name_only_metrics_the_exporter_emits(
        store: tuple[psycopg.Connection, Path], dsn: str) -> None:
    _, milvus_file = store
    emitted = {f.name for f in text_string_to_metric_families(exposition(dsn, milvus_file))}
    emitted |= {s.name for f in text_string_to_metric_families(exposition(dsn, milvus_file)) for s in f.samples}
    rules = yaml.safe_load((REPO / "deploy/prometheus/unified-memory-alerts.yml").read_text())
    alerts = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    for wanted in ("MigrationFailed", "ValidationFailing", "QuarantineGrowing", "LiveMigrationLag",
                   "VectorsOutOfStep", "ErrorRateHigh"):
        assert f"UnifiedMemory{wanted}" in alerts
    dashboard = json.loads((REPO / "deploy/grafana/unified-memory-dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus" and len(panels) > 20
    expressions = list(alerts.values()) + [t["expr"] for p in panels for t in p["targets"]]
    for expr in expressions:
        names = metric_names(expr)
        assert names, expr
        assert names <= emitted, f"{expr}: {sorted(names - emitted)} not emitted"
    assert metric_names('sum by (reason) (rate(x_total{a="b"}[5m])) > on(job) y') == {"x_total", "y"}


def test_third_party_noise_is_hidden_unless_verbose() -> None:
    probe = ("import logging, warnings, platformdirs; from unified_memory import logs; "
             "logs.third_party(verbose={v}); from unified_memory import milvus; import grpc; "
             "warnings.warn('XDG_RUNTIME_DIR is not set', platformdirs.RuntimeDirWarning); "
             "logging.getLogger('pymilvus.client.iterator.query_iterator').warning('failed to get mvccTs'); "
             "grpc.insecure_channel('127.0.0.1:1').close()")
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    env["GRPC_TRACE"] = "connectivity_state"  # gRPC core's own log lines, as its transport chatter is logged
    quiet, loud = (subprocess.run([sys.executable, "-c", probe.format(v=v)], capture_output=True, text=True, env=env,
                                  timeout=120)
                   for v in (False, True))
    assert quiet.returncode == loud.returncode == 0
    assert quiet.stderr == ""
    assert "RuntimeDirWarning" in loud.stderr and "mvccTs" in loud.stderr and "connectivity_state" in loud.stderr


def test_the_cli_serves_on_loopback_and_prints_once(store: tuple[psycopg.Connection, Path], dsn: str,
                                                    home: Path) -> None:
    once = CliRunner().invoke(app, ["--dsn", dsn, "metrics"])
    assert once.exit_code == 0 and value(parse(once.stdout), "unified_memory_up") == 1
    serving = subprocess.Popen([str(Path(sys.executable).parent / "unified-memory"), "--dsn", dsn, "metrics",
                                "--serve", "0", "--interval", "60"], stderr=subprocess.PIPE, text=True)
    try:
        assert serving.stderr is not None
        line = serving.stderr.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", line)
        assert match, line
        for _ in range(2):
            with urllib.request.urlopen(f"http://127.0.0.1:{match.group(1)}/metrics", timeout=60) as response:
                s = parse(response.read().decode())
        assert value(s, "unified_memory_up") == 1 and value(s, "unified_memory_snapshot_refreshes_total") == 1
    finally:
        serving.terminate()
        serving.wait(timeout=30)


def test_validate_and_health_commands_are_thin() -> None:
    import inspect

    from unified_memory import cli

    for command in (cli.validate_cmd, cli.health_cmd, cli.metrics_cmd):
        source = inspect.getsource(command)
        body = source.split('"""', 2)[2].strip().splitlines()
        assert len(body) <= 15, (command.__name__, len(body))

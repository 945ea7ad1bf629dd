"""Validation: checks that can fail, each with its evidence (numbers and ids, never memory text).

Categories: schema (the contract in ``contract.py``), data integrity, reconciliation with the source
(``reconcile.py``), tenant isolation (a real session as the application role), index use (EXPLAIN after
ANALYZE) and the helper functions (exercised in a transaction that is rolled back). Every check returns
pass, warn or fail; the report passes only when nothing fails.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

import psycopg
from psycopg import sql
from psycopg.rows import scalar_row
from psycopg.types.json import Jsonb

from . import contract, drift, isolation, privileges, reconcile
from .backup import BackupManifest
from .checks import FAIL, PASS, SECONDS, WARN, Check, Serialised, Status, ValidationStatus
from .db import all_rows, analyze, first_column, maintenance, one_row, relation_exists, scalar
from .errors import ShapeError, ValidationFailed, flag
from .mapping import MEMORY_TYPES, NEURO_TYPES, UI_SOURCES
from .parallel import Workers, companion, default_jobs
from .shapes import LEGACY_TABLES, detect

log = logging.getLogger("unified_memory.validate")

__all__ = ["FAIL", "PASS", "WARN", "Check", "ValidationReport", "validate"]


@dataclass
class ValidationReport(Serialised):
    """Every check, and the distributions the guide lists (for people)."""

    json_derived: ClassVar[dict[str, str]] = {"status": "status", "counts": "counts"}
    json_order: ClassVar[tuple[str, ...]] = ("status", "counts", "seconds", "totals", "checks", "distributions")

    checks: list[Check] = field(default_factory=list)
    distributions: dict[str, list[list[Any]]] = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)
    seconds: float = field(default=0.0, metadata=SECONDS)

    @property
    def counts(self) -> dict[Status, int]:
        """Checks per verdict."""
        return {s: sum(c.status == s for c in self.checks) for s in (PASS, WARN, FAIL)}

    @property
    def status(self) -> Status:
        statuses = {c.status for c in self.checks}
        return FAIL if FAIL in statuses else WARN if WARN in statuses else PASS

    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    def raise_for_failure(self) -> None:
        """Raises ValidationFailed naming the failed checks (the CLI's exit code 10)."""
        if self.status == FAIL:
            raise ValidationFailed(f"{len(self.failed())} validation checks failed: "
                                   + ", ".join(c.name for c in self.failed()[:10]))


VectorChecks = Callable[[psycopg.Connection], list[Check]]


def validate(conn: psycopg.Connection, *, manifest: BackupManifest | None = None,
             vectors: VectorChecks | None = None) -> ValidationReport:
    """Run every check against ``conn``'s database (autocommit connection; nothing is changed but the run's row
    in ``memory_validation_runs``, which monitoring reads)."""
    started, began = time.monotonic(), datetime.now(UTC)
    report = ValidationReport()
    with maintenance(conn):
        privileges.require(conn, "validate")
        _run_checks(conn, report, manifest, vectors)
        report.seconds = time.monotonic() - started
        record_run(conn, report, began)
    return report


def _run_checks(conn: psycopg.Connection, report: ValidationReport, manifest: BackupManifest | None,
                vectors: VectorChecks | None) -> None:
    report.checks += schema_checks(conn)
    if not relation_exists(conn, "memory_migration_runs"):
        report.checks.append(Check("schema.bookkeeping", FAIL, "migration 017 (the data migration's bookkeeping) "
                                   "is not applied: run `unified-memory schema up`"))
    if any(c.name in ("schema.tables", "schema.bookkeeping") and c.status == FAIL for c in report.checks):
        return
    with ExitStack() as stack:
        # beside the scans when a connection is to spare (while one table's slices finish, a core would otherwise
        # wait); else after them, on this connection
        side = _spare_connection(conn, stack)
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="unified-memory"))
        probed = pool.submit(_probe_checks, side) if side is not None else None
        try:
            report.checks += integrity_checks(conn) + reconciliation_checks(conn, manifest)
            checks, report.distributions, report.totals = probed.result() if probed else _probe_checks(conn)
        except BaseException:  # Ctrl-C or an error: stop the probe's query too, not only the scans
            if side is not None:
                side.cancel_safe()
            raise
    report.checks += checks
    if vectors is not None:
        report.checks += vectors(conn)


def _spare_connection(conn: psycopg.Connection, stack: ExitStack) -> psycopg.Connection | None:
    """A companion of ``conn`` (closed with ``stack``) when the server has a core and a connection to spare."""
    if default_jobs(conn) <= 1:
        return None
    try:
        return stack.enter_context(companion(conn))
    except psycopg.OperationalError as exc:  # the role's or the server's connection limit
        log.info("validate runs its probes after the scans: no second connection (%s)", exc.sqlstate)
        return None


def _probe_checks(conn: psycopg.Connection) -> tuple[list[Check], dict[str, list[list[Any]]], dict[str, Any]]:
    """Isolation, index and function probes, and the distributions: what needs no full scan of the sources."""
    checks = isolation_checks(conn) + index_checks(conn) + function_checks(conn)
    return (checks, *distributions(conn))


def record_run(conn: psycopg.Connection, report: ValidationReport, began: datetime) -> None:
    """One row in ``memory_validation_runs`` (023) for monitoring; nothing when 023 is not applied."""
    if not relation_exists(conn, "memory_validation_runs"):
        return
    recorded: ValidationStatus = "failed" if report.status == FAIL else "passed"
    conn.execute("INSERT INTO memory_validation_runs (started_at, status, checks, failed, warnings, failed_checks) "
                 "VALUES (%s, %s, %s, %s, %s, %s)",
                 [began, recorded, len(report.checks), len(report.failed()),
                  sum(c.status == WARN for c in report.checks), Jsonb([c.name for c in report.failed()])])


def _verdict(name: str, problems: list[str], ok: str, evidence: dict[str, Any] | None = None,
             *, warn: bool = False) -> Check:
    if not problems:
        return Check(name, PASS, ok, evidence or {})
    shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
    return Check(name, WARN if warn else FAIL, shown, {**(evidence or {}), "problems": problems[:50]})


# ------------------------------------------------------------------------------------------- schema
def schema_checks(conn: psycopg.Connection) -> list[Check]:
    """The catalog against the contract: tables, columns, constraints, indexes, functions, triggers, views."""
    here = scalar(conn, "SELECT current_schema()")
    tables = set(first_column(conn, "SELECT relname FROM pg_class WHERE relnamespace = current_schema()::regnamespace "
                                    "AND relkind IN ('r', 'p')"))
    missing = [f"table {t} is missing" for t in contract.COLUMNS if t not in tables]
    checks = [_verdict("schema.tables", missing, "memories, memory_access_log and memory_relationships exist",
                       {"schema": here})]
    if missing:
        return checks
    return checks + [_columns(conn), _constraints(conn), _indexes(conn), _functions(conn), _triggers(conn),
                     _views(conn), _policies(conn), _drift(conn)]


def _drift(conn: psycopg.Connection) -> Check:
    found = drift.check(conn)
    return _verdict("schema.drift", [f"{d} (`schema repair` recreates it)" for d in found],
                    "every object of the applied schema files is as they left it")


def _columns(conn: psycopg.Connection) -> Check:
    live = {(t, c): (typ, nullable == "YES", default) for t, c, typ, nullable, default in conn.execute(
        "SELECT table_name, column_name, data_type, is_nullable, column_default FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = ANY(%s)", [list(contract.COLUMNS)])}
    problems = []
    for table, columns in contract.COLUMNS.items():
        for name, rule in columns.items():
            found = live.get((table, name))
            if found is None:
                problems.append(f"{table}.{name} is missing")
                continue
            typ, nullable, default = found
            if typ != rule.type:
                problems.append(f"{table}.{name} is {typ}, expected {rule.type}")
            if nullable and not rule.nullable:
                problems.append(f"{table}.{name} accepts NULL")
            if rule.default is not None and rule.default not in (default or ""):
                problems.append(f"{table}.{name} default is {default!r}, expected {rule.default!r}")
    total = sum(len(c) for c in contract.COLUMNS.values())
    return _verdict("schema.columns", problems, f"{total} columns with their types, nullability and defaults")


def _constraints(conn: psycopg.Connection) -> Check:
    live = {r["conname"]: r for r in all_rows(
        conn, "SELECT conname, conrelid::regclass::text AS table_name, convalidated FROM pg_constraint "
        "WHERE connamespace = current_schema()::regnamespace")}
    problems = []
    for name, table in contract.CONSTRAINTS.items():
        if name not in live or live[name]["table_name"] != table:
            problems.append(f"constraint {name} on {table} is missing")
        elif not live[name]["convalidated"]:
            problems.append(f"constraint {name} is NOT VALID")
    fks = first_column(
        conn, "SELECT confrelid::regclass::text FROM pg_constraint WHERE conrelid = 'memory_relationships'::regclass "
        "AND contype = 'f'")
    if sorted(fks) != ["memories", "memories"]:
        problems.append(f"memory_relationships foreign keys point at {sorted(fks)}, expected memories")
    return _verdict("schema.constraints", problems, f"{len(contract.CONSTRAINTS)} constraints present and valid")


def _indexes(conn: psycopg.Connection) -> Check:
    live = {name: valid for name, valid in conn.execute(
        "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE c.relnamespace = current_schema()::regnamespace")}
    deferred = set(first_column(conn, "SELECT index_name FROM memory_migration_deferred_indexes")) \
        if relation_exists(conn, "memory_migration_deferred_indexes") else set()
    problems = [f"index {n} is missing" + (" (dropped for a load; re-run migrate)" if n in deferred else "")
                for n in contract.INDEXES if n not in live]
    problems += [f"index {n} is invalid" for n in contract.INDEXES if n in live and not live[n]]
    return _verdict("schema.indexes", problems, f"{len(contract.INDEXES)} indexes present and valid")


def _functions(conn: psycopg.Connection) -> Check:
    rows = all_rows(conn, "SELECT proname, pronargs, provolatile FROM pg_proc "
                          "WHERE pronamespace = current_schema()::regnamespace AND proname = ANY(%s)",
                    [list(contract.FUNCTIONS)])
    problems = []
    for name, nargs in contract.FUNCTIONS.items():
        found = [r for r in rows if r["proname"] == name]
        if not found:
            problems.append(f"function {name} is missing")
        elif len(found) > 1:
            problems.append(f"function {name} has {len(found)} definitions (calls are ambiguous; legacy overload?)")
        elif found[0]["pronargs"] != nargs:
            problems.append(f"function {name} takes {found[0]['pronargs']} arguments, expected {nargs}")
        elif name in contract.NOT_IMMUTABLE and found[0]["provolatile"] == "i":
            problems.append(f"function {name} is declared IMMUTABLE but reads the clock")
    return _verdict("schema.functions", problems, f"{len(contract.FUNCTIONS)} functions, one definition each")


def _triggers(conn: psycopg.Connection) -> Check:
    live = {n: (t, enabled) for n, t, enabled in conn.execute(
        "SELECT tgname, tgrelid::regclass::text, tgenabled::text FROM pg_trigger WHERE NOT tgisinternal")}
    problems = [f"trigger {n} on {t} is missing" for n, t in contract.TRIGGERS.items() if live.get(n, ("",))[0] != t]
    problems += [f"trigger {n} is disabled" for n in contract.TRIGGERS if n in live and live[n][1] == "D"]
    return _verdict("schema.triggers", problems, "insert and update triggers present and enabled")


def _views(conn: psycopg.Connection) -> Check:
    reads: dict[str, set[str]] = {}
    for view, table in conn.execute(
            "SELECT DISTINCT v.relname, t.relname FROM pg_rewrite r JOIN pg_class v ON v.oid = r.ev_class "
            "JOIN pg_depend d ON d.objid = r.oid JOIN pg_class t ON t.oid = d.refobjid "
            "WHERE v.relnamespace = current_schema()::regnamespace AND v.relkind = 'v' AND t.relkind IN ('r', 'p') "
            "AND t.oid <> v.oid"):
        reads.setdefault(view, set()).add(table)
    problems = []
    for view, tables in contract.VIEWS.items():
        if view not in reads:
            problems.append(f"view {view} is missing")
        elif reads[view] != set(tables):
            problems.append(f"view {view} reads {sorted(reads[view])}, expected {list(tables)}")
    return _verdict("schema.views", problems, f"{len(contract.VIEWS)} views over the unified tables")


def _policies(conn: psycopg.Connection) -> Check:
    live = {(p, t) for p, t in conn.execute(
        "SELECT policyname, tablename FROM pg_policies WHERE schemaname = current_schema()")}
    problems = [f"policy {p} on {t} is missing" for p, t in contract.POLICIES.items() if (p, t) not in live]
    if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [contract.APP_ROLE]).fetchone() is None:
        problems.append(f"role {contract.APP_ROLE} does not exist")
    return _verdict("schema.policies", problems, "tenant policies and the application role exist")


# ------------------------------------------------------------------------------------------- integrity
def _in(values: tuple[str, ...]) -> str:
    return "(" + ", ".join("'" + v + "'" for v in values) + ")"


INTEGRITY_RULES: dict[str, str] = {
    "empty_text": "text IS NULL OR btrim(text) = ''",
    "importance_range": "importance IS NULL OR importance NOT BETWEEN 1 AND 10",
    "decay_tier_vocabulary": "decay_tier IS NULL OR decay_tier NOT IN ('short', 'medium', 'long', 'pinned')",
    "memory_type_vocabulary": f"memory_type IS NULL OR memory_type NOT IN {_in(MEMORY_TYPES.allowed)}",
    "neuro_type_vocabulary": f"neuro_type IS NULL OR neuro_type NOT IN {_in(NEURO_TYPES.allowed)}",
    "ui_source_vocabulary": f"ui_source IS NULL OR ui_source NOT IN {_in(UI_SOURCES.allowed)}",
    "tags_array": "tags IS NULL OR jsonb_typeof(tags) <> 'array'",
    "meta_object": "meta IS NULL OR jsonb_typeof(meta) <> 'object'",
    "expiry_matches_tier": "(decay_tier = 'pinned') <> (expires_at IS NULL)",
    "decay_lambda_set": "decay_lambda IS NULL",
    "provenance_complete": "(source_table IS NULL) <> (source_key IS NULL)",
    "expired_on_arrival": "migrated_at IS NOT NULL AND expires_at IS NOT NULL AND expires_at <= migrated_at",
}


def integrity_checks(conn: psycopg.Connection) -> list[Check]:
    """One scan of memories counting every rule's violations; ids of offenders (never text)."""
    filters = sql.SQL(", ").join(sql.SQL("count(*) FILTER (WHERE {}) AS {}").format(sql.SQL(c), sql.Identifier(r))
                                 for r, c in INTEGRITY_RULES.items())
    row = one_row(conn, sql.SQL("SELECT count(*) AS memories, {} FROM memories").format(filters))
    assert row is not None
    expiry_by_choice = scalar(conn, "SELECT count(*) FROM memory_migration_runs WHERE options ->> 'expiry' = "
                                     "'created' AND status IN ('succeeded', 'running', 'interrupted')")
    checks = []
    for rule, condition in INTEGRITY_RULES.items():
        count = row[rule]
        evidence: dict[str, Any] = {"memories": int(row["memories"]), "violations": int(count)}
        if not count:
            checks.append(Check(f"integrity.{rule}", PASS, f"no violation among {row['memories']} memories", evidence))
            continue
        evidence["sample_ids"] = [str(i) for i in first_column(
            conn, sql.SQL("SELECT id FROM memories WHERE {} ORDER BY id LIMIT 10").format(sql.SQL(condition)))]
        chosen = rule == "expired_on_arrival" and expiry_by_choice
        checks.append(Check(f"integrity.{rule}", WARN if chosen else FAIL,
                            f"{count} memories violate {rule}" + (f" (the run chose {flag('expiry')} created)" if chosen
                                                                   else ""), evidence))
    return checks


# ------------------------------------------------------------------------------------------- reconciliation
def reconciliation_checks(conn: psycopg.Connection, manifest: BackupManifest | None) -> list[Check]:
    """Per legacy table: every source row has one outcome, and migrated content equals the mapped source.
    Counts run per table, content per slice of each table, on parallel connections (``parallel.default_jobs``)."""
    tz = str(scalar(conn, "SELECT coalesce((SELECT options ->> 'source_timezone' FROM memory_migration_runs "
                           "WHERE status = 'succeeded' ORDER BY run_id DESC LIMIT 1), 'UTC')"))
    with Workers(conn, default_jobs(conn)) as workers:
        counted = workers.map(lambda c, t: _count_table(c, t, manifest), list(LEGACY_TABLES))
        checks = []
        for table, (count_check, shape) in zip(LEGACY_TABLES, counted, strict=True):
            checks.append(count_check)
            if shape is not None:
                checks.append(_content_check(conn, table, shape, tz, workers))
    return checks


def _count_table(conn: psycopg.Connection, table: str, manifest: BackupManifest | None) -> tuple[Check, str | None]:
    try:
        found = detect(conn, table)
    except ShapeError as exc:
        return Check(f"reconciliation.counts.{table}", FAIL, str(exc)), None
    if found is None:
        return _without_source(conn, table, manifest), None
    account = reconcile.counts(conn, table, found.shape)
    left = int(account["unaccounted"]) + int(account.get("waiting", 0))  # waiting: run migrate to catch up
    message = (f"{account['source_rows']} source rows = {account['migrated']} migrated + {account['duplicates']}"
               f" duplicates + {account['quarantined']} quarantined + {account.get('waiting', 0)} waiting for "
               "catch-up")
    return Check(f"reconciliation.counts.{table}", PASS if left == 0 else FAIL,
                 message if left == 0 else f"{left} source rows (or items) have no outcome "
                                           f"or more than one; {message}", account), found.shape


def _content_check(conn: psycopg.Connection, table: str, shape: str, tz: str, workers: Workers) -> Check:
    diff = reconcile.content(conn, table, shape, source_timezone=tz, workers=workers)
    return Check(
        f"reconciliation.content.{table}", PASS if diff.equal else FAIL,
        f"mapped content equal for {diff.compared_rows} memories of {diff.tenants} tenants" if diff.equal else
        f"content differs for {len(diff.differing_tenants)} tenants; keys: {', '.join(diff.differing_keys[:5])}",
        diff.to_dict())


def _without_source(conn: psycopg.Connection, table: str, manifest: BackupManifest | None) -> Check:
    name = f"reconciliation.counts.{table}"
    entry = manifest.tables.get(table) if manifest else None
    if entry is None:
        seen = reconcile.outcomes_without_source(conn, table)
        status = WARN if seen else PASS
        hint = f" but {seen} rows have outcomes: pass {flag('backup')} to reconcile against its manifest"
        return Check(name, status, f"{table} is absent" + (hint if seen else ""),
                     {"outcomes": seen})
    seen = reconcile.outcomes_without_source(conn, table)
    ok = seen == entry.rows
    return Check(name, PASS if ok else FAIL, f"{table} is gone; the backup manifest holds {entry.rows} rows and "
                 f"{seen} have an outcome", {"manifest_rows": entry.rows, "outcomes": seen})


# ------------------------------------------------------------------------------------------- isolation
def isolation_checks(conn: psycopg.Connection) -> list[Check]:
    """RLS enabled and forced; a real application session sees and writes only its own tenant."""
    flags = {t: (rls, force) for t, rls, force in conn.execute(
        "SELECT relname, relrowsecurity, relforcerowsecurity FROM pg_class "
        "WHERE relnamespace = current_schema()::regnamespace AND relname = ANY(%s)", [list(contract.RLS_TABLES)])}
    problems = [f"row-level security is {'not forced' if flags.get(t, (False,))[0] else 'disabled'} on {t}"
                for t in contract.RLS_TABLES if flags.get(t) != (True, True)]
    checks = [_verdict("isolation.rls", problems, "row-level security enabled and forced on memories, the log and "
                       "the relationships")]
    owners = scalar(conn, "SELECT count(*) FROM memories WHERE user_id IS NULL OR btrim(user_id) = ''")
    checks.append(_verdict("isolation.owners", [f"{owners} memories have no owner"] if owners else [],
                           "every memory has an owner"))
    checks.append(_sessions(conn))
    for finding in (isolation.reachable(conn), isolation.reserved_columns(conn), isolation.audit_append_only(conn),
                    isolation.probes(conn)):
        checks.append(_verdict(finding.name, finding.problems, finding.ok, finding.evidence))
    return checks


def _sessions(conn: psycopg.Connection) -> Check:
    problems: list[str] = []
    sampled = all_rows(conn, "SELECT user_id, org_id, count(*) AS memories FROM memories GROUP BY user_id, org_id "
                             "ORDER BY count(*) DESC, user_id LIMIT 3")
    with conn.transaction(force_rollback=True):
        probes = first_column(
            conn, "INSERT INTO memories (user_id, org_id, text) VALUES ('um-validate:a', NULL, 'probe a'), "
            "('um-validate:b', NULL, 'probe b') RETURNING id")
        conn.execute("INSERT INTO memory_access_log (memory_id, user_id, access_type) VALUES (%s, 'um-validate:b', "
                     "'read')", [probes[1]])
        tenants = [*((r["user_id"], r["org_id"], r["memories"]) for r in sampled), ("um-validate:a", None, 1)]
        try:
            with _as_app(conn):
                for user, org, expected in tenants:
                    problems += _one_tenant(conn, str(user), org, int(expected))
                problems += _forged_write(conn)
        except psycopg.Error as exc:
            problems.append(f"the application session failed: [{exc.sqlstate}] {exc.diag.message_primary}")
    return _verdict("isolation.sessions", problems,
                    f"as {contract.APP_ROLE}, {len(tenants)} tenants each saw only their own rows; forged writes "
                    "refused", {"tenants_sampled": len(tenants)})


@contextmanager
def _as_app(conn: psycopg.Connection) -> Iterator[None]:
    with conn.transaction():
        conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(contract.APP_ROLE)))
        conn.execute("SET LOCAL row_security = on")
        yield


def _one_tenant(conn: psycopg.Connection, user: str, org: str | None, expected: int) -> list[str]:
    conn.execute("SELECT set_config('app.user_id', %s, true), set_config('app.org_id', %s, true)", [user, org or ""])
    seen = one_row(conn, "SELECT count(*) AS visible, count(*) FILTER (WHERE user_id <> %s OR org_id IS DISTINCT "
                         "FROM %s) AS foreign_rows FROM memories", [user, org])
    logs = scalar(conn, "SELECT count(*) FROM memory_access_log WHERE user_id <> %s", [user])
    assert seen is not None
    foreign, own = seen["foreign_rows"], seen["visible"] - seen["foreign_rows"]
    problems = []
    if foreign or logs:
        problems.append(f"tenant {user}/{org} sees {foreign} memories and {logs} log rows of other tenants")
    if own != expected:
        problems.append(f"tenant {user}/{org} sees {own} of its {expected} memories")
    return problems


def _forged_write(conn: psycopg.Connection) -> list[str]:
    try:
        with conn.transaction():
            conn.execute("INSERT INTO memories (user_id, text) VALUES ('um-validate:b', 'forged')")
    except psycopg.errors.InsufficientPrivilege:
        return []
    return ["a session for tenant um-validate:a could write a memory owned by um-validate:b"]


# ------------------------------------------------------------------------------------------- indexes
CANONICAL_QUERIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "by_user": ("SELECT id FROM memories WHERE user_id = %(u)s AND deleted_at IS NULL",
                ("idx_memories_user", "idx_memories_tenant", "idx_memories_tenant_type",
                 "idx_memories_tenant_importance")),
    "by_user_org": ("SELECT id FROM memories WHERE user_id = %(u)s AND org_id = %(o)s AND deleted_at IS NULL",
                    ("idx_memories_tenant", "idx_memories_tenant_type", "idx_memories_tenant_importance",
                     "idx_memories_user")),  # on a small table they tie on cost, the order of creation decides
    "by_user_type": ("SELECT id FROM memories WHERE user_id = %(u)s AND org_id = %(o)s AND memory_type = %(t)s "
                     "AND deleted_at IS NULL ORDER BY created_at DESC LIMIT 20",
                     ("idx_memories_tenant_type",)),
    "recent": ("SELECT id FROM memories WHERE deleted_at IS NULL ORDER BY created_at DESC LIMIT 20",
               ("idx_memories_created",)),
    "expiring": ("SELECT id FROM memories WHERE deleted_at IS NULL AND decay_tier = 'short' "
                 "AND expires_at < now() + interval '1 day'",
                 ("idx_memories_decay_tier", "idx_memories_decay_cleanup", "idx_memories_expires")),
}


def index_checks(conn: psycopg.Connection) -> list[Check]:
    """EXPLAIN the canonical tenant queries after ANALYZE: each must use one of its intended indexes."""
    analyze(conn)
    params = one_row(conn, "SELECT user_id AS u, coalesce(org_id, '') AS o, memory_type AS t FROM memories "
                           "ORDER BY org_id IS NULL, id LIMIT 1") or {"u": "nobody", "o": "", "t": "general"}
    small = scalar(conn, "SELECT reltuples < 10000 FROM pg_class WHERE oid = 'memories'::regclass")
    checks = []
    for name, (query, intended) in CANONICAL_QUERIES.items():
        used = _indexes_used(conn, query, params, seqscan=True)
        note = ""
        if not set(used) & set(intended) and small:
            used = _indexes_used(conn, query, params, seqscan=False)
            note = " (small table: sequential scans and sorts off)"
        ok = bool(set(used) & set(intended))
        checks.append(Check(f"indexes.{name}", PASS if ok else FAIL,
                            f"uses {', '.join(used)}{note}" if ok else
                            f"uses {', '.join(used) or 'no index'}; expected one of {', '.join(intended)}",
                            {"indexes_used": used, "intended": list(intended)}))
    return checks


def _indexes_used(conn: psycopg.Connection, query: str, params: dict[str, str], *, seqscan: bool) -> list[str]:
    with conn.transaction(force_rollback=True):
        if not seqscan:  # on a small table indexes tie on cost; an index that also gives the order must win
            conn.execute("SET LOCAL enable_seqscan = off")
            conn.execute("SET LOCAL enable_sort = off")
        plan = scalar(conn, sql.SQL("EXPLAIN (FORMAT JSON) ") + sql.SQL(query), params)
    assert plan is not None
    found: list[str] = []
    _walk(plan[0]["Plan"], found)
    return sorted(set(found))


def _walk(node: dict[str, Any], found: list[str]) -> None:
    if "Index Name" in node:
        found.append(node["Index Name"])
    for child in node.get("Plans", []):
        _walk(child, found)


# ------------------------------------------------------------------------------------------- functions
_PROBE_ROWS = (
    "INSERT INTO memories (user_id, text, neuro_type, decay_tier) VALUES "
    "('um-validate:f', 'probe', 'episodic', 'short'), ('um-validate:d', 'probe', 'episodic', 'short'), "
    "('um-validate:r', 'probe a', 'episodic', 'short'), ('um-validate:r', 'probe b', 'episodic', 'short'), "
    "('um-validate:t', 'probe', 'semantic', 'short')"
)

# name -> (statements, what passing means); every statement returning a boolean must return true
FUNCTION_PROBES: dict[str, tuple[tuple[str, ...], str]] = {
    "functions.decay_score": ((
        "SELECT bool_and(s BETWEEN 0 AND 1 AND s IS NOT NULL) AND abs(max(s) FILTER (WHERE k = 'fresh') - 1) < 1e-3 "
        "AND abs(max(s) FILTER (WHERE k = 'ten_days') - exp(-0.4)) < 1e-3 FROM (VALUES "
        "('old_loved', calculate_decay_score(now() - interval '365 days', 'episodic', 10, 50)), "
        "('ancient', calculate_decay_score(now() - interval '40 years', 'episodic', 1, 0)), "
        "('fresh', calculate_decay_score(now(), 'semantic', 5, 0)), "
        "('ten_days', calculate_decay_score(now() - interval '10 days', 'semantic', 5, 0))) v(k, s)",),
        "decay score within [0, 1], exp(-0.04 x 10 days) for semantic, no overflow at 365 days x 50 reads"),
    "functions.expires_at": ((
        "SELECT calculate_expires_at('short', t) = t + interval '7 days' "
        "AND calculate_expires_at('medium', t) = t + interval '30 days' "
        "AND calculate_expires_at('long', t) = t + interval '180 days' "
        "AND calculate_expires_at('pinned', t) IS NULL FROM (SELECT timestamptz '2024-01-01 00:00+00' AS t) x",),
        "short 7 d, medium 30 d, long 180 d, pinned never"),
    "functions.insert_defaults": ((
        "SELECT abs(decay_lambda - 0.04) < 1e-6 AND expires_at - created_at = interval '7 days' AND version = 1 "
        "FROM memories WHERE user_id = 'um-validate:t'",),
        "decay_lambda by neuro_type and expires_at by tier on insert"),
    "functions.update_memory_access": ((
        "SELECT update_memory_access(id, 'um-validate:f', NULL, 'read') FROM memories WHERE user_id = 'um-validate:f'",
        "SELECT access_count = 1 AND version = 1 AND (SELECT count(*) FROM memory_access_log "
        "WHERE user_id = 'um-validate:f' AND access_type = 'read') = 1 FROM memories WHERE user_id = 'um-validate:f'"),
        "access counted (not a change: version stays) and audited"),
    "functions.soft_delete_memory": ((
        "SELECT soft_delete_memory(id, 'um-validate:d') FROM memories WHERE user_id = 'um-validate:d'",
        "SELECT deleted_at IS NOT NULL AND NOT soft_delete_memory(id, 'um-validate:d') FROM memories "
        "WHERE user_id = 'um-validate:d'"),
        "soft delete once, audited"),
    "functions.create_memory_relationship": ((
        "SELECT create_memory_relationship(min(id::text)::uuid, max(id::text)::uuid, 'reflection') IS NOT NULL "
        "FROM memories WHERE user_id = 'um-validate:r'",
        "SELECT count(*) = 1 FROM memories WHERE user_id = 'um-validate:r' "
        "AND jsonb_array_length(derived_memories) = 1"),
        "relationship created and recorded on both memories"),
    "functions.version_and_expiry": ((
        "UPDATE memories SET decay_tier = 'long' WHERE user_id = 'um-validate:t'",
        "SELECT version = 2 AND expires_at > now() + interval '179 days' FROM memories WHERE user_id = 'um-validate:t'",
        "UPDATE memories SET decay_tier = 'pinned' WHERE user_id = 'um-validate:t'",
        "SELECT version = 3 AND expires_at IS NULL AND updated_at IS NOT NULL FROM memories "
        "WHERE user_id = 'um-validate:t'"),
        "version increments on every update; a tier change moves expires_at; pinned clears it"),
    "functions.audit_survives_delete": ((
        "DELETE FROM memories WHERE user_id IN ('um-validate:d', 'um-validate:f')",
        "SELECT count(*) = 2 FROM memory_access_log WHERE user_id IN ('um-validate:d', 'um-validate:f')"),
        "audit rows outlive a hard delete of their memory"),
    "functions.views": ((
        "INSERT INTO memories (user_id, text, neuro_type, importance, access_count, created_at, decay_tier) VALUES "
        "('um-validate:o', 'overflow probe', 'episodic', 10, 50, now() - interval '365 days', 'pinned')",
        "SELECT (SELECT count(*) FROM active_memories_with_decay WHERE user_id = 'um-validate:o') = 1 "
        "AND (SELECT sum(memory_count) FROM memory_analytics_by_tenant WHERE user_id = 'um-validate:o') = 1 "
        "AND (SELECT count(*) FROM memory_relationship_details WHERE user_id = 'um-validate:r') = 1 "
        "AND (SELECT sum(access_count) FROM memory_audit_summary WHERE user_id = 'um-validate:d') = 1"),
        "every view answers, including over an old, often-read, important memory"),
}


def function_checks(conn: psycopg.Connection) -> list[Check]:
    """Exercise every helper function and trigger inside one transaction that is rolled back."""
    with conn.transaction(force_rollback=True):
        conn.execute(_PROBE_ROWS)
        return [_probe(conn, name, statements, ok) for name, (statements, ok) in FUNCTION_PROBES.items()]


def _probe(conn: psycopg.Connection, name: str, statements: tuple[str, ...], ok: str) -> Check:
    try:
        with conn.transaction():
            for statement in statements:
                with conn.cursor(row_factory=scalar_row) as cur:
                    cur.execute(statement)
                    value = cur.fetchone() if cur.description else None
                if value is False:
                    return Check(name, FAIL, f"wrong result from the probe: expected {ok}")
    except psycopg.Error as exc:
        return Check(name, FAIL, f"[{exc.sqlstate}] {exc.diag.message_primary}")
    return Check(name, PASS, ok)


# ------------------------------------------------------------------------------------------- distributions
_DISTRIBUTIONS = {
    "decay_tier": "SELECT decay_tier, count(*) FROM memories WHERE deleted_at IS NULL GROUP BY 1 ORDER BY 2 DESC",
    "memory_type": "SELECT memory_type, count(*) FROM memories WHERE deleted_at IS NULL GROUP BY 1 ORDER BY 2 DESC",
    "ui_source": "SELECT ui_source, count(*) FROM memories WHERE deleted_at IS NULL GROUP BY 1 ORDER BY 2 DESC",
    "source_table": "SELECT coalesce(source_table, '(not migrated)'), count(*) FROM memories "
                    "GROUP BY 1 ORDER BY 2 DESC",
    "top_tenants": "SELECT user_id, count(*) FROM memories GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 10",
}


def distributions(conn: psycopg.Connection) -> tuple[dict[str, list[list[Any]]], dict[str, Any]]:
    """The guide's distributions (for the human report) and its headline totals."""
    dist = {name: [list(r) for r in conn.execute(q)] for name, q in _DISTRIBUTIONS.items()}
    totals = one_row(conn, "SELECT count(*) AS total_memories, count(DISTINCT user_id) AS unique_users, "
                           "count(DISTINCT org_id) AS unique_orgs FROM memories")
    assert totals is not None
    return dist, totals

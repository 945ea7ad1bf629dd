"""Migrating a live assistant: capture its legacy writes, catch up, and report the lag.

``migrate`` starts capture before its first batch (``start_capture``): a trigger on each legacy table writes
the key of every inserted, updated and deleted row into ``memory_migration_changes``. Before it finishes it
applies them (``catch_up``): each change names a key, and the key's current legacy row decides its memories
(new row: inserted; edited: updated, the version bumped by the memories trigger; gone: soft-deleted and
audited). long_term_memory has no key: its rows are keyed by ctid, which an UPDATE moves, so an edited row's
old items are retired (soft-deleted, their key freed) and its new items arrive. A memory the application
changed in the unified store since the migration last wrote it (a version above ``memory_migration_synced``)
is never overwritten: the conflict is recorded in ``memory_migration_conflicts`` and reported.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import psycopg
from psycopg import sql
from psycopg.rows import dict_row, scalar_row

from . import livesql
from .checks import SECONDS, Serialised, json_field, rounded
from .db import maintenance, relation_exists, scalar
from .errors import LockBusy, translate
from .mapping import TableMapping, mapping_for
from .shapes import Detected, detect
from .sources import ITEM_KEYS

log = logging.getLogger("unified_memory.live")

CORRELATION = "unified-memory catch-up"
Outcome = Literal["applied", "conflict", "table_gone"]


@dataclass
class CatchUp(Serialised):
    """What one catch-up applied."""

    json_derived: ClassVar[dict[str, str]] = {"changes_per_second": "changes_per_second"}

    changes: int = 0
    batches: int = 0
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    quarantined: int = 0
    conflicts: int = 0
    seconds: float = field(default=0.0, metadata=SECONDS)
    lag: dict[str, Any] = field(default_factory=dict)

    @property
    def changes_per_second(self) -> float:
        return round(self.changes / self.seconds, 1) if self.seconds else 0.0

    def add(self, other: CatchUp) -> None:
        for name in ("changes", "batches", "inserted", "updated", "deleted", "quarantined", "conflicts", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.lag = other.lag


@dataclass(frozen=True)
class Lag(Serialised):
    """Changes waiting for catch-up, the age of the oldest, conflicts so far, and which tables are captured."""

    waiting: int = 0
    oldest_seconds: float | None = field(default=None, metadata=json_field(convert=rounded))
    conflicts: int = 0
    capturing: tuple[str, ...] = ()
    cut_over: tuple[str, ...] = ()


@dataclass(frozen=True)
class Settings:
    """How catch-up maps rows (the migration's own settings) and how fast it goes."""

    source_timezone: str = "UTC"
    expiry: str = "arrival"
    batch_size: int = 1000
    pause_ms: int = 0
    run_id: int | None = None


def capture_key(m: TableMapping) -> str | None:
    """The column a table's changes are keyed by; None for long_term_memory (its ctid)."""
    return m.source.capture_key


# ------------------------------------------------------------------------------------------------ capture
def start_capture(conn: psycopg.Connection, present: dict[str, Detected], *, lock_timeout_ms: int = 2000,
                  attempts: int = 20) -> list[str]:
    """Start capturing each legacy table of ``present`` (not yet captured nor cut over); one transaction.

    A table that already has outcomes from a run without capture gets a change queued for each of its keys,
    in the same transaction, so catch-up compares every row once and nothing slips between.
    """
    if not relation_exists(conn, "memory_migration_changes"):
        return []
    cut = set(_cut_over(conn))
    wanted = {t: d for t, d in present.items() if t not in cut and _capturable(conn, t)}

    def work() -> list[str]:
        started = []
        for table, found in wanted.items():
            m = mapping_for(table, found.shape)
            if scalar(conn, "SELECT memory_migration_capture_on(%s::regclass, %s)", [table, capture_key(m)]):
                started.append(table)
                _resync(conn, m)
        if started:
            conn.execute("INSERT INTO memory_migration_live (source_table, capture_since) SELECT t, now() "
                         "FROM unnest(%s::text[]) t ON CONFLICT (source_table) DO UPDATE SET capture_since = now()",
                         [started])
            conn.execute("INSERT INTO memory_migration_live_log (action, tables) VALUES ('capture_on', %s)",
                         [started])
        return started

    started = retry_locked(conn, work, lock_timeout_ms=lock_timeout_ms, attempts=attempts)
    if started:
        log.info("change capture started on %s", ", ".join(started))
    return started


def _capturable(conn: psycopg.Connection, table: str) -> bool:
    """Only tables carry row triggers: a legacy view (or materialized view) is migrated, not captured."""
    kind = scalar(conn, "SELECT relkind::text FROM pg_class WHERE oid = to_regclass(%s)",
                  [sql.Identifier(table).as_string(conn)])
    if kind in ("r", "p"):
        return True
    log.warning("change capture skipped table=%s: not a table (relkind %s); writes through it are not followed",
                table, kind)
    return False


def _resync(conn: psycopg.Connection, m: TableMapping) -> None:
    """Queue a change per key of a table that has outcomes already (migrated before capture existed)."""
    had = scalar(conn, "SELECT EXISTS (SELECT 1 FROM memories WHERE source_table = %(t)s) OR EXISTS "
                       "(SELECT 1 FROM memory_migration_quarantine WHERE source_table = %(t)s)", {"t": m.table})
    if had:  # keyed rows: every key compared once; items: the rows gone since are retired
        conn.execute(m.source.resync(m), {"t": m.table})


def stop_capture(conn: psycopg.Connection, tables: list[str]) -> list[str]:
    """Drop the capture triggers of ``tables`` (inside the caller's transaction)."""
    return [t for t in tables if relation_exists(conn, sql.Identifier(t).as_string(conn))
            and scalar(conn, "SELECT memory_migration_capture_off(%s::regclass)", [t])]


def capturing(conn: psycopg.Connection) -> list[str]:
    """Legacy tables with a capture trigger."""
    return [str(name) for name in conn.cursor(row_factory=scalar_row).execute(
        "SELECT c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
        "WHERE t.tgname = 'memory_migration_capture' AND c.relnamespace = current_schema()::regnamespace "
        "ORDER BY 1")]


def _cut_over(conn: psycopg.Connection) -> list[str]:
    if not relation_exists(conn, "memory_migration_live"):
        return []
    return [str(table) for table in conn.cursor(row_factory=scalar_row).execute(
        "SELECT source_table FROM memory_migration_live WHERE cutover_at IS NOT NULL ORDER BY 1")]


def lag(conn: psycopg.Connection) -> Lag:
    """Changes waiting, the age of the oldest, conflicts recorded, captured and cut-over tables."""
    if not relation_exists(conn, "memory_migration_changes"):
        return Lag()
    row = conn.cursor(row_factory=dict_row).execute(
        "SELECT count(*) AS waiting, extract(epoch FROM clock_timestamp() - min(captured_at))::float8 AS oldest "
        "FROM memory_migration_changes WHERE applied_at IS NULL").fetchone()
    assert row is not None
    conflicts = int(scalar(conn, "SELECT count(*) FROM memory_migration_conflicts"))
    return Lag(int(row["waiting"]), row["oldest"], conflicts, tuple(capturing(conn)), tuple(_cut_over(conn)))


# ------------------------------------------------------------------------------------------------ locks
def retry_locked(conn: psycopg.Connection, work: Callable[[], Any], *, lock_timeout_ms: int,
                 attempts: int) -> Any:
    """Run ``work`` in one transaction with a short ``lock_timeout``, retried with backoff when a lock waits.

    The application's writes queue behind a waiting lock request, so a short timeout keeps them moving.

    Raises:
        LockBusy: the locks could not be taken in ``attempts`` tries.
    """
    from . import locks

    try:
        return locks.retry_locked(conn, work, lock_timeout_ms=lock_timeout_ms, attempts=attempts,
                                  busy="the legacy tables stayed locked by the application")
    except LockBusy as exc:
        raise LockBusy(f"{exc}; try again later", option="lock_timeout_ms") from exc.__cause__


# ------------------------------------------------------------------------------------------------ catch-up
def catch_up(conn: psycopg.Connection, settings: Settings | None = None, *,
             stop_when: Callable[[], bool] | None = None) -> CatchUp:
    """Apply the changes captured before it started, one transaction per batch (a crash loses at most the batch
    in flight); changes arriving meanwhile wait for the next catch-up, so a busy application cannot keep it going.

    ``conn`` must be in autocommit mode and hold the migration's lock with row security bypassed.
    """
    chosen = settings or settings_of_last_run(conn)
    result = CatchUp()
    if not relation_exists(conn, "memory_migration_changes"):
        return result
    started = time.monotonic()
    mappings: dict[str, TableMapping | None] = {}
    upto = int(scalar(conn, "SELECT coalesce(max(change_id), 0) FROM memory_migration_changes"))
    while not (stop_when and stop_when()):
        try:
            applied = _batch(conn, chosen, mappings, result, upto)
        except psycopg.Error as exc:
            raise translate(exc, "catching up with the application's changes") from exc
        if not applied:
            break
        result.batches += 1
        result.changes += applied
        log.info("catch-up batch=%d changes=%d", result.batches, result.changes)
        if chosen.pause_ms:
            time.sleep(chosen.pause_ms / 1000)
    result.seconds = time.monotonic() - started
    result.lag = lag(conn).to_dict()
    return result


def _batch(conn: psycopg.Connection, settings: Settings, mappings: dict[str, TableMapping | None],
           result: CatchUp, upto: int) -> int:
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        changes = cur.execute("SELECT change_id, source_table, op, old_key, new_key FROM memory_migration_changes "
                              "WHERE applied_at IS NULL AND change_id <= %s ORDER BY change_id LIMIT %s "
                              "FOR UPDATE SKIP LOCKED", [upto, settings.batch_size]).fetchall()
        if not changes:
            return 0
        outcomes: dict[int, Outcome] = {}
        for table in sorted({c["source_table"] for c in changes}):
            own = [c for c in changes if c["source_table"] == table]
            m = mappings[table] if table in mappings else mappings.setdefault(table, _mapping(conn, table))
            if m is None:
                outcomes.update({c["change_id"]: "table_gone" for c in own})
                continue
            params = {"t": table, "tz": settings.source_timezone, "expiry": settings.expiry,
                      "run_id": settings.run_id, "correlation": CORRELATION}
            apply = m.source.choose(rows=_apply_keyed, items=_apply_long_term)
            outcomes.update(apply(conn, m, own, params, result))
        for outcome in ("applied", "conflict", "table_gone"):
            ids = [c["change_id"] for c in changes if outcomes.get(c["change_id"], "applied") == outcome]
            if ids:
                conn.execute("UPDATE memory_migration_changes SET applied_at = clock_timestamp(), outcome = %s "
                             "WHERE change_id = ANY(%s)", [outcome, ids])
        return len(changes)


def _mapping(conn: psycopg.Connection, table: str) -> TableMapping | None:
    found = detect(conn, table)
    return mapping_for(table, found.shape) if found else None


def _last_change(changes: list[dict[str, Any]], column: str) -> dict[str, dict[str, Any]]:
    """Per key named in ``column``, the last change naming it."""
    last: dict[str, dict[str, Any]] = {}
    for change in changes:
        if change[column] is not None:
            last[change[column]] = change
    return last


def _apply_keyed(conn: psycopg.Connection, m: TableMapping, changes: list[dict[str, Any]],
                 params: dict[str, Any], result: CatchUp) -> dict[int, Outcome]:
    last = {**_last_change(changes, "old_key"), **_last_change(changes, "new_key")}
    conflicted = _conflicts(conn, {**params, "keys": sorted(last)}, last, result)
    free = sorted(k for k in last if k not in conflicted)
    if free:
        p = {**params, "keys": free}
        result.deleted += int(scalar(conn, livesql.gone(m), p))
        result.quarantined += int(scalar(conn, livesql.rejected(m), p))
        result.updated += conn.execute(livesql.update(m), p).rowcount
        row = conn.cursor(row_factory=dict_row).execute(livesql.insert(m), p).fetchone()
        assert row is not None
        result.inserted += int(row["inserted"])
        result.quarantined += int(row["quarantined"])
        if m.embedding:
            conn.execute(livesql.embeddings(m), p)
        conn.execute(livesql.CLEAR_RESOLVED, p)
        conn.execute(livesql.SYNC, p)
    return {c["change_id"]: "conflict" for c in changes
            if c["old_key"] in conflicted or c["new_key"] in conflicted}


def _conflicts(conn: psycopg.Connection, params: dict[str, Any], last: dict[str, dict[str, Any]],
               result: CatchUp) -> set[str]:
    """Lock the memories at the keys; record those the application changed since the migration wrote them."""
    with conn.cursor(row_factory=dict_row) as cur:
        locked = cur.execute(livesql.lock_memories(), params).fetchall()
    changed = [r for r in locked if r["version"] > r["synced"]]
    if changed:
        conn.execute(livesql.RECORD_CONFLICTS, {
            "t": params["t"], "cids": [last[r["source_key"]]["change_id"] for r in changed],
            "ckeys": [r["source_key"] for r in changed], "ops": [last[r["source_key"]]["op"] for r in changed],
            "mids": [r["id"] for r in changed], "versions": [r["version"] for r in changed],
            "synced": [r["synced"] for r in changed]})
        result.conflicts += len(changed)
        log.warning("catch-up: %d legacy changes not applied to %s: the memory was changed in the unified store",
                    len(changed), params["t"])
    return {r["source_key"] for r in changed}


def _apply_long_term(conn: psycopg.Connection, m: TableMapping, changes: list[dict[str, Any]],
                     params: dict[str, Any], result: CatchUp) -> dict[int, Outcome]:
    """Retire the items of every ctid whose row version is gone, then add the items of the new versions."""
    olds, news = _last_change(changes, "old_key"), _last_change(changes, "new_key")
    outcomes: dict[int, Outcome] = {}
    if olds:
        found = conn.cursor(row_factory=scalar_row).execute(livesql.item_keys(m), {"keys": sorted(olds)})
        items = [str(k) for k in found]
        by_row = {k: olds[ITEM_KEYS.row_of(k)] for k in items}
        conflicted = _conflicts(conn, {**params, "keys": items}, by_row, result)
        with conn.cursor(row_factory=dict_row) as cur:
            live = [r["id"] for r in cur.execute(livesql.lock_memories(), {**params, "keys": items})
                    if r["live"] and r["source_key"] not in conflicted]
        result.deleted += len(live)
        conn.execute(livesql.retire(m), {**params, "keys": items, "cids": [by_row[k]["change_id"] for k in items],
                                         "soft": [k not in conflicted for k in items], "audited": live})
        conn.execute(livesql.clear_item_quarantine(m), {"ctids": sorted(olds)})
        outcomes.update({by_row[k]["change_id"]: "conflict" for k in conflicted})
    if news:
        conn.execute(livesql.clear_item_quarantine(m), {"ctids": sorted(news)})
        row = conn.cursor(row_factory=dict_row).execute(livesql.long_term_insert(m), {
            **params, "ctids": sorted(news), "cids": [news[k]["change_id"] for k in sorted(news)]}).fetchone()
        assert row is not None
        result.inserted += int(row["inserted"])
        result.quarantined += int(row["quarantined"])
    return outcomes


def settings_of_last_run(conn: psycopg.Connection, *, batch_size: int = 1000, pause_ms: int = 0) -> Settings:
    """The time zone and expiry policy of the last migration run (catch-up maps rows as it did)."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute("SELECT run_id, options FROM memory_migration_runs WHERE status <> 'rolled_back' "
                          "ORDER BY run_id DESC LIMIT 1").fetchone() if relation_exists(
            conn, "memory_migration_runs") else None
    options = (row or {}).get("options") or {}
    return Settings(str(options.get("source_timezone", "UTC")), str(options.get("expiry", "arrival")),
                    batch_size, pause_ms, row["run_id"] if row else None)


# ------------------------------------------------------------------------------------------------ follow
@contextmanager
def _interrupted_is_stop() -> Iterator[list[bool]]:
    flag = [False]
    try:
        yield flag
    except KeyboardInterrupt:
        flag[0] = True


def follow(conn: psycopg.Connection, settings: Settings, *, until_idle: float | None = None,
           interval: float = 1.0, show: Callable[[Lag], None] | None = None) -> CatchUp:
    """Keep catching up until interrupted (Ctrl-C) or, with ``until_idle``, until nothing arrived for that long."""
    from . import locks

    total = CatchUp()
    idle_since = time.monotonic()
    with locks.hold(conn, "migrate"), maintenance(conn), _interrupted_is_stop():
        while True:
            step = catch_up(conn, settings)
            total.add(step)
            now = time.monotonic()
            if step.changes:
                idle_since = now
            current = lag(conn)
            if show is not None:
                show(current)
            if until_idle is not None and now - idle_since >= until_idle and not current.waiting:
                break
            time.sleep(interval)
    total.lag = lag(conn).to_dict()
    return total

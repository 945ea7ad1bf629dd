"""One lock protocol for every command that changes state: session advisory locks, polled up to a wait.

Two kinds of key, per database:

- ``STATE``: the schema and the legacy tables as a whole. ``schema up|down`` and ``rollback`` hold it
  exclusively; ``migrate``, ``backup`` and ``vectors sync`` hold it shared, so any number of them may run
  together but never beside a schema change or a rollback.
- one key per job (``migrate``, ``vectors sync``), held exclusively: two migrations never interleave.

A conflicting command polls for ``wait`` seconds, then raises :class:`LockBusy` (exit 4) naming the holder:
its command, the client's process id, the server backend's pid and since when, read from ``pg_locks`` joined
to ``pg_stat_activity`` (the holder sets ``application_name`` to ``unified-memory <command> pid=<pid>``).
Locks are re-entrant within a session, so ``migrate`` can take its backup on its own connection.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC
from typing import Literal, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from .db import scalar
from .errors import LockBusy

Command = Literal["schema up", "schema down", "schema repair", "migrate", "rollback", "backup", "vectors sync",
                  "cutover", "cleanup"]
Mode = Literal["shared", "exclusive"]
_T = TypeVar("_T")
log = logging.getLogger("unified_memory.locks")

NAMESPACE = 0x756D  # 'um': the first half of every key of this tool
STATE_KEY = 10
JOB_KEYS: dict[str, int] = {"migrate": 3, "vectors sync": 17, "cleanup": 19}
DEFAULT_WAIT = 5.0
_POLL = 0.2

_EXCLUSIVE_STATE: frozenset[str] = frozenset({"schema up", "schema down", "schema repair", "rollback", "cutover",
                                              "cleanup"})
_NOUN: dict[str, str] = {"migrate": "migration", "rollback": "rollback", "schema up": "schema change",
                         "schema down": "schema change", "schema repair": "schema repair", "cutover": "cutover",
                         "backup": "backup", "vectors sync": "vector sync", "cleanup": "cleanup"}

_HOLDERS = """
SELECT l.pid AS server_pid, a.application_name, a.backend_start, l.mode
FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.database = (SELECT oid FROM pg_database
                                                             WHERE datname = current_database())
  AND l.classid = %(ns)s AND l.objid = %(key)s AND l.objsubid = 2 AND l.pid <> pg_backend_pid()
ORDER BY a.backend_start LIMIT 1"""


@dataclass(frozen=True)
class _Key:
    key: int
    mode: Mode


def keys_for(command: Command) -> list[_Key]:
    """The keys ``command`` takes, in the one order every command takes them (state first)."""
    keys = [_Key(STATE_KEY, "exclusive" if command in _EXCLUSIVE_STATE else "shared")]
    if command in JOB_KEYS:
        keys.append(_Key(JOB_KEYS[command], "exclusive"))
    return keys


@contextmanager
def hold(conn: psycopg.Connection, command: Command, wait: float = DEFAULT_WAIT) -> Iterator[None]:
    """Hold ``command``'s locks on ``conn``'s database while inside; wait up to ``wait`` seconds for them.

    Raises:
        LockBusy: another command still held a conflicting lock after ``wait`` seconds.
    """
    if wait < 0:
        raise ValueError("the lock wait cannot be negative")
    keys = keys_for(command)
    deadline = time.monotonic() + wait
    saved_name = str(scalar(conn, "SELECT current_setting('application_name')"))
    while True:
        blocked = _try_all(conn, keys)
        if blocked is None:
            break
        if time.monotonic() >= deadline:
            raise LockBusy(_busy_message(conn, command, blocked, wait), option="lock_wait")
        time.sleep(_POLL)
    if not (saved_name.startswith("unified-memory ") and " pid=" in saved_name):  # an outer hold names the command
        conn.execute("SELECT set_config('application_name', %s, false)",
                     [f"unified-memory {command} pid={os.getpid()}"])
    try:
        yield
    finally:
        _release(conn, keys, saved_name)


def _try_all(conn: psycopg.Connection, keys: list[_Key]) -> _Key | None:
    """Take every key or none; the first key that was busy, or None when all are held now."""
    taken: list[_Key] = []
    for k in keys:
        fn = "pg_try_advisory_lock" if k.mode == "exclusive" else "pg_try_advisory_lock_shared"
        if scalar(conn, sql.SQL("SELECT {}(%s, %s)").format(sql.Identifier(fn)), [NAMESPACE, k.key]) is not True:
            _unlock(conn, taken)
            return k
        taken.append(k)
    return None


def _unlock(conn: psycopg.Connection, keys: list[_Key]) -> None:
    for k in reversed(keys):
        fn = "pg_advisory_unlock" if k.mode == "exclusive" else "pg_advisory_unlock_shared"
        conn.execute(sql.SQL("SELECT {}(%s, %s)").format(sql.Identifier(fn)), [NAMESPACE, k.key])


def _release(conn: psycopg.Connection, keys: list[_Key], saved_name: str) -> None:
    """Unlock (the session ending releases them anyway when the connection is broken or busy)."""
    if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        return
    _unlock(conn, keys)
    conn.execute("SELECT set_config('application_name', %s, false)", [saved_name])


def _busy_message(conn: psycopg.Connection, command: Command, blocked: _Key, wait: float) -> str:
    with conn.cursor(row_factory=dict_row) as cur:
        holder = cur.execute(_HOLDERS, {"ns": NAMESPACE, "key": blocked.key}).fetchone()
    if holder is None:
        return f"{command}: the lock was busy for {wait:g} s (its holder has just finished); try again"
    name = str(holder["application_name"] or "")
    held_by = name.removeprefix("unified-memory ") if name.startswith("unified-memory ") else ""
    what, _, client = held_by.rpartition(" pid=")
    if not what:
        what, client = held_by or "an unknown session", "?"
    started = holder["backend_start"]
    since = started.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if started else "?"
    noun = _NOUN.get(what, what)
    return (f"another {noun} is running: `unified-memory {what}` holds the lock (client pid {client}, server "
            f"pid {holder['server_pid']}, since {since}); {command} waited {wait:g} s. Try again when it is done")


# ------------------------------------------------------------------------------------------------ lock_timeout
@dataclass(frozen=True)
class Backoff:
    """Seconds to sleep after the first busy try, doubled after each further one up to ``most``."""

    first: float = 0.05
    most: float = 2.0

    def delay(self, attempt: int) -> float:
        """The sleep after try ``attempt`` (counted from 1)."""
        return min(self.first * 2 ** (attempt - 1), self.most)


def retry_locked(conn: psycopg.Connection, work: Callable[[], _T], *, lock_timeout_ms: int, attempts: int,
                 backoff: Backoff = Backoff(), busy: str = "a table stayed locked") -> _T:
    """Run ``work`` in one transaction with a short ``lock_timeout``, retried with backoff when a lock waits.

    Other sessions' statements queue behind a waiting lock request, so a short timeout keeps them moving; a
    lock that cannot be had in time rolls the transaction back and the work is tried again after a sleep.
    ``busy`` opens the message of the error raised once the tries are used up.

    Raises:
        LockBusy: the locks could not be taken in ``attempts`` tries.
    """
    for attempt in range(1, attempts + 1):
        try:
            with conn.transaction():
                conn.execute("SELECT set_config('lock_timeout', %s, true)", [f"{lock_timeout_ms}ms"])
                return work()
        except psycopg.errors.LockNotAvailable as exc:
            if attempt == attempts:
                raise LockBusy(f"{busy} through {attempts} tries of {lock_timeout_ms} ms") from exc
            delay = backoff.delay(attempt)
            log.info("lock not available (attempt %d of %d); retrying in %.2f s", attempt, attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")

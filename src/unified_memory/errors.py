"""One error root for the whole tool; each subclass carries a documented exit code.

Driver errors are translated once, by SQLSTATE class, never by message text.
"""

from __future__ import annotations

import re

import psycopg


def flag(option: str) -> str:
    """How the command line spells a stage's keyword option: ``lock_wait`` is ``--lock-wait``."""
    return "--" + option.replace("_", "-")


class UnifiedMemoryError(Exception):
    """Root of every error the tool raises on purpose. ``exit_code`` is what the CLI returns.

    ``option`` names the keyword option (if any) that would have changed the outcome, so a caller can say so in
    its own terms; the message words it as the command line spells it (:func:`flag`).
    """

    exit_code = 1
    option: str | None = None


class ConfigError(UnifiedMemoryError):
    """Bad options or settings (a missing key, an unknown table name)."""

    exit_code = 2


class MissingPrivilege(ConfigError):
    """The role running a command lacks a privilege it needs; ``grants`` are the statements that fix it."""

    def __init__(self, message: str, *, grants: list[str]) -> None:
        super().__init__(message)
        self.grants = grants


class NotFound(UnifiedMemoryError):
    """A memory the tenant asked for does not exist or is not the tenant's (the same answer, on purpose)."""


class StaleVersion(UnifiedMemoryError):
    """An update named the version it expected, and the memory has moved on since."""


class DatabaseUnavailable(UnifiedMemoryError):
    """The database could not be reached; trying again later may work."""

    exit_code = 3


class LockBusy(UnifiedMemoryError):
    """Another run holds the advisory lock, or a table lock could not be taken in time.

    With ``option`` (the wait that ran out, e.g. ``lock_wait``), the message ends by suggesting to raise it.
    """

    exit_code = 4

    def __init__(self, message: str, *, option: str | None = None) -> None:
        super().__init__(f"{message}, or raise {flag(option)}" if option else message)
        self.option = option


class SchemaError(UnifiedMemoryError):
    """A schema file failed, was edited after being applied, or the schema is not in the expected state."""

    exit_code = 5

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.file, self.line, self.sqlstate = file, line, sqlstate


class ShapeError(UnifiedMemoryError):
    """A legacy table has a shape the tool does not know."""

    exit_code = 6


class MigrationError(UnifiedMemoryError):
    """The data migration could not give every row an outcome."""

    exit_code = 7


class BackupIntegrityError(UnifiedMemoryError):
    """A backup file is truncated, tampered with, or cannot be decrypted with the given key."""

    exit_code = 8


class BackupKeyError(BackupIntegrityError):
    """A backup is encrypted and the key is missing or wrong."""

    exit_code = 12


class RollbackError(UnifiedMemoryError):
    """The rollback refused to proceed or could not prove its result; the database is unchanged."""

    exit_code = 9


class ConfirmationRequired(UnifiedMemoryError):
    """A command that changes or drops data was called without ``yes``: ``what`` it would do is named."""

    exit_code = 9
    option = "yes"

    def __init__(self, what: str, *, alternative: str | None = None, note: str | None = None) -> None:
        hint = f"pass {flag('yes')}" + (" to proceed" if alternative else "")
        hint += f", or {flag(alternative)} for the plan" if alternative else ""
        super().__init__(f"{what}: {hint}" + (f" ({note})" if note else ""))
        self.what, self.alternative = what, alternative


class ValidationFailed(UnifiedMemoryError):
    """At least one validation check failed."""

    exit_code = 10


class VectorStoreError(UnifiedMemoryError):
    """Milvus refused an operation, or the collection differs from what the tool expects."""

    exit_code = 11


_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')


def redacted_message(exc: psycopg.Error) -> str:
    """The error's primary message without the data it may quote, and never its DETAIL or CONTEXT lines.

    PostgreSQL's CONTEXT (``JSON data, line 1: ...``) and DETAIL (``Key (id)=(...)``) quote row values, and a
    data exception's primary message quotes the offending value (``invalid input syntax for type uuid: "..."``):
    memory text must reach no ledger, log or traceback.
    """
    primary = exc.diag.message_primary
    if primary is None:  # a client-side error: its first line only
        primary = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if (exc.sqlstate or "")[:2] in ("22", "P0") or exc.sqlstate is None:  # these quote values; others names
        primary = _QUOTED.sub('"..."', primary)
    return primary


def describe(exc: BaseException) -> str:
    """A one-line description of any exception that is safe for ledgers and logs."""
    if isinstance(exc, psycopg.Error):
        return f"{type(exc).__name__} [{exc.sqlstate or 'no sqlstate'}] {redacted_message(exc)}"
    if isinstance(exc, UnifiedMemoryError):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return f"{type(exc).__name__} [errno {exc.errno}] {exc.strerror}{where}"
    return type(exc).__name__


def translate(exc: psycopg.Error, context: str) -> UnifiedMemoryError:
    """Map a driver error to the tool's hierarchy by SQLSTATE class (never by message text).

    Lost connections (08), a backend terminated or a server shutting down (57P01-57P03) are transient (3).
    """
    state = exc.sqlstate or ""
    detail = f"{context}: {type(exc).__name__} [{state or 'no sqlstate'}] {redacted_message(exc)}"
    if isinstance(exc, psycopg.OperationalError) and not state or state.startswith("08") \
            or state in ("57P01", "57P02", "57P03"):
        return DatabaseUnavailable(detail)
    if state in ("55P03", "40P01", "40001"):
        return LockBusy(detail)
    if state == "53100":
        return UnifiedMemoryError(f"{context}: the database server's disk is full [53100]; free space, then run "
                                  "the command again (a re-run completes the work)")
    return UnifiedMemoryError(detail)


class RollbackNotConfirmed(ConfirmationRequired, RollbackError):
    """The rollback was called without ``yes`` (nor ``dry_run``)."""

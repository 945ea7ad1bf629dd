"""The ``unified-memory`` command: parses arguments, opens one connection, calls one library function,
renders its result. No SQL here. Errors of the tool's root print one ``FAILED:`` line and exit with the
code documented in the README; ``--traceback`` shows more.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, overload

import psycopg
import typer

from . import backup, cutover, fixtures, live, locks, logs, metrics, report, schema
from .backupfile import load_key
from .checks import FailureStatus
from .db import DEMO_DATABASE, Target, connect, on_database, target_for
from .errors import ConfigError, UnifiedMemoryError, describe, translate
from .health import health
from .migrate import MigrationOptions, migrate
from .progress import reporter
from .rollback import rollback
from .settings import (
    DEFAULT_COLLECTION,
    DEFAULT_DIMENSION,
    backup_dir,
    configured_milvus_uri,
    home_dir,
    milvus_uri,
    resolve_dsn,
    write_private,
)
from .validate import VectorChecks, validate

if TYPE_CHECKING:  # pymilvus and pandas load in about a second: only the vector commands import them
    from .embedders import Embedder
    from .milvus import MilvusClient

app = typer.Typer(help="Move legacy assistant memories into the unified, tenant-isolated store.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
schema_app = typer.Typer(help="Apply, undo and list the versioned SQL schema files.", no_args_is_help=True)
legacy_app = typer.Typer(help="Legacy fixtures: create the four legacy tables in any field shape.",
                         no_args_is_help=True)
backup_app = typer.Typer(help="Back up the legacy tables into one verified file (or verify one).",
                         invoke_without_command=True)
app.add_typer(schema_app, name="schema")
app.add_typer(legacy_app, name="legacy")
app.add_typer(backup_app, name="backup")
vectors_app = typer.Typer(help="The unified Milvus collection: create, fill, verify, search.", no_args_is_help=True)
app.add_typer(vectors_app, name="vectors")


@dataclass
class Options:
    """Global options, shared by every command."""

    dsn: str | None
    data_dir: Path
    json: bool
    traceback: bool
    quiet: bool
    lock_wait: float = locks.DEFAULT_WAIT

    def target(self) -> Target:
        return target_for(self.dsn, self.data_dir, quiet=self.quiet or self.json)


JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
CollectionOpt = Annotated[str, typer.Option(envvar="UNIFIED_MEMORY_COLLECTION", help="Milvus collection name.")]
DimOpt = Annotated[int, typer.Option("--dim", min=1, max=32768, help="Vector dimension of the collection.")]
EmbedderOpt = Annotated[str, typer.Option(help="Embedder for memories without a vector: hashing (built in), "
                                               "minilm (the 'embedder' extra) or none.")]


LockTimeoutOpt = Annotated[int, typer.Option(help="Wait at most this long (ms) for a legacy table's lock; retried "
                                                 "with backoff, so the application's writes never queue for long.")]
KeyFileOpt = Annotated[Path | None, typer.Option(
    "--key-file", help="File holding the backup passphrase (else UNIFIED_MEMORY_BACKUP_KEY; never on the "
                       "command line). With a key, backups are encrypted (AES-256-GCM).", show_default=False)]


@app.callback()
def _global(
    ctx: typer.Context,
    dsn: Annotated[str | None, typer.Option(help="PostgreSQL connection string (else DATABASE_URL, POSTGRES_*, "
                                                 "else the embedded server).", show_default=False)] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Where the tool keeps its files (embedded server, "
                                                       "backups, logs); default UNIFIED_MEMORY_HOME or the "
                                                       "per-user data directory.", show_default=False)] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
    show_traceback: Annotated[bool, typer.Option("--traceback", help="Show the traceback of a failure.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only the result, no progress.")] = False,
    lock_wait: Annotated[float, typer.Option(
        min=0, max=86400, help="Seconds a command that changes state waits for another one's lock before exit 4.")
    ] = locks.DEFAULT_WAIT,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also show other libraries' warnings and log "
                                                                  "noise (hidden on a normal run).")] = False,
) -> None:
    logs.third_party(verbose=verbose)
    ctx.obj = Options(resolve_dsn(dsn), (data_dir or home_dir()).resolve(), json_output, show_traceback, quiet,
                      lock_wait)


def options(ctx: typer.Context, json_flag: bool = False) -> Options:
    opts: Options = ctx.obj
    if json_flag:
        opts.json = True
    return opts


@contextmanager
def failures(opts: Options) -> Iterator[None]:
    """Map every failure to its exit code with one ``FAILED:`` line (a traceback only with ``--traceback``)."""
    try:
        yield
    except UnifiedMemoryError as exc:
        _fail(opts, str(exc), exc.exit_code, exc)
    except psycopg.Error as exc:
        found = translate(exc, "database error")
        _fail(opts, str(found), found.exit_code, exc)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            _fail(opts, f"disk full writing {exc.filename or 'a file'}: free space, then run the command again "
                        "(what was half written was removed or is ignored)", 1, exc)
        _fail(opts, f"{exc.strerror or type(exc).__name__}: {exc.filename or ''}".rstrip(": "), 1, exc)
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - one FAILED line, never a raw traceback (unless --traceback)
        _fail(opts, f"unexpected error: {describe(exc)}", 1, exc)


def _fail(opts: Options, message: str, code: int, exc: BaseException | None = None) -> None:
    if opts.traceback and exc is not None:
        _print_traceback(exc)
    if opts.json:
        status: FailureStatus = "failed"
        print(json.dumps({"status": status, "error": message, "exit_code": code}))
    print(f"FAILED: {message}", file=sys.stderr)
    raise typer.Exit(code)


def _print_traceback(exc: BaseException) -> None:
    """Each exception of the chain: its frames (code, no values) and a redacted one-line message."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for item in reversed(chain):
        print("Traceback (most recent call last):\n" + "".join(traceback.format_tb(item.__traceback__))
              + describe(item), file=sys.stderr)


def emit(opts: Options, result: Any, human: Callable[[Any], str]) -> None:
    """Print ``result`` as JSON or as its human rendering."""
    if opts.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print(human(result))


def run(ctx: typer.Context, work: Callable[[psycopg.Connection], Any], human: Callable[[Any], str],
        json_flag: bool = False) -> Any:
    """Open the connection, run ``work`` on it, render the result."""
    opts = options(ctx, json_flag)
    with failures(opts):
        with connect(opts.target()) as conn:
            result = work(conn)
        emit(opts, result, human)
        return result


# ---------------------------------------------------------------------------------------------- schema
@schema_app.command("up")
def schema_up(ctx: typer.Context,
              target: Annotated[str | None, typer.Option(help="Stop after this version, e.g. 016.")] = None,
              lock_wait: Annotated[float | None, typer.Option(
                  min=0, max=86400, help="Seconds to wait for another run's lock (default: the global --lock-wait).",
                  show_default=False)] = None,
              dry_run: Annotated[bool, typer.Option(help="Show what would change (an adoption is run and rolled "
                                                         "back); change nothing.")] = False,
              source_timezone: Annotated[str, typer.Option(
                  help="Time zone of naive legacy TIMESTAMPs, for an adoption's copies of legacy rows (as migrate's)."
              )] = "UTC",
              json_flag: JsonOpt = False) -> None:
    """Apply every pending schema file, each in one transaction (adopting a first-implementation 016)."""
    wait = options(ctx).lock_wait if lock_wait is None else lock_wait
    run(ctx, lambda conn: schema.up(conn, target=target, lock_wait=wait, dry_run=dry_run,
                                    source_timezone=source_timezone), report.schema_result, json_flag)


@schema_app.command("down")
def schema_down(ctx: typer.Context,
                steps: Annotated[int, typer.Option(min=1, max=999,
                                                   help="How many applied files to undo, newest first.")] = 1,
                force: Annotated[bool, typer.Option(
                    help="Drop tables even when they hold rows (memories, the quarantine, kept vectors, the "
                         "ledger); without it, such a down is refused and names them.")] = False,
                json_flag: JsonOpt = False) -> None:
    """Undo the newest applied schema files with their down files."""
    wait = options(ctx).lock_wait
    run(ctx, lambda conn: schema.down(conn, steps=steps, force=force, lock_wait=wait), report.schema_result, json_flag)


@schema_app.command("repair")
def schema_repair(ctx: typer.Context, json_flag: JsonOpt = False) -> None:
    """Recreate objects of applied schema files that are missing or altered (one transaction)."""
    wait = options(ctx).lock_wait
    run(ctx, lambda conn: schema.repair(conn, lock_wait=wait), report.schema_result, json_flag)


@schema_app.command("status")
def schema_status(ctx: typer.Context, json_flag: JsonOpt = False) -> None:
    """List applied and pending schema files, applied files edited since, and objects that drifted."""
    run(ctx, schema.status, report.schema_status, json_flag)


# ---------------------------------------------------------------------------------------------- legacy
def _parse_shapes(values: list[str]) -> dict[str, str]:
    shapes = {}
    for value in values:
        table, sep, shape = value.partition("=")
        if not sep:
            raise ConfigError(f"--shape takes TABLE=SHAPE, e.g. memory_items=I1; got {value!r}")
        shapes[table] = shape
    return shapes


@legacy_app.command("create")
def legacy_create(ctx: typer.Context,
                  rows: Annotated[int, typer.Option(min=0, max=100_000_000, help="Rows per legacy table.")] = 1000,
                  shape: Annotated[list[str] | None, typer.Option(
                      help="TABLE=SHAPE (memory_items=I1|I2|I3, memory_entries=E1|E2, web_ui_memory_entries=W1, "
                           "long_term_memory=L1); repeatable.")] = None,
                  replace: Annotated[bool, typer.Option(help="Drop existing legacy tables first.")] = False,
                  json_flag: JsonOpt = False) -> None:
    """Create the four legacy tables and fill them with realistic synthetic rows (server-side)."""
    opts = options(ctx, json_flag)
    with failures(opts):
        shapes = _parse_shapes(shape or [])
    run(ctx, lambda conn: fixtures.create(conn, rows=rows, shapes=shapes, replace=replace),
        lambda r: f"legacy tables {r.shapes} with {rows} rows each ({r.vector_type} vectors) in {r.seconds:.1f} s")


# ---------------------------------------------------------------------------------------------- migrate
@app.command("migrate")
def migrate_cmd(
    ctx: typer.Context,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan only: the real path, rolled back.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, max=1_000_000, help="Rows per batch (one transaction each).")
                          ] = 20000,
    max_batch_bytes: Annotated[int, typer.Option(min=1024, max=1 << 34, help="Bytes per batch at most (large texts).")
                               ] = 32 << 20,
    tables: Annotated[list[str] | None, typer.Option("--tables", help="Only these legacy tables (repeatable); "
                                                     "precedence order stays fixed.")] = None,
    source_timezone: Annotated[str, typer.Option(help="Time zone of naive legacy TIMESTAMPs.")] = "UTC",
    expiry: Annotated[str, typer.Option(help="'arrival': expiry counts from the migration; 'created': from the "
                                             "legacy created_at (old rows may arrive expired).")] = "arrival",
    pause_ms: Annotated[int, typer.Option(min=0, max=3_600_000,
                                          help="Pause between batches, to throttle during busy hours.")] = 0,
    no_backup: Annotated[bool, typer.Option("--no-backup", help="Skip the backup before the first write.")] = False,
    jobs: Annotated[int, typer.Option(min=0, max=64, help="Parallel connections (key ranges, index builds); 0: the "
                                                          "server's core count as far as it can tell, capped at 16.")
                    ] = 0,
    lock_timeout_ms: LockTimeoutOpt = 2000,
    follow: Annotated[bool, typer.Option("--follow", help="Then keep catching up with the application's changes "
                                                          "until interrupted, showing the lag.")] = False,
    until_idle: Annotated[float | None, typer.Option(help="With --follow: stop once no change arrived for this "
                                                          "many seconds.", show_default=False)] = None,
    key_file: KeyFileOpt = None,
    json_flag: JsonOpt = False,
) -> None:
    """Migrate every legacy row into memories: migrated, duplicate, or quarantined with a reason."""
    opts = options(ctx, json_flag)
    chosen = MigrationOptions(batch_size=batch_size, max_batch_bytes=max_batch_bytes, dry_run=dry_run, jobs=jobs,
                              tables=tuple(tables or MigrationOptions.tables), source_timezone=source_timezone,
                              expiry=expiry, pause_ms=pause_ms, lock_timeout_ms=lock_timeout_ms)
    logs.setup(opts.data_dir)
    with failures(opts):
        hook = None if no_backup or dry_run else _backup_hook(opts, key_file)
        with connect(opts.target()) as conn, reporter(_shows_progress(opts)) as progress:
            result = migrate(conn, chosen, progress=progress, before_first_write=hook, lock_wait=opts.lock_wait)
            emit(opts, result, report.migration)
            if follow and not dry_run:
                settings = live.Settings(source_timezone, expiry, pause_ms=pause_ms, run_id=result.run_id)
                emit(opts, live.follow(conn, settings, until_idle=until_idle, show=_lag_shown(opts)), report.catch_up)


def _shows_progress(opts: Options) -> bool:
    return not (opts.json or opts.quiet)


def _lag_shown(opts: Options) -> Callable[[live.Lag], None] | None:
    """Each lag line on stderr while following (none with --json or --quiet)."""
    return (lambda lag: print(report.lag_line(lag), file=sys.stderr)) if _shows_progress(opts) else None


def _backup_hook(opts: Options, key_file: Path | None) -> Callable[[psycopg.Connection], object]:
    secret = load_key(key_file=key_file)

    def take_backup(conn: psycopg.Connection) -> object:
        manifest = backup.read_back(backup.backup(conn, backup.default_path(backup_dir(opts.data_dir)),
                                                  secret=secret), secret=secret)
        if not (opts.json or opts.quiet):
            print(f"backup written and verified before the first change: {manifest.path}", file=sys.stderr)
        return manifest

    return take_backup


def _backup_file(opts: Options, path: Path) -> Path:
    """``path``, or a bare file name found in the backup directory (the guide gives names only)."""
    if not path.exists() and path.parent == Path("."):
        candidate = backup_dir(opts.data_dir) / path.name
        if candidate.exists():
            return candidate
    return path.resolve()


# ---------------------------------------------------------------------------------------------- backup
@backup_app.callback()
def backup_cmd(ctx: typer.Context,
               out: Annotated[Path | None, typer.Option(
                   help="Backup file, never overwritten (default: memory_migration_backup_YYYYMMDD_HHMMSS_ffffff_"
                        "<random>.umbk, UTC, in the backup directory: UNIFIED_MEMORY_BACKUP_DIR or <data dir>/backups, "
                        "which must be private to this user).", show_default=False)] = None,
               copy_format: Annotated[str, typer.Option(
                   help="COPY format of the data: binary (fast, exact) or text (readable by other tools).")
               ] = backup.COPY_FORMAT,
               key_file: KeyFileOpt = None, json_flag: JsonOpt = False) -> None:
    """Back up every legacy table (definition and rows) into one compressed file, mode 0600."""
    if ctx.invoked_subcommand is not None:
        return
    opts = options(ctx, json_flag)
    with failures(opts):
        secret = load_key(key_file=key_file)
        path = out.resolve() if out else backup.default_path(backup_dir(opts.data_dir))
    run(ctx, lambda conn: backup.backup(conn, path, secret=secret, copy_format=copy_format, lock_wait=opts.lock_wait),
        report.backup_manifest, json_flag)


@backup_app.command("verify")
def backup_verify(ctx: typer.Context, path: Annotated[Path, typer.Argument(help="The backup file.")],
                  key_file: KeyFileOpt = None, json_flag: JsonOpt = False) -> None:
    """Check a backup's completeness and every checksum, without a database."""
    opts = options(ctx, json_flag)
    with failures(opts):
        emit(opts, backup.verify(_backup_file(opts, path), secret=load_key(key_file=key_file)), report.verified)


# ---------------------------------------------------------------------------------------------- rollback
@app.command("rollback")
def rollback_cmd(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="The backup file to restore from.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; change nothing.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Proceed (the rollback never asks on stdin).")] = False,
    force: Annotated[bool, typer.Option(help="Also remove migrated memories changed since the migration.")] = False,
    discard_new_rows: Annotated[bool, typer.Option(
        help="With --replace-tables: do not carry over rows added after the backup (saved aside anyway).")] = False,
    replace_tables: Annotated[bool, typer.Option(
        help="Replace legacy tables that still exist with the backup's version, saving the current one aside "
             "(default: a live table's rows are the newest truth and are kept).")] = False,
    into_other_database: Annotated[bool, typer.Option(
        help="Restore a backup taken of another database (cluster or database OID differ) on purpose.")] = False,
    key_file: KeyFileOpt = None,
    json_flag: JsonOpt = False,
) -> None:
    """Restore the legacy tables from a verified backup and remove the memories the migration created."""
    opts = options(ctx, json_flag)
    logs.setup(opts.data_dir)
    with failures(opts):
        secret = load_key(key_file=key_file)
        found = _backup_file(opts, path)
    result = run(ctx, lambda conn: rollback(conn, found, secret=secret, dry_run=dry_run, yes=yes, force=force,
                                            discard_new_rows=discard_new_rows, lock_wait=opts.lock_wait,
                                            into_other_database=into_other_database,
                                            replace_tables=replace_tables),
                 report.rollback_result, json_flag)
    if result is not None and not dry_run and _milvus_configured(opts):
        _forget_vectors(opts)


def _forget_vectors(opts: Options) -> None:
    """After a rollback: the removed memories leave the Milvus collection too (queued by migration 021)."""
    from . import vectors

    spec = vectors.CollectionSpec(os.environ.get("UNIFIED_MEMORY_COLLECTION") or DEFAULT_COLLECTION)
    with failures(opts), _milvus(opts) as client, connect(opts.target()) as conn:
        done = vectors.forget(conn, client, spec)
    if not (opts.json or opts.quiet):
        print(f"removed {done.removed} memories from the Milvus collection {spec.name}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- cutover, cleanup
@app.command("cutover")
def cutover_cmd(ctx: typer.Context, lock_timeout_ms: LockTimeoutOpt = 2000,
                attempts: Annotated[int, typer.Option(min=1, max=10_000,
                                                      help="Tries to take the locks before giving up.")] = 30,
                json_flag: JsonOpt = False) -> None:
    """Apply the last changes, make the legacy tables read-only and stop capture: the app uses memories only."""
    logs.setup(options(ctx, json_flag).data_dir)
    run(ctx, lambda conn: cutover.cutover(conn, lock_timeout_ms=lock_timeout_ms, attempts=attempts),
        report.cutover_result, json_flag)


@app.command("cleanup")
def cleanup_cmd(ctx: typer.Context,
                yes: Annotated[bool, typer.Option("--yes", help="Proceed (it never asks on stdin).")] = False,
                key_file: KeyFileOpt = None, json_flag: JsonOpt = False) -> None:
    """After cutover, a successful migration and validation: final verified backup, then drop the legacy tables."""
    opts = options(ctx, json_flag)
    logs.setup(opts.data_dir)
    with failures(opts):
        secret = load_key(key_file=key_file)
        path = backup.default_path(backup_dir(opts.data_dir))
    run(ctx, lambda conn: cutover.cleanup(conn, path, secret=secret, yes=yes), report.cleanup_result, json_flag)


# ---------------------------------------------------------------------------------------------- validate
@app.command("validate")
def validate_cmd(
    ctx: typer.Context,
    report_path: Annotated[Path | None, typer.Option("--report", help="Write a report file here.",
                                                     show_default=False)] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="Report format: json, markdown or html (default: from "
                                                             "the file's extension, else markdown).",
                                            show_default=False)] = None,
    backup_path: Annotated[Path | None, typer.Option("--backup", help="Reconcile counts of legacy tables that are "
                                                                      "gone against this backup's manifest.",
                                                     show_default=False)] = None,
    key_file: KeyFileOpt = None,
    with_vectors: Annotated[bool | None, typer.Option(
        "--vectors/--no-vectors", help="Also compare the Milvus collection with memories (default: when MILVUS_URI "
                                       "or MILVUS_HOST is set, or the data directory holds a Milvus Lite file).",
        show_default=False)] = None,
    collection: CollectionOpt = DEFAULT_COLLECTION, dim: DimOpt = DEFAULT_DIMENSION,
    embedder: EmbedderOpt = "hashing",
    json_flag: JsonOpt = False,
) -> None:
    """Check schema, data integrity, reconciliation with the source, tenant isolation, indexes, functions, vectors."""
    opts = options(ctx, json_flag)
    with failures(opts), ExitStack() as stack:
        render = report.validation_renderer(fmt, report_path)
        manifest = backup.verify(backup_path, secret=load_key(key_file=key_file)) if backup_path else None
        checks = _vector_checks(opts, stack, collection, dim, embedder) if (
            with_vectors if with_vectors is not None else _milvus_configured(opts)) else None
        with connect(opts.target()) as conn:
            result = validate(conn, manifest=manifest, vectors=checks)
        if report_path is not None:
            write_private(report_path, render(result))
        emit(opts, result, report.validation)
        if report_path is not None and not opts.json:
            print(f"report: {report_path.resolve()}")
        result.raise_for_failure()


def _vector_checks(opts: Options, stack: ExitStack, collection: str, dim: int, embedder: str) -> VectorChecks:
    from . import vectors

    client = stack.enter_context(_milvus(opts))
    spec, chosen = vectors.CollectionSpec(collection, dim), _embedder(embedder, dim)
    return lambda conn: vectors.verify(conn, client, spec, chosen).checks


@app.command("health")
def health_cmd(ctx: typer.Context,
               fmt: Annotated[str | None, typer.Option("--format", help="text, json or prometheus (the exposition "
                                                                        "format, for a textfile collector).",
                                                       show_default=False)] = None,
               json_flag: JsonOpt = False) -> None:
    """The guide's health queries, the last run's status, quarantine and expired-on-arrival counts."""
    opts = options(ctx, json_flag)
    with failures(opts):
        render = report.health_renderer(fmt, json_output=opts.json)
        with connect(opts.target()) as conn:
            result = health(conn)
        print(render(result))
        result.raise_for_failure()


# ---------------------------------------------------------------------------------------------- metrics
@app.command("metrics")
def metrics_cmd(
    ctx: typer.Context,
    serve: Annotated[int | None, typer.Option("--serve", metavar="PORT", help="Serve /metrics on this port "
                                              "instead of printing once.", show_default=False)] = None,
    bind: Annotated[str, typer.Option(help="Address to serve on (loopback unless you say otherwise).")] = "127.0.0.1",
    interval: Annotated[float, typer.Option(help="Seconds a snapshot is reused: scrapes in between share it.")] = 30.0,
    timeout: Annotated[float, typer.Option(help="statement_timeout of each query, in seconds.")] = 10.0,
    database: Annotated[str | None, typer.Option(help="Another database on the same server (the demo's: "
                                                      f"{DEMO_DATABASE}).", show_default=False)] = None,
    collection: CollectionOpt = DEFAULT_COLLECTION,
) -> None:
    """Metrics in the Prometheus exposition format: printed once, or served for scraping (--serve PORT)."""
    opts = options(ctx)
    with failures(opts):
        target = on_database(opts.target(), database) if database else opts.target()
        count = metrics.milvus_counter(configured_milvus_uri(home=opts.data_dir), collection)
        read = metrics.reader(lambda: connect(target), timeout_ms=int(timeout * 1000), count_entities=count)
        collector = metrics.SnapshotCollector(read, interval=interval, tolerate_errors=serve is not None)
        if serve is None:
            print(metrics.render(collector), end="")
            return
        server = metrics.serve(collector, port=serve, bind=bind)
        print(f"serving metrics on http://{bind}:{server.port}/metrics (Ctrl-C stops)", file=sys.stderr)
        server.wait()


# ---------------------------------------------------------------------------------------------- vectors
@contextmanager
def _milvus(opts: Options) -> Iterator[MilvusClient]:
    from . import vectors

    uri = milvus_uri(home=opts.data_dir)
    client = vectors.open_client(uri)
    try:
        yield client
    finally:
        client.close()


def _milvus_configured(opts: Options) -> bool:
    return bool(os.environ.get("MILVUS_URI") or os.environ.get("MILVUS_HOST")) or Path(
        milvus_uri({}, home=opts.data_dir)).exists()


@overload
def _embedder(name: str, dim: int) -> Embedder | None: ...
@overload
def _embedder(name: str, dim: int, *, needed_by: str) -> Embedder: ...
def _embedder(name: str, dim: int, *, needed_by: str | None = None) -> Embedder | None:
    """The embedder called ``name`` (numpy loads only when one is needed); ``none`` is none unless ``needed_by``."""
    from .embedders import embedder_for, optional_embedder

    return optional_embedder(name, dim) if needed_by is None else embedder_for(name, dim, needed_by=needed_by)


@vectors_app.command("up")
def vectors_up(ctx: typer.Context, collection: CollectionOpt = DEFAULT_COLLECTION,
               dim: DimOpt = DEFAULT_DIMENSION, json_flag: JsonOpt = False) -> None:
    """Create the unified collection and its indexes (idempotent; an incompatible one is reported, not changed)."""
    from . import vectors

    opts = options(ctx, json_flag)
    with failures(opts), _milvus(opts) as client:
        emit(opts, vectors.up(client, vectors.CollectionSpec(collection, dim)), report.vector_up)


@vectors_app.command("sync")
def vectors_sync(ctx: typer.Context, collection: CollectionOpt = DEFAULT_COLLECTION,
                 dim: DimOpt = DEFAULT_DIMENSION, embedder: EmbedderOpt = "hashing",
                 batch_size: Annotated[int, typer.Option(min=1, max=100000, help="Memories per batch.")] = 1000,
                 full: Annotated[bool, typer.Option(help="Re-upsert every live memory and remove every entity "
                                                         "that is not one.")] = False,
                 follow: Annotated[bool, typer.Option(help="Keep syncing (Ctrl-C stops between passes).")] = False,
                 until_idle: Annotated[bool, typer.Option(help="With --follow: stop when nothing is left.")] = False,
                 interval: Annotated[float, typer.Option(min=0.05, help="With --follow: seconds between idle "
                                                                        "passes.")] = 1.0,
                 json_flag: JsonOpt = False) -> None:
    """Bring the collection in step with memories: queued changes, new memories, passed expiries."""
    from . import vectors

    opts = options(ctx, json_flag)
    logs.setup(opts.data_dir)
    with failures(opts), _milvus(opts) as client, connect(opts.target()) as conn, \
            reporter(not (opts.json or opts.quiet or follow)) as progress, \
            locks.hold(conn, "vectors sync", opts.lock_wait):
        spec, chosen = vectors.CollectionSpec(collection, dim), _embedder(embedder, dim)
        result = vectors.follow(conn, client, spec, chosen, interval=interval, until_idle=until_idle,
                                batch_size=batch_size, report=None if opts.json or opts.quiet else _shown) \
            if follow else vectors.sync(conn, client, spec, chosen, batch_size=batch_size, full=full,
                                        progress=progress)
        emit(opts, result, report.vector_sync)


def _shown(result: Any) -> None:
    print(report.vector_sync(result), file=sys.stderr, flush=True)


@vectors_app.command("verify")
def vectors_verify(ctx: typer.Context, collection: CollectionOpt = DEFAULT_COLLECTION,
                   dim: DimOpt = DEFAULT_DIMENSION, embedder: EmbedderOpt = "hashing",
                   sample: Annotated[int | None, typer.Option(
                       min=1, help="Compare only this many memories, chosen at random (default: every entity).",
                       show_default=False)] = None,
                   json_flag: JsonOpt = False) -> None:
    """Per-tenant counts, every entity's fields, text and vector, a filtered search; exit 11 on a difference."""
    from . import vectors

    opts = options(ctx, json_flag)
    with failures(opts), _milvus(opts) as client, connect(opts.target()) as conn:
        result = vectors.verify(conn, client, vectors.CollectionSpec(collection, dim), _embedder(embedder, dim),
                                sample=sample)
        emit(opts, result, report.vector_verify)
        result.raise_for_failure()


@vectors_app.command("search")
def vectors_search(ctx: typer.Context, text: Annotated[str, typer.Argument(help="What to look for.")],
                   user: Annotated[str, typer.Option("--user", help="The tenant's user id (required).")],
                   org: Annotated[str | None, typer.Option("--org", help="The tenant's organisation, if any.",
                                                           show_default=False)] = None,
                   k: Annotated[int, typer.Option("-k", min=1, max=16384, help="How many hits.")] = 5,
                   collection: CollectionOpt = DEFAULT_COLLECTION, dim: DimOpt = DEFAULT_DIMENSION,
                   embedder: EmbedderOpt = "hashing", json_flag: JsonOpt = False) -> None:
    """Semantic search within one tenant (user, org); the search is written to memory_access_log."""
    from . import vectors

    opts = options(ctx, json_flag)
    with failures(opts):
        chosen = _embedder(embedder, dim, needed_by="search")
        with _milvus(opts) as client, connect(opts.target()) as conn:
            result = vectors.search(conn, client, vectors.CollectionSpec(collection, dim), chosen, user_id=user,
                                    org_id=org, text=text, k=k)
        emit(opts, result, report.search_hits)


# ---------------------------------------------------------------------------------------------- demo
@app.command("demo")
def demo_cmd(ctx: typer.Context,
             rows: Annotated[int, typer.Option(min=1, max=100_000_000, help="Synthetic rows per legacy table.")
                             ] = 20000,
             json_flag: JsonOpt = False) -> None:
    """The main job end to end on a fresh demo database (embedded PostgreSQL and Milvus Lite by default)."""
    from . import demo

    opts = options(ctx, json_flag)
    logs.setup(opts.data_dir)
    with failures(opts):
        result = demo.run(opts.target(), opts.data_dir, rows=rows, show=None if opts.json else _stage_shown,
                          say=None if opts.json else print)
        emit(opts, result, lambda _: "\nmetrics: " + report.metrics_command(opts.data_dir,
                                                                             demo.milvus_file(opts.data_dir)))
        result.raise_for_failure()


def _stage_shown(heading: str, text: str) -> None:
    print(f"\n== {heading}\n{text}", flush=True)


def main() -> None:
    """Console entry point: a failure outside a command's own handling is still one ``FAILED:`` line."""
    try:
        app()
    except Exception as exc:  # noqa: BLE001 - never a raw traceback unless --traceback
        if "--traceback" in sys.argv[1:]:
            _print_traceback(exc)
        print(f"FAILED: unexpected error: {describe(exc)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Human renderings of stage results (JSON is each result's ``to_dict``)."""

from __future__ import annotations

from .backup import BackupManifest
from .migrate import MigrationRun
from .rollback import RollbackResult


def _table(headers: list[str], rows: list[list[object]]) -> str:
    """A plain aligned text table."""
    table: list[list[object]] = [list(headers), *rows]
    cells = [[str(c) for c in row] for row in table]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def migration(run: MigrationRun) -> str:
    """The migration's final summary (or the dry run's plan): shapes, outcomes per table, rates."""
    title = {"planned": "DRY RUN (nothing was written): what the migration would do",
             "nothing_to_do": "Nothing to do: every legacy row already has an outcome; nothing was changed",
             "succeeded": "Migration succeeded", "failed": "Migration FAILED"}.get(run.status, run.status)
    lines = [title, "", "Detected shapes: " + ", ".join(f"{t}={s or 'missing (skipped)'}"
                                                       for t, s in run.shapes.items()), ""]
    rows = []
    for table, acc in run.accounts.items():
        tr = run.tables.get(table)
        rate = f"{tr.rows / tr.seconds:,.0f}" if tr and tr.seconds else "-"
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(acc.quarantined.items())) or "-"
        rows.append([table, acc.shape, acc.source_rows, acc.items if acc.items is not None else "-", acc.migrated,
                     acc.duplicates, acc.quarantined_total, acc.unaccounted, rate, reasons])
    lines.append(_table(["table", "shape", "rows", "items", "migrated", "duplicates", "quarantined",
                         "unaccounted", "rows/s", "quarantine reasons"], rows))
    lines.append("")
    lines.append(f"run {run.run_id or '-'} in {run.seconds:.1f} s; indexes rebuilt after load: {run.rebuilt_indexes}")
    return "\n".join(lines)


def backup_manifest(manifest: BackupManifest) -> str:
    """A backup's manifest: file, origin, and each table's rows, bytes and checksum."""
    lines = [f"backup {manifest.path} ({manifest.file_bytes:,} bytes, "
             f"{'encrypted' if manifest.encrypted else 'not encrypted'}) in {manifest.seconds:.2f} s",
             f"from {manifest.database} on PostgreSQL {manifest.server_version} at {manifest.created_at}", ""]
    rows = [[t, b.rows, f"{b.bytes:,}", b.sha256[:16]] for t, b in manifest.tables.items()]
    lines.append(_table(["table", "rows", "data bytes", "sha256"], rows))
    return "\n".join(lines)


def verified(manifest: BackupManifest) -> str:
    """``backup verify``: every checksum matched."""
    return "VERIFIED: every table's rows and SHA-256 match the manifest\n" + backup_manifest(manifest)


def rollback_result(result: RollbackResult) -> str:
    """The rollback's plan (dry run) or outcome."""
    title = ("DRY RUN (nothing was changed): what the rollback would do" if result.dry_run
             else "Rollback complete")
    rows = [[t, r.action, r.rows, r.rows_added_since, r.kept_new_rows, r.saved_as or "-"]
            for t, r in result.tables.items()]
    return "\n".join([
        title, "", _table(["table", "action", "rows", "added since", "kept", "previous table saved as"], rows), "",
        f"memories removed (created by the migration): {result.memories_removed}",
        f"memories kept (changed since the migration; --force removes them): {result.memories_kept_changed}",
        f"quarantine rows cleared: {result.quarantine_cleared}; checkpoints cleared: {result.checkpoints_cleared}; "
        f"runs marked rolled_back: {result.runs_marked}",
    ])

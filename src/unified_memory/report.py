"""Human renderings of stage results (JSON is each result's ``to_dict``)."""

from __future__ import annotations

from .migrate import MigrationRun


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

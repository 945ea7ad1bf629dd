"""Human renderings of stage results (JSON is each result's ``to_dict``)."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import metrics
from .backup import BackupManifest
from .cutover import CleanupResult, CutoverResult
from .errors import ConfigError
from .health import Health
from .live import CatchUp, Lag
from .migrate import MigrationRun
from .rollback import RollbackResult
from .schema import SchemaResult, SchemaStatus
from .validate import Check, ValidationReport

if TYPE_CHECKING:  # the vector stack (pymilvus) is imported only by the commands that use it
    from .vectors import SearchResult, SyncResult, UpResult, VerifyResult


_UNSAFE = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")  # controls, format (bidi) marks, surrogates, unassigned


def safe(text: object) -> str:
    """``text`` fit for a terminal: control, bidi and other invisible characters written as escapes
    (``\\x1b``, ``\\u202e``), so memory text can neither drive the terminal nor reorder what is shown."""
    return "".join(c if unicodedata.category(c) not in _UNSAFE else
                   f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" if ord(c) < 0x10000
                   else f"\\U{ord(c):08x}" for c in str(text))


def _table(headers: list[str], rows: list[list[object]]) -> str:
    """A plain aligned text table."""
    table: list[list[object]] = [list(headers), *rows]
    cells = [[str(c) for c in row] for row in table]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    last = len(headers) - 1
    lines = ["  ".join(c.ljust(w) if i == 0 else c if i == last and not c.isdigit() else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def schema_result(result: SchemaResult) -> str:
    """``schema up`` / ``schema down``: the files run (or, for a dry run, to run), and an adoption's report."""
    files = ", ".join(result.files) or ("nothing to repair" if result.action == "repair" else "nothing to do")
    verb = f"schema {result.action} --dry-run (nothing was changed), would apply" if result.dry_run \
        else f"schema {result.action}"
    lines = [f"{verb}: {files} ({result.seconds:.2f} s)"]
    if result.adoption is not None:
        lines += _adoption(result.adoption)
    if result.reverted is not None:
        r = result.reverted
        lines.append("first implementation's schema restored; rows restored: "
                     + (", ".join(f"{t}={n}" for t, n in r["rows_restored"].items()) or "none")
                     + f"; rows changed since adoption kept as they are: {r['rows_kept_changed']}")
        if r["constraints_not_valid"]:
            lines.append("its constraints broken by rows written since, added NOT VALID: "
                         + ", ".join(r["constraints_not_valid"]))
    return "\n".join(lines)


def _adoption(a: dict[str, Any]) -> list[str]:
    def pairs(d: dict[str, int]) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(d.items())) or "none"

    return [
        f"first implementation's 016 found ({a['variant']}); converted in place in one transaction"
        + (" (dry run: rolled back)" if a["dry_run"] else ""),
        f"  rows found: {pairs(a['rows_found'])}",
        f"  NULLs filled with defaults: {pairs(a['filled'])}",
        f"  rows kept aside in unified_memory_adoption_aside: {pairs(a['set_aside'])}",
        f"  copies of legacy rows that became their migration: {pairs(a['claimed'])}",
        f"  application memories kept as they are: {a['application_rows']}",
        f"  replaced objects of the first implementation: {len(a['replaced'])}",
    ]


def schema_status(result: SchemaStatus) -> str:
    """``schema status``: applied, pending and edited files."""
    lines = [f"applied  {a['file']}  {a['applied_at']}" for a in result.applied]
    lines += [f"pending  {name}" for name in result.pending]
    lines += [f"EDITED   {name} (content changed after it was applied)" for name in result.edited]
    lines += [f"UNRECORDED {name}: its objects exist (applied outside the runner); `schema up` completes and "
              "records it" for name in result.unrecorded]
    if result.adoptable:
        lines.append(f"FIRST IMPLEMENTATION's 016 found ({result.adoptable}): `schema up --dry-run` shows the "
                     "conversion, `schema up` adopts it")
    lines += [f"DRIFT    {d['kind']} {d['name']} of {d['version']} is {d['problem']}; `schema repair` recreates it"
              for d in result.drift]
    lines += [f"untracked {name}: applied before drift was recorded; not checked for drift"
              for name in result.untracked]
    if result.adopted:
        lines.append("016 was adopted from the first implementation (`schema down` restores its shape and rows)")
    return "\n".join(lines) or "no migration files"


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
    if run.catch_up is not None:
        lines.append(catch_up(run.catch_up))
    return "\n".join(lines)


def catch_up(result: CatchUp) -> str:
    """What catch-up applied of the application's changes, and the lag left."""
    lag = result.lag
    return (f"catch-up: {result.changes} changes in {result.batches} batches ({result.seconds:.1f} s): "
            f"{result.inserted} inserted, {result.updated} updated, {result.deleted} soft-deleted, "
            f"{result.quarantined} quarantined, {result.conflicts} conflicts (kept the unified store's version); "
            f"waiting now {lag.get('waiting', 0)}, conflicts recorded {lag.get('conflicts', 0)}")


def lag_line(lag: Lag) -> str:
    """One line of ``migrate --follow``."""
    age = "-" if lag.oldest_seconds is None else f"{lag.oldest_seconds:.1f} s"
    return f"lag: {lag.waiting} changes waiting, oldest {age}; conflicts {lag.conflicts}"


def cutover_result(result: CutoverResult) -> str:
    """``cutover`` on a terminal."""
    return (f"cut over {', '.join(result.tables)}: legacy tables are read-only, capture removed; "
            f"{result.before_lock.changes} changes applied before the lock, {result.under_lock.changes} under it; "
            f"locked {result.locked_seconds:.3f} s (attempt {result.attempts}), {result.seconds:.1f} s in all")


def cleanup_result(result: CleanupResult) -> str:
    """``cleanup`` on a terminal."""
    dropped = ", ".join(f"{t} ({n} rows)" for t, n in result.tables.items())
    return f"final backup verified: {result.backup}\ndropped: {dropped}"


def backup_manifest(manifest: BackupManifest, *, done: str = "written") -> str:
    """A backup's manifest: file, origin, and each table's rows, bytes and checksum."""
    lines = [f"backup {manifest.path} ({manifest.file_bytes:,} bytes, "
             f"{'encrypted' if manifest.encrypted else 'not encrypted'}, format {manifest.format_version}), "
             f"{done} in {manifest.seconds:.2f} s",
             f"from {manifest.database} (OID {manifest.database_oid or '?'}, cluster "
             f"{manifest.system_identifier or '?'}) on PostgreSQL {manifest.server_version} at {manifest.created_at}",
             "authenticated (sealed with the key: AES-256-GCM)" if manifest.authenticated
             else "NOT authenticated: anyone who could write the file could have changed it consistently", ""]
    rows = [[t, b.rows, f"{b.bytes:,}", b.copy_format, b.sha256[:16]] for t, b in manifest.tables.items()]
    lines.append(_table(["table", "rows", "data bytes", "COPY format", "sha256"], rows))
    return "\n".join(lines)


def verified(manifest: BackupManifest) -> str:
    """``backup verify``: every checksum matched."""
    return ("VERIFIED: every table's data, size and SHA-256 match the manifest\n"
            + backup_manifest(manifest, done="verified"))


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


_MARK = {"pass": "PASS", "warn": "WARN", "fail": "FAIL"}


def check_lines(checks: list[Check]) -> list[str]:
    """One terminal line per check: ``PASS  name: message``."""
    return [f"{_MARK[c.status]}  {c.name}: {c.message}" for c in checks]


def validation(result: ValidationReport) -> str:
    """The validator's verdict on a terminal: one line per check, failures first."""
    order = {"fail": 0, "warn": 1, "pass": 2}
    lines = check_lines(sorted(result.checks, key=lambda c: order[c.status]))
    counts = result.to_dict()["counts"]
    lines.append("")
    lines.append(f"validation {result.status.upper()}: {counts['pass']} passed, {counts['warn']} warned, "
                 f"{counts['fail']} failed in {result.seconds:.1f} s")
    return "\n".join(lines)


def validation_markdown(result: ValidationReport) -> str:
    """A Markdown page: verdict, every check with its evidence, and the distributions as bar charts."""
    data = result.to_dict()
    lines = [f"# Unified memory validation: {result.status.upper()}", "",
             f"{data['counts']['pass']} passed, {data['counts']['warn']} warned, {data['counts']['fail']} failed "
             f"in {result.seconds:.1f} s. Totals: " + ", ".join(f"{k} {v}" for k, v in result.totals.items()), "",
             "| status | check | result |", "| --- | --- | --- |"]
    lines += [f"| {_MARK[c.status]} | `{c.name}` | {_md(c.message)} |" for c in result.checks]
    for name, rows in result.distributions.items():
        lines += ["", f"## {name.replace('_', ' ')}", "", "| value | memories | |", "| --- | ---: | --- |"]
        top = max((int(r[1]) for r in rows), default=1) or 1
        lines += [f"| {_md(str(r[0]))} | {r[1]} | {'█' * max(1, round(30 * int(r[1]) / top))} |" for r in rows]
    return "\n".join(lines) + "\n"


def validation_html(result: ValidationReport) -> str:
    """A standalone HTML page with the same content as the Markdown one, and CSS bar charts."""
    data = result.to_dict()
    rows = "".join(f"<tr class='{c.status}'><td>{_MARK[c.status]}</td><td><code>{escape(c.name)}</code></td>"
                   f"<td>{escape(c.message)}</td></tr>" for c in result.checks)
    charts = []
    for name, dist in result.distributions.items():
        top = max((int(r[1]) for r in dist), default=1) or 1
        bars = "".join(f"<tr><td>{escape(str(r[0]))}</td><td class='n'>{r[1]}</td><td><div class='bar' "
                       f"style='width:{max(1, round(300 * int(r[1]) / top))}px'></div></td></tr>" for r in dist)
        charts.append(f"<h2>{escape(name.replace('_', ' '))}</h2><table>{bars}</table>")
    totals = ", ".join(f"{escape(k)} {v}" for k, v in result.totals.items())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Unified memory validation</title><style>"
            "body{font-family:sans-serif;margin:2em}td{padding:2px 8px}.fail td:first-child{color:#b00;"
            "font-weight:bold}.warn td:first-child{color:#a60}.pass td:first-child{color:#070}"
            ".bar{background:#48c;height:12px}.n{text-align:right}</style></head><body>"
            f"<h1>Unified memory validation: {result.status.upper()}</h1><p>{data['counts']['pass']} passed, "
            f"{data['counts']['warn']} warned, {data['counts']['fail']} failed in {result.seconds:.1f} s. "
            f"Totals: {totals}</p><table>{rows}</table>{''.join(charts)}</body></html>\n")


def health_text(result: Health) -> str:
    """``health`` on a terminal."""
    run = result.last_run
    lines = [f"health: {'OK' if result.healthy else 'PROBLEMS'} ({result.seconds:.2f} s)",
             "records: " + ", ".join(f"{k} {v}" for k, v in result.counts.items()),
             "quality: " + ", ".join(f"{k} {v}" for k, v in result.quality.items()),
             f"last migration run: {run['run_id']} {run['status']} at {run['finished_at']}" if run
             else "last migration run: none",
             f"quarantined legacy rows or items: {result.quarantined}",
             "vector collection: " + (f"{result.vectors['queued_changes']} queued changes (oldest "
                                      f"{result.vectors['oldest_change_seconds'] or 0:.0f} s), "
                                      f"{result.vectors['memories_without_vector']} live memories without a vector"
                                      if result.vectors else "not followed (migration 021 not applied)"),
             _live_line(result.live), "",
             _table(["user_id", "memories"], [list(r) for r in result.top_tenants])]
    return "\n".join(lines)


def health_prometheus(result: Health) -> str:
    """``health --format prometheus``: the same figures in the exposition format (no tenant ids)."""
    families = metrics.health_families(result)
    return metrics.render(metrics.StaticCollector(families)).rstrip("\n")


def _json(result: Any) -> str:
    return json.dumps(result.to_dict(), indent=2, default=str)


def health_renderer(fmt: str | None, *, json_output: bool) -> Callable[[Health], str]:
    """The rendering of ``health`` for ``--format`` (text, json, prometheus); ``--json`` means json.

    Raises:
        ConfigError: an unknown format.
    """
    kind = fmt or ("json" if json_output else "text")
    renderers: dict[str, Callable[[Health], str]] = {"text": health_text, "json": _json,
                                                     "prometheus": health_prometheus}
    if kind not in renderers:
        raise ConfigError(f"--format takes text, json or prometheus; got {kind!r}")
    return renderers[kind]


VALIDATION_RENDERERS: dict[str, Callable[[ValidationReport], str]] = {
    "json": lambda r: _json(r) + "\n", "markdown": validation_markdown, "html": validation_html}


def validation_renderer(fmt: str | None, path: Path | None) -> Callable[[ValidationReport], str]:
    """The report file's rendering: ``--format``, else from the file's extension, else Markdown.

    Raises:
        ConfigError: an unknown format.
    """
    kind = fmt or {".json": "json", ".html": "html", ".htm": "html"}.get(path.suffix.lower() if path else "",
                                                                        "markdown")
    if kind not in VALIDATION_RENDERERS:
        raise ConfigError(f"--format takes json, markdown or html; got {kind!r}")
    return VALIDATION_RENDERERS[kind]


def metrics_summary(snapshot: metrics.Snapshot) -> str:
    """A few lines about a metrics snapshot: its size, its cost and the headline figures."""
    lines = [f"{len(snapshot.families)} metric families, {sum(len(f.samples) for f in snapshot.families)} samples, "
             f"read in {snapshot.seconds:.2f} s (one REPEATABLE READ snapshot)"]
    wanted = ("unified_memory_tenants", "unified_memory_largest_tenant_share",
              "unified_memory_validation_last_run_passed", "unified_memory_migration_last_run_rows_per_second")
    for family in snapshot.families:
        if family.name in wanted:
            lines.append(f"  {family.name} {family.samples[0].value:g}")
    live = sum(s.value for f in snapshot.families if f.name == "unified_memory_memories" for s in f.samples
               if s.labels["state"] == "live")
    lines.append(f"  unified_memory_memories{{state=\"live\"}} (summed over tier and type) {live:g}")
    return "\n".join(lines)


def metrics_command(data_dir: Path, milvus_file: Path) -> str:
    """The command that prints the demo database's metrics (its server and Milvus Lite file are named)."""
    return (f"MILVUS_URI={milvus_file} unified-memory --data-dir {data_dir} metrics --database unified_memory_demo"
            "   (add --serve 9464 to serve them for Prometheus)")


def _live_line(live: dict[str, Any]) -> str:
    captured = ", ".join(live.get("capturing", [])) or "-"
    cut = ", ".join(live.get("cut_over", [])) or "-"
    return (f"live: {live.get('waiting', 0)} changes waiting (oldest {live.get('oldest_seconds')} s), "
            f"{live.get('conflicts', 0)} conflicts; capturing {captured}; cut over {cut}")


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def vector_sync(result: SyncResult) -> str:
    """``vectors sync``: entities written, vectors per source, memories without a vector and why."""
    data = result.to_dict()
    lines = [f"synced {result.synced} memories into {result.collection} and removed {result.removed} "
             f"({result.changes} queued changes) in {result.batches} batches ({data['rows_per_second']:,.0f} rows/s)",
             "vector sources: " + (", ".join(f"{k} {v}" for k, v in sorted(result.sources.items())) or "none")]
    for reason, info in data["no_vector"].items():
        lines.append(f"no vector ({reason}): {info['count']}, e.g. {', '.join(info['sample_ids'][:3])}")
    return "\n".join(lines)


def search_hits(result: SearchResult) -> str:
    """``vectors search``: the tenant's hits, best first (text shortened)."""
    lines = [f"{len(result.hits)} hits for user {safe(result.user_id)} org {safe(result.org_id or '-')} "
             f"in {result.seconds * 1000:.0f} ms ({result.strategy} search; audited in memory_access_log)"]
    lines += [f"{h['score']:.3f}  {h['id']}  {h['memory_type']:<12} {safe(str(h['text'])[:70])}" for h in result.hits]
    return "\n".join(lines)


def vector_up(result: UpResult) -> str:
    """``vectors up``: created or already there, and which indexes were missing."""
    return (f"collection {result.collection}: {result.action}; indexes created: "
            f"{', '.join(result.indexes_created) or 'none (all present)'}; {result.entities} entities")


def vector_verify(result: VerifyResult) -> str:
    """``vectors verify``: one line per check."""
    return "\n".join(check_lines(result.checks))

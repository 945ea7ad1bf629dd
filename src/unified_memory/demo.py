"""The main job, end to end, as the guide describes it: on a fresh database of synthetic legacy data.

Legacy fixtures, the schema (016 + 017) and its status, the migration's dry-run plan, the migration with its
backup, ``backup verify``, a rollback plan (dry run), validation with its report, the Milvus collection filled
and verified, one tenant-filtered search, and the health figures. Each stage's result is shown as it lands.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import psycopg

from . import backup, fixtures, metrics, report, schema, vectors
from .checks import FAIL, Serialised
from .embedders import HashingEmbedder
from .health import health
from .migrate import MigrationOptions, migrate
from .milvus import MilvusClient
from .rollback import rollback
from .settings import write_private
from .validate import validate

Show = Callable[[str, str], None]  # (heading, text)


@dataclass
class DemoResult(Serialised):
    """Every stage's result, by stage name, and where the files went."""

    json_derived: ClassVar[dict[str, str]] = {"ok": "ok"}
    json_order: ClassVar[tuple[str, ...]] = ("ok", "files", "stages")

    stages: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.stages["validate"].status != FAIL and self.stages["vectors_verify"].ok


def run_demo(conn: psycopg.Connection, client: MilvusClient, *, rows: int, workdir: Path, show: Show) -> DemoResult:
    """Run the whole guide on ``conn``'s (fresh) database and the Milvus ``client``; files go to ``workdir``."""
    result = DemoResult()
    stages = result.stages
    stages["legacy"] = fixtures.create(conn, rows=rows)
    show("1. Legacy tables (synthetic, with every bad case of the field)",
         f"{rows} rows in each of {', '.join(f'{t} ({s})' for t, s in stages['legacy'].shapes.items())}")
    stages["schema_up"] = schema.up(conn)
    show("2. Schema: migrate.sh up postgres", report.schema_result(stages["schema_up"]) + "\n"
         + report.schema_status(schema.status(conn)))
    stages["plan"] = migrate(conn, MigrationOptions(dry_run=True))
    show("3. Data migration, dry run first", report.migration(stages["plan"]))
    backup_path = backup.default_path(workdir / "backups")

    def take_backup(c: psycopg.Connection) -> None:
        stages["backup"] = backup.backup(c, backup_path)

    stages["migrate"] = migrate(conn, MigrationOptions(), before_first_write=take_backup)
    show("4. Data migration (a verified backup is taken before the first write)", report.migration(stages["migrate"]))
    stages["backup_verify"] = backup.verify(backup_path)
    show("5. The backup it took, and `backup verify` of it", report.verified(stages["backup_verify"]))
    stages["rollback_plan"] = rollback(conn, backup_path, dry_run=True)
    show("6. What a rollback would do (dry run: nothing changes)", report.rollback_result(stages["rollback_plan"]))
    spec = vectors.CollectionSpec()
    embedder = HashingEmbedder(spec.dimension)
    stages["vectors_up"] = vectors.up(client, spec)
    stages["vectors_sync"] = vectors.sync(conn, client, spec, embedder)
    stages["vectors_verify"] = vectors.verify(conn, client, spec, embedder)
    show("7. Vectors: migrate.sh up milvus, sync, verify", "\n".join([
        report.vector_up(stages["vectors_up"]), report.vector_sync(stages["vectors_sync"]),
        report.vector_verify(stages["vectors_verify"])]))
    tenant = conn.execute("SELECT user_id FROM memories WHERE org_id IS NULL AND source_table = 'long_term_memory' "
                          "GROUP BY user_id ORDER BY count(*) DESC, user_id LIMIT 1").fetchone()
    stages["search"] = vectors.search(conn, client, spec, embedder, user_id=str(tenant[0]) if tenant else "nobody",
                                      org_id=None, text="long-term memory preference", k=3)
    show("8. One tenant-filtered search (audited)", report.search_hits(stages["search"]))
    stages["health"] = health(conn)
    show("9. Health", report.health_text(stages["health"]))
    stages["validate"] = validate(conn, vectors=lambda _: stages["vectors_verify"].checks)  # verified in step 7
    result.files = {"backup": str(backup_path),
                    "report_html": str(write_private(workdir / "validation_report.html",
                                                     report.validation_html(stages["validate"]))),
                    "report_markdown": str(write_private(workdir / "validation_report.md",
                                                         report.validation_markdown(stages["validate"])))}
    show("10. Validation", report.validation(stages["validate"]) + f"\n\nreport: {result.files['report_html']}"
         f"\n        {result.files['report_markdown']}")
    stages["metrics"] = metrics.snapshot(conn)
    show("11. Metrics (the Prometheus exposition format; deploy/ has the dashboard and alert rules)",
         report.metrics_summary(stages["metrics"]))
    return result

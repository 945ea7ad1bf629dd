"""The main job, end to end, as the guide describes it: on a fresh database of synthetic legacy data.

Legacy fixtures, the schema (016 + 017) and its status, the migration's dry-run plan, the migration with its
backup, ``backup verify``, a rollback plan (dry run), validation with its report, the Milvus collection filled
and verified, one tenant-filtered search, and the health figures. Each stage's result is shown as it lands.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import psycopg

from . import backup, fixtures, metrics, report, schema, vectors
from .checks import FAIL, Serialised
from .db import DEMO_DATABASE, Target, connect, fresh_database, scalar
from .embedders import HashingEmbedder
from .errors import ValidationFailed
from .health import health
from .migrate import MigrationOptions, migrate
from .milvus import MilvusClient
from .rollback import rollback
from .settings import private_dir, write_private
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


    def raise_for_failure(self) -> None:
        """Raises ValidationFailed when the demo's validation or vector verification failed (exit 10)."""
        if not self.ok:
            raise ValidationFailed("the demo's validation failed (see above)")


def workdir(data_dir: Path) -> Path:
    """Where the demo writes its files (its backup, reports and Milvus Lite file)."""
    return data_dir / "demo"


def milvus_file(data_dir: Path) -> Path:
    """The demo's Milvus Lite file."""
    return workdir(data_dir) / "milvus_demo.db"


def run(target: Target, data_dir: Path, *, rows: int, show: Show | None = None,
        say: Callable[[str], None] | None = None) -> DemoResult:
    """The demo on a fresh database on ``target``'s server and a fresh Milvus Lite file under ``data_dir``.

    ``show`` receives each stage's heading and rendering as it lands, ``say`` where things are.
    """
    demo_target = fresh_database(target, DEMO_DATABASE)
    files = workdir(data_dir)
    shutil.rmtree(files, ignore_errors=True)
    private_dir(files)
    if say is not None:
        say(f"demo database: {demo_target.description}; files in {files}")
    client = vectors.open_client(str(milvus_file(data_dir)))
    try:
        with connect(demo_target) as conn:
            return run_demo(conn, client, rows=rows, workdir=files, show=show or _quiet)
    finally:
        client.close()


def _quiet(heading: str, text: str) -> None:
    """Shows nothing."""


def run_demo(conn: psycopg.Connection, client: MilvusClient, *, rows: int, workdir: Path, show: Show) -> DemoResult:
    """Run the whole guide on ``conn``'s (fresh) database and the Milvus ``client``; files go to ``workdir``."""
    result = DemoResult()
    _legacy_and_migration(conn, result, rows=rows, workdir=workdir, show=show)
    _vectors(conn, client, result, show)
    _checks(conn, result, workdir, show)
    return result


def _legacy_and_migration(conn: psycopg.Connection, result: DemoResult, *, rows: int, workdir: Path,
                          show: Show) -> None:
    """Stages 1-6: the legacy tables, the schema, the migration with its backup, a rollback plan."""
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
    result.files["backup"] = str(backup_path)


def _vectors(conn: psycopg.Connection, client: MilvusClient, result: DemoResult, show: Show) -> None:
    """Stages 7-8: the collection made, filled and verified; one tenant-filtered search."""
    stages = result.stages
    spec = vectors.CollectionSpec()
    embedder = HashingEmbedder(spec.dimension)
    stages["vectors_up"] = vectors.up(client, spec)
    stages["vectors_sync"] = vectors.sync(conn, client, spec, embedder)
    stages["vectors_verify"] = vectors.verify(conn, client, spec, embedder)
    show("7. Vectors: migrate.sh up milvus, sync, verify", "\n".join([
        report.vector_up(stages["vectors_up"]), report.vector_sync(stages["vectors_sync"]),
        report.vector_verify(stages["vectors_verify"])]))
    tenant = scalar(conn, "SELECT user_id FROM memories WHERE org_id IS NULL AND source_table = 'long_term_memory' "
                          "GROUP BY user_id ORDER BY count(*) DESC, user_id LIMIT 1")
    stages["search"] = vectors.search(conn, client, spec, embedder, user_id=str(tenant or "nobody"),
                                      org_id=None, text="long-term memory preference", k=3)
    show("8. One tenant-filtered search (audited)", report.search_hits(stages["search"]))


def _checks(conn: psycopg.Connection, result: DemoResult, workdir: Path, show: Show) -> None:
    """Stages 9-11: health, validation with its reports, metrics."""
    stages = result.stages
    stages["health"] = health(conn)
    show("9. Health", report.health_text(stages["health"]))
    stages["validate"] = validate(conn, vectors=lambda _: stages["vectors_verify"].checks)  # verified in step 7
    result.files["report_html"] = str(write_private(workdir / "validation_report.html",
                                                    report.validation_html(stages["validate"])))
    result.files["report_markdown"] = str(write_private(workdir / "validation_report.md",
                                                        report.validation_markdown(stages["validate"])))
    show("10. Validation", report.validation(stages["validate"]) + f"\n\nreport: {result.files['report_html']}"
         f"\n        {result.files['report_markdown']}")
    stages["metrics"] = metrics.snapshot(conn)
    show("11. Metrics (the Prometheus exposition format; deploy/ has the dashboard and alert rules)",
         report.metrics_summary(stages["metrics"]))

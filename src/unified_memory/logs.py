"""The guide's ``memory_migration.log``: structured key=value lines, no memory content, no secrets, mode 0600."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import platformdirs

from .settings import private_dir

LOG_NAME = "memory_migration.log"
PYMILVUS_LOGGERS = ("pymilvus", "pymilvus.milvus_client", "pymilvus.bulk_writer", "pymilvus.decorators", "milvus_lite",
                    "grpc._server")  # milvus-lite's in-process server logs calls it does not implement
_verbose = False


def setup(home: Path) -> Path:
    """Send the tool's log records to ``home/memory_migration.log`` (created 0600); return its path."""
    path = private_dir(home) / LOG_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # also when it existed before with a wider mode
    finally:
        os.close(fd)
    root = logging.getLogger("unified_memory")
    if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path for h in root.handlers):
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s level=%(levelname)s stage=%(name)s %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    return path


def third_party(*, verbose: bool) -> None:
    """Keep other libraries' warnings and log noise off a normal run; ``--verbose`` shows them.

    pgserver asks platformdirs for a runtime directory (a RuntimeDirWarning where XDG_RUNTIME_DIR is unset);
    pymilvus logs warnings such as "failed to get mvccTs" for Milvus Lite, which has no such timestamp; gRPC's
    core logs transport chatter ("GOAWAY ... too_many_pings") on long syncs. gRPC reads ``GRPC_VERBOSITY``
    when it is loaded, so this runs before pymilvus is imported; an operator's own setting is kept.
    """
    global _verbose
    _verbose = verbose
    quiet_grpc()
    category = getattr(platformdirs, "RuntimeDirWarning", None)
    if category is not None and not verbose:
        warnings.filterwarnings("ignore", category=category)
    quiet_pymilvus()


def quiet_grpc() -> None:
    """gRPC's core reads GRPC_VERBOSITY once, when it is loaded: call before pymilvus (and gRPC) are imported."""
    if not _verbose:
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")


def quiet_pymilvus() -> None:
    """pymilvus configures its own loggers when it is imported and logs every refused call with its traceback:
    the tool reports Milvus errors itself, once and without secrets, so they stay silent unless verbose."""
    for name in PYMILVUS_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if _verbose else logging.CRITICAL)

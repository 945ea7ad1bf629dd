"""The guide's ``memory_migration.log``: structured key=value lines, no memory content, no secrets, mode 0600."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .settings import private_dir

LOG_NAME = "memory_migration.log"


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

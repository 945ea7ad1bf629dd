#!/usr/bin/env python3
"""Roll the migration back from a backup file; same options as `unified-memory rollback`.

As the guide writes it (`rollback_unified_memory_migration.py BACKUP`) it proceeds without a prompt: naming
this script is the explicit request, and `--yes` is implied unless `--dry-run` is given. The rollback verifies
the backup first and is all-or-nothing; legacy tables it replaces are saved aside, never dropped.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _entry import main  # noqa: E402

if __name__ == "__main__":
    main(["rollback"], unless_dry_run=("--yes",))

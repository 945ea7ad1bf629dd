#!/usr/bin/env python3
"""Validate the migration (the guide's step 4); same options as `unified-memory validate`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _entry import main  # noqa: E402

if __name__ == "__main__":
    main(["validate"])

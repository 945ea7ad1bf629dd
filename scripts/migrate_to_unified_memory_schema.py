#!/usr/bin/env python3
"""Migrate the legacy memory tables into memories (the guide's step 3); same options as `unified-memory migrate`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _entry import main  # noqa: E402

if __name__ == "__main__":
    main(["migrate"])

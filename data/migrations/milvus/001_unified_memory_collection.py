#!/usr/bin/env python3
"""Milvus migration 001: the unified memory collection (same as `unified-memory vectors up`).

Connection: MILVUS_URI (a Milvus Lite file or a server URI), else MILVUS_HOST/MILVUS_PORT, else the embedded
Milvus Lite file in the tool's data directory. Idempotent: re-running changes nothing.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
from _entry import main  # noqa: E402

if __name__ == "__main__":
    main(["vectors", "up"])

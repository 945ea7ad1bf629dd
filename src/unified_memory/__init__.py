"""unified-memory: move legacy assistant memories into one unified, tenant-isolated store."""

__version__ = "0.1.0"

"""pymilvus, imported so that our ``MILVUS_URI`` (which may be a Milvus Lite file path) does not break it.

pymilvus reads ``MILVUS_URI`` when it is imported and refuses anything but a server address. The variable is
hidden for the import and put back, so the tool's own reading of it (``settings.milvus_uri``) still works.
pymilvus also logs every refused call with its traceback on stderr (its own handler, not propagated): the tool
reports Milvus errors itself, once, without secrets, so pymilvus' loggers are silenced below CRITICAL.
"""

from __future__ import annotations

import os

from .logs import quiet_grpc, quiet_pymilvus

quiet_grpc()
_hidden = os.environ.pop("MILVUS_URI", None)
try:
    from pymilvus import DataType, MilvusClient, MilvusException
finally:
    if _hidden is not None:
        os.environ["MILVUS_URI"] = _hidden

quiet_pymilvus()  # after the import, which configures pymilvus' loggers

__all__ = ["DataType", "MilvusClient", "MilvusException"]

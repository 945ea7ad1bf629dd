"""pymilvus, imported so that our ``MILVUS_URI`` (which may be a Milvus Lite file path) does not break it.

pymilvus reads ``MILVUS_URI`` when it is imported and refuses anything but a server address. The variable is
hidden for the import and put back, so the tool's own reading of it (``settings.milvus_uri``) still works.
pymilvus also logs every refused call with its traceback on stderr (its own handler, not propagated): the tool
reports Milvus errors itself, once, without secrets, so pymilvus' loggers are silenced below CRITICAL.
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # grpc's C core logs keepalive chatter on stderr otherwise
_hidden = os.environ.pop("MILVUS_URI", None)
try:
    from pymilvus import DataType, MilvusClient, MilvusException
finally:
    if _hidden is not None:
        os.environ["MILVUS_URI"] = _hidden

for _name in ("pymilvus", "pymilvus.milvus_client", "pymilvus.bulk_writer", "pymilvus.decorators", "milvus_lite",
              "grpc._server"):  # milvus-lite's in-process server logs calls it does not implement
    logging.getLogger(_name).setLevel(logging.CRITICAL)

__all__ = ["DataType", "MilvusClient", "MilvusException"]

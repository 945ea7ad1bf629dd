"""Where the tool keeps its files, and how it finds the database and Milvus.

Order for PostgreSQL: ``--dsn``, else ``DATABASE_URL``, else the guide's ``POSTGRES_*`` variables, else the
embedded pgserver. Secrets never leave this module unredacted: use :func:`redact` for anything printed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import platformdirs
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .errors import ConfigError

DEFAULT_COLLECTION = "kari_memories_unified"
DEFAULT_DIMENSION = 768

_PG_ENV = {
    "POSTGRES_HOST": "host",
    "POSTGRES_PORT": "port",
    "POSTGRES_DB": "dbname",
    "POSTGRES_USER": "user",
    "POSTGRES_PASSWORD": "password",
}


def home_dir(env: Mapping[str, str] = os.environ) -> Path:
    """The tool's data directory: ``UNIFIED_MEMORY_HOME`` or the per-user data directory."""
    configured = env.get("UNIFIED_MEMORY_HOME")
    path = Path(configured) if configured else Path(platformdirs.user_data_dir("unified-memory"))
    return path.expanduser().resolve()


def private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) if needed and return it: backups and logs hold sensitive data."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def backup_dir(home: Path, env: Mapping[str, str] = os.environ) -> Path:
    """Where backups go: ``UNIFIED_MEMORY_BACKUP_DIR`` or ``<home>/backups`` (mode 0700)."""
    configured = env.get("UNIFIED_MEMORY_BACKUP_DIR")
    return private_dir(Path(configured).expanduser().resolve() if configured else home / "backups")


def write_private(path: Path, text: str) -> Path:
    """Write a report readable by its owner only (0600): reports name tenants."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)  # also when it existed before with a wider mode
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    return path


def resolve_dsn(dsn: str | None, env: Mapping[str, str] = os.environ) -> str | None:
    """The connection string to use, or ``None`` for the embedded server."""
    if dsn:
        return dsn
    if env.get("DATABASE_URL"):
        return env["DATABASE_URL"]
    params = {key: env[name] for name, key in _PG_ENV.items() if env.get(name)}
    if "host" in params or "dbname" in params:
        return make_conninfo(**params)
    return None


_INTEGER_PARAMETERS = {"connect_timeout": (0, 86400), "keepalives": (0, 1), "keepalives_idle": (0, 2**31 - 1),
                       "keepalives_interval": (0, 2**31 - 1), "keepalives_count": (0, 2**31 - 1),
                       "tcp_user_timeout": (0, 2**31 - 1)}


def check_dsn(dsn: str) -> None:
    """Refuse a connection string with a bad value (exit 2) before anything runs; the message shows no secret.

    Raises:
        ConfigError: malformed, or a numeric parameter (connect_timeout, port, keepalives...) out of range.
    """
    try:
        params = conninfo_to_dict(dsn)
    except Exception as exc:  # psycopg raises ProgrammingError for a malformed string
        raise ConfigError("the connection string is malformed (not shown: it may contain a secret)") from exc
    for key, (low, high) in _INTEGER_PARAMETERS.items():
        _check_integer(key, params.get(key), low, high)
    for port in str(params.get("port") or "").split(","):
        _check_integer("port", port or None, 1, 65535)


def _check_integer(key: str, value: object, low: int, high: int) -> None:
    if value is None:
        return
    text = str(value).strip()
    if not (text.isdigit() and low <= int(text) <= high):
        raise ConfigError(f"the connection string's {key} must be a whole number from {low} to {high}; got "
                          f"{text[:20]!r}")


def redact(dsn: str) -> str:
    """A printable description of a DSN: host, port, database and user, never the password."""
    try:
        params = conninfo_to_dict(dsn)
    except Exception as exc:  # psycopg raises ProgrammingError for a malformed string
        raise ConfigError("the connection string is malformed (not shown: it may contain a secret)") from exc
    host = params.get("host") or "localhost"
    port = params.get("port") or "5432"
    return f"postgresql://{params.get('user') or '?'}@{host}:{port}/{params.get('dbname') or '?'}"


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s]*@")
_TOKEN = re.compile(r"(?i)(?P<key>\b(?:token|password|secret|api_key|apikey)=)[^&\s]*")


def redact_uri(text: str) -> str:
    """``text`` (a Milvus URI, or a message quoting one) without credentials: the user-info part of every URL
    (``user:password@``) and the value of any token/password query parameter become ``***``."""
    return _TOKEN.sub(r"\g<key>***", _USERINFO.sub(r"\g<scheme>***@", text))


def milvus_uri(env: Mapping[str, str] = os.environ, *, home: Path | None = None) -> str:
    """``MILVUS_URI``, else ``MILVUS_HOST``/``MILVUS_PORT``, else a Milvus Lite file in the data directory."""
    if env.get("MILVUS_URI"):
        return env["MILVUS_URI"]
    if env.get("MILVUS_HOST"):
        return f"http://{env['MILVUS_HOST']}:{env.get('MILVUS_PORT', '19530')}"
    return str(private_dir(home or home_dir(env)) / "milvus_lite.db")


def configured_milvus_uri(env: Mapping[str, str] = os.environ, *, home: Path) -> str | None:
    """The Milvus in use: ``MILVUS_URI``/``MILVUS_HOST``, or the data directory's Milvus Lite file if it exists."""
    if env.get("MILVUS_URI") or env.get("MILVUS_HOST"):
        return milvus_uri(env, home=home)
    lite = home / "milvus_lite.db"
    return str(lite) if lite.exists() else None

"""The backup file format: one file, written and read as a stream, memory flat whatever its size.

Layout::

    MAGIC (8 bytes) | header length (4 bytes, big endian) | header (JSON: format, compression, encryption)
    body: a zstd stream (content checksum on), cut into frames of about a megabyte

Each frame is stored as its length (4 bytes) and its bytes. Without a key the bytes are the zstd stream's
and a frame of length 0 ends the body. With a key each frame is sealed by AES-256-GCM (ciphertext + tag):
the nonce is a random prefix and the frame's counter, and the associated data binds the header, the counter
and a final flag. Either way a reordered, altered or truncated file is refused. Records inside the stream
are ``kind (1 byte) | length (8 bytes) | payload``:

    H  header JSON (created_at, server, database, tool version, unified-side state)
    T  a table starts: its definition and COPY format (JSON)
    D  a chunk of that table's data in PostgreSQL's COPY format (binary: round-trips every type bit for bit)
    E  the table ends: rows, bytes, SHA-256 of its data (JSON)
    M  the manifest (JSON): everything above, last, so that a file without it is incomplete

Reading decompresses at most a megabyte at a time, however well the data compressed. (Format 1, from
development versions before the tool's first release, had an unframed body without a key; it is refused.)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .errors import BackupIntegrityError, BackupKeyError, ConfigError, flag

MAGIC = b"UMBKUP\x00\x01"
FORMAT_VERSION = 2
CHUNK = 1 << 20
KEY_ENV = "UNIFIED_MEMORY_BACKUP_KEY"
_RECORD = struct.Struct(">cQ")
_FRAME = struct.Struct(">I")


# ------------------------------------------------------------------------------------------- keys
def load_key(*, key_file: Path | None = None, env: dict[str, str] | None = None) -> bytes | None:
    """The backup passphrase: from ``key_file``, else the ``UNIFIED_MEMORY_BACKUP_KEY`` variable, else None.

    Never from the command line, where other users could read it in the process list.
    """
    if key_file is not None:
        try:
            secret = key_file.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the key file {key_file}: {exc.strerror}") from exc
        if not secret:
            raise ConfigError(f"the key file {key_file} is empty")
        return secret
    value = (env if env is not None else os.environ).get(KEY_ENV, "")
    return value.encode() if value else None


def _derive(secret: bytes, salt: bytes) -> bytes:
    return Scrypt(salt=salt, length=32, n=2**15, r=8, p=1).derive(secret)


def _key_check(key: bytes) -> str:
    return hashlib.sha256(b"unified-memory key check" + key).hexdigest()[:16]


# ------------------------------------------------------------------------------------------- writing
class _FramedSink:
    """Bytes in, length-prefixed frames out: sealed by AES-256-GCM with a key, else ended by an empty frame."""

    def __init__(self, out: IO[bytes], key: bytes | None, aad: bytes, nonce_prefix: bytes) -> None:
        self.out, self.aead, self.aad, self.prefix = out, AESGCM(key) if key else None, aad, nonce_prefix
        self.buffer, self.counter = bytearray(), 0

    def write(self, data: bytes) -> int:
        self.buffer += data
        while len(self.buffer) > CHUNK:
            self._frame(bytes(self.buffer[:CHUNK]), final=False)
            del self.buffer[:CHUNK]
        return len(data)

    def close(self) -> None:
        self._frame(bytes(self.buffer), final=True)
        self.buffer.clear()

    def _frame(self, chunk: bytes, *, final: bool) -> None:
        if self.aead is None:
            if chunk:
                self.out.write(_FRAME.pack(len(chunk)) + chunk)
            if final:
                self.out.write(_FRAME.pack(0))
            return
        sealed = self.aead.encrypt(self.prefix + struct.pack(">I", self.counter), chunk,
                                   _chunk_aad(self.aad, self.counter, final))
        self.out.write(_FRAME.pack(len(sealed)) + sealed)
        self.counter += 1


def _chunk_aad(header: bytes, counter: int, final: bool) -> bytes:
    return hashlib.sha256(header).digest() + struct.pack(">Q?", counter, final)


PARTIAL_SUFFIX = ".partial"
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def check_directory(directory: Path) -> None:
    """Refuse a backup directory another user could write to or own: they could plant or swap files in it.

    Raises:
        ConfigError: the directory is missing, a symlink, not a directory, not owned by this user, or group-
            or world-writable.
    """
    try:
        info = directory.lstat()
    except OSError as exc:
        raise ConfigError(f"the backup directory {directory} cannot be used: {exc.strerror}") from exc
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"the backup directory {directory} is a symlink or not a directory; refusing it")
    if info.st_uid != os.geteuid():
        raise ConfigError(f"the backup directory {directory} is owned by uid {info.st_uid}, not by this user "
                          f"(uid {os.geteuid()}); refusing it: its owner could replace the backups")
    if info.st_mode & 0o022:
        raise ConfigError(f"the backup directory {directory} is group- or world-writable (mode "
                          f"{stat.S_IMODE(info.st_mode):04o}); refusing it: another user could plant files in "
                          "it. Use a directory of mode 0700")


# A writer creates its partial file, then locks it: a file this young may be one between the two, unlocked but
# live. Only older ones are tested (and testing takes the lock for a moment, which such a writer would hit).
SETTLED_SECONDS = 60.0


def clean_leftovers(directory: Path, prefix: str) -> list[str]:
    """Remove the ``.partial`` files of killed writers (no writer holds their lock, and none was written in the
    last ``SETTLED_SECONDS``); never open a symlink.

    A partial file is never read or trusted: it is only ever deleted, and only once no process writes it.
    """
    removed = []
    for path in directory.glob(f".{prefix}*{PARTIAL_SUFFIX}"):
        try:
            info = path.lstat()
            fresh = time.time() - info.st_mtime < SETTLED_SECONDS
            if stat.S_ISREG(info.st_mode) and info.st_nlink == 1 and (fresh or _in_use(path)):
                continue
            path.unlink()
            removed.append(path.name)
        except OSError:  # gone meanwhile, or not ours to remove: leave it, it is ignored anyway
            continue
    return removed


def _in_use(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class BackupWriter:
    """Write records to ``path`` through zstd (and AES-GCM).

    The temporary ``.partial`` file is created exclusively (O_EXCL|O_NOFOLLOW: a planted file or symlink makes
    it fail, never redirects it) at 0600 and locked while written; the finished file is hard-linked to its final
    name, which is never overwritten, after an fsync.
    """

    def __init__(self, path: Path, *, secret: bytes | None, level: int = 3) -> None:
        self.path, self.partial = path, path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
        check_directory(path.parent)
        if os.path.lexists(path):
            raise ConfigError(f"{path} exists: a backup never overwrites a file; choose another name")
        try:
            fd = os.open(self.partial, _CREATE_FLAGS, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot create {self.partial} exclusively ({exc.strerror}): another writer or a "
                              "planted file has that name; refusing to write through it") from exc
        os.fchmod(fd, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # marks it in use for clean_leftovers
        self.raw: IO[bytes] = os.fdopen(fd, "wb", buffering=CHUNK)
        encryption: dict[str, Any] | None = None
        key = None
        prefix = os.urandom(8)
        if secret is not None:
            salt = os.urandom(16)
            key = _derive(secret, salt)
            encryption = {"algorithm": "AES-256-GCM", "kdf": "scrypt", "salt": salt.hex(), "n": 2**15, "r": 8,
                          "p": 1, "nonce_prefix": prefix.hex(), "chunk": CHUNK, "key_check": _key_check(key)}
        header = json.dumps({"format": FORMAT_VERSION, "compression": "zstd", "encryption": encryption}).encode()
        self.raw.write(MAGIC + _FRAME.pack(len(header)) + header)
        self.sink = _FramedSink(self.raw, key, header, prefix)
        compressor = zstandard.ZstdCompressor(level=level, write_checksum=True, threads=-1)
        self.stream = compressor.stream_writer(self.sink, closefd=False)  # type: ignore[arg-type]

    def record(self, kind: bytes, payload: bytes) -> None:
        self.stream.write(_RECORD.pack(kind, len(payload)))
        self.stream.write(payload)

    def json(self, kind: bytes, value: dict[str, Any]) -> None:
        self.record(kind, json.dumps(value, sort_keys=True, default=str).encode())

    def commit(self) -> None:
        """Finish the stream, fsync, and move the file to its final name."""
        self.stream.close()
        self.sink.close()
        self.raw.flush()
        os.fsync(self.raw.fileno())
        try:
            os.link(self.partial, self.path, follow_symlinks=False)
        except FileExistsError as exc:
            raise ConfigError(f"{self.path} appeared while the backup was written; it is not overwritten") from exc
        finally:
            self.raw.close()
        self.partial.unlink()
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def abort(self) -> None:
        """Remove the temporary file (the final name is never left half written)."""
        try:
            self.raw.close()
        finally:
            self.partial.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Record:
    """One record of a backup file."""

    kind: bytes
    payload: bytes

    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.payload)
        return value


class _FramedSource:
    """The body's zstd bytes, frame by frame, checking each seal (with a key) and that the last frame is there."""

    def __init__(self, raw: IO[bytes], header: bytes, encryption: dict[str, Any] | None, secret: bytes | None):
        self.raw, self.header, self.counter, self.done = raw, header, 0, False
        self.aead: AESGCM | None = None
        if encryption is None and secret is not None:
            raise BackupIntegrityError("this backup is not authenticated (written without a key), and a key is "
                                       "configured: refusing it, since anyone who could write the file could have "
                                       "changed it consistently. Unset the key to read it anyway")
        if encryption is not None:
            if secret is None:
                raise BackupKeyError(f"this backup is encrypted: set {KEY_ENV} or pass {flag('key_file')}")
            key = _derive(secret, bytes.fromhex(encryption["salt"]))
            if _key_check(key) != encryption.get("key_check"):
                raise BackupKeyError("wrong key: this backup was encrypted with another key")
            self.aead, self.prefix = AESGCM(key), bytes.fromhex(encryption["nonce_prefix"])

    def chunks(self) -> Iterator[bytes]:
        while True:
            head = self.raw.read(_FRAME.size)
            if not head:
                if not self.done:
                    raise BackupIntegrityError("the backup is truncated: its final frame is missing")
                return
            if self.done:
                raise BackupIntegrityError("the backup has data after its final frame")
            if len(head) < _FRAME.size:
                raise BackupIntegrityError("the backup is truncated inside a frame header")
            (length,) = _FRAME.unpack(head)
            if length > CHUNK + 64:
                raise BackupIntegrityError("the backup holds an oversized frame: the file was altered")
            body = self.raw.read(length)
            if len(body) < length:
                raise BackupIntegrityError("the backup is truncated inside a frame")
            if self.aead is not None:
                yield self._open(body)
            elif length:
                yield body
            else:
                self.done = True

    def _open(self, sealed: bytes) -> bytes:
        assert self.aead is not None
        nonce = self.prefix + struct.pack(">I", self.counter)
        for final in (False, True):
            try:
                plain = self.aead.decrypt(nonce, sealed, _chunk_aad(self.header, self.counter, final))
            except InvalidTag:
                continue
            self.counter += 1
            self.done = final
            return plain
        raise BackupIntegrityError(f"encrypted chunk {self.counter} fails its authentication: the file was altered")


class _ChunkReader:
    """A ``read(size)`` view of an iterator of byte chunks, for zstd's stream reader."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks, self.pending = chunks, memoryview(b"")

    def read(self, size: int = -1) -> bytes:
        while not self.pending:
            chunk = next(self.chunks, None)
            if chunk is None:
                return b""
            self.pending = memoryview(chunk)
        size = len(self.pending) if size < 0 else size
        out, self.pending = self.pending[:size], self.pending[size:]
        return bytes(out)


def read_records(path: Path, *, secret: bytes | None,
                 header_out: dict[str, Any] | None = None) -> Iterator[Record]:
    """Every record of the backup at ``path``, in order; ``header_out`` (when given) receives the file's header.

    With a ``secret``, only an authenticated (encrypted) file is read.

    Raises:
        BackupIntegrityError: the file is not a backup, is truncated, or was altered.
        BackupKeyError: the file is encrypted and the key is missing or wrong.
    """
    try:
        raw = path.open("rb")
    except OSError as exc:
        raise BackupIntegrityError(f"cannot open the backup {path}: {exc.strerror}") from exc
    with raw:
        if raw.read(len(MAGIC)) != MAGIC:
            raise BackupIntegrityError(f"{path.name} is not a unified-memory backup (bad magic)")
        head = raw.read(_FRAME.size)
        (length,) = _FRAME.unpack(head) if len(head) == _FRAME.size else (-1,)
        header = raw.read(length) if 0 < length < 1 << 20 else b""
        try:
            info = json.loads(header)
        except ValueError as exc:
            raise BackupIntegrityError("the backup's header is damaged") from exc
        if not isinstance(info, dict) or info.get("format") != FORMAT_VERSION:
            raise BackupIntegrityError("unknown backup format (the header names no known format version)")
        if header_out is not None:
            header_out.update(info)
        source = _FramedSource(raw, header, info.get("encryption"), secret)
        yield from _records(_decompressed(source.chunks()))


def _decompressed(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The decompressed stream in blocks of at most a megabyte, whatever the compression ratio.

    Truncation is the frame layer's to find (its last frame is missing); the zstd reader checks the content.
    """
    source: Any = _ChunkReader(chunks)  # zstandard reads any object with read(size)
    reader = zstandard.ZstdDecompressor().stream_reader(source, read_size=1 << 17, read_across_frames=True)
    try:
        while block := reader.read(CHUNK):
            yield block
    except zstandard.ZstdError as exc:
        raise BackupIntegrityError(f"the backup's compressed data is damaged ({exc})") from exc


def _records(blocks: Iterator[bytes]) -> Iterator[Record]:
    buffer = bytearray()
    for block in blocks:
        buffer += block
        while len(buffer) >= _RECORD.size:
            kind, length = _RECORD.unpack_from(buffer)
            if kind not in b"HTDEM" or length > 1 << 31:
                raise BackupIntegrityError("the backup holds an unreadable record: the file was altered")
            if len(buffer) < _RECORD.size + length:
                break
            yield Record(kind, bytes(buffer[_RECORD.size:_RECORD.size + length]))
            del buffer[:_RECORD.size + length]
    if buffer:
        raise BackupIntegrityError("the backup ends inside a record: it is truncated")


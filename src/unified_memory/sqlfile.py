"""Splitting a psql-style SQL file into statements, each with the line it starts on.

The schema runner executes statement by statement so that an error names the file and line. The splitter
knows what can hide a semicolon: quoted strings, quoted identifiers, comments and dollar-quoted bodies.
Transaction control (BEGIN/COMMIT) is for psql users; the runner supplies its own transaction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z_0-9]*)?\$")
_TRANSACTION_CONTROL = re.compile(r"^(BEGIN|COMMIT|START\s+TRANSACTION|END)\s*;?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Statement:
    """One SQL statement and the 1-based line of the file on which it starts."""

    sql: str
    line: int

    @property
    def is_transaction_control(self) -> bool:
        return bool(_TRANSACTION_CONTROL.match(self.sql))


def split(text: str) -> list[Statement]:
    """Split ``text`` at top-level semicolons; comments-only fragments are dropped."""
    statements: list[Statement] = []
    start = i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "-" and text.startswith("--", i):
            i = _find(text, "\n", i)
        elif ch == "/" and text.startswith("/*", i):
            i = _skip_block_comment(text, i)
        elif ch in ("'", '"'):
            i = _skip_quoted(text, i, ch)
        elif ch == "$" and (match := _DOLLAR_TAG.match(text, i)) and not _is_word_char(text, i - 1):
            i = _find(text, match.group(0), match.end()) + len(match.group(0)) - 1
        elif ch == ";":
            _append(statements, text, start, i + 1)
            start = i + 1
        i += 1
    _append(statements, text, start, n)
    return statements


def _append(statements: list[Statement], text: str, start: int, end: int) -> None:
    chunk = text[start:end]
    body = _strip_comments(chunk).strip()
    if not body or body == ";":
        return
    leading = len(chunk) - len(chunk.lstrip())
    offset = start + leading
    # skip leading comment lines so the reported line is the statement's own
    while text.startswith("--", offset) or text.startswith("/*", offset):
        end_of = _find(text, "\n", offset) if text.startswith("--", offset) else _skip_block_comment(text, offset)
        offset = end_of + 1
        while offset < end and text[offset].isspace():
            offset += 1
    statements.append(Statement(text[offset:end].strip(), text.count("\n", 0, offset) + 1))


def _strip_comments(chunk: str) -> str:
    return re.sub(r"--[^\n]*", "", chunk)


def _find(text: str, needle: str, start: int) -> int:
    found = text.find(needle, start)
    return len(text) - 1 if found < 0 else found


def _skip_block_comment(text: str, i: int) -> int:
    depth = 0
    while i < len(text):
        if text.startswith("/*", i):
            depth += 1
            i += 2
        elif text.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i - 1
        else:
            i += 1
    return len(text) - 1


def _skip_quoted(text: str, i: int, quote: str) -> int:
    backslash_escapes = quote == "'" and i > 0 and text[i - 1] in "eE" and not _is_word_char(text, i - 2)
    i += 1
    while i < len(text):
        if backslash_escapes and text[i] == "\\":
            i += 2
            continue
        if text[i] == quote:
            if text.startswith(quote * 2, i):
                i += 2
                continue
            return i
        i += 1
    return len(text) - 1


def _is_word_char(text: str, i: int) -> bool:
    return 0 <= i < len(text) and (text[i].isalnum() or text[i] == "_")

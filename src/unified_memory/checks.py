"""Statuses, a check's verdict and its evidence, and the one JSON form of every result object.

Every status the tool reports is a ``Literal`` defined here, once. Every result is a dataclass whose JSON (what
``--json`` prints and the ledgers store) is generated from its fields by :func:`as_dict`: a field's metadata
(:func:`json_field`) renames, converts or omits it, ``json_derived`` adds computed values and ``json_order``
fixes the order of the keys. Nothing is written by hand per class, so no field can be dropped by accident.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

Status = Literal["pass", "warn", "fail"]
PASS: Status = "pass"
WARN: Status = "warn"
FAIL: Status = "fail"

RunStatus = Literal["running", "planned", "nothing_to_do", "succeeded", "failed", "interrupted", "rolled_back"]
"""A data migration run (``memory_migration_runs.status``; ``planned`` is a dry run's, never stored)."""
RUN_STATUSES: tuple[RunStatus, ...] = ("running", "succeeded", "failed", "interrupted", "nothing_to_do", "rolled_back")
"""The statuses a run is stored with."""
RUN_OK: tuple[RunStatus, ...] = ("succeeded", "nothing_to_do")
ValidationStatus = Literal["passed", "failed"]
"""A recorded validation (``memory_migration_validations.status``)."""
RollbackStatus = Literal["planned", "rolled_back"]
CutoverStatus = Literal["cut_over"]
CleanupStatus = Literal["cleaned_up"]
FailureStatus = Literal["failed"]
"""What a command that failed prints as its JSON ``status``."""

_META = "unified_memory.json"


@dataclass(frozen=True)
class JsonField:
    """How one field appears in the JSON: under ``key``, passed through ``convert``, or left out."""

    key: str | None = None
    convert: Callable[[Any], Any] | None = None
    omit: bool = False
    omit_if: Callable[[Any], bool] | None = None  # given the whole object


def json_field(*, key: str | None = None, convert: Callable[[Any], Any] | None = None, omit: bool = False,
               omit_if: Callable[[Any], bool] | None = None) -> dict[str, JsonField]:
    """Field metadata for :func:`as_dict`: ``field(default=..., metadata=json_field(key="renamed"))``."""
    return {_META: JsonField(key, convert, omit, omit_if)}


def rounded(value: float | None) -> float | None:
    """Seconds and the like, to the millisecond (None stays None)."""
    return None if value is None else round(value, 3)


def by_key(mapping: dict[str, Any]) -> dict[str, Any]:
    """A mapping in the order of its keys."""
    return dict(sorted(mapping.items()))


SECONDS = json_field(convert=rounded)


class Serialised:
    """A result dataclass whose JSON is generated (:func:`as_dict`); ``to_dict`` is that JSON."""

    json_derived: ClassVar[dict[str, str]] = {}  # JSON key -> attribute (a property) computed from the fields
    json_order: ClassVar[tuple[str, ...]] = ()  # keys in this order first, the rest after in field order

    def to_dict(self) -> dict[str, Any]:
        return as_dict(self)


def as_dict(obj: Any) -> dict[str, Any]:
    """The JSON form of a result dataclass: each field (shaped by its metadata) and each derived value."""
    data: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        spec: JsonField = f.metadata.get(_META, JsonField())
        if spec.omit or (spec.omit_if is not None and spec.omit_if(obj)):
            continue
        value = getattr(obj, f.name)
        data[spec.key or f.name] = plain(spec.convert(value) if spec.convert else value)
    for key, attribute in getattr(obj, "json_derived", {}).items():
        data[key] = plain(getattr(obj, attribute))
    order: tuple[str, ...] = getattr(obj, "json_order", ())
    return {**{k: data[k] for k in order if k in data}, **data} if order else data


def plain(value: Any) -> Any:
    """``value`` with nested results, mappings and sequences turned into JSON's dicts and lists."""
    if isinstance(value, Serialised):
        return as_dict(value)
    if isinstance(value, Counter | dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


@dataclass
class Check(Serialised):
    """One check's verdict and the evidence for it."""

    name: str
    status: Status
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)

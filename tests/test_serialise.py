"""Issue 12: one generated JSON form for every result (checks.as_dict), and statuses that are Literal types."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import ClassVar, get_args

import pytest

import unified_memory
from unified_memory.checks import (
    FAIL,
    PASS,
    RUN_STATUSES,
    SECONDS,
    WARN,
    RunStatus,
    Serialised,
    Status,
    as_dict,
    json_field,
)


def _omitted_when_empty(result: _Sample) -> bool:
    return not result.notes


@dataclass
class _Part(Serialised):
    name: str
    seconds: float = field(default=0.0, metadata=SECONDS)


@dataclass
class _Sample(Serialised):
    json_derived: ClassVar[dict[str, str]] = {"status": "status"}
    json_order: ClassVar[tuple[str, ...]] = ("status", "renamed")

    internal: str = field(metadata=json_field(omit=True))
    count: int = field(metadata=json_field(key="renamed"))
    parts: dict[str, _Part] = field(default_factory=dict)
    pair: tuple[int, int] = (1, 2)
    notes: list[str] = field(default_factory=list, metadata=json_field(omit_if=_omitted_when_empty))

    @property
    def status(self) -> Status:
        return PASS if self.count else FAIL


def test_fields_are_renamed_omitted_derived_and_ordered() -> None:
    sample = _Sample("secret", 3, {"a": _Part("a", 1.23456)})
    assert list(as_dict(sample).items()) == [("status", "pass"), ("renamed", 3),
                                             ("parts", {"a": {"name": "a", "seconds": 1.235}}), ("pair", [1, 2])]
    assert sample.to_dict() == as_dict(sample)
    assert as_dict(_Sample("x", 0, notes=["n"]))["notes"] == ["n"]


def _results() -> list[type[Serialised]]:
    for info in pkgutil.iter_modules(unified_memory.__path__):
        if info.name not in ("cli", "__main__"):
            importlib.import_module(f"unified_memory.{info.name}")
    found, todo = [], list(Serialised.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.__module__.startswith("unified_memory."):
            found.append(cls)
    return found


def test_the_package_results_are_generated() -> None:
    assert {"MigrationRun", "TableAccount", "ValidationReport", "BackupManifest", "RollbackResult", "Check",
            "SyncResult", "Health"} <= {cls.__name__ for cls in _results()}


@pytest.mark.parametrize("cls", _results(), ids=lambda cls: cls.__name__)
def test_every_declared_key_exists(cls: type[Serialised]) -> None:
    """A typo in ``json_order`` or ``json_derived`` would silently move or drop a key: each names a real one."""
    default = json_field()["unified_memory.json"]
    keys = {f.metadata.get("unified_memory.json", default).key or f.name
            for f in dataclasses.fields(cls)} | set(cls.json_derived)
    assert set(cls.json_order) <= keys
    assert all(hasattr(cls, attribute) for attribute in cls.json_derived.values())


def test_statuses_are_literals_defined_once() -> None:
    assert set(get_args(Status)) == {PASS, WARN, FAIL}
    assert set(RUN_STATUSES) <= set(get_args(RunStatus))

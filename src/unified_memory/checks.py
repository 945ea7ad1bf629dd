"""A check's verdict and its evidence: shared by validation, ``vectors verify`` and the reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["pass", "warn", "fail"]
PASS: Status = "pass"
WARN: Status = "warn"
FAIL: Status = "fail"


@dataclass
class Check:
    """One check's verdict and the evidence for it."""

    name: str
    status: Status
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "message": self.message, "evidence": self.evidence}

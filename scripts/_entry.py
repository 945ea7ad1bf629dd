"""Run a ``unified-memory`` command from the guide's script paths, from any working directory.

Uses the installed package when this interpreter has it; otherwise re-executes with the repository's own
virtualenv (``.venv``, made by ``make install``), so ``python3 scripts/...`` works as the guide writes it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


_GLOBAL_FLAGS = {"--json", "--traceback", "--quiet", "-q"}
_GLOBAL_VALUES = {"--dsn", "--data-dir"}


def _arrange(command: list[str], args: list[str]) -> list[str]:
    """Global options first (wherever they were written), then the command and its own arguments."""
    front: list[str] = []
    rest: list[str] = []
    it = iter(args)
    for arg in it:
        name = arg.split("=", 1)[0]
        if name in _GLOBAL_FLAGS:
            front.append(arg)
        elif name in _GLOBAL_VALUES:
            front += [arg] if "=" in arg else [arg, next(it, "")]
        else:
            rest.append(arg)
    return [*front, *command, *rest]


def main(command: list[str], *, unless_dry_run: tuple[str, ...] = ()) -> None:
    """Call the CLI with ``command`` and this script's arguments (plus ``unless_dry_run`` without --dry-run)."""
    try:
        from unified_memory.cli import app
    except ImportError:
        venv_python = REPO / ".venv" / "bin" / "python"
        if venv_python.exists() and Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
            os.execv(str(venv_python), [str(venv_python), str(Path(sys.argv[0]).resolve()), *sys.argv[1:]])
        sys.exit(f"unified-memory is not installed: run `make install` in {REPO} (or `pip install -e {REPO}`)")
    args = sys.argv[1:]
    extra = list(unless_dry_run) if "--dry-run" not in args else []
    app(args=_arrange(command, [*extra, *args]), prog_name=Path(sys.argv[0]).name)

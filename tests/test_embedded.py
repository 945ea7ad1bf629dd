"""Issue 17: the embedded default (pgserver) under concurrent first starts, kill -9 and stale pid files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

START = """
import sys, time
from pathlib import Path
import psycopg
from unified_memory.db import start_embedded
target = start_embedded(Path(sys.argv[1]), quiet=True)
with psycopg.connect(target.dsn) as conn:
    found = conn.execute("SELECT count(*) FROM pg_database WHERE datname = 'unified_memory'").fetchone()[0]
print(found, flush=True)
if len(sys.argv) > 2:
    time.sleep(float(sys.argv[2]))
"""


def start(data_dir: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", START, str(data_dir), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def postmasters(data_dir: Path) -> list[psutil.Process]:
    """Running postgres processes serving ``data_dir``'s embedded server."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        if (proc.info["name"] or "").startswith("postgres") and str(data_dir / "pgdata") in " ".join(
                proc.info["cmdline"] or []):
            found.append(proc)
    return found


def gone(data_dir: Path, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while postmasters(data_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not postmasters(data_dir)


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """A fresh data directory; a postmaster a failed test leaves behind is stopped at the end."""
    path = tmp_path / "home"
    yield path
    for proc in postmasters(path):
        proc.terminate()


def test_two_fresh_starts_at_once_share_one_server_and_database(data_dir: Path) -> None:
    procs = [start(data_dir), start(data_dir)]
    outcomes = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outcomes]
    assert [o[0].strip() for o in outcomes] == ["1", "1"]
    assert gone(data_dir)  # the last user stopped it


def test_kill_9_then_the_next_run_is_clean_and_leaves_no_postmaster(data_dir: Path) -> None:
    victim = start(data_dir, "120")
    assert victim.stdout is not None and victim.stdout.readline().strip() == "1"
    victim.send_signal(signal.SIGKILL)
    victim.wait(30)
    assert postmasters(data_dir)  # pgserver alone would leave this one running for ever
    following = start(data_dir)
    out, err = following.communicate(timeout=180)
    assert following.returncode == 0 and out.strip() == "1", err[-2000:]
    assert gone(data_dir)


def test_a_stale_pid_file_is_handled(data_dir: Path) -> None:
    first = start(data_dir)
    assert first.communicate(timeout=180)[0].strip() == "1"
    assert gone(data_dir)
    pid_file = data_dir / "pgdata" / "postmaster.pid"
    for content in (f"{os.getpid()}\n{data_dir / 'pgdata'}\n0\n5432\n/tmp\n\n0 0\nready\n", "garbage\n"):
        pid_file.write_text(content)  # a live process that is no postgres, then an unreadable file
        cli = subprocess.run([sys.executable, "-m", "unified_memory.cli", "--data-dir", str(data_dir), "-q",
                              "schema", "status"], capture_output=True, text=True, timeout=180)
        assert cli.returncode == 0, cli.stderr[-2000:]
        assert gone(data_dir)

"""Shared fixtures: realistic frames, scratch source/archive/state trees, leak checks.

Servers (PostgreSQL, OpenSSH) are started once per session by the plugins below.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rawtransfer import synth

pytest_plugins = ["tests.pg_fixture", "tests.ssh_fixture"]

REQUIRED_TOOLS = {
    "fpack": "apt-get install libcfitsio-bin",
    "funpack": "apt-get install libcfitsio-bin",
}


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = [f"{t} ({cmd})" for t, cmd in REQUIRED_TOOLS.items() if not shutil.which(t)]
    if missing:
        raise pytest.UsageError("missing tools: " + ", ".join(missing) + "; run ./scripts/setup.sh")


@dataclass
class Tree:
    root: Path
    src: Path
    dest: Path
    state: Path

    def settled(self, *paths: Path) -> None:
        """Age files' mtimes so they count as settled without waiting for patience."""
        past = time.time() - 120
        for p in paths or tuple(self.src.rglob("*")):
            if p.is_file() and not p.is_symlink():
                os.utime(p, (past, past))


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    t = Tree(tmp_path, tmp_path / "src", tmp_path / "archive", tmp_path / "state")
    for d in (t.src, t.dest, t.state):
        d.mkdir()
    return t


@pytest.fixture
def frame(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Factory: frame(name, **kw) writes a small realistic raw frame into ``tmp_path/in``."""
    base = tmp_path / "in"
    base.mkdir(exist_ok=True)
    counter = iter(range(10_000))

    def make(name: str = "frame.fits", directory: Path | None = None, **kw: object) -> Path:
        kw.setdefault("seed", next(counter))
        kw.setdefault("shape", (256, 256))
        return synth.write_frame((directory or base) / name, **kw)  # type: ignore[arg-type]

    return make


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves threads of its own running (as watchdog's test suite does)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 10
    while True:
        leaked = [
            t
            for t in threading.enumerate()
            if t not in before and t.is_alive() and not t.name.startswith(("pool-", "asyncio"))
        ]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"threads left running: {[t.name for t in leaked]}"

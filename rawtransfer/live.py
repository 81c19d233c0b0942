"""The watcher's live figures: published in its state directory, and its heartbeat.

Each watcher process rewrites one small JSON file, ``STATE_DIR/live/HOST-PID.json``, at
every tick of its main loop (written under a temporary name, then renamed over the old
one: a reader never sees half a file) and removes it when it stops. ``raw-transfer
status`` reads it; it needs no port and no socket, only read access to the state
directory. The same figures go to the log as a heartbeat every few minutes, so that a
silent log means a dead process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rawtransfer.catalog.base import Owner
from rawtransfer.config import Settings
from rawtransfer.units import duration

log = logging.getLogger(__name__)

LIVE_DIR = "live"
# The format of the file; a reader ignores files of another version.
VERSION = 1
# The main loop rewrites the file every few seconds (service.HEALTH_INTERVAL, or the
# watchdog's interval if shorter); one not rewritten for this long belongs to a process
# that hangs, or to a pid that was reused, even if a process of that pid is alive.
STALE_AFTER = 60.0
# One heartbeat line every five minutes: an operator (or a log-based alert) that sees no
# line for ten minutes knows the process is dead or hung, while 288 lines a day do not
# drown the lines about files. The systemd watchdog restarts a hung process sooner; the
# heartbeat is for the people and tools that read the log.
HEARTBEAT_INTERVAL = 300.0


def catalog_label(s: Settings) -> str:
    """The catalog as the live files and ``status`` name it (no password, ever)."""
    if s.uses_postgres:
        from rawtransfer.catalog.pg_connect import PgTarget

        return PgTarget.from_settings(s).description
    # absolute: the service and the operator may name the state directory differently
    return f"sqlite {(s.state_dir / 'catalog.sqlite3').resolve()}"


def live_path(state_dir: Path, owner: Owner) -> Path:
    return state_dir / LIVE_DIR / f"{owner.host}-{owner.pid}.json"


def heartbeat_line(f: dict[str, Any]) -> str:
    """The figures of one process in one log line."""
    text = (
        f"heartbeat: {f['queued']} queued, {f['in_flight']} in flight; since start "
        f"{f['done']} done, {f['failed']} failed, {f['quarantined']} quarantined"
    )
    if f["paused"]:
        since = f["paused_since"]
        long = f" for {duration(f['updated'] - since)}" if since is not None else ""
        text += f"; PAUSED{long}: {', '.join(f['paused_reasons']) or 'resources away'}"
    else:
        text += "; not paused"
    if f["source_problem"]:
        text += f"; {f['source_problem']}"
    oldest = f["oldest_waiting"]
    if oldest:
        text += f"; oldest waiting {oldest['file']} for {duration(oldest['seconds'])}"
    return text


class Publisher:
    """Called at every tick of the main loop with the current figures: rewrites the live
    file, and logs a heartbeat every ``interval`` seconds."""

    def __init__(
        self,
        state_dir: Path,
        owner: Owner,
        interval: float = HEARTBEAT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = live_path(state_dir, owner)
        self.interval = interval
        self.clock = clock
        self._next = clock() + interval
        self._failing = False
        sweep(state_dir, owner)

    def __call__(self, figures: dict[str, Any]) -> None:
        self.publish(figures)
        if self.clock() >= self._next:
            self._next = self.clock() + self.interval
            log.info("%s", heartbeat_line(figures))

    def publish(self, figures: dict[str, Any]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(figures, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as exc:
            # the figures are a courtesy: a full or read-only state directory must not
            # stop the watcher (the spool's own check pauses transfers if it matters)
            if not self._failing:
                log.warning("cannot publish the live figures in %s: %s", self.path, exc)
            self._failing = True
        else:
            if self._failing:
                log.info("live figures published again in %s", self.path)
            self._failing = False

    def close(self) -> None:
        for p in (self.path, self.path.with_name(f".{self.path.name}.tmp")):
            with contextlib.suppress(OSError):
                p.unlink(missing_ok=True)


def sweep(state_dir: Path, here: Owner) -> None:
    """Remove the live files of processes on this host that no longer exist."""
    for p in (state_dir / LIVE_DIR).glob("*.json"):
        fig = _load(p)
        if fig is not None and here.looks_dead(Owner(str(fig["host"]), int(fig["pid"]))):
            with contextlib.suppress(OSError):
                p.unlink(missing_ok=True)


def _load(p: Path) -> dict[str, Any] | None:
    try:
        fig = json.loads(p.read_text())
    except (OSError, ValueError):
        return None  # removed meanwhile, or not ours
    if not isinstance(fig, dict) or fig.get("version") != VERSION:
        return None
    if not isinstance(fig.get("host"), str) or not isinstance(fig.get("pid"), int):
        return None
    return fig


@dataclass(frozen=True)
class Live:
    """One process's figures as a reader finds them."""

    figures: dict[str, Any]
    running: bool
    problem: str | None  # why these figures are not the current ones


def read_live(state_dir: Path, table: str, here: Owner, now: float) -> list[Live]:
    """The figures of the watchers on this state directory that use this table, oldest
    start first. The catalog is not compared: the same one may be named differently by
    the service and by an operator (another database user), and a state directory holds
    one SQLite catalog; each figure says its catalog."""
    out = []
    for p in sorted((state_dir / LIVE_DIR).glob("*.json")):
        fig = _load(p)
        if fig is None or fig.get("table") != table:
            continue
        owner = Owner(fig["host"], fig["pid"])
        age = now - float(fig.get("updated", 0.0))
        problem = None
        if here.looks_dead(owner):
            problem = f"process {owner} is not running (figures of {duration(age)} ago)"
        elif age > STALE_AFTER:
            where = "" if owner.host == here.host else f" on {owner.host}"
            problem = (
                f"process {owner}{where} has not updated its figures for {duration(age)} "
                "(hung? or a pid reused)"
            )
        out.append(Live(fig, problem is None, problem))
    return sorted(out, key=lambda x: float(x.figures.get("started", 0.0)))

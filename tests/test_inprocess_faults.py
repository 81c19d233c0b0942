"""Fast, in-process fault tests: process_one and the pool against failing wrappers.

The real SQLite catalog and local destination sit under the wrappers (tests.failing), so
each path (retry, release, pause, defect) is exercised in milliseconds; the oracle
checks the end state. The real-server tests keep what only they can show.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from rawtransfer import synth
from rawtransfer.catalog.base import Owner, State
from rawtransfer.catalog.sqlite import SqliteCatalog
from rawtransfer.config import build
from rawtransfer.destination.local import LocalDestination
from rawtransfer.outcome import Result
from rawtransfer.pipeline import Context, process_one
from rawtransfer.queue import WorkQueue
from rawtransfer.spool import Spool
from rawtransfer.workers import Pool, Stats
from tests.conftest import Tree
from tests.failing import FailingCatalog, FailingDestination
from tests.helpers import sqlite_rows
from tests.oracle import oracle


class Rig:
    def __init__(self, tree: Tree, catalog_spec: str = "", destination_spec: str = "") -> None:
        self.tree = tree
        self.settings = build(
            {
                "source_dir": str(tree.src),
                "dest": str(tree.dest),
                "state_dir": str(tree.state),
                "patience": 0.0,
            }
        )
        self.real_catalog = SqliteCatalog(tree.state / "catalog.sqlite3", "rawtransfer")
        self.catalog = FailingCatalog(self.real_catalog, catalog_spec)
        self.destination = FailingDestination(LocalDestination(tree.dest), destination_spec)
        self.spool = Spool(tree.state / "spool", "test-1")
        self.ctx = Context(
            settings=self.settings,
            catalog=self.catalog,  # type: ignore[arg-type]
            destination=self.destination,  # type: ignore[arg-type]
            spool=self.spool,
            stop=threading.Event(),
            owner=Owner("testhost", 1),
            burst=True,
        )

    def one(self, path: Path) -> Result:
        return process_one(path, self.ctx, closed=True).result

    def rows(self) -> list[dict[str, object]]:
        return sqlite_rows(self.tree.state / "catalog.sqlite3")

    def problems(self) -> list[str]:
        db = self.tree.state / "catalog.sqlite3"
        return oracle(
            self.tree.src,
            self.tree.dest,
            sqlite_rows(db),
            sqlite_rows(db, "rawtransfer_events"),
            spool=self.spool.path,
        )

    def close(self) -> None:
        self.spool.close()
        self.real_catalog.close()


@pytest.fixture
def frame_in(tree: Tree) -> Iterator[Path]:
    (f,) = synth.night(tree.src, 1, (64, 48))
    tree.settled()
    yield f


@pytest.mark.parametrize(
    ("catalog_spec", "destination_spec"),
    [
        ("claim:down", ""),
        ("claim:after", ""),
        ("mark_done:down", ""),
        ("mark_done:after", ""),
        ("", "publish:down"),
        ("", "publish:after"),
        ("", "sha1:down"),
        ("handled:down", ""),
        ("release:down,mark_done:down", ""),
    ],
)
def test_a_resource_away_at_any_call_means_retry_then_exactly_once(
    tree: Tree, frame_in: Path, catalog_spec: str, destination_spec: str
) -> None:
    rig = Rig(tree, catalog_spec, destination_spec)
    try:
        assert rig.one(frame_in) == Result.RETRY
        assert rig.catalog.fired + rig.destination.fired  # the fault did happen
        assert not [r for r in rig.rows() if r["state"] in ("failed", "quarantined")]
        # the resource is back: the next attempt finishes, and nothing is sent twice
        assert rig.one(frame_in) in (Result.DONE, Result.ALREADY_DONE)
        assert [r["state"] for r in rig.rows()] == ["done"]
        assert rig.problems() == []
        assert rig.one(frame_in) == Result.ALREADY_DONE
    finally:
        rig.close()


@pytest.mark.parametrize(
    ("catalog_spec", "destination_spec", "expect", "reason"),
    [
        ("", "publish:refuse", Result.FAILED, "different file"),
        ("claim:refuse", "", Result.FAILED, "refused"),
        ("", "publish:crash", Result.FAILED, "internal error"),
        ("claim:crash", "", Result.FAILED, "internal error"),
        ("mark_done:crash", "", Result.FAILED, "internal error"),
    ],
)
def test_a_permanent_fault_or_a_defect_is_recorded_with_its_reason(
    tree: Tree,
    frame_in: Path,
    catalog_spec: str,
    destination_spec: str,
    expect: Result,
    reason: str,
) -> None:
    rig = Rig(tree, catalog_spec, destination_spec)
    try:
        outcome = process_one(frame_in, rig.ctx, closed=True)
        assert outcome.result == expect and reason in outcome.reason, outcome
        assert not [r for r in rig.rows() if r["state"] == "claimed"], rig.rows()
        # recorded once: the same file is not tried again by itself
        assert rig.one(frame_in) == Result.ALREADY_DONE
        # an operator asks for a retry (as `raw-transfer retry` does): it goes through,
        # and a copy published before the defect is recognised, not sent again
        rig.real_catalog.record_event(None, str(frame_in), State.RETRY, "asked", Owner())
        assert rig.one(frame_in) == Result.DONE
        assert rig.problems() == []
    finally:
        rig.close()


def test_the_pool_retries_with_backoff_and_finishes(tree: Tree) -> None:
    files = synth.night(tree.src, 4, (48, 40))
    tree.settled()
    rig = Rig(tree, "claim:down:2", "publish:down:1")
    queue = WorkQueue()
    for f in files:
        queue.put(f, closed=True)
    queue.close()
    stats = Stats()
    pool = Pool(rig.ctx, queue, 2, stats)
    try:
        pool.start()
        assert pool.join(120)
        assert stats.counts["done"] == 4, stats.counts
        assert len(rig.catalog.fired) == 2 and len(rig.destination.fired) == 1
        assert rig.problems() == []
    finally:
        rig.ctx.stop.set()
        pool.join(10)
        rig.close()

"""Kill the process at every named fault point, restart it, and ask the oracle.

A SIGKILL is the power cut, the OOM killer, `kill -9` by a tired operator. After the
restart the stale claim is taken over, temporaries are cleaned (spool and destination),
and nothing is sent twice: with a local destination and the embedded catalog, and over
SSH with PostgreSQL.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from rawtransfer import faults, synth
from tests.conftest import Tree
from tests.oracle import oracle
from tests.test_backends_e2e import make_backend


@pytest.mark.parametrize("combo", ["sqlite-local", "postgres-ssh"])
@pytest.mark.parametrize("point", sorted(faults.POINTS))
def test_killed_at_each_point_then_restarted(
    request: pytest.FixtureRequest, tree: Tree, point: str, combo: str
) -> None:
    backend = make_backend(request, tree, *combo.split("-"))
    files = synth.night(tree.src, 2, (64, 48))
    tree.settled()
    args = ("--backfill-only", "--workers", "1")
    r = backend.run(tree.src, *args, "--state-dir", tree.state, env={faults.ENV: f"{point}:kill"})
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    again = backend.run(tree.src, *args, "--state-dir", tree.state)
    assert again.returncode == 0, again.stdout + again.stderr
    rows, events = backend.rows(), backend.events()
    assert oracle(tree.src, tree.dest, rows, events, spool=tree.state / "spool") == []
    done = {Path(str(r["source_filepath"])) for r in rows if r["state"] == "done"}
    assert done == set(files)
    published = [e for e in events if e["state"] == "done" and str(e["reason"]).endswith(".fz")]
    assert len(published) == 2, published  # each file recorded once, never twice

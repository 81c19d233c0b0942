"""Prometheus metrics: the real watcher scraped on 127.0.0.1, the node-exporter textfile
of a watcher and of a one-off run, the flags' checks, and the recorder in-process."""

from __future__ import annotations

import signal
import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from rawtransfer import synth
from rawtransfer.config import build
from rawtransfer.errors import ConfigError
from rawtransfer.metrics import FAILURE_KINDS, STEPS, Metrics, Recorder
from rawtransfer.outcome import Outcome, Result
from rawtransfer.queue import WorkQueue
from tests.conftest import Tree
from tests.helpers import run_rt, start_watcher, wait_for
from tests.test_backends_e2e import make_backend

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(s: Samples, name: str, **labels: str) -> float:
    return s[(name, tuple(sorted(labels.items())))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return samples(r.read().decode())


def read_textfile(path: Path) -> Samples:
    return samples(path.read_text()) if path.exists() else {}


def corrupt_copy(good: Path, bad: Path) -> Path:
    data = bytearray(good.read_bytes())
    data[-100] ^= 0x10  # one flipped bit in the pixels: CHECKSUM catches it
    bad.write_bytes(bytes(data))
    return bad


def test_watcher_metrics_endpoint_and_textfile_match_what_was_done(tree: Tree) -> None:
    port = free_port()
    prom = tree.root / "textfile" / "rawtransfer.prom"
    prom.parent.mkdir()
    log = tree.root / "rt.log"
    proc = start_watcher(
        tree.src,
        tree.dest,
        tree.state,
        log,
        "--patience",
        "0.5",
        "--metrics-port",
        str(port),
        "--metrics-textfile",
        str(prom),
    )
    try:
        before = scrape(port)
        assert value(before, "rawtransfer_files_done_total") == 0
        assert value(before, "rawtransfer_last_success_timestamp_seconds") == 0
        for kind in FAILURE_KINDS:  # every kind is there from the start, at 0
            assert value(before, "rawtransfer_failures_total", kind=kind) == 0

        frames = synth.night(tree.src, 3, (64, 48))
        wait_for(
            lambda: value(scrape(port), "rawtransfer_files_done_total") == 3,
            60,
            "3 files done in the metrics",
        )
        # then one duplicate and one corrupted frame, once the first three are done (so
        # that the duplicate never meets its original in flight)
        (tree.src / "again.fits").write_bytes(frames[0].read_bytes())
        corrupt_copy(frames[1], tree.src / "broken.fits")
        wait_for(
            lambda: (
                value(scrape(port), "rawtransfer_failures_total", kind="quarantined") == 1
                and value(scrape(port), "rawtransfer_duplicates_total") == 1
            ),
            60,
            "the duplicate and the quarantine in the metrics",
        )
        s = scrape(port)
        assert value(s, "rawtransfer_files_done_total") == 3
        assert value(s, "rawtransfer_bytes_done_total") == sum(f.stat().st_size for f in frames)
        archived = sum(f.stat().st_size for f in tree.dest.rglob("*.fz"))
        assert value(s, "rawtransfer_packed_bytes_done_total") == archived
        assert value(s, "rawtransfer_failures_total", kind="failed") == 0
        assert value(s, "rawtransfer_failures_total", kind="retry") == 0
        assert value(s, "rawtransfer_queue_depth") == 0
        assert value(s, "rawtransfer_in_flight") == 0
        assert value(s, "rawtransfer_paused") == 0
        assert value(s, "rawtransfer_oldest_pending_age_seconds") == 0
        for resource in ("destination", "catalog", "spool", "source"):
            assert value(s, "rawtransfer_unavailable", resource=resource) == 0
        assert value(s, "rawtransfer_last_success_timestamp_seconds") > 1e9
        # every step of every file is timed: five files checked, four packed (the
        # corrupted one is not), three copied and verified (the duplicate is not sent)
        h = "rawtransfer_step_duration_seconds_count"
        assert value(s, h, step="check") >= 5
        assert value(s, h, step="pack") >= 4
        assert value(s, h, step="copy") == 3
        assert value(s, h, step="verify") == 3
        assert value(s, "rawtransfer_step_duration_seconds_sum", step="copy") > 0

        # the textfile says the same within a few seconds, and is replaced whole
        wait_for(
            lambda: read_textfile(prom).get(("rawtransfer_duplicates_total", ())) == 1,
            30,
            "the textfile to catch up",
        )
        t = read_textfile(prom)
        for key in (
            ("rawtransfer_files_done_total", ()),
            ("rawtransfer_bytes_done_total", ()),
            ("rawtransfer_failures_total", (("kind", "quarantined"),)),
            ("rawtransfer_step_duration_seconds_count", (("step", "copy"),)),
        ):
            assert t[key] == s[key], key
        assert [p.name for p in prom.parent.iterdir()] == ["rawtransfer.prom"]
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    assert rc == 0, log.read_text()
    assert f"metrics at http://127.0.0.1:{port}/metrics" in log.read_text()
    with pytest.raises(OSError):  # the endpoint went away with the service
        scrape(port)


@pytest.mark.parametrize("combo", ["sqlite-local", "postgres-ssh"])
def test_backfill_only_writes_the_final_figures_to_the_textfile(
    request: pytest.FixtureRequest, tree: Tree, combo: str
) -> None:
    backend = make_backend(request, tree, *combo.split("-"))
    frames = synth.night(tree.src, 3, (64, 48))
    corrupt_copy(frames[2], tree.src / "broken.fits")
    tree.settled()
    prom = tree.root / "rawtransfer.prom"
    r = backend.run(tree.src, "--backfill-only", "--metrics-textfile", prom)
    assert r.returncode == 1, r.stderr  # the corrupted frame is quarantined
    assert "no effect" not in r.stderr  # the flag works in a one-off run
    t = read_textfile(prom)
    assert t[("rawtransfer_files_done_total", ())] == 3
    assert t[("rawtransfer_bytes_done_total", ())] == sum(f.stat().st_size for f in frames)
    assert t[("rawtransfer_failures_total", (("kind", "quarantined"),))] == 1
    assert t[("rawtransfer_step_duration_seconds_count", (("step", "verify"),))] == 3
    assert t[("rawtransfer_last_success_timestamp_seconds", ())] > 1e9
    assert sorted(p.name for p in tree.root.iterdir() if p.is_file()) == ["rawtransfer.prom"]


def test_a_port_in_use_is_a_configuration_error(tree: Tree) -> None:
    synth.night(tree.src, 1, (64, 48))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_rt(
            tree.src,
            tree.dest,
            "--backfill-only",
            "--state-dir",
            tree.state,
            "--metrics-port",
            str(port),
        )
    assert r.returncode == 2, r.stderr
    assert f"--metrics-port {port}: cannot listen on 127.0.0.1:{port}" in r.stderr
    assert not list(tree.dest.rglob("*.fz"))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"metrics_port": 0}, "is not a TCP port"),
        ({"metrics_port": 65536}, "is not a TCP port"),
        ({"metrics_port": "9100"}, "is not a TCP port"),
        ({"metrics_port": True}, "is not a TCP port"),
        ({"metrics_textfile": "/nonexistent/dir/rt.prom"}, "no directory /nonexistent/dir"),
        ({"metrics_textfile": "TMP/rt.txt"}, "must end in .prom"),
        ({"metrics_textfile": "TMP/dir.prom"}, "is a directory"),
    ],
)
def test_metrics_flags_are_checked(tmp_path: Path, values: dict[str, object], message: str) -> None:
    (tmp_path / "dir.prom").mkdir()
    v = {
        k: str(x).replace("TMP", str(tmp_path)) if k == "metrics_textfile" else x
        for k, x in values.items()
    }
    with pytest.raises(ConfigError, match=message):
        build({"source_dir": str(tmp_path), "dest": "/archive", **v})


def test_metrics_flags_are_accepted(tmp_path: Path) -> None:
    s = build(
        {
            "source_dir": str(tmp_path),
            "dest": "/archive",
            "metrics_port": 9105,
            "metrics_textfile": str(tmp_path / "rt.prom"),
        }
    )
    assert (s.metrics_port, s.metrics_textfile) == (9105, tmp_path / "rt.prom")
    assert (s.metrics_port, s.metrics_textfile) != (None, None)
    off = build({"source_dir": str(tmp_path), "dest": "/archive"})
    assert (off.metrics_port, off.metrics_textfile) == (None, None)


def test_recorder_counts_outcomes_and_reads_the_queue_at_scrape_time() -> None:
    queue = WorkQueue()
    m = Metrics(queue)
    p = Path("/src/a.fits")
    m.outcome(Outcome(Result.DONE, p, raw_size=1000, packed_size=400))
    m.outcome(Outcome(Result.DONE, p, raw_size=500, packed_size=200))
    m.outcome(Outcome(Result.QUARANTINED, p))
    m.outcome(Outcome(Result.FAILED, p))
    m.outcome(Outcome(Result.RETRY, p))
    m.outcome(Outcome(Result.RETRY, p))
    m.outcome(Outcome(Result.DUPLICATE, p))
    m.outcome(Outcome(Result.ALREADY_DONE, p))
    m.outcome(Outcome(Result.BUSY, p))
    m.given_up()
    for name in STEPS:
        with m.step(name):
            pass
    with pytest.raises(ValueError), m.step("check"):  # a step that fails is timed too
        raise ValueError
    queue.put(Path("/src/b.fits"))
    queue.put(Path("/src/c.fits"))
    queue.get(timeout=0)
    queue.pause()
    m.resources(lambda: ["destination"])
    s = samples(generate_latest(m.registry).decode())
    assert value(s, "rawtransfer_files_done_total") == 2
    assert value(s, "rawtransfer_bytes_done_total") == 1500
    assert value(s, "rawtransfer_packed_bytes_done_total") == 600
    assert value(s, "rawtransfer_duplicates_total") == 1
    fails = {k: value(s, "rawtransfer_failures_total", kind=k) for k in FAILURE_KINDS}
    assert fails == {"quarantined": 1, "failed": 1, "retry": 2, "given_up": 1}
    assert value(s, "rawtransfer_step_duration_seconds_count", step="check") == 2
    assert value(s, "rawtransfer_step_duration_seconds_count", step="copy") == 1
    assert (value(s, "rawtransfer_queue_depth"), value(s, "rawtransfer_in_flight")) == (1, 1)
    assert value(s, "rawtransfer_paused") == 1
    assert value(s, "rawtransfer_unavailable", resource="destination") == 1
    assert value(s, "rawtransfer_unavailable", resource="catalog") == 0
    assert value(s, "rawtransfer_oldest_pending_age_seconds") >= 0
    # two services in one process keep their own figures
    assert (
        value(
            samples(generate_latest(Metrics(queue).registry).decode()),
            "rawtransfer_files_done_total",
        )
        == 0
    )
    m.close()
    Recorder().close()  # the default recorder does nothing, and closes quietly

"""The benchmark harness runs end to end in its quick mode and writes what it promises.

A smoke test only: the figures must exist and be positive numbers; no time is asserted
(they depend on the machine and on whatever else it is doing).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

Quick = tuple[dict[str, Any], str, str]  # the JSON document, the Markdown, what was printed
REPO = Path(__file__).resolve().parent.parent
# The quick mode takes well under a minute on two cores; a slow CI machine gets room.
QUICK_TIMEOUT = 240

THROUGHPUT_METHODS = {
    "raw-transfer",
    "raw-transfer --ssh-controlmaster",
    "(a) fpack -C",
    "(b) chain: fitscheck, fpack, sha1sum, cp",
    "(b) chain: fitscheck, fpack, sha1sum, ssh mkdir + scp, new connection per call",
    "(b) chain: fitscheck, fpack, sha1sum, ssh mkdir + scp, ControlMaster",
    "(c) rsync -a over ssh (raw files, one rsync)",
}


def positive(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Quick:
    out = tmp_path_factory.mktemp("bench-out")
    tmp = tmp_path_factory.mktemp("bench-tmp")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "--tmp", str(tmp)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=QUICK_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads((out / "bench-quick.json").read_text())
    return doc, (out / "bench-quick.md").read_text(), done.stdout


def test_document_says_when_and_where(quick: Quick) -> None:
    doc, _, _ = quick
    assert doc["mode"] == "quick"
    assert doc["date"]
    assert positive(doc["machine"]["cores"])
    assert doc["machine"]["cpu_model"]
    assert doc["errors"] == []
    assert [s["key"] for s in doc["sizes"]] == ["2MB", "512KB", "100KB"]


def test_every_run_measured(quick: Quick) -> None:
    doc, _, _ = quick
    for size in doc["sizes"]:
        methods = {r["method"] for r in doc["runs"] if r["size"] == size["key"]}
        assert methods == THROUGHPUT_METHODS
    startup = {r["dest"] for r in doc["runs"] if r["size"] == "start-up"}
    assert startup == {"local", "ssh"}  # raw-transfer's fixed cost, on an empty source
    for r in doc["runs"]:
        assert "error" not in r, r
        per_file = ("cpu_per_file_s", "ms_per_file") if r["files"] else ()
        for key in ("wall_s", "cpu_s", "total_cpu_s", *per_file):
            assert positive(r[key]), (key, r)
        if r["dest"] == "ssh":  # sshd's side is measured, never left out silently
            assert r["server_cpu_s"] is not None and r["server_cpu_s"] >= 0, r
        if r["method"].startswith("raw-transfer"):
            assert positive(r["peak_rss_mib"]), r


def test_figures_have_baselines_and_ratios(quick: Quick) -> None:
    doc, _, _ = quick
    ids = {f["id"] for f in doc["figures"]}
    for size in doc["sizes"]:
        k = size["key"]
        assert {f"{k}.local.vs_fpack", f"{k}.local.vs_chain", f"{k}.ssh.vs_chain_cm"} <= ids
        assert {f"{k}.ssh.vs_chain_new", f"{k}.ssh.vs_rsync", f"{k}.ssh.cm.vs_chain_cm"} <= ids
        assert {f"{k}.local.cpu_per_frame", f"{k}.ssh.ms_per_file"} <= ids
    assert "100KB.ssh.ms_per_file_after_startup" in ids
    assert {"latency.local.median", "latency.local.p99", "latency.ssh.median"} <= ids
    assert {"scan.1000.pass", "scan.2000.pass", "memory.queued.2000", "memory.flat.300"} <= ids
    for f in doc["figures"]:
        for key in ("value", "baseline_value", "ratio"):
            assert positive(f[key]), (key, f)
        assert f["baseline"]
        assert f["ratio_means"] in ("speed", "cost")
        assert f["met"] is None  # quick mode judges no target: its frames are not theirs


def test_other_targets_measured(quick: Quick) -> None:
    doc, _, _ = quick
    for dest in ("local", "ssh"):
        lat = doc["latency"][dest]
        assert lat["runs"] == 2
        assert all(positive(x) for x in lat["samples_s"] + lat["alone_samples_s"])
    assert [s["files"] for s in doc["scan"]] == [1000, 2000]
    for s in doc["scan"]:
        for key in ("find_wall_s", "pass_wall_s", "process_wall_s", "process_peak_rss_mib"):
            assert positive(s[key]), (key, s)
    assert positive(doc["memory"]["peak_rss_queued_mib"])
    steady = doc["memory"]["transfers"]  # the watcher's RSS after every 100 of 300 files
    assert [n for n, _ in steady["rss_mib"]] == [100, 200, 300]
    assert all(positive(rss) for _, rss in steady["rss_mib"])


def test_markdown_table_written(quick: Quick) -> None:
    _, md, stdout = quick
    assert "| figure | raw-transfer | baseline |" in md
    assert "sshd" in md
    assert md in stdout  # the table is printed too

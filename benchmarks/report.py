"""Turn the runs into figures (each with its baseline and ratio) and write them out.

Two kinds of ratio, said with each figure:

* ``speed`` = the baseline's time / ours: above 1, raw-transfer is faster (the issue's
  "0.23 of bare fpack", "1.2 x the chain");
* ``cost`` = ours / the baseline: below 1, raw-transfer is cheaper (CPU, latency against
  the file processed alone, the scan against ``find``, memory against an idle run).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Method names, as they appear in the runs and the tables.
RT = "raw-transfer"
RT_CM = "raw-transfer --ssh-controlmaster"
FPACK = "(a) fpack -C"
CHAIN_LOCAL = "(b) chain: fitscheck, fpack, sha1sum, cp"
CHAIN_NEW = "(b) chain: fitscheck, fpack, sha1sum, ssh mkdir + scp, new connection per call"
CHAIN_CM = "(b) chain: fitscheck, fpack, sha1sum, ssh mkdir + scp, ControlMaster"
RSYNC = "(c) rsync -a over ssh (raw files, one rsync)"
# The backfill scan's second baseline (benchmarks.targets.scan): find -printf of each
# file's identity, then the sqlite3 command-line tool reading the window's latest events.
SCAN_FAIR = "find -printf '%p %D:%i:%s:%T@:%C@' + sqlite3 reading the latest events"
# The "size" of raw-transfer's runs on an empty source: its fixed cost per run.
STARTUP = "start-up"
# Other processes took more than this share of the machine during a run: its figures are
# marked as disturbed (the harness measures such a run again first, when it is short).
DISTURBED = 0.2

# "Flat" memory over many transfers: the RSS at the end at most this times the RSS after
# the first batch (5%, about 4 MiB on a 70 MiB process: more than the allocator's noise,
# less than a leak of 1 KB per file would add over 10,000 files).
FLAT_GROWTH = 1.05

# The targets (2 workers, this kind of machine) by figure id: (what is compared,
# the limit, the target as the issue says it).
Target = tuple[str, float, str]
TARGETS: dict[str, list[Target]] = {
    "100MB.local.vs_fpack": [("ratio>=", 0.5, "at least 0.5 x baseline (a)")],
    "100MB.local.vs_chain": [("ratio>=", 1.2, "at least 1.2 x the chain")],
    "100MB.local.cpu_per_frame": [("value<=", 1.2, "at most 1.2 s CPU per frame")],
    "100MB.ssh.vs_chain_cm": [("ratio>=", 1.2, "at least 1.2 x baseline (b) with ControlMaster")],
    "100KB.ssh.ms_per_file": [("value<=", 10.0, "at most 10 ms per file")],
    "100KB.ssh.vs_chain_cm": [("ratio>=", 5.0, "at least 5 x baseline (b) with ControlMaster")],
    "latency.ssh.median": [("ratio<=", 1.2, "at most 1.2 x the file alone")],
    "latency.ssh.p99": [("ratio<=", 3.0, "at most 3 x the file alone")],
    "latency.local.median": [("ratio<=", 1.2, "at most 1.2 x the file alone")],
    "latency.local.p99": [("ratio<=", 3.0, "at most 3 x the file alone")],
    "scan.100000.pass": [("value<=", 5.0, "at most 5 s"), ("ratio<=", 3.0, "at most 3 x find")],
    # 150 MB, in MiB
    "memory.queued.100000": [("value<=", 150e6 / 2**20, "at most 150 MB")],
    # flat: the RSS after the last batch at most 5% above the RSS after the first
    "memory.flat.10000": [
        ("ratio<=", FLAT_GROWTH, "flat over 10,000 transfers (at most 5% above the first 1,000)")
    ],
}


@dataclass
class Figure:
    id: str
    figure: str
    unit: str
    value: float
    baseline: str
    baseline_value: float
    kind: str  # "speed" or "cost"
    disturbed: bool = False

    @property
    def ratio(self) -> float:
        if self.kind == "speed":
            return self.baseline_value / self.value if self.value else 0.0
        return self.value / self.baseline_value if self.baseline_value else 0.0

    def judged(self, full: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "figure": self.figure,
            "unit": self.unit,
            "value": round(self.value, 4),
            "baseline": self.baseline,
            "baseline_value": round(self.baseline_value, 4),
            "ratio": round(self.ratio, 3),
            "ratio_means": self.kind,
            "target": None,
            "met": None,
            # wall time is what other processes move; CPU time is what ours used
            "disturbed": self.disturbed and self.kind == "speed",
        }
        targets = TARGETS.get(self.id, [])
        if targets:
            out["target"] = "; ".join(text for _, _, text in targets)
        if targets and full:  # the quick mode's frames are not the targets' frames
            met = True
            for test, limit, _ in targets:
                x = self.ratio if test.startswith("ratio") else self.value
                met = met and (x >= limit if test.endswith(">=") else x <= limit)
            out["met"] = met
        return out


def _disturbed(*runs: dict[str, Any] | None) -> bool:
    return any(r is not None and r.get("others_share", 0) > DISTURBED for r in runs)


def throughput_figures(runs: list[dict[str, Any]], sizes: list[str]) -> list[Figure]:
    """Each raw-transfer run against each baseline of its size and destination."""
    by = {(r["size"], r["dest"], r["method"]): r for r in runs if "error" not in r}
    out: list[Figure] = []

    def add(size: str, dest: str, method: str, bdest: str, base: str, tag: str) -> None:
        ours, theirs = by.get((size, dest, method)), by.get((size, bdest, base))
        if ours is None or theirs is None:
            return
        who = "" if method == RT else " (--ssh-controlmaster)"
        out.append(
            Figure(
                f"{size}.{dest}.{tag}",
                f"{size} frames, {dest}{who}: wall time",
                "s",
                ours["wall_s"],
                base,
                theirs["wall_s"],
                "speed",
                _disturbed(ours, theirs),
            )
        )
        out.append(
            Figure(
                f"{size}.{dest}.{tag}.cpu",
                f"{size} frames, {dest}{who}: CPU per frame (children and sshd included)",
                "s",
                ours["cpu_per_file_s"],
                base,
                theirs["cpu_per_file_s"],
                "cost",
                _disturbed(ours, theirs),
            )
        )

    for size in sizes:
        add(size, "local", RT, "any", FPACK, "vs_fpack")
        add(size, "local", RT, "local", CHAIN_LOCAL, "vs_chain")
        for method, pre in ((RT, ""), (RT_CM, "cm.")):
            add(size, "ssh", method, "any", FPACK, pre + "vs_fpack")
            add(size, "ssh", method, "ssh", CHAIN_NEW, pre + "vs_chain_new")
            add(size, "ssh", method, "ssh", CHAIN_CM, pre + "vs_chain_cm")
            add(size, "ssh", method, "ssh", RSYNC, pre + "vs_rsync")
        local, fp = by.get((size, "local", RT)), by.get((size, "any", FPACK))
        if local and fp:
            out.append(
                Figure(
                    f"{size}.local.cpu_per_frame",
                    f"{size} frames, local: CPU per frame",
                    "s",
                    local["cpu_per_file_s"],
                    FPACK,
                    fp["cpu_per_file_s"],
                    "cost",
                    _disturbed(local, fp),
                )
            )
        fixed_local = by.get((STARTUP, "local", RT))
        if local and fp and fixed_local and size == sizes[0]:  # the large frames
            steady_cpu = (local["total_cpu_s"] - fixed_local["total_cpu_s"]) / local["files"]
            out.append(
                Figure(
                    f"{size}.local.cpu_per_frame_after_startup",
                    f"{size} frames, local: CPU per frame, less the run's start-up "
                    f"({fixed_local['total_cpu_s']:.2f} s on an empty source)",
                    "s",
                    max(steady_cpu, 0.001),
                    FPACK,
                    fp["cpu_per_file_s"],
                    "cost",
                    _disturbed(local, fp, fixed_local),
                )
            )
        ssh, cm = by.get((size, "ssh", RT)), by.get((size, "ssh", CHAIN_CM))
        if ssh and cm:
            out.append(
                Figure(
                    f"{size}.ssh.ms_per_file",
                    f"{size} frames, ssh, default flags: ms per file",
                    "ms",
                    ssh["ms_per_file"],
                    CHAIN_CM,
                    cm["ms_per_file"],
                    "speed",
                    _disturbed(ssh, cm),
                )
            )
        fixed = by.get((STARTUP, "ssh", RT))
        if ssh and cm and fixed and size == sizes[-1]:  # the small frames: start-up weighs
            steady = (ssh["wall_s"] - fixed["wall_s"]) / ssh["files"] * 1000
            out.append(
                Figure(
                    f"{size}.ssh.ms_per_file_after_startup",
                    f"{size} frames, ssh, default flags: ms per file, less the run's start-up "
                    f"({fixed['wall_s']:.2f} s on an empty source)",
                    "ms",
                    max(steady, 0.001),
                    CHAIN_CM,
                    cm["ms_per_file"],
                    "speed",
                    _disturbed(ssh, cm, fixed),
                )
            )
    return out


def other_figures(
    latency: dict[str, dict[str, Any]], scans: list[dict[str, Any]], memory: dict[str, Any] | None
) -> list[Figure]:
    out: list[Figure] = []
    for dest, lat in latency.items():
        base = f"the same frame alone (one-off run), median of {len(lat['alone_samples_s'])}"
        for stat in ("median", "p99"):
            out.append(
                Figure(
                    f"latency.{dest}.{stat}",
                    f"idle watcher, {dest}: closed to verified, {stat} of {lat['runs']}",
                    "s",
                    lat[f"{stat}_s"],
                    base,
                    lat["alone_median_s"],
                    "cost",
                )
            )
    for s in scans:
        n = s["files"]
        out.append(
            Figure(
                f"scan.{n}.pass",
                f"backfill pass, {n:,} files against a {n:,}-row catalog (in-process)",
                "s",
                s["pass_wall_s"],
                "find over the same tree",
                s["find_wall_s"],
                "cost",
            )
        )
        out.append(
            Figure(
                f"scan.{n}.cpu",
                f"backfill pass, {n:,} files: CPU",
                "s",
                s["pass_cpu_s"],
                "find over the same tree (CPU)",
                max(s["find_cpu_s"], 0.001),
                "cost",
            )
        )
        if "fair_cpu_s" in s:  # what a pass must also do: the files' identities, the rows
            out.append(
                Figure(
                    f"scan.{n}.cpu_fair",
                    f"backfill pass, {n:,} files: CPU, against reading what it compares",
                    "s",
                    s["pass_cpu_s"],
                    f"{SCAN_FAIR} (CPU)",
                    max(s["fair_cpu_s"], 0.001),
                    "cost",
                )
            )
        out.append(
            Figure(
                f"scan.{n}.process",
                f"raw-transfer --backfill-only, {n:,} files all done (whole process)",
                "s",
                s["process_wall_s"],
                "find over the same tree",
                s["find_wall_s"],
                "cost",
            )
        )
    if memory and "files_queued" in memory:
        n = memory["files_queued"]
        out.append(
            Figure(
                f"memory.queued.{n}",
                f"peak RSS with {n:,} files queued",
                "MiB",
                memory["peak_rss_queued_mib"],
                "the same run on an empty source",
                memory["peak_rss_empty_mib"],
                "cost",
            )
        )
    steady = (memory or {}).get("transfers")
    if steady:
        n, every = steady["files"], steady["every"]
        out.append(
            Figure(
                f"memory.flat.{n}",
                f"RSS of an idle watcher after {n:,} transfers ({every:,} small frames at a time)",
                "MiB",
                steady["rss_last_mib"],
                f"its RSS after the first {every:,}",
                steady["rss_first_mib"],
                "cost",
            )
        )
    return out


BASELINES = {
    "local": (FPACK, CHAIN_LOCAL),
    "ssh": (FPACK, CHAIN_NEW, CHAIN_CM, RSYNC),
}
SHORT = {
    FPACK: "(a) fpack",
    CHAIN_LOCAL: "(b) chain, cp",
    CHAIN_NEW: "(b) chain, scp",
    CHAIN_CM: "(b) chain, scp + ControlMaster",
    RSYNC: "(c) rsync",
}
PAIR_TAGS = ("vs_fpack", "vs_chain", "vs_chain_new", "vs_chain_cm", "vs_rsync")


def _is_pair(figure_id: str) -> bool:
    """A figure of one raw-transfer run against one baseline (the matrix shows those)."""
    parts = figure_id.split(".")
    return len(parts) >= 3 and any(p in PAIR_TAGS for p in parts[2:])


def matrix(doc: dict[str, Any]) -> list[str]:
    """raw-transfer's runs against every baseline: one row per size, destination and
    variant; each cell says speed (baseline's wall / ours) and CPU (ours / baseline's)."""
    by = {(r["size"], r["dest"], r["method"]): r for r in doc["runs"] if "error" not in r}
    columns = [FPACK, CHAIN_LOCAL, CHAIN_NEW, CHAIN_CM, RSYNC]
    out = [
        "raw-transfer against each baseline: *speed* = the baseline's wall time / ours "
        "(above 1, raw-transfer is faster); *CPU* = our CPU per frame / the baseline's, "
        "sshd included (below 1, raw-transfer is cheaper):",
        "",
        "| frames | dest | raw-transfer | wall s | ms/file | CPU/frame s | "
        + " | ".join(SHORT[c] for c in columns)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(columns),
    ]
    for size in (s["key"] for s in doc["sizes"]):
        for dest, method in (("local", RT), ("ssh", RT), ("ssh", RT_CM)):
            ours = by.get((size, dest, method))
            if ours is None:
                continue
            cells = []
            for c in columns:
                theirs = by.get((size, "any" if c == FPACK else dest, c))
                if theirs is None or c not in BASELINES[dest]:
                    cells.append("")
                    continue
                speed = theirs["wall_s"] / ours["wall_s"]
                cpu = ours["cpu_per_file_s"] / max(theirs["cpu_per_file_s"], 1e-6)
                mark = " (disturbed)" if _disturbed(ours, theirs) else ""
                cells.append(f"speed {speed:.2f}, CPU {cpu:.2f}{mark}")
            variant = "default" if method == RT else "--ssh-controlmaster"
            out.append(
                f"| {size} | {dest} | {variant} | {_cell(ours['wall_s'])} | "
                f"{_cell(ours['ms_per_file'])} | {_cell(ours['cpu_per_file_s'])} | "
                + " | ".join(cells)
                + " |"
            )
    return out


def _cell(x: Any, digits: int = 3) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    quick = " --quick" if doc["mode"] == "quick" else ""
    lines = [
        f"Measured {doc['date']} on {m['cores']} cores ({m['cpu_model']}, "
        f"{m['memory_gib']} GiB), `python -m benchmarks{quick}`,"
        f" {doc['workers']} workers; total {doc['elapsed_s']:.0f} s.",
        "",
    ]
    lines += [f"- {n}" for n in doc["notes"]]
    lines += [
        "",
        "Against the issue's targets, and the other figures (ratio: speed = the baseline's "
        "time / ours, above 1 is faster; cost = ours / the baseline's, below 1 is cheaper):",
        "",
        "| figure | raw-transfer | baseline | baseline's | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in doc["figures"]:
        if f["target"] is None and _is_pair(f["id"]):
            continue  # in the matrix below
        met = {True: "yes", False: "**no**", None: ""}[f["met"]]
        if f.get("disturbed"):
            met += " (disturbed run)"
        lines.append(
            f"| {f['figure']} | {_cell(f['value'])} {f['unit']} | {f['baseline']} | "
            f"{_cell(f['baseline_value'])} {f['unit']} | {f['ratio']:.2f} ({f['ratio_means']}) | "
            f"{f['target'] or ''} | {met} |"
        )
    lines += ["", *matrix(doc)]
    lines += [
        "",
        "Every run (CPU: the processes it started; sshd CPU: the server's side, and the "
        "ControlMaster's for the chain that uses one; others' share: the part of the machine's "
        f"CPU that other processes took meanwhile, above {DISTURBED:.0%} a disturbed run, "
        "which is measured again when it is short; attempts: how many times it was run):",
        "",
        "| frames | dest | method | files | wall s | ms/file | MB/s | CPU s | sshd CPU s "
        "| CPU/file s | peak RSS MiB | others' share | attempts |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["runs"]:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['dest']} | {r['method']} | failed: see JSON |")
            continue
        lines.append(
            "| "
            + " | ".join(
                _cell(r.get(k))
                for k in (
                    "size",
                    "dest",
                    "method",
                    "files",
                    "wall_s",
                    "ms_per_file",
                    "mb_per_s",
                    "cpu_s",
                    "server_cpu_s",
                    "cpu_per_file_s",
                    "peak_rss_mib",
                )
            )
            + f" | {r['others_share']:.0%} | {r['attempts']} |"
        )
    if doc.get("errors"):
        lines += ["", "Failed measurements:", ""]
        lines += [f"- {e.splitlines()[0]}" for e in doc["errors"]]
    return "\n".join(lines) + "\n"


def write(out: Path, doc: dict[str, Any]) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{doc['mode']}"
    j, md = out / f"{stem}.json", out / f"{stem}.md"
    j.write_text(json.dumps(doc, indent=2) + "\n")
    md.write_text(markdown(doc))
    return j, md

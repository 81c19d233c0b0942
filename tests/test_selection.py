"""Which files are taken: exclude rules (a table of paths and decisions, and properties),
the files never taken, and the scan and the one-off run honouring both."""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rawtransfer import synth
from rawtransfer.errors import ConfigError
from rawtransfer.selection import _NEVER_RE, Selection, never_taken, read_rules
from rawtransfer.watch import Matcher, scan
from tests.conftest import Tree
from tests.helpers import run_rt, sqlite_rows, start_watcher, wait_for
from tests.test_backends_e2e import make_backend

RULES = (
    "# calibration frames are archived by another pipeline",
    "calib/",
    "*_test.fits",
    "/focus/**",
    "nights/*/junk.fits",
    "- old[0-9].fits",
    "",
)

# (path relative to the source, taken?)
TABLE = [
    ("t1_r1_ut1.fits", True),
    ("2026-11-24/t1_r1_ut1.fits", True),
    ("calib/bias.fits", False),  # a directory rule
    ("2026-11-24/calib/flat.fits", False),  # ... at any depth
    ("calib.fits", True),  # a directory rule never matches a file
    ("x_test.fits", False),
    ("deep/er/x_test.fits", False),
    ("focus/a.fits", False),  # anchored
    ("focus/sub/a.fits", False),  # ** crosses directories
    ("other/focus/a.fits", True),  # anchored: only at the top
    ("nights/n1/junk.fits", False),
    ("x/nights/n1/junk.fits", False),  # unanchored with a slash: any trailing part
    ("nights/n1/deeper/junk.fits", True),  # * does not cross a slash
    ("old1.fits", False),
    ("old12.fits", True),
    ("frame.fits.tmp", False),  # never taken, whatever the patterns
    ("core", False),
    ("core.1234", False),
    ("upload.fits.part", False),
    ("upload.fits.filepart", False),
    (".hidden.fits", False),
    (".staging/a.fits", False),
    ("with space [1].fits", True),
    ("quote'name\n.fits", True),
]


@pytest.fixture
def selection() -> Selection:
    return Selection(("*.fits", "*.tmp", "core*", "*.part", "*.filepart"), read_rules(RULES))


@pytest.mark.parametrize(("rel", "taken"), TABLE)
def test_rules_table(selection: Selection, rel: str, taken: bool) -> None:
    assert selection.wants(PurePosixPath(rel), size=100) is taken


def test_empty_files_are_never_taken(selection: Selection) -> None:
    assert not selection.wants(PurePosixPath("a.fits"), size=0)
    assert selection.wants(PurePosixPath("a.fits"), size=1)


@pytest.mark.parametrize("bad", ["[abc", "/", "a\x00b", "x/[!"])
def test_bad_rules_are_refused_with_one_message(bad: str) -> None:
    with pytest.raises(ConfigError):
        read_rules((bad,))


def test_exclude_from_file(tmp_path: Path) -> None:
    f = tmp_path / "rules"
    f.write_text("\n".join(RULES) + "\n")
    assert [r.text for r in read_rules((), (f,))] == [r.text for r in read_rules(RULES)]
    with pytest.raises(ConfigError, match="exclude-from"):
        read_rules((), (tmp_path / "missing",))


names = st.text(
    alphabet=st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=12,
).filter(lambda s: s not in (".", "..") and s == s.strip())  # rule lines are stripped


@given(st.lists(names, min_size=1, max_size=5), names)
def test_a_directory_rule_excludes_exactly_what_lies_below_such_a_directory(
    parts: list[str], name: str
) -> None:
    sel = Selection(("*",), read_rules((f"{_escape(name)}/",)))
    rel = PurePosixPath(*parts)
    below = name in parts[:-1]
    assert (sel.excluded(rel) is not None) == below


@given(st.lists(names, min_size=1, max_size=5))
def test_no_rules_exclude_nothing_and_a_star_star_rule_everything(parts: list[str]) -> None:
    rel = PurePosixPath(*parts)
    assert Selection(("*",)).excluded(rel) is None
    assert Selection(("*",), read_rules(("/**",))).excluded(rel) is not None


@given(st.one_of(names, st.sampled_from(["core", "core.", "core.1", "core.x", "a.core", ".tmp"])))
def test_the_never_taken_test_is_the_never_patterns(name: str) -> None:
    assert never_taken(name) == (_NEVER_RE.match(name) is not None)
    assert never_taken(name + ".part") and never_taken("core.7" + name)


def _escape(name: str) -> str:
    """The rule that names ``name`` literally: glob characters in a class, and a leading
    ``#`` too (a rule that starts with ``#`` is a comment, as in rsync's filter files)."""
    out = "".join(f"[{c}]" if c in "*?[]" else c for c in name)
    return "[#]" + out[1:] if out.startswith("#") else out


def test_scan_skips_excluded_directories_without_listing_them(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "calib").mkdir(parents=True)
    (src / "night").mkdir()
    for p in (src / "calib" / "a.fits", src / "night" / "b.fits", src / "night" / "c.fits"):
        p.write_bytes(b"x")
    (src / "night" / "empty.fits").touch()
    os.chmod(src / "calib", 0o000)  # not even listed (as root it could be; the rule decides)
    try:
        found = [
            p.relative_to(src).as_posix()
            for p, _ in scan(src, Matcher(("*.fits",), read_rules(("calib/",))))
        ]
    finally:
        os.chmod(src / "calib", 0o755)
    assert found == ["night/b.fits", "night/c.fits"]


@pytest.mark.parametrize("combo", ["sqlite-local", "postgres-ssh"])
def test_excluded_files_are_never_queued_by_a_run(
    request: pytest.FixtureRequest, tree: Tree, combo: str
) -> None:
    backend = make_backend(request, tree, *combo.split("-"))
    (tree.src / "calib").mkdir()
    keep = synth.write_frame(tree.src / "t1.fits", (32, 32))
    synth.write_frame(tree.src / "calib" / "bias.fits", (32, 32), seed=1)
    synth.write_frame(tree.src / "t1_test.fits", (32, 32), seed=2)
    tree.settled()
    r = backend.run(tree.src, "--backfill-only", "--exclude", "calib/", "--exclude", "*_test.fits")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [r_["source_filepath"] for r_ in backend.rows()] == [str(keep)]
    assert [p.name for p in tree.dest.rglob("*.fz")] == ["t1.fits.fz"]
    bad = run_rt(tree.src, tree.dest, "--backfill-only", "--exclude", "[oops")
    assert bad.returncode == 2 and "unclosed" in bad.stderr


def test_the_watcher_never_queues_excluded_files(tree: Tree) -> None:
    log = tree.root / "rt.log"
    (tree.src / "calib").mkdir()
    proc = start_watcher(tree.src, tree.dest, tree.state, log, "--exclude", "calib/",
                         "--patience", "0.5", "--verbose")  # fmt: skip
    try:
        synth.write_frame(tree.src / "calib" / "bias.fits", (32, 32), seed=1)
        synth.write_frame(tree.src / "t1.fits", (32, 32))
        wait_for(lambda: list(tree.dest.rglob("t1.fits.fz")), 60, "the frame")

        def excluded() -> int:
            r = run_rt("status", tree.src, tree.dest, "--state-dir", tree.state, "--json")
            procs = json.loads(r.stdout)["service"]["processes"] if r.returncode == 0 else []
            return int(procs[0]["excluded"]) if procs else -1

        wait_for(lambda: excluded() == 1, 30, "status to count the excluded file")
    finally:
        proc.terminate()
        proc.wait(30)
    rows = sqlite_rows(tree.state / "catalog.sqlite3")
    assert [Path(str(r["source_filepath"])).name for r in rows] == ["t1.fits"]
    mentions = [x for x in log.read_text().splitlines() if "bias.fits" in x]
    assert mentions and all("not taken" in x and "DEBUG" in x for x in mentions), mentions

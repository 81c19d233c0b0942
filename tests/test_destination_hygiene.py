"""Destination hygiene, for the local directory and the SFTP destination alike.

* Nothing is written or read through a symbolic link inside the archive tree: a year,
  month or day directory that is a link, or a final name that is a link (dangling, to
  identical content, to other content), fails the file with ``DestinationLink``; the root
  itself may be a link (operators mount things).
* Temporary files left by a killed copy are swept once they are older than the lease,
  and nothing else is touched.
* A full destination says so ("destination full? N bytes free"), over SFTP too, where
  the server only answers "Failure".

The destinations and fixtures are the contract suite's (tests/test_sftp_destination.py):
local, SFTP with exec, and SFTP-only (rename instead of hardlink, read-back SHA1).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rawtransfer.destination.base import TMP_SUFFIX, Destination, Published
from rawtransfer.destination.local import LocalDestination
from rawtransfer.errors import (
    DestinationLink,
    DestinationUnavailable,
    FileFailed,
    Kind,
    ResourceUnavailable,
)
from tests import test_sftp_destination as contract
from tests.conftest import Tree
from tests.helpers import run_rt
from tests.ssh_fixture import SshServer

REL = contract.REL  # 2024/03/05/NAME
sha1_of = contract.sha1_of
temps = contract.temps

# the contract suite's fixtures: local, sftp, sftp-only over an empty root
dest = contract.dest
sftp_dest = contract.sftp_dest
packed = contract.packed

LEASE = 600.0
OLD = time.time() - 2 * LEASE


def everything(top: Path) -> set[str]:
    """Every entry under ``top`` (links not followed), relative, for before/after checks."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            out.add(os.path.relpath(os.path.join(dirpath, name), top))
    return out


def age(path: Path, when: float = OLD) -> None:
    os.utime(path, (when, when), follow_symlinks=False)


# --- 1. no writing through links ---------------------------------------------------------


def test_a_link_is_a_permanent_file_failure() -> None:
    assert issubclass(DestinationLink, FileFailed)
    assert not issubclass(DestinationLink, ResourceUnavailable)
    assert DestinationLink.kind == Kind.FAIL  # the file fails; a person is needed
    assert str(DestinationLink("x")) == "destination path goes through a symbolic link: x"


@pytest.mark.parametrize("depth", [1, 2, 3], ids=["year", "month", "day"])
@pytest.mark.parametrize("filled", [False, True], ids=["empty", "with-subdirs"])
def test_a_directory_link_inside_the_tree_is_refused(
    dest: tuple[Destination, Path],
    packed: Callable[[bytes], Path],
    tmp_path: Path,
    depth: int,
    filled: bool,
) -> None:
    d, root = dest
    outside = tmp_path / "outside"
    outside.mkdir()
    parts = REL.parts[:-1]  # 2024, 03, 05
    link = root.joinpath(*parts[:depth])
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside, target_is_directory=True)
    if filled:  # the rest of the path exists behind the link
        outside.joinpath(*parts[depth:]).mkdir(parents=True, exist_ok=True)
    before = everything(outside)
    data = os.urandom(3000)
    with pytest.raises(DestinationLink, match=re.escape(str(link))):
        d.publish(packed(data), REL, sha1_of(data), threading.Event())
    assert everything(outside) == before  # nothing written, created or left behind
    assert link.is_symlink()
    assert temps(root) == []


def test_a_file_behind_a_directory_link_is_not_read_either(
    dest: tuple[Destination, Path], packed: Callable[[bytes], Path], tmp_path: Path
) -> None:
    d, root = dest
    data = os.urandom(3000)
    outside = tmp_path / "outside"
    (outside / "05").mkdir(parents=True)
    (outside / "05" / REL.name).write_bytes(data)
    (root / "2024").mkdir()
    link = root / "2024" / "03"
    link.symlink_to(outside)
    # identical content behind the link: still never counted as done
    with pytest.raises(DestinationLink, match=re.escape(str(link))):
        d.publish(packed(data), REL, sha1_of(data), threading.Event())
    with pytest.raises(DestinationLink, match=re.escape(str(link))):
        d.sha1(REL)


@pytest.mark.parametrize("kind", ["dangling", "same-content", "other-content", "inside-tree"])
def test_a_final_name_that_is_a_link_is_refused(
    dest: tuple[Destination, Path], packed: Callable[[bytes], Path], tmp_path: Path, kind: str
) -> None:
    d, root = dest
    data = os.urandom(3000)
    target = root / REL
    target.parent.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere.fits.fz"
    if kind == "same-content":
        elsewhere.write_bytes(data)
    elif kind == "other-content":
        elsewhere.write_bytes(os.urandom(3000))
    elif kind == "inside-tree":
        elsewhere = target.parent / "other.fits.fz"
        elsewhere.write_bytes(data)
    target.symlink_to(elsewhere)
    before = elsewhere.read_bytes() if elsewhere.exists() else None
    # a failure of this file with the reason, never "already present" and never
    # "destination unavailable" (which would be retried for ever)
    for _ in range(2):
        with pytest.raises(DestinationLink, match=re.escape(str(target))):
            d.publish(packed(data), REL, sha1_of(data), threading.Event())
    with pytest.raises(DestinationLink, match=re.escape(str(target))):
        d.sha1(REL)
    assert target.is_symlink()
    assert (elsewhere.read_bytes() if elsewhere.exists() else None) == before
    assert temps(root) == []


def test_the_root_itself_may_be_a_link(
    dest: tuple[Destination, Path], packed: Callable[[bytes], Path], tmp_path: Path
) -> None:
    d, root = dest
    # the fixture's destination is rooted at tmp_path/archive: make that a link
    real = tmp_path / "mounted-archive"
    root.rename(real)
    root.symlink_to(real, target_is_directory=True)
    data = os.urandom(3000)
    d.check()
    assert d.publish(packed(data), REL, sha1_of(data), threading.Event()) == Published.NEW
    assert d.sha1(REL) == sha1_of(data)
    assert (real / REL).read_bytes() == data
    assert d.publish(packed(data), REL, sha1_of(data), threading.Event()) == Published.PRESENT


# --- 2. temporary leftovers ---------------------------------------------------------------


def test_sweep_removes_old_temporaries_only(dest: tuple[Destination, Path], tmp_path: Path) -> None:
    d, root = dest
    day = root / "2024" / "03" / "05"
    day.mkdir(parents=True)
    (root / "2023" / "12" / "31").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    gone = [
        root / f".rt-check.0123456789ab{TMP_SUFFIX}",  # a check's probe, killed
        day / f".a.fits.fz.0123456789ab{TMP_SUFFIX}",
        root / "2023" / "12" / "31" / f".b.fits.fz.ba9876543210{TMP_SUFFIX}",
    ]
    kept = [
        day / f".fresh.fits.fz.0123456789ab{TMP_SUFFIX}",  # a copy in flight
        day / "a.fits.fz",
        day / ".hidden",
        day / f"no-dot{TMP_SUFFIX}",
        day / f".a{TMP_SUFFIX}.bak",
        day / "deeper" / f".c.fits.fz.0123456789ab{TMP_SUFFIX}",  # not where we write
        outside / f".o.fits.fz.0123456789ab{TMP_SUFFIX}",  # behind links below
    ]
    for p in gone + kept:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
        age(p, time.time() - 10 if "fresh" in p.name else OLD)
    odd_dir = day / f".dir{TMP_SUFFIX}"  # a directory with a temporary's name
    odd_dir.mkdir()
    age(odd_dir)
    file_link = day / f".l.fits.fz.0123456789ab{TMP_SUFFIX}"
    file_link.symlink_to(outside / f".o.fits.fz.0123456789ab{TMP_SUFFIX}")
    age(file_link)
    (root / "2024" / "03" / "06").symlink_to(outside, target_is_directory=True)
    (root / "2022").symlink_to(outside, target_is_directory=True)
    before_outside = everything(outside)

    assert d.sweep_temporaries(LEASE) == len(gone)

    for p in gone:
        assert not os.path.lexists(p), p
    for p in kept:
        assert p.exists(), p
    assert odd_dir.is_dir() and file_link.is_symlink()
    assert everything(outside) == before_outside
    # nothing of the sweep's own left behind (a clock probe, say)
    left = sorted(p.name for p in temps(root) if p.name.startswith("."))
    expected = [f".fresh.fits.fz.0123456789ab{TMP_SUFFIX}", file_link.name, odd_dir.name]
    assert left == sorted([*expected, f".c.fits.fz.0123456789ab{TMP_SUFFIX}"])
    assert d.sweep_temporaries(LEASE) == 0
    assert d.sweep_temporaries(5.0) == 1  # the fresh one, once it counts as old


def test_sweep_lists_many_directories_and_large_ones(dest: tuple[Destination, Path]) -> None:
    d, root = dest
    days = [root / "2024" / f"{m:02d}" / f"{dd:02d}" for m in (1, 2) for dd in range(1, 12)]
    for day in days:  # more directories than are listed at once
        day.mkdir(parents=True)
        tmp = day / f".x.fits.fz.0123456789ab{TMP_SUFFIX}"
        tmp.write_bytes(b"partial")
        age(tmp)
    for i in range(450):  # several READDIR batches in one directory
        (days[0] / f"f{i:04d}.fits.fz").touch()
    assert d.sweep_temporaries(LEASE) == len(days)
    assert temps(root) == []
    assert len(list(days[0].iterdir())) == 450


def test_sweep_of_recently_changed_day_directories_only(dest: tuple[Destination, Path]) -> None:
    d, root = dest
    recent, quiet = root / "2024" / "03" / "05", root / "2023" / "01" / "02"
    for day in (recent, quiet):
        day.mkdir(parents=True)
        tmp = day / f".x.fits.fz.0123456789ab{TMP_SUFFIX}"
        tmp.write_bytes(b"partial")
        age(tmp)
    age(quiet, time.time() - 86400)  # nothing made or removed in it for a day
    stray = root / f".rt-check.0123456789ab{TMP_SUFFIX}"
    stray.write_bytes(b"")
    age(stray)
    assert d.sweep_temporaries(LEASE, changed_within=3600) == 2  # the root is always looked at
    assert not (recent / f".x.fits.fz.0123456789ab{TMP_SUFFIX}").exists()
    assert (quiet / f".x.fits.fz.0123456789ab{TMP_SUFFIX}").exists()
    assert d.sweep_temporaries(LEASE) == 1


def test_sweep_of_an_empty_or_missing_root(dest: tuple[Destination, Path]) -> None:
    d, root = dest
    assert d.sweep_temporaries(LEASE) == 0
    assert everything(root) == set()
    root.rmdir()
    with pytest.raises(DestinationUnavailable):
        d.sweep_temporaries(LEASE)
    assert not root.exists()  # never created


def test_a_killed_copy_is_swept_when_the_service_starts(tree: Tree) -> None:
    day = tree.dest / "2024" / "03" / "05"
    day.mkdir(parents=True)
    old = day / f".t1_r1_ut1.fits.fz.0123456789ab{TMP_SUFFIX}"
    fresh = day / f".t1_r2_ut1.fits.fz.0123456789ab{TMP_SUFFIX}"
    for p in (old, fresh):
        p.write_bytes(b"partial")
    age(old)
    r = run_rt(tree.src, tree.dest, "--backfill-only", "--state-dir", tree.state)
    assert r.returncode == 0, r.stderr
    assert not old.exists()
    assert fresh.exists()  # younger than the lease: may be another host's copy in flight
    assert re.search(r"removed 1 temporary file", r.stderr), r.stderr


# --- 3. a full destination says so --------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "1m") -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        r = subprocess.run(["umount", str(where)], check=False, capture_output=True)
        if r.returncode != 0:  # still busy a moment after the last session: detach it
            subprocess.run(["umount", "-l", str(where)], check=True)


@pytest.fixture(params=["local", "sftp", "sftp-only"])
def full_dest(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Destination, Path]]:
    """A destination whose root is a 1 MiB tmpfs (torn down after the destination)."""
    with small_tmpfs(tmp_path / "small") as root:
        if request.param == "local":
            yield LocalDestination(root), root
            return
        server: SshServer = request.getfixturevalue("sshd_server")
        make = contract_factory(request)
        alias = server.alias if request.param == "sftp" else server.sftp_only_alias
        d = make(root, alias)
        try:
            yield d, root
        finally:
            d.close()


def contract_factory(request: pytest.FixtureRequest) -> contract.DestFactory:
    factory: contract.DestFactory = request.getfixturevalue("sftp_dest")
    return factory


def test_a_full_destination_says_so(
    full_dest: tuple[Destination, Path], packed: Callable[[bytes], Path]
) -> None:
    d, root = full_dest
    data = os.urandom(2 << 20)  # twice the filesystem
    d.check()
    with pytest.raises(DestinationUnavailable) as info:
        d.publish(packed(data), REL, sha1_of(data), threading.Event())
    message = str(info.value)
    m = re.search(r"destination full\? (\d+) bytes free", message)
    assert m, message
    assert 0 <= int(m.group(1)) < 64 << 10  # as it was when the write failed
    assert str(root / REL.parent) in message or str(root) in message
    assert info.value.kind == Kind.TRANSIENT  # the file waits; the queue pauses
    assert temps(root) == []
    # once there is room, the same file goes through
    small = os.urandom(1000)
    assert d.publish(packed(small), REL, sha1_of(small), threading.Event()) == Published.NEW

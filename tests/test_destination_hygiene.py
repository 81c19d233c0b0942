"""Destination hygiene, for the local directory and the SFTP destination alike.

* Nothing is written or read through a symbolic link inside the archive tree: a year,
  month or day directory that is a link, or a final name that is a link (dangling, to
  identical content, to other content), fails the file with ``DestinationLink``; the root
  itself may be a link (operators mount things).
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
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rawtransfer.destination.base import Destination, Published
from rawtransfer.destination.local import LocalDestination
from rawtransfer.errors import (
    DestinationLink,
    DestinationUnavailable,
    FileFailed,
    ResourceUnavailable,
)
from tests import test_sftp_destination as contract
from tests.ssh_fixture import SshServer

REL = contract.REL  # 2024/03/05/NAME
sha1_of = contract.sha1_of
temps = contract.temps

# the contract suite's fixtures: local, sftp, sftp-only over an empty root
dest = contract.dest
sftp_dest = contract.sftp_dest
packed = contract.packed


def everything(top: Path) -> set[str]:
    """Every entry under ``top`` (links not followed), relative, for before/after checks."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            out.add(os.path.relpath(os.path.join(dirpath, name), top))
    return out


# --- 1. no writing through links ---------------------------------------------------------


def test_a_link_is_a_permanent_file_failure() -> None:
    assert issubclass(DestinationLink, FileFailed)
    assert not issubclass(DestinationLink, ResourceUnavailable)
    assert not DestinationLink.retryable
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


# --- 2. a full destination says so --------------------------------------------------------


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
    assert info.value.retryable  # the file waits; the queue pauses
    assert temps(root) == []
    # once there is room, the same file goes through
    small = os.urandom(1000)
    assert d.publish(packed(small), REL, sha1_of(small), threading.Event()) == Published.NEW

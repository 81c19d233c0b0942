"""The Destination contract, run against the local directory and a real OpenSSH server.

The SSH cases use the session's scratch sshd (tests/ssh_fixture.py) on 127.0.0.1: full
(exec allowed, so ``sha1sum`` runs remotely) and SFTP-only (``ForceCommand internal-sftp``
without the hardlink request, so the read-back and rename fallbacks run). The server
writes to this machine's disk, so the tests look at the results with plain ``pathlib``.
Faults are real: host keys that do not match, sshd session processes killed or stopped.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import logging
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import paramiko
import pytest

from rawtransfer.config import RemoteDest, parse_dest
from rawtransfer.destination.base import TMP_SUFFIX, Destination, Published
from rawtransfer.destination.local import LocalDestination
from rawtransfer.destination.sftp import READBACK_MAX, SftpDestination
from rawtransfer.destination.sftp_wire import RemoteError, is_connection_lost
from rawtransfer.destination.ssh_target import HostKeyRefused, resolve_target
from rawtransfer.errors import (
    ConfigError,
    DestinationConflict,
    DestinationLink,
    DestinationUnavailable,
    Interrupted,
    Kind,
)
from tests.ssh_fixture import SshServer, new_ed25519

REL = PurePosixPath("2024/03/05/t1_r12345_ut2.fits.fz")
# generous: tests wait for real servers, never for a fixed time
TIMEOUT = 30.0

DestFactory = Callable[..., SftpDestination]


def sha1_of(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def temps(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(TMP_SUFFIX)]


def fingerprint(public_line: str) -> str:
    key = paramiko.Ed25519Key(data=base64.b64decode(public_line.split()[1]))
    fp: str = key.fingerprint
    return fp


class StopAfter(threading.Event):
    """A stop event that sets itself when it has been looked at ``n`` times: stops a copy
    part-way through, deterministically, without a second thread racing the first."""

    def __init__(self, n: int, action: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.n = n
        self.action = action

    def is_set(self) -> bool:
        self.n -= 1
        if self.n == 0:
            if self.action is None:
                self.set()
            else:
                self.action()
        return super().is_set()


class FaultAfter(StopAfter):
    """Runs ``action`` (a fault) at the n-th look, but never asks the copy to stop."""

    def is_set(self) -> bool:
        self.n -= 1
        if self.n == 0 and self.action is not None:
            self.action()
        return False


@pytest.fixture
def sftp_dest(sshd_server: SshServer) -> Iterator[DestFactory]:
    """Factory for SftpDestinations that talk to the scratch server only; all closed after."""
    made: list[SftpDestination] = []

    def make(root: Path, host: str | None = None, **kw: Any) -> SftpDestination:
        kw.setdefault("ssh_config", sshd_server.ssh_config)
        kw.setdefault("known_hosts", sshd_server.known_hosts)
        kw.setdefault("copy_timeout", TIMEOUT)
        kw.setdefault("allow_agent", False)
        d = SftpDestination(RemoteDest(host or sshd_server.alias, str(root)), **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


@pytest.fixture(params=["local", "sftp", "sftp-only"])
def dest(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Destination, Path]]:
    """Each implementation over an empty archive root (which is a local path here)."""
    root = tmp_path / "archive"
    root.mkdir()
    if request.param == "local":
        yield LocalDestination(root), root
        return
    server: SshServer = request.getfixturevalue("sshd_server")
    make: DestFactory = request.getfixturevalue("sftp_dest")
    alias = server.alias if request.param == "sftp" else server.sftp_only_alias
    yield make(root, alias), root


@pytest.fixture
def packed(tmp_path: Path) -> Callable[[bytes], Path]:
    counter = iter(range(1000))

    def write(data: bytes) -> Path:
        p = tmp_path / f"packed-{next(counter)}.fits.fz"
        p.write_bytes(data)
        return p

    return write


# --- the contract, for every implementation ---------------------------------------------


def test_publish_new_file(dest: tuple[Destination, Path], packed: Callable[[bytes], Path]) -> None:
    d, root = dest
    data = os.urandom(700_000)
    d.check()
    assert d.publish(packed(data), REL, sha1_of(data), threading.Event()) == Published.NEW
    target = root / REL
    assert target.read_bytes() == data
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    # every directory made gets the mode (LocalDestination's is masked by the umask)
    for sub in ("2024", "2024/03", "2024/03/05"):
        assert stat.S_IMODE((root / sub).stat().st_mode) == 0o750
    assert d.sha1(REL) == sha1_of(data)
    assert d.full_path(REL) == str(root / REL)
    assert temps(root) == []


def test_same_content_again_is_present(
    dest: tuple[Destination, Path], packed: Callable[[bytes], Path]
) -> None:
    d, root = dest
    data = os.urandom(1000)
    src = packed(data)
    assert d.publish(src, REL, sha1_of(data), threading.Event()) == Published.NEW
    assert d.publish(src, REL, sha1_of(data), threading.Event()) == Published.PRESENT
    assert temps(root) == []


def test_file_put_there_by_hand_with_same_content_is_present(
    dest: tuple[Destination, Path], packed: Callable[[bytes], Path]
) -> None:
    d, root = dest
    data = b"SIMPLE  =                    T" * 100
    (root / REL).parent.mkdir(parents=True)
    (root / REL).write_bytes(data)
    assert d.publish(packed(data), REL, sha1_of(data), threading.Event()) == Published.PRESENT


def test_different_content_is_a_conflict_and_is_not_touched(
    dest: tuple[Destination, Path], packed: Callable[[bytes], Path]
) -> None:
    d, root = dest
    old, new = os.urandom(5000), os.urandom(5000)
    assert d.publish(packed(old), REL, sha1_of(old), threading.Event()) == Published.NEW
    with pytest.raises(DestinationConflict, match="different content"):
        d.publish(packed(new), REL, sha1_of(new), threading.Event())
    assert (root / REL).read_bytes() == old
    assert temps(root) == []


def test_sha1_of_a_missing_file_is_none(dest: tuple[Destination, Path]) -> None:
    d, _ = dest
    assert d.sha1(REL) is None


def test_check_needs_an_existing_root_and_never_creates_it(dest: tuple[Destination, Path]) -> None:
    d, root = dest
    d.check()
    root.rmdir()
    with pytest.raises(DestinationUnavailable):
        d.check()
    assert not root.exists()


def test_publish_into_a_missing_root_is_refused(
    dest: tuple[Destination, Path], packed: Callable[[bytes], Path]
) -> None:
    d, root = dest
    root.rmdir()
    with pytest.raises(DestinationUnavailable):
        d.publish(packed(b"x"), REL, sha1_of(b"x"), threading.Event())
    assert not root.exists()


def test_existing_parents_are_fine(
    dest: tuple[Destination, Path], packed: Callable[[bytes], Path]
) -> None:
    d, root = dest
    (root / "2024" / "03").mkdir(parents=True)  # as another worker would have left them
    assert d.publish(packed(b"abc"), REL, sha1_of(b"abc"), threading.Event()) == Published.NEW


def test_workers_creating_the_same_day_directory_at_once(
    dest: tuple[Destination, Path], packed: Callable[[bytes], Path]
) -> None:
    d, root = dest
    n = 6
    files = [(packed(os.urandom(2000)), REL.with_name(f"f{i}.fits.fz")) for i in range(n)]
    barrier = threading.Barrier(n)
    results: dict[int, object] = {}

    def work(i: int) -> None:
        src, rel = files[i]
        barrier.wait(TIMEOUT)
        try:
            results[i] = d.publish(src, rel, sha1_of(src.read_bytes()), threading.Event())
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,), name=f"w{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert results == dict.fromkeys(range(n), Published.NEW)
    for src, rel in files:
        assert (root / rel).read_bytes() == src.read_bytes()
    assert temps(root) == []
    d.close()  # the workers' connections, before the leak check looks for their threads


def test_stop_mid_copy_abandons_it_and_removes_the_temporary_file(
    dest: tuple[Destination, Path], packed: Callable[[bytes], Path]
) -> None:
    d, root = dest
    data = os.urandom(3 << 20)  # several chunks/requests for either implementation
    stop = StopAfter(2)
    with pytest.raises(Interrupted):
        d.publish(packed(data), REL, sha1_of(data), stop)
    assert stop.is_set()
    assert not (root / REL).exists()
    assert temps(root) == []
    # and the destination is still usable afterwards
    assert d.publish(packed(data), REL, sha1_of(data), threading.Event()) == Published.NEW


def test_stop_before_copy(dest: tuple[Destination, Path], packed: Callable[[bytes], Path]) -> None:
    d, root = dest
    stop = threading.Event()
    stop.set()
    with pytest.raises(Interrupted):
        d.publish(packed(b"data"), REL, sha1_of(b"data"), stop)
    assert not (root / REL).exists()
    assert temps(root) == []


ODD_NAMES = [
    "with space.fits.fz",
    "-leading-dash.fits.fz",
    "--.fits.fz",
    "quote'single.fits.fz",
    'quote"double.fits.fz',
    "$(touch PWNED).fits.fz",
    "`touch PWNED`.fits.fz",
    "semi;touch PWNED;.fits.fz",
    "amp&&touch PWNED|pipe>x<y.fits.fz",
    "back\\slash.fits.fz",
    "new\nline.fits.fz",
    "star*?[a].fits.fz",
    "ünïcødé.fits.fz",
]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_file_names_round_trip_exactly(
    dest: tuple[Destination, Path], packed: Callable[[bytes], Path], name: str
) -> None:
    d, root = dest
    data = name.encode() * 50
    rel = REL.with_name(name)
    assert d.publish(packed(data), rel, sha1_of(data), threading.Event()) == Published.NEW
    assert os.listdir(root / rel.parent) == [name]
    assert (root / rel).read_bytes() == data
    assert d.sha1(rel) == sha1_of(data)
    assert d.publish(packed(data), rel, sha1_of(data), threading.Event()) == Published.PRESENT
    # no shell ran any part of the name, here or in the remote login directory
    for place in (Path.cwd(), Path.home(), root / rel.parent):
        assert not (place / "PWNED").exists()


# --- SSH specifics ------------------------------------------------------------------------


def test_sha1_is_computed_remotely_when_exec_is_allowed(
    sftp_dest: DestFactory,
    tmp_path: Path,
    packed: Callable[[bytes], Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = sftp_dest(tmp_path)
    data = os.urandom(READBACK_MAX + 1)  # small files are read back instead
    caplog.set_level(logging.INFO, "rawtransfer.destination.sftp")
    d.publish(packed(data), REL, sha1_of(data), threading.Event())
    assert d.sha1(REL) == sha1_of(data)
    assert d.sha1(REL) == sha1_of(data)
    assert d.sha1_method == "sha1sum"
    assert sum("sha1sum" in r.getMessage() for r in caplog.records) == 1


def test_sha1_falls_back_to_reading_back_on_an_sftp_only_server(
    sshd_server: SshServer,
    sftp_dest: DestFactory,
    tmp_path: Path,
    packed: Callable[[bytes], Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = sftp_dest(tmp_path, sshd_server.sftp_only_alias)
    data = os.urandom((1 << 20) + 12345)  # several read requests and a ragged end
    caplog.set_level(logging.INFO, "rawtransfer.destination.sftp")
    assert d.publish(packed(data), REL, sha1_of(data), threading.Event()) == Published.NEW
    for _ in range(2):
        assert d.sha1(REL) == sha1_of(data)
    assert d.sha1_method == "read-back"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("reading each file back" in m for m in messages) == 1
    assert sum("hardlink@openssh.com" in m for m in messages) == 1
    (tmp_path / "empty.fits.fz").parent.mkdir(exist_ok=True)
    (tmp_path / "empty.fits.fz").write_bytes(b"")
    assert d.sha1(PurePosixPath("empty.fits.fz")) == sha1_of(b"")


def test_unknown_host_key_is_refused(
    sshd_server: SshServer, sftp_dest: DestFactory, tmp_path: Path, packed: Callable[[bytes], Path]
) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    root = tmp_path / "archive"
    root.mkdir()
    d = sftp_dest(root, known_hosts=empty)
    with pytest.raises(DestinationUnavailable) as info:
        d.check()
    text = str(info.value)
    assert info.value.kind == Kind.REFUSED  # paused and alerted at once; exit 3 at start
    assert "unknown host key" in text
    assert f"[127.0.0.1]:{sshd_server.port}" in text
    assert fingerprint(sshd_server.host_public_key) in text
    assert "refused" in text
    with pytest.raises(DestinationUnavailable, match="unknown host key"):
        d.publish(packed(b"x"), REL, sha1_of(b"x"), threading.Event())
    assert list(root.iterdir()) == []
    assert empty.read_text() == ""  # and nothing was learnt


def test_changed_host_key_is_refused(
    sshd_server: SshServer, sftp_dest: DestFactory, tmp_path: Path, packed: Callable[[bytes], Path]
) -> None:
    _, other_public = new_ed25519()
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd_server.port} {other_public}\n")
    root = tmp_path / "archive"
    root.mkdir()
    d = sftp_dest(root, known_hosts=known)
    with pytest.raises(DestinationUnavailable) as info:
        d.publish(packed(b"x"), REL, sha1_of(b"x"), threading.Event())
    text = str(info.value)
    assert info.value.kind == Kind.REFUSED
    assert "host key changed" in text
    assert f"[127.0.0.1]:{sshd_server.port}" in text
    assert fingerprint(sshd_server.host_public_key) in text
    assert fingerprint(other_public) in text
    assert list(root.iterdir()) == []


def test_alias_is_resolved_from_the_ssh_config(sshd_server: SshServer) -> None:
    dest = parse_dest(f"{sshd_server.alias}:/data")
    assert isinstance(dest, RemoteDest)
    t = resolve_target(dest, sshd_server.ssh_config)
    assert (t.hostname, t.port, t.user) == ("127.0.0.1", sshd_server.port, sshd_server.user)
    assert t.identities == (str(sshd_server.identity),)
    assert t.known_hosts_name == f"[127.0.0.1]:{sshd_server.port}"
    # user@ in DEST wins over the config's User, as with ssh
    t = resolve_target(RemoteDest(sshd_server.alias, "/data", "someone"), sshd_server.ssh_config)
    assert t.user == "someone"
    # no config entry: the name is the host, port 22
    t = resolve_target(RemoteDest("archive.example.org", "/data", "obs"), sshd_server.ssh_config)
    assert (t.hostname, t.port, t.user) == ("archive.example.org", 22, "obs")


def test_alias_and_user_at_host_both_publish(
    sshd_server: SshServer, sftp_dest: DestFactory, tmp_path: Path, packed: Callable[[bytes], Path]
) -> None:
    data = b"frame" * 1000
    d = sftp_dest(tmp_path / "a", sshd_server.alias)
    (tmp_path / "a").mkdir()
    assert d.publish(packed(data), REL, sha1_of(data), threading.Event()) == Published.NEW
    # user@host:/path as given on the command line; the key comes as a parameter here
    dest = parse_dest(f"{sshd_server.user}@127.0.0.1:{tmp_path / 'b'}")
    assert isinstance(dest, RemoteDest)
    (tmp_path / "b").mkdir()
    d2 = SftpDestination(
        dest,
        ssh_config=sshd_server.ssh_config,  # only for the port of the scratch server
        known_hosts=sshd_server.known_hosts,
        identity=sshd_server.identity,
        allow_agent=False,
    )
    try:
        assert d2.publish(packed(data), REL, sha1_of(data), threading.Event()) == Published.NEW
        assert d2.sha1(REL) == sha1_of(data)
    finally:
        d2.close()
    assert (tmp_path / "b" / REL).read_bytes() == data


@pytest.mark.parametrize(
    "config",
    [
        "Host archive\n    ProxyCommand nc %h %p\n",
        "Host archive\n    ProxyJump bastion\n",
        'Match exec "true"\n    Port 2222\n',
    ],
)
def test_ssh_config_that_needs_a_local_shell_is_refused(tmp_path: Path, config: str) -> None:
    path = tmp_path / "ssh_config"
    path.write_text(config)
    with pytest.raises(ConfigError):
        resolve_target(RemoteDest("archive", "/data"), path)


def test_one_connection_per_worker_thread_and_close_ends_them(
    sftp_dest: DestFactory, tmp_path: Path, packed: Callable[[bytes], Path]
) -> None:
    d = sftp_dest(tmp_path)
    seen: list[Any] = []

    def work(i: int) -> None:
        for j in range(3):
            data = f"{i}-{j}".encode()
            d.publish(packed(data), REL.with_name(f"{i}-{j}.fz"), sha1_of(data), threading.Event())
        seen.append(d._local.conn)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert len({id(c) for c in seen}) == 3  # one each, reused for all three files
    transports = [c.transport for c in seen]
    assert all(t.is_active() for t in transports)
    d.close()
    assert not any(t.is_active() for t in transports)


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_dropped_connection_is_rebuilt(
    sshd_server: SshServer, sftp_dest: DestFactory, tmp_path: Path, packed: Callable[[bytes], Path]
) -> None:
    d = sftp_dest(tmp_path)
    d.publish(packed(b"one"), REL.with_name("one.fz"), sha1_of(b"one"), threading.Event())
    before = d._local.conn
    sshd_server.kill_sessions()  # as a server restart or a network cut would
    _wait_for(lambda: not before.transport.is_active(), "paramiko to notice")
    assert (
        d.publish(packed(b"two"), REL.with_name("two.fz"), sha1_of(b"two"), threading.Event())
        == Published.NEW
    )
    assert d._local.conn is not before
    assert d.sha1(REL.with_name("two.fz")) == sha1_of(b"two")


def test_connection_lost_mid_copy_is_retried_once_and_leaves_no_temp(
    sshd_server: SshServer, sftp_dest: DestFactory, tmp_path: Path, packed: Callable[[bytes], Path]
) -> None:
    d = sftp_dest(tmp_path)
    d.check()  # the copy below runs on an established connection
    data = os.urandom(3 << 20)
    fault = FaultAfter(3, sshd_server.kill_sessions)
    assert d.publish(packed(data), REL, sha1_of(data), fault) == Published.NEW
    assert fault.n < 0  # the fault did happen during the copy
    assert (tmp_path / REL).read_bytes() == data
    assert temps(tmp_path) == []  # the first attempt's temporary file was removed


def test_connection_lost_on_a_fresh_connection_fails_then_tidies_up(
    sshd_server: SshServer, sftp_dest: DestFactory, tmp_path: Path, packed: Callable[[bytes], Path]
) -> None:
    d = sftp_dest(tmp_path)
    data = os.urandom(3 << 20)
    with pytest.raises(DestinationUnavailable):
        d.publish(packed(data), REL, sha1_of(data), FaultAfter(3, sshd_server.kill_sessions))
    assert not (tmp_path / REL).exists()
    assert len(temps(tmp_path)) == 1  # the server had it open when it died
    assert d.publish(packed(data), REL, sha1_of(data), threading.Event()) == Published.NEW
    assert temps(tmp_path) == []  # removed after the reconnect


def test_a_hung_server_fails_the_copy_within_the_timeout_then_recovers(
    sshd_server: SshServer, sftp_dest: DestFactory, tmp_path: Path, packed: Callable[[bytes], Path]
) -> None:
    copy_timeout = 2.0
    d = sftp_dest(tmp_path, copy_timeout=copy_timeout)
    d.check()
    data = os.urandom(1 << 20)
    stopped = sshd_server.signal_sessions(signal.SIGSTOP)
    assert stopped
    try:
        started = time.monotonic()
        with pytest.raises(DestinationUnavailable, match="no answer"):
            d.publish(packed(data), REL, sha1_of(data), threading.Event())
        # bounded by the deadline, not by TCP's own timeouts (minutes)
        assert time.monotonic() - started < copy_timeout + 10
    finally:
        sshd_server.kill_sessions()
    assert d.publish(packed(data), REL, sha1_of(data), threading.Event()) == Published.NEW
    assert d.sha1(REL) == sha1_of(data)


def test_stop_while_the_server_hangs_interrupts_without_waiting_for_the_timeout(
    sshd_server: SshServer, sftp_dest: DestFactory, tmp_path: Path, packed: Callable[[bytes], Path]
) -> None:
    d = sftp_dest(tmp_path, copy_timeout=TIMEOUT)
    d.check()
    sshd_server.signal_sessions(signal.SIGSTOP)
    try:
        # looked at first by publish (not set yet), then by the deadline guard (set)
        stop = StopAfter(2)
        started = time.monotonic()
        with pytest.raises(Interrupted):
            d.publish(packed(b"x"), REL, sha1_of(b"x"), stop)
        assert time.monotonic() - started < TIMEOUT
    finally:
        sshd_server.kill_sessions()
    assert d.publish(packed(b"x"), REL, sha1_of(b"x"), threading.Event()) == Published.NEW


def test_permission_problems_are_unavailable_not_conflicts(
    sftp_dest: DestFactory, tmp_path: Path, packed: Callable[[bytes], Path]
) -> None:
    # a directory where the day directory should be: the server says no, clearly
    (tmp_path / "2024" / "03").mkdir(parents=True)
    (tmp_path / "2024" / "03" / "05").write_text("not a directory")
    d = sftp_dest(tmp_path)
    with pytest.raises(DestinationUnavailable, match="2024/03/05"):
        d.publish(packed(b"x"), REL, sha1_of(b"x"), threading.Event())


# --- the classifier -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "lost"),
    [
        (EOFError(), True),
        (TimeoutError("timed out"), True),
        (ConnectionResetError(errno.ECONNRESET, "reset"), True),
        (BrokenPipeError(errno.EPIPE, "broken pipe"), True),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), True),
        (OSError(errno.EHOSTUNREACH, "no route to host"), True),
        (OSError(errno.ENETUNREACH, "network unreachable"), True),
        (OSError("Socket is closed"), True),  # paramiko's closed channel
        (socket.gaierror(socket.EAI_AGAIN, "temporary failure"), True),
        (socket.gaierror(socket.EAI_NONAME, "name not known"), False),
        (paramiko.SSHException("Server connection dropped: "), True),
        (paramiko.SSHException("SSH session not active"), True),
        (paramiko.SFTPError("Expected handle"), True),
        (paramiko.ssh_exception.NoValidConnectionsError({("127.0.0.1", 22): OSError()}), True),
        (RemoteError(7, "connection lost"), True),
        (paramiko.AuthenticationException("Authentication failed."), False),
        (
            paramiko.BadHostKeyException(
                "h",
                paramiko.Ed25519Key(data=base64.b64decode(new_ed25519()[1].split()[1])),
                paramiko.Ed25519Key(data=base64.b64decode(new_ed25519()[1].split()[1])),
            ),
            False,
        ),
        (HostKeyRefused("h", None), False),
        (paramiko.ChannelException(1, "Administratively prohibited"), False),
        (RemoteError(2, "No such file"), False),
        (RemoteError(3, "Permission denied"), False),
        (RemoteError(4, "Failure"), False),
        (FileNotFoundError(errno.ENOENT, "No such file"), False),
        (PermissionError(errno.EACCES, "Permission denied"), False),
        (OSError(errno.ENOSPC, "No space left on device"), False),
        (ValueError("bug"), False),
        (KeyError("bug"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_is_connection_lost(exc: BaseException, lost: bool) -> None:
    assert is_connection_lost(exc) is lost


def test_small_files_are_verified_by_reading_back(
    sftp_dest: DestFactory, tmp_path: Path, packed: Callable[[bytes], Path]
) -> None:
    d = sftp_dest(tmp_path)
    data = os.urandom(1000)
    d.publish(packed(data), REL, sha1_of(data), threading.Event())
    assert d.sha1(REL) == sha1_of(data)
    assert d.sha1_method is None  # no remote shell was needed


def test_sha1sum_runs_behind_one_exec_channel_per_connection_whatever_the_names(
    sftp_dest: DestFactory, tmp_path: Path, packed: Callable[[bytes], Path]
) -> None:
    root = tmp_path / "archive"
    root.mkdir()
    d = sftp_dest(root)
    hashers = set()
    for name in ODD_NAMES:
        data = os.urandom(READBACK_MAX + 1)
        rel = REL.with_name(name)
        assert d.publish(packed(data), rel, sha1_of(data), threading.Event()) == Published.NEW
        assert d.sha1(rel) == sha1_of(data)
        hashers.add(id(d._local.conn.hasher))
    assert len(hashers) == 1 and d.sha1_method == "sha1sum"
    for place in (Path.cwd(), Path.home(), root / REL.parent):
        assert not (place / "PWNED").exists()
    # a file gone between the look and the hash: said so, and the next answer is sound
    conn = d._local.conn
    with pytest.raises(RemoteError) as info:
        d._sha1sum(conn, os.fsencode(root / "2024" / "gone.fits.fz"))
    assert info.value.code == paramiko.sftp.SFTP_NO_SUCH_FILE
    assert conn.hasher is not None and id(conn.hasher) in hashers
    assert d.sha1(REL.with_name(ODD_NAMES[0])) is not None


def test_a_day_directory_removed_or_replaced_by_a_link_between_two_files(
    sftp_dest: DestFactory, tmp_path: Path, packed: Callable[[bytes], Path]
) -> None:
    root = tmp_path / "archive"
    root.mkdir()
    d = sftp_dest(root)
    day = root / REL.parent
    data = [os.urandom(3000) for _ in range(3)]
    rels = [REL.with_name(f"f{i}.fits.fz") for i in range(3)]
    assert d.publish(packed(data[0]), rels[0], sha1_of(data[0]), threading.Event()) == Published.NEW
    # removed by someone: made again, the file is not lost
    for p in day.iterdir():
        p.unlink()
    day.rmdir()
    assert d.publish(packed(data[1]), rels[1], sha1_of(data[1]), threading.Event()) == Published.NEW
    assert (root / rels[1]).read_bytes() == data[1]
    assert d.sha1(rels[1]) == sha1_of(data[1])
    # replaced by a link: refused, and nothing is left behind the link
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / rels[1]).unlink()
    day.rmdir()
    day.symlink_to(outside, target_is_directory=True)
    with pytest.raises(DestinationLink):
        d.publish(packed(data[2]), rels[2], sha1_of(data[2]), threading.Event())
    assert list(outside.iterdir()) == []
    assert temps(root) == []


def test_hard_links_refused_after_working_fall_back_to_rename(
    sftp_dest: DestFactory,
    tmp_path: Path,
    packed: Callable[[bytes], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = tmp_path / "archive"
    root.mkdir()
    d = sftp_dest(root)
    first, second = os.urandom(3000), os.urandom(3000)
    d.publish(packed(first), REL, sha1_of(first), threading.Event())
    conn = d._local.conn
    send = conn.send

    def no_hardlink(t: int, *args: object) -> int:
        if args and args[0] == "hardlink@openssh.com":
            args = ("no-such-request@example.org", *args[1:])  # answered "unsupported"
        return send(t, *args)

    monkeypatch.setattr(conn, "send", no_hardlink)
    rel = REL.with_name("second.fits.fz")
    assert d.publish(packed(second), rel, sha1_of(second), threading.Event()) == Published.NEW
    assert (root / rel).read_bytes() == second
    assert d.sha1(rel) == sha1_of(second)
    assert temps(root) == []
    assert d._hardlink_refused


def test_a_temporary_opened_with_the_look_whose_answer_is_lost_is_removed_later(
    sshd_server: SshServer,
    sftp_dest: DestFactory,
    tmp_path: Path,
    packed: Callable[[bytes], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = tmp_path / "archive"
    root.mkdir()
    d = sftp_dest(root)
    first, second = os.urandom(3000), os.urandom(3000)
    d.publish(packed(first), REL, sha1_of(first), threading.Event())
    conn = d._local.conn
    handle = conn.handle

    def answer_lost(num: int, path: bytes) -> bytes:
        # the day directory is known: the temporary is opened with the look at it; the
        # server makes it, and the connection dies before its answer is read
        if path.endswith(TMP_SUFFIX.encode()):
            _wait_for(lambda: bool(temps(root)), "the server to make the temporary")
            sshd_server.kill_sessions()
            _wait_for(lambda: not conn.transport.is_active(), "paramiko to notice")
            raise EOFError
        return handle(num, path)

    monkeypatch.setattr(conn, "handle", answer_lost)
    rel = REL.with_name("second.fits.fz")
    # retried once on a new connection, which removes what the lost one left
    assert d.publish(packed(second), rel, sha1_of(second), threading.Event()) == Published.NEW
    assert d._local.conn is not conn
    assert (root / rel).read_bytes() == second
    assert temps(root) == []


def test_hard_links_refused_after_working_and_the_temporary_not_removed_behind(
    sftp_dest: DestFactory,
    tmp_path: Path,
    packed: Callable[[bytes], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = tmp_path / "archive"
    root.mkdir()
    d = sftp_dest(root)
    first, second = os.urandom(3000), os.urandom(3000)
    d.publish(packed(first), REL, sha1_of(first), threading.Event())
    conn = d._local.conn
    send = conn.send
    linked = []

    def no_hardlink_nor_removal(t: int, *args: object) -> int:
        if args and args[0] == "hardlink@openssh.com":
            args = ("no-such-request@example.org", *args[1:])  # answered "unsupported"
            linked.append(True)
        elif t == paramiko.sftp.CMD_REMOVE and linked == [True]:
            # the removal sent behind the link fails (as in a directory made read-only
            # meanwhile): the server unlinks nothing, a directory cannot be
            args = (os.fsencode(root / REL.parent),)
            linked.append(False)
        return send(t, *args)

    monkeypatch.setattr(conn, "send", no_hardlink_nor_removal)
    rel = REL.with_name("second.fits.fz")
    assert d.publish(packed(second), rel, sha1_of(second), threading.Event()) == Published.NEW
    assert linked == [True, False]
    assert (root / rel).read_bytes() == second
    assert d.sha1(rel) == sha1_of(second)
    assert temps(root) == []

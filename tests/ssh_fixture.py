"""pytest plugin: a scratch OpenSSH server on 127.0.0.1 for the SSH destination tests.

One ``sshd -D -e`` per session, with a temporary ed25519 host key, key authentication for
the current user, ``internal-sftp``, and exec allowed (so ``sha1sum`` runs). It listens on
two ports: the second is SFTP-only (``ForceCommand internal-sftp`` with the hardlink
request denied), which exercises the read-back and rename fallbacks. Nothing here reads
or writes the real ``~/.ssh``: the known_hosts file, client key and ssh_config the tests
need are temporary files exposed by the fixture.

A test that needs the server fails, with the install command, when sshd cannot be
started; it never skips.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SSHD = Path("/usr/sbin/sshd")
INSTALL_HINT = "apt-get install openssh-server"
# sshd's privilege separation directory; the package creates it at boot, a container
# may not have it.
PRIVSEP_DIR = Path("/run/sshd")
# How long sshd may take to start listening; it is ready in milliseconds normally.
START_TIMEOUT = 20.0
# How long a signalled sshd (or one of its session processes) may take to go away.
STOP_TIMEOUT = 10.0
# Host aliases defined in the fixture's ssh_config.
ALIAS = "archive-test"
SFTP_ONLY_ALIAS = "archive-sftp-only"


def new_ed25519() -> tuple[bytes, str]:
    """A fresh ed25519 key: (private key in OpenSSH format, public key line)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public.decode()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (sshd forks a monitor and a session per connection)."""
    by_parent: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # the process went away while we looked
        # the command name is in parentheses and may contain spaces: split after it
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        by_parent.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = by_parent.get(todo.pop(), [])
        out.extend(kids)
        todo.extend(kids)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class SshServer:
    host: str
    port: int
    sftp_only_port: int
    user: str
    identity: Path
    known_hosts: Path
    ssh_config: Path
    alias: str
    sftp_only_alias: str
    host_public_key: str
    scratch: Path
    log: Path
    pid: int

    def session_pids(self) -> list[int]:
        return _children(self.pid)

    def signal_sessions(self, sig: signal.Signals) -> list[int]:
        """Send ``sig`` to the processes serving current connections (not the listener)."""
        pids = self.session_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def kill_sessions(self) -> None:
        """Drop every open connection, as a server restart or a network cut would."""
        pids = self.signal_sessions(signal.SIGKILL)
        deadline = time.monotonic() + STOP_TIMEOUT
        # waiting for a condition with a deadline (they are not our children: no waitpid)
        while any(_alive(p) for p in pids):
            if time.monotonic() > deadline:
                pytest.fail(f"sshd session processes {pids} did not exit")
            time.sleep(0.02)


def _config(port: int, sftp_only_port: int, host_key: Path, auth: Path) -> str:
    return f"""\
ListenAddress 127.0.0.1:{port}
ListenAddress 127.0.0.1:{sftp_only_port}
HostKey {host_key}
PidFile none
AuthorizedKeysFile {auth}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
# the key files live under /tmp, which StrictModes' ownership walk would refuse
StrictModes no
# several workers and channels at once (sftp plus one exec per sha1sum)
MaxSessions 64
MaxStartups 64
LogLevel VERBOSE
Subsystem sftp internal-sftp
Match LocalPort {sftp_only_port}
    ForceCommand internal-sftp -P hardlink
"""


class SshdError(Exception):
    """sshd could not be started."""


def _wait_listening(proc: subprocess.Popen[bytes], ports: list[int], log: Path) -> None:
    """Return once every port answers with an SSH banner; raise with sshd's log if not."""
    deadline = time.monotonic() + START_TIMEOUT
    pending = list(ports)
    while pending and proc.poll() is None and time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", pending[0]), timeout=2) as s:
                if s.recv(64).startswith(b"SSH-2.0-"):
                    pending.pop(0)
                    continue
        except OSError:
            pass
        time.sleep(0.05)  # polling a condition, bounded by the deadline above
    if pending:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise SshdError(
            f"sshd did not start (exit {proc.returncode}); log:\n{log.read_text()[-3000:]}"
        )


@contextmanager
def running_sshd(tmp: Path) -> Iterator[SshServer]:
    """Start sshd with everything it needs under ``tmp``; stop it (by its pid) on exit."""
    if not SSHD.exists():
        raise SshdError(f"{SSHD} is missing")
    os.chmod(tmp, 0o700)
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)

    host_key = tmp / "ssh_host_ed25519_key"
    private, host_public = new_ed25519()
    host_key.write_bytes(private)
    host_key.chmod(0o600)

    identity = tmp / "id_ed25519"
    private, client_public = new_ed25519()
    identity.write_bytes(private)
    identity.chmod(0o600)
    auth = tmp / "authorized_keys"
    auth.write_text(client_public + " rawtransfer-test\n")
    auth.chmod(0o600)

    port, sftp_only_port = _free_port(), _free_port()
    known_hosts = tmp / "known_hosts"
    known_hosts.write_text(
        f"[127.0.0.1]:{port} {host_public}\n[127.0.0.1]:{sftp_only_port} {host_public}\n"
    )
    user = getpass.getuser()
    ssh_config = tmp / "ssh_config"
    ssh_config.write_text(
        f"Host {ALIAS}\n    HostName 127.0.0.1\n    Port {port}\n    User {user}\n"
        f"    IdentityFile {identity}\n"
        f"Host {SFTP_ONLY_ALIAS}\n    HostName 127.0.0.1\n    Port {sftp_only_port}\n"
        f"    User {user}\n    IdentityFile {identity}\n"
        # so that plain user@127.0.0.1:/path reaches the test server too
        f"Host 127.0.0.1\n    Port {port}\n    IdentityFile {identity}\n"
    )
    scratch = tmp / "remote"
    scratch.mkdir()

    conf = tmp / "sshd_config"
    conf.write_text(_config(port, sftp_only_port, host_key, auth))
    log = tmp / "sshd.log"
    try:
        check = subprocess.run(
            [str(SSHD), "-t", "-f", str(conf)], capture_output=True, text=True, check=False
        )
    except OSError as exc:
        raise SshdError(f"cannot run {SSHD}: {exc}") from None
    if check.returncode != 0:
        raise SshdError(f"sshd rejects the test config: {check.stderr.strip()}")
    with log.open("wb") as log_fh:
        proc = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_listening(proc, [port, sftp_only_port], log)
        yield SshServer(
            host="127.0.0.1",
            port=port,
            sftp_only_port=sftp_only_port,
            user=user,
            identity=identity,
            known_hosts=known_hosts,
            ssh_config=ssh_config,
            alias=ALIAS,
            sftp_only_alias=SFTP_ONLY_ALIAS,
            host_public_key=host_public,
            scratch=scratch,
            log=log,
            pid=proc.pid,
        )
    finally:
        sessions = _children(proc.pid)
        proc.terminate()  # sshd -D exits on SIGTERM; its sessions are ended by pid below
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pid in sessions:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """The scratch sshd; a test that needs it fails (never skips) when it cannot start."""
    try:
        with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
            yield server
    except SshdError as exc:
        pytest.fail(f"{exc}\nIf OpenSSH server is missing: {INSTALL_HINT}", pytrace=False)

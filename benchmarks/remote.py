"""The SSH destination of the benchmarks: a scratch sshd on 127.0.0.1 and its clients.

The server is the test suite's (``tests.ssh_fixture.running_sshd``: its own host key,
client key, known_hosts and ssh_config, nothing read from or written to ``~/.ssh``). It
runs on the same cores as what is measured, so its CPU is counted against us: raw-transfer
and every baseline that talks to it pay for its side of the encryption and copies.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks.measure import process_cpu

REPO = Path(__file__).resolve().parent.parent
# An OpenSSH ControlMaster left by a run is told to exit; it answers at once normally.
MASTER_EXIT_TIMEOUT = 10.0
# A ControlMaster outlives its last client by this much, as upstream deployments set it:
# long enough for the next file of a run, short enough not to linger after the harness.
CONTROL_PERSIST = "30s"
# Where ControlMaster sockets go: short, since a socket's path is limited to 107 bytes.
SOCKET_DIR = "/tmp"  # noqa: S108 - mkdtemp makes a private directory in it


@dataclass
class Remote:
    alias: str  # a Host in ``ssh_config``
    ssh_config: Path
    known_hosts: Path
    scratch: Path  # a directory the server's user may write, on this machine
    pid: int  # the sshd listener

    def client_opts(self) -> list[str]:
        """What every OpenSSH client call of a baseline carries: strict host keys against
        the scratch known_hosts, no prompts, no user config."""
        return [
            "-F",
            str(self.ssh_config),
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
        ]

    def raw_transfer_flags(self) -> list[str]:
        return ["--ssh-config", str(self.ssh_config), "--known-hosts", str(self.known_hosts)]

    def dest(self, path: Path) -> str:
        return f"{self.alias}:{path}"


@contextlib.contextmanager
def scratch_sshd(tmp: Path) -> Iterator[Remote]:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.ssh_fixture import running_sshd  # the test suite's server, reused as is

    tmp.mkdir(parents=True, exist_ok=True)
    with running_sshd(tmp) as server:
        yield Remote(
            server.alias, server.ssh_config, server.known_hosts, server.scratch, server.pid
        )


class ControlMaster:
    """An OpenSSH ControlMaster as upstream scripts use it: ``ControlMaster=auto`` with a
    ``ControlPersist``; the first client of a run becomes the master and backgrounds.

    The backgrounded master is not our child, so its CPU (it does the encryption for all
    the clients it serves) is read from ``/proc`` before it is told to exit.
    """

    def __init__(self, remote: Remote) -> None:
        self.remote = remote
        # a socket's path has at most 107 bytes: not under a deep temporary directory
        self.directory = Path(tempfile.mkdtemp(prefix="rtcm-", dir=SOCKET_DIR))
        self.path = self.directory / "%C"

    def opts(self) -> list[str]:
        return [
            "-o",
            "ControlMaster=auto",
            "-o",
            f"ControlPath={self.path}",
            "-o",
            f"ControlPersist={CONTROL_PERSIST}",
        ]

    def _pid(self) -> int | None:
        out = subprocess.run(
            ["ssh", *self.remote.client_opts(), *self.opts(), "-O", "check", self.remote.alias],
            capture_output=True,
            text=True,
            check=False,
        )
        m = re.search(r"pid=(\d+)", out.stdout + out.stderr)
        return int(m.group(1)) if m else None

    def close(self) -> float:
        """Stop the master; its CPU seconds (0 when none was left running)."""
        try:
            pid = self._pid()
            if pid is None:
                return 0.0
            cpu = process_cpu(pid)
            subprocess.run(
                ["ssh", *self.remote.client_opts(), *self.opts(), "-O", "exit", self.remote.alias],
                capture_output=True,
                check=False,
                timeout=MASTER_EXIT_TIMEOUT,
            )
            return cpu
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

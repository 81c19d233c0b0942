"""Which SSH server the SFTP destination talks to, and whether its host key is trusted.

``resolve_target`` turns ``user@host:/path`` or ``alias:/path`` into an address, a login
and key files by applying ~/.ssh/config the way ``ssh`` would (HostName, User, Port,
IdentityFile, UserKnownHostsFile); settings that would need a local shell are refused.

Host keys are checked strictly against known_hosts: an unknown key raises
``HostKeyRefused``, a changed one paramiko's ``BadHostKeyException``. The messages for
both name the offered fingerprint and the known_hosts files, so that an operator can
check the key with the archive host's administrator.
"""

from __future__ import annotations

import getpass
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko

from rawtransfer.config import RemoteDest
from rawtransfer.errors import ConfigError, DestinationUnavailable
from rawtransfer.names import q


class HostKeyRefused(Exception):
    """known_hosts has no key for this host: the one it offers is not accepted."""


@dataclass(frozen=True)
class SshTarget:
    """Where and as whom to connect, after ~/.ssh/config has been applied."""

    alias: str
    hostname: str
    port: int
    user: str
    identities: tuple[str, ...] = ()
    known_hosts: tuple[Path, ...] = ()
    identities_only: bool = False

    @property
    def known_hosts_name(self) -> str:
        """The name known_hosts files use for this host (``[host]:port`` off port 22)."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"


# --- ssh_config -------------------------------------------------------------------------

_MATCH_EXEC_RE = re.compile(r"^\s*match\b.*\bexec\b", re.IGNORECASE | re.MULTILINE)


def default_ssh_config() -> Path | None:
    path = Path.home() / ".ssh" / "config"
    return path if path.is_file() else None


def default_known_hosts() -> tuple[Path, ...]:
    return (Path.home() / ".ssh" / "known_hosts", Path("/etc/ssh/ssh_known_hosts"))


def resolve_target(
    dest: RemoteDest,
    ssh_config: Path | None,
    *,
    known_hosts: Path | None = None,
    identity: Path | None = None,
) -> SshTarget:
    """Apply an ssh_config file (HostName, User, Port, IdentityFile, UserKnownHostsFile).

    An explicit ``user@`` in DEST wins over the config's User, as with ``ssh``. Proxy
    settings and ``Match exec`` need a local shell and are refused rather than ignored.
    """
    options: dict[str, Any] = {}
    if ssh_config is not None:
        try:
            text = ssh_config.read_text()
        except OSError as exc:
            raise ConfigError(f"ssh config {q(ssh_config)}: {exc.strerror}") from None
        if _MATCH_EXEC_RE.search(text):
            raise ConfigError(f"ssh config {q(ssh_config)}: 'Match exec' would run a shell")
        try:
            options = dict(paramiko.SSHConfig.from_text(text).lookup(dest.host))
        except Exception as exc:  # paramiko raises assorted errors for bad configs
            raise ConfigError(f"ssh config {q(ssh_config)}: {exc}") from None
    for key in ("proxycommand", "proxyjump"):
        if key in options and str(options[key]).lower() != "none":
            raise ConfigError(
                f"ssh config {q(ssh_config or '')}: {key} for {dest.host} is not supported "
                "(the destination connects directly, without a local shell)"
            )
    try:
        port = int(options.get("port", 22))
    except ValueError:
        raise ConfigError(f"ssh config: Port {options['port']!r} is not a number") from None
    if known_hosts is not None:
        kh: tuple[Path, ...] = (known_hosts,)
    elif "userknownhostsfile" in options:
        kh = tuple(Path(p).expanduser() for p in str(options["userknownhostsfile"]).split())
        kh = kh or default_known_hosts()
    else:
        kh = default_known_hosts()
    if identity is not None:
        ids: tuple[str, ...] = (str(identity),)
    else:
        ids = tuple(str(Path(p).expanduser()) for p in options.get("identityfile", []))
    return SshTarget(
        alias=dest.host,
        hostname=str(options.get("hostname", dest.host)),
        port=port,
        user=dest.user or str(options.get("user") or "") or getpass.getuser(),
        identities=ids,
        known_hosts=kh,
        identities_only=identity is not None
        or str(options.get("identitiesonly", "no")).lower() == "yes",
    )


# --- host keys --------------------------------------------------------------------------


class _RefuseUnknownHost(paramiko.RejectPolicy):  # type: ignore[misc]
    """RejectPolicy, with the host and the offered fingerprint in the error."""

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        raise HostKeyRefused(hostname, key)


def trust_known_hosts(client: paramiko.SSHClient, target: SshTarget) -> None:
    """Give ``client`` the keys in the target's known_hosts files, and no others.

    Raises DestinationUnavailable for a known_hosts file paramiko cannot read.
    """
    for path in target.known_hosts:
        if path.is_file():
            try:
                client.load_system_host_keys(str(path))
            except Exception as exc:  # paramiko raises several kinds for bad lines
                raise DestinationUnavailable(f"known_hosts {q(path)}: {exc}") from None
    client.set_missing_host_key_policy(_RefuseUnknownHost())


def _known_hosts_files(target: SshTarget) -> str:
    kh = target.known_hosts
    return " ".join(q(p) for p in kh if p.is_file()) or f"{q(kh[0])} (which does not exist)"


def unknown_host_key_message(target: SshTarget, exc: HostKeyRefused) -> str:
    name, key = exc.args
    files = _known_hosts_files(target)
    return (
        f"unknown host key for {name} ({target.alias}): the server offered "
        f"{key.get_name()} {key.fingerprint}, which is not in {files}; refused. Check "
        "that fingerprint with the archive host's administrator, then add the key to "
        "known_hosts"
    )


def changed_host_key_message(target: SshTarget, exc: paramiko.BadHostKeyException) -> str:
    files = _known_hosts_files(target)
    return (
        f"host key changed for {target.known_hosts_name} ({target.alias}): the "
        f"server offered {exc.key.get_name()} {exc.key.fingerprint}, but {files} has "
        f"{exc.expected_key.get_name()} {exc.expected_key.fingerprint}; refused. Either "
        "the server was reinstalled (then update known_hosts) or someone is in between"
    )

"""An archive directory on another host, reached over SSH with the SFTP protocol (paramiko).

Same contract as the local destination: bytes go to a hidden temporary name in the target
directory and are linked to the final name without clobbering (``hardlink@openssh.com``);
an existing file with the same content counts as done, a different one is a conflict.
The SHA1 is computed on the remote side by ``sha1sum`` over an SSH exec channel, or, on a
server that allows SFTP only, by reading the file back.

Everything happens in-process: no local shell, no ``ssh`` binary, and file names never
reach a remote shell except quoted, after ``--``, as the one argument of ``sha1sum``.
Host keys are checked strictly against known_hosts; an unknown or changed key is refused.

Each worker thread keeps one connection (``threading.local``) and rebuilds it when it is
lost: that is what ``--ssh-controlmaster`` means here. Every operation has a deadline
(``--copy-timeout``); a server that stops answering fails the operation, and the
connection is dropped and rebuilt next time.

This module is the destination itself: publishing, verifying, the per-thread connections
and what a deadline does to them (rawtransfer.deadlines keeps the time). Where to connect
and which host keys to trust are in ``ssh_target``; the SFTP requests and replies,
composed by hand, in ``sftp_wire``. Their public names are importable from here as well.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
import secrets
import shlex
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import suppress
from datetime import date
from fnmatch import fnmatchcase
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, TypeVar

import paramiko
from paramiko.sftp import (
    CMD_CLOSE,
    CMD_DATA,
    CMD_EXTENDED,
    CMD_EXTENDED_REPLY,
    CMD_FSETSTAT,
    CMD_HANDLE,
    CMD_READ,
    CMD_REMOVE,
    CMD_RENAME,
    CMD_STATUS,
    SFTP_EOF,
    SFTP_FAILURE,
    SFTP_FLAG_CREATE,
    SFTP_FLAG_EXCL,
    SFTP_FLAG_READ,
    SFTP_FLAG_WRITE,
    SFTP_NO_SUCH_FILE,
    SFTP_OP_UNSUPPORTED,
    SFTP_PERMISSION_DENIED,
    int64,
)

from rawtransfer import faults
from rawtransfer.config import RemoteDest
from rawtransfer.deadlines import Deadlines, Watch
from rawtransfer.destination.base import (
    DIR_MODE,
    FILE_MODE,
    SWEEP_DEPTH,
    TMP_SUFFIX,
    ArchiveEntry,
    Published,
    full_message,
    in_date_tree,
    is_temporary,
    temporaries_of,
)
from rawtransfer.destination.sftp_wire import (
    FSYNC,
    HARDLINK,
    LIMITS,
    RemoteError,
    _Connection,
    _SFTPClient,
    is_connection_lost,
)
from rawtransfer.destination.ssh_target import (
    HostKeyRefused,
    changed_host_key_message,
    default_ssh_config,
    resolve_target,
    trust_known_hosts,
    unknown_host_key_message,
)
from rawtransfer.errors import (
    DestinationConflict,
    DestinationLink,
    DestinationRefused,
    DestinationUnavailable,
    FileFailed,
    Interrupted,
    destination_error,
)
from rawtransfer.names import q

log = logging.getLogger(__name__)

T = TypeVar("T")

# --- deadlines -------------------------------------------------------------------------
# Each is a bound on waiting for the other side; without one, a host that drops packets
# or a server process that stopped would block a worker forever.
# TCP connect, SSH banner, key exchange, authentication and opening the SFTP subsystem:
# a healthy server needs well under a second for each, a loaded one a few seconds.
CONNECT_TIMEOUT = 15.0
BANNER_TIMEOUT = 15.0
AUTH_TIMEOUT = 15.0
# After a failure or a stop request, removing the temporary file may take this long;
# past it the temporary name is remembered and removed after the next reconnect.
CLEANUP_TIMEOUT = 5.0
# SSH-level keepalive on an idle connection: keeps NAT and firewall state alive through
# the quiet hours of a night (many drop idle TCP flows after a few minutes).
KEEPALIVE_INTERVAL = 15.0

# --- tuning (measured: benchmarks/sftp_throughput.py) -----------------------------------
# AES-GCM needs no separate MAC pass and is accelerated by AES-NI: the fastest cipher
# paramiko has. Others stay as fallbacks for servers that lack it.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr")
PREFERRED_KEX = ("curve25519-sha256@libssh.org", "curve25519-sha256")
# Our receive window (paramiko's default is 2 MiB): room for every read-back request in
# flight, so that the server never waits for a window adjustment.
WINDOW_SIZE = 8 << 20
# One SFTP write or read request carries this much: OpenSSH accepts 255 KiB (its
# limits@openssh.com reply says so); paramiko's 32 KiB default costs 8x the round trips.
REQUEST_SIZE = 255 << 10
# Files up to this size are verified by reading them back over SFTP rather than by a
# remote sha1sum: measured on loopback, 4 ms against 95 ms per 100 KB file.
READBACK_MAX = 1 << 20
# Directories listed at once by a sweep of temporary files (each with its own handle).
SWEEP_BATCH = 16
# Directories listed at once by list_archive (each with its own handle; OpenSSH allows
# hundreds). Measured through a relay adding 20 ms of round trip, 100 day directories of
# 100 files: one at a time 6.8 s, 16 at once 0.72 s, 64 at once 0.42 s. On loopback the
# batch hardly matters: 100,000 files take about 1.2 s, paramiko parsing the names.
LIST_BATCH = 64
# Servers that are not OpenSSH and do not announce their limits get the size every SFTP
# server must accept.
SAFE_REQUEST_SIZE = 32 << 10
# Bytes requested but not yet acknowledged. Uploads are paced by the server's own window
# (OpenSSH: 2 MiB) anyway; for read-backs more is slower, not faster: paramiko's receive
# buffer drops consumed bytes from the front of an array, so its cost grows with the
# backlog (measured: 4 MiB ~250 MB/s, 16 MiB with a 32 MiB window ~120 MB/s).
MAX_IN_FLIGHT = 4 << 20
# Closing a file is a small request after a burst of large ones; with Nagle's algorithm
# it waits for the peer's delayed ACK (about 40 ms per file).
TCP_NODELAY = True


# a temporary file is always new: never one left by someone else, never through a link
TMP_FLAGS = SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_EXCL

_SHA1SUM_RE = re.compile(rb"^\\?([0-9a-f]{40}) ")


def _shut(sock: socket.socket) -> Callable[[], None]:
    """What a deadline does to an operation past its time (or shortly after a stop
    request): shut the connection's socket down, which wakes every paramiko call blocked
    on it, including the ones that take no timeout (opening channels, exec, exit
    status)."""
    return lambda: sock.shutdown(socket.SHUT_RDWR)


# the worker stops at its next request; a stop request gives it this long to tidy up
_DEADLINES = Deadlines("sftp-deadlines", stop_grace=CLEANUP_TIMEOUT)


# --- the destination --------------------------------------------------------------------


class SftpDestination:
    """``user@host:/path`` or ``alias:/path`` over SSH/SFTP; see the module docstring."""

    def __init__(
        self,
        dest: RemoteDest,
        *,
        copy_timeout: float = 60.0,
        known_hosts: Path | None = None,
        ssh_config: Path | None = None,
        identity: Path | None = None,
        allow_agent: bool = True,
        file_mode: int = FILE_MODE,
        dir_mode: int = DIR_MODE,
        persistent: bool = True,
    ) -> None:
        self.dest = dest
        # keep one connection per worker across files (the service always does; a
        # connection per file, as upstream's scp calls had, costs a handshake per frame)
        self.persistent = persistent
        self.copy_timeout = copy_timeout
        self.target = resolve_target(
            dest,
            ssh_config if ssh_config is not None else default_ssh_config(),
            known_hosts=known_hosts,
            identity=identity,
        )
        self.allow_agent = allow_agent and not self.target.identities_only
        self.file_mode = file_mode
        self.dir_mode = dir_mode
        # SFTP paths without a leading slash are relative to the login directory, which
        # is what "~/" means to scp; SFTP itself does not expand "~"
        root = dest.path.removeprefix("~/") if dest.path != "~" else "."
        self.root = root.rstrip("/") or "/"
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        # temporary files a lost connection left behind; removed after a reconnect
        self._orphans: set[bytes] = set()
        # how the remote SHA1 is computed: None until the first file tells us
        self.sha1_method: str | None = None
        self._hardlink_refused = False
        self._hardlink_works = False
        self._said: set[str] = set()

    def __repr__(self) -> str:
        t = self.target
        return f"SftpDestination({t.user}@{t.hostname}:{t.port}:{self.root})"

    @property
    def where(self) -> str:
        t = self.target
        return f"{t.user}@{t.alias}:{self.root}"

    # Destination protocol ---------------------------------------------------------------
    def full_path(self, rel: PurePosixPath) -> str:
        return posixpath.join(self.root, str(rel))

    def check(self) -> None:
        self._run("checking the archive root", self._check, self.copy_timeout)

    def publish(
        self, local: Path, rel: PurePosixPath, sha1: str, stop: threading.Event
    ) -> Published:
        target = os.fsencode(self.full_path(rel))
        return self._run(
            f"writing {q(self.full_path(rel))}",
            lambda conn: self._publish(conn, local, self._dirs(rel), target, sha1, stop),
            self.copy_timeout,
            stop,
        )

    def sha1(self, rel: PurePosixPath) -> str | None:
        path = os.fsencode(self.full_path(rel))
        dirs = self._dirs(rel)

        def run(conn: _Connection) -> str | None:
            published, conn.published = conn.published, None
            if published is not None and published[0] == path and published[1] <= READBACK_MAX:
                digest = self._verify_published(conn, dirs, path)
                if digest is not None:
                    return digest
            _, st = self._inspect(conn, dirs, path)
            if st is None:
                return None
            if stat.S_ISLNK(st.st_mode or 0):
                raise DestinationLink(q(os.fsdecode(path)))
            return self._remote_sha1(conn, path, st)

        return self._run(f"checksumming {q(self.full_path(rel))}", run, self.copy_timeout)

    def _verify_published(self, conn: _Connection, dirs: list[bytes], path: bytes) -> str | None:
        """The SHA1 of a small file this connection has just published, read back in two
        round trips: look at it and its directories again and open it; read and close.
        None when it is not as it was (the caller then looks the usual way, which says
        what is wrong)."""
        paths = [*dirs, path]
        nums = conn.send_lstats(paths)
        opening = conn.send_open(path, SFTP_FLAG_READ)

        def undo() -> None:
            t, msg = conn.reply(opening)
            if t == CMD_HANDLE:
                conn.close_handle(msg.get_binary(), path)

        try:
            found = conn.lstats(paths, nums)
        except BaseException as exc:
            self._tidy(conn, exc, undo)
            raise
        try:
            handle = conn.handle(opening, path)
        except RemoteError:
            return None
        st = found[-1]
        if _is(st, stat.S_ISREG) and all(_is(d, stat.S_ISDIR) for d in found[:-1]):
            return self._read_back_sha1(conn, path, st, handle)
        conn.close_handle(handle, path)
        return None

    def sweep_temporaries(self, older_than: float, changed_within: float | None = None) -> int:
        """Remove temporary files (``.*.rt-tmp``) older than ``older_than`` seconds, by
        the server's clock, from the root and the year, month and day directories; with
        ``changed_within``, only from day directories modified that recently."""
        now = self._run("sweeping temporary files", self._server_now, self.copy_timeout)
        cutoff = now - older_than
        since = None if changed_within is None else now - changed_within
        removed = 0
        level = [os.fsencode(self.root)]
        for depth in range(SWEEP_DEPTH + 1):
            below: list[bytes] = []
            for i in range(0, len(level), SWEEP_BATCH):
                chunk = level[i : i + SWEEP_BATCH]
                n, subdirs = self._run(
                    f"sweeping {q(os.fsdecode(chunk[0]))}" + (" and others" if chunk[1:] else ""),
                    partial(self._sweep, paths=chunk, depth=depth, cutoff=cutoff, since=since),
                    self.copy_timeout,
                )
                removed += n
                below += subdirs
            level = below
        return removed

    def discard_temporaries(self, rel: PurePosixPath) -> int:
        parent = os.fsencode(self.full_path(rel.parent))
        pattern = temporaries_of(rel.name)

        def run(conn: _Connection) -> int:
            listing = conn.listdirs([parent])[parent]
            if isinstance(listing, RemoteError):
                if listing.code == SFTP_NO_SUCH_FILE:
                    return 0
                raise listing
            names = [
                posixpath.join(parent, n)
                for n, st in listing
                if fnmatchcase(os.fsdecode(n), pattern) and _is(st, stat.S_ISREG)
            ]
            # a server that follows links in listings would show a link as a file
            doomed = [
                p
                for p, st in zip(names, conn.lstat_many(names), strict=True)
                if _is(st, stat.S_ISREG)
            ]
            removed, _errors = conn.remove_many(doomed)
            return removed

        return self._run(f"cleaning {q(os.fsdecode(parent))}", run, self.copy_timeout)

    def list_archive(self, since: date | None = None) -> Iterator[ArchiveEntry]:
        # one level at a time (years, months, days, then the days' files), LIST_BATCH
        # directories per pipelined request: a few round trips per level, not per directory
        level: list[tuple[bytes, tuple[str, ...]]] = [(os.fsencode(self.root), ())]
        for depth in range(SWEEP_DEPTH + 1):
            below: list[tuple[bytes, tuple[str, ...]]] = []
            for i in range(0, len(level), LIST_BATCH):
                chunk = level[i : i + LIST_BATCH]
                paths = [p for p, _ in chunk]
                listings = self._run(
                    f"listing {q(os.fsdecode(paths[0]))}" + (" and others" if paths[1:] else ""),
                    partial(_Connection.listdirs, paths=paths),
                    self.copy_timeout,
                )
                for path, parts in chunk:
                    listing = listings[path]
                    if isinstance(listing, RemoteError):
                        if listing.code != SFTP_NO_SUCH_FILE:
                            shown = q(os.fsdecode(path))
                            raise destination_error(f"listing {shown}: {listing.strerror}", listing)
                        if depth == 0:
                            raise DestinationUnavailable(f"{self.where} does not exist")
                        continue  # removed since its parent was listed
                    # the attributes are lstat's (OpenSSH): a link is neither file nor directory
                    for raw, st in sorted(listing, key=lambda entry: entry[0]):
                        name, mode = os.fsdecode(raw), st.st_mode or 0
                        if depth == SWEEP_DEPTH:
                            if stat.S_ISREG(mode):
                                rel = PurePosixPath(*parts, name)
                                yield ArchiveEntry(rel, st.st_size or 0, float(st.st_mtime or 0))
                        elif stat.S_ISDIR(mode) and in_date_tree((*parts, name), since):
                            below.append((posixpath.join(path, raw), (*parts, name)))
            level = below

    def file_done(self) -> None:
        """The calling worker is finished with a file; close its connection unless kept."""
        conn: _Connection | None = getattr(self._local, "conn", None)
        if not self.persistent and conn is not None:
            self._drop(conn)

    def close(self) -> None:
        with self._lock:
            conns, self._connections = self._connections, set()
        for conn in conns:
            # the last chance for temporaries left by cut copies (else: the next start's
            # sweep, once they are older than a lease)
            if self._orphans and conn.alive() and not conn.broken:
                self._remove_orphans(conn)
            conn.close()

    # connections ----------------------------------------------------------------------
    def _connection(self) -> tuple[_Connection, bool]:
        """This thread's connection, and whether it was made just now."""
        conn: _Connection | None = getattr(self._local, "conn", None)
        if conn is not None and conn.alive():
            # another worker's copy may have been cut after this connection was made:
            # its temporary file is removed by whichever connection works next
            if self._orphans:
                self._remove_orphans(conn)
            return conn, False
        if conn is not None:
            self._drop(conn)
        conn = self._connect()
        self._local.conn = conn
        with self._lock:
            self._connections.add(conn)
        self._remove_orphans(conn)
        return conn, True

    def _drop(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.discard(conn)
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        conn.close()

    def _transport(self, sock: socket.socket, **kw: Any) -> paramiko.Transport:
        t = paramiko.Transport(sock, default_window_size=WINDOW_SIZE, **kw)
        opts = t.get_security_options()
        opts.ciphers = _prefer(PREFERRED_CIPHERS, opts.ciphers)
        opts.kex = _prefer(PREFERRED_KEX, opts.kex)
        t.name = f"ssh-{self.target.alias}"
        return t

    def _connect(self) -> _Connection:
        t = self.target
        sock = socket.create_connection((t.hostname, t.port), timeout=CONNECT_TIMEOUT)
        try:
            if TCP_NODELAY:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # TCP keepalive as well: a peer that vanished (power cut) is noticed by the
            # kernel even while paramiko waits for a reply
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        except OSError:
            sock.close()
            raise
        client = paramiko.SSHClient()
        try:
            # read at every connect, so that a corrected known_hosts needs no restart
            trust_known_hosts(client, t)
        except DestinationUnavailable:
            sock.close()
            raise
        try:
            with _DEADLINES.watch(CONNECT_TIMEOUT + BANNER_TIMEOUT + AUTH_TIMEOUT, _shut(sock)):
                client.connect(
                    t.hostname,
                    port=t.port,
                    username=t.user,
                    key_filename=list(t.identities) or None,
                    timeout=CONNECT_TIMEOUT,
                    allow_agent=self.allow_agent,
                    look_for_keys=not t.identities_only,
                    sock=sock,
                    banner_timeout=BANNER_TIMEOUT,
                    auth_timeout=AUTH_TIMEOUT,
                    channel_timeout=CONNECT_TIMEOUT,
                    transport_factory=self._transport,
                )
                transport = client.get_transport()
                transport.set_keepalive(int(KEEPALIVE_INTERVAL))
                chan = transport.open_session(window_size=WINDOW_SIZE, timeout=CONNECT_TIMEOUT)
                chan.settimeout(CONNECT_TIMEOUT)
                chan.invoke_subsystem("sftp")
                sftp = _SFTPClient(chan)
                op_timeout = max(self.copy_timeout, 1.0)
                chan.settimeout(op_timeout)
                conn = _Connection(
                    client, transport, sock, sftp, REQUEST_SIZE, op_timeout=op_timeout
                )
                conn.request_size = self._request_size(conn)
        except BaseException:
            client.close()
            sock.close()
            raise
        log.debug(
            "connected to %s@%s:%d (%s; %d KiB requests; SFTP extensions: %s)",
            t.user,
            t.hostname,
            t.port,
            transport.local_cipher,
            conn.request_size >> 10,
            ", ".join(sorted(sftp.extensions)) or "none",
        )
        return conn

    def _request_size(self, conn: _Connection) -> int:
        """255 KiB where the server says (or is known) to accept it, else 32 KiB."""
        if conn.has(LIMITS):
            msg = conn.expect(conn.send(CMD_EXTENDED, LIMITS), CMD_EXTENDED_REPLY)
            msg.get_int64()  # max packet length
            max_read, max_write = msg.get_int64(), msg.get_int64()
            limit = min(x for x in (max_read, max_write, REQUEST_SIZE) if x > 0)
            return max(limit, SAFE_REQUEST_SIZE)
        version = str(conn.transport.remote_version or "")
        return REQUEST_SIZE if "OpenSSH" in version else SAFE_REQUEST_SIZE

    def _remove_orphans(self, conn: _Connection) -> None:
        with self._lock:
            orphans, self._orphans = self._orphans, set()
        for path in orphans:
            try:
                conn.channel.settimeout(CLEANUP_TIMEOUT)
                conn.remove(path)
                log.info("removed %s left by a lost connection", q(os.fsdecode(path)))
            except Exception:  # best effort: it stays on the list for next time
                with self._lock:
                    self._orphans.add(path)
            finally:
                conn.channel.settimeout(conn.op_timeout)

    def _run(
        self,
        what: str,
        op: Callable[[_Connection], T],
        seconds: float,
        stop: threading.Event | None = None,
    ) -> T:
        """Run ``op`` on this thread's connection within ``seconds``; map failures.

        A connection that was already open may have died while idle (a server restart
        overnight): that case is retried once on a fresh connection. A fresh connection
        that fails, or a timeout, is not retried here: the file goes back on the queue.
        """
        for attempt in (1, 2):
            if stop is not None and stop.is_set():
                raise Interrupted(f"{what}: abandoned at shutdown")
            try:
                conn, fresh = self._connection()
            except HostKeyRefused as exc:
                raise DestinationRefused(unknown_host_key_message(self.target, exc)) from None
            except paramiko.BadHostKeyException as exc:
                raise DestinationRefused(changed_host_key_message(self.target, exc)) from None
            except paramiko.AuthenticationException as exc:
                t = self.target
                raise DestinationRefused(
                    f"authentication as {t.user} on {t.hostname}:{t.port} failed ({exc}); "
                    f"keys tried: {', '.join(t.identities) or 'agent and ~/.ssh defaults'}"
                ) from None
            except Exception as exc:
                if not (is_connection_lost(exc) or isinstance(exc, OSError)):
                    raise
                t = self.target
                raise DestinationUnavailable(
                    f"cannot connect to {t.hostname}:{t.port} ({t.alias}): {_describe(exc)}"
                ) from None
            guard: Watch | None = None
            try:
                with _DEADLINES.watch(seconds, _shut(conn.sock), stop) as guard:
                    return op(conn)
            except (FileFailed, DestinationUnavailable, Interrupted):
                raise
            except Exception as exc:
                fired = guard.fired if guard is not None else ""
                lost = is_connection_lost(exc) or bool(fired) or not conn.alive()
                if not lost and not isinstance(exc, OSError):
                    raise  # a programming error: let it show
                if lost:
                    self._drop(conn)
                if fired == "stop requested":
                    raise Interrupted(f"{what}: abandoned at shutdown") from None
                if fired or isinstance(exc, TimeoutError):
                    raise DestinationUnavailable(
                        f"{what}: no answer from {self.target.alias} within {seconds:g} s "
                        "(--copy-timeout); connection dropped"
                    ) from None
                if lost and not fresh and attempt == 1:
                    log.info("connection to %s lost (%s); reconnecting", self.where, exc)
                    continue
                # a permission denied by the server is refused until a person acts
                raise destination_error(f"{what}: {_describe(exc, what)}", exc) from None
        raise AssertionError("unreachable")

    # operations -------------------------------------------------------------------------
    def _check(self, conn: _Connection) -> None:
        root = os.fsencode(self.root)
        st = conn.lstat(root, follow=True)
        # the root is never created: that would fill an unmounted mount point
        if st is None:
            raise DestinationUnavailable(f"{self.where} does not exist")
        if not stat.S_ISDIR(st.st_mode or 0):
            raise DestinationUnavailable(f"{self.where} is not a directory")
        # a read-only mount or a wrong owner shows here, not at the first file
        probe = posixpath.join(root, f".rt-check.{secrets.token_hex(6)}{TMP_SUFFIX}".encode())
        try:
            conn.close_handle(conn.open(probe, SFTP_FLAG_WRITE | SFTP_FLAG_CREATE), probe)
        except RemoteError as exc:
            raise destination_error(f"{self.where} is not writable: {exc}", exc) from None
        conn.remove(probe)

    def _dirs(self, rel: PurePosixPath) -> list[bytes]:
        """The directories between the root and ``rel`` (year, month, day)."""
        parts = rel.parts[:-1]
        return [os.fsencode(posixpath.join(self.root, *parts[: i + 1])) for i in range(len(parts))]

    def _inspect(
        self, conn: _Connection, dirs: list[bytes], target: bytes
    ) -> tuple[int, paramiko.SFTPAttributes | None]:
        """How many of ``dirs`` exist (each a real directory, never a link), and the
        ``lstat`` of ``target``; one round trip. SFTP has no ``openat``: a link made
        between this look and the write is not seen (locally it is)."""
        found = conn.lstat_many([*dirs, target])
        for have, (path, st) in enumerate(zip(dirs, found, strict=False)):
            if st is None:
                return have, None
            self._real_directory(path, st)
        return len(dirs), found[-1]

    @staticmethod
    def _real_directory(path: bytes, st: paramiko.SFTPAttributes) -> None:
        mode = st.st_mode or 0
        if stat.S_ISLNK(mode):
            raise DestinationLink(q(os.fsdecode(path)))
        if not stat.S_ISDIR(mode):
            shown = q(os.fsdecode(path))
            raise DestinationUnavailable(f"{shown} exists and is not a directory")

    def _publish(
        self,
        conn: _Connection,
        local: Path,
        dirs: list[bytes],
        target: bytes,
        sha1: str,
        stop: threading.Event,
    ) -> Published:
        """Three round trips for a new file in a day directory this connection has seen:
        look and open the temporary; write, fsync and close; link and remove the
        temporary name."""
        parent, name = posixpath.split(target)
        tmp = posixpath.join(parent, b"." + name + f".{secrets.token_hex(6)}{TMP_SUFFIX}".encode())
        handle = self._open_known(conn, dirs, target, tmp) if parent in conn.known_dirs else None
        if handle is None:
            conn.known_dirs.discard(parent)
            have, existing = self._inspect(conn, dirs, target)
            if existing is not None:
                return self._existing(conn, target, existing, sha1)
            self._makedirs(conn, dirs[have:])
            try:
                handle = conn.open(tmp, TMP_FLAGS, self.file_mode)
            except RemoteError as exc:
                raise self._maybe_full(conn, exc, target, parent) from None
            except BaseException:
                # no answer: the server may have made it, or make it yet
                with self._lock:
                    self._orphans.add(tmp)
                raise
            conn.known_dirs.add(parent)
        try:
            try:
                with open(local, "rb") as src:
                    size = self._upload(conn, handle, tmp, src, stop)
            except RemoteError as exc:
                # the free space as it is now, before the temporary is removed
                raise self._maybe_full(conn, exc, target, parent) from None
            result, tmp_left = self._link(conn, tmp, target, sha1)
        except _HardlinkGone:
            # hard links worked here before and are refused now (the temporary is gone
            # with its pipelined removal): once more, by check-then-rename
            return self._publish(conn, local, dirs, target, sha1, stop)
        except BaseException as exc:
            self._abandon(conn, tmp, exc)
            raise
        if tmp_left:
            conn.remove(tmp)  # the final name holds the data now
        if result == Published.NEW:
            conn.published = (target, size)
        return result

    def _open_known(
        self, conn: _Connection, dirs: list[bytes], target: bytes, tmp: bytes
    ) -> bytes | None:
        """In one round trip: look at the directories again (each still a real
        directory, never a link) and at the target (still missing), and open the
        temporary file. Its handle, or None (the temporary removed again) when anything
        is not as it was: the caller then looks, makes and opens step by step."""
        paths = [*dirs, target]
        nums = conn.send_lstats(paths)
        opening = conn.send_open(tmp, TMP_FLAGS, self.file_mode)

        def undo() -> None:
            t, msg = conn.reply(opening)
            if t == CMD_HANDLE:
                conn.close_handle(msg.get_binary(), tmp)
                conn.remove(tmp)

        try:
            found = conn.lstats(paths, nums)
        except BaseException as exc:
            if not self._tidy(conn, exc, undo):
                with self._lock:
                    self._orphans.add(tmp)
            raise
        as_before = found[-1] is None and all(_is(st, stat.S_ISDIR) for st in found[:-1])
        try:
            handle = conn.handle(opening, tmp)
        except RemoteError:
            return None
        except BaseException:
            # no answer: the server may have made it, or make it yet
            with self._lock:
                self._orphans.add(tmp)
            raise
        if as_before:
            return handle
        # a directory went or became something else, or the file is there already: the
        # temporary was made in vain (through a link, maybe): remove it the way it came
        closing, removing = conn.send(CMD_CLOSE, handle), conn.send(CMD_REMOVE, tmp)
        try:
            conn.status(closing, tmp)
            conn.status(removing, tmp)
        except BaseException:
            conn.ignore([removing])
            with self._lock:
                self._orphans.add(tmp)
            raise
        return None

    def _maybe_full(
        self, conn: _Connection, exc: RemoteError, target: bytes, parent: bytes
    ) -> Exception:
        """What to raise for a refused write: OpenSSH reports ENOSPC and EDQUOT as plain
        "Failure", so that status says what the free space is, where the server tells."""
        if exc.code != SFTP_FAILURE or not conn.alive():
            return exc
        try:
            free = conn.free_bytes(parent)
        except RemoteError:
            free = None
        return DestinationUnavailable(full_message(f"writing {q(os.fsdecode(target))}", exc, free))

    def _makedirs(self, conn: _Connection, missing: list[bytes]) -> None:
        """Make the missing directories below the root, in order (never the root)."""
        for current in missing:
            try:
                conn.mkdir(current, self.dir_mode)
            except RemoteError:
                st = conn.lstat(current)
                if st is not None:
                    self._real_directory(current, st)
                    continue  # made a moment ago by another worker: that is fine
                if conn.lstat(os.fsencode(self.root), follow=True) is None:
                    # never created here: that would fill an unmounted mount point
                    raise DestinationUnavailable(f"{self.where} does not exist") from None
                raise
            # exact mode whatever the server's umask
            conn.chmod(current, self.dir_mode)

    def _upload(
        self, conn: _Connection, handle: bytes, tmp: bytes, src: BinaryIO, stop: threading.Event
    ) -> int:
        """Pipelined writes, each acknowledgement checked; fsync and close sent behind
        them. The number of bytes written."""
        pending: deque[int] = deque()
        size = conn.request_size
        window = max(1, MAX_IN_FLIGHT // size)
        offset = 0
        closing: int | None = None
        try:
            # the exact mode whatever the server's umask did to the one asked at open
            attrs = paramiko.SFTPAttributes()
            attrs.st_mode = self.file_mode
            pending.append(conn.send(CMD_FSETSTAT, handle, attrs))
            while data := src.read(size):
                if stop.is_set():
                    raise Interrupted(f"copy to {q(os.fsdecode(tmp))} abandoned at shutdown")
                if len(pending) >= window:
                    conn.status(pending.popleft(), tmp)
                pending.append(conn.send_write(handle, offset, data))
                offset += len(data)
                faults.hit("during-copy")
            if conn.has(FSYNC):
                # the source may be deleted once this copy is verified: it must be on disk
                pending.append(conn.send(CMD_EXTENDED, FSYNC, handle))
            # the server answers in order: a failed write or fsync is seen before the close
            closing = conn.send(CMD_CLOSE, handle)
            while pending:
                conn.status(pending.popleft(), tmp)
        except BaseException as exc:
            conn.ignore([*pending, *([] if closing is None else [closing])])
            if closing is None:
                self._tidy(conn, exc, lambda: conn.close_handle(handle, tmp))
            raise
        conn.status(closing, tmp)
        return offset

    def _link(
        self, conn: _Connection, tmp: bytes, target: bytes, sha1: str
    ) -> tuple[Published, bool]:
        """Give the temporary file its final name, never replacing one; the result, and
        whether the temporary name is still there to remove."""
        if conn.has(HARDLINK) and not self._hardlink_refused:
            linking = conn.send(CMD_EXTENDED, HARDLINK, tmp, target)
            # where hard links worked before, the temporary name is removed in the same
            # round trip (the server runs the two in order)
            removing = conn.send(CMD_REMOVE, tmp) if self._hardlink_works else None
            try:
                conn.status(linking, target)
            except RemoteError as exc:
                # the removal behind the link ran all the same: is the temporary still there?
                tmp_left = removing is None or not _removed(conn, removing, tmp)
                existing = conn.lstat(target)
                if existing is not None:
                    return self._existing(conn, target, existing, sha1), tmp_left
                if exc.code not in (SFTP_OP_UNSUPPORTED, SFTP_PERMISSION_DENIED):
                    raise
                # a filesystem without hard links (some FUSE and SMB mounts) says EPERM
                self._hardlink_refused = True
                self._say_once(
                    HARDLINK,
                    "%s refuses %s (%s); publishing by check-then-rename instead",
                    self.where,
                    HARDLINK,
                    exc.strerror,
                )
                if not tmp_left:
                    raise _HardlinkGone from None
                # the temporary is still there (never removed, or its removal refused):
                # it is renamed below
            except BaseException:
                conn.ignore([] if removing is None else [removing])
                raise
            else:
                self._hardlink_works = True
                if removing is None:
                    return Published.NEW, True
                try:
                    conn.status(removing, tmp)
                except RemoteError:
                    return Published.NEW, True  # removed the usual way, which says why not
                return Published.NEW, False
        elif not conn.has(HARDLINK):
            self._say_once(
                "no-" + HARDLINK,
                "%s does not offer %s; publishing by check-then-rename instead",
                self.where,
                HARDLINK,
            )
        existing = conn.lstat(target)
        if existing is not None:
            return self._existing(conn, target, existing, sha1), True
        try:
            # plain SFTP rename, not posix-rename: the protocol defines it to fail when the
            # new name exists (OpenSSH implements it with link()), so the window between
            # the check above and this rename cannot clobber on a conforming server
            conn.status(conn.send(CMD_RENAME, tmp, target), target)
        except RemoteError:
            existing = conn.lstat(target)
            if existing is not None:
                return self._existing(conn, target, existing, sha1), True
            raise
        return Published.NEW, False

    def _existing(
        self, conn: _Connection, target: bytes, st: paramiko.SFTPAttributes, sha1: str
    ) -> Published:
        shown = q(os.fsdecode(target))
        if stat.S_ISLNK(st.st_mode or 0):
            raise DestinationLink(shown)
        if not stat.S_ISREG(st.st_mode or 0):
            raise DestinationConflict(f"{shown} exists and is not a regular file; not replaced")
        if self._remote_sha1(conn, target, st) == sha1:
            return Published.PRESENT
        raise DestinationConflict(f"{shown} exists with different content; not overwritten")

    def _abandon(self, conn: _Connection, tmp: bytes, exc: BaseException) -> None:
        """Remove the temporary file after a failure, or remember it if we cannot now."""
        if not self._tidy(conn, exc, lambda: conn.remove(tmp)):
            with self._lock:
                self._orphans.add(tmp)

    def _tidy(self, conn: _Connection, exc: BaseException, step: Callable[[], object]) -> bool:
        """Run a clean-up step after ``exc``, briefly; False if it could not be done.

        After a lost connection or a timeout the stream may stop in the middle of a packet,
        so nothing more is sent on it: the connection is marked for rebuilding instead.
        """
        if is_connection_lost(exc) or not conn.alive():
            conn.broken = True
            return False
        conn.channel.settimeout(CLEANUP_TIMEOUT)
        try:
            step()
            return True
        except Exception:
            conn.broken = True
            return False
        finally:
            conn.channel.settimeout(conn.op_timeout)

    # temporary leftovers ------------------------------------------------------------------
    def _server_now(self, conn: _Connection) -> float:
        """The server's time as it stamps files (its clock may differ from ours): the
        mtime of a probe file made and removed at once; ours if it cannot be made."""
        root = os.fsencode(self.root)
        if conn.lstat(root, follow=True) is None:
            raise DestinationUnavailable(f"{self.where} does not exist")
        probe = posixpath.join(root, f".rt-clock.{secrets.token_hex(6)}{TMP_SUFFIX}".encode())
        try:
            conn.close_handle(conn.open(probe, SFTP_FLAG_WRITE | SFTP_FLAG_CREATE), probe)
        except RemoteError:
            return time.time()
        try:
            st = conn.lstat(probe)
        finally:
            conn.remove(probe)
        return float(st.st_mtime) if st is not None and st.st_mtime is not None else time.time()

    def _sweep(
        self,
        conn: _Connection,
        paths: list[bytes],
        depth: int,
        cutoff: float,
        since: float | None,
    ) -> tuple[int, list[bytes]]:
        """Remove old temporaries in some directories of one level; return how many, and
        the real directories of the next level to look at."""
        subdirs: list[bytes] = []
        doomed: list[bytes] = []
        for path, listing in conn.listdirs(paths).items():
            if isinstance(listing, RemoteError):
                if depth == 0:
                    raise listing
                # gone meanwhile, or not ours to read: the rest of the tree is still swept
                if listing.code != SFTP_NO_SUCH_FILE:
                    log.warning("not sweeping %s: %s", q(os.fsdecode(path)), listing.strerror)
                continue
            for name, st in listing:
                mode, mtime = st.st_mode or 0, st.st_mtime
                if stat.S_ISDIR(mode):
                    if depth == SWEEP_DEPTH:
                        continue
                    if depth + 1 == SWEEP_DEPTH and since is not None and (mtime or 0) < since:
                        continue  # a day directory not changed lately
                    subdirs.append(posixpath.join(path, name))
                elif (
                    stat.S_ISREG(mode)
                    and is_temporary(os.fsdecode(name))
                    and mtime is not None
                    and mtime < cutoff
                ):
                    doomed.append(posixpath.join(path, name))
        # the listing's attributes are lstat's on OpenSSH; a server that follows links
        # there would show a link as its target: look again, without following
        again = conn.lstat_many(subdirs + doomed)
        dir_st, file_st = again[: len(subdirs)], again[len(subdirs) :]
        subdirs = [p for p, st in zip(subdirs, dir_st, strict=True) if _is(st, stat.S_ISDIR)]
        doomed = [p for p, st in zip(doomed, file_st, strict=True) if _is(st, stat.S_ISREG)]
        removed, errors = conn.remove_many(doomed)
        for exc in errors:
            log.warning("temporary file not removed: %s", exc)
        for path in doomed:
            log.debug("removed temporary file %s", q(os.fsdecode(path)))
        return removed, subdirs

    # remote SHA1 ------------------------------------------------------------------------
    def _remote_sha1(
        self, conn: _Connection, path: bytes, st: paramiko.SFTPAttributes | None = None
    ) -> str:
        """``st``: the file's lstat, if just taken."""
        regular = st if _is(st, stat.S_ISREG) else None
        # a small file is cheaper to read back than to ask sha1sum for
        if st is not None and (st.st_size or 0) <= READBACK_MAX:
            return self._read_back_sha1(conn, path, regular)
        if self.sha1_method != "read-back":
            digest = self._sha1sum(conn, path)
            if digest is not None:
                if self.sha1_method is None:
                    self.sha1_method = "sha1sum"
                    self._say_once(
                        "sha1sum", "%s: SHA1 computed remotely by sha1sum", self.where, level=20
                    )
                return digest
            self.sha1_method = "read-back"
            self._say_once(
                "read-back",
                "%s does not run sha1sum for us (SFTP-only account?); SHA1 by reading "
                "each file back, which doubles the traffic",
                self.where,
            )
        return self._read_back_sha1(conn, path, regular)

    def _sha1sum(self, conn: _Connection, path: bytes) -> str | None:
        """SHA1 by ``sha1sum`` on the server; None when the server will not run it.

        The connection keeps one exec channel for this, started at its first file: a
        channel per file cost a round trip to open it, one to start the command and the
        user's shell start-up each time (about 85 ms of sshd's CPU on the benchmark host,
        whose ``.bashrc`` initialises pyenv), more than hashing a 49 MB file."""
        hasher: _Hasher | None = conn.hasher
        if hasher is None:
            hasher = _Hasher.start(conn)
            if hasher is None:
                return None
            conn.hasher = hasher
        try:
            digest = hasher.sha1(path)
        except RemoteError:
            # a whole answer (sha1sum failed for this file) leaves the helper usable
            if hasher.ended:
                conn.hasher = None
            raise
        except BaseException:
            # whatever it had half-said is not to be read as the next file's answer
            conn.hasher = None
            hasher.close()
            raise
        if digest is None:
            conn.hasher = None
        return digest

    def _read_back_sha1(
        self,
        conn: _Connection,
        path: bytes,
        st: paramiko.SFTPAttributes | None = None,
        handle: bytes | None = None,
    ) -> str:
        """SHA1 by reading the file back with pipelined reads, the close sent behind the
        last one. ``st``: its attributes, if just taken (a regular file); ``handle``: the
        file opened for reading, if it already is."""
        if st is None:
            st = conn.lstat(path, follow=True)
            if st is None:
                raise RemoteError(SFTP_NO_SUCH_FILE, "vanished while being checksummed", path)
        size = st.st_size or 0
        if handle is None:
            handle = conn.open(path, SFTP_FLAG_READ)
        digest = hashlib.sha1()  # noqa: S324 - the catalog's key, not a security measure
        req = conn.request_size
        window = max(1, MAX_IN_FLIGHT // req)
        pending: deque[tuple[int, int, int]] = deque()  # (offset, length, request)
        next_offset = 0
        closing: int | None = None  # the current handle's close, once sent
        closed: list[int] = []  # the closes of handles given up after a short read
        try:
            while next_offset < size or pending:
                while next_offset < size and len(pending) < window:
                    length = min(req, size - next_offset)
                    num = conn.send(CMD_READ, handle, int64(next_offset), length)
                    pending.append((next_offset, length, num))
                    next_offset += length
                if next_offset >= size and closing is None:
                    closing = conn.send(CMD_CLOSE, handle)
                offset, length, num = pending.popleft()
                while length:
                    t, msg = conn.reply(num)
                    if t == CMD_STATUS:
                        code = msg.get_int()
                        text = "shorter than its size" if code == SFTP_EOF else msg.get_text()
                        raise RemoteError(code, text, path)
                    if t != CMD_DATA:
                        raise paramiko.SFTPError(f"expected data, got reply type {t}")
                    data = msg.get_binary()
                    if not data:
                        raise RemoteError(SFTP_FAILURE, "empty read", path)
                    digest.update(data)
                    offset, length = offset + len(data), length - len(data)
                    if length:
                        # a short read (allowed by the protocol): fetch the rest first,
                        # the requests already in flight come after it
                        if closing is not None:
                            # too late for this handle: the rest through a new one
                            closed.append(closing)
                            closing = None
                            handle = conn.open(path, SFTP_FLAG_READ)
                        num = conn.send(CMD_READ, handle, int64(offset), length)
            if closing is None:
                closing = conn.send(CMD_CLOSE, handle)
        except BaseException as exc:
            conn.ignore([num for _, _, num in pending] + closed)
            if closing is None:
                self._tidy(conn, exc, lambda: conn.close_handle(handle, path))
            else:
                conn.ignore([closing])
            raise
        for num in [*closed, closing]:
            conn.status(num, path)
        return digest.hexdigest()

    def _say_once(self, key: str, fmt: str, *args: object, level: int = logging.WARNING) -> None:
        with self._lock:
            if key in self._said:
                return
            self._said.add(key)
        log.log(level, fmt, *args)


class _Hasher:
    """``sha1sum`` on the server, one process per file, behind one exec channel.

    ``xargs -0`` reads NUL-terminated paths from the channel and runs, for each at once,
    ``sha1sum -- PATH`` with its messages joined to its output, then prints a line with a
    token of this channel and sha1sum's exit status, which ends that file's answer. Names
    reach no shell: xargs hands each to ``sh -c`` as ``$1``, quoted there. The token is
    random, so no file name or message can end an answer early."""

    def __init__(self, chan: paramiko.Channel, token: bytes) -> None:
        self.chan = chan
        self.token = token
        self.end = re.compile(rb"(?:^|\n)" + re.escape(token) + rb" (\d+)\n")
        self.ended = False

    @classmethod
    def start(cls, conn: _Connection) -> _Hasher | None:
        """A hasher on a new exec channel; None when the server refuses sessions or exec."""
        token = secrets.token_hex(8)
        script = f'sha1sum -- "$1" 2>&1; echo "{token} $?"'
        command = f"xargs -0 -n 1 sh -c {shlex.quote(script)} rt-sha1"
        try:
            chan = conn.transport.open_session(timeout=conn.op_timeout)
        except paramiko.ChannelException:
            return None  # sessions refused: SFTP is all we get
        try:
            chan.settimeout(conn.op_timeout)
            chan.exec_command(command)
        except paramiko.SSHException:
            chan.close()
            if conn.transport.is_active():
                return None  # exec refused by the server's configuration
            raise
        except BaseException:
            chan.close()
            raise
        return cls(chan, token.encode())

    def close(self) -> None:
        self.ended = True
        with suppress(Exception):
            self.chan.close()

    def sha1(self, path: bytes) -> str | None:
        self.chan.sendall(path + b"\0")
        out = bytearray()
        while (m := self.end.search(out)) is None:
            chunk = self.chan.recv(1 << 16)
            if not chunk:
                return self._ended(path, bytes(out))
            out += chunk
        if m.end() != len(out):
            raise paramiko.SFTPError("sha1sum helper said more than one answer")
        said, status = bytes(out[: m.start()]), int(m.group(1))
        digest = _SHA1SUM_RE.match(said)
        if status == 0 and digest:
            return digest.group(1).decode()
        if status == 1 and b"No such file" in said:
            raise RemoteError(SFTP_NO_SUCH_FILE, "vanished while being checksummed", path)
        if status in (126, 127) or not said.strip():
            return None  # no sha1sum there (sha1sum never fails without a word)
        why = said.decode(errors="replace").strip()
        raise RemoteError(SFTP_FAILURE, f"sha1sum failed: {why}", path)

    def _ended(self, path: bytes, said: bytes) -> str | None:
        """The channel closed before an answer: no xargs, a forced command, or a lost
        connection."""
        err = b""
        while self.chan.recv_stderr_ready():
            err += self.chan.recv_stderr(1 << 16)
        self.chan.status_event.wait(self.chan.gettimeout())
        status = self.chan.exit_status if self.chan.exit_status_ready() else -1
        self.close()
        if status != -1 and (status in (126, 127) or not err):
            # no xargs or sh there, or a forced command ran instead of ours (OpenSSH's
            # internal-sftp says "This service allows sftp connections only." on stdout)
            return None
        why = (err or said).decode(errors="replace").strip() or (
            f"exit status {status}" if status != -1 else "no exit status"
        )
        raise RemoteError(SFTP_FAILURE, f"sha1sum failed: {why}", path)


class _HardlinkGone(Exception):
    """Hard links, which worked here, are refused now, and the temporary file went with
    the removal pipelined behind the link: the file is to be written again."""


def _removed(conn: _Connection, removing: int, tmp: bytes) -> bool:
    """Whether the removal of ``tmp`` sent as ``removing`` left it gone."""
    try:
        conn.status(removing, tmp)
    except RemoteError as exc:
        return bool(exc.code == SFTP_NO_SUCH_FILE)
    return True


def _is(st: paramiko.SFTPAttributes | None, kind: Callable[[int], bool]) -> bool:
    return st is not None and kind(st.st_mode or 0)


def _prefer(preferred: tuple[str, ...], available: tuple[str, ...]) -> tuple[str, ...]:
    first = tuple(x for x in preferred if x in available)
    return first + tuple(x for x in available if x not in first)


def _describe(exc: BaseException, what: str = "") -> str:
    """One line for an error message; the path is left out when ``what`` names it."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, EOFError):
        return "connection closed by the server"
    if isinstance(exc, RemoteError) and exc.path and what.endswith(q(os.fsdecode(exc.path))):
        return str(exc.strerror)
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and not isinstance(exc, RemoteError) and exc.strerror:
        text = f"{q(exc.filename)}: {exc.strerror}" if exc.filename else exc.strerror
    return text

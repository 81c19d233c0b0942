"""One SFTP session, spoken at the level of requests and replies (paramiko underneath).

The SFTP requests are composed here rather than through ``SFTPFile``: paramiko's
pipelined writes discard the server's replies to the last requests (a full disk would go
unnoticed until the checksum), its generic errors lose the status code the destination
needs to tell "exists" from "unsupported", and it cannot send the OpenSSH extensions at all.

``_Connection`` wraps one SSH connection and its SFTP channel: requests are sent at once
and their replies collected later, in any order, so that writes and reads can be
pipelined; a reply with an error status becomes a ``RemoteError`` that keeps the SFTP
status code. ``is_connection_lost`` tells a connection that is gone or stuck from a
server that answered "no".
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar

import paramiko
from paramiko.sftp import (
    CMD_ATTRS,
    CMD_CLOSE,
    CMD_EXTENDED,
    CMD_EXTENDED_REPLY,
    CMD_HANDLE,
    CMD_INIT,
    CMD_LSTAT,
    CMD_MKDIR,
    CMD_NAME,
    CMD_OPEN,
    CMD_OPENDIR,
    CMD_READDIR,
    CMD_REMOVE,
    CMD_SETSTAT,
    CMD_STAT,
    CMD_STATUS,
    CMD_VERSION,
    CMD_WRITE,
    SFTP_CONNECTION_LOST,
    SFTP_DESC,
    SFTP_EOF,
    SFTP_NO_CONNECTION,
    SFTP_NO_SUCH_FILE,
    SFTP_OK,
    SFTP_OP_UNSUPPORTED,
    SFTP_PERMISSION_DENIED,
)

from rawtransfer.destination.ssh_target import HostKeyRefused
from rawtransfer.names import q

# OpenSSH extensions, used only where the server announces them
HARDLINK = "hardlink@openssh.com"
FSYNC = "fsync@openssh.com"
LIMITS = "limits@openssh.com"
STATVFS = "statvfs@openssh.com"

# READDIR requests in flight per open directory (see _Connection.listdirs)
READDIR_AHEAD = 4

# one directory's entries: (name, attributes)
Listing = list[tuple[bytes, paramiko.SFTPAttributes]]

# errno values that mean the path to the server is gone, not that it said no
_LOST_ERRNOS = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.EPIPE,
        errno.ETIMEDOUT,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ENOTCONN,
        errno.ESHUTDOWN,
    }
)


class RemoteError(OSError):
    """The SFTP server answered a request with an error status."""

    _ERRNO: ClassVar[dict[int, int]] = {
        SFTP_NO_SUCH_FILE: errno.ENOENT,
        SFTP_PERMISSION_DENIED: errno.EACCES,
        SFTP_OP_UNSUPPORTED: errno.EOPNOTSUPP,
    }

    def __init__(self, code: int, text: str, path: bytes | None = None) -> None:
        desc = SFTP_DESC[code] if 0 <= code < len(SFTP_DESC) else f"status {code}"
        super().__init__(self._ERRNO.get(code, errno.EIO), text or desc)
        self.code = code
        self.path = path

    def __str__(self) -> str:
        where = f"{q(os.fsdecode(self.path))}: " if self.path else ""
        return f"{where}{self.strerror}"


def is_connection_lost(exc: BaseException) -> bool:
    """True when ``exc`` means the connection is gone or stuck (drop it, try again later).

    False when the server answered (an SFTP error status, a refused channel or login) or
    the problem is ours: those do not get better by reconnecting.
    """
    if isinstance(
        exc,
        HostKeyRefused
        | paramiko.AuthenticationException
        | paramiko.BadHostKeyException
        | paramiko.ChannelException,
    ):
        return False
    if isinstance(exc, RemoteError):
        return exc.code in (SFTP_NO_CONNECTION, SFTP_CONNECTION_LOST)
    if isinstance(exc, socket.gaierror):
        # "temporary failure in name resolution": the resolver is away, not the name
        return exc.errno == socket.EAI_AGAIN
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        return True  # every address refused or unreachable
    if isinstance(exc, EOFError | TimeoutError | ConnectionError):
        return True
    if isinstance(exc, paramiko.SSHException | paramiko.SFTPError):
        # transport failures ("Server connection dropped", "SSH session not active") and
        # SFTP protocol confusion; either way the stream cannot be trusted any more
        return True
    if isinstance(exc, OSError):
        # paramiko's channels say "Socket is closed", without an errno, once the
        # transport has died under them
        return exc.errno in _LOST_ERRNOS or (exc.errno is None and "closed" in str(exc))
    return False


# --- one connection ---------------------------------------------------------------------


class _SFTPClient(paramiko.SFTPClient):  # type: ignore[misc]
    """paramiko's client, keeping the extensions the server announces (paramiko drops
    them), so that hardlink, fsync and limits are used only where they exist."""

    extensions: dict[str, bytes]

    def _send_version(self) -> int:
        msg = paramiko.Message()
        msg.add_int(3)
        self._send_packet(CMD_INIT, msg)
        t, data = self._read_packet()
        if t != CMD_VERSION:
            raise paramiko.SFTPError("incompatible SFTP protocol")
        reply = paramiko.Message(data)
        version: int = reply.get_int()
        self.extensions = {}
        while reply.get_remainder():
            name = reply.get_text()
            self.extensions[name] = reply.get_binary()
        return version

    def _write_all(self, out: bytes) -> None:
        # paramiko's slices the rest of a request after each 32 KiB SSH packet the
        # channel takes: a 255 KiB write was copied 4 times over (a fifth of our CPU
        # for a large file); a memoryview slices without copying
        view = memoryview(out)
        while view:
            n = self.sock.send(view)
            if n <= 0:
                raise EOFError()
            view = view[n:]

    def send_write(self, replies: _Replies, handle: bytes, offset: int, data: bytes) -> int:
        """A write request, composed in one piece: paramiko's message buffer would copy
        ``data`` three times."""
        with self._lock:
            num: int = self.request_number
            self._expecting[num] = replies
            self.request_number += 1
        head = _WRITE_HEAD.pack(len(handle) + len(data) + _WRITE_FIXED, CMD_WRITE, num, len(handle))
        self._write_all(b"".join((head, handle, _WRITE_TAIL.pack(offset, len(data)), data)))
        return num


# an SFTP write request: length, type, request id, the handle (a string), then the
# offset and the data's length, the data
_WRITE_HEAD = struct.Struct(">IBII")
_WRITE_TAIL = struct.Struct(">QI")
# the bytes of the request that the length counts, less the handle and the data
_WRITE_FIXED = 1 + 4 + 4 + 8 + 4


class _Replies:
    """Collects the replies to requests sent here; paramiko's reader hands each to
    ``_async_response`` (the hook its own files use), in whatever order they come."""

    def __init__(self) -> None:
        self.got: dict[int, tuple[int, paramiko.Message]] = {}
        self.ignored: set[int] = set()

    def _async_response(self, t: int, msg: paramiko.Message, num: int) -> None:
        if num in self.ignored:
            self.ignored.discard(num)
        else:
            self.got[num] = (t, msg)


@dataclass(eq=False)
class _Connection:
    client: paramiko.SSHClient
    transport: paramiko.Transport
    sock: socket.socket
    sftp: _SFTPClient
    request_size: int
    op_timeout: float
    replies: _Replies = field(default_factory=_Replies)
    broken: bool = False
    # the remote sha1sum's exec channel (sftp._Hasher), once started
    hasher: Any = None
    # directories seen as real directories on this connection (a publish there opens its
    # temporary in the same round trip as it looks at them again)
    known_dirs: set[bytes] = field(default_factory=set)
    # the last file this connection published, and its size: its verify opens it in the
    # same round trip as it looks at it
    published: tuple[bytes, int] | None = None

    @property
    def channel(self) -> paramiko.Channel:
        return self.sftp.get_channel()

    def alive(self) -> bool:
        return not self.broken and bool(self.transport.is_active())

    def has(self, extension: str) -> bool:
        return extension in self.sftp.extensions

    def close(self) -> None:
        self.broken = True
        try:
            self.client.close()
        finally:
            self.sock.close()

    # raw requests: send now, collect the reply later ------------------------------------
    def send(self, t: int, *args: object) -> int:
        num: int = self.sftp._async_request(self.replies, t, *args)
        return num

    def send_write(self, handle: bytes, offset: int, data: bytes) -> int:
        return self.sftp.send_write(self.replies, handle, offset, data)

    def reply(self, num: int) -> tuple[int, paramiko.Message]:
        got = self.replies.got
        while num not in got:
            self.sftp._read_response()
        return got.pop(num)

    def ignore(self, nums: list[int]) -> None:
        """Replies we no longer care about (after a failure): drop them as they come."""
        for num in nums:
            if self.replies.got.pop(num, None) is None:
                self.replies.ignored.add(num)

    def status(self, num: int, path: bytes | None = None) -> None:
        t, msg = self.reply(num)
        if t != CMD_STATUS:
            raise paramiko.SFTPError(f"expected a status reply, got type {t}")
        code = msg.get_int()
        if code != SFTP_OK:
            raise RemoteError(code, msg.get_text(), path)

    def expect(self, num: int, kind: int, path: bytes | None = None) -> paramiko.Message:
        t, msg = self.reply(num)
        if t == CMD_STATUS:
            code = msg.get_int()
            raise RemoteError(code, msg.get_text(), path)
        if t != kind:
            raise paramiko.SFTPError(f"expected reply type {kind}, got {t}")
        return msg

    # the few operations the destination needs -------------------------------------------
    def lstat(self, path: bytes, follow: bool = False) -> paramiko.SFTPAttributes | None:
        cmd = CMD_STAT if follow else CMD_LSTAT
        try:
            msg = self.expect(self.send(cmd, path), CMD_ATTRS, path)
        except RemoteError as exc:
            if exc.code == SFTP_NO_SUCH_FILE:
                return None
            raise
        return paramiko.SFTPAttributes._from_msg(msg)

    def lstat_many(self, paths: list[bytes]) -> list[paramiko.SFTPAttributes | None]:
        """``lstat`` of several paths in one round trip; None for each that is missing."""
        return self.lstats(paths, self.send_lstats(paths))

    def send_lstats(self, paths: list[bytes]) -> list[int]:
        """Ask for the ``lstat`` of several paths; collect the answers with ``lstats``."""
        return [self.send(CMD_LSTAT, path) for path in paths]

    def lstats(self, paths: list[bytes], nums: list[int]) -> list[paramiko.SFTPAttributes | None]:
        out: list[paramiko.SFTPAttributes | None] = []
        for i, (path, num) in enumerate(zip(paths, nums, strict=True)):
            try:
                msg = self.expect(num, CMD_ATTRS, path)
            except RemoteError as exc:
                if exc.code == SFTP_NO_SUCH_FILE:
                    out.append(None)
                    continue
                self.ignore(nums[i + 1 :])
                raise
            except BaseException:
                self.ignore(nums[i + 1 :])
                raise
            out.append(paramiko.SFTPAttributes._from_msg(msg))
        return out

    def listdirs(self, paths: list[bytes]) -> dict[bytes, Listing | RemoteError]:
        """The entries of several directories (without ``.`` and ``..``), names as bytes,
        with the attributes the server sent (OpenSSH's sftp-server reads them by lstat);
        for a directory the server refused, its error.

        Pipelined: every directory is opened at once, and each round asks every open one
        for its next ``READDIR_AHEAD`` batches (OpenSSH sends 100 names a batch), so that
        a large tree over a long link costs a few round trips per level, not a few per
        directory. Batches may come in any order; a listing is a set."""
        out: dict[bytes, Listing | RemoteError] = {}
        handles: dict[bytes, bytes] = {}
        opened = [(path, self.send(CMD_OPENDIR, path)) for path in paths]
        for i, (path, num) in enumerate(opened):
            try:
                handles[path] = self.expect(num, CMD_HANDLE, path).get_binary()
                out[path] = []
            except RemoteError as exc:
                out[path] = exc
            except BaseException:
                self.ignore([n for _, n in opened[i + 1 :]])
                raise
        active = dict(handles)
        while active:
            asked = [
                (path, self.send(CMD_READDIR, handle))
                for path, handle in active.items()
                for _ in range(READDIR_AHEAD)
            ]
            for i, (path, num) in enumerate(asked):
                try:
                    t, msg = self.reply(num)
                except BaseException:
                    self.ignore([n for _, n in asked[i + 1 :]])
                    raise
                listing = out[path]
                if isinstance(listing, RemoteError):
                    continue  # failed at an earlier batch of this round
                if t == CMD_STATUS:
                    code = msg.get_int()
                    if code != SFTP_EOF:
                        out[path] = RemoteError(code, msg.get_text(), path)
                    active.pop(path, None)
                    continue
                if t != CMD_NAME:
                    self.ignore([n for _, n in asked[i + 1 :]])
                    raise paramiko.SFTPError(f"expected names, got reply type {t}")
                for _ in range(msg.get_int()):
                    name = msg.get_binary()
                    msg.get_binary()  # the "ls -l" line, meant for people
                    attrs = paramiko.SFTPAttributes._from_msg(msg)
                    if name not in (b".", b".."):
                        listing.append((name, attrs))
        closing = [(path, self.send(CMD_CLOSE, handle)) for path, handle in handles.items()]
        for path, num in closing:
            self.status(num, path)
        return out

    def remove_many(self, paths: list[bytes]) -> tuple[int, list[RemoteError]]:
        """Remove several files in one round trip: how many were removed (those already
        gone are not counted), and the errors of those that could not be."""
        sent = [self.send(CMD_REMOVE, path) for path in paths]
        removed = 0
        errors: list[RemoteError] = []
        for i, (path, num) in enumerate(zip(paths, sent, strict=True)):
            try:
                self.status(num, path)
                removed += 1
            except RemoteError as exc:
                if exc.code != SFTP_NO_SUCH_FILE:
                    errors.append(exc)
            except BaseException:
                self.ignore(sent[i + 1 :])
                raise
        return removed, errors

    def free_bytes(self, path: bytes) -> int | None:
        """Bytes free for us on the filesystem of ``path`` (``statvfs@openssh.com``);
        None where the server does not offer it."""
        if not self.has(STATVFS):
            return None
        msg = self.expect(self.send(CMD_EXTENDED, STATVFS, path), CMD_EXTENDED_REPLY, path)
        bsize, frsize, _blocks, _bfree, bavail = (msg.get_int64() for _ in range(5))
        free: int = bavail * (frsize or bsize)
        return free

    def open(self, path: bytes, flags: int, mode: int | None = None) -> bytes:
        return self.handle(self.send_open(path, flags, mode), path)

    def send_open(self, path: bytes, flags: int, mode: int | None = None) -> int:
        attrs = paramiko.SFTPAttributes()
        if mode is not None:
            attrs.st_mode = mode
        return self.send(CMD_OPEN, path, flags, attrs)

    def handle(self, num: int, path: bytes) -> bytes:
        """The handle an open request was answered with."""
        handle: bytes = self.expect(num, CMD_HANDLE, path).get_binary()
        return handle

    def close_handle(self, handle: bytes, path: bytes) -> None:
        self.status(self.send(CMD_CLOSE, handle), path)

    def remove(self, path: bytes) -> bool:
        """Remove a file; False if it was not there."""
        try:
            self.status(self.send(CMD_REMOVE, path), path)
        except RemoteError as exc:
            if exc.code != SFTP_NO_SUCH_FILE:
                raise
            return False
        return True

    def mkdir(self, path: bytes, mode: int) -> None:
        attrs = paramiko.SFTPAttributes()
        attrs.st_mode = mode
        self.status(self.send(CMD_MKDIR, path, attrs), path)

    def chmod(self, path: bytes, mode: int) -> None:
        attrs = paramiko.SFTPAttributes()
        attrs.st_mode = mode
        self.status(self.send(CMD_SETSTAT, path, attrs), path)

"""The one table of error kinds (errors.classify), pinned, and the back-off curve."""

from __future__ import annotations

import errno
import socket
import sqlite3

import paramiko
import psycopg
import psycopg_pool
import pytest

from rawtransfer import errors
from rawtransfer.errors import Kind, classify
from rawtransfer.workers import BACKOFF_CAP, backoff

T, R, F, Q, D = Kind.TRANSIENT, Kind.REFUSED, Kind.FAIL, Kind.QUARANTINE, Kind.DEFECT
TABLE: list[tuple[BaseException, Kind]] = [
    (errors.DestinationUnavailable("down"), T),
    (errors.CatalogUnavailable("down"), T),
    (errors.Interrupted("stop"), T),
    (errors.FileRejected("corrupt"), Q),
    (errors.FileIncomplete("truncated"), Q),
    (errors.PackError("fpack"), F),
    (errors.DestinationConflict("exists"), F),
    (errors.ConfigError("bad"), R),
    (TimeoutError(), T),
    (socket.timeout(), T),  # noqa: UP041 - the old alias must classify too
    (ConnectionResetError(), T),
    (BrokenPipeError(), T),
    (EOFError(), T),
    (OSError(errno.ENOSPC, "No space left on device"), T),
    (OSError(errno.ESTALE, "Stale file handle"), T),
    (OSError(errno.EIO, "I/O error"), T),
    (OSError(errno.EACCES, "Permission denied"), R),
    (FileNotFoundError(errno.ENOENT, "gone"), D),
    (paramiko.SSHException("Error reading SSH protocol banner"), T),
    (paramiko.ssh_exception.NoValidConnectionsError({("127.0.0.1", 22): OSError()}), T),
    (paramiko.AuthenticationException("denied"), R),
    (
        paramiko.BadHostKeyException(
            "h", paramiko.RSAKey.generate(1024), paramiko.RSAKey.generate(1024)
        ),
        R,
    ),
    (psycopg.OperationalError("server closed the connection"), T),
    (psycopg_pool.PoolTimeout("no connection"), T),
    (psycopg.errors.UndefinedTable("no table"), D),
    (ValueError("bug"), D),
    (KeyError("bug"), D),
    (MemoryError(), D),
    (OSError(errno.EROFS, "Read-only file system"), R),
    (PermissionError(errno.EPERM, "Operation not permitted"), R),
    (psycopg.errors.InsufficientPrivilege("permission denied for table"), R),
    (sqlite3.OperationalError("attempt to write a readonly database"), R),
    (sqlite3.OperationalError("database is locked"), T),
    (errors.DestinationRefused("host key"), R),
    (errors.CatalogRefused("no rights"), R),
    (errors.InternalError("bug"), D),
    (errors.SourceUnreadable("EACCES"), F),
    (errors.FrameTooLarge("60000 x 60000"), Q),
    (errors.SpoolUnavailable("full"), T),
]


@pytest.mark.parametrize(
    ("exc", "kind"),
    TABLE,
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_classifier(exc: BaseException, kind: Kind) -> None:
    assert classify(exc) == kind


def test_backoff_grows_with_jitter_and_a_cap() -> None:
    samples = [[backoff(a) for _ in range(200)] for a in range(12)]
    means = [sum(s) / len(s) for s in samples]
    assert means[0] < means[3] < means[6]
    assert max(max(s) for s in samples) <= BACKOFF_CAP
    assert len({round(x, 6) for x in samples[4]}) > 100  # jittered, not a fixed delay

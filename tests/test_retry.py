"""The transient/permanent classifier, pinned by a table, and the back-off curve."""

from __future__ import annotations

import errno
import socket

import paramiko
import psycopg
import psycopg_pool
import pytest

from rawtransfer import errors
from rawtransfer.retry import is_transient
from rawtransfer.workers import BACKOFF_CAP, backoff

TABLE: list[tuple[BaseException, bool]] = [
    (errors.DestinationUnavailable("down"), True),
    (errors.CatalogUnavailable("down"), True),
    (errors.Interrupted("stop"), True),
    (errors.FileRejected("corrupt"), False),
    (errors.FileIncomplete("truncated"), False),
    (errors.PackError("fpack"), False),
    (errors.DestinationConflict("exists"), False),
    (errors.ConfigError("bad"), False),
    (TimeoutError(), True),
    (socket.timeout(), True),  # noqa: UP041 - the old alias must classify too
    (ConnectionResetError(), True),
    (BrokenPipeError(), True),
    (EOFError(), True),
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.ESTALE, "Stale file handle"), True),
    (OSError(errno.EIO, "I/O error"), True),
    (OSError(errno.EACCES, "Permission denied"), False),
    (FileNotFoundError(errno.ENOENT, "gone"), False),
    (paramiko.SSHException("Error reading SSH protocol banner"), True),
    (paramiko.ssh_exception.NoValidConnectionsError({("127.0.0.1", 22): OSError()}), True),
    (paramiko.AuthenticationException("denied"), False),
    (
        paramiko.BadHostKeyException(
            "h", paramiko.RSAKey.generate(1024), paramiko.RSAKey.generate(1024)
        ),
        False,
    ),
    (psycopg.OperationalError("server closed the connection"), True),
    (psycopg_pool.PoolTimeout("no connection"), True),
    (psycopg.errors.UndefinedTable("no table"), False),
    (ValueError("bug"), False),
    (KeyError("bug"), False),
]


@pytest.mark.parametrize(
    ("exc", "transient"),
    TABLE,
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_classifier(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_backoff_grows_with_jitter_and_a_cap() -> None:
    samples = [[backoff(a) for _ in range(200)] for a in range(12)]
    means = [sum(s) / len(s) for s in samples]
    assert means[0] < means[3] < means[6]
    assert max(max(s) for s in samples) <= BACKOFF_CAP
    assert len({round(x, 6) for x in samples[4]}) > 100  # jittered, not a fixed delay

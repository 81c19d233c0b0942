"""Which failures are worth retrying: one small pure classifier, pinned by a table test.

Transient: the network, the destination or the catalog went away or timed out, a disk
filled up (it will be freed). Permanent: the file is bad, the configuration is wrong
(host key, password), or the code is wrong. Only transient failures are retried, with
exponential back-off and jitter (workers.backoff); permanent ones end in a recorded
state with their reason.
"""

from __future__ import annotations

import errno
import socket

from rawtransfer.errors import RawTransferError

TRANSIENT_ERRNOS = frozenset(
    {
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EPIPE,
        errno.ESTALE,  # NFS handle went stale across a server restart
        errno.ENOSPC,  # a full disk is freed by a person; the file must wait, not fail
        errno.EDQUOT,
        errno.EAGAIN,
        errno.EINTR,
        errno.EIO,  # network filesystems report outages as EIO
    }
)

# Exception class names (module-qualified) from the libraries that mean "gone for now".
# Matched by name so this module needs neither paramiko nor psycopg to be importable.
TRANSIENT_NAMES = frozenset(
    {
        "paramiko.ssh_exception.SSHException",
        "paramiko.ssh_exception.NoValidConnectionsError",
        "paramiko.ssh_exception.ChannelException",
        "psycopg.OperationalError",
        "psycopg_pool.PoolTimeout",
        "psycopg_pool.TooManyRequests",
    }
)
PERMANENT_NAMES = frozenset(
    {
        "paramiko.ssh_exception.AuthenticationException",
        "paramiko.ssh_exception.BadAuthenticationType",
        "paramiko.ssh_exception.PasswordRequiredException",
        "paramiko.ssh_exception.BadHostKeyException",
    }
)


def _qualnames(exc: BaseException) -> set[str]:
    return {f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__}


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, RawTransferError):
        return exc.retryable
    names = _qualnames(exc)
    if names & PERMANENT_NAMES:
        return False
    if names & TRANSIENT_NAMES:
        return True
    if isinstance(exc, TimeoutError | socket.timeout | ConnectionError | EOFError):
        return True
    if isinstance(exc, OSError):
        return exc.errno in TRANSIENT_ERRNOS
    return False

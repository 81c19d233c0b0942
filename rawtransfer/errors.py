"""The one exception tree of rawtransfer, and the one table of what each error means.

Every error is of one ``Kind``, and the kind alone decides what happens:

==============  ==========================================  ================================
kind            examples                                    what happens
==============  ==========================================  ================================
QUARANTINE      corrupt, truncated, not FITS, no date,      the file is quarantined with its
                declares more than --max-frame-bytes        reason and alerted; taken again
                                                            only when the file changes
FAIL            a different file under the name at the      failed with its reason, alerted;
                destination, a source file we may not read  retried when its cause can have
                                                            gone, or when an operator asks
TRANSIENT       network down or slow, server restarting,    the file waits (back-off), the
                a full disk or spool                        queue pauses, alert if it lasts
REFUSED         host key, authentication, permission        as TRANSIENT, but alerted at
                denied or read-only at the destination or   once; at start: exit 3
                catalog: a person must act
DEFECT          anything else: a bug of ours                failed as "internal error" with
                                                            one traceback, alerted, never
                                                            retried in a loop
==============  ==========================================  ================================

(A file that *changes* while it is processed is not an error: it is looked at again.)

Our own exceptions carry their kind. Exceptions of the libraries are judged by
``classify``; each backend feeds its exceptions through it (``destination_error``,
``catalog_error``) and raises ours, so that one table answers for all of them.

A class's docstring is its message prefix; ``exit_code`` says how the command line ends
when such an error stops the whole run.
"""

from __future__ import annotations

import errno
import socket
from enum import StrEnum

EXIT_OK = 0
EXIT_FILES_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class Kind(StrEnum):
    QUARANTINE = "quarantine"
    FAIL = "fail"
    TRANSIENT = "transient"
    REFUSED = "refused"
    DEFECT = "defect"


class RawTransferError(Exception):
    """rawtransfer error"""

    exit_code = EXIT_USAGE
    kind = Kind.DEFECT

    def __init__(self, detail: str = "") -> None:
        self.detail = detail
        super().__init__(detail)

    def __str__(self) -> str:
        head = (self.__doc__ or type(self).__name__).strip().splitlines()[0]
        return f"{head}: {self.detail}" if self.detail else head


class ConfigError(RawTransferError):
    """configuration error"""

    exit_code = EXIT_USAGE
    kind = Kind.REFUSED


class FileRejected(RawTransferError):
    """file rejected"""

    exit_code = EXIT_FILES_FAILED
    kind = Kind.QUARANTINE
    # the catalog state a rejection ends in
    state = "quarantined"


class FileIncomplete(FileRejected):
    """file incomplete"""


class FileFailed(RawTransferError):
    """file failed"""

    exit_code = EXIT_FILES_FAILED
    kind = Kind.FAIL
    state = "failed"


class PackError(FileFailed):
    """packing failed"""


class DestinationConflict(FileFailed):
    """destination holds a different file under the same name"""


class VerifyError(FileFailed):
    """verification at the destination failed"""


class ResourceUnavailable(RawTransferError):
    """resource unavailable"""

    exit_code = EXIT_UNREACHABLE
    kind = Kind.TRANSIENT


class DestinationUnavailable(ResourceUnavailable):
    """destination unavailable"""


class CatalogUnavailable(ResourceUnavailable):
    """catalog unavailable"""


class DestinationRefused(DestinationUnavailable):
    """destination refuses us"""

    kind = Kind.REFUSED


class CatalogRefused(CatalogUnavailable):
    """catalog refuses us"""

    kind = Kind.REFUSED


class Interrupted(RawTransferError):
    """interrupted by shutdown"""

    kind = Kind.TRANSIENT


class DestinationLink(FileFailed):
    """destination path goes through a symbolic link"""


class SourceUnreadable(FileFailed):
    """the source file cannot be read"""


class FrameTooLarge(FileRejected):
    """frame too large"""


class InternalError(FileFailed):
    """internal error"""

    kind = Kind.DEFECT


class SpoolUnavailable(ResourceUnavailable):
    """packing spool unavailable"""


# --- the table for other libraries' exceptions -------------------------------------------

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
# Errors that will not go away until a person acts (rights, a read-only mount).
REFUSED_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})

# Exception class names (module-qualified) from the libraries, matched by name so that
# this module needs neither paramiko nor psycopg to be importable.
TRANSIENT_NAMES = frozenset(
    {
        "paramiko.ssh_exception.SSHException",
        "paramiko.ssh_exception.NoValidConnectionsError",
        "paramiko.ssh_exception.ChannelException",
        "psycopg.OperationalError",
        "psycopg_pool.PoolTimeout",
        "psycopg_pool.TooManyRequests",
        "sqlite3.OperationalError",
    }
)
REFUSED_NAMES = frozenset(
    {
        "paramiko.ssh_exception.AuthenticationException",
        "paramiko.ssh_exception.BadAuthenticationType",
        "paramiko.ssh_exception.PasswordRequiredException",
        "paramiko.ssh_exception.BadHostKeyException",
        "rawtransfer.destination.ssh_target.HostKeyRefused",
        "psycopg.errors.InsufficientPrivilege",
        "psycopg.errors.InvalidAuthorizationSpecification",
        "psycopg.errors.InvalidPassword",
    }
)
# SQLSTATE classes that mean "not allowed" (28: authorization, 42501: privilege): a
# psycopg OperationalError at connect carries them only as its sqlstate.
REFUSED_SQLSTATES = ("28", "42501")
# SQLite says it can't write as text only.
REFUSED_SQLITE_TEXT = ("readonly database", "unable to open database", "access permission")


def _qualnames(exc: BaseException) -> set[str]:
    return {f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__}


def classify(exc: BaseException) -> Kind:
    """The kind of any exception: ours carry it, the libraries' are judged here."""
    if isinstance(exc, RawTransferError):
        return exc.kind
    if isinstance(exc, MemoryError):
        return Kind.DEFECT
    names = _qualnames(exc)
    if names & REFUSED_NAMES:
        return Kind.REFUSED
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate.startswith(REFUSED_SQLSTATES):
        return Kind.REFUSED
    if "sqlite3.OperationalError" in names and any(t in str(exc) for t in REFUSED_SQLITE_TEXT):
        return Kind.REFUSED
    if names & TRANSIENT_NAMES:
        return Kind.TRANSIENT
    if isinstance(exc, TimeoutError | socket.timeout | ConnectionError | EOFError):
        return Kind.TRANSIENT
    if isinstance(exc, OSError):
        if exc.errno in REFUSED_ERRNOS:
            return Kind.REFUSED
        if exc.errno in TRANSIENT_ERRNOS:
            return Kind.TRANSIENT
    return Kind.DEFECT


def destination_error(message: str, exc: BaseException) -> DestinationUnavailable:
    """The destination's exception for a library error met while ``message``."""
    cls = DestinationRefused if classify(exc) == Kind.REFUSED else DestinationUnavailable
    return cls(message)


def catalog_error(message: str, exc: BaseException) -> CatalogUnavailable:
    """The catalog's exception for a library error met while ``message``."""
    cls = CatalogRefused if classify(exc) == Kind.REFUSED else CatalogUnavailable
    return cls(message)

"""The one exception tree of rawtransfer.

Three families matter to the code that catches them:

* ``FileRejected``: this file is bad (corrupt, truncated, unplaceable). Retrying will not
  help; the file is quarantined with the reason and never transferred or touched.
* ``FileFailed``: processing this file failed for a reason that is not the file's fault
  but will not fix itself (a conflicting copy at the destination, a refused float image).
* ``ResourceUnavailable``: the destination or the catalog is away. The file goes back on
  the queue; nothing is marked failed.

A class's docstring is its message prefix; ``exit_code`` says how the command line ends
when such an error stops the whole run.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FILES_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class RawTransferError(Exception):
    """rawtransfer error"""

    exit_code = EXIT_USAGE
    retryable = False

    def __init__(self, detail: str = "") -> None:
        self.detail = detail
        super().__init__(detail)

    def __str__(self) -> str:
        head = (self.__doc__ or type(self).__name__).strip().splitlines()[0]
        return f"{head}: {self.detail}" if self.detail else head


class ConfigError(RawTransferError):
    """configuration error"""

    exit_code = EXIT_USAGE


class FileRejected(RawTransferError):
    """file rejected"""

    exit_code = EXIT_FILES_FAILED
    # the catalog state a rejection ends in
    state = "quarantined"


class FileIncomplete(FileRejected):
    """file incomplete"""


class FileFailed(RawTransferError):
    """file failed"""

    exit_code = EXIT_FILES_FAILED
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
    retryable = True


class DestinationUnavailable(ResourceUnavailable):
    """destination unavailable"""


class CatalogUnavailable(ResourceUnavailable):
    """catalog unavailable"""


class Interrupted(RawTransferError):
    """interrupted by shutdown"""

    retryable = True


class DestinationLink(FileFailed):
    """destination path goes through a symbolic link"""


class SourceUnreadable(FileFailed):
    """the source file cannot be read"""


class FrameTooLarge(FileRejected):
    """frame too large"""


class InternalError(FileFailed):
    """internal error"""


class SpoolUnavailable(ResourceUnavailable):
    """packing spool unavailable"""

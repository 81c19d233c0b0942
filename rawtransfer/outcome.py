"""What happened to one file: the outcome of the pipeline, as the workers, the service and
the metrics read it (a module of its own, so that those import it without the pipeline)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


class Result(StrEnum):
    DONE = "done"
    ALREADY_DONE = "already done"
    DUPLICATE = "duplicate"
    QUARANTINED = "quarantined"
    FAILED = "failed"
    SKIPPED = "skipped"  # not a regular file, or vanished: nothing to do
    IGNORED = "ignored"  # never taken (empty, excluded): said once, at debug level
    WAIT = "wait"  # still being written: look again after ``delay``
    BUSY = "busy"  # the same content is in flight elsewhere: look again later
    RETRY = "retry"  # a resource is away: back on the queue
    CHANGED = "changed"  # the file changed while it was processed: look at it again


@dataclass(frozen=True)
class Outcome:
    result: Result
    path: Path
    reason: str = ""
    delay: float = 0.0
    raw_size: int = 0
    packed_size: int = 0
    dest: str = ""
    sha1: str = ""
    again: bool = False  # done, but the path now holds another version: look again

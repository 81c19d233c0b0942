"""deadlines: one thread that acts when a blocked call overruns its time.

A read that never returns (a hung NFS mount, a SIGSTOPped sshd or PostgreSQL backend)
blocks in C and takes no timeout: the caller gets its thread back only when another
thread acts for it, by killing the child process it waits on or shutting down the socket
it reads. One thread per ``Deadlines`` serves every watch: the first watch starts it,
and it ends once it has had nothing to watch for ``idle`` seconds (a thread per call
cost more than a small frame's whole packing), or at ``close``.

Used by the packing (fpack, funpack), the SFTP destination and the PostgreSQL catalog.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

# How often a watch that has a stop event looks at it.
STOP_TICK = 0.25
# How long the thread outlives its last watch: a busy night keeps it, and between
# nights it starts at most twice a second.
IDLE = 0.5


class Watch:
    """One call under a deadline. ``fired`` is "" until the watch acted, then
    "deadline", or "stop requested" when its stop event was set and the grace that
    follows ran out first."""

    __slots__ = ("act", "due", "fired", "stop", "stop_due")

    def __init__(self, due: float, act: Callable[[], object], stop: threading.Event | None):
        self.due = due
        self.act = act
        self.stop = stop
        self.stop_due: float | None = None
        self.fired = ""


class Deadlines:
    """``watch(seconds, act)`` around a call: past its time, ``act`` runs (once) on the
    deadline thread; past a stop request and ``stop_grace`` seconds, too."""

    def __init__(self, name: str, *, stop_grace: float = 5.0, idle: float = IDLE) -> None:
        self.name = name
        self.stop_grace = stop_grace
        self.idle = idle
        self._cond = threading.Condition()
        self._armed: set[Watch] = set()
        self._thread: threading.Thread | None = None
        self._closing = False
        _instances.add(self)

    @contextmanager
    def watch(
        self, seconds: float, act: Callable[[], object], stop: threading.Event | None = None
    ) -> Iterator[Watch]:
        w = Watch(time.monotonic() + seconds, act, stop)
        with self._cond:
            self._armed.add(w)
            if self._thread is None:
                self._closing = False
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify()  # it may sleep past this deadline
        try:
            yield w
        finally:
            # under the lock: once the call has returned, it is never acted on
            with self._cond:
                self._armed.discard(w)

    def close(self) -> None:
        """End the thread now (its owner is closing)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)

    def _run(self) -> None:
        with self._cond:
            idle_since: float | None = None
            while not self._closing:
                now = time.monotonic()
                wake = now + self.idle
                for w in self._armed:
                    if w.fired:
                        continue
                    if w.stop is not None and w.stop_due is None:
                        if w.stop.is_set():
                            w.stop_due = now + self.stop_grace
                        else:
                            wake = min(wake, now + STOP_TICK)
                    due = w.due if w.stop_due is None else min(w.due, w.stop_due)
                    if due > now:
                        wake = min(wake, due)
                        continue
                    w.fired = "deadline" if w.due <= now else "stop requested"
                    with suppress(OSError):  # gone already: nothing left to wake
                        w.act()
                if self._armed:
                    idle_since = None
                elif idle_since is None:
                    idle_since = now
                elif now - idle_since >= self.idle:
                    break
                self._cond.wait(max(0.0, wake - now))
            self._thread = None

    def _forget_after_fork(self) -> None:
        # a child made by fork has none of its parent's threads, and maybe a lock that
        # one of them held
        self._cond = threading.Condition()
        self._armed = set()
        self._thread = None


_instances: weakref.WeakSet[Deadlines] = weakref.WeakSet()


def _after_fork() -> None:
    for d in list(_instances):
        d._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork)

"""The one deadline thread that packing, SFTP and the PostgreSQL catalog share."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from rawtransfer.deadlines import Deadlines


def _wait(cond: Callable[[], bool], seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_a_call_past_its_time_is_acted_on_once_and_one_in_time_never() -> None:
    d = Deadlines("test-deadlines", idle=0.2)
    acted: list[str] = []
    with d.watch(0.1, lambda: acted.append("slow")) as slow:
        assert _wait(lambda: bool(acted))
        time.sleep(0.2)  # past its time it is not acted on again
    assert acted == ["slow"] and slow.fired == "deadline"
    with d.watch(0.3, lambda: acted.append("quick")) as quick:
        pass
    time.sleep(0.5)  # its time passes after the call returned
    assert acted == ["slow"] and quick.fired == ""
    d.close()


def test_a_stop_request_acts_after_its_grace() -> None:
    d = Deadlines("test-deadlines", stop_grace=0.2, idle=0.2)
    stop = threading.Event()
    acted = threading.Event()
    with d.watch(60.0, acted.set, stop) as w:
        time.sleep(0.3)
        assert not acted.is_set()  # no stop yet, and the deadline is far
        stop.set()
        assert acted.wait(5.0)
    assert w.fired == "stop requested"
    d.close()


def test_the_thread_ends_when_idle_and_comes_back_for_the_next_call() -> None:
    d = Deadlines("test-idle-deadlines", idle=0.2)

    def running() -> bool:
        return any(t.name == "test-idle-deadlines" for t in threading.enumerate())

    with d.watch(60.0, lambda: None):
        assert running()
    assert _wait(lambda: not running())
    acted = threading.Event()
    with d.watch(0.05, acted.set):
        assert acted.wait(5.0)
    d.close()
    assert not running()

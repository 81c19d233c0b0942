"""The work queue: de-duplication, delays, pause/resume, events during processing."""

from __future__ import annotations

import threading
from pathlib import Path

from rawtransfer.queue import WorkQueue

A, B = Path("/x/a.fits"), Path("/x/b.fits")


def test_dedup_and_order() -> None:
    q = WorkQueue()
    assert q.put(A)
    assert not q.put(A)
    assert q.put(B)
    assert q.depth() == (2, 0)
    first, second = q.get(timeout=0), q.get(timeout=0)
    assert first is not None and second is not None
    assert [first.path, second.path] == [A, B]
    assert q.get(timeout=0) is None


def test_delay_and_closed_upgrade() -> None:
    q = WorkQueue()
    q.put(A, delay=60)
    assert q.get(timeout=0.05) is None  # not due yet
    q.put(A, closed=True)  # closed after writing: due now
    item = q.get(timeout=1)
    assert item is not None and item.path == A and item.closed


def test_put_while_in_flight_is_redelivered_after_done() -> None:
    q = WorkQueue()
    q.put(A)
    item = q.get(timeout=0)
    assert item is not None
    assert not q.put(A, closed=True)  # remembered, not handed out twice at once
    assert q.get(timeout=0.05) is None
    q.done(item)
    again = q.get(timeout=1)
    assert again is not None and again.path == A and again.closed


def test_pause_blocks_handouts_until_resume() -> None:
    q = WorkQueue()
    q.pause()
    q.put(A)
    assert q.get(timeout=0.05) is None
    got: list[Path] = []
    t = threading.Thread(target=lambda: got.append(q.get(timeout=5).path))  # type: ignore[union-attr]
    t.start()
    q.resume()
    t.join(5)
    assert got == [A]


def test_close_ends_consumers_when_drained() -> None:
    q = WorkQueue()
    q.put(A)
    q.close()
    item = q.get(timeout=1)
    assert item is not None
    q.done(item)
    assert q.get(timeout=1) is None
    assert q.idle()


def test_many_threads_each_path_once() -> None:
    q = WorkQueue()
    paths = [Path(f"/x/{i}.fits") for i in range(500)]
    for p in paths + paths:
        q.put(p)
    q.close()
    seen: list[Path] = []
    lock = threading.Lock()

    def work() -> None:
        while (item := q.get(timeout=2)) is not None:
            with lock:
                seen.append(item.path)
            q.done(item)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(seen) == sorted(paths)


def test_modify_events_do_not_make_a_waiting_file_due() -> None:
    q = WorkQueue()
    q.put(A, delay=60)
    for _ in range(100):
        assert not q.put(A)  # a slow writer's modify events
    assert q.get(timeout=0.05) is None


def test_deferring_a_file_in_hand_keeps_its_delay() -> None:
    q = WorkQueue()
    q.put(A)
    item = q.get(timeout=0)
    assert item is not None
    q.put(A, delay=60)  # the worker defers its own file...
    q.done(item)  # ...and lets go of it
    assert q.get(timeout=0.1) is None  # not handed out again before its time
    assert q.depth() == (1, 0)


def test_oldest_tracks_unfinished_paths_across_retries() -> None:
    q = WorkQueue()
    assert q.oldest() is None
    q.put(A)
    q.put(B)
    item = q.get(timeout=0)
    assert item is not None and item.path == A
    q.put(A, delay=30)  # deferred while in hand: still unfinished
    q.done(item)
    oldest = q.oldest()
    assert oldest is not None and oldest[0] == A
    item_b = q.get(timeout=0)
    assert item_b is not None and item_b.path == B
    q.done(item_b)  # finished: no longer counted
    assert q.oldest() is not None and q.oldest()[0] == A  # type: ignore[index]

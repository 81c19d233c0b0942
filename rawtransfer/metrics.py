"""Live figures for Prometheus: served on 127.0.0.1 (``--metrics-port``) or written to a
node-exporter textfile (``--metrics-textfile``), or neither (the default).

The pipeline and the workers report to a ``Recorder``; the default one does nothing, so
code and tests that do not ask for metrics pay nothing for them. Each ``Metrics`` has a
registry of its own (never the process-wide default), so two services in one test
process do not collide. Figures that describe the present (queue depth, in flight,
paused, the oldest file waiting) are read from the queue at the moment of a scrape.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from rawtransfer.errors import ConfigError
from rawtransfer.outcome import Outcome, Result
from rawtransfer.queue import WorkQueue

# prometheus_client is imported where it is used: the default Recorder (no metrics flag)
# does not pay its RSS and start-up time.
if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

    from rawtransfer.config import Settings

log = logging.getLogger(__name__)

# Loopback only: the figures name no files, but nothing outside this host needs to reach
# them unless an operator puts a proxy or a node-exporter in front on purpose.
METRICS_ADDRESS = "127.0.0.1"
# How often the textfile is replaced: node-exporter reads it at each of its scrapes
# (typically every 15-60 s); a few seconds keeps it fresh at the cost of one small write.
TEXTFILE_INTERVAL = 5.0
# How long closing waits for the HTTP server's thread and the textfile writer.
JOIN_TIMEOUT = 10.0

STEPS = ("check", "pack", "copy", "verify")
FAILURE_KINDS = ("quarantined", "failed", "retry", "given_up")
RESOURCES = ("destination", "catalog", "spool", "source")
# from a few milliseconds (the check of a small frame) to minutes (a copy over a slow link)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Recorder:
    """What the pipeline and the workers report. This one does nothing (the default)."""

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time one step of one file (check, pack, copy, verify), even one that fails."""
        yield

    def outcome(self, outcome: Outcome) -> None:
        """One outcome of process_one, as the workers see it."""

    def given_up(self) -> None:
        """A file left not done (a one-off run gives up after a few attempts)."""

    def reaped(self, size: int) -> None:
        """A local file deleted after its archive copy was verified (reap.py)."""

    def resources(self, down: Callable[[], Iterable[str]]) -> None:
        """Where to read which resources are unavailable (the canary and the source)."""

    def close(self) -> None:
        """Stop serving or writing; a textfile gets the final figures."""


class _Live:
    """The figures of the present moment, read at each scrape."""

    def __init__(self, queue: WorkQueue) -> None:
        self.queue = queue
        self.down: Callable[[], Iterable[str]] = tuple

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        pending, inflight = self.queue.depth()
        yield GaugeMetricFamily(
            "rawtransfer_queue_depth", "Files queued, not yet taken by a worker.", value=pending
        )
        yield GaugeMetricFamily(
            "rawtransfer_in_flight", "Files being processed by a worker now.", value=inflight
        )
        yield GaugeMetricFamily(
            "rawtransfer_paused",
            "1 while transfers are paused because a resource is unavailable.",
            value=float(self.queue.paused),
        )
        down = set(self.down())
        unavailable = GaugeMetricFamily(
            "rawtransfer_unavailable",
            "1 while this resource is unavailable (the reason transfers are paused).",
            labels=["resource"],
        )
        for name in RESOURCES:
            unavailable.add_metric([name], float(name in down))
        yield unavailable
        oldest = self.queue.oldest()
        yield GaugeMetricFamily(
            "rawtransfer_oldest_pending_age_seconds",
            "How long the oldest file not yet done has waited (0 when none waits).",
            value=oldest[1] if oldest else 0.0,
        )


class Metrics(Recorder):
    """The figures in a registry of their own, exported by ``serve`` or ``write_to``."""

    def __init__(self, queue: WorkQueue) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.files_done = Counter(
            "rawtransfer_files_done", "Files archived and verified.", registry=r
        )
        self.bytes_done = Counter(
            "rawtransfer_bytes_done", "Raw bytes of the files archived and verified.", registry=r
        )
        self.packed_bytes_done = Counter(
            "rawtransfer_packed_bytes_done",
            "Bytes written to the archive (packed) for the files done.",
            registry=r,
        )
        self.duplicates = Counter(
            "rawtransfer_duplicates",
            "Files whose content was already archived under another name.",
            registry=r,
        )
        self.failures = Counter(
            "rawtransfer_failures",
            "Files not done, by kind: quarantined and failed are recorded for good; retry is "
            "a file put back because a resource was away; given_up is a one-off run giving up.",
            ["kind"],
            registry=r,
        )
        for kind in FAILURE_KINDS:
            self.failures.labels(kind)  # every kind at 0 from the start: increase() works
        self.steps = Histogram(
            "rawtransfer_step_duration_seconds",
            "Time taken by each step of one file.",
            ["step"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        for name in STEPS:
            self.steps.labels(name)
        self.reaped_files = Counter(
            "rawtransfer_reaped_files",
            "Local files deleted after their archive copy was verified (reaping).",
            registry=r,
        )
        self.reaped_bytes = Counter(
            "rawtransfer_reaped_bytes", "Bytes freed on the local disk by reaping.", registry=r
        )
        self.last_success = Gauge(
            "rawtransfer_last_success_timestamp_seconds",
            "Unix time of the last file done (0 until the first one in this process).",
            registry=r,
        )
        self._live = _Live(queue)
        r.register(self._live)
        self._server: tuple[object, threading.Thread] | None = None
        self._writer: _TextfileWriter | None = None

    # recording -------------------------------------------------------------------
    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        with self.steps.labels(name).time():
            yield

    def outcome(self, outcome: Outcome) -> None:

        r = outcome.result
        if r == Result.DONE:
            self.files_done.inc()
            self.bytes_done.inc(outcome.raw_size)
            self.packed_bytes_done.inc(outcome.packed_size)
            self.last_success.set(time.time())
        elif r == Result.DUPLICATE:
            self.duplicates.inc()
        elif r in (Result.QUARANTINED, Result.FAILED):
            self.failures.labels(r.value).inc()
        elif r == Result.RETRY:
            self.failures.labels("retry").inc()

    def given_up(self) -> None:
        self.failures.labels("given_up").inc()

    def reaped(self, size: int) -> None:
        self.reaped_files.inc()
        self.reaped_bytes.inc(size)

    def resources(self, down: Callable[[], Iterable[str]]) -> None:
        self._live.down = down

    # exporting -------------------------------------------------------------------
    def serve(self, port: int) -> None:
        from prometheus_client.exposition import start_http_server

        try:
            self._server = start_http_server(port, addr=METRICS_ADDRESS, registry=self.registry)
        except OSError as exc:
            raise ConfigError(
                f"--metrics-port {port}: cannot listen on {METRICS_ADDRESS}:{port}: "
                f"{exc.strerror or exc}"
            ) from None
        log.info("metrics at http://%s:%d/metrics", METRICS_ADDRESS, port)

    def write_to(self, path: Path, interval: float = TEXTFILE_INTERVAL) -> None:
        self._writer = _TextfileWriter(path, self.registry, interval)
        self._writer.write()  # a path that cannot be written is said at once
        self._writer.start()
        log.info("metrics written to %s every %.0f s", path, interval)

    def close(self) -> None:
        if self._server is not None:
            httpd, thread = self._server
            httpd.shutdown()  # type: ignore[attr-defined]
            httpd.server_close()  # type: ignore[attr-defined]
            thread.join(JOIN_TIMEOUT)
            self._server = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class _TextfileWriter(threading.Thread):
    """Replace the textfile every ``interval`` seconds, and once more when closed."""

    def __init__(self, path: Path, registry: CollectorRegistry, interval: float) -> None:
        super().__init__(name="metrics-textfile", daemon=True)
        self.path = path
        self.registry = registry
        self.interval = interval
        self._closing = threading.Event()
        self._failing = False

    def write(self) -> None:
        from prometheus_client import write_to_textfile

        try:
            # a temporary file beside it, then a rename: node-exporter never reads half
            write_to_textfile(str(self.path), self.registry)
        except OSError as exc:
            if not self._failing:  # once per spell of failures, not every few seconds
                log.error("cannot write metrics to %s: %s", self.path, exc.strerror or exc)
            self._failing = True
        else:
            if self._failing:
                log.info("metrics written to %s again", self.path)
            self._failing = False

    def run(self) -> None:
        while not self._closing.wait(self.interval):
            self.write()

    def close(self) -> None:
        self._closing.set()
        self.join(JOIN_TIMEOUT)
        self.write()


def start_metrics(s: Settings, queue: WorkQueue) -> Recorder:
    """The recorder the settings ask for: a no-op one unless a metrics flag is given."""
    if s.metrics_port is None and s.metrics_textfile is None:
        return Recorder()
    m = Metrics(queue)
    try:
        if s.metrics_port is not None:
            m.serve(s.metrics_port)
        if s.metrics_textfile is not None:
            m.write_to(s.metrics_textfile)
    except BaseException:
        m.close()
        raise
    return m

"""Alerts for what needs a person: an Alerter protocol, Slack and a null alerter.

Alerts of one kind are grouped: the first of a kind goes out at once, later ones within
``interval`` are counted and sent as one message when the interval has passed. A problem
that clears (destination back, catalog back) sends a resolved message. Sending happens
on the alerter's own thread with a short deadline, so a dead or hanging webhook never
blocks or slows a transfer. The webhook URL is a secret: it never appears in a log line
or an exception text (HTTP libraries put the URL in their errors, so texts are redacted).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)

# One message per kind per this many seconds; the rest of the kind is counted into it.
GROUP_INTERVAL = 300.0
# A webhook call that takes longer than this is abandoned: alerts are not worth a stall.
WEBHOOK_TIMEOUT = 5
# At most this many messages wait to be sent; beyond it the oldest are dropped (they
# are already grouped by kind, so this only bites when the webhook is away for long).
MAX_BACKLOG = 1000
# How many example lines a grouped message quotes.
EXAMPLES = 5
# slack_sdk logs the request URL (the secret) when it retries a failed delivery, at INFO
# whatever level is asked for; its logger is silenced, and _send logs failures redacted.
_SDK_LOG = logging.getLogger("rawtransfer.alerts.slack_sdk")
_SDK_LOG.setLevel(logging.CRITICAL + 1)
_SDK_LOG.propagate = False


class Alerter(Protocol):
    def alert(self, kind: str, text: str) -> None:
        """Something needs a person (grouped and rate-limited by ``kind``)."""

    def resolve(self, kind: str, text: str) -> None:
        """A problem of ``kind`` that was alerted is over."""

    def close(self) -> None: ...


class NullAlerter:
    """No webhook configured: alerts are log lines only (they already are)."""

    def alert(self, kind: str, text: str) -> None:
        log.debug("alert %s: %s", kind, text)

    def resolve(self, kind: str, text: str) -> None:
        log.debug("resolved %s: %s", kind, text)

    def close(self) -> None:
        pass


def redact(text: str, secret: str) -> str:
    if secret:
        text = text.replace(secret, "<webhook-url>")
        # a URL's path alone is also the secret (hooks.slack.com/services/T/B/XXXX)
        path = secret.split("://", 1)[-1].split("/", 1)[-1]
        if len(path) > 8:
            text = text.replace(path, "<webhook-path>")
    return text


@dataclass
class _Group:
    examples: list[str] = field(default_factory=list)
    count: int = 0
    last_sent: float = float("-inf")
    open: bool = False  # an alert of this kind went out and has not been resolved


class SlackAlerter:
    def __init__(
        self,
        url: str,
        *,
        host: str | None = None,
        interval: float = GROUP_INTERVAL,
        timeout: int = WEBHOOK_TIMEOUT,
    ) -> None:
        self._url = url
        self._host = host or socket.gethostname()
        self._interval = interval
        # imported here: slack_sdk costs 2-3 MB of RSS that a service without a webhook
        # (and every one-off run) has no use for
        from slack_sdk.http_retry.builtin_handlers import (
            ConnectionErrorRetryHandler,
            RateLimitErrorRetryHandler,
        )
        from slack_sdk.webhook import WebhookClient

        self._client = WebhookClient(
            url,
            timeout=timeout,
            logger=_SDK_LOG,
            retry_handlers=[
                ConnectionErrorRetryHandler(max_retry_count=2),
                RateLimitErrorRetryHandler(max_retry_count=2),
            ],
        )
        self._groups: dict[str, _Group] = {}
        self._outbox: deque[str] = deque(maxlen=MAX_BACKLOG)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alerts", daemon=True)
        self._thread.start()

    def alert(self, kind: str, text: str) -> None:
        with self._cond:
            g = self._groups.setdefault(kind, _Group())
            g.count += 1
            if len(g.examples) < EXAMPLES:
                g.examples.append(text)
            g.open = True
            self._cond.notify()

    def resolve(self, kind: str, text: str) -> None:
        with self._cond:
            g = self._groups.get(kind)
            if g is None or not g.open:
                return
            g.open = False
            self._outbox.append(f":white_check_mark: [{self._host}] resolved: {text}")
            self._cond.notify()

    def _due(self, now: float) -> list[str]:
        out = []
        for kind, g in self._groups.items():
            if g.count and now - g.last_sent >= self._interval:
                head = f":rotating_light: [{self._host}] {kind}"
                if g.count > 1:
                    head += f" ({g.count} in the last {self._interval / 60:.0f} min)"
                lines = [head, *(f"• {e}" for e in g.examples)]
                if g.count > len(g.examples):
                    lines.append(f"… and {g.count - len(g.examples)} more")
                out.append("\n".join(lines))
                g.count, g.examples, g.last_sent = 0, [], now
        return out

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    self._outbox.extend(self._due(now))
                    if self._outbox or self._stop.is_set():
                        break
                    waits = [
                        g.last_sent + self._interval - now for g in self._groups.values() if g.count
                    ]
                    self._cond.wait(min(waits) if waits else None)
                messages = list(self._outbox)
                self._outbox.clear()
            for text in messages:
                self._send(text)
            if self._stop.is_set():
                return

    def _send(self, text: str) -> None:
        try:
            resp = self._client.send(text=text)
            if resp.status_code == 200:
                return
            log.warning("alert not delivered: webhook answered HTTP %s", resp.status_code)
        except Exception as exc:  # a dead webhook must never take the service down
            log.warning(
                "alert not delivered: %s", redact(f"{type(exc).__name__}: {exc}", self._url)
            )

    def flush(self) -> None:
        """Send what is waiting regardless of the interval (at shutdown)."""
        with self._cond:
            for g in self._groups.values():
                g.last_sent = float("-inf")
            self._cond.notify()

    def close(self) -> None:
        self.flush()
        self._stop.set()
        with self._cond:
            self._cond.notify()
        self._thread.join(2 * WEBHOOK_TIMEOUT + 1)

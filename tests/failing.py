"""Failing wrappers for a Catalog and a Destination, driven by a short spec string.

The model is borg's failing chunker: ``"claim:down:2,publish:crash"`` makes the first two
calls of ``claim`` raise as if the catalog were away, and the first ``publish`` raise a
defect; every other call goes to the real object underneath. Actions:

* ``down``: the resource is away (CatalogUnavailable / DestinationUnavailable);
* ``refuse``: a permanent, per-file refusal (a value the catalog will not take, a
  conflicting file at the destination);
* ``crash``: a defect (RuntimeError);
* ``after``: the real call happens, *then* the resource goes away (the answer is lost).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from rawtransfer.errors import (
    CatalogUnavailable,
    DestinationConflict,
    DestinationUnavailable,
    FileFailed,
)


class _Failing:
    unavailable: type[Exception] = RuntimeError
    refused: type[Exception] = RuntimeError

    def __init__(self, inner: Any, spec: str) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        self._plan: dict[str, list[str]] = {}
        self.fired: list[str] = []
        for entry in filter(None, (e.strip() for e in spec.split(","))):
            method, action, *rest = entry.split(":")
            if not hasattr(inner, method) or action not in ("down", "refuse", "crash", "after"):
                raise ValueError(f"bad fault spec {entry!r}")
            self._plan.setdefault(method, []).extend([action] * int(rest[0] if rest else 1))

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._inner, name)
        if not callable(real):
            return real

        def call(*args: Any, **kw: Any) -> Any:
            with self._lock:
                plan = self._plan.get(name) or []
                action = plan.pop(0) if plan else None
                if action:
                    self.fired.append(f"{name}:{action}")
            return self._act(action, name, real, args, kw)

        return call

    def _act(
        self, action: str | None, name: str, real: Callable[..., Any], args: Any, kw: Any
    ) -> Any:
        if action is None:
            return real(*args, **kw)
        if action == "down":
            raise self.unavailable(f"injected: {name} away")
        if action == "refuse":
            raise self.refused(f"injected: {name} refused")
        if action == "crash":
            raise RuntimeError(f"injected defect in {name}")
        result = real(*args, **kw)  # "after": done, but the answer never arrives
        raise self.unavailable(f"injected: {name} lost its answer")
        return result  # pragma: no cover


class FailingCatalog(_Failing):
    unavailable = CatalogUnavailable
    refused = FileFailed


class FailingDestination(_Failing):
    unavailable = DestinationUnavailable
    refused = DestinationConflict

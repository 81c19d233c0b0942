"""Figures for people: durations ("12 minutes"), sizes in MB, catalog times in UTC."""

from __future__ import annotations

from datetime import UTC, datetime

_STEPS = ((86400.0, "day"), (3600.0, "hour"), (60.0, "minute"))


def duration(seconds: float) -> str:
    """A rounded duration in the largest unit that fits: "40 s", "12 minutes", "3 hours"."""
    s = max(0.0, seconds)
    for size, unit in _STEPS:
        if s >= size:
            n = round(s / size)
            return f"{n} {unit}{'' if n == 1 else 's'}"
    return f"{s:.0f} s"


def ago(seconds: float) -> str:
    """How long ago something happened; a time ahead of our clock is said to be so."""
    if seconds < -1:
        return f"in {duration(-seconds)} (clocks differ?)"
    return f"{duration(seconds)} ago"


def mb(n: int | float) -> str:
    """Bytes as MB (10^6, as the backfill summary counts them); small ones to 0.01 MB."""
    return f"{n / 1e6:,.1f} MB" if n >= 10e6 or n == 0 else f"{n / 1e6:.2f} MB"


def utc_text(at: datetime) -> str:
    """A catalog time (naive UTC) for people."""
    return at.strftime("%Y-%m-%d %H:%M:%S UTC")


def utc_iso(at: datetime) -> str:
    """A catalog time (naive UTC) for machines: ISO 8601 with a Z."""
    return at.replace(tzinfo=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def epoch_iso(epoch: float) -> str:
    return utc_iso(datetime.fromtimestamp(epoch, UTC).replace(tzinfo=None))

"""place: where a packed file goes in the archive, from its header date.

The remote path is ``YYYY/MM/DD/NAME.fits.fz``. The date comes from the *parsed* value of
the header card (``DATE-OBS`` by default), taken from the parsed value's own calendar
fields: formatting ``23:59:59.9999`` would round into the next day. The raw header text
is never put in a path, so ``/`` or ``..`` in a header cannot escape the tree.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import date
from pathlib import PurePosixPath

from astropy.io import fits
from astropy.time import Time

from rawtransfer.errors import FileRejected
from rawtransfer.names import cut

# FITS date values: YYYY-MM-DD, optionally with Thh:mm:ss[.fff]. The old DD/MM/YY form is
# ambiguous about the century and is refused rather than guessed.
_FITS_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?$")


def header_date(headers: Iterable[fits.Header], card: str) -> date:
    """The calendar date of the first HDU that has ``card``."""
    for header in headers:
        if card in header:
            value = header[card]
            break
    else:
        raise FileRejected(f"header card {card} is missing")
    if not isinstance(value, str):
        raise FileRejected(f"header card {card} is not a date string: {cut(repr(value), 80)}")
    text = value.strip()
    if not _FITS_DATE_RE.match(text):
        raise FileRejected(f"header card {card} is not an ISO date: {cut(repr(value), 80)}")
    try:
        t = Time(text, format="fits", scale="utc")
        ymd = t.ymdhms
        return date(int(ymd["year"]), int(ymd["month"]), int(ymd["day"]))
    except (ValueError, TypeError) as exc:
        raise FileRejected(
            f"header card {card} is not a valid date: {cut(repr(value), 80)} ({exc})"
        ) from None


def packed_name(source_name: str) -> str:
    """``NAME.fits`` -> ``NAME.fits.fz``; a name that is already ``.fz`` is kept."""
    return source_name if source_name.endswith(".fz") else source_name + ".fz"


def remote_relpath(day: date, source_name: str) -> PurePosixPath:
    name = packed_name(source_name)
    if "/" in name or name in (".", "..", ".fz") or "\x00" in name:
        raise FileRejected(f"file name {name!r} cannot be placed")
    return PurePosixPath(f"{day.year:04d}", f"{day.month:02d}", f"{day.day:02d}", name)

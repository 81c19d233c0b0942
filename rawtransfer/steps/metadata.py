"""record: catalog metadata columns from the named groups of ``--metadata-regex``.

Upstream matched the regex against the file name; digits become integers so that they
fit upstream's ``smallint``/``int`` columns.
"""

from __future__ import annotations

import re


def metadata_from_name(pattern: re.Pattern[str] | None, name: str) -> dict[str, int | str | None]:
    if pattern is None:
        return {}
    m = pattern.search(name)
    if not m:
        return dict.fromkeys(pattern.groupindex)
    out: dict[str, int | str | None] = {}
    for key, value in m.groupdict().items():
        if value is not None and value.isdigit() and value.isascii():
            out[key] = int(value)
        else:
            out[key] = value
    return out

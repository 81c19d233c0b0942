"""Safe display of file names and header values in one-line log messages and alerts.

File names are whatever the camera software wrote: spaces, quotes, newlines, a leading
dash; header values can be anything up to thousands of characters. Logs must stay one
line per event and of a readable length, so every path and value shown goes through
``q`` (a name: escaped and quoted when needed) or ``cut`` (free text: control
characters escaped), both cut to a sane length.
"""

from __future__ import annotations

import os

# Long enough for any real path of an archive tree; a line stays readable in journald.
MAX_SHOWN = 300


def _shorten(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text) - limit} more characters)"


def q(path: str | os.PathLike[str], limit: int = MAX_SHOWN) -> str:
    """The path as a single printable token: quoted by repr when it needs it."""
    text = os.fspath(path)
    if not (text.isprintable() and " " not in text and "'" not in text and '"' not in text):
        text = repr(text)
    return _shorten(text, limit)


def cut(text: str, limit: int = 2 * MAX_SHOWN) -> str:
    """Free text (an error's reason) as one line of at most about ``limit`` characters."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return _shorten(text, limit)


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 file``, ``2 files``, ``0 files``; ``many`` for a word that does not take an s
    (``plural(n, "directory", "directories")``)."""
    return f"{n} {word if n == 1 else many or word + 's'}"

"""Safe display of file names in one-line log messages and error texts.

File names are whatever the camera software wrote: spaces, quotes, newlines, a leading
dash. Logs must stay one line per event, so names are shown escaped.
"""

from __future__ import annotations

import os


def q(path: str | os.PathLike[str]) -> str:
    """The path as a single printable token: quoted by repr when it needs it."""
    text = os.fspath(path)
    if text.isprintable() and " " not in text and "'" not in text and '"' not in text:
        return text
    return repr(text)

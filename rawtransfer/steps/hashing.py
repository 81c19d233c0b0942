"""hash: SHA1 of a file, the catalog's key (as upstream), with hashlib.file_digest."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha1_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha1").hexdigest()

"""Which files are ours to take: name patterns, rsync-style exclude rules, and the files
that are never taken whatever the rules say.

Exclude rules (``--exclude PATTERN``, ``--exclude-from FILE``) work on paths relative to
the source directory, as rsync's do:

* ``*`` matches within one path component, ``**`` across components, ``?`` one
  character, ``[...]`` a class;
* a rule ending in ``/`` matches directories only (and so everything below them);
* a rule starting with ``/`` is anchored at the source directory; a rule with a ``/``
  inside is matched against the whole relative path or any trailing part of it that
  starts at a component; a rule without ``/`` is matched against each name (a file's, or
  any of its directories');
* blank lines and lines starting with ``#`` are ignored; a leading ``- `` is allowed.

Never taken, whatever the patterns: hidden names, zero-length files, core dumps, the
temporary names of common writers (``*.tmp``, ``*.swp``, ``*.part``, ``*.filepart``)
and anything that is not a regular file.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from rawtransfer.errors import ConfigError
from rawtransfer.names import q

log = logging.getLogger(__name__)

# Temporary names of editors, browsers, WinSCP, rsync and of core dumps: never frames.
NEVER = ("*.tmp", "*.swp", "*.part", "*.filepart", "core", "core.[0-9]*", "*.core")
_NEVER_RE = re.compile("|".join(fnmatch.translate(p) for p in NEVER))
# the suffixes of NEVER; every other name of NEVER starts with "core" (the scan relies on
# it to skip a call of never_taken for the common name)
NEVER_SUFFIXES = (".tmp", ".swp", ".part", ".filepart", ".core")


def never_taken(name: str) -> bool:
    """``_NEVER_RE.match(name)``, in string tests at a quarter of its cost (the scan asks
    it of every file; tests/test_selection.py holds the two to agree)."""
    return (
        name.endswith(NEVER_SUFFIXES)
        or name == "core"
        or (name.startswith("core.") and "0" <= name[5:6] <= "9")
    )


# How many "not taken" decisions are remembered so that each is logged once, not at
# every scan (a bounded memory: the oldest are forgotten first).
REMEMBERED = 10_000


def _glob_re(pattern: str) -> str:
    """rsync's glob as a regular expression (``**`` crosses ``/``; ``*`` does not)."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("!", "]") else i + 1)
            if j < 0:
                raise ConfigError(f"exclude rule {pattern!r} has an unclosed '['")
            body = pattern[i + 1 : j]
            if body.startswith("!"):
                body = "^" + body[1:]
            # backslashes and brackets are literal inside a class (re would warn of sets)
            neg = "^" if body.startswith("^") else ""
            body = body.removeprefix("^").replace("\\", "\\\\").replace("[", "\\[")
            out.append(f"[{neg}{body}]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class Rule:
    text: str
    regex: re.Pattern[str]
    dir_only: bool
    anchored: bool
    whole_path: bool  # has a "/" inside: matched against the path, not each name
    # unanchored with a "/": the regex after any leading components, in one match
    tail: re.Pattern[str]

    @classmethod
    def parse(cls, text: str) -> Rule:
        t = text.removeprefix("- ")
        if not t or "\x00" in t:
            raise ConfigError(f"exclude rule {text!r} is empty")
        dir_only = t.endswith("/")
        t = t.rstrip("/")
        anchored = t.startswith("/")
        t = t.lstrip("/")
        if not t:
            raise ConfigError(f"exclude rule {text!r} matches nothing")
        whole = anchored or "/" in t or "**" in t
        try:
            glob = _glob_re(t)
            regex = re.compile(glob + r"\Z", re.DOTALL)
            tail = re.compile(rf"(?:.*/)?(?:{glob})\Z", re.DOTALL)
        except re.error as exc:
            raise ConfigError(f"exclude rule {text!r}: {exc}") from None
        return cls(text, regex, dir_only, anchored, whole, tail)

    def matches(self, rel: PurePosixPath, is_dir: bool) -> bool:
        return self.matches_text(rel.as_posix(), rel.name, is_dir)

    def matches_text(self, rel: str, name: str, is_dir: bool) -> bool:
        """``matches`` for a relative path given as text (components joined by "/",
        none empty) and its last component."""
        if self.dir_only and not is_dir:
            return False
        if not self.whole_path:
            return self.regex.match(name) is not None
        if self.anchored:
            return self.regex.match(rel) is not None
        # the whole path or any trailing part of it that starts at a component
        return self.tail.match(rel) is not None


def read_rules(patterns: tuple[str, ...], files: tuple[Path, ...] = ()) -> tuple[Rule, ...]:
    """The rules of ``--exclude`` flags, then of ``--exclude-from`` files, in order."""
    lines = list(patterns)
    for f in files:
        try:
            lines += f.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"--exclude-from {q(f)}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"--exclude-from {q(f)}: not a text file") from None
    rules = []
    for line in lines:
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        rules.append(Rule.parse(s))
    return tuple(rules)


class Selection:
    """Patterns and rules together: is this path (relative to the source) one of ours?"""

    def __init__(self, patterns: tuple[str, ...], rules: tuple[Rule, ...] = ()) -> None:
        self.patterns = patterns
        self._re = re.compile("|".join(fnmatch.translate(p) for p in patterns))
        # name_matches as one compiled expression, for the scan's per-file loop
        self.name_pattern = re.compile(rf"(?!\.)(?:{self._re.pattern})")
        self.rules = rules
        self._said: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()  # the watcher's thread and the scans share it
        self._excluded: set[str] = set()  # paths excluded by a rule, seen so far

    def name_matches(self, name: str) -> bool:
        """The name matches a pattern and is not hidden (the rules are not asked)."""
        return not name.startswith(".") and self._re.match(name) is not None

    def excluded(self, rel: PurePosixPath, is_dir: bool = False) -> str | None:
        """The rule that excludes ``rel`` itself or one of its directories, if any."""
        if not self.rules:
            return None
        parts = rel.parts
        for i in range(1, len(parts) + 1):
            here = "/".join(parts[:i])
            last = i == len(parts)
            for rule in self.rules:
                if rule.matches_text(here, parts[i - 1], is_dir or not last):
                    return rule.text
        return None

    def file_taken(self, rel_dir: str, name: str, size: int) -> bool:
        """``wants`` for a regular file that the scan found (``rel_dir`` is its
        directory relative to the source with a trailing "/", or ""), once its name has
        matched ``name_pattern`` and its directories were found neither hidden nor
        excluded: what is left to ask is the file's own name, size and rules."""
        if never_taken(name):
            why = "a temporary name or a core dump"
        elif size == 0:
            why = "empty (zero bytes)"
        elif not self.rules:
            return True
        else:
            rel = rel_dir + name
            rule = next((r.text for r in self.rules if r.matches_text(rel, name, False)), None)
            if rule is None:
                return True
            why = f"excluded by {rule!r}"
        self.say_once(PurePosixPath(rel_dir + name), why)
        return False

    def why_not(self, rel: PurePosixPath, size: int | None = None) -> str | None:
        """Why a file whose name matches the patterns is not taken; None if it is."""
        name = rel.name
        if _NEVER_RE.match(name):
            return "a temporary name or a core dump"
        if size == 0:
            return "empty (zero bytes)"
        rule = self.excluded(rel)
        if rule is not None:
            return f"excluded by {rule!r}"
        return None

    def wants(self, rel: PurePosixPath, size: int | None = None) -> bool:
        """True for a file to take; a refusal is logged once per path, at debug level."""
        if not self.name_matches(rel.name) or any(p.startswith(".") for p in rel.parts[:-1]):
            return False
        why = self.why_not(rel, size)
        if why is None:
            return True
        self.say_once(rel, why)
        return False

    @property
    def excluded_count(self) -> int:
        """How many distinct files a rule has kept out so far (``status`` shows it)."""
        with self._lock:
            return len(self._excluded)

    def say_once(self, rel: PurePosixPath, why: str) -> None:
        key = f"{rel}\0{why}"
        with self._lock:
            if why.startswith("excluded") and len(self._excluded) < REMEMBERED:
                self._excluded.add(str(rel))
            if key in self._said:
                return
            self._said[key] = None
            if len(self._said) > REMEMBERED:
                self._said.popitem(last=False)
        log.debug("not taken: %s: %s", q(rel.as_posix()), why)

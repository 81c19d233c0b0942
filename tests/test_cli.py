"""Bad input at the command line: one clear message, the right exit code, nothing touched."""

from __future__ import annotations

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

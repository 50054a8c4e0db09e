"""`axiom` finds the home it is given, or says in one line that there is none and how to make one."""

from __future__ import annotations

import subprocess

import pytest

from testbed.axiom import VENV_BIN

READERS = [("queue",), ("audit",), ("tenant", "add", "acme"), ("operator", "list"), ("relay",)]

# the axiom CLI as a subprocess: `make test`, not test-fast
pytestmark = pytest.mark.integration


def _axiom(cwd, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "axiom"), *args],
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("args", READERS, ids=" ".join)
def test_outside_a_home_a_command_refuses_in_one_line_and_creates_nothing(tmp_path, args):
    result = _axiom(tmp_path, *args)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line == (
        f"error: no Axiom home at {tmp_path / 'var'} (the default ./var: no database at "
        f"{tmp_path / 'var' / 'axiom.db'}); run 'axiom init' to make one there, or set AXIOM_HOME"
    )
    assert list(tmp_path.iterdir()) == []


def test_the_message_names_the_setting_that_pointed_there(tmp_path):
    home = tmp_path / "elsewhere"
    result = _axiom(tmp_path, "queue", AXIOM_HOME=str(home))
    assert result.returncode == 2
    assert f"no Axiom home at {home} (AXIOM_HOME: no database" in result.stderr
    (tmp_path / "axiom.toml").write_text(f'home = "{home}"\n')
    result = _axiom(tmp_path, "queue")
    assert f"no Axiom home at {home} (home in axiom.toml: no database" in result.stderr
    assert not home.exists()


def test_a_database_without_the_schema_is_not_a_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "axiom.db").write_bytes(b"")  # what `axiom queue` used to leave behind
    result = _axiom(tmp_path, "queue", AXIOM_HOME=str(home))
    assert result.returncode == 2
    assert f"({home / 'axiom.db'} has no Axiom schema)" not in result.stderr  # one clause
    assert f"AXIOM_HOME: {home / 'axiom.db'} has no Axiom schema); run 'axiom init'" in (
        result.stderr
    )
    assert (home / "axiom.db").read_bytes() == b""


def test_init_makes_the_home_the_commands_then_find(tmp_path):
    home = tmp_path / "home"
    init = _axiom(tmp_path, "init", AXIOM_HOME=str(home))
    assert init.returncode == 0, init.stderr
    assert "database ready" in init.stdout
    listed = _axiom(tmp_path, "audit", "--json", AXIOM_HOME=str(home))
    assert listed.returncode == 0, listed.stderr
    assert "pool.add" in listed.stdout


def test_an_empty_database_is_not_a_home_and_stays_empty(tmp_path, db_url):
    result = _axiom(tmp_path, "queue", AXIOM_HOME=str(tmp_path / "home"), AXIOM_DATABASE_URL=db_url)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    if db_url.startswith("sqlite"):
        assert "(AXIOM_HOME: no database at " in line
        assert not (tmp_path / "axiom.db").exists()
    else:
        assert line.startswith("error: no Axiom schema in postgresql://")
        assert line.endswith(
            "(AXIOM_DATABASE_URL); run 'axiom init' with these settings to create it"
        )
    assert not (tmp_path / "home").exists()


def test_an_unreachable_database_is_one_line(tmp_path):
    nowhere = "postgresql://postgres@127.0.0.1:1/none"  # nothing listens on port 1
    result = _axiom(tmp_path, "queue", AXIOM_DATABASE_URL=nowhere)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot reach the database {nowhere} (AXIOM_DATABASE_URL): ")

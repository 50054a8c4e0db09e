"""testbed/cli.py: a command forked from the zygote answers as the `axiom` script started afresh
does — the same output, exit code and errors, its own environment, directory and input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from testbed import cli
from testbed.axiom import make_home

# real databases filled to bench scale, or real processes: make test runs it, not test-fast
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("zygote")
    return make_home(root / "home", f"sqlite:///{root / 'axiom.db'}")


def both(args, env, **kw):
    forked = cli.run(args, env, **kw)
    os.environ["AXIOM_TEST_CLI"] = "exec"
    try:
        fresh = cli.run(args, env, **kw)
    finally:
        del os.environ["AXIOM_TEST_CLI"]
    return forked, fresh


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["nosuch"],  # click's usage error names the program as the script does
        ["sandbox", "clock", "nosuch"],
        ["stats", "--window", "9x"],  # a bad value, named
        ["queue", "show", "nosuch"],  # a refusal naming the bad value
    ],
)
def test_text_codes_and_errors_are_the_scripts(home, args):
    forked, fresh = both(args, home.env)
    assert (forked.returncode, forked.stdout, forked.stderr) == (
        fresh.returncode,
        fresh.stdout,
        fresh.stderr,
    )


def test_json_and_input_are_the_scripts(home):
    forked, fresh = both(["queue", "--json"], home.env)
    assert forked.returncode == fresh.returncode == 0
    assert json.loads(forked.stdout) == json.loads(fresh.stdout)
    replies = "550 5.1.1 <a@example.org>: Recipient address rejected\n421 4.7.0 Try again later\n"
    forked, fresh = both(["classify", "-", "--json"], home.env, input=replies)
    assert forked.returncode == fresh.returncode == 0, forked.stderr
    lines = [json.loads(line) for line in forked.stdout.splitlines()]
    assert lines == [json.loads(line) for line in fresh.stdout.splitlines()]
    assert len(lines) == 2


def test_each_command_has_its_own_environment_and_directory(home, tmp_path):
    # without AXIOM_HOME or a database the home is looked for from the working directory
    env = {
        k: v
        for k, v in home.env.items()
        if k not in ("AXIOM_HOME", "AXIOM_CONFIG", "AXIOM_DATABASE_URL")
    }
    outside = cli.run(["queue"], env, cwd=tmp_path)
    assert outside.returncode == 2 and "axiom init" in outside.stderr, outside.stderr
    assert not (tmp_path / "var" / "axiom.db").exists()  # looked at, not created
    inside = cli.run(["queue", "--json"], home.env)
    assert inside.returncode == 0, inside.stderr
    again = cli.run(["queue"], env, cwd=tmp_path)  # nothing of the last one's stays
    assert (again.returncode, again.stderr) == (outside.returncode, outside.stderr)


def test_a_command_past_its_timeout_is_killed(home):
    # a database that takes the connection and never answers: the command waits on it
    with socket.create_server(("127.0.0.1", 0), backlog=8) as silent:
        port = silent.getsockname()[1]
        env = home.env | {"AXIOM_DATABASE_URL": f"postgresql://axiom@127.0.0.1:{port}/axiom"}
        started = time.monotonic()
        with pytest.raises(subprocess.TimeoutExpired):
            cli.run(["queue"], env, timeout=2.0)
        assert time.monotonic() - started < 10

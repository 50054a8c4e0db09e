"""`axiom up` as a newcomer runs it: everything starts, a message goes through, all stops."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from sqlmodel import Session, select

from models import DeliveryEvent
from models.db import make_engine
from tests.conftest import VENV_BIN, free_port

pytestmark = pytest.mark.integration


def _env(home: Path, db_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AXIOM_", "PREFECT_"))}
    net = f"127.{secrets.randbelow(200) + 30}.{secrets.randbelow(250)}.0/24"
    env.update(
        AXIOM_HOME=str(home),
        AXIOM_DATABASE_URL=db_url,
        AXIOM_CONFIG=str(home / "absent.toml"),
        AXIOM_SUBMISSION_LISTEN=f"127.0.0.1:{free_port()}",
        AXIOM_SUBMISSION_TLS_LISTEN=f"127.0.0.1:{free_port()}",
        AXIOM_HTTP_LISTEN=f"127.0.0.1:{free_port()}",
        AXIOM_CONTROL_LISTEN=f"127.0.0.1:{free_port()}",
        AXIOM_INBOUND_LISTEN=f"127.0.0.1:{free_port()}",
        AXIOM_PREFECT_LISTEN=f"127.0.0.1:{free_port()}",
        AXIOM_SANDBOX_DNS_LISTEN=f"127.0.0.1:{free_port()}",
        AXIOM_SANDBOX_MX_NETWORK=net,
        AXIOM_DELIVERY_PORT=str(free_port()),
        # A fresh shell, as a newcomer has it: the venv's bin is not on PATH.
        PATH=":".join(
            p for p in os.environ.get("PATH", "").split(":") if p and Path(p) != VENV_BIN
        ),
    )
    return env


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"axiom up exited {proc.returncode}:\n{path.read_text()}")
        time.sleep(0.25)
    raise AssertionError(f"no {text!r} after {timeout}s:\n{path.read_text()}")


def test_up_runs_everything_and_stops_cleanly(tmp_path, db_url):
    home = tmp_path / "home"
    env = _env(home, db_url)
    log = tmp_path / "up.out"
    with open(log, "wb") as out:
        up = subprocess.Popen(
            [str(VENV_BIN / "axiom"), "up"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        _wait_for(log, "Axiom Send is ready", up, timeout=240)
        info = json.loads((home / "up.json").read_text())
        children = _descendants(up.pid)
        assert len(children) >= 5  # prefect, sandbox, relay, control, flows (and helpers)

        # The banner says where the control process is and how to get `axiom` on PATH.
        banner = log.read_text()
        assert f"control      http://{env['AXIOM_CONTROL_LISTEN']}: /slack/interactivity" in banner
        assert f'  PATH:        export PATH="{VENV_BIN}:$PATH"' in banner
        assert info["control"] == f"http://{env['AXIOM_CONTROL_LISTEN']}"
        with urllib.request.urlopen(f"{info['control']}/healthz", timeout=5) as resp:
            assert resp.status == 200

        # A second `axiom up` on the same home refuses instead of corrupting state.
        second = subprocess.run(
            [str(VENV_BIN / "axiom"), "up"], env=env, capture_output=True, text=True, timeout=60
        )
        assert second.returncode == 1
        assert "axiom up is already running on" in second.stderr

        # The Prefect UI/API answers.
        with urllib.request.urlopen(f"{info['prefect_api']}/health", timeout=5) as resp:
            assert resp.status == 200 and resp.read().strip() == b"true"

        # The printed swaks command sends a message that the simulated Gmail accepts, signed.
        swaks = subprocess.run(
            info["swaks"], shell=True, capture_output=True, text=True, timeout=60, env=env
        )
        assert swaks.returncode == 0, swaks.stdout + swaks.stderr
        assert "250 2.0.0 Ok: queued as" in swaks.stdout
        mailbox = home / "sandbox" / "mail" / "google"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list(mailbox.glob("*.eml")):
            time.sleep(0.25)
        [delivered] = list(mailbox.glob("*.eml"))
        text = delivered.read_text(errors="replace")
        assert f"dkim=pass header.d={info['domain']}" in text
        assert text.count("dkim=pass") == 2  # RSA and Ed25519
        # The simulated MX writes the message before the relay has read its 250 and committed
        # the attempt: wait for the row rather than race it.
        engine = make_engine(db_url)
        deadline = time.monotonic() + 30
        while True:
            with Session(engine) as s:
                events = s.exec(select(DeliveryEvent)).all()
            if events or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        engine.dispose()
        assert [(e.category, e.provider) for e in events] == [("delivered", "google")]
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=60)
    assert code == 0
    time.sleep(0.5)
    assert [pid for pid in children if _alive(pid)] == []
    assert not (home / "up.json").exists()


def test_a_part_that_fails_stops_the_rest_with_the_reason(tmp_path):
    # On SQLite only: the supervisor's stop-all does not depend on the database, and each run
    # starts Prefect before the relay fails (about 20 s); the whole start runs on both above.
    home = tmp_path / "home"
    env = _env(home, f"sqlite:///{tmp_path / 'axiom.db'}")
    host, port = env["AXIOM_SUBMISSION_LISTEN"].split(":")
    blocker = socket.socket()
    blocker.bind((host, int(port)))
    blocker.listen()
    try:
        result = subprocess.run(
            [str(VENV_BIN / "axiom"), "up"], env=env, capture_output=True, text=True, timeout=240
        )
    finally:
        blocker.close()
    assert result.returncode == 1
    assert "error: relay exited" in result.stderr
    assert "cannot listen" in result.stderr or "address already in use" in result.stderr.lower()
    # What had started before the relay (Prefect, the sandbox) was stopped with it.
    for listen in (env["AXIOM_PREFECT_LISTEN"], env["AXIOM_SANDBOX_DNS_LISTEN"]):
        h, p = listen.split(":")
        with socket.socket() as probe:
            assert probe.connect_ex((h, int(p))) != 0, f"{listen} still listening"


def test_the_path_line_is_printed_only_when_axiom_is_not_on_path():
    from axiom.up import path_hint

    assert path_hint(str(VENV_BIN)) is None
    assert path_hint("/usr/bin:/bin") == f'export PATH="{VENV_BIN}:$PATH"'

"""`axiom control` serves POST /slack/interactivity: bounded, verified, counted, and it decides.

The relay no longer has the endpoint (it answers 404 there); these run the real control
process on loopback with the fake Slack Web API, and watch its memory and its /metrics.
"""

from __future__ import annotations

import select
import socket
import time

import httpx
import pytest
from sqlmodel import func
from sqlmodel import select as sql_select

from models import Approval, AuditEntry
from models.db import make_engine, session_scope
from protocol.approvals import ApprovalDesk
from protocol.operators import add_operator
from runbooks.loader import checkpoints
from testbed.axiom import ControlProcess, RelayProcess
from tests.fakes.slack import FakeSlack, button_click, sign

pytestmark = pytest.mark.integration

SECRET = "0d7c5b4a3f2e1d0c9b8a7f6e5d4c3b2a"
FIFTY_MB = 50 * 1024 * 1024


@pytest.fixture
def control(axiom_home):
    process = ControlProcess(axiom_home, {"AXIOM_SLACK_SIGNING_SECRET": SECRET}).start()
    yield process
    assert process.stop() == 0, process.output()  # SIGTERM is a clean stop


# ---------------------------------------------------------------- the wiring
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the wiring, not the backend
def test_the_control_process_serves_slack_interactivity_and_the_relay_does_not(axiom_home, control):
    url = f"{control.url}/slack/interactivity"
    body = button_click(41, "approve", "U0NOBODY")
    assert httpx.post(url, content=body, timeout=10).status_code == 401
    health = httpx.get(f"{control.url}/healthz", timeout=10)
    assert health.status_code == 200
    assert health.json() == {"ok": True, "database": "ok", "slack_interactivity": "on"}
    signed = httpx.post(url, content=body, headers=sign(SECRET, body), timeout=10)
    assert signed.status_code == 200
    # The genuine click is refused by the desk (no such approval) and audited; the unsigned
    # request only counted.
    assert _wait_for_refusals(axiom_home.db_url, 1) == ["not_found"]
    assert control.refused("unsigned") == 1

    relay = RelayProcess(axiom_home).start()
    try:
        assert httpx.post(f"{relay.http}/slack/interactivity", content=body).status_code == 404
    finally:
        relay.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_without_a_signing_secret_the_endpoint_answers_503(axiom_home):
    process = ControlProcess(axiom_home).start()
    try:
        response = httpx.post(
            f"{process.url}/slack/interactivity", content=b"payload=%7B%7D", timeout=10
        )
        assert response.status_code == 503
        assert "AXIOM_SLACK_SIGNING_SECRET" in response.text
        health = httpx.get(f"{process.url}/healthz", timeout=10).json()
        assert health["slack_interactivity"] == "off: AXIOM_SLACK_SIGNING_SECRET is not set"
    finally:
        assert process.stop() == 0


# ---------------------------------------------------------------- hardening
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("framing", "signed", "status", "reason"),
    [
        # Content-Length says it all: 413 before the signature is even looked at.
        ("content-length", False, 413, "too_large"),
        # Chunked, with Slack's headers (a forged signature): cut off once past 64 KiB.
        ("chunked", True, 413, "too_large"),
        # Chunked without them: refused on its headers, the body never read.
        ("chunked", False, 401, "unsigned"),
    ],
)
def test_a_50_mb_body_is_refused_before_it_is_sent_and_memory_stays_flat(
    control, framing, signed, status, reason
):
    for _ in range(3):  # warm the code paths up before measuring
        _slow_post(control.port, framing, signed, total=256 * 1024)
    before = control.rss_kib()
    answered, sent, closed = _slow_post(control.port, framing, signed, total=FIFTY_MB)
    after = control.rss_kib()
    assert answered == status
    assert closed, "the server kept the connection open after refusing"
    assert sent < 8 * 1024 * 1024, f"{sent} bytes sent before the server closed"
    assert after - before < 4 * 1024, f"RSS grew {before} -> {after} KiB"
    assert control.refused(reason) == 4


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_thousand_unsigned_requests_write_no_audit_row_and_are_counted(axiom_home, control):
    rows = _audit_rows(axiom_home.db_url)
    body = button_click(7, "approve", "U0NOBODY")
    with httpx.Client(timeout=10) as client:
        for _ in range(1000):
            assert (
                client.post(f"{control.url}/slack/interactivity", content=body).status_code == 401
            )
    assert control.refused("unsigned") == 1000
    assert _audit_rows(axiom_home.db_url) == rows
    lines = [line for line in control.output().splitlines() if "refused (unsigned)" in line]
    assert len(lines) == 1  # one rate-limited line, not one per request


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_correctly_signed_click_decides(axiom_home):
    slack = FakeSlack()
    engine = make_engine(axiom_home.db_url)
    process = ControlProcess(
        axiom_home,
        {
            "AXIOM_SLACK_SIGNING_SECRET": SECRET,
            "AXIOM_SLACK_BOT_TOKEN": slack.token,
            "AXIOM_SLACK_CHANNEL": "C0APPROVALS",
            "AXIOM_SLACK_API_URL": slack.base_url,
        },
    ).start()
    try:
        with session_scope(engine) as s:
            add_operator(s, "alice", ["deliverability"], "U0ALICE")
            s.commit()
        runbook = checkpoints()
        approval = ApprovalDesk(engine).open(  # no run to resume: the row is the record
            checkpoint=runbook.spec.for_kind("stream.suspend"),
            subject="stream:acme/marketing",
            proposal={"action": "hold"},
            evidence={},
            runbook_id=runbook.id,
            runbook_version=runbook.version,
            flow_run_id=None,
        )
        body = button_click(approval.id, "approve", "U0ALICE")
        response = httpx.post(
            f"{process.url}/slack/interactivity", content=body, headers=sign(SECRET, body)
        )
        assert response.status_code == 200
        (reply,) = slack.wait_for("chat.postEphemeral")
        assert f"you approved approval #{approval.id}" in reply.args["text"]
        with session_scope(engine) as s:
            row = s.get(Approval, approval.id)
            assert (row.state, row.decided_by, row.decided_via) == ("approved", "alice", "slack")
    finally:
        assert process.stop() == 0
        engine.dispose()
        slack.close()


# ---------------------------------------------------------------- helpers
def _slow_post(port: int, framing: str, signed: bool, total: int) -> tuple[int, int, bool]:
    """POST `total` bytes in 64 KiB pieces, a little at a time, reading as it goes.

    signed: with a fresh timestamp and a (forged) signature header, as an attacker would.
    Returns (HTTP status, bytes of body sent, whether the server closed the connection).
    """
    head = "POST /slack/interactivity HTTP/1.1\r\nHost: control\r\n"
    if signed:
        for name, value in sign("not-the-secret", b"").items():
            head += f"{name}: {value}\r\n"
    if framing == "content-length":
        head += f"Content-Length: {total}\r\n"
    else:
        head += "Transfer-Encoding: chunked\r\n"
    piece = b"x" * (64 * 1024)
    framed = piece if framing == "content-length" else b"10000\r\n" + piece + b"\r\n"
    reply, sent, closed = b"", 0, False
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall((head + "\r\n").encode())
        deadline = time.monotonic() + 60
        while sent < total and time.monotonic() < deadline:
            readable, _, _ = select.select([sock], [], [], 0.005)
            if readable:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                if not data:
                    closed = True
                    break
                reply += data
                continue
            try:
                sock.sendall(framed)
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            sent += len(piece)
        while not closed and time.monotonic() < deadline:  # the body was all sent
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                closed = True
            reply += data
    status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0
    return status, sent, closed


def _audit_rows(db_url: str) -> int:
    engine = make_engine(db_url)
    try:
        with session_scope(engine) as s:
            return s.exec(sql_select(func.count()).select_from(AuditEntry)).one()
    finally:
        engine.dispose()


def _wait_for_refusals(db_url: str, count: int, timeout: float = 30) -> list[str]:
    engine = make_engine(db_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with session_scope(engine) as s:
                rows = s.exec(
                    sql_select(AuditEntry).where(AuditEntry.action == "approval.refused")
                ).all()
            if len(rows) >= count or time.monotonic() > deadline:
                return [r.evidence["reason"] for r in rows]
            time.sleep(0.1)
    finally:
        engine.dispose()

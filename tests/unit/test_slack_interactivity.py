"""POST /slack/interactivity: bounded, verified before parsed, acknowledged at once, refusals counted."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry
from slack_sdk import WebClient
from sqlmodel import col, func, select
from starlette.applications import Starlette
from starlette.testclient import TestClient

from models import AuditEntry
from models.audit_trail import verify
from models.db import make_engine, migrate, session_scope
from notifications.interactivity import MAX_BODY_BYTES, Refusals, SlackInteractivity
from notifications.slack import SlackNotifier
from protocol.approvals import ApprovalDesk, Resumed
from protocol.operators import add_operator
from runbooks.loader import checkpoints
from tests.fakes.slack import FakeSlack, button_click, form_submission, sign

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
CHANNEL = "C0APPROVALS"


@dataclass
class SlowResumer:
    """Prefect taking its time: the click must still be acknowledged at once."""

    delay: float = 0.0
    calls: list[tuple[str, dict]] = field(default_factory=list)

    def __call__(self, flow_run_id: str, run_input: dict) -> Resumed:
        time.sleep(self.delay)
        self.calls.append((flow_run_id, run_input))
        return Resumed(True, "ACCEPT")


@dataclass
class World:
    desk: ApprovalDesk
    slack: FakeSlack
    client: TestClient
    endpoint: SlackInteractivity
    resumer: SlowResumer
    registry: CollectorRegistry

    def open(self) -> int:
        runbook = checkpoints()
        approval = self.desk.open(
            checkpoint=runbook.spec.for_kind("stream.suspend"),
            subject="stream:acme/marketing",
            proposal={"action": "hold"},
            evidence={},
            runbook_id=runbook.id,
            runbook_version=runbook.version,
            flow_run_id="11111111-0000-4000-8000-000000000001",
        )
        self.desk.announce(approval.id, stop=threading.Event())
        return approval.id

    def post(self, body: bytes, headers: dict | None = None, secret: str = SECRET):
        return self.client.post(
            "/slack/interactivity", content=body, headers=sign(secret, body) | (headers or {})
        )

    def replies(self, count: int = 1) -> list[str]:
        return [c.args["text"] for c in self.slack.wait_for("chat.postEphemeral", count)]

    def settle(self) -> None:
        self.client.portal.call(self.endpoint.drain)

    def refusals(self) -> list[tuple[str, dict]]:
        with session_scope(self.desk.engine) as s:
            rows = s.exec(
                select(AuditEntry)
                .where(AuditEntry.action == "approval.refused")
                .order_by(col(AuditEntry.id))
            ).all()
            return [(r.actor, r.evidence) for r in rows]

    def audit_rows(self) -> int:
        with session_scope(self.desk.engine) as s:
            return s.exec(select(func.count()).select_from(AuditEntry)).one()

    def refused(self, reason: str) -> float:
        """axiom_slack_requests_refused_total{reason} as the control process exports it."""
        value = self.registry.get_sample_value(
            "axiom_slack_requests_refused_total", {"reason": reason}
        )
        assert value is not None
        return value

    def state(self, approval_id: int) -> str:
        return self.desk.get(approval_id).state


@pytest.fixture
def world(tmp_path):
    url = f"sqlite:///{tmp_path / 'axiom.db'}"
    migrate(url)
    engine = make_engine(url)
    with session_scope(engine) as s:
        add_operator(s, "alice", ["deliverability"], "U0ALICE")
        add_operator(s, "carol", [], "U0CAROL")
        s.commit()
    slack = FakeSlack()
    notifier = SlackNotifier(
        WebClient(token=slack.token, base_url=slack.base_url, retry_handlers=[]),
        CHANNEL,
        ui_url="http://127.0.0.1:4200",
    )
    resumer = SlowResumer()
    desk = ApprovalDesk(engine, resume=resumer, notifier=notifier, retry_initial=0.05)
    registry = CollectorRegistry()
    endpoint = SlackInteractivity(
        signing_secret=SECRET, desk=desk, slack=notifier, refusals=Refusals(registry)
    )
    with TestClient(Starlette(routes=endpoint.routes())) as client:
        yield World(desk, slack, client, endpoint, resumer, registry)
    slack.close()
    engine.dispose()


def test_a_signed_click_is_acknowledged_at_once_then_recorded_resumed_and_shown(world):
    world.resumer.delay = 2.0  # Prefect slow to answer
    approval_id = world.open()
    started = time.monotonic()
    response = world.post(button_click(approval_id, "approve", "U0ALICE"))
    assert response.status_code == 200
    assert time.monotonic() - started < 1.0  # Slack gives up after 3 s
    world.settle()
    row = world.desk.get(approval_id)
    assert (row.state, row.decided_by, row.decided_via) == ("approved", "alice", "slack")
    assert world.resumer.calls[0][1]["operator"] == "alice"
    (reply,) = world.replies()
    assert f"you approved approval #{approval_id}" in reply
    (update,) = world.slack.calls_to("chat.update")
    assert "*Approved* by alice via slack" in str(update.args["blocks"])
    with session_scope(world.desk.engine) as s:
        assert verify(s)[1] is None


def test_without_a_signing_secret_the_endpoint_is_off(world):
    world.endpoint.verifier = None
    response = world.post(button_click(1, "approve", "U0ALICE"))
    assert response.status_code == 503
    assert "AXIOM_SLACK_SIGNING_SECRET" in response.text
    assert world.refused("not_configured") == 1


def test_unsigned_request_is_refused_counted_and_not_audited(world):
    approval_id = world.open()
    rows = world.audit_rows()
    response = world.client.post(
        "/slack/interactivity", content=button_click(approval_id, "approve", "U0ALICE")
    )
    assert response.status_code == 401
    assert response.headers["connection"] == "close"  # an unread body is never drained
    assert world.refused("unsigned") == 1
    assert world.audit_rows() == rows  # an attacker cannot grow the audit trail
    assert world.state(approval_id) == "pending"


def test_forged_signature_is_refused_before_parsing(world):
    approval_id = world.open()
    response = world.post(button_click(approval_id, "approve", "U0ALICE"), secret="not-the-secret")
    assert (response.status_code, response.text) == (401, "bad signature")
    # A body that is not even a Slack payload is refused the same way: nothing was parsed.
    assert world.post(b"\xff\xfe garbage", secret="wrong").status_code == 401
    assert world.refused("bad_signature") == 2
    assert world.refusals() == []
    assert world.state(approval_id) == "pending"
    assert world.resumer.calls == []


def test_stale_timestamp_is_refused(world):
    approval_id = world.open()
    body = button_click(approval_id, "approve", "U0ALICE")
    stale = sign(SECRET, body, timestamp=int(time.time()) - 301)
    response = world.client.post("/slack/interactivity", content=body, headers=stale)
    assert response.status_code == 403
    assert "stale" in response.text
    assert world.refused("stale") == 1
    assert world.state(approval_id) == "pending"


def test_a_replayed_request_is_refused(world):
    approval_id = world.open()
    body = button_click(approval_id, "reject", "U0ALICE")
    headers = sign(SECRET, body)
    first = world.client.post("/slack/interactivity", content=body, headers=headers)
    again = world.client.post("/slack/interactivity", content=body, headers=headers)
    assert (first.status_code, again.status_code) == (200, 403)
    assert "replayed" in again.text
    assert world.refused("replay") == 1
    world.settle()
    assert world.state(approval_id) == "rejected"
    assert len(world.resumer.calls) == 1


# ---------------------------------------------------------------- size limit and floods
class Sender:
    """An ASGI client that hands the body over chunk by chunk and counts what was taken."""

    def __init__(self, chunks: int, chunk_size: int = 16 * 1024):
        self.left = chunks
        self.chunk = b"x" * chunk_size
        self.taken = 0

    async def receive(self) -> dict:
        if self.left == 0:
            return {"type": "http.request", "body": b"", "more_body": False}
        self.left -= 1
        self.taken += 1
        return {"type": "http.request", "body": self.chunk, "more_body": self.left > 0}


def send(world: World, sender: Sender, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/slack/interactivity",
        "raw_path": b"/slack/interactivity",
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("192.0.2.7", 40000),
        "server": ("127.0.0.1", 8026),
    }
    sent: list[dict] = []

    async def collect(message: dict) -> None:
        sent.append(message)

    app = Starlette(routes=world.endpoint.routes())
    asyncio.run(app(scope, sender.receive, collect))
    start = sent[0]
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}


def test_a_body_declared_too_large_is_refused_before_any_of_it_is_read(world):
    sender = Sender(chunks=50 * 64)  # 50 MiB
    body = button_click(1, "approve", "U0ALICE")
    headers = sign(SECRET, body) | {"Content-Length": str(50 * 1024 * 1024)}
    status, sent_headers = send(world, sender, headers)
    assert (status, sender.taken) == (413, 0)
    assert sent_headers["connection"] == "close"
    assert world.refused("too_large") == 1


def test_a_chunked_body_is_cut_off_as_soon_as_it_passes_the_limit(world):
    sender = Sender(chunks=50 * 64)  # no Content-Length: counted while it streams
    body = button_click(1, "approve", "U0ALICE")
    status, sent_headers = send(world, sender, sign(SECRET, body))
    assert status == 413
    assert sender.taken == MAX_BODY_BYTES // (16 * 1024) + 1  # one chunk past the limit
    assert sent_headers["connection"] == "close"
    assert world.refused("too_large") == 1


def test_an_oversized_unsigned_body_is_413_not_401(world):
    response = world.client.post(
        "/slack/interactivity", content=b"x" * (MAX_BODY_BYTES + 1)
    )  # Content-Length is checked before the signature headers
    assert response.status_code == 413
    assert (world.refused("too_large"), world.refused("unsigned")) == (1, 0)


def test_a_thousand_unsigned_requests_write_no_audit_row_and_count_a_thousand(world, caplog):
    approval_id = world.open()
    rows = world.audit_rows()
    body = button_click(approval_id, "approve", "U0ALICE")
    with caplog.at_level(logging.WARNING, logger="axiom.slack.interactivity"):
        for _ in range(1000):
            assert world.client.post("/slack/interactivity", content=body).status_code == 401
    assert world.refused("unsigned") == 1000
    assert world.audit_rows() == rows
    assert len(caplog.records) == 1  # the log line is rate-limited; the counter is not
    assert world.state(approval_id) == "pending"


def test_refusals_are_logged_once_per_reason_per_interval_with_the_count_meanwhile(caplog):
    now = [1000.0]
    registry = CollectorRegistry()
    refusals = Refusals(registry, every=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="axiom.slack.interactivity"):
        for _ in range(500):
            refusals.refuse("bad_signature", "192.0.2.7", "bad signature")
        refusals.refuse("too_large", "192.0.2.8", "too large")  # its own reason, its own line
        now[0] += 9.9
        refusals.refuse("bad_signature", "192.0.2.7", "bad signature")
        now[0] += 0.2
        refusals.refuse("bad_signature", "192.0.2.9", "bad signature")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert lines[0] == "Slack request from 192.0.2.7 refused (bad_signature): bad signature"
    assert lines[1].startswith("Slack request from 192.0.2.8 refused (too_large)")
    assert "192.0.2.9" in lines[2]
    assert "500 more refused for bad_signature in the 10 s since the last such line" in lines[2]
    counted = registry.get_sample_value(
        "axiom_slack_requests_refused_total", {"reason": "bad_signature"}
    )
    assert counted == 502


def test_unknown_slack_user_is_told_how_to_get_registered(world):
    approval_id = world.open()
    assert world.post(button_click(approval_id, "approve", "U0MALLORY")).status_code == 200
    world.settle()
    (reply,) = world.replies()
    assert "not a registered operator" in reply and "--slack-id U0MALLORY" in reply
    actor, evidence = world.refusals()[-1]
    assert (actor, evidence["reason"]) == ("slack:U0MALLORY", "unknown_operator")
    assert world.slack.calls_to("chat.postEphemeral")[0].args["user"] == "U0MALLORY"
    assert world.state(approval_id) == "pending"


def test_a_user_without_the_role_is_refused(world):
    approval_id = world.open()
    world.post(button_click(approval_id, "approve", "U0CAROL"))
    world.settle()
    (reply,) = world.replies()
    assert f"You may not answer approval #{approval_id}" in reply
    assert "needs one of [deliverability, lead]" in reply
    assert world.refusals()[-1][1]["reason"] == "not_allowed"
    assert world.state(approval_id) == "pending"


def test_double_click_records_the_first_only(world):
    approval_id = world.open()
    world.post(button_click(approval_id, "approve", "U0ALICE"))
    world.settle()
    world.post(button_click(approval_id, "reject", "U0ALICE"))
    world.settle()
    first, second = world.replies(2)
    assert "you approved" in first
    assert "was already answered: approved by alice via slack" in second
    assert world.state(approval_id) == "approved"
    assert len(world.resumer.calls) == 1
    assert world.refusals()[-1][1]["reason"] == "already_decided"


def test_an_answer_after_expiry_is_refused(world):
    approval_id = world.open()
    world.desk.clock = lambda: world.desk.get(approval_id).expires_at
    world.post(button_click(approval_id, "approve", "U0ALICE"))
    world.settle()
    (reply,) = world.replies()
    assert f"Approval #{approval_id} has expired" in reply
    assert world.refusals()[-1][1]["reason"] == "expired"


def test_comment_button_opens_a_form_whose_submission_decides(world):
    approval_id = world.open()
    world.post(button_click(approval_id, "comment", "U0ALICE"))
    world.settle()
    (opened,) = world.slack.calls_to("views.open")
    assert opened.args["trigger_id"].startswith(f"trigger-{approval_id}-")
    assert opened.args["view"]["callback_id"] == "approval.comment"
    assert world.state(approval_id) == "pending"  # opening the form decides nothing
    response = world.post(form_submission(approval_id, "reject", "bounce rate is fine", "U0ALICE"))
    assert (response.status_code, response.text) == (200, "")  # empty 200 closes the form
    world.settle()
    row = world.desk.get(approval_id)
    assert (row.state, row.comment) == ("rejected", "bounce rate is fine")


def test_a_form_without_a_choice_is_an_invalid_answer(world):
    approval_id = world.open()
    world.post(form_submission(approval_id, "", "", "U0ALICE"))
    world.settle()
    (reply,) = world.replies()
    assert "was not valid" in reply
    assert world.refusals()[-1][1]["reason"] == "invalid_answer"


def test_unexpected_failures_get_an_error_id_shown_and_logged(world, caplog):
    approval_id = world.open()

    def broken(*_):
        raise RuntimeError("database on fire")

    world.desk.decide = broken
    world.post(button_click(approval_id, "approve", "U0ALICE"))
    world.settle()
    (reply,) = world.replies()
    error_id = reply.split("error id ")[1].split(")")[0]
    assert len(error_id) == 8
    assert any(error_id in r.getMessage() for r in caplog.records)


def test_signed_payloads_of_other_kinds_are_acknowledged_and_ignored(world):
    body = b"payload=" + b"%7B%22type%22%3A%20%22view_closed%22%7D"
    response = world.post(body)
    assert response.status_code == 200 and response.json()["ignored"] == "view_closed"
    assert world.post(b"nopayload=1").status_code == 400

"""POST /slack/interactivity: verified before parsed, acknowledged at once, every refusal told."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest
from slack_sdk import WebClient
from sqlmodel import col, select
from starlette.testclient import TestClient

from models import AuditEntry
from models.audit_trail import verify
from models.db import make_engine, migrate, session_scope
from notifications.interactivity import SlackInteractivity
from notifications.slack import SlackNotifier
from protocol.approvals import ApprovalDesk, Resumed
from protocol.operators import add_operator
from relay.http import build_app
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
    desk = ApprovalDesk(engine, resume=resumer, slack=notifier, slack_retry_initial=0.05)
    endpoint = SlackInteractivity(signing_secret=SECRET, desk=desk, slack=notifier)

    async def healthy():
        return True, {}

    with TestClient(build_app(healthy, endpoint.routes())) as client:
        yield World(desk, slack, client, endpoint, resumer)
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


def test_unsigned_request_is_refused_and_audited(world):
    approval_id = world.open()
    response = world.client.post(
        "/slack/interactivity", content=button_click(approval_id, "approve", "U0ALICE")
    )
    assert response.status_code == 401
    actor, evidence = world.refusals()[-1]
    assert (actor, evidence["reason"]) == ("slack:unverified", "unsigned")
    assert world.state(approval_id) == "pending"


def test_forged_signature_is_refused_before_parsing(world):
    approval_id = world.open()
    response = world.post(button_click(approval_id, "approve", "U0ALICE"), secret="not-the-secret")
    assert (response.status_code, response.text) == (401, "bad signature")
    assert world.refusals()[-1][1]["reason"] == "bad_signature"
    # A body that is not even a Slack payload is refused the same way: nothing was parsed.
    assert world.post(b"\xff\xfe garbage", secret="wrong").status_code == 401
    assert world.state(approval_id) == "pending"
    assert world.resumer.calls == []


def test_stale_timestamp_is_refused(world):
    approval_id = world.open()
    body = button_click(approval_id, "approve", "U0ALICE")
    stale = sign(SECRET, body, timestamp=int(time.time()) - 301)
    response = world.client.post("/slack/interactivity", content=body, headers=stale)
    assert response.status_code == 403
    assert "stale" in response.text
    assert world.refusals()[-1][1]["reason"] == "stale_timestamp"
    assert world.state(approval_id) == "pending"


def test_a_replayed_request_is_refused(world):
    approval_id = world.open()
    body = button_click(approval_id, "reject", "U0ALICE")
    headers = sign(SECRET, body)
    first = world.client.post("/slack/interactivity", content=body, headers=headers)
    again = world.client.post("/slack/interactivity", content=body, headers=headers)
    assert (first.status_code, again.status_code) == (200, 403)
    assert "replayed" in again.text
    assert world.refusals()[-1][1]["reason"] == "replayed"
    world.settle()
    assert world.state(approval_id) == "rejected"
    assert len(world.resumer.calls) == 1


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

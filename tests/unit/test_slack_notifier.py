"""Approval messages in Slack: layout, updates, alerts, and outages that lose nothing."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from slack_sdk import WebClient

from config.settings import load_settings
from models.db import make_engine, migrate, session_scope
from notifications.desk import approval_desk
from notifications.slack import SlackNotifier, SlackUnavailable, approval_channels
from protocol.approvals import Answer, ApprovalDesk, NotifierUnavailable, PrefectResumer, Resumed
from protocol.operators import add_operator
from runbooks.loader import checkpoints
from tests.fakes.slack import FakeSlack


@pytest.fixture
def slack():
    fake = FakeSlack()
    yield fake
    fake.close()


@pytest.fixture
def sqlite_engine(tmp_path):
    url = f"sqlite:///{tmp_path / 'axiom.db'}"
    migrate(url)
    engine = make_engine(url)
    with session_scope(engine) as s:
        add_operator(s, "alice", ["deliverability"], "U0ALICE")
        s.commit()
    yield engine
    engine.dispose()


def notifier(slack: FakeSlack, language: str = "en") -> SlackNotifier:
    client = WebClient(token=slack.token, base_url=slack.base_url, retry_handlers=[])
    return SlackNotifier(client, "C0APPROVALS", language=language, ui_url="http://127.0.0.1:4200")


def make_desk(engine, slack: FakeSlack, **kwargs) -> ApprovalDesk:
    return ApprovalDesk(
        engine,
        resume=lambda run, data: Resumed(True, "ACCEPT"),
        notifier=notifier(slack),
        retry_initial=0.05,
        **kwargs,
    )


def open_approval(desk: ApprovalDesk, **evidence):
    runbook = checkpoints()
    return desk.open(
        checkpoint=runbook.spec.for_kind("stream.suspend"),
        subject="stream:acme/marketing",
        proposal={"action": "hold acme/marketing", "reason": "spam trap hits"},
        evidence=evidence or {"queued recipients": 12},
        runbook_id=runbook.id,
        runbook_version=runbook.version,
        flow_run_id="0f0f0f0f-0000-4000-8000-000000000001",
    )


def all_text(blocks: list[dict]) -> str:
    parts = []
    for block in blocks:
        if "text" in block:
            parts.append(block["text"]["text"])
        for element in block.get("elements", []):
            parts.append(element["text"] if isinstance(element["text"], str) else "")
    return "\n".join(parts)


def announce(desk: ApprovalDesk, approval_id: int) -> None:
    stop = threading.Event()
    worker = threading.Thread(target=desk.announce, args=(approval_id, stop))
    worker.start()
    worker.join(20)
    assert not worker.is_alive()


def test_request_message_has_proposal_evidence_runbook_link_and_buttons(sqlite_engine, slack):
    desk = make_desk(sqlite_engine, slack)
    approval = open_approval(desk, **{"sample": "<!channel> & <http://evil|click>"})
    announce(desk, approval.id)
    (call,) = slack.calls_to("chat.postMessage")
    assert call.token == slack.token and call.args["channel"] == "C0APPROVALS"
    blocks = call.args["blocks"]
    text = all_text(blocks)
    assert f"Approval #{approval.id}: stream.suspend" in text
    assert "hold acme/marketing" in text and "spam trap hits" in text
    assert "Runbook `checkpoints` v1.0" in text
    assert "<http://127.0.0.1:4200/runs/flow-run/0f0f0f0f-0000-4000-8000-000000000001|" in text
    assert f"axiom approve {approval.id} --as NAME" in text
    # Evidence is data: shown, never acted on by Slack.
    assert "&lt;!channel&gt; &amp; &lt;http://evil|click&gt;" in text
    assert "<!channel>" not in text
    (actions,) = [b for b in blocks if b["type"] == "actions"]
    assert [(e["action_id"], e["value"]) for e in actions["elements"]] == [
        ("approval.approve", str(approval.id)),
        ("approval.reject", str(approval.id)),
        ("approval.comment", str(approval.id)),
    ]
    row = desk.get(approval.id)
    assert (row.slack_channel, row.slack_ts) == ("C0APPROVALS", "1700000000.000001")


def test_decision_replaces_the_buttons_with_who_and_when(sqlite_engine, slack):
    desk = make_desk(sqlite_engine, slack)
    approval = open_approval(desk)
    announce(desk, approval.id)
    desk.decide(Answer(approval.id, "approve", "cli", operator="alice", comment="go"))
    (update,) = slack.calls_to("chat.update")
    assert update.args["ts"] == desk.get(approval.id).slack_ts
    assert not [b for b in update.args["blocks"] if b["type"] == "actions"]
    text = all_text(update.args["blocks"])
    assert "*Approved* by alice via cli at " in text and "> go" in text


def test_expiry_updates_the_message_and_escalates(sqlite_engine, slack):
    desk = make_desk(sqlite_engine, slack)
    approval = open_approval(desk)
    announce(desk, approval.id)
    later = desk.clock() + timedelta(hours=2)
    desk.clock = lambda: later
    desk.expire(approval.id)
    (update,) = slack.calls_to("chat.update")
    assert "*Expired* at" in all_text(update.args["blocks"])
    alerts = slack.calls_to("chat.postMessage")[1:]
    assert len(alerts) == 1 and f"No one answered approval #{approval.id}" in alerts[0].args["text"]


def test_an_outage_delays_the_message_but_loses_nothing(sqlite_engine, slack):
    slack.fail("unavailable", times=2)
    desk = make_desk(sqlite_engine, slack)
    approval = open_approval(desk)
    started = time.monotonic()
    announce(desk, approval.id)
    assert len(slack.calls_to("chat.postMessage")) == 3  # 503, 503, then posted
    assert time.monotonic() - started >= 0.05 + 0.1  # backed off, doubling
    assert desk.get(approval.id).slack_ts is not None


def test_rate_limits_are_retried_too(sqlite_engine, slack):
    slack.fail("ratelimited", times=1)
    desk = make_desk(sqlite_engine, slack)
    approval = open_approval(desk)
    announce(desk, approval.id)
    assert desk.get(approval.id).slack_ts is not None


def test_a_permanent_refusal_stops_retrying_and_the_checkpoint_stays_answerable(
    sqlite_engine, slack
):
    slack.fail("invalid_auth", times=None)
    desk = make_desk(sqlite_engine, slack)
    approval = open_approval(desk)
    announce(desk, approval.id)
    assert len(slack.calls_to("chat.postMessage")) == 1
    desk.decide(Answer(approval.id, "approve", "cli", operator="alice"))
    assert desk.get(approval.id).state == "approved"


def test_a_long_outage_retries_until_answered_elsewhere(sqlite_engine, slack):
    slack.fail("unavailable", times=None)
    desk = make_desk(sqlite_engine, slack)
    approval = open_approval(desk)
    stop = threading.Event()
    worker = threading.Thread(target=desk.announce, args=(approval.id, stop))
    worker.start()
    slack.wait_for("chat.postMessage", count=2)
    desk.decide(Answer(approval.id, "reject", "cli", operator="alice"))
    worker.join(10)  # sees the row decided at its next attempt and gives up
    assert not worker.is_alive()
    assert desk.get(approval.id).slack_ts is None


def test_unreachable_slack_is_a_transient_failure(slack):
    slack.close()
    with pytest.raises(SlackUnavailable) as failure:
        notifier(slack).tell("C1", "U1", "hello")
    assert failure.value.transient
    # What the approval desk catches: it knows notifiers, not Slack.
    assert isinstance(failure.value, NotifierUnavailable)


def test_the_desk_from_settings_notifies_in_slack_only_when_it_is_set_up(sqlite_engine, slack):
    bare = approval_desk(load_settings(slack_bot_token=None, slack_channel=None), sqlite_engine)
    assert bare.notifier is None and isinstance(bare.resume, PrefectResumer)
    wired = approval_desk(
        load_settings(
            slack_bot_token=slack.token,
            slack_channel="C0APPROVALS",
            slack_api_url=slack.base_url,
            slack_retry_initial_seconds=0.25,
        ),
        sqlite_engine,
    )
    assert isinstance(wired.notifier, SlackNotifier) and wired.retry_initial == 0.25
    approval = open_approval(wired)
    announce(wired, approval.id)
    (posted,) = slack.calls_to("chat.postMessage")
    assert posted.args["channel"] == "C0APPROVALS"
    assert wired.get(approval.id).slack_ts is not None


def test_without_token_or_channel_there_is_no_notifier_and_the_cli_says_where_to_answer():
    settings = load_settings(slack_bot_token=None, slack_channel=None)
    assert SlackNotifier.from_settings(settings) is None
    assert "the Prefect UI" in approval_channels(settings)
    assert "axiom approve ID --as NAME" in approval_channels(settings)
    configured = load_settings(slack_bot_token="xoxb-1", slack_channel="C0APPROVALS")
    assert "Slack channel C0APPROVALS" in approval_channels(configured)


def test_alerts_render_from_templates(slack):
    from models import Suspension

    suspension = Suspension(
        source_ip="127.0.0.2",
        provider="gmail",
        action="suspend",
        reason="421 4.7.28",
        rule_id="gmail-unusual-rate",
        expires_at=None,  # type: ignore[arg-type]
    )
    notifier(slack, "it").alert("slack_alert_reaction", suspension=suspension, until="10:00 UTC")
    (call,) = slack.calls_to("chat.postMessage")
    assert "Reazione protettiva" in call.args["text"] and "127.0.0.2" in call.args["text"]

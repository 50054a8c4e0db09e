"""Message templates: both languages, Slack escaping of data, no silently missing variable."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from jinja2 import UndefinedError

from models import Approval, Incident, Suspension
from notifications.templates import LANGUAGES, TEMPLATE_DIR, render


def sample_approval(**changes) -> Approval:
    fields = dict(
        id=7,
        kind="stream.suspend",
        subject="stream:acme/<marketing>",
        proposal={"action": "hold"},
        evidence={},
        allowed_roles="deliverability,lead",
        safe_default="do_nothing_and_escalate",
        runbook_id="checkpoints",
        runbook_version="1.0",
        flow_run_id="f00",
        state="approved",
        decided_by="alice",
        decided_via="slack",
        comment="ok & <!channel>",
        expires_at=datetime(2026, 3, 2, 10, 0, tzinfo=UTC),
        decided_at=datetime(2026, 3, 2, 9, 30, tzinfo=UTC),
    )
    return Approval(**(fields | changes))


CONTEXTS = {
    "slack_approval_request": dict(
        approval=sample_approval(state="pending"),
        proposal=[("action", "hold")],
        evidence=[("queued", "12")],
    ),
    "slack_approval_context": dict(
        approval=sample_approval(state="pending"),
        expires_at="2026-03-02 10:00 UTC",
        roles=["deliverability", "lead"],
        flow_run_url="http://127.0.0.1:4200/runs/flow-run/f00",
    ),
    "slack_approval_outcome": dict(approval=sample_approval(), decided_at="2026-03-02 09:30 UTC"),
    "slack_approval_fallback": dict(approval=sample_approval(), decided_at="2026-03-02 09:30 UTC"),
    "slack_reply": dict(
        reason="already_decided", approval_id=7, detail="approved by alice", claimed="U1"
    ),
    "slack_alert_escalation": dict(
        approval=sample_approval(state="expired"), expired_at="10:00", roles=["lead"]
    ),
    "slack_incident": dict(
        incident=Incident(
            id=3,
            key="repeated-reactions:path:127.0.0.2/gmail",
            subject="path:127.0.0.2/gmail",
            cause="repeated-reactions",
            severity="warning",
            summary="3 reactions in 24 h",
        ),
        cause="repeated protective reactions",
        opened="2026-03-02 09:00 UTC",
        timeline=[
            dict(at="09:00", kind="signal", actor="relay:reaction:r", summary="suspend"),
        ],
        hidden=2,
    ),
    "prefect_incident_report": dict(
        incident=Incident(
            id=3,
            key="repeated-reactions:path:127.0.0.2/gmail",
            subject="path:127.0.0.2/gmail",
            cause="repeated-reactions",
            severity="critical",
            summary="s",
        ),
        cause="repeated protective reactions",
        opened="2026-03-02 09:00",
        updated="2026-03-02 10:00",
        timeline=[
            dict(
                at="09:00",
                kind="signal",
                actor="relay:reaction:r",
                summary="suspend",
                audit_entry_id=12,
            ),
        ],
    ),
    "slack_reactions": dict(
        subject="path:127.0.0.2/gmail",
        count=2,
        since="09:00",
        reactions=[
            dict(
                at="09:00",
                action="suspend",
                limit_per_minute=None,
                until="10:00",
                rule="gmail-unusual-rate",
                reply="421 4.7.28",
            )
        ],
        incident_id=None,
    ),
    "slack_alert_reaction": dict(
        suspension=Suspension(
            source_ip="127.0.0.2",
            provider="gmail",
            action="suspend",
            reason="421 4.7.28",
            rule_id="gmail-unusual-rate",
            expires_at=datetime(2026, 3, 2, 10, 0, tzinfo=UTC),
        ),
        until="10:00 UTC",
    ),
    "prefect_approval_form": dict(
        title="Hold a stream",
        approval=sample_approval(state="pending"),
        proposal=[("action", "hold")],
        evidence=[],
        roles=["deliverability"],
        expires_at="2026-03-02 10:00 UTC",
    ),
}


def test_every_template_exists_in_every_language_and_is_exercised_here():
    names = {lang: {p.stem for p in (TEMPLATE_DIR / lang).glob("*.j2")} for lang in LANGUAGES}
    assert names["en"] == names["it"]
    assert names["en"] >= set(CONTEXTS)
    assert {n for n in names["en"] if n.startswith(("slack_", "prefect_"))} == set(CONTEXTS)


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("name", sorted(CONTEXTS))
def test_renders_in_each_language(name, language):
    text = render(name, language, **CONTEXTS[name])
    assert text and "{{" not in text and "{%" not in text


def test_data_is_escaped_for_slack_but_quotes_stay_quotes():
    text = render("slack_approval_outcome", "en", **CONTEXTS["slack_approval_outcome"])
    assert "ok &amp; &lt;!channel&gt;" in text
    assert "<!channel>" not in text
    reply = render(
        "slack_reply", "en", reason="invalid_answer", approval_id=1, detail='"maybe" isn\'t one'
    )
    assert '"maybe" isn\'t one' in reply


def test_the_italian_texts_are_italian():
    text = render("slack_approval_outcome", "it", **CONTEXTS["slack_approval_outcome"])
    assert "Approvata* da alice" in text


def test_a_missing_variable_is_an_error_not_a_blank():
    with pytest.raises(UndefinedError):
        render("slack_approval_outcome", "en", approval=sample_approval())


def test_an_unknown_language_is_refused():
    with pytest.raises(ValueError, match="no templates for language 'de'"):
        render("slack_reply", "de", reason="x", approval_id=1, detail="")

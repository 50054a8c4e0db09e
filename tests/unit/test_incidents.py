"""Incidents and the announcements of the relay's reactions (issue 12 §3, §6).

Reactions are written by the relay's own ReactionEngine (the audit entries the relay writes
in production); the watch reads them, groups them per path and window, and opens an incident
when they recur; Slack is the local fake Web API; the CLI runs as a real process.
"""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
from slack_sdk import WebClient
from sqlmodel import select

from models import Announcement, AuditEntry, Incident, IncidentEvent
from models.audit_trail import verify
from models.db import session_scope
from notifications.announce import announce_reactions, incident_report, publish_incident
from notifications.slack import SlackNotifier
from protocol import incidents
from protocol.announcements import decide, read_reactions, record_reactions
from protocol.errors import ServiceError
from protocol.operators import add_operator
from relay.delivery.reactions import Reaction, ReactionEngine
from runbooks.loader import reactions_watch, shaping
from testbed import cli as axiom_cli
from tests.fakes.slack import FakeSlack

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
GOOGLE = next(r for r in shaping().spec.reactions if r.id == "google-unusual-rate")


def _react(engine, ip: str, at: datetime, provider: str = "google") -> None:
    """What the relay does when Gmail answers 421 4.7.28: a suspension and its audit entry."""
    relay = ReactionEngine([GOOGLE], shaping().version)
    created = relay.apply(
        engine, [Reaction(GOOGLE, ip, provider, "421 4.7.28 unusual rate of mail")], at
    )
    assert created


def _signal(s, subject, cause, severity, summary, actor="flow:a", at=T0):
    """A signal reported to the incidents service, as a runbook reports one."""
    return incidents.report(
        s, subject=subject, cause=cause, severity=severity, summary=summary, actor=actor, now=at
    )


def _watch(engine, at: datetime):
    return record_reactions(
        engine, read_reactions(engine), reactions_watch(), actor="flow:test", now=at
    )


def _notifier(fake: FakeSlack) -> SlackNotifier:
    client = WebClient(token=fake.token, base_url=fake.base_url, retry_handlers=[])
    return SlackNotifier(client, "C0OPS", language="en", ui_url=None)


# ---------------------------------------------------------------- incidents
def test_one_cause_on_one_subject_is_one_incident_until_it_is_resolved(engine):
    with session_scope(engine) as s:
        first = _signal(s, "ip:127.0.0.10", "listed", "warning", "one zone")
        again = _signal(
            s, "ip:127.0.0.10", "listed", "critical", "two zones", at=T0 + timedelta(minutes=5)
        )
        other = _signal(s, "ip:127.0.0.11", "listed", "info", "x")
        s.commit()
        assert first.opened and not again.opened and other.opened
        assert again.incident.id == first.incident.id != other.incident.id
        incident = s.get(Incident, first.incident.id)
        assert (incident.occurrences, incident.severity, incident.summary) == (
            2,
            "critical",
            "two zones",
        )
        later = T0 + timedelta(minutes=10)
        incidents.transition(s, incident.id, "mitigating", actor="operator:alice", now=later)
        incidents.transition(
            s, incident.id, "resolved", actor="operator:alice", note="delisted", now=later
        )
        s.commit()
        recurrence = _signal(
            s, "ip:127.0.0.10", "listed", "warning", "again", at=T0 + timedelta(days=1)
        )
        s.commit()
        assert recurrence.opened and recurrence.incident.id != incident.id
        events = incidents.timeline(s, incident.id)
        assert [e.kind for e in events] == ["signal", "signal", "state", "state"]
        assert events[-1].summary == "mitigating → resolved: delisted"
        linked = {e.audit_entry_id for e in events}
        entries = {a.id: a for a in s.exec(select(AuditEntry)).all()}
        assert linked <= set(entries)
        assert [entries[e.audit_entry_id].action for e in events] == [
            "incident.opened",
            "incident.signal",
            "incident.mitigating",
            "incident.resolved",
        ]
        assert verify(s)[1] is None  # the chain holds


@pytest.mark.parametrize(
    ("moves", "error"),
    [
        (
            ["resolved", "open"],
            "incident #1 is resolved; it may go to nothing (it is final), not open",
        ),
        (
            ["monitoring", "open"],
            "incident #1 is monitoring; it may go to escalated, mitigating, resolved, not open",
        ),
        (
            ["fixed"],
            "state must be one of open, mitigating, monitoring, resolved, escalated, not 'fixed'",
        ),
    ],
)
def test_a_move_the_lifecycle_does_not_allow_is_refused_with_the_reason(engine, moves, error):
    with session_scope(engine) as s:
        _signal(s, "domain:acme.example", "dmarc", "info", "s")
        s.commit()
        with pytest.raises(ServiceError) as refused:
            for state in moves:
                incidents.transition(s, 1, state, actor="operator:alice", now=T0)
        assert str(refused.value) == error


# ---------------------------------------------------------------- the relay's reactions
def test_reactions_are_announced_per_path_and_an_incident_opens_when_they_recur(engine):
    rules = reactions_watch()
    _react(engine, "127.0.0.10", T0)
    _react(engine, "127.0.0.11", T0)
    first = _watch(engine, T0 + timedelta(minutes=1))
    assert (first.read, len(first.announcements), first.incidents) == (2, 2, [])
    assert _watch(engine, T0 + timedelta(minutes=2)).idle  # each reaction is read once

    # the same path again, after each suspension ended, within the recurrence window
    for n in range(1, rules.spec.recur_threshold):
        _react(engine, "127.0.0.10", T0 + timedelta(minutes=15 * n))
    recorded = _watch(engine, T0 + timedelta(minutes=50))
    assert len(recorded.incidents) == 1
    with session_scope(engine) as s:
        (announcement,) = s.exec(
            select(Announcement).where(Announcement.subject == "path:127.0.0.10/google")
        ).all()  # one message for the hour, however many reactions
        assert announcement.reactions == rules.spec.recur_threshold
        incident = s.get(Incident, recorded.incidents[0])
        assert (incident.subject, incident.cause, incident.severity) == (
            "path:127.0.0.10/google",
            "repeated-reactions",
            "warning",
        )
        signals = s.exec(
            select(IncidentEvent).where(IncidentEvent.incident_id == incident.id)
        ).all()
        reactions = [s.get(AuditEntry, e.audit_entry_id) for e in signals]
        assert {r.action for r in reactions} == {"path.suspend"}  # linked to the relay's entries

    # a later hour: a new message; the open incident takes the new signal
    _react(engine, "127.0.0.10", T0 + timedelta(hours=2))
    later = _watch(engine, T0 + timedelta(hours=2, minutes=1))
    assert later.incidents == recorded.incidents
    with session_scope(engine) as s:
        assert (
            len(
                s.exec(
                    select(Announcement).where(Announcement.subject == "path:127.0.0.10/google")
                ).all()
            )
            == 2
        )


def test_slack_gets_one_message_per_incident_edited_in_place(engine):
    fake = FakeSlack()
    try:
        notifier = _notifier(fake)
        for n in range(3):
            _react(engine, "127.0.0.10", T0 + timedelta(minutes=15 * n))
        recorded = _watch(engine, T0 + timedelta(minutes=40))
        (incident_id,) = recorded.incidents
        assert announce_reactions(engine, notifier, recorded.announcements) == 1
        assert publish_incident(engine, notifier, incident_id)
        with session_scope(engine) as s:
            incidents.transition(s, incident_id, "mitigating", actor="operator:alice", now=T0)
            s.commit()
        assert publish_incident(engine, notifier, incident_id)
        posts = fake.calls_to("chat.postMessage")
        updates = fake.calls_to("chat.update")
        assert len(posts) == 2  # the reactions' message and the incident's
        assert len(updates) == 1 and "mitigating" in updates[0].args["text"]
        assert "Incident #" in posts[1].args["text"]
    finally:
        fake.close()
    report = incident_report(engine, incident_id, "it")
    assert "# Incidente #" in report and report.count("| signal |") == 3


@pytest.mark.integration  # real `axiom` processes, a dozen of them: make test, not test-fast
def test_the_cli_lists_shows_and_moves_incidents_with_exact_errors(engine, db_url, tmp_path):
    with session_scope(engine) as s:
        add_operator(s, "alice", ["deliverability"], None)
        _signal(
            s,
            "path:127.0.0.10/google",
            "repeated-reactions",
            "warning",
            "3 automatic reactions in 24 h",
        )
        s.commit()
    (tmp_path / "secret.key").write_bytes(b"x" * 32)
    env = {
        "AXIOM_HOME": str(tmp_path),
        "AXIOM_DATABASE_URL": db_url,
        "PATH": "/usr/bin:/bin",
        "AXIOM_CONFIG": str(tmp_path / "absent.toml"),
    }

    def axiom(*args: str) -> subprocess.CompletedProcess:
        return axiom_cli.run(args, env, timeout=60)

    listed = json.loads(axiom("incidents", "--json").stdout)
    assert [(i["id"], i["state"], i["occurrences"]) for i in listed] == [(1, "open", 1)]
    refused = axiom("incidents", "set", "1", "fixed", "--as", "alice")
    assert refused.returncode == 1
    assert (
        "state must be one of open, mitigating, monitoring, resolved, escalated, not 'fixed'"
        in refused.stderr
    )
    stranger = axiom("incidents", "set", "1", "resolved", "--as", "mallory")
    assert "mallory is not a registered operator" in stranger.stderr
    assert (
        axiom("incidents", "set", "1", "resolved", "--as", "alice", "--note", "ok").returncode == 0
    )
    assert json.loads(axiom("incidents", "--json").stdout) == []
    shown = json.loads(axiom("incidents", "show", "1", "--json").stdout)
    assert [e["kind"] for e in shown["timeline"]] == ["signal", "state"]
    assert shown["timeline"][1]["actor"] == "operator:alice"
    missing = axiom("incidents", "show", "9")
    assert "incident #9 does not exist" in missing.stderr


@pytest.mark.parametrize(
    ("recent", "severity"),
    [(0, None), (2, None), (3, "warning"), (5, "warning"), (6, "critical"), (40, "critical")],
)
def test_the_reactions_on_a_path_call_for_an_incident_at_the_runbooks_thresholds(recent, severity):
    spec = reactions_watch().spec  # recur_threshold 3, critical_threshold 6
    assert (spec.recur_threshold, spec.critical_threshold) == (3, 6)
    assert decide(recent, spec) == severity


def test_actions_and_approvals_join_the_timeline_linked_to_their_own_audit_entries(engine):
    """A runbook acting on an incident names the audit entry of its action and its approval;
    a kind the timeline does not know is refused."""
    from models import Approval
    from models.audit_trail import record

    with session_scope(engine) as s:
        opened = _signal(s, "ip:127.0.0.10", "listed", "warning", "one zone").incident
        approval = Approval(
            kind="ip.retire",
            subject="ip:127.0.0.10",
            allowed_roles="lead",
            expires_at=T0 + timedelta(hours=1),
        )
        s.add(approval)
        s.flush()
        action = record(
            s, actor="flow:b", action="ip.retire", subject="ip:127.0.0.10", evidence={}, at=T0
        )
        incidents.add_event(
            s,
            opened.id,
            "approval",
            actor="operator:alice",
            summary="retire approved",
            now=T0 + timedelta(minutes=1),
            approval_id=approval.id,
        )
        incidents.add_event(
            s,
            opened.id,
            "action",
            actor="flow:b",
            summary="127.0.0.10 retired",
            now=T0 + timedelta(minutes=2),
            audit_entry_id=action.id,
        )
        with pytest.raises(ServiceError, match="timeline kind must be one of"):
            incidents.add_event(s, opened.id, "gossip", actor="x", summary="y", now=T0)
        s.commit()
        events = incidents.timeline(s, opened.id)
        assert [e.kind for e in events] == ["signal", "approval", "action"]
        assert events[1].approval_id == approval.id
        assert s.get(AuditEntry, events[1].audit_entry_id).action == "incident.approval"
        assert events[2].audit_entry_id == action.id  # the action's own entry, not a copy
        assert verify(s)[1] is None

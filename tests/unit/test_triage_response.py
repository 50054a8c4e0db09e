"""protocol/triage_response.py, the services degradation-triage's respond procedure calls, on a
migrated database (SQLite and PostgreSQL): an incident's subject and cause read back, the next
rung proposed, each action applied through the operator verbs' services (audited, on the
incident's timeline), the verification on the signals since the action, resolve and
escalate, the customer's report, and which incidents still need a respond run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import select

from models import (
    AuditEntry,
    DeliveryEvent,
    EventKind,
    Incident,
    IpPool,
    Procedure,
    Stream,
    Suspension,
    Tenant,
)
from models.db import session_scope
from models.egress import HOLD_POOL
from notifications.templates import render_email
from protocol import egress, incidents, suspensions, triage, triage_response
from protocol.errors import ServiceError
from protocol.verbs import Act
from runbooks.loader import degradation_triage

RULES = degradation_triage()
SPEC = RULES.spec
AUDIT = (RULES.id, RULES.version)
NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
IP = "127.0.0.10"


def tenant(engine, name: str = "acme") -> int:
    with session_scope(engine) as s:
        row = s.exec(select(Tenant).where(Tenant.name == name)).first()
        if row is None:
            row = Tenant(name=name, language="it", contact_email="ops@acme.example")
            s.add(row)
            s.commit()
        return row.id


def events(
    engine,
    *,
    stream="newsletter",
    at=NOW - timedelta(minutes=10),
    provider="yahoo",
    delivered=0,
    complaints=0,
    deferred=0,
    category="rate_limited",
    ip=IP,
) -> None:
    tenant_id = tenant(engine)
    rows = []
    for _ in range(delivered):
        rows.append((EventKind.attempt, "delivered", False, 1))
    for _ in range(deferred):
        rows.append((EventKind.attempt, category, False, 1))
    for _ in range(complaints):
        rows.append((EventKind.complaint, "complaint", True, None))
    with session_scope(engine) as s:
        for n, (kind, cat, permanent, attempt) in enumerate(rows):
            s.add(
                DeliveryEvent(
                    at=at,
                    kind=kind,
                    tenant_id=tenant_id,
                    stream=stream,
                    from_domain="acme.example",
                    source_ip=ip,
                    provider=provider,
                    message_id=f"{stream}-{at:%H%M}-{n}",
                    recipient=f"r{n}@{provider}.example",
                    category=cat,
                    permanent=permanent,
                    attempt=attempt,
                )
            )
        s.commit()


def detect(engine, now=NOW, since=None) -> triage.CycleReport:
    with session_scope(engine) as s:
        report = triage.detect(s, SPEC, now=now, actor="test", runbook=AUDIT, since=since)
        s.commit()
    return report


def incident_for(engine, label: str) -> int:
    with session_scope(engine) as s:
        row = s.exec(
            select(Incident).where(Incident.subject == label, Incident.open_key.is_not(None))
        ).one()
        return row.id


def by_approver(now=NOW) -> Act:
    return Act("flow:test", "degradation triage", now, {"approval_id": 1, "approved_by": "alice"})


def test_subjects_are_read_back_from_their_labels(engine):
    tenant(engine)
    with session_scope(engine) as s:
        path = triage_response.subject_of(s, "path:127.0.0.10/google")
        assert (path.kind, path.ip, path.provider) == ("ip-provider", "127.0.0.10", "google")
        domain = triage_response.subject_of(s, "domain:acme.example/yahoo")
        assert (domain.kind, domain.domain, domain.provider) == (
            "domain-provider",
            "acme.example",
            "yahoo",
        )
        stream = triage_response.subject_of(s, "stream:acme/newsletter")
        assert stream == triage.stream_subject(s, "acme", "newsletter")
        with pytest.raises(ServiceError, match=r"'ip:1\.2\.3\.4' is not a triage subject"):
            triage_response.subject_of(s, "ip:1.2.3.4")
        with pytest.raises(ValueError, match="no tenant 'nobody'"):
            triage_response.subject_of(s, "stream:nobody/x")


def test_a_complaint_spike_is_paused_reported_verified_and_resolved(engine):
    events(engine, delivered=300, complaints=6)  # 2 % over 1 h: critical content
    detect(engine)
    incident_id = incident_for(engine, "stream:acme/newsletter")
    with session_scope(engine) as s:
        start = triage_response.read(s, incident_id)
        assert start["cause"]["cause"] == "content"
        assert start["cause"]["severity"] == "critical"
        proposed = triage_response.propose_next(s, start["subject"], start["cause"], [], SPEC)
        # critical: the ladder skips the report (warning only) and proposes the pause
        assert proposed["action"]["action"] == "pause_stream"
        assert proposed["action"]["approval"] == "required"
        shown = triage_response.evidence(s, start["subject"], start["cause"], SPEC, NOW)
        assert any(k.startswith("complaint") and "act" in v for k, v in shown["findings"].items())
        assert "complaint" in shown["chart"] and "█" in shown["chart"]
        applied = triage_response.apply(s, incident_id, proposed["action"], by_approver(), AUDIT)
        s.commit()
    assert applied["done"]["held"] == "acme/newsletter"
    assert applied["done"]["pool"] == "default"
    with session_scope(engine) as s:
        stream = s.exec(select(Stream).where(Stream.name == "newsletter")).one()
        assert s.get(IpPool, stream.pool_id).name == HOLD_POOL
        entry = s.exec(select(AuditEntry).where(AuditEntry.action == "stream.suspend")).one()
        assert entry.runbook_id == "degradation-triage"
        assert entry.evidence["approved_by"] == "alice"
        incident = s.get(Incident, incident_id)
        assert incident.state == "mitigating"
        kinds = [e.kind for e in incidents.timeline(s, incident_id)]
        assert "action" in kinds
        # the customer's report, in its language (the tenant writes Italian)
        who, variables = triage_response.customer_report(
            s, incident_id, start["cause"], action="pause_stream", done=applied["done"], now=NOW
        )
        assert who == "acme"
        mail = render_email("email_triage_report", "it", tenant="acme", reply_to=None, **variables)
        assert "trattenuta" in mail.body and "complaint su 1h" in mail.body
        # the stream is held: nothing sent since the action, so the clues are gone
        later = NOW + timedelta(seconds=SPEC.causes["content"].verify_after_seconds)
        checked = triage_response.check(s, incident_id, start["cause"], SPEC, since=NOW, now=later)
        assert checked["verdict"] == "improved" and checked["sent_since"] == 0
        triage_response.resolve(s, incident_id, "improved", actor="flow:test", now=later)
        s.commit()
        assert s.get(Incident, incident_id).state == "resolved"


def test_windows_start_again_where_the_incident_was_resolved(engine):
    events(engine, delivered=300, complaints=6)
    detect(engine)
    incident_id = incident_for(engine, "stream:acme/newsletter")
    resolved_at = NOW + timedelta(minutes=5)
    with session_scope(engine) as s:
        triage_response.resolve(s, incident_id, "done", actor="t", now=resolved_at)
        s.commit()
        since = triage_response.windows_since(s, resolved_at + timedelta(minutes=1))
        assert since["stream:acme/newsletter"] == resolved_at
        by_subject = {triage_response.subject_of(s, k): v for k, v in since.items()}
    later = resolved_at + timedelta(minutes=1)
    again = detect(engine, now=later, since=by_subject)
    assert "stream:acme/newsletter" not in {c["subject"] for c in again.causes}
    # not exempted: the same behaviour after the resolution is caught again
    events(engine, at=later + timedelta(minutes=1), delivered=300, complaints=6)
    caught = detect(engine, now=later + timedelta(minutes=2), since=by_subject)
    assert "stream:acme/newsletter" in {c["subject"] for c in caught.causes}
    assert incident_for(engine, "stream:acme/newsletter") != incident_id


def test_rate_limit_deferrals_lower_the_paths_rate_and_escalate_when_they_persist(engine):
    with session_scope(engine) as s:
        egress.add_pool(s, "shared-a", "shared")
        egress.add_ip(s, IP, "shared-a", None, 100)
        s.commit()
    events(engine, provider="google", delivered=150, deferred=60)  # 28.6 % over 15 min
    detect(engine)
    incident_id = incident_for(engine, "path:127.0.0.10/google")
    with session_scope(engine) as s:
        start = triage_response.read(s, incident_id)
        assert start["cause"]["cause"] == "reputation"
        proposed = triage_response.propose_next(s, start["subject"], start["cause"], [], SPEC)[
            "action"
        ]
        assert proposed["action"] == "lower_rate" and proposed["approval"] == "automatic"
        act = Act("flow:test", "triage (automatic)", NOW, {"automatic": True})
        applied = triage_response.apply(s, incident_id, proposed, act, AUDIT)
        s.commit()
    (path,) = applied["done"]["paths"]
    assert path["sent_15m"] == 210
    assert path["per_minute"] == 7  # 210 in 15 min = 14 a minute, halved
    with session_scope(engine) as s:
        row = s.exec(select(Suspension).where(Suspension.rule_id == f"triage:{incident_id}")).one()
        assert (row.action, row.limit_per_minute, row.source_ip, row.provider) == (
            "throttle",
            7,
            IP,
            "google",
        )
        assert row.expires_at.replace(tzinfo=UTC) == NOW + timedelta(hours=1)
    # the deferrals go on after the throttle: not improved, and nothing else fits a path
    events(engine, provider="google", at=NOW + timedelta(minutes=20), delivered=40, deferred=20)
    later = NOW + timedelta(minutes=30)
    with session_scope(engine) as s:
        checked = triage_response.check(s, incident_id, start["cause"], SPEC, since=NOW, now=later)
        assert checked["verdict"] == "not_improved"
        assert checked["cause"]["cause"] == "reputation"
        nxt = triage_response.propose_next(
            s, start["subject"], checked["cause"], ["lower_rate"], SPEC
        )
        assert nxt["action"] is None
        triage_response.escalate(s, incident_id, "lower rate did not help", actor="t", now=later)
        s.commit()
        assert s.get(Incident, incident_id).state == "escalated"


def test_move_stream_needs_somewhere_to_go(engine):
    tenant(engine)
    with session_scope(engine) as s:
        egress.add_pool(s, "shared-a", "shared")
        egress.add_ip(s, "127.0.0.11", "shared-a", None, 100)
        egress.add_pool(s, "shared-b", "shared")
        egress.add_ip(s, "127.0.0.12", "shared-b", None, 100)
        egress.set_stream(s, "acme", "newsletter", "shared-a", None)
        s.commit()
        with pytest.raises(ServiceError, match="no overflow pool to move to"):
            egress.move_stream(s, "acme", "newsletter", by_approver())
        s.rollback()
        egress.set_stream(s, "acme", "newsletter", "shared-a", "shared-b")
        done = egress.move_stream(s, "acme", "newsletter", by_approver())
        s.commit()
        assert (done["pool"], done["to_pool"]) == ("shared-a", "shared-b")
        assert (
            done["back_with"]
            == "axiom stream set acme newsletter --pool shared-a --fallback shared-b"
        )
        stream = s.exec(select(Stream).where(Stream.name == "newsletter")).one()
        assert s.get(IpPool, stream.pool_id).name == "shared-b" and stream.fallback_pool_id is None
        egress.add_pool(s, "empty", "shared")
        s.commit()
        with pytest.raises(ServiceError, match="pool 'empty' has no address that sends"):
            egress.move_stream(s, "acme", "newsletter", by_approver(), "empty")


def test_a_throttle_names_a_known_path(engine):
    with session_scope(engine) as s:
        egress.add_pool(s, "shared-a", "shared")
        egress.add_ip(s, IP, "shared-a", None, 100)
        s.commit()
        until = NOW + timedelta(hours=1)
        with pytest.raises(ServiceError, match="--per-minute must be 1 or more, not 0"):
            suspensions.throttle_path(s, IP, "google", 0, until, by_approver())
        with pytest.raises(ServiceError, match="provider 'gmail' is not one of"):
            suspensions.throttle_path(s, IP, "gmail", 5, until, by_approver())
        with pytest.raises(ServiceError, match=r"address 127\.0\.0\.99 is not in any pool"):
            suspensions.throttle_path(s, "127.0.0.99", "google", 5, until, by_approver())
        with pytest.raises(ServiceError, match="must end later than now"):
            suspensions.throttle_path(s, IP, "google", 5, NOW, by_approver())
        row = suspensions.throttle_path(s, IP, "google", 5, until, by_approver())
        s.commit()
        entry = s.exec(select(AuditEntry).where(AuditEntry.action == "path.throttle")).one()
        assert entry.subject == f"path:{IP}/google"
        assert entry.evidence["suspension_id"] == row.id
        assert entry.evidence["limit_per_minute"] == 5


def test_only_new_incidents_with_a_proposal_need_a_respond_run(engine):
    events(engine, delivered=300, complaints=6)
    report = detect(engine)
    incident_id = incident_for(engine, "stream:acme/newsletter")
    with session_scope(engine) as s:
        wanted = triage_response.needing_response(s, report.incidents)
        assert incident_id in wanted
        s.add(
            Procedure(
                name="degradation-triage",
                subject=f"incident:{incident_id}",
                runbook_id=RULES.id,
                runbook_version=RULES.version,
            )
        )
        s.commit()
        assert incident_id not in triage_response.needing_response(s, report.incidents)


def test_a_stream_whose_deferrals_double_below_every_level_is_a_low_severity_incident(engine):
    # A week at 3 % rate-limit deferrals (the baseline), then an hour at 7 %: more than twice
    # the baseline and 4 points above it, yet under the 10 % warn level of every window.
    for day in range(1, 7):
        events(engine, at=NOW - timedelta(days=day, hours=1), delivered=291, deferred=9)
    events(engine, at=NOW - timedelta(minutes=40), delivered=279, deferred=21)
    report = detect(engine)
    stream = next(c for c in report.causes if c["subject"] == "stream:acme/newsletter")
    assert stream["severity"] == "info" and stream["behaviour_change"] is True
    (finding,) = [f for f in stream["evidence"] if f["signal"] == "deferred_rate_limited"]
    assert finding["level"] == "change"
    assert finding["rate"] == pytest.approx(0.07)
    assert finding["baseline_rate"] == pytest.approx(0.03)
    assert stream["proposal"] is None  # watched, not acted on
    with session_scope(engine) as s:
        incident = s.get(Incident, incident_for(engine, "stream:acme/newsletter"))
        assert incident.severity == "info"
        assert incident.id not in triage_response.needing_response(s, report.incidents)

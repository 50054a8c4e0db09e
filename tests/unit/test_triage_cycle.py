"""protocol/triage.detect, the degradation-triage cycle's detection, on a migrated database
(SQLite and PostgreSQL): a stream drawing complaints over the act level opens one incident
with its cause, evidence and proposal; a second cycle folds into it (no alert storm); a
clean subject opens nothing; no mail, no subjects."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlmodel import select

from models import DeliveryEvent, EventKind, Incident, Tenant
from models.db import session_scope
from protocol import triage
from runbooks.loader import degradation_triage

RULES = degradation_triage()
NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def seed(engine, stream: str, delivered: int, complaints: int) -> None:
    with session_scope(engine) as s:
        tenant = s.exec(select(Tenant).where(Tenant.name == "acme")).first()
        if tenant is None:
            tenant = Tenant(name="acme")
            s.add(tenant)
            s.flush()
        for n in range(delivered + complaints):
            s.add(
                DeliveryEvent(
                    at=NOW - timedelta(minutes=30),
                    kind=EventKind.complaint if n >= delivered else EventKind.attempt,
                    tenant_id=tenant.id,
                    stream=stream,
                    from_domain=f"{stream}.example",
                    source_ip="127.0.0.10",
                    provider="yahoo",
                    message_id=f"m{n}",
                    recipient=f"r{n}@yahoo.com",
                    category="complaint" if n >= delivered else "delivered",
                    attempt=None if n >= delivered else 1,
                )
            )
        s.commit()


def cycle(engine) -> triage.CycleReport:
    with session_scope(engine) as s:
        report = triage.detect(
            s, RULES.spec, now=NOW, actor="test", runbook=(RULES.id, RULES.version)
        )
        s.commit()
    return report


def test_no_mail_no_subjects(engine):
    assert triage.subjects_with_mail(engine, NOW) == []
    assert cycle(engine).as_json() == {"subjects": 0, "causes": [], "incidents": []}


def test_a_complaint_spike_opens_one_incident_per_subject_and_cause_and_folds(engine):
    seed(engine, "newsletter", 300, 6)  # 2 % over 1 h: past the 1 % act level, 200/5 minimums
    seed(engine, "orders", 300, 0)
    labels = {s.label for s in triage.subjects_with_mail(engine, NOW)}
    assert "stream:acme/newsletter" in labels and "path:127.0.0.10/yahoo" in labels
    first = cycle(engine)
    subjects = {c["subject"] for c in first.causes}
    assert "stream:acme/newsletter" in subjects
    assert "stream:acme/orders" not in subjects  # clean: nothing opened
    newsletter = next(c for c in first.causes if c["subject"] == "stream:acme/newsletter")
    assert newsletter["severity"] == "critical"
    assert any(e["signal"].startswith("complaint") for e in newsletter["evidence"])
    assert newsletter["proposal"] is not None
    second = cycle(engine)
    assert sorted(second.incidents) == sorted(first.incidents)  # folded, not new ones
    with session_scope(engine) as s:
        rows = s.exec(select(Incident).where(Incident.subject == "stream:acme/newsletter")).all()
        assert len(rows) == 1 and rows[0].occurrences == 2
        assert rows[0].cause == newsletter["cause"]

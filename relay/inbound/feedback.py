"""What a report means for mail we sent: find the message, suppress, audit, in one commit.

The message is found by the queue id in the Received header we added (or the tag of a
bounces+QUEUEID@ address), else by its Message-ID, else by one of its recipients and its
sending domain. Only mail our tenants sent counts, not the DSNs we sent from the null sender
(suppressing a customer's own address because someone marked a bounce as spam would be
wrong). A recipient is suppressed only when it is a recipient of the message found, so a
report about mail that did not go through us (or a forged one) changes no list: it is
acknowledged and audited as unmatched. Complaints (abuse, fraud, virus) suppress the
complaining recipient for the message's tenant; bounces suppress a recipient when the
Diagnostic-Code classifies (relay.delivery.classify) as a permanent hard bounce, as at delivery time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, func, select
from sqlmodel import Session

from models import Message, Recipient
from models.audit_trail import record
from models.db import session_scope
from relay.delivery.classify import UNPARSEABLE, Classification, classify, provider_for_mx, rules
from relay.delivery.engine import HARD_BOUNCE
from relay.inbound.reports import Bounce, Complaint, Original, RecipientStatus, Report
from relay.spool.claims import add_suppression

ACTOR = "relay:inbound"
# RFC 5965 feedback types that are a recipient's complaint; not-spam, auth-failure (RFC 6591)
# and other are recorded but suppress nobody.
COMPLAINT_TYPES = {"abuse", "fraud", "virus"}
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_QUEUE_ID = re.compile(r"[0-9A-Z]{26}")
MESSAGE_ID_CANDIDATES = 20
_SUBMITTED = Message.mail_from != ""  # a tenant's mail, not one of our DSNs


@dataclass(frozen=True)
class Arrival:
    """What the SMTP session tells about a report besides its content."""

    mail_from: str  # the envelope sender ('' for <>)
    client_ip: str
    tags: tuple[str, ...] = ()  # the +tags of the bounce addresses it was sent to


@dataclass(frozen=True)
class Outcome:
    kind: str  # complaint | bounce
    queue_id: str | None  # the message of ours it is about; None: unmatched
    suppressed: tuple[str, ...]

    @property
    def matched(self) -> bool:
        return self.queue_id is not None


@dataclass(frozen=True)
class _Sent:
    queue_id: str
    tenant_id: int
    recipients: frozenset[str]  # lower-cased
    matched_by: str


def record_report(engine: Engine, report: Report, arrival: Arrival, now: datetime) -> Outcome:
    """Record report in one transaction; committed when this returns (raises otherwise)."""
    with session_scope(engine) as session:
        if isinstance(report, Complaint):
            outcome = _record_complaint(session, report, arrival, now)
        else:
            outcome = _record_bounce(session, report, arrival, now)
        session.commit()
    return outcome


# ------------------------------------------------------------------ complaints
def _record_complaint(
    session: Session, report: Complaint, arrival: Arrival, now: datetime
) -> Outcome:
    explicit = set(report.original_rcpt_to)
    candidates = explicit or set(report.original.to)
    domains = set(report.reported_domains) | {
        d for d in (_domain(report.original_mail_from), report.original.from_domain) if d
    }
    sent = _find(session, report.original, arrival.tags, candidates, domains)
    complainers: list[str] = []
    if sent is not None:
        complainers = sorted(sent.recipients & candidates)
        if not complainers and not explicit and len(sent.recipients) == 1:
            complainers = list(sent.recipients)  # Original-Rcpt-To redacted, one recipient
    provider = _provider(report.reporting_mta, _domain(arrival.mail_from))
    suppress = report.feedback_type in COMPLAINT_TYPES
    suppressed = []
    for address in complainers if suppress and sent is not None else []:
        if add_suppression(
            session,
            tenant_id=sent.tenant_id,
            address=address,
            reason=f"complaint ({report.feedback_type}) via {provider}",
            source="complaint",
            actor=ACTOR,
            at=now,
            evidence={"queue_id": sent.queue_id, "provider": provider},
        ):
            suppressed.append(address)
    record(
        session,
        actor=ACTOR,
        action="complaint.received" if suppress else "feedback.received",
        subject=_subject(complainers, sent, provider),
        evidence={
            "provider": provider,
            "feedback_type": report.feedback_type,
            "user_agent": report.user_agent,
            "reporting_mta": report.reporting_mta,
            "source_ip": report.source_ip,
            "arrival_date": report.arrival_date,
            "original_mail_from": report.original_mail_from,
            "original_rcpt_to": list(report.original_rcpt_to),
            "original_message_id": report.original.message_id,
            "recipients": complainers,
            "suppressed": suppressed,
            "report_from": arrival.mail_from,
            "client_ip": arrival.client_ip,
        }
        | _match_evidence(sent),
        at=now,
    )
    return Outcome("complaint", sent.queue_id if sent else None, tuple(suppressed))


# ------------------------------------------------------------------ bounces
def _record_bounce(session: Session, report: Bounce, arrival: Arrival, now: datetime) -> Outcome:
    reported = {r.recipient for r in report.recipients}
    domains = {report.original.from_domain} - {None}
    sent = _find(session, report.original, arrival.tags, reported, domains)
    suppressed = []
    for status in report.recipients:
        ours = sent is not None and status.recipient in sent.recipients
        reply, verdict = _classify(status)
        hard = status.action == "failed" and verdict.permanent and verdict.category in HARD_BOUNCE
        added = (
            ours
            and hard
            and add_suppression(
                session,
                tenant_id=sent.tenant_id,
                address=status.recipient,
                reason=f"{verdict.category}: {reply}",
                source="bounce",
                actor=ACTOR,
                at=now,
                evidence={"queue_id": sent.queue_id, "asynchronous": True},
            )
        )
        if added:
            suppressed.append(status.recipient)
        record(
            session,
            actor=ACTOR,
            action="bounce.received",
            subject=f"recipient:{status.recipient}",
            evidence={
                "action": status.action,
                "status": status.status,
                "diagnostic": status.diagnostic,
                "remote_mta": status.remote_mta,
                "reporting_mta": report.reporting_mta,
                "category": verdict.category,
                "permanent": verdict.permanent,
                "rule_id": verdict.rule_id,
                "provider": verdict.provider,
                "recipient_of_message": ours,
                "suppressed": bool(added),
                "original_message_id": report.original.message_id,
                "report_from": arrival.mail_from,
                "client_ip": arrival.client_ip,
            }
            | _match_evidence(sent),
            at=now,
        )
    return Outcome("bounce", sent.queue_id if sent else None, tuple(suppressed))


def _classify(status: RecipientStatus) -> tuple[str, Classification]:
    """The reply a DSN quotes, classified; from its Status code when it quotes none."""
    provider = _provider(status.remote_mta, None)
    known = None if provider == rules().fallback_provider else provider
    diagnostic = status.diagnostic or ""
    if diagnostic:
        verdict = classify(diagnostic, known)
        if verdict.rule_id != UNPARSEABLE:
            return diagnostic, verdict
    if _STATUS.fullmatch(status.status):
        text = diagnostic.partition(";")[2].strip() if ";" in diagnostic else diagnostic
        reply = f"{status.status[0]}50 {status.status} {text}".strip()
        return reply, classify(reply, known)
    return diagnostic, classify(diagnostic, known)


# ------------------------------------------------------------------ finding the message
def _find(
    session: Session,
    original: Original,
    tags: tuple[str, ...],
    recipients: set[str],
    domains: set[str],
) -> _Sent | None:
    for source, queue_ids in (("envelope tag", tags), ("received header", original.queue_ids)):
        for queue_id in queue_ids:
            queue_id = queue_id.upper()
            if not _QUEUE_ID.fullmatch(queue_id):
                continue
            row = session.exec(
                select(Message.id, Message.tenant_id).where(Message.id == queue_id, _SUBMITTED)
            ).first()
            if row is not None:
                return _sent(session, row, source)
    if original.message_id:
        rows = session.exec(
            select(Message.id, Message.tenant_id)
            .where(Message.message_id_header == original.message_id, _SUBMITTED)
            .order_by(Message.created_at.desc())
            .limit(MESSAGE_ID_CANDIDATES)
        ).all()
        found = [_sent(session, row, "message-id") for row in rows]
        for sent in found:
            if sent.recipients & recipients:
                return sent
        if found and not recipients:
            return found[0]
    for address in sorted(recipients):
        if not domains:
            break
        row = session.exec(
            select(Message.id, Message.tenant_id)
            .join(Recipient, Recipient.message_id == Message.id)
            .where(
                Recipient.domain == address.rpartition("@")[2],
                func.lower(Recipient.address) == address,
                Message.header_from_domain.in_(sorted(domains)),
                _SUBMITTED,
            )
            .order_by(Message.created_at.desc())
            .limit(1)
        ).first()
        if row is not None:
            return _sent(session, row, "recipient and sending domain")
    return None


def _sent(session: Session, row, matched_by: str) -> _Sent:
    queue_id, tenant_id = row
    addresses = session.exec(select(Recipient.address).where(Recipient.message_id == queue_id))
    return _Sent(queue_id, tenant_id, frozenset(a.lower() for a in addresses.scalars()), matched_by)


# ------------------------------------------------------------------ helpers
def _provider(reporting_mta: str | None, sender_domain: str | None) -> str:
    """The provider a report comes from: its reporting MTA's name, else its sender's domain."""
    fallback = rules().fallback_provider
    for host in (reporting_mta, sender_domain):
        if host:
            name = provider_for_mx(host)
            if name != fallback:
                return name
    return fallback


def _domain(address: str | None) -> str | None:
    if not address or "@" not in address:
        return None
    return address.rpartition("@")[2].lower() or None


def _subject(recipients: list[str], sent: _Sent | None, provider: str) -> str:
    if len(recipients) == 1:
        return f"recipient:{recipients[0]}"
    if sent is not None:
        return f"message:{sent.queue_id}"
    return f"provider:{provider}"


def _match_evidence(sent: _Sent | None) -> dict:
    if sent is None:
        return {"matched": False}
    return {
        "matched": True,
        "matched_by": sent.matched_by,
        "queue_id": sent.queue_id,
        "tenant_id": sent.tenant_id,
    }

"""What a report means for mail we sent: find the message, act, audit, in one commit.

Bounces. Mail leaves the relay with a return path of its own, bounces+TAG@DOMAIN
(relay/delivery/return_path.py), so an asynchronous bounce comes back to a tagged address and
the tag, verified by its HMAC, names the message and (one recipient per transaction, the usual
case) the recipient; a tag naming the message only lets the report say which of the message's
recipients failed. A bounce at a verified tag is acted on as a synchronous refusal is at
delivery time: its reply is classified (relay.delivery.classify), a hard bounce
(mailbox_unknown, bad_domain) suppresses the recipient for the tenant, a failure turns the
recipient from delivered into bounced and sends the customer the DSN the delivery engine sends
for a refusal (relay/delivery/dsn.py, once: a second report about the same recipient sends
none), and every bounce is a DeliveryEvent (kind "bounce") carrying the message's tenant,
stream and From domain and the source IP, provider and MX of the delivery it follows. A bounce
that did not come to a verified tag (sent to the bare bounce address, or with a forged or
mangled tag) cannot be told from a forged one: it is audited with the message it seems to be
about, and changes nothing.

Complaints. An ARF report comes to the feedback address; the message is found by the return
path its quoted headers show (a verified tag, which also names the complaining recipient when
the loop redacted it), else by the queue id in the Received header we added, else by its
Message-ID, else by one of its recipients and its sending domain. Only mail our tenants sent
counts, not the DSNs we sent from the null sender (suppressing a customer's own address because
someone marked a bounce as spam would be wrong), and a recipient is suppressed only when it is a
recipient of the message found, so a report about mail that did not go through us changes no
list: it is acknowledged and audited as unmatched. Complaints (abuse, fraud, virus) suppress the
complaining recipient for the message's tenant and are each a DeliveryEvent (kind "complaint",
category the feedback type; recipient "" when the loop redacted it and the message had several);
other feedback (not-spam, auth-failure, other) is audited only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, func, insert, select, update
from sqlmodel import Session

from models import DeliveryEvent, EventKind, Message, Recipient, RecipientState
from models.audit_trail import record
from models.db import session_scope
from relay.delivery.classify import (
    UNPARSEABLE,
    Classification,
    ReplyParseError,
    classify,
    parse_reply,
    provider_for_mx,
    rules,
)
from relay.delivery.dsn import FailedRecipient, build_dsn, dsn_entry
from relay.delivery.engine import HARD_BOUNCE
from relay.delivery.return_path import Tag, Tagger
from relay.inbound.reports import Bounce, Complaint, Original, RecipientStatus, Report
from relay.spool.claims import add_suppression
from relay.spool.writer import spool_rows

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
    tags: tuple[Tag, ...] = ()  # the verified tags of the return paths it was sent to


@dataclass(frozen=True)
class Recording:
    """What recording needs besides the report: how the customer's DSN is signed off (as the
    delivery engine signs its own), and the key that verifies return-path tags."""

    hostname: str  # the relay's name: the DSN's Reporting-MTA and From domain
    tagger: Tagger
    dsn_from_local_part: str = "mailer-daemon"  # runbooks/delivery.yaml


@dataclass(frozen=True)
class Outcome:
    kind: str  # complaint | bounce
    queue_id: str | None  # the message of ours it is about; None: unmatched
    suppressed: tuple[str, ...]
    acted: bool = False  # a verified bounce: events, suppression, DSN as at delivery time

    @property
    def matched(self) -> bool:
        return self.queue_id is not None


@dataclass(frozen=True)
class _Sent:
    queue_id: str
    tenant_id: int
    stream: str
    from_domain: str
    mail_from: str
    created_at: datetime
    recipient_ids: dict[str, int]  # lower-cased address -> Recipient.id
    matched_by: str

    @property
    def recipients(self) -> frozenset[str]:
        return frozenset(self.recipient_ids)


def record_report(
    engine: Engine, report: Report, arrival: Arrival, now: datetime, recording: Recording
) -> Outcome:
    """Record report in one transaction; committed when this returns (raises otherwise)."""
    with session_scope(engine) as session:
        if isinstance(report, Complaint):
            outcome = _record_complaint(session, report, arrival, now, recording)
        else:
            outcome = _record_bounce(session, report, arrival, now, recording)
        session.commit()
    return outcome


# ------------------------------------------------------------------ complaints
def _record_complaint(
    session: Session, report: Complaint, arrival: Arrival, now: datetime, recording: Recording
) -> Outcome:
    explicit = set(report.original_rcpt_to)
    candidates = explicit or set(report.original.to)
    domains = set(report.reported_domains) | {
        d for d in (_domain(report.original_mail_from), report.original.from_domain) if d
    }
    tags = [t for t in map(recording.tagger.verify, _tags_in(report)) if t]
    sent, tag = _by_tag(session, tags, "return-path tag")
    if sent is None:
        sent = _find(session, report.original, candidates, domains)
    complainers: list[str] = []
    if sent is not None:
        # A tag naming the recipient says who complained, redacted or not.
        named = _address_of(sent, tag.recipient_id) if tag else None
        complainers = [named] if named is not None else sorted(sent.recipients & candidates)
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
    if suppress and sent is not None:
        for address in complainers or [""]:
            delivery = _delivery_of(session, sent, address)
            _event(
                session,
                now,
                sent,
                address,
                kind=EventKind.complaint,
                source_ip=delivery.get("source_ip") or report.source_ip,
                provider=delivery.get("provider") or provider,
                mx_host=delivery.get("mx_host"),
                reply_text=f"{report.feedback_type} via {report.user_agent}".strip(),
                category=report.feedback_type,
                permanent=False,
                action="suppress_recipient",
            )
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


def _tags_in(report: Complaint) -> list[str]:
    """The +tags of the return paths the report shows: the ARF's Original-Mail-From and the
    quoted message's Return-Path (added at final delivery)."""
    found = []
    for address in (report.original_mail_from or "", *report.original.return_paths):
        local = address.rpartition("@")[0]
        _, plus, tag = local.partition("+")
        if plus and tag:
            found.append(tag)
    return found


# ------------------------------------------------------------------ bounces
def _record_bounce(
    session: Session, report: Bounce, arrival: Arrival, now: datetime, recording: Recording
) -> Outcome:
    sent, tag = _by_tag(session, list(arrival.tags), "envelope tag")
    if sent is None or tag is None:
        return _unverified_bounce(session, report, arrival, now)
    targets = _targets(sent, tag, report)
    suppressed: list[str] = []
    failures: list[FailedRecipient] = []
    for address, status in targets:
        recipient_id = sent.recipient_ids[address]
        reply, verdict = _classify(status)
        failed = status.action == "failed"
        hard = failed and verdict.permanent and verdict.category in HARD_BOUNCE
        added = hard and add_suppression(
            session,
            tenant_id=sent.tenant_id,
            address=address,
            reason=f"{verdict.category}: {reply}",
            source="bounce",
            actor=ACTOR,
            at=now,
            evidence={"queue_id": sent.queue_id, "asynchronous": True},
        )
        if added:
            suppressed.append(address)
        delivery = _delivery_of(session, sent, address)
        remote = status.remote_mta or report.reporting_mta
        _event(
            session,
            now,
            sent,
            address,
            kind=EventKind.bounce,
            source_ip=delivery.get("source_ip"),
            provider=delivery.get("provider") or verdict.provider,
            mx_host=delivery.get("mx_host") or remote,
            reply_code=verdict.code,
            enhanced_code=verdict.enhanced_code or (status.status[:16] or None),
            reply_text=reply,
            category=verdict.category,
            permanent=failed,
            action=verdict.action,
        )
        turned = failed and _bounced(session, recipient_id, reply, now)
        if turned:
            status_code = status.status if _STATUS.fullmatch(status.status) else None
            failures.append(
                FailedRecipient(
                    address,
                    status_code or verdict.enhanced_code or "5.0.0",
                    reply,
                    remote,
                    returned=True,
                )
            )
        record(
            session,
            actor=ACTOR,
            action="bounce.received",
            subject=f"recipient:{address}",
            evidence={
                "action": status.action,
                "status": status.status,
                "diagnostic": status.diagnostic,
                "reported_recipient": status.recipient or None,
                "remote_mta": status.remote_mta,
                "reporting_mta": report.reporting_mta,
                "format": report.format,
                "category": verdict.category,
                "permanent": verdict.permanent,
                "rule_id": verdict.rule_id,
                "provider": verdict.provider,
                "recipient_of_message": True,
                "suppressed": bool(added),
                "bounced": bool(turned),
                "original_message_id": report.original.message_id,
                "report_from": arrival.mail_from,
                "client_ip": arrival.client_ip,
            }
            | _match_evidence(sent),
            at=now,
        )
    if failures and sent.mail_from:
        _notify_customer(session, sent, failures, now, recording)
    if not targets:
        _audit_bounce(session, report, arrival, now, sent, note="names none of its recipients")
    return Outcome("bounce", sent.queue_id, tuple(suppressed), acted=bool(targets))


def _targets(sent: _Sent, tag: Tag, report: Bounce) -> list[tuple[str, RecipientStatus]]:
    """(recipient of the message, the status that is about it), per recipient acted on.

    A tag that names the recipient decides who it is (a forwarded address may have failed
    further on, under another name): the status about that address, else the report's only
    one, else its first failure. A tag naming the message only: the statuses about its
    recipients."""
    statuses = report.recipients
    named = _address_of(sent, tag.recipient_id)
    if named is not None:
        mine = [s for s in statuses if s.recipient == named]
        chosen = (
            mine[0]
            if mine
            else statuses[0]
            if len(statuses) == 1
            else next((s for s in statuses if s.action == "failed"), statuses[0])
        )
        return [(named, chosen)]
    seen: set[str] = set()
    targets = []
    for status in statuses:
        if status.recipient in sent.recipient_ids and status.recipient not in seen:
            seen.add(status.recipient)
            targets.append((status.recipient, status))
    return targets


def _unverified_bounce(
    session: Session, report: Bounce, arrival: Arrival, now: datetime
) -> Outcome:
    reported = {r.recipient for r in report.recipients if r.recipient}
    domains = {report.original.from_domain} - {None}
    sent = _find(session, report.original, reported, domains)
    _audit_bounce(
        session,
        report,
        arrival,
        now,
        sent,
        note="not at a verified return path: cannot be told from a forged one; nothing changed",
    )
    return Outcome("bounce", sent.queue_id if sent else None, ())


def _audit_bounce(
    session: Session,
    report: Bounce,
    arrival: Arrival,
    now: datetime,
    sent: _Sent | None,
    note: str,
) -> None:
    for status in report.recipients:
        _, verdict = _classify(status)
        record(
            session,
            actor=ACTOR,
            action="bounce.received",
            subject=f"recipient:{status.recipient}" if status.recipient else "bounce:unattributed",
            evidence={
                "action": status.action,
                "status": status.status,
                "diagnostic": status.diagnostic,
                "reporting_mta": report.reporting_mta,
                "format": report.format,
                "category": verdict.category,
                "permanent": verdict.permanent,
                "recipient_of_message": sent is not None and status.recipient in sent.recipients,
                "suppressed": False,
                "bounced": False,
                "note": note,
                "original_message_id": report.original.message_id,
                "report_from": arrival.mail_from,
                "client_ip": arrival.client_ip,
            }
            | _match_evidence(sent),
            at=now,
        )


def _bounced(session: Session, recipient_id: int, reply: str, now: datetime) -> bool:
    """Delivered → bounced; False when it was not delivered (already bounced: no second DSN)."""
    result = session.connection().execute(
        update(Recipient)
        .where(Recipient.id == recipient_id, Recipient.state == RecipientState.delivered)
        .values(state=RecipientState.bounced, last_reply=reply[:1000], updated_at=now)
    )
    return result.rowcount == 1


def _notify_customer(
    session: Session,
    sent: _Sent,
    failures: list[FailedRecipient],
    now: datetime,
    recording: Recording,
) -> None:
    """The DSN the delivery engine sends for a refusal, from the null sender, spooled in this
    transaction: delivered like any DSN."""
    data = session.exec(select(Message.data).where(Message.id == sent.queue_id)).scalar_one()
    notice = build_dsn(
        reporting_mta=recording.hostname,
        from_local_part=recording.dsn_from_local_part,
        original_sender=sent.mail_from,
        original=data,
        arrival=sent.created_at,
        failures=failures,
        now=now,
    )
    entry = dsn_entry(sent.tenant_id, sent.mail_from, notice, now, recording.hostname)
    messages, recipients = spool_rows([entry])
    conn = session.connection()
    conn.execute(insert(Message), messages)
    conn.execute(insert(Recipient), recipients)


def _classify(status: RecipientStatus) -> tuple[str, Classification]:
    """The reply a bounce quotes, classified; from its Status code when it quotes none, and
    by its words alone (as an x50 reply of its class) when it has neither."""
    provider = _provider(status.remote_mta, None)
    known = None if provider == rules().fallback_provider else provider
    diagnostic = status.diagnostic or ""
    if diagnostic:
        verdict = classify(diagnostic, known)
        if verdict.rule_id != UNPARSEABLE:
            return diagnostic, verdict
    text = diagnostic.partition(";")[2].strip() if ";" in diagnostic else diagnostic
    if _STATUS.fullmatch(status.status):
        reply = f"{status.status[0]}50 {status.status} {text}".strip()
        return reply, classify(reply, known)
    klass = "5" if status.action == "failed" else "4"
    try:
        parse_reply(f"{klass}50 {text}")
    except ReplyParseError:
        return diagnostic, classify(diagnostic, known)
    return f"{klass}50 {text}".strip(), classify(f"{klass}50 {text}", known)


# ------------------------------------------------------------------ events
def _event(session: Session, now: datetime, sent: _Sent, address: str, **fields) -> None:
    session.connection().execute(
        insert(DeliveryEvent).values(
            at=now,
            tenant_id=sent.tenant_id,
            stream=sent.stream,
            from_domain=sent.from_domain,
            message_id=sent.queue_id,
            recipient_id=sent.recipient_ids.get(address),
            recipient=address,
            attempt=None,
            **{k: (v[:2000] if k == "reply_text" and v else v) for k, v in fields.items()},
        )
    )


def _delivery_of(session: Session, sent: _Sent, address: str) -> dict:
    """Source IP, provider and MX of the attempt that delivered the message to address (the
    message's last delivery when the address is not known)."""
    stmt = (
        select(DeliveryEvent.source_ip, DeliveryEvent.provider, DeliveryEvent.mx_host)
        .where(
            DeliveryEvent.message_id == sent.queue_id,
            DeliveryEvent.kind == EventKind.attempt,
            DeliveryEvent.category == "delivered",
        )
        .order_by(DeliveryEvent.id.desc())
        .limit(1)
    )
    recipient_id = sent.recipient_ids.get(address)
    if recipient_id is not None:
        stmt = stmt.where(DeliveryEvent.recipient_id == recipient_id)
    row = session.exec(stmt).first()
    return dict(zip(("source_ip", "provider", "mx_host"), row, strict=True)) if row else {}


# ------------------------------------------------------------------ finding the message
def _by_tag(session: Session, tags: list[Tag], source: str) -> tuple[_Sent | None, Tag | None]:
    """The message of the first verified tag that names one of our tenants' messages."""
    for tag in tags:
        sent = _load(session, tag.queue_id, source)
        if sent is not None and (
            tag.recipient_id is None or tag.recipient_id in sent.recipient_ids.values()
        ):
            return sent, tag
    return None, None


def _find(
    session: Session,
    original: Original,
    recipients: set[str],
    domains: set[str],
) -> _Sent | None:
    for queue_id in original.queue_ids:
        queue_id = queue_id.upper()
        if _QUEUE_ID.fullmatch(queue_id):
            sent = _load(session, queue_id, "received header")
            if sent is not None:
                return sent
    if original.message_id:
        ids = session.exec(
            select(Message.id)
            .where(Message.message_id_header == original.message_id, _SUBMITTED)
            .order_by(Message.created_at.desc())
            .limit(MESSAGE_ID_CANDIDATES)
        ).scalars()
        found = [s for s in (_load(session, i, "message-id") for i in ids) if s is not None]
        for sent in found:
            if sent.recipients & recipients:
                return sent
        if found and not recipients:
            return found[0]
    for address in sorted(recipients):
        if not domains:
            break
        queue_id = session.exec(
            select(Message.id)
            .join(Recipient, Recipient.message_id == Message.id)
            .where(
                Recipient.domain == address.rpartition("@")[2],
                func.lower(Recipient.address) == address,
                Message.header_from_domain.in_(sorted(domains)),
                _SUBMITTED,
            )
            .order_by(Message.created_at.desc())
            .limit(1)
        ).scalar()
        if queue_id is not None:
            return _load(session, queue_id, "recipient and sending domain")
    return None


def _load(session: Session, queue_id: str, matched_by: str) -> _Sent | None:
    """A message our tenants sent (not one of our DSNs), with its recipients."""
    row = session.exec(
        select(
            Message.tenant_id,
            Message.stream,
            Message.header_from_domain,
            Message.mail_from,
            Message.created_at,
        ).where(Message.id == queue_id, _SUBMITTED)
    ).first()
    if row is None:
        return None
    tenant_id, stream, from_domain, mail_from, created_at = row
    rows = session.exec(
        select(Recipient.address, Recipient.id)
        .where(Recipient.message_id == queue_id)
        .order_by(Recipient.id)
    ).all()
    ids: dict[str, int] = {}
    for address, recipient_id in rows:
        ids.setdefault(address.lower(), recipient_id)
    return _Sent(queue_id, tenant_id, stream, from_domain, mail_from, created_at, ids, matched_by)


def _address_of(sent: _Sent, recipient_id: int | None) -> str | None:
    if recipient_id is None:
        return None
    return next((a for a, i in sent.recipient_ids.items() if i == recipient_id), None)


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

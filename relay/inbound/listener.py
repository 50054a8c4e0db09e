"""The inbound listener: bounces and complaint reports addressed to the relay's own mailboxes.

One handle_<VERB> per verb, each check an early return; replies come from relay/replies.py.
The protocol, its session limits and the DATA screening are the submission server's
(relay/server.py), without AUTH. Mail from anyone (the null sender included), to the feedback
and bounce addresses only: this is no relay. The bounce address is also taken as the return
path of delivered mail, bounces+TAG@ the relay's bounce domain or a customer's return-path
subdomain (relay/delivery/return_path.py); a TAG that does not verify names no mailbox here
(550 5.1.1), so a forged one is refused before its DATA. DATA must be a bounce (a DSN, RFC
3464, or a plain-text one flufl.bounce reads) or an ARF report (RFC 5965); anything else is
refused, so nothing is acknowledged that is not recorded. A report is answered 250 only after
what it changed is committed (relay/inbound/feedback.py).

DMARC aggregate reports come to a third mailbox, the `rua` address customers publish
(dmarc@HOSTNAME by default): its DATA must carry one (relay/inbound/dmarc.py) about a domain
that sends through us, and is answered 250 once stored (relay/inbound/dmarc_store.py), or once
found stored already. A transaction is for the DMARC mailbox or for the others, not both.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from config.clock import Clock, SystemClock
from relay.delivery.return_path import Tag, return_path_domains
from relay.inbound.dmarc import NotAReport, Refused, TooLarge, parse_mail
from relay.inbound.dmarc_store import ForeignDomain, store_report
from relay.inbound.feedback import Arrival, Recording, record_report
from relay.inbound.reports import parse_report
from relay.metrics import InboundMetrics
from relay.submission import replies
from relay.submission.server import (
    MAX_DOMAIN,
    Refusal,
    _client_ip,
    _well_formed,
    exception_reply,
    screen_data,
    with_extensions,
)

log = logging.getLogger("axiom.relay.inbound")
NULL_SENDER = "<>"


@dataclass(frozen=True)
class Mailbox:
    local: str  # lower-cased
    domain: str  # lower-cased

    @classmethod
    def of(cls, address: str) -> Mailbox:
        local, _, domain = address.rpartition("@")
        return cls(local.lower(), domain.lower().rstrip("."))


class ReturnPathDomains:
    """The customers' return-path subdomains, read at most every ttl seconds, in a thread."""

    def __init__(
        self,
        load: Callable[[], set[str]],
        ttl: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._load, self._ttl, self._clock = load, ttl, clock
        self._domains: set[str] = set()
        self._loaded_at: float | None = None

    async def current(self) -> set[str]:
        if self._loaded_at is None or self._clock() - self._loaded_at >= self._ttl:
            try:
                self._domains = await asyncio.to_thread(self._load)
            except Exception as exc:  # the last ones stand; the relay's own domains always do
                log.warning("return-path domains not read (%s)", exc)
            self._loaded_at = self._clock()
        return self._domains


@dataclass
class InboundContext:
    engine: Engine
    feedback: Mailbox  # where feedback loops send ARF reports
    bounces: Mailbox  # where bounces come back; bounces+TAG@ too, and at return-path domains
    metrics: InboundMetrics
    recording: Recording  # the DSN's sign-off and the key that verifies tags
    # Where DMARC aggregate reports come (Settings.dmarc_mailbox); None: dmarc@ the feedback
    # address's domain, which is dmarc@HOSTNAME when neither address is configured.
    dmarc: Mailbox | None = None
    return_path_domains: ReturnPathDomains | None = None  # None: read from engine
    max_recipients: int = 10
    max_header_fields: int = 1000
    max_header_field_bytes: int = 102_400
    clock: Clock = field(default_factory=SystemClock)  # the sandbox's shifted time there

    def __post_init__(self) -> None:
        if self.dmarc is None:
            self.dmarc = Mailbox("dmarc", self.feedback.domain)
        if self.return_path_domains is None:
            self.return_path_domains = ReturnPathDomains(lambda: return_path_domains(self.engine))

    async def domains(self) -> set[str]:
        assert self.return_path_domains is not None
        customers = await self.return_path_domains.current()
        assert self.dmarc is not None
        return {self.feedback.domain, self.bounces.domain, self.dmarc.domain} | customers

    def is_dmarc(self, address: str) -> bool:
        return Mailbox.of(address) == self.dmarc

    def tag_of(self, address: str) -> str | None:
        """'' for the feedback or bounce mailbox, the tag of bounces+TAG@, None otherwise
        (the domain is checked by the caller)."""
        box = Mailbox.of(address)
        if box == self.feedback or box.local == self.bounces.local:
            return ""
        base, plus, tag = box.local.partition("+")
        if plus and tag and base == self.bounces.local:
            return tag
        return None

    def verified(self, address: str) -> Tag | None:
        tag = self.tag_of(address)
        return self.recording.tagger.verify(tag) if tag else None


class InboundHandler:
    def __init__(self, ctx: InboundContext):
        self.ctx = ctx

    # --- EHLO: no AUTH here (make_protocol_factory offers no mechanism) ---
    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses
    ) -> list[str]:
        session.host_name = hostname  # aiosmtpd leaves this to a 5-argument EHLO hook
        return with_extensions([r for r in responses if not r.startswith("250-AUTH")])

    # --- MAIL: anyone, the null sender included (RFC 5321 4.5.5: DSNs come from <>) ---
    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options
    ) -> str:
        if address != NULL_SENDER:
            local, at, domain = address.rpartition("@")
            if not at or not local or not domain or not _well_formed(address):
                return self._reject("bad_sender", replies.BAD_SENDER_ADDRESS)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return replies.SENDER_OK

    # --- RCPT: our feedback and bounce mailboxes only ---
    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options
    ) -> str:
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain or not _well_formed(address):
            return self._reject("bad_recipient", replies.BAD_ADDRESS)
        if len(domain) > MAX_DOMAIN or domain.lower().rstrip(".") not in await self.ctx.domains():
            return self._reject("relay_denied", replies.INBOUND_RELAY_DENIED)
        if self.ctx.is_dmarc(address):
            if any(not self.ctx.is_dmarc(r) for r in envelope.rcpt_tos):
                return self._reject("mixed_kinds", replies.INBOUND_ONE_KIND)
            return self._accept(envelope, address, rcpt_options)
        if any(self.ctx.is_dmarc(r) for r in envelope.rcpt_tos):
            return self._reject("mixed_kinds", replies.INBOUND_ONE_KIND)
        tag = self.ctx.tag_of(address)
        box = Mailbox.of(address)
        if tag is None or (box.local == self.ctx.feedback.local and box != self.ctx.feedback):
            return self._reject("no_mailbox", replies.INBOUND_NO_MAILBOX.format(address=address))
        if tag and self.ctx.recording.tagger.verify(tag) is None:  # forged, mangled or stale
            return self._reject("bad_tag", replies.INBOUND_NO_MAILBOX.format(address=address))
        return self._accept(envelope, address, rcpt_options)

    def _accept(self, envelope: Envelope, address: str, rcpt_options) -> str:
        if len(envelope.rcpt_tos) >= self.ctx.max_recipients:
            return self._reject("too_many_recipients", replies.TOO_MANY_RECIPIENTS)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return replies.RECIPIENT_OK

    # --- DATA: a report, recorded before the 250 ---
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw: bytes = envelope.original_content or b""
        screened = screen_data(raw, self.ctx.max_header_fields, self.ctx.max_header_field_bytes)
        if isinstance(screened, Refusal):
            return self._reject(screened.reason, screened.reply)
        if envelope.rcpt_tos and self.ctx.is_dmarc(envelope.rcpt_tos[0]):
            return await self._dmarc_report(raw)
        tags = tuple(t for t in (self.ctx.verified(r) for r in envelope.rcpt_tos) if t)
        report = await asyncio.to_thread(parse_report, raw, tagged=bool(tags))
        if report is None:
            return self._reject("not_a_report", replies.INBOUND_NOT_A_REPORT)
        sender = "" if envelope.mail_from == NULL_SENDER else envelope.mail_from
        arrival = Arrival(mail_from=sender, client_ip=_client_ip(session), tags=tags)
        try:
            outcome = await asyncio.to_thread(
                record_report,
                self.ctx.engine,
                report,
                arrival,
                self.ctx.clock.now(),
                self.ctx.recording,
            )
        except SQLAlchemyError as exc:
            log.error("%s not recorded: %s", report.kind, exc)
            return self._reject("not_recorded", replies.INBOUND_NOT_RECORDED)
        self.ctx.metrics.reports.labels(kind=outcome.kind, matched=str(outcome.matched)).inc()
        if not outcome.matched:
            return replies.INBOUND_UNMATCHED.format(kind=outcome.kind)
        return replies.INBOUND_RECORDED.format(
            kind=outcome.kind, suppressed=len(outcome.suppressed)
        )

    async def _dmarc_report(self, raw: bytes) -> str:
        """A DMARC aggregate report: read, stored (or found stored), then 250."""
        try:
            report = await asyncio.to_thread(parse_mail, raw)
        except NotAReport:
            return self._reject("not_a_dmarc_report", replies.INBOUND_NOT_A_DMARC_REPORT)
        except TooLarge as exc:
            return self._reject(
                "dmarc_too_large", replies.INBOUND_DMARC_TOO_LARGE.format(reason=_said(exc))
            )
        except Refused as exc:
            return self._reject(
                "dmarc_unreadable", replies.INBOUND_DMARC_UNREADABLE.format(reason=_said(exc))
            )
        try:
            stored = await asyncio.to_thread(
                store_report, self.ctx.engine, report, self.ctx.clock.now()
            )
        except ForeignDomain:
            return self._reject(
                "dmarc_foreign", replies.INBOUND_DMARC_FOREIGN.format(domain=report.domain)
            )
        except SQLAlchemyError as exc:
            log.error(
                "DMARC report %s from %s not recorded: %s", report.report_id, report.org_name, exc
            )
            return self._reject("not_recorded", replies.INBOUND_NOT_RECORDED)
        self.ctx.metrics.reports.labels(kind="dmarc", matched="True").inc()
        if stored.duplicate:
            return replies.INBOUND_DMARC_DUPLICATE
        return replies.INBOUND_DMARC_RECORDED.format(records=stored.records)

    async def handle_exception(self, error: Exception) -> str:
        return exception_reply(error, self.ctx.metrics.rejected)

    def _reject(self, reason: str, reply: str) -> str:
        self.ctx.metrics.rejected.labels(reason=reason).inc()
        return reply


def _said(error: Exception) -> str:
    """A refusal's reason as one short reply line (a zip's error may quote a member's name)."""
    text = " ".join(str(error).split())
    return text if len(text) <= 200 else text[:197] + "..."

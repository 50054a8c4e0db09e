"""A simulated provider MX: an aiosmtpd server answering as Gmail, Outlook, Yahoo, iCloud … would.

One handler per provider, one handle_<VERB> per verb, each check an early return with the
provider's published reply (sandbox/behaviour.yaml):

    MAIL  per-connection limit → TLS required → IP blocked → DNSBL listing → PTR → DBL listing
    RCPT  today's allowance for the IP's history, then the rate for its reputation tier
          (block after pushing on past either) → unknown mailbox
    DATA  DMARC reject → SPF-or-DKIM for all senders → SPF-and-DKIM for bulk senders → accept

Accepted mail is answered 250 and filed per recipient in the inbox or the spam folder
(sandbox/placement.py: the IP's and the From domain's standing, their complaint rates,
authentication); the folder is kept in the stored copy and the state file, never in a reply. A
share of inbox mail draws a complaint (nobody reports what they never saw), which costs the IP
reputation, counts toward the IP's and the domain's complaint rates and, where the provider
runs a feedback loop, sends an ARF report.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException

from sandbox.authn import Authentication, authenticate, organisational_domain
from sandbox.behaviour import Behaviour, Provider
from sandbox.feedback import Complaint, FeedbackSender
from sandbox.lookup import SandboxLookup
from sandbox.mailbox import Mailboxes, mailbox_exists, share_of, trace_headers
from sandbox.placement import Placement, Signals, decide, draw
from sandbox.reputation import Reputation
from sandbox.state import PlacementRow
from sandbox.zones import dnsbl_query_name

log = logging.getLogger("axiom.sandbox.mx")
RCPT_OK = "250 2.1.5 OK"
SENDER_OK = "250 2.1.0 OK"
INTERNAL_ERROR = "451 4.3.0 Temporary sandbox error; try again later"


@dataclass
class ReceiverContext:
    """What every simulated provider shares: reputation, DNS, mailboxes, steering knobs."""

    behaviour: Behaviour
    reputation: Reputation
    lookup: SandboxLookup
    mailboxes: Mailboxes
    addresses: dict[str, str]  # provider -> MX address
    feedback: FeedbackSender | None = None
    knobs: Callable[[], dict[str, Any]] = dict
    verdicts: list[tuple[float, str, str, str, str, str]] = field(default_factory=list)
    # The world's time: the sandbox clock, which `axiom sandbox clock advance` moves.
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    volume: dict[tuple[str, str, str], int] = field(default_factory=lambda: defaultdict(int))
    # The From domains' standings (organisational domain per provider), as `reputation` keeps
    # the IPs'; None: a world without them (every domain counts as cold).
    domains: Reputation | None = None
    placements: list[PlacementRow] = field(default_factory=list)

    def record(self, provider: str, ip: str, rcpt: str, outcome: str, reply: str) -> None:
        self.verdicts.append((self.now().timestamp(), provider, ip, rcpt, outcome, reply))

    def take_verdicts(self) -> list[tuple[float, str, str, str, str, str]]:
        taken, self.verdicts = self.verdicts, []
        return taken

    def take_placements(self) -> list[PlacementRow]:
        taken, self.placements = self.placements, []
        return taken


@dataclass
class _Connection:
    messages: int = 0


class ProviderSMTP(SMTP):
    """aiosmtpd's protocol; a 421 reply closes the connection, as RFC 5321 3.8 has it."""

    async def push(self, status) -> None:
        await super().push(status)
        text = status.decode() if isinstance(status, bytes) else status
        if text.startswith("421") and self.transport is not None:
            self.transport.close()


class ProviderHandler:
    def __init__(self, provider: Provider, ctx: ReceiverContext):
        self.provider = provider
        self.ctx = ctx
        self.mx_host = provider.mx[0][1]
        self._connections: weakref.WeakKeyDictionary[Session, _Connection] = (
            weakref.WeakKeyDictionary()
        )

    # --- MAIL ---
    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        p, ip = self.provider, _peer(session)
        conn = self._connection(session)
        if p.messages_per_connection and conn.messages >= p.messages_per_connection:
            return self._refuse(ip, "", "per_connection_limit", {})
        if p.require_tls and not session.ssl:
            return self._refuse(ip, "", "tls_required", {})
        if self.ctx.reputation.blocked(p.name, ip):
            # Trying on while blocked counts against the IP's day.
            self.ctx.reputation.refused(p.name, ip)
            return self._refuse(ip, "", "blocked", {})
        # Asked again for every transaction, not once per connection: a listing made while
        # the relay keeps a session open must bite on its next message.
        refusal = await self._client_checks(ip)
        if refusal is not None:
            outcome, reply = refusal
            if outcome == "blocklisted":
                self.ctx.reputation.penalise(p.name, ip, "blocklisted")
            self.ctx.record(p.name, ip, "", outcome, reply)
            return reply
        sender_domain = address.rpartition("@")[2].lower()
        if p.dbl_zone and sender_domain:
            listed = await self._listed(p.dbl_zone, sender_domain)
            if listed is not None:
                self.ctx.reputation.penalise(p.name, ip, "blocklisted")
                return self._refuse(
                    ip, "", "dbl_listed", {"zone": p.dbl_zone, "txt": listed, "mail_from": address}
                )
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return SENDER_OK

    async def _client_checks(self, ip: str) -> tuple[str, str] | None:
        p = self.provider
        for zone in p.dnsbl_zones:
            listed = await self._listed(zone, ip)
            if listed is not None:
                return "blocklisted", self._reply("blocklisted", ip, zone=zone, txt=listed)
        if p.require_ptr and not await self._forward_confirmed(ip):
            return "no_ptr", self._reply("no_ptr", ip)
        return None

    async def _listed(self, zone: str, subject: str) -> str | None:
        """The TXT reason when subject is listed in zone (asked of the sandbox DNS), else None."""
        name = dnsbl_query_name(subject, zone)
        found = await self.ctx.lookup.query(name, "A")
        # A listing is a code the list documents (runbooks/blocklists.yaml); an error answer
        # (127.255.255.254, DBL's 127.0.1.255) is not, as real MTAs match codes explicitly.
        listing = self.ctx.behaviour.zone(zone).codes
        codes = [c for c in found.values if c in listing]
        if not found.ok or not codes:
            return None
        txt = await self.ctx.lookup.txt(name)
        return txt.values[0] if txt.ok and txt.values else f"listed ({codes[0]})"

    async def _forward_confirmed(self, ip: str) -> bool:
        ptr = await self.ctx.lookup.ptr(ip)
        if ptr.status == "error":
            return True  # a DNS hiccup is not the sender's fault
        if not ptr.ok or not ptr.values:
            return False
        forward = await self.ctx.lookup.query(ptr.values[0], "A" if ":" not in ip else "AAAA")
        return ip in forward.values

    # --- RCPT ---
    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        p, ip = self.provider, _peer(session)
        decision = self.ctx.reputation.admit(p.name, ip)
        if decision.admission == "blocked":
            return self._refuse(ip, address, "blocked", {"rcpt": address})
        if decision.admission == "rate_limited":
            key = f"rate_limited_{decision.tier}"
            key = key if p.has_reply(key) else "rate_limited"
            return self._refuse(ip, address, "rate_limited", {"rcpt": address}, key)
        if not mailbox_exists(address, p.unknown_mailbox_share) and not self._customer(address):
            self.ctx.reputation.penalise(p.name, ip, "unknown_mailbox")
            return self._refuse(ip, address, "unknown_mailbox", {"rcpt": address})
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return RCPT_OK

    def _customer(self, address: str) -> bool:
        """Mail to a sending domain (a DSN, say) always has a mailbox at the inbound MX."""
        domain = address.rpartition("@")[2].lower()
        return self.provider.accepts_customer_domains and domain not in self.provider.domains

    # --- DATA ---
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        p, ip = self.provider, _peer(session)
        data = envelope.original_content or b""
        if isinstance(data, str):
            data = data.encode()
        helo = session.host_name or ip
        mail_from = envelope.mail_from or ""
        auth = await authenticate(data, mail_from, helo, ip, self.ctx.lookup)
        domain = _sending_domain(auth, mail_from)
        bulk = self._bulk(domain)
        key = self._auth_refusal(auth, bulk)
        if key is not None:
            reply = self._reply(key, ip, **_auth_values(auth, mail_from))
            for rcpt in envelope.rcpt_tos:
                self.ctx.reputation.penalise(p.name, ip, "auth_failure")
                if self.ctx.domains is not None and domain:
                    self.ctx.domains.offered(p.name, domain)
                    self.ctx.domains.penalise(p.name, domain, "auth_failure")
                self.ctx.record(p.name, ip, rcpt, "unauthenticated", reply)
            return reply
        reference = secrets.token_hex(8)
        self._connection(session).messages += 1
        header = auth.header(self.mx_host).removeprefix("Authentication-Results: ")
        message_id = str(BytesHeaderParser().parsebytes(data).get("Message-ID", reference))
        for rcpt in envelope.rcpt_tos:
            placement = self._place(ip, domain, auth, bulk, message_id, rcpt)
            trace = trace_headers(
                mail_from=mail_from,
                recipient=rcpt,
                mx_host=self.mx_host,
                helo=helo,
                ip=ip,
                tls=bool(session.ssl),
                reference=reference,
                authentication=f"Authentication-Results: {header}",
                folder=placement.header(),
            )
            await asyncio.to_thread(
                self.ctx.mailboxes.store, p.name, rcpt, trace, data, placement.folder
            )
            self._delivered(ip, domain, placement, rcpt, message_id)
            reply = self._reply("accepted", ip, rcpt=rcpt, ref=reference)
            self.ctx.record(p.name, ip, rcpt, "accepted", reply)
            # Nobody's complaints about bounces (aiosmtpd keeps the null sender as "<>"), nor
            # about mail in the spam folder: the spam rate is computed on inbox mail.
            if (
                placement.folder == "inbox"
                and mail_from not in ("", "<>")
                and self._complains(message_id, rcpt)
            ):
                self._complaint(ip, domain, mail_from, rcpt, message_id, data, header)
        self._count_volume(domain, len(envelope.rcpt_tos))
        return self._reply("accepted", ip, ref=reference)

    # --- where accepted mail lands ---
    def _place(
        self, ip: str, domain: str, auth: Authentication, bulk: bool, message_id: str, rcpt: str
    ) -> Placement:
        p, rep, domains = self.provider.name, self.ctx.reputation, self.ctx.domains
        ip_inbox, ip_complaints = rep.inbox_complaints(p, ip)
        domain_tier, domain_inbox, domain_complaints = None, 0, 0
        if domains is not None and domain:
            domain_tier = domains.tier(p, domain).name
            domain_inbox, domain_complaints = domains.inbox_complaints(p, domain)
        signals = Signals(
            provider=p,
            ip_tier=rep.tier(p, ip).name,
            domain_tier=domain_tier,
            ip_inbox=ip_inbox,
            ip_complaints=ip_complaints,
            domain_inbox=domain_inbox,
            domain_complaints=domain_complaints,
            spf_pass=auth.spf_pass,
            dkim_pass=auth.dkim_pass,
            dmarc=auth.dmarc,
            dmarc_policy=auth.dmarc_policy,
            bulk=bulk,
        )
        return decide(self.ctx.behaviour.placement, signals, draw(message_id, rcpt))

    def _delivered(
        self, ip: str, domain: str, placement: Placement, rcpt: str, message_id: str
    ) -> None:
        p, now = self.provider.name, self.ctx.now()
        self.ctx.placements.append(
            PlacementRow(
                now.timestamp(),
                now.strftime("%Y-%m-%d"),
                p,
                ip,
                domain,
                rcpt.lower(),
                message_id,
                placement.folder,
                placement.rule,
            )
        )
        self.ctx.reputation.delivered(p, ip)
        if placement.folder == "inbox":
            self.ctx.reputation.inboxed(p, ip)
        if self.ctx.domains is not None and domain:
            self.ctx.domains.offered(p, domain)
            self.ctx.domains.delivered(p, domain)
            if placement.folder == "inbox":
                self.ctx.domains.inboxed(p, domain)

    def _auth_refusal(self, auth: Authentication, bulk: bool) -> str | None:
        policy, p = self.provider.auth, self.provider
        if policy.enforce_dmarc_reject and auth.dmarc == "fail" and auth.dmarc_policy == "reject":
            return "dmarc_reject"
        if policy.all_senders == "spf_or_dkim" and not (auth.spf_pass or auth.dkim_pass):
            return "unauthenticated"
        if policy.bulk_senders == "spf_and_dkim" and bulk:
            if not auth.spf_pass:
                return "bulk_spf" if p.has_reply("bulk_spf") else "bulk_unauthenticated"
            if not auth.dkim_pass:
                return "bulk_dkim" if p.has_reply("bulk_dkim") else "bulk_unauthenticated"
            if auth.dmarc == "none" and p.has_reply("bulk_dmarc"):
                return "bulk_dmarc"
        return None

    def _bulk(self, domain: str) -> bool:
        """A bulk sender: declared so in the sandbox (Gmail: bulk status is permanent once
        reached) or over the provider's daily threshold today.

        Gmail counts bulk volume by primary domain: mail from any subdomain of axiom.test
        counts toward axiom.test. So both sides are compared as organisational domains: a
        knob naming demo.axiom.test (the sending domain, as the broken-dkim scenario puts
        it) makes its organisation a bulk sender, as reaching the threshold would."""
        declared = {organisational_domain(d) for d in self.ctx.knobs().get("bulk_domains", [])}
        if domain in declared:
            return True
        threshold = self.provider.auth.bulk_threshold_per_day
        today = self.ctx.now().strftime("%Y-%m-%d")
        return threshold is not None and self.ctx.volume[(self.provider.name, domain, today)] >= (
            threshold
        )

    def _count_volume(self, domain: str, count: int) -> None:
        today = self.ctx.now().strftime("%Y-%m-%d")
        self.ctx.volume[(self.provider.name, domain, today)] += count

    # --- complaints ---
    def _complains(self, message_id: str, rcpt: str) -> bool:
        shares = self.ctx.knobs().get("complaint_share", {})
        share = shares.get(self.provider.name, shares.get("*", self.provider.complaint_share))
        return share_of(f"{message_id}|{rcpt}", "complaint") < float(share)

    def _complaint(
        self,
        ip: str,
        domain: str,
        mail_from: str,
        rcpt: str,
        message_id: str,
        data: bytes,
        auth: str,
    ) -> None:
        self.ctx.reputation.penalise(self.provider.name, ip, "complaint")
        if self.ctx.domains is not None and domain:
            self.ctx.domains.penalise(self.provider.name, domain, "complaint")
        loop = self.provider.feedback
        if loop is None or self.ctx.feedback is None:
            return  # Gmail's loop is aggregate only; iCloud has none
        self.ctx.feedback.report(
            Complaint(
                provider=self.provider.name,
                mx_host=self.mx_host,
                mx_address=self.ctx.addresses[self.provider.name],
                source_ip=ip,
                mail_from=mail_from,
                recipient=rcpt,
                message_id=message_id,
                original=data,
                authentication=auth,
                arrival=self.ctx.now(),
            ),
            loop,
        )

    # --- helpers ---
    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException | ConnectionError):
            log.debug("%s: client went away: %r", self.provider.name, error)
        else:
            log.error("%s receiver failed", self.provider.name, exc_info=error)
        return INTERNAL_ERROR

    def _connection(self, session: Session) -> _Connection:
        conn = self._connections.get(session)
        if conn is None:
            conn = self._connections[session] = _Connection()
        return conn

    def _reply(self, key: str, ip: str, **values: str) -> str:
        values.setdefault("ref", secrets.token_hex(6))
        rcpt = values.get("rcpt", "")
        values.setdefault("rcpt_domain", rcpt.rpartition("@")[2])
        return self.provider.reply(key, ip=ip, mx_host=self.mx_host, **values)

    def _refuse(
        self, ip: str, rcpt: str, outcome: str, values: dict[str, str], key: str | None = None
    ) -> str:
        reply = self._reply(key or outcome, ip, **values)
        self.ctx.record(self.provider.name, ip, rcpt, outcome, reply)
        return reply


def _peer(session: Session) -> str:
    peer = session.peer
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


def _sending_domain(auth: Authentication, mail_from: str) -> str:
    """The organisational domain the provider judges the sender by: the From domain's, else
    the envelope sender's (Gmail counts bulk volume by primary domain)."""
    return organisational_domain(auth.from_domain or mail_from.rpartition("@")[2] or "")


def _auth_values(auth: Authentication, mail_from: str) -> dict[str, str]:
    return {
        "from_domain": auth.from_domain or "",
        "mail_from": mail_from,
        "mail_from_domain": auth.spf_domain,
    }


async def start_receiver(
    handler: ProviderHandler, address: str, port: int, tls: ssl.SSLContext | None
) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: ProviderSMTP(
            handler,
            hostname=handler.mx_host,
            ident=handler.provider.greeting,
            tls_context=tls,
            enable_SMTPUTF8=True,
            timeout=120,
        ),
        address,
        port,
    )

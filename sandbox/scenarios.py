"""Named scenarios: steer the world, send real mail through the running relay, report what happened.

Each scenario (1) checks the world is running, (2) notes where the audit trail, suspensions
and the world's complaint log stand, (3) steers the world (reputation, listings, DNS, knobs),
(4) submits `count` messages over authenticated SMTP exactly as a customer would, (5) waits
until every recipient has had a delivery attempt or was held back by the relay, at most
`timeout` seconds, (6) undoes its steering unless asked to keep it, and (7) summarises by
provider: sent, delivered and where the providers filed it (inbox or spam, from the world's
state file: the relay only ever saw 250), deferred, refused, and which Protocol actions fired
(Suspension rows and audit entries written during the run). Count and time are bounded;
nothing loops forever.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib

from config.settings import Settings, split_host_port
from sandbox.behaviour import behaviour
from sandbox.lookup import SandboxLookup
from sandbox.mailbox import mailbox_exists
from sandbox.state import StateStore

MAX_COUNT = 1000
MAX_TIMEOUT = 900.0
COMMAND_WAIT = 10.0
ESTABLISHED = 90.0  # a score in the top tier: rate limits stay out of the picture
_QUEUED_AS = re.compile(r"queued as (\S+)", re.IGNORECASE)


class ScenarioError(Exception):
    """The scenario cannot run; the message says what to do."""


@dataclass(frozen=True)
class Credentials:
    host: str
    port: int
    username: str
    password: str
    domain: str

    @classmethod
    def resolve(cls, settings: Settings, **given: Any) -> Credentials:
        """Options win over AXIOM_HOME/up.json, which `axiom up` writes."""
        path = settings.home / "up.json"
        up: dict[str, Any] = {}
        if path.exists():
            try:
                up = json.loads(path.read_text())
            except ValueError as exc:
                raise ScenarioError(f"{path}: not JSON ({exc})") from None
        values = {k: given.get(k) or up.get(k) for k in ("username", "password", "domain")}
        submission = given.get("submission") or up.get("submission") or settings.submission_listen
        missing = [k for k, v in values.items() if not v]
        if missing:
            raise ScenarioError(
                f"no {', '.join(missing)}: start `axiom up` (it writes {path}) "
                f"or pass --{' --'.join(missing)}"
            )
        host, port = split_host_port(str(submission))
        return cls(host, port, values["username"], values["password"], values["domain"])


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    recipient_domains: tuple[str, ...]
    default_count: int
    explain: str


SCENARIOS = {
    s.name: s
    for s in [
        Scenario(
            "cold-ip-campaign",
            "A campaign from cold IPs, all at once",
            ("gmail.com", "yahoo.com", "outlook.com", "icloud.com"),
            # 50 a provider: past a cold IP's day (40 a provider, sandbox/behaviour.yaml
            # reputation.daily), so the rate-limit replies show at the default count.
            200,
            "Every source IP starts cold at every provider; the relay sends as fast as it may. "
            "Providers accept a day's allowance, then answer with their rate-limit replies (and "
            "block an IP pushed to twice it); the relay's "
            "reaction rules suspend or throttle each (IP, provider) path.",
        ),
        Scenario(
            "blocklisted-ip",
            "The source IPs are listed in Spamhaus ZEN",
            ("outlook.com", "yahoo.com", "icloud.com", "example.net", "gmail.com"),
            40,
            "The relay's IPs are listed in the sandbox zen.spamhaus.org (127.0.0.2, SBL). "
            "Providers that consult it refuse with their blocklist replies; Gmail, which uses "
            "no public DNSBL, still accepts. The listing is removed afterwards (--keep leaves it).",
        ),
        Scenario(
            "complaint-spike",
            "5 % of recipients mark the mail as spam",
            ("yahoo.com", "outlook.com", "gmail.com"),
            150,
            "The IPs start established; 5 % of delivered mail draws a complaint. Yahoo and "
            "Microsoft send ARF reports to the relay's feedback address (Gmail's loop is "
            "aggregate only); the complaint rate passes 0.3 % and the providers start deferring.",
        ),
        Scenario(
            "broken-dkim",
            "The sending domain's DKIM keys in DNS do not match",
            ("gmail.com", "yahoo.com", "outlook.com", "icloud.com"),
            40,
            "The sandbox DNS publishes other keys under the domain's selectors and the domain "
            "counts as a bulk sender (Gmail: bulk status is permanent once reached). SPF still "
            "passes, DKIM fails: providers requiring both refuse with their authentication "
            "replies (Gmail 5.7.30, Yahoo 5.7.9, Microsoft 5.7.515, iCloud CS01).",
        ),
        Scenario(
            "dmarc-quarantine",
            "DKIM keys do not match and DMARC says quarantine: delivered, to spam",
            ("gmail.com", "yahoo.com", "outlook.com", "icloud.com"),
            40,
            "The sandbox DNS publishes other keys under the domain's selectors and a DMARC record "
            "p=quarantine with strict alignment (aspf=s, adkim=s). SPF passes for the return "
            "path, so no provider refuses the mail (the domain is no bulk sender): each answers "
            "250, the relay counts it delivered, and every provider files it as spam (RFC 7489 "
            "6.3). Only the world's placement shows it.",
        ),
    ]
}
QUARANTINE_DMARC = "v=DMARC1; p=quarantine; adkim=s; aspf=s"


@dataclass
class ProviderSummary:
    provider: str
    sent: int = 0
    delivered: int = 0  # the relay's view: answered 250
    inbox: int = 0  # the world's view of those: where the provider filed them
    spam: int = 0
    deferred: int = 0
    refused: int = 0  # by the receiver, permanently: blocked + unknown_mailbox
    blocked: int = 0
    unknown_mailbox: int = 0
    held: int = 0  # no attempt: the relay held it back (path suspended, paced, capped)
    refused_at_submission: int = 0
    complaints: int = 0  # recipients who marked it as spam (Gmail's too)
    arf_reports: int = 0  # complaint reports sent back (Yahoo, Microsoft and generic loops)
    top_reply: str = ""


@dataclass
class Report:
    scenario: str
    title: str
    count: int
    seconds: float
    settled: bool
    steering: list[str] = field(default_factory=list)
    providers: list[ProviderSummary] = field(default_factory=list)
    suspensions: list[dict[str, Any]] = field(default_factory=list)
    audit: list[dict[str, Any]] = field(default_factory=list)
    recommended: dict[str, int] = field(default_factory=dict)
    complaint_reports: dict[str, int] = field(default_factory=dict)  # by status
    complaint_reply: str = ""  # what the feedback address answered (most common)
    paths_already_suspended: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


Progress = Callable[[str, int, int], None]  # (phase, done, total)


class ScenarioRunner:
    def __init__(
        self,
        settings: Settings,
        credentials: Credentials,
        progress: Progress,
        complaint_share: float = 0.05,
    ):
        if not 0 < complaint_share <= 1:
            raise ScenarioError(f"--complaint-share must be in (0, 1], got {complaint_share}")
        self.complaint_share = complaint_share
        self.settings = settings
        self.credentials = credentials
        self.progress = progress
        self.state = StateStore.for_home(settings.home)
        self._undo: list[Callable[[], None]] = []
        self.steering: list[str] = []
        from sandbox.database import reader

        self.engine = reader(settings.db_url)

    # ------------------------------------------------------------ the run
    async def run(self, scenario: Scenario, count: int, seconds: float, keep: bool) -> Report:
        """At most `count` messages; waits at most `seconds` (the --timeout) in all."""
        if not 1 <= count <= MAX_COUNT:
            raise ScenarioError(f"--count must be 1-{MAX_COUNT}, got {count}")
        if not 5 <= seconds <= MAX_TIMEOUT:
            raise ScenarioError(f"--timeout must be 5-{MAX_TIMEOUT:.0f} seconds, got {seconds}")
        await self.require_world()
        started = time.monotonic()
        baseline = await asyncio.to_thread(self._baseline)
        try:
            await getattr(self, "_setup_" + scenario.name.replace("-", "_"))()
            complained = await asyncio.to_thread(self._complaints_by_provider)
            queued, refused = await self._submit(scenario, count, started + seconds)
            settled = await self._wait(queued, started + seconds)
            if scenario.name == "complaint-spike":
                await self._wait_for_reports(baseline["complaint"], started + seconds)
            await asyncio.sleep(0.5)  # the world writes its standings 4 times a second
            await self._wait_for_placements(queued)
            complained = {
                provider: n - complained.get(provider, 0)
                for provider, n in (await asyncio.to_thread(self._complaints_by_provider)).items()
            }
        finally:
            if not keep:
                for undo in reversed(self._undo):
                    await asyncio.to_thread(undo)
        report = await asyncio.to_thread(
            self._report, scenario, count, baseline, queued, refused, settled, complained
        )
        report.seconds = round(time.monotonic() - started, 1)
        return report

    async def require_world(self) -> None:
        info = await asyncio.to_thread(self.state.world)
        if not info:
            raise ScenarioError(
                "the sandbox world is not running: start `axiom up` or `axiom sandbox run`"
            )
        if not _alive(int(info.get("pid", 0))):
            raise ScenarioError(
                f"the sandbox world (pid {info.get('pid')}) is gone: restart `axiom up` "
                "or `axiom sandbox run`"
            )
        host, port = split_host_port(info["dns"])
        found = await SandboxLookup(host, port, timeout=1.0).query("gmail.com", "MX")
        if not found.ok:
            raise ScenarioError(f"the sandbox DNS at {info['dns']} does not answer")

    # ------------------------------------------------------------ steering
    def source_ips(self) -> list[str]:
        from sqlmodel import Session, select

        from models import IpAddress

        with Session(self.engine) as session:
            return sorted(ip.address for ip in session.exec(select(IpAddress)).all())

    async def _command(self, name: str, **args: Any) -> str:
        command = await asyncio.to_thread(self.state.request, name, **args)
        deadline = time.monotonic() + COMMAND_WAIT
        while time.monotonic() < deadline:
            result = await asyncio.to_thread(self.state.command_result, command)
            if result is not None:
                if result.startswith("error"):
                    raise ScenarioError(f"the world refused {name}: {result}")
                return result
            await asyncio.sleep(0.1)
        raise ScenarioError(f"the world did not answer {name} within {COMMAND_WAIT:.0f} s")

    async def _set_reputation(self, score: float | None) -> None:
        ips = await asyncio.to_thread(self.source_ips)
        if not ips:
            raise ScenarioError("the relay has no source IPs (axiom ip add …)")
        for ip in ips:
            if score is None:
                await self._command("reset-reputation", ip=ip)
            else:
                await self._command("set-reputation", ip=ip, score=score)
        what = "reset to cold" if score is None else f"set to {score:g} (established)"
        self.steering.append(f"reputation of {', '.join(ips)} at every provider {what}")

    def _set_knob(self, name: str, value: Any) -> None:
        before = self.state.knobs().get(name)
        self.state.set_knob(name, value)
        self._undo.append(lambda: self.state.set_knob(name, before))

    async def _setup_cold_ip_campaign(self) -> None:
        await self._set_reputation(None)

    async def _setup_blocklisted_ip(self) -> None:
        await self._set_reputation(ESTABLISHED)
        ips = await asyncio.to_thread(self.source_ips)
        listed_before = {(x.zone, x.subject) for x in await asyncio.to_thread(self.state.listings)}
        for ip in ips:
            await asyncio.to_thread(
                self.state.list, "zen.spamhaus.org", ip, "127.0.0.2", "scenario blocklisted-ip"
            )
            if ("zen.spamhaus.org", ip) not in listed_before:
                self._undo.append(lambda ip=ip: self.state.unlist("zen.spamhaus.org", ip))
        self.steering.append(f"listed {', '.join(ips)} in zen.spamhaus.org (127.0.0.2)")
        await asyncio.sleep(1.0)  # the world reloads the state file four times a second

    async def _setup_complaint_spike(self) -> None:
        await self._set_reputation(ESTABLISHED)
        share = self.complaint_share
        await asyncio.to_thread(self._set_knob, "complaint_share", {"*": share})
        self.steering.append(f"complaint share {share:.0%} at every provider")
        await asyncio.sleep(1.0)

    async def _setup_broken_dkim(self) -> None:
        await self._set_reputation(ESTABLISHED)
        domain = self.credentials.domain.lower()
        selectors = await self._publish_other_keys(domain, "scenario broken-dkim")
        bulk = sorted(set(self.state.knobs().get("bulk_domains", [])) | {domain})
        await asyncio.to_thread(self._set_knob, "bulk_domains", bulk)
        self.steering.append(
            f"published other keys under {', '.join(selectors)} for {domain}; "
            f"{domain} counts as a bulk sender"
        )
        await asyncio.sleep(1.0)

    async def _setup_dmarc_quarantine(self) -> None:
        await self._set_reputation(ESTABLISHED)
        domain = self.credentials.domain.lower()
        selectors = await self._publish_other_keys(domain, "scenario dmarc-quarantine")
        name = f"_dmarc.{domain}"
        await asyncio.to_thread(
            self.state.override, name, "TXT", [QUARANTINE_DMARC], "scenario dmarc-quarantine"
        )
        self._undo.append(lambda: self.state.clear_override(name, "TXT"))
        self.steering.append(
            f'published other keys under {", ".join(selectors)} and {name} "{QUARANTINE_DMARC}"'
        )
        await asyncio.sleep(1.0)

    async def _publish_other_keys(self, domain: str, reason: str) -> list[str]:
        """Keys the relay does not hold, under every selector of the domain (undone after)."""
        from sandbox.published import dkim_txt_value

        selectors = await asyncio.to_thread(self._selectors, domain)
        if not selectors:
            raise ScenarioError(f"domain {domain} has no DKIM keys in the database")
        for selector, algorithm in selectors:
            name = f"{selector}._domainkey.{domain}"
            other = await asyncio.to_thread(unrelated_public_key, algorithm)
            value = dkim_txt_value(algorithm, other)
            await asyncio.to_thread(self.state.override, name, "TXT", [value], reason)
            self._undo.append(lambda name=name: self.state.clear_override(name, "TXT"))
        return [selector for selector, _ in selectors]

    def _complaints_by_provider(self) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for row in self.state.standings():
            totals[row.provider] += row.complaints
        return dict(totals)

    def _selectors(self, domain: str) -> list[tuple[str, str]]:
        from sqlmodel import Session, select

        from models import DkimKey, Domain, KeyState

        with Session(self.engine) as session:
            row = session.exec(select(Domain).where(Domain.name == domain)).first()
            if row is None:
                return []
            keys = session.exec(
                select(DkimKey).where(
                    DkimKey.domain_id == row.id, DkimKey.state != KeyState.retired
                )
            ).all()
            return [(k.selector, k.algorithm) for k in keys]

    # ------------------------------------------------------------ traffic
    async def _submit(
        self, scenario: Scenario, count: int, deadline: float
    ) -> tuple[dict[str, str], dict[str, str]]:
        """Queue ids by recipient, and replies of recipients the relay refused at submission."""
        creds = self.credentials
        run = secrets.token_hex(3)
        sender = f"news@{creds.domain}"
        queued: dict[str, str] = {}
        refused: dict[str, str] = {}
        client: aiosmtplib.SMTP | None = None
        try:
            for n in range(count):
                if time.monotonic() > deadline:
                    break
                domain = scenario.recipient_domains[n % len(scenario.recipient_domains)]
                rcpt = _existing_recipient(run, n, domain)
                if client is None or not client.is_connected:
                    client = await self._connect()
                data = _message(sender, rcpt, scenario, run, n)
                try:
                    _, reply = await client.sendmail(sender, [rcpt], data)
                except aiosmtplib.SMTPRecipientsRefused as exc:
                    refused[rcpt] = f"{exc.recipients[0].code} {exc.recipients[0].message}"
                except aiosmtplib.SMTPResponseException as exc:
                    refused[rcpt] = f"{exc.code} {exc.message}"
                    if exc.code in (421, 530, 535):
                        raise ScenarioError(
                            f"the relay refused the submission: {refused[rcpt]}"
                        ) from None
                else:
                    found = _QUEUED_AS.search(reply)
                    if found:
                        queued[rcpt] = found[1]
                self.progress("submitting", n + 1, count)
        except (aiosmtplib.SMTPException, OSError) as exc:
            if not queued:
                raise ScenarioError(
                    f"cannot submit to {creds.host}:{creds.port}: {exc}; is the relay running?"
                ) from None
        finally:
            if client is not None and client.is_connected:
                try:
                    await client.quit()
                except aiosmtplib.SMTPException:
                    client.close()
        return queued, refused

    async def _connect(self) -> aiosmtplib.SMTP:
        creds = self.credentials
        client = aiosmtplib.SMTP(
            hostname=creds.host, port=creds.port, validate_certs=False, timeout=30
        )
        await client.connect()
        await client.login(creds.username, creds.password)
        return client

    async def _wait(self, queued: dict[str, str], deadline: float) -> bool:
        total = len(queued)
        while True:
            done = await asyncio.to_thread(self._settled, set(queued.values()))
            self.progress("delivering", done, total)
            if done >= total:
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.5)

    def _settled(self, queue_ids: set[str]) -> int:
        from sqlmodel import Session, col, select

        from models import Recipient, RecipientState

        if not queue_ids:
            return 0
        with Session(self.engine) as session:
            rows = session.exec(
                select(Recipient).where(col(Recipient.message_id).in_(queue_ids))
            ).all()
        return sum(
            1
            for r in rows
            if r.state != RecipientState.queued or r.attempts > 0 or r.last_reply is not None
        )

    async def _wait_for_placements(self, queued: dict[str, str], grace: float = 3.0) -> None:
        """Until the world has written where it filed every delivered recipient (at most grace
        seconds: it writes 4 times a second, later on a busy machine)."""
        until = time.monotonic() + grace
        while time.monotonic() < until:
            delivered = await asyncio.to_thread(self._delivered_addresses, set(queued.values()))
            placed = await asyncio.to_thread(self.state.placements_of, delivered)
            if len({row.rcpt for row in placed}) >= len(delivered):
                return
            await asyncio.sleep(0.25)

    def _delivered_addresses(self, queue_ids: set[str]) -> set[str]:
        from sqlmodel import Session, col, select

        from models import Recipient, RecipientState

        if not queue_ids:
            return set()
        with Session(self.engine) as session:
            rows = session.exec(
                select(Recipient.address).where(
                    col(Recipient.message_id).in_(queue_ids),
                    Recipient.state == RecipientState.delivered,
                )
            ).all()
        return {address.lower() for address in rows}

    async def _wait_for_reports(self, since: int, deadline: float) -> None:
        grace = time.monotonic() + 8.0
        while time.monotonic() < min(deadline, grace):
            rows = await asyncio.to_thread(self.state.complaints, since)
            if rows and all(r["status"] != "pending" for r in rows):
                return
            await asyncio.sleep(0.5)

    # ------------------------------------------------------------ the summary
    def _baseline(self) -> dict[str, Any]:
        from sqlmodel import Session, func, select

        from models import AuditEntry, Suspension
        from models.sandbox_clock import clock_for

        now = clock_for(self.settings.environment, self.engine).now()
        with Session(self.engine) as session:
            active = session.exec(select(Suspension).where(Suspension.expires_at > now)).all()
            return {
                "audit": session.exec(select(func.max(AuditEntry.id))).one() or 0,
                "suspension": session.exec(select(func.max(Suspension.id))).one() or 0,
                "complaint": self.state.last_complaint_id(),
                "active": [f"{s.source_ip}/{s.provider} {s.action} ({s.rule_id})" for s in active],
            }

    def _report(
        self,
        scenario: Scenario,
        count: int,
        baseline: dict[str, Any],
        queued: dict[str, str],
        refused: dict[str, str],
        settled: bool,
        complained: dict[str, int],
    ) -> Report:
        from sqlmodel import Session, col, select

        from models import AuditEntry, DeliveryEvent, Recipient, RecipientState, Suspension

        model = behaviour()
        summaries: dict[str, ProviderSummary] = {}
        replies: dict[str, Counter] = defaultdict(Counter)

        def summary(address: str) -> ProviderSummary:
            provider = model.provider_for_domain(address.rpartition("@")[2])
            name = provider.name if provider else "generic"
            return summaries.setdefault(name, ProviderSummary(name))

        for rcpt, reply in refused.items():
            s = summary(rcpt)
            s.sent += 1
            s.refused_at_submission += 1
            replies[s.provider][reply[:90]] += 1
        with Session(self.engine) as session:
            ids = set(queued.values())
            recipients = (
                session.exec(select(Recipient).where(col(Recipient.message_id).in_(ids))).all()
                if ids
                else []
            )
            events = (
                session.exec(
                    select(DeliveryEvent).where(col(DeliveryEvent.message_id).in_(ids))
                ).all()
                if ids
                else []
            )
            suspensions = session.exec(
                select(Suspension).where(Suspension.id > baseline["suspension"])
            ).all()
            audit = session.exec(
                select(AuditEntry)
                .where(AuditEntry.id > baseline["audit"])
                .order_by(col(AuditEntry.id))
            ).all()
        last_category = {}
        for e in sorted(events, key=lambda e: e.id or 0):
            last_category[e.recipient_id] = e.category
        # Where the providers filed what they accepted: the world's state file, by recipient
        # (a run's recipients are its own). The relay never sees this.
        folders = {
            row.rcpt: row.folder for row in self.state.placements_of(r.address for r in recipients)
        }
        for r in recipients:
            s = summary(r.address)
            s.sent += 1
            if r.state == RecipientState.delivered:
                s.delivered += 1
                folder = folders.get(r.address.lower())
                if folder == "inbox":
                    s.inbox += 1
                elif folder == "spam":
                    s.spam += 1
                continue
            if r.state in (RecipientState.bounced, RecipientState.expired):
                s.refused += 1
                if last_category.get(r.id) == "mailbox_unknown":
                    s.unknown_mailbox += 1
                else:
                    s.blocked += 1
            elif r.attempts > 0:
                s.deferred += 1
            else:
                s.held += 1
            replies[s.provider][_tidy(r.last_reply or "")[:90]] += 1
        complaints = self.state.complaints(baseline["complaint"])
        statuses: Counter = Counter()
        answers: Counter = Counter()
        for c in complaints:
            provider = c["provider"]
            summaries.setdefault(provider, ProviderSummary(provider)).arf_reports += 1
            statuses[c["status"]] += 1
            answers[c["reply"][:120]] += 1
        for provider, n in complained.items():
            if n > 0:
                summaries.setdefault(provider, ProviderSummary(provider)).complaints = n
        for name, counter in replies.items():
            if counter:
                summaries[name].top_reply = counter.most_common(1)[0][0]
        recommended = Counter(e.action for e in events if e.action and e.category != "delivered")
        return Report(
            scenario=scenario.name,
            title=scenario.title,
            count=count,
            seconds=0.0,
            settled=settled,
            steering=self.steering,
            providers=[summaries[k] for k in sorted(summaries)],
            suspensions=[
                {
                    "ip": s.source_ip,
                    "provider": s.provider,
                    "action": s.action,
                    "limit_per_minute": s.limit_per_minute,
                    "rule": s.rule_id,
                    "until": s.expires_at.isoformat(),
                }
                for s in suspensions
            ],
            audit=[
                {"id": e.id, "actor": e.actor, "action": e.action, "subject": e.subject}
                for e in audit
            ],
            recommended=dict(recommended.most_common()),
            complaint_reports=dict(statuses),
            complaint_reply=answers.most_common(1)[0][0] if answers else "",
            paths_already_suspended=baseline["active"],
        )


def _existing_recipient(run: str, n: int, domain: str) -> str:
    """An address with a mailbox at every simulated provider.

    The world refuses a stable 2 % of addresses as unknown (sandbox/behaviour.yaml) and counts
    each against the sending IP. A scenario measures the one signal it steers, so its
    recipients are addresses the world knows: s<run>-<n>@domain, or the first of
    s<run>-<n>.1, .2, … that exists. Existence is "hash ≥ share", so an address that exists at
    the highest share exists at every provider.
    """
    share = max(p.unknown_mailbox_share for p in behaviour().providers)
    for k in range(256):  # at a 2 % share, 256 misses in a row would take odds of 0.02**256
        rcpt = f"s{run}-{n}@{domain}" if k == 0 else f"s{run}-{n}.{k}@{domain}"
        if mailbox_exists(rcpt, share):
            return rcpt
    raise ScenarioError(f"no existing mailbox found for message {n} at {domain}")


def _message(sender: str, rcpt: str, scenario: Scenario, run: str, n: int) -> bytes:
    domain = sender.rpartition("@")[2]
    body = base64.encodebytes(secrets.token_bytes(48)).decode().strip()
    return (
        f"From: Axiom demo <{sender}>\r\n"
        f"To: <{rcpt}>\r\n"
        f"Subject: [{scenario.name}] message {n + 1}\r\n"
        f"Message-ID: <{run}.{n}.{secrets.token_hex(4)}@{domain}>\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        f"Sandbox scenario {scenario.name}, run {run}, message {n + 1}.\r\n{body}\r\n"
    ).encode()


def _tidy(reply: str) -> str:
    """One enhanced code where the stored reply repeats it ("550 5.7.1 5.7.1 …")."""
    parts = reply.split(" ", 3)
    if len(parts) == 4 and parts[1] == parts[2] and parts[1][:1] in "245" and "." in parts[1]:
        return " ".join([parts[0], parts[1], parts[3]])
    return reply


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def scenario_names() -> list[str]:
    return list(SCENARIOS)


def mail_dir(settings: Settings) -> Path:
    return settings.home / "sandbox" / "mail"


def unrelated_public_key(algorithm: str) -> str:
    """A p= value for a fresh key pair of the algorithm: a key the relay does not hold."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    if algorithm == "ed25519":
        raw = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()
        return base64.b64encode(raw).decode()
    der = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return base64.b64encode(der).decode()

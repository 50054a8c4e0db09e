"""Governed vs ungoverned (issue 17, "The measure of success"): the same traffic twice through
the sandbox world on the sandbox clock, once with the Protocol governing and once through a plain
relay, in one process and one run.

    result = asyncio.run(run_scenario(SCENARIOS["blocklisting"], "small", tmp))
    print(result.table())        # refused, deferred, inbox, spam, first intervention, lost

Each scenario is data (`Scenario`): its tenants and pools, how much they send a day and when
(`waves`), and the trouble the world makes (`Trouble`: when it starts, how long it lasts). Two
stacks (testbed/sandbox_stack.py: a database, a sandbox world, the relay's delivery engine and
inbound listener) are seeded alike and moved through the same simulated times in lockstep; each
step spools the same recipients into both and delivers what is due.

- GOVERNED: the relay's automatic reactions on (runbooks/shaping.yaml); each stream has the
  overflow pool the Protocol's pool assignment gives it; a cold IP warms on the `sandbox` plan
  (protocol/warmup.start, and warmup.daily each morning); every 15 simulated minutes the
  blocklist scan (protocol/blocklists scan/apply, protocol/delisting.protect; on a clearance the
  delisting runbook's end: lift and re-warm); every 5 simulated minutes a degradation-triage
  cycle (protocol/triage.detect) whose incidents a scripted operator answers as
  flows/degradation_triage.py's ladder does (protocol/triage_response: propose → approve → apply
  → verify after the cause's interval → resolve, or escalate and the next rung), approving every
  proposal. When the trouble ends (the customer fixed the cause, the list delisted the IP) the
  operator releases what the Protocol held (held streams, paused tenants), on the customer's
  word, as a person would.
- UNGOVERNED: a plain relay: no reaction rules, no warm-up plan (every IP `active`), no caps, no
  overflow pool, no flows.

Traffic: each wave goes to a new part of the list (no address twice), engaged recipients (no
complaints but the scenario's). The clock moves in 5-minute steps for SETTLE after each wave and
EDGE after the trouble starts or ends; otherwise to the next event, or to the next retry due but
at least QUIET on (retries then run up to a quarter hour late, alike in both runs).

Counted per run, for the tenants' campaign mail (DSNs aside): recipients submitted, refused for
good (bounced or expired, each with a DSN), deferral answers, delivered to the inbox and to the
spam folder (the world's placement, sandbox/placement.py: the relay never sees it), still
queued at the end, lost (anything else: must be 0), and the time from the trouble's start to the
first protective action (a Suspension row, mail held by a cap, a hold or a pause, a stream
moved, an incident's action). The inbox share is of the mail submitted: of the mail delivered
alone, a relay looks better the more it refuses.

Shared by tests/integration/test_experiment.py and bench/experiment.py; no pytest here.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select
from sqlmodel import Session

from models import (
    AuditEntry,
    DeliveryEvent,
    EventKind,
    IncidentEvent,
    IpState,
    Message,
    Recipient,
    RecipientState,
    Suspension,
)
from models.db import session_scope
from protocol.errors import ServiceError
from testbed.sandbox_stack import Outgoing, SandboxStack, existing_recipients

DAY = timedelta(days=1)
STEP = timedelta(minutes=5)  # the triage cycle's interval; the finest step of the clock
SCAN_EVERY = timedelta(minutes=15)  # runbooks/blocklist-scan.yaml interval_seconds
SETTLE = timedelta(minutes=45)  # after mail moved, steps stay fine this long (replies, reports)
EDGE = timedelta(hours=1)  # and this long after the trouble starts or ends
QUIET = timedelta(minutes=15)  # otherwise (only retries due) at least this far at a time
OPERATOR = "scripted-operator"
ACTOR = "testbed:experiment"

SHARED_IP = "127.0.0.20"  # pool `default` (shared, known to every provider): DSNs go from here
DEDICATED_IP = "127.0.0.21"  # a tenant's dedicated pool
OVERFLOW_IP = "127.0.0.22"  # pool `overflow`: the shared streams' overflow (volume spike)
PTRS = {
    SHARED_IP: "mta20.axiom.test",
    DEDICATED_IP: "mta21.axiom.test",
    OVERFLOW_IP: "mta22.axiom.test",
}
# Recipient domain -> the provider the relay and the world name it by.
PROVIDERS = {"gmail.com": "google", "outlook.com": "microsoft", "yahoo.com": "yahoo"}
CAMPAIGN = "campaign"  # every tenant's stream here
ZEN = "zen.spamhaus.org"


# ---------------------------------------------------------------- scenarios as data
@dataclass(frozen=True)
class Size:
    days: int
    per_day: int  # recipients a day per tenant, evenly over PROVIDERS
    per_message: int = 20  # recipients a message (one provider a message)
    trouble_day: int | None = None  # the day the trouble starts at this size (else its own)
    until_hour: float = 24.0  # the run stops at this hour of its last day


@dataclass(frozen=True)
class Tenant:
    name: str
    domain: str
    spike: int = 1  # its day's volume on the trouble's day, as a multiple (volume spike)


@dataclass(frozen=True)
class Trouble:
    kind: str  # cold-ip | complaints | blocklisting | broken-dkim | volume-spike
    day: int  # the day it starts (0-based)
    hour: float  # the hour of that day
    hours: float | None = None  # how long it lasts; None: to the end of the run
    complaint_share: float = 0.05  # complaints: the share of inbox mail reported as spam


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    explain: str
    trouble: Trouble
    sizes: dict[str, Size]
    layout: str = "dedicated"  # dedicated: one tenant on its own IP; shared: two on one pool
    tenants: tuple[Tenant, ...] = (Tenant("acme", "acme.example"),)
    waves: tuple[float, ...] = (9, 11, 13, 15)  # hours at which a share of the day is sent
    spike_wave: float = 10.0  # volume spike: the hour the spiking tenant sends its whole day
    dedicated_score: float | None = 90  # the dedicated IP's standing; None: cold everywhere
    shared_score: float = 90  # the shared (and overflow) IPs' standing at every provider


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario(
            "cold-ip-campaign",
            "A campaign from a new, cold dedicated IP, every day for a month",
            "Day 0 starts a daily campaign from an IP no provider knows. Governed: the IP warms on "
            "plan `sandbox` (caps per provider, judged each morning), what the caps hold leaves "
            "from the shared pool. Ungoverned: the IP was declared active and sends it all.",
            Trouble("cold-ip", day=0, hour=9),
            {"small": Size(days=2, per_day=300), "full": Size(days=30, per_day=600)},
            waves=(9,),
            dedicated_score=None,
        ),
        Scenario(
            "complaint-spike",
            "5 % of the campaign's recipients report it as spam, from day 1 on",
            "An established dedicated IP sends a daily campaign; from day 1 09:00 its recipients "
            "report 5 % of what reaches their inbox (Yahoo and Microsoft send ARF reports back, "
            "Gmail's loop is aggregate only). The bad list is not cleaned within the run.",
            Trouble("complaints", day=1, hour=9),
            {
                "small": Size(days=1, per_day=600, trouble_day=0, until_hour=16),
                "full": Size(days=5, per_day=1500),
            },
            waves=(9, 12),
        ),
        Scenario(
            "blocklisting",
            "The dedicated IP is listed in Spamhaus ZEN for a day",
            "An established dedicated IP is listed in the sandbox zen.spamhaus.org at day 1 "
            "10:50 and delisted a day later (the same in both runs). Microsoft and Yahoo consult "
            "ZEN and refuse; Gmail consults no public list.",
            Trouble("blocklisting", day=1, hour=10 + 50 / 60, hours=24),
            {
                "small": Size(days=1, per_day=600, trouble_day=0, until_hour=18),
                "full": Size(days=4, per_day=1500),
            },
        ),
        Scenario(
            "broken-dkim",
            "The sending domain's DKIM record is broken for five hours",
            "At day 1 10:50 the domain's DNS publishes other keys under its selectors (a bad "
            "edit), and the domain is a bulk sender: Gmail, Yahoo and Microsoft refuse mail "
            "without a passing DKIM signature. The customer fixes the record at 15:50 (the same "
            "in both runs).",
            Trouble("broken-dkim", day=1, hour=10 + 50 / 60, hours=5),
            {
                "small": Size(days=1, per_day=600, trouble_day=0, until_hour=18),
                "full": Size(days=4, per_day=1500),
            },
        ),
        Scenario(
            "volume-spike",
            "One tenant of a shared pool sends ten times its usual day at once",
            "Two tenants share a pool's IP (established: about 300 a day at each provider); each "
            "declared and usually sends the same daily volume. On day 1 at 10:00 one of them "
            "sends ten times its day at once, past what the providers take from the IP in a day.",
            Trouble("volume-spike", day=1, hour=10, hours=14),
            {
                "small": Size(days=1, per_day=200, trouble_day=0, until_hour=12),
                "full": Size(days=5, per_day=300),
            },
            layout="shared",
            tenants=(Tenant("steady", "steady.example"), Tenant("surge", "surge.example", 10)),
            shared_score=50,
        ),
    ]
}
SCALES = ("small", "full")


# ---------------------------------------------------------------- results
@dataclass
class RunResult:
    governed: bool
    submitted: int = 0
    delivered: int = 0
    inbox: int = 0
    spam: int = 0
    refused: int = 0  # recipients refused for good: bounced or expired
    blocked: int = 0  # of those, refused as blocked (reputation or block list)
    expired: int = 0  # of those, retried until the maximum age
    deferred: int = 0  # deferral answers (4xx), retries counted again
    queued: int = 0  # still queued at the end: held, capped, paused or waiting for a retry
    lost: int = 0  # submitted and none of the above, or refused without a DSN
    refused_without_dsn: int = 0
    first_intervention: float | None = None  # minutes from the trouble's start
    interventions: dict[str, int] = field(default_factory=dict)  # kind -> count
    timeline: list[str] = field(default_factory=list)  # the first protective actions
    incidents: dict[str, int] = field(default_factory=dict)  # cause -> count (governed)
    by_tenant: dict[str, dict[str, int]] = field(default_factory=dict)
    by_provider: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def inbox_share(self) -> float | None:
        """Of the mail submitted, the share that reached an inbox: what the customer asked
        for. (Of the mail delivered alone, a relay that refuses its doubtful mail looks
        better the more it refuses: inbox_of_delivered.)"""
        return self.inbox / self.submitted if self.submitted else None

    @property
    def inbox_of_delivered(self) -> float | None:
        """Of the mail delivered, the share the providers filed in the inbox."""
        placed = self.inbox + self.spam
        return self.inbox / placed if placed else None

    def as_json(self) -> dict:
        return asdict(self) | {
            "inbox_share": self.inbox_share,
            "inbox_of_delivered": self.inbox_of_delivered,
        }


@dataclass
class ScenarioResult:
    name: str
    title: str
    scale: str
    size: Size
    trouble: Trouble
    started: str  # the first simulated day
    governed: RunResult
    ungoverned: RunResult
    steps: int = 0
    seconds: float = 0.0
    log: list[str] = field(default_factory=list)  # the trouble's edges, what the operator did

    @property
    def refused_at_most_half(self) -> bool:
        return self.governed.refused * 2 <= self.ungoverned.refused

    @property
    def higher_inbox_share(self) -> bool:
        g, u = self.governed.inbox_share, self.ungoverned.inbox_share
        return g is not None and (u is None or g > u)

    def as_json(self) -> dict:
        return {
            "name": self.name,
            "title": self.title,
            "scale": self.scale,
            "size": asdict(self.size),
            "trouble": asdict(self.trouble),
            "started": self.started,
            "steps": self.steps,
            "seconds": self.seconds,
            "refused_at_most_half": self.refused_at_most_half,
            "higher_inbox_share": self.higher_inbox_share,
            "governed": self.governed.as_json(),
            "ungoverned": self.ungoverned.as_json(),
            "log": self.log,
        }

    def rows(self) -> list[tuple[str, str, str]]:
        """(measure, governed, ungoverned), the table's lines."""
        g, u = self.governed, self.ungoverned

        def share(x: float | None) -> str:
            return "—" if x is None else f"{x:.1%}"

        def minutes(m: float | None) -> str:
            return "none" if m is None else f"{m:.0f} min"

        return [
            ("submitted", str(g.submitted), str(u.submitted)),
            ("refused", str(g.refused), str(u.refused)),
            ("  of which blocked", str(g.blocked), str(u.blocked)),
            ("deferred (answers)", str(g.deferred), str(u.deferred)),
            ("delivered to inbox", str(g.inbox), str(u.inbox)),
            ("delivered to spam", str(g.spam), str(u.spam)),
            ("inbox share (of submitted)", share(g.inbox_share), share(u.inbox_share)),
            ("inbox of delivered", share(g.inbox_of_delivered), share(u.inbox_of_delivered)),
            ("still queued at the end", str(g.queued), str(u.queued)),
            (
                "time to first intervention",
                minutes(g.first_intervention),
                minutes(u.first_intervention),
            ),
            ("messages lost", str(g.lost), str(u.lost)),
        ]

    def table(self) -> str:
        """Plain text, both runs side by side (test failure output)."""
        head = f"{self.name} ({self.scale}: {self.size.days} days, {self.size.per_day} a day)"
        lines = [head, f"{'':<28} {'GOVERNED':>12} {'UNGOVERNED':>12}"]
        lines += [f"{m:<28} {g:>12} {u:>12}" for m, g, u in self.rows()]
        lines.append(f"governed: {', '.join(self.governed.timeline[:6]) or 'no action'}")
        return "\n".join(lines)


class ExperimentTimeout(AssertionError):
    """A scenario did not finish within its real-time bound."""


# ---------------------------------------------------------------- seeding
def _seed_common(scenario: Scenario, per_day: int) -> Callable:
    """Both runs' relay alike: the shared pool `default` (its IP known everywhere), the
    tenants, their domains (active, with DKIM keys: the same keys in both runs) and streams."""

    def seed(s: Session, keybox) -> None:
        from models import IpAddress
        from protocol import domains, egress, tenants

        egress.ensure_default_pool(s)
        shared = egress.get_pool(s, "default")
        for ip in s.exec(select(IpAddress).where(IpAddress.pool_id == shared.id)).scalars():
            s.delete(ip)
        s.flush()
        ips = [(SHARED_IP, "default")]
        if scenario.layout == "dedicated":
            egress.add_pool(s, "dedicated", "dedicated")
            ips.append((DEDICATED_IP, "dedicated"))
        else:
            egress.add_pool(s, "overflow", "shared")
            ips.append((OVERFLOW_IP, "overflow"))
        for address, pool in ips:
            ip = egress.add_ip(s, address, pool, PTRS[address], 100)
            ip.state = IpState.active
            s.add(ip)
        pool = "dedicated" if scenario.layout == "dedicated" else "default"
        for t in scenario.tenants:
            tenants.add_tenant(s, t.name)
            domains.add_domain(s, keybox, t.name, t.domain)
            domains.mark_domain_active(s, t.domain, ACTOR, "experiment")
            stream = egress.set_stream(s, t.name, CAMPAIGN, pool, None)
            stream.declared_per_day = per_day  # what the customer declared at onboarding
            s.add(stream)

    return seed


def _seed_run(scenario: Scenario, governed: bool) -> Callable:
    """What the Protocol adds: each stream's overflow pool (the pool assignment's), and a new
    IP left cold for its warm-up plan. Ungoverned: nothing (every IP active, no overflow)."""

    def seed(s: Session, keybox) -> None:
        from protocol import egress

        if not governed:
            return
        overflow = "default" if scenario.layout == "dedicated" else "overflow"
        pool = "dedicated" if scenario.layout == "dedicated" else "default"
        for t in scenario.tenants:
            egress.set_stream(s, t.name, CAMPAIGN, pool, overflow)
        if scenario.layout == "dedicated" and scenario.dedicated_score is None:
            egress.get_ip(s, DEDICATED_IP).state = IpState.cold

    return seed


# ---------------------------------------------------------------- the scripted operator
@dataclass
class Ladder:
    """One incident's ladder as flows/degradation_triage.py climbs it, in this process."""

    incident_id: int
    label: str
    cause: dict
    tried: list[str] = field(default_factory=list)
    rung: int = 0
    applied_at: datetime | None = None
    verify_at: datetime | None = None
    done: bool = False


class Governor:
    """The Protocol's scheduled work and a scripted operator who approves every proposal."""

    def __init__(self, stack: SandboxStack, log_to: list[str], day0: datetime):
        from runbooks import loader

        self.stack = stack
        self.day0 = day0
        self.engine = stack.engine
        self.triage = loader.degradation_triage()
        self.warmup = loader.ip_warmup()
        self.scan_rules = loader.blocklist_scan()
        self.lists = loader.blocklists()
        self.ladders: dict[int, Ladder] = {}
        self.last_detect: datetime | None = None
        self.last_scan: datetime | None = None
        self.judged_day: datetime | None = None
        self.log = log_to

    def next_verification(self) -> datetime | None:
        times = [x.verify_at for x in self.ladders.values() if not x.done and x.verify_at]
        return min(times) if times else None

    async def tick(self, now: datetime) -> None:
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        if self.judged_day != day:
            self.judged_day = day
            await asyncio.to_thread(self._daily, now)
        # The scan's schedule: on the quarter hours (the clock visits them while anything
        # happens; a quarter hour skipped was a quiet one, with nothing new to find).
        if (now - self.day0) % SCAN_EVERY == timedelta(0) and self.last_scan != now:
            self.last_scan = now
            await self._scan(now)
        if self.last_detect is None or now - self.last_detect >= STEP:
            self.last_detect = now
            await asyncio.to_thread(self._detect, now)
        await asyncio.to_thread(self._climb, now)

    # --- ip-warmup's daily run, its follow-ups approved as proposed
    def _daily(self, now: datetime) -> None:
        from protocol import warmup

        with session_scope(self.engine) as s:
            if not warmup.plans_in(s) and not warmup.idle_ips(
                s, now, self.warmup.spec.rewarm_after_idle_days
            ):
                return
            report = warmup.daily(s, self.warmup, now=now, actor=ACTOR)
            s.commit()
            for f in report.follow_ups:
                try:
                    done = self._follow(s, f, now)
                except ServiceError as exc:
                    s.rollback()
                    self.log.append(f"{now:%d %H:%M} warm-up {f.action} {f.subject} failed: {exc}")
                    continue
                if done:
                    s.commit()
                    self.log.append(f"{now:%d %H:%M} warm-up {f.action} {f.subject}")

    def _follow(self, s: Session, f, now: datetime) -> bool:
        """A follow-up of the daily run, approved as the checkpoint proposes it."""
        from protocol import warmup

        if f.action == "complete" and f.ip:
            warmup.declare_warm(s, f.ip, self.warmup, actor=OPERATOR, now=now, approved_by=OPERATOR)
        elif f.action == "review" and f.plan_id is not None:
            # flows/ip_warmup.review_choice of an approval without a comment: step back
            warmup.review(
                s,
                f.plan_id,
                "step_back",
                self.warmup,
                actor=OPERATOR,
                now=now,
                approved_by=OPERATOR,
            )
        elif f.action == "start" and f.ip and f.plan:
            warmup.start(
                s,
                f.ip,
                f.plan,
                self.warmup,
                reason=f.reason or "idle",
                candidates="all",
                actor=OPERATOR,
                now=now,
            )
        else:
            return False
        return True

    # --- blocklist-scan every 15 minutes, and the end of blocklist-delisting
    async def _scan(self, now: datetime) -> None:
        from protocol import blocklists

        def wanted():
            with session_scope(self.engine) as s:
                return blocklists.targets(s)

        spec = self.scan_rules.spec
        answers = await blocklists.scan_async(
            await asyncio.to_thread(wanted),
            self.lists.spec.lists,
            [self.stack.world.dns_address],
            query_timeout=spec.timeout_seconds,
            concurrency=spec.concurrency,
        )
        if answers:
            await asyncio.to_thread(self._apply_scan, answers, now)

    def _apply_scan(self, answers, now: datetime) -> None:
        from protocol import blocklists, delisting, warmup

        runbook = self.scan_rules
        audit = (runbook.id, runbook.version)
        with session_scope(self.engine) as s:
            result = blocklists.apply(s, answers, now=now, actor=ACTOR, runbook=audit)
            for answer in result.listed:
                if answer.kind == "ip":
                    done = delisting.protect(
                        s,
                        answer.target,
                        self.lists.spec.by_id(answer.list_id),
                        hours=runbook.spec.protect_hours,
                        now=now,
                        actor=ACTOR,
                        runbook=audit,
                    )
                    if done["started"]:
                        self.log.append(
                            f"{now:%d %H:%M} protect {answer.target} at {','.join(done['started'])}"
                        )
            for event in result.clearances:
                if event.target_kind != "ip":
                    continue
                # What blocklist-delisting does once the listing cleared: lift, re-warm.
                lifted = delisting.lift(
                    s, event.target, event.list_id, now=now, actor=OPERATOR, runbook=audit
                )
                plan = self.warmup.spec.rewarm_plan
                if warmup.running_plan(s, ip_id=warmup.get_ip(s, event.target).id) is None:
                    warmup.start(
                        s,
                        event.target,
                        plan,
                        self.warmup,
                        reason="delisted",
                        candidates="all",
                        actor=OPERATOR,
                        now=now,
                    )
                self.log.append(
                    f"{now:%d %H:%M} delisted {event.target}: lifted {lifted}, re-warm {plan}"
                )
            s.commit()

    # --- degradation-triage: detect, then the ladders
    def _detect(self, now: datetime) -> None:
        from protocol import triage, triage_response

        runbook = self.triage
        with session_scope(self.engine) as s:
            since = {
                triage_response.subject_of(s, label): at
                for label, at in triage_response.windows_since(s, now).items()
                if label.split(":", 1)[0] in ("path", "domain", "stream")
            }
            report = triage.detect(
                s,
                runbook.spec,
                now=now,
                actor=ACTOR,
                runbook=(runbook.id, runbook.version),
                since=since,
            )
            s.commit()
            for incident_id in sorted(set(report.incidents)):
                if incident_id in self.ladders:
                    continue
                read = triage_response.read(s, incident_id)
                from protocol import incidents

                incident = incidents.get(s, incident_id)
                if incident.state not in incidents.UNRESOLVED or not incident.evidence.get(
                    "proposal"
                ):
                    continue
                self.ladders[incident_id] = Ladder(incident_id, read["subject"], read["cause"])
                self.log.append(
                    f"{now:%d %H:%M} incident #{incident_id} {read['cause']['cause']} "
                    f"on {read['subject']} ({read['cause']['severity']})"
                )

    def _climb(self, now: datetime) -> None:
        for ladder in list(self.ladders.values()):
            if ladder.done:
                continue
            if ladder.verify_at is None:
                self._apply_next(ladder, now)
            elif now >= ladder.verify_at:
                self._verify(ladder, now)

    def _apply_next(self, ladder: Ladder, now: datetime) -> None:
        from protocol import incidents, triage_response
        from protocol.verbs import Act

        runbook = self.triage
        with session_scope(self.engine) as s:
            ladder.rung += 1
            proposed = triage_response.propose_next(
                s, ladder.label, ladder.cause, ladder.tried, runbook.spec
            )["action"]
            if proposed is None or ladder.rung > triage_response.RUNG_LIMIT:
                tried = ", ".join(ladder.tried) or "no action fits this subject and severity"
                triage_response.escalate(
                    s,
                    ladder.incident_id,
                    f"nothing left on its ladder ({tried}); a person decides",
                    actor=OPERATOR,
                    now=now,
                )
                s.commit()
                ladder.done = True
                return
            name = proposed["action"]
            required = proposed["approval"] == "required"
            if required:
                incidents.add_event(
                    s,
                    ladder.incident_id,
                    "approval",
                    actor=OPERATOR,
                    summary=f"triage.act approved for {name} by {OPERATOR}",
                    now=now,
                )
            act = Act(
                actor=OPERATOR if required else ACTOR,
                reason=f"degradation triage, incident #{ladder.incident_id}"
                + ("" if required else " (automatic)"),
                now=now,
                evidence={"incident_id": ladder.incident_id, "approved_by": OPERATOR}
                if required
                else {"incident_id": ladder.incident_id, "automatic": True},
            )
            try:
                triage_response.apply(
                    s, ladder.incident_id, proposed, act, (runbook.id, runbook.version)
                )
            except ServiceError as exc:
                s.rollback()
                triage_response.escalate(
                    s, ladder.incident_id, f"{name} failed: {exc}", actor=OPERATOR, now=now
                )
                s.commit()
                self.log.append(f"{now:%d %H:%M} #{ladder.incident_id} {name} failed: {exc}")
                ladder.done = True
                return
            s.commit()
        ladder.tried.append(name)
        ladder.applied_at = now
        seconds = runbook.spec.causes[ladder.cause["cause"]].verify_after_seconds
        ladder.verify_at = now + timedelta(seconds=seconds)
        self.log.append(f"{now:%d %H:%M} #{ladder.incident_id} {name} on {ladder.label}")

    def _verify(self, ladder: Ladder, now: datetime) -> None:
        from protocol import triage_response

        with session_scope(self.engine) as s:
            checked = triage_response.check(
                s,
                ladder.incident_id,
                ladder.cause,
                self.triage.spec,
                since=ladder.applied_at,
                now=now,
            )
            name = ladder.tried[-1]
            if checked["verdict"] == "improved":
                triage_response.resolve(
                    s, ladder.incident_id, f"improved after {name}", actor=OPERATOR, now=now
                )
                s.commit()
                ladder.done = True
                self.log.append(f"{now:%d %H:%M} #{ladder.incident_id} resolved")
                return
            triage_response.escalate(
                s, ladder.incident_id, f"{name} did not help", actor=OPERATOR, now=now
            )
            s.commit()
        ladder.cause = checked["cause"] or ladder.cause
        ladder.verify_at = None
        self._apply_next(ladder, now)

    # --- the trouble is over: what the Protocol held goes again, on the customer's word
    def release(self, now: datetime) -> None:
        from models import IpPool, Stream, Tenant
        from protocol import egress, tenants
        from protocol.verbs import Act

        act = Act(actor=OPERATOR, reason="the customer fixed the cause", now=now)
        with session_scope(self.engine) as s:
            hold = s.exec(select(IpPool).where(IpPool.name == "hold")).scalars().first()
            held = []
            if hold is not None:
                held = s.exec(
                    select(Tenant.name, Stream.name)
                    .join(Tenant, Tenant.id == Stream.tenant_id)
                    .where(Stream.pool_id == hold.id)
                ).all()
            for tenant, stream in held:
                try:
                    egress.release_stream(s, tenant, stream, act)
                    self.log.append(f"{now:%d %H:%M} released {tenant}/{stream}")
                except ServiceError as exc:
                    self.log.append(f"{now:%d %H:%M} release {tenant}/{stream} failed: {exc}")
            for tenant in s.exec(select(Tenant).where(Tenant.paused)).scalars().all():
                tenants.resume_tenant(s, tenant.name, act)
                self.log.append(f"{now:%d %H:%M} resumed tenant {tenant.name}")
            s.commit()


# ---------------------------------------------------------------- the world's side
def _prepare_world(scenario: Scenario, stack: SandboxStack) -> None:
    """Before day 0: who the providers know, and engaged recipients (no complaints but the
    scenario's: the background 0.1 % would add noise that is the same in both runs)."""
    providers = [p.name for p in stack.world.behaviour.providers]
    stack.world.reputation.set_score(providers, SHARED_IP, scenario.shared_score)
    if scenario.layout == "shared":
        stack.world.reputation.set_score(providers, OVERFLOW_IP, scenario.shared_score)
    elif scenario.dedicated_score is not None:
        stack.world.reputation.set_score(providers, DEDICATED_IP, scenario.dedicated_score)
    stack.world.state.set_knob("complaint_share", {"*": 0.0})


def _steer(scenario: Scenario, stack: SandboxStack, starting: bool, other_key: str) -> None:
    """The trouble starts (or ends) in this stack's world."""
    trouble, state = scenario.trouble, stack.world.state
    if trouble.kind == "complaints":
        share = trouble.complaint_share if starting else 0.0
        state.set_knob("complaint_share", {"*": share})
    elif trouble.kind == "blocklisting":
        if starting:
            state.list(ZEN, DEDICATED_IP, "127.0.0.2", "experiment: blocklisting")
        else:
            state.unlist(ZEN, DEDICATED_IP)
    elif trouble.kind == "broken-dkim":
        from models import DkimKey, Domain, KeyState

        domain = scenario.tenants[0].domain
        with Session(stack.engine) as s:
            row = s.exec(select(Domain).where(Domain.name == domain)).scalars().one()
            selectors = s.exec(
                select(DkimKey.selector).where(
                    DkimKey.domain_id == row.id, DkimKey.state != KeyState.retired
                )
            ).all()
        for (selector,) in selectors:
            name = f"{selector}._domainkey.{domain}"
            if starting:
                state.override(name, "TXT", [other_key], "experiment: broken DKIM")
            else:
                state.clear_override(name, "TXT")
        if starting:  # Gmail: bulk status is permanent once reached; it stays
            state.set_knob("bulk_domains", [domain])


@functools.cache
def _other_key() -> str:
    """A DKIM record for a key the relay does not hold (the same in both worlds)."""
    from sandbox.published import dkim_txt_value
    from sandbox.scenarios import unrelated_public_key

    return dkim_txt_value("rsa", unrelated_public_key("rsa"))


# ---------------------------------------------------------------- traffic
@dataclass(frozen=True)
class Wave:
    at: datetime
    tenant: Tenant
    recipients: list[str]
    subject: str


def traffic(scenario: Scenario, size: Size, day0: datetime, trouble_day: int) -> list[Wave]:
    """Every wave of every day, the same for both runs: per_day recipients a tenant a day,
    evenly over the providers and the day's waves, a new part of the list each time (so no
    recipient is asked twice, and a complaint's suppression never meets the same address)."""
    trouble = scenario.trouble
    waves: list[Wave] = []
    for day in range(size.days):
        start = day0 + day * DAY
        for tenant in scenario.tenants:
            spiking = trouble.kind == "volume-spike" and tenant.spike > 1 and day == trouble_day
            hours = (scenario.spike_wave,) if spiking else scenario.waves
            total = size.per_day * (tenant.spike if spiking else 1)
            per_wave = total // len(hours)
            for w, hour in enumerate(hours):
                rcpts: list[str] = []
                for domain in PROVIDERS:
                    rcpts += existing_recipients(
                        f"{tenant.name}-d{day}w{w}-", domain, per_wave // len(PROVIDERS)
                    )
                at = start + timedelta(hours=hour)
                waves.append(Wave(at, tenant, rcpts, f"Day {day + 1}: offers, part {w + 1}"))
    return sorted(waves, key=lambda w: w.at)


# ---------------------------------------------------------------- the run
class Experiment:
    """One scenario at one scale: two stacks, the same steps, then the counts."""

    def __init__(
        self,
        scenario: Scenario,
        scale: str,
        root: Path,
        *,
        time_limit: float = 900.0,
        hop_seconds: float | None = None,
        max_steps: int = 20_000,
        progress: Callable[[str], None] | None = None,
    ):
        if scale not in scenario.sizes:
            raise ValueError(f"scale {scale!r}: one of {', '.join(scenario.sizes)}")
        self.scenario, self.scale, self.size = scenario, scale, scenario.sizes[scale]
        self.root = root
        self.time_limit, self.hop_seconds, self.max_steps = time_limit, hop_seconds, max_steps
        self.progress = progress or (lambda _: None)
        self.stacks = {
            True: SandboxStack(root / "governed", reactions=True),
            False: SandboxStack(root / "ungoverned", reactions=False),
        }
        tomorrow = datetime.now(UTC).date() + DAY
        self.day0 = datetime.combine(tomorrow, datetime.min.time(), tzinfo=UTC)
        t = scenario.trouble
        self.trouble_day = t.day if self.size.trouble_day is None else self.size.trouble_day
        self.trouble_start = self.day0 + self.trouble_day * DAY + timedelta(hours=t.hour)
        self.trouble_end = (
            self.trouble_start + timedelta(hours=t.hours) if t.hours is not None else None
        )
        last = self.day0 + (self.size.days - 1) * DAY
        self.end = last + timedelta(hours=self.size.until_hour)
        self.log: list[str] = []
        self.first_hold: dict[bool, datetime | None] = {True: None, False: None}
        self.governor: Governor | None = None
        self.tenant_ids: dict[bool, dict[str, int]] = {}

    async def run(self) -> ScenarioResult:
        began = time.monotonic()
        deadline = began + self.time_limit
        try:
            common, secret = await asyncio.to_thread(self._seeded)
            for governed, stack in self.stacks.items():
                seed = _seed_run(self.scenario, governed)
                await stack.start(seed, at=self.day0, database=common, secret=secret)
                await asyncio.to_thread(_prepare_world, self.scenario, stack)
                await stack.world.refresh()
                self.tenant_ids[governed] = await asyncio.to_thread(self._tenant_ids, stack)
            self.governor = Governor(self.stacks[True], self.log, self.day0)
            if self.scenario.dedicated_score is None and self.scenario.layout == "dedicated":
                await asyncio.to_thread(self._start_warmup)
            self.progress(f"{self.scenario.name}: set up in {time.monotonic() - began:.1f} s")
            steps = await self._steps(deadline)
            results = {}
            for governed, stack in self.stacks.items():
                await stack.world.flush()
                results[governed] = await asyncio.to_thread(self._measure, governed)
        finally:
            for stack in (self.stacks[False], self.stacks[True]):
                await stack.stop()
        return ScenarioResult(
            self.scenario.name,
            self.scenario.title,
            self.scale,
            self.size,
            self.scenario.trouble,
            self.day0.date().isoformat(),
            results[True],
            results[False],
            steps,
            round(time.monotonic() - began, 1),
            self.log,
        )

    def _seeded(self) -> tuple[Path, str]:
        """One database seeded for both runs (the same tenants, domains and DKIM keys), and
        the secret its keys are sealed with."""
        from models.db import make_engine
        from relay.submission.keystore import KeyBox
        from testbed.sandbox_stack import copy_database, migrated_template

        path = self.root / "seeded.db"
        copy_database(migrated_template(), path)
        secret = KeyBox.generate()
        engine = make_engine(f"sqlite:///{path}")
        try:
            with session_scope(engine) as s:
                _seed_common(self.scenario, self.size.per_day)(s, KeyBox(secret))
                s.commit()
        finally:
            engine.dispose()
        return path, secret

    def _tenant_ids(self, stack: SandboxStack) -> dict[str, int]:
        from models import Tenant

        with Session(stack.engine) as s:
            return {t.name: t.id for t in s.exec(select(Tenant)).scalars().all()}

    def _start_warmup(self) -> None:
        from protocol import warmup
        from runbooks.loader import ip_warmup

        with session_scope(self.stacks[True].engine) as s:
            warmup.start(
                s,
                DEDICATED_IP,
                "sandbox",
                ip_warmup(),
                reason="new",
                candidates="all",
                actor=OPERATOR,
                now=self.day0,
            )
            s.commit()
        self.log.append(f"{self.day0:%d %H:%M} warm-up start {DEDICATED_IP} on plan sandbox")

    # --- the clock's steps
    def _events(self, waves: list[Wave]) -> list[datetime]:
        found = {w.at for w in waves} | {self.trouble_start}
        if self.trouble_end is not None:
            found.add(self.trouble_end)
        found |= {self.day0 + d * DAY + timedelta(minutes=1) for d in range(self.size.days)}
        found.add(self.day0 + timedelta(minutes=1))
        return sorted(t for t in found if t < self.end)

    async def _steps(self, deadline: float) -> int:
        scenario, governor = self.scenario, self.governor
        assert governor is not None
        waves = traffic(scenario, self.size, self.day0, self.trouble_day)
        events = self._events(waves)
        other_key = (
            await asyncio.to_thread(_other_key) if scenario.trouble.kind == "broken-dkim" else ""
        )
        started = ended = False
        busy_until = self.day0
        t = events[0]
        steps = 0
        next_wave = 0
        while t < self.end:
            steps += 1
            if steps > self.max_steps or time.monotonic() > deadline:
                raise ExperimentTimeout(
                    f"{scenario.name}: stopped at {t:%d %H:%M} after {steps} steps and "
                    f"{self.time_limit:.0f} s"
                )
            await asyncio.gather(*(stack.move_clock(t) for stack in self.stacks.values()))
            if not started and t >= self.trouble_start:
                started = True
                for stack in self.stacks.values():
                    await asyncio.to_thread(_steer, scenario, stack, True, other_key)
                    await stack.world.refresh()
                self.log.append(f"{t:%d %H:%M} trouble starts: {scenario.trouble.kind}")
                busy_until = max(busy_until, t + EDGE)
            if not ended and self.trouble_end is not None and t >= self.trouble_end:
                ended = True
                for stack in self.stacks.values():
                    await asyncio.to_thread(_steer, scenario, stack, False, other_key)
                    await stack.world.refresh()
                self.log.append(f"{t:%d %H:%M} trouble ends")
                busy_until = max(busy_until, t + EDGE)
                await asyncio.to_thread(governor.release, t)
            await governor.tick(t)
            due = []
            while next_wave < len(waves) and waves[next_wave].at <= t:
                due.append(waves[next_wave])
                next_wave += 1
            if due:
                for governed in self.stacks:
                    await asyncio.to_thread(self._spool, governed, due, t)
            # Both relays at once: they share nothing but this process and its event loop.
            sum(
                await asyncio.gather(
                    *(self._advance(g, stack, t, deadline) for g, stack in self.stacks.items())
                )
            )
            if due:
                busy_until = max(busy_until, t + SETTLE)
            if steps % 50 == 0:
                self.progress(f"{scenario.name}: {t:%d %H:%M}, {steps} steps")
            t = await self._next(t, events, busy_until)
        return steps

    def _spool(self, governed: bool, due: list[Wave], t: datetime) -> None:
        """The waves due, into one relay's spool (signing uses the relay's dkimpy patch, which
        is global: one relay at a time)."""
        outs = [
            Outgoing(
                self.tenant_ids[governed][w.tenant.name],
                CAMPAIGN,
                w.tenant.domain,
                f"news@{w.tenant.domain}",
                w.recipients,
                self.size.per_message,
                w.subject,
            )
            for w in due
        ]
        self.stacks[governed].spool(outs, t)

    async def _advance(
        self, governed: bool, stack: SandboxStack, t: datetime, deadline: float
    ) -> int:
        """One relay's step: deliver what is due; the recipients moved."""
        # No real-time bound per hop unless asked (time_limit is the hang guard): a hop cut
        # short leaves mail for later steps, and the counts would depend on the machine.
        hop_end = deadline
        if self.hop_seconds is not None:
            hop_end = min(deadline, time.monotonic() + self.hop_seconds)
        moved = await stack.deliver_due(hop_end)
        watching = self.first_hold[governed] is None and t >= self.trouble_start
        if watching and await asyncio.to_thread(_holding, stack, t):
            self.first_hold[governed] = t
        return moved

    async def _next(self, t: datetime, events: list[datetime], busy_until: datetime) -> datetime:
        """The next step, on the five-minute grid from day 0: every five minutes within SETTLE
        of a wave and EDGE of the trouble's start or end; otherwise the next event, the next
        verification, or the next mail due but QUIET on at least (retries then run up to a
        quarter of an hour late, alike in both runs: a day of hourly retries in 300 steps
        would cost more than the whole scenario)."""
        wanted = [e for e in events if e > t]
        verify = self.governor.next_verification() if self.governor else None
        if verify is not None:
            wanted.append(verify)
        if t < busy_until:
            wanted.append(t + STEP)
        for stack in self.stacks.values():
            due = await asyncio.to_thread(_next_due, stack)
            if due is not None:
                wanted.append(due if t < busy_until else max(due, t + QUIET))
        if not wanted:
            return self.end
        grid = STEP.total_seconds()
        soonest = min(wanted)
        ticks = -(-(soonest - self.day0).total_seconds() // grid)  # ceiling
        return max(self.day0 + timedelta(seconds=ticks * grid), t + STEP)

    # --- the counts
    def _measure(self, governed: bool) -> RunResult:
        from sandbox.placement import summary

        stack = self.stacks[governed]
        names = {v: k for k, v in self.tenant_ids[governed].items()}
        domains = {t.name: t.domain for t in self.scenario.tenants}
        result = RunResult(governed=governed)
        start = self.trouble_start
        with Session(stack.engine) as s:
            states = s.exec(
                select(Message.tenant_id, Recipient.state, func.count())
                .join(Message, Message.id == Recipient.message_id)
                .where(Message.stream == CAMPAIGN)
                .group_by(Message.tenant_id, Recipient.state)
            ).all()
            refused = s.exec(
                select(Message.tenant_id, Recipient.address)
                .join(Message, Message.id == Recipient.message_id)
                .where(
                    Message.stream == CAMPAIGN,
                    Recipient.state.in_([RecipientState.bounced, RecipientState.expired]),
                )
            ).all()
            dsns = s.exec(select(Message.tenant_id, Message.data).where(Message.stream == "dsn"))
            reported: set[tuple[int, str]] = set()
            for tenant_id, data in dsns.all():
                for address in FINAL_RECIPIENT.findall(bytes(data).decode("utf-8", "replace")):
                    reported.add((tenant_id, address.strip().lower()))
            events = s.exec(
                select(
                    DeliveryEvent.tenant_id,
                    DeliveryEvent.provider,
                    DeliveryEvent.category,
                    DeliveryEvent.permanent,
                    func.count(),
                )
                .where(DeliveryEvent.kind == EventKind.attempt, DeliveryEvent.stream == CAMPAIGN)
                .group_by(
                    DeliveryEvent.tenant_id,
                    DeliveryEvent.provider,
                    DeliveryEvent.category,
                    DeliveryEvent.permanent,
                )
            ).all()
            suspensions = (
                s.exec(select(Suspension).where(Suspension.created_at >= start)).scalars().all()
            )
            audits = s.exec(
                select(AuditEntry.at, AuditEntry.action, AuditEntry.subject).where(
                    AuditEntry.at >= start, AuditEntry.action.in_(PROTECTIVE_AUDIT)
                )
            ).all()
            actions = s.exec(
                select(IncidentEvent.at, IncidentEvent.summary).where(
                    IncidentEvent.at >= start, IncidentEvent.kind == "action"
                )
            ).all()
            from models import Incident

            causes = s.exec(select(Incident.cause, func.count()).group_by(Incident.cause)).all()
        for tenant_id, state, n in states:
            tenant = result.by_tenant.setdefault(names[tenant_id], Counter())
            tenant[str(state)] += n
            tenant["submitted"] += n
            result.submitted += n
            if state == RecipientState.delivered:
                result.delivered += n
            elif state == RecipientState.queued:
                result.queued += n
            else:
                result.refused += n
                if state == RecipientState.expired:
                    result.expired += n
        result.refused_without_dsn = sum(
            1 for tenant_id, address in refused if (tenant_id, address.lower()) not in reported
        )
        result.lost = result.refused_without_dsn + (
            result.submitted - result.delivered - result.refused - result.queued
        )
        for tenant_id, provider, category, permanent, n in events:
            row = result.by_provider.setdefault(provider or "?", Counter())
            if category == "delivered":
                continue
            if permanent:
                row["refused"] += n
                if category in BLOCKS:
                    result.blocked += n
                    result.by_tenant[names[tenant_id]]["blocked"] += n
            else:
                row["deferred"] += n
                result.deferred += n
                result.by_tenant[names[tenant_id]]["deferred"] += n
        for tenant, domain in domains.items():
            placed = summary(stack.world.state, from_domain=domain)
            for provider in PROVIDERS.values():
                inbox, spam = placed[provider]["inbox"], placed[provider]["spam"]
                result.inbox += inbox
                result.spam += spam
                result.by_tenant.setdefault(tenant, Counter()).update(inbox=inbox, spam=spam)
                result.by_provider.setdefault(provider, Counter()).update(inbox=inbox, spam=spam)
        result.by_tenant = {k: dict(v) for k, v in result.by_tenant.items()}
        result.by_provider = {k: dict(v) for k, v in result.by_provider.items()}
        # The first protective action from the trouble's start, and what the Protocol did.
        moments: list[tuple[datetime, str]] = []
        kinds: Counter = Counter()
        for row in suspensions:
            rule = row.rule_id or ""
            kind = rule.split(":", 1)[0] if ":" in rule else "reaction"
            kinds[f"suspension ({kind})"] += 1
            what = f"{row.action} {row.source_ip}/{row.provider}"
            moments.append((_aware(row.created_at), f"{what} ({rule})"))
        for at, action, subject in audits:
            kinds[action] += 1
            moments.append((_aware(at), f"{action} {subject}"))
        for at, summary_text in actions:
            kinds["incident action"] += 1
            moments.append((_aware(at), f"incident: {summary_text[:60]}"))
        held = self.first_hold[governed]
        if held is not None:
            kinds["mail held (a cap, hold, pause or suspension)"] += 1
            moments.append((held, "mail held by a state or a warm-up cap"))
        result.interventions = dict(kinds)
        if moments:
            first = min(m for m, _ in moments)
            result.first_intervention = round((first - start).total_seconds() / 60, 1)
        result.timeline = [f"{m:%d %H:%M} {text}" for m, text in sorted(moments)[:12]]
        result.incidents = {cause: n for cause, n in causes}
        return result


FINAL_RECIPIENT = re.compile(r"^Final-Recipient:\s*rfc822;\s*(\S+)", re.IGNORECASE | re.MULTILINE)
BLOCKS = {"reputation", "blocklisted"}
PROTECTIVE_AUDIT = ("stream.suspend", "stream.move", "tenant.pause", "blocklist.protect")


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _holding(stack: SandboxStack, now: datetime) -> bool:
    """Mail the relay postponed for a state (a cap, a hold, a pause, a suspension), or a
    warm-up cap reached today (the rest of the day's mail leaves from the overflow pool)."""
    from models import WarmupDay

    with Session(stack.engine) as s:
        found = s.exec(
            select(Recipient.id)
            .where(
                Recipient.state == RecipientState.queued, Recipient.last_reply.like("waiting: %")
            )
            .limit(1)
        ).first()
        if found is None:
            found = s.exec(
                select(WarmupDay.id)
                .where(WarmupDay.day == now.date(), WarmupDay.sent >= WarmupDay.cap)
                .limit(1)
            ).first()
    return found is not None


def _next_due(stack: SandboxStack) -> datetime | None:
    with Session(stack.engine) as s:
        due = s.exec(
            select(func.min(Recipient.next_attempt_at)).where(
                Recipient.state == RecipientState.queued
            )
        ).scalar()
    return _aware(due) if due is not None else None


async def run_scenario(scenario: Scenario, scale: str, root: Path, **options) -> ScenarioResult:
    return await Experiment(scenario, scale, root, **options).run()

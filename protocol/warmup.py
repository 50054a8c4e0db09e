"""IP (and new domain) warm-up: where each plan stands, what the receivers' replies say about
each provider's day, and the one decision the daily run takes (runbooks/ip-warmup.yaml).

A plan advances per sending day, per provider: each day that a provider received at least the
plan's fill of its cap and answered cleanly moves that provider one stage up; a provider whose
rate-limit or reputation deferrals rise holds its stage while the others go on; blocks, a
listing, hard bounces or complaints over the thresholds put the whole plan in review (its caps
stay, nothing rises) and ask a person. A day without sends is not a sending day and changes
nothing, so a customer who sends three days a week warms at the pace of their sending.

`decide` is pure (table-tested at every threshold); the rest reads and writes the database in
the caller's transaction, with an audit entry for every change. The relay enforces the caps
written here (relay/delivery/egress.py) and fills a missing day from the same arithmetic
(runbooks/warmup.py), so a day the daily run has not reached yet is capped all the same.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Literal

from sqlalchemy import func, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, col, select

from models import (
    DeliveryEvent,
    Domain,
    EventKind,
    IpAddress,
    IpPool,
    IpState,
    Stream,
    Tenant,
    WarmupDay,
    WarmupPlan,
    WarmupState,
)
from models.audit_trail import record
from models.egress import CAPPED_STATES
from models.events import EventRollup
from protocol.errors import ServiceError
from runbooks.schema_warmup import IpWarmupRunbook, Judgement, Plan
from runbooks.warmup import ALL_PROVIDERS, cap_for, day_caps

Colour = Literal["green", "yellow", "red", "quiet"]
Verdict = Literal["advance", "hold", "review", "complete", "idle"]
ReviewChoice = Literal["step_back", "pause", "continue"]

# Reply categories (runbooks/classification.yaml) that the judgement counts.
BLOCK_CATEGORIES = {"reputation", "blocklisted"}  # refused: the receiver will not take the IP
HARD_BOUNCE_CATEGORIES = {"mailbox_unknown", "mailbox_disabled"}  # refused: the list is bad


# ---------------------------------------------------------------- the decision (pure)
@dataclass(frozen=True)
class ProviderDay:
    """One provider's day for one warming subject: its cap and what the receivers answered."""

    provider: str
    cap: int
    sent: int = 0  # attempts
    delivered: int = 0
    rate_limited: int = 0  # deferrals
    reputation: int = 0  # deferrals
    blocked: int = 0  # refusals in BLOCK_CATEGORIES
    hard_bounced: int = 0  # refusals in HARD_BOUNCE_CATEGORIES plus asynchronous bounces
    refused: int = 0  # every refusal
    complaints: int = 0

    def as_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Judged:
    provider: str
    colour: Colour
    reason: str


@dataclass(frozen=True)
class Evidence:
    subject: str  # ip:<address> or domain:<name>
    day: date  # the day judged
    stages: dict[str, int]  # provider -> stage before this day's decision
    days: dict[str, ProviderDay]  # provider ("*": every other) -> its day
    progressed_on: date
    listed: bool = False  # the IP is listed (IpState.listed) or a blocklist listing is open


@dataclass(frozen=True)
class Proposal:
    verdict: Verdict
    stages: dict[str, int]  # after the decision
    held: dict[str, str]  # provider -> why its stage holds
    judged: list[Judged] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return {
            "verdict": self.verdict,
            "stages": dict(sorted(self.stages.items())),
            "held": dict(sorted(self.held.items())),
            "judged": [asdict(j) for j in self.judged],
            "reasons": self.reasons,
        }


def _rate(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def judge(day: ProviderDay, j: Judgement) -> Judged:
    """One provider's day: red (stop and ask), yellow (hold), quiet (too little to judge or
    below the fill) or green (advance). Red before yellow before quiet: a block in a small day
    is still a block. A day whose cap is below min_sent_to_judge (a provider's small share in
    the first stages) is judged on its cap: otherwise it could never be judged, and its
    provider would hold the plan at stage 1 for good."""
    p = day.provider
    enough = max(1, min(j.min_sent_to_judge, day.cap))
    answered = day.delivered + day.refused
    if day.sent >= enough and _rate(day.blocked, day.sent) >= j.red_blocked:
        return Judged(p, "red", f"{day.blocked} of {day.sent} refused as blocked")
    if answered >= enough and _rate(day.hard_bounced, answered) >= j.red_hard_bounce:
        return Judged(p, "red", f"hard bounces {day.hard_bounced} of {answered}")
    if (
        day.delivered >= j.min_delivered_for_complaints
        and _rate(day.complaints, day.delivered) >= j.red_complaint
    ):
        return Judged(p, "red", f"complaints {day.complaints} of {day.delivered} delivered")
    if day.sent >= enough:
        if _rate(day.rate_limited, day.sent) >= j.yellow_rate_limited:
            return Judged(p, "yellow", f"rate-limited {day.rate_limited} of {day.sent}")
        if _rate(day.reputation, day.sent) >= j.yellow_reputation:
            return Judged(p, "yellow", f"reputation deferrals {day.reputation} of {day.sent}")
    if day.sent < enough:
        return Judged(p, "quiet", f"{day.sent} sent, fewer than {enough} to judge")
    if day.delivered < j.advance_min_fill * day.cap:
        return Judged(
            p,
            "quiet",
            f"{day.delivered} delivered of a cap of {day.cap} (under {j.advance_min_fill:.0%})",
        )
    return Judged(p, "green", f"{day.delivered} delivered of {day.cap}, clean")


def decide(ev: Evidence, plan: Plan, j: Judgement) -> Proposal:
    """The day's decision for one warming subject. No I/O, no clock: `ev.day` is the day."""
    stages = dict(ev.stages)
    default = stages.get(ALL_PROVIDERS, 1)
    if ev.listed:
        return Proposal("review", stages, {}, [], [f"{ev.subject} is on a blocklist"])
    sending = {p: d for p, d in ev.days.items() if d.sent > 0}
    if not sending:
        stalled = (ev.day - ev.progressed_on).days
        if stalled >= j.patience_days:
            return Proposal(
                "review", stages, {}, [], [f"no progress for {stalled} days (nothing sent)"]
            )
        return Proposal("idle", stages, {}, [], ["nothing sent: not a sending day"])
    judged = [judge(d, j) for _, d in sorted(sending.items())]
    red = [x for x in judged if x.colour == "red"]
    if red:
        return Proposal("review", stages, {}, judged, [f"{x.provider}: {x.reason}" for x in red])
    held: dict[str, str] = {}
    advanced = False
    last = len(plan.stages)
    for x in judged:
        if x.colour == "green" and stages.get(x.provider, default) <= last:
            stages[x.provider] = stages.get(x.provider, default) + 1  # at most last + 1: done
            advanced = True
        elif x.colour == "green":
            stages.setdefault(x.provider, default)
        else:
            stages.setdefault(x.provider, default)
            held[x.provider] = x.reason
    # "*" is the stage of the providers not named in the runbook; when none of them sends it
    # stays where it began and must not hold back a completion it has no part in.
    relevant = [s for p, s in stages.items() if p != ALL_PROVIDERS or p in sending]
    if relevant and all(stage > last for stage in relevant):
        return Proposal("complete", stages, held, judged, [f"every provider past stage {last}"])
    if advanced:
        return Proposal("advance", stages, held, judged, [])
    stalled = (ev.day - ev.progressed_on).days
    if stalled >= j.patience_days:
        return Proposal("review", stages, held, judged, [f"no progress for {stalled} days"])
    return Proposal("hold", stages, held, judged, [])


def _audit(
    session: Session,
    rules: IpWarmupRunbook,
    *,
    actor: str,
    now: datetime,
    action: str,
    subject: str,
    evidence: dict,
) -> None:
    """One audit entry of this runbook: what, who, why, under which rules' version."""
    record(
        session,
        actor=actor,
        action=action,
        subject=subject,
        evidence=evidence,
        runbook_id=rules.id,
        runbook_version=rules.version,
        at=now,
    )


# ---------------------------------------------------------------- reading the state
@dataclass(frozen=True)
class Subject:
    kind: Literal["ip", "domain"]
    name: str  # the address or the domain name

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.name}"


def subject_of(session: Session, plan: WarmupPlan) -> Subject:
    if plan.ip_id is not None:
        ip = session.get(IpAddress, plan.ip_id)
        return Subject("ip", ip.address if ip else f"#{plan.ip_id}")
    domain = session.get(Domain, plan.domain_id)
    return Subject("domain", domain.name if domain else f"#{plan.domain_id}")


def plans_in(session: Session, states=CAPPED_STATES) -> list[WarmupPlan]:
    """One select: every plan the relay caps (the daily run's whole work list)."""
    return list(
        session.exec(
            select(WarmupPlan).where(col(WarmupPlan.state).in_(states)).order_by(WarmupPlan.id)
        ).all()
    )


def plan_rules(rules: IpWarmupRunbook, plan: WarmupPlan) -> Plan:
    found = rules.spec.plans.get(plan.schedule_id)
    if found is None:
        raise ServiceError(f"plan {plan.schedule_id!r} is not in runbooks/ip-warmup.yaml")
    return found


def _day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, time(0), tzinfo=UTC)
    return start, start + timedelta(days=1)


def day_evidence(
    session: Session, plan: WarmupPlan, day: date, rules: IpWarmupRunbook, *, listed: bool = False
) -> Evidence:
    """The receivers' answers on `day` for the plan's subject, per provider (the plan's
    named providers; every other provider counts as "*"), from the delivery events."""
    subject = subject_of(session, plan)
    named = set(rules.spec.providers)
    start, end = _day_bounds(day)
    column = DeliveryEvent.source_ip if subject.kind == "ip" else DeliveryEvent.from_domain
    rows = session.exec(
        select(
            DeliveryEvent.provider,
            DeliveryEvent.kind,
            DeliveryEvent.category,
            DeliveryEvent.permanent,
            func.count(),
        )
        .where(column == subject.name, DeliveryEvent.at >= start, DeliveryEvent.at < end)
        .group_by(
            DeliveryEvent.provider,
            DeliveryEvent.kind,
            DeliveryEvent.category,
            DeliveryEvent.permanent,
        )
    ).all()
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for provider, kind, category, permanent, n in rows:
        c = counts[provider if provider in named else ALL_PROVIDERS]
        if kind == EventKind.complaint:
            c["complaints"] += n
        elif kind == EventKind.bounce:
            c["hard_bounced"] += n
        else:
            c["sent"] += n
            if category == "delivered":
                c["delivered"] += n
            elif permanent:
                c["refused"] += n
                if category in BLOCK_CATEGORIES:
                    c["blocked"] += n
                if category in HARD_BOUNCE_CATEGORIES:
                    c["hard_bounced"] += n
            elif category in ("rate_limited", "reputation"):
                c[category] += n
    caps = {
        r.provider: r.cap
        for r in session.exec(
            select(WarmupDay).where(WarmupDay.plan_id == plan.id, WarmupDay.day == day)
        ).all()
    }
    plan_def = plan_rules(rules, plan)
    stages = plan.stages or {ALL_PROVIDERS: 1}
    default = stages.get(ALL_PROVIDERS, 1)
    days = {
        p: ProviderDay(
            provider=p,
            cap=caps.get(p, cap_for(plan_def, p, stages.get(p, default))),
            **dict(c),
        )
        for p, c in counts.items()
    }
    return Evidence(
        subject.label,
        day,
        dict(stages),
        days,
        plan.progressed_on or plan.started_on,
        listed=listed,
    )


def write_caps(session: Session, plan: WarmupPlan, day: date, rules: IpWarmupRunbook) -> dict:
    """The day's caps from the plan's stages: a row per named provider and one for "*"; what
    was sent already stays. A paused plan's caps are 0 (its subject sends nothing)."""
    caps = day_caps(plan_rules(rules, plan), plan.stages or {}, rules.spec.providers)
    if plan.state == WarmupState.paused:
        caps = dict.fromkeys(caps, 0)
    # The relay may have written the day's rows already (at the plan's cap, when it needed
    # them before this run): insert what is missing, then set every cap; `sent` stays.
    insert = sqlite_insert if session.get_bind().dialect.name == "sqlite" else pg_insert
    session.execute(
        insert(WarmupDay)
        .values(
            [
                {"plan_id": plan.id, "day": day, "provider": p, "cap": c, "sent": 0, "signals": {}}
                for p, c in caps.items()
            ]
        )
        .on_conflict_do_nothing(index_elements=["plan_id", "day", "provider"])
    )
    for provider, cap in caps.items():
        session.execute(
            update(WarmupDay)
            .where(
                WarmupDay.plan_id == plan.id, WarmupDay.day == day, WarmupDay.provider == provider
            )
            .values(cap=cap)
        )
    session.flush()
    return caps


# ---------------------------------------------------------------- the daily run
@dataclass
class FollowUp:
    """Something a person must decide: run ip-warmup/on-demand with these parameters."""

    action: Literal["review", "complete", "start"]
    subject: str
    plan_id: int | None = None
    ip: str | None = None
    plan: str | None = None
    reason: str = ""

    def parameters(self) -> dict:
        values = {"action": self.action, "plan_id": self.plan_id, "ip": self.ip}
        if self.action == "start":  # why it warms (new, idle, delisted); else `reason` says
            values |= {"plan": self.plan, "reason": self.reason or "new"}  # why it is asked
        return {k: v for k, v in values.items() if v is not None}


@dataclass
class DailyReport:
    day: date
    judged: list[dict] = field(default_factory=list)
    follow_ups: list[FollowUp] = field(default_factory=list)
    cooled: list[str] = field(default_factory=list)  # idle active IPs made cold

    def as_json(self) -> dict:
        return {
            "day": self.day.isoformat(),
            "judged": self.judged,
            "follow_ups": [asdict(f) for f in self.follow_ups],
            "cooled": self.cooled,
        }


def evaluate(
    session: Session,
    plan: WarmupPlan,
    day: date,
    rules: IpWarmupRunbook,
    *,
    actor: str,
    now: datetime,
) -> Proposal | None:
    """Judge one finished day of a running plan and apply the verdict, once: a plan already
    judged for `day` (evaluated_on) is left alone, so a repeated run changes nothing."""
    if plan.state != WarmupState.running:
        return None
    if plan.evaluated_on is not None and plan.evaluated_on >= day:
        return None
    listed = False
    if plan.ip_id is not None:
        ip = session.get(IpAddress, plan.ip_id)
        listed = ip is not None and ip.state == IpState.listed
    evidence = day_evidence(session, plan, day, rules, listed=listed)
    proposal = decide(evidence, plan_rules(rules, plan), rules.spec.judgement)
    before = dict(plan.stages or {})
    plan.stages = proposal.stages
    plan.held = proposal.held
    plan.evaluated_on = day
    if proposal.verdict in ("advance", "complete"):
        plan.progressed_on = day
    if proposal.verdict == "review":
        plan.state = WarmupState.review
    session.add(plan)
    for row in session.exec(
        select(WarmupDay).where(WarmupDay.plan_id == plan.id, WarmupDay.day == day)
    ).all():
        judged = next((x for x in proposal.judged if x.provider == row.provider), None)
        day_row = evidence.days.get(row.provider)
        row.signals = {
            **(day_row.as_json() if day_row else {"sent": 0}),
            "colour": judged.colour if judged else "quiet",
            "reason": judged.reason if judged else "nothing sent",
        }
        session.add(row)
    if proposal.verdict != "idle":
        _audit(
            session,
            rules,
            actor=actor,
            now=now,
            action=f"warmup.{proposal.verdict}",
            subject=evidence.subject,
            evidence={
                "day": day.isoformat(),
                "plan": plan.schedule_id,
                "stages_before": before,
                **proposal.as_json(),
                "days": {p: d.as_json() for p, d in evidence.days.items()},
            },
        )
    return proposal


def daily(session: Session, rules: IpWarmupRunbook, *, now: datetime, actor: str) -> DailyReport:
    """The scheduled run's work: judge every running plan's finished days (catching up any day
    a run missed), write today's caps, and list what needs a person. IPs idle for the re-warm
    period are made cold (they then carry no stream's traffic) and proposed for a re-warm."""
    today = now.date()
    report = DailyReport(today)
    for plan in plans_in(session):
        subject = subject_of(session, plan)
        first = (plan.evaluated_on or plan.started_on - timedelta(days=1)) + timedelta(days=1)
        day = max(first, plan.started_on)
        while day < today and plan.state == WarmupState.running:
            proposal = evaluate(session, plan, day, rules, actor=actor, now=now)
            if proposal is not None:
                report.judged.append(
                    {"subject": subject.label, "day": day.isoformat(), **proposal.as_json()}
                )
                if proposal.verdict == "review":
                    report.follow_ups.append(
                        FollowUp(
                            "review", subject.label, plan.id, reason="; ".join(proposal.reasons)
                        )
                    )
                elif proposal.verdict == "complete":
                    if subject.kind == "domain":
                        complete(session, plan, rules, actor=actor, now=now, approved_by="")
                    else:
                        report.follow_ups.append(
                            FollowUp("complete", subject.label, plan.id, ip=subject.name)
                        )
                    break
            day += timedelta(days=1)
        if plan.state in CAPPED_STATES:
            write_caps(session, plan, today, rules)
        if plan.state == WarmupState.review and not any(
            f.plan_id == plan.id for f in report.follow_ups
        ):
            pass  # its review checkpoint is already open (the sweep keeps it)
    for address in idle_ips(session, now, rules.spec.rewarm_after_idle_days):
        ip = session.exec(select(IpAddress).where(IpAddress.address == address)).one()
        ip.state = IpState.cold
        session.add(ip)
        _audit(
            session,
            rules,
            actor=actor,
            now=now,
            action="warmup.cooled",
            subject=f"ip:{address}",
            evidence={
                "idle_days": rules.spec.rewarm_after_idle_days,
                "why": "no mail for the re-warm period: cold until a re-warm is approved",
            },
        )
        report.cooled.append(address)
        report.follow_ups.append(
            FollowUp(
                "start", f"ip:{address}", ip=address, plan=rules.spec.rewarm_plan, reason="idle"
            )
        )
    return report


def idle_ips(session: Session, now: datetime, idle_days: int) -> list[str]:
    """Active IPs with no delivery attempt (raw or rolled up) for idle_days, and older than
    that: a receiver has forgotten them (SendGrid re-warms after 30 idle days)."""
    since = now - timedelta(days=idle_days)
    active = session.exec(
        select(IpAddress.address).where(
            IpAddress.state == IpState.active, IpAddress.created_at < since
        )
    ).all()
    if not active:
        return []
    recent = set(
        session.exec(
            select(DeliveryEvent.source_ip)
            .where(col(DeliveryEvent.source_ip).in_(active), DeliveryEvent.at >= since)
            .distinct()
        ).all()
    )
    recent |= set(
        session.exec(
            select(EventRollup.source_ip)
            .where(col(EventRollup.source_ip).in_(active), EventRollup.hour >= since)
            .distinct()
        ).all()
    )
    return sorted(a for a in active if a not in recent)


# ---------------------------------------------------------------- starting and ending
def get_ip(session: Session, address: str) -> IpAddress:
    ip = session.exec(select(IpAddress).where(IpAddress.address == address)).first()
    if ip is None:
        raise ServiceError(f"IP {address!r} is in no pool (`axiom pool add-ip`)")
    return ip


def running_plan(session: Session, *, ip_id=None, domain_id=None) -> WarmupPlan | None:
    query = select(WarmupPlan).where(col(WarmupPlan.state).in_(CAPPED_STATES))
    if ip_id is not None:
        query = query.where(WarmupPlan.ip_id == ip_id)
    else:
        query = query.where(WarmupPlan.domain_id == domain_id)
    return session.exec(query).first()


def choose_plan(session: Session, ip: IpAddress, rules: IpWarmupRunbook, reason: str) -> str:
    """The re-warm plan for an IP coming back (idle, delisted); else its pool's plan; else the
    default."""
    if reason in ("idle", "delisted"):
        return rules.spec.rewarm_plan
    pool = session.get(IpPool, ip.pool_id)
    return rules.spec.pool_plans.get(pool.name if pool else "", rules.spec.default_plan)


def start_evidence(session: Session, address: str, plan_name: str, rules: IpWarmupRunbook) -> dict:
    """What the approver sees before an IP warms: its pool, the streams that will use it, the
    plan's stages and caps. The flow adds the IP's forward-confirmed reverse DNS."""
    ip = get_ip(session, address)
    if plan_name not in rules.spec.plans:
        raise ServiceError(
            f"plan {plan_name!r} is not in runbooks/ip-warmup.yaml "
            f"(plans: {', '.join(rules.spec.plans)})"
        )
    plan = rules.spec.plans[plan_name]
    pool = session.get(IpPool, ip.pool_id)
    streams = session.exec(
        select(Tenant.name, Stream.name)
        .join(Tenant, Tenant.id == Stream.tenant_id)
        .where((Stream.pool_id == ip.pool_id) | (Stream.fallback_pool_id == ip.pool_id))
        .order_by(Tenant.name, Stream.name)
    ).all()
    return {
        "ip": ip.address,
        "state": str(ip.state),
        "ptr": ip.ptr_name,
        "pool": pool.name if pool else None,
        "streams": [f"{t}/{s}" for t, s in streams],
        "plan": plan_name,
        "stages": plan.stages,
        "sending_days": len(plan.stages),
        "first_day_caps": day_caps(plan, {}, rules.spec.providers),
        "overflow": plan.overflow,
    }


def start(
    session: Session,
    address: str,
    plan_name: str,
    rules: IpWarmupRunbook,
    *,
    reason: str,
    candidates: str,
    actor: str,
    now: datetime,
    approval_id: int | None = None,
    approved_by: str = "",
) -> dict:
    """The approved start: a plan at stage 1 for every provider, the IP warming, today's caps
    written, audited. An IP already on a plan keeps it (the step is idempotent)."""
    ip = get_ip(session, address)
    if candidates not in ("all", "marked"):
        raise ServiceError(f"candidates {candidates!r} must be 'all' or 'marked'")
    existing = running_plan(session, ip_id=ip.id)
    if existing is not None:
        return {"plan_id": existing.id, "plan": existing.schedule_id, "already": True}
    plan = WarmupPlan(
        ip_id=ip.id,
        schedule_id=plan_name,
        runbook_version=rules.version,
        started_on=now.date(),
        state=WarmupState.running,
        reason=reason,
        stages={ALL_PROVIDERS: 1},
        held={},
        candidates=candidates,
        progressed_on=now.date(),
    )
    plan_rules(rules, plan)  # refuses an unknown plan before anything is written
    session.add(plan)
    session.flush()
    before = str(ip.state)
    ip.state = IpState.warming
    session.add(ip)
    caps = write_caps(session, plan, now.date(), rules)
    _audit(
        session,
        rules,
        actor=actor,
        now=now,
        action="warmup.start",
        subject=f"ip:{ip.address}",
        evidence={
            "plan": plan_name,
            "reason": reason,
            "candidates": candidates,
            "state_before": before,
            "caps": caps,
            "approval_id": approval_id,
            "approved_by": approved_by,
        },
    )
    return {"plan_id": plan.id, "plan": plan_name, "caps": caps, "already": False}


def start_domain(
    session: Session, domain_name: str, rules: IpWarmupRunbook, *, actor: str, now: datetime
) -> dict | None:
    """A new sending domain warms too, even on a warm pool: its own caps per provider for its
    first weeks. Automatic (a cap protects and lifts itself by plan), audited; None when the
    domain has sent in the history period or is on a plan already."""
    domain = session.exec(select(Domain).where(Domain.name == domain_name)).first()
    if domain is None or running_plan(session, domain_id=domain.id) is not None:
        return None
    since = now - timedelta(days=rules.spec.domain.history_days)
    sent = session.exec(
        select(func.count())
        .select_from(DeliveryEvent)
        .where(DeliveryEvent.from_domain == domain.name, DeliveryEvent.at >= since)
    ).one()
    if sent:
        return None
    plan = WarmupPlan(
        domain_id=domain.id,
        schedule_id=rules.spec.domain.plan,
        runbook_version=rules.version,
        started_on=now.date(),
        state=WarmupState.running,
        reason="domain",
        stages={ALL_PROVIDERS: 1},
        held={},
        progressed_on=now.date(),
    )
    session.add(plan)
    session.flush()
    caps = write_caps(session, plan, now.date(), rules)
    _audit(
        session,
        rules,
        actor=actor,
        now=now,
        action="warmup.start",
        subject=f"domain:{domain.name}",
        evidence={"plan": plan.schedule_id, "reason": "new sending domain", "caps": caps},
    )
    return {"plan_id": plan.id, "plan": plan.schedule_id, "caps": caps}


def review(
    session: Session,
    plan_id: int,
    choice: ReviewChoice,
    rules: IpWarmupRunbook,
    *,
    actor: str,
    now: datetime,
    approval_id: int | None = None,
    approved_by: str = "",
) -> dict:
    """A person's answer to a review: step back (every provider down the runbook's stages,
    running again), pause (caps 0: the subject sends nothing on this plan) or continue."""
    plan = session.get(WarmupPlan, plan_id)
    if plan is None:
        raise ServiceError(f"no warm-up plan {plan_id}")
    before = {"state": plan.state, "stages": dict(plan.stages or {})}
    if choice == "step_back":
        back = rules.spec.judgement.step_back_stages
        plan.stages = {p: max(1, s - back) for p, s in (plan.stages or {}).items()}
        plan.state = WarmupState.running
    elif choice == "pause":
        plan.state = WarmupState.paused
    elif choice == "continue":
        plan.state = WarmupState.running
    else:
        raise ServiceError(f"{choice!r}: answer step_back, pause or continue")
    plan.held = {}
    plan.progressed_on = now.date()  # patience counts again from the decision
    session.add(plan)
    caps = write_caps(session, plan, now.date(), rules)
    subject = subject_of(session, plan)
    _audit(
        session,
        rules,
        actor=actor,
        now=now,
        action=f"warmup.{choice.replace('_', '-')}",
        subject=subject.label,
        evidence={
            "before": before,
            "stages": plan.stages,
            "state": plan.state,
            "caps": caps,
            "approval_id": approval_id,
            "approved_by": approved_by,
        },
    )
    return {"state": plan.state, "stages": plan.stages, "caps": caps}


def complete(
    session: Session,
    plan: WarmupPlan,
    rules: IpWarmupRunbook,
    *,
    actor: str,
    now: datetime,
    approved_by: str,
    approval_id: int | None = None,
) -> dict:
    """The subject is warm: the plan is done (no caps) and an IP becomes active."""
    plan.state = WarmupState.done
    session.add(plan)
    subject = subject_of(session, plan)
    if plan.ip_id is not None:
        ip = session.get(IpAddress, plan.ip_id)
        if ip is not None:
            ip.state = IpState.active
            session.add(ip)
    _audit(
        session,
        rules,
        actor=actor,
        now=now,
        action="warmup.complete",
        subject=subject.label,
        evidence={
            "plan": plan.schedule_id,
            "stages": plan.stages,
            "approval_id": approval_id,
            "approved_by": approved_by,
        },
    )
    return {"subject": subject.label, "state": "done"}


def declare_warm(
    session: Session,
    address: str,
    rules: IpWarmupRunbook,
    *,
    actor: str,
    now: datetime,
    approved_by: str,
    approval_id: int | None = None,
) -> dict:
    """An operator knows the IP is warm (moved from another service, say): approved through
    warmup.complete, its plan (if any) ends and it carries full traffic."""
    ip = get_ip(session, address)
    plan = running_plan(session, ip_id=ip.id)
    if plan is not None:
        return complete(
            session,
            plan,
            rules,
            actor=actor,
            now=now,
            approved_by=approved_by,
            approval_id=approval_id,
        )
    before = str(ip.state)
    ip.state = IpState.active
    session.add(ip)
    _audit(
        session,
        rules,
        actor=actor,
        now=now,
        action="warmup.declared-warm",
        subject=f"ip:{ip.address}",
        evidence={"state_before": before, "approval_id": approval_id, "approved_by": approved_by},
    )
    return {"subject": f"ip:{ip.address}", "state": "active"}


# ---------------------------------------------------------------- status (CLI and artifact)
@dataclass(frozen=True)
class StatusRow:
    subject: str
    plan: str
    plan_id: int
    state: str
    provider: str
    stage: int
    stages: int
    cap: int
    sent: int
    signals: str  # yesterday's colour and reason
    next: str  # what the next daily run would decide from today so far

    def as_json(self) -> dict:
        return asdict(self)


def status(session: Session, rules: IpWarmupRunbook, *, now: datetime) -> list[StatusRow]:
    today = now.date()
    rows: list[StatusRow] = []
    for plan in plans_in(session):
        subject = subject_of(session, plan)
        plan_def = plan_rules(rules, plan)
        stages = plan.stages or {ALL_PROVIDERS: 1}
        default = stages.get(ALL_PROVIDERS, 1)
        days = {
            (r.day, r.provider): r
            for r in session.exec(
                select(WarmupDay).where(
                    WarmupDay.plan_id == plan.id,
                    col(WarmupDay.day).in_([today, today - timedelta(days=1)]),
                )
            ).all()
        }
        evidence = day_evidence(session, plan, today, rules)
        upcoming = {
            j.provider: j for j in (judge(d, rules.spec.judgement) for d in evidence.days.values())
        }
        for provider in [*rules.spec.providers, ALL_PROVIDERS]:
            stage = stages.get(provider, default)
            now_row = days.get((today, provider))
            before = days.get((today - timedelta(days=1), provider))
            cap = now_row.cap if now_row else cap_for(plan_def, provider, stage)
            if plan.state == WarmupState.paused:
                cap = 0
            signals = ""
            if before is not None and before.signals:
                signals = f"{before.signals.get('colour', '')}: {before.signals.get('reason', '')}"
            j = upcoming.get(provider)
            if plan.state != WarmupState.running:
                next_step = f"waits for a person ({plan.state})"
            elif j is None:
                next_step = "hold (nothing sent today)"
            else:
                next_step = {
                    "green": "advance",
                    "yellow": "hold",
                    "quiet": "hold",
                    "red": "review",
                }[j.colour] + f" ({j.reason})"
            rows.append(
                StatusRow(
                    subject=subject.label,
                    plan=plan.schedule_id,
                    plan_id=plan.id or 0,
                    state=plan.state,
                    provider=provider,
                    stage=stage,
                    stages=len(plan_def.stages),
                    cap=cap,
                    sent=now_row.sent if now_row else 0,
                    signals=signals,
                    next=next_step,
                )
            )
    return rows


def history(session: Session, plan_id: int) -> dict[str, list[tuple[date, int, int]]]:
    """Per provider, each day's cap and what was delivered: the chart of planned against sent.
    A judged day says what the receivers accepted (its signals, from the delivery events); the
    day in progress what the relay has counted against the cap so far (the same thing: a pick
    counts as delivered recipients once the attempt is over)."""
    out: dict[str, list[tuple[date, int, int]]] = defaultdict(list)
    for r in session.exec(
        select(WarmupDay).where(WarmupDay.plan_id == plan_id).order_by(WarmupDay.day)
    ).all():
        out[r.provider].append((r.day, r.cap, (r.signals or {}).get("delivered", r.sent)))
    return dict(out)


def chart(days: list[tuple[date, int, int]], width: int = 40) -> str:
    """Planned (░) against sent (█) per day, as text: readable in a Prefect artifact, in
    Slack and in a terminal alike."""
    if not days:
        return "(no days yet)"
    top = max(max(cap, sent) for _, cap, sent in days) or 1
    lines = []
    for day, cap, sent in days:
        planned = round(width * cap / top)
        done = min(round(width * sent / top), width)
        bar = "█" * done + "░" * max(0, planned - done)
        lines.append(f"{day:%m-%d} {bar:<{width}} {sent:>7}/{cap}")
    return "\n".join(lines)

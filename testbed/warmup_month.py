"""A simulated month of IP warm-up (issue 15): one world, two tenants' campaigns side by side.

    month = WarmupMonth(tmp / "month", MonthSettings(days=30))
    report = asyncio.run(month.run())     # starts, runs day by day, stops; bounded in time
    print(report.table())                 # per day: blocked, deferred, delivered, both runs

One sandbox world (DNS and the simulated providers, sandbox/world.py) on loopback, the relay's
delivery engine in this process (as tests/integration/test_sandbox_delivery.py runs it) on a
SQLite database, and the sandbox clock (the database's offset: `axiom sandbox clock advance`)
moved through each day by this harness:

- GOVERNED: tenant `steady`, stream `campaign` on a dedicated pool with one cold IP warmed on
  plan `sandbox` (protocol/warmup.start, as the approved warmup.start checkpoint does), the
  stream's fallback the shared pool, whose IP the providers know well (score 90, as
  `axiom sandbox reputation --score 90` sets it).
- UNGOVERNED: tenant `rush`, the same campaign on a pool with one IP an operator declared
  `active` without warming it: no plan, no fallback, cold in the providers' eyes.

Each simulated day: the clock goes to the day's first minute, the daily judgement runs
(protocol/warmup.daily, what `axiom warmup evaluate` runs), both campaigns are spooled, and
the delivery engine sends what is due at a few hours of the day (retries and suspensions run
on the same clock). What happened is read back per day and source IP from the relay's
delivery events (its view) and from the answers the simulated providers recorded (theirs).

Shared by tests/integration/test_warmup_month.py and bench/warmup_month.py; no pytest here.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select
from sqlmodel import Session

from models import (
    DeliveryEvent,
    EventKind,
    IpAddress,
    IpState,
    Message,
    Recipient,
    WarmupDay,
    WarmupPlan,
)
from models.db import session_scope
from testbed.sandbox_stack import (  # noqa: F401 — fast_dir and Tally are this module's API too
    BLOCK_CATEGORIES,
    Outgoing,
    SandboxStack,
    Tally,
    existing_recipients,
    fast_dir,
)

GOVERNED_IP = "127.0.0.21"
UNGOVERNED_IP = "127.0.0.22"
WARM_IP = "127.0.0.20"  # the shared pool's: the governed stream's fallback, and DSNs
PTRS = {
    WARM_IP: "mta20.axiom.test",
    GOVERNED_IP: "mta21.axiom.test",
    UNGOVERNED_IP: "mta22.axiom.test",
}
GOVERNED = ("steady", "steady.example")  # tenant, sending domain
UNGOVERNED = ("rush", "rush.example")
STREAM = "campaign"
PLAN = "sandbox"
# Recipient domain -> the provider the relay (and the world) name it by.
CAMPAIGN = {"gmail.com": "google", "outlook.com": "microsoft", "yahoo.com": "yahoo"}
DAY = timedelta(days=1)


@dataclass(frozen=True)
class MonthSettings:
    days: int = 30
    # Messages a day per stream to each campaign provider. The plan's last stage is 200 a
    # provider and it advances on 90 % of a cap delivered: a campaign below 180 a provider
    # would hold the plan short of its last stage (protocol/warmup.judge, "quiet").
    per_provider: int = 200
    # Recipients per message, all at one provider (one SMTP transaction each). The relay
    # counts a warm-up cap per recipient and stops picking the IP once it is reached, so a
    # message may carry its IP up to this many minus one past the cap (egress.release).
    rcpts_per_message: int = 10
    # While the governed campaign goes out each morning the delivery engine works on this
    # many recipients at once (its max_in_flight and claim_batch; production's 1000 and 200
    # the rest of the day). The relay reserves one unit of a warm-up cap per message it
    # picks an IP for and counts the message's other recipients once delivered, so messages
    # picked at once can each pass the cap by their recipients (egress.choose/release). One
    # message's worth at a time keeps the cold IP within one message of its cap. Set it to
    # 1000 to see the relay's caps overrun.
    narrow_in_flight: int = 10
    # Hours of each day, after the morning's campaigns, at which the delivery engine sends
    # what is due: retries and what suspensions held (retry intervals are 5 min to 1 h).
    hops: tuple[int, ...] = (1, 4, 12)
    # The campaign's recipients are engaged: no complaints (the complaint-spike tests in
    # test_ip_warmup.py and test_sandbox_cli.py cover those). A share here turns them on.
    complaint_share: float = 0.0
    rounds_per_hop: int = 2000  # claim-and-deliver rounds at most per hop
    # Real time at most per hop; None: only time_limit bounds it. A hop cut by real time
    # leaves what is due for later hops, where older mail (the ungoverned stream's retries)
    # is claimed first: on a loaded machine the governed campaign then missed its day (CI,
    # day 27: 414 of 600). The month's outcome must not depend on the machine's speed.
    hop_seconds: float | None = None
    time_limit: float = 900.0  # real time at most for the whole month


@dataclass
class DayReport:
    day: int  # 0-based sending day of the month
    date: str
    governed: Tally  # from the cold IP on its plan
    overflow: Tally  # the governed stream's mail from the fallback (warm) IP
    ungoverned: Tally
    # What the simulated providers answered each IP (sandbox verdicts): outcome -> count.
    answers: dict[str, dict[str, int]]
    stages: dict[str, int]  # the governed plan's stage per provider on this day
    caps: dict[str, int]  # the day's cap per campaign provider
    sent: dict[str, int]  # what the relay counted against each cap
    governed_by_provider: dict[str, int] = field(default_factory=dict)  # delivered
    judged: str = ""  # the daily run's verdict about this day (written the next morning)
    held: dict[str, str] = field(default_factory=dict)
    dsns: int = 0  # bounce reports the relay sent (from the warm IP) this day


@dataclass
class MonthReport:
    settings: MonthSettings
    started: str  # the first simulated day
    days: list[DayReport] = field(default_factory=list)
    follow_ups: list[dict] = field(default_factory=list)  # daily's proposals, with their day
    final_stages: dict[str, int] = field(default_factory=dict)
    plan_stages: int = 0
    submitted: dict[str, int] = field(default_factory=dict)  # per stream (tenant)
    outcome: dict[str, dict[str, int]] = field(default_factory=dict)  # tenant -> state -> n
    seconds: dict[str, float] = field(default_factory=dict)

    def completion_day(self) -> int | None:
        found = [f["day"] for f in self.follow_ups if f["action"] == "complete"]
        return min(found) if found else None

    def totals(self, which: str) -> Tally:
        total = Tally()
        for d in self.days:
            part: Tally = getattr(d, which)
            for name in ("delivered", "deferred", "blocked", "refused"):
                setattr(total, name, getattr(total, name) + getattr(part, name))
        return total

    def as_json(self) -> dict:
        return {
            "settings": asdict(self.settings),
            "started": self.started,
            "plan": PLAN,
            "plan_stages": self.plan_stages,
            "ips": {"governed": GOVERNED_IP, "fallback": WARM_IP, "ungoverned": UNGOVERNED_IP},
            "completion_proposed_on_day": self.completion_day(),
            "final_stages": self.final_stages,
            "follow_ups": self.follow_ups,
            "submitted": self.submitted,
            "outcome": self.outcome,
            "totals": {w: asdict(self.totals(w)) for w in ("governed", "overflow", "ungoverned")},
            "seconds": self.seconds,
            "days": [asdict(d) for d in self.days],
        }

    def table(self) -> str:
        """Both runs side by side, one line a day (plain text: test failure output)."""
        head = (
            f"{'day':>3} {'stage g/m/y':>11} {'caps g/m/y':>12} | "
            f"{'GOVERNED blk':>12} {'def':>4} {'dlv':>4} {'+fallback':>9} | "
            f"{'UNGOVERNED blk':>14} {'def':>4} {'dlv':>4} | judged"
        )
        lines = [head, "-" * len(head)]
        for d in self.days:
            stage = "/".join(str(d.stages.get(p, "")) for p in CAMPAIGN.values())
            caps = "/".join(str(d.caps.get(p, "")) for p in CAMPAIGN.values())
            g, o, u = d.governed, d.overflow, d.ungoverned
            lines.append(
                f"{d.day:>3} {stage:>11} {caps:>12} | {g.blocked:>12} {g.deferred:>4} "
                f"{g.delivered:>4} {o.delivered:>9} | {u.blocked:>14} {u.deferred:>4} "
                f"{u.delivered:>4} | {d.judged}"
            )
        return "\n".join(lines)


class MonthTimeout(AssertionError):
    """The month did not finish within its real-time bound."""


class WarmupMonth:
    def __init__(self, root: Path, settings: MonthSettings | None = None):
        self.root = root
        self.settings = settings or MonthSettings()
        # No inbound listener: the campaign's recipients complain only when complaint_share
        # says so, and then nothing here reads the reports.
        self.stack = SandboxStack(root, inbound=False)
        self.tenants: dict[str, int] = {}
        self.recipients: dict[str, list[str]] = {}
        self._day0: datetime | None = None

    @property
    def engine(self):
        return self.stack.engine

    @property
    def world(self):
        return self.stack.world

    @property
    def delivery(self):
        return self.stack.delivery

    # ------------------------------------------------------------------ the world
    async def start(self) -> None:
        if self.settings.narrow_in_flight < self.settings.rcpts_per_message:
            raise ValueError("narrow_in_flight must hold one message's recipients")
        await self.stack.start(
            self._seed, at=self._first_day(), narrow_in_flight=self.settings.narrow_in_flight
        )
        clock = self.world.clock
        # The shared pool's IP is known to every provider; the other two are new to them.
        self.world.reputation.set_score(
            [p.name for p in self.world.behaviour.providers], WARM_IP, 90
        )
        await asyncio.to_thread(
            self.world.state.set_knob, "complaint_share", {"*": self.settings.complaint_share}
        )
        await self.world.refresh()
        with session_scope(self.engine) as s:
            from protocol import warmup
            from runbooks.loader import ip_warmup

            warmup.start(
                s,
                GOVERNED_IP,
                PLAN,
                ip_warmup(),
                reason="new",
                candidates="all",
                actor="testbed:warmup-month",
                now=clock.now(),
            )
            s.commit()

    async def stop(self) -> None:
        await self.stack.stop()

    def _seed(self, s: Session, keybox) -> None:
        from protocol import domains, egress, tenants

        egress.ensure_default_pool(s)
        shared = egress.get_pool(s, "default")
        for ip in s.exec(select(IpAddress).where(IpAddress.pool_id == shared.id)).scalars():
            s.delete(ip)
        s.flush()
        egress.add_pool(s, "steady-dedicated", "dedicated")
        egress.add_pool(s, "rush-dedicated", "dedicated")
        for address, pool, state in (
            (WARM_IP, "default", IpState.active),
            (GOVERNED_IP, "steady-dedicated", IpState.cold),
            (UNGOVERNED_IP, "rush-dedicated", IpState.active),  # warm-up skipped
        ):
            ip = egress.add_ip(s, address, pool, PTRS[address], 100)
            ip.state = state
            s.add(ip)
        for (tenant, domain), pool, fallback in (
            (GOVERNED, "steady-dedicated", "default"),
            (UNGOVERNED, "rush-dedicated", None),
        ):
            self.tenants[tenant] = tenants.add_tenant(s, tenant).id
            domains.add_domain(s, keybox, tenant, domain)
            domains.mark_domain_active(s, domain, "testbed", "warm-up month")
            egress.set_stream(s, tenant, STREAM, pool, fallback)

    # ------------------------------------------------------------------ the clock
    def _first_day(self) -> datetime:
        """Midnight (UTC) of the day after today: the month's day 0 starts there."""
        if self._day0 is None:
            tomorrow = datetime.now(UTC).date() + DAY
            self._day0 = datetime.combine(tomorrow, datetime.min.time(), tzinfo=UTC)
        return self._day0

    async def _move_clock(self, to: datetime) -> None:
        await self.stack.move_clock(to)

    # ------------------------------------------------------------------ one day
    def _campaign_recipients(self, tenant: str) -> list[str]:
        """The campaign's list: per_provider existing mailboxes at each provider (the world
        draws 2 % unknown mailboxes at random; an engaged list has none)."""
        found = self.recipients.get(tenant)
        if found is None:
            found = []
            for domain in CAMPAIGN:
                found += existing_recipients(tenant, domain, self.settings.per_provider)
            self.recipients[tenant] = found
        return found

    def _spool(self, day: int, now: datetime, who: tuple[str, str]) -> dict[str, int]:
        """The day's campaign of one tenant, signed as the submission server signs it and
        spooled as it would be: rcpts_per_message recipients of one provider a message."""
        tenant, domain = who
        campaign = Outgoing(
            self.tenants[tenant],
            STREAM,
            domain,
            f"news@{domain}",
            self._campaign_recipients(tenant),
            self.settings.rcpts_per_message,
            f"Day {day + 1}: this week's offers",
        )
        return {tenant: self.stack.spool([campaign], now)}

    def _hop_end(self, deadline: float) -> float:
        if self.settings.hop_seconds is None:
            return deadline
        return min(deadline, time.monotonic() + self.settings.hop_seconds)

    async def _deliver_due(self, deadline: float, *, narrow: bool = False) -> int:
        """Claim and deliver what is due now until nothing is (DSNs are due at once), bounded
        in rounds and in real time; narrow: a message's recipients at a time."""
        return await self.stack.deliver_due(
            deadline, narrow=narrow, rounds=self.settings.rounds_per_hop
        )

    def _judge(self, now: datetime) -> list[dict]:
        """The daily run (protocol/warmup.daily, what `axiom warmup evaluate` and the
        scheduled ip-warmup deployment run): judges yesterday, writes today's caps."""
        from protocol import warmup
        from runbooks.loader import ip_warmup

        with session_scope(self.engine) as s:
            report = warmup.daily(s, ip_warmup(), now=now, actor="testbed:warmup-month")
            s.commit()
            return [report.as_json()]

    # ------------------------------------------------------------------ reading back
    def _tally(self, start: datetime, end: datetime) -> tuple[dict, int]:
        """Per (source IP, stream's domain, provider): the campaign providers' answers in
        [start, end) (provider "" sums them); and the DSNs delivered."""
        tallies: dict[tuple[str, str, str], Tally] = defaultdict(Tally)
        dsns = 0
        with Session(self.engine) as s:
            rows = s.exec(
                select(
                    DeliveryEvent.source_ip,
                    DeliveryEvent.from_domain,
                    DeliveryEvent.provider,
                    DeliveryEvent.category,
                    DeliveryEvent.permanent,
                    func.count(),
                )
                .where(
                    DeliveryEvent.kind == EventKind.attempt,
                    DeliveryEvent.at >= start,
                    DeliveryEvent.at < end,
                )
                .group_by(
                    DeliveryEvent.source_ip,
                    DeliveryEvent.from_domain,
                    DeliveryEvent.provider,
                    DeliveryEvent.category,
                    DeliveryEvent.permanent,
                )
            ).all()
        for ip, domain, provider, category, permanent, n in rows:
            if provider in CAMPAIGN.values():
                tallies[(ip or "", domain or "", provider)].add(category, permanent, n)
                tallies[(ip or "", domain or "", "")].add(category, permanent, n)
            elif category == "delivered":
                dsns += n
        return tallies, dsns

    def _plan_day(self, day: date) -> tuple[dict, dict, dict]:
        with Session(self.engine) as s:
            plan = s.exec(select(WarmupPlan).order_by(WarmupPlan.id)).scalars().first()
            rows = s.exec(
                select(WarmupDay).where(WarmupDay.plan_id == plan.id, WarmupDay.day == day)
            ).scalars()
            caps, sent = {}, {}
            for r in rows:
                if r.provider in CAMPAIGN.values():
                    caps[r.provider], sent[r.provider] = r.cap, r.sent
            stages = plan.stages or {}
            default = stages.get("*", 1)
            return {p: stages.get(p, default) for p in CAMPAIGN.values()}, caps, sent

    def _outcome(self) -> dict[str, dict[str, int]]:
        with Session(self.engine) as s:
            rows = s.exec(
                select(Message.tenant_id, Recipient.state, func.count())
                .join(Message, Message.id == Recipient.message_id)
                .where(Message.stream == STREAM)
                .group_by(Message.tenant_id, Recipient.state)
            ).all()
        names = {v: k for k, v in self.tenants.items()}
        out: dict[str, dict[str, int]] = defaultdict(dict)
        for tenant_id, state, n in rows:
            out[names[tenant_id]][str(state)] = n
        return dict(out)

    # ------------------------------------------------------------------ the month
    async def run(self) -> MonthReport:
        began = time.monotonic()
        try:
            await self.start()
            started = time.monotonic()
            report = await self._month(began + self.settings.time_limit)
            report.seconds["setup"] = round(started - began, 2)
            report.seconds["month"] = round(time.monotonic() - started, 2)
        finally:
            await self.stop()
        report.seconds["total"] = round(time.monotonic() - began, 2)
        return report

    async def _month(self, deadline: float) -> MonthReport:
        from runbooks.loader import ip_warmup

        cfg = self.settings
        day0 = self._first_day()
        report = MonthReport(cfg, day0.date().isoformat())
        report.plan_stages = len(ip_warmup().spec.plans[PLAN].stages)
        submitted: Counter = Counter()
        judged_at = {}
        days_s = judge_s = 0.0
        for n in range(cfg.days + 1):  # the extra morning judges the last day
            start = day0 + n * DAY
            await self._move_clock(start + timedelta(seconds=30))
            t = time.monotonic()
            for daily in self._judge(self.world.clock.now()):
                for j in daily["judged"]:
                    judged_at[j["day"]] = j
                for f in daily["follow_ups"]:
                    report.follow_ups.append({"day": n - 1, **f})
            judge_s += time.monotonic() - t
            self.delivery.egress.invalidate()  # the caps just written, now
            if n == cfg.days:
                break
            # The morning: what waits from yesterday (retries, held mail) goes first, then the
            # governed campaign (a message at a time, see narrow_in_flight), then the other.
            t = time.monotonic()
            hop_end = self._hop_end(deadline)
            await self._deliver_due(hop_end)
            for who, narrow in ((GOVERNED, True), (UNGOVERNED, False)):
                now = self.world.clock.now()
                submitted.update(await asyncio.to_thread(self._spool, n, now, who))
                await self._deliver_due(hop_end, narrow=narrow)
            for hour in cfg.hops:
                if time.monotonic() > deadline:
                    raise MonthTimeout(f"day {n}: the month ran out of time\n{report.table()}")
                await self._move_clock(start + timedelta(hours=hour, seconds=30))
                await self._deliver_due(self._hop_end(deadline))
            days_s += time.monotonic() - t
            await self.world.flush()
            tallies, dsns = await asyncio.to_thread(self._tally, start, start + DAY)
            stages, caps, sent = await asyncio.to_thread(self._plan_day, start.date())
            answers = await asyncio.to_thread(
                self.world.state.verdict_tally, start.timestamp(), (start + DAY).timestamp()
            )
            report.days.append(
                DayReport(
                    day=n,
                    date=start.date().isoformat(),
                    governed=tallies.get((GOVERNED_IP, GOVERNED[1], ""), Tally()),
                    overflow=tallies.get((WARM_IP, GOVERNED[1], ""), Tally()),
                    ungoverned=tallies.get((UNGOVERNED_IP, UNGOVERNED[1], ""), Tally()),
                    governed_by_provider={
                        p: tallies.get((GOVERNED_IP, GOVERNED[1], p), Tally()).delivered
                        for p in CAMPAIGN.values()
                    },
                    answers={ip: answers.get(ip, {}) for ip in PTRS},
                    stages=stages,
                    caps=caps,
                    sent=sent,
                    dsns=dsns,
                )
            )
        for d in report.days:
            j = judged_at.get(d.date)
            if j is not None:
                d.judged = j["verdict"]
                d.held = j.get("held", {})
        report.final_stages = (await asyncio.to_thread(self._plan_day, day0.date()))[0]
        report.submitted = dict(submitted)
        report.outcome = await asyncio.to_thread(self._outcome)
        report.seconds.update(days=round(days_s, 2), judge=round(judge_s, 2))
        return report

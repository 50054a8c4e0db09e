"""The data plane enforces warm-up (relay/delivery/egress.py): a plan's day with no row gets
the plan's cap, not unlimited; paused plans send nothing; cold IPs with no plan send nothing;
the hourly spread; a new domain's caps on every IP; engaged (marked) messages first; a plan's
overflow; a unit per recipient. On SQLite and PostgreSQL (the `engine` fixture)."""

from __future__ import annotations

import logging
import random
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from config.clock import ManualClock
from models import IpAddress, IpPool, IpState, Stream, Suspension, WarmupDay, WarmupPlan
from models.db import session_scope
from models.domains import Domain
from protocol import tenants
from relay.delivery.egress import Egress
from runbooks.loader import ip_warmup
from runbooks.schema_warmup import Plan, Spread

START = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
WARMING, WARM, SPARE = "127.0.0.10", "127.0.0.11", "127.0.0.20"


def _plan(stages, *, overflow="fallback", spread=None, **extra) -> Plan:
    return Plan(
        description="test",
        source="test",
        stages=stages,
        overflow=overflow,
        spread=spread or Spread(first_hour=0, hours=1),
        **extra,
    )


SPEC = ip_warmup().spec.model_copy(
    update={
        "plans": {
            **ip_warmup().spec.plans,
            "tiny": _plan([3, 6], shares={"microsoft": [{"until_stage": 1, "share": 0.5}]}),
            "tiny-wait": _plan([3, 6], overflow="wait"),
            "spread": _plan([12], spread=Spread(first_hour=8, hours=4)),
        }
    }
)
PROVIDERS = len(SPEC.providers) + 1  # and "*"


class World:
    def __init__(self, engine, clock: ManualClock):
        self.engine, self.clock = engine, clock
        self.egress = Egress(engine, clock, ttl=0, warmup=SPEC, rng=random.Random(7))
        with session_scope(engine) as s:
            tenant = tenants.add_tenant(s, "acme")
            s.flush()
            self.tenant_id = tenant.id
            main, spare = IpPool(name="main"), IpPool(name="spare")
            s.add_all([main, spare])
            s.flush()
            self.pools = {"main": main.id, "spare": spare.id}
            self.domain_id = None
            s.add(Domain(tenant_id=tenant.id, name="acme.example"))
            s.commit()
            self.domain_id = s.exec(select(Domain.id)).scalars().one()

    def ip(self, address: str, pool: str, state: IpState = IpState.active) -> int:
        with session_scope(self.engine) as s:
            ip = IpAddress(address=address, pool_id=self.pools[pool], state=state)
            s.add(ip)
            s.commit()
            return ip.id

    def stream(self, fallback: bool) -> None:
        with session_scope(self.engine) as s:
            s.add(
                Stream(
                    tenant_id=self.tenant_id,
                    name="transactional",
                    pool_id=self.pools["main"],
                    fallback_pool_id=self.pools["spare"] if fallback else None,
                )
            )
            s.commit()

    def plan(self, schedule: str, *, ip_id=None, domain=False, state="running", **extra) -> int:
        with session_scope(self.engine) as s:
            plan = WarmupPlan(
                ip_id=ip_id,
                domain_id=self.domain_id if domain else None,
                schedule_id=schedule,
                runbook_version="1.0",
                started_on=self.clock.now().date(),
                state=state,
                **extra,
            )
            s.add(plan)
            s.commit()
            return plan.id

    def choose(self, provider="generic", from_domain="other.example", candidate=False, units=1):
        return self.egress.choose(
            self.tenant_id, "transactional", provider, from_domain, candidate, units
        )

    def sources(self, n: int, **kw) -> list[str | None]:
        return [
            c.source.address if c.source else None for c in (self.choose(**kw) for _ in range(n))
        ]

    def days(self, plan_id: int) -> dict[str, tuple[int, int]]:
        with session_scope(self.engine) as s:
            rows = s.exec(select(WarmupDay).where(WarmupDay.plan_id == plan_id)).scalars()
            return {r.provider: (r.cap, r.sent) for r in rows if r.day == self.clock.now().date()}


@pytest.fixture
def world(engine) -> World:
    return World(engine, ManualClock(START))


def test_a_missing_day_row_is_the_plans_cap_not_unlimited(world):
    ip = world.ip(WARMING, "main", IpState.cold)
    world.stream(fallback=False)
    plan = world.plan("tiny", ip_id=ip, stages={"*": 1, "google": 2})
    assert world.sources(5) == [WARMING] * 3 + [None] * 2
    choice = world.choose()
    assert choice.wait_reason == f"{WARMING} reached its warm-up cap of 3 for generic today"
    assert choice.hold == "capped"
    days = world.days(plan)
    assert len(days) == PROVIDERS
    assert days["*"] == (3, 3) and days["google"] == (6, 0) and days["microsoft"] == (1, 0)
    assert world.sources(7, provider="google") == [WARMING] * 6 + [None]
    # The next day: new rows, at the plan's stage again (the control plane has written none).
    world.clock.advance(86400)
    assert world.sources(4) == [WARMING] * 3 + [None]
    assert len(world.days(plan)) == PROVIDERS


def test_several_nodes_insert_the_days_rows_once_and_share_the_cap(world):
    ip = world.ip(WARMING, "main", IpState.cold)
    world.stream(fallback=False)
    plan = world.plan("tiny", ip_id=ip)
    nodes = [Egress(world.engine, world.clock, ttl=0, warmup=SPEC) for _ in range(6)]
    start = threading.Barrier(len(nodes))
    picks: list[str | None] = []

    def node(egress: Egress) -> None:
        start.wait(timeout=10)
        for _ in range(2):
            c = egress.choose(world.tenant_id, "transactional", "generic")
            picks.append(c.source.address if c.source else None)

    threads = [threading.Thread(target=node, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert sorted(picks, key=str) == [WARMING] * 3 + [None] * 9
    days = world.days(plan)
    assert len(days) == PROVIDERS and days["*"] == (3, 3)


def test_a_plan_the_runbook_does_not_know_caps_at_the_default_plans_first_stage(world, caplog):
    ip = world.ip(WARMING, "main", IpState.warming)
    world.stream(fallback=False)
    plan = world.plan("retired-plan", ip_id=ip, stages={"*": 9})
    with caplog.at_level(logging.WARNING, logger="axiom.egress"):
        assert world.choose().source.address == WARMING
    standard = SPEC.plans[SPEC.default_plan]
    days = world.days(plan)
    assert days["*"] == (standard.stages[0], 1)
    assert days["microsoft"][0] == standard.stages[0] // 2
    assert "'retired-plan' is not in the runbook" in caplog.text


def test_a_paused_plan_sends_nothing_from_its_ip(world):
    ip = world.ip(WARMING, "main", IpState.warming)
    world.ip(SPARE, "spare")
    world.stream(fallback=True)
    plan = world.plan("tiny", ip_id=ip, state="paused")
    assert world.sources(4) == [SPARE] * 4
    assert {cap for cap, _ in world.days(plan).values()} == {0}
    with session_scope(world.engine) as s:  # a cap the control plane wrote does not lift it
        for row in s.exec(select(WarmupDay)).scalars():
            row.cap = 100
            s.add(row)
        s.commit()
    assert world.sources(3) == [SPARE] * 3
    with session_scope(world.engine) as s:
        s.delete(s.exec(select(IpAddress).where(IpAddress.address == SPARE)).scalars().one())
        s.commit()
    choice = world.choose()
    assert choice.source is None and "warm-up paused" in choice.wait_reason


def test_a_cold_ip_without_a_plan_is_not_used_and_the_fallback_carries_its_mail(world):
    world.ip(WARMING, "main", IpState.cold)
    world.ip(SPARE, "spare")
    world.stream(fallback=True)
    assert world.sources(5) == [SPARE] * 5
    with session_scope(world.engine) as s:
        s.exec(select(Stream)).scalars().one().fallback_pool_id = None
        s.commit()
    choice = world.choose()
    assert choice.source is None
    assert choice.wait_reason == f"{WARMING} is cold and has no warm-up plan"
    assert choice.hold == "no_ip"


def test_done_and_cancelled_plans_cap_nothing(world):
    ip = world.ip(WARMING, "main", IpState.active)
    world.stream(fallback=False)
    world.plan("tiny", ip_id=ip, state="done")
    world.plan("tiny", ip_id=ip, state="cancelled")
    assert world.sources(10) == [WARMING] * 10
    with session_scope(world.engine) as s:
        assert s.exec(select(WarmupDay)).scalars().all() == []


def test_the_day_opens_hour_by_hour(world):
    world.clock = ManualClock(START.replace(hour=7, minute=30))
    world.egress = Egress(world.engine, world.clock, ttl=0, warmup=SPEC)
    ip = world.ip(WARMING, "main", IpState.cold)
    world.stream(fallback=False)
    plan = world.plan("spread", ip_id=ip)  # 12 a day from 08:00 over 4 hours
    choice = world.choose()
    assert choice.source is None
    assert choice.wait_until == START.replace(hour=8, minute=0)
    assert "sent 0 of its warm-up cap of 12 for generic today; more opens at 08:00Z" in (
        choice.wait_reason
    )
    world.clock.advance(40 * 60)  # 08:10: a quarter
    assert world.sources(5) == [WARMING] * 3 + [None] * 2
    assert world.choose().wait_until == START.replace(hour=9, minute=0)
    world.clock.advance(2 * 3600)  # 10:10: three quarters
    assert world.sources(7) == [WARMING] * 6 + [None]
    world.clock.advance(3600)  # 11:10: the whole day
    assert world.sources(4) == [WARMING] * 3 + [None]
    assert world.days(plan)["*"] == (12, 12)


def test_a_new_domain_is_capped_on_every_ip_and_waits_rather_than_overflow(world):
    world.ip(WARMING, "main")
    world.ip(WARM, "main")
    world.ip(SPARE, "spare")
    world.stream(fallback=True)
    plan = world.plan("tiny", domain=True)
    picks = world.sources(40, from_domain="acme.example")
    assert len([p for p in picks if p]) == 3 and picks[3:] == [None] * 37
    assert {p for p in picks if p} <= {WARMING, WARM}
    choice = world.choose(from_domain="ACME.example")
    assert (
        choice.wait_reason == "domain acme.example reached its warm-up cap of 3 for generic today"
    )
    assert world.sources(3, from_domain="other.example") != [None] * 3  # only that domain
    microsoft = world.sources(2, provider="microsoft", from_domain="acme.example")  # cap 1
    assert microsoft[0] in (WARMING, WARM) and microsoft[1] is None
    assert world.days(plan)["*"] == (3, 3)


def test_the_domains_unit_goes_back_when_no_ip_can_take_the_message(world):
    ip = world.ip(WARMING, "main", IpState.cold)
    world.stream(fallback=False)
    ip_plan = world.plan("tiny", ip_id=ip)
    domain_plan = world.plan("tiny-wait", domain=True, stages={"*": 2})  # 6
    assert world.sources(5, from_domain="acme.example") == [WARMING] * 3 + [None] * 2
    assert world.days(ip_plan)["*"] == (3, 3)
    assert world.days(domain_plan)["*"] == (6, 3)  # the two waits gave their units back


def test_marked_messages_go_to_the_warming_ip_first_the_rest_by_weight(world):
    warming = world.ip(WARMING, "main", IpState.warming)
    world.ip(WARM, "main")
    world.stream(fallback=False)
    world.plan("tiny", ip_id=warming, stages={"*": 2})  # 6
    assert world.sources(6, candidate=True) == [WARMING] * 6  # engaged first, to the cap
    world.clock.advance(86400)  # a new day, a new cap of 6
    # Unmarked mail goes by the pool's weights over both IPs (warm first would starve the
    # warming one whenever the customer marks nothing), the warming IP up to its cap.
    picks = world.sources(40)
    assert picks.count(WARMING) == 6 and picks.count(WARM) == 34
    assert WARMING in picks[:12]  # mixed in from the start, not only after the warm IP
    # With the warm IP suspended an unmarked message may use a plan taking "all"...
    world.clock.advance(86400)
    with session_scope(world.engine) as s:
        s.add(
            Suspension(
                source_ip=WARM,
                provider="*",
                action="suspend",
                reason="test",
                expires_at=world.clock.now() + timedelta(hours=1),
            )
        )
        s.commit()
    assert world.sources(2) == [WARMING] * 2


def test_a_plan_for_marked_messages_never_takes_the_rest(world):
    warming = world.ip(WARMING, "main", IpState.cold)
    world.ip(SPARE, "spare")
    world.stream(fallback=True)
    world.plan("tiny", ip_id=warming, candidates="marked")
    assert world.sources(4) == [SPARE] * 4
    assert world.sources(4, candidate=True) == [WARMING] * 3 + [SPARE]
    with session_scope(world.engine) as s:
        s.exec(select(Stream)).scalars().one().fallback_pool_id = None
        s.commit()
    choice = world.choose()
    assert choice.source is None
    assert choice.wait_reason == f"{WARMING} warms up on marked messages only"


@pytest.mark.parametrize(("schedule", "after_cap"), [("tiny", SPARE), ("tiny-wait", None)])
def test_a_plans_overflow_says_fallback_or_wait(world, schedule, after_cap):
    ip = world.ip(WARMING, "main", IpState.cold)
    world.ip(SPARE, "spare")
    world.stream(fallback=True)
    world.plan(schedule, ip_id=ip)
    assert world.sources(5) == [WARMING] * 3 + [after_cap] * 2
    if after_cap is None:
        choice = world.choose()
        assert choice.hold == "capped"
        assert choice.wait_reason == f"{WARMING} reached its warm-up cap of 3 for generic today"


def test_release_counts_a_unit_per_recipient_on_the_ips_and_the_domains_day(world):
    ip = world.ip(WARMING, "main", IpState.cold)
    world.stream(fallback=False)
    ip_plan = world.plan("tiny", ip_id=ip, stages={"*": 2})  # 6
    domain_plan = world.plan("tiny", domain=True, stages={"*": 2})
    choice = world.choose(from_domain="acme.example")
    assert choice.warmup_day_id is not None and choice.domain_day_id is not None
    world.egress.release(choice.warmup_day_id, 4, choice.domain_day_id)  # four recipients
    assert world.days(ip_plan)["*"] == (6, 4) and world.days(domain_plan)["*"] == (6, 4)
    again = world.choose(from_domain="acme.example")
    world.egress.release(again.warmup_day_id, 0, again.domain_day_id)  # nothing delivered
    assert world.days(ip_plan)["*"] == (6, 4) and world.days(domain_plan)["*"] == (6, 4)
    assert world.sources(3, from_domain="acme.example") == [WARMING, WARMING, None]


def test_choose_cached_needs_no_database_for_uncapped_ips_and_defers_warm_up_picks(world):
    warming = world.ip(WARMING, "main", IpState.warming)
    world.ip(WARM, "main")
    world.stream(fallback=False)
    world.plan("tiny", ip_id=warming)
    egress = Egress(world.engine, world.clock, ttl=60, warmup=SPEC)
    assert egress.choose_cached(world.tenant_id, "transactional", "generic") is None  # no snapshot
    egress.choose(world.tenant_id, "transactional", "generic")
    # a pick of the warm IP needs no database; one of the warming IP reserves a unit (None)
    cached = [
        egress.choose_cached(world.tenant_id, "transactional", "generic", "x.example")
        for _ in range(20)
    ]
    assert {c.source.address for c in cached if c is not None} == {WARM}
    assert None in cached  # the weighted draw fell on the warming IP at least once
    assert egress.choose_cached(world.tenant_id, "transactional", "generic", "", True) is None
    world.clock.advance(86400)  # a new day: its rows first
    assert egress.choose_cached(world.tenant_id, "transactional", "generic") is None


def test_a_job_takes_a_unit_per_recipient_and_at_most_what_is_left(world):
    """A message to several recipients reserves a unit for each at once; picked when fewer are
    left, it takes what is left and the rest of its recipients wait (the month found caps of
    50 overrun to 300 by ten-recipient messages counted as one, then never filled when a job
    had to fit whole)."""
    ip = world.ip(WARMING, "main", IpState.cold)
    world.ip(SPARE, "spare")
    world.stream(fallback=True)
    plan = world.plan("tiny", ip_id=ip, stages={"*": 2})  # 6
    first = world.choose(units=4)
    assert (first.source.address, first.units) == (WARMING, 4)
    assert world.days(plan)["*"] == (6, 4)
    second = world.choose(units=4)
    assert (second.source.address, second.units) == (WARMING, 2)  # the last two units
    assert world.days(plan)["*"] == (6, 6)
    third = world.choose(units=3)
    assert (third.source.address, third.units) == (SPARE, 3)  # uncapped: the whole job
    # three of the first job's four were delivered: the unit of the fourth comes back
    world.egress.release(first.warmup_day_id, 3, units=4)
    assert world.days(plan)["*"] == (6, 5)


def test_a_suspension_past_its_end_is_over_even_in_a_fresh_snapshot(world):
    world.ip(WARM, "main")
    world.stream(fallback=False)
    with session_scope(world.engine) as s:
        s.add(
            Suspension(
                source_ip=WARM,
                provider="*",
                action="suspend",
                reason="test",
                expires_at=world.clock.now() + timedelta(seconds=30),
            )
        )
        s.commit()
    egress = Egress(world.engine, world.clock, ttl=3600, warmup=SPEC)
    assert egress.choose(world.tenant_id, "transactional", "generic").source is None
    world.clock.advance(31)  # the snapshot (an hour's ttl) still holds the suspension
    choice = egress.choose(world.tenant_id, "transactional", "generic")
    assert choice.source is not None and choice.source.address == WARM

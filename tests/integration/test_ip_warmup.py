"""The ip-warmup runbook's procedures end to end (issue 15): a real Prefect server serving the
deployments, Knot as DNS (the IP's forward-confirmed PTR as evidence), the sandbox clock moved
day by day, checkpoints answered in the fake Slack (a signed click) and by the CLI, the control
plane killed while a start waits for its approval.

The day's signals are delivery events written as the relay writes them; the relay's own
enforcement of the caps and the simulated receivers' verdicts are tested in
test_warmup_caps.py and test_warmup_month.py.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from itertools import count

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.deployments import run_deployment
from sqlmodel import select

from models import (
    AuditEntry,
    DeliveryEvent,
    EventKind,
    IpAddress,
    IpPool,
    IpState,
    PoolKind,
    Procedure,
    ProcedureState,
    WarmupDay,
    WarmupPlan,
)
from models.db import session_scope
from models.sandbox_clock import clock_for
from testbed.axiom import ControlProcess, flow_run_processes
from tests.fakes.slack import FakeSlack, button_click, sign
from tests.integration.test_domain_onboarding import (  # noqa: F401
    OURS,
    PTRS,
    REVERSE,
    SECRET,
    _until,
    world,
)

pytestmark = pytest.mark.integration

IP = "127.0.0.10"
MTA = "mta10.relay.axiom.test"
_ids = count(1)


def _zone(w) -> None:
    """Our names, plus the warming IP's PTR and its forward A: FCrDNS passes."""
    w["knot"].set_zone("test", [*OURS, (f"{MTA}.", "A", IP)])
    w["knot"].set_zone(REVERSE, [*PTRS, ("10", "PTR", f"{MTA}.")])


def _pool(engine, state=IpState.cold, created_at=None) -> None:
    with session_scope(engine) as s:
        pool = IpPool(name="dedicated-acme", kind=PoolKind.dedicated)
        s.add(pool)
        s.flush()
        ip = IpAddress(address=IP, pool_id=pool.id, ptr_name=MTA, state=state)
        if created_at is not None:
            ip.created_at = created_at
        s.add(ip)
        s.commit()


def _state(s) -> IpState:
    return s.exec(select(IpAddress).where(IpAddress.address == IP)).one().state


def _now(w) -> datetime:
    return clock_for("sandbox", w["engine"]).now()


def _signals(w, provider: str, n: int, category="delivered", kind=EventKind.attempt):
    """n events of the sandbox day so far, as the relay (or the inbound listener) writes them."""
    now = _now(w)
    at = max(now.replace(hour=0, minute=1, second=0, microsecond=0), now - timedelta(minutes=5))
    with session_scope(w["engine"]) as s:
        for _ in range(n):
            s.add(
                DeliveryEvent(
                    at=at,
                    kind=kind,
                    message_id=f"m{next(_ids)}",
                    recipient="r@example.net",
                    source_ip=IP,
                    provider=provider,
                    from_domain="shop.test",
                    category=category,
                    attempt=1 if kind == EventKind.attempt else None,
                )
            )
        s.commit()


def _warmup(engine, subject_action: str, state=ProcedureState.WAITING):
    def check():
        with session_scope(engine) as s:
            row = s.exec(
                select(Procedure)
                .where(Procedure.name == "ip-warmup", Procedure.subject == subject_action)
                .order_by(Procedure.id.desc())
            ).first()
        return row if row and row.state == state else None

    return check


def _plan(engine) -> WarmupPlan | None:
    with session_scope(engine) as s:
        return s.exec(select(WarmupPlan).where(WarmupPlan.ip_id.is_not(None))).first()


def _caps(engine, day) -> dict[str, int]:
    plan = _plan(engine)
    with session_scope(engine) as s:
        rows = s.exec(select(WarmupDay).where(WarmupDay.plan_id == plan.id, WarmupDay.day == day))
        return {r.provider: r.cap for r in rows.all()}


def _next_day(w) -> None:
    """The sandbox clock to the next day, then the daily run, as its schedule would start it."""
    w["cli"]("sandbox", "clock", "advance", "1d")
    run = run_deployment("ip-warmup/scheduled", timeout=180)
    assert run.state.is_completed(), run.state.message


def test_a_warmup_starts_through_a_restart_advances_holds_and_steps_back_on_complaints(
    world,  # noqa: F811
):
    engine, cli = world["engine"], world["cli"]
    _zone(world)
    _pool(engine)
    slack = FakeSlack()
    slack_env = {
        "AXIOM_SLACK_BOT_TOKEN": slack.token,
        "AXIOM_SLACK_CHANNEL": "C0APPROVALS",
        "AXIOM_SLACK_API_URL": slack.base_url,
        "AXIOM_SLACK_SIGNING_SECRET": SECRET,
    }
    control = ControlProcess(world["home"], world["env"] | slack_env).start()
    try:
        flows = world["serve"](**slack_env)
        # a bad plan name is refused by name before anything starts
        refused = cli("warmup", "start", IP, "--plan", "nope", check=False)
        assert refused.returncode == 1 and "'nope'" in refused.stderr
        started = json.loads(cli("warmup", "start", IP, "--plan", "sandbox", "--json").stdout)
        assert started["deployment"] == "ip-warmup/on-demand"
        asking = _until("start waiting", _warmup(engine, f"ip:{IP}/warmup-start"))
        (posted,) = slack.wait_for("chat.postMessage")
        text = json.dumps(posted.args)
        assert f"approval:{asking.approval_id}" in text
        assert "forward-confirmed" in text and "plan sandbox" in text  # the evidence
        # the control plane dies while the start waits: nothing is lost
        _until("no process holding it", lambda: flow_run_processes(flows.pid) == [], timeout=60)
        flows.kill_all()
        with session_scope(engine) as s:
            assert _state(s) == IpState.cold  # not before approval
        world["serve"](**slack_env)
        body = button_click(asking.approval_id, "approve", "U0BOB")
        answer = httpx.post(
            f"{control.url}/slack/interactivity", content=body, headers=sign(SECRET, body)
        )
        assert answer.status_code == 200
        cli("procedures", "sweep", "--json")
        done = _until("started", _warmup(engine, f"ip:{IP}/warmup-start", ProcedureState.FINISHED))
    finally:
        control.stop()
        slack.close()
    assert (done.outcome["outcome"], done.outcome["decided_by"]) == ("started", "bob")
    with session_scope(engine) as s:
        assert _state(s) == IpState.warming
    day0 = _now(world).date()
    assert _caps(engine, day0)["google"] == 20 and _caps(engine, day0)["microsoft"] == 10

    # Day 0: Gmail takes its whole cap; Yahoo starts deferring for rate; Microsoft its half.
    _signals(world, "google", 20)
    _signals(world, "yahoo", 18)
    _signals(world, "yahoo", 4, category="rate_limited")
    _signals(world, "microsoft", 10)  # its whole half-share cap: judged on the cap, green
    _next_day(world)
    plan = _plan(engine)
    assert plan.stages == {"*": 1, "google": 2, "yahoo": 1, "microsoft": 2}
    assert "rate-limited 4 of 22" in plan.held["yahoo"]
    day1 = _now(world).date()
    assert _caps(engine, day1)["google"] == 30 and _caps(engine, day1)["yahoo"] == 20
    # the run's artifact: the table, and Gmail's planned-against-sent chart
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["ip-warmup-status"]))
        )
    latest = max(artifacts, key=lambda a: a.created).data
    assert f"| ip:{IP} | sandbox | running | google | 2/7 | 30 |" in latest
    assert f"ip:{IP} google: planned" in latest and "█" in latest and "20/20" in latest
    status = json.loads(cli("warmup", "status", "--json").stdout)
    google = next(r for r in status if r["provider"] == "google")
    assert (google["stage"], google["cap"]) == (2, 30)
    assert google["signals"].startswith("green")

    # Day 1: a complaint spike at Gmail: the plan stops, a person is asked.
    _signals(world, "google", 1000)  # over the cap: the day's mail, from the events
    _signals(world, "google", 4, category="complaint", kind=EventKind.complaint)
    _next_day(world)
    assert _plan(engine).state == "review"
    review = _until("review waiting", _warmup(engine, f"ip:{IP}/warmup-review"))
    # carol may answer a review; the step back is the proposal (no comment)
    cli("approve", str(review.approval_id), "--as", "carol")
    cli("procedures", "sweep", "--json")
    reviewed = _until(
        "reviewed", _warmup(engine, f"ip:{IP}/warmup-review", ProcedureState.FINISHED)
    )
    assert reviewed.outcome["outcome"] == "step_back"
    plan = _plan(engine)
    assert plan.state == "running" and plan.stages["google"] == 1  # 2 back 2, floor 1
    assert _caps(engine, _now(world).date())["google"] == 20

    # Declaring it warm is a lead's: carol is refused with the reason, bob approves.
    cli("warmup", "complete", IP)
    complete = _until("complete waiting", _warmup(engine, f"ip:{IP}/warmup-complete"))
    no = cli("approve", str(complete.approval_id), "--as", "carol", check=False)
    assert no.returncode != 0 and "lead" in (no.stderr + no.stdout)
    cli("approve", str(complete.approval_id), "--as", "bob")
    cli("procedures", "sweep", "--json")
    _until("completed", _warmup(engine, f"ip:{IP}/warmup-complete", ProcedureState.FINISHED))
    with session_scope(engine) as s:
        assert _state(s) == IpState.active
        actions = [
            e.action
            for e in s.exec(select(AuditEntry).order_by(AuditEntry.id)).all()
            if e.action.startswith("warmup.")
        ]
    assert actions == [
        "warmup.start",
        "warmup.advance",
        "warmup.review",
        "warmup.step-back",
        "warmup.complete",
    ]
    assert _plan(engine).state == "done"


def test_an_ip_idle_for_thirty_days_goes_cold_and_rewarms_on_approval(world):  # noqa: F811
    engine, cli = world["engine"], world["cli"]
    _zone(world)
    _pool(engine, IpState.active, created_at=datetime.now(UTC) - timedelta(days=60))
    world["serve"]()
    cli("sandbox", "clock", "advance", "31d")
    run = run_deployment("ip-warmup/scheduled", timeout=180)
    assert run.state.is_completed()
    with session_scope(engine) as s:
        assert _state(s) == IpState.cold  # protected at once
    asking = _until("rewarm waiting", _warmup(engine, f"ip:{IP}/warmup-start"))
    assert asking.parameters["reason"] == "idle" and asking.parameters["plan"] == "rewarm"
    cli("approve", str(asking.approval_id), "--as", "carol")
    cli("procedures", "sweep", "--json")
    _until("rewarming", _warmup(engine, f"ip:{IP}/warmup-start", ProcedureState.FINISHED))
    plan = _plan(engine)
    assert (plan.schedule_id, plan.reason, plan.state) == ("rewarm", "idle", "running")
    caps = _caps(engine, _now(world).date())
    assert caps["google"] == 1882  # the re-warm plan's first stage

    # Back from a blocklist (what the delisting runbook asks): the re-warm plan by default.
    with session_scope(engine) as s:
        plan = s.get(WarmupPlan, plan.id)
        plan.state = "cancelled"
        s.add(plan)
        s.commit()
    cli("warmup", "start", IP, "--reason", "delisted")
    asking = _until("delisted rewarm waiting", _warmup(engine, f"ip:{IP}/warmup-start"))
    cli("approve", str(asking.approval_id), "--as", "carol")
    cli("procedures", "sweep", "--json")
    _until("rewarming again", _warmup(engine, f"ip:{IP}/warmup-start", ProcedureState.FINISHED))
    with session_scope(engine) as s:
        latest = s.exec(select(WarmupPlan).order_by(WarmupPlan.id.desc())).first()
    assert (latest.schedule_id, latest.reason) == ("rewarm", "delisted")

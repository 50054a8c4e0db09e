"""ApprovalDesk.decide: ordered checks with distinct refusals, the first answer wins, audited."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import col, select

from models import Approval, AuditEntry
from models.audit_trail import verify
from models.db import session_scope
from protocol.approvals import (
    AlreadyDecided,
    Answer,
    ApprovalDesk,
    ApprovalExpired,
    ApprovalNotFound,
    InvalidAnswer,
    NotAllowed,
    Refusal,
    Resumed,
    UnknownOperator,
)
from protocol.operators import add_operator
from runbooks.loader import checkpoints
from runbooks.schema_protocol import Checkpoint


@dataclass
class FakeResumer:
    result: Resumed = field(default_factory=lambda: Resumed(True, "ACCEPT"))
    calls: list[tuple[str, dict]] = field(default_factory=list)

    def __call__(self, flow_run_id: str, run_input: dict) -> Resumed:
        self.calls.append((flow_run_id, run_input))
        return self.result


class Clock:
    def __init__(self):
        self.now = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def resumer() -> FakeResumer:
    return FakeResumer()


@pytest.fixture
def desk(engine, clock, resumer) -> ApprovalDesk:
    with session_scope(engine) as s:
        add_operator(s, "alice", ["deliverability"], "U0ALICE")
        add_operator(s, "lena", ["lead"], None)
        add_operator(s, "carol", [], "U0CAROL")  # registered, no role: may answer nothing
        s.commit()
    return ApprovalDesk(engine, resume=resumer, clock=clock)


def open_approval(desk: ApprovalDesk, checkpoint: Checkpoint | None = None) -> Approval:
    runbook = checkpoints()
    return desk.open(
        checkpoint=checkpoint or runbook.spec.for_kind("stream.suspend"),
        subject="stream:acme/marketing",
        proposal={"action": "hold"},
        evidence={"queued": 12},
        runbook_id=runbook.id,
        runbook_version=runbook.version,
        flow_run_id="4b1f3f52-0000-4000-8000-000000000001",
    )


def audit_actions(desk: ApprovalDesk) -> list[tuple[str, str, dict]]:
    with session_scope(desk.engine) as s:
        rows = s.exec(select(AuditEntry).order_by(col(AuditEntry.id))).all()
        return [(r.actor, r.action, r.evidence) for r in rows if r.action.startswith("approval")]


def chain_ok(desk: ApprovalDesk) -> bool:
    with session_scope(desk.engine) as s:
        _, broken = verify(s)
    return broken is None


def test_first_valid_answer_is_recorded_audited_and_resumes_the_run(desk, resumer):
    approval = open_approval(desk)
    decided = desk.decide(
        Answer(approval.id, "approve", "cli", operator="alice", comment="complaints at 0.4%")
    )
    row = desk.get(approval.id)
    assert (row.state, row.decided_by, row.decided_via) == ("approved", "alice", "cli")
    assert row.comment == "complaints at 0.4%"
    assert decided.resumed == Resumed(True, "ACCEPT")
    assert resumer.calls == [
        (
            approval.flow_run_id,
            {"decision": "approve", "operator": "alice", "comment": "complaints at 0.4%"},
        )
    ]
    actions = audit_actions(desk)
    assert [a[1] for a in actions] == ["approval.requested", "approval.approved"]
    assert actions[1][0] == "operator:alice"
    assert actions[1][2]["via"] == "cli"
    assert chain_ok(desk)


def test_slack_identity_is_the_verified_user_id_not_a_name(desk):
    approval = open_approval(desk)
    desk.decide(Answer(approval.id, "reject", "slack", slack_user_id="U0ALICE"))
    row = desk.get(approval.id)
    assert (row.state, row.decided_by, row.decided_via) == ("rejected", "alice", "slack")


@pytest.mark.parametrize(
    ("answer", "refusal", "actor"),
    [
        (dict(verdict="approve", via="cli", operator="mallory"), UnknownOperator, "cli:mallory"),
        (
            dict(verdict="approve", via="slack", slack_user_id="U0NOBODY"),
            UnknownOperator,
            "slack:U0NOBODY",
        ),
        (dict(verdict="approve", via="slack", slack_user_id="U0CAROL"), NotAllowed, None),
        (dict(verdict="approve", via="prefect-ui", operator="carol"), NotAllowed, None),
        (dict(verdict="maybe", via="cli", operator="alice"), InvalidAnswer, "cli:alice"),
        (
            dict(verdict="approve", via="cli", operator="alice", comment="x" * 2001),
            InvalidAnswer,
            None,
        ),
    ],
)
def test_refusals_are_distinct_audited_and_change_nothing(desk, resumer, answer, refusal, actor):
    approval = open_approval(desk)
    with pytest.raises(refusal) as raised:
        desk.decide(Answer(approval.id, **answer))
    assert desk.get(approval.id).state == "pending"
    assert resumer.calls == []
    last = audit_actions(desk)[-1]
    assert last[1] == "approval.refused"
    assert last[2]["reason"] == raised.value.reason
    assert last[2]["via"] == answer["via"]
    if actor:
        assert last[0] == actor
    assert chain_ok(desk)


def test_unknown_approval_is_refused(desk):
    with pytest.raises(ApprovalNotFound):
        desk.decide(Answer(999, "approve", "cli", operator="alice"))
    assert audit_actions(desk)[-1][2]["reason"] == "not_found"


def test_a_role_this_kind_does_not_allow_is_refused(desk):
    only_leads = Checkpoint(
        kind="stream.suspend", title="t", roles=["lead"], ttl_seconds=600, safe_default="do_nothing"
    )
    approval = open_approval(desk, only_leads)
    with pytest.raises(NotAllowed, match="needs one of \\[lead\\]"):
        desk.decide(Answer(approval.id, "approve", "cli", operator="alice"))
    desk.decide(Answer(approval.id, "approve", "cli", operator="lena"))
    assert desk.get(approval.id).decided_by == "lena"


def test_second_answer_is_refused_and_the_first_stands(desk, resumer):
    approval = open_approval(desk)
    desk.decide(Answer(approval.id, "approve", "slack", slack_user_id="U0ALICE"))
    with pytest.raises(AlreadyDecided, match="approved by alice via slack"):
        desk.decide(Answer(approval.id, "reject", "cli", operator="lena"))
    row = desk.get(approval.id)
    assert (row.state, row.decided_by) == ("approved", "alice")
    assert len(resumer.calls) == 1
    assert audit_actions(desk)[-1][2]["reason"] == "already_decided"


def test_answer_after_expiry_is_refused_even_before_the_row_is_expired(desk, clock):
    approval = open_approval(desk)
    clock.now += timedelta(seconds=3600)  # the declared ttl
    with pytest.raises(ApprovalExpired):
        desk.decide(Answer(approval.id, "approve", "cli", operator="alice"))
    assert desk.get(approval.id).state == "pending"
    desk.expire(approval.id)
    with pytest.raises(ApprovalExpired):
        desk.decide(Answer(approval.id, "approve", "slack", slack_user_id="U0ALICE"))


def test_checks_run_in_order_pending_then_identity_then_role_then_validity(desk, clock):
    approval = open_approval(desk)
    # A nobody with a nonsense verdict on an expired request hears "expired" first…
    clock.now += timedelta(hours=2)
    with pytest.raises(ApprovalExpired):
        desk.decide(Answer(approval.id, "maybe", "cli", operator="mallory"))
    clock.now -= timedelta(hours=2)
    # …then who they are, then whether they may, and only then whether the answer is valid.
    with pytest.raises(UnknownOperator):
        desk.decide(Answer(approval.id, "maybe", "cli", operator="mallory"))
    with pytest.raises(NotAllowed):
        desk.decide(Answer(approval.id, "maybe", "cli", operator="carol"))
    with pytest.raises(InvalidAnswer):
        desk.decide(Answer(approval.id, "maybe", "cli", operator="alice"))


def test_concurrent_answers_exactly_one_wins(desk, resumer):
    approval = open_approval(desk)
    start = threading.Barrier(6)
    outcomes: list[str] = []

    def answer(i: int) -> None:
        start.wait()
        try:
            desk.decide(
                Answer(approval.id, "approve" if i % 2 else "reject", "cli", operator="alice")
            )
            outcomes.append("won")
        except Refusal as refusal:
            outcomes.append(refusal.reason)

    threads = [threading.Thread(target=answer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["already_decided"] * 5 + ["won"]
    assert len(resumer.calls) == 1
    decided = [a for a in audit_actions(desk) if a[1] in ("approval.approved", "approval.rejected")]
    assert len(decided) == 1
    assert chain_ok(desk)


def test_expiry_takes_the_safe_default_once(desk, clock, resumer):
    approval = open_approval(desk)
    assert desk.expire(approval.id).state == "pending"  # not due yet: left alone
    clock.now += timedelta(seconds=3600)
    expired = desk.expire(approval.id)
    assert (expired.state, expired.decided_via) == ("expired", "expiry")
    assert desk.expire(approval.id).state == "expired"
    entries = [a for a in audit_actions(desk) if a[1] == "approval.expired"]
    assert len(entries) == 1
    assert entries[0][0] == "checkpoint:expiry"
    assert entries[0][2]["safe_default"] == "do_nothing_and_escalate"
    desk.expire_and_wake(approval.id)
    assert resumer.calls[-1][0] == approval.flow_run_id


def test_expiry_leaves_a_decided_row_alone(desk, clock):
    approval = open_approval(desk)
    desk.decide(Answer(approval.id, "reject", "cli", operator="alice"))
    clock.now += timedelta(hours=2)
    assert desk.expire(approval.id).state == "rejected"
    assert not [a for a in audit_actions(desk) if a[1] == "approval.expired"]


def test_a_refused_resume_keeps_the_decision_and_is_audited(desk, resumer):
    resumer.result = Resumed(False, "ABORT", "Cannot resume a flow run that is not paused.")
    approval = open_approval(desk)
    decided = desk.decide(Answer(approval.id, "approve", "cli", operator="alice"))
    assert not decided.resumed.accepted
    assert desk.get(approval.id).state == "approved"
    last = audit_actions(desk)[-1]
    assert last[1] == "approval.resume_failed"
    assert last[2] == {"status": "ABORT", "reason": "Cannot resume a flow run that is not paused."}


def test_pending_lists_only_open_requests_soonest_first(desk):
    first, second = open_approval(desk), open_approval(desk)
    desk.decide(Answer(first.id, "approve", "cli", operator="alice"))
    assert [a.id for a in desk.pending()] == [second.id]
    with session_scope(desk.engine) as s:
        assert s.exec(select(Approval)).all()  # rows are kept, not deleted


def test_a_checkpoint_never_defaults_to_approval_and_needs_time_to_be_answered(desk):
    runbook = checkpoints()
    common = dict(
        checkpoint=runbook.spec.for_kind("stream.suspend"),
        subject="stream:acme/marketing",
        proposal={},
        evidence={},
        runbook_id=runbook.id,
        runbook_version=runbook.version,
        flow_run_id=None,
    )
    with pytest.raises(ValueError, match="safe default 'approve'"):
        desk.open(**common, safe_default="approve")
    with pytest.raises(ValueError, match="ttl must be positive"):
        desk.open(**common, ttl=timedelta(0))


def test_an_early_expiry_timer_waits_until_due_then_wakes_the_run(desk, clock, resumer):
    approval = open_approval(desk)
    clock.now += timedelta(seconds=3599.98)  # a timer firing 20 ms early
    timer = threading.Thread(target=desk.expire_and_wake, args=(approval.id,))
    timer.start()
    time.sleep(0.2)
    assert desk.get(approval.id).state == "pending" and resumer.calls == []
    clock.now += timedelta(seconds=1)
    timer.join(5)
    assert not timer.is_alive()
    assert desk.get(approval.id).state == "expired"
    assert resumer.calls[0][0] == approval.flow_run_id


def test_a_decision_whose_resume_was_lost_reaches_the_run_at_expiry(desk, clock, resumer):
    resumer.result = Resumed(False, "unreachable", "ConnectError: Prefect is down")
    approval = open_approval(desk)
    desk.decide(Answer(approval.id, "approve", "cli", operator="alice"))
    resumer.result = Resumed(True, "ACCEPT")
    clock.now += timedelta(seconds=3600)
    desk.expire_and_wake(approval.id)
    assert desk.get(approval.id).state == "approved"  # the answer stands; nothing expired
    assert [run for run, _ in resumer.calls] == [approval.flow_run_id] * 2

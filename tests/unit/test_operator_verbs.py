"""The operator verbs' services: each changes its state, audits it under operator-verbs, refuses
what it must, and wakes exactly the mail the lifted state postponed."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert
from sqlmodel import col, select

from config.clock import SystemClock
from flows.suspend_stream import hold_stream, read_stream
from models import (
    AuditEntry,
    IpAddress,
    IpState,
    Message,
    Recipient,
    RecipientState,
    Suspension,
    Tenant,
)
from models.audit import as_utc
from models.db import session_scope
from protocol import egress, operators, suspensions, tenants
from protocol.errors import ServiceError
from protocol.verbs import Act, by_flow, by_operator
from relay.delivery.egress import Egress
from relay.spool.claims import TENANT_PAUSED_WAIT, load_messages
from relay.spool.writer import SpoolEntry, new_queue_id, spool_rows
from relay.submission.auth import CredentialCache
from relay.submission.keystore import KeyBox
from relay.submission.policy import WOULD_WAIT, PolicyStore
from runbooks.loader import operator_verbs

NOW = datetime.now(UTC).replace(microsecond=0)
LATER = NOW + timedelta(minutes=5)
WAKE = NOW + timedelta(seconds=operator_verbs().spec.wake_after_seconds)


@pytest.fixture
def acme(engine) -> int:
    with session_scope(engine) as s:
        egress.ensure_default_pool(s)
        tenant = tenants.add_tenant(s, "acme")
        tenants.add_tenant(s, "other")
        operators.add_operator(s, "alice", ["deliverability"], None)
        operators.add_operator(s, "bob", ["lead"], None)
        s.commit()
        return tenant.id


def spool(engine, tenant_id: int, stream: str, replies: list[str | None]) -> list[int]:
    """One message with a recipient per reply: due in 5 minutes with that last_reply."""
    queue_id = new_queue_id()
    rcpts = [f"r{i}@gmail.com" for i in range(len(replies))]
    entry = SpoolEntry(
        queue_id, tenant_id, stream, "shop@acme.example", rcpts, "acme.example", "", b"x", "", None
    )
    messages, rows = spool_rows([entry])
    with engine.begin() as conn:
        conn.execute(insert(Message), messages)
        conn.execute(insert(Recipient), rows)
    with session_scope(engine) as s:
        found = s.exec(select(Recipient).where(Recipient.message_id == queue_id)).all()
        for r, reply in zip(sorted(found, key=lambda r: r.id), replies, strict=True):
            r.next_attempt_at, r.last_reply = LATER, reply
            s.add(r)
        s.commit()
        return [r.id for r in sorted(found, key=lambda r: r.id)]


def due(engine, recipient_ids: list[int]) -> list[datetime]:
    with session_scope(engine) as s:
        rows = s.exec(
            select(Recipient).where(col(Recipient.id).in_(recipient_ids)).order_by(Recipient.id)
        ).all()
        return [as_utc(r.next_attempt_at) for r in rows]


def entries(engine, action: str) -> list[AuditEntry]:
    with session_scope(engine) as s:
        return list(s.exec(select(AuditEntry).where(AuditEntry.action == action)).all())


def act_as(engine, name: str, verb: str, subject: str = "x"):
    with session_scope(engine) as s:
        return by_operator(s, name, verb, subject, "because", NOW)


# --- who may ---
def test_an_unknown_operator_is_refused_and_the_refusal_is_audited(engine, acme):
    with pytest.raises(ServiceError, match="mallory is not a registered operator"):
        act_as(engine, "mallory", "tenant.pause", "tenant:acme")
    (refused,) = entries(engine, "tenant.pause.refused")
    assert (refused.actor, refused.subject) == ("operator:mallory", "tenant:acme")
    assert (refused.runbook_id, refused.runbook_version) == ("operator-verbs", "1.0")


def test_retiring_an_ip_is_the_leads_and_pausing_deliverabilitys(engine, acme):
    with pytest.raises(ServiceError, match=r"holds roles \[deliverability\]; ip.retire needs"):
        act_as(engine, "alice", "ip.retire")
    assert act_as(engine, "bob", "ip.retire").actor == "operator:bob"
    assert act_as(engine, "alice", "tenant.pause").actor == "operator:alice"
    with pytest.raises(ServiceError, match="--reason must say why"), session_scope(engine) as s:
        by_operator(s, "alice", "tenant.pause", "tenant:acme", " ", NOW)


# --- pause and resume ---
def test_pause_holds_the_tenants_mail_and_resume_wakes_only_what_the_pause_held(engine, acme):
    alice = Act("operator:alice", "complaints spike", NOW)
    paused, deferred, held = spool(
        engine, acme, "transactional", [TENANT_PAUSED_WAIT, "451 4.7.1 try later", None]
    )
    other_id = _tenant_id(engine, "other")
    (others,) = spool(engine, other_id, "transactional", [TENANT_PAUSED_WAIT])
    with session_scope(engine) as s:
        tenants.pause_tenant(s, "acme", alice)
        s.commit()
    messages = load_messages(engine, {_message_of(engine, paused)})
    assert [m.tenant_paused for m in messages.values()] == [True]
    with session_scope(engine) as s, pytest.raises(ServiceError, match="already paused"):
        tenants.pause_tenant(s, "acme", alice)

    with session_scope(engine) as s:
        _, woken = tenants.resume_tenant(s, "acme", alice)
        s.commit()
    assert woken == 1
    assert due(engine, [paused, deferred, held, others]) == [WAKE, LATER, LATER, LATER]
    (pause,) = entries(engine, "tenant.pause")
    (resume,) = entries(engine, "tenant.resume")
    assert pause.evidence == {"reason": "complaints spike", "queued_recipients": 3}
    assert resume.evidence["woken"] == 1
    assert (resume.actor, resume.runbook_id) == ("operator:alice", "operator-verbs")
    with session_scope(engine) as s, pytest.raises(ServiceError, match="is not paused"):
        tenants.resume_tenant(s, "acme", alice)


def test_the_policy_store_answers_a_pause_from_its_cache(engine, acme):
    secret = KeyBox.generate()
    policy = PolicyStore(engine, KeyBox(secret), CredentialCache(secret, 60), ttl=0.2)
    assert policy.tenant_paused(acme, without_waiting=True) is WOULD_WAIT
    assert policy.tenant_paused(acme) is False
    with session_scope(engine) as s:
        tenants.pause_tenant(s, "acme", Act("operator:alice", "test", NOW))
        s.commit()
    assert policy.tenant_paused(acme, without_waiting=True) is False  # cached, until the ttl
    time.sleep(0.25)
    assert policy.tenant_paused(acme) is True
    assert policy.tenant_paused(acme, without_waiting=True) is True
    assert policy.tenant_paused(_tenant_id(engine, "other"), without_waiting=True) is False


# --- release a held stream ---
def test_release_returns_a_held_stream_to_the_pool_the_hold_left_and_wakes_it(engine, acme, db_url):
    with session_scope(engine) as s:
        hold_stream(s, read_stream(s, "acme", "news"), 3, "bob", "traps", actor="flow:test")
        s.commit()
    waiting, bounced_later = spool(
        engine, acme, "news", ["waiting: pool hold has no IP addresses", "421 4.7.0 slow down"]
    )
    (other_stream,) = spool(engine, acme, "transactional", ["waiting: something else"])
    with session_scope(engine) as s:
        _, pool, fallback, woken = egress.release_stream(
            s, "acme", "news", by_flow("run-1", "traps gone", NOW, 9, "bob")
        )
        s.commit()
    assert (pool, fallback, woken) == ("default", None, 1)
    assert due(engine, [waiting, bounced_later, other_stream]) == [WAKE, LATER, LATER]
    choice = Egress(engine, SystemClock(), ttl=0).choose(acme, "news", "gmail")
    assert choice.source is not None and choice.source.address == "127.0.0.1"
    (entry,) = entries(engine, "stream.release")
    assert entry.actor == "flow:run-1"
    assert entry.evidence["pool_from"].endswith("(stream.suspend)")
    assert (entry.evidence["approval_id"], entry.evidence["approved_by"]) == (9, "bob")
    with session_scope(engine) as s, pytest.raises(ServiceError, match="is not held"):
        egress.release_stream(s, "acme", "news", by_flow("run-2", "again", NOW, 10, "bob"))


def test_release_to_an_explicit_pool_and_never_to_hold(engine, acme):
    with session_scope(engine) as s:
        egress.add_pool(s, "hold", "shared")
        egress.add_pool(s, "bulk", "shared")
        egress.set_stream(s, "acme", "news", "hold", None)  # held by hand: no audit of a hold
        s.commit()
    act = Act("operator:alice", "by hand", NOW)
    with session_scope(engine) as s, pytest.raises(ServiceError, match="say which with --pool"):
        egress.release_stream(s, "acme", "news", act)
    with session_scope(engine) as s, pytest.raises(ServiceError, match="would keep the stream"):
        egress.release_stream(s, "acme", "news", act, "hold")
    with session_scope(engine) as s:
        assert egress.release_stream(s, "acme", "news", act, "bulk")[1] == "bulk"
        s.commit()


# --- suspensions ---
def _suspend(engine, provider: str, hours: float = 2, action: str = "suspend") -> int:
    with session_scope(engine) as s:
        row = Suspension(
            source_ip="127.0.0.1",
            provider=provider,
            action=action,
            limit_per_minute=10 if action == "throttle" else None,
            reason="421 storm",
            rule_id="storm",
            expires_at=NOW + timedelta(hours=hours),
        )
        s.add(row)
        s.commit()
        return row.id


def test_lifting_a_suspension_sends_again_and_wakes_only_its_mail(engine, acme):
    sid = _suspend(engine, "gmail")
    _suspend(engine, "yahoo")
    egress_view = Egress(engine, SystemClock(), ttl=0)
    assert egress_view.choose(acme, "transactional", "gmail").source is None
    ours, yahoo = spool(
        engine,
        acme,
        "transactional",
        [
            "waiting: 127.0.0.1 suspended for gmail until 11:00:00Z",
            "waiting: 127.0.0.1 suspended for yahoo until 11:00:00Z",
        ],
    )
    later = as_utc(NOW + timedelta(hours=2))
    with session_scope(engine) as s:
        for r in s.exec(select(Recipient).where(col(Recipient.id).in_([ours, yahoo]))).all():
            r.next_attempt_at = later
            s.add(r)
        s.commit()
    with session_scope(engine) as s:
        _, woken = suspensions.lift_suspension(s, sid, Act("operator:alice", "fixed", NOW))
        s.commit()
    assert woken == 1
    assert due(engine, [ours, yahoo]) == [WAKE, later]
    assert egress_view.choose(acme, "transactional", "gmail").source is not None
    assert egress_view.choose(acme, "transactional", "yahoo").source is None
    with session_scope(engine) as s:
        assert [r.provider for r in suspensions.active_suspensions(s, NOW)] == ["yahoo"]
    (entry,) = entries(engine, "suspension.lift")
    assert entry.subject == "path:127.0.0.1/gmail"
    assert entry.evidence["why_suspended"] == "421 storm"
    with session_scope(engine) as s, pytest.raises(ServiceError, match="already ended"):
        suspensions.lift_suspension(s, sid, Act("operator:alice", "again", NOW))


def test_lifting_a_throttle_wakes_the_mail_its_pacing_postponed(engine, acme):
    sid = _suspend(engine, "gmail", action="throttle")
    (paced,) = spool(engine, acme, "transactional", ["paced: gmail via 127.0.0.1"])
    with session_scope(engine) as s:
        assert suspensions.lift_suspension(s, sid, Act("operator:alice", "ok", NOW))[1] == 1
        s.commit()
    assert due(engine, [paced]) == [WAKE]


def test_shortening_moves_the_expiry_and_the_mail_it_held(engine, acme):
    sid = _suspend(engine, "gmail", hours=2)
    (ours,) = spool(engine, acme, "transactional", ["waiting: 127.0.0.1 suspended for gmail until"])
    with session_scope(engine) as s:
        r = s.get(Recipient, ours)
        r.next_attempt_at = NOW + timedelta(hours=2)
        s.add(r)
        s.commit()
    act = Act("operator:alice", "recovering", NOW)
    until = NOW + timedelta(minutes=30)
    with session_scope(engine) as s:
        for bad, why in (
            (NOW - timedelta(minutes=1), "not in the future"),
            (NOW + timedelta(hours=3), "shortening cannot move it"),
        ):
            with pytest.raises(ServiceError, match=why):
                suspensions.shorten_suspension(s, sid, bad, act)
        _, woken = suspensions.shorten_suspension(s, sid, until, act)
        s.commit()
    assert woken == 1
    assert due(engine, [ours]) == [until]
    with session_scope(engine) as s:
        assert as_utc(s.get(Suspension, sid).expires_at) == until
    assert entries(engine, "suspension.shorten")[0].evidence["until"] == until.isoformat()


# --- retire and reinstate ---
def test_retire_then_reinstate_returns_the_ip_to_its_previous_state(engine, acme):
    act = Act("operator:bob", "listed at Spamhaus", NOW)
    with session_scope(engine) as s:
        ip = s.exec(select(IpAddress)).one()
        ip.state = IpState.warming
        s.add(ip)
        s.commit()
        egress.retire_ip(s, "127.0.0.1", act)
        s.commit()
        with pytest.raises(ServiceError, match="already retired"):
            egress.retire_ip(s, "127.0.0.1", act)
    assert (
        Egress(engine, SystemClock(), ttl=0).choose(acme, "transactional", "gmail").source is None
    )
    (waiting,) = spool(engine, acme, "transactional", ["waiting: no usable source IP"])
    with session_scope(engine) as s:
        ip, woken = egress.reinstate_ip(s, "127.0.0.1", act)
        s.commit()
        assert (ip.state, woken) == (IpState.warming, 1)
    assert due(engine, [waiting]) == [WAKE]
    (retire,) = entries(engine, "ip.retire")
    assert retire.evidence["from_state"] == "warming"
    assert retire.evidence["pool_sending_addresses_left"] == []
    (reinstate,) = entries(engine, "ip.reinstate")
    assert reinstate.evidence["to_state"] == "warming"
    with session_scope(engine) as s, pytest.raises(ServiceError, match="is not retired"):
        egress.reinstate_ip(s, "127.0.0.1", act)


def test_an_ip_retired_without_a_record_is_reinstated_cold(engine, acme):
    with session_scope(engine) as s:
        ip = s.exec(select(IpAddress)).one()
        ip.state = IpState.retired
        s.add(ip)
        s.commit()
        ip, _ = egress.reinstate_ip(s, "127.0.0.1", Act("operator:bob", "back", NOW))
        s.commit()
        assert ip.state == IpState.cold
    with session_scope(engine) as s, pytest.raises(ServiceError, match="not in any pool"):
        egress.retire_ip(s, "10.9.9.9", Act("operator:bob", "x", NOW))


def _tenant_id(engine, name: str) -> int:
    with session_scope(engine) as s:
        return s.exec(select(Tenant.id).where(Tenant.name == name)).one()


def _message_of(engine, recipient_id: int) -> str:
    with session_scope(engine) as s:
        return s.get(Recipient, recipient_id).message_id


def test_recipient_states_are_untouched_by_a_wake(engine, acme):
    (rid,) = spool(engine, acme, "transactional", [TENANT_PAUSED_WAIT])
    with session_scope(engine) as s:
        r = s.get(Recipient, rid)
        r.state = RecipientState.delivered
        s.add(r)
        s.commit()
        tenants.pause_tenant(s, "acme", Act("operator:alice", "x", NOW))
        s.commit()
        assert tenants.resume_tenant(s, "acme", Act("operator:alice", "x", NOW))[1] == 0


def test_every_verb_flow_is_deployed_with_a_form_whose_fields_explain_themselves():
    from flows.deployments import deployments

    verbs = {v.flow: v for v in operator_verbs().spec.verbs}
    deployed = {d.flow_name: d for d in deployments()}
    assert set(verbs) <= set(deployed)
    for name in verbs:
        fields = deployed[name]._parameter_openapi_schema.properties
        assert "reason" in fields
        assert all(field.get("description") for field in fields.values()), name

"""DKIM keys over their life (protocol/domains.py, protocol/dkim_rotation.py), on SQLite and
PostgreSQL: selectors never repeat, the schedule finds exactly the domains that are due, the
switch keeps the old keys published for the overlap, a withdrawn rotation leaves the old keys
signing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from models import DkimKey, Tenant
from protocol import dkim_rotation, domains, tenants
from protocol.errors import ServiceError
from relay.submission.keystore import KeyBox
from runbooks.loader import dkim_rotation as rules

NOW = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)
AUDIT = ("dkim-rotation", "1.0")
KEYBOX = KeyBox(KeyBox.generate())
AFTER = rules().spec.rotate_after_days


def _domain(session, name: str, *, active_since: datetime | None) -> None:
    if session.exec(select(Tenant)).first() is None:
        tenants.add_tenant(session, "acme")
    domains.add_domain(session, KEYBOX, "acme", name, now=active_since or NOW)
    if active_since is not None:
        domains.mark_domain_active(session, name, "tests", "fixture", now=active_since)
    session.commit()


def _states(session, name: str) -> dict[str, str]:
    domain = domains.get_domain(session, name)
    keys = session.exec(select(DkimKey).where(DkimKey.domain_id == domain.id)).all()
    return {k.selector: str(k.state) for k in keys}


def test_selectors_carry_the_date_and_a_counter_and_never_repeat(session):
    _domain(session, "shop.example", active_since=NOW)
    first = set(_states(session, "shop.example"))
    assert first == {"axrsa20261206n1", "axed2551920261206n1"}
    domain = domains.get_domain(session, "shop.example")
    again = {k.selector for k in domains.new_keys(session, KEYBOX, domain, now=NOW)}
    assert again == {"axrsa20261206n2", "axed2551920261206n2"}
    later = domains.new_keys(session, KEYBOX, domain, now=NOW + timedelta(days=1))
    assert {k.selector for k in later} == {"axrsa20261207n1", "axed2551920261207n1"}
    session.commit()
    # and the database refuses a repeated selector whoever writes it
    session.add(
        DkimKey(
            domain_id=domain.id,
            selector="axrsa20261206n1",
            algorithm="rsa",
            private_key_encrypted=b"x",
            public_key="x",
        )
    )
    with pytest.raises(IntegrityError):
        session.commit()


@pytest.mark.parametrize(
    ("age_days", "due"),
    [(AFTER - 1, False), (AFTER, True), (AFTER + 30, True)],
)
def test_the_schedule_finds_active_domains_whose_keys_signed_for_the_period(session, age_days, due):
    _domain(session, "old.example", active_since=NOW - timedelta(days=age_days))
    _domain(session, "pending.example", active_since=None)  # never rotated: not active
    found = dkim_rotation.due(session, now=NOW, rotate_after_days=AFTER, limit=10)
    assert found == (["old.example"] if due else [])


def test_a_domain_with_a_rotation_under_way_is_not_started_again(session):
    _domain(session, "old.example", active_since=NOW - timedelta(days=AFTER + 1))
    dkim_rotation.begin(session, KEYBOX, "old.example", now=NOW, actor="t", runbook=AUDIT)
    session.commit()
    assert dkim_rotation.due(session, now=NOW, rotate_after_days=AFTER, limit=10) == []


def test_the_limit_bounds_one_scheduled_run(session):
    for n in range(3):
        _domain(session, f"d{n}.example", active_since=NOW - timedelta(days=AFTER))
    assert dkim_rotation.due(session, now=NOW, rotate_after_days=AFTER, limit=2) == [
        "d0.example",
        "d1.example",
    ]


def test_switch_overlap_and_retire(session):
    _domain(session, "shop.example", active_since=NOW - timedelta(days=AFTER))
    begun = dkim_rotation.begin(session, KEYBOX, "shop.example", now=NOW, actor="t", runbook=AUDIT)
    # begun twice (a run started again before its step was recorded): the same new keys
    assert (
        dkim_rotation.begin(session, KEYBOX, "shop.example", now=NOW, actor="t", runbook=AUDIT)
        == begun
    )
    switched = dkim_rotation.switch(
        session,
        "shop.example",
        begun["new"],
        now=NOW,
        overlap_days=7,
        actor="t",
        runbook=AUDIT,
        approval_id=1,
        approved_by="carol",
    )
    session.commit()
    states = _states(session, "shop.example")
    assert {states[s] for s in begun["new"]} == {"active"}
    assert {states[s] for s in begun["old"]} == {"retiring"}
    assert switched["retire_at"] == (NOW + timedelta(days=7)).isoformat()
    # retiring keys are still published, not signing
    published = {
        r.name.split(".")[0]
        for r in domains.domain_records(session, "shop.example", "r")
        if r.kind == "dkim"
    }
    assert published == set(begun["new"]) | set(begun["old"])
    early = dkim_rotation.retire(
        session,
        "shop.example",
        now=NOW + timedelta(days=7) - timedelta(seconds=1),
        actor="t",
        runbook=AUDIT,
    )
    assert early["retired"] == []
    done = dkim_rotation.retire(
        session, "shop.example", now=NOW + timedelta(days=7), actor="t", runbook=AUDIT
    )
    session.commit()
    assert set(done["retired"]) == set(begun["old"])
    assert {r["name"] for r in done["records"]} == {
        f"{s}._domainkey.shop.example" for s in begun["old"]
    }
    assert set(_states(session, "shop.example").values()) == {"active", "retired"}


def test_a_withdrawn_rotation_leaves_the_old_keys_signing(session):
    _domain(session, "shop.example", active_since=NOW - timedelta(days=AFTER))
    begun = dkim_rotation.begin(session, KEYBOX, "shop.example", now=NOW, actor="t", runbook=AUDIT)
    dkim_rotation.withdraw(
        session, "shop.example", begun["new"], now=NOW, actor="t", why="rejected", runbook=AUDIT
    )
    session.commit()
    states = _states(session, "shop.example")
    assert {states[s] for s in begun["old"]} == {"active"}
    assert {states[s] for s in begun["new"]} == {"retired"}
    with pytest.raises(ServiceError, match="no longer pending"):
        dkim_rotation.switch(
            session,
            "shop.example",
            begun["new"],
            now=NOW,
            overlap_days=7,
            actor="t",
            runbook=AUDIT,
            approval_id=1,
            approved_by="carol",
        )


def test_only_active_domains_rotate(session):
    _domain(session, "pending.example", active_since=None)
    with pytest.raises(ServiceError, match="only active domains rotate"):
        dkim_rotation.begin(session, KEYBOX, "pending.example", now=NOW, actor="t", runbook=AUDIT)

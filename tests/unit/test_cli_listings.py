"""Listings say when they are cut, ids stay whole in an 80-column terminal, and `axiom domain
activate` accepts only an operator whose role may activate a domain."""

from __future__ import annotations

import json
import re

import pytest
from sqlmodel import select

from models import AuditEntry, Message, Recipient, Tenant
from models.db import make_engine, session_scope
from protocol.egress import add_pool
from relay.spool.writer import new_queue_id
from testbed.axiom import seed_tenant

NARROW = {"COLUMNS": "80"}

# the axiom CLI as a subprocess: `make test`, not test-fast
pytestmark = pytest.mark.integration


def _spool(home, count: int, step: float = 1.0) -> list[str]:
    """`count` one-recipient messages with long addresses and replies, as delivery leaves them."""
    engine = make_engine(home.db_url)
    ids = []
    try:
        with session_scope(engine) as s:
            tenant = s.exec(select(Tenant)).one()
            for n in range(count):
                queue_id = new_queue_id(now=1_800_000_000 + n * step)  # time-ordered
                s.add(
                    Message(
                        id=queue_id,
                        tenant_id=tenant.id,
                        mail_from="shop@acme.example",
                        data=b"Subject: hi\r\n\r\nhello\r\n",
                        size=24,
                        header_from_domain="acme.example",
                        message_id_header=f"<{n}@acme.example>",
                        client_address="127.0.0.1",
                    )
                )
                s.flush()
                s.add(
                    Recipient(
                        message_id=queue_id,
                        address=f"a.rather.long.mailbox.name.{n}@gmail.com",
                        domain="gmail.com",
                        last_reply="421 4.7.28 Our system has detected an unusual rate of mail",
                    )
                )
                ids.append(queue_id)
            s.commit()
    finally:
        engine.dispose()
    return ids


def test_queue_says_when_it_is_cut_and_every_id_fits_whole(axiom_home):
    seed_tenant(axiom_home, "acme", "acme.example")
    ids = _spool(axiom_home, 105)
    listed = axiom_home.cli("queue", extra_env=NARROW).stdout
    assert max(len(line) for line in listed.splitlines()) <= 80
    shown = re.findall(r"\b[0-9A-HJKMNP-TV-Z]{26}\b", listed)
    assert shown == list(reversed(ids))[:100]  # newest first, none ellipsized
    assert listed.rstrip().endswith("showing 100 of 105 recipients; --limit N for more")
    everything = axiom_home.cli("queue", "--limit", "200", extra_env=NARROW).stdout
    assert len(re.findall(r"\b[0-9A-HJKMNP-TV-Z]{26}\b", everything)) == 105
    assert "showing" not in everything


def test_queue_json_stays_a_list_and_says_on_stderr_that_it_is_cut(axiom_home):
    seed_tenant(axiom_home, "acme", "acme.example")
    _spool(axiom_home, 3)
    result = axiom_home.cli("queue", "--json", "--limit", "2")
    assert [row["to"] for row in json.loads(result.stdout)] == [
        "a.rather.long.mailbox.name.2@gmail.com",
        "a.rather.long.mailbox.name.1@gmail.com",
    ]
    assert result.stderr.strip() == "showing 2 of 3 recipients; --limit N for more"
    assert axiom_home.cli("queue", "--json").stderr == ""


def test_queue_show_takes_a_unique_prefix(axiom_home):
    seed_tenant(axiom_home, "acme", "acme.example")
    # In one millisecond: the first 10 characters (the timestamp) are the same.
    first, second = _spool(axiom_home, 2, step=0)
    assert first[:10] == second[:10] and first != second
    shown = axiom_home.cli("queue", "show", first[:12].lower() + first[12:]).stdout
    assert shown.startswith(f"*** ENVELOPE RECORDS {first} ***\n")
    unique = next(n for n in range(10, 27) if first[:n] != second[:n])
    shown = axiom_home.cli("queue", "show", first[:unique]).stdout
    assert shown.startswith(f"*** ENVELOPE RECORDS {first} ***\n")
    ambiguous = axiom_home.cli("queue", "show", first[:10], check=False)
    assert ambiguous.returncode == 1
    assert f"queue id prefix '{first[:10]}' matches more than one message" in ambiguous.stderr
    short = axiom_home.cli("queue", "show", first[:4], check=False)
    assert short.returncode == 1
    assert "a prefix needs at least 6 characters" in short.stderr


def test_audit_says_when_it_is_cut(axiom_home):
    engine = make_engine(axiom_home.db_url)
    with session_scope(engine) as s:
        for n in range(55):
            add_pool(s, f"pool-{n}", "shared")
        s.commit()
    engine.dispose()
    with_pools = 56  # and the default pool `axiom init` made
    listed = axiom_home.cli("audit", extra_env=NARROW).stdout
    assert f"audit ({with_pools} entries)" in listed
    assert listed.rstrip().endswith(f"showing 50 of {with_pools} entries; --limit N for more")
    assert "showing" not in axiom_home.cli("audit", "--limit", "60").stdout


def _activation_entries(home) -> list[AuditEntry]:
    engine = make_engine(home.db_url)
    try:
        with session_scope(engine) as s:
            return list(
                s.exec(select(AuditEntry).where(AuditEntry.subject == "domain:acme.example"))
            )
    finally:
        engine.dispose()


def test_domain_activation_needs_a_registered_operator_with_the_role(axiom_home):
    seed_tenant(axiom_home, "acme", "acme.example", activate=False)
    activate = ("domain", "activate", "acme.example", "--reason", "records checked")
    stranger = axiom_home.cli(*activate, "--as", "mallory", check=False)
    assert stranger.returncode == 1
    assert stranger.stderr.strip() == (
        "error: refused: mallory is not a registered operator (domain.activate needs one of "
        "the roles [lead]; see `axiom operator add`)"
    )
    entries = _activation_entries(axiom_home)
    assert [(e.actor, e.action) for e in entries[1:]] == [
        ("operator:mallory", "domain.activate.refused")
    ]
    assert entries[-1].evidence["reason"] == "records checked"
    axiom_home.cli("operator", "add", "dora", "--role", "deliverability")
    lacking = axiom_home.cli(*activate, "--as", "dora", check=False)
    assert lacking.returncode == 1
    assert lacking.stderr.strip() == (
        "error: refused: operator dora holds roles [deliverability]; domain.activate needs one "
        "of the roles [lead]"
    )
    axiom_home.cli("operator", "add", "lena", "--role", "lead")
    done = axiom_home.cli(*activate, "--as", "lena")
    assert "domain acme.example is active" in done.stdout
    assert [(e.actor, e.action) for e in _activation_entries(axiom_home)[1:]] == [
        ("operator:mallory", "domain.activate.refused"),
        ("operator:dora", "domain.activate.refused"),
        ("operator:lena", "domain.activate"),
    ]

"""protocol/blocklists.py without DNS: what to ask (query names, the DQS zone, what counts as
a target), what an answer means (listing codes with their meanings, error codes, codes a list
does not document), and how answers become state (apply: events, audit, errors that never move
the state). The same against a real DNS server: tests/integration/test_blocklist_scan.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import select

from models import AuditEntry, BlocklistListing, IpState
from models.audit import as_utc
from protocol import blocklists, domains, egress, tenants
from protocol.blocklists import Answer, Target, interpret, parse_target, query_name
from protocol.errors import ServiceError
from relay.submission.keystore import KeyBox
from runbooks.loader import blocklists as blocklists_runbook

NOW = datetime(2026, 12, 8, 9, 0, tzinfo=UTC)
RUNBOOK = ("blocklist-scan", "1.0")
LISTS = blocklists_runbook().spec
ZEN = LISTS.by_id("spamhaus-zen")
DBL = LISTS.by_id("spamhaus-dbl")
BARRACUDA = LISTS.by_id("barracuda")


# ---------------------------------------------------------------- query names
@pytest.mark.parametrize(
    ("target", "zone", "name"),
    [
        (Target("ip", "192.0.2.99"), "zen.spamhaus.org", "99.2.0.192.zen.spamhaus.org"),
        (Target("ip", "127.0.0.2"), "bl.spamcop.net.", "2.0.0.127.bl.spamcop.net"),
        (
            Target("ip", "2001:db8:1:2::3"),
            "zen.spamhaus.org",
            "3.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.zen.spamhaus.org",
        ),
        (Target("domain", "shop.example"), "dbl.spamhaus.org", "shop.example.dbl.spamhaus.org"),
        (Target("domain", "test"), "DBL.Spamhaus.ORG", "test.dbl.spamhaus.org"),
    ],
)
def test_query_names(target, zone, name):
    assert query_name(target, zone) == name


def test_the_dqs_zone_replaces_the_public_one_only_with_a_key():
    assert ZEN.query_zone(None) == "zen.spamhaus.org"
    assert ZEN.query_zone("") == "zen.spamhaus.org"
    assert ZEN.query_zone("k3y") == "k3y.zen.dq.spamhaus.net"
    assert DBL.query_zone("k3y") == "k3y.dbl.dq.spamhaus.net"
    assert BARRACUDA.query_zone("k3y") == "b.barracudacentral.org"  # no DQS for it
    assert query_name(Target("ip", "127.0.0.2"), ZEN.query_zone("k3y")) == (
        "2.0.0.127.k3y.zen.dq.spamhaus.net"
    )


@pytest.mark.parametrize(
    ("value", "target"),
    [
        ("127.0.0.2", Target("ip", "127.0.0.2")),
        (" 2001:DB8::0001 ", Target("ip", "2001:db8::1")),
        ("[2001:db8::1]", Target("ip", "2001:db8::1")),
        ("Shop.Example.", Target("domain", "shop.example")),
        ("test", Target("domain", "test")),  # RFC 5782's test entry is a single label
        ("bounces.shop-1.example", Target("domain", "bounces.shop-1.example")),
    ],
)
def test_targets_an_operator_types(value, target):
    assert parse_target(value) == target


@pytest.mark.parametrize(
    "value", ["", "999.1.1.1", "1.2.3", "shop..example", "-shop.example", "shop_x.example", "a b"]
)
def test_bad_input_is_refused_naming_the_value(value):
    with pytest.raises(ServiceError) as refused:
        parse_target(value)
    assert repr(value) in str(refused.value)


# ---------------------------------------------------------------- what an answer means
IP = Target("ip", "192.0.2.99")


def test_no_a_record_is_clear():
    answer = interpret(ZEN, IP, "q", [])
    assert answer.status == "clear" and not answer.codes and not answer.error


def test_several_listing_codes_each_with_its_meaning():
    answer = interpret(ZEN, IP, "q", ["127.0.0.10", "127.0.0.4", "127.0.0.2"], "see check")
    assert answer.status == "listed"
    assert answer.codes == ("127.0.0.2", "127.0.0.4", "127.0.0.10")  # numeric order
    assert answer.meanings == (
        ZEN.codes["127.0.0.2"],
        ZEN.codes["127.0.0.4"],
        ZEN.codes["127.0.0.10"],
    )
    assert answer.meaning.startswith("SBL: ") and "XBL: " in answer.meaning
    assert answer.reason == "see check" and answer.error == ""


@pytest.mark.parametrize(
    ("blocklist", "target", "code", "why"),
    [
        (ZEN, IP, "127.255.255.254", "public or open resolver"),
        (ZEN, IP, "127.255.255.255", "excessive number of queries"),
        (ZEN, IP, "127.255.255.252", "typing error"),
        (DBL, Target("domain", "shop.example"), "127.0.1.255", "an IP was queried"),
        (BARRACUDA, IP, "127.0.0.4", "not a code Barracuda Reputation Block List documents"),
        (ZEN, IP, "127.0.0.5", "not a code Spamhaus ZEN documents"),
        (DBL, Target("domain", "shop.example"), "127.0.0.2", "not a code Spamhaus DBL documents"),
    ],
)
def test_error_codes_and_undocumented_codes_are_errors(blocklist, target, code, why):
    answer = interpret(blocklist, target, "q", [code], "reason")
    assert answer.status == "error" and answer.codes == (code,)
    assert answer.error.startswith(f"{code}: ") and why in answer.error
    assert answer.reason == ""  # an error carries no reason: it is not a listing


def test_one_bad_code_among_listing_codes_makes_the_answer_an_error():
    answer = interpret(ZEN, IP, "q", ["127.0.0.2", "127.255.255.254"])
    assert answer.status == "error"
    assert answer.error == "127.255.255.254: " + ZEN.errors["127.255.255.254"]


# ---------------------------------------------------------------- state
def listed(target="192.0.2.99", list_id="spamhaus-zen", codes=("127.0.0.2",), reason="why"):
    b = LISTS.by_id(list_id)
    kind = "ip" if b.kind == "ip" else "domain"
    return interpret(
        b, Target(kind, target), query_name(Target(kind, target), b.zone), codes, reason
    )


def clear(target="192.0.2.99", list_id="spamhaus-zen"):
    return listed(target, list_id, codes=())


def error(target="192.0.2.99", list_id="spamhaus-zen", why="no answer within 3 s (timeout)"):
    b = LISTS.by_id(list_id)
    return blocklists.failed(b, Target(b.kind, target), "q", why)


def audit(session, action):
    return session.exec(select(AuditEntry).where(AuditEntry.action == action)).all()


def row(session, target="192.0.2.99", list_id="spamhaus-zen") -> BlocklistListing | None:
    return session.exec(
        select(BlocklistListing).where(
            BlocklistListing.target == target, BlocklistListing.list_id == list_id
        )
    ).first()


def apply(session, answers, at=NOW):
    result = blocklists.apply(session, answers, now=at, actor="runbook", runbook=RUNBOOK)
    session.commit()
    return result


def test_a_listing_then_its_clearance_are_events_audited_once(session):
    assert apply(session, [clear()]).events == []
    assert row(session) is None  # never listed: nothing to keep

    first = apply(session, [listed(codes=("127.0.0.2", "127.0.0.4"))])
    [event] = first.events
    assert (event.kind, event.target, event.list_id) == ("listed", "192.0.2.99", "spamhaus-zen")
    assert event.codes == ("127.0.0.2", "127.0.0.4") and "XBL" in event.meaning
    [entry] = audit(session, "blocklist.listed")
    assert entry.subject == "ip:192.0.2.99" and entry.runbook_id == "blocklist-scan"
    assert entry.evidence["list"] == "spamhaus-zen"
    assert entry.evidence["codes"] == ["127.0.0.2", "127.0.0.4"]
    assert entry.evidence["reason"] == "why" and "SBL" in entry.evidence["meaning"]

    later = NOW + timedelta(minutes=15)
    again = apply(session, [listed(codes=("127.0.0.2", "127.0.0.4"))], later)
    assert again.events == [] and len(again.listed) == 1
    assert len(audit(session, "blocklist.listed")) == 1
    stored = row(session)
    assert stored.state == "listed" and as_utc(stored.first_seen) == NOW
    assert as_utc(stored.last_seen) == later

    gone = NOW + timedelta(hours=1)
    [cleared] = apply(session, [clear()], gone).events
    assert cleared.kind == "cleared" and cleared.codes == ("127.0.0.2", "127.0.0.4")
    assert cleared.first_seen == NOW and cleared.at == gone
    [entry] = audit(session, "blocklist.cleared")
    assert entry.evidence["codes"] == ["127.0.0.2", "127.0.0.4"]
    assert entry.evidence["first_seen"] == NOW.isoformat()
    assert apply(session, [clear()], gone + timedelta(minutes=15)).events == []
    assert len(audit(session, "blocklist.cleared")) == 1
    assert row(session).state == "clear" and as_utc(row(session).cleared_at) == gone


def test_errors_never_list_nor_clear(session):
    # never answered: an error leaves a row in state unknown, with the error to show
    result = apply(session, [error()])
    assert result.events == [] and [a.list_id for a in result.errors] == ["spamhaus-zen"]
    stored = row(session)
    assert stored.state == "unknown" and "timeout" in stored.last_error
    assert as_utc(stored.last_error_at) == NOW

    apply(session, [listed()], NOW + timedelta(minutes=15))
    for n, answer in enumerate(
        [
            error(why="127.255.255.254: query through a public or open resolver"),
            interpret(ZEN, Target("ip", "192.0.2.99"), "q", ["127.255.255.254"]),
            interpret(ZEN, Target("ip", "192.0.2.99"), "q", ["127.0.0.77"]),
            error(why="127.0.0.1:53 answered SERVFAIL"),
        ],
        start=2,
    ):
        result = apply(session, [answer], NOW + timedelta(minutes=15 * n))
        assert result.events == [] and result.errors == [answer]
        stored = row(session)
        assert stored.state == "listed" and stored.codes == ["127.0.0.2"]
        assert stored.last_error.endswith(answer.error)
    assert len(audit(session, "blocklist.listed")) == 1
    assert audit(session, "blocklist.cleared") == []
    assert [r.list_id for r in blocklists.status(session)] == ["spamhaus-zen"]

    # a verdict ends the error; a clearance after errors is still one clearance
    [event] = apply(session, [clear()], NOW + timedelta(hours=2)).events
    assert event.kind == "cleared" and row(session).last_error is None
    assert blocklists.status(session) == []


def test_the_probe_of_an_empty_scan_is_reported_but_kept_nowhere(session):
    probe = Answer(**{**error().__dict__, "target": "127.0.0.2", "probe": True})
    result = apply(session, [probe])
    assert result.errors == [probe] and row(session, "127.0.0.2") is None


def test_targets_are_sending_ips_and_active_domains_with_their_return_paths(session):
    tenants.add_tenant(session, "acme")
    keybox = KeyBox(KeyBox.generate())
    domains.add_domain(session, keybox, "acme", "shop.example")
    domains.add_domain(session, keybox, "acme", "later.example")  # pending: not sending
    egress.add_pool(session, "outbound", "dedicated")
    egress.add_ip(session, "192.0.2.10", "outbound", None, 100)
    egress.add_ip(session, "2001:db8::10", "outbound", None, 100)
    egress.add_ip(session, "192.0.2.11", "outbound", None, 100).state = IpState.retired
    session.commit()
    domains.mark_domain_active(session, "shop.example", "test", "test")
    session.commit()
    found = blocklists.targets(session)
    assert [t for t in found if t.kind == "ip"] == [
        Target("ip", "192.0.2.10"),
        Target("ip", "2001:db8::10"),
    ]
    assert [t.name for t in found if t.kind == "domain"] == [
        "bounces.shop.example",
        "shop.example",
    ]

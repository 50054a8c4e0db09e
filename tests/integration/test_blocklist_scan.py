"""protocol/blocklists.py and `axiom blocklist` against a real DNS server (Knot) on loopback
serving every list of runbooks/blocklists.yaml, as the lists themselves answer:

- RFC 5782 5's test entries: 127.0.0.2 listed and 127.0.0.1 not on every IP list, the domain
  `test` listed and `invalid` not on the domain list;
- real return codes with their meanings, several A records at once, and the TXT reason;
- error answers: Spamhaus's 127.255.255.254 (a refused resolver), DBL's 127.0.1.255, a code
  the list does not document, SERVFAIL (a zone that fails to load), REFUSED (a zone nobody
  serves), and a timeout (a nameserver that reads nothing);
- a listing added to and removed from the zone during the test: `apply` reports it listed,
  then cleared, audited once each; errors and timeouts in between move nothing.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import select

from models import AuditEntry, BlocklistListing
from protocol import blocklists, domains, egress, tenants
from protocol.blocklists import Target, check, query_name, scan
from relay.submission.keystore import KeyBox
from runbooks.loader import blocklists as blocklists_runbook
from testbed.dns import KnotServer, SilentNameserver

pytestmark = pytest.mark.integration

NOW = datetime(2026, 12, 8, 9, 0, tzinfo=UTC)
RUNBOOK = ("blocklist-scan", "1.0")
SPEC = blocklists_runbook().spec
IP_LISTS = [b for b in SPEC.lists if b.kind == "ip"]
DOMAIN_LISTS = [b for b in SPEC.lists if b.kind == "domain"]
TIMEOUT = 1.0

# Entries beyond RFC 5782's: list id -> {subject: codes}
SEVERAL = "192.0.2.20"  # SBL, XBL and PBL at once on ZEN
REFUSED_BY_SPAMHAUS = "192.0.2.30"  # ZEN answers 127.255.255.254
UNDOCUMENTED = "192.0.2.40"  # Barracuda answers a code it does not document
ENTRIES: dict[str, dict[str, Sequence[str]]] = {
    "spamhaus-zen": {
        SEVERAL: ["127.0.0.2", "127.0.0.4", "127.0.0.10"],
        REFUSED_BY_SPAMHAUS: ["127.255.255.254"],
    },
    "barracuda": {UNDOCUMENTED: ["127.0.0.77"]},
    "spamhaus-dbl": {"phish.example": ["127.0.1.4"], "192.0.2.99": ["127.0.1.255"]},
}


def records(list_id: str, entries: Mapping[str, Sequence[str]]) -> list[tuple[str, str, str]]:
    """A list's zone as the list publishes it: its RFC 5782 test entry, then A records with
    the TXT reason (one per listing code, as ZEN gives one per sub-list) for each entry."""
    b = SPEC.by_id(list_id)
    test = {"127.0.0.2": ["127.0.0.2"]} if b.kind == "ip" else {"test": ["127.0.1.2"]}
    out: list[tuple[str, str, str]] = []
    for subject, codes in {**test, **entries}.items():
        owner = query_name(blocklists.parse_target(subject), b.zone) + "."
        for code in codes:
            out.append((owner, "A", code))
            if code in b.codes:
                out.append((owner, "TXT", b.txt.format(subject=subject, meaning=b.codes[code])))
    return out


def zones(extra: Mapping[str, Mapping[str, Sequence[str]]] = ENTRIES) -> dict[str, list]:
    return {b.zone: records(b.id, extra.get(b.id, {})) for b in SPEC.lists}


@pytest.fixture(scope="module")
def lists_dns() -> Iterator[KnotServer]:
    with KnotServer(zones()) as server:
        yield server


def by_list(answers) -> dict[str, blocklists.Answer]:
    return {a.list_id: a for a in answers}


# ---------------------------------------------------------------- what the lists answer
def test_rfc5782_test_entries(lists_dns):
    listed = by_list(check("127.0.0.2", [lists_dns.address], timeout=TIMEOUT))
    assert set(listed) == {b.id for b in IP_LISTS}
    for b in IP_LISTS:
        answer = listed[b.id]
        assert answer.status == "listed", answer
        assert answer.codes == ("127.0.0.2",) and answer.meanings == (b.codes["127.0.0.2"],)
        assert answer.query == f"2.0.0.127.{b.zone}"
        assert answer.reason == b.txt.format(subject="127.0.0.2", meaning=b.codes["127.0.0.2"])
    clear = check("127.0.0.1", [lists_dns.address], timeout=TIMEOUT)
    assert [a.status for a in clear] == ["clear"] * len(IP_LISTS)
    assert not any(a.codes or a.reason or a.error for a in clear)

    [dbl] = check("test", [lists_dns.address], timeout=TIMEOUT)
    assert (dbl.list_id, dbl.status, dbl.codes) == ("spamhaus-dbl", "listed", ("127.0.1.2",))
    assert dbl.meaning == "low-reputation (spam) domain" and "query=test" in dbl.reason
    [invalid] = check("invalid", [lists_dns.address], timeout=TIMEOUT)
    assert invalid.status == "clear"


def test_several_codes_at_once_with_their_meanings_and_reasons(lists_dns):
    zen = by_list(check(SEVERAL, [lists_dns.address], timeout=TIMEOUT))["spamhaus-zen"]
    assert zen.status == "listed"
    assert zen.codes == ("127.0.0.2", "127.0.0.4", "127.0.0.10")
    assert [m.split(":")[0] for m in zen.meanings] == ["SBL", "XBL", "PBL"]
    # one TXT per code, in whatever order DNS gives them
    assert sorted(zen.reason.split(" | ")) == sorted(
        f"Listed by {m}, see https://check.spamhaus.org/results/?query={SEVERAL}"
        for m in zen.meanings
    )
    [phish] = check("Phish.Example", [lists_dns.address], timeout=TIMEOUT)
    assert phish.status == "listed" and phish.meaning == "phishing domain"


def test_error_codes_and_undocumented_codes(lists_dns):
    refused = by_list(check(REFUSED_BY_SPAMHAUS, [lists_dns.address], timeout=TIMEOUT))
    zen = refused["spamhaus-zen"]
    assert zen.status == "error" and zen.codes == ("127.255.255.254",)
    assert "public or open resolver" in zen.error and zen.reason == ""
    assert {a.status for a in refused.values() if a.list_id != "spamhaus-zen"} == {"clear"}

    barracuda = by_list(check(UNDOCUMENTED, [lists_dns.address], timeout=TIMEOUT))["barracuda"]
    assert barracuda.status == "error"
    assert barracuda.error == (
        "127.0.0.77: 127.0.0.77 is not a code Barracuda Reputation Block List documents"
    )

    # DBL asked about an IP (99.2.0.192.dbl…, as a misconfigured scanner would): its own code
    [ip_on_dbl] = scan([Target("domain", "99.2.0.192")], [lists_dns.address], timeout=TIMEOUT)
    assert ip_on_dbl.status == "error" and "an IP was queried" in ip_on_dbl.error


def test_servfail_refused_and_timeout_are_errors(lists_dns):
    served = {zone: r for zone, r in zones().items() if zone != "psbl.surriel.com"}
    with KnotServer(served, servfail=["psbl.surriel.com"]) as broken:
        answers = by_list(check("127.0.0.2", [broken.address], timeout=TIMEOUT))
    assert answers["psbl"].status == "error" and "SERVFAIL" in answers["psbl"].error
    assert answers["spamhaus-zen"].status == "listed"

    # With a DQS key the zone is <key>.zen.dq.spamhaus.net, which this server does not serve
    key_zone = SPEC.by_id("spamhaus-zen").query_zone("k3y")
    zen = by_list(check("127.0.0.2", [lists_dns.address], dqs_key="k3y", timeout=TIMEOUT))
    assert zen["spamhaus-zen"].query == f"2.0.0.127.{key_zone}"
    assert zen["spamhaus-zen"].status == "error" and "REFUSED" in zen["spamhaus-zen"].error
    assert zen["barracuda"].status == "listed"  # no DQS zone: the public one

    with SilentNameserver() as silent:
        started = time.monotonic()
        answers = check("127.0.0.2", [(silent.host, silent.port)], timeout=TIMEOUT)
        took = time.monotonic() - started
    assert [a.status for a in answers] == ["error"] * len(IP_LISTS)
    assert all("timeout" in a.error for a in answers)
    assert took < 3 * TIMEOUT  # concurrently: one timeout, not one per list


def test_the_dqs_zone_when_served(lists_dns):
    key_zone = SPEC.by_id("spamhaus-zen").query_zone("k3y")
    with KnotServer({key_zone: [("2.0.0.127", "A", "127.0.0.2")]}) as dqs:
        [zen] = scan(
            [Target("ip", "127.0.0.2")],
            [dqs.address],
            lists=[SPEC.by_id("spamhaus-zen")],
            dqs_key="k3y",
            timeout=TIMEOUT,
        )
    assert zen.status == "listed" and zen.query == f"2.0.0.127.{key_zone}"


def test_a_scan_with_no_targets_costs_one_query(lists_dns):
    assert scan([], [lists_dns.address], timeout=TIMEOUT) == []  # the probe was answered
    # A socket that reads nothing: count what arrived after the scan gave up.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        host, port = sink.getsockname()
        [probe] = scan([], [(host, port)], timeout=TIMEOUT)
        sink.setblocking(False)
        received = []
        for _ in range(10):
            try:
                received.append(sink.recv(512))
            except BlockingIOError:
                break
    assert probe.probe and probe.status == "error" and "timeout" in probe.error
    assert probe.query == "2.0.0.127.zen.spamhaus.org"
    assert len(received) == 1


# ---------------------------------------------------------------- a listing comes and goes
SENDING = ["192.0.2.10", "192.0.2.11"]
DOMAIN = "shop.example"


def seed(session) -> None:
    tenants.add_tenant(session, "acme")
    domains.add_domain(session, KeyBox(KeyBox.generate()), "acme", DOMAIN)
    egress.add_pool(session, "outbound", "dedicated")
    for address in SENDING:
        egress.add_ip(session, address, "outbound", None, 100)
    session.commit()
    domains.mark_domain_active(session, DOMAIN, "test", "test")
    session.commit()


def audit(session, action: str) -> list[AuditEntry]:
    return session.exec(select(AuditEntry).where(AuditEntry.action == action)).all()


def stored(session) -> dict[tuple[str, str], BlocklistListing]:
    session.expire_all()
    return {(r.target, r.list_id): r for r in session.exec(select(BlocklistListing)).all()}


def test_a_listing_added_and_removed_during_the_test(session):
    seed(session)
    wanted = blocklists.targets(session)
    assert {t.name for t in wanted} == {*SENDING, DOMAIN, f"bounces.{DOMAIN}"}
    with KnotServer(zones({})) as dns_, SilentNameserver() as silent:

        def run(at: datetime, nameservers=None):
            answers = scan(wanted, nameservers or [dns_.address], timeout=TIMEOUT)
            assert len(answers) == 2 * len(IP_LISTS) + 2 * len(DOMAIN_LISTS)
            result = blocklists.apply(session, answers, now=at, actor="runbook", runbook=RUNBOOK)
            session.commit()
            return result

        quiet = run(NOW)
        assert quiet.events == [] and quiet.errors == [] and stored(session) == {}

        # Spamhaus lists the first IP (SBL + CSS), the DBL the return-path domain
        dns_.set_zone(
            "zen.spamhaus.org",
            records("spamhaus-zen", {SENDING[0]: ["127.0.0.2", "127.0.0.3"]}),
        )
        dns_.set_zone(
            "dbl.spamhaus.org", records("spamhaus-dbl", {f"bounces.{DOMAIN}": ["127.0.1.2"]})
        )
        found = run(NOW + timedelta(minutes=15))
        assert sorted((e.kind, e.target, e.list_id) for e in found.events) == [
            ("listed", SENDING[0], "spamhaus-zen"),
            ("listed", f"bounces.{DOMAIN}", "spamhaus-dbl"),
        ]
        zen = next(e for e in found.events if e.list_id == "spamhaus-zen")
        assert zen.codes == ("127.0.0.2", "127.0.0.3") and "CSS" in zen.meaning
        assert f"query={SENDING[0]}" in zen.reason
        entries = audit(session, "blocklist.listed")
        assert sorted(e.subject for e in entries) == [
            f"domain:bounces.{DOMAIN}",
            f"ip:{SENDING[0]}",
        ]
        ip_entry = next(e for e in entries if e.subject.startswith("ip:"))
        assert ip_entry.evidence["codes"] == ["127.0.0.2", "127.0.0.3"]
        assert ip_entry.evidence["list"] == "spamhaus-zen" and ip_entry.runbook_id == RUNBOOK[0]

        assert run(NOW + timedelta(minutes=30)).events == []  # still listed: no new event
        assert len(audit(session, "blocklist.listed")) == 2

        # errors in between: a silent resolver, then Spamhaus refusing it; nothing moves
        before = {k: (r.state, r.first_seen) for k, r in stored(session).items()}
        timed_out = run(NOW + timedelta(minutes=45), [(silent.host, silent.port)])
        assert timed_out.events == [] and len(timed_out.errors) == timed_out.answers
        dns_.set_zone(
            "zen.spamhaus.org",
            records("spamhaus-zen", {a: ["127.255.255.254"] for a in SENDING}),
        )
        refused = run(NOW + timedelta(hours=1))
        assert refused.events == []
        assert {(a.target, a.list_id) for a in refused.errors} == {
            (a, "spamhaus-zen") for a in SENDING
        }
        rows = stored(session)
        assert {k: (rows[k].state, rows[k].first_seen) for k in before} == before
        assert sorted(k for k, r in rows.items() if r.state == "listed") == sorted(before)
        assert rows[(SENDING[0], "spamhaus-zen")].state == "listed"
        assert "127.255.255.254" in rows[(SENDING[0], "spamhaus-zen")].last_error
        assert rows[(SENDING[1], "spamhaus-zen")].state == "unknown"  # never answered yet

        # both delisted
        dns_.set_zone("zen.spamhaus.org", records("spamhaus-zen", {}))
        dns_.set_zone("dbl.spamhaus.org", records("spamhaus-dbl", {}))
        cleared = run(NOW + timedelta(hours=2))
        assert sorted((e.kind, e.target) for e in cleared.events) == [
            ("cleared", SENDING[0]),
            ("cleared", f"bounces.{DOMAIN}"),
        ]
        assert run(NOW + timedelta(hours=2, minutes=15)).events == []
        assert len(audit(session, "blocklist.cleared")) == 2
        assert len(audit(session, "blocklist.listed")) == 2
        assert blocklists.status(session) == []


# ---------------------------------------------------------------- the CLI
def test_axiom_blocklist_check_and_status(axiom_home, lists_dns):
    env = {"AXIOM_DNS_NAMESERVERS": lists_dns.nameserver}

    listed = axiom_home.cli("blocklist", "check", "127.0.0.2", "--json", check=False, extra_env=env)
    assert listed.returncode == 1, listed.stderr
    report = json.loads(listed.stdout)
    assert report["target"] == "127.0.0.2" and report["kind"] == "ip"
    assert [r["status"] for r in report["lists"]] == ["listed"] * len(IP_LISTS)
    zen = report["lists"][0]
    assert zen["list"] == "spamhaus-zen" and zen["codes"] == ["127.0.0.2"]
    assert zen["meanings"] == ["SBL: manually listed spam source or spam operation"]
    assert zen["reason"].startswith("Listed by SBL")

    clear = axiom_home.cli("blocklist", "check", "127.0.0.1", check=False, extra_env=env)
    assert clear.returncode == 0, clear.stderr
    assert clear.stdout.count("not listed") == len(IP_LISTS)
    assert "listed on 0 of 6 lists" in clear.stdout

    several = axiom_home.cli("blocklist", "check", SEVERAL, check=False, extra_env=env)
    assert several.returncode == 1
    assert "LISTED" in several.stdout and "XBL: exploited" in several.stdout
    assert "spamhaus-zen says: Listed by PBL: end-user range declared by the ISP, see" in (
        several.stdout
    )

    errors = axiom_home.cli("blocklist", "check", REFUSED_BY_SPAMHAUS, check=False, extra_env=env)
    assert errors.returncode == 2 and "public or open resolver" in errors.stdout

    bad = axiom_home.cli("blocklist", "check", "999.1.1.1", check=False, extra_env=env)
    assert bad.returncode == 2 and "'999.1.1.1' is neither an IP address" in bad.stderr

    empty = axiom_home.cli("blocklist", "status", extra_env=env)
    assert "no listing and no error recorded" in empty.stdout

    from models.db import make_engine, session_scope

    engine = make_engine(axiom_home.db_url)
    try:
        with session_scope(engine) as session:
            answers = scan(
                [Target("ip", SEVERAL), Target("ip", REFUSED_BY_SPAMHAUS)],
                [lists_dns.address],
                timeout=TIMEOUT,
            )
            blocklists.apply(session, answers, now=NOW, actor="runbook", runbook=RUNBOOK)
            session.commit()
    finally:
        engine.dispose()
    shown = json.loads(axiom_home.cli("blocklist", "status", "--json", extra_env=env).stdout)
    assert [(r["target"], r["list"], r["state"]) for r in shown] == [
        (SEVERAL, "spamhaus-zen", "listed"),
        (REFUSED_BY_SPAMHAUS, "spamhaus-zen", "unknown"),
    ]
    assert shown[0]["codes"] == ["127.0.0.2", "127.0.0.4", "127.0.0.10"]
    assert "127.255.255.254" in shown[1]["last_error"]
    table = axiom_home.cli("blocklist", "status", extra_env=env).stdout
    assert "spamhaus-zen" in table and "listed" in table and "last error" in table

"""protocol/dns_checks.py and `axiom domain check` against a real authoritative server (Knot).

A customer's zone is edited step by step as they would publish it — nothing, SPF, DKIM, DMARC,
the return path, then our PTR — and each step's table says what is still missing; then the
broken cases: 11 SPF lookups, two SPF records, a DKIM key that differs, no DMARC, a PTR that
does not resolve back, no return-path subdomain.

All names live in one zone, `test.` (shop.test, relay.axiom.test), so a parent asked about on
the way (DMARC's tree walk asks _dmarc.test) gets an answer (NXDOMAIN) rather than REFUSED.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlmodel import Session, select

from config.settings import load_settings
from models import Domain, IpState
from models.db import make_engine, migrate, session_scope
from protocol import domains, egress, tenants
from protocol.dns_checks import Expected, check_and_record, check_domain, expected_records
from relay.submission.keystore import KeyBox
from testbed.axiom import seed_tenant
from testbed.dns import KnotServer

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
RELAY = "relay.axiom.test"
DOMAIN = "shop.test"
SENDING_IP = "127.0.0.10"  # the stream's pool
FALLBACK_IP = "127.0.0.11"  # its fallback pool
REVERSE = "0.0.127.in-addr.arpa"

# What we publish ourselves: the relay's address, SPF for our IPs, an MX for the report address
# and the authorisation to receive any domain's DMARC reports (RFC 7489 7.1).
OURS = [
    (f"{RELAY}.", "A", SENDING_IP),
    (f"{RELAY}.", "MX", f"10 {RELAY}."),
    (f"_spf.{RELAY}.", "TXT", "v=spf1 ip4:127.0.0.0/24 -all"),
    (f"*._report._dmarc.{RELAY}.", "TXT", "v=DMARC1"),
    ("mta11.axiom.test.", "A", FALLBACK_IP),
]
PTRS = [("10", "PTR", f"{RELAY}."), ("11", "PTR", "mta11.axiom.test.")]


@pytest.fixture(scope="module")
def knot() -> Iterator[KnotServer]:
    with KnotServer({"test": OURS, REVERSE: []}) as server:
        yield server


def seed(session: Session, keybox: KeyBox) -> None:
    """Tenant acme with shop.test, its stream on pool `outbound` with `spare` as fallback; a
    retired address (never checked) in each."""
    tenants.add_tenant(session, "acme")
    domains.add_domain(session, keybox, "acme", DOMAIN)
    egress.add_pool(session, "outbound", "dedicated")
    egress.add_pool(session, "spare", "shared")
    egress.add_ip(session, SENDING_IP, "outbound", RELAY, 100)
    egress.add_ip(session, FALLBACK_IP, "spare", "mta11.axiom.test", 100)
    egress.add_ip(session, "127.0.0.12", "spare", None, 100).state = IpState.retired
    egress.set_stream(session, "acme", "mail", "outbound", "spare")
    session.commit()


def zone_records(session: Session, kinds: set[str]) -> list[tuple[str, str, str]]:
    """The records `axiom domain records` tells the customer to publish, of these kinds."""
    return [
        (f"{r.name}.", r.type, r.value)
        for r in domains.domain_records(session, DOMAIN, RELAY)
        if r.kind in kinds
    ]


def failing(result) -> set[str]:
    return {c.name for c in result.checks if not c.ok}


def test_a_customer_publishing_step_by_step(session, knot):
    seed(session, KeyBox(KeyBox.generate()))
    settings = load_settings(hostname=RELAY, dns_nameservers=knot.nameserver)
    expected = expected_records(session, DOMAIN, RELAY)
    selectors = [f"dkim:{k.selector}" for k in expected.dkim]
    assert len(selectors) == 2  # RSA and Ed25519
    assert [ip.address for ip in expected.ips] == [SENDING_IP, FALLBACK_IP]
    assert (expected.return_path_domain, expected.return_path_mx) == (f"bounces.{DOMAIN}", (RELAY,))
    knot.set_zone("test", OURS)
    knot.set_zone(REVERSE, [])

    def check():
        result = check_and_record(session, DOMAIN, settings, now=NOW)
        session.commit()
        return result

    # nothing published yet: every row the customer owes fails, and says what to publish
    empty = check()
    assert not empty.passed
    assert failing(empty) == {
        "spf.record",
        *selectors,
        "dmarc.record",
        "alignment.dkim",
        "return_path.mx",
        "return_path.spf",
        f"fcrdns:{SENDING_IP}",
        f"fcrdns:{FALLBACK_IP}",
    }
    assert empty.get("alignment.return_path").ok  # bounces.shop.test under shop.test
    spf = empty.get("spf.record")
    assert "no SPF record" in spf.reason and f"include:_spf.{RELAY}" in spf.reason
    assert "NXDOMAIN" in empty.get(f"fcrdns:{SENDING_IP}").reason
    assert {c.name for c in empty.missing("customer")} == failing(empty) - {
        f"fcrdns:{SENDING_IP}",
        f"fcrdns:{FALLBACK_IP}",
    }
    stored = session.exec(select(Domain).where(Domain.name == DOMAIN)).one()
    assert stored.dns_checks == json.loads(json.dumps(empty.as_json()))
    assert stored.dns_checked_at is not None

    # SPF: one record, one lookup, our include directly
    published = zone_records(session, {"spf"})
    knot.set_zone("test", OURS + published)
    step = check()
    assert {"spf.record", "spf.lookups", "spf.void_lookups", "spf.include"} <= {
        c.name for c in step.checks if c.ok
    }
    assert step.get("spf.lookups").found == "1"
    assert "directly" in step.get("spf.include").reason

    # DKIM: both keys (the RSA one is split into 255-octet TXT strings by the zone writer)
    published += zone_records(session, {"dkim"})
    knot.set_zone("test", OURS + published)
    step = check()
    assert all(step.get(s).ok for s in selectors) and step.get("alignment.dkim").ok
    assert "dmarc.record" in failing(step)

    # DMARC: p=none, reports to the relay
    published += zone_records(session, {"dmarc"})
    knot.set_zone("test", OURS + published)
    step = check()
    assert step.get("dmarc.record").ok and step.get("dmarc.policy").found == "p=none"
    assert step.get("dmarc.rua").ok and f"dmarc@{RELAY}" in step.get("dmarc.rua").reason

    # the return path's MX and SPF
    published += zone_records(session, {"return_path_mx", "return_path_spf"})
    knot.set_zone("test", OURS + published)
    step = check()
    assert failing(step) == {f"fcrdns:{SENDING_IP}", f"fcrdns:{FALLBACK_IP}"}
    assert not step.passed

    # our PTRs: everything passes
    knot.set_zone(REVERSE, PTRS)
    done = check()
    assert done.passed and failing(done) == set(), [c.reason for c in done.missing()]
    assert "forward-confirmed" in done.get(f"fcrdns:{SENDING_IP}").reason
    stored = session.exec(select(Domain).where(Domain.name == DOMAIN)).one()
    session.refresh(stored)
    assert stored.dns_checks["passed"] is True


# ---------------------------------------------------------------- broken cases
@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> Iterator[tuple[Expected, list[tuple[str, str, str]]]]:
    """What shop.test must publish (once, on SQLite) and a zone in which all of it is right."""
    url = f"sqlite:///{tmp_path_factory.mktemp('dns-checks') / 'axiom.db'}"
    migrate(url)
    engine = make_engine(url)
    try:
        with session_scope(engine) as session:
            seed(session, KeyBox(KeyBox.generate()))
            expected = expected_records(session, DOMAIN, RELAY)
            kinds = {"spf", "dkim", "dmarc", "return_path_mx", "return_path_spf"}
            yield expected, zone_records(session, kinds)
    finally:
        engine.dispose()


def check_with(knot, expected, records, ptrs=PTRS, **options):
    knot.set_zone("test", OURS + records)
    knot.set_zone(REVERSE, ptrs)
    return check_domain(expected, [knot.address], now=NOW, **options)


def replaced(records, name: str, rtype: str, *values: str):
    """records with those at (name, type) replaced by values (none: removed)."""
    kept = [r for r in records if (r[0], r[1]) != (f"{name}.", rtype)]
    return kept + [(f"{name}.", rtype, v) for v in values]


def test_the_complete_zone_passes(knot, shop):
    expected, records = shop
    result = check_with(knot, expected, records)
    assert result.passed and not result.missing(), [c.reason for c in result.missing()]


def test_spf_with_eleven_lookups(knot, shop):
    expected, records = shop
    includes = [(f"esp{i}.test.", "TXT", f"v=spf1 ip4:192.0.2.{i} -all") for i in range(10)]
    spf = "v=spf1 " + " ".join(f"include:esp{i}.test" for i in range(10))
    spf += f" include:_spf.{RELAY} ~all"
    result = check_with(knot, expected, replaced(records, DOMAIN, "TXT", spf) + includes)
    lookups = result.get("spf.lookups")
    assert not lookups.ok and lookups.found == "11" and "11/10" in lookups.reason
    assert result.get("spf.record").ok and result.get("spf.include").ok
    assert not result.passed

    ten = spf.replace(" include:esp9.test", "")  # ten lookups: the limit itself is allowed
    result = check_with(knot, expected, replaced(records, DOMAIN, "TXT", ten) + includes)
    assert result.get("spf.lookups").ok and result.get("spf.lookups").found == "10"


def test_spf_with_three_void_lookups(knot, shop):
    expected, records = shop
    spf = f"v=spf1 a:gone1.test a:gone2.test a:gone3.test include:_spf.{RELAY} ~all"
    result = check_with(knot, expected, replaced(records, DOMAIN, "TXT", spf))
    void = result.get("spf.void_lookups")
    assert not void.ok and void.found == "3"
    assert result.get("spf.lookups") is None  # not counted past the limit that stopped it


def test_two_spf_records(knot, shop):
    expected, records = shop
    two = replaced(records, DOMAIN, "TXT", expected.spf, "v=spf1 include:esp.example ~all")
    result = check_with(knot, expected, two)
    spf = result.get("spf.record")
    assert not spf.ok and spf.reason.startswith(f"2 SPF records at {DOMAIN}")
    assert "permerror" in spf.reason
    assert result.get("spf.include") is None and not result.passed


def test_our_include_nested_in_another_or_after_all(knot, shop):
    expected, records = shop
    esp = [("_spf.esp.test.", "TXT", f"v=spf1 ip4:192.0.2.1 include:_spf.{RELAY} -all")]
    nested = replaced(records, DOMAIN, "TXT", "v=spf1 include:_spf.esp.test ~all") + esp
    result = check_with(knot, expected, nested)
    assert result.get("spf.include").ok and "via shop.test -> _spf.esp.test" in (
        result.get("spf.include").reason
    )
    late = replaced(records, DOMAIN, "TXT", f"v=spf1 ip4:192.0.2.1 ~all include:_spf.{RELAY}")
    include = check_with(knot, expected, late).get("spf.include")
    assert not include.ok and f"does not reach include:_spf.{RELAY}" in include.reason


def test_a_dkim_key_that_differs(knot, shop):
    expected, records = shop
    rsa, ed = expected.dkim
    first = ed.value.split("p=", 1)[1][0]  # the key is random: make character 1 differ
    other = ed.value.replace("p=", "p=" + ("B" if first == "A" else "A"), 1)[:-1]
    result = check_with(knot, expected, replaced(records, ed.name, "TXT", other))
    row = result.get(f"dkim:{ed.selector}")
    assert not row.ok and "differs from ours from character 1 of p=" in row.reason
    assert result.get(f"dkim:{rsa.selector}").ok
    assert result.get("alignment.dkim").ok  # the RSA signature still verifies and aligns
    assert not result.passed

    reordered = rsa.value.replace("v=DKIM1; k=rsa; p=", "v=DKIM1; p=") + "; k=rsa"
    result = check_with(knot, expected, replaced(records, rsa.name, "TXT", reordered))
    assert result.get(f"dkim:{rsa.selector}").ok


def test_no_dmarc(knot, shop):
    expected, records = shop
    result = check_with(knot, expected, replaced(records, f"_dmarc.{DOMAIN}", "TXT"))
    row = result.get("dmarc.record")
    assert not row.ok and "does not exist" in row.reason and expected.dmarc in row.reason
    assert result.get("dmarc.policy") is None and not result.passed


def test_dmarc_reports_elsewhere_is_a_warning_only(knot, shop):
    expected, records = shop
    dmarc = "v=DMARC1; p=quarantine; rua=mailto:reports@shop.test"
    mx = [(f"{DOMAIN}.", "MX", f"10 {RELAY}.")]
    result = check_with(knot, expected, replaced(records, f"_dmarc.{DOMAIN}", "TXT", dmarc) + mx)
    rua = result.get("dmarc.rua")
    assert not rua.ok and rua.level == "warn" and "reports@shop.test" in rua.reason
    assert result.get("dmarc.policy").found == "p=quarantine"
    assert result.passed and result.missing() == [rua]


def test_a_ptr_that_does_not_resolve_back(knot, shop):
    expected, records = shop
    ptrs = [("10", "PTR", "mta11.axiom.test."), PTRS[1]]  # .10 names the host of .11
    result = check_with(knot, expected, records, ptrs)
    row = result.get(f"fcrdns:{SENDING_IP}")
    assert not row.ok and row.owner == "relay"
    assert f"{SENDING_IP} has PTR mta11.axiom.test" in row.reason and FALLBACK_IP in row.reason
    assert result.get(f"fcrdns:{FALLBACK_IP}").ok
    assert not result.passed and not result.missing("customer")


def test_no_return_path_subdomain(knot, shop):
    expected, records = shop
    rp = expected.return_path_domain
    result = check_with(knot, expected, [r for r in records if r[0] != f"{rp}."])
    assert failing(result) == {"return_path.mx", "return_path.spf"}
    assert f"{rp} does not exist (NXDOMAIN)" in result.get("return_path.mx").reason

    elsewhere = replaced(records, rp, "MX", "10 mx.esp.example.")
    mx = check_with(knot, expected, elsewhere).get("return_path.mx")
    assert not mx.ok and "mx.esp.example, which is not the relay" in mx.reason


def test_a_failing_nameserver_is_transient_not_a_verdict(shop):
    expected, _records = shop
    with KnotServer({"0.0.127.in-addr.arpa": PTRS}, servfail=["test"]) as server:
        result = check_domain(expected, [server.address], now=NOW, timeout=1.0)
    assert not result.passed and result.transient
    for name in ("spf.record", "dmarc.record", "return_path.mx"):
        row = result.get(name)
        assert not row.ok and row.transient and "try again" in row.reason, row


# ---------------------------------------------------------------- the CLI
def test_axiom_domain_check(cli, knot, monkeypatch):
    seed_tenant(cli.home, "acme", DOMAIN, activate=False)
    monkeypatch.setenv("AXIOM_DNS_NAMESERVERS", knot.nameserver)
    engine = make_engine(cli.home.db_url)
    try:
        with session_scope(engine) as session:
            records = zone_records(
                session, {"spf", "dkim", "dmarc", "return_path_mx", "return_path_spf"}
            )
        knot.set_zone(REVERSE, [("1", "PTR", f"{RELAY}.")])  # the home's default pool
        knot.set_zone("test", [*OURS, (f"{RELAY}.", "A", "127.0.0.1"), *records])

        passing = cli("domain", "check", DOMAIN, "--json")
        assert passing.exit_code == 0, passing.output
        report = json.loads(passing.stdout)
        assert report["passed"] is True and report["domain"] == DOMAIN
        assert "fcrdns:127.0.0.1" in {c["name"] for c in report["checks"]}

        knot.set_zone("test", [*OURS, (f"{RELAY}.", "A", "127.0.0.1"), *records[:-1]])
        table = cli("domain", "check", DOMAIN.upper())
        assert table.exit_code == 1, table.output
        assert "return_path.spf" in table.stdout and "FAIL" in table.stdout
        with session_scope(engine) as session:
            stored = session.exec(select(Domain).where(Domain.name == DOMAIN)).one()
            assert stored.dns_checks["passed"] is False

        unknown = cli("domain", "check", "nowhere.test")
        assert unknown.exit_code == 2
        assert "nowhere.test" in unknown.output and "does not exist" in unknown.output
    finally:
        engine.dispose()

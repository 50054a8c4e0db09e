"""sandbox/zones.py: what the sandbox DNS answers, decided without a network."""

from __future__ import annotations

import pytest

from sandbox.behaviour import behaviour
from sandbox.state import Listing, Override
from sandbox.zones import (
    NOERROR,
    NXDOMAIN,
    CustomerRecords,
    Zone,
    dnsbl_query_name,
    mx_addresses,
    world_records,
)

ADDRESSES = mx_addresses(behaviour(), "127.0.25.0/24")
CUSTOMERS = CustomerRecords(
    "relay.axiom.test",
    {"127.0.0.10": "mta10.axiom.test", "127.0.0.1": None},
    {
        "acme.example": [
            ("axrsa202611._domainkey.acme.example", "TXT", "v=DKIM1; k=rsa; p=MIIB"),
            ("acme.example", "TXT", "v=spf1 include:_spf.relay.axiom.test ~all"),
            ("_dmarc.acme.example", "TXT", "v=DMARC1; p=none"),
        ]
    },
)


def zone(listings=(), overrides=()) -> Zone:
    model = behaviour()
    return Zone(model, world_records(model, ADDRESSES, CUSTOMERS), overrides, listings)


def values(answer):
    return sorted(rr.value for rr in answer.records)


def test_provider_domains_have_mx_records_to_distinct_loopback_addresses():
    z = zone()
    assert values(z.answer("gmail.com", "MX"))[0] == "10 alt1.gmail-smtp-in.l.google.com."
    assert "5 gmail-smtp-in.l.google.com." in values(z.answer("gmail.com", "MX"))
    assert values(z.answer("gmail-smtp-in.l.google.com.", "A")) == ["127.0.25.1"]
    assert values(z.answer("outlook-com.olc.protection.outlook.com", "A")) == ["127.0.25.2"]
    assert values(z.answer("mta6.am0.yahoodns.net", "A")) == ["127.0.25.3"]
    assert values(z.answer("mx01.mail.icloud.com", "A")) == ["127.0.25.4"]
    assert values(z.answer("example.net", "MX")) == ["10 mx.example.net."]
    assert len(set(ADDRESSES.values())) == len(ADDRESSES)


def test_source_ips_have_forward_confirmed_ptr_names_and_an_spf_record():
    z = zone()
    assert values(z.answer("10.0.0.127.in-addr.arpa", "PTR")) == ["mta10.axiom.test."]
    assert values(z.answer("mta10.axiom.test", "A")) == ["127.0.0.10"]
    # an IP without its own PTR name is named after the relay (what it says in EHLO)
    assert values(z.answer("1.0.0.127.in-addr.arpa", "PTR")) == ["relay.axiom.test."]
    assert values(z.answer("relay.axiom.test", "A")) == ["127.0.0.1"]
    assert values(z.answer("_spf.relay.axiom.test", "TXT")) == [
        "v=spf1 ip4:127.0.0.1 ip4:127.0.0.10 -all"
    ]


def test_sending_domains_publish_their_records_and_an_inbound_mx():
    z = zone()
    assert values(z.answer("axrsa202611._domainkey.acme.example", "TXT")) == [
        "v=DKIM1; k=rsa; p=MIIB"
    ]
    assert values(z.answer("_dmarc.acme.example", "TXT")) == ["v=DMARC1; p=none"]
    assert values(z.answer("acme.example", "MX")) == ["10 mx.example.net."]


def test_nodata_and_nxdomain_are_told_apart_with_an_soa():
    z = zone()
    nodata = z.answer("gmail.com", "AAAA")
    assert (nodata.rcode, nodata.records) == (NOERROR, ())
    assert nodata.soa is not None and nodata.soa.name == "gmail.com"
    empty_non_terminal = z.answer("_domainkey.acme.example", "TXT")
    assert empty_non_terminal.rcode == NOERROR
    missing = z.answer("nobody.gmail.com", "A")
    assert missing.rcode == NXDOMAIN and missing.soa is not None


def test_an_unlisted_ip_is_nxdomain_and_a_listed_one_answers_its_code_and_reason():
    listed = Listing("zen.spamhaus.org", "127.0.0.10", "127.0.0.3", "test", 0.0)
    z = zone([listed])
    name = dnsbl_query_name("127.0.0.10", "zen.spamhaus.org")
    assert name == "10.0.0.127.zen.spamhaus.org"
    assert values(z.answer(name, "A")) == ["127.0.0.3"]
    [txt] = values(z.answer(name, "TXT"))
    assert "CSS" in txt and "127.0.0.10" in txt
    assert z.answer(dnsbl_query_name("127.0.0.11", "zen.spamhaus.org"), "A").rcode == NXDOMAIN
    # a listing in one list says nothing about another
    assert z.answer(dnsbl_query_name("127.0.0.10", "bl.spamcop.net"), "A").rcode == NXDOMAIN


def test_component_zones_answer_their_part_of_a_zen_listing():
    xbl = Listing("zen.spamhaus.org", "127.0.0.10", "127.0.0.4", "bot", 0.0)
    z = zone([xbl])
    for component, answered in [("xbl", True), ("sbl-xbl", True), ("sbl", False), ("pbl", False)]:
        answer = z.answer(dnsbl_query_name("127.0.0.10", f"{component}.spamhaus.org"), "A")
        assert (answer.rcode == NOERROR and bool(answer.records)) is answered, component


@pytest.mark.parametrize(
    ("zone_name", "listed", "clear"),
    [
        ("zen.spamhaus.org", "127.0.0.2", "127.0.0.1"),
        ("b.barracudacentral.org", "127.0.0.2", "127.0.0.1"),
        ("dbl.spamhaus.org", "test", "invalid"),
    ],
)
def test_rfc5782_test_points(zone_name, listed, clear):
    z = zone()
    assert z.answer(dnsbl_query_name(listed, zone_name), "A").records
    assert z.answer(dnsbl_query_name(clear, zone_name), "A").rcode == NXDOMAIN


def test_domain_lists_are_wildcarded_and_refuse_ip_queries_with_an_error_code():
    z = zone([Listing("dbl.spamhaus.org", "spammy.example", "127.0.1.2", "test", 0.0)])
    assert values(z.answer("spammy.example.dbl.spamhaus.org", "A")) == ["127.0.1.2"]
    assert values(z.answer("www.spammy.example.dbl.spamhaus.org", "A")) == ["127.0.1.2"]
    assert values(z.answer("10.0.0.127.dbl.spamhaus.org", "A")) == ["127.0.1.255"]


def test_ipv6_queries_use_reversed_nibbles():
    z = zone([Listing("zen.spamhaus.org", "2001:db8::1", "127.0.0.2", "v6", 0.0)])
    name = dnsbl_query_name("2001:db8::1", "zen.spamhaus.org")
    assert name.startswith("1.0.0.0.") and name.endswith(".8.b.d.0.1.0.0.2.zen.spamhaus.org")
    assert values(z.answer(name, "A")) == ["127.0.0.2"]


def test_overrides_replace_or_remove_a_record_set():
    wrong = Override("axrsa202611._domainkey.acme.example", "TXT", ("v=DKIM1; p=WRONG",), "t")
    gone = Override("_dmarc.acme.example", "TXT", (), "t")
    z = zone(overrides=[wrong, gone])
    assert values(z.answer("axrsa202611._domainkey.acme.example", "TXT")) == ["v=DKIM1; p=WRONG"]
    assert z.answer("_dmarc.acme.example", "TXT").records == ()


def test_an_explicit_listing_of_127_0_0_1_wins_over_the_test_point():
    """On loopback 127.0.0.1 is a real source address (the default pool's)."""
    z = zone([Listing("zen.spamhaus.org", "127.0.0.1", "127.0.0.2", "demo", 0.0)])
    assert values(z.answer(dnsbl_query_name("127.0.0.1", "zen.spamhaus.org"), "A")) == ["127.0.0.2"]


def test_the_dns_server_reuses_an_answer_for_the_same_question_with_the_asking_id():
    import dns.message
    import dns.rcode

    from sandbox.dns import respond

    world = zone()
    first = dns.message.make_query("mta10.axiom.test", "A", id=1)
    again = dns.message.make_query("mta10.axiom.test", "A", id=2)
    one = dns.message.from_wire(respond(first.to_wire(), world, 4096))
    two = dns.message.from_wire(respond(again.to_wire(), world, 4096))
    assert (one.id, two.id) == (1, 2)
    assert one.answer == two.answer and [rr.to_text() for rr in one.answer[0]] == ["127.0.0.10"]
    assert len(world.wire_answers) == 1
    # Another question is answered for itself; a new zone (the world changed) answers afresh.
    other = dns.message.make_query("nothing.axiom.test", "A", id=3)
    none = dns.message.from_wire(respond(other.to_wire(), world, 4096))
    assert none.rcode() == dns.rcode.NXDOMAIN and none.id == 3
    changed = zone(overrides=[Override("mta10.axiom.test", "A", ("127.0.0.99",), "moved")])
    three = dns.message.from_wire(respond(again.to_wire(), changed, 4096))
    assert [rr.to_text() for rr in three.answer[0]] == ["127.0.0.99"]


def test_a_receiver_keeps_an_answer_while_its_zone_is_served_and_asks_again_after_a_change():
    """sandbox/lookup.py over a real DnsServer on loopback: the second question is answered
    without the wire, a new zone (a listing made) is asked for at once, errors are not kept."""
    import asyncio

    from sandbox.dns import DnsServer
    from sandbox.lookup import SandboxLookup

    async def scenario():
        served = {"zone": zone()}
        server = DnsServer("127.0.0.1", 0, lambda: served["zone"])
        await server.start()
        try:
            lookup = SandboxLookup("127.0.0.1", server.port, zone=lambda: served["zone"])
            listed = dnsbl_query_name("127.0.0.10", "zen.spamhaus.org")
            first = await lookup.query(listed, "A")
            again = await lookup.query(listed.upper() + ".", "A")
            assert (first.status, again, lookup.asked) == ("nxdomain", first, 1)
            served["zone"] = zone([Listing("zen.spamhaus.org", "127.0.0.10", "127.0.0.2", "x", 0)])
            now_listed = await lookup.query(listed, "A")
            assert (now_listed.status, now_listed.values, lookup.asked) == (
                "answer",
                ("127.0.0.2",),
                2,
            )
            # Without a zone (the scenarios' probe) every question goes over the wire.
            probe = SandboxLookup("127.0.0.1", server.port)
            await probe.query(listed, "A")
            await probe.query(listed, "A")
            assert probe.asked == 2
        finally:
            await server.stop()
        # An error (nothing answers any more) is not kept: the next question asks again.
        failing = SandboxLookup("127.0.0.1", server.port, timeout=0.2, zone=lambda: served["zone"])
        assert (await failing.query("mta10.axiom.test", "A")).status == "error"
        assert (await failing.query("mta10.axiom.test", "A")).status == "error"
        assert failing.asked == 2

    asyncio.run(scenario())

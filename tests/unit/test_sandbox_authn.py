"""sandbox/authn.py: SPF, DKIM and DMARC as the simulated receivers evaluate them.

DNS is a dict here; the signatures are real ones made by the relay's signer (relay/submission/dkim.py)
and verified by dkimpy inside the sandbox, so a bad signature is a real bad signature.
"""

from __future__ import annotations

from functools import cache

import pytest

from relay.submission.dkim import generate_key, load_signing_key, sign, txt_record_value
from runbooks.loader import dkim_signing
from sandbox.authn import (
    authenticate,
    check_dkim,
    check_spf,
    header_from_domain,
    organisational_domain,
)
from sandbox.lookup import Found
from tests.patching import patched

IP = "127.0.0.10"
MESSAGE = (
    b"From: Shop <shop@acme.example>\r\nTo: ann@gmail.com\r\nSubject: Your order\r\n"
    b"Date: Thu, 26 Nov 2026 09:00:00 +0000\r\nMessage-ID: <1@acme.example>\r\n\r\nShipped.\r\n"
)


class FakeLookup:
    def __init__(self, records: dict[tuple[str, str], list[str]] | None = None):
        self.records = records or {}
        self.failing: set[str] = set()
        self.asked: list[tuple[str, str]] = []

    async def query(self, name: str, rdtype: str) -> Found:
        name = name.lower().rstrip(".")
        self.asked.append((name, rdtype))
        if name in self.failing:
            return Found("error")
        values = self.records.get((name, rdtype))
        if values:
            return Found("answer", tuple(values))
        if any(n == name for n, _ in self.records):
            return Found("nodata")
        return Found("nxdomain")

    async def txt(self, name: str) -> Found:
        return await self.query(name, "TXT")

    async def ptr(self, ip: str) -> Found:
        raise AssertionError("not used")


@cache
def keys():
    return generate_key("rsa", 2048), generate_key("ed25519")


def signed(data: bytes = MESSAGE, domain: str = "acme.example") -> bytes:
    rsa, ed = keys()
    signing = [
        load_signing_key(domain, "axrsa", "rsa", rsa.private_material),
        load_signing_key(domain, "axed", "ed25519", ed.private_material),
    ]
    with patched("dkimpy"):  # signed as the relay signs; verified by dkimpy as published
        return sign(data, signing, dkim_signing().spec) + data


def key_records(domain: str = "acme.example") -> dict[tuple[str, str], list[str]]:
    rsa, ed = keys()
    return {
        (f"axrsa._domainkey.{domain}", "TXT"): [txt_record_value("rsa", rsa.public_value)],
        (f"axed._domainkey.{domain}", "TXT"): [txt_record_value("ed25519", ed.public_value)],
    }


SPF = {
    ("acme.example", "TXT"): ["v=spf1 include:_spf.relay.axiom.test ~all"],
    ("_spf.relay.axiom.test", "TXT"): ["v=spf1 ip4:127.0.0.10 ip4:127.0.0.11 -all"],
}


async def test_spf_passes_through_an_include_and_soft_fails_other_ips():
    lookup = FakeLookup(SPF)
    assert await check_spf(IP, "acme.example", lookup) == "pass"
    assert await check_spf("127.0.0.99", "acme.example", lookup) == "softfail"
    assert await check_spf(IP, "nobody.example", lookup) == "none"


@pytest.mark.parametrize(
    ("record", "result"),
    [
        ("v=spf1 -all", "fail"),
        ("v=spf1 ?all", "neutral"),
        ("v=spf1 ip4:127.0.0.0/24 -all", "pass"),
        ("v=spf1 a:mail.acme.example -all", "pass"),
        ("v=spf1 a:mail.acme.example/24 -all", "pass"),
        ("v=spf1 mx -all", "pass"),
        ("v=spf1 redirect=_spf.relay.axiom.test", "pass"),
        ("v=spf1 include:nowhere.example -all", "permerror"),
        ("v=spf1 %{i}.bl.example -all", "permerror"),
        ("v=spf1 bogus:thing -all", "permerror"),
    ],
)
async def test_spf_mechanisms(record, result):
    records = dict(SPF)
    records[("acme.example", "TXT")] = [record]
    records[("acme.example", "MX")] = ["10 mail.acme.example"]
    records[("mail.acme.example", "A")] = [IP if "/24" not in record else "127.0.0.200"]
    assert await check_spf(IP, "acme.example", FakeLookup(records)) == result


async def test_spf_two_records_and_too_many_lookups_are_permanent_errors():
    two = FakeLookup({("acme.example", "TXT"): ["v=spf1 -all", "v=spf1 +all"]})
    assert await check_spf(IP, "acme.example", two) == "permerror"
    chain = {(f"l{i}.example", "TXT"): [f"v=spf1 include:l{i + 1}.example -all"] for i in range(12)}
    chain[("l12.example", "TXT")] = ["v=spf1 +all"]
    assert await check_spf(IP, "l0.example", FakeLookup(chain)) == "permerror"


async def test_spf_dns_failure_is_a_temporary_error():
    lookup = FakeLookup(SPF)
    lookup.failing.add("_spf.relay.axiom.test")
    assert await check_spf(IP, "acme.example", lookup) == "temperror"


async def test_real_signatures_verify_and_a_changed_body_or_key_does_not():
    lookup = FakeLookup(key_records())
    results = await check_dkim(signed(), lookup)
    assert {(r.selector, r.result) for r in results} == {("axrsa", "pass"), ("axed", "pass")}

    tampered = signed().replace(b"Shipped.", b"Shipped!")
    assert {r.result for r in await check_dkim(tampered, lookup)} == {"fail"}

    other = generate_key("rsa", 2048)
    wrong = FakeLookup(key_records())
    wrong.records[("axrsa._domainkey.acme.example", "TXT")] = [
        txt_record_value("rsa", other.public_value)
    ]
    by_selector = {r.selector: r.result for r in await check_dkim(signed(), wrong)}
    assert by_selector == {"axrsa": "fail", "axed": "pass"}


async def test_a_missing_key_is_a_permanent_error_and_a_dns_failure_a_temporary_one():
    assert {r.result for r in await check_dkim(signed(), FakeLookup())} == {"permerror"}
    lookup = FakeLookup(key_records())
    lookup.failing.add("axrsa._domainkey.acme.example")
    by_selector = {r.selector: r.result for r in await check_dkim(signed(), lookup)}
    assert by_selector["axrsa"] == "temperror"


async def test_unsigned_mail_has_no_dkim_results():
    assert await check_dkim(MESSAGE, FakeLookup()) == ()


async def test_dmarc_passes_on_aligned_dkim_even_when_spf_fails():
    records = key_records() | {("_dmarc.acme.example", "TXT"): ["v=DMARC1; p=reject"]}
    auth = await authenticate(signed(), "bounce@elsewhere.example", "h", IP, FakeLookup(records))
    assert auth.spf == "none" and auth.dkim_pass
    assert (auth.dmarc, auth.dmarc_policy) == ("pass", "reject")


async def test_dmarc_fails_when_the_only_pass_is_not_aligned():
    records = SPF | {("_dmarc.acme.example", "TXT"): ["v=DMARC1; p=reject"]}
    records |= key_records("other.example")
    data = signed(domain="other.example")  # d=other.example, From: acme.example
    auth = await authenticate(data, "", "mx.other.example", IP, FakeLookup(records))
    assert auth.dkim_pass and not auth.spf_pass
    assert (auth.dmarc, auth.dmarc_policy) == ("fail", "reject")


async def test_dmarc_subdomain_policy_and_missing_record():
    records = SPF | {("_dmarc.acme.example", "TXT"): ["v=DMARC1; p=none; sp=quarantine"]}
    data = MESSAGE.replace(b"shop@acme.example", b"shop@news.acme.example")
    auth = await authenticate(data, "shop@acme.example", "h", IP, FakeLookup(records))
    assert (auth.from_domain, auth.dmarc, auth.dmarc_policy) == (
        "news.acme.example",
        "pass",
        "quarantine",
    )
    none = await authenticate(MESSAGE, "shop@acme.example", "h", IP, FakeLookup(SPF))
    assert (none.dmarc, none.dmarc_policy) == ("none", None)


async def test_authentication_results_header_names_every_check():
    records = SPF | key_records() | {("_dmarc.acme.example", "TXT"): ["v=DMARC1; p=none"]}
    auth = await authenticate(signed(), "shop@acme.example", "h", IP, FakeLookup(records))
    header = auth.header("mx.google.com")
    assert header.startswith("Authentication-Results: mx.google.com;")
    for part in ("dkim=pass header.d=acme.example header.s=axrsa", "spf=pass", "dmarc=pass"):
        assert part in header


def test_header_from_needs_exactly_one_address():
    assert header_from_domain(MESSAGE) == "acme.example"
    assert header_from_domain(b"From: a@x.example, b@y.example\r\n\r\n") is None
    assert header_from_domain(b"Subject: none\r\n\r\n") is None


@pytest.mark.parametrize(
    ("name", "organisational"),
    [
        ("acme.example", "acme.example"),
        ("news.acme.example", "acme.example"),
        ("a.b.example.com", "example.com"),
        ("shop.co.uk", "shop.co.uk"),  # "the last two labels" would say co.uk
        ("bounces.shop.co.uk", "shop.co.uk"),
        ("comune.roma.it", "comune.roma.it"),  # roma.it is a public suffix
        ("relay.axiom.test", "axiom.test"),  # an unknown TLD counts as a public suffix
        ("Shop.CO.UK.", "shop.co.uk"),
        ("co.uk", "co.uk"),  # a public suffix is its own
    ],
)
def test_organisational_domain_comes_from_the_public_suffix_list(name, organisational):
    assert organisational_domain(name) == organisational


async def test_dmarc_alignment_under_a_multi_label_public_suffix():
    """Under co.uk, two customers are two organisations: a signature of other.co.uk does not
    align with From: shop.co.uk (the last two labels, co.uk, would have said it does), while a
    return path under shop.co.uk aligns with it."""
    uk = MESSAGE.replace(b"shop@acme.example", b"shop@shop.co.uk")
    records = key_records("other.co.uk") | {("_dmarc.shop.co.uk", "TXT"): ["v=DMARC1; p=reject"]}
    other = await authenticate(
        signed(uk, "other.co.uk"), "b@other.co.uk", "h", IP, FakeLookup(records)
    )
    assert other.dkim_pass and other.from_domain == "shop.co.uk"
    assert (other.dmarc, other.dmarc_policy) == ("fail", "reject")

    records = {
        ("bounces.shop.co.uk", "TXT"): ["v=spf1 include:_spf.relay.axiom.test ~all"],
        ("_spf.relay.axiom.test", "TXT"): ["v=spf1 ip4:127.0.0.10 -all"],
        ("_dmarc.shop.co.uk", "TXT"): ["v=DMARC1; p=reject"],
    }
    ours = await authenticate(uk, "bounces+x@bounces.shop.co.uk", "h", IP, FakeLookup(records))
    assert (ours.spf, ours.dkim) == ("pass", ())
    assert (ours.dmarc, ours.dmarc_policy) == ("pass", "reject")


async def test_a_subdomain_under_a_public_suffix_finds_its_organisations_dmarc_record():
    """news.shop.co.uk has no record of its own: the one at _dmarc.shop.co.uk applies (its sp=),
    and _dmarc.co.uk, a public suffix's, is never asked."""
    data = MESSAGE.replace(b"shop@acme.example", b"shop@news.shop.co.uk")
    lookup = FakeLookup({("_dmarc.shop.co.uk", "TXT"): ["v=DMARC1; p=none; sp=reject"]})
    auth = await authenticate(data, "", "h", IP, lookup)
    assert (auth.from_domain, auth.dmarc, auth.dmarc_policy) == (
        "news.shop.co.uk",
        "fail",
        "reject",
    )
    assert ("_dmarc.co.uk", "TXT") not in lookup.asked


def test_the_sandbox_dns_names_the_organisational_domain_in_negative_answers():
    from sandbox.behaviour import behaviour
    from sandbox.zones import NXDOMAIN, Zone

    zone = Zone(behaviour(), [])
    for name, apex in [
        ("nobody.shop.co.uk", "shop.co.uk"),
        ("_dmarc.news.acme.example", "acme.example"),
        ("x.relay.axiom.test", "axiom.test"),
        ("10.0.0.127.in-addr.arpa", "in-addr.arpa"),
    ]:
        answer = zone.answer(name, "TXT")
        assert answer.rcode == NXDOMAIN and answer.soa is not None
        assert answer.soa.name == apex, name

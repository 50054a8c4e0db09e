"""protocol/dns_checks.py without a network: organisational domains, record comparison, the
result's shape. The checks against real DNS are in tests/integration/test_dns_checks.py."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from protocol.dns_checks import (
    Check,
    DomainCheck,
    _dkim_key,
    _rua_addresses,
    _spf_includes,
    _spf_targets,
    organisational_domain,
)

NOW = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("name", "organisational"),
    [
        ("foo.co.uk", "foo.co.uk"),
        ("bounces.foo.co.uk", "foo.co.uk"),
        ("a.b.example.com", "example.com"),
        ("example.com", "example.com"),
        ("negozio.it", "negozio.it"),
        ("posta.comune.roma.it", "comune.roma.it"),  # roma.it is a public suffix
        ("shop.blogspot.com", "shop.blogspot.com"),  # the list's private section counts too
        ("bounces.shop.test", "shop.test"),  # an unknown TLD is taken as a public suffix
        ("A.B.Example.COM.", "example.com"),
        ("co.uk", "co.uk"),  # a public suffix is its own
    ],
)
def test_organisational_domain_comes_from_the_public_suffix_list(name, organisational):
    assert organisational_domain(name) == organisational


@pytest.mark.parametrize(
    ("published", "same"),
    [
        ("v=DKIM1; k=rsa; p=MIIBIjANBgkq", True),
        ("v=DKIM1;k=rsa;p=MIIBIjANBgkq", True),  # spacing
        ("v=DKIM1; p=MIIBIjANBgkq; k=rsa", True),  # tag order
        ("v=DKIM1; k=rsa; p=MIIBIj ANBg kq", True),  # whitespace inside the key
        ("v=DKIM1; p=MIIBIjANBgkq", True),  # k= defaults to rsa
        ("v=DKIM1; k=RSA; p=MIIBIjANBgkq", True),
        ("v=DKIM1; k=rsa; p=MIIBIjANBgkr", False),  # another key
        ("v=DKIM1; k=ed25519; p=MIIBIjANBgkq", False),
        ("v=DKIM1; k=rsa; p=", False),  # revoked
    ],
)
def test_dkim_records_compare_by_key_type_and_key(published, same):
    assert (_dkim_key(published) == _dkim_key("v=DKIM1; k=rsa; p=MIIBIjANBgkq")) is same


def test_spf_targets_stop_at_all_and_a_redirect_counts_only_without_one():
    assert _spf_targets("v=spf1 include:a.test -include:B.test. ~all include:late.test") == [
        ("a.test", False),
        ("b.test", False),
    ]
    assert _spf_targets("v=spf1 ip4:192.0.2.1 redirect=_spf.esp.test") == [("_spf.esp.test", True)]
    assert _spf_targets("v=spf1 redirect=_spf.esp.test -all") == []


def test_what_is_expected_is_read_from_the_records_we_ask_for():
    assert _spf_includes("v=spf1 include:_spf.relay.axiom.test ~all") == ("_spf.relay.axiom.test",)
    assert _rua_addresses(
        "v=DMARC1; p=none; rua=mailto:dmarc@relay.axiom.test,mailto:X@Other.test!10m"
    ) == ("dmarc@relay.axiom.test", "x@other.test")
    assert _rua_addresses("v=DMARC1; p=none") == ()


def test_a_warning_never_holds_a_domain_back_and_missing_names_both():
    rows = [
        Check("spf.record", True, "one SPF record"),
        Check("dmarc.rua", False, "reports go elsewhere", level="warn"),
        Check("fcrdns:192.0.2.1", True, "confirmed", owner="relay"),
    ]
    result = DomainCheck("shop.test", rows, NOW)
    assert result.passed
    assert [c.name for c in result.missing()] == ["dmarc.rua"]

    failing = DomainCheck(
        "shop.test",
        [*rows, Check("fcrdns:192.0.2.2", False, "no PTR", owner="relay", transient=True)],
        NOW,
    )
    assert not failing.passed and failing.transient
    assert [c.name for c in failing.missing()] == ["dmarc.rua", "fcrdns:192.0.2.2"]
    assert [c.name for c in failing.missing("customer")] == ["dmarc.rua"]
    assert failing.get("fcrdns:192.0.2.2").blocking
    assert failing.get("nothing") is None


def test_the_json_form_is_what_domain_dns_checks_stores_and_reads_back():
    import json

    result = DomainCheck(
        "shop.test",
        [
            Check("spf.record", False, "two", "a | b", "v=spf1 ~all"),
            Check("dmarc.rua", False, "elsewhere", level="warn"),
        ],
        NOW,
    )
    data = json.loads(json.dumps(result.as_json()))
    assert data["passed"] is False and data["checked_at"] == "2026-11-26T09:00:00+00:00"
    assert data["checks"][0] == {
        "name": "spf.record",
        "ok": False,
        "level": "error",
        "owner": "customer",
        "transient": False,
        "reason": "two",
        "found": "a | b",
        "expected": "v=spf1 ~all",
    }
    assert DomainCheck.from_json(data) == result

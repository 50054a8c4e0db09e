"""relay/dns.py against a real authoritative server (Knot) on loopback."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator

import pytest

from config.settings import load_settings
from relay.delivery.dns import Resolver
from testbed.dns import KnotServer, SilentNameserver, merge_zones, ptr_zones

pytestmark = pytest.mark.integration

ZONES = merge_zones(
    {
        "example.test": [
            ("@", "MX", "20 backup"),
            ("@", "MX", "10 mx-a"),
            ("@", "MX", "10 mx-b"),
            ("@", "MX", "10 mx-c"),
            ("@", "TXT", "v=spf1 ip4:127.0.0.0/8 -all"),
            ("mx-a", "A", "127.0.0.11"),
            ("mx-b", "A", "127.0.0.12"),
            ("mx-c", "A", "127.0.0.13"),
            ("mx-c", "AAAA", "::1"),
            ("backup", "A", "127.0.0.20"),
        ],
        "implicit.test": [("@", "A", "127.0.0.30"), ("@", "AAAA", "::1")],
        "nullmx.test": [("@", "MX", "0 .")],
        "nomail.test": [("@", "TXT", "no mail here")],
        "deadmx.test": [("@", "MX", "10 nowhere.deadmx.test.")],
        "ttl.test": [
            ("@", "MX", "10 old", 2),
            ("old", "A", "127.0.0.40"),
            ("new", "A", "127.0.0.41"),
        ],
        "bl.test": [("2.0.0.127", "A", "127.0.0.2"), ("2.0.0.127", "TXT", "x" * 300)],
    },
    ptr_zones({"127.0.0.10": "relay.axiom.test", "127.0.0.11": "mx-a.example.test"}),
)


@pytest.fixture
def knot() -> Iterator[KnotServer]:
    with KnotServer(ZONES, servfail=["broken.test"]) as server:
        yield server


def resolver_for(*servers, **options) -> Resolver:
    options.setdefault("timeout", 0.5)
    options.setdefault("lifetime", 1.5)
    return Resolver.at([(s.host, s.port) for s in servers], **options)


async def test_mx_targets_in_preference_order_with_equal_ones_shuffled(knot):
    resolver = resolver_for(knot)
    orders = set()
    for _ in range(40):
        result = await resolver.resolve_mx("example.test")
        assert result.ok and not result.implicit
        names = [t.host for t in result.targets]
        assert [t.preference for t in result.targets] == [10, 10, 10, 20]
        assert sorted(names[:3]) == ["mx-a.example.test", "mx-b.example.test", "mx-c.example.test"]
        assert names[3] == "backup.example.test"
        orders.add(tuple(names[:3]))
    assert len(orders) >= 3, orders  # 40 draws of 6 orders: all the same would be a bug
    by_host = {t.host: t.addresses for t in result.targets}
    assert by_host["mx-c.example.test"] == ("127.0.0.13", "::1")
    assert by_host["backup.example.test"] == ("127.0.0.20",)


async def test_without_mx_the_domain_address_is_the_target(knot):
    result = await resolver_for(knot).resolve_mx("implicit.test")
    assert result.ok and result.implicit
    assert list(result.endpoints()) == [("implicit.test", "127.0.0.30"), ("implicit.test", "::1")]


async def test_null_mx_is_permanent_5_1_10(knot):
    result = await resolver_for(knot).resolve_mx("nullmx.test")
    assert result.permanent and result.failure.enhanced_code == "5.1.10"
    assert result.failure.kind == "null_mx"


async def test_nxdomain_is_permanent_5_1_2(knot):
    result = await resolver_for(knot).resolve_mx("nonexistent.example.test")
    assert result.permanent and result.failure.enhanced_code == "5.1.2"
    assert result.failure.kind == "nxdomain"
    # cached for the zone's negative TTL (RFC 2308: the SOA minimum), here 30 s
    assert (await resolver_for(knot).lookup("nonexistent.example.test", "MX")).ttl == 30


async def test_no_mx_and_no_address_is_permanent(knot):
    result = await resolver_for(knot).resolve_mx("nomail.test")
    assert result.permanent and result.failure.kind == "no_mail_records"
    nodata = await resolver_for(knot).lookup("nomail.test", "MX")
    assert nodata.status == "nodata" and nodata.ttl == 30


async def test_mx_host_that_does_not_exist_is_permanent_no_route(knot):
    result = await resolver_for(knot).resolve_mx("deadmx.test")
    assert result.permanent and result.failure.enhanced_code == "5.4.4"


async def test_servfail_is_transient_4_4_3(knot):
    result = await resolver_for(knot).resolve_mx("mail.broken.test")
    assert result.transient and result.failure.enhanced_code == "4.4.3"
    assert "SERVFAIL" in result.failure.reason


async def test_one_name_can_fail_while_its_parent_zone_answers(knot):
    resolver = resolver_for(knot)
    knot.servfail("sick.example.test")  # the most specific zone wins, and it is broken
    sick = await resolver.resolve_mx("sick.example.test")
    assert sick.transient and "SERVFAIL" in sick.failure.reason
    assert (await resolver.resolve_mx("example.test")).ok


async def test_a_zone_that_starts_failing_is_transient_then_recovers(knot):
    resolver = resolver_for(knot)
    assert (await resolver.resolve_mx("implicit.test")).ok
    resolver.forget()
    knot.servfail("implicit.test")
    assert (await resolver.resolve_mx("implicit.test")).transient
    knot.set_zone("implicit.test", [("@", "A", "127.0.0.31")])
    result = await resolver.resolve_mx("implicit.test")  # failures were not cached
    assert list(result.endpoints()) == [("implicit.test", "127.0.0.31")]


async def test_a_nameserver_that_never_answers_is_transient_within_bounds():
    with SilentNameserver() as silent:
        resolver = resolver_for(silent, timeout=0.3, lifetime=1.0, deadline=3.0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await resolver.resolve_mx("example.test")
        elapsed = loop.time() - started
    assert result.transient and result.failure.enhanced_code == "4.4.3"
    assert "timeout" in result.failure.reason
    assert elapsed < 2.5, elapsed


async def test_the_overall_deadline_bounds_a_slow_resolution():
    with SilentNameserver() as silent:
        resolver = resolver_for(silent, timeout=5, lifetime=30, deadline=0.5)
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await resolver.resolve_mx("example.test")
        assert loop.time() - started < 1.5
    assert result.transient and result.failure.enhanced_code == "4.4.3"


async def test_a_stopped_server_is_transient(knot):
    resolver = resolver_for(knot)
    knot.stop()
    result = await resolver.resolve_mx("example.test")
    assert result.transient and result.failure.enhanced_code == "4.4.3"


async def test_the_next_nameserver_answers_when_the_first_is_silent(knot):
    with SilentNameserver() as silent:
        resolver = resolver_for(silent, knot, timeout=0.3, lifetime=3.0)
        result = await resolver.resolve_mx("implicit.test")
    assert result.ok and result.targets[0].addresses[0] == "127.0.0.30"


async def test_ttl_expiry_shows_a_zone_change_after_reload(knot):
    now = [0.0]
    resolver = resolver_for(knot, clock=lambda: now[0])
    first = await resolver.resolve_mx("ttl.test")
    assert [t.host for t in first.targets] == ["old.ttl.test"]

    knot.set_zone(
        "ttl.test",
        [("@", "MX", "10 new", 2), ("old", "A", "127.0.0.40"), ("new", "A", "127.0.0.41")],
    )
    now[0] = 1.9  # within the MX TTL of 2 s: the cached answer
    assert [t.host for t in (await resolver.resolve_mx("ttl.test")).targets] == ["old.ttl.test"]
    now[0] = 2.0  # expired: asked again, the reloaded zone answers
    result = await resolver.resolve_mx("ttl.test")
    assert list(result.endpoints()) == [("new.ttl.test", "127.0.0.41")]


async def test_ptr_of_127_0_0_10(knot):
    resolver = resolver_for(knot)
    lookup = await resolver.ptr_name("127.0.0.10")
    assert lookup.found and lookup.value == "relay.axiom.test"
    missing = await resolver.ptr_name("127.0.0.99")
    assert missing.status == "nxdomain" and missing.value is None and not missing.transient


async def test_txt_and_blocklist_style_lookups(knot):
    resolver = resolver_for(knot)
    assert (await resolver.txt("example.test")).values == ("v=spf1 ip4:127.0.0.0/8 -all",)
    listed = await resolver.txt("2.0.0.127.bl.test")
    assert listed.values == ("x" * 300,)  # two character-strings, joined
    assert (await resolver.addresses("2.0.0.127.bl.test")).values == ("127.0.0.2",)
    not_listed = await resolver.addresses("3.0.0.127.bl.test")
    assert not_listed.status == "nxdomain" and not not_listed.transient
    assert (await resolver.txt("x.broken.test")).transient


async def test_settings_drive_the_resolver(knot, monkeypatch):
    monkeypatch.setenv("AXIOM_DNS_NAMESERVERS", knot.nameserver)
    resolver = Resolver.from_settings(load_settings())
    result = await resolver.resolve_mx("implicit.test")
    assert result.ok and result.targets[0].addresses[0] == "127.0.0.30"


async def test_two_servers_side_by_side_answer_their_own_zones():
    with (
        KnotServer({"one.test": [("@", "A", "127.0.0.51")]}) as one,
        KnotServer({"one.test": [("@", "A", "127.0.0.52")]}, host="127.0.0.2") as two,
    ):
        assert one.port != two.port or one.host != two.host
        a = await resolver_for(one).resolve_mx("one.test")
        b = await resolver_for(two).resolve_mx("one.test")
        assert a.targets[0].addresses == ("127.0.0.51",)
        assert b.targets[0].addresses == ("127.0.0.52",)


def test_stop_leaves_no_process_behind():
    server = KnotServer({"gone.test": [("@", "A", "127.0.0.1")]}).start()
    pid = server._proc.pid
    directory = server._dir
    server.stop()
    assert not os.path.exists(f"/proc/{pid}")  # ended and reaped
    assert not directory.exists()
    left = subprocess.run(["pgrep", "-f", str(directory)], capture_output=True, text=True)
    assert left.stdout == ""

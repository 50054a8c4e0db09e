"""relay/dns.py without a network: ordering, caching and classification over a fake backend."""

from __future__ import annotations

import asyncio
import random

import pytest

from config.settings import ConfigError, load_settings, parse_nameserver
from relay.delivery.dns import DnspythonBackend, Lookup, MxResult, Resolver


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeBackend:
    """Answers from a dict; unknown questions are NODATA for names under a known domain."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], Lookup] = {}
        self.queries: list[tuple[str, str]] = []
        self.gate: asyncio.Event | None = None

    def answer(self, name: str, rdtype: str, *values: str, ttl: int = 300) -> None:
        self.answers[name, rdtype] = Lookup(name, rdtype, "answer", values, ttl)

    def nxdomain(self, name: str, ttl: int = 60) -> None:
        for rdtype in ("MX", "A", "AAAA", "TXT", "PTR"):
            self.answers[name, rdtype] = Lookup(name, rdtype, "nxdomain", ttl=ttl)

    def nodata(self, name: str, rdtype: str, ttl: int = 30) -> None:
        self.answers[name, rdtype] = Lookup(name, rdtype, "nodata", ttl=ttl)

    def error(self, name: str, rdtype: str, detail: str = "SERVFAIL from test") -> None:
        self.answers[name, rdtype] = Lookup(name, rdtype, "error", detail=detail)

    async def query(self, name: str, rdtype: str) -> Lookup:
        self.queries.append((name, rdtype))
        if self.gate is not None:
            await self.gate.wait()
        return self.answers.get((name, rdtype), Lookup(name, rdtype, "nodata", ttl=30))


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def resolver(backend, clock) -> Resolver:
    return Resolver(backend, clock=clock, rng=random.Random(7))


def hosts(result: MxResult) -> list[str]:
    return [t.host for t in result.targets]


# --- ordering ---


async def test_targets_follow_mx_preference_with_their_addresses(backend, resolver):
    backend.answer("example.test", "MX", "20 c.example.test.", "5 a.example.test.", "10 b.mx.test.")
    backend.answer("a.example.test", "A", "192.0.2.1")
    backend.answer("a.example.test", "AAAA", "2001:db8::1")
    backend.answer("b.mx.test", "A", "192.0.2.2")
    backend.answer("c.example.test", "AAAA", "2001:db8::3")

    result = await resolver.resolve_mx("Example.TEST.")

    assert result.ok and not result.implicit and result.domain == "example.test"
    assert hosts(result) == ["a.example.test", "b.mx.test", "c.example.test"]
    assert [t.preference for t in result.targets] == [5, 10, 20]
    assert result.targets[0].addresses == ("192.0.2.1", "2001:db8::1")
    assert list(result.endpoints()) == [
        ("a.example.test", "192.0.2.1"),
        ("a.example.test", "2001:db8::1"),
        ("b.mx.test", "192.0.2.2"),
        ("c.example.test", "2001:db8::3"),
    ]


async def test_equal_preferences_are_shuffled_on_every_call_lower_ones_stay_first(
    backend, resolver
):
    backend.answer("example.test", "MX", "1 first.test.", "10 x.test.", "10 y.test.", "10 z.test.")
    for host in ("first.test", "x.test", "y.test", "z.test"):
        backend.answer(host, "A", "192.0.2.9")

    seen = set()
    for _ in range(60):
        result = await resolver.resolve_mx("example.test")
        order = hosts(result)
        assert order[0] == "first.test"
        assert sorted(order[1:]) == ["x.test", "y.test", "z.test"]
        seen.add(tuple(order[1:]))
    assert len(seen) == 6  # every permutation of the three equals turns up
    assert backend.queries.count(("example.test", "MX")) == 1  # the shuffle is not cached


async def test_same_seed_same_order(backend, clock):
    backend.answer("example.test", "MX", *(f"10 h{i}.test." for i in range(8)))
    for i in range(8):
        backend.answer(f"h{i}.test", "A", f"192.0.2.{i}")
    one = Resolver(backend, clock=clock, rng=random.Random(1))
    two = Resolver(backend, clock=clock, rng=random.Random(1))
    assert hosts(await one.resolve_mx("example.test")) == hosts(
        await two.resolve_mx("example.test")
    )


async def test_a_host_listed_twice_keeps_its_best_preference(backend, resolver):
    backend.answer("example.test", "MX", "30 mx.test.", "10 mx.test.", "20 other.test.")
    backend.answer("mx.test", "A", "192.0.2.1")
    backend.answer("other.test", "A", "192.0.2.2")
    result = await resolver.resolve_mx("example.test")
    assert [(t.host, t.preference) for t in result.targets] == [
        ("mx.test", 10),
        ("other.test", 20),
    ]


async def test_mx_hosts_beyond_the_limit_are_not_resolved(backend, clock):
    backend.answer("example.test", "MX", *(f"{i} h{i}.test." for i in range(30)))
    for i in range(30):
        backend.answer(f"h{i}.test", "A", "192.0.2.1")
    resolver = Resolver(backend, clock=clock, max_mx_hosts=3)
    result = await resolver.resolve_mx("example.test")
    assert hosts(result) == ["h0.test", "h1.test", "h2.test"]
    assert not any(name.startswith("h29") for name, _ in backend.queries)


async def test_no_mx_means_the_domain_itself_is_the_target(backend, resolver):
    backend.answer("example.test", "A", "192.0.2.7")
    backend.answer("example.test", "AAAA", "2001:db8::7")
    result = await resolver.resolve_mx("example.test")
    assert result.ok and result.implicit
    assert [(t.host, t.preference, t.addresses) for t in result.targets] == [
        ("example.test", 0, ("192.0.2.7", "2001:db8::7"))
    ]


async def test_an_mx_host_without_address_is_skipped(backend, resolver):
    backend.answer("example.test", "MX", "5 gone.test.", "10 ok.test.")
    backend.nxdomain("gone.test")
    backend.answer("ok.test", "A", "192.0.2.5")
    result = await resolver.resolve_mx("example.test")
    assert result.ok and hosts(result) == ["ok.test"]
    assert result.skipped == ("gone.test",)


async def test_address_literal_needs_no_dns(backend, resolver):
    result = await resolver.resolve_mx("[192.0.2.44]")
    assert result.ok and list(result.endpoints()) == [("192.0.2.44", "192.0.2.44")]
    result = await resolver.resolve_mx("[IPv6:2001:db8::44]")
    assert list(result.endpoints()) == [("2001:db8::44", "2001:db8::44")]
    assert backend.queries == []


async def test_international_domain_is_asked_in_a_labels(backend, resolver):
    backend.answer("xn--bcher-kva.test", "MX", "10 mx.test.")
    backend.answer("mx.test", "A", "192.0.2.1")
    result = await resolver.resolve_mx("Bücher.test")
    assert result.ok and result.domain == "xn--bcher-kva.test"


# --- classification ---


@pytest.mark.parametrize(
    ("setup", "permanent", "code", "kind"),
    [
        (lambda b: b.answer("d.test", "MX", "0 ."), True, "5.1.10", "null_mx"),
        (lambda b: b.nxdomain("d.test"), True, "5.1.2", "nxdomain"),
        (lambda b: None, True, "5.1.2", "no_mail_records"),  # NODATA for MX, A and AAAA
        (lambda b: b.error("d.test", "MX"), False, "4.4.3", "dns_error"),
        (lambda b: b.error("d.test", "MX", "timeout"), False, "4.4.3", "dns_error"),
        (lambda b: b.error("d.test", "A"), False, "4.4.3", "dns_error"),  # implicit MX lookup
        (
            lambda b: (b.answer("d.test", "MX", "10 mx.test."), b.nxdomain("mx.test")),
            True,
            "5.4.4",
            "mx_unresolvable",
        ),
        (
            lambda b: (
                b.answer("d.test", "MX", "10 mx.test.", "20 mx2.test."),
                b.nxdomain("mx.test"),
                b.error("mx2.test", "AAAA"),
            ),
            False,
            "4.4.3",
            "dns_error",
        ),
    ],
    ids=[
        "null-mx",
        "nxdomain",
        "no-records",
        "mx-servfail",
        "mx-timeout",
        "implicit-a-fails",
        "mx-hosts-nxdomain",
        "mx-host-servfail",
    ],
)
async def test_failures_are_classified_once(backend, resolver, setup, permanent, code, kind):
    setup(backend)
    result = await resolver.resolve_mx("d.test")
    assert not result.ok and result.targets == ()
    assert result.failure is not None
    assert (result.failure.permanent, result.failure.enhanced_code, result.failure.kind) == (
        permanent,
        code,
        kind,
    )
    assert result.permanent is permanent and result.transient is not permanent
    assert result.failure.reason.startswith("d.test: ")


async def test_a_null_mx_beside_real_ones_is_ignored(backend, resolver):
    backend.answer("d.test", "MX", "0 .", "10 mx.test.")
    backend.answer("mx.test", "A", "192.0.2.1")
    result = await resolver.resolve_mx("d.test")
    assert result.ok and hosts(result) == ["mx.test"]


async def test_an_address_answer_wins_over_a_failed_other_family(backend, resolver):
    backend.answer("d.test", "MX", "10 mx.test.")
    backend.answer("mx.test", "A", "192.0.2.1")
    backend.error("mx.test", "AAAA")
    result = await resolver.resolve_mx("d.test")
    assert result.ok and result.targets[0].addresses == ("192.0.2.1",)


@pytest.mark.parametrize(
    "domain", ["", ".", "a..b.test", "exa mple.test", "under_score.test", "nodot", "[1.2.3]"]
)
async def test_an_impossible_domain_is_permanent_without_asking(backend, resolver, domain):
    result = await resolver.resolve_mx(domain)
    assert result.permanent and result.failure.enhanced_code == "5.1.2"
    assert result.failure.kind == "invalid_domain"
    assert backend.queries == []


async def test_a_resolution_that_hangs_is_transient_at_the_deadline(backend, clock):
    backend.gate = asyncio.Event()  # never set: every query hangs
    resolver = Resolver(backend, clock=clock, deadline=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await resolver.resolve_mx("d.test")
    assert loop.time() - started < 1.0
    assert result.transient and result.failure.enhanced_code == "4.4.3"


# --- the cache ---


async def test_answers_are_cached_for_their_ttl(backend, resolver, clock):
    backend.answer("d.test", "MX", "10 mx.test.", ttl=300)
    backend.answer("mx.test", "A", "192.0.2.1", ttl=600)
    backend.nodata("mx.test", "AAAA", ttl=600)
    await resolver.resolve_mx("d.test")
    first = len(backend.queries)
    assert first == 3  # MX, A, AAAA

    clock.advance(299)
    await resolver.resolve_mx("d.test")
    assert len(backend.queries) == first

    backend.answer("d.test", "MX", "10 new.test.", ttl=300)
    backend.answer("new.test", "A", "192.0.2.2")
    clock.advance(1)  # the MX answer has now lived its 300 s
    result = await resolver.resolve_mx("d.test")
    assert hosts(result) == ["new.test"]
    assert backend.queries[first] == ("d.test", "MX")


async def test_negative_answers_are_cached_for_their_negative_ttl(backend, resolver, clock):
    backend.nxdomain("d.test", ttl=60)
    assert (await resolver.resolve_mx("d.test")).failure.kind == "nxdomain"
    clock.advance(59)
    assert (await resolver.resolve_mx("d.test")).failure.kind == "nxdomain"
    assert backend.queries == [("d.test", "MX")]

    backend.answer("d.test", "MX", "10 mx.test.")
    backend.answer("mx.test", "A", "192.0.2.1")
    clock.advance(1)
    assert (await resolver.resolve_mx("d.test")).ok


async def test_failures_are_not_cached(backend, resolver):
    backend.error("d.test", "MX")
    assert (await resolver.resolve_mx("d.test")).transient
    backend.answer("d.test", "MX", "10 mx.test.")
    backend.answer("mx.test", "A", "192.0.2.1")
    assert (await resolver.resolve_mx("d.test")).ok


async def test_zero_ttl_is_never_cached_and_long_ttls_are_capped(backend, clock):
    resolver = Resolver(backend, clock=clock, max_ttl=3600)
    backend.answer("zero.test", "TXT", "a", ttl=0)
    backend.answer("long.test", "TXT", "b", ttl=10**9)
    await resolver.txt("zero.test")
    await resolver.txt("zero.test")
    assert backend.queries.count(("zero.test", "TXT")) == 2
    await resolver.txt("long.test")
    clock.advance(3599)
    await resolver.txt("long.test")
    assert backend.queries.count(("long.test", "TXT")) == 1
    clock.advance(1)
    await resolver.txt("long.test")
    assert backend.queries.count(("long.test", "TXT")) == 2


async def test_concurrent_askers_share_one_query(backend, resolver):
    backend.answer("d.test", "TXT", "v=spf1 -all")
    backend.gate = asyncio.Event()
    tasks = [asyncio.create_task(resolver.txt("d.test")) for _ in range(20)]
    await asyncio.sleep(0)
    backend.gate.set()
    results = await asyncio.gather(*tasks)
    assert {r.values for r in results} == {("v=spf1 -all",)}
    assert backend.queries == [("d.test", "TXT")]


async def test_a_cancelled_asker_does_not_cancel_the_others(backend, resolver):
    backend.answer("d.test", "TXT", "x")
    backend.gate = asyncio.Event()
    impatient = asyncio.create_task(resolver.txt("d.test"))
    patient = asyncio.create_task(resolver.txt("d.test"))
    await asyncio.sleep(0)
    impatient.cancel()
    backend.gate.set()
    assert (await patient).values == ("x",)
    assert backend.queries == [("d.test", "TXT")]


async def test_the_cache_is_bounded(backend, clock):
    resolver = Resolver(backend, clock=clock, max_entries=10)
    for i in range(25):
        backend.answer(f"n{i}.test", "TXT", str(i))
        await resolver.txt(f"n{i}.test")
    assert len(resolver._cache) <= 10
    await resolver.txt("n24.test")  # the newest stayed
    assert backend.queries.count(("n24.test", "TXT")) == 1


# --- PTR and TXT ---


async def test_ptr_name_asks_the_reverse_name(backend, resolver):
    backend.answer("10.0.0.127.in-addr.arpa", "PTR", "relay.axiom.test")
    lookup = await resolver.ptr_name("127.0.0.10")
    assert lookup.found and lookup.value == "relay.axiom.test"
    assert backend.queries == [("10.0.0.127.in-addr.arpa", "PTR")]
    missing = await resolver.ptr_name("2001:db8::1")
    assert not missing.found and missing.value is None and not missing.transient
    assert backend.queries[-1][0].endswith(".8.b.d.0.1.0.0.2.ip6.arpa")


async def test_txt_failure_is_transient_data_not_an_exception(backend, resolver):
    backend.error("zone.bl.test", "TXT")
    lookup = await resolver.txt("zone.bl.test")
    assert lookup.transient and not lookup.found and "SERVFAIL" in lookup.detail


async def test_bad_names_for_helpers_are_programming_errors(resolver):
    with pytest.raises(ValueError):
        await resolver.txt("a..b")
    with pytest.raises(ValueError):
        await resolver.ptr_name("not-an-ip")


# --- settings ---


@pytest.mark.parametrize(
    ("entry", "parsed"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]", ("::1", 53)),
        ("[2001:db8::1]:5300", ("2001:db8::1", 5300)),
        (" 10.0.0.1 ", ("10.0.0.1", 53)),
    ],
)
def test_parse_nameserver(entry, parsed):
    assert parse_nameserver(entry) == parsed


def test_nameservers_setting_from_environment(monkeypatch):
    monkeypatch.setenv("AXIOM_DNS_NAMESERVERS", "127.0.0.1:5353, [::1]:53")
    monkeypatch.setenv("AXIOM_DELIVERY_PORT", "2526")
    settings = load_settings()
    assert settings.dns_nameservers == ("127.0.0.1:5353", "[::1]:53")
    assert settings.delivery_port == 2526
    resolver = Resolver.from_settings(settings)
    assert isinstance(resolver.backend, DnspythonBackend)
    assert [(ns.address, ns.port) for ns in resolver.backend.resolver.nameservers] == [
        ("127.0.0.1", 5353),
        ("::1", 53),
    ]


def test_defaults_are_the_system_resolver_and_port_25(monkeypatch):
    monkeypatch.delenv("AXIOM_DNS_NAMESERVERS", raising=False)
    monkeypatch.delenv("AXIOM_DELIVERY_PORT", raising=False)
    settings = load_settings()
    assert settings.dns_nameservers == ()
    assert settings.delivery_port == 25
    backend = Resolver.from_settings(settings).backend  # /etc/resolv.conf, or none at all
    assert isinstance(backend, DnspythonBackend)
    assert backend.resolver.lifetime == 5.0


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("ns1.example.com", "'ns1.example.com' is not an IP address"),
        ("127.0.0.1:0", "port must be 1-65535"),
        ("127.0.0.1:99999", "port must be 1-65535"),
        ("127.0.0.1:dns", "port must be 1-65535"),
        ("127.0.0.1,[::1", "expected [IPv6] or [IPv6]:PORT"),
        ("[::1]53", "expected [IPv6] or [IPv6]:PORT"),
    ],
)
def test_a_bad_nameserver_stops_start_up_with_one_line(monkeypatch, value, needle):
    monkeypatch.setenv("AXIOM_DNS_NAMESERVERS", value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith("AXIOM_DNS_NAMESERVERS: ")
    assert needle in message and "\n" not in message


@pytest.mark.parametrize("value", ["0", "65536", "smtp"])
def test_a_bad_delivery_port_stops_start_up(monkeypatch, value):
    monkeypatch.setenv("AXIOM_DELIVERY_PORT", value)
    with pytest.raises(ConfigError, match=r"^AXIOM_DELIVERY_PORT: "):
        load_settings()

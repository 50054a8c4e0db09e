"""`axiom sandbox …` as operators and `axiom up` use it: the world as its own process, steered
from another, and scenarios driving real mail through a running relay into it."""

from __future__ import annotations

import json
import subprocess
import time

import dns.message
import dns.query
import dns.rcode
import pytest

from sandbox.testing import free_dns_port, private_mx_network
from testbed import cli as axiom_cli
from testbed.axiom import AxiomProcess, log_says
from tests.conftest import VENV_BIN, RelayProcess, seed_tenant

pytestmark = pytest.mark.integration


class WorldProcess(AxiomProcess):
    """`axiom sandbox run` on private addresses: forked from the tests' zygote when it can be,
    as the relay is (testbed/axiom.py), ready when its log says so."""

    forkable = True

    def __init__(self, home):
        self.home = home
        network, port = private_mx_network()
        self.dns_port = free_dns_port()
        super().__init__(
            ["sandbox", "run"],
            home.env
            | {
                "AXIOM_SANDBOX_DNS_LISTEN": f"127.0.0.1:{self.dns_port}",
                "AXIOM_SANDBOX_MX_NETWORK": network,
                "AXIOM_DELIVERY_PORT": str(port),
            },
            home.path / "sandbox.log",
            ready=log_says(b"sandbox ready"),
        )

    def start(self, timeout: float = 30) -> WorldProcess:
        super().start(timeout)
        return self

    def cli(self, *args: str, check: bool = True, timeout: float = 120):
        result = axiom_cli.run(["sandbox", *args], self.env, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(
                f"axiom sandbox {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def ask(self, name: str, rdtype: str = "A"):
        query = dns.message.make_query(name, rdtype)
        return dns.query.udp(query, "127.0.0.1", port=self.dns_port, timeout=2)


@pytest.fixture
def world(axiom_home):
    w = WorldProcess(axiom_home).start()
    yield w
    w.stop()


# A cold IP takes its day's allowance at once (sandbox/behaviour.yaml: cold_allowance 40,
# burst_share 1.0): the campaign offers 50 a provider from the stack's one IP, so the last 10
# meet the providers' rate-limit replies (or the suspensions those caused).
COLD_COUNT = 200


def cold_allowance() -> int:
    from sandbox.behaviour import behaviour

    daily = behaviour().reputation.daily
    return int(daily.burst_share * daily.cold_allowance)


def _wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_the_world_runs_in_the_foreground_and_stops_on_sigterm(world):
    status = json.loads(world.cli("status", "--json").stdout)
    assert status["running"] is True
    assert status["world"]["dns"] == f"127.0.0.1:{world.dns_port}"
    assert set(status["world"]["mx"]) == {"google", "microsoft", "yahoo", "apple", "generic"}
    assert world.ask("gmail.com", "MX").answer
    assert world.stop() == 0
    status = json.loads(world.cli("status", "--json").stdout)
    assert status["running"] is False
    assert "not running" in world.cli("status").stdout


def test_a_second_world_on_the_same_addresses_fails_with_the_reason(world):
    second = subprocess.run(
        [str(VENV_BIN / "axiom"), "sandbox", "run"],
        env=world.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 2
    [line] = second.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot listen: [Errno 98] DNS 127.0.0.1:{world.dns_port}")
    assert "(AXIOM_SANDBOX_DNS_LISTEN): Address already in use" in line
    assert "sandbox ready" not in second.stdout
    # the running world is untouched: still announced, still answering
    assert json.loads(world.cli("status", "--json").stdout)["running"] is True
    assert world.ask("gmail.com", "MX").answer


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("AXIOM_SANDBOX_MX_NETWORK", "10.0.0.0/24", "expected a loopback IPv4 network"),
        ("AXIOM_SANDBOX_DNS_LISTEN", "localhost", "expected HOST:PORT"),
        ("AXIOM_ENVIRONMENT", "production", "runs only in sandbox mode"),
    ],
)
def test_bad_settings_stop_the_world_with_one_line_naming_the_setting(
    axiom_home, name, value, message
):
    env = WorldProcess(axiom_home).env | {name: value}
    if name == "AXIOM_ENVIRONMENT":
        env["AXIOM_SECRET_KEY"] = axiom_home.secret.decode()
    result = subprocess.run(
        [str(VENV_BIN / "axiom"), "sandbox", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error:") and message in line
    if name != "AXIOM_ENVIRONMENT":
        assert name in line


def test_listings_made_by_another_process_are_answered_at_once(world):
    name = "10.0.0.127.zen.spamhaus.org"
    assert world.ask(name).rcode() == dns.rcode.NXDOMAIN
    out = world.cli("list-ip", "127.0.0.10", "--code", "127.0.0.4", "--reason", "botnet").stdout
    assert "127.0.0.10 listed in zen.spamhaus.org (127.0.0.4: XBL" in out
    assert _wait_for(lambda: bool(world.ask(name).answer))
    [rrset] = world.ask(name).answer
    assert [r.to_text() for r in rrset] == ["127.0.0.4"]
    assert world.ask("10.0.0.127.xbl.spamhaus.org").answer  # the component zone agrees
    listed = json.loads(world.cli("list", "--json").stdout)
    assert [(x["zone"], x["subject"], x["reason"]) for x in listed] == [
        ("zen.spamhaus.org", "127.0.0.10", "botnet")
    ]
    world.cli("unlist-ip", "127.0.0.10")
    assert _wait_for(lambda: world.ask(name).rcode() == dns.rcode.NXDOMAIN)
    world.cli("list-domain", "spammy.example")
    assert _wait_for(lambda: bool(world.ask("spammy.example.dbl.spamhaus.org").answer))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["list-ip", "nope"], "error: 'nope' is not an IPv4 or IPv6 address"),
        (
            ["list-ip", "127.0.0.9", "--zone", "bogus.example"],
            "--zone: unknown zone 'bogus.example'",
        ),
        (["list-ip", "127.0.0.9", "--zone", "xbl.spamhaus.org"], "list in zen.spamhaus.org"),
        (["list-ip", "127.0.0.9", "--zone", "dbl.spamhaus.org"], "lists domains, not ips"),
        (["list-ip", "127.0.0.9", "--code", "127.0.0.99"], "--code: '127.0.0.99' is not"),
        (["unlist-ip", "127.0.0.9"], "127.0.0.9 is not listed in zen.spamhaus.org"),
        (["reputation", "127.0.0.9"], "give exactly one of --score N or --reset"),
        (["reputation", "127.0.0.9", "--reset", "--provider", "aol"], "unknown provider 'aol'"),
        (["scenario", "nope"], "unknown scenario 'nope'; one of cold-ip-campaign"),
    ],
)
def test_bad_input_fails_with_one_line_naming_it(axiom_home, args, message):
    result = WorldProcess(axiom_home).cli(*args, check=False)
    assert result.returncode == 1
    assert message in " ".join(result.stderr.split())


def test_reputation_is_steered_in_the_running_world(world):
    out = world.cli("reputation", "127.0.0.10", "--score", "80", "--provider", "yahoo").stdout
    assert "set 1 standings to 80.0" in out
    # 80 points stand for 8 clean sending days: 40 a day x 1.5^8 (sandbox/behaviour.yaml)
    assert "yahoo: score 80.0 (established), today 0 of 1025 allowed, clean days 8.0" in out, out
    assert _wait_for(
        lambda: any(
            s["ip"] == "127.0.0.10" and s["tier"] == "established"
            for s in json.loads(world.cli("status", "--json").stdout)["standings"]
        )
    )
    [row] = json.loads(world.cli("status", "--json").stdout)["standings"]
    assert (row["clean_days"], round(row["allowance"]), row["sent_today"]) == (8.0, 1025, 0)
    shown = world.cli("status").stdout
    assert "Volume today against the allowance" in shown and "1025" in shown, shown
    assert "reset 1 standings" in world.cli("reputation", "127.0.0.10", "--reset").stdout


def test_scenarios_need_a_running_world_and_credentials(axiom_home):
    idle = WorldProcess(axiom_home)
    result = idle.cli("scenario", "blocklisted-ip", "--count", "2", check=False)
    assert result.returncode == 1
    assert "no username, password, domain: start `axiom up`" in " ".join(result.stderr.split())
    result = idle.cli(
        "scenario",
        "blocklisted-ip",
        "--username",
        "u",
        "--password",
        "p",
        "--domain",
        "d.example",
        check=False,
    )
    assert "the sandbox world is not running" in result.stderr


@pytest.fixture
def stack(axiom_home, world):
    """What `axiom up` runs: the world, a relay delivering into it, a demo tenant, up.json."""
    relay = RelayProcess(
        axiom_home,
        {
            "AXIOM_DELIVERY_PORT": world.env["AXIOM_DELIVERY_PORT"],
            "AXIOM_DNS_NAMESERVERS": world.env["AXIOM_SANDBOX_DNS_LISTEN"],
        },
    ).start()
    # The domain `axiom up` onboards: a subdomain, so receivers judge its organisation
    # (axiom.test) where DMARC and bulk status are concerned.
    demo = seed_tenant(axiom_home, "demo", "demo.axiom.test")
    (axiom_home.path / "up.json").write_text(
        json.dumps(
            {
                "submission": f"127.0.0.1:{axiom_home.ports['submission']}",
                "username": demo.username,
                "password": demo.password,
                "domain": demo.domain,
            }
        )
    )
    yield world
    relay.stop()


@pytest.mark.parametrize(
    "db_url", ["sqlite"], indirect=True
)  # scenarios: one backend each, both seen
def test_blocklisted_ip_scenario_reports_refusals_and_the_suspensions_they_caused(stack):
    result = stack.cli("scenario", "blocklisted-ip", "--count", "20", "--timeout", "60", "--json")
    report = json.loads(result.stdout)
    assert report["settled"] is True
    by = {p["provider"]: p for p in report["providers"]}
    assert sum(p["sent"] for p in by.values()) == 20
    # Gmail consults no public DNSBL: it never refuses these. Its mail goes out, unless the
    # blocklisted-anywhere reaction to Microsoft's refusals suspended the IP for every
    # provider first (a race of milliseconds): then it is held, not refused.
    assert by["google"]["blocked"] == 0, by["google"]
    assert by["google"]["delivered"] + by["google"]["held"] == 4, by["google"]
    for provider in ("microsoft", "yahoo", "apple", "generic"):
        assert by[provider]["delivered"] == 0, by[provider]
        assert by[provider]["blocked"] + by[provider]["held"] == 4, by[provider]
    assert "blocked using Spamhaus" in by["microsoft"]["top_reply"] or by["microsoft"]["held"]
    rules = {(s["provider"], s["rule"]) for s in report["suspensions"]}
    assert ("microsoft", "blocklisted-anywhere") in rules
    assert any(a["action"] == "path.suspend" for a in report["audit"])
    assert report["recommended"].get("suspend_path", 0) >= 3
    assert any("listed 127.0.0.1 in zen.spamhaus.org" in s for s in report["steering"])
    assert json.loads(stack.cli("list", "--json").stdout) == []  # the listing was undone
    # the human-readable form of the same kind of run
    human = stack.cli("scenario", "broken-dkim", "--count", "4", "--timeout", "60").stdout
    assert "broken-dkim" in human and "google" in human, human
    assert "5.7.30" in human, human  # Gmail's bulk-sender DKIM refusal, as promised
    status = json.loads(stack.cli("status", "--json").stdout)
    assert status["overrides"] == [] and "bulk_domains" not in status["knobs"]
    outcomes = {(a["provider"], a["outcome"]) for a in status["answers"]}
    assert ("microsoft", "blocklisted") in outcomes and ("google", "unauthenticated") in outcomes


@pytest.mark.parametrize(
    "db_url", ["sqlite"], indirect=True
)  # scenarios: one backend each, both seen
def test_complaint_spike_then_cold_ip_campaign(stack):
    spike = json.loads(
        stack.cli(
            "scenario",
            "complaint-spike",
            "--count",
            "30",
            "--complaint-share",
            "0.5",
            "--timeout",
            "60",
            "--json",
        ).stdout
    )
    assert spike["settled"] is True
    assert "complaint share 50% at every provider" in spike["steering"]
    by = {p["provider"]: p for p in spike["providers"]}
    assert sum(p["complaints"] for p in by.values()) >= 1
    assert by["google"]["arf_reports"] == 0  # Gmail's feedback loop is aggregate only
    for provider in ("yahoo", "microsoft"):
        assert by[provider]["arf_reports"] == by[provider]["complaints"], by[provider]
    reports = sum(by[p]["arf_reports"] for p in ("yahoo", "microsoft"))
    if reports:  # every report reached the feedback address and got an answer
        assert sum(spike["complaint_reports"].get(k, 0) for k in ("sent", "refused")) == reports
        assert spike["complaint_reply"][:1] in ("2", "5")
    assert "complaint_share" not in json.loads(stack.cli("status", "--json").stdout)["knobs"]

    report = json.loads(
        stack.cli(
            "scenario", "cold-ip-campaign", "--count", str(COLD_COUNT), "--timeout", "60", "--json"
        ).stdout
    )
    by = {p["provider"]: p for p in report["providers"]}
    each, allowance = COLD_COUNT // 4, cold_allowance()
    for provider in ("google", "yahoo", "microsoft", "apple"):
        assert by[provider]["sent"] == each
        assert 1 <= by[provider]["delivered"] <= allowance + 1, by[provider]
        assert by[provider]["deferred"] + by[provider]["held"] >= each - allowance - 1, by[provider]
    assert "4.7.28" in by["google"]["top_reply"] or by["google"]["held"]
    rules = {(s["provider"], s["rule"]) for s in report["suspensions"]}
    assert ("google", "google-unusual-rate") in rules
    assert ("yahoo", "yahoo-tss04") in rules
    assert {a["action"] for a in report["audit"]} >= {"path.suspend"}
    status = stack.cli("status").stdout
    assert "What the providers think of the source IPs" in status


# ---------------------------------------------------------------- what the README promises
# The scenarios' outcomes do not depend on the database: the four in the README's order run on
# PostgreSQL, the single scenarios and the clock on SQLite, so each backend sees every scenario
# (the suite's time: each of these takes 9-30 s).
BROKEN_DKIM_REPLIES = {
    "google": "5.7.30",
    "yahoo": "5.7.9",
    "microsoft": "5.7.515",
    "apple": "CS01",
}


def _scenario(stack, *args: str) -> dict:
    return json.loads(stack.cli("scenario", *args, "--timeout", "90", "--json").stdout)


def _reset(stack) -> dict:
    done = json.loads(stack.cli("reset", "--json").stdout)
    status = json.loads(stack.cli("status", "--json").stdout)
    assert status["listings"] == [] and status["overrides"] == [] and status["knobs"] == {}
    # Every standing was forgotten; the held mail the reset released may have made new, cold
    # ones since (it goes out at once): none of them established, damaged or blocked.
    assert done["world"].startswith("reset "), done
    assert all(s["tier"] == "cold" and not s["blocked"] for s in status["standings"]), status
    clock = json.loads(stack.cli("clock", "--json").stdout)
    assert clock["offset_seconds"] == 0
    return done


def assert_cold_ip_campaign(report: dict) -> None:
    """Providers accept a little, then rate-limit; the relay suspends or throttles paths."""
    by = {p["provider"]: p for p in report["providers"]}
    each, allowance = COLD_COUNT // 4, cold_allowance()
    for provider in ("google", "yahoo", "microsoft", "apple"):
        assert by[provider]["sent"] == each
        assert 1 <= by[provider]["delivered"] <= allowance + 1, by[provider]
        assert by[provider]["deferred"] + by[provider]["held"] >= each - allowance - 1, by[provider]
    rules = {(s["provider"], s["rule"]) for s in report["suspensions"]}
    assert ("google", "google-unusual-rate") in rules and ("yahoo", "yahoo-tss04") in rules
    assert report["paths_already_suspended"] == []


def assert_blocklisted_ip(report: dict, rate_rules: set[str]) -> None:
    """Providers consulting Spamhaus refuse with their blocklist replies; Gmail accepts.
    rate_rules: the rate-limit rules the cold campaign before it met (see below)."""
    by = {p["provider"]: p for p in report["providers"]}
    # Gmail consults no public DNSBL: it never refuses these. Its mail goes out, unless the
    # blocklisted-anywhere reaction to Microsoft's refusals suspended the IP for every provider
    # first (a race of milliseconds): then it is held, not refused (a full run hit it).
    google = by["google"]
    assert google["blocked"] == 0 and google["delivered"] + google["held"] == google["sent"]
    for provider in ("microsoft", "yahoo", "apple"):
        assert by[provider]["delivered"] == 0, by[provider]
        assert by[provider]["blocked"] + by[provider]["held"] == by[provider]["sent"]
    assert "Spamhaus" in by["microsoft"]["top_reply"] or by["microsoft"]["held"], by
    # The reset lifted every suspension and released the cold campaign's held mail, which goes
    # out at once into a world where every standing is cold again: a cold rate-limit reply to it
    # may suspend a path again before this scenario starts (a CI run met Yahoo's TSS04 so). A
    # path suspended by any other rule would be one the reset failed to lift.
    again = {entry.rsplit("(", 1)[1].rstrip(")") for entry in report["paths_already_suspended"]}
    assert again <= rate_rules, report["paths_already_suspended"]


def assert_complaint_spike(report: dict) -> None:
    """Complaints; Yahoo and Microsoft send ARF reports, Gmail does not; the complaint rate
    passes 0.3 % and the providers start deferring."""
    by = {p["provider"]: p for p in report["providers"]}
    assert sum(p["complaints"] for p in by.values()) >= 3
    assert by["google"]["arf_reports"] == 0
    for provider in ("yahoo", "microsoft"):
        assert by[provider]["arf_reports"] == by[provider]["complaints"], by[provider]
    assert sum(by[p]["arf_reports"] for p in ("yahoo", "microsoft")) >= 1
    assert sum(p["deferred"] + p["held"] for p in by.values()) >= 1, by
    assert report["paths_already_suspended"] == []


def assert_broken_dkim(report: dict) -> None:
    """SPF passes, DKIM fails: each provider requiring both refuses with its own reply."""
    by = {p["provider"]: p for p in report["providers"]}
    # The mail the reset released goes out at once, at cold rates: a rate-limit reply to it can
    # suspend a path for a while, and that path then holds this scenario's mail instead.
    for provider, code in BROKEN_DKIM_REPLIES.items():
        p = by[provider]
        assert p["delivered"] == 0 and p["blocked"] + p["held"] == p["sent"] == 2, p
        assert p["held"] or code in p["top_reply"], p
    # How many are held depends on what the reset released before (a loaded machine holds
    # more); the outcome the README promises shows as long as one provider refused them all.
    assert any(p["blocked"] == p["sent"] for p in by.values()), by


@pytest.mark.parametrize(
    "db_url", ["postgresql"], indirect=True
)  # scenarios: one backend each, both seen
def test_the_readme_scenarios_run_in_its_order_with_a_reset_between(stack):
    cold = _scenario(stack, "cold-ip-campaign", "--count", str(COLD_COUNT))
    assert_cold_ip_campaign(cold)
    # How much mail a suspension holds depends on the machine: on a loaded one every message
    # was tried (and deferred) before the first rate-limit reply suspended its path. What the
    # reset promises holds either way: every suspension-held recipient is released.
    held = _held_by_suspension(stack.home)
    done = _reset(stack)
    assert len(done["suspensions_lifted"]) >= 2  # the paths the campaign suspended
    assert done["held_mail_released"] >= held  # released mail may be held again: not rechecked
    rate_rules = {s["rule"] for s in cold["suspensions"]}
    assert_blocklisted_ip(_scenario(stack, "blocklisted-ip", "--count", "20"), rate_rules)
    _reset(stack)
    assert_complaint_spike(
        # 30 a provider: past the 20 deliveries the spam rate needs before it counts
        _scenario(stack, "complaint-spike", "--count", "90", "--complaint-share", "0.2")
    )
    _reset(stack)
    assert_broken_dkim(_scenario(stack, "broken-dkim", "--count", "8"))
    listed = axiom_cli.run(["audit", "--json"], stack.env, timeout=60)
    assert listed.returncode == 0, listed.stderr
    audit = json.loads(listed.stdout)
    lifts = [a for a in audit if a["action"] == "suspension.lift"]
    assert lifts and all(a["actor"] == "cli" for a in lifts)


def _held_by_suspension(home) -> int:
    """Queued recipients the relay postponed behind a suspension (protocol/verbs.py, WAITING)."""
    from datetime import UTC, datetime

    from sqlalchemy import func
    from sqlmodel import Session, col, select

    from models import Recipient, RecipientState
    from models.db import make_engine

    engine = make_engine(home.db_url)
    try:
        with Session(engine) as s:
            return s.exec(
                select(func.count())
                .select_from(Recipient)
                .where(
                    Recipient.state == RecipientState.queued,
                    Recipient.next_attempt_at > datetime.now(UTC),
                    col(Recipient.last_reply).like("waiting: %"),
                )
            ).one()
    finally:
        engine.dispose()


def _recipient(home, address: str):
    from sqlmodel import Session, select

    from models import Recipient
    from models.db import make_engine

    engine = make_engine(home.db_url)
    try:
        with Session(engine) as s:
            return s.exec(select(Recipient).where(Recipient.address == address)).first()
    finally:
        engine.dispose()


def _submit(home, demo: dict, rcpt: str) -> None:
    import smtplib
    import ssl

    host, port = demo["submission"].rsplit(":", 1)
    with smtplib.SMTP(host, int(port), timeout=30) as client:
        client.starttls(context=ssl._create_unverified_context())  # the sandbox certificate
        client.login(demo["username"], demo["password"])
        sender = f"clock@{demo['domain']}"
        client.sendmail(
            sender,
            [rcpt],
            f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: clock\r\n\r\ntick\r\n",
        )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # clock reads: unit-tested on both
def test_advancing_the_clock_ends_a_suspension_and_brings_retries_due(stack):
    """A 2-hour suspension ends when the clock moves 3 hours: the mail it held goes out at once,
    in the relay and at the world's simulated Gmail; the world ages reputations likewise."""
    from datetime import UTC, datetime, timedelta

    from sqlmodel import Session

    from models import Suspension
    from models.db import make_engine

    home = stack.home
    demo = json.loads((home.path / "up.json").read_text())
    engine = make_engine(home.db_url)
    try:
        with Session(engine) as s:
            s.add(
                Suspension(
                    source_ip="127.0.0.1",
                    provider="google",
                    action="suspend",
                    reason="test: two hours",
                    rule_id="google-unusual-rate",
                    expires_at=datetime.now(UTC) + timedelta(hours=2),
                )
            )
            s.commit()
    finally:
        engine.dispose()
    stack.cli("reputation", "127.0.0.1", "--score", "90")
    from sandbox.scenarios import _existing_recipient

    rcpt = _existing_recipient("clock", 0, "gmail.com")  # not one of the unknown 2 %
    _submit(home, demo, rcpt)
    assert _wait_for(
        lambda: (
            (r := _recipient(home, rcpt)) is not None
            and (r.last_reply or "").startswith("waiting: 127.0.0.1 suspended for google")
        ),
        timeout=20,
    ), _recipient(home, rcpt)
    time.sleep(2)
    assert _recipient(home, rcpt).state == "queued"  # held: nothing moves without the clock

    out = stack.cli("clock", "advance", "3h").stdout
    assert "advanced +3h" in out and "+3h ahead of the system clock" in out, out
    assert json.loads(stack.cli("clock", "--json").stdout)["offset_seconds"] == 10800
    assert _wait_for(lambda: _recipient(home, rcpt).state == "delivered", timeout=20), (
        _recipient(home, rcpt).state,
        _recipient(home, rcpt).last_reply,
    )
    answers = json.loads(stack.cli("status", "--json").stdout)["answers"]
    assert {"provider": "google", "outcome": "accepted"} in [
        {k: a[k] for k in ("provider", "outcome")} for a in answers
    ]

    # A week later the world has let the IP's standing at Apple cool: of its 6 whole idle
    # days, 4 are past the 2-day grace, and the history halves every 5 (behaviour.yaml).
    stack.cli("reputation", "127.0.0.1", "--score", "80", "--provider", "apple")
    stack.cli("clock", "advance", "7d")

    def apple_score() -> float:
        rows = json.loads(stack.cli("status", "--json").stdout)["standings"]
        return next(r["score"] for r in rows if r["provider"] == "apple")

    assert _wait_for(lambda: apple_score() < 50, timeout=10), apple_score()
    assert apple_score() == pytest.approx(80 * 0.5 ** (4 / 5), abs=0.1)

    done = json.loads(stack.cli("reset", "--json").stdout)
    assert done["clock_offset_was_seconds"] == 10800 + 7 * 86400
    assert json.loads(stack.cli("clock", "--json").stdout)["offset_seconds"] == 0


def test_production_time_cannot_be_moved_nor_the_sandbox_reset(axiom_home):
    env = WorldProcess(axiom_home).env | {
        "AXIOM_ENVIRONMENT": "production",
        "AXIOM_SECRET_KEY": axiom_home.secret.decode(),
    }
    for args, message in [
        (["clock", "advance", "1d"], "the clock is the system clock and cannot be moved"),
        (["reset"], "runs only in sandbox mode"),
    ]:
        result = axiom_cli.run(["sandbox", *args], env, timeout=60)
        assert result.returncode == 2
        [line] = result.stderr.strip().splitlines()
        assert line.startswith("error: AXIOM_ENVIRONMENT=production") and message in line

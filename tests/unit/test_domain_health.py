"""protocol/domain_health.py's decisions at and around every threshold of runbooks/domain-health.yaml.

DMARC: DmarcReport/DmarcRecord rows seeded directly on a migrated database (SQLite and
PostgreSQL), our IPs as IpAddress rows; check_dmarc_reports opens, folds or does not open a
dmarc-failing incident. DNS: dns_verdict on check tables, and check_dns's incidents and notices
with the DNS check replaced by a given table (the checks against real DNS are in
tests/integration/test_domain_health.py).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import count

import pytest
from sqlmodel import select

from config.settings import load_settings
from models import Domain, DomainState, Incident, IncidentState, IpAddress, IpPool, Tenant
from models.db import session_scope
from models.dmarc import DmarcRecord, DmarcReport
from protocol import dns_checks, domain_health, incidents
from protocol.dns_checks import Check, DomainCheck
from runbooks.loader import domain_health as rules

NOW = datetime(2026, 5, 1, 5, 15, tzinfo=UTC)
DOMAIN = "acme.example"
OURS = ("127.0.0.10", "127.0.0.11")
THEIRS = "192.0.2.25"
RULES = rules()
SPEC = RULES.spec
MIN, RATE = SPEC.dmarc_min_messages, SPEC.dmarc_max_fail_rate
WINDOW = timedelta(days=SPEC.dmarc_window_days)
_ids = count(1)


@pytest.fixture
def engine(engine):
    """Tenant acme with an active acme.example; our two IPs in pool shared."""
    with session_scope(engine) as s:
        tenant = Tenant(name="acme", language="it")
        s.add(tenant)
        s.flush()
        s.add(Domain(tenant_id=tenant.id, name=DOMAIN, state=DomainState.active))
        s.add(Domain(tenant_id=tenant.id, name="pending.example"))
        pool = IpPool(name="shared")
        s.add(pool)
        s.flush()
        for address in OURS:
            s.add(IpAddress(address=address, pool_id=pool.id))
        s.commit()
    return engine


def seed(engine, reporter: str, *rows, begin: datetime | None = None, domain: str = DOMAIN):
    """One report by `reporter` whose period begins at `begin` (default a day before NOW);
    rows: (source IP, count, dkim, spf) as policy_evaluated says them."""
    begin = begin or NOW - timedelta(days=1)
    with session_scope(engine) as s:
        report = DmarcReport(
            org_name=reporter,
            report_id=str(next(_ids)),
            domain=domain,
            begin=begin,
            end=begin + timedelta(days=1),
            messages=sum(r[1] for r in rows),
            received_at=begin + timedelta(days=1, hours=2),
        )
        s.add(report)
        s.flush()
        for ip, n, dkim, spf in rows:
            s.add(
                DmarcRecord(
                    report_id=report.id,
                    domain=domain,
                    begin=begin,
                    source_ip=ip,
                    count=n,
                    disposition="none",
                    dkim=dkim,
                    spf=spf,
                    header_from=domain,
                )
            )
        s.commit()


def run_dmarc(engine, now: datetime = NOW) -> domain_health.HealthResult:
    result = domain_health.HealthResult()
    with session_scope(engine) as s:
        domain_health.check_dmarc_reports(s, result, now=now, actor="flow:test", runbook=RULES)
        s.commit()
    return result


def open_incidents(engine, cause: str) -> list[Incident]:
    with session_scope(engine) as s:
        return list(
            s.exec(
                select(Incident).where(Incident.cause == cause, Incident.open_key.is_not(None))
            ).all()
        )


# ------------------------------------------------------------------ DMARC thresholds
def test_the_runbook_thresholds_are_what_these_cases_are_built_around():
    # The cases below derive their numbers from the spec; they need a rate whose boundary is a
    # whole number of messages and a minimum above one, as the shipped runbook has.
    assert MIN >= 2 and 0 < RATE < 1
    assert MIN / round(MIN / RATE) == RATE


@pytest.mark.parametrize(
    ("failed", "passed", "opens"),
    [
        (MIN - 1, 0, False),  # one failure short of the minimum, at 100 %
        (MIN, 0, True),  # the minimum, at 100 %
        (MIN, round(MIN / RATE) - MIN, False),  # exactly the rate: not above it
        (MIN, round(MIN / RATE) - MIN - 1, True),  # just above the rate
        (MIN + 1, round(MIN / RATE) - MIN, True),  # one more failure on the same volume
        (MIN, 10 * round(MIN / RATE), False),  # enough failures, far under the rate
    ],
)
def test_failures_of_our_ips_open_an_incident_at_and_above_both_thresholds(
    engine, failed, passed, opens
):
    seed(
        engine,
        "google.com",
        (OURS[0], failed, "fail", "fail"),
        *([(OURS[0], passed, "pass", "fail")] if passed else []),
    )
    result = run_dmarc(engine)
    found = open_incidents(engine, domain_health.DMARC_FAILING)
    assert bool(found) is opens
    assert len(result.incidents) == (1 if opens else 0)
    if opens:
        (incident,) = found
        assert incident.subject == f"domain:{DOMAIN}" and incident.severity == "critical"
        assert f"google.com: {failed} of {failed + passed}" in incident.summary
        assert (incident.runbook_id, incident.runbook_version) == (RULES.id, RULES.version)
        (reporter,) = incident.evidence["reporters"]
        assert (reporter["reporter"], reporter["failed"]) == ("google.com", failed)
        assert reporter["sources"] == {OURS[0]: {"messages": failed + passed, "failed": failed}}


@pytest.mark.parametrize(
    ("dkim", "spf", "fails"),
    [
        ("pass", "pass", False),
        ("pass", "fail", False),
        ("fail", "pass", False),
        ("fail", "fail", True),
    ],
)
def test_dmarc_passes_when_dkim_or_spf_passes_aligned(engine, dkim, spf, fails):
    seed(engine, "google.com", (OURS[0], MIN, dkim, spf))
    run_dmarc(engine)
    assert bool(open_incidents(engine, domain_health.DMARC_FAILING)) is fails


@pytest.mark.parametrize(
    ("begin", "counted"),
    [
        (NOW - WINDOW - timedelta(seconds=1), False),  # began just before the window
        (NOW - WINDOW, True),  # at the window's start
        (NOW - timedelta(seconds=1), True),
        (NOW, False),  # the window ends at now, exclusive
    ],
)
def test_the_window_counts_reports_by_the_start_of_their_period(engine, begin, counted):
    seed(engine, "google.com", (OURS[0], MIN, "fail", "fail"), begin=begin)
    run_dmarc(engine)
    assert bool(open_incidents(engine, domain_health.DMARC_FAILING)) is counted


def test_a_day_report_arriving_after_a_run_is_read_by_the_next_one(engine):
    """Reports cover a day and come during the next one: the daily run after the one that
    missed it still has it in its window."""
    day = datetime(2026, 4, 30, tzinfo=UTC)  # the period; the report lands on May 1 at 10:00
    seed(engine, "google.com", (OURS[0], MIN, "fail", "fail"), begin=day)
    run_dmarc(engine, now=day + timedelta(days=2, hours=5, minutes=15))
    assert open_incidents(engine, domain_health.DMARC_FAILING)


def test_other_senders_failing_are_not_ours_to_report(engine):
    seed(engine, "google.com", (THEIRS, 10 * MIN, "fail", "fail"), (OURS[0], MIN, "pass", "pass"))
    assert run_dmarc(engine).incidents == []
    assert open_incidents(engine, domain_health.DMARC_FAILING) == []


def test_reporters_are_judged_apart_and_only_the_failing_ones_are_named(engine):
    """A receiver sees our mail as it is: its failures count even when another's volume of
    passes would dilute them; failures split under the minimum at each are not pooled."""
    seed(
        engine,
        "google.com",
        (OURS[0], MIN // 2 + 1, "fail", "fail"),
        (OURS[1], MIN // 2, "fail", "fail"),  # our IPs at one reporter add up
    )
    seed(engine, "Yahoo", (OURS[0], 100 * MIN, "pass", "pass"))
    seed(engine, "Mail.Ru", (OURS[0], MIN - 1, "fail", "fail"))  # under the minimum
    run_dmarc(engine)
    (incident,) = open_incidents(engine, domain_health.DMARC_FAILING)
    assert "google.com: " in incident.summary
    assert "Yahoo" not in incident.summary and "Mail.Ru" not in incident.summary
    (google,) = incident.evidence["reporters"]
    assert google["failed"] == MIN + 1 and set(google["sources"]) == set(OURS)

    # Two reporters each under the minimum: nothing, though together they pass it.
    other = "other.example"
    seed(engine, "Mail.Ru", (OURS[0], MIN - 1, "fail", "fail"), domain=other)
    seed(engine, "Outlook.com", (OURS[0], MIN - 1, "fail", "fail"), domain=other)
    run_dmarc(engine)
    assert [i.subject for i in open_incidents(engine, domain_health.DMARC_FAILING)] == [
        f"domain:{DOMAIN}"
    ]


def test_a_second_run_folds_into_the_open_incident_and_a_resolved_one_is_not_reopened(engine):
    seed(engine, "google.com", (OURS[0], MIN, "fail", "fail"))
    first = run_dmarc(engine)
    second = run_dmarc(engine, now=NOW + timedelta(days=1))
    (incident,) = open_incidents(engine, domain_health.DMARC_FAILING)
    assert first.incidents == second.incidents == [incident.id]
    assert incident.occurrences == 2
    with session_scope(engine) as s:
        assert [e.kind for e in incidents.timeline(s, incident.id)] == ["signal", "signal"]
        incidents.transition(s, incident.id, IncidentState.RESOLVED, actor="alice", now=NOW)
        s.commit()
    # a person resolved it; the same reports still in the window open a new one (they fail)
    run_dmarc(engine, now=NOW + timedelta(days=1, hours=1))
    (again,) = open_incidents(engine, domain_health.DMARC_FAILING)
    assert again.id != incident.id and again.occurrences == 1


def test_no_ip_of_ours_costs_no_record_query(engine):
    with session_scope(engine) as s:
        for ip in s.exec(select(IpAddress)).all():
            s.delete(ip)
        s.commit()
    seed(engine, "google.com", (OURS[0], MIN, "fail", "fail"))
    with session_scope(engine) as s:
        assert domain_health.reporter_results(s, since=NOW - WINDOW, until=NOW) == []


# ------------------------------------------------------------------ DNS verdicts
def row(name: str, ok: bool = False, **kw) -> Check:
    owner = "relay" if name.startswith("fcrdns:") or name == "alignment.return_path" else "customer"
    return Check(name, ok, f"{name} {'ok' if ok else 'broken'}", owner=kw.pop("owner", owner), **kw)


ALL_ROWS = (
    "spf.record",
    "spf.lookups",
    "spf.void_lookups",
    "spf.include",
    "dkim:axrsa2026051",
    "dkim:axed255192026051",
    "dmarc.record",
    "dmarc.policy",
    "alignment.dkim",
    "alignment.return_path",
    "return_path.mx",
    "return_path.spf",
    "fcrdns:127.0.0.10",
)


def table(
    *failing: str, transient: tuple[str, ...] = (), warn: tuple[str, ...] = ()
) -> DomainCheck:
    rows = [
        row(
            name,
            ok=name not in failing and name not in transient,
            transient=name in transient,
            level="warn" if name in warn else "error",
        )
        for name in (*ALL_ROWS, "dmarc.rua")
        if name != "dmarc.rua" or "dmarc.rua" in warn
    ]
    return DomainCheck(DOMAIN, rows, NOW)


@pytest.mark.parametrize(
    ("check", "outcome", "severity", "notice"),
    [
        (table(), "passing", None, False),
        (table("dmarc.rua", warn=("dmarc.rua",)), "passing", None, False),  # a warning only
        (table("spf.include"), "broken", "warning", True),  # not where SPF is checked for us
        (table("spf.record"), "broken", "warning", True),
        (table("dkim:axrsa2026051"), "broken", "critical", True),  # one key differs
        (
            table("dkim:axrsa2026051", "dkim:axed255192026051", "alignment.dkim"),
            "broken",
            "critical",
            True,
        ),
        (table("dmarc.record"), "broken", "critical", True),  # DMARC gone
        (table("return_path.mx"), "broken", "critical", True),
        (table("return_path.spf"), "broken", "critical", True),
        (table("fcrdns:127.0.0.10"), "broken", "warning", False),  # ours to fix, not theirs
        (table(transient=("spf.record", "dmarc.record", "return_path.mx")), "skipped", None, False),
        # what was answered and wrong counts; what was not answered is left out
        (table("spf.include", transient=("dmarc.record",)), "broken", "warning", True),
        (table(transient=("dmarc.rua",), warn=("dmarc.rua",)), "passing", None, False),
    ],
)
def test_dns_verdicts(check, outcome, severity, notice):
    verdict = domain_health.dns_verdict(check)
    assert (verdict.outcome, verdict.severity, bool(verdict.customer_rows)) == (
        outcome,
        severity,
        notice,
    )
    assert all(not c.transient and c.blocking for c in verdict.failing)
    assert all(not c.transient for c in verdict.customer_rows)
    assert {c.name for c in verdict.unanswered} == {c.name for c in check.checks if c.transient}


# ------------------------------------------------------------------ DNS incidents
@pytest.fixture
def dns(monkeypatch):
    """check_dns with the DNS check answering the table the test sets (stored as the real one
    stores it)."""
    answers: list[DomainCheck] = []

    def fake(session, domain_name, settings, *, now):
        result = answers.pop(0)
        domain = session.exec(select(Domain).where(Domain.name == domain_name)).one()
        domain.dns_checks, domain.dns_checked_at = result.as_json(), now
        session.add(domain)
        return result

    monkeypatch.setattr(dns_checks, "check_and_record", fake)
    return answers


def run_dns(engine, now: datetime = NOW) -> domain_health.HealthResult:
    result = domain_health.HealthResult()
    settings = load_settings(hostname="relay.axiom.test")
    with session_scope(engine) as s:
        for name in domain_health.active_domains(s):
            domain_health.check_dns(
                s, settings, name, result, now=now, actor="flow:test", runbook=RULES
            )
        s.commit()
    return result


def test_only_active_domains_are_checked(engine):
    with session_scope(engine) as s:
        assert domain_health.active_domains(s) == [DOMAIN]


def test_a_broken_record_opens_once_folds_then_resolves(engine, dns):
    dns.extend(
        [
            table("spf.include"),  # the customer removed our include
            table("spf.include", "dmarc.record"),  # and then DMARC: worse while open
            table(transient=("spf.record", "dmarc.record")),  # DNS did not answer
            table(),  # all fixed
            table("dkim:axrsa2026051"),  # a new break: a new incident
        ]
    )
    first = run_dns(engine)
    (incident,) = open_incidents(engine, domain_health.DNS_BROKEN)
    assert first.incidents == [incident.id] and incident.severity == "warning"
    assert [c["name"] for c in incident.evidence["checks"]] == ["spf.include"]
    assert [(n["tenant"], n["domain"]) for n in first.notices] == [("acme", DOMAIN)]
    assert [m["name"] for m in first.notices[0]["missing"]] == ["spf.include"]

    second = run_dns(engine, NOW + timedelta(days=1))
    (folded,) = open_incidents(engine, domain_health.DNS_BROKEN)
    assert folded.id == incident.id and folded.occurrences == 2
    assert folded.severity == "critical"  # DMARC gone raised it
    assert {c["name"] for c in folded.evidence["checks"]} == {"spf.include", "dmarc.record"}
    assert second.notices == []  # told once per incident

    third = run_dns(engine, NOW + timedelta(days=2))
    assert DOMAIN in third.skipped and third.incidents == third.resolved == []
    (still,) = open_incidents(engine, domain_health.DNS_BROKEN)
    assert still.occurrences == 2

    fourth = run_dns(engine, NOW + timedelta(days=3))
    assert fourth.resolved == [incident.id] and fourth.passing == [DOMAIN]
    assert open_incidents(engine, domain_health.DNS_BROKEN) == []
    with session_scope(engine) as s:
        assert s.get(Incident, incident.id).state == IncidentState.RESOLVED

    fifth = run_dns(engine, NOW + timedelta(days=4))
    (new,) = open_incidents(engine, domain_health.DNS_BROKEN)
    assert new.id != incident.id and new.severity == "critical"
    assert len(fifth.notices) == 1  # a new incident, a new notice


def test_a_skipped_domain_without_an_incident_opens_none_and_a_passing_one_resolves_none(
    engine, dns
):
    dns.extend([table(transient=("dkim:axrsa2026051", "alignment.dkim")), table()])
    assert DOMAIN in run_dns(engine).skipped
    assert run_dns(engine).resolved == []
    with session_scope(engine) as s:
        assert s.exec(select(Incident)).all() == []
        assert s.exec(select(Domain).where(Domain.name == DOMAIN)).one().dns_checks["passed"]


def test_our_own_ptr_broken_tells_the_customer_nothing_until_their_records_break(engine, dns):
    dns.extend([table("fcrdns:127.0.0.10"), table("fcrdns:127.0.0.10", "dkim:axrsa2026051")])
    first = run_dns(engine)
    assert first.notices == [] and len(first.incidents) == 1
    second = run_dns(engine, NOW + timedelta(days=1))
    assert second.incidents == first.incidents  # the same incident
    assert [m["name"] for n in second.notices for m in n["missing"]] == ["dkim:axrsa2026051"]
    (incident,) = open_incidents(engine, domain_health.DNS_BROKEN)
    assert incident.evidence["customer_notice"] == (NOW + timedelta(days=1)).isoformat()
